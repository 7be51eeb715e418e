//! After `# accept`: the first ticket, the pipeline run with its progress
//! shown in Nix's UI, and the verdict (the hook's exit status).

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::failures::Attempt;
use super::pipeline;
use super::retry;
use super::watchdog::Watchdog;
use super::{Ui, CANCEL_IN_HOOK, EXIT_MISC, EXIT_PERMANENT, EXIT_TIMED_OUT};
use crate::config::ConfigSource;
use crate::error::{Failure, Kind};
use crate::hook::config::HookConfig;
use crate::hook::decision::ClusterCaps;
use crate::hook::pipeline::{Event, Outcome, Stages};
use crate::hook::protocol::{Accepted, ActivityType, Field, LogLine, Settings, Try, Verbosity};
use crate::nix::store_path::StorePath;
use crate::ticket::{BuildOptions, DrvSection, StoreSection, Ticket};

/// The first ticket, from the `try`, what the daemon sent after accept and
/// its settings; its `hook` section says which configuration the hook read
/// and why (`config`, `config_from`), and every later stage keeps it.
pub fn initial_ticket(
    settings: &Settings,
    t: &Try,
    accepted: &Accepted,
    config: (&Path, ConfigSource),
) -> Ticket {
    // `<hash>-<name>.drv` → `<name>`.
    let name = t.drv_path.name().trim_end_matches(".drv").to_string();
    let mut ticket = Ticket::new();
    ticket.drv = Some(DrvSection {
        name,
        system: t.needed_system.clone(),
        features: t.required_features.clone(),
        wanted: accepted.wanted_outputs.clone(),
        ..DrvSection::new(t.drv_path.clone())
    });
    ticket.store = Some(StoreSection {
        dir: t.drv_path.dir().to_string(),
        uri: settings.store().to_string(),
        extra: crate::ticket::Extra::default(),
    });
    ticket.options = Some(BuildOptions {
        max_silent_time: settings.max_silent_time(),
        timeout: settings.timeout(),
        max_log_size: settings.max_log_size(),
        keep_failed: settings.keep_failed(),
        extra: crate::ticket::Extra::default(),
    });
    ticket.extra.insert(
        "hook".into(),
        serde_json::json!({
            "config": config.0.display().to_string(),
            "config_from": config.1.describe(),
        }),
    );
    ticket
}

/// Shows the stages in Nix's UI as activities, from the tickets as they pass.
struct Progress<'a> {
    ui: &'a Ui,
    cluster: String,
    current: Option<u64>,
}

impl Progress<'_> {
    fn switch(&mut self, next: Option<(ActivityType, String, Vec<Field>)>) {
        if let Some(id) = self.current.take() {
            self.ui.stop(id);
        }
        if let Some((kind, text, fields)) = next {
            self.current = Some(self.ui.start(kind, text, fields));
        }
    }

    fn on_event(&mut self, event: &Event) {
        match event {
            Event::Stderr(line) => relay_stderr_line(self.ui, line),
            Event::Interrupted => self.switch(None),
            Event::Ticket { stage, ticket, .. } => {
                if ticket.error.is_some() {
                    self.switch(None);
                    return;
                }
                let node = ticket
                    .alloc
                    .as_ref()
                    .map(|a| format!("{} (Slurm job {})", a.node, a.job))
                    .unwrap_or_default();
                let next = match stage.as_str() {
                    "nsh-closure" => Some((
                        ActivityType::Unknown,
                        format!("waiting for a Slurm allocation on {}", self.cluster),
                        vec![],
                    )),
                    "nsh-alloc" => {
                        let n = ticket.closure.as_ref().map_or(0, |c| c.paths.len());
                        Some((
                            ActivityType::CopyPaths,
                            format!("copying {n} paths to {node}"),
                            vec![],
                        ))
                    }
                    "nsh-push" => {
                        let drv = ticket.drv.as_ref();
                        Some((
                            ActivityType::Build,
                            format!(
                                "building '{}' on {node}",
                                drv.map_or("", |d| d.path.as_str())
                            ),
                            vec![
                                drv.map_or(String::new(), |d| d.path.to_string()).into(),
                                node.clone().into(),
                                1.into(),
                                1.into(),
                            ],
                        ))
                    }
                    "nsh-run" => Some((
                        ActivityType::CopyPaths,
                        format!("copying outputs from {node}"),
                        vec![],
                    )),
                    _ => None,
                };
                self.switch(next);
            }
        }
    }
}

