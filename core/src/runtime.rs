//! nsh's private runtime directory on the login side: where the pool of
//! running jobs (`pool/`) and the ssh masters of the nodes (`ssh/`) live,
//! shared by every nsh process of one user.
//!
//! `$NSH_RUNTIME_DIR` when set (a test, or a site that wants it elsewhere);
//! else `/run/nsh` for root (the Nix daemon's hook); else
//! `$XDG_RUNTIME_DIR/nsh`; else `/tmp/nsh-<uid>`. It is made mode 0700 and
//! must belong to this user: control sockets and job records are nobody
//! else's business.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Failure, Kind, ResultExt};

/// The environment variable that names the runtime directory outright.
pub const RUNTIME_DIR_ENV: &str = "NSH_RUNTIME_DIR";

/// Where the runtime directory is for this process (not made yet).
pub fn location() -> PathBuf {
    if let Some(dir) = std::env::var_os(RUNTIME_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let euid = crate::sys::process::euid();
    if euid == 0 {
        return PathBuf::from("/run/nsh");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("nsh"),
        _ => PathBuf::from(format!("/tmp/nsh-{euid}")),
    }
}

/// The subdirectory `name` of the runtime directory, made (0700) if needed.
pub fn subdir(name: &str) -> Result<PathBuf, Failure> {
    let root = location();
    private_dir(&root)?;
    let dir = root.join(name);
    private_dir(&dir)?;
    Ok(dir)
}

/// Makes `dir` (0700) if it is missing, and checks that it is this user's
/// own and closed to others.
pub fn private_dir(dir: &Path) -> Result<(), Failure> {
    match std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => {
            return Err(Failure::caused_by(
                Kind::Transient,
                format!("creating {}: {e}", dir.display()),
                e,
            ))
        }
    }
    let meta = std::fs::symlink_metadata(dir)
        .or_fail(Kind::Transient, || format!("reading {}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != crate::sys::process::euid() {
        return Err(Failure::config(format!(
            "{} is not a directory of this user's own; nsh keeps its job records and ssh \
             sockets only in one",
            dir.display()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .or_fail(Kind::Transient, || format!("chmod 0700 {}", dir.display()))?;
    }
    Ok(())
}

/// A file-name-safe rendering of `s` (for names made of cluster and node).
pub fn file_name_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_dir_is_made_closed_and_refused_when_it_is_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert_eq!(private_dir(&link).unwrap_err().kind, Kind::Config);
    }

    #[test]
    fn names_are_safe_for_files() {
        assert_eq!(file_name_safe("nixbuild@node1"), "nixbuild@node1");
        assert_eq!(file_name_safe("a/b c"), "a_b_c");
    }
}
