//! The NAR of a path in the local filesystem, byte for byte what
//! `nix-store --dump` writes: how `nsh-push` reads the local store.
//!
//! Through the local `nix-store --serve` (DumpStorePath) every byte of a
//! closure crosses one more process and two more pipe copies before ssh
//! gets it; a large push is CPU-bound at both ends (docs/benchmarks.md), so
//! nsh-push reads the store's files itself, as `nix-copy-closure` does. The
//! node checks every NAR against the hash the local store recorded, so a
//! local file that changed since is refused there, not imported.
//!
//! Nix's rules (`dumpPath`): a regular file is executable when its owner
//! may execute it; a directory's entries go in byte order of their names;
//! anything but a regular file, a directory or a symlink is an error.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::nar::NAR_MAGIC;
use super::wire::WireWriter;

/// Why a dump stopped: the local file it read, or the writer.
#[derive(Debug)]
pub enum DumpError {
    /// Reading the local file (or its metadata, or a directory) failed.
    Read(std::path::PathBuf, io::Error),
    /// A file that is neither regular, a directory nor a symlink.
    Unsupported(std::path::PathBuf),
    /// A regular file ended before the size its metadata gave (it changed
    /// while it was read).
    Shrunk(std::path::PathBuf),
    /// Writing the NAR failed.
    Write(io::Error),
}

impl std::fmt::Display for DumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DumpError::Read(path, e) => write!(f, "reading {}: {e}", path.display()),
            DumpError::Unsupported(path) => write!(
                f,
                "{} is not a regular file, a directory or a symlink: a NAR cannot hold it",
                path.display()
            ),
            DumpError::Shrunk(path) => {
                write!(f, "{} changed while it was read", path.display())
            }
            DumpError::Write(e) => write!(f, "writing the NAR: {e}"),
        }
    }
}

impl std::error::Error for DumpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DumpError::Read(_, e) | DumpError::Write(e) => Some(e),
            DumpError::Unsupported(_) | DumpError::Shrunk(_) => None,
        }
    }
}

/// How much of a file one read takes.
const CHUNK: usize = 256 * 1024;

/// Writes the NAR of `path` to `to`; returns its size in bytes.
pub fn dump(path: &Path, to: &mut dyn Write) -> Result<u64, DumpError> {
    let mut dumper = Dumper {
        w: WireWriter::new(Counted {
            inner: to,
            bytes: 0,
        }),
        buffer: vec![0; CHUNK],
    };
    dumper.put(NAR_MAGIC)?;
    dumper.node(path)?;
    Ok(dumper.w.get_mut().bytes)
}

struct Dumper<'w> {
    w: WireWriter<Counted<'w>>,
    buffer: Vec<u8>,
}

impl Dumper<'_> {
    fn put(&mut self, token: &str) -> Result<(), DumpError> {
        self.w.string(token).map_err(DumpError::Write)
    }

    fn node(&mut self, path: &Path) -> Result<(), DumpError> {
        let read = |e| DumpError::Read(path.to_path_buf(), e);
        let meta = fs::symlink_metadata(path).map_err(read)?;
        self.put("(")?;
        self.put("type")?;
        let kind = meta.file_type();
        if kind.is_file() {
            self.put("regular")?;
            if meta.permissions().mode() & 0o100 != 0 {
                self.put("executable")?;
                self.put("")?;
            }
            self.put("contents")?;
            self.contents(path, meta.len())?;
        } else if kind.is_dir() {
            self.put("directory")?;
            self.entries(path)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(path).map_err(read)?;
            self.put("symlink")?;
            self.put("target")?;
            self.w
                .bytes(target.as_os_str().as_bytes())
                .map_err(DumpError::Write)?;
        } else {
            return Err(DumpError::Unsupported(path.to_path_buf()));
        }
        self.put(")")
    }

    fn entries(&mut self, dir: &Path) -> Result<(), DumpError> {
        let read = |e| DumpError::Read(dir.to_path_buf(), e);
        let mut names = fs::read_dir(dir)
            .map_err(read)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(read)?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            self.put("entry")?;
            self.put("(")?;
            self.put("name")?;
            self.w.bytes(name.as_bytes()).map_err(DumpError::Write)?;
            self.put("node")?;
            self.node(&dir.join(&name))?;
            self.put(")")?;
        }
        Ok(())
    }

    /// `size`, then exactly `size` bytes of the file, then the padding.
    fn contents(&mut self, path: &Path, size: u64) -> Result<(), DumpError> {
        let read = |e| DumpError::Read(path.to_path_buf(), e);
        let mut file = File::open(path).map_err(read)?;
        self.w.u64(size).map_err(DumpError::Write)?;
        let mut left = size;
        while left > 0 {
            let want = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            let got = match file.read(&mut self.buffer[..want]) {
                Ok(0) => return Err(DumpError::Shrunk(path.to_path_buf())),
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read(e)),
            };
            self.w
                .get_mut()
                .write_all(&self.buffer[..got])
                .map_err(DumpError::Write)?;
            left -= got as u64;
        }
        self.w.padding(size).map_err(DumpError::Write)
    }
}

