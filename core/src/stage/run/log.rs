//! The build log as it arrives: split into lines up to the job's sentinel
//! (the rest is the response), and written where the caller wants it.

use std::fs::File;
use std::io::{self, Write};

/// Where the build log goes: stderr, or a file descriptor the caller gave
/// (`nsh-hook` passes Nix's fd 4).
pub enum LogSink {
    /// This process's stderr.
    Stderr,
    /// A descriptor handed over by number.
    Fd(File),
}

impl LogSink {
    /// Writes one line (`line` without its newline). A log sink that went
    /// away (the reader closed it) does not stop the build: the result
    /// still matters.
    pub(super) fn line(&mut self, line: &[u8]) {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line);
        buf.push(b'\n');
        let _ = match self {
            LogSink::Stderr => io::stderr().lock().write_all(&buf),
            LogSink::Fd(file) => file.write_all(&buf),
        };
    }

    pub(super) fn text(&mut self, text: &str) {
        for line in text.lines() {
            self.line(line.as_bytes());
        }
    }
}

/// What [`LogSplitter::push`] found in a chunk of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// One complete log line, without its newline.
    Line(Vec<u8>),
    /// The job's sentinel: `nix-store --serve` exited with this status.
    End(i32),
}

/// Splits the follower's stream into log lines, up to the sentinel line
/// carrying the job's nonce; what comes after it is the response.
///
/// A builder whose last output has no final newline leaves the sentinel at
/// the end of that line (`partial@nsh-end <nonce> 0`): the part before it is
/// still a line of log. A sentinel with another nonce is builder output and
/// forwarded like any line.
#[derive(Debug)]
pub struct LogSplitter {
    marker: Vec<u8>,
    partial: Vec<u8>,
    /// Bytes of log consumed, sentinel included: where a reconnected
    /// follower resumes.
    log_bytes: u64,
    end: Option<i32>,
    response: Vec<u8>,
}

impl LogSplitter {
    pub fn new(nonce: &str) -> LogSplitter {
        LogSplitter {
            marker: format!("@nsh-end {nonce} ").into_bytes(),
            partial: Vec::new(),
            log_bytes: 0,
            end: None,
            response: Vec::new(),
        }
    }

    /// Feeds bytes; returns the complete lines and the end, in order.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<LogEvent> {
        let mut events = Vec::new();
        while !bytes.is_empty() {
            if self.end.is_some() {
                self.response.extend_from_slice(bytes);
                break;
            }
            let Some(newline) = bytes.iter().position(|&b| b == b'\n') else {
                self.partial.extend_from_slice(bytes);
                self.log_bytes += bytes.len() as u64;
                break;
            };
            self.partial.extend_from_slice(&bytes[..newline]);
            self.log_bytes += newline as u64 + 1;
            bytes = &bytes[newline + 1..];
            let line = std::mem::take(&mut self.partial);
            match self.sentinel(&line) {
                Some((before, status)) => {
                    if !before.is_empty() {
                        events.push(LogEvent::Line(before.to_vec()));
                    }
                    self.end = Some(status);
                    events.push(LogEvent::End(status));
                }
                None => events.push(LogEvent::Line(line)),
            }
        }
        events
    }

    /// `Some((text before the sentinel, status))` if `line` ends with the
    /// sentinel.
    fn sentinel<'a>(&self, line: &'a [u8]) -> Option<(&'a [u8], i32)> {
        let at = line
            .windows(self.marker.len())
            .rposition(|w| w == self.marker.as_slice())?;
        let status = std::str::from_utf8(&line[at + self.marker.len()..])
            .ok()?
            .parse()
            .ok()?;
        Some((&line[..at], status))
    }

    /// The end status, once the sentinel was seen.
    pub fn end(&self) -> Option<i32> {
        self.end
    }

    pub fn log_bytes(&self) -> u64 {
        self.log_bytes
    }

    /// The bytes after the sentinel: the response file.
    pub fn response(&self) -> &[u8] {
        &self.response
    }

    /// An unterminated last line (only when the stream broke off).
    pub fn take_partial(&mut self) -> Option<Vec<u8>> {
        (!self.partial.is_empty()).then(|| std::mem::take(&mut self.partial))
    }

    /// Drops a response received in part, before a reconnect resends it.
    pub(super) fn reset_response(&mut self) {
        self.response.clear();
    }
}
