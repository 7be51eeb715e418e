//! `held-locks`: `nix-store --import` with `NIX_HELD_LOCKS` naming the
//! outputs (Nix ≤ 2.28, Lix), fed an export stream made of the node's NARs,
//! each entry's trailer written only once its NAR checked out.

use crate::sys::process::stdin_of;
use std::io::{self, BufRead, BufWriter, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};

use super::receive_checked;
use super::trust::Declared;
use crate::error::{Failure, Kind, ResultExt};
use crate::nix::local_store::LocalStore;
use crate::nix::serve::client::ServeClient;
use crate::nix::serve::{self, ExportTrailer, PathInfo};
use crate::nix::store_path::StorePath;
use crate::nix::wire::WireWriter;
use crate::stage::progress::TransferProgress;

/// Feeds `nix-store --import` with `NIX_HELD_LOCKS` an export stream made
/// of the node's NARs, each entry's trailer written only after its NAR
/// checked out (the importer registers a path when it reads the trailer).
pub(super) fn import_held_locks<R: Read, W: Write>(
    remote: &mut ServeClient<R, W>,
    needed: &[PathInfo],
    declared: &Declared,
    direct: &LocalStore,
    progress: &mut dyn TransferProgress,
) -> Result<Vec<StorePath>, Failure> {
    let held: Vec<&str> = declared.outputs.keys().map(StorePath::as_str).collect();
    let mut command = direct.nix_store();
    command
        .arg("--import")
        .env("NIX_HELD_LOCKS", held.join(" "));
    let importer = Importer {
        command,
        refused: &|status, _| Failure::permanent(format!("nix-store --import ended with {status}")),
    };
    import_stream(importer, remote, needed, declared, progress)
}

/// A `nix-store --import` to feed, and what its failure means (given its
/// exit status and the last lines it wrote to stderr).
pub(super) struct Importer<'a> {
    pub command: Command,
    pub refused: &'a dyn Fn(ExitStatus, &str) -> Failure,
}

/// Runs the importer on the export stream of `needed` ([`relay_checked`]);
/// its stderr is relayed to ours, its last lines kept for `refused`.
pub(super) fn import_stream<R: Read, W: Write>(
    importer: Importer,
    remote: &mut ServeClient<R, W>,
    needed: &[PathInfo],
    declared: &Declared,
    progress: &mut dyn TransferProgress,
) -> Result<Vec<StorePath>, Failure> {
    let Importer {
        mut command,
        refused,
    } = importer;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .or_fail(Kind::Config, || "starting nix-store --import")?;
    let tail = relay_stderr_tail(&mut child);
    let stdin = stdin_of(&mut child).or_fail(Kind::Transient, || "nix-store --import")?;
    let mut to = BufWriter::with_capacity(1 << 16, stdin);
    let relayed = relay_checked(remote, needed, declared, &mut to, progress);
    let closed = relayed.and_then(|paths| {
        to.flush().map_err(|e| {
            let failed = WriteFailed(e);
            Failure::caused_by(Kind::Transient, failed.to_string(), failed)
        })?;
        Ok(paths)
    });
    drop(to);
    match closed {
        Ok(paths) => {
            let status = child
                .wait()
                .or_fail(Kind::Transient, || "waiting for nix-store --import")?;
            let said = tail.join().unwrap_or_default();
            if !status.success() {
                return Err(refused(status, &said));
            }
            Ok(paths)
        }
        Err(failure) => {
            // Killed before it read the failed entry's trailer: that entry
            // is never registered. (Through the daemon, nothing of the entry
            // was sent: nix-store reads the whole entry before it adds it.)
            let _ = child.kill();
            let status = child.wait();
            let said = tail.join().unwrap_or_default();
            // The importer may have stopped first, refusing an earlier
            // entry: its own exit status (a reaped child keeps it) and words.
            match (failure.cause::<WriteFailed>(), status) {
                (Some(_), Ok(status)) => Err(refused(status, &said)),
                _ => Err(failure),
            }
        }
    }
}

/// Writing to the importer failed (it stopped reading).
#[derive(Debug)]
struct WriteFailed(io::Error);

impl std::fmt::Display for WriteFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "writing to nix-store --import: {}", self.0)
    }
}

impl std::error::Error for WriteFailed {}

/// How many of a child's last stderr lines are kept for messages.
const STDERR_TAIL_LINES: usize = 20;

/// Relays `child`'s stderr to ours line by line on a thread, which returns
/// the last [`STDERR_TAIL_LINES`].
pub(super) fn relay_stderr_tail(child: &mut Child) -> std::thread::JoinHandle<String> {
    let stderr = child.stderr.take();
    std::thread::spawn(move || {
        let Some(stderr) = stderr else {
            return String::new();
        };
        let mut tail = std::collections::VecDeque::new();
        for line in io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        Vec::from(tail).join("\n")
    })
}

/// Writes the export stream of `needed` to `to`: per path `1`, the NAR as
/// DumpStorePath sends it (no further than its declared size), then (once
/// hash and size match the node's path info, and a fixed output's hash its
/// derivation) the trailer; `0` at the end. Returns the paths written.
pub(super) fn relay_checked<R: Read, W: Write, T: Write>(
    remote: &mut ServeClient<R, W>,
    needed: &[PathInfo],
    declared: &Declared,
    to: &mut T,
    progress: &mut dyn TransferProgress,
) -> Result<Vec<StorePath>, Failure> {
    let write_fail = |e: io::Error| {
        let failed = WriteFailed(e);
        Failure::caused_by(Kind::Transient, failed.to_string(), failed)
    };
    let mut paths = Vec::new();
    for info in needed {
        to.write_all(&1u64.to_le_bytes()).map_err(write_fail)?;
        receive_checked(remote, info, declared, &mut *to, progress, &write_fail)?;
        serve::write_export_trailer(
            &mut WireWriter::new(&mut *to),
            &ExportTrailer::for_path(info),
        )
        .map_err(write_fail)?;
        progress.path_done();
        paths.push(info.path.clone());
    }
    to.write_all(&0u64.to_le_bytes()).map_err(write_fail)?;
    Ok(paths)
}
