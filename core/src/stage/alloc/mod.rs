//! `nsh-alloc`: a running Slurm job on a node that can build the ticket's
//! derivation.
//!
//! [`place`] is the pure decision (which cluster, what to ask Slurm for);
//! [`allocate`] submits and waits for the job to run; [`cancel`] ends a
//! ticket's job.

pub mod admin;
pub mod batch_script;
pub mod later;
pub mod pooled;

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::config::{Cluster, Config};
use crate::error::{Failure, Kind};
use crate::exit::ExitStatus;
use crate::slurm::{Clusters, JobInfo, JobRequest, Slurm};
use crate::stage::progress::{describe_wait, QueueProgress};
use crate::ticket::{AllocSection, BuildOptions, DrvSection, Resources, Ticket};
use crate::{log_debug, log_warn};

/// Where a derivation goes and what Slurm is asked for (no script or
/// environment yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub cluster: String,
    pub partition: Option<String>,
    pub constraint: Option<String>,
    pub gres: Option<String>,
    pub cpus: Option<u32>,
    pub mem_mb: Option<u64>,
    pub time_min: u32,
}

/// Minutes added to Nix's build timeout for the job's time limit: the job
/// also waits for its request and for the outputs to be fetched.
const TIMEOUT_MARGIN_MIN: u32 = 10;

/// Picks the first cluster (higher `priority` first, then name order) that fits the derivation, or
/// says, cluster by cluster, why none does (bad input, exit 65).
pub fn place(
    config: &Config,
    drv: &DrvSection,
    options: Option<&BuildOptions>,
) -> Result<Placement, Failure> {
    let mut why = Vec::new();
    // The documented order: higher `priority` first, then by name (the
    // hook, which knows the loads, has chosen already: NSH_CLUSTER).
    let mut clusters: Vec<&Cluster> = config.clusters.values().collect();
    clusters.sort_by_key(|c| std::cmp::Reverse(c.priority));
    for cluster in clusters {
        match place_on(cluster, drv, options) {
            Ok(placement) => return Ok(placement),
            Err(reason) => why.push(format!("cluster {}: {reason}", cluster.name)),
        }
    }
    Err(Failure::input(format!(
        "no configured cluster can build {} ({}{}): {}",
        drv.name,
        drv.system,
        if drv.features.is_empty() {
            String::new()
        } else {
            format!(", features {}", drv.features.join(" "))
        },
        why.join("; ")
    )))
}

/// Why a derivation does not fit a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Misfit {
    /// The cluster builds other systems (its systems, the derivation's).
    System(Vec<String>, String),
    /// Required features the cluster does not support.
    Unsupported(Vec<String>),
    /// The cluster's mandatory features the derivation does not require.
    NotMandatory(Vec<String>),
    /// Two features route to different partitions.
    Partitions(String, String),
    /// `nshResources` asks for more than the limit: what, asked, limit.
    AboveLimit(&'static str, String, String),
    /// `nshResources` asks for gres, which the cluster does not allow.
    GresNotAllowed,
    /// `nshResources` asks for a constraint, which the cluster does not allow.
    ConstraintNotAllowed,
    /// A gres or constraint that is not a Slurm expression.
    NotSlurmExpression(String),
}

impl std::fmt::Display for Misfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Misfit::System(systems, system) => {
                write!(f, "builds {}, not {system}", systems.join(" "))
            }
            Misfit::Unsupported(features) => write!(f, "does not support {}", features.join(" ")),
            Misfit::NotMandatory(features) => write!(
                f,
                "only builds derivations requiring {}",
                features.join(" ")
            ),
            Misfit::Partitions(one, other) => {
                write!(f, "features {one} and {other} need different partitions")
            }
            Misfit::AboveLimit(what, asked, max) => write!(
                f,
                "nshResources asks for {what} {asked}, above the limit of {max}"
            ),
            Misfit::GresNotAllowed => f.write_str(
                "nshResources asks for gres, which this cluster does not allow (limits.allow_gres)",
            ),
            Misfit::ConstraintNotAllowed => f.write_str(
                "nshResources asks for a constraint, which this cluster does not allow (limits.allow_constraint)",
            ),
            Misfit::NotSlurmExpression(value) => {
                write!(f, "nshResources: {value:?} is not a Slurm expression")
            }
        }
    }
}

impl std::error::Error for Misfit {}

