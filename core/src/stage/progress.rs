//! What the stages report while they wait or copy: a Slurm job's queue
//! wait ([`QueueProgress`]) and a transfer of store paths
//! ([`TransferProgress`]), as log lines here; the tools show them on a
//! terminal (`nsh-cli`). [`Reporting`] is the one adapter that tells a
//! progress about the bytes passing through a reader or a writer.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use crate::log_info;
use crate::slurm::JobInfo;

/// What the waiting loop reports, for progress display.
pub trait QueueProgress {
    /// Called after every state query while the job is not running yet.
    fn waiting(&mut self, job: u64, info: &JobInfo, waited: Duration);
    /// Called once when the wait ends (either way).
    fn done(&mut self);
}

/// No progress display: PENDING reasons go to the log when they change.
pub struct LogQueueProgress {
    last: Option<String>,
}

impl LogQueueProgress {
    /// Nothing reported yet.
    pub fn new() -> LogQueueProgress {
        LogQueueProgress { last: None }
    }
}

impl Default for LogQueueProgress {
    fn default() -> Self {
        LogQueueProgress::new()
    }
}

impl QueueProgress for LogQueueProgress {
    fn waiting(&mut self, job: u64, info: &JobInfo, _waited: Duration) {
        let now = describe_wait(info);
        if self.last.as_deref() != Some(now.as_str()) {
            log_info!("job {job}: {now}");
            self.last = Some(now);
        }
    }
    fn done(&mut self) {}
}

/// `PENDING (Resources)`.
pub fn describe_wait(info: &JobInfo) -> String {
    let mut text = info.state.to_string();
    if !info.flags.is_empty() {
        text = format!("{text}+{}", info.flags.join("+"));
    }
    match &info.reason {
        Some(reason) => format!("{text} ({reason})"),
        None => text,
    }
}

/// Progress of one transfer: totals first, then bytes and paths as they go.
pub trait TransferProgress {
    /// The copy starts: `paths` paths of `bytes` NAR bytes in all.
    fn begin(&mut self, paths: u64, bytes: u64);
    /// `n` more bytes went through.
    fn bytes(&mut self, n: u64);
    /// One more path is through.
    fn path_done(&mut self);
    /// The copy is over.
    fn end(&mut self);
}

/// Progress as a log line every few seconds (stderr is not a terminal).
pub struct LogTransferProgress {
    what: &'static str,
    every: Duration,
    total_paths: u64,
    total_bytes: u64,
    paths: u64,
    bytes: u64,
    started: Instant,
    last: Instant,
}

impl LogTransferProgress {
    /// `what`: the verb for log lines (`pushed`, `fetched`).
    pub fn new(what: &'static str) -> LogTransferProgress {
        let now = Instant::now();
        LogTransferProgress {
            what,
            every: Duration::from_secs(5),
            total_paths: 0,
            total_bytes: 0,
            paths: 0,
            bytes: 0,
            started: now,
            last: now,
        }
    }

    fn line(&self) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        log_info!(
            "{} {}/{} paths, {}/{} ({}/s)",
            self.what,
            self.paths,
            self.total_paths,
            human_bytes(self.bytes),
            human_bytes(self.total_bytes),
            human_bytes(rate(self.bytes, secs))
        );
    }
}

impl TransferProgress for LogTransferProgress {
    fn begin(&mut self, paths: u64, bytes: u64) {
        self.total_paths = paths;
        self.total_bytes = bytes;
        self.started = Instant::now();
        self.last = self.started;
    }
    fn bytes(&mut self, n: u64) {
        self.bytes += n;
        if self.last.elapsed() >= self.every {
            self.last = Instant::now();
            self.line();
        }
    }
    fn path_done(&mut self) {
        self.paths += 1;
    }
    fn end(&mut self) {
        if self.total_paths > 0 {
            self.line();
        }
    }
}

/// No progress at all.
#[cfg(test)]
pub struct NoProgress;

#[cfg(test)]
impl TransferProgress for NoProgress {
    fn begin(&mut self, _: u64, _: u64) {}
    fn bytes(&mut self, _: u64) {}
    fn path_done(&mut self) {}
    fn end(&mut self) {}
}

/// Bytes per second, whole.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn rate(bytes: u64, secs: f64) -> u64 {
    // A positive, finite f64 below 2^64 (secs >= 1 ms): `as` is exact enough
    // for a log line and saturates otherwise.
    (bytes as f64 / secs) as u64
}

/// `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Something that is told how many bytes went by: a progress, or a
/// progress shared by two adapters of one transfer.
pub trait CountBytes {
    /// `n` more bytes went by.
    fn count(&mut self, n: u64);
}

impl CountBytes for &mut (dyn TransferProgress + '_) {
    fn count(&mut self, n: u64) {
        self.bytes(n);
    }
}

impl CountBytes for &RefCell<&mut (dyn TransferProgress + '_)> {
    fn count(&mut self, n: u64) {
        self.borrow_mut().bytes(n);
    }
}

/// A reader or writer that reports every byte it passes on.
pub struct Reporting<T, C> {
    /// The reader or writer bytes pass through.
    pub inner: T,
    /// Who is told.
    pub to: C,
}

impl<R: Read, C: CountBytes> Read for Reporting<R, C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.to.count(n as u64);
        Ok(n)
    }
}

impl<W: Write, C: CountBytes> Write for Reporting<W, C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.to.count(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
