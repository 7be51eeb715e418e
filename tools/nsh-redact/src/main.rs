//! `nsh-redact`: tickets in, the same tickets out with what changes from run
//! to run (times, Slurm jobs, nodes, nonces, store hashes…) replaced by
//! stable placeholders, for snapshot tests of a pipeline. The rules are
//! `nsh_core::Redactor`'s (docs/snapshots.md).

use std::process::ExitCode;

use clap::Parser;
use nsh_core::{log_error, ExitStatus, Redactor};

/// Reads tickets on stdin (one JSON object per line) and writes each with
/// its volatile values replaced by placeholders: times and durations
/// (<TIME>, <SECS>), Slurm job ids (<JOB:n>), node names (<NODE:n>), job
/// nonces (<NONCE:n>), store hashes (/nix/store/<HASH:n>-name), pids,
/// IPv4 addresses, random temporary names, the ssh control directory and
/// the Slurm and slurmrestd API versions. Identities are numbered in the
/// order they are first seen, so the same job or path stays the same
/// placeholder throughout the stream. Keys and their order are kept.
///
/// Exit status: 0 ok; the status the first ticket's `error` implies (as
/// every nsh tool); 65 a line that is not a JSON object; 64 usage.
#[derive(Parser)]
#[command(name = "nsh-redact", version)]
struct Args {
    /// Write each ticket indented over several lines (for a snapshot a
    /// person reads) instead of one line each.
    #[arg(long)]
    pretty: bool,
}

fn main() -> ExitCode {
    let args: Args = nsh_cli::start("nsh-redact");
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    match Redactor::new().stream(stdin, stdout, args.pretty) {
        Ok(status) => status.into(),
        Err(failure) => {
            log_error!("{failure}");
            ExitStatus::of(failure.kind).into()
        }
    }
}
