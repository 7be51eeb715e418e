//! Streaming NAR framing: copy one NAR from a reader to a writer, reading
//! exactly its bytes and no more.
//!
//! The serve protocol sends NARs without a length in front (DumpStorePath,
//! the export stream), so a relay must parse the NAR's structure to know
//! where it ends. File contents are streamed in chunks, never held whole;
//! names, symlink targets and nesting depth are bounded.
//!
//! Grammar (every token a wire string):
//! `"nix-archive-1" node` where
//! `node = "(" "type" ( "regular" ["executable" ""] "contents" <data>
//!                    | "symlink" "target" <string>
//!                    | "directory" { "entry" "(" "name" <string> "node" node ")" } ) ")"`.

use std::io::{self, Read, Write};

use crate::nix::wire::{padding_len, Limits, WireError, WireReader};

/// The NAR magic string.
pub const NAR_MAGIC: &str = "nix-archive-1";

/// The longest token, file name or symlink target accepted (Linux allows
/// 4096-byte paths).
const MAX_TOKEN: u64 = 4096;
/// The deepest directory nesting accepted.
const MAX_DEPTH: usize = 256;

/// Copies one NAR from `from` to `to`, returning its size in bytes.
///
/// `from` should be buffered (NAR tokens are read 8 bytes at a time); `to`
/// need not be: writes are gathered here.
pub fn copy_nar<R: Read + ?Sized, W: Write + ?Sized>(
    from: &mut R,
    to: &mut W,
) -> Result<u64, WireError> {
    let mut to = io::BufWriter::with_capacity(64 * 1024, to);
    let mut tee = Tee {
        from,
        to: &mut to,
        count: 0,
    };
    let limits = Limits {
        max_string: MAX_TOKEN,
        max_list: 0,
    };
    {
        let mut r = WireReader::with_limits(&mut tee, limits);
        expect(&mut r, NAR_MAGIC)?;
        node(&mut r, 0)?;
    }
    tee.to.flush()?;
    Ok(tee.count)
}

/// Reads one NAR from `from` and discards it, returning its size.
pub fn skip_nar<R: Read + ?Sized>(from: &mut R) -> Result<u64, WireError> {
    copy_nar(from, &mut io::sink())
}

fn node<R: Read>(r: &mut WireReader<R>, depth: usize) -> Result<(), WireError> {
    if depth > MAX_DEPTH {
        return Err(WireError::Unexpected(format!(
            "NAR nests deeper than {MAX_DEPTH} directories"
        )));
    }
    expect(r, "(")?;
    expect(r, "type")?;
    match token(r)?.as_slice() {
        b"regular" => {
            let mut tag = token(r)?;
            if tag == b"executable" {
                expect(r, "")?;
                tag = token(r)?;
            }
            if tag != b"contents" {
                return Err(unexpected("contents", &tag));
            }
            let len = r.u64()?;
            let copied = io::copy(&mut r.get_mut().take(len), &mut io::sink())?;
            if copied < len {
                return Err(WireError::Eof);
            }
            r.padding(len)?;
            expect(r, ")")
        }
        b"symlink" => {
            expect(r, "target")?;
            token(r)?;
            expect(r, ")")
        }
        b"directory" => loop {
            let tag = token(r)?;
            match tag.as_slice() {
                b")" => return Ok(()),
                b"entry" => {
                    expect(r, "(")?;
                    expect(r, "name")?;
                    let name = token(r)?;
                    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
                        return Err(WireError::Unexpected(format!(
                            "NAR entry has an invalid name {:?}",
                            String::from_utf8_lossy(&name)
                        )));
                    }
                    expect(r, "node")?;
                    node(r, depth + 1)?;
                    expect(r, ")")?;
                }
                other => return Err(unexpected("entry or )", other)),
            }
        },
        other => Err(unexpected("regular, symlink or directory", other)),
    }
}

fn token<R: Read>(r: &mut WireReader<R>) -> Result<Vec<u8>, WireError> {
    r.bytes()
}

fn expect<R: Read>(r: &mut WireReader<R>, want: &str) -> Result<(), WireError> {
    let got = token(r)?;
    if got == want.as_bytes() {
        Ok(())
    } else {
        Err(unexpected(want, &got))
    }
}

fn unexpected(want: &str, got: &[u8]) -> WireError {
    WireError::Unexpected(format!(
        "not a NAR: expected {want:?}, got {:?}",
        String::from_utf8_lossy(&got[..got.len().min(64)])
    ))
}

