//! A stand-in `nix-store --serve --write` for unit tests of push and fetch:
//! an in-memory store behind a thread that speaks the serve protocol over a
//! socket pair, announcing the version it is given and lacking the commands
//! it is told to lack. A command it lacks is answered as Nix answers one:
//! `error: unknown serve command N` on its stderr (kept here) and the
//! connection closed. It records every byte the client sent, for
//! byte-exact transcripts. The real servers are exercised by
//! `core/tests/serve_local.rs` and the cluster tests.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use crate::nix::nar;
use crate::nix::serve::client::ServeClient;
use crate::nix::serve::{self, PathInfo};
use crate::nix::store_path::StorePath;
use crate::nix::wire::{WireError, WireReader, WireWriter};

/// A path in the fake store: what QueryPathInfos says, what DumpStorePath
/// sends (which need not match: a corrupt store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPath {
    pub info: PathInfo,
    pub nar: Vec<u8>,
}

/// The server as it starts.
pub struct FakeNode {
    /// The version it announces (`0x207` for Nix 2.8 – 2.34).
    pub version: u64,
    /// The command numbers it does not have.
    pub lacks: BTreeSet<u64>,
    pub store: BTreeMap<String, StoredPath>,
}

/// The server when the client went away.
#[derive(Debug)]
pub struct Finished {
    pub store: BTreeMap<String, StoredPath>,
    /// Every byte the client sent, the hello included.
    pub received: Vec<u8>,
    /// What Nix would have printed on stderr before closing, if anything.
    pub error: Option<String>,
}

/// The client side of a conversation with a [`FakeNode`].
pub type FakeClient = ServeClient<UnixStream, UnixStream>;

impl FakeNode {
    /// Nix 2.32.2 – 2.34: serve 2.7, no ExportPaths (5).
    pub fn nix_2_34() -> FakeNode {
        FakeNode::new(0x207, &[5])
    }

    /// Nix 2.32.0 and 2.32.1: serve 2.7, neither ImportPaths nor ExportPaths.
    pub fn nix_2_32_0() -> FakeNode {
        FakeNode::new(0x207, &[4, 5])
    }

    /// A peer older than AddToStoreNar (serve 2.4).
    pub fn serve_2_4() -> FakeNode {
        FakeNode::new(0x204, &[9])
    }

    pub fn new(version: u64, lacks: &[u64]) -> FakeNode {
        FakeNode {
            version,
            lacks: lacks.iter().copied().collect(),
            store: BTreeMap::new(),
        }
    }

    /// Adds a valid path whose NAR is a file holding `contents`.
    pub fn with_file(mut self, path: &str, references: &[&str], contents: &[u8]) -> FakeNode {
        let nar = file_nar(contents);
        let info = info_for(path, references, &nar);
        self.store
            .insert(path.to_string(), StoredPath { info, nar });
        self
    }

    /// Starts serving; returns the client, after the handshake, and the
    /// server's thread, which ends when the client is dropped.
    pub fn start(self) -> (FakeClient, JoinHandle<Finished>) {
        let (client_end, server_end) = UnixStream::pair().unwrap();
        let thread = std::thread::spawn(move || self.serve(server_end));
        let reader = client_end.try_clone().unwrap();
        let client = ServeClient::handshake(reader, client_end, "fake node").unwrap();
        (client, thread)
    }

    fn serve(mut self, stream: UnixStream) -> Finished {
        let writer = stream.try_clone().unwrap();
        let mut r = WireReader::new(Recording {
            inner: BufReader::new(stream),
            seen: Vec::new(),
        });
        let mut w = WireWriter::new(BufWriter::new(writer));
        let error = self.converse(&mut r, &mut w).err();
        Finished {
            store: self.store,
            received: r.into_inner().seen,
            error,
        }
    }

