//! `nsh-push`: tickets in, tickets out with a `push` section: the input
//! closure the node lacks, copied into its store. The logic is
//! [`nsh_core::stage::push`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use nsh_core::push::{self, Method};
use nsh_core::run_stage;
use nsh_core::Config;

/// Copies into the allocated node's store the paths of `closure` it lacks,
/// for each ticket read on stdin (one JSON object per line), and writes the
/// ticket with `push: {copied, present, bytes, secs}` to stdout.
///
/// Exit status: 0 ok, 75 transient (ssh refused, connection dropped, after
/// one retry), 65 bad input (a path not in the local store, no closure or
/// alloc section), 78 bad configuration, 64 usage.
#[derive(Parser)]
#[command(name = "nsh-push", version)]
struct Args {
    /// The nsh configuration (default: $NSH_CONFIG, else /etc/nsh/nsh.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How the missing paths travel. The explicit ones are for benchmarks.
    #[arg(long, value_name = "METHOD", value_enum, default_value_t = MethodArg::Auto)]
    method: MethodArg,
}

/// `--method`'s values: clap's names for [`Method`], which `nsh-core`
/// keeps without a command line.
#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    /// AddToStoreNar when the node's serve protocol has it (2.5 and later),
    /// else ImportPaths
    Auto,
    /// AddToStoreNar per path; the node writes each NAR to disk as it arrives
    AddToStoreNar,
    /// one ImportPaths stream made of the local store's NARs; the node holds
    /// each NAR in memory first
    Import,
    /// ImportPaths fed by a nix-store --export process
    ImportExport,
}

impl From<MethodArg> for Method {
    fn from(arg: MethodArg) -> Method {
        match arg {
            MethodArg::Auto => Method::Auto,
            MethodArg::AddToStoreNar => Method::AddToStoreNar,
            MethodArg::Import => Method::Import,
            MethodArg::ImportExport => Method::ImportExport,
        }
    }
}

fn main() -> ExitCode {
    let args: Args = nsh_cli::start("nsh-push");
    let config = Config::load(args.config.as_deref());
    let mut progress = nsh_cli::progress::for_transfer("pushed");
    run_stage(
        "push",
        std::io::stdin().lock(),
        std::io::stdout().lock(),
        |ticket| {
            let config = config.as_ref().map_err(Clone::clone)?;
            let section = push::push(ticket, config, args.method.into(), progress.as_mut())?;
            ticket.push = Some(section);
            Ok(())
        },
    )
    .into()
}
