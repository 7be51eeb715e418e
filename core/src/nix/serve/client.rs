//! A `nix-store --serve` client over any `Read` + `Write` pair: a local
//! child process ([`ServeProcess`]), an ssh child, or anything else that
//! carries the bytes.
//!
//! NARs and export streams are streamed through, never held whole: the
//! client parses just enough of them ([`crate::nix::nar`]) to know where they end.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Failure, Kind, KindOf};
use crate::nix::drv::Drv;
use crate::nix::nar;
use crate::nix::serve::{self, BuildResult, ExportTrailer, PathInfo};
use crate::nix::store_path::StorePath;
use crate::nix::wire::{WireError, WireReader, WireWriter};
use crate::sys::idle::IdleLimited;
use crate::sys::process::{stdin_of, stdout_of};
use crate::ticket::BuildOptions;

/// One conversation with a serve-protocol server.
///
/// After a method fails, the conversation may be out of step (a NAR half
/// read): drop the client rather than sending more.
pub struct ServeClient<R: Read, W: Write> {
    r: WireReader<BufReader<R>>,
    w: WireWriter<BufWriter<W>>,
    version: u64,
    /// Who the server is, for messages (`local store`, `nixbuild@node1`).
    peer: String,
}

/// One path of an export stream, as relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedPath {
    pub trailer: ExportTrailer,
    pub nar_size: u64,
}

fn io_fail(peer: &str, what: &str, e: &io::Error) -> Failure {
    Failure::transient(format!("{peer}: {what}: {e}"))
}

impl<R: Read, W: Write> ServeClient<R, W> {
    /// Says hello and agrees on a version.
    pub fn handshake(reader: R, writer: W, peer: impl Into<String>) -> Result<Self, Failure> {
        let peer = peer.into();
        let mut w = WireWriter::new(BufWriter::new(writer));
        let mut r = WireReader::new(BufReader::new(reader));
        serve::write_hello(&mut w)
            .and_then(|()| w.flush())
            .map_err(|e| io_fail(&peer, "sending the serve-protocol hello", &e))?;
        let server = serve::read_server_hello(&mut r)
            .and_then(serve::negotiate)
            .map_err(|e| e.fail(format!("{peer}: serve-protocol handshake")))?;
        serve::write_client_version(&mut w)
            .and_then(|()| w.flush())
            .map_err(|e| io_fail(&peer, "sending the client version", &e))?;
        Ok(ServeClient {
            r,
            w,
            version: server,
            peer,
        })
    }

    /// The protocol version in use (the lower of the server's and ours).
    pub fn version(&self) -> u64 {
        self.version
    }

