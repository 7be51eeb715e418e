//! Writes a NAR from a tree in memory, with the framing the reader reads
//! (tests, and a stand-in serve server's store).

use std::io::{self, Write};

use super::NAR_MAGIC;
use crate::nix::wire::{padding_len, WireWriter};

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
