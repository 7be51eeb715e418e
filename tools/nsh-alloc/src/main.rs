//! `nsh-alloc`: tickets in, tickets out with an `alloc` section: a Slurm job,
//! running on a node that fits the derivation, waiting for its build request.
//! `nsh-alloc --cancel` cancels the jobs of the tickets it reads.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nsh_core::alloc::Clusters;
use nsh_core::alloc::{self, AllocTimes};
use nsh_core::run_stage;
use nsh_core::Config;
use nsh_core::{catch_interrupts, Syscalls};

/// Gets a Slurm job for each ticket read on stdin (one JSON object per line)
/// and writes the ticket with `alloc: {cluster, backend, job, node, ssh, work,
/// nonce, request}` to stdout once the job runs.
///
/// Exit status: 0 ok, 75 transient (Slurm unreachable, token refused, queue
/// timeout, job ended before it ran), 65 no cluster fits the derivation,
/// 78 bad configuration, 64 usage.
#[derive(Parser)]
#[command(name = "nsh-alloc", version)]
struct Args {
    /// The nsh configuration (default: $NSH_CONFIG, else /etc/nsh/nsh.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// End the use of the tickets' jobs (tickets pass through): a healthy
    /// pooled job goes back to the pool, any other is cancelled.
    #[arg(long)]
    cancel: bool,
    /// List the pooled jobs, one JSON object per line.
    #[arg(long, conflicts_with_all = ["cancel", "pool_drain"])]
    pool_list: bool,
    /// Empty the pool: idle jobs are let go now, jobs in use when their
    /// build is done; one JSON line per job says what was done.
    #[arg(long, conflicts_with = "cancel")]
    pool_drain: bool,
    /// Use only this configured cluster (nsh-hook sets NSH_CLUSTER to the
    /// cluster whose slot it took).
    #[arg(long, value_name = "NAME", env = "NSH_CLUSTER")]
    cluster: Option<String>,
    /// Never run the job on NODE (repeatable; Slurm's `--exclude`): a node
    /// where an earlier attempt of the build failed. Recorded in the
    /// ticket's `retry.exclude`, with the nodes already there.
    #[arg(long, value_name = "NODE", conflicts_with_all = ["cancel", "pool_list", "pool_drain"])]
    exclude: Vec<String>,
}

fn main() -> ExitCode {
    let args: Args = nsh_cli::start("nsh-alloc");
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    let config = Config::load(args.config.as_deref()).and_then(|mut config| {
        if let Some(name) = &args.cluster {
            config.restrict_to_cluster(name)?;
        }
        Ok(config)
    });
    let mut clusters = Clusters::default();

    if args.cancel {
        return alloc::cancel_stage(config.as_ref(), &mut clusters, stdin, stdout).into();
    }
    if args.pool_list || args.pool_drain {
        let mut stdout = stdout;
        let done = config.and_then(|config| {
            if args.pool_list {
                alloc::admin::list(&config, &mut stdout)
            } else {
                alloc::admin::drain(&config, &mut clusters, &mut stdout)
            }
        });
        return match done {
            Ok(()) => ExitCode::SUCCESS,
            Err(failure) => {
                nsh_core::log_error!("{failure}");
                nsh_core::ExitStatus::of(failure.kind).into()
            }
        };
    }

    let interrupted = catch_interrupts(Syscalls::Restart);
    let mut progress = nsh_cli::progress::for_queue_wait();
    run_stage("alloc", stdin, stdout, |ticket| {
        let config = config.as_ref().map_err(Clone::clone)?;
        if !args.exclude.is_empty() {
            let retry = ticket.retry.get_or_insert_with(Default::default);
            for node in &args.exclude {
                retry.excluding(node);
            }
        }
        let mut times = AllocTimes::default();
        let mut section = alloc::allocate(
            config,
            &mut clusters,
            ticket,
            progress.as_mut(),
            interrupted,
            &mut times,
        )?;
        section
            .extra
            .insert("secs".into(), alloc::times_json(&times));
        ticket.alloc = Some(section);
        Ok(())
    })
    .into()
}
