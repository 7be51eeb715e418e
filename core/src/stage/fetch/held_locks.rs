//! `held-locks`: `nix-store --import` with `NIX_HELD_LOCKS` naming the
//! outputs (Nix ≤ 2.28, Lix), fed an export stream made of the node's NARs,
//! each entry's trailer written only once its NAR checked out.

use crate::sys::process::stdin_of;
use std::collections::BTreeSet;
use std::io::{self, BufWriter, Read, Write};
use std::process::Stdio;

use super::{check_nar, nar_error};
use crate::error::{Failure, Kind, ResultExt};
use crate::nix::hash::Hashing;
use crate::nix::local_store::LocalStore;
use crate::nix::nar::{self, NarError};
use crate::nix::serve::client::ServeClient;
use crate::nix::serve::{self, ExportTrailer, PathInfo};
use crate::nix::store_path::StorePath;
use crate::nix::wire::WireWriter;
use crate::stage::progress::{Reporting, TransferProgress};

/// Feeds `nix-store --import` with `NIX_HELD_LOCKS` an export stream made
/// of the node's NARs, each entry's trailer written only after its NAR
/// checked out (the importer registers a path when it reads the trailer).
pub(super) fn import_held_locks<R: Read, W: Write>(
    remote: &mut ServeClient<R, W>,
    needed: &[PathInfo],
    outputs: &BTreeSet<StorePath>,
    direct: &LocalStore,
    progress: &mut dyn TransferProgress,
) -> Result<Vec<StorePath>, Failure> {
    let held: Vec<&str> = outputs.iter().map(StorePath::as_str).collect();
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
    let mut to = Hashing::new(BufWriter::with_capacity(1 << 16, stdin));
    let relayed = relay_checked(remote, needed, &mut to, progress);
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
/// DumpStorePath sends it, then (once hash and size match the node's path
/// info) the trailer; `0` at the end. Returns the paths written.
pub(super) fn relay_checked<R: Read, W: Write, T: Write>(
    remote: &mut ServeClient<R, W>,
    needed: &[PathInfo],
    to: &mut Hashing<T>,
    progress: &mut dyn TransferProgress,
) -> Result<Vec<StorePath>, Failure> {
    let write_fail =
        |e: io::Error| Failure::transient(format!("writing to nix-store --import: {e}"));
    let mut paths = Vec::new();
    for info in needed {
        to.write_all(&1u64.to_le_bytes()).map_err(write_fail)?;
        to.take_digest();
        remote.receive_nar(&info.path, |nar| {
            let mut counting = Reporting {
                inner: nar,
                to: &mut *progress,
            };
            nar::copy_nar(&mut counting, to).map_err(|e| match e {
                NarError::Write(e) => write_fail(e),
                other => nar_error(&info.path, other),
            })
        })?;
        let (digest, size) = to.take_digest();
        check_nar(info, &digest, size)?;
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