/// A writer that counts what passes.
struct Counted<'w> {
    inner: &'w mut dyn Write,
    bytes: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::nar::write::{nar, Node};
    use std::os::unix::fs::symlink;

    fn dumped(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        let size = dump(path, &mut out).unwrap();
        assert_eq!(size, out.len() as u64);
        out
    }

    #[test]
    fn a_tree_dumps_as_the_nar_of_the_same_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/hello"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(root.join("bin/hello"), fs::Permissions::from_mode(0o555)).unwrap();
        // Byte order, not creation order: "B" < "a" < "b".
        fs::write(root.join("b"), b"").unwrap();
        fs::write(root.join("a"), vec![7u8; CHUNK + 3]).unwrap();
        fs::write(root.join("B"), b"1234567").unwrap();
        symlink("bin/hello", root.join("link")).unwrap();
        let big = vec![7u8; CHUNK + 3];
        let expected = Node::Directory(vec![
            (
                "B",
                Node::Regular {
                    executable: false,
                    contents: b"1234567",
                },
            ),
            (
                "a",
                Node::Regular {
                    executable: false,
                    contents: &big,
                },
            ),
            (
                "b",
                Node::Regular {
                    executable: false,
                    contents: b"",
                },
            ),
            (
                "bin",
                Node::Directory(vec![(
                    "hello",
                    Node::Regular {
                        executable: true,
                        contents: b"#!/bin/sh\necho hi\n",
                    },
                )]),
            ),
            (
                "link",
                Node::Symlink {
                    target: "bin/hello",
                },
            ),
        ]);
        let mut nar_bytes = Vec::new();
        nar(&mut nar_bytes, &expected).unwrap();
        assert_eq!(dumped(&root), nar_bytes);
    }

    #[test]
    fn a_single_file_and_a_symlink_are_roots_too() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"data").unwrap();
        let mut expected = Vec::new();
        let contents = Node::Regular {
            executable: false,
            contents: b"data",
        };
        nar(&mut expected, &contents).unwrap();
        assert_eq!(dumped(&file), expected);

        let link = dir.path().join("l");
        symlink("/nowhere", &link).unwrap();
        let mut expected = Vec::new();
        nar(&mut expected, &Node::Symlink { target: "/nowhere" }).unwrap();
        assert_eq!(dumped(&link), expected);
    }

    #[test]
    fn what_a_nar_cannot_hold_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let err = dump(dir.path(), &mut Vec::new()).unwrap_err();
        assert!(
            matches!(err, DumpError::Unsupported(ref p) if p == &socket),
            "{err}"
        );
        let err = dump(&dir.path().join("absent"), &mut Vec::new()).unwrap_err();
        assert!(err.to_string().starts_with("reading "), "{err}");
    }
}
