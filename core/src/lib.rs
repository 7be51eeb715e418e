//! `nsh-core`: everything the nsh tools share.
//!
//! The crate is split the way the tools use it:
//!
//! * pure codecs and decisions, no I/O: [`ticket`], [`exit`], [`error`]
//!   (and, as they land, store paths, derivations, configuration, the Nix
//!   wire format, the build-hook and serve protocols, Slurm request/response
//!   shapes);
//! * thin I/O layers on top of them: [`tool`] (the stdin→stdout ticket loop
//!   every tool runs), [`log`].
//!
//! Every tool's `main.rs` is a few lines that hand a stage function to
//! [`tool::run_stage`].

pub mod config;
pub mod error;
pub mod exit;
pub mod hook;
pub mod log;
pub mod nix;
pub mod slurm;
pub mod stage;
pub mod sys;
pub mod ticket;
pub mod tool;

pub use error::{Failure, Kind, ResultExt};
pub use exit::ExitStatus;
pub use ticket::Ticket;
