//! The one NAR parser: reads the grammar token by token, checks names, order
//! and bounds, and hands each part to a [`Visitor`] (a relay, an unpacker).
//! Every byte it reads may be copied on to a writer as it passes (a tee), so
//! that a relay sends exactly what it received.

use std::fmt;
use std::io::{self, Read, Write};

use super::NAR_MAGIC;
use crate::error::{Kind, KindOf};
use crate::nix::wire::{Limits, WireError, WireReader};

/// The longest token, file name or symlink target accepted (Linux allows
/// 4096-byte paths).
const MAX_TOKEN: u64 = 4096;
/// The deepest directory nesting accepted.
const MAX_DEPTH: usize = 256;

/// Why a NAR could not be copied or unpacked, and on which side.
#[derive(Debug)]
pub enum NarError {
    /// Reading: the stream broke off or failed, or is not a valid NAR.
    Read(WireError),
    /// Writing what was read to the copy's destination failed.
    Write(io::Error),
    /// Making the unpacked tree failed: what was being done, where.
    Unpack {
        /// `creating`, `writing`, `chmod`, …
        what: &'static str,
        /// The file system object.
        path: std::path::PathBuf,
        /// The system's error.
        source: io::Error,
    },
}

impl fmt::Display for NarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NarError::Read(e) => e.fmt(f),
            NarError::Write(e) => e.fmt(f),
            NarError::Unpack { what, path, source } => {
                write!(f, "{what} {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for NarError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NarError::Read(e) => Some(e),
            NarError::Write(e) | NarError::Unpack { source: e, .. } => Some(e),
        }
    }
}

/// A stream that broke, a destination that went away and a file system
/// that failed may all work next time; a NAR that is not valid will not.
impl KindOf for NarError {
    fn kind(&self) -> Kind {
        match self {
            NarError::Read(e) => e.kind(),
            NarError::Write(_) | NarError::Unpack { .. } => Kind::Transient,
        }
    }
}

impl From<WireError> for NarError {
    fn from(e: WireError) -> NarError {
        NarError::Read(e)
    }
}

/// For the protocols that carry NARs inside their own framing: the side is
/// told apart by the caller.
impl From<NarError> for WireError {
    fn from(e: NarError) -> WireError {
        match e {
            NarError::Read(e) => e,
            NarError::Write(e) => WireError::Io(e),
            unpack @ NarError::Unpack { .. } => {
                let kind = match &unpack {
                    NarError::Unpack { source, .. } => source.kind(),
                    _ => io::ErrorKind::Other,
                };
                WireError::Io(io::Error::new(kind, unpack.to_string()))
            }
        }
    }
}

/// What a NAR's parts are handed to, in the order they come.
pub(super) trait Visitor {
    /// A regular file; `contents` must be read to its end (or drained).
    fn regular(&mut self, executable: bool, contents: &mut Contents<'_>) -> Result<(), NarError>;
    /// A symlink.
    fn symlink(&mut self, target: &[u8]) -> Result<(), NarError>;
    /// A directory starts; its entries follow.
    fn directory(&mut self) -> Result<(), NarError>;
    /// The next node is the entry `name` of the current directory.
    fn enter(&mut self, name: &[u8]);
    /// That entry's node is done.
    fn leave(&mut self);
    /// The current directory has no more entries.
    fn directory_done(&mut self) -> Result<(), NarError>;
}

/// The NAR's source: counts what it reads and copies it to the tee, keeping
/// a failed write apart from a failed read.
struct Source<'a, 't, R: ?Sized> {
    from: &'a mut R,
    tee: Option<&'t mut dyn Write>,
    count: u64,
    write_error: Option<io::Error>,
}

impl<R: Read + ?Sized> Read for Source<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.from.read(buf)?;
        if let Some(tee) = &mut self.tee {
            if let Err(e) = tee.write_all(&buf[..n]) {
                let reported = io::Error::new(e.kind(), e.to_string());
                self.write_error = Some(e);
                return Err(reported);
            }
        }
        self.count += n as u64;
        Ok(n)
    }
}

/// A regular file's contents, read from the NAR as the visitor asks.
pub(super) struct Contents<'r> {
    reader: &'r mut dyn Read,
    left: u64,
}

