//! `load-db`: each NAR unpacked into the store directory under a temporary
//! name, hashed on the way, given the store's metadata, moved into place
//! and registered with `nix-store --load-db`; paths that are not outputs
//! locked the way Nix locks them.

use crate::sys::flock::{lock_exclusive, Wait};
use crate::sys::process::stdin_of;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::{check_nar, nar_error};
use crate::error::{Failure, Kind, ResultExt};
use crate::nix::hash::{self, Hashing};
use crate::nix::local_store::LocalStore;
use crate::nix::nar::{self, NarError};
use crate::nix::serve::client::ServeClient;
use crate::nix::serve::PathInfo;
use crate::nix::store_path::StorePath;
use crate::nix::wire::WireError;
use crate::stage::progress::{Reporting, TransferProgress};

/// A path unpacked into its place in the store, verified, not yet
/// registered.
pub(super) struct Placed {
    info: PathInfo,
    real: PathBuf,
    pub(super) digest: [u8; 32],
}

/// Unpacks every needed path into the store directory and registers them
/// with `nix-store --load-db`. The paths that are not outputs (whose locks
/// the daemon does not hold for us) are locked first, and stay locked until
/// they are registered, so that no other Nix process writes or registers
/// them meanwhile; under those locks, a path already valid is skipped.
pub(super) fn import_load_db<R: Read, W: Write>(
    remote: &mut ServeClient<R, W>,
    needed: &[PathInfo],
    outputs: &BTreeSet<StorePath>,
    direct: &LocalStore,
    progress: &mut dyn TransferProgress,
) -> Result<Vec<StorePath>, Failure> {
    let real_dir = direct.real_dir();
    let _locks = lock_non_outputs(needed, outputs, direct, &real_dir)?;
    let invalid = still_invalid(direct, needed)?;
    for _ in invalid.len()..needed.len() {
        progress.path_done();
    }
    let mut placed = Vec::new();
    let received = receive_into_store(remote, &invalid, direct, &real_dir, progress, &mut placed);
    // Register what is complete even when a later path failed: those paths
    // are whole and verified, and their references come before them.
    let registered = register(direct, &placed);
    if registered.is_err() {
        for entry in &placed {
            let _ = remove_tree(&entry.real);
        }
    }
    received?;
    registered?;
    Ok(placed.into_iter().map(|entry| entry.info.path).collect())
}

/// Nix's locks on the needed paths that are not outputs, taken in sorted
/// order as Nix takes several locks (two processes that need the same paths
/// then cannot deadlock).
pub(super) fn lock_non_outputs(
    needed: &[PathInfo],
    outputs: &BTreeSet<StorePath>,
    direct: &LocalStore,
    real_dir: &Path,
) -> Result<Vec<NixPathLock>, Failure> {
    let mut reals = BTreeSet::new();
    for info in needed.iter().filter(|i| !outputs.contains(&i.path)) {
        direct.dir.check(&info.path)?;
        reals.insert(real_dir.join(info.path.basename()));
    }
    reals
        .iter()
        .map(|real| NixPathLock::acquire(real))
        .collect()
}

/// The needed paths that are not valid in the local store now, asked of a
/// new `nix-store --serve` on the store itself (not a daemon or a process
/// that answered before the locks were taken).
fn still_invalid<'a>(
    direct: &LocalStore,
    needed: &'a [PathInfo],
) -> Result<Vec<&'a PathInfo>, Failure> {
    let paths: Vec<&str> = needed.iter().map(|i| i.path.as_str()).collect();
    let valid = direct.valid_paths(&paths)?;
    Ok(needed.iter().filter(|i| !valid.contains(&i.path)).collect())
}

/// Receives each path's NAR into a temporary name in the store directory,
/// checks it, and moves it into place; appends what was placed.
pub(super) fn receive_into_store<R: Read, W: Write>(
    remote: &mut ServeClient<R, W>,
    invalid: &[&PathInfo],
    direct: &LocalStore,
    real_dir: &Path,
    progress: &mut dyn TransferProgress,
    placed: &mut Vec<Placed>,
) -> Result<(), Failure> {
    for (n, info) in invalid.iter().enumerate() {
        let temp = real_dir.join(format!(".nsh-fetch-{}-{n}", std::process::id()));
        let received = remote.receive_nar(&info.path, |nar| {
            unpack_checked(nar, info, &temp, &mut *progress)
        });
        let digest = match received {
            Ok(digest) => digest,
            Err(failure) => {
                let _ = remove_tree(&temp);
                return Err(failure);
            }
        };
        direct.dir.check(&info.path)?;
        let real = real_dir.join(info.path.basename());
        if let Err(failure) = move_into_place(&temp, &real) {
            let _ = remove_tree(&temp);
            return Err(failure);
        }
        progress.path_done();
        placed.push(Placed {
            info: (*info).clone(),
            real,
            digest,
        });
    }
    Ok(())
}