/// Does `drv` fit `cluster`? The reason why not, if not.
///
/// # Errors
/// The first reason the derivation does not fit.
pub fn place_on(
    cluster: &Cluster,
    drv: &DrvSection,
    options: Option<&BuildOptions>,
) -> Result<Placement, Misfit> {
    if !cluster.systems.contains(&drv.system) {
        return Err(Misfit::System(cluster.systems.clone(), drv.system.clone()));
    }
    let unsupported: Vec<String> = drv
        .features
        .iter()
        .filter(|f| !cluster.supported_features.contains(*f))
        .cloned()
        .collect();
    if !unsupported.is_empty() {
        return Err(Misfit::Unsupported(unsupported));
    }
    let missing: Vec<String> = cluster
        .mandatory_features
        .iter()
        .filter(|f| !drv.features.contains(f))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(Misfit::NotMandatory(missing));
    }

    let Routed {
        partition,
        mut constraints,
        mut gres,
    } = route(cluster, drv)?;

    let asked = &drv.resources;
    bound(asked, cluster)?;
    if let Some(c) = &asked.constraint {
        constraints.push(c.clone());
    }
    if let Some(g) = &asked.gres {
        gres.push(g.clone());
    }

    let limits = &cluster.limits;
    let time_min = if let Some(t) = asked.time_min {
        t
    } else {
        let from_timeout = options
            .map(|o| o.timeout)
            .filter(|&t| t > 0)
            .map(|secs| u32::try_from(secs.div_ceil(60)).unwrap_or(u32::MAX))
            .map(|m| m.saturating_add(TIMEOUT_MARGIN_MIN));
        let t = from_timeout.unwrap_or(cluster.time_limit_min);
        // A build timeout longer than the cluster allows: ask for the
        // most the cluster gives rather than not building at all.
        limits.max_time_min.map_or(t, |max| t.min(max))
    };

    Ok(Placement {
        cluster: cluster.name.clone(),
        partition,
        constraint: join_constraints(&constraints),
        gres: (!gres.is_empty()).then(|| gres.join(",")),
        cpus: asked.cpus.or(limits.default_cpus),
        mem_mb: asked.mem_mb.or(limits.default_mem_mb),
        time_min,
    })
}

/// Where a derivation's features send it on a cluster.
struct Routed {
    partition: Option<String>,
    constraints: Vec<String>,
    gres: Vec<String>,
}

/// The partition, constraints and gres the derivation's features route to
/// (`[cluster.NAME.features]`); two features may not want two partitions.
fn route(cluster: &Cluster, drv: &DrvSection) -> Result<Routed, Misfit> {
    let mut routed = Routed {
        partition: cluster.partition.clone(),
        constraints: Vec::new(),
        gres: Vec::new(),
    };
    let mut partition_from: Option<&str> = None;
    for feature in &drv.features {
        let Some(request) = cluster.features.get(feature) else {
            continue;
        };
        if let Some(p) = &request.partition {
            if let Some(other) = partition_from {
                if routed.partition.as_deref() != Some(p.as_str()) {
                    return Err(Misfit::Partitions(other.to_string(), feature.clone()));
                }
            }
            routed.partition = Some(p.clone());
            partition_from = Some(feature);
        }
        routed.constraints.extend(request.constraint.clone());
        routed.gres.extend(request.gres.clone());
    }
    Ok(routed)
}

/// The derivation's own request against the cluster's limits.
fn bound(asked: &Resources, cluster: &Cluster) -> Result<(), Misfit> {
    fn over<T: PartialOrd + std::fmt::Display>(
        what: &'static str,
        asked: Option<T>,
        max: Option<T>,
    ) -> Result<(), Misfit> {
        match (asked, max) {
            (Some(asked), Some(max)) if asked > max => {
                Err(Misfit::AboveLimit(what, asked.to_string(), max.to_string()))
            }
            _ => Ok(()),
        }
    }
    let limits = &cluster.limits;
    over("cpus", asked.cpus, limits.max_cpus)?;
    over("mem (MiB)", asked.mem_mb, limits.max_mem_mb)?;
    over("time (minutes)", asked.time_min, limits.max_time_min)?;
    if asked.gres.is_some() && !limits.allow_gres {
        return Err(Misfit::GresNotAllowed);
    }
    if asked.constraint.is_some() && !limits.allow_constraint {
        return Err(Misfit::ConstraintNotAllowed);
    }
    for value in [&asked.gres, &asked.constraint].into_iter().flatten() {
        if value.is_empty()
            || value.starts_with('-')
            || !value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.:,&|=*[]!()".contains(c))
        {
            return Err(Misfit::NotSlurmExpression(value.clone()));
        }
    }
    Ok(())
}

