//! The pool: running Slurm jobs kept between builds, so that a build skips
//! Slurm's queue when a job that fits is idle (allocation reuse;
//! `docs/pool.md` has the design and its reasons).
//!
//! One directory per cluster in the private runtime directory
//! (`<runtime>/pool/<cluster>/`), one JSON record per job ([`record`]),
//! read and changed only under the pool's `flock` (`lock`), which is held
//! for a few file operations, never across ssh or Slurm. A job has at most
//! one owner, a process named by pid and start time; a job whose owner is
//! gone is free again once its node says no build runs there. Nothing on
//! the login side has to stay alive for a job to end: an idle job leaves by
//! itself after its `linger` (the job script), and a record of a job that
//! left is dropped at the next look.
//!
//! * [`fit`]: which job a build may take, and in which order they are tried;
//! * [`record`]: one job's record and its owner;
//! * [`node`]: the short commands that take, give back and release a job on
//!   its node;
//! * [`locality`]: which store paths each node is known to hold.

pub mod fit;
pub mod locality;
pub mod node;
pub mod record;

use std::collections::BTreeSet;
#[cfg(test)]
use std::path::Path;
use std::path::PathBuf;

use crate::error::{Failure, Kind, ResultExt};
use crate::nix::store_path::StorePath;
use crate::runtime;
use crate::sys::flock::FileLock;
use fit::{free, Need, Unfit};
use record::{JobRecord, Owner};

/// Seconds past a returned job's linger after which its record is dropped
/// (the job has left by then: it claims its next number and exits).
pub const LINGER_GRACE_S: u64 = 10;

/// How long a tool waits for the pool's lock, which is held only while its
/// records are read or written: a holder stopped half-way must not stall
/// every build of the cluster.
pub const POOL_LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The pool of one cluster.
#[derive(Debug, Clone)]
pub struct Pool {
    dir: PathBuf,
}

/// A record and its file.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathBuf,
    pub record: JobRecord,
}

/// What to do for a build, decided under the pool's lock.
#[derive(Debug)]
pub enum Plan {
    /// Take this job (its record now names the caller as owner and the
    /// claimed number as `request`); `previous` is the record before, to
    /// put back if the node says no.
    Take {
        taken: JobRecord,
        previous: JobRecord,
    },
    /// Submit a new job; `pending` counts it against `max_jobs` meanwhile.
    /// `release`: an idle job that fits nothing asked for, dropped from the
    /// pool to make room, to be let go on its node.
    Submit {
        pending: JobRecord,
        release: Option<JobRecord>,
    },
    /// `max_jobs` jobs are pooled or being submitted, and none of them is
    /// free: wait for one.
    Full { jobs: usize },
}

/// Why a record is dropped, if it is: its job is known to be gone.
pub fn stale(record: &JobRecord, now: u64, owner_alive: bool) -> Option<&'static str> {
    if record.job.is_none() {
        return (!owner_alive).then_some("its submitter is gone");
    }
    if record.ends != 0 && record.ends <= now {
        return Some("its time limit is over");
    }
    if record.owner.is_none() && now > record.last_used + record.linger + LINGER_GRACE_S {
        return Some("it lingered out");
    }
    None
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn alive(record: &JobRecord) -> bool {
    record.owner.is_some_and(|o| o.is_alive())
}

impl Pool {
    /// The pool of `cluster`, its directory made if needed.
    pub fn open(cluster: &str) -> Result<Pool, Failure> {
        let dir = runtime::subdir("pool")?.join(runtime::file_name_safe(cluster));
        runtime::private_dir(&dir)?;
        Ok(Pool { dir })
    }

    /// The pool in `dir` (tests).
    #[cfg(test)]
    pub fn at(dir: &Path) -> Result<Pool, Failure> {
        runtime::private_dir(dir)?;
        Ok(Pool {
            dir: dir.to_path_buf(),
        })
    }

    /// Where the pool's files are (tests).
    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<FileLock, Failure> {
        let path = self.dir.join("lock");
        FileLock::acquire(&path, POOL_LOCK_TIMEOUT).map_err(|e| {
            Failure::caused_by(
                Kind::Transient,
                format!("locking the pool {}: {e}", path.display()),
                e,
            )
        })
    }

