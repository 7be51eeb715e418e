//! `nsh-alloc` with the pool on (`linger` > 0): a free job that fits is
//! taken (its next request number claimed on its node), else a new one is
//! submitted, counted in the pool from the moment it is decided, and made
//! into a pool record once it runs (`docs/pool.md`).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{batch_script, nonce, Submission};
use crate::config::{Cluster, Config};
use crate::error::Failure;
use crate::nix::store_path::StorePath;
use crate::pool::fit::{plain_features, Need};
use crate::pool::node::{self, Answer};
use crate::pool::record::{JobRecord, Owner};
use crate::pool::{Plan, PlanRequest, Pool};
use crate::stage::ssh::Ssh;
use crate::ticket::AllocSection;
use crate::{log_debug, log_info, log_warn};

/// `NSH_POOL_OWNER=pid`: the process that holds the job for the build
/// (default: nsh-alloc's parent, which is nsh-hook under the hook and the
/// shell of a pipeline run by hand).
pub const POOL_OWNER_ENV: &str = "NSH_POOL_OWNER";

/// How often a build that finds the pool full looks again.
const FULL_POOL_RECHECK: Duration = Duration::from_millis(250);

/// The process that will own the job.
pub fn pool_owner() -> Result<Owner, Failure> {
    let named = std::env::var(POOL_OWNER_ENV).ok().filter(|v| !v.is_empty());
    let pid = match &named {
        Some(text) => text.parse().map_err(|_| {
            Failure::input(format!("{POOL_OWNER_ENV}={text:?} is not a process id"))
        })?,
        None => crate::sys::process::parent_pid(),
    };
    Owner::of(pid).ok_or_else(|| {
        Failure::transient(format!(
            "the process that is to own the job (pid {pid}{}) is gone",
            if named.is_some() {
                ", from NSH_POOL_OWNER"
            } else {
                ", nsh-alloc's parent"
            }
        ))
    })
}

/// A digest of what the job's script gets from the configuration, of how
/// and as whom it was submitted (backend, slurmrestd, the job's account),
/// and of whom ssh logs in as: a job made under other settings fits no
/// build, even in a cluster of the same name.
pub fn environment_digest(config: &Config, cluster: &Cluster) -> String {
    let mut hasher = Sha256::new();
    let url = cluster.url.as_ref().map(ToString::to_string);
    for part in [
        Some(cluster.backend.to_string()),
        url,
        cluster.user.clone(),
        cluster.submit.submit_as.clone(),
    ] {
        hasher.update(part.unwrap_or_default().as_bytes());
        hasher.update(b"\0");
    }
    for (key, value) in batch_script::environment(config, cluster, "") {
        hasher.update(key.as_bytes());
        hasher.update(b"=");
        hasher.update(value.as_bytes());
        hasher.update(b"\0");
    }
    hasher.update(config.ssh_user(cluster).unwrap_or("").as_bytes());
    crate::nix::hash::hex(&hasher.finalize()[..12])
}

/// What a placement needs of a job.
pub(crate) fn need_of(submission: &Submission) -> Need {
    let (config, cluster, placement) =
        (submission.config, submission.cluster, submission.placement);
    Need {
        partition: placement.partition.clone(),
        account: cluster.account.clone(),
        qos: cluster.qos.clone(),
        constraint: placement.constraint.clone(),
        gres: placement.gres.clone(),
        cpus: placement.cpus,
        mem_mb: placement.mem_mb,
        time_min: placement.time_min,
        env: environment_digest(config, cluster),
    }
}

