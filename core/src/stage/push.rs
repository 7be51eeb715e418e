//! `nsh-push`: copy into the allocated node's store the input paths it lacks.
//!
//! One serve-protocol conversation with the node (`nix-store --serve --write`
//! over the ticket's shared ssh connection): QueryValidPaths with `lock` (the
//! node keeps temporary GC roots on what it already has, so nothing we rely on
//! is collected before the build), then the missing paths in dependency
//! order, each NAR made here from the local store's files as it is sent
//! ([`crate::nix::dump`], as `nix-copy-closure` does), never held whole.
//! A store whose files nsh cannot read sends through its DumpStorePath.
//!
//! How they travel depends on what the node's serve protocol has, known from
//! the version the handshake agreed on (never from `nix-store --version`):
//! AddToStoreNar per path from serve 2.5 (every Nix nsh meets: 2.8 – 2.35
//! all agree on 2.7 with us), which the node streams to disk; ImportPaths
//! for an older peer, which holds each NAR in memory on the node. Both are
//! in every version that has them, unlike ExportPaths, which Nix 2.32
//! removed without a version bump and which push therefore never needs:
//! the import stream is assembled here from path infos and DumpStorePath.
//! The methods were measured: `docs/benchmarks.md`.
//!
//! Two pushes to the same node that need the same missing path must copy it
//! once: "query + import" runs under a per-node flock, so the second push
//! queries after the first has imported, and finds the path present.
//!
//! A path becomes valid on the node only after its whole NAR arrived and
//! matched its hash, so a connection that drops mid-stream leaves nothing
//! invalid registered (AddToStoreNar leaves an unregistered partial
//! directory, which Nix deletes before the next import of that path); the
//! push is retried once, then fails as transient (75).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Failure, Kind, KindOf, ResultExt};
use crate::nix::dump::{self, DumpError};
use crate::nix::local_store::LocalStore;
use crate::nix::nar::{self, NarError};
use crate::nix::serve::client::{ServeClient, ServeProcess};
use crate::nix::serve::{self, PathInfo};
use crate::nix::store_path::StorePath;
use crate::nix::wire::{WireError, WireReader, WireWriter};
use crate::stage::progress::{human_bytes, Reporting, TransferProgress};
use crate::stage::retry;
use crate::stage::ssh::Ssh;
use crate::sys::flock::{FileLock, LockError};
use crate::sys::process::stdout_of;
use crate::ticket::{AllocSection, PushSection, Ticket};
use crate::{log_debug, log_info};

/// How the missing paths travel (`nsh-push --method`, whose names are
/// `nsh-push`'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// AddToStoreNar when the node's serve protocol has it (≥ 2.5), else
    /// `Import`.
    #[default]
    Auto,
    /// AddToStoreNar per path (one acknowledgement each), the NAR read from
    /// DumpStorePath of the local `nix-store --serve`. The node streams each
    /// NAR to its place as it arrives.
    AddToStoreNar,
    /// One ImportPaths stream for all paths, assembled from the local
    /// `nix-store --serve`'s path infos and DumpStorePath. The node holds
    /// each NAR in memory before writing it.
    Import,
    /// One ImportPaths stream, read from a `nix-store --export` process.
    ImportExport,
}

impl Method {
    /// How paths travel to a node whose conversation runs at serve protocol
    /// `version`: `Auto` resolved; an explicit AddToStoreNar that the node
    /// does not have refused (exit 78).
    pub fn route_for(self, version: u64) -> Result<Route, Failure> {
        let has_add_to_store_nar = serve::has_add_to_store_nar(version);
        match self {
            Method::Auto if has_add_to_store_nar => Ok(Route::AddToStoreNar),
            Method::Auto | Method::Import => Ok(Route::ImportPaths),
            Method::AddToStoreNar if has_add_to_store_nar => Ok(Route::AddToStoreNar),
            Method::AddToStoreNar => Err(Failure::config(format!(
                "the node speaks serve protocol {}, which has no AddToStoreNar (it came in \
                 {}.{}); use --method auto or import",
                serve::version_text(version),
                serve::major(version),
                serve::MINOR_ADD_TO_STORE_NAR
            ))),
            Method::ImportExport => Ok(Route::ImportPathsFromExportProcess),
        }
    }
}

