//! `nsh-closure`: what a derivation's build needs, as an nsh ticket.
//! The logic is `nsh_core::stage::closure`.

use std::process::ExitCode;

use clap::Parser;
use nsh_core::closure::{self, ClosureOptions};
use nsh_core::Config;
use nsh_core::{log_error, ExitStatus};

/// Writes, for each derivation, a ticket with its outputs, required
/// features, resources and the input closure a build node needs.
///
/// Derivations are named as arguments, or read from stdin one per line
/// (a .drv path, or a ticket with drv.path). One JSON ticket per line goes
/// to stdout. Exit status: 0 ok, 65 bad input (not a derivation, does not
/// parse, path does not match its contents, inputs not built), 75 store
/// trouble, 78 bad configuration.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// .drv store paths (default: read stdin).
    drvs: Vec<String>,
    /// The outputs wanted, comma-separated (default: the ticket's, else all).
    #[arg(long, value_delimiter = ',', value_name = "OUTPUTS")]
    wanted: Vec<String>,
    /// The local store URI (`auto`, `daemon`, `local?root=…`); default: the
    /// ticket's `store.uri`, else Nix's default.
    #[arg(long, value_name = "URI")]
    store: Option<String>,
    /// The directory holding `nix-store` (default: PATH).
    #[arg(long, value_name = "DIR", default_value = "")]
    nix_bin_dir: String,
    /// The nsh configuration file (default: $NSH_CONFIG, else /etc/nsh/nsh.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let args: Args = nsh_cli::start("nsh-closure");
    // nsh-closure needs nothing from the configuration today (the local
    // store comes from --store or the ticket); a file named with --config is
    // still checked, so that a broken one is reported at the first stage.
    if let Some(path) = &args.config {
        if let Err(failure) = Config::load(Some(path)) {
            log_error!("{failure}");
            return ExitStatus::of(failure.kind).into();
        }
    }
    let options = ClosureOptions {
        drvs: args.drvs,
        wanted: args.wanted,
        store_uri: args.store,
        nix_bin_dir: args.nix_bin_dir,
    };
    closure::run(&options, std::io::stdin().lock(), std::io::stdout().lock()).into()
}
