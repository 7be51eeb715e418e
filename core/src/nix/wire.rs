//! The Nix wire framing shared by the build-hook and the serve protocols.
//!
//! * `u64`: 8 bytes, little-endian;
//! * string: a `u64` length, the bytes, then zero padding to a multiple of 8;
//! * string list: a `u64` count, then each string.
//!
//! Reading is bounded: the peer decides the length fields, so a length larger
//! than the configured [`Limits`] is an error, never an allocation of that
//! size, and memory grows only with the bytes that actually arrive. Every
//! item is bounded, and so is one message as a whole (a million strings of
//! 64 MiB each would pass the per-item limits): the strings and list entries
//! read since [`WireReader::start_message`] count against
//! [`Limits::max_message`]. Padding that is not zero is an error too (it
//! means the stream is out of step).

use std::fmt;
use std::io::{self, Read, Write};

use crate::error::{Failure, Kind, KindOf};

/// Upper bounds for length fields read from a peer.
// Each field is a maximum and says so; the prefix is the point.
#[allow(clippy::struct_field_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest string accepted, in bytes.
    pub max_string: u64,
    /// The most entries accepted in a list (or a map).
    pub max_list: u64,
    /// The most bytes one message may make the reader hold, all its strings
    /// and list entries together ([`WireReader::start_message`]).
    pub max_message: u64,
}

impl Limits {
    /// 64 MiB strings, a million entries per list, 128 MiB per message: far
    /// above anything Nix sends in practice (the largest strings are
    /// `__json` attributes and build error messages, the largest lists a
    /// closure's paths), far below what would hurt the machine.
    pub const DEFAULT: Limits = Limits {
        max_string: 64 << 20,
        max_list: 1 << 20,
        max_message: 128 << 20,
    };
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum WireError {
    /// The stream ended in the middle of a frame.
    Eof,
    /// Reading failed.
    Io(io::Error),
    /// A length field exceeded its limit.
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// Padding after a string was not zero.
    BadPadding,
    /// A string that must be text was not UTF-8.
    NotUtf8,
    /// A value the protocol does not allow here (a bad magic number, an
    /// unknown tag).
    Unexpected(String),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Eof => f.write_str("the stream ended in the middle of a message"),
            WireError::Io(e) => write!(f, "{e}"),
            WireError::TooLong { what, len, max } => {
                write!(f, "{what} of length {len} exceeds the limit of {max}")
            }
            WireError::BadPadding => f.write_str("non-zero padding after a string"),
            WireError::NotUtf8 => f.write_str("a string is not valid UTF-8"),
            WireError::Unexpected(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for WireError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WireError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// A broken or closed stream is transient (the peer or the link went away);
/// malformed data means the peer does not speak the protocol we expect,
/// which retrying will not fix.
impl KindOf for WireError {
    fn kind(&self) -> Kind {
        match self {
            WireError::Eof | WireError::Io(_) => Kind::Transient,
            _ => Kind::Permanent,
        }
    }
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> WireError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Eof
        } else {
            WireError::Io(e)
        }
    }
}

impl WireError {
    /// A [`Failure`] saying what was being read, of this error's kind
    /// ([`KindOf`]), with this error as its source.
    pub fn fail(self, context: impl fmt::Display) -> Failure {
        Failure::caused_by(self.kind(), format!("{context}: {self}"), self)
    }
}

/// Reads frames from `R`, bounded by [`Limits`].
#[derive(Debug)]
pub struct WireReader<R> {
    inner: R,
    limits: Limits,
    /// What the current message made the reader hold so far.
    held: u64,
}

/// What a list entry costs beyond its bytes (a `String` or `Vec` header),
/// counted against [`Limits::max_message`] so that a list of a million
/// empty strings is not free.
const ENTRY_COST: u64 = 24;

impl<R: Read> WireReader<R> {
    pub fn new(inner: R) -> WireReader<R> {
        WireReader::with_limits(inner, Limits::DEFAULT)
    }

