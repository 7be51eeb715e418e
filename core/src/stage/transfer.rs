//! What `nsh-push` and `nsh-fetch` share: progress reporting for a stream of
//! store paths, NAR hashes (Nix's base-32), node-side serve commands and
//! flock(2) locks.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::config::Remote;
use crate::error::{Failure, Kind, ResultExt};
use crate::log_info;

/// Progress of one transfer: totals first, then bytes and paths as they go.
pub trait TransferProgress {
    fn begin(&mut self, paths: u64, bytes: u64);
    fn bytes(&mut self, n: u64);
    fn path_done(&mut self);
    fn end(&mut self);
}

/// Progress as a log line every few seconds (stderr is not a terminal).
pub struct LogProgress {
    what: &'static str,
    every: Duration,
    total_paths: u64,
    total_bytes: u64,
    paths: u64,
    bytes: u64,
    started: Instant,
    last: Instant,
}

impl LogProgress {
    /// `what`: the verb for log lines (`pushed`, `fetched`).
    pub fn new(what: &'static str) -> LogProgress {
        let now = Instant::now();
        LogProgress {
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
            human_bytes((self.bytes as f64 / secs) as u64)
        );
    }
}

impl TransferProgress for LogProgress {
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
pub struct NoProgress;

impl TransferProgress for NoProgress {
    fn begin(&mut self, _: u64, _: u64) {}
    fn bytes(&mut self, _: u64) {}
    fn path_done(&mut self) {}
    fn end(&mut self) {}
}

/// A progress bar (stderr is a terminal).
pub struct BarProgress {
    bar: indicatif::ProgressBar,
    what: &'static str,
    paths: u64,
    total_paths: u64,
}

impl BarProgress {
    pub fn new(what: &'static str) -> BarProgress {
        BarProgress {
            bar: indicatif::ProgressBar::hidden(),
            what,
            paths: 0,
            total_paths: 0,
        }
    }
}

impl TransferProgress for BarProgress {
    fn begin(&mut self, paths: u64, bytes: u64) {
        let bar = indicatif::ProgressBar::new(bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(self.what);
        bar.set_message(format!("0/{paths} paths"));
        self.bar = bar;
        self.total_paths = paths;
    }
    fn bytes(&mut self, n: u64) {
        self.bar.inc(n);
    }
    fn path_done(&mut self) {
        self.paths += 1;
        self.bar
            .set_message(format!("{}/{} paths", self.paths, self.total_paths));
    }
    fn end(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// A bar on a terminal, log lines otherwise.
pub fn progress_for_stderr(what: &'static str) -> Box<dyn TransferProgress> {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        Box::new(BarProgress::new(what))
    } else {
        Box::new(LogProgress::new(what))
    }
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

/// A reader that reports every byte it passes to a progress.
pub struct Counting<'a, R> {
    pub inner: R,
    pub progress: &'a mut dyn TransferProgress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.bytes(n as u64);
        Ok(n)
    }
}

/// A writer that hashes (SHA-256) and counts what passes through it.
pub struct Hashing<W> {
    pub inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W> Hashing<W> {
    pub fn new(inner: W) -> Hashing<W> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// The digest and byte count so far; resets the hasher.
    pub fn take(&mut self) -> ([u8; 32], u64) {
        let digest = std::mem::take(&mut self.hasher).finalize().into();
        (digest, std::mem::take(&mut self.count))
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

const NIX_BASE32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Nix's base-32 (the digest in `sha256:…` and in store path hashes).
pub fn nix_base32(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    let len = (bytes.len() * 8 - 1) / 5 + 1;
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let low = u32::from(bytes[i]) >> j;
        let high = bytes.get(i + 1).map_or(0, |&c| u32::from(c) << (8 - j));
        out.push(NIX_BASE32[((low | high) & 0x1f) as usize] as char);
    }
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `digest` is the SHA-256 a store reports as `nar_hash`
/// (`sha256:<nix-base32>` or `sha256:<hex>`). Any other form is an error:
/// a hash we cannot check is not a hash we may trust.
pub fn nar_hash_matches(nar_hash: &str, digest: &[u8; 32]) -> Result<bool, Failure> {
    let Some(value) = nar_hash.strip_prefix("sha256:") else {
        return Err(Failure::permanent(format!(
            "cannot check the NAR hash {nar_hash:?}: only sha256 is supported"
        )));
    };
    match value.len() {
        52 => Ok(value == nix_base32(digest)),
        64 => Ok(value.eq_ignore_ascii_case(&hex(digest))),
        _ => Err(Failure::permanent(format!(
            "cannot check the NAR hash {nar_hash:?}: unknown encoding"
        ))),
    }
}

/// The node-side command that speaks the serve protocol:
/// `<nix_bin_dir>/nix-store --serve --write [--store <store>]`.
pub fn remote_serve_argv(remote: &Remote) -> Vec<String> {
    let program = if remote.nix_bin_dir.is_empty() {
        "nix-store".to_string()
    } else {
        format!("{}/nix-store", remote.nix_bin_dir.trim_end_matches('/'))
    };
    let mut argv = vec![program, "--serve".into(), "--write".into()];
    if !remote.store.is_empty() {
        argv.push("--store".into());
        argv.push(remote.store.clone());
    }
    argv
}

/// An exclusive flock(2) on `path` (created if needed), held until dropped.
pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn acquire(path: &Path) -> Result<FileLock, Failure> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .or_fail(Kind::Transient, || {
                format!("opening the lock {}", path.display())
            })?;
        loop {
            // SAFETY: flock on a file descriptor we own.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(FileLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(Failure::transient(format!(
                    "locking {}: {e}",
                    path.display()
                )));
            }
        }
    }
}

/// A file-name-safe rendering of `s` (for lock names made of cluster and node).
pub fn file_name_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
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
    fn base32_matches_nix() {
        // `nix-hash --type sha256 --to-base32` of sha256("").
        let empty: [u8; 32] = Sha256::digest(b"").into();
        assert_eq!(
            nix_base32(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert!(nar_hash_matches(
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            &empty
        )
        .unwrap());
        assert!(nar_hash_matches(&format!("sha256:{}", hex(&empty)), &empty).unwrap());
        let other: [u8; 32] = Sha256::digest(b"x").into();
        assert!(!nar_hash_matches(&format!("sha256:{}", nix_base32(&other)), &empty).unwrap());
        assert!(nar_hash_matches("md5:abc", &empty).is_err());
    }

    #[test]
    fn serve_command_from_config() {
        let mut remote = Remote::default();
        assert_eq!(
            remote_serve_argv(&remote),
            ["nix-store", "--serve", "--write"]
        );
        remote.nix_bin_dir = "/opt/nix/bin/".into();
        remote.store = "local?root=/scratch".into();
        assert_eq!(
            remote_serve_argv(&remote),
            [
                "/opt/nix/bin/nix-store",
                "--serve",
                "--write",
                "--store",
                "local?root=/scratch"
            ]
        );
    }

    #[test]
    fn sizes_and_names() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(file_name_safe("test/node 1"), "test_node_1");
    }
}
