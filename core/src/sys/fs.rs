//! File system calls std does not have.

use std::io;
use std::path::Path;

use rustix::fs::Timespec;
use rustix::fs::{Access, AtFlags, Timestamps, CWD};

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

/// `n` random bytes from the kernel, as lowercase hex.
///
/// # Errors
/// Reading `/dev/urandom`.
pub fn random_hex(n: usize) -> io::Result<String> {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