    fn send(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut WireWriter<BufWriter<W>>) -> io::Result<()>,
    ) -> Result<(), Failure> {
        f(&mut self.w)
            .and_then(|()| self.w.flush())
            .map_err(|e| io_fail(&self.peer, what, &e))
    }

    fn recv<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut WireReader<BufReader<R>>) -> Result<T, WireError>,
    ) -> Result<T, Failure> {
        // Each answer is bounded as a whole (`Limits::max_message`).
        self.r.start_message();
        f(&mut self.r).map_err(|e| e.fail(format!("{}: {what}", self.peer)))
    }

    /// The subset of `paths` that is valid in the server's store. With
    /// `lock`, the server keeps temporary GC roots for them for the rest
    /// of the session (so that they survive until we are done).
    pub fn query_valid_paths<S: AsRef<str>>(
        &mut self,
        paths: &[S],
        lock: bool,
        substitute: bool,
    ) -> Result<Vec<StorePath>, Failure> {
        self.send("QueryValidPaths", |w| {
            serve::write_query_valid_paths(w, paths, lock, substitute)
        })?;
        self.recv("QueryValidPaths", serve::read_store_paths)
    }

    /// Information about the valid ones among `paths` (invalid paths are
    /// left out).
    pub fn query_path_infos<S: AsRef<str>>(
        &mut self,
        paths: &[S],
    ) -> Result<Vec<PathInfo>, Failure> {
        self.send("QueryPathInfos", |w| {
            serve::write_query_path_infos(w, paths)
        })?;
        let version = self.version;
        self.recv("QueryPathInfos", |r| serve::read_path_infos(r, version))
    }

    /// The closure of `paths` under references (a set, in no useful order).
    pub fn query_closure<S: AsRef<str>>(
        &mut self,
        paths: &[S],
        include_outputs: bool,
    ) -> Result<Vec<StorePath>, Failure> {
        self.send("QueryClosure", |w| {
            serve::write_query_closure(w, paths, include_outputs)
        })?;
        self.recv("QueryClosure", serve::read_store_paths)
    }

    /// Streams the NAR of `path` to `out`; returns its size.
    pub fn dump_store_path(
        &mut self,
        path: &StorePath,
        out: &mut (impl Write + ?Sized),
    ) -> Result<u64, Failure> {
        self.send("DumpStorePath", |w| serve::write_dump_store_path(w, path))?;
        nar::copy_nar(self.r.get_mut(), out).map_err(|e| {
            let message = format!("{}: the NAR of {path}: {e}", self.peer);
            Failure::caused_by(e.kind(), message, e)
        })
    }

    /// DumpStorePath, with the NAR handed to `read_nar`, which must read
    /// exactly one NAR (to stream it on, or unpack it) before the next
    /// command is sent. If `read_nar` fails, the conversation is out of step:
    /// drop the client.
    pub fn receive_nar<T>(
        &mut self,
        path: &StorePath,
        read_nar: impl FnOnce(&mut BufReader<R>) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        self.send("DumpStorePath", |w| serve::write_dump_store_path(w, path))?;
        read_nar(self.r.get_mut())
    }

    /// Who the server is, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// ImportPaths with the export stream written straight to the server by
    /// `write_stream` (a relay of some other export stream).
    pub fn import_paths_with(
        &mut self,
        write_stream: impl FnOnce(&mut dyn Write) -> Result<Vec<ExportedPath>, Failure>,
    ) -> Result<Vec<ExportedPath>, Failure> {
        self.send("ImportPaths", |w| w.u64(serve::Command::ImportPaths.into()))?;
        let paths = self.stream_to_server("sending the import stream", write_stream)?;
        self.send("ImportPaths", |_| Ok(()))?;
        self.recv("ImportPaths", |r| serve::read_ack(r, "ImportPaths"))?;
        Ok(paths)
    }

    /// ImportPaths carrying `infos` in that order (references first), each
    /// path's NAR written straight to the server by `write_nar` (typically
    /// another client's `dump_store_path`) and followed by the trailer made
    /// from its path info. Nothing is held in memory here; the server holds
    /// each NAR whole before it writes it to its store.
    pub fn import_paths_from(
        &mut self,
        infos: &[&PathInfo],
        mut write_nar: impl FnMut(&PathInfo, &mut dyn Write) -> Result<u64, Failure>,
    ) -> Result<(), Failure> {
        self.send("ImportPaths", |w| w.u64(serve::Command::ImportPaths.into()))?;
        for info in infos {
            self.send("ImportPaths", |w| w.u64(1))?;
            let what = format!("sending the NAR of {}", info.path);
            let size = self.stream_to_server(&what, |w| write_nar(info, w))?;
            check_nar_size(&self.peer, info, size)?;
            self.send("ImportPaths", |w| {
                serve::write_export_trailer(w, &ExportTrailer::for_path(info))
            })?;
        }
        self.send("ImportPaths", |w| w.u64(0))?;
        self.recv("ImportPaths", |r| serve::read_ack(r, "ImportPaths"))
    }

    /// AddToStoreNar with the NAR written straight to the server by
    /// `write_nar` — typically another client's `dump_store_path(path, w)`.
    /// `write_nar` returns the NAR's size, which must be `info.nar_size`.
    pub fn add_to_store_nar_with(
        &mut self,
        info: &PathInfo,
        write_nar: impl FnOnce(&mut dyn Write) -> Result<u64, Failure>,
    ) -> Result<u64, Failure> {
        self.send("AddToStoreNar", |w| serve::write_add_to_store_nar(w, info))?;
        let what = format!("sending the NAR of {}", info.path);
        let size = self.stream_to_server(&what, write_nar)?;
        check_nar_size(&self.peer, info, size)?;
        self.send("AddToStoreNar", |_| Ok(()))?;
        self.recv("AddToStoreNar", |r| serve::read_ack(r, "AddToStoreNar"))?;
        Ok(size)
    }

    /// Runs `write` on the server's input. When it fails because writing to
    /// the server failed (the server or the link went away), the failure is
    /// that write error, transient, whatever `write`'s own source made of it
    /// (the source sees only a failed write, and may call it its own).
    fn stream_to_server<T>(
        &mut self,
        what: &str,
        write: impl FnOnce(&mut dyn Write) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let mut to = WriteErrorKept {
            inner: self.w.get_mut(),
            error: None,
        };
        let result = write(&mut to);
        match (result, to.error) {
            (Err(_), Some(e)) => Err(io_fail(&self.peer, what, &e)),
            (result, _) => result,
        }
    }

    /// AddToStoreNar: `info` describes the path, the NAR is read from `nar`
    /// (exactly one NAR, streamed).
    #[cfg(any(test, feature = "test-util"))]
    pub fn add_to_store_nar(
        &mut self,
        info: &PathInfo,
        nar_source: &mut impl Read,
    ) -> Result<u64, Failure> {
        self.send("AddToStoreNar", |w| serve::write_add_to_store_nar(w, info))?;
        let peer = self.peer.clone();
        let size = nar::copy_nar(nar_source, self.w.get_mut()).map_err(|e| match e {
            nar::NarError::Write(e) => io_fail(&peer, "sending a NAR", &e),
            other => {
                let message = format!("reading the NAR of {}: {other}", info.path);
                Failure::caused_by(other.kind(), message, other)
            }
        })?;
        self.send("AddToStoreNar", |_| Ok(()))?;
        self.recv("AddToStoreNar", |r| serve::read_ack(r, "AddToStoreNar"))?;
        Ok(size)
    }

    /// BuildDerivation over a live connection (the build log goes to the
    /// server's stderr).
    pub fn build_derivation<S: AsRef<str>>(
        &mut self,
        drv: &Drv,
        input_closure: &[S],
        options: &BuildOptions,
    ) -> Result<BuildResult, Failure> {
        let version = self.version;
        self.send("BuildDerivation", |w| {
            serve::write_build_derivation(w, version, drv, input_closure, options)
        })?;
        self.recv("BuildDerivation", |r| serve::read_build_result(r, version))
    }
}