/// Several constraints must all hold: `a&b`, parenthesised where one is
/// itself an expression with `|`.
fn join_constraints(constraints: &[String]) -> Option<String> {
    match constraints {
        [] => None,
        [one] => Some(one.clone()),
        many => Some(
            many.iter()
                .map(|c| {
                    if c.contains('|') {
                        format!("({c})")
                    } else {
                        c.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join("&"),
        ),
    }
}

/// A fresh random nonce (128 bits, hex) for the job's end sentinel.
pub fn nonce() -> Result<String, Failure> {
    crate::sys::fs::random_hex(16)
        .map_err(|e| Failure::transient(format!("reading /dev/urandom: {e}")))
}

/// The Slurm job name: `nsh-<derivation name>`, in characters every Slurm
/// tool shows as they are.
pub fn job_name(drv_name: &str) -> String {
    let clean: String = drv_name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._+-".contains(*c))
        .take(48)
        .collect();
    format!("nsh-{clean}")
}

/// The whole Slurm request for a placement.
pub fn job_request(
    config: &Config,
    cluster: &Cluster,
    placement: &Placement,
    drv_name: &str,
    nonce: &str,
) -> JobRequest {
    JobRequest {
        name: job_name(drv_name),
        script: batch_script::SCRIPT.to_string(),
        env: batch_script::environment(config, cluster, nonce),
        partition: placement.partition.clone(),
        account: cluster.account.clone(),
        qos: cluster.qos.clone(),
        constraint: placement.constraint.clone(),
        gres: placement.gres.clone(),
        cpus: placement.cpus,
        mem_mb: placement.mem_mb,
        time_min: placement.time_min,
        // Exists on every node; the script makes its own work dir.
        work_dir: "/".into(),
        stdout: "/dev/null".into(),
        comment: Some(job_tag(nonce)),
        exclude: Vec::new(),
    }
}

/// The tag every nsh job carries in its comment: `nsh:` and the job's
/// nonce, which only the submitter knows. A job whose submit reply was
/// lost is found by it ([`find_tagged`]).
pub fn job_tag(nonce: &str) -> String {
    format!("nsh:{nonce}")
}

/// Timing of one allocation, for `--json`-style reporting and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllocTimes {
    /// Connecting (REST: version negotiation and ping).
    pub connect: Duration,
    /// The submit call.
    pub submit: Duration,
    /// Submit answered → RUNNING seen.
    pub queued: Duration,
    /// How many state queries it took, and their total time.
    pub polls: u32,
    /// (See `polls`.)
    pub polling: Duration,
    /// Taking a job from the pool: the claim on its node.
    pub take: Duration,
}

/// Polling: quick at first (most jobs start within a second on an idle
/// cluster), then slower, so that a long queue costs the controller little.
fn poll_interval(polls: u32) -> Duration {
    let ms = match polls {
        0..=9 => 100,
        10..=29 => 250,
        30..=59 => 1000,
        _ => 3000,
    };
    Duration::from_millis(ms)
}

/// Places the ticket's derivation and gets it a running job: from the
/// cluster's pool when its `linger` is on and a job there fits
/// ([`pooled`]), else a new one, submitted and waited for. Returns the
/// ticket's `alloc` section. `interrupted` set (SIGINT/SIGTERM) cancels a
/// job still waiting in the queue.
pub fn allocate(
    config: &Config,
    clusters: &mut Clusters,
    ticket: &Ticket,
    progress: &mut dyn QueueProgress,
    interrupted: &AtomicBool,
    times: &mut AllocTimes,
) -> Result<AllocSection, Failure> {
    if interrupted.load(Ordering::SeqCst) {
        return Err(Failure::transient("interrupted before submitting a job"));
    }
    let drv = ticket.need_drv()?;
    let placement = place(config, drv, ticket.options.as_ref())?;
    let cluster = &config.clusters[&placement.cluster];
    let mut submission = Submission {
        config,
        clusters,
        cluster,
        placement: &placement,
        drv_name: &drv.name,
        progress,
        interrupted,
        times,
        exclude: ticket.retry.as_ref().map_or(&[][..], |r| &r.exclude[..]),
    };
    if cluster.linger_s > 0 {
        let inputs = ticket.closure.as_ref().map_or(&[][..], |c| &c.paths[..]);
        return pooled::allocate(&mut submission, inputs);
    }
    let nonce = nonce()?;
    let (section, _) = submission.submit(&nonce, placement.time_min)?;
    Ok(section)
}

/// A new job for one placement: what submitting it and waiting for it
/// needs.
pub(crate) struct Submission<'a> {
    pub(crate) config: &'a Config,
    pub(crate) clusters: &'a mut Clusters,
    pub(crate) cluster: &'a Cluster,
    pub(crate) placement: &'a Placement,
    pub(crate) drv_name: &'a str,
    pub(crate) progress: &'a mut dyn QueueProgress,
    pub(crate) interrupted: &'a AtomicBool,
    pub(crate) times: &'a mut AllocTimes,
    /// Nodes the job must not run on (`retry.exclude`).
    pub(crate) exclude: &'a [String],
}

impl Submission<'_> {
    /// Submits the job with `nonce` and a time limit of `time_min`, and
    /// waits until it runs: its `alloc` section, and what Slurm says of it.
    pub(crate) fn submit(
        &mut self,
        nonce: &str,
        time_min: u32,
    ) -> Result<(AllocSection, JobInfo), Failure> {
        let (config, cluster) = (self.config, self.cluster);
        let started = Instant::now();
        let slurm = self.clusters.get(cluster)?;
        self.times.connect = started.elapsed();
        later::pay(&cluster.name, slurm);
        let mut request = job_request(config, cluster, self.placement, self.drv_name, nonce);
        request.time_min = time_min;
        request.exclude = self.exclude.to_vec();
        // Not part of `environment` (whose digest says which builds a
        // pooled job fits): it differs from job to job.
        request.env.push((
            "NSH_TIME_LIMIT".into(),
            (u64::from(time_min) * 60).to_string(),
        ));
        log_debug!("{}: submitting {:?}", cluster.name, self.placement);
        let submitted = Instant::now();
        let job = slurm.submit(&request).map_err(|f| {
            // The job may be queued all the same (the reply lost, or an
            // error in it: Slurm 22.05's REST API answers "Required node not
            // available" and queues the job): found by its tag, cancelled.
            later::cancel_tagged(&cluster.name, slurm, nonce);
            crate::slurm::rejection::classify_submit(cluster, &request, f)
        })?;
        self.times.submit = submitted.elapsed();
        log_debug!("{}: job {job} submitted", cluster.name);
        crate::status::note_job(&cluster.name, job);

        let result = wait_running(
            cluster,
            slurm,
            job,
            self.progress,
            self.interrupted,
            self.times,
        );
        self.progress.done();
        let info = match result {
            Ok(info) => info,
            Err(failure) => {
                if let Err(e) = slurm.cancel(job) {
                    log_warn!("cancelling job {job}: {e}");
                    later::owe(&cluster.name, job);
                }
                return Err(failure.context(format!("cluster {} job {job}", cluster.name)));
            }
        };
        let Some(node) = info.node.clone() else {
            return Err(Failure::transient(format!(
                "cluster {} job {job} runs, but Slurm names no node for it",
                cluster.name
            )));
        };
        let ssh = match config.ssh_user(cluster) {
            Some(user) => format!("{user}@{node}"),
            None => node.clone(),
        };
        let section = AllocSection {
            cluster: cluster.name.clone(),
            backend: cluster.backend,
            api: slurm.api_version().map(|v| v.to_string()),
            slurm: slurm.release().map(str::to_string),
            job,
            work: batch_script::work_dir(&config.remote.work_root, job),
            node,
            ssh,
            control: None,
            nonce: nonce.to_string(),
            request: 1,
            reused: Some(false),
            age: Some(0),
            extra: crate::ticket::Extra::default(),
        };
        Ok((section, info))
    }
}

