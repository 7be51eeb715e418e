//! `load-db`: each NAR unpacked into the store directory under a temporary
//! name, hashed on the way, given the store's metadata, moved into place
//! and registered with `nix-store --load-db`; paths that are not outputs
//! locked the way Nix locks them, and every placed path (and its temporary
//! name) a temporary GC root, until they are registered.

use crate::sys::flock::{lock_exclusive, Wait};
use crate::sys::process::stdin_of;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::fixed::FixedHash;
use super::trust::Declared;
use super::{nar_error, read_checked};
use crate::error::{Failure, Kind, ResultExt};
use crate::nix::hash;
use crate::nix::local_store::LocalStore;
use crate::nix::nar::{self, Bounds, NarError};
use crate::nix::serve::client::ServeClient;
use crate::nix::serve::PathInfo;
use crate::nix::store_path::{StoreDir, StorePath};
use crate::nix::temp_roots::TempRoots;
use crate::nix::wire::WireError;
use crate::stage::progress::TransferProgress;

/// A path unpacked into its place in the store, verified, not yet
/// registered.
pub(super) struct Placed {
    info: PathInfo,
    real: PathBuf,
    pub(super) digest: [u8; 32],
}

/// Where the NARs are unpacked: the store imported into, its directory on
/// this machine, the temporary roots that keep what is placed there.
pub(super) struct Target<'a> {
    pub direct: &'a LocalStore,
    pub real_dir: PathBuf,
    pub roots: &'a mut TempRoots,
}

/// Unpacks every needed path into the store directory and registers them
/// with `nix-store --load-db`. The paths that are not outputs (whose locks
/// the daemon does not hold for us) are locked first, and stay locked until
/// they are registered, so that no other Nix process writes or registers
/// them meanwhile; under those locks, a path already valid is skipped.
/// Every path is a temporary GC root from before it is placed (`roots`,
/// held by the caller until after registration).
pub(super) fn import_load_db<R: Read, W: Write>(
    remote: &mut ServeClient<R, W>,
    needed: &[PathInfo],
    declared: &Declared,
    direct: &LocalStore,
    roots: &mut TempRoots,
    progress: &mut dyn TransferProgress,
    lock_limit: Duration,
) -> Result<Vec<StorePath>, Failure> {
    let real_dir = direct.real_dir();
    let outputs: BTreeSet<StorePath> = declared.outputs.keys().cloned().collect();
    let locks = lock_non_outputs(needed, &outputs, direct, &real_dir, lock_limit)?;
    let invalid = still_invalid(direct, needed)?;
    for _ in invalid.len()..needed.len() {
        progress.path_done();
    }
    let mut placed = Vec::new();
    let mut target = Target {
        direct,
        real_dir,
        roots,
    };
    let received = receive_into_store(
        remote,
        &invalid,
        &mut target,
        declared,
        progress,
        &mut placed,
    );
    // Register what is complete even when a later path failed: those paths
    // are whole and verified, and their references come before them.
    let registered = register(direct, &placed);
    if registered.is_err() {
        for entry in &placed {
            let _ = remove_tree(&entry.real);
        }
    }
    // Only now: registered (or removed again), the paths need no lock.
    drop(locks);
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
    limit: Duration,
) -> Result<Vec<NixPathLock>, Failure> {
    let mut reals = BTreeSet::new();
    for info in needed.iter().filter(|i| !outputs.contains(&i.path)) {
        direct.dir.check(&info.path)?;
        reals.insert(real_dir.join(info.path.basename()));
    }
    reals
        .iter()
        .map(|real| NixPathLock::acquire(real, limit))
        .collect()
}

/// The needed paths that are not valid in the local store now, asked of a
/// new daemon worker (the daemon serves this store: each connection is a
/// worker with a store of its own) or a new `nix-store --serve` on the store
/// itself; never of one that answered before the locks were taken.
fn still_invalid<'a>(
    direct: &LocalStore,
    needed: &'a [PathInfo],
) -> Result<Vec<&'a PathInfo>, Failure> {
    let paths: Vec<&str> = needed.iter().map(|i| i.path.as_str()).collect();
    let valid = direct.valid_paths(&paths)?;
    Ok(needed.iter().filter(|i| !valid.contains(&i.path)).collect())
}