/// A writer that keeps its first error (a copy: `io::Error` is not `Clone`)
/// so that the caller can tell a failed write from a failed read.
struct WriteErrorKept<'a> {
    inner: &'a mut dyn Write,
    error: Option<io::Error>,
}

impl WriteErrorKept<'_> {
    fn keep(&mut self, e: io::Error) -> io::Error {
        if self.error.is_none() {
            self.error = Some(io::Error::new(e.kind(), e.to_string()));
        }
        e
    }
}

impl Write for WriteErrorKept<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).map_err(|e| self.keep(e))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().map_err(|e| self.keep(e))
    }
}

fn check_nar_size(peer: &str, info: &PathInfo, size: u64) -> Result<(), Failure> {
    if size == info.nar_size {
        return Ok(());
    }
    Err(Failure::permanent(format!(
        "{peer}: the NAR of {} has {size} bytes, its path info says {}",
        info.path, info.nar_size
    )))
}

/// A `nix-store --serve` child process: on this machine
/// ([`ServeProcess::spawn_local`]) or on a node through a transport's
/// command ([`ServeProcess::from_command`] with `ssh … nix-store --serve --write`).
pub struct ServeProcess {
    /// What to do, before the child is killed, when the server stalled
    /// (dropped first: see [`ServeProcess::when_stalled`]).
    on_stall: OnStall,
    child: ChildGuard,
    /// The conversation over the child's stdin and stdout.
    pub client: ServeClient<IdleLimited<ChildStdout>, IdleLimited<ChildStdin>>,
}

/// Runs its action when dropped, if the flag is set.
struct OnStall {
    stalled: Arc<AtomicBool>,
    action: Option<Box<dyn FnOnce()>>,
}

impl Drop for OnStall {
    fn drop(&mut self) {
        if self.stalled.load(Ordering::SeqCst) {
            if let Some(action) = self.action.take() {
                action();
            }
        }
    }
}