/// A stage's stderr line, as an `@nix msg` (a stage's own `@nix` lines pass as they are).
fn relay_stderr_line(ui: &Ui, line: &str) {
    if line.starts_with("@nix ") && LogLine::parse(line).is_some() {
        ui.write(format!("{line}\n").as_bytes());
        return;
    }
    let level = if line.contains("error: ") {
        Verbosity::Error
    } else if line.contains("warning: ") {
        Verbosity::Warn
    } else {
        Verbosity::Talkative
    };
    ui.msg(level, line);
}

/// What a build after `# accept` runs with.
pub(super) struct Build<'a> {
    pub(super) config: &'a HookConfig,
    pub(super) stages: &'a Stages,
    pub(super) cluster: &'a ClusterCaps,
    pub(super) settings: &'a Settings,
    pub(super) t: &'a Try,
    pub(super) accepted: &'a Accepted,
    pub(super) log_fd: Option<&'a OwnedFd>,
    pub(super) ui: &'a Ui,
}

impl Build<'_> {
    /// Runs the pipeline for the accepted `try`, again in a new job while a
    /// node's fault allows ([`super::retry`]); returns the exit status.
    pub(super) fn run(&self) -> i32 {
        let first = match self.first_ticket() {
            Ok(ticket) => ticket,
            Err(code) => return code,
        };
        let alloc_tool = match self.stages {
            Stages::Tools(paths) => paths.get(1).cloned(),
            Stages::Command(_) => None,
        };
        let mut run = Attempts {
            watchdog: alloc_tool.as_deref().and_then(Watchdog::spawn),
            progress: Progress {
                ui: self.ui,
                cluster: self.cluster.name.clone(),
                current: None,
            },
            timing: TicketLog::from_env(),
            current: None,
        };
        if let Stages::Command(argv) = self.stages {
            // Nix already shows "building '…' on 'slurm://<cluster>'"; say how.
            run.progress.switch(Some((
                ActivityType::Unknown,
                format!(
                    "nsh: running the pipeline {}",
                    argv.first().map_or("", String::as_str)
                ),
                vec![],
            )));
        }
        let outcome = match self.attempts(first, &mut run, alloc_tool.as_deref()) {
            Ok(outcome) => outcome,
            Err(code) => return code,
        };
        run.progress.switch(None);
        let Attempts {
            mut watchdog,
            timing,
            current,
            ..
        } = run;
        if let Some(signal) = outcome.interrupted_by {
            self.interrupted(signal, watchdog, alloc_tool.as_deref(), &outcome);
            if let Some(log) = timing {
                log.append(&outcome, EXIT_MISC, self.ui);
            }
            return EXIT_MISC;
        }
        let (code, message) = verdict(&outcome, |paths, uri| match self.stages {
            // nsh-fetch writes its ticket only once the wanted outputs are
            // valid in the local store (it asks the store itself, or has
            // just registered them): asking again here would cost one more
            // `nix-store` per build for an answer already had.
            Stages::Tools(_) => Ok(true),
            Stages::Command(_) => outputs_valid(self.config.nix_bin_dir.as_deref(), uri, paths),
        });
        if let Some(log) = timing {
            log.append(&outcome, code, self.ui);
        }
        self.set_aside_if_refused(&outcome);
        if let (Some(attempt), true) = (current, code != 0) {
            settle(
                &attempt,
                &outcome,
                message.as_deref().unwrap_or_default(),
                false,
            );
        }
        if let Some(message) = message {
            self.ui
                .msg(Verbosity::Error, format!("nsh-hook: {message}"));
        }
        if code == 0 {
            if let Some(w) = watchdog.take() {
                w.disarm();
            }
        }
        code
    }

    /// The pipeline from `ticket`, then from the next attempt's ticket while
    /// [`retry::next_attempt`] gives one; the last attempt's outcome.
    fn attempts(
        &self,
        mut ticket: Ticket,
        run: &mut Attempts,
        alloc_tool: Option<&Path>,
    ) -> Result<Outcome, i32> {
        let retries = self
            .config
            .config
            .clusters
            .get(&self.cluster.name)
            .map_or(0, |c| c.retries);
        loop {
            run.current = Some(Attempt::new(&ticket, crate::status::now()));
            let mut outcome = self.attempt(&ticket, run)?;
            if outcome.interrupted_by.is_some() {
                return Ok(outcome);
            }
            let next = outcome
                .final_ticket
                .as_ref()
                .and_then(|last| retry::next_attempt(&ticket, last, retries));
            let Some(next) = next else {
                return Ok(outcome);
            };
            run.progress.switch(None);
            self.end_failed_attempt(&outcome, alloc_tool, &next, retries);
            if let Some(attempt) = &run.current {
                let (_, message) = verdict(&outcome, |_, _| Ok(true));
                settle(attempt, &outcome, &message.unwrap_or_default(), true);
            }
            if let Some(signal) =
                sleep_unless_signalled(retry::backoff(next.retry.as_ref().map_or(2, |r| r.attempt)))
            {
                outcome.interrupted_by = Some(signal);
                return Ok(outcome);
            }
            ticket = next;
        }
    }

    /// One run of the pipeline from `ticket`, its tickets shown and watched.
    fn attempt(&self, ticket: &Ticket, run: &mut Attempts) -> Result<Outcome, i32> {
        let env = [("NSH_CLUSTER", self.cluster.name.clone())];
        let log_fd = self.log_fd.map(AsFd::as_fd);
        let Attempts {
            watchdog,
            progress,
            timing,
            ..
        } = run;
        let result = pipeline::run(self.stages, ticket, &env, log_fd, |event| {
            if let Event::Ticket { stage, ticket, .. } = event {
                if let Some(log) = timing.as_mut() {
                    log.stage_done(stage);
                }
                if let (Some(w), true) = (watchdog.as_mut(), ticket.alloc.is_some()) {
                    w.update(ticket);
                }
            }
            if let (Event::Interrupted, Some(w)) = (event, watchdog.as_mut()) {
                // Before the stages are stopped, and from outside the hook's
                // process group, which Nix 2.35 kills 500 ms after its SIGTERM.
                w.cancel_now();
            }
            progress.on_event(event);
        });
        result.map_err(|failure| {
            self.ui
                .msg(Verbosity::Error, format!("nsh-hook: {failure}"));
            EXIT_MISC
        })
    }

    /// Before the next attempt: the failed attempt's job is cancelled (a
    /// job Slurm requeued would otherwise wait for a request that never
    /// comes; a pooled job on a failing node must not be taken again), and
    /// the user is told.
    fn end_failed_attempt(
        &self,
        outcome: &Outcome,
        alloc_tool: Option<&Path>,
        next: &Ticket,
        retries: u32,
    ) {
        let last = outcome.final_ticket.as_ref();
        if let (Some(tool), Some(last)) = (alloc_tool, last.filter(|t| t.alloc.is_some())) {
            let _ =
                pipeline::run_bounded(tool, &["--cancel"], &last.to_line(), CANCEL_FAILED_ATTEMPT);
        }
        let why = last
            .and_then(|t| t.error.as_ref())
            .map_or(String::new(), |e| {
                format!("{} failed: {}", e.stage, e.message)
            });
        let retry = next.retry.clone().unwrap_or_default();
        self.ui.msg(
            Verbosity::Error,
            format!(
                "nsh-hook: {why}; trying again in a new job (attempt {} of {}{})",
                retry.attempt,
                retries + 1,
                if retry.exclude.is_empty() {
                    String::new()
                } else {
                    format!(", not on {}", retry.exclude.join(", "))
                }
            ),
        );
    }

    /// The first ticket, once the derivation is known to fit the cluster's
    /// limits; else the exit status, refused before anything is asked of
    /// Slurm (and before any "waiting for a Slurm allocation").
    fn first_ticket(&self) -> Result<Ticket, i32> {
        let ticket = initial_ticket(
            self.settings,
            self.t,
            self.accepted,
            (&self.config.path, self.config.source),
        );
        match self.fits_the_limits(&ticket) {
            Ok(()) => Ok(ticket),
            Err(message) => {
                self.ui
                    .msg(Verbosity::Error, format!("nsh-hook: {message}"));
                Err(EXIT_PERMANENT)
            }
        }
    }

    /// The derivation's `nshResources` within the cluster's limits, read
    /// from the `.drv` before the pipeline starts. A `.drv` that cannot be
    /// read here is left to nsh-closure to report.
    fn fits_the_limits(&self, ticket: &Ticket) -> Result<(), String> {
        let Some(cluster) = self.config.config.clusters.get(&self.cluster.name) else {
            return Ok(());
        };
        let read = crate::nix::local_store::LocalStore::new(ticket.store_uri(), "")
            .and_then(|store| store.read_drv(&self.t.drv_path));
        let Ok(drv) = read else {
            return Ok(());
        };
        let section = drv.section(self.accepted.wanted_outputs.clone());
        crate::stage::alloc::place_on(cluster, &section, ticket.options.as_ref())
            .map(|_| ())
            .map_err(|misfit| {
                format!(
                    "{} cannot be built on cluster {}: {misfit} (not submitted)",
                    self.t.drv_path, cluster.name
                )
            })
    }

    /// A configuration error (exit 78) from the pipeline sets the cluster
    /// aside ([`super::health`]): later builds go elsewhere. Not one of a
    /// retry that excluded nodes: Slurm refuses a job that excludes every
    /// node as it refuses a bad configuration.
    fn set_aside_if_refused(&self, outcome: &Outcome) {
        let refused = outcome
            .final_ticket
            .as_ref()
            .filter(|t| t.retry.as_ref().is_none_or(|r| r.exclude.is_empty()))
            .and_then(|t| t.error.as_ref())
            .filter(|e| e.kind == Kind::Config);
        if let Some(error) = refused {
            super::health::Health::new(&self.config.slots_dir, &self.config.path).record(
                &self.cluster.name,
                &super::health::Verdict::Broken(error.message.clone()),
            );
            self.ui.msg(
                Verbosity::Error,
                format!(
                    "nsh-hook: cluster {} set aside for up to {} minutes: later builds go to the fallback or are built locally",
                    self.cluster.name,
                    super::health::VERDICT_FOR.as_secs() / 60
                ),
            );
        }
    }

    /// A signal stopped the stages: the job is cancelled, by the watchdog
    /// when there is one, else here.
    fn interrupted(
        &self,
        signal: i32,
        watchdog: Option<Watchdog>,
        alloc_tool: Option<&Path>,
        outcome: &Outcome,
    ) {
        self.ui.msg(
            Verbosity::Error,
            format!("nsh-hook: interrupted by signal {signal}; cancelling the build"),
        );
        match watchdog {
            // It is cancelling already and has every ticket seen since; the
            // hook exits without waiting for it, well within the 500 ms Nix
            // 2.35 gives it.
            Some(w) => w.hand_over(),
            None => {
                if let (Some(tool), Some(ticket)) = (alloc_tool, &outcome.latest_alloc) {
                    let _ = pipeline::run_bounded(
                        tool,
                        &["--cancel"],
                        &ticket.to_line(),
                        CANCEL_IN_HOOK,
                    );
                }
            }
        }
    }
}

