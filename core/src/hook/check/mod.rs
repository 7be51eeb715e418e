//! `nsh-hook --check`: the doctor an admin runs on the live system.
//!
//! * the configuration: which file, why that one, valid (the `[hook]` table
//!   included), and what the hook needs from it (the tools or the pipeline
//!   command, the fallback hook, the slot directory, `nix_bin_dir`);
//! * each cluster, live and with a short deadline ([`cluster`]): slurmrestd
//!   or the Slurm commands, the API version, the token, the partition,
//!   account and QOS, every routed feature, and ssh to a node of the
//!   partition with that node's Nix version;
//! * the running nix-daemon ([`daemon`]): its version, and whether the
//!   build hook it actually runs is nsh, found by a live probe
//!   ([`probe`]) that builds nothing.
//!
//! Each check is one [`Line`]; the tool prints them as a table or as JSON
//! lines. The exit status ([`exit_status`]) is 0 when nothing failed
//! (warnings allowed), 78 when a failure is the configuration's (nsh's file,
//! or the daemon's hook setting), else 75 when something could not be
//! reached.

pub mod cluster;
pub mod daemon;
pub mod probe;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::config::{Config, ConfigSource};
use crate::error::{Failure, Kind};
use crate::hook::config::HookConfig;

/// The statuses `nsh-hook --check` exits with.
pub const EXIT_OK: i32 = 0;
/// A configuration problem: nsh's file, a value Slurm does not know, a
/// refused token, or a daemon whose build hook is not nsh.
pub const EXIT_CONFIG: i32 = 78;
/// Something could not be reached: slurmrestd, slurmctld, a node, the daemon.
pub const EXIT_UNREACHABLE: i32 = 75;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Worth knowing, but nothing is broken (or it could not be checked).
    Warn,
    /// Broken: the failure's kind says whose fault ([`exit_status`]).
    Fail(Kind),
}

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail(_) => "FAIL",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// `config`, `cluster <name>` or `daemon`.
    pub scope: String,
    /// What was checked: `file`, `slurmrestd`, `token`, `ssh`, `build-hook`, …
    pub check: String,
    /// Passed, warned or failed.
    pub status: Status,
    /// What was found, for a person.
    pub detail: String,
    /// How long it took, for the checks that went over the network.
    pub secs: Option<f64>,
}

impl Line {
    /// A line with any status.
    pub fn new(scope: &str, check: &str, status: Status, detail: impl Into<String>) -> Line {
        Line {
            scope: scope.to_string(),
            check: check.to_string(),
            status,
            detail: detail.into(),
            secs: None,
        }
    }

    /// A check that passed.
    pub fn ok(scope: &str, check: &str, detail: impl Into<String>) -> Line {
        Line::new(scope, check, Status::Ok, detail)
    }

    /// A check that passed with a warning.
    pub fn warn(scope: &str, check: &str, detail: impl Into<String>) -> Line {
        Line::new(scope, check, Status::Warn, detail)
    }

    /// A check that failed, with the failure as its detail.
    pub fn fail(scope: &str, check: &str, failure: Failure) -> Line {
        Line::new(scope, check, Status::Fail(failure.kind), failure.message)
    }

    /// The same line with the time since `since`.
    #[must_use]
    pub fn timed(mut self, since: Instant) -> Line {
        self.secs = Some((since.elapsed().as_secs_f64() * 1000.0).round() / 1000.0);
        self
    }

    /// One JSON object (for `--json`): `scope`, `cluster` (for a cluster's
    /// lines), `check`, `status` (`ok`, `warn`, `fail`), `kind` (a failure's:
    /// `config`, `transient`), `detail`, `secs`.
    pub fn to_json(&self) -> serde_json::Value {
        let (scope, cluster) = match self.scope.strip_prefix("cluster ") {
            Some(name) => ("cluster", Some(name)),
            None => (self.scope.as_str(), None),
        };
        let mut value = json!({"scope": scope});
        if let Some(name) = cluster {
            value["cluster"] = json!(name);
        }
        value["check"] = json!(self.check);
        value["status"] = json!(self.status.word().to_ascii_lowercase());
        if let Status::Fail(kind) = self.status {
            value["kind"] = json!(kind);
        }
        value["detail"] = json!(self.detail);
        if let Some(secs) = self.secs {
            value["secs"] = json!(secs);
        }
        value
    }
}

