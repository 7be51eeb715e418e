//! `nsh-run`: the build, inside the ticket's Slurm job, with its log live
//! and its result exact.
//!
//! For a ticket with `drv`, `closure` and `alloc` (and the inputs already on
//! the node: `nsh-push`), over the ticket's shared ssh connection:
//!
//! 1. the BuildDerivation request (the local `.drv` as a BasicDerivation
//!    whose inputSrcs are the input closure, and the ticket's build options)
//!    is written to `W/request.N.tmp` and renamed to `W/request.N`, where the
//!    job picks it up ([`crate::stage::alloc::batch_script`]);
//! 2. `W/log.N` is followed as it grows by one small remote `sh` loop
//!    ([`follow::FOLLOW_SCRIPT`]) and forwarded line by line to stderr or the hook's
//!    log fd; the job's sentinel line `@nsh-end <nonce> <status>` ends it,
//!    and the loop then sends `W/response.N` on the same stream, so that the
//!    result costs no further round trip;
//! 3. meanwhile the Slurm job is looked at every [`JOB_CHECK_INTERVAL`]
//!    only to notice that it died, and once more when the response is in:
//!    a build whose job died is never reported built.
//!
//! The BuildResult becomes the ticket's `run` section and the exit status
//! ([`build_outcome`]). After a failed build nothing will be fetched, so
//! nsh-run writes `W/release` itself and the job cleans up and ends.
//!
//! Timeouts (`max-silent-time`, `timeout`) travel in the request's build
//! options and are enforced by Nix on the node; the job's Slurm time limit
//! covers the build timeout plus a margin ([`crate::stage::alloc::place_on`]).

mod follow;
mod log;

use follow::{cancel_if_requeued, follow, tail_text, Ended};
pub use log::{LogEvent, LogSink, LogSplitter};

use std::collections::{BTreeMap, BTreeSet};

use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::error::{Failure, ResultExt};
use crate::nix::local_store::LocalStore;
use crate::nix::serve::{self, BuildResponse, BuildResult};
use crate::nix::store_path::{StoreDir, StorePath};
use crate::slurm::{Clusters, JobInfo, JobState, Slurm};
use crate::stage::release::ReleaseOnDrop;
use crate::stage::ssh::Ssh;
use crate::ticket::{AllocSection, RunSection, Ticket};
use crate::{log_info, log_warn, Kind};

/// How often the Slurm job is looked at while the build runs. Only to
/// notice a job that died (node failure, preemption, scancel, time limit):
/// the end of the build itself is seen from the log's sentinel at once.
pub const JOB_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// How often the follower is reconnected after losing ssh while the job
/// still runs. It resumes at the byte where the log stopped.
const FOLLOW_RECONNECTS: u32 = 3;

/// Why a job is no longer one the build can finish in, if it is not.
/// Running (or suspended: it will resume) on the ticket's node is alive;
/// anything else (ended, requeued, running elsewhere) is not.
pub fn job_gone(alloc: &AllocSection, info: &JobInfo) -> Option<String> {
    let alive = matches!(info.state, JobState::Running | JobState::Suspended)
        && info.node.as_deref().is_none_or(|n| n == alloc.node);
    if alive {
        return None;
    }
    let what = match info.state {
        JobState::Timeout => "hit its Slurm time limit".to_string(),
        JobState::NodeFail => "ended: its node failed (NODE_FAIL)".to_string(),
        JobState::Preempted => "was preempted".to_string(),
        JobState::Cancelled => "was cancelled".to_string(),
        JobState::Pending => "was requeued (PENDING)".to_string(),
        JobState::Running => format!(
            "now runs on {}, not {}",
            info.node.as_deref().unwrap_or("?"),
            alloc.node
        ),
        ref other => format!("ended ({other})"),
    };
    let mut reason = format!("Slurm job {} on {} {what}", alloc.job, alloc.node);
    if let Some(r) = &info.reason {
        reason = format!("{reason}, reason {r}");
    }
    Some(reason)
}

