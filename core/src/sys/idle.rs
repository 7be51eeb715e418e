//! Pipe ends whose reads and writes wait for the peer at most so long: a
//! node whose `nix-store --serve` stops answering (or stops reading) ends
//! the conversation with a `TimedOut` error instead of stalling the tool.
#![allow(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A pipe end (put in non-blocking mode) on which every read and write
/// waits at most `limit` for the peer to send or take a byte. `None`: no
/// limit (a blocking pipe as before).
#[derive(Debug)]
pub struct IdleLimited<T> {
    inner: T,
    limit: Option<Duration>,
    /// What sets the limit, for the message (`remote.io_timeout`).
    source: &'static str,
    /// Who is at the other end, for the message.
    peer: String,
    /// Set once a wait ran past the limit (shared with whoever must clean
    /// up after a stalled peer).
    stalled: Arc<AtomicBool>,
}

impl<T: AsFd> IdleLimited<T> {
    /// Wraps `inner`; with a limit, its descriptor becomes non-blocking
    /// (it is this process's own end of a pipe, shared with nobody).
    /// `source` names what sets the limit, for the message.
    ///
    /// # Errors
    /// Setting the descriptor non-blocking.
    pub fn new(
        inner: T,
        limit: Option<Duration>,
        source: &'static str,
    ) -> io::Result<IdleLimited<T>> {
        if limit.is_some() {
            rustix::io::ioctl_fionbio(&inner, true)?;
        }
        Ok(IdleLimited {
            inner,
            limit,
            source,
            peer: "the peer".into(),
            stalled: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Names the other end in the message (`nixbuild@node1`).
    #[must_use]
    pub fn with_peer(mut self, peer: impl Into<String>) -> IdleLimited<T> {
        self.peer = peer.into();
        self
    }

    /// Shares `flag`, set when a wait runs past the limit (one flag for
    /// both ends of a conversation).
    #[must_use]
    pub fn flagging(mut self, flag: Arc<AtomicBool>) -> IdleLimited<T> {
        self.stalled = flag;
        self
    }

    /// Retries `op` while it would block, each time waiting for `events`
    /// at most the limit.
    fn retrying<R>(
        &mut self,
        events: libc::c_short,
        mut op: impl FnMut(&mut T) -> io::Result<R>,
    ) -> io::Result<R> {
        let Some(limit) = self.limit else {
            return op(&mut self.inner);
        };
        loop {
            match op(&mut self.inner) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let waited = wait_for(self.inner.as_fd().as_raw_fd(), events, limit)
                        .map_err(|e| self.explained(e, events, limit));
                    if let Err(e) = waited {
                        if e.kind() == io::ErrorKind::TimedOut {
                            self.stalled.store(true, Ordering::SeqCst);
                        }
                        return Err(e);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

impl<T> IdleLimited<T> {
    /// A timeout said in words: who sent or took nothing, for how long, and
    /// what sets the limit; other errors as they are.
    fn explained(&self, e: io::Error, events: libc::c_short, limit: Duration) -> io::Error {
        if e.kind() != io::ErrorKind::TimedOut {
            return e;
        }
        let (did, direction) = if events == libc::POLLIN {
            ("came", "from")
        } else {
            ("was taken", "by")
        };
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "nothing {did} {direction} {} for {} s ({})",
                self.peer,
                limit.as_secs_f64(),
                self.source
            ),
        )
    }
}

/// Waits until `fd` is ready for `events` (or has an error or hang-up,
/// which the next read or write reports), at most `limit`.
fn wait_for(fd: std::os::fd::RawFd, events: libc::c_short, limit: Duration) -> io::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let mut entry = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd, valid for the call; poll writes only revents.
        let ready = unsafe { libc::poll(&raw mut entry, 1, ms) };
        if ready > 0 {
            return Ok(());
        }
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl<T: AsFd + Read> Read for IdleLimited<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.retrying(libc::POLLIN, |inner| inner.read(buf))
    }
}

impl<T: AsFd + Write> Write for IdleLimited<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retrying(libc::POLLOUT, |inner| inner.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.retrying(libc::POLLOUT, Write::flush)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn a_peer_that_stops_sending_is_timed_out_after_the_limit() {
        let mut child = Command::new("sh")
            .args(["-c", "printf abc; exec sleep 30"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let mut reader = IdleLimited::new(stdout, Some(Duration::from_millis(300)), "the test")
            .unwrap()
            .flagging(flag.clone());
        let mut got = [0u8; 3];
        reader.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");
        let started = Instant::now();
        let err = reader.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            err.to_string(),
            "nothing came from the peer for 0.3 s (the test)"
        );
        assert!(flag.load(Ordering::SeqCst));
        assert!(started.elapsed() < Duration::from_secs(5));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_peer_that_stops_reading_is_timed_out_after_the_limit() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut writer =
            IdleLimited::new(stdin, Some(Duration::from_millis(300)), "the test").unwrap();
        // Far more than a pipe holds: the write fills it and then waits.
        let err = writer.write_all(&vec![0u8; 4 << 20]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            err.to_string(),
            "nothing was taken by the peer for 0.3 s (the test)"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_peer_that_answers_and_ends_reads_to_the_end() {
        let mut child = Command::new("sh")
            .args(["-c", "sleep 0.1; head -c 200000 /dev/zero"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut reader =
            IdleLimited::new(stdout, Some(Duration::from_secs(10)), "the test").unwrap();
        let mut all = Vec::new();
        reader.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 200_000);
        child.wait().unwrap();
    }
}