/// The exit status for these results: [`EXIT_CONFIG`] if any failure is the
/// configuration's, else `EXIT_UNREACHABLE` if any check failed, else 0.
pub fn exit_status(lines: &[Line]) -> i32 {
    let failed = |config: bool| {
        lines
            .iter()
            .any(|l| matches!(l.status, Status::Fail(kind) if (kind == Kind::Config) == config))
    };
    if failed(true) {
        EXIT_CONFIG
    } else if failed(false) {
        EXIT_UNREACHABLE
    } else {
        EXIT_OK
    }
}

/// What to check.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--config FILE`; else `$NSH_CONFIG`, else the default path.
    pub config: Option<PathBuf>,
    /// The deadline of each network step (a cluster's request, the ssh).
    pub timeout: Duration,
    /// Probe the running nix-daemon (`--no-daemon` turns it off).
    pub daemon: bool,
}

/// Runs every check; the lines come in order: the configuration, each
/// cluster (by name), the daemon. The clusters and the daemon are checked
/// side by side.
pub fn run(options: &Options) -> Vec<Line> {
    crate::slurm::http::set_timeout(options.timeout);
    crate::slurm::cli::set_query_timeout(options.timeout);
    let (path, source) = Config::locate_with_source(options.config.as_deref());
    let (mut lines, loaded) = check_config(&path, source);
    let (cluster_lines, daemon_lines) = std::thread::scope(|s| {
        let clusters: Vec<_> = loaded
            .iter()
            .flat_map(|(config, _)| config.clusters.values().map(move |c| (config, c)))
            .map(|(config, c)| s.spawn(move || cluster::check(config, c, options.timeout)))
            .collect();
        let daemon = options.daemon.then(|| {
            let hook = loaded.as_ref().map(|(_, hook)| hook);
            s.spawn(move || daemon::check(&path, hook))
        });
        let join = |h: std::thread::ScopedJoinHandle<'_, Vec<Line>>| {
            h.join().unwrap_or_else(|_| {
                vec![Line::fail(
                    "check",
                    "internal",
                    Failure::transient("a check panicked"),
                )]
            })
        };
        let clusters: Vec<Line> = clusters.into_iter().flat_map(join).collect();
        (clusters, daemon.map(join).unwrap_or_default())
    });
    lines.extend(cluster_lines);
    lines.extend(daemon_lines);
    lines
}

/// The configuration file: found, read, valid; then what the hook needs
/// from it. The loaded file, if it is valid.
fn check_config(path: &Path, source: ConfigSource) -> (Vec<Line>, Option<(Config, HookConfig)>) {
    const SCOPE: &str = "config";
    let named = format!("{} (from {source})", path.display());
    let loaded = std::fs::read_to_string(path)
        .map_err(|e| Failure::config(format!("{}: {e}", path.display())))
        .and_then(|text| Ok((Config::parse(path, &text)?, HookConfig::parse(path, &text)?)));
    let (config, hook) = match loaded {
        Ok(loaded) => loaded,
        Err(failure) => {
            // The parser's messages start with the path: say why it was read.
            let message = match failure
                .message
                .strip_prefix(&format!("{}: ", path.display()))
            {
                Some(rest) => format!("{named}: {rest}"),
                None => failure.message,
            };
            return (
                vec![Line::fail(SCOPE, "file", Failure::config(message))],
                None,
            );
        }
    };
    let names: Vec<&str> = config.clusters.keys().map(String::as_str).collect();
    let mut lines = vec![Line::ok(
        SCOPE,
        "file",
        format!("{named}: valid; clusters: {}", names.join(", ")),
    )];
    lines.push(match pipeline_ready(&hook) {
        Ok(detail) => Line::ok(SCOPE, "pipeline", detail),
        Err(failure) => Line::fail(SCOPE, "pipeline", failure),
    });
    if let Some(argv) = &hook.fallback {
        lines.push(match executable(&argv[0]) {
            Ok(found) => Line::ok(SCOPE, "fallback", format!("{}", found.display())),
            Err(failure) => Line::fail(SCOPE, "fallback", failure.context("hook.fallback")),
        });
    }
    lines.push(slots_dir_line(&hook.slots_dir));
    if let Some(dir) = &hook.nix_bin_dir {
        let nix_store = dir.join("nix-store");
        lines.push(if nix_store.is_file() {
            Line::ok(SCOPE, "nix_bin_dir", format!("{}", nix_store.display()))
        } else {
            Line::fail(
                SCOPE,
                "nix_bin_dir",
                Failure::config(format!(
                    "hook.nix_bin_dir: {} does not exist",
                    nix_store.display()
                )),
            )
        });
    }
    (lines, Some((config, hook)))
}