/// The time limit a pooled job is submitted with: the build's need plus
/// `reuse_time`, within `max_time`.
pub fn pooled_time_min(cluster: &Cluster, need_min: u32) -> u32 {
    let asked = need_min.saturating_add(cluster.reuse_time_min);
    cluster
        .limits
        .max_time_min
        .map_or(asked, |max| asked.min(max.max(need_min)))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A job for the build from the pool, or a new one kept in it.
pub(super) fn allocate(
    submission: &mut Submission,
    inputs: &[StorePath],
) -> Result<AllocSection, Failure> {
    let pool = Pool::open(&submission.cluster.name)?;
    let owner = pool_owner()?;
    let need = need_of(submission);
    let mut skip = BTreeSet::new();
    let waiting_since = Instant::now();
    loop {
        if submission.interrupted.load(Ordering::SeqCst) {
            return Err(Failure::transient("interrupted before a job was found"));
        }
        let nonce = nonce()?;
        skip.extend(jobs_on(&pool, submission.exclude));
        let pending = pending_record(submission, &need, &nonce, owner);
        let plan = pool.plan(&PlanRequest {
            need: &need,
            inputs,
            owner,
            max_jobs: submission.cluster.max_jobs,
            skip: &skip,
            pending: &pending,
        })?;
        match plan {
            Plan::Take { taken, previous } => {
                let started = Instant::now();
                let (answer, section) = take(submission.config, &submission.cluster.name, &taken);
                submission.times.take = started.elapsed();
                if answer == Answer::Done {
                    log_info!(
                        "job {} on {} from the pool (request {})",
                        section.job,
                        section.node,
                        section.request
                    );
                    return Ok(section);
                }
                log_debug!("pool: job {:?} said {answer:?} to a take", taken.job);
                pool.untake(&previous, &answer)?;
                if let (Answer::Gone, Some(job)) = (&answer, taken.job) {
                    cancel_if_requeued(submission, job);
                }
                if let (Answer::Busy, Some(job)) = (&answer, taken.job) {
                    skip.insert(job);
                }
            }
            Plan::Submit { pending, release } => {
                if let Some(idle) = release {
                    let_go(submission, &idle);
                }
                return submit(submission, &pool, &pending);
            }
            Plan::Full { jobs } => {
                let waited = waiting_since.elapsed();
                if waited.as_secs() >= submission.cluster.queue_timeout_s {
                    return Err(Failure::transient(format!(
                        "the pool of cluster {} stayed full ({jobs} jobs, max_jobs {}, all in use) \
                         for the queue timeout of {} s",
                        submission.cluster.name,
                        submission.cluster.max_jobs,
                        submission.cluster.queue_timeout_s
                    )));
                }
                log_debug!("pool: full ({jobs} jobs in use); waiting");
                drop_ended_jobs(submission, &pool);
                std::thread::sleep(FULL_POOL_RECHECK);
            }
        }
    }
}

/// The pooled jobs on `nodes` (where an earlier attempt of this build
/// failed): not taken.
fn jobs_on(pool: &Pool, nodes: &[String]) -> Vec<u64> {
    if nodes.is_empty() {
        return Vec::new();
    }
    pool.entries()
        .into_iter()
        .filter(|e| nodes.contains(&e.record.node))
        .filter_map(|e| e.record.job)
        .collect()
}

/// A pooled job whose work dir is gone from its node may have been
/// requeued (its node failed; Slurm 22.05's REST API ignores `requeue:
/// false`, and an admin may requeue any job): one that is pending again is
/// cancelled rather than left to wait, for minutes, to run for nothing.
fn cancel_if_requeued(submission: &mut Submission, job: u64) {
    let Ok(slurm) = submission.clusters.get(submission.cluster) else {
        return;
    };
    if slurm
        .job(job)
        .is_ok_and(|info| info.state == crate::slurm::JobState::Pending)
        && slurm.cancel(job).is_ok()
    {
        log_info!("pool: job {job} was requeued; cancelled it");
    }
}

/// How often, at most, a full pool's jobs in use are looked at in Slurm.
const ENDED_JOBS_CHECK: Duration = Duration::from_secs(10);

/// A full pool may hold jobs that ended without their owner knowing (a
/// pipeline run by hand and left, whose job gave up waiting; a job an admin
/// cancelled): each job in use is looked at in Slurm, at most every
/// [`ENDED_JOBS_CHECK`] for the whole pool, and those no longer running go.
fn drop_ended_jobs(submission: &mut Submission, pool: &Pool) {
    if !pool.due_for_check(ENDED_JOBS_CHECK).unwrap_or(false) {
        return;
    }
    let Ok(slurm) = submission.clusters.get(submission.cluster) else {
        return;
    };
    for record in pool.in_use() {
        let Some(job) = record.job else { continue };
        let ended = match slurm.job(job) {
            Ok(info) if info.state == crate::slurm::JobState::Pending => {
                // Requeued (a node failure on Slurm 22.05, whose REST API
                // ignores `requeue: false`): it would only wait for a
                // request that never comes.
                if slurm.cancel(job).is_ok() {
                    log_info!("pool: job {job} was requeued; cancelled it");
                }
                true
            }
            Ok(info) => !matches!(
                info.state,
                crate::slurm::JobState::Running | crate::slurm::JobState::Suspended
            ),
            Err(_) => false,
        };
        if ended {
            log_info!("pool: job {job} has ended; it leaves the pool");
            let _ = pool.ended(job);
        }
    }
}

/// The record a new job gets while it is being submitted.
fn pending_record(submission: &Submission, need: &Need, nonce: &str, owner: Owner) -> JobRecord {
    let placement = submission.placement;
    JobRecord {
        job: None,
        node: String::new(),
        ssh: String::new(),
        work: String::new(),
        nonce: nonce.to_string(),
        backend: submission.cluster.backend,
        api: None,
        slurm: None,
        partition: placement.partition.clone(),
        account: need.account.clone(),
        qos: need.qos.clone(),
        constraint: placement.constraint.clone(),
        features: placement
            .constraint
            .as_deref()
            .and_then(plain_features)
            .unwrap_or_default(),
        gres: placement.gres.clone(),
        cpus: placement.cpus,
        mem_mb: placement.mem_mb,
        env: need.env.clone(),
        started: 0,
        ends: 0,
        linger: submission.cluster.linger_s,
        request: 1,
        last_used: now_secs(),
        owner: Some(owner),
        draining: false,
    }
}

/// Claims the taken record's number on its node; the node's answer, and
/// the `alloc` section the build gets if it said yes.
fn take(config: &Config, cluster: &str, taken: &JobRecord) -> (Answer, AllocSection) {
    let mut section = AllocSection {
        cluster: cluster.to_string(),
        backend: taken.backend,
        api: taken.api.clone(),
        slurm: taken.slurm.clone(),
        job: taken.job.unwrap_or_default(),
        node: taken.node.clone(),
        ssh: taken.ssh.clone(),
        work: taken.work.clone(),
        control: None,
        nonce: taken.nonce.clone(),
        request: taken.request,
        reused: Some(true),
        age: Some(now_secs().saturating_sub(taken.started)),
        extra: crate::ticket::Extra::default(),
    };
    let answer = match Ssh::ensure_master(&mut section, config) {
        Ok(ssh) => node::take(&ssh, &taken.work, taken.request),
        Err(failure) => Answer::Unreachable(failure.message),
    };
    (answer, section)
}

/// Submits the new job the pool made room for, waits until it runs and
/// makes it a pool record held by this build.
fn submit(
    submission: &mut Submission,
    pool: &Pool,
    pending: &JobRecord,
) -> Result<AllocSection, Failure> {
    let time_min = pooled_time_min(submission.cluster, submission.placement.time_min);
    let (section, info) = submission
        .submit(&pending.nonce, time_min)
        .inspect_err(|_| pool.forget_pending(pending))?;
    let now = now_secs();
    let started = info.start.filter(|&s| s > 0 && s <= now).unwrap_or(now);
    let ends = info
        .end
        .filter(|&e| e > now)
        .unwrap_or(started + u64::from(time_min) * 60);
    let record = JobRecord {
        job: Some(section.job),
        node: section.node.clone(),
        ssh: section.ssh.clone(),
        work: section.work.clone(),
        api: section.api.clone(),
        slurm: section.slurm.clone(),
        started,
        ends,
        last_used: now,
        ..pending.clone()
    };
    if let Err(failure) = pool.running(pending, &record) {
        // The build still has its job; only later builds miss it.
        log_warn!("pool: recording job {}: {failure}", section.job);
        pool.forget_pending(pending);
    }
    Ok(section)
}

/// Lets an idle job go that the pool dropped to make room: `release` on its
/// node, else scancel. Best effort: it ends after its linger anyway.
fn let_go(submission: &mut Submission, record: &JobRecord) {
    let Some(job) = record.job else { return };
    let cluster = submission.cluster;
    let mut section = AllocSection {
        cluster: cluster.name.clone(),
        job,
        node: record.node.clone(),
        ssh: record.ssh.clone(),
        ..AllocSection::default()
    };
    let answer = match Ssh::ensure_master(&mut section, submission.config) {
        Ok(ssh) => node::release(&ssh, &record.work),
        Err(failure) => Answer::Unreachable(failure.message),
    };
    log_info!(
        "pool: letting idle job {job} on {} go to make room ({answer:?})",
        record.node
    );
    if !matches!(answer, Answer::Done | Answer::Gone) {
        if let Err(e) = submission.clusters.get(cluster).and_then(|s| s.cancel(job)) {
            log_warn!("cancelling job {job}: {e}");
        }
    }
}

/// What `nsh-alloc --cancel` does with a ticket's pooled job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Back in the pool, idle on its node.
    Returned,
    /// Given back already, or taken by another build since: not this
    /// ticket's to end.
    NotThisTickets,
    /// Not pooled, or not healthy: cancel it.
    ToCancel,
}

