//! One pooled job as the login side keeps it: a JSON file per job in the
//! pool directory, written whole to a temporary name and renamed, so a
//! reader sees the old record or the new one, never half of one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Backend;
use crate::error::{Failure, Kind, ResultExt};

/// Who holds a job: a process, named by its pid and its start time (clock
/// ticks since boot), so that a pid the kernel handed out again is not
/// taken for the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    pub start: u64,
}

impl Owner {
    /// The process `pid`, if it runs.
    pub fn of(pid: u32) -> Option<Owner> {
        crate::sys::process::start_ticks(pid).map(|start| Owner { pid, start })
    }

    /// Whether this owner still runs (the same process, not a later one
    /// with its pid).
    pub fn is_alive(&self) -> bool {
        crate::sys::process::start_ticks(self.pid) == Some(self.start)
    }
}

/// A running (or submitted) nsh job kept for later builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The Slurm job id; `None` while the job is being submitted.
    pub job: Option<u64>,
    /// The node it runs on (empty until it runs).
    #[serde(default)]
    pub node: String,
    /// The ssh destination for the node.
    #[serde(default)]
    pub ssh: String,
    /// The job's work dir on the node.
    #[serde(default)]
    pub work: String,
    /// The job's nonce (its log sentinel).
    #[serde(default)]
    pub nonce: String,
    pub backend: Backend,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm: Option<String>,
    /// What the job was submitted with.
    #[serde(default)]
    pub partition: Option<String>,
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub qos: Option<String>,
    #[serde(default)]
    pub constraint: Option<String>,
    /// Node features the job's node is known to have: those its constraint
    /// required (a plain `a&b` constraint; none for another expression).
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub gres: Option<String>,
    #[serde(default)]
    pub cpus: Option<u32>,
    #[serde(default)]
    pub mem_mb: Option<u64>,
    /// Digest of the job's environment (what the configuration gave its
    /// script): a job made under other settings fits no build of these.
    pub env: String,
    /// When the job started and when its time limit ends (Unix seconds).
    #[serde(default)]
    pub started: u64,
    #[serde(default)]
    pub ends: u64,
    /// How long it waits in the pool after a build (the cluster's `linger`
    /// when it was submitted).
    pub linger: u64,
    /// The last request number claimed; the next taker claims one more.
    pub request: u32,
    /// When it was last taken or returned (Unix seconds).
    pub last_used: u64,
    /// Who holds it now; `None`: returned, idle in the pool.
    pub owner: Option<Owner>,
    /// `nsh-alloc --pool-drain` asked for it to end when its owner is done.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

impl JobRecord {
    /// The record's file name: by job id, or for a submission in progress by
    /// its nonce.
    pub fn file_name(&self) -> String {
        match self.job {
            Some(job) => format!("job-{job}.json"),
            None => format!("new-{}.json", self.nonce),
        }
    }

    /// The record as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a record; `None` for a file that is not one (a stray file, or
    /// one written by another nsh version): it is left alone.
    pub fn read(path: &Path) -> Option<JobRecord> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes the record into `dir`, atomically (temporary file, rename).
    pub fn write(&self, dir: &Path) -> Result<PathBuf, Failure> {
        let path = dir.join(self.file_name());
        let tmp = dir.join(format!(".{}.{}", self.file_name(), std::process::id()));
        std::fs::write(&tmp, format!("{}\n", self.to_json()))
            .or_fail(Kind::Transient, || format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .or_fail(Kind::Transient, || format!("renaming {}", tmp.display()))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> JobRecord {
        JobRecord {
            job: Some(42),
            node: "node1".into(),
            ssh: "nixbuild@node1".into(),
            work: "/tmp/nsh/nsh-42".into(),
            nonce: "0123abcd".into(),
            backend: Backend::Rest,
            api: Some("v0.0.38".into()),
            slurm: Some("22.05.8".into()),
            partition: Some("build".into()),
            account: None,
            qos: None,
            constraint: Some("big".into()),
            features: vec!["big".into()],
            gres: None,
            cpus: Some(2),
            mem_mb: Some(1024),
            env: "e5".into(),
            started: 1000,
            ends: 8200,
            linger: 60,
            request: 3,
            last_used: 1100,
            owner: Some(Owner { pid: 7, start: 99 }),
            draining: false,
        }
    }

    #[test]
    fn the_record_as_written() {
        insta::assert_snapshot!(sample().to_json());
    }

    #[test]
    fn a_record_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let record = sample();
        let path = record.write(dir.path()).unwrap();
        assert_eq!(path.file_name().unwrap(), "job-42.json");
        assert_eq!(JobRecord::read(&path), Some(record.clone()));
        let mut pending = record;
        pending.job = None;
        pending.owner = None;
        pending.draining = true;
        let path = pending.write(dir.path()).unwrap();
        assert_eq!(path.file_name().unwrap(), "new-0123abcd.json");
        assert_eq!(JobRecord::read(&path), Some(pending));
        // Nothing else is left in the directory: no temporary file.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        std::fs::write(dir.path().join("junk.json"), "{").unwrap();
        assert_eq!(JobRecord::read(&dir.path().join("junk.json")), None);
    }

    #[test]
    fn an_owner_is_alive_only_as_the_same_process() {
        let me = Owner::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        let reused_pid = Owner {
            start: me.start + 1,
            ..me
        };
        assert!(!reused_pid.is_alive());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(Owner::of(pid).is_none());
    }
}