/// The pipeline the hook will run: the command of `[hook] pipeline`, else
/// the five tools next to this nsh-hook.
fn pipeline_ready(hook: &HookConfig) -> Result<String, Failure> {
    if let Some(argv) = &hook.pipeline {
        let found = executable(&argv[0]).map_err(|f| f.context("hook.pipeline"))?;
        return Ok(format!("the command {}", found.display()));
    }
    let exe = std::env::current_exe()
        .map_err(|e| Failure::config(format!("locating nsh-hook's own executable: {e}")))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    crate::hook::pipeline::Stages::tools_in(dir)?;
    Ok(format!("the nsh-* tools in {}", dir.display()))
}

/// `program` as `Command` would find it: a path, or a name on PATH; it must
/// be an executable file.
fn executable(program: &str) -> Result<PathBuf, Failure> {
    use std::os::unix::fs::PermissionsExt;
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![PathBuf::from(program)]
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).map(|d| d.join(program)).collect())
            .unwrap_or_default()
    };
    candidates
        .into_iter()
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| Failure::config(format!("{program}: no such executable")))
}

/// The slot directory exists and is writable, or can be made.
fn slots_dir_line(dir: &Path) -> Line {
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(parent) => existing = parent,
            None => break,
        }
    }
    let writable = crate::sys::fs::is_writable(existing);
    match (existing == dir, writable) {
        (true, true) => Line::ok("config", "slots_dir", format!("{}", dir.display())),
        (false, true) => Line::ok(
            "config",
            "slots_dir",
            format!("{} (made on first use)", dir.display()),
        ),
        (_, false) => Line::fail(
            "config",
            "slots_dir",
            Failure::config(format!(
                "hook.slots_dir {}: {} is not writable",
                dir.display(),
                existing.display()
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::process::output_within;
    use std::process::Command;

    #[test]
    fn the_exit_status_prefers_configuration_problems() {
        let ok = Line::ok("config", "file", "fine");
        let warn = Line::warn("cluster a", "account", "not checked");
        let down = Line::fail("cluster a", "slurmrestd", Failure::transient("refused"));
        let wrong = Line::fail("cluster b", "partition", Failure::config("unknown"));
        assert_eq!(exit_status(&[ok.clone(), warn.clone()]), 0);
        assert_eq!(exit_status(&[ok.clone(), down.clone()]), 75);
        assert_eq!(exit_status(&[down.clone(), wrong.clone()]), 78);
        assert_eq!(
            down.to_json(),
            json!({"scope": "cluster", "cluster": "a", "check": "slurmrestd", "status": "fail",
                   "kind": "transient", "detail": "refused"})
        );
        assert_eq!(
            ok.to_json(),
            json!({"scope": "config", "check": "file", "status": "ok", "detail": "fine"})
        );
    }

    #[test]
    fn a_command_past_its_deadline_is_killed() {
        let started = Instant::now();
        let err =
            output_within(Command::new("sleep").arg("5"), Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
        let out = output_within(Command::new("echo").arg("hi"), Duration::from_secs(5)).unwrap();
        assert_eq!(out.stdout, b"hi\n");
    }
}
