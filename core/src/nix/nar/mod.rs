//! NARs, streamed: [`copy_nar`] relays one NAR from a reader to a writer,
//! [`unpack`] makes the file system object it describes; both read exactly
//! the NAR's bytes and no more, and neither holds a file's contents whole.
//!
//! The serve protocol sends NARs without a length in front (DumpStorePath,
//! the export stream), so a relay must parse the NAR's structure to know
//! where it ends. One parser ([`reader`]) does that for both, and checks
//! once what Nix itself insists on: the grammar, entry names (not empty,
//! `.`, `..`, nor containing `/` or NUL), entries in strictly increasing
//! order (one canonical form, no name twice), bounded names, targets and
//! nesting.
//!
//! Grammar (every token a wire string):
//! `"nix-archive-1" node` where
//! `node = "(" "type" ( "regular" ["executable" ""] "contents" <data>
//!                    | "symlink" "target" <string>
//!                    | "directory" { "entry" "(" "name" <string> "node" node ")" } ) ")"`.

mod reader;
mod unpack;
#[cfg(test)]
pub mod write;

use std::io::{self, Read, Write};
use std::path::Path;

pub use reader::{Bounds, NarError, NarRead, Root};
use reader::{Contents, Visitor};

/// The NAR magic string.
pub const NAR_MAGIC: &str = "nix-archive-1";

/// Copies one NAR from `from` to `to`, returning its size in bytes.
///
/// `from` should be buffered (NAR tokens are read 8 bytes at a time); `to`
/// need not be: writes are gathered here.
///
/// # Errors
/// [`NarError::Read`] for a stream that broke or is not a valid NAR,
/// [`NarError::Write`] when writing to `to` failed.
pub fn copy_nar<R: Read + ?Sized, W: Write + ?Sized>(
    from: &mut R,
    to: &mut W,
) -> Result<u64, NarError> {
    copy_nar_bounded(from, to, Bounds::NONE).map(|read| read.size)
}

/// [`copy_nar`] within `bounds`: at most `bounds.max_size` bytes are read
/// ([`NarError::Oversized`] past them), and the contents of a root that is
/// a regular file are also written to `bounds.root_contents`. Returns the
/// NAR's size and what its root is.
///
/// # Errors
/// As [`copy_nar`]'s, and [`NarError::Oversized`].
pub fn copy_nar_bounded<R: Read + ?Sized, W: Write + ?Sized>(
    from: &mut R,
    to: &mut W,
    bounds: Bounds<'_>,
) -> Result<NarRead, NarError> {
    let mut to = io::BufWriter::with_capacity(64 * 1024, to);
    let read = reader::read(from, Some(&mut to), &mut Relay, bounds)?;
    to.flush().map_err(NarError::Write)?;
    Ok(read)
}

/// Reads one NAR from `from` and discards it, returning its size.
///
/// # Errors
/// As [`copy_nar`]'s reading.
#[cfg(test)]
pub fn skip_nar<R: Read + ?Sized>(from: &mut R) -> Result<u64, NarError> {
    copy_nar(from, &mut io::sink())
}

/// Unpacks one NAR read from `from` into a new file system object at `dest`
/// (which must not exist), with the metadata Nix gives store paths: files
/// 0444 (0555 if executable), directories 0555, every mtime 1. File contents
/// are streamed. Returns the NAR's size.
///
/// On an error, whatever was created under `dest` is left for the caller to
/// remove.
///
/// # Errors
/// [`NarError::Read`] for the stream, [`NarError::Unpack`] for the file
/// system.
#[cfg(test)]
pub fn unpack<R: Read + ?Sized>(from: &mut R, dest: &Path) -> Result<u64, NarError> {
    unpack_bounded(from, dest, Bounds::NONE).map(|read| read.size)
}

/// [`unpack`] within `bounds` (as [`copy_nar_bounded`]): never more than
/// `bounds.max_size` bytes read, so never more written.
///
/// # Errors
/// As [`unpack`]'s, and [`NarError::Oversized`].
pub fn unpack_bounded<R: Read + ?Sized>(
    from: &mut R,
    dest: &Path,
    bounds: Bounds<'_>,
) -> Result<NarRead, NarError> {
    reader::read(from, None, &mut unpack::Unpacker::new(dest), bounds)
}

