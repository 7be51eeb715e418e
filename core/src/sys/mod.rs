//! The few system calls std does not wrap.