/// How paths travel to one node: a [`Method`] resolved against what the
/// node's serve protocol has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    AddToStoreNar,
    ImportPaths,
    ImportPathsFromExportProcess,
}

impl Route {
    /// For log lines.
    pub const fn describe(self) -> &'static str {
        match self {
            Route::AddToStoreNar => "AddToStoreNar",
            Route::ImportPaths => "ImportPaths",
            Route::ImportPathsFromExportProcess => "ImportPaths from nix-store --export",
        }
    }
}

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
    let local = LocalStore::new(ticket.store_uri(), "")?;
    for path in &closure {
        local
            .dir
            .check(path)
            .map_err(|e| e.context("ticket closure.paths"))?;
    }

    if !closure.is_empty() && crate::stage::alloc::pooled::known_on_node(config, &alloc, &closure) {
        // What nsh put on this node is there still, unless the node's
        // garbage collector took it: nsh-run's request asks the node first,
        // and a build that lacked an input fails as transient (and is tried
        // again, pushing). One ssh session and one `nix-store` fewer per
        // build of a DAG's chain.
        log_info!(
            "{}: the pool knows it holds all {} paths; not asked",
            alloc.node,
            closure.len()
        );
        return Ok(PushSection {
            present: closure.len() as u64,
            secs: started.elapsed().as_secs_f64(),
            by_locality: true,
            ..PushSection::default()
        });
    }
    let outcome =
        retry::transient(|| push_once(&closure, &mut alloc, config, &local, method, progress));
    // The master's socket is worth recording even when the push failed: the
    // next tool (or the hook's cleanup) closes it.
    if outcome.is_ok() {
        // The whole closure is on the node now (for the pool's locality).
        crate::stage::alloc::pooled::note_paths(config, &alloc, &closure);
    }
    ticket.alloc = Some(alloc);
    let (copied, bytes) = outcome?;
    Ok(PushSection {
        copied,
        present: closure.len() as u64 - copied,
        bytes,
        secs: started.elapsed().as_secs_f64(),
        by_locality: false,
        extra: crate::ticket::Extra::default(),
    })
}

/// One attempt: returns (paths copied, NAR bytes sent).
///
/// The node is asked first without the per-node lock: in a DAG's chain the
/// node mostly has everything already, and several builds on one node then
/// do not wait for each other. Only when something is missing is the lock
/// taken and the node asked again, so that two pushes needing the same path
/// copy it once (the second finds it present).
fn push_once(
    closure: &[StorePath],
    alloc: &mut AllocSection,
    config: &Config,
    local: &LocalStore,
    method: Method,
    progress: &mut dyn TransferProgress,
) -> Result<(u64, u64), Failure> {
    if closure.is_empty() {
        return Ok((0, 0));
    }
    let ssh = Ssh::ensure_master(alloc, config)?;
    let argv = crate::stage::ssh::remote_serve_argv(&config.remote);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut remote = ServeProcess::from_command(
        ssh.command(&argv),
        ssh.describe(),
        Some(Duration::from_secs(config.remote.io_timeout_s)),
    )?
    .when_stalled(crate::stage::ssh::stop_master_of(&ssh));
    if missing_on_node(&mut remote, closure)?.is_empty() {
        log_info!("{}: all {} paths present", ssh.describe(), closure.len());
        remote.finish()?;
        return Ok((0, 0));
    }
    let _lock = push_lock(alloc, &ssh, config)?;
    let missing = missing_on_node(&mut remote, closure)?;
    if missing.is_empty() {
        log_info!(
            "{}: all {} paths present (another push copied the rest)",
            ssh.describe(),
            closure.len()
        );
        remote.finish()?;
        return Ok((0, 0));
    }
    let mut local_serve = local.serve(false)?;
    let infos = local_path_infos(&mut local_serve.client, &missing)?;
    let infos: Vec<&PathInfo> = infos.iter().collect();
    let total: u64 = infos.iter().map(|i| i.nar_size).sum();
    let version = remote.client.version();
    let route = method.route_for(version)?;
    log_info!(
        "{}: copying {} of {} paths ({}) with {}",
        ssh.describe(),
        missing.len(),
        closure.len(),
        human_bytes(total),
        route.describe()
    );
    log_debug!(
        "{}: serve protocol {}",
        ssh.describe(),
        serve::version_text(version)
    );
    progress.begin(missing.len() as u64, total);
    match route {
        Route::ImportPathsFromExportProcess => {
            send_from_export_process(&mut remote, local, &infos, progress)?;
        }
        Route::AddToStoreNar | Route::ImportPaths => {
            let real_dir = local.real_dir();
            let mut source = if real_dir.is_dir() {
                NarSource::Files(&real_dir)
            } else {
                NarSource::Serve(&mut local_serve.client)
            };
            send_paths(&mut remote.client, &mut source, &infos, route, progress)?;
        }
    }
    progress.end();
    remote.finish()?;
    local_serve.finish()?;
    Ok((infos.len() as u64, total))
}