    /// Answers commands until the client leaves (`Ok`) or sends one this
    /// server lacks or cannot do (`Err`, Nix's message).
    fn converse<R: Read, W: Write>(
        &mut self,
        r: &mut WireReader<R>,
        w: &mut WireWriter<W>,
    ) -> Result<(), String> {
        let text = |e: WireError| e.to_string();
        assert_eq!(r.u64().map_err(text)?, serve::SERVE_MAGIC_1);
        w.u64(serve::SERVE_MAGIC_2).unwrap();
        w.u64(self.version).unwrap();
        w.flush().unwrap();
        let version = r.u64().map_err(text)?.min(self.version);
        loop {
            let command = match r.u64() {
                Ok(command) => command,
                Err(WireError::Eof) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            if self.lacks.contains(&command) {
                return Err(format!("error: unknown serve command {command}"));
            }
            self.answer(command, version, r, w)?;
            w.flush().map_err(|e| e.to_string())?;
        }
    }

    fn answer<R: Read, W: Write>(
        &mut self,
        command: u64,
        version: u64,
        r: &mut WireReader<R>,
        w: &mut WireWriter<W>,
    ) -> Result<(), String> {
        let text = |e: WireError| e.to_string();
        let write = |e: io::Error| e.to_string();
        let Ok(command) = serve::Command::try_from(command) else {
            return Err(format!("error: unknown serve command {command}"));
        };
        match command {
            serve::Command::QueryValidPaths => {
                let (_lock, _substitute) = (r.u64().map_err(text)?, r.u64().map_err(text)?);
                let paths = r.strings().map_err(text)?;
                let valid: Vec<&String> = paths
                    .iter()
                    .filter(|p| self.store.contains_key(*p))
                    .collect();
                w.strings(valid).map_err(write)
            }
            serve::Command::QueryPathInfos => {
                let paths = r.strings().map_err(text)?;
                for stored in paths.iter().filter_map(|p| self.store.get(p)) {
                    write_path_info(w, &stored.info, version).map_err(write)?;
                }
                w.string("").map_err(write)
            }
            serve::Command::DumpStorePath => {
                let path = r.string().map_err(text)?;
                let stored = self
                    .store
                    .get(&path)
                    .ok_or(format!("error: path '{path}' is not valid"))?;
                w.get_mut().write_all(&stored.nar).map_err(write)
            }
            serve::Command::ImportPaths => {
                self.import_paths(r)?;
                w.u64(1).map_err(write)
            }
            serve::Command::QueryClosure => {
                let _include_outputs = r.u64().map_err(text)?;
                let roots = r.strings().map_err(text)?;
                w.strings(self.closure(roots)).map_err(write)
            }
            serve::Command::AddToStoreNar => {
                self.add_to_store_nar(r)?;
                w.u64(1).map_err(write)
            }
            serve::Command::BuildDerivation => Err(format!(
                "error: serve command {} is not in this stand-in",
                u64::from(command)
            )),
        }
    }

    fn import_paths<R: Read>(&mut self, r: &mut WireReader<R>) -> Result<(), String> {
        let text = |e: WireError| e.to_string();
        while r.u64().map_err(text)? == 1 {
            let mut nar = Vec::new();
            nar::copy_nar(r.get_mut(), &mut nar).map_err(|e| e.to_string())?;
            let trailer = serve::read_export_trailer(r).map_err(text)?;
            let references: Vec<&str> = trailer.references.iter().map(StorePath::as_str).collect();
            let mut info = info_for(&trailer.path, &references, &nar);
            info.deriver = trailer.deriver;
            self.store
                .insert(trailer.path.to_string(), StoredPath { info, nar });
        }
        Ok(())
    }

    fn add_to_store_nar<R: Read>(&mut self, r: &mut WireReader<R>) -> Result<(), String> {
        let text = |e: WireError| e.to_string();
        let path = r.string().map_err(text)?;
        let path = StorePath::parse(&path).map_err(|e| e.message)?;
        let deriver = r.string().map_err(text)?;
        let mut info = PathInfo {
            deriver: (!deriver.is_empty())
                .then(|| StorePath::parse(&deriver).map_err(|e| e.message))
                .transpose()?,
            nar_hash: r.string().map_err(text)?,
            references: serve::read_store_paths(r).map_err(text)?,
            ..PathInfo::new(path)
        };
        let _registration_time = r.u64().map_err(text)?;
        info.nar_size = r.u64().map_err(text)?;
        let _ultimate = r.u64().map_err(text)?;
        info.sigs = r.strings().map_err(text)?;
        info.ca = r.string().map_err(text)?;
        let mut nar = Vec::new();
        nar::copy_nar(r.get_mut(), &mut nar).map_err(|e| e.to_string())?;
        let digest: [u8; 32] = Sha256::digest(&nar).into();
        if nar.len() as u64 != info.nar_size
            || !crate::nix::hash::nar_hash_matches(&info.nar_hash, &digest).unwrap_or(false)
        {
            return Err(format!(
                "error: hash mismatch importing path '{}'",
                info.path
            ));
        }
        self.store
            .insert(info.path.to_string(), StoredPath { info, nar });
        Ok(())
    }

    fn closure(&self, roots: Vec<String>) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let mut todo = roots;
        while let Some(path) = todo.pop() {
            if let Some(stored) = self.store.get(&path) {
                if seen.insert(path) {
                    todo.extend(stored.info.references.iter().map(ToString::to_string));
                }
            }
        }
        seen.into_iter().collect()
    }
}