/// The exit status a BuildResult means: `Ok` for built or already valid,
/// else the failure with Nix's own error text.
///
/// Nix's TransientFailure (a fixed-output build that failed, a full disk)
/// may succeed on another node: transient. TimedOut (`timeout` or
/// `max-silent-time`): timed out. Everything else is the build's own
/// failure: permanent.
pub fn build_outcome(result: &BuildResult, what: &str, place: &str) -> Result<(), Failure> {
    let Some(kind) = result.status.failure_kind() else {
        return Ok(());
    };
    let message = plain_text(&result.error_msg);
    let message = if message.is_empty() {
        result.status.to_string()
    } else {
        message
    };
    Err(Failure::new(
        kind,
        format!(
            "build of {what} failed ({}) on {place}: {message}",
            result.status
        ),
    ))
}

/// Nix's error text without the terminal colour codes Nix puts in it (it
/// goes into tickets, logs and Nix's own messages, where they are noise).
pub fn plain_text(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI sequences: ESC [ parameters… final byte in @..~.
            if chars.clone().next() == Some('[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out.trim().to_string()
}

/// The `run` section for a BuildResult. The outputs are the derivation's:
/// its paths for the outputs it declares with a path, the node's report
/// only for those whose path only the build tells (floating
/// content-addressed; nsh-fetch checks their names). A node that reports
/// another path for a declared one, or an output the derivation does not
/// have, is refused; a built output that is no store path is bad bytes from
/// the node. Outputs Nix did not list (an already valid derivation lists
/// none) are taken from the derivation.
pub fn run_section(
    result: &BuildResult,
    store_dir: &StoreDir,
    drv_path: &StorePath,
    drv_outputs: &BTreeMap<String, Option<StorePath>>,
    times: (u64, u64),
) -> Result<RunSection, Failure> {
    let (started, stopped) = times;
    let mut built_outputs = BTreeMap::new();
    if result.status.is_success() {
        for (name, reported) in result.output_paths(store_dir)? {
            let declared = match drv_outputs.get(&name) {
                None => Some("no such output".to_string()),
                Some(Some(path)) if *path != reported => Some(path.to_string()),
                _ => None,
            };
            if let Some(declared) = declared {
                let refused = crate::stage::fetch::ImportRefused::Undeclared {
                    drv: drv_path.clone(),
                    output: name,
                    declared,
                    reported,
                };
                return Err(refused.fail("the node"));
            }
            built_outputs.insert(name, reported);
        }
        for (name, path) in drv_outputs {
            if let Some(path) = path {
                built_outputs.insert(name.clone(), path.clone());
            }
        }
    }
    Ok(RunSection {
        status: result.status,
        error: plain_text(&result.error_msg),
        times_built: result.times_built,
        start: if result.start_time > 0 {
            result.start_time
        } else {
            started
        },
        stop: if result.stop_time > 0 {
            result.stop_time
        } else {
            stopped
        },
        built_outputs,
        extra: crate::ticket::Extra::default(),
    })
}

/// One nsh-run process: its configuration, its Slurm connections and where
/// the log goes.
pub struct Runner<'a> {
    /// The configuration.
    pub config: &'a Config,
    /// One Slurm connection per cluster, to watch the jobs.
    pub clusters: Clusters,
    /// Where the build log goes.
    pub log: LogSink,
    /// How often the job is looked at while the build runs.
    pub job_check_interval: Duration,
    /// Set by SIGINT/SIGTERM/SIGHUP: stop following and report transient.
    pub interrupted: &'a AtomicBool,
}

impl Runner<'_> {
    /// Runs the build of one ticket and adds its `run` section.
    ///
    /// # Errors
    /// A ticket without what the build needs, a job that died, a build
    /// that failed (its kind from Nix's BuildResult), ssh trouble.
    pub fn run(&mut self, ticket: &mut Ticket) -> Result<(), Failure> {
        let build = Build::prepare(ticket)?;
        let alloc = ticket.alloc.as_mut().ok_or_else(|| {
            Failure::input("the ticket has no `alloc` section (run nsh-alloc first)")
        })?;
        if alloc.nonce.is_empty() {
            return Err(Failure::input(
                "the ticket's `alloc` section has no nonce (made by an older nsh-alloc?)",
            ));
        }
        let cluster = self.config.clusters.get(&alloc.cluster).ok_or_else(|| {
            Failure::config(format!(
                "the ticket's job {} is on cluster {:?}, which {} does not configure",
                alloc.job,
                alloc.cluster,
                self.config.path.display()
            ))
        })?;
        let ssh = Ssh::ensure_master(alloc, self.config)?;
        let alloc = alloc.clone();
        // As nsh-alloc found it: no version probe per build.
        let slurm = self.clusters.resume(cluster, &alloc)?;
        let job = Job {
            ssh: &ssh,
            slurm,
            alloc: &alloc,
            pooled: crate::stage::alloc::pooled::is_pooled(self.config, &alloc),
            place: format!(
                "{} (cluster {}, Slurm job {})",
                alloc.node, alloc.cluster, alloc.job
            ),
        };
        // Every way out but a successful build lets the job end now
        // (nothing will be fetched), or, when the build failed on its own,
        // gives a pooled job back for the next build.
        let release = ReleaseOnDrop::new(&ssh, &alloc, cluster.linger_s > 0);
        log_info!("building {} on {}", build.drv_path, job.place);
        let watch = Watch {
            check_every: self.job_check_interval,
            interrupted: self.interrupted,
        };
        let (section, outcome) = build.run(&job, &mut self.log, &watch)?;
        ticket.run = Some(section);
        if outcome.is_ok() {
            release.keep();
        } else {
            release.give_back();
        }
        outcome
    }
}

