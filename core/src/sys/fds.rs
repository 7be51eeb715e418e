//! File descriptors a parent hands over by number, and pipes.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use rustix::io::FdFlags;

/// A descriptor the parent gave this process by number (`--log-fd`):
/// `None` when it is not open. It is made close-on-exec (it must reach no
/// child: an ssh master started here outlives us, and the reader waits for
/// EOF) and owned from here on.
#[must_use]
pub fn take_inherited(fd: RawFd) -> Option<File> {
    if fd < 0 {
        return None;
    }
    // SAFETY: the descriptor is only borrowed for the two fcntl calls, while
    // nothing in this process closes it.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed).ok()?;
    rustix::io::fcntl_setfd(borrowed, FdFlags::CLOEXEC).ok()?;
    // SAFETY: fd is open and was handed to this process to own; nothing
    // else in it holds the number.
    Some(unsafe { File::from_raw_fd(fd) })
}

/// Whether `fd` is an open descriptor of this process.
#[must_use]
pub fn is_open(fd: RawFd) -> bool {
    if fd < 0 {
        return false;
    }
    // SAFETY: only borrowed for fcntl(F_GETFD), which touches no memory.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed).is_ok()
}

/// Standard input as a file this process owns (the hook reads the
/// daemon's protocol from fd 0 through its own buffer).
#[must_use]
pub fn stdin_file() -> File {
    // SAFETY: fd 0 is the daemon's pipe, owned by this process from now on;
    // std's own stdin handle is never used afterwards.
    unsafe { File::from_raw_fd(0) }
}

/// The build log Nix gives a build hook as fd 4 (fd 5, the other end of
/// the same pipe, is closed): moved to a close-on-exec descriptor at 10 or
/// above, so that no stage inherits it by accident. `None` when fd 4 is not
/// open.
#[must_use]
pub fn take_hook_log_fd() -> Option<OwnedFd> {
    if !is_open(4) {
        return None;
    }
    // SAFETY: fds 4 and 5 are ours (inherited from the daemon) and used by
    // nothing else in this process; each is closed exactly once here.
    unsafe {
        let four = std::os::fd::BorrowedFd::borrow_raw(4);
        let moved = rustix::io::fcntl_dupfd_cloexec(four, 10).ok();
        drop(OwnedFd::from_raw_fd(4));
        if is_open(5) {
            drop(OwnedFd::from_raw_fd(5));
        }
        moved
    }
}

/// A pipe, both ends close-on-exec.
///
/// # Errors
/// What `pipe2(2)` reports.
pub fn pipe() -> io::Result<(File, File)> {
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    Ok((File::from(read), File::from(write)))
}
