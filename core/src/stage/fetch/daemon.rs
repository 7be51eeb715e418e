//! Importing through the local Nix daemon, for a user who may not write the
//! store (`docs/nsh-push-fetch.md`, "Import methods"):
//!
//! * `daemon`: `nix-store --import` of the checked export stream; the
//!   daemon accepts unsigned paths from a user in its `trusted-users` only;
//! * `signed` ([`super::signed`]): the checked paths as a binary cache of
//!   our own, signed with `[fetch] secret_key_file`, copied with `nix
//!   copy`; the daemon checks the signatures against its
//!   `trusted-public-keys`.
//!
//! Which one `auto` takes ([`choose`]) depends on who runs nsh-fetch, on
//! the configuration and on what the daemon says of this user. When neither
//! is open to the user, nsh-fetch says so (78) before it reads anything.

use std::process::ExitStatus;

use super::ImportMethod;
use crate::error::Failure;
use crate::nix::local_store::store_arg;

/// What the daemon says of this user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonTrust {
    /// In its `trusted-users` (`Trusted: 1`).
    Trusted,
    /// Not (`Trusted: 0`).
    Untrusted,
    /// It does not say (Nix < 2.15 has no `Trusted:` in `nix store ping`).
    Unknown,
}

/// What [`choose`] decides from.
#[derive(Debug, Clone, Copy)]
pub struct Situation {
    /// Running as root.
    pub root: bool,
    /// The store's directory may be written directly (root, or the owner of
    /// a single-user store).
    pub store_writable: bool,
    /// `[fetch] secret_key_file` is set.
    pub has_key: bool,
}

/// How to import, from `requested` (`auto`: the first that applies of
/// `load-db` when the store may be written directly, `signed` when a key is
/// configured, `daemon` unless the daemon says this user is not trusted).
/// `trust` is asked only when it decides.
pub fn choose(
    requested: ImportMethod,
    situation: Situation,
    trust: impl FnOnce() -> DaemonTrust,
) -> Result<ImportMethod, Failure> {
    match requested {
        ImportMethod::Auto if situation.root || situation.store_writable => {
            Ok(ImportMethod::LoadDb)
        }
        ImportMethod::Auto if situation.has_key => Ok(ImportMethod::Signed),
        ImportMethod::Auto | ImportMethod::Daemon => match trust() {
            DaemonTrust::Untrusted => Err(neither_way(requested == ImportMethod::Auto)),
            DaemonTrust::Trusted | DaemonTrust::Unknown => Ok(ImportMethod::Daemon),
        },
        ImportMethod::Signed if !situation.has_key => Err(Failure::config(
            "--import-method signed needs a signing key: set [fetch] secret_key_file to a \
             key made by nix-store --generate-binary-cache-key, and have the site put its \
             public key in the Nix daemon's trusted-public-keys",
        )),
        other => Ok(other),
    }
}

/// The daemon would refuse this user's unsigned paths, and no key is
/// configured: what to change.
fn neither_way(auto: bool) -> Failure {
    let how = if auto {
        ""
    } else {
        " (--import-method daemon)"
    };
    Failure::config(format!(
        "the Nix daemon does not trust this user, so it refuses unsigned paths{how}, and no \
         [fetch] secret_key_file is set: either add the user to trusted-users in the daemon's \
         nix.conf, or set [fetch] secret_key_file to a key made by nix-store \
         --generate-binary-cache-key and add its public key to the daemon's \
         trusted-public-keys (docs/user-guide.md, \"The tools as a non-root user\")"
    ))
}

