//! `flock(2)`, in one place: the push lock per node, Nix's path locks, the
//! hook's slots and the doctor's removal of a stale lock all take their
//! locks here, so that EINTR is retried everywhere.

use std::fs::File;
use std::io;
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;

/// Whether to wait for a lock another process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Block until the lock is granted.
    Block,
    /// Return at once; [`lock_exclusive`] returns `false` when it is held.
    DontWait,
    /// Wait at most this long (trying again and again, no signal involved);
    /// then a `TimedOut` error: a stalled holder must not stall every
    /// later taker for ever.
    Within(Duration),
}

/// The first and the longest pause between two tries of a lock taken
/// [`Wait::Within`]. The locks nsh waits for (the pool, a node's push, an
/// ssh master's start) are held for milliseconds, by up to `max_jobs`
/// builds at once: a long pause would cost a waiter far more than the
/// holder held the lock (with 200 ms, 8 builds on one node queued behind
/// each other's pauses). A try is one syscall, so trying every 10 ms costs
/// nothing worth counting.
const RETRY_PAUSE_FIRST: Duration = Duration::from_millis(1);
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(10);

/// Takes an exclusive `flock` on `file`: `Ok(true)` once held, `Ok(false)`
/// when `wait` is [`Wait::DontWait`] and another holder has it. A signal
/// that interrupts the wait (EINTR) is retried. The lock lasts as long as
/// the open file (all its duplicates).
///
/// # Errors
/// What `flock` reports other than EINTR and, without waiting, EWOULDBLOCK.
pub fn lock_exclusive(file: &File, wait: Wait) -> io::Result<bool> {
    let operation = match wait {
        Wait::Block => FlockOperation::LockExclusive,
        Wait::DontWait | Wait::Within(_) => FlockOperation::NonBlockingLockExclusive,
    };
    flock_retrying(file, operation, wait)
}

/// Takes a shared `flock` on `file`, as [`lock_exclusive`] takes an
/// exclusive one.
///
/// # Errors
/// As [`lock_exclusive`]'s.
pub fn lock_shared(file: &File, wait: Wait) -> io::Result<bool> {
    let operation = match wait {
        Wait::Block => FlockOperation::LockShared,
        Wait::DontWait | Wait::Within(_) => FlockOperation::NonBlockingLockShared,
    };
    flock_retrying(file, operation, wait)
}

/// `flock(file, operation)`, EINTR retried; `Ok(false)` for a lock held
/// elsewhere when not waiting; tried again with growing pauses until the
/// deadline when waiting [`Wait::Within`] a limit (`operation` is then the
/// non-blocking one).
fn flock_retrying(file: &File, operation: FlockOperation, wait: Wait) -> io::Result<bool> {
    let deadline = match wait {
        Wait::Within(limit) => Some((Instant::now() + limit, limit)),
        Wait::Block | Wait::DontWait => None,
    };
    let mut pause = RETRY_PAUSE_FIRST;
    loop {
        match rustix::fs::flock(file, operation) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::WOULDBLOCK) if wait == Wait::DontWait => return Ok(false),
            Err(rustix::io::Errno::WOULDBLOCK) if deadline.is_some() => {
                let (deadline, limit) = deadline.unwrap_or((Instant::now(), Duration::ZERO));
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(still_held(limit));
                }
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(RETRY_PAUSE_MAX);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The error of a lock another process held past the limit.
fn still_held(limit: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "another process still held it after {} s",
            limit.as_secs_f64()
        ),
    )
}

/// Releases a lock taken with [`lock_exclusive`] or [`lock_shared`].
///
/// # Errors
/// What `flock` reports.
pub fn unlock(file: &File) -> io::Result<()> {
    Ok(rustix::fs::flock(file, FlockOperation::Unlock)?)
}

/// An exclusive lock on a file that is created if needed, held until
/// dropped.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Opens (or creates) `path` and waits for its lock, at most `limit`.
    ///
    /// # Errors
    /// Opening the file or locking it; the error says which. A lock still
    /// held by another process after `limit` is a `TimedOut` [`LockError::Lock`].
    pub fn acquire(path: &std::path::Path, limit: Duration) -> Result<FileLock, LockError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(LockError::Open)?;
        lock_exclusive(&file, Wait::Within(limit)).map_err(LockError::Lock)?;
        Ok(FileLock { _file: file })
    }

    /// Opens (or creates) `path` and takes its lock if it is free; `None`
    /// when another holder has it.
    ///
    /// # Errors
    /// Opening the file or locking it; the error says which.
    pub fn try_acquire(path: &std::path::Path) -> Result<Option<FileLock>, LockError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(LockError::Open)?;
        let held = lock_exclusive(&file, Wait::DontWait).map_err(LockError::Lock)?;
        Ok(held.then_some(FileLock { _file: file }))
    }
}

/// Why a [`FileLock`] could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// The lock file could not be opened or created.
    Open(io::Error),
    /// `flock` failed.
    Lock(io::Error),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Open(e) | LockError::Lock(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for LockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LockError::Open(e) | LockError::Lock(e) => Some(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_busy_for_another_open_file_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let held = FileLock::acquire(&path, Duration::from_secs(1)).unwrap();
        let other = File::options().write(true).open(&path).unwrap();
        assert!(!lock_exclusive(&other, Wait::DontWait).unwrap());
        drop(held);
        assert!(lock_exclusive(&other, Wait::DontWait).unwrap());
    }

    #[test]
    fn a_lock_held_past_the_limit_is_timed_out_and_one_freed_in_time_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let held = FileLock::acquire(&path, Duration::from_secs(1)).unwrap();
        let started = Instant::now();
        let err = FileLock::acquire(&path, Duration::from_millis(300)).unwrap_err();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert!(matches!(&err, LockError::Lock(e) if e.kind() == io::ErrorKind::TimedOut));
        assert_eq!(err.to_string(), "another process still held it after 0.3 s");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        FileLock::acquire(&path, Duration::from_secs(5)).unwrap();
        release.join().unwrap();
    }
}
