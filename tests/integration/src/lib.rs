//! Helpers for the cluster tests; see `tests/`.