/// What lasts across the attempts of one build.
struct Attempts<'a> {
    watchdog: Option<Watchdog>,
    progress: Progress<'a>,
    timing: Option<TicketLog>,
    /// The attempt under way, or the last one.
    current: Option<Attempt>,
}

/// A failed attempt, in the status files: marked retried, or recorded by
/// the hook when no stage recorded it ([`super::failures`]).
fn settle(attempt: &Attempt, outcome: &Outcome, message: &str, retried: bool) {
    if let Some(end) = attempt.end(outcome, message, retried, crate::status::now()) {
        crate::status::settle_attempt(&end);
    }
}

/// How long the cancel of a failed attempt's job may take (one Slurm call).
const CANCEL_FAILED_ATTEMPT: std::time::Duration = std::time::Duration::from_secs(15);

/// Sleeps `pause` in small steps; the signal that came meanwhile, if one did.
fn sleep_unless_signalled(pause: std::time::Duration) -> Option<i32> {
    let until = std::time::Instant::now() + pause;
    while std::time::Instant::now() < until {
        if let Some(signal) = pipeline::signalled() {
            return Some(signal);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    pipeline::signalled()
}

/// `NSH_TICKET_LOG=FILE` in the hook's environment: after each build, the
/// final ticket (else the latest one with `alloc`) is appended to FILE as
/// one JSON line, with a `hook` section the hook adds from its own clock:
/// `accepted` (Unix time, seconds), `stages` (each stage's name → seconds
/// from accept until it wrote its ticket), `secs` (accept → outputs checked
/// valid, or the failure seen) and `exit` (the hook's exit status). It is for
/// measuring (tests/bench/dag.sh) and auditing; a failure to write it is only
/// logged, never fails a build.
pub const TICKET_LOG_ENV: &str = "NSH_TICKET_LOG";

struct TicketLog {
    path: PathBuf,
    accepted: std::time::SystemTime,
    clock: std::time::Instant,
    stages: serde_json::Map<String, serde_json::Value>,
}

impl TicketLog {
    fn from_env() -> Option<TicketLog> {
        let path = std::env::var_os(TICKET_LOG_ENV).filter(|p| !p.is_empty())?;
        Some(TicketLog {
            path: PathBuf::from(path),
            accepted: std::time::SystemTime::now(),
            clock: std::time::Instant::now(),
            stages: serde_json::Map::new(),
        })
    }

    fn since_accept(&self) -> serde_json::Value {
        // Milliseconds are plenty; shorter lines.
        let secs = (self.clock.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
        serde_json::json!(secs)
    }

    fn stage_done(&mut self, stage: &str) {
        let at = self.since_accept();
        self.stages.insert(stage.to_string(), at);
    }

    fn append(self, outcome: &Outcome, exit: i32, ui: &Ui) {
        let Some(mut ticket) = outcome
            .final_ticket
            .clone()
            .or_else(|| outcome.latest_alloc.clone())
        else {
            return;
        };
        let accepted = self
            .accepted
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let secs = self.since_accept();
        let timing = serde_json::json!({"accepted": accepted, "stages": self.stages, "secs": secs, "exit": exit});
        // Beside what the first ticket's `hook` section says (the config).
        match ticket.extra.get_mut("hook") {
            Some(serde_json::Value::Object(hook)) => {
                if let serde_json::Value::Object(timing) = timing {
                    hook.extend(timing);
                }
            }
            _ => {
                ticket.extra.insert("hook".into(), timing);
            }
        }
        let line = format!("{}\n", ticket.to_line());
        // One write of the whole line with O_APPEND: concurrent hooks'
        // lines do not interleave.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            ui.msg(
                Verbosity::Warn,
                format!(
                    "nsh-hook: writing the ticket log {}: {e}",
                    self.path.display()
                ),
            );
        }
    }
}

/// The exit status and the message for the user, from how the pipeline ended.
/// `valid(paths, store_uri)` checks the outputs in the local store.
pub fn verdict(
    outcome: &Outcome,
    valid: impl FnOnce(&[StorePath], &str) -> Result<bool, Failure>,
) -> (i32, Option<String>) {
    let failed_stage =
        outcome
            .statuses
            .iter()
            .find(|(_, s)| *s != Some(0))
            .map(|(name, s)| match s {
                Some(code) => format!("{name} exited with status {code}"),
                None => format!("{name} was killed"),
            });
    let Some(ticket) = &outcome.final_ticket else {
        return (
            EXIT_MISC,
            Some(format!(
                "the pipeline wrote no final ticket{}",
                failed_stage.map(|s| format!(" ({s})")).unwrap_or_default()
            )),
        );
    };
    if let Some(error) = &ticket.error {
        let code = match error.kind {
            Kind::Permanent => EXIT_PERMANENT,
            Kind::TimedOut => EXIT_TIMED_OUT,
            _ => EXIT_MISC,
        };
        return (
            code,
            Some(format!(
                "{} failed ({}): {}",
                error.stage, error.kind, error.message
            )),
        );
    }
    if let Some(stage) = failed_stage {
        return (EXIT_MISC, Some(stage));
    }
    let Some(drv) = &ticket.drv else {
        return (
            EXIT_MISC,
            Some("the final ticket has no `drv` section".into()),
        );
    };
    let mut paths = Vec::new();
    for name in &drv.wanted {
        match drv.outputs.get(name).and_then(Option::as_ref) {
            Some(path) => paths.push(path.clone()),
            None => {
                return (
                    EXIT_MISC,
                    Some(format!(
                        "the final ticket does not say where output `{name}` is"
                    )),
                )
            }
        }
    }
    let uri = ticket.store_uri();
    match valid(&paths, uri) {
        Ok(true) => (0, None),
        Ok(false) => (
            EXIT_MISC,
            Some(format!(
                "the pipeline succeeded but these outputs are not valid in the local store: {}",
                paths
                    .iter()
                    .map(StorePath::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            )),
        ),
        Err(failure) => (EXIT_MISC, Some(failure.message)),
    }
}

/// `nix-store --check-validity`: from `nix_bin_dir`, else next to the
/// process that started the hook (the daemon or nix-build), else on PATH.
fn outputs_valid(
    nix_bin_dir: Option<&Path>,
    uri: &str,
    paths: &[StorePath],
) -> Result<bool, Failure> {
    if paths.is_empty() {
        return Ok(true);
    }
    let nix_store = match nix_bin_dir {
        Some(dir) => dir.join("nix-store"),
        None => std::fs::read_link(format!("/proc/{}/exe", std::os::unix::process::parent_id()))
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("nix-store")))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("nix-store")),
    };
    let mut cmd = Command::new(&nix_store);
    if let Some(uri) = crate::nix::local_store::store_arg(uri) {
        cmd.args(["--store", uri]);
    }
    let status = cmd
        .arg("--check-validity")
        .args(paths.iter().map(StorePath::as_str))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| Failure::config(format!("running {}: {e}", nix_store.display())))?;
    Ok(status.success())
}