fn wait_running(
    cluster: &Cluster,
    slurm: &Slurm,
    job: u64,
    progress: &mut dyn QueueProgress,
    interrupted: &AtomicBool,
    times: &mut AllocTimes,
) -> Result<JobInfo, Failure> {
    let queued = Instant::now();
    let timeout = Duration::from_secs(cluster.queue_timeout_s);
    let mut outage = Outage::new(Duration::from_secs(cluster.outage_tolerance_s));
    loop {
        if interrupted.load(Ordering::SeqCst) {
            return Err(Failure::transient(
                "interrupted while waiting for the job to start; cancelled it",
            ));
        }
        let polled = Instant::now();
        let answer = slurm.job(job);
        times.polls += 1;
        times.polling += polled.elapsed();
        let info = match answer {
            Ok(info) => {
                outage.over();
                info
            }
            // Slurm not answering (slurmrestd restarting, slurmctld busy, a
            // dropped connection) should not throw away a queued job: it is
            // asked again, less and less often, for `outage_tolerance`.
            Err(failure) if failure.kind == Kind::Transient => {
                let pause = outage_pause_or_end(&mut outage, failure, cluster, queued.elapsed())?;
                sleep_unless(interrupted, pause);
                continue;
            }
            Err(failure) => return Err(failure),
        };
        if info.is_running() {
            times.queued = queued.elapsed();
            return Ok(info);
        }
        if info.state.is_finished() {
            return Err(Failure::transient(format!(
                "the job ended before it ran: {}{}",
                describe_wait(&info),
                info.exit_code
                    .map(|c| format!(", exit code {c}"))
                    .unwrap_or_default()
            )));
        }
        let waited = queued.elapsed();
        if waited >= timeout {
            return Err(Failure::transient(format!(
                "still {} after the queue timeout of {} s; cancelled it",
                describe_wait(&info),
                cluster.queue_timeout_s
            )));
        }
        progress.waiting(job, &info, waited);
        sleep_unless(
            interrupted,
            poll_interval(times.polls).min(timeout.saturating_sub(waited)),
        );
    }
}

