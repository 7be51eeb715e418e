//! Reaching the allocated node: the one small interface that `nsh-push`,
//! `nsh-run` and `nsh-fetch` use to run a command there.
//!
//! Today that is the system `ssh` binary, so that a site's `ssh_config`,
//! agents, `ProxyJump` and Kerberos just work. The tools use only
//! [`Ssh::command`] and [`Ssh::describe`] (and the master's start and stop),
//! so that clusters that forbid ssh to compute nodes can later get an
//! `srun --jobid=<job> --overlap` transport, which carries the same bytes,
//! behind the same few calls.
//!
//! One connection per node (per cluster and node, not per job: it outlives
//! builds and jobs) is shared by every tool and every build on that node:
//! the first tool that needs the node starts an ssh ControlMaster
//! ([`Ssh::ensure_master`]) in the private runtime directory
//! (`<runtime>/ssh/<cluster>-<user@node>`, recorded in the ticket as
//! `alloc.control`); later tools multiplex over it, and it ends by itself
//! `ControlPersist` seconds after its last use (at least the cluster's
//! `linger`, so that a pooled job's next build finds it open). The master
//! runs detached with its stdio on /dev/null, so that it never holds a pipe a
//! caller (a Nix daemon waiting for EOF) is reading.
//!
//! sshd carries at most `MaxSessions` (default 10) sessions per connection.
//! Each tool process holds one session slot, a `flock` on
//! `<cluster>-<user@node>.session-<s>`, for as long as it talks to the node
//! (a tool runs one remote command at a time); slot `s` uses master number
//! `s / max_sessions`, so the eleventh concurrent tool on a node opens a
//! second master (`<cluster>-<user@node>-1`) instead of being refused.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::config::{self, Config};
use crate::error::{Failure, ResultExt};
use crate::runtime;
use crate::sys::flock::{FileLock, LockError};
use crate::ticket::AllocSection;
use crate::Kind;

/// How long an idle master connection stays open after its last user, at
/// least (a cluster's `linger` may make it longer).
pub const CONTROL_PERSIST_SECS: u64 = 120;

/// How long starting a node's ssh master (connect, authenticate, fork) may
/// take before it is stopped and the step fails as transient: past
/// `ConnectTimeout`, a node that accepts the connection and then stalls.
pub const MASTER_SETUP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// OpenSSH's default cipher set with AES-GCM moved to the front.
pub const AES_GCM_FIRST: &str = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,\
chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr";

/// The `Ciphers=` value to pass, if any.
fn cipher_preference(setting: &config::Ciphers) -> Option<&str> {
    match setting {
        config::Ciphers::Auto => cpu_has_aes().then_some(AES_GCM_FIRST),
        config::Ciphers::SshDefault => None,
        config::Ciphers::List(list) => Some(list),
    }
}

/// Whether this machine's CPU has AES instructions (`/proc/cpuinfo`, read
/// once per process). Without them AES-GCM is slower than chacha20, which is
/// why OpenSSH puts chacha20 first; the nodes are assumed alike.
fn cpu_has_aes() -> bool {
    static HAS_AES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS_AES.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|text| cpuinfo_lists_aes(&text))
    })
}

/// Whether a `/proc/cpuinfo` text lists the `aes` feature: the `flags` line
/// on x86 (AES-NI), `Features` on arm64 (the crypto extension).
fn cpuinfo_lists_aes(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| matches!(key.trim(), "flags" | "Features"))
        .any(|(_, features)| features.split_whitespace().any(|f| f == "aes"))
}

/// The ssh transport to one node.
#[derive(Debug, Clone)]
pub struct Ssh {
    destination: String,
    control: Option<PathBuf>,
    settings: config::Ssh,
    /// The session slot this process holds on `control` (sshd's
    /// MaxSessions), released when the last clone is dropped.
    _session: Option<Arc<FileLock>>,
}

impl Ssh {
    /// The transport for a ticket's allocation, over the master the ticket
    /// names (if any), holding no session slot: for a command that must run
    /// even when the slots are busy.
    pub fn for_alloc(alloc: &AllocSection, settings: &config::Ssh) -> Ssh {
        Ssh {
            destination: alloc.ssh.clone(),
            control: alloc.control.as_ref().map(PathBuf::from),
            settings: settings.clone(),
            _session: None,
        }
    }

    /// A transport to `destination` without a shared connection.
    pub fn new(destination: &str, settings: &config::Ssh) -> Ssh {
        Ssh {
            destination: destination.to_string(),
            control: None,
            settings: settings.clone(),
            _session: None,
        }
    }