impl ServeProcess {
    /// Starts `<nix_bin_dir>/nix-store --serve [--write] [--store <uri>]`
    /// (an empty `store_uri` means Nix's default store, an empty
    /// `nix_bin_dir` the `nix-store` on PATH).
    pub fn spawn_local(
        nix_bin_dir: &str,
        store_uri: &str,
        write: bool,
    ) -> Result<ServeProcess, Failure> {
        let program = if nix_bin_dir.is_empty() {
            "nix-store".into()
        } else {
            Path::new(nix_bin_dir).join("nix-store")
        };
        let mut command = Command::new(&program);
        command.arg("--serve");
        if write {
            command.arg("--write");
        }
        let store = crate::nix::local_store::store_arg(store_uri);
        if let Some(uri) = store {
            command.arg("--store").arg(uri);
        }
        let peer = match store {
            None => "the local store".to_string(),
            Some(uri) => format!("the local store {uri}"),
        };
        ServeProcess::from_command(command, peer, None)
    }

    /// Starts `command` (a `nix-store --serve` of some kind: with its own
    /// environment, or behind ssh) and says hello. Its stderr is inherited.
    /// With `idle_limit`, a server that sends nothing (or takes nothing) for
    /// that long while it is awaited ends the conversation: a transient
    /// failure naming the peer and what was awaited; the child is killed
    /// when the process is dropped.
    pub fn from_command(
        mut command: Command,
        peer: impl Into<String>,
        idle_limit: Option<Duration>,
    ) -> Result<ServeProcess, Failure> {
        let program = command.get_program().to_string_lossy().into_owned();
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().map_err(|e| {
            let kind = if e.kind() == io::ErrorKind::NotFound {
                Kind::Config
            } else {
                Kind::Transient
            };
            Failure::new(kind, format!("starting {program}: {e}"))
        })?;
        let peer = peer.into();
        let stalled = Arc::new(AtomicBool::new(false));
        let pipes = stdin_of(&mut child).and_then(|stdin| {
            Ok((
                IdleLimited::new(stdin, idle_limit, "remote.io_timeout")?
                    .with_peer(&peer)
                    .flagging(stalled.clone()),
                IdleLimited::new(stdout_of(&mut child)?, idle_limit, "remote.io_timeout")?
                    .with_peer(&peer)
                    .flagging(stalled.clone()),
            ))
        });
        let child = ChildGuard(child);
        let (stdin, stdout) = pipes.map_err(|e| Failure::transient(format!("{program}: {e}")))?;
        let client = ServeClient::handshake(stdout, stdin, peer)?;
        Ok(ServeProcess {
            on_stall: OnStall {
                stalled,
                action: None,
            },
            child,
            client,
        })
    }

    /// `action` runs when this process is dropped after the server stalled
    /// (sent or took nothing within the idle limit), before the child is
    /// killed: e.g. stopping the ssh master, which would otherwise keep the
    /// stalled session, and the descriptors passed to it, for ever.
    #[must_use]
    pub fn when_stalled(mut self, action: impl FnOnce() + 'static) -> ServeProcess {
        self.on_stall.action = Some(Box::new(action));
        self
    }

    /// Whether the server stalled (see [`ServeProcess::when_stalled`]).
    #[must_use]
    pub fn stalled(&self) -> bool {
        self.on_stall.stalled.load(Ordering::SeqCst)
    }

    /// Ends the conversation (closing the server's stdin) and waits for it.
    pub fn finish(self) -> Result<(), Failure> {
        let status = self.finish_with_status()?;
        if !status.success() {
            return Err(Failure::transient(format!(
                "nix-store --serve ended with {status}"
            )));
        }
        Ok(())
    }

    /// Ends the conversation as [`ServeProcess::finish`] does, and says how
    /// the process ended (for a command that does more after the server).
    pub fn finish_with_status(self) -> Result<std::process::ExitStatus, Failure> {
        let ServeProcess {
            mut child,
            client,
            on_stall,
        } = self;
        drop(on_stall);
        drop(client);
        child
            .0
            .wait()
            .map_err(|e| Failure::transient(format!("waiting for nix-store --serve: {e}")))
    }
}