    pub fn with_limits(inner: R, limits: Limits) -> WireReader<R> {
        WireReader {
            inner,
            limits,
            held: 0,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A new message starts: what the previous ones held no longer counts
    /// against [`Limits::max_message`].
    pub fn start_message(&mut self) {
        self.held = 0;
    }

    /// Counts `cost` bytes against the current message's limit.
    fn hold(&mut self, cost: u64) -> Result<(), WireError> {
        let held = self.held.saturating_add(cost);
        if held > self.limits.max_message {
            return Err(WireError::TooLong {
                what: "message",
                len: held,
                max: self.limits.max_message,
            });
        }
        self.held = held;
        Ok(())
    }

    /// The underlying reader, for payloads that are not framed (a NAR is
    /// copied with the reader itself).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    #[cfg(test)]
    pub fn into_inner(self) -> R {
        self.inner
    }

    pub fn u64(&mut self) -> Result<u64, WireError> {
        let mut buf = [0u8; 8];
        self.inner.read_exact(&mut buf)?;
        Ok(u64::from_le_bytes(buf))
    }

    /// A `u64` that must be 0 or 1.
    pub fn bool(&mut self) -> Result<bool, WireError> {
        match self.u64()? {
            0 => Ok(false),
            1 => Ok(true),
            n => Err(WireError::Unexpected(format!(
                "expected a boolean (0 or 1), got {n}"
            ))),
        }
    }

    /// A string as bytes.
    pub fn bytes(&mut self) -> Result<Vec<u8>, WireError> {
        let len = self.u64()?;
        self.check_len("string", len, self.limits.max_string)?;
        self.hold(len)?;
        let mut out = Vec::new();
        // `take` + `read_to_end` grows the buffer as data arrives, so a
        // truncated stream never costs more than what it carried.
        let got = (&mut self.inner).take(len).read_to_end(&mut out)?;
        if (got as u64) < len {
            return Err(WireError::Eof);
        }
        self.padding(len)?;
        Ok(out)
    }

    /// A string that must be UTF-8 (store paths, names, Nix messages).
    pub fn string(&mut self) -> Result<String, WireError> {
        String::from_utf8(self.bytes()?).map_err(|_| WireError::NotUtf8)
    }

    /// A list of strings.
    pub fn strings(&mut self) -> Result<Vec<String>, WireError> {
        let count = self.list_len()?;
        let mut out = Vec::with_capacity(count.min(1024) as usize);
        for _ in 0..count {
            out.push(self.string()?);
        }
        Ok(out)
    }

    /// A count of list or map entries, checked against the limit; the caller
    /// reads the entries.
    pub fn list_len(&mut self) -> Result<u64, WireError> {
        let count = self.u64()?;
        self.check_len("list", count, self.limits.max_list)?;
        self.hold(count.saturating_mul(ENTRY_COST))?;
        Ok(count)
    }

    /// Skips the zero padding that follows `len` bytes of payload.
    pub fn padding(&mut self, len: u64) -> Result<(), WireError> {
        let pad = padding_len(len);
        if pad > 0 {
            let mut buf = [0u8; 8];
            self.inner.read_exact(&mut buf[..pad])?;
            if buf[..pad].iter().any(|&b| b != 0) {
                return Err(WireError::BadPadding);
            }
        }
        Ok(())
    }

    fn check_len(&self, what: &'static str, len: u64, max: u64) -> Result<(), WireError> {
        if len > max {
            Err(WireError::TooLong { what, len, max })
        } else {
            Ok(())
        }
    }
}

/// How many zero bytes follow `len` bytes of payload.
pub fn padding_len(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// Writes frames to `W`. Writes go straight through: wrap `W` in a
/// `BufWriter` and flush at message boundaries.
#[derive(Debug)]
pub struct WireWriter<W> {
    inner: W,
}

impl<W: Write> WireWriter<W> {
    pub fn new(inner: W) -> WireWriter<W> {
        WireWriter { inner }
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn u64(&mut self, value: u64) -> io::Result<()> {
        self.inner.write_all(&value.to_le_bytes())
    }

    pub fn bool(&mut self, value: bool) -> io::Result<()> {
        self.u64(u64::from(value))
    }

    pub fn bytes(&mut self, value: &[u8]) -> io::Result<()> {
        self.u64(value.len() as u64)?;
        self.inner.write_all(value)?;
        self.padding(value.len() as u64)
    }

    pub fn string(&mut self, value: &str) -> io::Result<()> {
        self.bytes(value.as_bytes())
    }

    pub fn strings<I, S>(&mut self, values: I) -> io::Result<()>
    where
        I: IntoIterator<Item = S>,
        I::IntoIter: ExactSizeIterator,
        S: AsRef<[u8]>,
    {
        let values = values.into_iter();
        self.u64(values.len() as u64)?;
        for value in values {
            self.bytes(value.as_ref())?;
        }
        Ok(())
    }

    /// The zero padding that follows `len` bytes of payload written directly
    /// to the inner writer.
    pub fn padding(&mut self, len: u64) -> io::Result<()> {
        self.inner.write_all(&[0u8; 8][..padding_len(len)])
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Wire bytes spelled out, for byte-exact transcripts in tests.
#[cfg(test)]
pub(crate) mod test_bytes {
    use super::WireWriter;

    /// A u64 as it goes on the wire.
    pub fn le(n: u64) -> Vec<u8> {
        n.to_le_bytes().to_vec()
    }

    /// A string as it goes on the wire: length, bytes, padding.
    pub fn s(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        WireWriter::new(&mut out).string(text).unwrap();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reader(bytes: &[u8]) -> WireReader<&[u8]> {
        WireReader::new(bytes)
    }

    #[test]
    fn byte_exact_frames() {
        let mut out = Vec::new();
        let mut w = WireWriter::new(&mut out);
        w.u64(0x0102).unwrap();
        w.string("abc").unwrap();
        w.strings(["", "12345678"]).unwrap();
        assert_eq!(
            out,
            [
                &[2, 1, 0, 0, 0, 0, 0, 0][..],
                &[3, 0, 0, 0, 0, 0, 0, 0],
                b"abc\0\0\0\0\0",
                &[2, 0, 0, 0, 0, 0, 0, 0],
                &[0; 8],
                &[8, 0, 0, 0, 0, 0, 0, 0],
                b"12345678",
            ]
            .concat()
        );
    }

    #[test]
    fn a_length_above_the_limit_is_refused_before_reading() {
        let mut bytes = (u64::MAX).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"short");
        match reader(&bytes).bytes() {
            Err(WireError::TooLong { what, len, .. }) => {
                assert_eq!((what, len), ("string", u64::MAX));
            }
            other => panic!("{other:?}"),
        }
        let limits = Limits {
            max_string: 4,
            max_list: 2,
            max_message: 1 << 20,
        };
        let mut w = Vec::new();
        WireWriter::new(&mut w).strings(["a", "b", "c"]).unwrap();
        let err = WireReader::with_limits(&w[..], limits)
            .strings()
            .unwrap_err();
        assert_eq!(err.to_string(), "list of length 3 exceeds the limit of 2");
    }

    #[test]
    fn a_message_is_bounded_as_a_whole_not_only_per_item() {
        let limits = Limits {
            max_string: 8,
            max_list: 100,
            max_message: 64,
        };
        let mut bytes = Vec::new();
        let items = ["12345678"; 4];
        WireWriter::new(&mut bytes).strings(items).unwrap();
        WireWriter::new(&mut bytes).strings(items).unwrap();
        let mut r = WireReader::with_limits(&bytes[..], limits);
        // 4 entries (4 × 24) alone are over 64 bytes.
        let err = r.strings().unwrap_err();
        assert_eq!(
            err.to_string(),
            "message of length 96 exceeds the limit of 64"
        );
        let limits = Limits {
            max_message: 4 * (24 + 8),
            ..limits
        };
        let mut r = WireReader::with_limits(&bytes[..], limits);
        assert_eq!(r.strings().unwrap().len(), 4);
        // The second list is over the budget of the same message…
        assert!(matches!(
            r.strings(),
            Err(WireError::TooLong {
                what: "message",
                ..
            })
        ));
        // …and within that of a new one.
        let mut r = WireReader::with_limits(&bytes[..], limits);
        r.strings().unwrap();
        r.start_message();
        assert_eq!(r.strings().unwrap().len(), 4);
    }

    #[test]
    fn non_zero_padding_is_an_error() {
        let bytes = [&[1, 0, 0, 0, 0, 0, 0, 0][..], b"a\0\0\0\0\0\0\x01"].concat();
        assert!(matches!(reader(&bytes).bytes(), Err(WireError::BadPadding)));
    }

    #[test]
    fn truncation_is_eof() {
        let bytes = [&[9, 0, 0, 0, 0, 0, 0, 0][..], b"abc"].concat();
        assert!(matches!(reader(&bytes).bytes(), Err(WireError::Eof)));
        assert!(matches!(reader(&[1, 2]).u64(), Err(WireError::Eof)));
        // The payload is complete but its padding is missing.
        let bytes = [&[1, 0, 0, 0, 0, 0, 0, 0][..], b"a\0"].concat();
        assert!(matches!(reader(&bytes).bytes(), Err(WireError::Eof)));
    }

    #[test]
    fn failures_are_transient_for_io_and_permanent_for_garbage() {
        assert_eq!(WireError::Eof.fail("x").kind, Kind::Transient);
        assert_eq!(WireError::BadPadding.fail("x").kind, Kind::Permanent);
        assert_eq!(
            WireError::NotUtf8.fail("reading a path").message,
            "reading a path: a string is not valid UTF-8"
        );
    }

    proptest! {
        #[test]
        fn frames_round_trip(
            n in any::<u64>(),
            s in proptest::collection::vec(any::<u8>(), 0..100),
            list in proptest::collection::vec("[ -~]{0,20}", 0..10),
        ) {
            let mut out = Vec::new();
            let mut w = WireWriter::new(&mut out);
            w.u64(n).unwrap();
            w.bytes(&s).unwrap();
            w.strings(&list).unwrap();
            prop_assert_eq!(out.len() % 8, 0);
            let mut r = reader(&out);
            prop_assert_eq!(r.u64().unwrap(), n);
            prop_assert_eq!(r.bytes().unwrap(), s);
            prop_assert_eq!(r.strings().unwrap(), list);
            prop_assert!(r.u64().is_err());
        }

        /// Whatever the bytes, reading returns (no panic), and memory stays
        /// proportional to the input, whatever the length fields claim: the
        /// default limits allow 64 MiB strings and a million entries, yet a
        /// few hundred input bytes can only ever produce a few hundred bytes.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut r = reader(&bytes);
            while let Ok(list) = r.strings() {
                let total: usize = list.iter().map(std::string::String::len).sum();
                prop_assert!(total <= bytes.len());
            }
            let mut r = reader(&bytes);
            while let Ok(s) = r.bytes() {
                prop_assert!(s.len() <= bytes.len());
            }
        }

        /// Length fields that claim more than the input holds, with the
        /// largest limits, still end in an error at once.
        #[test]
        fn huge_claims_are_cheap(len in any::<u64>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let limits = Limits { max_string: u64::MAX, max_list: u64::MAX, max_message: u64::MAX };
            let bytes = [&len.to_le_bytes()[..], &tail].concat();
            let result = WireReader::with_limits(&bytes[..], limits).bytes();
            if len > tail.len() as u64 {
                prop_assert!(result.is_err());
            }
            let result = WireReader::with_limits(&bytes[..], limits).strings();
            if len > 8 {
                prop_assert!(result.is_err());
            }
        }
    }
}