/// Asks the daemon (`nix store ping`) whether it trusts this user. Nix
/// 2.34 writes the answer to stderr when stdout is not a terminal, earlier
/// versions to stdout: both are read.
pub fn ask_trust(store_uri: &str) -> DaemonTrust {
    let mut command = std::process::Command::new("nix");
    command.args([
        "--extra-experimental-features",
        "nix-command",
        "store",
        "ping",
    ]);
    if let Some(uri) = store_arg(store_uri) {
        command.arg("--store").arg(uri);
    }
    match command.stdin(std::process::Stdio::null()).output() {
        Ok(out) if out.status.success() => trust_of(&format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
        _ => DaemonTrust::Unknown,
    }
}

/// The `Trusted:` line of `nix store ping`'s output.
fn trust_of(ping: &str) -> DaemonTrust {
    for line in ping.lines() {
        match line.strip_prefix("Trusted:").map(str::trim) {
            Some("1") => return DaemonTrust::Trusted,
            Some("0") => return DaemonTrust::Untrusted,
            _ => {}
        }
    }
    DaemonTrust::Unknown
}

/// Whether the importer's last words are the daemon refusing a path for
/// want of a signature it trusts (`lacks a signature by a trusted key`
/// in every version; `lacks a valid signature` from `nix copy`).
pub fn refused_for_signature(said: &str) -> bool {
    said.contains("lacks a signature") || said.contains("lacks a valid signature")
}

/// The failure of an import through the daemon that ended with `status`
/// after saying `said`. `public_key`: the key `signed` signed with.
pub fn import_refused(
    what: &str,
    status: ExitStatus,
    said: &str,
    public_key: Option<&str>,
) -> Failure {
    let last = said.lines().last().unwrap_or("").trim();
    if !refused_for_signature(said) {
        return Failure::permanent(format!("{what} ended with {status}: {last}"));
    }
    match public_key {
        None => {
            let mut failure = neither_way(true);
            failure.message = format!("{what}: {last}: {}", failure.message);
            failure
        }
        Some(key) => Failure::config(format!(
            "{what}: {last}: the Nix daemon does not trust the key of [fetch] secret_key_file: \
             add {key} to trusted-public-keys in its nix.conf (and restart it), or add the \
             user to trusted-users"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use std::os::unix::process::ExitStatusExt;

    const USER: Situation = Situation {
        root: false,
        store_writable: false,
        has_key: false,
    };

    fn never() -> DaemonTrust {
        panic!("the daemon was asked although it did not matter")
    }

    #[test]
    fn auto_takes_the_first_way_that_applies() {
        let root = Situation {
            root: true,
            store_writable: true,
            ..USER
        };
        let single_user = Situation {
            store_writable: true,
            ..USER
        };
        let keyed = Situation {
            has_key: true,
            ..USER
        };
        let auto = ImportMethod::Auto;
        assert_eq!(choose(auto, root, never).unwrap(), ImportMethod::LoadDb);
        assert_eq!(
            choose(auto, single_user, never).unwrap(),
            ImportMethod::LoadDb
        );
        assert_eq!(choose(auto, keyed, never).unwrap(), ImportMethod::Signed);
        for trust in [DaemonTrust::Trusted, DaemonTrust::Unknown] {
            assert_eq!(choose(auto, USER, || trust).unwrap(), ImportMethod::Daemon);
        }
        let neither = choose(auto, USER, || DaemonTrust::Untrusted).unwrap_err();
        assert_eq!(neither.kind, Kind::Config);
        for fix in ["trusted-users", "secret_key_file", "trusted-public-keys"] {
            assert!(neither.message.contains(fix), "{}", neither.message);
        }
    }

    #[test]
    fn a_method_asked_for_is_taken_if_it_can_be() {
        let keyed = Situation {
            has_key: true,
            ..USER
        };
        for method in [ImportMethod::LoadDb, ImportMethod::HeldLocks] {
            assert_eq!(choose(method, USER, never).unwrap(), method);
        }
        assert_eq!(
            choose(ImportMethod::Signed, keyed, never).unwrap(),
            ImportMethod::Signed
        );
        let no_key = choose(ImportMethod::Signed, USER, never).unwrap_err();
        assert_eq!(no_key.kind, Kind::Config);
        assert!(no_key.message.contains("secret_key_file"));
        let untrusted = choose(ImportMethod::Daemon, keyed, || DaemonTrust::Untrusted);
        assert!(untrusted
            .unwrap_err()
            .message
            .contains("(--import-method daemon)"));
        assert_eq!(
            choose(ImportMethod::Daemon, keyed, || DaemonTrust::Unknown).unwrap(),
            ImportMethod::Daemon
        );
    }

    #[test]
    fn the_daemon_says_whether_it_trusts_us_from_nix_2_15_on() {
        // Nix 2.8, then 2.26.
        assert_eq!(
            trust_of("Store URL: daemon\nVersion: 2.8.0\n"),
            DaemonTrust::Unknown
        );
        let newer = "Store URL: daemon\nVersion: 2.26.3\nTrusted: ";
        // 2.34: on stderr, after a warning.
        let sid = "warning: 'ping' is a deprecated alias for 'info'\nStore URL: daemon\nTrusted: 0";
        assert_eq!(trust_of(sid), DaemonTrust::Untrusted);
        assert_eq!(trust_of(&format!("{newer}1\n")), DaemonTrust::Trusted);
        assert_eq!(trust_of(&format!("{newer}0\n")), DaemonTrust::Untrusted);
    }

    #[test]
    fn a_refused_signature_is_configuration_naming_the_fix() {
        let status = ExitStatus::from_raw(1 << 8);
        let said = "error: cannot add path '/nix/store/0000-x' because it lacks a signature \
                    by a trusted key";
        let unsigned = import_refused("nix-store --import", status, said, None);
        assert_eq!(unsigned.kind, Kind::Config);
        assert!(
            unsigned.message.contains("trusted-users"),
            "{}",
            unsigned.message
        );
        assert!(unsigned.message.contains("lacks a signature"));
        let signed = import_refused("nix copy", status, said, Some("k:AAAA"));
        assert_eq!(signed.kind, Kind::Config);
        assert!(signed.message.contains("add k:AAAA to trusted-public-keys"));
        let other = import_refused("nix copy", status, "error: disk full", None);
        assert_eq!(other.kind, Kind::Permanent);
        assert!(
            other.message.ends_with("error: disk full"),
            "{}",
            other.message
        );
    }
}
