//! `nsh-hook --check` for the running nix-daemon: which one runs, its Nix,
//! and whether the build hook it uses is nsh, asked live ([`super::probe`]).
//!
//! When the probe finds no nsh-hook, the daemon's own command line,
//! `NIX_CONFIG` and `nix.conf` say what it probably runs instead, by Nix's
//! rules ([`expected_build_hook`]): only a hint, since clients may override
//! the setting and Nix 2.25–2.33 ignore the one in `nix.conf`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::probe::{self, Marker};
use super::{Line, Status};
use crate::error::Failure;
use crate::hook::config::HookConfig;
use crate::sys::process::output_within;

const SCOPE: &str = "daemon";
/// How long the whole probe may take (instantiate, realise, delete).
const PROBE_DEADLINE: Duration = Duration::from_secs(30);

/// A running nix-daemon (the listener, not a per-connection worker).
#[derive(Debug, Clone, Default)]
pub struct Daemon {
    pub pid: u32,
    pub uid: u32,
    pub exe: PathBuf,
    pub cmdline: Vec<String>,
    /// Only what the hook question needs: `NIX_CONFIG`, `NIX_CONF_DIR`,
    /// `NSH_CONFIG`, `NSH_PROBE_DIR`. `None` when not readable.
    pub env: Option<BTreeMap<String, String>>,
}

/// The listening nix-daemons: processes named `nix-daemon` whose parent is
/// not one (a daemon forks one worker per client).
pub fn find_daemons() -> Vec<Daemon> {
    let comm = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let parent = |pid: &str| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        after.split_whitespace().nth(1).unwrap_or("0").to_string()
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut daemons: Vec<Daemon> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| comm(pid).trim() == "nix-daemon" && comm(&parent(pid)).trim() != "nix-daemon")
        .filter_map(|pid| read_daemon(&pid))
        .collect();
    daemons.sort_by_key(|d| d.pid);
    daemons
}

fn read_daemon(pid: &str) -> Option<Daemon> {
    let proc = Path::new("/proc").join(pid);
    let status = std::fs::read_to_string(proc.join("status")).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let nul_list = |name: &str| {
        std::fs::read(proc.join(name)).ok().map(|bytes| {
            bytes
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
        })
    };
    const KEYS: [&str; 4] = [
        "NIX_CONFIG",
        "NIX_CONF_DIR",
        "NSH_CONFIG",
        probe::PROBE_DIR_ENV,
    ];
    let env = nul_list("environ").map(|vars| {
        vars.iter()
            .filter_map(|v| v.split_once('='))
            .filter(|(k, _)| KEYS.contains(k))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    });
    Some(Daemon {
        pid: pid.parse().ok()?,
        uid,
        exe: std::fs::read_link(proc.join("exe")).unwrap_or_default(),
        cmdline: nul_list("cmdline").unwrap_or_default(),
        env,
    })
}

/// A Nix version as `--version` prints it: `nix-daemon (Nix) 2.8.0`,
/// `nix (Lix, like Nix) 2.91.1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixVersion {
    pub lix: bool,
    pub number: (u32, u32, u32),
    pub text: String,
}

impl NixVersion {
    pub fn parse(text: &str) -> Option<NixVersion> {
        let text = text.lines().next()?.trim();
        let word = text
            .split_whitespace()
            .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
        let mut parts = word
            .split(['.', '-', '+', 'p'])
            .map(|p| p.parse::<u32>().ok());
        let number = (
            parts.next()??,
            parts.next().flatten().unwrap_or(0),
            parts.next().flatten().unwrap_or(0),
        );
        Some(NixVersion {
            lix: text.contains("Lix"),
            number,
            text: text.to_string(),
        })
    }

    /// Nix 2.25–2.33 replace a `build-hook` from `nix.conf` with the default.
    pub fn ignores_nix_conf_build_hook(&self) -> bool {
        !self.lix && ((2, 25, 0)..(2, 34, 0)).contains(&self.number)
    }
}

