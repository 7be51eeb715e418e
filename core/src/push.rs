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
//! `nix-store --serve` (ExportPaths), or from a `nix-store --export` process
//! ([`LocalSource`]); both were measured, see `docs/benchmarks.md`.
//!
//! Two pushes to the same node that need the same missing path must copy it
//! once: "query + import" runs under a per-node flock, so the second push
//! queries after the first has imported, and finds the path present.
//!
//! The node imports atomically per path (a path becomes valid only after its
//! whole NAR arrived and was written), so a connection that drops mid-stream
//! leaves nothing invalid registered; the push is retried once, then fails
//! as transient (75).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Failure, Kind, ResultExt};
use crate::serve_client::ServeProcess;
use crate::store::LocalStore;
use crate::ticket::{AllocSection, PushSection, Ticket};
use crate::transfer::{self, Counting, FileLock, TransferProgress};
use crate::transport::{Ssh, Transport};
use crate::{log_info, log_warn};

/// Where the NARs come from on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LocalSource {
    /// ExportPaths over the local `nix-store --serve` that also answers the
    /// validity query: one process.
    #[default]
    Serve,
    /// A `nix-store --export <paths>` process.
    Export,
}

impl LocalSource {
    pub fn parse(s: &str) -> Option<LocalSource> {
        match s {
            "serve" => Some(LocalSource::Serve),
            "export" => Some(LocalSource::Export),
            _ => None,
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
    source: LocalSource,
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
        match push_once(&closure, &mut alloc, config, &local, source, progress) {
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
    source: LocalSource,
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

    let imported = match source {
        LocalSource::Serve => {
            let stream = local_serve.client.start_export(&missing)?;
            let mut counting = Counting {
                inner: stream,
                progress: &mut *progress,
            };
            remote.client.import_paths(&mut counting)?
        }
        LocalSource::Export => {
            let mut child = export_command(local, &missing)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .or_fail(Kind::Transient, || "starting nix-store --export")?;
            let stdout = child.stdout.take().expect("piped");
            let mut counting = Counting {
                inner: std::io::BufReader::with_capacity(1 << 16, stdout),
                progress: &mut *progress,
            };
            let result = remote.client.import_paths(&mut counting);
            if result.is_err() {
                let _ = child.kill();
            }
            let status = child.wait();
            let imported = result?;
            let status = status.or_fail(Kind::Transient, || "waiting for nix-store --export")?;
            if !status.success() {
                return Err(Failure::transient(format!(
                    "nix-store --export ended with {status}"
                )));
            }
            imported
        }
    };
    for _ in &imported {
        progress.path_done();
    }
    progress.end();
    remote.finish()?;
    local_serve.finish()?;
    let sent: BTreeSet<&str> = imported.iter().map(|p| p.trailer.path.as_str()).collect();
    if let Some(lost) = missing.iter().find(|p| !sent.contains(**p)) {
        return Err(Failure::permanent(format!(
            "the local export stream did not carry {lost}"
        )));
    }
    Ok((
        imported.len() as u64,
        imported.iter().map(|p| p.nar_size).sum(),
    ))
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
