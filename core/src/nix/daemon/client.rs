//! A worker-protocol client over any `Read` + `Write` pair ([`DaemonClient`]),
//! the daemon's Unix socket ([`connect`]), and which socket serves a store
//! ([`socket_for_store`]).

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::error::{Failure, KindOf};
use crate::nix::daemon::{self, DaemonInfo, Stderr};
use crate::nix::serve::read_store_paths;
use crate::nix::store_path::StorePath;
use crate::nix::wire::{WireReader, WireWriter};

/// One conversation with a daemon worker (one per connection: the daemon
/// forks a worker, with a store of its own, for each).
///
/// After a method fails, the conversation may be out of step: drop the
/// client rather than sending more.
pub struct DaemonClient<R: Read, W: Write> {
    r: WireReader<BufReader<R>>,
    w: WireWriter<BufWriter<W>>,
    version: u64,
    info: DaemonInfo,
    /// Who the daemon is, for messages (`the Nix daemon at /nix/var/…`).
    peer: String,
}

/// A conversation over the daemon's socket.
pub type DaemonConnection = DaemonClient<UnixStream, UnixStream>;

fn io_fail(peer: &str, what: &str, e: &io::Error) -> Failure {
    Failure::transient(format!("{peer}: {what}: {e}"))
}

impl<R: Read, W: Write> DaemonClient<R, W> {
    /// Says hello, agrees on a version, sends the obsolete words, reads
    /// what the daemon tells about itself and its start-up messages.
    pub fn handshake(reader: R, writer: W, peer: impl Into<String>) -> Result<Self, Failure> {
        let peer = peer.into();
        let mut w = WireWriter::new(BufWriter::new(writer));
        let mut r = WireReader::new(BufReader::new(reader));
        daemon::write_hello(&mut w)
            .and_then(|()| w.flush())
            .map_err(|e| io_fail(&peer, "sending the worker-protocol hello", &e))?;
        let version = daemon::read_daemon_hello(&mut r)
            .and_then(daemon::negotiate)
            .map_err(|e| e.fail(format!("{peer}: worker-protocol handshake")))?;
        daemon::write_obsolete_fields(&mut w, version)
            .and_then(|()| w.flush())
            .map_err(|e| io_fail(&peer, "sending the handshake's last words", &e))?;
        let info = daemon::read_daemon_info(&mut r, version)
            .map_err(|e| e.fail(format!("{peer}: worker-protocol handshake")))?;
        let mut client = DaemonClient {
            r,
            w,
            version,
            info,
            peer,
        };
        client.process_stderr("the daemon's greeting")?;
        Ok(client)
    }

    /// The protocol version in use (the lower of the daemon's and ours).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// What the daemon told about itself.
    pub fn info(&self) -> &DaemonInfo {
        &self.info
    }

    /// The subset of `paths` valid in the daemon's store now (never
    /// substituted).
    pub fn query_valid_paths<S: AsRef<str>>(
        &mut self,
        paths: &[S],
    ) -> Result<Vec<StorePath>, Failure> {
        let version = self.version;
        daemon::write_query_valid_paths(&mut self.w, version, paths, false)
            .and_then(|()| self.w.flush())
            .map_err(|e| io_fail(&self.peer, "sending QueryValidPaths", &e))?;
        self.process_stderr("QueryValidPaths")?;
        self.r.start_message();
        read_store_paths(&mut self.r)
            .map_err(|e| e.fail(format!("{}: the answer to QueryValidPaths", self.peer)))
    }

    /// Reads the daemon's messages up to STDERR_LAST; its log lines and
    /// activities go to the debug log, its error becomes the failure (with
    /// the [`daemon::DaemonError`] as its cause).
    fn process_stderr(&mut self, what: &str) -> Result<(), Failure> {
        loop {
            self.r.start_message();
            let message = daemon::read_stderr(&mut self.r, self.version)
                .map_err(|e| e.fail(format!("{}: {what}", self.peer)))?;
            match message {
                Stderr::Last => return Ok(()),
                Stderr::Error(error) => {
                    let text = format!("{}: {what}: {error}", self.peer);
                    return Err(Failure::caused_by(error.kind(), text, error));
                }
                Stderr::Next(line) => {
                    crate::log_debug!("{}: {}", self.peer, daemon::without_colours(&line));
                }
                Stderr::StartActivity { text, .. } if !text.is_empty() => {
                    crate::log_debug!("{}: {}", self.peer, daemon::without_colours(&text));
                }
                Stderr::StartActivity { .. }
                | Stderr::StopActivity { .. }
                | Stderr::Result { .. } => {}
            }
        }
    }
}

/// How long one read or write on the daemon's socket may wait.
pub const DAEMON_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Connects to the daemon at `socket` and says hello. `None` when there is
/// no daemon to talk to there (no socket, or nothing listening): the caller
/// asks some other way. A daemon that answers wrongly is a failure.
pub fn connect(socket: &Path) -> Result<Option<DaemonConnection>, Failure> {
    let stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(e) => {
            crate::log_debug!("no Nix daemon at {}: {e}", socket.display());
            return Ok(None);
        }
    };
    let peer = format!("the Nix daemon at {}", socket.display());
    // A daemon that accepts and then stalls (a worker stuck on a lock)
    // fails the question instead of hanging the tool.
    stream
        .set_read_timeout(Some(DAEMON_IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(DAEMON_IO_TIMEOUT)))
        .map_err(|e| io_fail(&peer, "setting the socket's time limits", &e))?;
    let reader = stream
        .try_clone()
        .map_err(|e| io_fail(&peer, "duplicating the socket", &e))?;
    DaemonClient::handshake(reader, stream, peer).map(Some)
}

/// The socket of the daemon that serves the store `uri`, if one does:
/// `daemon`, `unix://PATH` (`unix://`: the default socket), and Nix's default store (`""`, `auto`, unless
/// `NIX_REMOTE` names another) and `local` (the store the daemon serves,
/// when there is one). `None` for any other store, and for any URI with
/// parameters (`local?root=…`, `daemon?…`): the daemon serves none of
/// those as they are meant. `env` reads an environment variable.
pub fn socket_for_store(uri: &str, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |name: &str| env(name).filter(|value| !value.is_empty());
    let uri = match uri {
        "" | "auto" => set("NIX_REMOTE").unwrap_or_else(|| "auto".into()),
        other => other.to_string(),
    };
    if uri.contains('?') {
        return None;
    }
    match uri.strip_prefix("unix://") {
        Some(path) if !path.is_empty() => return Some(PathBuf::from(path)),
        _ => {}
    }
    if !matches!(uri.as_str(), "auto" | "daemon" | "local" | "unix://") {
        return None;
    }
    if let Some(path) = set("NIX_DAEMON_SOCKET_PATH") {
        return Some(PathBuf::from(path));
    }
    let state_dir = set("NIX_STATE_DIR").unwrap_or_else(|| "/nix/var/nix".into());
    Some(Path::new(&state_dir).join("daemon-socket/socket"))
}
