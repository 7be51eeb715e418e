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
    /// The NAR went on past the most bytes it may have (the size its sender
    /// declared): it was cut there.
    Oversized {
        /// The most bytes it could have.
        max: u64,
    },
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
            NarError::Oversized { max } => {
                write!(f, "the NAR goes on past the {max} bytes it may have")
            }
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
            NarError::Oversized { .. } => None,
        }
    }
}

/// A stream that broke, a destination that went away and a file system
/// that failed may all work next time; a NAR that is not valid, or longer
/// than its sender said, will not.
impl KindOf for NarError {
    fn kind(&self) -> Kind {
        match self {
            NarError::Read(e) => e.kind(),
            NarError::Oversized { .. } => Kind::Permanent,
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
            oversized @ NarError::Oversized { .. } => WireError::Unexpected(oversized.to_string()),
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

/// The NAR's source: counts what it reads, never reads past `max` bytes,
/// and copies what it reads to the tee, keeping a failed write and an
/// oversized NAR apart from a failed read.
struct Source<'a, 't, R: ?Sized> {
    from: &'a mut R,
    tee: Option<&'t mut dyn Write>,
    count: u64,
    max: u64,
    oversized: bool,
    write_error: Option<io::Error>,
}

impl<R: Read + ?Sized> Read for Source<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let room = self.max - self.count;
        if room == 0 {
            self.oversized = true;
            return Err(io::Error::other("the NAR is longer than it may be"));
        }
        let want = usize::try_from(room).map_or(buf.len(), |room| room.min(buf.len()));
        let n = self.from.read(&mut buf[..want])?;
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

/// A regular file's contents, read from the NAR as the visitor asks (and
/// copied to `tap` as they are read, when the caller wants the contents of
/// the root file).
pub(super) struct Contents<'r> {
    reader: &'r mut dyn Read,
    left: u64,
    tap: Option<&'r mut dyn Write>,
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
        if let Some(tap) = &mut self.tap {
            tap.write_all(&buf[..n]).map_err(NarError::Write)?;
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

/// What the root of a NAR is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    Regular { executable: bool },
    Symlink,
    Directory,
}

/// What reading one NAR found: its size and what its root is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarRead {
    pub size: u64,
    pub root: Root,
}

/// How one NAR is read: never past `max_size` bytes, and, when the root is
/// a regular file, its contents also written to `root_contents` (what a
/// flat content hash covers).
pub struct Bounds<'a> {
    pub max_size: u64,
    pub root_contents: Option<&'a mut dyn Write>,
}

impl Bounds<'_> {
    /// No bound but the NAR's own end, no tap.
    pub const NONE: Bounds<'static> = Bounds {
        max_size: u64::MAX,
        root_contents: None,
    };
}

/// Reads one NAR from `from` (copying every byte to `tee`, if given) and
/// hands its parts to `visitor`; returns its size and root.
pub(super) fn read<R: Read + ?Sized>(
    from: &mut R,
    tee: Option<&mut dyn Write>,
    visitor: &mut dyn Visitor,
    bounds: Bounds<'_>,
) -> Result<NarRead, NarError> {
    let mut source = Source {
        from,
        tee,
        count: 0,
        max: bounds.max_size,
        oversized: false,
        write_error: None,
    };
    let limits = Limits {
        max_string: MAX_TOKEN,
        max_list: 0,
        // Tokens are read one at a time and dropped; only each one's own
        // bound matters.
        max_message: u64::MAX,
    };
    let parsed = {
        let mut parser = Parser {
            r: WireReader::with_limits(&mut source, limits),
            visitor,
            root_contents: bounds.root_contents,
            root: None,
        };
        parser
            .expect(NAR_MAGIC)
            .and_then(|()| parser.node(0))
            .and_then(|()| {
                parser
                    .root
                    .ok_or_else(|| invalid("a NAR without a root".into()))
            })
    };
    match (parsed, source.write_error) {
        (Err(_), Some(e)) => Err(NarError::Write(e)),
        (Err(_), None) if source.oversized => Err(NarError::Oversized { max: source.max }),
        (Err(e), None) => Err(e),
        (Ok(root), _) => Ok(NarRead {
            size: source.count,
            root,
        }),
    }
}

struct Parser<'v, 't, R> {
    r: WireReader<R>,
    visitor: &'v mut dyn Visitor,
    root_contents: Option<&'t mut dyn Write>,
    /// What the root node is, once its type was read.
    root: Option<Root>,
}

impl<R: Read> Parser<'_, '_, R> {
    fn node(&mut self, depth: usize) -> Result<(), NarError> {
        if depth > MAX_DEPTH {
            return Err(invalid(format!(
                "NAR nests deeper than {MAX_DEPTH} directories"
            )));
        }
        self.expect("(")?;
        self.expect("type")?;
        match self.token()?.as_slice() {
            b"regular" => self.regular(depth)?,
            b"symlink" => {
                self.expect("target")?;
                let target = self.token()?;
                self.found(depth, Root::Symlink);
                self.visitor.symlink(&target)?;
            }
            b"directory" => {
                self.found(depth, Root::Directory);
                return self.directory(depth);
            }
            other => return Err(unexpected("regular, symlink or directory", other)),
        }
        self.expect(")")
    }

    /// Notes what the root is (the node at depth 0).
    fn found(&mut self, depth: usize, root: Root) {
        if depth == 0 {
            self.root = Some(root);
        }
    }

    fn regular(&mut self, depth: usize) -> Result<(), NarError> {
        let mut tag = self.token()?;
        let executable = tag == b"executable";
        if executable {
            self.expect("")?;
            tag = self.token()?;
        }
        if tag != b"contents" {
            return Err(unexpected("contents", &tag));
        }
        self.found(depth, Root::Regular { executable });
        let len = self.r.u64()?;
        let tap = match &mut self.root_contents {
            Some(tap) if depth == 0 => Some(&mut **tap as &mut dyn Write),
            _ => None,
        };
        let mut contents = Contents {
            reader: self.r.get_mut(),
            left: len,
            tap,
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