/// The paths of `closure` (in dependency order; so is the answer) that the
/// node lacks. QueryValidPaths with `lock`: the node keeps what it has as
/// temporary GC roots for the rest of the conversation.
fn missing_on_node<'c>(
    remote: &mut ServeProcess,
    closure: &'c [StorePath],
) -> Result<Vec<&'c StorePath>, Failure> {
    let present: BTreeSet<StorePath> = remote
        .client
        .query_valid_paths(closure, true, false)?
        .into_iter()
        .collect();
    Ok(closure.iter().filter(|p| !present.contains(*p)).collect())
}

/// The per-node push lock, within `remote.lock_timeout`.
fn push_lock(alloc: &AllocSection, ssh: &Ssh, config: &Config) -> Result<FileLock, Failure> {
    let lock_path = node_lock_path(alloc, ssh)?;
    let lock_limit = Duration::from_secs(config.remote.lock_timeout_s);
    FileLock::acquire(&lock_path, lock_limit).map_err(|e| match e {
        LockError::Open(_) => {
            Failure::transient(format!("opening the lock {}: {e}", lock_path.display()))
        }
        LockError::Lock(_) => Failure::transient(format!(
            "locking {} (the push lock of {}): {e}{}",
            lock_path.display(),
            alloc.node,
            crate::stage::ssh::lock_timeout_hint(&e)
        )),
    })
}

/// The path infos of `missing` in the local store, in the same order. A path
/// that is not valid there is bad input, named.
fn local_path_infos<R: Read, W: Write>(
    local: &mut ServeClient<R, W>,
    missing: &[&StorePath],
) -> Result<Vec<PathInfo>, Failure> {
    let mut infos: BTreeMap<StorePath, PathInfo> = local
        .query_path_infos(missing)?
        .into_iter()
        .map(|i| (i.path.clone(), i))
        .collect();
    let absent: Vec<&str> = missing
        .iter()
        .filter(|p| !infos.contains_key(**p))
        .map(|p| p.as_str())
        .collect();
    if !absent.is_empty() {
        return Err(Failure::input(format!(
            "{} path(s) of the closure are not valid in the local store: {}",
            absent.len(),
            absent.join(" ")
        )));
    }
    Ok(missing.iter().filter_map(|p| infos.remove(*p)).collect())
}