    /// The ControlMaster socket, if one is in use.
    pub fn control_path(&self) -> Option<&Path> {
        self.control.as_deref()
    }

    /// ssh's options (without the destination): the site's settings, then ours.
    /// `persist`: for the command that starts the shared connection, how
    /// long it stays after its last user.
    fn options(&self, persist: Option<u64>) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(file) = &self.settings.config_file {
            args.push("-F".into());
            args.push(file.into());
        }
        if let Some(identity) = &self.settings.identity {
            args.push("-i".into());
            args.push(identity.into());
            // That key only: not whatever an agent or ~/.ssh offers.
            args.push("-o".into());
            args.push("IdentitiesOnly=yes".into());
        }
        for option in &self.settings.options {
            args.push("-o".into());
            args.push(option.into());
        }
        // After the site's own `-o`: ssh keeps the first value it is given,
        // so `options = ["Ciphers=…"]` still wins.
        if let Some(ciphers) = cipher_preference(&self.settings.ciphers) {
            args.push("-o".into());
            args.push(format!("Ciphers={ciphers}").into());
        }
        // Never prompt: a hook has no terminal, and a prompt would hang it.
        for option in [
            "BatchMode=yes",
            "ConnectTimeout=15",
            "ServerAliveInterval=15",
        ] {
            args.push("-o".into());
            args.push(option.into());
        }
        if let Some(control) = &self.control {
            args.push("-o".into());
            args.push(format!("ControlPath={}", control.display()).into());
            args.push("-o".into());
            if let Some(persist) = persist {
                args.push("ControlMaster=yes".into());
                args.push("-o".into());
                args.push(format!("ControlPersist={persist}").into());
            } else {
                // Users of the master never become masters themselves: if the
                // master is gone they connect directly instead of leaving a new
                // master behind that inherited their stdio.
                args.push("ControlMaster=no".into());
            }
        }
        args
    }

    /// Makes sure a ControlMaster runs for the ticket's node, starting one
    /// if needed, takes a session slot on it for this process, and records
    /// its socket in `alloc.control`.
    pub fn ensure_master(alloc: &mut AllocSection, config: &Config) -> Result<Ssh, Failure> {
        let dir = runtime::subdir("ssh")?;
        // Named by the destination (`user@node`): it is what the master
        // connects to.
        let base = format!(
            "{}-{}",
            runtime::file_name_safe(&alloc.cluster),
            runtime::file_name_safe(&alloc.ssh)
        );
        let settings = config.ssh_for(&alloc.cluster);
        let max_sessions = settings.max_sessions.max(1);
        let lock_limit = std::time::Duration::from_secs(config.remote.lock_timeout_s);
        let (session, master) = session_slot(&dir, &base, max_sessions, lock_limit)?;
        let name = if master == 0 {
            base.clone()
        } else {
            format!("{base}-{master}")
        };
        let control = dir.join(&name);
        let ssh = Ssh {
            destination: alloc.ssh.clone(),
            control: Some(control.clone()),
            settings,
            _session: Some(Arc::new(session)),
        };
        {
            // One starter at a time: two masters on one socket would leave
            // the loser running without multiplexing, forever.
            let start_lock = dir.join(format!("{name}.start"));
            let _starting = FileLock::acquire(&start_lock, lock_limit)
                .map_err(|e| lock_failure(&start_lock, &e))?;
            if !master_alive(&control) {
                // A socket left by a master that died refuses a new one.
                let _ = std::fs::remove_file(&control);
                let linger = config
                    .clusters
                    .get(&alloc.cluster)
                    .map_or(0, |c| c.linger_s);
                ssh.start_master(CONTROL_PERSIST_SECS.max(linger + 60))?;
            }
        }
        alloc.control = Some(control.display().to_string());
        Ok(ssh)
    }

    fn start_master(&self, persist: u64) -> Result<(), Failure> {
        let Some(control) = &self.control else {
            return Err(Failure::transient(format!(
                "no control socket for an ssh master to {}",
                self.destination
            )));
        };
        // `-f` puts the master in the background once it is authenticated;
        // its stdio is /dev/null, and stderr goes to a file we read only when
        // it failed (a pipe would be held open by the background master).
        let errors = tempfile_in(control.parent().unwrap_or(Path::new("/tmp")))?;
        let mut command = Command::new("ssh");
        command
            .args(self.options(Some(persist)))
            .args(["-N", "-f", &self.destination])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(errors.1);
        let status = crate::sys::process::status_within(&mut command, MASTER_SETUP_DEADLINE)
            .or_fail(Kind::Transient, || {
                format!("starting the ssh connection to {}", self.destination)
            })?;
        let message = std::fs::read_to_string(&errors.0).unwrap_or_default();
        let _ = std::fs::remove_file(&errors.0);
        if status.success() {
            Ok(())
        } else {
            Err(Failure::transient(format!(
                "ssh to {} failed ({status}): {}",
                self.destination,
                message.trim()
            )))
        }
    }

    /// Closes the shared connection, if there is one. Errors are ignored: a
    /// master that is already gone is what we want.
    pub fn stop_master(&self) {
        if self.control.is_none() {
            return;
        }
        let _ = crate::sys::process::status_within(
            Command::new("ssh")
                .args(self.options(None))
                .args(["-O", "exit", &self.destination])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            MASTER_SETUP_DEADLINE,
        );
    }
}