/// Passes every byte read from `from` on to `to`.
struct Tee<'a, R: ?Sized, W: ?Sized> {
    from: &'a mut R,
    to: &'a mut W,
    count: u64,
}

impl<R: Read + ?Sized, W: Write + ?Sized> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.from.read(buf)?;
        self.to.write_all(&buf[..n])?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Unpacks one NAR read from `from` into a new file system object at `dest`
/// (which must not exist), with the metadata Nix gives store paths: files
/// 0444 (0555 if executable), directories 0555, every mtime 1. File contents
/// are streamed. Returns the NAR's size.
///
/// Directory entries must come in strictly increasing order, as Nix writes
/// them (so that a NAR has one canonical form and names cannot repeat).
/// On an error, whatever was created under `dest` is left for the caller to
/// remove.
pub fn unpack<R: Read>(from: &mut R, dest: &std::path::Path) -> Result<u64, WireError> {
    let mut counting = Counter { from, count: 0 };
    let limits = Limits {
        max_string: MAX_TOKEN,
        max_list: 0,
    };
    {
        let mut r = WireReader::with_limits(&mut counting, limits);
        expect(&mut r, NAR_MAGIC)?;
        unpack_node(&mut r, dest, 0)?;
    }
    Ok(counting.count)
}

fn unpack_node<R: Read>(
    r: &mut WireReader<R>,
    path: &std::path::Path,
    depth: usize,
) -> Result<(), WireError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if depth > MAX_DEPTH {
        return Err(WireError::Unexpected(format!(
            "NAR nests deeper than {MAX_DEPTH} directories"
        )));
    }
    let fs_error = |what: &str, e: io::Error| {
        WireError::Io(io::Error::new(
            e.kind(),
            format!("{what} {}: {e}", path.display()),
        ))
    };
    expect(r, "(")?;
    expect(r, "type")?;
    match token(r)?.as_slice() {
        b"regular" => {
            let mut tag = token(r)?;
            let executable = tag == b"executable";
            if executable {
                expect(r, "")?;
                tag = token(r)?;
            }
            if tag != b"contents" {
                return Err(unexpected("contents", &tag));
            }
            let len = r.u64()?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| fs_error("creating", e))?;
            let copied = io::copy(&mut r.get_mut().take(len), &mut file).map_err(|e| {
                // A read error is the stream's; a write error the disk's.
                fs_error("writing", e)
            })?;
            if copied < len {
                return Err(WireError::Eof);
            }
            r.padding(len)?;
            let mode = if executable { 0o555 } else { 0o444 };
            file.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| fs_error("chmod", e))?;
            drop(file);
            crate::sys::fs::set_mtime_1(path).map_err(|e| fs_error("setting the mtime of", e))?;
            expect(r, ")")
        }
        b"symlink" => {
            expect(r, "target")?;
            let target = token(r)?;
            use std::os::unix::ffi::OsStrExt;
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), path)
                .map_err(|e| fs_error("creating the symlink", e))?;
            crate::sys::fs::set_mtime_1(path).map_err(|e| fs_error("setting the mtime of", e))?;
            expect(r, ")")
        }
        b"directory" => {
            std::fs::create_dir(path).map_err(|e| fs_error("creating", e))?;
            let mut previous: Option<Vec<u8>> = None;
            loop {
                let tag = token(r)?;
                match tag.as_slice() {
                    b")" => break,
                    b"entry" => {
                        expect(r, "(")?;
                        expect(r, "name")?;
                        let name = token(r)?;
                        if name.is_empty()
                            || name == b"."
                            || name == b".."
                            || name.contains(&b'/')
                            || name.contains(&0)
                        {
                            return Err(WireError::Unexpected(format!(
                                "NAR entry has an invalid name {:?}",
                                String::from_utf8_lossy(&name)
                            )));
                        }
                        if previous.as_ref().is_some_and(|p| *p >= name) {
                            return Err(WireError::Unexpected(format!(
                                "NAR entries are not in order at {:?}",
                                String::from_utf8_lossy(&name)
                            )));
                        }
                        expect(r, "node")?;
                        use std::os::unix::ffi::OsStrExt;
                        let child = path.join(std::ffi::OsStr::from_bytes(&name));
                        unpack_node(r, &child, depth + 1)?;
                        expect(r, ")")?;
                        previous = Some(name);
                    }
                    other => return Err(unexpected("entry or )", other)),
                }
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o555))
                .map_err(|e| fs_error("chmod", e))?;
            crate::sys::fs::set_mtime_1(path).map_err(|e| fs_error("setting the mtime of", e))?;
            Ok(())
        }
        other => Err(unexpected("regular, symlink or directory", other)),
    }
}