/// After a failed question in a wait that has lasted `waited`: the pause
/// before the next one, or the failure that ends the wait (the outage
/// outlasted `outage_tolerance`, or the queue timeout came).
fn outage_pause_or_end(
    outage: &mut Outage,
    failure: Failure,
    cluster: &Cluster,
    waited: Duration,
) -> Result<Duration, Failure> {
    match outage.pause() {
        Some(pause) if waited.as_secs() < cluster.queue_timeout_s => {
            log_warn!("{failure} (will ask again in {pause:?})");
            Ok(pause)
        }
        Some(_) => Err(failure.context(format!(
            "Slurm still did not answer at the queue timeout of {} s",
            cluster.queue_timeout_s
        ))),
        None => Err(failure.context(format!(
            "Slurm did not answer for {} s (outage_tolerance {} s)",
            outage.lasted().as_secs(),
            cluster.outage_tolerance_s
        ))),
    }
}

/// The clock of Slurm not answering a wait: tolerance is by time, with
/// backoff between the questions, not by how many failed.
#[derive(Debug)]
pub struct Outage {
    tolerance: Duration,
    since: Option<Instant>,
}

impl Outage {
    /// No outage yet; `tolerance` is how long one may last.
    pub fn new(tolerance: Duration) -> Outage {
        Outage {
            tolerance,
            since: None,
        }
    }

    /// Slurm answered: the outage (if any) is over.
    pub fn over(&mut self) {
        self.since = None;
    }

