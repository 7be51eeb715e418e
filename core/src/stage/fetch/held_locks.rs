//! `held-locks`: `nix-store --import` with `NIX_HELD_LOCKS` naming the
//! outputs (Nix ≤ 2.28, Lix), fed an export stream made of the node's NARs,
//! each entry's trailer written only once its NAR checked out.

use crate::sys::process::stdin_of;
use std::io::{self, BufWriter, Read, Write};
use std::process::Stdio;

use super::trust::Declared;
use super::{nar_error, read_checked};
use crate::error::{Failure, Kind, ResultExt};
use crate::nix::local_store::LocalStore;
use crate::nix::nar::{self, Bounds, NarError};
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
    let mut child = direct
        .nix_store()
        .arg("--import")
        .env("NIX_HELD_LOCKS", held.join(" "))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .or_fail(Kind::Config, || "starting nix-store --import")?;
    let stdin = stdin_of(&mut child).or_fail(Kind::Transient, || "nix-store --import")?;
    let mut to = BufWriter::with_capacity(1 << 16, stdin);
    let relayed = relay_checked(remote, needed, declared, &mut to, progress);
    let closed = relayed.and_then(|paths| {
        to.flush()
            .or_fail(Kind::Transient, || "writing to nix-store --import")?;
        Ok(paths)
    });
    drop(to);
    match closed {
        Ok(paths) => {
            let status = child
                .wait()
                .or_fail(Kind::Transient, || "waiting for nix-store --import")?;
            if !status.success() {
                return Err(Failure::permanent(format!(
                    "nix-store --import ended with {status}"
                )));
            }
            Ok(paths)
        }
        Err(failure) => {
            // Killed before it read the failed entry's trailer: that entry
            // is never registered.
            let _ = child.kill();
            let _ = child.wait();
            Err(failure)
        }
    }
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
    let write_fail =
        |e: io::Error| Failure::transient(format!("writing to nix-store --import: {e}"));
    let mut paths = Vec::new();
    for info in needed {
        to.write_all(&1u64.to_le_bytes()).map_err(write_fail)?;
        remote.receive_nar(&info.path, |nar| {
            let mut copy =
                |from: &mut dyn Read, bounds: Bounds<'_>| nar::copy_nar_bounded(from, to, bounds);
            let fail = |e: NarError| match e {
                NarError::Write(e) => write_fail(e),
                other => nar_error(&info.path, other),
            };
            read_checked(
                nar,
                info,
                declared.fixed(&info.path),
                progress,
                &mut copy,
                &fail,
            )
        })?;
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