/// Unpacks one NAR from `nar` to `temp`, hashing it; returns its digest
/// once hash and size match the node's path info.
fn unpack_checked(
    nar: &mut dyn Read,
    info: &PathInfo,
    temp: &Path,
    progress: &mut dyn TransferProgress,
) -> Result<[u8; 32], Failure> {
    let mut reader = Hashing::new(Reporting {
        inner: nar,
        to: progress,
    });
    let size = nar::unpack(&mut reader, temp).map_err(|e| match e {
        // The file system's trouble, or the stream's other than its end.
        NarError::Unpack { .. } | NarError::Read(WireError::Io(_)) => {
            let message = format!("unpacking into {}: {e}", temp.display());
            Failure::caused_by(Kind::Transient, message, e)
        }
        other => nar_error(&info.path, other),
    })?;
    let (digest, _) = reader.take_digest();
    check_nar(info, &digest, size)?;
    Ok(digest)
}

/// Renames the verified tree at `temp` to its store path `real`. The path is
/// not valid (checked under its lock), so anything at its place is a
/// leftover of an interrupted import: Nix would delete it too.
fn move_into_place(temp: &Path, real: &Path) -> Result<(), Failure> {
    if real.symlink_metadata().is_ok() {
        remove_tree(real)?;
    }
    std::fs::rename(temp, real).or_fail(Kind::Transient, || {
        format!("moving {} to {}", temp.display(), real.display())
    })
}

/// `nix-store --load-db` input: per path `path`, the NAR's sha256 in hex,
/// the NAR size, the deriver, the number of references, the references.
pub fn load_db_input(infos: &[&PathInfo], digests: &[[u8; 32]]) -> String {
    let mut text = String::new();
    for (info, digest) in infos.iter().zip(digests) {
        let _ = write!(
            text,
            "{}\n{}\n{}\n{}\n{}\n",
            info.path,
            hash::hex(digest),
            info.nar_size,
            info.deriver.as_ref().map_or("", StorePath::as_str),
            info.references.len()
        );
        for r in &info.references {
            text.push_str(r.as_str());
            text.push('\n');
        }
    }
    text
}

fn register(direct: &LocalStore, placed: &[Placed]) -> Result<(), Failure> {
    if placed.is_empty() {
        return Ok(());
    }
    let infos: Vec<&PathInfo> = placed.iter().map(|entry| &entry.info).collect();
    let digests: Vec<[u8; 32]> = placed.iter().map(|entry| entry.digest).collect();
    let input = load_db_input(&infos, &digests);
    let mut child = direct
        .nix_store()
        .arg("--load-db")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .or_fail(Kind::Config, || "starting nix-store --load-db")?;
    let written = stdin_of(&mut child).and_then(|mut stdin| stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .or_fail(Kind::Transient, || "waiting for nix-store --load-db")?;
    if !out.status.success() || written.is_err() {
        return Err(Failure::permanent(format!(
            "nix-store --load-db failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Removes a tree that may be read-only (store metadata).
fn remove_tree(path: &Path) -> Result<(), Failure> {
    let meta = match path.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Failure::transient(format!("{}: {e}", path.display()))),
    };
    if meta.is_dir() {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755));
        let entries = std::fs::read_dir(path)
            .or_fail(Kind::Transient, || format!("reading {}", path.display()))?;
        for entry in entries {
            let entry = entry.or_fail(Kind::Transient, || format!("reading {}", path.display()))?;
            remove_tree(&entry.path())?;
        }
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    }
    .or_fail(Kind::Transient, || format!("removing {}", path.display()))
}

/// Nix's lock on a store path: flock(2) on `<path>.lock`; a lock file that
/// has content was deleted by its last holder (stale) and is opened again.
/// Released like Nix releases it: unlink, then mark the open file stale.
pub(super) struct NixPathLock {
    file: std::fs::File,
    path: PathBuf,
}

impl NixPathLock {
    fn acquire(real: &Path) -> Result<NixPathLock, Failure> {
        let mut name = real.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .or_fail(Kind::Transient, || format!("opening {}", path.display()))?;
            lock_exclusive(&file, Wait::Block)
                .map_err(|e| Failure::transient(format!("locking {}: {e}", path.display())))?;
            let stale = file.metadata().map_or(true, |m| m.len() != 0);
            if !stale {
                return Ok(NixPathLock { file, path });
            }
        }
    }
}

impl Drop for NixPathLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.write_all(b"d");
    }
}
