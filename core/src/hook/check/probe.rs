//! The live probe of the daemon's build hook, for `nsh-hook --check`.
//!
//! Which `build-hook` a running nix-daemon uses cannot be read off reliably
//! (Nix 2.25–2.33 silently replace one set in `/etc/nix/nix.conf`; clients
//! may override it), so the check asks the daemon itself: it instantiates a
//! probe derivation, `nsh-probe-<nonce>`, that requires a system feature of
//! the same name, which no machine has, and asks the daemon to realise it
//! with `--max-jobs 0`. The daemon then offers it to its hook in a `try`. An
//! nsh-hook recognises the probe, leaves a [`Marker`] (its own path, pid,
//! version and the configuration it loaded) in a private directory the check
//! made, and declines; the daemon, with no local slot, gives up. Nothing is
//! ever built. No marker means the daemon's hook is not nsh.
//!
//! The marker directory is fixed (`$NSH_PROBE_DIR`, else
//! [`DEFAULT_PROBE_DIR`]), never named by a derivation, and the hook writes
//! there only when it is a directory owned by the hook's own user with no
//! access for anyone else: anyone may instantiate a probe, but only the
//! daemon's user can make the hook write.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Failure, Kind, ResultExt};
use crate::hook::config::HookConfig;
use crate::hook::protocol::Try;

/// Where the hook leaves markers and the check reads them (both sides must
/// see the same value: the daemon's environment and the check's).
pub const PROBE_DIR_ENV: &str = "NSH_PROBE_DIR";
pub const DEFAULT_PROBE_DIR: &str = "/run/nsh/probe";

/// The probe derivation's name and required feature: this prefix and the nonce.
pub const PROBE_PREFIX: &str = "nsh-probe-";

/// The marker directory: `$NSH_PROBE_DIR`, else [`DEFAULT_PROBE_DIR`].
pub fn probe_dir() -> PathBuf {
    match std::env::var_os(PROBE_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_PROBE_DIR),
    }
}

/// A nonce as the check makes them: 32 lowercase hex digits. Anything else
/// is not a probe (and could not be a safe file name).
pub fn is_nonce(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The nonce of a probe `try`: the derivation is `<hash>-nsh-probe-<nonce>.drv`
/// and requires exactly the feature `nsh-probe-<nonce>`.
pub fn probe_nonce(t: &Try) -> Option<String> {
    let base = t.drv_path.basename();
    let name = base.split_once('-')?.1.strip_suffix(".drv")?;
    let nonce = name.strip_prefix(PROBE_PREFIX)?;
    let feature = format!("{PROBE_PREFIX}{nonce}");
    (is_nonce(nonce) && t.required_features == [feature]).then(|| nonce.to_string())
}

/// The probe derivation, as a Nix expression. Its builder would fail at
/// once, should anything ever run it.
///
/// # Panics
/// `nonce` is not a probe nonce (32 hex digits): a caller's bug, since
/// nonces are made here.
pub fn expression(nonce: &str) -> String {
    assert!(is_nonce(nonce), "a probe nonce is 32 hex digits");
    format!(
        r#"derivation {{ name = "{PROBE_PREFIX}{nonce}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "exit 1" ]; requiredSystemFeatures = [ "{PROBE_PREFIX}{nonce}" ]; }}"#
    )
}

/// What an nsh-hook that saw the probe says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub nonce: String,
    /// The hook's pid and user.
    pub pid: u32,
    pub uid: u32,
    /// The hook's executable and version.
    pub exe: String,
    pub version: String,
    /// The configuration it reads, why that file, and why it could not if so.
    pub config: String,
    pub config_source: String,
    pub config_error: Option<String>,
    /// The daemon's `build-hook` setting as the settings dump gave it (Lix
    /// sends only overridden settings: then absent).
    pub build_hook: Option<String>,
    /// The executable of the process that started the hook (the daemon's worker).
    pub parent_exe: Option<String>,
}

impl Marker {
    /// The marker of this process, answering the probe `nonce`; `loaded` is
    /// what became of its configuration.
    pub fn of_this_hook(
        nonce: &str,
        build_hook: Option<&str>,
        loaded: Result<&HookConfig, &Failure>,
    ) -> Marker {
        let (config, source) = crate::config::Config::locate_with_source(None);
        let config_error = loaded.err().map(|f| f.message.clone());
        let exe = |pid: String| {
            fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .map(|p| p.display().to_string())
        };
        Marker {
            nonce: nonce.to_string(),
            pid: std::process::id(),
            uid: crate::sys::process::uid(),
            exe: exe("self".into()).unwrap_or_default(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            config: config.display().to_string(),
            config_source: source.describe().to_string(),
            config_error,
            build_hook: build_hook.map(str::to_string),
            parent_exe: exe(std::os::unix::process::parent_id().to_string()),
        }
    }
}

fn marker_path(dir: &Path, nonce: &str) -> PathBuf {
    dir.join(format!("{nonce}.json"))
}

/// Whether `dir` is a real directory (not a symlink) owned by `uid` with no
/// access for group or others.
fn is_private_to(dir: &Path, uid: u32) -> Result<(), Failure> {
    let meta = fs::symlink_metadata(dir).or_fail(Kind::Config, || {
        format!("the probe directory {}", dir.display())
    })?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(Failure::config(format!(
            "the probe directory {} is not a directory private to uid {uid} (mode 0700)",
            dir.display()
        )));
    }
    Ok(())
}