/// Gives a ticket's job back to the pool when it is `healthy` and its node
/// agrees (no build runs there), else says to cancel it (and drops it from
/// the pool).
pub fn settle(config: &Config, alloc: &AllocSection, healthy: bool) -> Result<Settled, Failure> {
    let pool = Pool::open(&alloc.cluster)?;
    let Some(record) = pool.record(alloc.job) else {
        return Ok(Settled::ToCancel);
    };
    if record.request != alloc.request || record.owner.is_none() {
        log_info!(
            "job {} is no longer this build's (request {}, the pool's is {}): left as it is",
            alloc.job,
            alloc.request,
            record.request
        );
        return Ok(Settled::NotThisTickets);
    }
    if healthy && !record.draining {
        let mut section = alloc.clone();
        let answer = match Ssh::ensure_master(&mut section, config) {
            Ok(ssh) => node::give_back(&ssh, &alloc.work, alloc.request),
            Err(failure) => Answer::Unreachable(failure.message),
        };
        if answer == Answer::Done && pool.returned(alloc.job, alloc.request)? {
            log_info!("job {} on {} is back in the pool", alloc.job, alloc.node);
            return Ok(Settled::Returned);
        }
        log_info!(
            "job {} on {}: {answer:?}; cancelling it",
            alloc.job,
            alloc.node
        );
    }
    pool.forget(alloc.job, alloc.request)?;
    Ok(Settled::ToCancel)
}