/// What stops `ssh`'s master later (for a session that stalled: the
/// master would keep its channel, the remote processes' end and the
/// descriptors passed to it, as long as the node does not close it).
/// Other sessions on that master fail and are retried over a new one.
pub fn stop_master_of(ssh: &Ssh) -> impl FnOnce() + 'static {
    let ssh = Ssh {
        _session: None,
        ..ssh.clone()
    };
    move || {
        crate::log_warn!(
            "{}: closing the ssh connection to a stalled node",
            ssh.destination
        );
        ssh.stop_master();
    }
}

/// Whether a master listens on `control`: a connect(2) to its socket, no
/// process (a master that died leaves a socket nobody accepts on).
fn master_alive(control: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(control).is_ok()
}

/// A free session slot on the node's masters: the lock that holds it, and
/// the number of the master it belongs to.
fn session_slot(
    dir: &Path,
    base: &str,
    max_sessions: u32,
    lock_limit: std::time::Duration,
) -> Result<(FileLock, u32), Failure> {
    // Far more than a node ever carries at once; past it, wait for slot 0.
    const MASTERS: u32 = 64;
    for slot in 0..max_sessions.saturating_mul(MASTERS) {
        let path = dir.join(format!("{base}.session-{slot}"));
        match FileLock::try_acquire(&path) {
            Ok(Some(lock)) => return Ok((lock, slot / max_sessions)),
            Ok(None) => {}
            Err(e) => return Err(lock_failure(&path, &e)),
        }
    }
    let path = dir.join(format!("{base}.session-0"));
    let lock = FileLock::acquire(&path, lock_limit).map_err(|e| lock_failure(&path, &e))?;
    Ok((lock, 0))
}

fn lock_failure(path: &Path, e: &LockError) -> Failure {
    Failure::transient(format!(
        "locking {}: {e}{}",
        path.display(),
        lock_timeout_hint(e)
    ))
}

/// " (remote.lock_timeout)" for a lock that was still held at the deadline:
/// the key that sets it.
#[must_use]
pub fn lock_timeout_hint(e: &LockError) -> &'static str {
    match e {
        LockError::Lock(e) if e.kind() == std::io::ErrorKind::TimedOut => " (remote.lock_timeout)",
        _ => "",
    }
}

impl Ssh {
    /// A command that runs `remote` (an argv; each word is quoted for the
    /// remote shell) on the node. The caller sets up stdio and runs it.
    #[must_use]
    pub fn command(&self, remote: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(self.options(None))
            .arg(&self.destination)
            .arg("--")
            .arg(remote_command_line(remote));
        cmd
    }

    /// Where the command runs, for messages (`nixbuild@node7`).
    #[must_use]
    pub fn describe(&self) -> &str {
        &self.destination
    }
}

/// ssh hands the remote side one string, which the remote user's shell parses:
/// quote each word so that it arrives as one argument, unchanged.
pub fn remote_command_line(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes `word` for a POSIX shell; words made only of safe characters stay
/// as they are, for readable logs.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A new file for ssh's stderr, and its path.
fn tempfile_in(dir: &Path) -> Result<(PathBuf, std::fs::File), Failure> {
    for attempt in 0..100u32 {
        let path = dir.join(format!(".ssh-err-{}-{attempt}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Failure::transient(format!(
                    "creating {}: {e}",
                    path.display()
                )))
            }
        }
    }
    Err(Failure::transient("no free name for ssh's error file"))
}