fn write_path_info<W: Write>(
    w: &mut WireWriter<W>,
    info: &PathInfo,
    version: u64,
) -> io::Result<()> {
    w.string(info.path.as_str())?;
    w.string(info.deriver.as_ref().map_or("", StorePath::as_str))?;
    w.strings(info.references.iter().map(StorePath::as_str))?;
    w.u64(info.download_size)?;
    w.u64(info.nar_size)?;
    if serve::path_infos_have_nar_hash(version) {
        w.string(&info.nar_hash)?;
        w.string(&info.ca)?;
        w.strings(&info.sigs)?;
    }
    Ok(())
}

/// The NAR of a regular file holding `contents`.
pub fn file_nar(contents: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let node = nar::write::Node::Regular {
        executable: false,
        contents,
    };
    nar::write::nar(&mut out, &node).unwrap();
    out
}

/// The path info a store records for `nar` at `path`.
pub fn info_for(path: &str, references: &[&str], nar: &[u8]) -> PathInfo {
    let digest: [u8; 32] = Sha256::digest(nar).into();
    PathInfo {
        references: references
            .iter()
            .map(|r| StorePath::parse(r).unwrap())
            .collect(),
        nar_size: nar.len() as u64,
        nar_hash: format!("sha256:{}", crate::nix::hash::nix_base32(&digest)),
        ..PathInfo::new(StorePath::parse(path).unwrap())
    }
}

/// A reader that keeps a copy of everything it reads.
struct Recording<R> {
    inner: R,
    seen: Vec<u8>,
}

impl<R: Read> Read for Recording<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::wire::test_bytes::{le, s};

    #[test]
    fn each_stand_in_announces_its_version_and_keeps_its_store() {
        for (node, version, lacks) in [
            (FakeNode::nix_2_34(), 0x207, vec![5]),
            (FakeNode::nix_2_32_0(), 0x207, vec![4, 5]),
            (FakeNode::serve_2_4(), 0x204, vec![9]),
        ] {
            assert_eq!(node.lacks, lacks.into_iter().collect());
            let path = "/nix/store/00000000000000000000000000000000-a";
            let (mut client, thread) = node.with_file(path, &[], b"a").start();
            assert_eq!(client.version(), version);
            assert_eq!(
                client.query_valid_paths(&[path], false, false).unwrap(),
                [path]
            );
            drop(client);
            let finished = thread.join().unwrap();
            assert_eq!(finished.error, None);
            assert_eq!(finished.store[path].nar, file_nar(b"a"));
        }
    }

    #[test]
    fn it_answers_a_command_it_lacks_as_nix_2_34_answers_export_paths() {
        let path = "/nix/store/00000000000000000000000000000000-a";
        let node = FakeNode::nix_2_34().with_file(path, &[], b"a");
        let (client, thread) = node.start();
        drop(client);
        assert_eq!(thread.join().unwrap().error, None);

        // ExportPaths by hand: the connection closes with Nix's error.
        let node = FakeNode::nix_2_34().with_file(path, &[], b"a");
        let (client_end, server_end) = UnixStream::pair().unwrap();
        let thread = std::thread::spawn(move || node.serve(server_end));
        let mut raw = client_end;
        raw.write_all(&le(serve::SERVE_MAGIC_1)).unwrap();
        let mut hello = [0u8; 16];
        raw.read_exact(&mut hello).unwrap();
        assert_eq!(hello[8..], le(0x207)[..]);
        let request = [le(0x207), le(5), le(0), le(1), s(path)].concat();
        raw.write_all(&request).unwrap();
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "nothing but the end of the stream");
        let finished = thread.join().unwrap();
        assert_eq!(
            finished.error.as_deref(),
            Some("error: unknown serve command 5")
        );
        // It read no further than the command it lacks.
        let read = [le(serve::SERVE_MAGIC_1), le(0x207), le(5)].concat();
        assert_eq!(finished.received, read);
    }
}
