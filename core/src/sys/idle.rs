//! Pipe ends whose reads and writes wait for the peer at most so long: a
//! node whose `nix-store --serve` stops answering (or stops reading) ends
//! the conversation with a `TimedOut` error instead of stalling the tool.
#![allow(unsafe_code)]

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
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
        })
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
                    wait_for(self.inner.as_fd().as_raw_fd(), events, limit, self.source)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

/// Waits until `fd` is ready for `events` (or has an error or hang-up,
/// which the next read or write reports), at most `limit`.
fn wait_for(
    fd: std::os::fd::RawFd,
    events: libc::c_short,
    limit: Duration,
    source: &str,
) -> io::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "nothing {} for {} s ({source})",
                    if events == libc::POLLIN {
                        "came"
                    } else {
                        "was taken"
                    },
                    limit.as_secs_f64()
                ),
            ));
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
        let mut reader =
            IdleLimited::new(stdout, Some(Duration::from_millis(300)), "the test").unwrap();
        let mut got = [0u8; 3];
        reader.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abc");
        let started = Instant::now();
        let err = reader.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), "nothing came for 0.3 s (the test)");
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
        assert_eq!(err.to_string(), "nothing was taken for 0.3 s (the test)");
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
