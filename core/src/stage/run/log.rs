//! The build log as it arrives: split into lines up to the job's sentinel
//! (the rest is the response), and written where the caller wants it.

use std::fs::File;
use std::io::{self, Write};

use crate::lines::MAX_LOG_LINE;

/// Where the build log goes: stderr, or a file descriptor the caller gave
/// (`nsh-hook` passes Nix's fd 4).
pub enum LogSink {
    /// This process's stderr.
    Stderr,
    /// A descriptor handed over by number.
    Fd(File),
}

impl LogSink {
    /// Writes one line (`line` without its newline), decoded lossily: what
    /// a builder prints need not be UTF-8, what Nix shows is text. A log
    /// sink that went away (the reader closed it) does not stop the build:
    /// the result still matters.
    pub(super) fn line(&mut self, line: &[u8]) {
        let mut buf = String::from_utf8_lossy(line).into_owned().into_bytes();
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

/// The most bytes of response kept: a BuildResult is a status, Nix's error
/// message (itself bounded by the wire limits on reading) and the outputs.
pub const MAX_RESPONSE: usize = 16 << 20;

/// Splits the follower's stream into log lines, up to the sentinel line
/// carrying the job's nonce; what comes after it is the response.
///
/// A builder whose last output has no final newline leaves the sentinel at
/// the end of that line (`partial@nsh-end <nonce> 0`): the part before it is
/// still a line of log. A sentinel with another nonce is builder output and
/// forwarded like any line.
///
/// Bounded: a line longer than [`MAX_LOG_LINE`] is shown cut there (marked
/// as cut), and of its rest only a tail long enough to hold the sentinel is
/// kept; a response longer than [`MAX_RESPONSE`] is not kept
/// ([`LogSplitter::response_overflowed`]).
#[derive(Debug)]
pub struct LogSplitter {
    marker: Vec<u8>,
    partial: Vec<u8>,
    /// Whether the line in `partial` was shown cut already (`partial` is
    /// then only its tail).
    cut: bool,
    /// Bytes of log consumed, sentinel included: where a reconnected
    /// follower resumes.
    log_bytes: u64,
    end: Option<i32>,
    response: Vec<u8>,
    response_overflowed: bool,
}

impl LogSplitter {
    pub fn new(nonce: &str) -> LogSplitter {
        LogSplitter {
            marker: format!("@nsh-end {nonce} ").into_bytes(),
            partial: Vec::new(),
            cut: false,
            log_bytes: 0,
            end: None,
            response: Vec::new(),
            response_overflowed: false,
        }
    }

    /// Feeds bytes; returns the complete lines and the end, in order.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<LogEvent> {
        let mut events = Vec::new();
        while !bytes.is_empty() {
            if self.end.is_some() {
                self.keep_response(bytes);
                break;
            }
            let Some(newline) = bytes.iter().position(|&b| b == b'\n') else {
                self.grow(bytes, &mut events);
                self.log_bytes += bytes.len() as u64;
                break;
            };
            self.grow(&bytes[..newline], &mut events);
            self.log_bytes += newline as u64 + 1;
            bytes = &bytes[newline + 1..];
            let line = std::mem::take(&mut self.partial);
            let shown = std::mem::take(&mut self.cut);
            match self.sentinel(&line) {
                Some((before, status)) => {
                    if !before.is_empty() && !shown {
                        events.push(LogEvent::Line(before.to_vec()));
                    }
                    self.end = Some(status);
                    events.push(LogEvent::End(status));
                }
                None if shown => {}
                None => events.push(LogEvent::Line(line)),
            }
        }
        events
    }

    /// Adds `bytes` to the line being read, within [`MAX_LOG_LINE`]: past
    /// it, the line's start is shown (marked as cut) and only a tail that
    /// could hold the sentinel is kept.
    fn grow(&mut self, bytes: &[u8], events: &mut Vec<LogEvent>) {
        self.partial.extend_from_slice(bytes);
        if self.partial.len() <= MAX_LOG_LINE && !self.cut {
            return;
        }
        if !self.cut {
            let mut shown = self.partial[..MAX_LOG_LINE].to_vec();
            shown.extend_from_slice(crate::lines::cut_mark(MAX_LOG_LINE).as_bytes());
            events.push(LogEvent::Line(shown));
            self.cut = true;
        }
        // The sentinel's status is an i32: at most 11 characters.
        let tail = self.marker.len() + 11;
        let drop = self.partial.len().saturating_sub(tail);
        self.partial.drain(..drop);
    }

    fn keep_response(&mut self, bytes: &[u8]) {
        if self.response.len() + bytes.len() > MAX_RESPONSE {
            self.response_overflowed = true;
            return;
        }
        self.response.extend_from_slice(bytes);
    }

    /// Whether the response was longer than [`MAX_RESPONSE`] (and dropped).
    pub fn response_overflowed(&self) -> bool {
        self.response_overflowed
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

    /// An unterminated last line (only when the stream broke off), unless
    /// its start was shown already (cut).
    pub fn take_partial(&mut self) -> Option<Vec<u8>> {
        let partial = std::mem::take(&mut self.partial);
        let shown = std::mem::take(&mut self.cut);
        (!partial.is_empty() && !shown).then_some(partial)
    }

    /// Drops a response received in part, before a reconnect resends it.
    pub(super) fn reset_response(&mut self) {
        self.response.clear();
        self.response_overflowed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONCE: &str = "0123abcd";

    #[test]
    fn an_endless_line_is_shown_cut_and_costs_only_its_tail() {
        let mut s = LogSplitter::new(NONCE);
        let chunk = vec![b'x'; 10_000];
        let mut events = Vec::new();
        for _ in 0..1000 {
            events.extend(s.push(&chunk));
            assert!(s.partial.len() <= MAX_LOG_LINE + chunk.len());
        }
        // 10 MB without a newline: one line shown, cut and marked.
        assert_eq!(events.len(), 1);
        let LogEvent::Line(shown) = &events[0] else {
            panic!("{events:?}")
        };
        assert!(shown[..MAX_LOG_LINE].iter().all(|&b| b == b'x'));
        assert!(shown.ends_with(b" [nsh: line cut after 65536 bytes]"));
        assert!(s.partial.len() < 64, "{}", s.partial.len());
        // The sentinel at the end of that line still ends the log; the
        // rest of the line is not shown again.
        let events = s.push(b"xx@nsh-end 0123abcd 0\nRESPONSE");
        assert_eq!(events, [LogEvent::End(0)]);
        assert_eq!(s.response(), b"RESPONSE");
        assert_eq!(s.log_bytes(), 10_000_000 + 22);
        // A cut line the stream broke off in is not shown twice.
        let mut s = LogSplitter::new(NONCE);
        s.push(&vec![b'y'; MAX_LOG_LINE + 10]);
        assert_eq!(s.take_partial(), None);
    }

    #[test]
    fn a_long_line_then_short_ones() {
        let mut s = LogSplitter::new(NONCE);
        let mut input = vec![b'a'; MAX_LOG_LINE * 2];
        input.extend_from_slice(b"\nnext\n");
        let events = s.push(&input);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1], LogEvent::Line(b"next".to_vec()));
    }

    #[test]
    fn a_response_over_the_bound_is_dropped_and_said() {
        let mut s = LogSplitter::new(NONCE);
        s.push(b"@nsh-end 0123abcd 0\n");
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..=(MAX_RESPONSE >> 20) {
            s.push(&chunk);
        }
        assert!(s.response_overflowed());
        assert!(s.response().len() <= MAX_RESPONSE);
        s.reset_response();
        assert!(!s.response_overflowed());
    }
}