    /// Every record, as it is on disk (no lock: for listing).
    pub fn entries(&self) -> Vec<Entry> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut entries: Vec<Entry> = dir
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .filter_map(|path| JobRecord::read(&path).map(|record| Entry { path, record }))
            .collect();
        entries.sort_by_key(|e| (e.record.job, e.record.nonce.clone()));
        entries
    }

    /// The records of jobs not known to be gone (those are dropped first).
    pub fn current(&self) -> Result<Vec<Entry>, Failure> {
        let _lock = self.lock()?;
        Ok(self.swept(now_secs()))
    }

    /// The records left once those of jobs known gone are removed (the
    /// caller holds the lock).
    fn swept(&self, now: u64) -> Vec<Entry> {
        let mut kept = Vec::new();
        for entry in self.entries() {
            if let Some(why) = stale(&entry.record, now, alive(&entry.record)) {
                crate::log_debug!("pool: dropping {} ({why})", entry.path.display());
                let _ = std::fs::remove_file(&entry.path);
            } else {
                kept.push(entry);
            }
        }
        kept
    }

    /// Decides, under the lock, what a build with `need` does: take a free
    /// job that fits (best placed for `inputs`, skipping the jobs in
    /// `skip`), submit a new one (counted at once), or wait.
    pub fn plan(&self, request: &PlanRequest) -> Result<Plan, Failure> {
        let _lock = self.lock()?;
        let now = now_secs();
        let entries = self.swept(now);
        let candidates: Vec<&JobRecord> = entries
            .iter()
            .map(|e| &e.record)
            .filter(|r| r.job.is_some_and(|j| !request.skip.contains(&j)))
            .filter(|r| free(r, now, alive(r)).is_ok() && fit::fits(r, request.need, now).is_ok())
            .collect();
        let known = |node: &str| locality::score(&locality::known(&self.dir, node), request.inputs);
        if let Some(best) = fit::rank(&candidates, known).first() {
            let previous = (*best).clone();
            let mut taken = previous.clone();
            taken.owner = Some(request.owner);
            taken.request += 1;
            taken.last_used = now;
            taken.write(&self.dir)?;
            return Ok(Plan::Take { taken, previous });
        }
        let mut release = None;
        if entries.len() >= request.max_jobs as usize {
            // Make room: an idle job that fits nothing asked for goes.
            let idle = entries
                .iter()
                .find(|e| e.record.owner.is_none() && free(&e.record, now, false).is_ok());
            let Some(idle) = idle else {
                return Ok(Plan::Full {
                    jobs: entries.len(),
                });
            };
            std::fs::remove_file(&idle.path).or_fail(Kind::Transient, || {
                format!("removing {}", idle.path.display())
            })?;
            release = Some(idle.record.clone());
        }
        let pending = request.pending.clone();
        pending.write(&self.dir)?;
        Ok(Plan::Submit { pending, release })
    }

    /// The node said no to a take: the record goes back as it was (a build
    /// still runs there: `Busy`), or goes (the job is gone or leaving, or
    /// cannot be reached).
    pub fn untake(&self, previous: &JobRecord, answer: &node::Answer) -> Result<(), Failure> {
        let _lock = self.lock()?;
        if *answer == node::Answer::Busy {
            previous.write(&self.dir)?;
        } else {
            let _ = std::fs::remove_file(self.dir.join(previous.file_name()));
        }
        Ok(())
    }

    /// A submitted job runs: its record replaces the pending one.
    pub fn running(&self, pending: &JobRecord, record: &JobRecord) -> Result<(), Failure> {
        let _lock = self.lock()?;
        record.write(&self.dir)?;
        let _ = std::fs::remove_file(self.dir.join(pending.file_name()));
        Ok(())
    }

    /// A submission that came to nothing: its pending record goes.
    pub fn forget_pending(&self, pending: &JobRecord) {
        let _ = std::fs::remove_file(self.dir.join(pending.file_name()));
    }

    /// The record of `job`, if it is pooled.
    pub fn record(&self, job: u64) -> Option<JobRecord> {
        JobRecord::read(&self.dir.join(format!("job-{job}.json")))
    }

    /// Whether claim `request` of `job` still holds it: the record names
    /// that number and an owner (nobody returned or took it since).
    pub fn holds(&self, job: u64, request: u32) -> Option<JobRecord> {
        self.record(job)
            .filter(|r| r.request == request && r.owner.is_some())
    }

    /// Claim `request` of `job` is over and the job idles on its node: it
    /// is free for the next build.
    pub fn returned(&self, job: u64, request: u32) -> Result<bool, Failure> {
        let _lock = self.lock()?;
        let Some(mut record) = self.holds(job, request) else {
            return Ok(false);
        };
        record.owner = None;
        record.last_used = now_secs();
        record.write(&self.dir)?;
        Ok(true)
    }

    /// The job of claim `request` is no use any more (it ended, or is being
    /// let go): its record goes, unless someone else holds it by now.
    pub fn forget(&self, job: u64, request: u32) -> Result<(), Failure> {
        let _lock = self.lock()?;
        if self.record(job).is_some_and(|r| r.request == request) {
            let _ = std::fs::remove_file(self.dir.join(format!("job-{job}.json")));
        }
        Ok(())
    }

    /// Whether the jobs in use are due for a look at Slurm (at most once per
    /// `interval` for the whole pool, however many builds wait); marks the
    /// look as done.
    pub fn due_for_check(&self, interval: std::time::Duration) -> Result<bool, Failure> {
        let _lock = self.lock()?;
        let marker = self.dir.join("checked");
        let recent = std::fs::metadata(&marker)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < interval);
        if recent {
            return Ok(false);
        }
        std::fs::write(&marker, b"")
            .or_fail(Kind::Transient, || format!("writing {}", marker.display()))?;
        Ok(true)
    }

    /// The jobs that hold a place in the pool while in use (or orphaned).
    pub fn in_use(&self) -> Vec<JobRecord> {
        self.entries()
            .into_iter()
            .map(|e| e.record)
            .filter(|r| r.job.is_some() && r.owner.is_some())
            .collect()
    }

    /// `job` is known to have ended: its record goes, whoever holds it.
    pub fn ended(&self, job: u64) -> Result<(), Failure> {
        let _lock = self.lock()?;
        let _ = std::fs::remove_file(self.dir.join(format!("job-{job}.json")));
        Ok(())
    }

    /// Notes that `node` now holds `paths` (for locality).
    pub fn note_paths<P: AsRef<str>>(&self, node: &str, paths: &[P]) -> Result<(), Failure> {
        if paths.is_empty() || node.is_empty() {
            return Ok(());
        }
        let _lock = self.lock()?;
        locality::note(&self.dir, node, paths)
    }

    /// Notes that `node` lacks `paths` after all (for locality).
    pub fn forget_paths<P: AsRef<str>>(&self, node: &str, paths: &[P]) -> Result<(), Failure> {
        if paths.is_empty() || node.is_empty() {
            return Ok(());
        }
        let _lock = self.lock()?;
        locality::forget(&self.dir, node, paths)
    }

    /// Whether every one of `paths` is known to be on `node` (no lock: the
    /// record is replaced whole, by a rename).
    pub fn knows_all<P: AsRef<str>>(&self, node: &str, paths: &[P]) -> bool {
        if node.is_empty() {
            return false;
        }
        let known = locality::known(&self.dir, node);
        locality::score(&known, paths) == paths.len()
    }

    /// Empties the pool: free jobs are removed from it (returned: to be let
    /// go by the caller), jobs in use are marked to end when their owner is
    /// done, submissions in progress are left alone. Returns the free ones
    /// and the marked ones.
    pub fn drain(&self) -> Result<Drained, Failure> {
        let _lock = self.lock()?;
        let now = now_secs();
        let mut drained = Drained::default();
        for entry in self.swept(now) {
            let record = entry.record;
            match free(&record, now, alive(&record)) {
                Ok(()) | Err(Unfit::Lingered | Unfit::Draining) => {
                    let _ = std::fs::remove_file(&entry.path);
                    drained.free.push(record);
                }
                Err(Unfit::Busy) => {
                    let mut marked = record;
                    marked.draining = true;
                    marked.write(&self.dir)?;
                    drained.in_use.push(marked);
                }
                Err(_) => drained.pending.push(record),
            }
        }
        Ok(drained)
    }
}

/// What [`Pool::plan`] is asked.
pub struct PlanRequest<'a> {
    pub need: &'a Need,
    /// The build's input closure (for locality).
    pub inputs: &'a [StorePath],
    pub owner: Owner,
    pub max_jobs: u32,
    /// Jobs this build found busy on their node already.
    pub skip: &'a BTreeSet<u64>,
    /// The record to write if a new job is to be submitted.
    pub pending: &'a JobRecord,
}

/// What [`Pool::drain`] did.
#[derive(Debug, Default)]
pub struct Drained {
    /// Removed from the pool; their jobs are to be let go.
    pub free: Vec<JobRecord>,
    /// Held by an owner: marked, they end when given back.
    pub in_use: Vec<JobRecord>,
    /// Being submitted: left alone.
    pub pending: Vec<JobRecord>,
}

#[cfg(test)]
mod tests;
