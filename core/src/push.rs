//! `nsh-push`: copy into the allocated node's store the input paths it lacks.
//!
//! One serve-protocol conversation with the node (`nix-store --serve --write`
//! over the ticket's shared ssh connection): QueryValidPaths with `lock` (the
//! node keeps temporary GC roots on what it already has, so nothing we rely on
//! is collected before the build), then one ImportPaths stream carrying every
//! missing path in dependency order — one round trip however many paths.
//!
//! The stream comes from the local store as an export stream and is relayed
//! as it arrives, never held whole: by default from a local
//! `nix-store --serve` (ExportPaths), or from a `nix-store --export` process;
//! AddToStoreNar per path is the third [`Method`]. All three were measured:
//! `docs/benchmarks.md`.
//!
//! Two pushes to the same node that need the same missing path must copy it
//! once: "query + import" runs under a per-node flock, so the second push
//! queries after the first has imported, and finds the path present.
//!
//! The node imports atomically per path (a path becomes valid only after its
//! whole NAR arrived and was written), so a connection that drops mid-stream
//! leaves nothing invalid registered; the push is retried once, then fails
//! as transient (75).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Failure, Kind, ResultExt};
use crate::nar;
use crate::serve::{self, PathInfo};
use crate::serve_client::ServeProcess;
use crate::store::LocalStore;
use crate::ticket::{AllocSection, PushSection, Ticket};
use crate::transfer::{self, FileLock, TransferProgress};
use crate::transport::{Ssh, Transport};
use crate::wire::{WireError, WireReader, WireWriter};
use crate::{log_info, log_warn};

/// How the missing paths travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// One ImportPaths stream for all paths, read from ExportPaths of the
    /// local `nix-store --serve` that also answered the path-info query.
    #[default]
    Import,
    /// One ImportPaths stream, read from a `nix-store --export` process.
    ImportExport,
    /// AddToStoreNar per path (one acknowledgement each), the NAR read
    /// from DumpStorePath of the local `nix-store --serve`. The node
    /// streams each NAR to disk, where ImportPaths on Nix 2.8 holds it in
    /// memory first.
    AddToStoreNar,
}

impl Method {
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "import" => Some(Method::Import),
            "import-export" => Some(Method::ImportExport),
            "add-to-store-nar" => Some(Method::AddToStoreNar),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Method::Import => "import",
            Method::ImportExport => "import-export",
            Method::AddToStoreNar => "add-to-store-nar",
        }
    }
}

/// How many times a transient failure (ssh refused, connection dropped) is
/// tried again.
pub const RETRIES: u32 = 1;
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Pushes the ticket's closure to its allocation; records the ssh master's
/// socket in `alloc.control` and returns the `push` section.
pub fn push(
    ticket: &mut Ticket,
    config: &Config,
    method: Method,
    progress: &mut dyn TransferProgress,
) -> Result<PushSection, Failure> {
    let started = Instant::now();
    let closure = ticket.need_closure()?.paths.clone();
    let mut alloc = ticket.need_alloc()?.clone();
    let store_uri = ticket.store.as_ref().map_or("", |s| s.uri.as_str());
    let local = LocalStore::new(store_uri, "")?;
    for path in &closure {
        local
            .dir
            .parse(path)
            .map_err(|e| e.context("ticket closure.paths"))?;
    }

    let mut attempt = 0;
    let outcome = loop {
        match push_once(&closure, &mut alloc, config, &local, method, progress) {
            Err(failure) if failure.kind == Kind::Transient && attempt < RETRIES => {
                attempt += 1;
                log_warn!("{failure}; trying again");
                std::thread::sleep(RETRY_PAUSE);
            }
            other => break other,
        }
    };
    // The master's socket is worth recording even when the push failed: the
    // next tool (or the hook's cleanup) closes it.
    ticket.alloc = Some(alloc);
    let (copied, bytes) = outcome?;
    Ok(PushSection {
        copied,
        present: closure.len() as u64 - copied,
        bytes,
        secs: started.elapsed().as_secs_f64(),
        extra: Default::default(),
    })
}