/// Counts the bytes read.
struct Counter<'a, R> {
    from: &'a mut R,
    count: u64,
}

impl<R: Read> Read for Counter<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.from.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Writes a NAR (for tests and for small paths built in memory): `entries`
/// are written with the same framing the parser reads.
pub mod write {
    use super::*;
    use crate::nix::wire::WireWriter;

    /// One node of a NAR tree.
    pub enum Node<'a> {
        Regular {
            executable: bool,
            contents: &'a [u8],
        },
        Symlink {
            target: &'a str,
        },
        Directory(Vec<(&'a str, Node<'a>)>),
    }

    pub fn nar<W: Write>(to: W, root: &Node) -> io::Result<()> {
        let mut w = WireWriter::new(to);
        w.string(NAR_MAGIC)?;
        node(&mut w, root)
    }

    fn node<W: Write>(w: &mut WireWriter<W>, n: &Node) -> io::Result<()> {
        w.string("(")?;
        w.string("type")?;
        match n {
            Node::Regular {
                executable,
                contents,
            } => {
                w.string("regular")?;
                if *executable {
                    w.string("executable")?;
                    w.string("")?;
                }
                w.string("contents")?;
                w.u64(contents.len() as u64)?;
                w.get_mut().write_all(contents)?;
                w.get_mut()
                    .write_all(&[0u8; 8][..padding_len(contents.len() as u64)])?;
            }
            Node::Symlink { target } => {
                w.string("symlink")?;
                w.string("target")?;
                w.string(target)?;
            }
            Node::Directory(entries) => {
                w.string("directory")?;
                for (name, child) in entries {
                    w.string("entry")?;
                    w.string("(")?;
                    w.string("name")?;
                    w.string(name)?;
                    w.string("node")?;
                    node(w, child)?;
                    w.string(")")?;
                }
            }
        }
        w.string(")")
    }
}