/// Kills and reaps the child if it is still running when dropped (an early
/// return on error), so that no orphan or zombie is left behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::nix::store_path::test_path;
    use crate::nix::wire::test_bytes::{le, s};

    const A: &str = "/s/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-a";
    const B: &str = "/s/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-b";
    const X: &str = "/s/2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c-x";

    /// A whole conversation, byte for byte: what the client sends given
    /// what a 2.8 server answers.
    #[test]
    fn a_conversation_transcript() {
        let nar = {
            let mut out = Vec::new();
            nar::write::nar(
                &mut out,
                &nar::write::Node::Regular {
                    executable: false,
                    contents: b"hi",
                },
            )
            .unwrap();
            out
        };
        let server = [
            le(serve::SERVE_MAGIC_2),
            le(0x207),
            // QueryValidPaths → one valid
            le(1),
            s(A),
            // QueryClosure → two
            le(2),
            s(A),
            s(B),
            // DumpStorePath → the NAR
            nar.clone(),
        ]
        .concat();
        let mut sent = Vec::new();
        {
            let mut client = ServeClient::handshake(&server[..], &mut sent, "test").unwrap();
            assert_eq!(client.version(), 0x207);
            let valid = client.query_valid_paths(&[A, X], true, false).unwrap();
            assert_eq!(valid, [A]);
            let closure = client.query_closure(&[A], false).unwrap();
            assert_eq!(closure, [A, B]);
            let mut dumped = Vec::new();
            client.dump_store_path(&test_path(A), &mut dumped).unwrap();
            assert_eq!(dumped, nar);
            // The server has nothing more to say: a clean, transient error.
            let err = client.query_closure(&[A], false).unwrap_err();
            assert_eq!(err.kind, Kind::Transient);
            assert!(
                err.message.starts_with("test: QueryClosure: "),
                "{}",
                err.message
            );
        }
        let expected = [
            le(serve::SERVE_MAGIC_1),
            le(serve::CLIENT_VERSION),
            le(1),
            le(1),
            le(0),
            le(2),
            s(A),
            s(X),
            le(7),
            le(0),
            le(1),
            s(A),
            le(3),
            s(A),
            le(7),
            le(0),
            le(1),
            s(A),
        ]
        .concat();
        assert_eq!(sent, expected);
    }

    /// A writer that takes `room` bytes, then fails as a dropped ssh
    /// connection does.
    struct GoesAway {
        room: usize,
    }

    impl Write for GoesAway {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the node went away",
                ));
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_server_that_goes_away_mid_nar_is_the_failure_not_the_source() {
        let server = [le(serve::SERVE_MAGIC_2), le(0x207)].concat();
        let writer = GoesAway { room: 4096 };
        let mut client = ServeClient::handshake(&server[..], writer, "node1").unwrap();
        let info = PathInfo {
            nar_size: 1 << 20,
            ..PathInfo::new(test_path(A))
        };
        // The source reports its own failure, as a local DumpStorePath
        // whose output was refused would.
        let err = client
            .add_to_store_nar_with(&info, |to| {
                to.write_all(&vec![0u8; 1 << 20])
                    .map_err(|e| Failure::permanent(format!("the local store: {e}")))?;
                Ok(1 << 20)
            })
            .unwrap_err();
        assert_eq!(err.kind, Kind::Transient);
        assert_eq!(
            err.message,
            format!("node1: sending the NAR of {A}: the node went away")
        );
    }

    #[test]
    fn a_nar_of_another_size_than_its_info_is_refused() {
        let server = [le(serve::SERVE_MAGIC_2), le(0x207)].concat();
        let mut client = ServeClient::handshake(&server[..], Vec::new(), "node1").unwrap();
        let info = PathInfo {
            nar_size: 16,
            ..PathInfo::new(test_path(A))
        };
        let err = client
            .import_paths_from(&[&info], |_, to| {
                to.write_all(&[0u8; 8])
                    .map_err(|e| Failure::transient(e.to_string()))?;
                Ok(8)
            })
            .unwrap_err();
        assert_eq!(err.kind, Kind::Permanent);
        assert!(
            err.message.contains("has 8 bytes, its path info says 16"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_server_of_another_major_version_is_refused() {
        let server = [le(serve::SERVE_MAGIC_2), le(0x307)].concat();
        let err = ServeClient::handshake(&server[..], Vec::new(), "node1")
            .err()
            .unwrap();
        assert_eq!(err.kind, Kind::Permanent);
        assert!(
            err.message.contains("serve protocol 3.7"),
            "{}",
            err.message
        );
    }
}