/// Receives each path's NAR into a temporary name in the store directory
/// (itself a temporary root, like the path), checks it, and moves it into
/// place; appends what was placed.
pub(super) fn receive_into_store<R: Read, W: Write>(
    remote: &mut ServeClient<R, W>,
    invalid: &[&PathInfo],
    target: &mut Target,
    declared: &Declared,
    progress: &mut dyn TransferProgress,
    placed: &mut Vec<Placed>,
) -> Result<(), Failure> {
    for info in invalid {
        target.direct.dir.check(&info.path)?;
        let temp_path = temporary_name(&target.direct.dir, &info.path)?;
        for root in [&temp_path, &info.path] {
            target.roots.add(root).map_err(|e| {
                Failure::transient(format!("adding a temporary GC root for {root}: {e}"))
            })?;
        }
        let temp = target.real_dir.join(temp_path.basename());
        let received = remote.receive_nar(&info.path, |nar| {
            unpack_checked(nar, info, declared.fixed(&info.path), &temp, &mut *progress)
        });
        let digest = match received {
            Ok(digest) => digest,
            Err(failure) => {
                let _ = remove_tree(&temp);
                return Err(failure);
            }
        };
        let real = target.real_dir.join(info.path.basename());
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

/// A fresh store path of `path`'s name with a random hash part: a name the
/// garbage collector skips while it is a temporary root, which no one can
/// guess or mistake for the path itself.
fn temporary_name(dir: &StoreDir, path: &StorePath) -> Result<StorePath, Failure> {
    let random = crate::sys::fs::random_bytes(20).or_fail(Kind::Transient, || {
        "reading random bytes for a temporary name"
    })?;
    dir.join(&format!("{}-{}", hash::nix_base32(&random), path.name()))
}

/// Unpacks one NAR from `nar` to `temp`, no further than its declared size,
/// hashing it; returns its digest once hash and size match the node's path
/// info (and, for a fixed output, the derivation's hash).
fn unpack_checked(
    nar: &mut dyn Read,
    info: &PathInfo,
    fixed: Option<&FixedHash>,
    temp: &Path,
    progress: &mut dyn TransferProgress,
) -> Result<[u8; 32], Failure> {
    let mut unpack =
        |from: &mut dyn Read, bounds: Bounds<'_>| nar::unpack_bounded(from, temp, bounds);
    let fail = |e: NarError| match e {
        // The file system's trouble, or the stream's other than its end.
        NarError::Unpack { .. } | NarError::Read(WireError::Io(_)) => {
            let message = format!("unpacking into {}: {e}", temp.display());
            Failure::caused_by(Kind::Transient, message, e)
        }
        other => nar_error(&info.path, other),
    };
    read_checked(nar, info, fixed, progress, &mut unpack, &fail)
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
///
/// `--load-db` reads lines and registers whatever they say (valid paths
/// again too), so every path written here is checked once more first: in
/// the store directory `dir` and on one line (a [`StorePath`] cannot hold a
/// newline; this says so where it matters).
///
/// # Errors
/// A path, reference or deriver outside `dir` or with a line break.
pub fn load_db_input(
    infos: &[&PathInfo],
    digests: &[[u8; 32]],
    dir: &StoreDir,
) -> Result<String, Failure> {
    let mut text = String::new();
    for (info, digest) in infos.iter().zip(digests) {
        let named = std::iter::once(&info.path)
            .chain(&info.deriver)
            .chain(&info.references);
        for path in named {
            dir.check(path)?;
            if path.as_str().contains(['\n', '\r']) {
                return Err(Failure::permanent(format!(
                    "{path:?} has a line break: not written to nix-store --load-db"
                )));
            }
        }
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
    Ok(text)
}

fn register(direct: &LocalStore, placed: &[Placed]) -> Result<(), Failure> {
    if placed.is_empty() {
        return Ok(());
    }
    let infos: Vec<&PathInfo> = placed.iter().map(|entry| &entry.info).collect();
    let digests: Vec<[u8; 32]> = placed.iter().map(|entry| entry.digest).collect();
    let input = load_db_input(&infos, &digests, &direct.dir)?;
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

/// Removes a tree that may be read-only (store metadata), following no
/// symlink on the way (`sys::fs::remove_tree`).
fn remove_tree(path: &Path) -> Result<(), Failure> {
    crate::sys::fs::remove_tree(path)
        .or_fail(Kind::Transient, || format!("removing {}", path.display()))
}

/// Nix's lock on a store path: flock(2) on `<path>.lock`; a lock file that
/// has content was deleted by its last holder (stale) and is opened again.
/// Released like Nix releases it: unlink, then mark the open file stale.
///
/// Unlike Nix's, the lock file is never opened through a symlink (the store
/// directory is writable by the build users' group, and a planted
/// `<path>.lock` symlink would otherwise have root write its mark into the
/// link's target), and a lock file that keeps coming back stale is an error
/// after [`STALE_TRIES`] tries, not a loop forever.
pub(super) struct NixPathLock {
    file: std::fs::File,
    path: PathBuf,
}

/// How often a stale lock file is opened again before giving up.
const STALE_TRIES: u32 = 100;

impl NixPathLock {
    fn acquire(real: &Path, limit: Duration) -> Result<NixPathLock, Failure> {
        let mut name = real.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        for _ in 0..STALE_TRIES {
            let file = crate::sys::fs::open_lock_file(&path)
                .or_fail(Kind::Transient, || format!("opening {}", path.display()))?;
            lock_exclusive(&file, Wait::Within(limit)).map_err(|e| {
                let hint = if e.kind() == std::io::ErrorKind::TimedOut {
                    " (remote.lock_timeout)"
                } else {
                    ""
                };
                Failure::transient(format!("locking {}: {e}{hint}", path.display()))
            })?;
            let stale = file.metadata().map_or(true, |m| m.len() != 0);
            if !stale {
                return Ok(NixPathLock { file, path });
            }
        }
        Err(Failure::transient(format!(
            "{} was stale each of {STALE_TRIES} times it was locked",
            path.display()
        )))
    }
}

impl Drop for NixPathLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.write_all(b"d");
    }
}