/// What the build of one ticket needs before the job is involved.
struct Build {
    drv_path: StorePath,
    drv_outputs: BTreeMap<String, Option<StorePath>>,
    store_dir: StoreDir,
    /// The input closure, which the request asks the node about first.
    inputs: Vec<StorePath>,
    request: Vec<u8>,
    keep_failed: bool,
}

/// The job a build runs in.
struct Job<'a> {
    ssh: &'a Ssh,
    slurm: &'a Slurm,
    alloc: &'a AllocSection,
    /// Whether the job is the pool's (so its node's locality record counts).
    pooled: bool,
    /// `node (cluster c, Slurm job n)`, for messages.
    place: String,
}

/// How the job is watched while the log streams.
struct Watch<'a> {
    check_every: Duration,
    interrupted: &'a AtomicBool,
}

impl Build {
    /// Reads the derivation and writes the BuildDerivation request.
    fn prepare(ticket: &Ticket) -> Result<Build, Failure> {
        let drv_section = ticket.need_drv()?;
        let closure = ticket.need_closure()?;
        ticket.need_alloc()?;
        let options = ticket.options.clone().unwrap_or_default();
        let local = LocalStore::new(ticket.store_uri(), "")?;
        let drv = local.read_drv(&drv_section.path)?;
        let mut request = Vec::new();
        serve::write_build_request(&mut request, &drv, &closure.paths, &options)
            .or_fail(Kind::Transient, || "writing the build request")?;
        Ok(Build {
            drv_path: drv_section.path.clone(),
            drv_outputs: drv_section.outputs.clone(),
            store_dir: drv.store_dir,
            inputs: closure.paths.clone(),
            request,
            keep_failed: options.keep_failed,
        })
    }

    /// Hands the request to the job, follows the log and reads the result:
    /// the `run` section and whether the build succeeded. An error is a
    /// build that did not end with a result to record.
    fn run(
        &self,
        job: &Job,
        log: &mut LogSink,
        watch: &Watch,
    ) -> Result<(RunSection, Result<(), Failure>), Failure> {
        let started = unix_now();
        let followed = follow(job, &self.request, log, watch);
        let stopped = unix_now();
        let ended = followed.inspect_err(|failure| {
            log.text(&format!(
                "nsh-run: the build of {} on {} did not finish: {}",
                self.drv_path, job.place, failure.message
            ));
        })?;
        let result = read_result(&ended, &job.place)
            .and_then(|response| self.inputs_were_there(response, job))
            .inspect_err(|failure| {
                log.text(&format!("nsh-run: {}", failure.message));
            })?;
        confirm_job_alive(job, &result).inspect_err(|failure| {
            log.text(&format!("nsh-run: {}", failure.message));
        })?;
        let section = run_section(
            &result,
            &self.store_dir,
            &self.drv_path,
            &self.drv_outputs,
            (started, stopped),
        )?;
        let outcome = build_outcome(&result, self.drv_path.as_str(), &job.place);
        match &outcome {
            Ok(()) => log_info!(
                "{} {} in {} s",
                self.drv_path,
                result.status,
                stopped.saturating_sub(started)
            ),
            Err(_) => log.text(&self.failure_tail(&result, job)),
        }
        Ok((section, outcome))
    }