    /// How long the current outage has lasted.
    pub fn lasted(&self) -> Duration {
        self.since.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// A question failed: how long to wait before the next, or `None` once
    /// the outage has outlasted the tolerance.
    pub fn pause(&mut self) -> Option<Duration> {
        let lasted = self.since.get_or_insert_with(Instant::now).elapsed();
        outage_pause(lasted, self.tolerance)
    }
}

/// The pause after a failed question, `lasted` into an outage tolerated
/// for `tolerance`: half of what it lasted, from 0.25 s up to 5 s, and never
/// past the tolerance; `None` once it has run out.
pub fn outage_pause(lasted: Duration, tolerance: Duration) -> Option<Duration> {
    if lasted >= tolerance {
        return None;
    }
    let pause = (lasted / 2).clamp(Duration::from_millis(250), Duration::from_secs(5));
    Some(pause.min(tolerance.saturating_sub(lasted)))
}

/// Sleeps in small steps, so that a signal is acted on at once.
fn sleep_unless(interrupted: &AtomicBool, duration: Duration) {
    let until = Instant::now() + duration;
    while Instant::now() < until && !interrupted.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ends a ticket's use of its job (also of a failed ticket: that is when it
/// matters most). A pooled job that is healthy (the build itself failed, or
/// none ran, and no build runs there now) goes back to the pool
/// (`alloc.returned`); any other job is cancelled (`alloc.cancelled`). A
/// ticket whose job was already given back, or is someone else's by now,
/// is left as it is.
pub fn cancel(
    config: &Config,
    clusters: &mut Clusters,
    ticket: &mut Ticket,
) -> Result<(), Failure> {
    let healthy = ticket.error.as_ref().is_none_or(|e| {
        e.stage == "run" && matches!(e.kind, crate::Kind::Permanent | crate::Kind::TimedOut)
    });
    let Some(alloc) = ticket.alloc.as_mut() else {
        return Ok(());
    };
    let cluster = config.clusters.get(&alloc.cluster).ok_or_else(|| {
        Failure::config(format!(
            "the ticket's job {} is on cluster {:?}, which {} does not configure",
            alloc.job,
            alloc.cluster,
            config.path.display()
        ))
    })?;
    if cluster.linger_s > 0 {
        match pooled::settle(config, alloc, healthy)? {
            pooled::Settled::Returned => {
                alloc.extra.insert("returned".into(), true.into());
                return Ok(());
            }
            pooled::Settled::NotThisTickets => return Ok(()),
            pooled::Settled::ToCancel => {}
        }
    }
    let slurm = clusters.get(cluster)?;
    slurm
        .cancel(alloc.job)
        .map_err(|f| f.context(format!("cluster {}", cluster.name)))?;
    alloc.extra.insert("cancelled".into(), true.into());
    Ok(())
}

/// `nsh-alloc --cancel`: every ticket read is written out again; those with
/// an `alloc` section get their job cancelled first, failed tickets
/// included. The status is that of the first failed ticket, else of the
/// first cancel that failed.
pub fn cancel_stage<R: BufRead, W: Write>(
    config: Result<&Config, &Failure>,
    clusters: &mut Clusters,
    input: R,
    output: W,
) -> ExitStatus {
    crate::tool::run_cleanup_stage("alloc", input, output, |ticket| match &config {
        Ok(config) => cancel(config, clusters, ticket),
        // A configuration that cannot be read matters only for a ticket
        // whose job would need it.
        Err(failure) if ticket.alloc.is_some() => Err((*failure).clone()),
        Err(_) => Ok(()),
    })
}

/// The times of an allocation as the ticket records them (`alloc.secs`).
pub fn times_json(times: &AllocTimes) -> serde_json::Value {
    let secs = |d: Duration| (d.as_secs_f64() * 1000.0).round() / 1000.0;
    let mut json = serde_json::json!({
        "connect": secs(times.connect),
        "submit": secs(times.submit),
        "queued": secs(times.queued),
        "polls": times.polls,
        "polling": secs(times.polling),
    });
    if !times.take.is_zero() {
        json["take"] = secs(times.take).into();
    }
    json
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CONFIG: &str = r#"
[cluster.a-gpu]
backend = "cli"
systems = ["x86_64-linux"]
supported_features = ["gpu", "big"]
mandatory_features = ["gpu"]
partition = "batch"
[cluster.a-gpu.features]
gpu = { gres = "gpu:1", partition = "gpu" }
big = { constraint = "big|huge" }

[cluster.b-main]
backend = "cli"
systems = ["x86_64-linux", "i686-linux"]
supported_features = ["big", "kvm", "big-parallel"]
partition = "build"
time_limit = "2h"
[cluster.b-main.limits]
max_cpus = 16
max_mem = "64G"
max_time = "8h"
default_cpus = 2
default_mem = "4G"
allow_constraint = true
[cluster.b-main.features]
big = { constraint = "big" }
kvm = { constraint = "kvm" }
"#;

    fn config() -> Config {
        Config::parse(Path::new("/t/nsh.toml"), CONFIG).unwrap()
    }

    fn drv(system: &str, features: &[&str], resources: Resources) -> DrvSection {
        DrvSection {
            name: "hello-2.12".into(),
            system: system.into(),
            features: features
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
            resources,
            ..DrvSection::new(crate::nix::store_path::test_path(
                "/nix/store/00000000000000000000000000000000-x.drv",
            ))
        }
    }

    #[test]
    fn plain_derivations_get_the_defaults() {
        let p = place(
            &config(),
            &drv("x86_64-linux", &[], Resources::default()),
            None,
        )
        .unwrap();
        assert_eq!(
            p,
            Placement {
                cluster: "b-main".into(),
                partition: Some("build".into()),
                constraint: None,
                gres: None,
                cpus: Some(2),
                mem_mb: Some(4096),
                time_min: 120,
            }
        );
    }

    #[test]
    fn features_map_to_constraints_partitions_and_gres() {
        let p = place(
            &config(),
            &drv("x86_64-linux", &["big", "kvm"], Resources::default()),
            None,
        )
        .unwrap();
        assert_eq!(p.cluster, "b-main");
        assert_eq!(p.constraint.as_deref(), Some("big&kvm"));
        let p = place(
            &config(),
            &drv("x86_64-linux", &["gpu", "big"], Resources::default()),
            None,
        )
        .unwrap();
        assert_eq!(p.cluster, "a-gpu");
        assert_eq!(p.partition.as_deref(), Some("gpu"));
        assert_eq!(p.gres.as_deref(), Some("gpu:1"));
        assert_eq!(p.constraint.as_deref(), Some("big|huge"));
        let asked = Resources {
            constraint: Some("avx2|avx512".into()),
            ..Resources::default()
        };
        let p = place(&config(), &drv("x86_64-linux", &["big"], asked), None).unwrap();
        assert_eq!(p.constraint.as_deref(), Some("big&(avx2|avx512)"));
    }

    #[test]
    fn resources_and_timeouts() {
        let asked = Resources {
            cpus: Some(8),
            mem_mb: Some(8192),
            time_min: Some(300),
            ..Resources::default()
        };
        let p = place(&config(), &drv("x86_64-linux", &[], asked), None).unwrap();
        assert_eq!((p.cpus, p.mem_mb, p.time_min), (Some(8), Some(8192), 300));
        let options = BuildOptions {
            timeout: 3600,
            ..BuildOptions::default()
        };
        let p = place(
            &config(),
            &drv("x86_64-linux", &[], Resources::default()),
            Some(&options),
        )
        .unwrap();
        assert_eq!(p.time_min, 60 + TIMEOUT_MARGIN_MIN);
        let options = BuildOptions {
            timeout: 86400,
            ..BuildOptions::default()
        };
        let p = place(
            &config(),
            &drv("x86_64-linux", &[], Resources::default()),
            Some(&options),
        )
        .unwrap();
        assert_eq!(p.time_min, 8 * 60, "bounded by max_time");
    }

    #[test]
    fn nothing_fits_says_why_per_cluster() {
        let cases = [
            (
                "wrong_system",
                drv("aarch64-linux", &[], Resources::default()),
            ),
            (
                "unsupported_feature",
                drv("x86_64-linux", &["nixos-test"], Resources::default()),
            ),
            (
                "too_many_cpus",
                drv(
                    "x86_64-linux",
                    &[],
                    Resources {
                        cpus: Some(64),
                        ..Resources::default()
                    },
                ),
            ),
            (
                "gres_not_allowed",
                drv(
                    "x86_64-linux",
                    &[],
                    Resources {
                        gres: Some("gpu:8".into()),
                        ..Resources::default()
                    },
                ),
            ),
            (
                "constraint_injection",
                drv(
                    "x86_64-linux",
                    &[],
                    Resources {
                        constraint: Some("--wrap=rm".into()),
                        ..Resources::default()
                    },
                ),
            ),
        ];
        for (name, drv) in cases {
            let failure = place(&config(), &drv, None).unwrap_err();
            assert_eq!(failure.kind, crate::Kind::Input);
            insta::assert_snapshot!(name, failure.message);
        }
    }

    mod waiting {
        use super::*;
        use crate::slurm::test_server;
        use std::sync::{Arc, Mutex};

        struct Recorder(Vec<String>);
        impl QueueProgress for Recorder {
            fn waiting(&mut self, _job: u64, info: &JobInfo, _waited: Duration) {
                self.0.push(describe_wait(info));
            }
            fn done(&mut self) {
                self.0.push("done".into());
            }
        }

        fn job(state: &str, reason: &str, node: &str) -> (u16, String) {
            (
                200,
                serde_json::json!({"jobs": [{"job_id": 7, "job_state": [state],
                    "state_reason": reason, "batch_host": node}], "errors": []})
                .to_string(),
            )
        }

        /// Runs `allocate` against a scripted server answering `states` to
        /// the job queries; returns the result, the progress seen and the
        /// request lines the server got.
        fn run(
            states: Vec<(u16, String)>,
            interrupted: bool,
        ) -> (Result<AllocSection, Failure>, Vec<String>, Vec<String>) {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("rest.sock");
            let ping = r#"{"meta":{"slurm":{"release":"24.05.8"}},"errors":[]}"#;
            let seen: Arc<Mutex<Vec<String>>> = test_server::serve(
                &socket,
                vec![
                    ("GET /slurm/v0.0.41/ping/", vec![(200, ping.into())]),
                    (
                        "POST /slurm/v0.0.41/job/submit",
                        vec![(200, r#"{"job_id":7,"errors":[]}"#.into())],
                    ),
                    ("GET /slurm/v0.0.41/job/7", states),
                    (
                        "DELETE /slurm/v0.0.41/job/7",
                        vec![(200, r#"{"errors":[]}"#.into())],
                    ),
                ],
            );
            let text = format!(
                "[cluster.c]\nurl = \"unix:{}\"\napi = \"v0.0.41\"\nsystems = [\"x86_64-linux\"]\nqueue_timeout = 1\n[ssh]\nuser = \"nb\"\n",
                socket.display()
            );
            let config = Config::parse(Path::new("t.toml"), &text).unwrap();
            let mut ticket = Ticket::new();
            ticket.drv = Some(drv("x86_64-linux", &[], Resources::default()));
            let mut progress = Recorder(Vec::new());
            let flag = AtomicBool::new(interrupted);
            let result = allocate(
                &config,
                &mut Clusters::default(),
                &ticket,
                &mut progress,
                &flag,
                &mut AllocTimes::default(),
            );
            let lines = seen
                .lock()
                .unwrap()
                .iter()
                .map(|h| h.lines().next().unwrap_or("").to_string())
                .collect();
            (result, progress.0, lines)
        }

        #[test]
        fn reports_pending_reasons_until_it_runs() {
            let (result, progress, lines) = run(
                vec![
                    job("PENDING", "Priority", ""),
                    job("PENDING", "Resources", ""),
                    job("RUNNING", "None", "node5"),
                ],
                false,
            );
            let alloc = result.unwrap();
            assert_eq!(
                (alloc.job, alloc.node.as_str(), alloc.ssh.as_str()),
                (7, "node5", "nb@node5")
            );
            assert_eq!(alloc.work, "/tmp/nsh/nsh-7");
            assert_eq!(
                progress,
                ["PENDING (Priority)", "PENDING (Resources)", "done"]
            );
            assert!(!lines.iter().any(|l| l.starts_with("DELETE")));
        }

        #[test]
        fn the_queue_timeout_cancels() {
            let (result, _, lines) = run(vec![job("PENDING", "Resources", "")], false);
            let failure = result.unwrap_err();
            assert_eq!(failure.kind, crate::Kind::Transient);
            insta::assert_snapshot!("queue_timeout", failure.message);
            assert_eq!(
                lines.last().unwrap(),
                "DELETE /slurm/v0.0.41/job/7 HTTP/1.1"
            );
        }

        #[test]
        fn a_job_that_ends_before_running_is_transient_with_its_state() {
            let (result, _, _) = run(vec![job("NODE_FAIL", "None", "node5")], false);
            insta::assert_snapshot!("ended_before_running", result.unwrap_err().message);
        }

        #[test]
        fn a_failed_state_query_is_asked_again() {
            let error = (
                500,
                r#"{"errors":[{"error":"slurmctld busy"}]}"#.to_string(),
            );
            let (result, _, _) = run(vec![error, job("RUNNING", "None", "node5")], false);
            assert_eq!(result.unwrap().node, "node5");
            let error = (
                500,
                r#"{"errors":[{"error":"slurmctld busy"}]}"#.to_string(),
            );
            let (result, _, lines) = run(vec![error], false);
            assert!(result
                .unwrap_err()
                .message
                .contains("HTTP 500: slurmctld busy"));
            // Asked again with backoff (0.25 s, …) until the queue timeout
            // of 1 s, well within the outage tolerance.
            let polls = lines
                .iter()
                .filter(|l| l.starts_with("GET /slurm/v0.0.41/job/7"))
                .count();
            assert!((3..=6).contains(&polls), "{polls} polls");
            assert!(lines.last().unwrap().starts_with("DELETE"));
        }

        #[test]
        fn interrupted_submits_nothing() {
            let (result, _, lines) = run(vec![job("RUNNING", "None", "n")], true);
            assert!(result.unwrap_err().message.contains("interrupted"));
            assert!(!lines.iter().any(|l| l.starts_with("POST")));
        }
    }

    #[test]
    fn an_outage_is_tolerated_by_time_with_backoff() {
        let tolerance = Duration::from_secs(60);
        let pauses: Vec<u64> = [0, 1, 4, 20, 59]
            .into_iter()
            .map(|s| {
                outage_pause(Duration::from_secs(s), tolerance)
                    .unwrap()
                    .as_millis()
                    .try_into()
                    .unwrap()
            })
            .collect();
        assert_eq!(pauses, [250, 500, 2000, 5000, 1000]);
        assert_eq!(outage_pause(tolerance, tolerance), None);
        assert_eq!(
            outage_pause(Duration::ZERO, Duration::ZERO),
            None,
            "outage_tolerance = 0: the first failure ends the wait"
        );
        let mut outage = Outage::new(Duration::from_secs(60));
        assert_eq!(outage.pause(), Some(Duration::from_millis(250)));
        assert!(outage.lasted() < Duration::from_secs(1));
        outage.over();
        assert_eq!(outage.lasted(), Duration::ZERO);
    }

    #[test]
    fn names_and_nonces() {
        assert_eq!(job_name("hello-2.12"), "nsh-hello-2.12");
        assert_eq!(job_name("a b;$(rm)"), "nsh-abrm");
        let (a, b) = (nonce().unwrap(), nonce().unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn the_request_carries_no_derivation_value_in_the_script() {
        let config = config();
        let drv = drv("x86_64-linux", &["big"], Resources::default());
        let p = place(&config, &drv, None).unwrap();
        let req = job_request(&config, &config.clusters[&p.cluster], &p, "evil$(x)", "n0");
        assert_eq!(req.script, batch_script::SCRIPT);
        assert_eq!(req.name, "nsh-evilx");
        assert!(req.env.iter().any(|(k, v)| k == "NSH_NONCE" && v == "n0"));
    }
}
