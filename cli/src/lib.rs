//! `nsh-cli`: what every nsh tool's `main` shares on the command line, kept
//! out of `nsh-core` so that the library depends on neither clap nor
//! indicatif.
//!
//! * [`start`]: names the tool in log lines and parses its arguments
//!   (`--help` and `--version` exit 0, a usage error 64);
//! * [`progress`]: a progress bar or spinner when stderr is a terminal, log
//!   lines otherwise.

pub mod progress;

use nsh_core::Config;
use nsh_core::{ExitStatus, Failure};

/// The start of every tool's `main`: names the tool in log lines and parses
/// its command line. `--help` and `--version` end the process here with 0, a
/// usage error with 64 (clap's own message on stderr).
pub fn start<A: clap::Parser>(program: &str) -> A {
    nsh_core::set_program(program);
    match A::try_parse() {
        Ok(args) => args,
        Err(e) => std::process::exit(clap_exit_code(&e)),
    }
}

/// Prints clap's message and returns the status it means: 0 for `--help`
/// and `--version`, 64 for a usage error.
pub fn clap_exit_code(e: &clap::Error) -> i32 {
    let _ = e.print();
    if e.use_stderr() {
        ExitStatus::Usage.code()
    } else {
        ExitStatus::Ok.code()
    }
}

/// The configuration a stage tool runs with: loaded once; a broken one is
/// reported on every ticket, so that each carries the reason.
pub struct StageConfig(Result<Config, Failure>);

impl StageConfig {
    /// Loads `path` (default: `$NSH_CONFIG`, else `/etc/nsh/nsh.toml`).
    pub fn load(path: Option<&std::path::Path>) -> StageConfig {
        StageConfig(Config::load(path))
    }

    /// Wraps a configuration already loaded (or the failure to load it).
    pub fn from_result(config: Result<Config, Failure>) -> StageConfig {
        StageConfig(config)
    }

    /// The configuration, or the failure to load it, for one ticket.
    ///
    /// # Errors
    /// The failure that loading the configuration ended with.
    pub fn get(&self) -> Result<&Config, Failure> {
        self.0.as_ref().map_err(Clone::clone)
    }
}
