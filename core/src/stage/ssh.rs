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
//! One connection per node is shared by the tools of a ticket: the first tool
//! that needs the node starts an ssh ControlMaster ([`Ssh::ensure_master`])
//! whose socket is recorded in the ticket (`alloc.control`); later tools
//! multiplex over it, and the last one (or `nsh-hook`) closes it. The master
//! runs detached with its stdio on /dev/null, so that it never holds a pipe a
//! caller (a Nix daemon waiting for EOF) is reading.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config;
use crate::error::{Failure, ResultExt};
use crate::ticket::AllocSection;
use crate::Kind;

/// How long an idle master connection stays open after its last user.
pub const CONTROL_PERSIST_SECS: u32 = 120;

/// The ssh transport to one node.
#[derive(Debug, Clone)]
pub struct Ssh {
    destination: String,
    control: Option<PathBuf>,
    settings: config::Ssh,
}

impl Ssh {
    /// The transport for a ticket's allocation.
    pub fn for_alloc(alloc: &AllocSection, settings: &config::Ssh) -> Ssh {
        Ssh {
            destination: alloc.ssh.clone(),
            control: alloc.control.as_ref().map(PathBuf::from),
            settings: settings.clone(),
        }
    }

    /// A transport to `destination` without a shared connection.
    pub fn new(destination: &str, settings: &config::Ssh) -> Ssh {
        Ssh {
            destination: destination.to_string(),
            control: None,
            settings: settings.clone(),
        }
    }

    /// The ControlMaster socket, if one is in use.
    pub fn control_path(&self) -> Option<&Path> {
        self.control.as_deref()
    }

    /// ssh's options (without the destination): the site's settings, then ours.
    /// `master`: for the command that starts the shared connection.
    fn options(&self, master: bool) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(file) = &self.settings.config_file {
            args.push("-F".into());
            args.push(file.into());
        }
        if let Some(identity) = &self.settings.identity {
            args.push("-i".into());
            args.push(identity.into());
        }
        for option in &self.settings.options {
            args.push("-o".into());
            args.push(option.into());
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
            if master {
                args.push("ControlMaster=yes".into());
                args.push("-o".into());
                args.push(format!("ControlPersist={CONTROL_PERSIST_SECS}").into());
            } else {
                // Users of the master never become masters themselves: if the
                // master is gone they connect directly instead of leaving a new
                // master behind that inherited their stdio.
                args.push("ControlMaster=no".into());
            }
        }
        args
    }

    /// Makes sure a ControlMaster runs for this node, starting one if needed,
    /// and records its socket in `alloc.control`.
    ///
    /// The socket lives in a private directory of the caller
    /// (`$XDG_RUNTIME_DIR/nsh` or `/tmp/nsh-<uid>`), named by cluster and job,
    /// short enough for the 108-byte limit on socket paths.
    pub fn ensure_master(alloc: &mut AllocSection, settings: &config::Ssh) -> Result<Ssh, Failure> {
        let control = match &alloc.control {
            Some(path) => PathBuf::from(path),
            None => control_dir()?.join(format!("{}-{}", alloc.cluster, alloc.job)),
        };
        let ssh = Ssh {
            destination: alloc.ssh.clone(),
            control: Some(control.clone()),
            settings: settings.clone(),
        };
        if !ssh.master_alive() {
            ssh.start_master()?;
        }
        alloc.control = Some(control.display().to_string());
        Ok(ssh)
    }

    fn master_alive(&self) -> bool {
        let Some(control) = &self.control else {
            return false;
        };
        if !control.exists() {
            return false;
        }
        Command::new("ssh")
            .args(self.options(false))
            .args(["-O", "check", &self.destination])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn start_master(&self) -> Result<(), Failure> {
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
        let status = Command::new("ssh")
            .args(self.options(true))
            .args(["-N", "-f", &self.destination])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(errors.1)
            .status()
            .or_fail(Kind::Transient, || "running ssh")?;
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
        let _ = Command::new("ssh")
            .args(self.options(false))
            .args(["-O", "exit", &self.destination])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Ssh {
    /// A command that runs `remote` (an argv; each word is quoted for the
    /// remote shell) on the node. The caller sets up stdio and runs it.
    #[must_use]
    pub fn command(&self, remote: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(self.options(false))
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

/// A private directory for control sockets (and the tools' other small
/// per-user state).
pub fn control_dir() -> Result<PathBuf, Failure> {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("nsh"),
        _ => PathBuf::from(format!("/tmp/nsh-{}", crate::sys::process::euid())),
    };
    std::fs::create_dir_all(&dir).or_fail(Kind::Transient, || {
        format!("creating the ssh control directory {}", dir.display())
    })?;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&dir)
        .or_fail(Kind::Transient, || format!("reading {}", dir.display()))?;
    if meta.uid() != crate::sys::process::euid() {
        return Err(Failure::config(format!(
            "{} belongs to another user; refusing to put ssh control sockets there",
            dir.display()
        )));
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .or_fail(Kind::Transient, || format!("chmod 0700 {}", dir.display()))?;
    Ok(dir)
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
    fn users_of_a_master_never_become_masters() {
        let alloc = AllocSection {
            ssh: "nixbuild@node1".into(),
            control: Some("/tmp/nsh-0/test-1".into()),
            ..AllocSection::default()
        };
        let settings = config::Ssh {
            config_file: Some("/etc/nsh/ssh_config".into()),
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
}