/// Where the NARs sent come from.
enum NarSource<'a, R: Read, W: Write> {
    /// The store's files in this directory (its real location), read here.
    Files(&'a std::path::Path),
    /// DumpStorePath of a local `nix-store --serve`.
    Serve(&'a mut ServeClient<R, W>),
}

impl<R: Read, W: Write> NarSource<'_, R, W> {
    /// Writes the NAR of `path` to `to`; its size.
    fn dump(&mut self, path: &StorePath, to: &mut dyn Write) -> Result<u64, Failure> {
        match self {
            NarSource::Serve(local) => local.dump_store_path(path, to),
            NarSource::Files(dir) => dump::dump(&dir.join(path.basename()), to).map_err(|e| {
                let kind = match e {
                    DumpError::Write(_) => Kind::Transient,
                    _ => Kind::Permanent,
                };
                Failure::caused_by(kind, format!("the NAR of {path}: {e}"), e)
            }),
        }
    }
}

/// Sends `infos` (in dependency order) to `remote` with AddToStoreNar or
/// one ImportPaths stream, each NAR streamed from `source`.
fn send_paths<RR: Read, RW: Write, LR: Read, LW: Write>(
    remote: &mut ServeClient<RR, RW>,
    source: &mut NarSource<'_, LR, LW>,
    infos: &[&PathInfo],
    route: Route,
    progress: &mut dyn TransferProgress,
) -> Result<(), Failure> {
    // Both the NAR source and the end of each path report to the progress.
    let progress = RefCell::new(progress);
    let mut dump = |info: &PathInfo, to: &mut dyn Write| {
        let mut counting = Reporting {
            inner: to,
            to: &progress,
        };
        let size = source.dump(&info.path, &mut counting)?;
        progress.borrow_mut().path_done();
        Ok(size)
    };
    match route {
        Route::AddToStoreNar => {
            for info in infos {
                remote.add_to_store_nar_with(info, |to| dump(info, to))?;
            }
            Ok(())
        }
        // The export process is the caller's; here the stream is made of
        // DumpStorePath NARs either way.
        Route::ImportPaths | Route::ImportPathsFromExportProcess => {
            remote.import_paths_from(infos, dump)
        }
    }
}

/// ImportPaths on `remote`, the export stream read from a local
/// `nix-store --export` of `infos` and relayed entry by entry.
fn send_from_export_process(
    remote: &mut ServeProcess,
    local: &LocalStore,
    infos: &[&PathInfo],
    progress: &mut dyn TransferProgress,
) -> Result<(), Failure> {
    let paths: Vec<&str> = infos.iter().map(|i| i.path.as_str()).collect();
    let mut child = export_command(local, &paths)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .or_fail(Kind::Transient, || "starting nix-store --export")?;
    let stdout = stdout_of(&mut child).or_fail(Kind::Transient, || "nix-store --export")?;
    let result = relay_import(remote, BufReader::with_capacity(1 << 16, stdout), progress);
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait();
    let sent: BTreeSet<StorePath> = result?.into_iter().collect();
    let status = status.or_fail(Kind::Transient, || "waiting for nix-store --export")?;
    if !status.success() {
        return Err(Failure::transient(format!(
            "nix-store --export ended with {status}"
        )));
    }
    if let Some(lost) = paths.iter().find(|p| !sent.contains(**p)) {
        return Err(Failure::permanent(format!(
            "the local export stream did not carry {lost}"
        )));
    }
    Ok(())
}

/// ImportPaths on `remote`, the export stream relayed from `source` entry
/// by entry (so that progress can count paths). Returns the paths sent.
fn relay_import<R: Read>(
    remote: &mut ServeProcess,
    source: R,
    progress: &mut dyn TransferProgress,
) -> Result<Vec<StorePath>, Failure> {
    // Bytes are counted as they are read, paths as their entries end: both
    // report to the same progress.
    let progress = RefCell::new(progress);
    let mut source = WireReader::new(Reporting {
        inner: source,
        to: &progress,
    });
    let mut sent = Vec::new();
    remote.client.import_paths_with(|w| {
        relay_entries(&mut source, w, |path| {
            progress.borrow_mut().path_done();
            sent.push(path);
        })
        .map_err(|e| {
            let message = format!("relaying the local export stream: {e}");
            Failure::caused_by(e.kind(), message, e)
        })?;
        Ok(Vec::new())
    })?;
    Ok(sent)
}

