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

pub mod alloc;
pub mod batch_script;
pub mod check;
pub mod closure;
pub mod config;
pub mod drv;
pub mod error;
pub mod exit;
pub mod fetch;
pub mod hook;
pub mod hook_config;
pub mod hook_decision;
pub mod hook_pipeline;
pub mod hook_proto;
pub mod log;
pub mod nar;
pub mod push;
pub mod resources;
pub mod run;
pub mod serve;
pub mod serve_client;
#[cfg(test)]
pub(crate) mod serve_test_server;
pub mod slots;
pub mod slurm;
pub mod store;
pub mod store_path;
pub mod ticket;
pub mod tool;
pub mod transfer;
pub mod transport;
pub mod wire;

pub use error::{Failure, Kind, ResultExt};
pub use exit::ExitStatus;
pub use ticket::Ticket;