    /// The node had every input when the build began (the request's first
    /// question): else the result is not the derivation's, whatever it says
    /// (a push skipped on the pool's word, which the node's garbage
    /// collector made wrong), and the build may be tried again elsewhere.
    fn inputs_were_there(
        &self,
        response: BuildResponse,
        job: &Job,
    ) -> Result<BuildResult, Failure> {
        let valid: BTreeSet<&StorePath> = response.inputs_valid.iter().collect();
        let missing: Vec<&StorePath> = self.inputs.iter().filter(|p| !valid.contains(p)).collect();
        let Some(first) = missing.first() else {
            return response.result;
        };
        if job.pooled {
            crate::stage::alloc::pooled::forget_paths(job.alloc, &missing);
        }
        Err(Failure::transient(format!(
            "{} lacked {} of the build's {} input paths when the build began ({first}{}); \
             its result is not used",
            job.place,
            missing.len(),
            self.inputs.len(),
            if missing.len() > 1 { ", …" } else { "" },
        )))
    }

    /// The build log's last line after a failed build.
    fn failure_tail(&self, result: &BuildResult, job: &Job) -> String {
        let mut tail = format!(
            "nsh-run: build of {} failed ({}) on {}",
            self.drv_path, result.status, job.place
        );
        if self.keep_failed {
            tail = format!(
                "{tail}; its build directory is kept on {} (keep-failed)",
                job.alloc.node
            );
        }
        tail
    }
}

/// The response: the inputs the node had, and the BuildResult; without one,
/// nix-store --serve itself failed (bad request, missing input, killed) and
/// its own words are the last log lines.
fn read_result(ended: &Ended, place: &str) -> Result<BuildResponse, Failure> {
    let no_result = |failure: Failure| {
        let kind = if ended.status == 1 {
            Kind::Permanent
        } else {
            Kind::Transient
        };
        Failure::new(
            kind,
            format!(
                "nix-store --serve on {place} exited with status {} without a build result ({}){}",
                ended.status,
                failure.message,
                tail_text(&ended.last_lines)
            ),
        )
    };
    let mut response = serve::read_build_response(&ended.response[..]).map_err(no_result)?;
    response.result = response.result.map_err(no_result);
    Ok(response)
}