impl Contents<'_> {
    /// Reads the next part of the contents (0 at their end).
    pub(super) fn read_chunk(&mut self, buf: &mut [u8]) -> Result<usize, NarError> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = usize::try_from(self.left).map_or(buf.len(), |left| left.min(buf.len()));
        let n = loop {
            match self.reader.read(&mut buf[..want]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other.map_err(|e| NarError::Read(WireError::from(e)))?,
            }
        };
        if n == 0 {
            return Err(NarError::Read(WireError::Eof));
        }
        self.left -= n as u64;
        Ok(n)
    }

    /// Reads the rest of the contents and drops it.
    pub(super) fn drain(&mut self) -> Result<(), NarError> {
        let mut buf = vec![0u8; 64 * 1024];
        while self.read_chunk(&mut buf)? > 0 {}
        Ok(())
    }
}

/// Reads one NAR from `from` (copying every byte to `tee`, if given) and
/// hands its parts to `visitor`; returns its size.
pub(super) fn read<R: Read + ?Sized>(
    from: &mut R,
    tee: Option<&mut dyn Write>,
    visitor: &mut dyn Visitor,
) -> Result<u64, NarError> {
    let mut source = Source {
        from,
        tee,
        count: 0,
        write_error: None,
    };
    let limits = Limits {
        max_string: MAX_TOKEN,
        max_list: 0,
    };
    let parsed = {
        let mut parser = Parser {
            r: WireReader::with_limits(&mut source, limits),
            visitor,
        };
        parser.expect(NAR_MAGIC).and_then(|()| parser.node(0))
    };
    match (parsed, source.write_error) {
        (Err(_), Some(e)) => Err(NarError::Write(e)),
        (Err(e), None) => Err(e),
        (Ok(()), _) => Ok(source.count),
    }
}

struct Parser<'v, R> {
    r: WireReader<R>,
    visitor: &'v mut dyn Visitor,
}

impl<R: Read> Parser<'_, R> {
    fn node(&mut self, depth: usize) -> Result<(), NarError> {
        if depth > MAX_DEPTH {
            return Err(invalid(format!(
                "NAR nests deeper than {MAX_DEPTH} directories"
            )));
        }
        self.expect("(")?;
        self.expect("type")?;
        match self.token()?.as_slice() {
            b"regular" => self.regular()?,
            b"symlink" => {
                self.expect("target")?;
                let target = self.token()?;
                self.visitor.symlink(&target)?;
            }
            b"directory" => return self.directory(depth),
            other => return Err(unexpected("regular, symlink or directory", other)),
        }
        self.expect(")")
    }

    fn regular(&mut self) -> Result<(), NarError> {
        let mut tag = self.token()?;
        let executable = tag == b"executable";
        if executable {
            self.expect("")?;
            tag = self.token()?;
        }
        if tag != b"contents" {
            return Err(unexpected("contents", &tag));
        }
        let len = self.r.u64()?;
        let mut contents = Contents {
            reader: self.r.get_mut(),
            left: len,
        };
        self.visitor.regular(executable, &mut contents)?;
        if contents.left > 0 {
            contents.drain()?;
        }
        self.r.padding(len)?;
        Ok(())
    }

    /// The entries and the closing `)` of a directory.
    fn directory(&mut self, depth: usize) -> Result<(), NarError> {
        self.visitor.directory()?;
        let mut previous: Option<Vec<u8>> = None;
        loop {
            match self.token()?.as_slice() {
                b")" => return self.visitor.directory_done(),
                b"entry" => {
                    self.expect("(")?;
                    self.expect("name")?;
                    let name = self.token()?;
                    check_name(&name, previous.as_deref())?;
                    self.expect("node")?;
                    self.visitor.enter(&name);
                    self.node(depth + 1)?;
                    self.visitor.leave();
                    self.expect(")")?;
                    previous = Some(name);
                }
                other => return Err(unexpected("entry or )", other)),
            }
        }
    }

    fn token(&mut self) -> Result<Vec<u8>, NarError> {
        Ok(self.r.bytes()?)
    }

    fn expect(&mut self, want: &str) -> Result<(), NarError> {
        let got = self.token()?;
        if got == want.as_bytes() {
            Ok(())
        } else {
            Err(unexpected(want, &got))
        }
    }
}

/// An entry name Nix would accept, after `previous` in the directory.
fn check_name(name: &[u8], previous: Option<&[u8]>) -> Result<(), NarError> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(invalid(format!(
            "NAR entry has an invalid name {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    if previous.is_some_and(|p| p >= name) {
        return Err(invalid(format!(
            "NAR entries are not in order at {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    Ok(())
}

fn invalid(what: String) -> NarError {
    NarError::Read(WireError::Unexpected(what))
}

fn unexpected(want: &str, got: &[u8]) -> NarError {
    invalid(format!(
        "not a NAR: expected {want:?}, got {:?}",
        String::from_utf8_lossy(&got[..got.len().min(64)])
    ))
}