/// Where a daemon's `build-hook` comes from, by Nix's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookHint {
    /// The value, or `None` for Nix's default.
    pub value: Option<String>,
    /// Where it came from, or why the default applies.
    pub from: String,
}

impl std::fmt::Display for HookHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.value {
            Some(value) => write!(f, "{value} ({})", self.from),
            None => write!(f, "Nix's default build-remote ({})", self.from),
        }
    }
}

/// What the daemon's own settings make its `build-hook`, strongest first:
/// `--option build-hook` on its command line, `build-hook` in its
/// `NIX_CONFIG`, then in `nix.conf` (ignored by 2.25–2.33). Clients that are
/// trusted users may still override it per connection.
pub fn expected_build_hook(
    version: Option<&NixVersion>,
    option: Option<&str>,
    nix_config: Option<&str>,
    nix_conf: Option<(&Path, &str)>,
) -> HookHint {
    let hint = |value: &str, from: String| HookHint {
        value: Some(value.to_string()),
        from,
    };
    if let Some(value) = option {
        return hint(value, "--option on the daemon's command line".into());
    }
    if let Some(value) = nix_config.and_then(|text| setting_in(text, "build-hook")) {
        return hint(&value, "the daemon's NIX_CONFIG".into());
    }
    if let Some((path, value)) =
        nix_conf.and_then(|(p, text)| Some((p, setting_in(text, "build-hook")?)))
    {
        match version {
            Some(v) if v.ignores_nix_conf_build_hook() => {
                return HookHint {
                    value: None,
                    from: format!(
                        "{} sets build-hook = {value}, but Nix {}.{} ignores build-hook in nix.conf (2.25–2.33 do; set it in the daemon's NIX_CONFIG)",
                        path.display(),
                        v.number.0,
                        v.number.1
                    ),
                }
            }
            _ => return hint(&value, format!("{}", path.display())),
        }
    }
    HookHint {
        value: None,
        from: "no build-hook in the daemon's command line, NIX_CONFIG or nix.conf".into(),
    }
}

/// The last `name = value` of a nix.conf text (`#` starts a comment).
pub fn setting_in(text: &str, name: &str) -> Option<String> {
    text.lines().rev().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let (key, value) = line.split_once('=')?;
        (key.trim() == name).then(|| value.trim().to_string())
    })
}

/// `--option build-hook VALUE` in a command line.
fn option_in(cmdline: &[String]) -> Option<&str> {
    cmdline
        .windows(3)
        .rev()
        .find(|w| w[0] == "--option" && w[1] == "build-hook")
        .map(|w| w[2].as_str())
}

/// The daemon's lines: which one runs, then its build hook.
pub fn check(config_read: &Path, hook: Option<&HookConfig>) -> Vec<Line> {
    let daemons = find_daemons();
    let Some(daemon) = daemons.first() else {
        let failure = Failure::transient("no nix-daemon process runs on this machine");
        return vec![Line::fail(SCOPE, "nix-daemon", failure)];
    };
    let nix_bin = daemon
        .exe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let version = version_of(&daemon.exe);
    let mut lines = vec![daemon_line(daemon, &daemons, version.as_ref())];
    if version
        .as_ref()
        .is_some_and(|v| v.lix && v.number >= (2, 94, 0))
    {
        let failure = Failure::config("Lix 2.94 and later speak another build-hook protocol (Cap'n Proto RPC): nsh cannot be their hook");
        lines.push(Line::fail(SCOPE, "build-hook", failure));
        return lines;
    }
    let started = Instant::now();
    match run_probe(&nix_bin) {
        Ok(seen) => lines.extend(hook_lines(
            daemon,
            version.as_ref(),
            &seen,
            config_read,
            hook,
            started,
        )),
        Err(failure) => lines.push(
            Line::fail(
                SCOPE,
                "build-hook",
                failure.context("probing the daemon's hook"),
            )
            .timed(started),
        ),
    }
    lines
}

