//! `nsh-status`: what nsh is doing, as a table on a terminal and as JSON
//! lines otherwise: the builds in flight (derivation, stage, cluster, job,
//! node, for how long), the Slurm jobs nsh holds (the pool), and the recent
//! failures with their reason; each job as Slurm sees it now.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nsh_core::nsh_status::{gather, runtime_dir, table, Options, Sections};
use nsh_core::{Config, ExitStatus};

/// Shows the builds nsh has in flight, the Slurm jobs it holds and its
/// recent failures, from what this user's nsh processes record (root:
/// /run/nsh, the Nix daemon's hook; another user: $XDG_RUNTIME_DIR/nsh,
/// else /tmp/nsh-<uid>; $NSH_RUNTIME_DIR overrides) joined with what Slurm
/// says of each job.
///
/// Prints a table when stdout is a terminal, else one JSON object per row
/// with a `kind`: `build`, `job` or `failure`.
///
/// Exit status: 0 ok, 75 Slurm could not be asked about a job (the rows are
/// printed all the same), 78 bad configuration (builds and failures are
/// still printed), 64 usage.
#[derive(Parser)]
#[command(name = "nsh-status", version)]
struct Args {
    /// The nsh configuration (default: $NSH_CONFIG, else /etc/nsh/nsh.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// One JSON object per row, even on a terminal.
    #[arg(long, conflicts_with = "table")]
    json: bool,
    /// A table, even when stdout is not a terminal.
    #[arg(long)]
    table: bool,
    #[command(flatten)]
    shown: Shown,
    /// How many recent failures to show.
    #[arg(long, value_name = "N", default_value_t = 20)]
    last: usize,
    /// Only this configured cluster's rows.
    #[arg(long, value_name = "NAME")]
    cluster: Option<String>,
    /// Do not ask Slurm: only what nsh recorded.
    #[arg(long)]
    no_slurm: bool,
}

/// Which rows: all when none is asked for.
#[derive(clap::Args)]
struct Shown {
    /// Show the builds in flight (with --jobs/--failures: only those asked for).
    #[arg(long)]
    builds: bool,
    /// Show the jobs nsh holds (the pool).
    #[arg(long)]
    jobs: bool,
    /// Show the recent failures.
    #[arg(long)]
    failures: bool,
}

fn main() -> ExitCode {
    let args: Args = nsh_cli::start("nsh-status");
    let shown = &args.shown;
    let all = !(shown.builds || shown.jobs || shown.failures);
    let sections = Sections {
        builds: all || shown.builds,
        jobs: all || shown.jobs,
        failures: all || shown.failures,
    };
    let options = Options {
        sections,
        cluster: args.cluster.clone(),
        ask_slurm: !args.no_slurm,
        last: args.last,
    };
    let report = gather(
        Config::load(args.config.as_deref()),
        &runtime_dir(),
        &options,
    );
    for problem in &report.problems {
        nsh_core::log_error!("{problem}");
    }
    let as_table = args.table || (!args.json && std::io::stdout().is_terminal());
    let text = if as_table {
        table(&report.rows, sections, now_secs())
    } else {
        report.rows.iter().map(|row| format!("{row}\n")).collect()
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        nsh_core::log_error!("writing to stdout: {e}");
        return ExitStatus::Transient.into();
    }
    report.exit_status().into()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
