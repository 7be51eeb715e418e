//! Per-cluster build slots, as `flock` locks on files
//! `<root>/<cluster>/<n>.lock` (n = 0 … max_jobs−1), like the slot locks of
//! Nix's own `build-remote`.
//!
//! A slot is held by the accepting `nsh-hook` for the life of the build. The
//! kernel drops a `flock` when the last descriptor of its open file goes, so
//! a crashed or killed hook frees its slot with no clean-up step; the lock
//! files themselves stay and are reused. The descriptor is close-on-exec, so
//! no child of the hook keeps the slot after the hook is gone.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, DirEntryExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Failure, Kind, ResultExt};
use crate::sys::flock::{lock_exclusive, Wait};

/// The default slot directory.
pub const DEFAULT_SLOTS_DIR: &str = "/run/nsh/slots";

/// A directory of per-cluster slot locks.
#[derive(Debug, Clone)]
pub struct SlotDir {
    root: PathBuf,
}

/// One held slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    _file: File,
    path: PathBuf,
    index: u32,
}

impl Slot {
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn index(&self) -> u32 {
        self.index
    }
}

/// A cluster name is a path component here: keep it to a safe alphabet.
pub fn check_cluster_name(name: &str) -> Result<(), Failure> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Failure::config(format!(
            "cluster name {name:?}: use letters, digits, `.`, `_` and `-` only"
        )))
    }
}

enum Try {
    Locked(File),
    Busy,
}

fn try_lock(path: &Path) -> Result<Try, Failure> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .or_fail(Kind::Config, || {
            format!("opening the slot lock {}", path.display())
        })?;
    match lock_exclusive(&file, Wait::DontWait) {
        Ok(true) => Ok(Try::Locked(file)),
        Ok(false) => Ok(Try::Busy),
        Err(err) => Err(Failure::config(format!(
            "locking the slot {}: {err}",
            path.display()
        ))),
    }
}

/// The inode numbers of files with a granted `flock` (not waiters), from
/// `/proc/locks` lines like `1: FLOCK  ADVISORY  WRITE 12593 fe:00:5382153 0 EOF`.
/// Inode numbers only: on overlay file systems the device in the lock table
/// is not the one `stat` shows, and a rare false match only makes the
/// estimate high.
/// A snapshot of the kernel's `flock` table (see [`SlotDir::load`]).
#[derive(Debug, Clone, Default)]
pub struct LockTable {
    held: Option<HashSet<u64>>,
}

impl LockTable {
    pub fn read() -> LockTable {
        LockTable {
            held: fs::read_to_string("/proc/locks")
                .ok()
                .map(|t| parse_lock_table(&t)),
        }
    }
}

fn parse_lock_table(table: &str) -> HashSet<u64> {
    table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            if fields.next()? != "FLOCK" {
                return None; // POSIX locks, and `->` waiters
            }
            let id = fields.nth(3)?;
            id.rsplit(':').next()?.parse().ok()
        })
        .collect()
}

/// Slot files `<n>.lock` (n < max_jobs) in `dir` whose inode is in `held`.
fn count_held(dir: &Path, max_jobs: u32, held: &HashSet<u64>) -> u32 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let count = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".lock"))
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n < max_jobs)
        })
        .filter(|e| held.contains(&e.ino()))
        .count();
    u32::try_from(count).unwrap_or(u32::MAX)
}

impl SlotDir {
    /// The slot locks under `root`.
    pub fn new(root: impl Into<PathBuf>) -> SlotDir {
        SlotDir { root: root.into() }
    }

