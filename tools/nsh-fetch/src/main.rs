//! `nsh-fetch`: tickets in, tickets out with a `fetch` section: the built
//! outputs copied from the node into the local store, then the job released.
//! The logic is [`nsh_core::stage::fetch`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use nsh_core::fetch::{self, FetchOptions, ImportMethod};
use nsh_core::run_stage;
use nsh_core::Config;

/// Copies the outputs of each ticket's build (`run.built_outputs`, else the
/// wanted outputs of `drv`) and the part of their closure the local store
/// lacks from the node into the local store, writes `W/release` on the node
/// so that the job ends, closes the ssh connection, and writes the ticket
/// with `fetch: {paths, bytes, secs}` to stdout.
///
/// As root, works while the Nix daemon holds the outputs' locks (as it does
/// while a build hook runs). As another user, imports through the daemon:
/// as a trusted user, or signed with `[fetch] secret_key_file`.
///
/// Exit status: 0 ok, 1 the node does not have the outputs or sent corrupt
/// data, 75 transient (ssh refused, connection dropped, after one retry),
/// 65 bad input, 78 bad configuration (also: no way to import is open to
/// this user; the job is then ended), 64 usage.
#[derive(Parser)]
#[command(name = "nsh-fetch", version)]
struct Args {
    /// The nsh configuration (default: $NSH_CONFIG, else /etc/nsh/nsh.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How paths become valid locally.
    #[arg(long, value_name = "METHOD", value_enum, default_value_t = ImportMethodArg::Auto)]
    import_method: ImportMethodArg,
    /// Leave the job running and the ssh connection open (no release).
    #[arg(long)]
    keep_job: bool,
}

/// `--import-method`'s values: clap's names for [`ImportMethod`], which
/// `nsh-core` keeps without a command line.
#[derive(Clone, Copy, ValueEnum)]
enum ImportMethodArg {
    /// load-db as root or the store's owner; else signed when [fetch]
    /// secret_key_file is set; else daemon unless the daemon says it does not
    /// trust this user
    Auto,
    /// unpack, canonicalise, nix-store --load-db; every Nix version
    LoadDb,
    /// NIX_HELD_LOCKS + nix-store --import; only Nix <= 2.28 and Lix (a newer
    /// Nix waits forever for the daemon's lock)
    HeldLocks,
    /// nix-store --import through the Nix daemon; for users in its
    /// trusted-users
    Daemon,
    /// a binary cache signed with [fetch] secret_key_file, nix copy into the
    /// daemon's store; the daemon must trust the key (trusted-public-keys)
    Signed,
}

impl From<ImportMethodArg> for ImportMethod {
    fn from(arg: ImportMethodArg) -> ImportMethod {
        match arg {
            ImportMethodArg::Auto => ImportMethod::Auto,
            ImportMethodArg::LoadDb => ImportMethod::LoadDb,
            ImportMethodArg::Daemon => ImportMethod::Daemon,
            ImportMethodArg::Signed => ImportMethod::Signed,
            ImportMethodArg::HeldLocks => ImportMethod::HeldLocks,
        }
    }
}

fn main() -> ExitCode {
    let args: Args = nsh_cli::start("nsh-fetch");
    let config = Config::load(args.config.as_deref());
    let options = FetchOptions {
        method: args.import_method.into(),
        keep_job: args.keep_job,
    };
    let mut progress = nsh_cli::progress::for_transfer("fetched");
    run_stage(
        "fetch",
        std::io::stdin().lock(),
        std::io::stdout().lock(),
        |ticket| {
            let config = config.as_ref().map_err(Clone::clone)?;
            let section = fetch::fetch(ticket, config, &options, progress.as_mut())?;
            ticket.fetch = Some(section);
            Ok(())
        },
    )
    .into()
}
