//! `nsh-cli`: what every nsh tool's `main` shares on the command line, kept
//! out of `nsh-core` so that the library depends on neither clap nor
//! indicatif.
//!
//! * [`start`]: names the tool in log lines and parses its arguments
//!   (`--help` and `--version` exit 0, a usage error 64); `TOOL --generate
//!   man|bash|zsh|fish` writes the tool's man page or a shell's completion
//!   script, made from the same clap command as its `--help`
//!   ([`generate_if_asked`], used by `scripts/manuals`); and from then on
//!   the stage a tool runs records the build it works on, for `nsh-status`;
//! * [`progress`]: a progress bar or spinner when stderr is a terminal, log
//!   lines otherwise.

pub mod progress;

use std::ffi::OsString;
use std::io::Write;

use nsh_core::Config;
use nsh_core::{ExitStatus, Failure};

/// The start of every tool's `main`: names the tool in log lines and parses
/// its command line. `--help` and `--version` end the process here with 0, a
/// usage error with 64 (clap's own message on stderr).
pub fn start<A: clap::Parser>(program: &str) -> A {
    nsh_core::set_program(program);
    // A stage records the build it works on, for nsh-status.
    nsh_core::record_builds();
    let argv: Vec<OsString> = std::env::args_os().collect();
    if let Some(code) = generate_if_asked(&argv, A::command) {
        std::process::exit(code);
    }
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

/// What `TOOL --generate WHAT` writes to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generated {
    /// The man page (roff, section 1).
    Man,
    /// Bash's completion script (`complete -F _TOOL TOOL`).
    Bash,
    /// Zsh's completion function (`#compdef TOOL`).
    Zsh,
    /// Fish's completions (`complete -c TOOL …`).
    Fish,
}

impl Generated {
    /// Every kind, as `--generate` names them.
    pub const ALL: [(&'static str, Generated); 4] = [
        ("man", Generated::Man),
        ("bash", Generated::Bash),
        ("zsh", Generated::Zsh),
        ("fish", Generated::Fish),
    ];

    /// The kind `--generate` names `word`.
    pub fn parse(word: &str) -> Option<Generated> {
        Generated::ALL
            .iter()
            .find(|(name, _)| *name == word)
            .map(|(_, kind)| *kind)
    }
}

/// Writes the man page or completion script of `command` (a tool's whole
/// clap command, so that what is written always matches its `--help`).
/// Hidden arguments are left out of the man page (clap_complete's bash and
/// zsh scripts still offer them; no tool has one that matters: nsh-hook's
/// `--check` is shown in the command its man page is made from).
pub fn generate(
    mut command: clap::Command,
    what: Generated,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let name = command.get_name().to_string();
    let shell = match what {
        Generated::Man => {
            let source = format!("nsh {}", command.get_version().unwrap_or_default());
            return clap_mangen::Man::new(command)
                .manual("nsh manual")
                .source(source)
                .render(out);
        }
        Generated::Bash => clap_complete::Shell::Bash,
        Generated::Zsh => clap_complete::Shell::Zsh,
        Generated::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut command, name, out);
    Ok(())
}

/// Answers `TOOL --generate WHAT` (or `--generate=WHAT`) when `argv` is
/// that: writes the man page or completion script of `command()` to stdout
/// and returns the exit status (0; 64 for an unknown WHAT; 74 when stdout
/// cannot be written). `None` when `argv` asks for something else. The flag
/// is not in `--help`: it is for installers (`scripts/manuals`), not users.
pub fn generate_if_asked(
    argv: &[OsString],
    command: impl FnOnce() -> clap::Command,
) -> Option<i32> {
    let first = argv.get(1)?.to_str()?;
    let word = match first.strip_prefix("--generate") {
        Some("") => argv.get(2).and_then(|w| w.to_str()).unwrap_or(""),
        Some(rest) => rest.strip_prefix('=')?,
        None => return None,
    };
    let command = command();
    let Some(what) = Generated::parse(word) else {
        let names: Vec<&str> = Generated::ALL.iter().map(|(name, _)| *name).collect();
        eprintln!(
            "{}: --generate: {word:?} is not one of {}",
            command.get_name(),
            names.join(", ")
        );
        return Some(ExitStatus::Usage.code());
    };
    let mut stdout = std::io::stdout().lock();
    match generate(command, what, &mut stdout).and_then(|()| stdout.flush()) {
        Ok(()) => Some(ExitStatus::Ok.code()),
        Err(e) => {
            eprintln!("writing stdout: {e}");
            Some(74)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// A tool's command line, as the tools write theirs.
    #[derive(Parser)]
    #[command(name = "nsh-example", version)]
    struct Args {
        /// The nsh configuration.
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
        /// Cancel instead.
        #[arg(long)]
        cancel: bool,
        /// How to copy.
        #[arg(long, value_parser = ["ssh", "serve"])]
        method: Option<String>,
        /// Not for people.
        #[arg(long, hide = true)]
        internal: bool,
    }

    fn generated(what: Generated) -> String {
        let mut out = Vec::new();
        generate(Args::command(), what, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_man_page_has_every_visible_flag_with_its_help() {
        let man = generated(Generated::Man);
        assert!(man.starts_with(".ie \\n(.g .ds Aq \\(aq"), "{man}");
        assert!(man.contains(".TH nsh-example 1"), "{man}");
        for flag in ["config", "cancel", "method", "help", "version"] {
            assert!(
                man.contains(&format!("\\-\\-{flag}")),
                "--{flag} missing:\n{man}"
            );
        }
        assert!(man.contains("The nsh configuration"), "{man}");
        assert!(
            !man.contains("internal"),
            "a hidden flag is documented:\n{man}"
        );
        insta::assert_snapshot!(man);
    }

    #[test]
    fn each_shell_completes_every_visible_flag() {
        for (what, written_as) in [
            (Generated::Bash, "--{}"),
            (Generated::Zsh, "--{}"),
            (Generated::Fish, "-l {}"),
        ] {
            let script = generated(what);
            for flag in ["config", "cancel", "method", "help", "version"] {
                let written = written_as.replace("{}", flag);
                assert!(
                    script.contains(&written),
                    "{what:?} lacks {written}:\n{script}"
                );
            }
        }
        assert!(generated(Generated::Bash).contains("complete -F _nsh__example"));
        assert!(generated(Generated::Zsh).starts_with("#compdef nsh-example"));
    }

    #[test]
    fn generate_is_asked_only_as_the_first_argument() {
        let argv = |words: &[&str]| -> Vec<OsString> { words.iter().map(OsString::from).collect() };
        assert_eq!(
            generate_if_asked(&argv(&["nsh-example"]), Args::command),
            None
        );
        assert_eq!(
            generate_if_asked(&argv(&["nsh-example", "--config", "x"]), Args::command),
            None
        );
        assert_eq!(
            generate_if_asked(
                &argv(&["nsh-example", "--cancel", "--generate", "man"]),
                Args::command
            ),
            None
        );
        assert_eq!(
            generate_if_asked(&argv(&["nsh-example", "--generated"]), Args::command),
            None
        );
        assert_eq!(
            generate_if_asked(&argv(&["nsh-example", "--generate", "tcsh"]), Args::command),
            Some(64)
        );
        assert_eq!(
            generate_if_asked(&argv(&["nsh-example", "--generate"]), Args::command),
            Some(64)
        );
        assert_eq!(
            generate_if_asked(&argv(&["nsh-example", "--generate=elvish"]), Args::command),
            Some(64)
        );
    }
}