/// One attempt: returns (paths copied, NAR bytes sent).
fn push_once(
    closure: &[String],
    alloc: &mut AllocSection,
    config: &Config,
    local: &LocalStore,
    method: Method,
    progress: &mut dyn TransferProgress,
) -> Result<(u64, u64), Failure> {
    if closure.is_empty() {
        return Ok((0, 0));
    }
    let ssh = Ssh::ensure_master(alloc, &config.ssh)?;
    let _lock = FileLock::acquire(&node_lock_path(alloc, &ssh)?)?;

    let argv = transfer::remote_serve_argv(&config.remote);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut remote = ServeProcess::from_command(ssh.command(&argv), ssh.describe())?;
    let present: BTreeSet<String> = remote
        .client
        .query_valid_paths(closure, true, false)?
        .into_iter()
        .collect();
    // The closure is in dependency order; so is `missing`.
    let missing: Vec<&str> = closure
        .iter()
        .filter(|p| !present.contains(*p))
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        log_info!("{}: all {} paths present", ssh.describe(), closure.len());
        remote.finish()?;
        return Ok((0, 0));
    }

    let mut local_serve = local.serve(false)?;
    let infos = local_serve.client.query_path_infos(&missing)?;
    if infos.len() != missing.len() {
        let known: BTreeSet<&str> = infos.iter().map(|i| i.path.as_str()).collect();
        let absent: Vec<&str> = missing
            .iter()
            .copied()
            .filter(|p| !known.contains(p))
            .collect();
        return Err(Failure::input(format!(
            "{} path(s) of the closure are not valid in the local store: {}",
            absent.len(),
            absent.join(" ")
        )));
    }
    let total: u64 = infos.iter().map(|i| i.nar_size).sum();
    log_info!(
        "{}: copying {} of {} paths ({})",
        ssh.describe(),
        missing.len(),
        closure.len(),
        transfer::human_bytes(total)
    );
    progress.begin(missing.len() as u64, total);

    let infos: BTreeMap<&str, &PathInfo> = infos.iter().map(|i| (i.path.as_str(), i)).collect();
    let sent = match method {
        Method::Import => {
            let stream = local_serve.client.start_export(&missing)?;
            relay_import(&mut remote, stream, progress)?
        }
        Method::ImportExport => {
            let mut child = export_command(local, &missing)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .or_fail(Kind::Transient, || "starting nix-store --export")?;
            let stdout = child.stdout.take().expect("piped");
            let result = relay_import(
                &mut remote,
                BufReader::with_capacity(1 << 16, stdout),
                progress,
            );
            if result.is_err() {
                let _ = child.kill();
            }
            let status = child.wait();
            let sent = result?;
            let status = status.or_fail(Kind::Transient, || "waiting for nix-store --export")?;
            if !status.success() {
                return Err(Failure::transient(format!(
                    "nix-store --export ended with {status}"
                )));
            }
            sent
        }
        Method::AddToStoreNar => {
            let mut sent = Vec::with_capacity(missing.len());
            for path in &missing {
                let info = infos[path];
                let local_client = &mut local_serve.client;
                let progress = &mut *progress;
                let peer = remote.client.peer().to_string();
                remote.client.add_to_store_nar_with(info, |w| {
                    let mut to = WriteSide {
                        inner: w,
                        failed: false,
                    };
                    let mut counting = CountingWriter {
                        inner: &mut to,
                        progress: &mut *progress,
                    };
                    let result = local_client.dump_store_path(path, &mut counting);
                    match result {
                        // The write side failed: the node went away, not the
                        // local store.
                        Err(e) if to.failed => Err(Failure::transient(format!(
                            "{peer}: sending the NAR of {path}: {}",
                            e.message.rsplit(": ").next().unwrap_or_default()
                        ))),
                        other => other,
                    }
                })?;
                progress.path_done();
                sent.push(path.to_string());
            }
            sent
        }
    };
    progress.end();
    remote.finish()?;
    local_serve.finish()?;
    let sent: BTreeSet<String> = sent.into_iter().collect();
    if let Some(lost) = missing.iter().find(|p| !sent.contains(**p)) {
        return Err(Failure::permanent(format!(
            "the local export stream did not carry {lost}"
        )));
    }
    Ok((
        missing.len() as u64,
        missing.iter().map(|p| infos[p].nar_size).sum(),
    ))
}