/// The job must still be there: one that died (a node failure seen late)
/// is never reported built.
fn confirm_job_alive(job: &Job, result: &BuildResult) -> Result<(), Failure> {
    match job.slurm.job(job.alloc.job) {
        Ok(info) => match job_gone(job.alloc, &info) {
            Some(gone) => {
                cancel_if_requeued(job.slurm, &info);
                Err(Failure::transient(format!(
                    "{gone}; the build's result ({}) is not trusted",
                    result.status
                )))
            }
            None => Ok(()),
        },
        Err(e) => {
            log_warn!(
                "could not confirm that job {} still runs ({e}); trusting its response",
                job.alloc.job
            );
            Ok(())
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::serve::BuildStatus;
    use crate::nix::store_path::test_path;
    use follow::FOLLOW_SCRIPT;
    use std::io::{Read, Write};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    const NONCE: &str = "0123abcd";

    fn lines(events: &[LogEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                LogEvent::Line(l) => String::from_utf8_lossy(l).into_owned(),
                LogEvent::End(s) => format!("<end {s}>"),
            })
            .collect()
    }

    #[test]
    fn lines_are_whole_across_chunks_and_the_response_follows_the_sentinel() {
        let mut s = LogSplitter::new(NONCE);
        let mut events = s.push(b"one\ntw");
        events.extend(s.push(b"o\n\nthree"));
        assert_eq!(lines(&events), ["one", "two", ""]);
        assert_eq!(s.end(), None);
        let events = s.push(b" and more\n@nsh-end 0123abcd 0\n\x01\x00\n\xff");
        assert_eq!(lines(&events), ["three and more", "<end 0>"]);
        assert_eq!(s.end(), Some(0));
        assert_eq!(s.response(), b"\x01\x00\n\xff");
        let log = "one\ntwo\n\nthree and more\n@nsh-end 0123abcd 0\n";
        assert_eq!(s.log_bytes(), log.len() as u64);
        // Bytes after the end are response bytes, never lines.
        assert!(s.push(b"x\ny\n").is_empty());
        assert_eq!(s.response(), b"\x01\x00\n\xffx\ny\n");
    }

    #[test]
    fn a_fake_sentinel_is_just_log() {
        let mut s = LogSplitter::new(NONCE);
        let events = s.push(b"@nsh-end guessed 0\n@nsh-end 0123abcd\n@nsh-end 0123abcd x\n");
        assert_eq!(
            lines(&events),
            [
                "@nsh-end guessed 0",
                "@nsh-end 0123abcd",
                "@nsh-end 0123abcd x"
            ]
        );
        assert_eq!(s.end(), None);
    }

    #[test]
    fn a_last_line_without_newline_is_kept_before_the_sentinel() {
        let mut s = LogSplitter::new(NONCE);
        let events = s.push(b"no newline@nsh-end 0123abcd 137\n");
        assert_eq!(lines(&events), ["no newline", "<end 137>"]);
    }

    #[test]
    fn a_broken_stream_leaves_its_partial_line() {
        let mut s = LogSplitter::new(NONCE);
        assert_eq!(lines(&s.push(b"a\nhalf")), ["a"]);
        assert_eq!(s.log_bytes(), 6);
        assert_eq!(s.take_partial(), Some(b"half".to_vec()));
        assert_eq!(s.take_partial(), None);
    }

    fn alloc() -> AllocSection {
        AllocSection {
            cluster: "test".into(),
            job: 42,
            node: "node1".into(),
            ..AllocSection::default()
        }
    }

    fn info(state: JobState, node: Option<&str>) -> JobInfo {
        JobInfo {
            id: 42,
            state,
            flags: vec![],
            reason: None,
            node: node.map(String::from),
            exit_code: None,
            start: None,
            end: None,
        }
    }

    #[test]
    fn which_jobs_are_gone() {
        let a = alloc();
        assert_eq!(job_gone(&a, &info(JobState::Running, Some("node1"))), None);
        assert_eq!(
            job_gone(&a, &info(JobState::Suspended, Some("node1"))),
            None
        );
        let gone = |state, node| job_gone(&a, &info(state, node)).expect("gone");
        assert_eq!(
            gone(JobState::NodeFail, Some("node1")),
            "Slurm job 42 on node1 ended: its node failed (NODE_FAIL)"
        );
        assert!(gone(JobState::Timeout, None).contains("time limit"));
        assert!(gone(JobState::Cancelled, None).contains("cancelled"));
        assert!(gone(JobState::Preempted, None).contains("preempted"));
        assert!(gone(JobState::Pending, None).contains("requeued"));
        assert!(gone(JobState::Completed, None).contains("ended (COMPLETED)"));
        assert!(gone(JobState::Running, Some("node2")).contains("now runs on node2"));
    }

    fn result(status: BuildStatus, msg: &str) -> BuildResult {
        BuildResult {
            status,
            error_msg: msg.into(),
            times_built: 1,
            is_non_deterministic: false,
            start_time: 10,
            stop_time: 20,
            built_outputs: BTreeMap::new(),
        }
    }

    #[test]
    fn outcomes() {
        let kind = |status| {
            build_outcome(&result(status, "why"), "/s/x.drv", "node1")
                .err()
                .map(|f| f.kind)
        };
        for ok in [
            BuildStatus::Built,
            BuildStatus::Substituted,
            BuildStatus::AlreadyValid,
            BuildStatus::ResolvesToAlreadyValid,
        ] {
            assert_eq!(kind(ok), None, "{ok:?}");
        }
        assert_eq!(kind(BuildStatus::TimedOut), Some(Kind::TimedOut));
        assert_eq!(kind(BuildStatus::TransientFailure), Some(Kind::Transient));
        for failed in [
            BuildStatus::PermanentFailure,
            BuildStatus::InputRejected,
            BuildStatus::OutputRejected,
            BuildStatus::CachedFailure,
            BuildStatus::MiscFailure,
            BuildStatus::DependencyFailed,
            BuildStatus::LogLimitExceeded,
            BuildStatus::NotDeterministic,
            BuildStatus::NoSubstituters,
        ] {
            assert_eq!(kind(failed), Some(Kind::Permanent), "{failed:?}");
        }
        let failure = build_outcome(
            &result(
                BuildStatus::PermanentFailure,
                "builder for '/s/x.drv' failed with exit code 3\n",
            ),
            "/s/x.drv",
            "node1 (job 42)",
        )
        .unwrap_err();
        assert_eq!(
            failure.message,
            "build of /s/x.drv failed (permanent-failure) on node1 (job 42): \
             builder for '/s/x.drv' failed with exit code 3"
        );
    }

    #[test]
    fn the_run_section_lists_outputs_only_for_success() {
        let dir = crate::nix::store_path::StoreDir::new("/s").unwrap();
        let mut built = result(BuildStatus::Built, "");
        built
            .built_outputs
            .insert("out".into(), "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-x".into());
        let drv_outputs: BTreeMap<String, StorePath> = [
            (
                "out".to_string(),
                test_path("/s/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-x"),
            ),
            (
                "dev".to_string(),
                test_path("/s/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-x-dev"),
            ),
        ]
        .into();
        let known: BTreeMap<String, Option<StorePath>> = drv_outputs
            .iter()
            .map(|(name, path)| (name.clone(), Some(path.clone())))
            .collect();
        let drv = test_path("/s/2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c-x.drv");
        let section = run_section(&built, &dir, &drv, &known, (5, 25)).unwrap();
        assert_eq!(section.status, BuildStatus::Built);
        assert_eq!((section.start, section.stop), (10, 20));
        assert_eq!(section.built_outputs, drv_outputs);
        let mut failed = result(BuildStatus::PermanentFailure, "boom\n");
        failed.start_time = 0;
        failed.stop_time = 0;
        let section = run_section(&failed, &dir, &drv, &known, (5, 25)).unwrap();
        assert!(section.built_outputs.is_empty());
        // The node does not decide where a declared output is, nor that
        // there are others.
        for (name, base) in [
            ("out", "3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d-x"),
            ("lib", "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-x-lib"),
        ] {
            let mut lying = built.clone();
            lying.built_outputs.insert(name.into(), base.into());
            let err = run_section(&lying, &dir, &drv, &known, (5, 25)).unwrap_err();
            assert_eq!(err.kind, Kind::Permanent);
            assert!(
                err.cause::<crate::stage::fetch::ImportRefused>().is_some(),
                "{}",
                err.message
            );
        }
        // A floating output's path is the node's to tell.
        let floating: BTreeMap<String, Option<StorePath>> = [("out".to_string(), None)].into();
        let told = run_section(&built, &dir, &drv, &floating, (5, 25)).unwrap();
        assert_eq!(
            told.built_outputs["out"],
            "/s/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-x"
        );
        // A built output that is no store path is the node's bad bytes.
        built.built_outputs.insert("out".into(), "x".into());
        let err = run_section(&built, &dir, &drv, &known, (5, 25)).unwrap_err();
        assert_eq!(err.kind, Kind::Permanent);
        assert_eq!(section.error, "boom");
        assert_eq!((section.start, section.stop), (5, 25));
        assert!(section.built_outputs.is_empty());
    }

    /// The follower script under the local sh, on a work dir the test plays
    /// the job in.
    struct Follow {
        child: Child,
        out: std::thread::JoinHandle<Vec<u8>>,
    }

    fn follow_local(work: &Path, offset: u64, request: &[u8]) -> Follow {
        let mut child = Command::new("sh")
            .args(["-c", FOLLOW_SCRIPT, "sh"])
            .arg(work)
            .args(["1", &offset.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(request).unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut buf = Vec::new();
            stdout.read_to_end(&mut buf).unwrap();
            buf
        });
        Follow { child, out }
    }

    /// A work_root that is a symlink, or one anybody may rename in, is not
    /// used: exit 6 at once, the request not written, nothing put there.
    #[test]
    fn the_follower_refuses_a_work_root_others_could_swap() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::create_dir_all(target.join("nsh-1")).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let (status, _) = follow_local(&link.join("nsh-1"), 0, b"req").finish();
        assert_eq!(status, 6);
        assert!(!target.join("nsh-1/request.1").exists());
        let open = dir.path().join("open");
        std::fs::create_dir_all(open.join("nsh-1")).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (status, _) = follow_local(&open.join("nsh-1"), 0, b"req").finish();
        assert_eq!(status, 6);
        assert!(!open.join("nsh-1/request.1").exists());
        // A work dir that is a symlink, in a good work_root.
        let good = dir.path().join("good");
        std::fs::create_dir(&good).unwrap();
        std::os::unix::fs::symlink(&target, good.join("nsh-1")).unwrap();
        let (status, _) = follow_local(&good.join("nsh-1"), 0, b"req").finish();
        assert_eq!(status, 6);
        assert!(!target.join("request.1").exists());
    }

    impl Follow {
        fn finish(mut self) -> (i32, Vec<u8>) {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return (status.code().unwrap_or(-1), self.out.join().unwrap());
                }
                assert!(Instant::now() < deadline, "the follower did not end");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn wait_for(path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "{} did not appear",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn append(path: &Path, bytes: &[u8]) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    #[test]
    fn the_follower_writes_the_request_streams_the_log_then_the_response() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("nsh-7");
        // The work dir comes a moment after the follower starts, as with a
        // job that has just begun.
        let follow = follow_local(&work, 0, b"REQUEST\x00BYTES");
        std::thread::sleep(Duration::from_millis(300));
        std::fs::create_dir(&work).unwrap();
        wait_for(&work.join("request.1"));
        assert_eq!(
            std::fs::read(work.join("request.1")).unwrap(),
            b"REQUEST\x00BYTES"
        );
        assert!(!work.join("request.1.tmp").exists());
        let log = work.join("log.1");
        let mut expected = Vec::new();
        for i in 0..2000 {
            let line = format!("line {i}\n");
            append(&log, line.as_bytes());
            expected.extend_from_slice(line.as_bytes());
            if i % 500 == 0 {
                std::thread::sleep(Duration::from_millis(150));
            }
        }
        append(&log, b"@nsh-end n 0\n");
        expected.extend_from_slice(b"@nsh-end n 0\n");
        std::fs::write(work.join("response.1"), b"RESPONSE").unwrap();
        std::fs::write(work.join("status.1"), b"0\n").unwrap();
        expected.extend_from_slice(b"RESPONSE");
        let (status, out) = follow.finish();
        assert_eq!(status, 0);
        assert_eq!(out, expected);
    }

    #[test]
    fn a_reconnected_follower_resumes_and_does_not_rewrite_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("nsh-8");
        std::fs::create_dir(&work).unwrap();
        std::fs::write(work.join("request.1"), b"FIRST").unwrap();
        std::fs::write(work.join("log.1"), b"0123456789\n@nsh-end n 1\n").unwrap();
        std::fs::write(work.join("response.1"), b"R").unwrap();
        std::fs::write(work.join("status.1"), b"1\n").unwrap();
        let (status, out) = follow_local(&work, 4, b"SECOND").finish();
        assert_eq!(status, 0);
        assert_eq!(out, b"456789\n@nsh-end n 1\nR");
        assert_eq!(std::fs::read(work.join("request.1")).unwrap(), b"FIRST");
    }

    #[test]
    fn a_vanished_work_dir_ends_the_follower_with_3() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("nsh-9");
        std::fs::create_dir(&work).unwrap();
        let follow = follow_local(&work, 0, b"REQ");
        wait_for(&work.join("request.1"));
        append(&work.join("log.1"), b"building\n");
        std::thread::sleep(Duration::from_millis(300));
        std::fs::remove_dir_all(&work).unwrap();
        let (status, out) = follow.finish();
        assert_eq!(status, 3);
        assert_eq!(out, b"building\n");
    }

    #[test]
    fn colour_codes_are_taken_out_of_nix_messages() {
        assert_eq!(
            plain_text(
                "builder for '\u{1b}[35;1m/nix/store/x.drv\u{1b}[0m' failed with exit code 3\n"
            ),
            "builder for '/nix/store/x.drv' failed with exit code 3"
        );
        assert_eq!(plain_text("plain"), "plain");
        assert_eq!(plain_text("cut \u{1b}["), "cut");
    }
}