fn daemon_line(daemon: &Daemon, all: &[Daemon], version: Option<&NixVersion>) -> Line {
    let version = version.map_or("version unknown".to_string(), |v| v.text.clone());
    let others = match all.len() {
        1 => String::new(),
        n => format!(" ({} more running; this one is checked)", n - 1),
    };
    Line::ok(
        SCOPE,
        "nix-daemon",
        format!(
            "pid {} (uid {}), {}: {version}{others}",
            daemon.pid,
            daemon.uid,
            daemon.exe.display()
        ),
    )
}

fn version_of(exe: &Path) -> Option<NixVersion> {
    let out = output_within(
        Command::new(exe)
            .arg("--version")
            .stdin(std::process::Stdio::null()),
        Duration::from_secs(5),
    )
    .ok()?;
    NixVersion::parse(&String::from_utf8_lossy(&out.stdout))
}

/// What the probe found.
#[derive(Debug, Default)]
pub struct Seen {
    /// The marker the hook left.
    pub marker: Option<Marker>,
    /// What the daemon relayed from its hook about the probe, and what the
    /// realise said: the hook's own words when it left no marker.
    pub hook_said: Option<String>,
    /// Why the marker directory could not be used (the check then relies on
    /// the relayed words).
    pub no_marker_dir: Option<String>,
    /// The probe derivation could not be deleted afterwards.
    pub left_behind: Option<String>,
}