/// After a good build (`nsh-fetch`): the job goes back to the pool, idle on
/// its node, when this ticket still holds it; a job being drained, or one
/// that is not pooled, is let go instead. Best effort: a job that cannot be
/// told ends by itself after its idle timeout. `told`: the node's answer to
/// a give-back already asked (in the fetch's session), else it is asked.
pub fn give_back(ssh: &Ssh, alloc: &AllocSection, told: Option<node::Answer>) {
    let pool = match Pool::open(&alloc.cluster) {
        Ok(pool) => pool,
        Err(failure) => {
            log_warn!("the pool: {failure}; releasing job {}", alloc.job);
            crate::stage::release::release(ssh, alloc);
            return;
        }
    };
    let Some(record) = pool.holds(alloc.job, alloc.request) else {
        crate::stage::release::release(ssh, alloc);
        return;
    };
    if record.draining {
        let _ = pool.forget(alloc.job, alloc.request);
        crate::stage::release::release(ssh, alloc);
        return;
    }
    let answer = told.unwrap_or_else(|| node::give_back(ssh, &alloc.work, alloc.request));
    match answer {
        Answer::Done => match pool.returned(alloc.job, alloc.request) {
            Ok(_) => log_info!(
                "job {} on {} is back in the pool",
                alloc.job,
                ssh.describe()
            ),
            Err(failure) => log_warn!("returning job {} to the pool: {failure}", alloc.job),
        },
        answer => {
            log_warn!(
                "job {} on {} could not be given back ({answer:?}); it leaves the pool",
                alloc.job,
                ssh.describe()
            );
            let _ = pool.forget(alloc.job, alloc.request);
        }
    }
}

