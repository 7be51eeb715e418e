//! File system calls std does not have, and the ones that must not follow
//! a symlink someone else planted (the store directory is writable by the
//! build users' group).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::fs::Timespec;
use rustix::fs::{Access, AtFlags, FileType, Mode, OFlags, Timestamps, CWD};

/// Whether this process may write `path` (`access(2)`, real ids).
#[must_use]
pub fn is_writable(path: &Path) -> bool {
    rustix::fs::access(path, Access::WRITE_OK).is_ok()
}

/// Why `path` is not writable by this process, if it is not.
///
/// # Errors
/// `access(2)`'s answer.
pub fn check_writable(path: &Path) -> io::Result<()> {
    Ok(rustix::fs::access(path, Access::WRITE_OK)?)
}

/// Whether this process may read and write `path`.
#[must_use]
pub fn is_read_writable(path: &Path) -> bool {
    rustix::fs::access(path, Access::READ_OK | Access::WRITE_OK).is_ok()
}

/// Sets atime and mtime to 1 (the epoch plus one second, as in the store),
/// without following a symlink.
///
/// # Errors
/// What `utimensat(2)` reports.
pub fn set_mtime_1(path: &Path) -> io::Result<()> {
    let one = Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    };
    let times = Timestamps {
        last_access: one,
        last_modification: one,
    };
    Ok(rustix::fs::utimensat(
        CWD,
        path,
        &times,
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// `n` random bytes from the kernel.
///
/// # Errors
/// Reading `/dev/urandom`.
pub fn random_bytes(n: usize) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// `n` random bytes from the kernel, as lowercase hex.
///
/// # Errors
/// Reading `/dev/urandom`.
pub fn random_hex(n: usize) -> io::Result<String> {
    Ok(random_bytes(n)?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Opens (creating it if needed, mode 0600) the regular file `path` for
/// reading and writing, without following a symlink at its place: a lock
/// file in a directory others may write.
///
/// # Errors
/// Opening it (ELOOP for a symlink), or `InvalidData` when it is not a
/// regular file.
pub fn open_lock_file(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// The deepest tree [`remove_tree`] goes into.
const MAX_REMOVE_DEPTH: usize = 512;

/// Removes the file, symlink or directory tree at `path`, read-only
/// directories included, without ever following a symlink: every step is
/// relative to a directory already opened with `O_NOFOLLOW`, so a tree that
/// someone changes meanwhile cannot lead the removal (or its chmods)
/// outside it. Nothing at `path` is not an error.
///
/// # Errors
/// What the system calls report; `InvalidInput` for a `path` without a
/// parent or a name, and for a tree deeper than 512 levels.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no parent directory", path.display()),
        ));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let dir = rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    remove_at(&dir, name, 0)
}

fn remove_at(dir: &rustix::fd::OwnedFd, name: &OsStr, depth: usize) -> io::Result<()> {
    let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
        return Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?);
    }
    if depth >= MAX_REMOVE_DEPTH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a tree deeper than {MAX_REMOVE_DEPTH} directories"),
        ));
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::fs::fchmod(&sub, Mode::from_raw_mode(0o700))?;
    for entry in entries(&sub)? {
        remove_at(&sub, &entry, depth + 1)?;
    }
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
}

/// The names in the directory `dir`, without `.` and `..`.
fn entries(dir: &rustix::fd::OwnedFd) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    let mut reader = rustix::fs::Dir::read_from(dir)?;
    while let Some(entry) = reader.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_read_only_tree_is_removed_and_a_symlink_in_it_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "k").unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("a/link")).unwrap();
        for d in [tree.join("a/b"), tree.join("a"), tree.clone()] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        assert!(outside.join("keep").exists());
        let mode = std::fs::metadata(&outside).unwrap().permissions().mode();
        assert_ne!(mode & 0o777, 0o700, "the link's target was not chmodded");
        // Nothing there is fine; a symlink itself is removed, not its target.
        remove_tree(&tree).unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        remove_tree(&link).unwrap();
        assert!(outside.join("keep").exists());
    }

    #[test]
    fn a_lock_file_is_not_opened_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "precious").unwrap();
        let lock = dir.path().join("x.lock");
        std::os::unix::fs::symlink(&target, &lock).unwrap();
        assert!(open_lock_file(&lock).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        std::fs::create_dir(dir.path().join("d.lock")).unwrap();
        assert!(open_lock_file(&dir.path().join("d.lock")).is_err());
        assert!(open_lock_file(&dir.path().join("new.lock")).is_ok());
    }
}