/// Copies an export stream entry by entry, calling `entry_done` with each
/// path once its entry is through. Errors say which side failed, like a
/// NAR's: reading the stream, or writing to `out`.
fn relay_entries<R: Read, W: Write + ?Sized>(
    r: &mut WireReader<R>,
    out: &mut W,
    mut entry_done: impl FnMut(StorePath),
) -> Result<(), NarError> {
    let written = |result: std::io::Result<()>| result.map_err(NarError::Write);
    loop {
        match r.u64()? {
            0 => {
                written(out.write_all(&0u64.to_le_bytes()))?;
                return written(out.flush());
            }
            1 => {
                written(out.write_all(&1u64.to_le_bytes()))?;
                nar::copy_nar(r.get_mut(), out)?;
                let trailer = serve::read_export_trailer(r)?;
                written(serve::write_export_trailer(
                    &mut WireWriter::new(&mut *out),
                    &trailer,
                ))?;
                entry_done(trailer.path);
            }
            n => {
                return Err(NarError::Read(WireError::Unexpected(format!(
                    "export stream: expected 0 or 1 before an entry, got {n}"
                ))))
            }
        }
    }
}

fn export_command(local: &LocalStore, paths: &[&str]) -> Command {
    let mut command = local.nix_store();
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
        file_name_safe(&alloc.cluster),
        file_name_safe(node)
    )))
}