    /// The directory holding the locks.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn cluster_dir(&self, cluster: &str) -> Result<PathBuf, Failure> {
        check_cluster_name(cluster)?;
        let dir = self.root.join(cluster);
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(&dir)
                .or_fail(Kind::Config, || {
                    format!("creating the slot directory {}", dir.display())
                })?;
        }
        Ok(dir)
    }

    /// How many of the cluster's `max_jobs` slots are held right now: an
    /// estimate for choosing the least loaded cluster (another hook may take
    /// or free one the next moment; [`SlotDir::acquire`] is what decides).
    ///
    /// Read from the kernel's lock table (`/proc/locks`) against the lock
    /// files' inode numbers: two reads whatever `max_jobs` is, where trying
    /// each lock costs an open and a flock per slot. Falls back to trying
    /// when the lock table cannot be read.
    pub fn load(&self, cluster: &str, max_jobs: u32) -> Result<u32, Failure> {
        self.load_in(&LockTable::read(), cluster, max_jobs)
    }

    /// [`SlotDir::load`] with a lock table read once for several clusters.
    pub fn load_in(&self, table: &LockTable, cluster: &str, max_jobs: u32) -> Result<u32, Failure> {
        let dir = self.cluster_dir(cluster)?;
        match &table.held {
            Some(held) => Ok(count_held(&dir, max_jobs, held)),
            None => self.load_by_trying(&dir, max_jobs),
        }
    }

    fn load_by_trying(&self, dir: &Path, max_jobs: u32) -> Result<u32, Failure> {
        let mut busy = 0;
        for n in 0..max_jobs {
            let path = dir.join(format!("{n}.lock"));
            match try_lock(&path)? {
                Try::Busy => busy += 1,
                Try::Locked(file) => drop(file),
            }
        }
        Ok(busy)
    }

    /// Takes a free slot of the cluster, or `None` if all are held. The
    /// scan starts at a slot chosen from the process id, so that concurrent
    /// hooks (and a busy cluster) find a free slot in a few tries instead of
    /// all trying the low ones first.
    pub fn acquire(&self, cluster: &str, max_jobs: u32) -> Result<Option<Slot>, Failure> {
        self.acquire_from(cluster, max_jobs, std::process::id())
    }

    /// [`SlotDir::acquire`], scanning from slot `start % max_jobs`.
    pub fn acquire_from(
        &self,
        cluster: &str,
        max_jobs: u32,
        start: u32,
    ) -> Result<Option<Slot>, Failure> {
        let dir = self.cluster_dir(cluster)?;
        for k in 0..max_jobs {
            let index = (start % max_jobs + k) % max_jobs;
            let path = dir.join(format!("{index}.lock"));
            if let Try::Locked(file) = try_lock(&path)? {
                return Ok(Some(Slot {
                    _file: file,
                    path,
                    index,
                }));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_taken_in_order_and_freed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let slots = SlotDir::new(tmp.path().join("slots"));
        assert_eq!(slots.load("main", 2).unwrap(), 0);
        let a = slots.acquire_from("main", 2, 0).unwrap().unwrap();
        assert_eq!(a.index(), 0);
        assert_eq!(slots.load("main", 2).unwrap(), 1);
        let b = slots.acquire_from("main", 2, 0).unwrap().unwrap();
        assert_eq!(b.index(), 1);
        assert!(slots.acquire("main", 2).unwrap().is_none());
        assert_eq!(slots.load("main", 2).unwrap(), 2);
        // Clusters are independent.
        assert!(slots.acquire("other", 1).unwrap().is_some());
        drop(a);
        assert_eq!(slots.load("main", 2).unwrap(), 1);
        assert_eq!(
            slots.acquire_from("main", 2, 1).unwrap().unwrap().index(),
            0
        );
        assert!(b.path().ends_with("main/1.lock"));
    }

    #[test]
    fn a_killed_holder_frees_its_slot() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("main");
        fs::create_dir_all(&dir).unwrap();
        let lock = dir.join("0.lock");
        // flock(1) holds the lock in another process until it is killed
        // (`-o`: the command it runs does not inherit the lock).
        let mut holder = std::process::Command::new("flock")
            .arg("-o")
            .arg(&lock)
            .args(["sleep", "30"])
            .spawn()
            .unwrap();
        let slots = SlotDir::new(tmp.path());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while slots.load("main", 1).unwrap() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "flock never took the lock"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(slots.acquire("main", 1).unwrap().is_none());
        holder.kill().unwrap();
        holder.wait().unwrap();
        // No clean-up step: the kernel dropped the lock with the process.
        // flock(1)'s child holds a copy of the locked fd between its fork
        // and the close before exec; on a loaded machine that can outlive the
        // parent for a moment, so allow it a little time.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while slots.acquire("main", 1).unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the slot stayed taken after its holder was killed"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn the_lock_table_and_trying_agree() {
        let tmp = tempfile::tempdir().unwrap();
        let slots = SlotDir::new(tmp.path());
        let held: Vec<_> = (0..5)
            .map(|_| slots.acquire_from("main", 16, 3).unwrap().unwrap())
            .collect();
        let dir = tmp.path().join("main");
        assert_eq!(slots.load_by_trying(&dir, 16).unwrap(), 5);
        assert_eq!(slots.load("main", 16).unwrap(), 5);
        // Slots beyond max_jobs are not counted (held 3..8; max 6 → 3, 4, 5).
        assert_eq!(slots.load("main", 6).unwrap(), 3);
        drop(held);
        assert_eq!(slots.load("main", 16).unwrap(), 0);
    }

    #[test]
    fn the_lock_table_format() {
        let table = "1: FLOCK  ADVISORY  WRITE 12593 fe:00:5382153 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 11749 fe:00:77 0 EOF\n\
                     3: FLOCK  ADVISORY  READ 11609 00:2f:10133507 0 EOF\n\
                     3: -> FLOCK  ADVISORY  WRITE 11610 00:2f:42 0 EOF\n\
                     garbage\n";
        let held = parse_lock_table(table);
        assert_eq!(held, HashSet::from([5_382_153, 10_133_507]));
    }

    #[test]
    fn cluster_names_are_path_safe() {
        for bad in ["", ".", "..", "a/b", ".hidden", "a b"] {
            assert!(check_cluster_name(bad).is_err(), "{bad:?}");
        }
        for good in ["main", "gpu-2", "a.b_c"] {
            check_cluster_name(good).unwrap();
        }
    }
}
