//! `nsh-core`: everything the nsh tools share, one folder per part of the
//! architecture (`docs/architecture.md` has the map):
//!
//! * [`nix`]: what Nix speaks and keeps: the wire format, NARs, store
//!   paths, derivations, the serve protocol, the local store;
//! * [`slurm`]: Slurm's job model, slurmrestd and the command-line backend,
//!   one client per cluster;
//! * [`stage`]: the five tools' logic (closure, alloc, push, run, fetch) and
//!   what they share: ssh to the node, retry, release, progress;
//! * [`hook`]: `nsh-hook`: the build-hook protocol, the decision, the
//!   pipeline, slots, and `--check`;
//! * [`pool`]: running jobs kept for later builds (allocation reuse), in
//!   the [`runtime`] directory;
//! * [`sys`]: the system calls std lacks, the crate's only `unsafe`;
//! * at the top: the [`ticket`], the [`tool`] loop every stage runs, the
//!   [`error`]s and their [`exit`] statuses, the [`log`], the [`config`].
//!
//! Every tool's `main.rs` is a few lines that parse the command line
//! (`nsh-cli`) and hand a stage function to [`tool::run_stage`].

pub mod config;
pub mod error;
pub mod exit;
pub mod hook;
pub mod log;
pub mod nix;
pub mod pool;
pub mod runtime;
pub mod slurm;
pub mod stage;
pub mod sys;
pub mod ticket;
pub mod tool;

pub use error::{Failure, Kind, ResultExt};
pub use exit::ExitStatus;
pub use ticket::Ticket;
