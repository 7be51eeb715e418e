//! `nsh-alloc --pool-list` and `--pool-drain`: the pool as an admin sees
//! it, and how it is emptied (`docs/pool.md`).

use std::io::Write;

use crate::config::Config;
use crate::error::{Failure, Kind, ResultExt};
use crate::pool::node::{self, Answer};
use crate::pool::record::JobRecord;
use crate::pool::Pool;
use crate::slurm::Clusters;
use crate::stage::ssh::Ssh;
use crate::ticket::AllocSection;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a record's job is doing, in a word.
pub fn state(record: &JobRecord) -> &'static str {
    match (record.job, record.owner) {
        (None, _) => "submitting",
        _ if record.draining => "draining",
        (Some(_), Some(owner)) if owner.is_alive() => "in-use",
        (Some(_), Some(_)) => "orphaned",
        (Some(_), None) => "idle",
    }
}

/// One line of `--pool-list`: the record, with its cluster, its state and,
/// for an idle job, the seconds until it leaves by itself.
pub fn list_line(cluster: &str, record: &JobRecord, now: u64) -> String {
    let mut value = serde_json::to_value(record).unwrap_or_default();
    value["cluster"] = cluster.into();
    value["state"] = state(record).into();
    if record.owner.is_none() && record.job.is_some() {
        value["leaves_in"] = (record.last_used + record.linger)
            .saturating_sub(now)
            .into();
    }
    value.to_string()
}

/// Every pooled job of the configured clusters (records of jobs known to
/// be gone are dropped first), with its cluster's name.
pub fn pooled(config: &Config) -> Result<Vec<(String, JobRecord)>, Failure> {
    let mut jobs = Vec::new();
    for cluster in config.clusters.values() {
        let pool = Pool::open(&cluster.name)?;
        for entry in pool.current()? {
            jobs.push((cluster.name.clone(), entry.record));
        }
    }
    Ok(jobs)
}

/// `--pool-list`: every pooled job of the configured clusters, one JSON
/// object per line.
pub fn list(config: &Config, out: &mut dyn Write) -> Result<(), Failure> {
    let now = now_secs();
    for (cluster, record) in pooled(config)? {
        writeln!(out, "{}", list_line(&cluster, &record, now))
            .or_fail(Kind::Transient, || "writing the list")?;
    }
    Ok(())
}

/// `--pool-drain`: empties the pools of the configured clusters. Idle and
/// orphaned jobs are let go now (`release` on their node, else scancel),
/// jobs in use end when their build gives them back, submissions in
/// progress are left alone. One JSON line per job says what was done.
pub fn drain(config: &Config, clusters: &mut Clusters, out: &mut dyn Write) -> Result<(), Failure> {
    for cluster in config.clusters.values() {
        let pool = Pool::open(&cluster.name)?;
        let drained = pool.drain()?;
        let mut report = |record: &JobRecord, action: &str| {
            let line = serde_json::json!({
                "cluster": cluster.name, "job": record.job, "node": record.node, "action": action,
            });
            writeln!(out, "{line}").or_fail(Kind::Transient, || "writing the report")
        };
        for record in &drained.free {
            let action = let_go(config, clusters, &cluster.name, record);
            report(record, action)?;
        }
        for record in &drained.in_use {
            report(record, "ends-when-given-back")?;
        }
        for record in &drained.pending {
            report(record, "left-submitting")?;
        }
    }
    Ok(())
}

/// Ends one drained job: `release` on its node (it leaves between builds),
/// else scancel. What was done, in a word.
fn let_go(
    config: &Config,
    clusters: &mut Clusters,
    cluster: &str,
    record: &JobRecord,
) -> &'static str {
    let Some(job) = record.job else {
        return "left-submitting";
    };
    let mut section = AllocSection {
        cluster: cluster.to_string(),
        job,
        node: record.node.clone(),
        ssh: record.ssh.clone(),
        ..AllocSection::default()
    };
    let answer = match Ssh::ensure_master(&mut section, config) {
        Ok(ssh) => node::release(&ssh, &record.work),
        Err(failure) => Answer::Unreachable(failure.message),
    };
    match answer {
        Answer::Done => "released",
        Answer::Gone => "gone",
        _ => {
            let cancelled = config
                .clusters
                .get(cluster)
                .ok_or_else(|| Failure::config(format!("no cluster {cluster}")))
                .and_then(|c| clusters.get(c).and_then(|slurm| slurm.cancel(job)));
            match cancelled {
                Ok(()) => "cancelled",
                Err(failure) => {
                    crate::log_warn!("job {job}: {failure}");
                    "failed"
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::record::Owner;

    #[test]
    fn a_listed_idle_job_says_when_it_leaves() {
        let record = JobRecord {
            job: Some(5),
            node: "node1".into(),
            ssh: "node1".into(),
            work: "/w".into(),
            nonce: "n".into(),
            backend: crate::config::Backend::Cli,
            api: None,
            slurm: None,
            partition: None,
            account: None,
            qos: None,
            constraint: None,
            features: vec![],
            gres: None,
            cpus: None,
            mem_mb: None,
            env: "e".into(),
            started: 100,
            ends: 9000,
            linger: 60,
            request: 2,
            last_used: 1000,
            owner: None,
            draining: false,
        };
        let line: serde_json::Value =
            serde_json::from_str(&list_line("test", &record, 1015)).unwrap();
        assert_eq!(line["state"], "idle");
        assert_eq!(line["leaves_in"], 45);
        assert_eq!(line["cluster"], "test");
        let gone_owner = JobRecord {
            owner: Some(Owner {
                pid: u32::MAX - 1,
                start: 1,
            }),
            ..record.clone()
        };
        assert_eq!(state(&gone_owner), "orphaned");
        assert_eq!(
            state(&JobRecord {
                job: None,
                ..record
            }),
            "submitting"
        );
    }
}