/// ImportPaths on `remote`, the export stream relayed from `source` entry
/// by entry (so that progress can count paths). Returns the paths sent.
fn relay_import<R: Read>(
    remote: &mut ServeProcess,
    source: R,
    progress: &mut dyn TransferProgress,
) -> Result<Vec<String>, Failure> {
    let peer = remote.client.peer().to_string();
    // Bytes are counted as they are read, paths as their entries end: both
    // report to the same progress.
    let progress = RefCell::new(progress);
    let mut source = WireReader::new(SharedCounting {
        inner: source,
        progress: &progress,
    });
    let mut sent = Vec::new();
    remote.client.import_paths_with(|w| {
        let mut to = WriteSide {
            inner: w,
            failed: false,
        };
        let result = relay_entries(&mut source, &mut to, |path| {
            progress.borrow_mut().path_done();
            sent.push(path);
        });
        result.map_err(|e| match e {
            WireError::Io(e) if to.failed => {
                Failure::transient(format!("{peer}: sending the import stream: {e}"))
            }
            other => other.fail("reading the local export stream"),
        })?;
        Ok(Vec::new())
    })?;
    Ok(sent)
}

/// Copies an export stream entry by entry, calling `entry_done` with each
/// path once its entry is through.
fn relay_entries<R: Read, W: Write>(
    r: &mut WireReader<R>,
    out: &mut W,
    mut entry_done: impl FnMut(String),
) -> Result<(), WireError> {
    loop {
        match r.u64()? {
            0 => {
                out.write_all(&0u64.to_le_bytes())?;
                return Ok(out.flush()?);
            }
            1 => {
                out.write_all(&1u64.to_le_bytes())?;
                nar::copy_nar(r.get_mut(), out)?;
                let trailer = serve::read_export_trailer(r)?;
                serve::write_export_trailer(&mut WireWriter::new(&mut *out), &trailer)?;
                entry_done(trailer.path);
            }
            n => {
                return Err(WireError::Unexpected(format!(
                    "export stream: expected 0 or 1 before an entry, got {n}"
                )))
            }
        }
    }
}

/// A reader that reports the bytes it passes to a shared progress.
struct SharedCounting<'a, 'p, R> {
    inner: R,
    progress: &'a RefCell<&'p mut dyn TransferProgress>,
}

impl<R: Read> Read for SharedCounting<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.borrow_mut().bytes(n as u64);
        Ok(n)
    }
}

/// Remembers whether a write failed, to tell the node going away from the
/// local source failing.
struct WriteSide<'a> {
    inner: &'a mut dyn Write,
    failed: bool,
}

impl Write for WriteSide<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf).inspect_err(|_| self.failed = true)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush().inspect_err(|_| self.failed = true)
    }
}

/// Reports the bytes written to a progress.
struct CountingWriter<'a, 'p> {
    inner: &'a mut dyn Write,
    progress: &'p mut dyn TransferProgress,
}

impl Write for CountingWriter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.bytes(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn export_command(local: &LocalStore, paths: &[&str]) -> Command {
    let mut command = Command::new("nix-store");
    if !local.uri.is_empty() {
        command.arg("--store").arg(&local.uri);
    }
    command.arg("--export").args(paths);
    command
}

/// The per-node lock file, next to the ssh control socket (a private
/// directory of the calling user): `push-<cluster>-<node>.lock`.
fn node_lock_path(alloc: &AllocSection, ssh: &Ssh) -> Result<PathBuf, Failure> {
    let dir = ssh
        .control_path()
        .and_then(|p| p.parent())
        .ok_or_else(|| Failure::transient("no ssh control directory for the push lock"))?;
    let node = if alloc.node.is_empty() {
        &alloc.ssh
    } else {
        &alloc.node
    };
    Ok(dir.join(format!(
        "push-{}-{}.lock",
        transfer::file_name_safe(&alloc.cluster),
        transfer::file_name_safe(node)
    )))
}