#[cfg(test)]
mod tests {
    use super::write::{nar, Node};
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut out = Vec::new();
        let big = vec![7u8; 100_003];
        nar(
            &mut out,
            &Node::Directory(vec![
                (
                    "bin",
                    Node::Directory(vec![(
                        "hello",
                        Node::Regular {
                            executable: true,
                            contents: b"#!/bin/sh\n",
                        },
                    )]),
                ),
                (
                    "big",
                    Node::Regular {
                        executable: false,
                        contents: &big,
                    },
                ),
                (
                    "link",
                    Node::Symlink {
                        target: "bin/hello",
                    },
                ),
            ]),
        )
        .unwrap();
        out
    }

    #[test]
    fn copies_exactly_one_nar_and_leaves_the_rest() {
        let nar = sample();
        let mut stream = [&nar[..], b"TRAILER!"].concat();
        let mut input = &stream[..];
        let mut copy = Vec::new();
        assert_eq!(copy_nar(&mut input, &mut copy).unwrap(), nar.len() as u64);
        assert_eq!(copy, nar);
        assert_eq!(input, b"TRAILER!");
        // A cut anywhere is an error, never a short success.
        stream.truncate(nar.len() - 8);
        assert!(skip_nar(&mut &stream[..]).is_err());
    }

    #[test]
    fn a_real_nar_from_nix_store_dump() {
        // `nix-store --dump` of a directory made by the test itself.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f"), b"hello\n").unwrap();
        std::os::unix::fs::symlink("sub/f", dir.path().join("l")).unwrap();
        let Ok(out) = std::process::Command::new("nix-store")
            .arg("--dump")
            .arg(dir.path())
            .output()
        else {
            panic!("nix-store is needed for this test");
        };
        assert!(out.status.success());
        assert_eq!(
            skip_nar(&mut &out.stdout[..]).unwrap(),
            out.stdout.len() as u64
        );
    }

    #[test]
    fn bad_nars_say_why() {
        let mut bytes = Vec::new();
        crate::nix::wire::WireWriter::new(&mut bytes)
            .string("nix-archive-2")
            .unwrap();
        let err = skip_nar(&mut &bytes[..]).unwrap_err();
        assert!(
            err.to_string().contains("expected \"nix-archive-1\""),
            "{err}"
        );
    }

    /// An owned tree, for generating NARs.
    #[derive(Debug, Clone)]
    enum Tree {
        File(bool, Vec<u8>),
        Link(String),
        Dir(std::collections::BTreeMap<String, Tree>),
    }

    fn borrow(tree: &Tree) -> Node<'_> {
        match tree {
            Tree::File(executable, contents) => Node::Regular {
                executable: *executable,
                contents,
            },
            Tree::Link(target) => Node::Symlink { target },
            Tree::Dir(entries) => Node::Directory(
                entries
                    .iter()
                    .map(|(n, t)| (n.as_str(), borrow(t)))
                    .collect(),
            ),
        }
    }

    fn tree() -> impl Strategy<Value = Tree> {
        let leaf = prop_oneof![
            (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..40))
                .prop_map(|(x, c)| Tree::File(x, c)),
            "[a-z/.]{1,20}".prop_map(Tree::Link),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            proptest::collection::btree_map("[a-z0-9_]{1,8}", inner, 0..5).prop_map(Tree::Dir)
        })
    }

    #[test]
    fn unpack_then_dump_gives_the_same_nar() {
        // Entries sorted, as Nix writes them (`sample` is not).
        let mut nar = Vec::new();
        let big = vec![7u8; 100_003];
        write::nar(
            &mut nar,
            &Node::Directory(vec![
                (
                    "big",
                    Node::Regular {
                        executable: false,
                        contents: &big,
                    },
                ),
                (
                    "bin",
                    Node::Directory(vec![(
                        "hello",
                        Node::Regular {
                            executable: true,
                            contents: b"#!/bin/sh\n",
                        },
                    )]),
                ),
                (
                    "link",
                    Node::Symlink {
                        target: "bin/hello",
                    },
                ),
            ]),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        let mut stream = [&nar[..], b"REST"].concat();
        let mut input = &stream[..];
        assert_eq!(unpack(&mut input, &dest).unwrap(), nar.len() as u64);
        assert_eq!(input, b"REST");
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::symlink_metadata(dest.join("bin/hello")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o555);
        assert_eq!(meta.mtime(), 1);
        let meta = std::fs::symlink_metadata(dest.join("big")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o444);
        assert_eq!(
            std::fs::symlink_metadata(dest.join("link"))
                .unwrap()
                .mtime(),
            1
        );
        assert_eq!(
            std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777,
            0o555
        );
        let dumped = std::process::Command::new("nix-store")
            .arg("--dump")
            .arg(&dest)
            .output()
            .expect("nix-store is needed for this test");
        assert!(dumped.status.success());
        assert_eq!(dumped.stdout, nar);
        // A cut stream is an error.
        stream.truncate(nar.len() / 2);
        let dest2 = dir.path().join("cut");
        assert!(unpack(&mut &stream[..], &dest2).is_err());
        // Make the trees removable for the temp dir's cleanup.
        for p in [&dest, &dest.join("bin"), &dest2] {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
        }
    }

    #[test]
    fn unpack_refuses_unordered_entries() {
        let mut out = Vec::new();
        let leaf = || Node::Regular {
            executable: false,
            contents: b"x",
        };
        nar(
            &mut out,
            &Node::Directory(vec![("b", leaf()), ("a", leaf())]),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = unpack(&mut &out[..], &dir.path().join("d")).unwrap_err();
        assert!(err.to_string().contains("not in order"), "{err}");
        use std::os::unix::fs::PermissionsExt;
        let _ =
            std::fs::set_permissions(dir.path().join("d"), std::fs::Permissions::from_mode(0o755));
    }

    proptest! {
        #[test]
        fn generated_nars_are_copied_exactly(t in tree(), tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            let mut bytes = Vec::new();
            nar(&mut bytes, &borrow(&t)).unwrap();
            let stream = [&bytes[..], &tail].concat();
            let mut input = &stream[..];
            let mut copy = Vec::new();
            prop_assert_eq!(copy_nar(&mut input, &mut copy).unwrap(), bytes.len() as u64);
            prop_assert_eq!(copy, bytes.clone());
            prop_assert_eq!(input, &tail[..]);
            // Any cut is an error.
            let cut = bytes.len() / 2;
            prop_assert!(skip_nar(&mut &bytes[..cut]).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = skip_nar(&mut &tail[..]);
            // With a valid prefix, so the parser gets past the magic.
            let mut bytes = Vec::new();
            crate::nix::wire::WireWriter::new(&mut bytes).string(NAR_MAGIC).unwrap();
            bytes.extend_from_slice(&tail);
            let _ = skip_nar(&mut &bytes[..]);
        }
    }
}