/// What a relay does with each part: nothing (the reader's tee copies every
/// byte); file contents are drained so that they pass through the tee.
struct Relay;

impl Visitor for Relay {
    fn regular(&mut self, _executable: bool, contents: &mut Contents<'_>) -> Result<(), NarError> {
        contents.drain()
    }
    fn symlink(&mut self, _target: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
    fn directory(&mut self) -> Result<(), NarError> {
        Ok(())
    }
    fn enter(&mut self, _name: &[u8]) {}
    fn leave(&mut self) {}
    fn directory_done(&mut self) -> Result<(), NarError> {
        Ok(())
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
        // Entries sorted, as Nix writes them.
        let nar = sample();
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

    #[test]
    fn copying_checks_names_and_order_as_unpacking_does() {
        let leaf = || Node::Regular {
            executable: false,
            contents: b"x",
        };
        for (entries, why) in [
            (vec![("b", leaf()), ("a", leaf())], "not in order"),
            (vec![("a", leaf()), ("a", leaf())], "not in order"),
            (vec![("a\0b", leaf())], "invalid name"),
            (vec![("..", leaf())], "invalid name"),
        ] {
            let mut bytes = Vec::new();
            nar(&mut bytes, &Node::Directory(entries)).unwrap();
            let err = copy_nar(&mut &bytes[..], &mut Vec::new()).unwrap_err();
            assert!(err.to_string().contains(why), "{err}");
            assert!(matches!(err, NarError::Read(_)), "{err:?}");
        }
    }

    #[test]
    fn a_failed_write_is_the_writing_side() {
        struct Refuses;
        impl Write for Refuses {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let err = copy_nar(&mut &sample()[..], &mut Refuses).unwrap_err();
        assert!(matches!(err, NarError::Write(_)), "{err:?}");
    }

    #[test]
    fn a_bounded_read_stops_at_the_bound_and_reads_nothing_past_it() {
        let nar = sample();
        let max = 1000;
        // A source that counts what is taken from it.
        let mut source = &nar[..];
        let err = copy_nar_bounded(
            &mut source,
            &mut Vec::new(),
            Bounds {
                max_size: max,
                root_contents: None,
            },
        )
        .unwrap_err();
        assert!(matches!(err, NarError::Oversized { max: 1000 }), "{err:?}");
        assert_eq!(crate::error::KindOf::kind(&err), crate::Kind::Permanent);
        assert_eq!(nar.len() - source.len(), 1000);
        let dir = tempfile::tempdir().unwrap();
        let err = unpack_bounded(
            &mut &nar[..],
            &dir.path().join("d"),
            Bounds {
                max_size: max,
                root_contents: None,
            },
        )
        .unwrap_err();
        assert!(matches!(err, NarError::Oversized { .. }), "{err:?}");
        use std::os::unix::fs::PermissionsExt;
        let _ =
            std::fs::set_permissions(dir.path().join("d"), std::fs::Permissions::from_mode(0o755));
        // Exactly its size is enough.
        let read = copy_nar_bounded(
            &mut &nar[..],
            &mut Vec::new(),
            Bounds {
                max_size: nar.len() as u64,
                root_contents: None,
            },
        )
        .unwrap();
        assert_eq!(read.size, nar.len() as u64);
        assert_eq!(read.root, Root::Directory);
    }

    #[test]
    fn the_contents_of_a_root_file_are_tapped() {
        let mut bytes = Vec::new();
        nar(
            &mut bytes,
            &Node::Regular {
                executable: true,
                contents: b"flat contents",
            },
        )
        .unwrap();
        let mut tapped = Vec::new();
        let read = copy_nar_bounded(
            &mut &bytes[..],
            &mut Vec::new(),
            Bounds {
                max_size: u64::MAX,
                root_contents: Some(&mut tapped),
            },
        )
        .unwrap();
        assert_eq!(read.root, Root::Regular { executable: true });
        assert_eq!(tapped, b"flat contents");
        // Files inside a directory are not the root's contents.
        let mut tapped = Vec::new();
        let read = copy_nar_bounded(
            &mut &sample()[..],
            &mut Vec::new(),
            Bounds {
                max_size: u64::MAX,
                root_contents: Some(&mut tapped),
            },
        )
        .unwrap();
        assert_eq!(read.root, Root::Directory);
        assert!(tapped.is_empty());
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