/// A file-name-safe rendering of `s` (for lock names made of cluster and node).
pub fn file_name_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::serve::test_server::{FakeNode, Finished};
    use crate::nix::wire::test_bytes::{le, s};

    const A: &str = "/nix/store/00000000000000000000000000000000-a";
    const B: &str = "/nix/store/11111111111111111111111111111111-b";

    /// The local store as a serve peer: `a`, and `b` referring to it.
    fn local_store() -> FakeNode {
        FakeNode::nix_2_34()
            .with_file(A, &[], b"a")
            .with_file(B, &[A], b"bb")
    }

    /// Counts what a transfer reports.
    #[derive(Default)]
    struct Tally {
        bytes: u64,
        paths: u64,
    }

    impl TransferProgress for Tally {
        fn begin(&mut self, _: u64, _: u64) {}
        fn bytes(&mut self, n: u64) {
            self.bytes += n;
        }
        fn path_done(&mut self) {
            self.paths += 1;
        }
        fn end(&mut self) {}
    }

    /// Pushes `a` and `b` from the local store to `node` with `method`;
    /// returns (the local side, the node) once both conversations ended.
    fn push_to(node: FakeNode, method: Method) -> (Finished, Finished) {
        let local = local_store();
        let infos: Vec<PathInfo> = [A, B]
            .iter()
            .map(|p| local.store[*p].info.clone())
            .collect();
        let infos: Vec<&PathInfo> = infos.iter().collect();
        let (mut local_client, local_thread) = local.start();
        let (mut node_client, node_thread) = node.start();
        let route = method.route_for(node_client.version()).unwrap();
        let mut tally = Tally::default();
        send_paths(
            &mut node_client,
            &mut NarSource::Serve(&mut local_client),
            &infos,
            route,
            &mut tally,
        )
        .unwrap();
        assert_eq!(tally.paths, 2);
        assert_eq!(tally.bytes, infos.iter().map(|i| i.nar_size).sum::<u64>());
        drop((local_client, node_client));
        (local_thread.join().unwrap(), node_thread.join().unwrap())
    }

    /// What the client sends to ask the local store for the NARs.
    fn dumps_asked() -> Vec<u8> {
        [
            le(serve::SERVE_MAGIC_1),
            le(serve::CLIENT_VERSION),
            le(3),
            s(A),
            le(3),
            s(B),
        ]
        .concat()
    }

    #[test]
    fn lock_names_are_file_name_safe() {
        assert_eq!(file_name_safe("test/node 1"), "test_node_1");
    }

    #[test]
    fn routes_by_the_nodes_version() {
        assert_eq!(Method::default(), Method::Auto);
        let route = |method: Method, version| method.route_for(version).unwrap();
        // Nix 2.8 – 2.35 all agree on serve 2.7 with nsh.
        assert_eq!(route(Method::Auto, 0x207), Route::AddToStoreNar);
        assert_eq!(route(Method::Auto, 0x205), Route::AddToStoreNar);
        assert_eq!(route(Method::Auto, 0x204), Route::ImportPaths);
        assert_eq!(route(Method::Import, 0x207), Route::ImportPaths);
        assert_eq!(
            route(Method::ImportExport, 0x207),
            Route::ImportPathsFromExportProcess
        );
        let err = Method::AddToStoreNar.route_for(0x204).unwrap_err();
        assert_eq!(err.kind, Kind::Config);
        assert!(
            err.message.contains("serve protocol 2.4"),
            "{}",
            err.message
        );
    }

    #[test]
    fn auto_pushes_to_a_nix_2_34_node_with_add_to_store_nar_byte_for_byte() {
        let (local, node) = push_to(FakeNode::nix_2_34(), Method::Auto);
        assert_eq!((local.error, node.error), (None, None));
        assert_eq!(local.received, dumps_asked());
        let source = local_store().store;
        assert_eq!(node.store, source);
        let add = |path: &str, references: &[&str]| {
            let stored = &source[path];
            let refs: Vec<Vec<u8>> = references.iter().map(|r| s(r)).collect();
            [
                le(9),
                s(path),
                s(""),
                s(&stored.info.nar_hash),
                le(references.len() as u64),
                refs.concat(),
                le(0),
                le(stored.info.nar_size),
                le(0),
                le(0),
                s(""),
                stored.nar.clone(),
            ]
            .concat()
        };
        let sent = [
            le(serve::SERVE_MAGIC_1),
            le(serve::CLIENT_VERSION),
            add(A, &[]),
            add(B, &[A]),
        ]
        .concat();
        assert_eq!(node.received, sent);
    }

    #[test]
    fn auto_pushes_to_a_nix_2_32_0_node_which_lacks_import_paths() {
        let (_, node) = push_to(FakeNode::nix_2_32_0(), Method::Auto);
        assert_eq!(node.error, None);
        assert_eq!(node.store, local_store().store);
    }

    #[test]
    fn auto_pushes_to_a_node_without_add_to_store_nar_with_one_import_stream() {
        let (local, node) = push_to(FakeNode::serve_2_4(), Method::Auto);
        assert_eq!((local.error, node.error), (None, None));
        assert_eq!(local.received, dumps_asked());
        let source = local_store().store;
        assert_eq!(node.store, source);
        let entry = |path: &str, references: &[&str]| {
            let refs: Vec<Vec<u8>> = references.iter().map(|r| s(r)).collect();
            [
                le(1),
                source[path].nar.clone(),
                le(serve::EXPORT_MAGIC),
                s(path),
                le(references.len() as u64),
                refs.concat(),
                s(""),
                le(0),
            ]
            .concat()
        };
        let sent = [
            le(serve::SERVE_MAGIC_1),
            le(serve::CLIENT_VERSION),
            le(4),
            entry(A, &[]),
            entry(B, &[A]),
            le(0),
        ]
        .concat();
        assert_eq!(node.received, sent);
    }

    #[test]
    fn an_explicit_import_goes_to_a_nix_2_34_node_as_import_paths() {
        let (_, node) = push_to(FakeNode::nix_2_34(), Method::Import);
        assert_eq!(node.error, None);
        assert_eq!(node.store, local_store().store);
        assert_eq!(node.received[16..24], le(4)[..]);
    }
}
