//! `nsh-core`: everything the nsh tools share, one folder per part of the
//! architecture (`docs/architecture.md` has the map). The folders are
//! private; what the tools, `nsh-cli` and the tests use is re-exported here:
//!
//! * at the top: the [`Ticket`] and the [`run_stage`] loop every stage
//!   runs, the [`Redactor`] that makes tickets fit for snapshots
//!   (`nsh-redact`), [`Failure`]s, their [`Kind`] and [`ExitStatus`], the [`Config`],
//!   [`StorePath`]s, the log (`log_info!` & co., [`set_program`]), and the
//!   few system calls a tool's `main` makes (signals, an inherited fd);
//! * one module per tool's logic: [`closure`], [`alloc`], [`push`], [`run`],
//!   [`fetch`], and [`build_hook`] for `nsh-hook` (with its `--check`);
//! * what those share and the tests drive directly: [`progress`] (what a
//!   stage reports; `nsh-cli` draws it), [`ssh`] (reaching a node),
//!   [`store`] (the local store and its input closures), [`serve`] (the
//!   `nix-store --serve` protocol), [`rest`] (Slurm's job model and the
//!   slurmrestd codec).
//!
//! Inside, the folders are `nix/` (what Nix speaks and keeps), `slurm/`,
//! `stage/` (the five tools' logic), `hook/`, `sys/` (the only `unsafe`),
//! `pool/` (running jobs kept for later builds, in the `runtime` directory),
//! `status/` (what the stages record for `nsh-status`: builds in flight,
//! recent failures),
//! and at the top the ticket, the stage loop, errors, exit statuses, the
//! log and the configuration.

mod config;
mod derive;
mod error;
mod exit;
mod hook;
mod lines;
mod log;
mod nix;
mod pool;
mod redact;
mod runtime;
mod slurm;
mod stage;
mod status;
mod sys;
mod ticket;
mod tool;

pub use config::Config;
pub use error::{Failure, Kind, ResultExt};
pub use exit::ExitStatus;
pub use log::set_program;
pub use nix::store_path::{StoreDir, StorePath};
pub use redact::Redactor;
pub use runtime::RUNTIME_DIR_ENV;
pub use status::record_builds;
pub use sys::fds::take_inherited;
pub use sys::flock::{lock_exclusive, Wait};
pub use sys::signals::{catch_interrupts, Syscalls};
pub use ticket::{AllocSection, BuildOptions, Ticket};
pub use tool::run_stage;

/// What the `log_*!` macros expand to; not for direct use.
#[doc(hidden)]
pub use log::{write as __log_write, Level as __LogLevel};

/// `nsh-closure`: what a derivation's build needs, as a ticket.
pub mod closure {
    pub use crate::stage::closure::{run, ClosureOptions};
}

/// `nsh-alloc`: a Slurm job on a node that fits, and its cancellation.
pub mod alloc {
    pub use crate::slurm::Clusters;
    pub use crate::stage::alloc::{allocate, cancel_stage, times_json, AllocTimes};

    /// The pool seen by an admin: `nsh-alloc --pool-list` and `--pool-drain`.
    pub mod admin {
        pub use crate::stage::alloc::admin::{drain, list, pooled};
    }

    /// The batch script every job runs.
    pub mod batch_script {
        pub use crate::stage::alloc::batch_script::SCRIPT;
    }
}

/// `nsh-push`: the input paths the node lacks, copied into its store.
pub mod push {
    pub use crate::stage::push::{push, Method};
}

/// `nsh-run`: the build handed to the job, its log followed, its result read.
pub mod run {
    pub use crate::stage::run::{LogSink, Runner, JOB_CHECK_INTERVAL};
}

/// `nsh-fetch`: the outputs copied back into the local store.
pub mod fetch {
    pub use crate::stage::fetch::{fetch, FetchOptions, ImportMethod};
}

/// `nsh-hook`: Nix's build hook, and the doctor `nsh-hook --check`.
pub mod build_hook {
    pub use crate::hook::config::HookConfig;
    pub use crate::hook::decision::{decide, ClusterCaps, LocalCaps};
    pub use crate::hook::protocol::{Accepted, Reply, Request, Settings, Try};
    pub use crate::hook::slots::SlotDir;
    pub use crate::hook::{decide_and_lock, main, Locked};

    /// `nsh-hook --check`: the checks, their lines and the exit status.
    pub mod check {
        pub use crate::hook::check::{exit_status, run, Line, Options, EXIT_CONFIG, EXIT_OK};
    }
}

/// What a stage reports while it waits or copies: log lines here, bars and
/// spinners in `nsh-cli`.
pub mod progress {
    pub use crate::slurm::JobInfo;
    pub use crate::stage::progress::{
        describe_wait, LogQueueProgress, LogTransferProgress, QueueProgress, TransferProgress,
    };
}

/// Reaching a node: ssh with a ControlMaster per job, and remote quoting.
pub mod ssh {
    pub use crate::config::Ssh as Settings;
    pub use crate::stage::ssh::{shell_quote, Ssh};
}

/// The local store: its directory, derivations read from it, and the input
/// closure a build needs.
pub mod store {
    pub use crate::nix::local_store::{
        dependency_order, input_closure, LocalStore, Validity, ValidityWay,
    };
}

/// The `nix-store --serve` protocol: a client over any pipe, and a build
/// request written ahead of time.
pub mod serve {
    pub use crate::nix::serve::client::ServeProcess;
    pub use crate::nix::serve::{
        read_build_response, write_build_request, BuildResponse, BuildStatus, PathInfo,
    };
}

/// Slurm's job model as nsh sees it, and the slurmrestd codec of every API
/// version nsh speaks.
pub mod rest {
    pub use crate::slurm::rest::{
        check, parse_cancel, parse_job, parse_submit, server_release, submit_body,
    };
    pub use crate::slurm::{ApiVersion, JobRequest, JobState};
}

/// `nsh-status`: the builds in flight, the pooled jobs and the recent
/// failures, as rows for JSON lines or a table.
pub mod nsh_status {
    pub use crate::runtime::location as runtime_dir;
    pub use crate::status::view::{table, Sections};
    pub use crate::status::{gather, Options, Report};
}
