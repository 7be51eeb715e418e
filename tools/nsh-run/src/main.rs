//! `nsh-run`: tickets in, tickets out with a `run` section: the build handed
//! to the ticket's waiting Slurm job, its log forwarded live, its result read.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nsh_core::alloc::Clusters;
use nsh_core::run::{LogSink, Runner, JOB_CHECK_INTERVAL};
use nsh_core::run_stage;
use nsh_core::Config;
use nsh_core::{catch_interrupts, Syscalls};
use nsh_core::{ExitStatus, Failure};

/// Builds each ticket's derivation (read on stdin, one JSON object per line,
/// with `drv`, `closure` and `alloc` sections) in its Slurm job, forwards the
/// build log as it is written, and writes the ticket with
/// `run: {status, error, times_built, start, stop, built_outputs}` to stdout.
///
/// Exit status: 0 built or already valid, 1 the build failed, 101 it timed
/// out (Nix's `timeout` / `max-silent-time`), 75 transient (the job died:
/// node failure, preemption, cancelled, Slurm time limit; ssh lost),
/// 65 bad ticket, 78 bad configuration, 64 usage.
#[derive(Parser)]
#[command(name = "nsh-run", version)]
struct Args {
    /// The nsh configuration (default: $NSH_CONFIG, else /etc/nsh/nsh.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Write the build log to this open file descriptor instead of stderr
    /// (nsh-hook passes Nix's fd 4). Default: $NSH_LOG_FD, else stderr.
    #[arg(long, value_name = "FD")]
    log_fd: Option<i32>,
}

fn main() -> ExitCode {
    let args: Args = nsh_cli::start("nsh-run");
    let log_fd = match args.log_fd {
        Some(fd) => Some(fd),
        None => match std::env::var("NSH_LOG_FD") {
            Ok(v) if !v.is_empty() => {
                if let Ok(fd) = v.parse() {
                    Some(fd)
                } else {
                    eprintln!("nsh-run: NSH_LOG_FD={v:?} is not a file descriptor number");
                    return ExitStatus::Usage.into();
                }
            }
            _ => None,
        },
    };
    let log = match log_fd {
        None => LogSink::Stderr,
        Some(fd) => {
            // The build log must reach no child of ours (an ssh master
            // started here outlives us, and the daemon waits for EOF on the
            // log): it is made close-on-exec.
            let Some(file) = nsh_core::take_inherited(fd) else {
                eprintln!("nsh-run: log fd {fd}: not an open file descriptor");
                return ExitStatus::Usage.into();
            };
            LogSink::Fd(file)
        }
    };
    let config = Config::load(args.config.as_deref());
    let interrupted = catch_interrupts(Syscalls::Restart);
    let mut runner = None;
    let mut log = Some(log);
    // The runner is made at the first ticket (it needs the configuration,
    // which may have failed to load) and owns the log sink from then on.
    run_stage(
        "run",
        std::io::stdin().lock(),
        std::io::stdout().lock(),
        |ticket| {
            let config = config.as_ref().map_err(Clone::clone)?;
            let runner = match (runner.as_mut(), log.take()) {
                (Some(runner), _) => runner,
                (None, Some(log)) => runner.insert(Runner {
                    config,
                    clusters: Clusters::default(),
                    log,
                    job_check_interval: JOB_CHECK_INTERVAL,
                    interrupted,
                }),
                (None, None) => return Err(Failure::permanent("nsh-run: no log sink")),
            };
            runner.run(ticket)
        },
    )
    .into()
}
