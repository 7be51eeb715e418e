//! The status files in the runtime directory (`docs/nsh-status.md`):
//! `builds/` (one [`InFlight`] per stage at work) and `failures.jsonl`.
//!
//! Writing them is best effort: a status file that cannot be written is
//! logged, never a build's failure.

use std::path::{Path, PathBuf};

use crate::error::{Failure, Kind, ResultExt};
use crate::status::record::{
    append_bounded, settle_attempt, AttemptEnd, FailureLine, InFlight, MAX_FAILURES,
};
use crate::sys::flock::FileLock;

/// How long adding a failure waits for another writer: each holds the
/// lock only to rewrite a file of at most [`MAX_FAILURES`] lines.
const FAILURES_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The status files under one runtime directory.
#[derive(Debug, Clone)]
pub struct StatusDir {
    root: PathBuf,
}

impl StatusDir {
    /// The status files under `root` (a runtime directory; not made here).
    pub fn at(root: &Path) -> StatusDir {
        StatusDir {
            root: root.to_path_buf(),
        }
    }

    fn builds(&self) -> PathBuf {
        self.root.join("builds")
    }

    fn failures(&self) -> PathBuf {
        self.root.join("failures.jsonl")
    }

    /// Writes `flight` (temporary file, rename): a reader sees the old
    /// record or the new one. Returns its path.
    pub fn write(&self, flight: &InFlight) -> Result<PathBuf, Failure> {
        let dir = self.builds();
        crate::runtime::private_dir(&self.root)?;
        crate::runtime::private_dir(&dir)?;
        let path = dir.join(flight.file_name());
        let tmp = dir.join(format!(".{}", flight.file_name()));
        std::fs::write(&tmp, format!("{}\n", flight.to_json()))
            .or_fail(Kind::Transient, || format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .or_fail(Kind::Transient, || format!("renaming {}", tmp.display()))?;
        Ok(path)
    }

    /// The builds in flight, oldest first. A record whose stage process is
    /// gone (killed before it could remove it) is left out, and removed
    /// when this user may.
    pub fn in_flight(&self) -> Vec<InFlight> {
        let Ok(dir) = std::fs::read_dir(self.builds()) else {
            return Vec::new();
        };
        let mut flights = Vec::new();
        for path in dir.filter_map(Result::ok).map(|e| e.path()) {
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if hidden || path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Some(flight) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| InFlight::parse(&t))
            else {
                continue;
            };
            if flight.owner.is_alive() {
                flights.push(flight);
            } else {
                crate::log_debug!("status: dropping {} (its stage is gone)", path.display());
                let _ = std::fs::remove_file(&path);
            }
        }
        flights.sort_by(|a, b| (a.since, &a.drv, a.owner.pid).cmp(&(b.since, &b.drv, b.owner.pid)));
        flights
    }

    /// Adds `line` to `failures.jsonl`, which keeps its last
    /// [`MAX_FAILURES`] lines (rewritten whole under a lock, renamed in).
    pub fn add_failure(&self, line: &FailureLine) -> Result<(), Failure> {
        self.rewrite_failures(|old| append_bounded(old, line, MAX_FAILURES))
    }

    /// Settles a failed attempt of a build under the hook in
    /// `failures.jsonl` ([`settle_attempt`]).
    pub fn settle_attempt(&self, end: &AttemptEnd) -> Result<(), Failure> {
        self.rewrite_failures(|old| settle_attempt(old, end, MAX_FAILURES))
    }

    /// Rewrites `failures.jsonl` as `change` says, under its lock: a
    /// temporary file renamed in.
    fn rewrite_failures(&self, change: impl FnOnce(&str) -> String) -> Result<(), Failure> {
        crate::runtime::private_dir(&self.root)?;
        let lock_path = self.root.join("failures.lock");
        let _lock = FileLock::acquire(&lock_path, FAILURES_LOCK_TIMEOUT).map_err(|e| {
            Failure::caused_by(
                Kind::Transient,
                format!("locking {}: {e}", lock_path.display()),
                e,
            )
        })?;
        let path = self.failures();
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let tmp = self.root.join(".failures.jsonl");
        std::fs::write(&tmp, change(&old))
            .or_fail(Kind::Transient, || format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .or_fail(Kind::Transient, || format!("renaming {}", tmp.display()))
    }

    /// The last `last` failures, oldest first.
    pub fn recent_failures(&self, last: usize) -> Vec<FailureLine> {
        let text = std::fs::read_to_string(self.failures()).unwrap_or_default();
        let lines: Vec<FailureLine> = text.lines().filter_map(FailureLine::parse).collect();
        let skip = lines.len().saturating_sub(last);
        lines.into_iter().skip(skip).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::record::Owner;
    use crate::ticket::Ticket;

    fn ticket() -> Ticket {
        Ticket::from_line(
            r#"{"v":1,"drv":{"path":"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello.drv","name":"hello"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_build_in_flight_is_listed_while_its_stage_lives() {
        let root = tempfile::tempdir().unwrap();
        let status = StatusDir::at(&root.path().join("nsh"));
        assert!(status.in_flight().is_empty());
        let me = Owner::of(std::process::id()).unwrap();
        let mine = InFlight::of(&ticket(), "push", 5, me).unwrap();
        let path = status.write(&mine).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = Owner::of(child.id());
        child.wait().unwrap();
        let gone = gone.unwrap_or(Owner {
            pid: child.id(),
            start: 1,
        });
        let dead = InFlight::of(&ticket(), "run", 1, gone).unwrap();
        let dead_path = status.write(&dead).unwrap();
        assert_eq!(status.in_flight(), [mine]);
        assert!(path.exists());
        assert!(!dead_path.exists(), "the record of a gone stage is tidied");
    }

    #[test]
    fn failures_are_kept_in_order() {
        let root = tempfile::tempdir().unwrap();
        let status = StatusDir::at(root.path());
        assert!(status.recent_failures(10).is_empty());
        let mut failed = ticket();
        failed.fail(
            "run",
            &Failure::permanent("builder failed with exit code 1"),
        );
        for time in 0..3 {
            let line = FailureLine::of(&failed, None, time).unwrap();
            status.add_failure(&line).unwrap();
        }
        let times: Vec<u64> = status.recent_failures(2).iter().map(|f| f.time).collect();
        assert_eq!(times, [1, 2]);
    }
}
