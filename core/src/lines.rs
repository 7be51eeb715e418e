//! Lines read with a bound: a line longer than the bound is cut there and
//! the rest of it skipped, so that a peer that never sends a newline (a
//! node's `nix-store`, a stage's stderr) cannot make a reader hold more than
//! one bounded line. Bytes are kept as they came; callers that show them
//! decode them lossily ([`Line::lossy`]), so a line that is not UTF-8 is
//! shown with replacement characters instead of ending the reading.

use std::io::{self, BufRead};

/// The longest log line kept whole (a build log line, a stage's stderr
/// line); longer ones are cut and marked ([`Line::lossy`]).
pub const MAX_LOG_LINE: usize = 64 * 1024;

/// The longest ticket line read (a ticket with a closure of a hundred
/// thousand paths is about 10 MiB).
pub const MAX_TICKET_LINE: usize = 64 << 20;

/// One line, without its newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The line's bytes, at most the reader's bound.
    pub bytes: Vec<u8>,
    /// Whether the line was longer than the bound (its rest was skipped).
    pub cut: bool,
}

impl Line {
    /// The line as text: invalid UTF-8 replaced, and a cut line marked as
    /// such at its end.
    pub fn lossy(&self) -> String {
        let mut text = String::from_utf8_lossy(&self.bytes).into_owned();
        if self.cut {
            text.push_str(&cut_mark(self.bytes.len()));
        }
        text
    }
}

/// What ends a line that was cut after `kept` bytes.
pub fn cut_mark(kept: usize) -> String {
    format!(" [nsh: line cut after {kept} bytes]")
}

/// Reads lines of at most `max` bytes from a buffered reader.
pub struct BoundedLines<R> {
    reader: R,
    max: usize,
}

impl<R: BufRead> BoundedLines<R> {
    pub fn new(reader: R, max: usize) -> BoundedLines<R> {
        BoundedLines { reader, max }
    }

    /// The next line (a last line without a newline counts), `None` at the
    /// end of the stream.
    ///
    /// # Errors
    /// Reading failed (`Interrupted` is retried).
    pub fn next_line(&mut self) -> io::Result<Option<Line>> {
        let mut line = Line {
            bytes: Vec::new(),
            cut: false,
        };
        let mut any = false;
        loop {
            let buf = match self.reader.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                return Ok(any.then_some(line));
            }
            any = true;
            let (part, used, ended) = match buf.iter().position(|&b| b == b'\n') {
                Some(at) => (&buf[..at], at + 1, true),
                None => (buf, buf.len(), false),
            };
            let room = self.max - line.bytes.len();
            if part.len() > room {
                line.cut = true;
            }
            line.bytes.extend_from_slice(&part[..part.len().min(room)]);
            self.reader.consume(used);
            if ended {
                return Ok(Some(line));
            }
        }
    }
}

impl<R: BufRead> Iterator for BoundedLines<R> {
    type Item = io::Result<Line>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_line().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8], max: usize) -> Vec<Line> {
        BoundedLines::new(input, max)
            .collect::<io::Result<_>>()
            .unwrap()
    }

    #[test]
    fn lines_are_cut_at_the_bound_and_the_rest_skipped() {
        let lines = all(b"short\n0123456789abc\nlast", 8);
        let texts: Vec<String> = lines.iter().map(Line::lossy).collect();
        assert_eq!(
            texts,
            ["short", "01234567 [nsh: line cut after 8 bytes]", "last"]
        );
        assert!(all(b"", 8).is_empty());
        assert_eq!(all(b"\n", 8)[0].bytes, b"");
    }

    #[test]
    fn bytes_that_are_not_utf8_are_replaced_not_fatal() {
        let lines = all(b"ok \xff\xfe\nnext\n", 64);
        assert_eq!(lines[0].lossy(), "ok \u{fffd}\u{fffd}");
        assert_eq!(lines[1].lossy(), "next");
    }

    #[test]
    fn an_endless_line_costs_only_the_bound() {
        // A reader that never ends a line: 1 GiB of 'x' in 64 KiB reads.
        struct Endless(u64);
        impl io::Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Ok(0);
                }
                let n = buf.len().min(usize::try_from(self.0).unwrap_or(usize::MAX));
                buf[..n].fill(b'x');
                self.0 -= n as u64;
                Ok(n)
            }
        }
        let reader = io::BufReader::with_capacity(1 << 16, Endless(1 << 30));
        let line = BoundedLines::new(reader, 1024)
            .next_line()
            .unwrap()
            .unwrap();
        assert_eq!(line.bytes.len(), 1024);
        assert!(line.cut);
        assert!(line.bytes.capacity() < 1 << 16);
    }
}