/// Hook side: writes `<dir>/<nonce>.json`, a new file, only into a directory
/// private to this process's user.
pub fn leave_marker(dir: &Path, marker: &Marker) -> Result<(), Failure> {
    if !is_nonce(&marker.nonce) {
        return Err(Failure::input("not a probe nonce"));
    }
    is_private_to(dir, crate::sys::process::euid())?;
    let path = marker_path(dir, &marker.nonce);
    let text = serde_json::to_string(marker)
        .map_err(|e| Failure::permanent(format!("writing the probe marker: {e}")))?;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .or_fail(Kind::Transient, || format!("writing {}", path.display()))
}

/// Check side: makes the marker directory (mode 0700) if needed, and makes
/// sure it is private to this user.
pub fn prepare_dir(dir: &Path) -> Result<(), Failure> {
    if fs::symlink_metadata(dir).is_err() {
        if let Some(parent) = dir.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .or_fail(Kind::Config, || format!("creating {}", parent.display()))?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .or_fail(Kind::Config, || format!("creating {}", dir.display()))?;
    }
    is_private_to(dir, crate::sys::process::euid())
}

/// Check side: the marker for `nonce`, if the hook left one; it is removed.
pub fn take_marker(dir: &Path, nonce: &str) -> Result<Option<Marker>, Failure> {
    let path = marker_path(dir, nonce);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Failure::transient(format!(
                "reading {}: {e}",
                path.display()
            )))
        }
    };
    let _ = fs::remove_file(&path);
    serde_json::from_str(&text)
        .map(Some)
        .or_fail(Kind::Input, || format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: &str = "0123456789abcdef0123456789abcdef";

    fn probe_try(name: &str, features: &[&str]) -> Try {
        Try {
            am_willing: false,
            needed_system: "x86_64-linux".into(),
            drv_path: crate::nix::store_path::test_path(&format!(
                "/nix/store/9wz4rz0z6nxsdmyyq3amsirnkbm7yhgv-{name}.drv"
            )),
            required_features: features
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
        }
    }

    #[test]
    fn a_probe_is_its_name_and_its_one_feature() {
        let name = format!("nsh-probe-{NONCE}");
        assert_eq!(
            probe_nonce(&probe_try(&name, &[&name])).as_deref(),
            Some(NONCE)
        );
        for (drv, features) in [
            (name.clone(), vec![]),
            (name.clone(), vec![name.clone(), "kvm".into()]),
            ("hello".to_string(), vec![name.clone()]),
            ("nsh-probe-XYZ".into(), vec!["nsh-probe-XYZ".to_string()]),
            // (A name with `/` in it is no store path: the hook protocol
            // refuses such a `try` before it gets here.)
            (
                "nsh-probe-..etc".into(),
                vec!["nsh-probe-..etc".to_string()],
            ),
        ] {
            let features: Vec<&str> = features.iter().map(String::as_str).collect();
            assert_eq!(probe_nonce(&probe_try(&drv, &features)), None, "{drv}");
        }
    }

    #[test]
    fn the_expression_names_the_nonce_twice() {
        let expr = expression(NONCE);
        assert_eq!(expr.matches(&format!("nsh-probe-{NONCE}")).count(), 2);
        assert!(expr.contains("builder = \"/bin/sh\""));
    }

    #[test]
    fn markers_go_only_into_a_private_directory_and_come_back_once() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("probe");
        prepare_dir(&dir).unwrap();
        let broken = Failure::config("nsh.toml: broken");
        let marker = Marker::of_this_hook(NONCE, Some("/usr/bin/nsh-hook"), Err(&broken));
        assert_eq!(marker.config_error.as_deref(), Some("nsh.toml: broken"));
        assert_eq!(marker.pid, std::process::id());
        leave_marker(&dir, &marker).unwrap();
        assert!(
            leave_marker(&dir, &marker).is_err(),
            "a marker is never overwritten"
        );
        assert_eq!(take_marker(&dir, NONCE).unwrap(), Some(marker.clone()));
        assert_eq!(take_marker(&dir, NONCE).unwrap(), None);

        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let failure = leave_marker(&dir, &marker).unwrap_err();
        assert!(
            failure.message.contains("not a directory private"),
            "{failure}"
        );
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(
            leave_marker(&link, &marker).is_err(),
            "not through a symlink"
        );
    }
}
