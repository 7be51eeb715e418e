//! `nsh-hook --check`: its command line, and the results as a table (for a
//! person, on a terminal or not) or as JSON lines (`--json`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use nsh_core::build_hook::check::{self, Line, Options};

/// Checks an nsh installation on the running system: the configuration
/// file (the [hook] table included), each cluster live (slurmrestd or the
/// Slurm commands, the API version, the token, the partition, account and
/// QOS, each routed feature, ssh to a node and its Nix), and whether the
/// running nix-daemon's build hook is this nsh-hook (a probe derivation that
/// nothing builds). Run it as the daemon's user (root).
///
/// Exit status: 0 nothing failed (warnings allowed); 78 a configuration
/// problem (the file, a value Slurm does not know, a refused token, a daemon
/// whose hook is not nsh); 75 something could not be reached (slurmrestd,
/// slurmctld, a node, the daemon); 64 usage.
#[derive(Parser)]
#[command(
    name = "nsh-hook --check",
    version,
    override_usage = "nsh-hook --check [OPTIONS]"
)]
struct Args {
    #[arg(long, hide = true, required = true)]
    check: bool,
    /// The nsh configuration (default: $NSH_CONFIG, else /etc/nsh/nsh.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// One JSON object per check, then a summary object.
    #[arg(long)]
    json: bool,
    /// Seconds each network step may take.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    timeout: f64,
    /// Leave the nix-daemon alone (check the configuration and clusters only).
    #[arg(long)]
    no_daemon: bool,
}

pub fn main(argv: &[String]) -> i32 {
    nsh_core::set_program("nsh-hook");
    let args = match Args::try_parse_from(argv) {
        Ok(args) => args,
        Err(e) => return nsh_cli::clap_exit_code(&e),
    };
    if !(args.timeout > 0.0 && args.timeout <= 600.0) {
        eprintln!("nsh-hook: --timeout: between 0 and 600 seconds");
        return 64;
    }
    let options = Options {
        config: args.config,
        timeout: Duration::from_secs_f64(args.timeout),
        daemon: !args.no_daemon,
    };
    let lines = check::run(&options);
    let code = check::exit_status(&lines);
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        write_json(&mut out, &lines, code)
    } else {
        write_table(&mut out, &lines, code)
    };
    if written.is_err() {
        return 74;
    }
    code
}

fn summary(lines: &[Line], code: i32) -> String {
    let count = |word: &str| lines.iter().filter(|l| l.status.word() == word).count();
    let (failed, warned) = (count("FAIL"), count("warn"));
    let verdict = match code {
        check::EXIT_OK => "nothing failed",
        check::EXIT_CONFIG => "a configuration problem",
        _ => "something could not be reached",
    };
    format!(
        "{verdict}: {} checks, {failed} failed, {warned} warnings (exit {code})",
        lines.len()
    )
}

fn write_json(out: &mut impl Write, lines: &[Line], code: i32) -> std::io::Result<()> {
    for line in lines {
        writeln!(out, "{}", line.to_json())?;
    }
    let status = if code == 0 { "ok" } else { "fail" };
    let summary = serde_json::json!({"scope": "summary", "status": status, "exit": code, "detail": summary(lines, code)});
    writeln!(out, "{summary}")
}

/// Columns for the scope, the check and the result, then the detail
/// (whole: it is what says what to do).
fn write_table(out: &mut impl Write, lines: &[Line], code: i32) -> std::io::Result<()> {
    let width = |f: fn(&Line) -> usize, title: &str| {
        lines.iter().map(f).max().unwrap_or(0).max(title.len())
    };
    let scope_w = width(|l| l.scope.len(), "SCOPE");
    let check_w = width(|l| l.check.len(), "CHECK");
    writeln!(
        out,
        "{:scope_w$}  {:check_w$}  {:6}  DETAIL",
        "SCOPE", "CHECK", "RESULT"
    )?;
    // A detail of several lines (a TOML error with its excerpt) stays in
    // its column.
    let indent = format!("\n{}", " ".repeat(scope_w + check_w + 12));
    for line in lines {
        let secs = line
            .secs
            .map(|s| format!(" [{s:.2} s]"))
            .unwrap_or_default();
        let detail = format!("{}{secs}", line.detail).replace('\n', &indent);
        writeln!(
            out,
            "{:scope_w$}  {:check_w$}  {:6}  {detail}",
            line.scope,
            line.check,
            line.status.word(),
        )?;
    }
    writeln!(out, "{}", summary(lines, code))
}
