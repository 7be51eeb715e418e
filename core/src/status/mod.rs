//! What nsh is doing, for `nsh-status` (`docs/nsh-status.md`): the builds
//! in flight and the recent failures, which the stages record in the
//! runtime directory as they go, and the pooled jobs (`crate::pool`), each
//! joined with what Slurm says of its job.
//!
//! * [`record`]: the records (pure codec);
//! * [`store`]: their files;
//! * [`view`]: the rows `nsh-status` prints, as JSON lines or a table.
//!
//! The stages record through [`begin`], [`note_job`] and [`end`], called by
//! the stage loop (`crate::tool`) and by `nsh-alloc` once it has a job; a
//! process records only once [`record_builds`] was called (every tool's
//! `main` does, through `nsh_cli::start`), so that unit tests driving the
//! stage loop write nothing.

pub mod record;
pub mod store;
pub mod view;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

use crate::config::Config;
use crate::error::Failure;
use crate::pool::record::Owner;
use crate::slurm::{Clusters, JobState};
use crate::ticket::Ticket;
use record::{FailureLine, InFlight};
use store::StatusDir;
use view::SlurmSays;

static RECORDING: AtomicBool = AtomicBool::new(false);

/// The build this process's stage is working on.
struct Current {
    dir: StatusDir,
    path: Option<PathBuf>,
    flight: Option<InFlight>,
}

thread_local! {
    /// Per thread: a stage works on its ticket in the thread of its loop,
    /// and tests running side by side each have their own.
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// From now on, this process records the builds its stage works on.
pub fn record_builds() {
    RECORDING.store(true, Ordering::SeqCst);
}

fn write_logged(dir: &StatusDir, flight: &InFlight) -> Option<PathBuf> {
    dir.write(flight)
        .map_err(|failure| crate::log_debug!("status: not recorded: {failure}"))
        .ok()
}

/// `stage` starts on `ticket`: its build is in flight.
pub fn begin(stage: &str, ticket: &Ticket) {
    if !RECORDING.load(Ordering::SeqCst) {
        return;
    }
    begin_at(StatusDir::at(&crate::runtime::location()), stage, ticket);
}

/// [`begin`], recording under `dir`.
fn begin_at(dir: StatusDir, stage: &str, ticket: &Ticket) {
    let Some(owner) = Owner::of(std::process::id()) else {
        return;
    };
    let flight = InFlight::of(ticket, stage, now_secs(), owner);
    let path = flight.as_ref().and_then(|f| write_logged(&dir, f));
    CURRENT.with_borrow_mut(|current| *current = Some(Current { dir, path, flight }));
}

/// The current build got `job` on `cluster` (submitted, not running yet).
pub fn note_job(cluster: &str, job: u64) {
    CURRENT.with_borrow_mut(|current| {
        if let Some(Current {
            dir,
            path,
            flight: Some(flight),
        }) = current.as_mut()
        {
            flight.cluster = Some(cluster.to_string());
            flight.job = Some(job);
            *path = write_logged(dir, flight);
        }
    });
}

/// The stage is done with `ticket`: its build is no longer in flight and,
/// if the stage failed it (`failed_here`), the failure is recorded.
pub fn end(ticket: &Ticket, failed_here: bool) {
    let Some(current) = CURRENT.with_borrow_mut(Option::take) else {
        return;
    };
    if let Some(path) = &current.path {
        let _ = std::fs::remove_file(path);
    }
    if !failed_here {
        return;
    }
    if let Some(line) = FailureLine::of(ticket, current.flight.as_ref(), now_secs()) {
        if let Err(failure) = current.dir.add_failure(&line) {
            crate::log_debug!("status: failure not recorded: {failure}");
        }
    }
}

/// The hook ends a failed attempt of a build: recorded as
/// [`record::settle_attempt`] says (when this process records builds).
pub fn settle_attempt(end: &record::AttemptEnd) {
    if !RECORDING.load(Ordering::SeqCst) {
        return;
    }
    let dir = StatusDir::at(&crate::runtime::location());
    if let Err(failure) = dir.settle_attempt(end) {
        crate::log_debug!("status: failure not recorded: {failure}");
    }
}

/// The time now, in Unix seconds, as the status files say it.
pub fn now() -> u64 {
    now_secs()
}

/// What `nsh-status` gathers.
#[derive(Debug, Clone)]
pub struct Options {
    /// Which kinds of rows.
    pub sections: view::Sections,
    /// Only this cluster's rows.
    pub cluster: Option<String>,
    /// Ask Slurm about each job.
    pub ask_slurm: bool,
    /// How many recent failures.
    pub last: usize,
}

/// What `nsh-status` found: its rows, and what it could not find out (a
/// configuration that does not load, a Slurm that does not answer).
#[derive(Debug, Default)]
pub struct Report {
    /// One JSON object per row, with its `kind`.
    pub rows: Vec<Value>,
    /// What could not be found out, in the order met.
    pub problems: Vec<Failure>,
}

impl Report {
    /// The exit status: that of the first problem, else success.
    pub fn exit_status(&self) -> crate::exit::ExitStatus {
        self.problems
            .first()
            .map_or(crate::exit::ExitStatus::Ok, |p| {
                crate::exit::ExitStatus::of(p.kind)
            })
    }
}

/// Slurm's answers, one connection per cluster, a cluster that does not
/// answer asked once.
struct SlurmAsker<'a> {
    config: Option<&'a Config>,
    ask: bool,
    clusters: Clusters,
    unreachable: BTreeMap<String, String>,
    problems: Vec<Failure>,
}