/// The ticket's job leaves the pool (it is being let go), if the ticket
/// still holds it.
pub fn forget(alloc: &AllocSection) {
    if let Ok(pool) = Pool::open(&alloc.cluster) {
        let _ = pool.forget(alloc.job, alloc.request);
    }
}

/// Whether the ticket's cluster keeps jobs in a pool (its `linger` > 0).
pub fn is_pooled(config: &Config, alloc: &AllocSection) -> bool {
    config
        .clusters
        .get(&alloc.cluster)
        .is_some_and(|c| c.linger_s > 0)
}

/// Whether the pool knows the ticket's node to hold every one of `paths`
/// (what nsh pushed there or fetched from there). Only where the pool is on.
pub fn known_on_node<P: AsRef<str>>(config: &Config, alloc: &AllocSection, paths: &[P]) -> bool {
    is_pooled(config, alloc)
        && Pool::open(&alloc.cluster).is_ok_and(|pool| pool.knows_all(&alloc.node, paths))
}

/// Notes, for locality, that the ticket's node lacks `paths` after all;
/// best effort.
pub fn forget_paths<P: AsRef<str>>(alloc: &AllocSection, paths: &[P]) {
    let forgotten =
        Pool::open(&alloc.cluster).and_then(|pool| pool.forget_paths(&alloc.node, paths));
    if let Err(failure) = forgotten {
        log_debug!("pool: forgetting paths on {}: {failure}", alloc.node);
    }
}

/// Notes, for locality, that the ticket's node now holds `paths`. Only
/// where the pool is on; best effort.
pub fn note_paths<P: AsRef<str>>(config: &Config, alloc: &AllocSection, paths: &[P]) {
    if !is_pooled(config, alloc) {
        return;
    }
    let noted = Pool::open(&alloc.cluster).and_then(|pool| pool.note_paths(&alloc.node, paths));
    if let Err(failure) = noted {
        log_debug!("pool: noting paths on {}: {failure}", alloc.node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A cluster of the same name under another backend or account is not
    /// the same pool: its jobs were submitted differently, as someone else.
    #[test]
    fn the_digest_tells_backends_and_accounts_apart() {
        let digest = |cluster: &str| {
            let text = format!("[cluster.test]\nsystems = [\"x86_64-linux\"]\n{cluster}");
            let config = Config::parse(Path::new("t.toml"), &text).unwrap();
            environment_digest(&config, &config.clusters["test"])
        };
        let rest = digest("url = \"unix:/run/slurmrestd.sock\"\n");
        let cli = digest("backend = \"cli\"\n");
        let cli_as = digest("backend = \"cli\"\nsubmit_as = \"nixbuild\"\n");
        assert_ne!(rest, cli);
        assert_ne!(cli, cli_as);
        assert_eq!(cli, digest("backend = \"cli\"\n"));
    }
}