/// The node-side command that speaks the serve protocol:
/// `<nix_bin_dir>/nix-store --serve --write [--store <store>]`.
pub fn remote_serve_argv(remote: &config::Remote) -> Vec<String> {
    let program = if remote.nix_bin_dir.is_empty() {
        "nix-store".to_string()
    } else {
        format!("{}/nix-store", remote.nix_bin_dir.trim_end_matches('/'))
    };
    let mut argv = vec![program, "--serve".into(), "--write".into()];
    if !remote.store.is_empty() {
        argv.push("--store".into());
        argv.push(remote.store.clone());
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_command_from_config() {
        let mut remote = config::Remote::default();
        assert_eq!(
            remote_serve_argv(&remote),
            ["nix-store", "--serve", "--write"]
        );
        remote.nix_bin_dir = "/opt/nix/bin/".into();
        remote.store = "local?root=/scratch".into();
        assert_eq!(
            remote_serve_argv(&remote),
            [
                "/opt/nix/bin/nix-store",
                "--serve",
                "--write",
                "--store",
                "local?root=/scratch"
            ]
        );
    }

    #[test]
    fn quoting_survives_a_real_shell() {
        let words = [
            "plain",
            "with space",
            "it's",
            "",
            "$HOME",
            "a\"b",
            "x;rm -rf /",
            "/nix/store/abc-x",
        ];
        let line = remote_command_line(&words);
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("for w in {line}; do printf '%s\\n' \"$w\"; done"))
            .output()
            .unwrap();
        let got: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(got, words);
    }

    #[test]
    fn a_configured_identity_is_the_only_one_offered() {
        let settings = config::Ssh {
            identity: Some("/etc/nsh/id_ed25519".into()),
            ..config::Ssh::default()
        };
        let cmd = Ssh::for_alloc(&AllocSection::default(), &settings).command(&["true"]);
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let at = args.iter().position(|a| a == "-i").unwrap();
        assert_eq!(
            args[at..at + 4],
            ["-i", "/etc/nsh/id_ed25519", "-o", "IdentitiesOnly=yes"]
        );
        let none =
            Ssh::for_alloc(&AllocSection::default(), &config::Ssh::default()).command(&["true"]);
        assert!(!none
            .get_args()
            .any(|a| a.to_string_lossy().starts_with("IdentitiesOnly")));
    }

    #[test]
    fn users_of_a_master_never_become_masters() {
        let alloc = AllocSection {
            ssh: "nixbuild@node1".into(),
            control: Some("/tmp/nsh-0/test-1".into()),
            ..AllocSection::default()
        };
        let settings = config::Ssh {
            config_file: Some("/etc/nsh/ssh_config".into()),
            ciphers: config::Ciphers::List("aes256-gcm@openssh.com".into()),
            ..config::Ssh::default()
        };
        let cmd = Ssh::for_alloc(&alloc, &settings).command(&["nix-store", "--serve", "--write"]);
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-F",
                "/etc/nsh/ssh_config",
                "-o",
                "Ciphers=aes256-gcm@openssh.com",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=15",
                "-o",
                "ServerAliveInterval=15",
                "-o",
                "ControlPath=/tmp/nsh-0/test-1",
                "-o",
                "ControlMaster=no",
                "nixbuild@node1",
                "--",
                "nix-store --serve --write"
            ]
        );
    }

    #[test]
    fn aes_gcm_goes_first_only_where_the_cpu_has_aes() {
        let x86 = "processor\t: 0\nflags\t\t: fpu sse2 aes avx2 sha_ni\n";
        let x86_without = "processor\t: 0\nflags\t\t: fpu sse2 avx2 aesx\n";
        let arm64 = "processor\t: 0\nFeatures\t: fp asimd aes pmull sha1 sha2\n";
        let ppc = "processor\t: 0\ncpu\t\t: POWER9 (raw), altivec supported\n";
        assert!(cpuinfo_lists_aes(x86));
        assert!(!cpuinfo_lists_aes(x86_without));
        assert!(cpuinfo_lists_aes(arm64));
        assert!(!cpuinfo_lists_aes(ppc));
        assert_eq!(cipher_preference(&config::Ciphers::SshDefault), None);
        assert_eq!(
            cipher_preference(&config::Ciphers::List("^aes128-ctr".into())),
            Some("^aes128-ctr")
        );
    }

    #[test]
    fn the_sites_own_cipher_option_comes_first_and_so_wins() {
        let settings = config::Ssh {
            options: vec!["Ciphers=chacha20-poly1305@openssh.com".into()],
            ciphers: config::Ciphers::List(AES_GCM_FIRST.into()),
            ..config::Ssh::default()
        };
        let cmd = Ssh::new("node1", &settings).command(&["true"]);
        let ciphers: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .filter(|a| a.starts_with("Ciphers="))
            .collect();
        assert_eq!(
            ciphers,
            [
                "Ciphers=chacha20-poly1305@openssh.com".to_string(),
                format!("Ciphers={AES_GCM_FIRST}")
            ]
        );
    }
}