impl SlurmAsker<'_> {
    fn job(&mut self, cluster: Option<&str>, job: Option<u64>) -> SlurmSays {
        let (Some(name), Some(job), true) = (cluster, job, self.ask) else {
            return SlurmSays::NotAsked;
        };
        let Some(cluster) = self.config.and_then(|c| c.clusters.get(name)) else {
            return SlurmSays::NotAsked;
        };
        if let Some(why) = self.unreachable.get(name) {
            return SlurmSays::Unknown(why.clone());
        }
        let connection = match self.clusters.get(cluster) {
            Ok(connection) => connection,
            Err(failure) => {
                let why = failure.to_string();
                self.unreachable.insert(name.to_string(), why.clone());
                self.problems.push(failure);
                return SlurmSays::Unknown(why);
            }
        };
        match connection.job(job) {
            Ok(info) => {
                let mut state = info.state.as_str().to_string();
                if let (JobState::Pending, Some(reason)) = (&info.state, &info.reason) {
                    state = format!("{state} ({reason})");
                }
                SlurmSays::State(state)
            }
            Err(failure) => {
                let why = failure.to_string();
                self.problems
                    .push(failure.context(format!("cluster {name} job {job}")));
                SlurmSays::Unknown(why)
            }
        }
    }
}

/// Gathers the rows asked for: builds in flight and recent failures from
/// `runtime` (a runtime directory), pooled jobs from the configuration's
/// pools, each job as Slurm sees it.
pub fn gather(
    config: Result<Config, Failure>,
    runtime: &std::path::Path,
    options: &Options,
) -> Report {
    let mut problems = Vec::new();
    let config = config
        .and_then(|mut config| {
            if let Some(name) = &options.cluster {
                config.restrict_to_cluster(name)?;
            }
            Ok(config)
        })
        .map_err(|failure| problems.push(failure))
        .ok();
    let mut slurm = SlurmAsker {
        config: config.as_ref(),
        ask: options.ask_slurm,
        clusters: Clusters::default(),
        unreachable: BTreeMap::new(),
        problems: Vec::new(),
    };
    let ours = |cluster: Option<&str>| {
        options
            .cluster
            .as_deref()
            .is_none_or(|c| cluster == Some(c))
    };
    let status = StatusDir::at(runtime);
    let mut rows = Vec::new();
    if options.sections.builds {
        for flight in status.in_flight() {
            if ours(flight.cluster.as_deref()) {
                let says = slurm.job(flight.cluster.as_deref(), flight.job);
                rows.push(view::build_row(&flight, &says));
            }
        }
    }
    if options.sections.jobs {
        rows.extend(job_rows(config.as_ref(), &mut slurm, &mut problems));
    }
    if options.sections.failures {
        let failures = status.recent_failures(usize::MAX);
        let mut failures: Vec<&FailureLine> = failures
            .iter()
            .filter(|f| ours(f.cluster.as_deref()))
            .collect();
        failures.drain(..failures.len().saturating_sub(options.last));
        rows.extend(failures.into_iter().map(view::failure_row));
    }
    problems.append(&mut slurm.problems);
    Report { rows, problems }
}

fn job_rows(
    config: Option<&Config>,
    slurm: &mut SlurmAsker<'_>,
    problems: &mut Vec<Failure>,
) -> Vec<Value> {
    let Some(config) = config else {
        return Vec::new();
    };
    let pooled = match crate::stage::alloc::admin::pooled(config) {
        Ok(pooled) => pooled,
        Err(failure) => {
            problems.push(failure.context("reading the pool"));
            return Vec::new();
        }
    };
    let now = now_secs();
    pooled
        .iter()
        .map(|(cluster, record)| {
            let state = crate::stage::alloc::admin::state(record);
            let says = slurm.job(Some(cluster), record.job);
            view::job_row(cluster, record, state, now, &says)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_records_its_build_while_it_works_and_its_own_failure_once() {
        let root = tempfile::tempdir().unwrap();
        let dir = StatusDir::at(root.path());
        let ticket = Ticket::from_line(
            r#"{"v":1,"drv":{"path":"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello.drv","name":"hello"}}"#,
        )
        .unwrap();
        begin_at(dir.clone(), "alloc", &ticket);
        note_job("test", 7);
        let flights = dir.in_flight();
        assert_eq!(flights.len(), 1, "{flights:?}");
        assert_eq!(flights[0].stage, "alloc");
        assert_eq!(flights[0].cluster.as_deref(), Some("test"));
        assert_eq!(flights[0].job, Some(7));
        assert_eq!(flights[0].owner.pid, std::process::id());
        let mut failed = ticket.clone();
        failed.fail("alloc", &Failure::timed_out("queue timeout"));
        end(&failed, true);
        assert!(dir.in_flight().is_empty());
        let failures = dir.recent_failures(10);
        assert_eq!(failures.len(), 1);
        assert_eq!((failures[0].job, failures[0].exit), (Some(7), 101));
        // A later stage passing the failed ticket on records nothing more.
        begin_at(dir.clone(), "push", &failed);
        end(&failed, false);
        assert_eq!(dir.recent_failures(10).len(), 1);
        assert!(dir.in_flight().is_empty());
        // Not recording (no tool's main asked for it): nothing is written.
        end(&failed, true);
        assert_eq!(dir.recent_failures(10).len(), 1);
    }
}