/// Instantiates the probe through the daemon, asks the daemon to realise it
/// with no local build slot, reads what the hook left, and deletes the
/// derivation. The client sends the daemon none of its own settings but
/// `--max-jobs 0` (no NIX_CONFIG, no user nix.conf), so the hook asked is
/// the daemon's.
pub fn run_probe(nix_bin: &Path) -> Result<Seen, Failure> {
    let nonce = crate::stage::alloc::nonce()?;
    let dir = probe::probe_dir();
    let mut seen = Seen {
        no_marker_dir: probe::prepare_dir(&dir).err().map(|f| f.message),
        ..Seen::default()
    };
    let started = Instant::now();
    let left = || PROBE_DEADLINE.saturating_sub(started.elapsed());
    let out = nix(
        nix_bin,
        "nix-instantiate",
        &["--expr", &probe::expression(&nonce)],
        left(),
    )?;
    let drv = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !drv.ends_with(".drv") {
        return Err(Failure::transient(format!(
            "nix-instantiate of the probe derivation failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let realised = nix(
        nix_bin,
        "nix-store",
        &["--realise", &drv, "--max-jobs", "0"],
        left(),
    );
    if let Ok(out) = &realised {
        let stderr = String::from_utf8_lossy(&out.stderr);
        seen.hook_said = stderr
            .lines()
            .find(|l| l.contains(&format!("probe {nonce}")))
            .map(str::to_string);
    }
    seen.marker = probe::take_marker(&dir, &nonce)?;
    // The daemon locked the output it did not build and left the lock file.
    let outputs = nix(
        nix_bin,
        "nix-store",
        &["--query", "--outputs", &drv],
        left(),
    );
    if let Ok(out) = &outputs {
        for path in String::from_utf8_lossy(&out.stdout).lines() {
            remove_stale_lock(Path::new(&format!("{}.lock", path.trim())));
        }
    }
    let deleted = nix(nix_bin, "nix-store", &["--delete", &drv], left());
    seen.left_behind = match deleted {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "{drv}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(failure) => Some(format!("{drv}: {failure}")),
    };
    realised?;
    Ok(seen)
}

/// Removes a lock file nobody holds, as Nix does (`deleteLockFile`): taken,
/// unlinked, then marked stale with a byte, so that a process that opened
/// it meanwhile knows to start again. Only the probe's own output lock.
fn remove_stale_lock(path: &Path) {
    use crate::sys::flock::{lock_exclusive, Wait};
    use std::io::Write;
    let Ok(mut file) = std::fs::OpenOptions::new().write(true).open(path) else {
        return;
    };
    if !lock_exclusive(&file, Wait::DontWait).unwrap_or(false) {
        return;
    }
    if std::fs::remove_file(path).is_ok() {
        let _ = file.write_all(b"d");
    }
}

/// Runs a Nix command against the daemon, with none of this user's settings.
fn nix(
    nix_bin: &Path,
    program: &str,
    args: &[&str],
    limit: Duration,
) -> Result<std::process::Output, Failure> {
    let next_to_daemon = nix_bin.join(program);
    let path = if next_to_daemon.is_file() {
        next_to_daemon
    } else {
        PathBuf::from(program)
    };
    let mut command = Command::new(&path);
    command
        .args(args)
        .env("NIX_REMOTE", "daemon")
        .env_remove("NIX_CONFIG")
        .env("NIX_USER_CONF_FILES", "/dev/null")
        .stdin(std::process::Stdio::null());
    output_within(&mut command, limit.max(Duration::from_millis(100)))
        .map_err(|e| Failure::transient(format!("{}: {e}", path.display())))
}

/// The build-hook line from what the probe saw, and what follows from it.
fn hook_lines(
    daemon: &Daemon,
    version: Option<&NixVersion>,
    seen: &Seen,
    config_read: &Path,
    hook: Option<&HookConfig>,
    started: Instant,
) -> Vec<Line> {
    let mut lines = Vec::new();
    match (&seen.marker, &seen.hook_said) {
        (Some(marker), _) => {
            let detail = format!(
                "nsh-hook {} at {} (pid {}) answered the probe; it reads {} (from {})",
                marker.version, marker.exe, marker.pid, marker.config, marker.config_source
            );
            lines.push(Line::ok(SCOPE, "build-hook", detail).timed(started));
            lines.push(hook_config_line(marker, config_read, hook));
            if marker.version != env!("CARGO_PKG_VERSION") {
                lines.push(Line::warn(
                    SCOPE,
                    "version",
                    format!(
                        "the daemon's nsh-hook is {}, this one {}",
                        marker.version,
                        env!("CARGO_PKG_VERSION")
                    ),
                ));
            }
        }
        (None, Some(said)) => {
            lines.push(
                Line::ok(
                    SCOPE,
                    "build-hook",
                    format!("nsh-hook answered the probe: {said}"),
                )
                .timed(started),
            );
            let why = seen
                .no_marker_dir
                .clone()
                .unwrap_or_else(|| "see the hook's words above".into());
            lines.push(Line::warn(
                SCOPE,
                "marker",
                format!("no marker, so its configuration is not known here: {why}"),
            ));
        }
        (None, None) => {
            let hint = hint_for(daemon, version);
            let failure = Failure::config(format!(
                "not nsh-hook: the daemon's hook did not answer the probe; the daemon's settings say {hint}"
            ));
            lines.push(Line::fail(SCOPE, "build-hook", failure).timed(started));
        }
    }
    if let Some(left) = &seen.left_behind {
        lines.push(Line::warn(
            SCOPE,
            "cleanup",
            format!("the probe derivation was not deleted: {left}"),
        ));
    }
    lines
}

/// The daemon's hook reads a configuration that works and is the one this
/// check read.
fn hook_config_line(marker: &Marker, config_read: &Path, hook: Option<&HookConfig>) -> Line {
    if let Some(error) = &marker.config_error {
        let failure = Failure::config(format!(
            "the daemon's nsh-hook cannot use its configuration: {error}"
        ));
        return Line::fail(SCOPE, "hook config", failure);
    }
    if Path::new(&marker.config) != config_read {
        return Line::warn(
            SCOPE,
            "hook config",
            format!(
                "the daemon's nsh-hook reads {}, this check read {}: check that one with --config {}",
                marker.config,
                config_read.display(),
                marker.config
            ),
        );
    }
    let status = if hook.is_some() {
        Status::Ok
    } else {
        Status::Warn
    };
    Line::new(
        SCOPE,
        "hook config",
        status,
        format!("the same file as this check: {}", marker.config),
    )
}

fn hint_for(daemon: &Daemon, version: Option<&NixVersion>) -> String {
    let Some(env) = &daemon.env else {
        return format!(
            "nothing readable (the environment of pid {} is not readable: run the check as root)",
            daemon.pid
        );
    };
    let conf_dir = env
        .get("NIX_CONF_DIR")
        .map_or(PathBuf::from("/etc/nix"), PathBuf::from);
    let conf_path = conf_dir.join("nix.conf");
    let conf_text = std::fs::read_to_string(&conf_path).ok();
    expected_build_hook(
        version,
        option_in(&daemon.cmdline),
        env.get("NIX_CONFIG").map(String::as_str),
        conf_text.as_deref().map(|t| (conf_path.as_path(), t)),
    )
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> NixVersion {
        NixVersion::parse(text).unwrap()
    }

    #[test]
    fn versions() {
        assert_eq!(v("nix-daemon (Nix) 2.8.0").number, (2, 8, 0));
        assert_eq!(v("nix (Nix) 2.26.3\n").number, (2, 26, 3));
        let lix = v("nix (Lix, like Nix) 2.93.0");
        assert!(lix.lix && lix.number == (2, 93, 0));
        assert_eq!(v("nix (Nix) 2.35.0pre20260101_abc").number, (2, 35, 0));
        assert!(!v("nix (Nix) 2.24.9").ignores_nix_conf_build_hook());
        assert!(v("nix (Nix) 2.25.0").ignores_nix_conf_build_hook());
        assert!(v("nix (Nix) 2.33.6").ignores_nix_conf_build_hook());
        assert!(!v("nix (Nix) 2.34.0").ignores_nix_conf_build_hook());
        assert_eq!(NixVersion::parse("no digits here"), None);
    }

    #[test]
    fn the_expected_build_hook_follows_nix_rules() {
        let conf = (
            Path::new("/etc/nix/nix.conf"),
            "# nsh\nbuild-hook = /usr/bin/nsh-hook # ours\n",
        );
        let old = v("nix-daemon (Nix) 2.8.0");
        let mid = v("nix (Nix) 2.26.3");
        let new = v("nix (Nix) 2.34.8");
        let hook =
            |version, option, env| expected_build_hook(Some(version), option, env, Some(conf));
        assert_eq!(
            hook(&old, None, None).value.as_deref(),
            Some("/usr/bin/nsh-hook")
        );
        assert_eq!(
            hook(&new, None, None).value.as_deref(),
            Some("/usr/bin/nsh-hook")
        );
        let ignored = hook(&mid, None, None);
        assert_eq!(ignored.value, None);
        assert!(
            ignored
                .from
                .contains("Nix 2.26 ignores build-hook in nix.conf"),
            "{}",
            ignored.from
        );
        let env = hook(
            &mid,
            None,
            Some("substituters =\nbuild-hook = /opt/nsh-hook"),
        );
        assert_eq!(env.to_string(), "/opt/nsh-hook (the daemon's NIX_CONFIG)");
        let option = hook(&mid, Some("/x/hook"), Some("build-hook = /opt/nsh-hook"));
        assert_eq!(option.value.as_deref(), Some("/x/hook"));
        let none = expected_build_hook(Some(&old), None, None, None);
        assert!(none.to_string().starts_with("Nix's default build-remote"));
    }

    #[test]
    fn a_build_hook_option_in_a_command_line() {
        let argv: Vec<String> = [
            "nix-daemon",
            "--option",
            "build-hook",
            "/x",
            "--option",
            "a",
            "b",
        ]
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
        assert_eq!(option_in(&argv), Some("/x"));
        assert_eq!(option_in(&argv[..2]), None);
    }
}
