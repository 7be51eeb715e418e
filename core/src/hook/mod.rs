//! `nsh-hook`: the build hook a site puts in Nix's `build-hook` setting.
//!
//! The protocol is [`crate::hook::protocol`], the decision [`crate::hook::decision`],
//! the pipeline [`crate::hook::pipeline`]; this module is the I/O that ties
//! them together:
//!
//! 1. read the settings, answer `try`s (accept / postpone / decline, or hand
//!    a declined `try` to a configured fallback hook and relay it if it
//!    accepts) until one is accepted or stdin ends;
//! 2. after `# accept`: read the inputs and wanted outputs, make the ticket,
//!    run the pipeline with progress shown as `@nix` activities;
//! 3. exit 0 only when the final ticket has no error and every wanted output
//!    is valid in the local store; else 100 (permanent), 101 (timed out) or 1.
//!
//! A watchdog process outside the hook's process group cancels the Slurm job
//! if the hook dies without finishing (the daemon kills the hook's whole
//! process group with SIGKILL when a build is interrupted or done).

pub mod check;
pub mod config;
pub mod decision;
pub mod pipeline;
pub mod protocol;
pub mod slots;

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Failure, Kind};
use crate::hook::check::probe;
use crate::hook::config::HookConfig;
use crate::hook::decision::{decide, ClusterCaps, Decision, LocalCaps};
use crate::hook::pipeline::{Event, Outcome, Stages};
use crate::hook::protocol::{
    Accepted, ActivityType, Field, LogLine, NixDefaults, Reply, ReplyWord, Request, Settings, Try,
    Verbosity,
};
use crate::hook::slots::{LockTable, Slot, SlotDir};
use crate::ticket::{BuildOptions, DrvSection, StoreSection, Ticket};

/// Nix's exit statuses for a hook (≤ 2.28 and Lix distinguish these).
pub const EXIT_PERMANENT: i32 = 100;
pub const EXIT_TIMED_OUT: i32 = 101;
pub const EXIT_MISC: i32 = 1;

/// How long the hook itself waits for `nsh-alloc --cancel` after a signal
/// when it has no watchdog to do it.
const CANCEL_IN_HOOK: Duration = Duration::from_millis(1000);
/// How long the watchdog waits for it.
const CANCEL_IN_WATCHDOG: Duration = Duration::from_secs(60);

/// Writes replies and `@nix` lines to stderr (= the daemon), one write each.
#[derive(Clone)]
pub struct Ui {
    verbosity: Verbosity,
    next_id: Arc<AtomicU64>,
}

impl Ui {
    pub fn new(verbosity: Verbosity) -> Ui {
        // Activity ids must not collide with other hooks' in the same daemon.
        let base = (std::process::id() as u64) << 32;
        Ui {
            verbosity,
            next_id: Arc::new(AtomicU64::new(base + 1)),
        }
    }

    fn write(&self, bytes: &[u8]) {
        let _ = crate::hook::protocol::write_line(&mut io::stderr().lock(), bytes);
    }

    pub fn reply(&self, reply: &Reply) {
        self.write(&reply.to_bytes());
    }

    pub fn msg(&self, level: Verbosity, msg: impl Into<String>) {
        if level <= self.verbosity {
            self.write(
                LogLine::Msg {
                    level,
                    msg: msg.into(),
                }
                .to_line()
                .as_bytes(),
            );
        }
    }

    pub fn start(&self, kind: ActivityType, text: String, fields: Vec<Field>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.write(
            LogLine::Start {
                id,
                level: Verbosity::Info,
                kind,
                text,
                parent: 0,
                fields,
            }
            .to_line()
            .as_bytes(),
        );
        id
    }

    pub fn stop(&self, id: u64) {
        self.write(LogLine::Stop { id }.to_line().as_bytes());
    }
}

/// The entry point of the `nsh-hook` binary; returns the exit status.
pub fn main(argv: Vec<String>) -> i32 {
    crate::log::set_program("nsh-hook");
    match argv.get(1).map(String::as_str) {
        Some("--watchdog") => return watchdog_main(&argv[2..]),
        Some("--help" | "-h") => {
            println!(
                "nsh-hook: Nix build hook that builds derivations as Slurm jobs\n\n\
                 usage: set Nix's `build-hook` to the absolute path of nsh-hook;\n\
                 Nix runs it as `nsh-hook <verbosity>` and speaks the build-hook protocol\n\
                 on its stdin/stderr.\n\n\
                 nsh-hook --check [--help]: check the installation on the running system\n\
                 (configuration, clusters, the daemon's build hook).\n\n\
                 configuration: $NSH_CONFIG, else {}",
                crate::config::DEFAULT_PATH
            );
            return 0;
        }
        Some("--version" | "-V") => {
            println!("nsh-hook {}", env!("CARGO_PKG_VERSION"));
            return 0;
        }
        _ => {}
    }
    let verbosity = argv
        .get(1)
        .and_then(|v| Verbosity::parse(v))
        .unwrap_or(Verbosity::Info);
    run(verbosity)
}

/// Takes fd 4 (the build log) out of the way: moved to a close-on-exec fd
/// so no child inherits it unless handed over on purpose; fd 5 (the read
/// end of the same pipe) is closed.
fn take_log_fd() -> Option<OwnedFd> {
    crate::sys::fds::take_hook_log_fd()
}

fn run(verbosity: Verbosity) -> i32 {
    pipeline::install_signal_handlers();
    let log_fd = take_log_fd();
    let ui = Ui::new(verbosity);
    let mut input = BufReader::with_capacity(1 << 16, crate::sys::fds::stdin_file());

    let settings = match Settings::read(&mut input) {
        Ok(s) => s,
        Err(e) => {
            ui.msg(Verbosity::Error, format!("nsh-hook: {e}"));
            return EXIT_MISC;
        }
    };
    let local = LocalCaps::from_settings(&settings, &NixDefaults::of_this_machine());
    let config = HookConfig::load();
    // Without the pipeline nsh builds nothing, but a fallback hook still may.
    let stages = config.as_ref().ok().map(|config| match &config.pipeline {
        Some(argv) => Ok(Stages::Command(argv.clone())),
        None => own_dir().and_then(|dir| Stages::tools_in(&dir)),
    });
    let mut fallback: Option<Fallback> = None;
    let mut reported_setup_error = false;

    loop {
        let t = match Request::read(&mut input) {
            Ok(Request::Eof) => return 0,
            Ok(Request::Try(t)) => t,
            Err(e) => {
                ui.msg(Verbosity::Error, format!("nsh-hook: {e}"));
                return EXIT_MISC;
            }
        };
        // `nsh-hook --check` asking whether the daemon's hook is nsh:
        // answered before anything else, a broken configuration included.
        if let Some(nonce) = probe::probe_nonce(&t) {
            answer_probe(&nonce, &settings, config.as_ref(), &ui);
            ui.reply(&Reply::Decline);
            continue;
        }
        let config = match &config {
            Ok(config) => config,
            Err(failure) => {
                if !reported_setup_error {
                    ui.msg(
                        Verbosity::Error,
                        format!("nsh-hook: {failure}; building without nsh"),
                    );
                    reported_setup_error = true;
                }
                ui.reply(&Reply::DeclinePermanently);
                continue;
            }
        };
        let stages = match stages.as_ref().expect("set when the config is") {
            Ok(stages) => Some(stages),
            Err(failure) => {
                if !reported_setup_error {
                    ui.msg(Verbosity::Error, format!("nsh-hook: {failure}"));
                    reported_setup_error = true;
                }
                None
            }
        };
        let slots = SlotDir::new(&config.slots_dir);
        let decision = match stages {
            Some(_) => decide_and_lock(&config.clusters, &local, &t, &slots).unwrap_or_else(|e| {
                ui.msg(Verbosity::Error, format!("nsh-hook: {e}"));
                Locked::Decline
            }),
            None => Locked::Decline,
        };
        match decision {
            Locked::Accepted(cluster, slot) => {
                let stages = stages.expect("accepted only with a pipeline");
                ui.reply(&Reply::Accept {
                    machine: format!("slurm://{}", cluster.name),
                });
                let accepted = match Accepted::read(&mut input) {
                    Ok(a) => a,
                    Err(e) => {
                        ui.msg(Verbosity::Error, format!("nsh-hook: {e}"));
                        return EXIT_MISC;
                    }
                };
                drop(fallback);
                let code = build(
                    config,
                    stages,
                    cluster,
                    &settings,
                    &t,
                    &accepted,
                    log_fd.as_ref(),
                    &ui,
                );
                drop(slot);
                return code;
            }
            Locked::Postpone => ui.reply(&Reply::Postpone),
            Locked::Decline => match &config.fallback {
                None if stages.is_none() => ui.reply(&Reply::DeclinePermanently),
                None => ui.reply(&Reply::Decline),
                Some(argv) => {
                    match ask_fallback(
                        &mut fallback,
                        argv,
                        verbosity,
                        &settings,
                        &t,
                        log_fd.as_ref(),
                        &ui,
                    ) {
                        Ok(true) => {
                            let fb = fallback.take().expect("asked");
                            return relay_fallback(fb, input);
                        }
                        Ok(false) => {}
                        Err(failure) => {
                            ui.msg(
                                Verbosity::Error,
                                format!("nsh-hook: fallback hook: {failure}"),
                            );
                            fallback = None;
                            ui.reply(&Reply::Decline);
                        }
                    }
                }
            },
        }
    }
}

/// Leaves this hook's marker for the probe `nonce` (see [`probe`]) and says
/// so: the daemon relays the hook's messages to the client that asked, so
/// the check learns that the hook is nsh even when the marker cannot be
/// written (and why).
fn answer_probe(nonce: &str, settings: &Settings, loaded: Result<&HookConfig, &Failure>, ui: &Ui) {
    let marker = probe::Marker::of_this_hook(nonce, settings.get("build-hook"), loaded);
    let dir = probe::probe_dir();
    let whom = format!("nsh-hook {} at {}", marker.version, marker.exe);
    match probe::leave_marker(&dir, &marker) {
        Ok(()) => ui.msg(
            Verbosity::Info,
            format!(
                "{whom}: the --check probe {nonce}: marker left in {}",
                dir.display()
            ),
        ),
        Err(failure) => ui.msg(
            Verbosity::Warn,
            format!("{whom}: the --check probe {nonce}: no marker: {failure}"),
        ),
    }
}

/// The directory of the running executable (where the nsh-* tools are).
fn own_dir() -> Result<PathBuf, Failure> {
    let exe = std::env::current_exe()
        .map_err(|e| Failure::config(format!("locating nsh-hook's own executable: {e}")))?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// The decision with its slot taken.
pub enum Locked<'c> {
    /// Build on this cluster; the slot is held until dropped.
    Accepted(&'c ClusterCaps, Slot),
    Postpone,
    Decline,
}

/// The decision, then the slot lock it needs. Another hook may take the
/// slot between counting and locking: the cluster is then counted full and
/// the decision made again. Slots are counted only when more than one
/// cluster fits (with one, taking a slot is the count).
pub fn decide_and_lock<'c>(
    clusters: &'c [ClusterCaps],
    local: &LocalCaps,
    t: &Try,
    slots: &SlotDir,
) -> Result<Locked<'c>, Failure> {
    let fitting = clusters
        .iter()
        .filter(|c| c.fits(&t.needed_system, &t.required_features))
        .count();
    let mut full = vec![false; clusters.len()];
    let mut table: Option<LockTable> = None;
    for _ in 0..=clusters.len() {
        let mut slot_error = None;
        let decision = decide(clusters, local, t, |i| {
            let c = &clusters[i];
            if full[i] {
                c.max_jobs
            } else if fitting == 1 {
                0
            } else {
                let table = table.get_or_insert_with(LockTable::read);
                slots
                    .load_in(table, &c.name, c.max_jobs)
                    .unwrap_or_else(|e| {
                        slot_error = Some(e);
                        c.max_jobs
                    })
            }
        });
        if let Some(e) = slot_error {
            return Err(e);
        }
        match decision {
            Decision::Accept { cluster } => {
                let c = &clusters[cluster];
                match slots.acquire(&c.name, c.max_jobs)? {
                    Some(slot) => return Ok(Locked::Accepted(c, slot)),
                    None => full[cluster] = true,
                }
            }
            Decision::Postpone => return Ok(Locked::Postpone),
            Decision::Decline(_) => return Ok(Locked::Decline),
        }
    }
    Ok(Locked::Postpone)
}

/// The first ticket, from the `try`, what the daemon sent after accept and
/// its settings.
pub fn initial_ticket(settings: &Settings, t: &Try, accepted: &Accepted) -> Ticket {
    let path = Path::new(&t.drv_path);
    let store_dir = path
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // `<hash>-<name>.drv` → `<name>`.
    let name = base
        .split_once('-')
        .map(|(_, rest)| rest)
        .unwrap_or(&base)
        .trim_end_matches(".drv")
        .to_string();
    let mut ticket = Ticket::new();
    ticket.drv = Some(DrvSection {
        path: t.drv_path.clone(),
        name,
        system: t.needed_system.clone(),
        features: t.required_features.clone(),
        wanted: accepted.wanted_outputs.clone(),
        ..DrvSection::default()
    });
    ticket.store = Some(StoreSection {
        dir: store_dir,
        uri: settings.store().to_string(),
        extra: Default::default(),
    });
    ticket.options = Some(BuildOptions {
        max_silent_time: settings.max_silent_time(),
        timeout: settings.timeout(),
        max_log_size: settings.max_log_size(),
        keep_failed: settings.keep_failed(),
        extra: Default::default(),
    });
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
            Event::Interrupted(_) => self.switch(None),
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
                                drv.map_or(String::new(), |d| d.path.clone()).into(),
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

/// Runs the pipeline for an accepted `try`; returns the exit status.
#[allow(clippy::too_many_arguments)]
fn build(
    config: &HookConfig,
    stages: &Stages,
    cluster: &ClusterCaps,
    settings: &Settings,
    t: &Try,
    accepted: &Accepted,
    log_fd: Option<&OwnedFd>,
    ui: &Ui,
) -> i32 {
    let ticket = initial_ticket(settings, t, accepted);
    let alloc_tool = match stages {
        Stages::Tools(paths) => paths.get(1).cloned(),
        Stages::Command(_) => None,
    };
    let mut watchdog = alloc_tool.as_deref().and_then(Watchdog::spawn);
    let mut progress = Progress {
        ui,
        cluster: cluster.name.clone(),
        current: None,
    };
    if let Stages::Command(argv) = stages {
        // Nix already shows "building '…' on 'slurm://<cluster>'"; say how.
        progress.switch(Some((
            ActivityType::Unknown,
            format!("nsh: running the pipeline {}", argv[0]),
            vec![],
        )));
    }
    let env = [("NSH_CLUSTER", cluster.name.clone())];
    let mut timing = TicketLog::from_env();
    let result = pipeline::run(stages, &ticket, &env, log_fd.map(|f| f.as_fd()), |event| {
        if let Event::Ticket { stage, ticket, .. } = event {
            if let Some(log) = timing.as_mut() {
                log.stage_done(stage);
            }
            if let (Some(w), true) = (watchdog.as_mut(), ticket.alloc.is_some()) {
                w.update(ticket);
            }
        }
        if let (Event::Interrupted(_), Some(w)) = (event, watchdog.as_mut()) {
            // Before the stages are stopped, and from outside the hook's
            // process group, which Nix 2.35 kills 500 ms after its SIGTERM.
            w.cancel_now();
        }
        progress.on_event(event);
    });
    progress.switch(None);
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(failure) => {
            ui.msg(Verbosity::Error, format!("nsh-hook: {failure}"));
            return EXIT_MISC;
        }
    };
    if let Some(signal) = outcome.interrupted_by {
        ui.msg(
            Verbosity::Error,
            format!("nsh-hook: interrupted by signal {signal}; cancelling the build"),
        );
        match watchdog {
            // It is cancelling already and has every ticket seen since; the
            // hook exits without waiting for it, well within the 500 ms Nix
            // 2.35 gives it.
            Some(w) => w.hand_over(),
            None => {
                if let (Some(tool), Some(ticket)) = (&alloc_tool, &outcome.latest_alloc) {
                    let _ = pipeline::run_bounded(
                        tool,
                        &["--cancel"],
                        &ticket.to_line(),
                        CANCEL_IN_HOOK,
                    );
                }
            }
        }
        if let Some(log) = timing {
            log.append(&outcome, EXIT_MISC, ui);
        }
        return EXIT_MISC;
    }
    let (code, message) = verdict(&outcome, |paths, uri| {
        outputs_valid(config.nix_bin_dir.as_deref(), uri, paths)
    });
    if let Some(log) = timing {
        log.append(&outcome, code, ui);
    }
    if let Some(message) = message {
        ui.msg(Verbosity::Error, format!("nsh-hook: {message}"));
    }
    if code == 0 {
        if let Some(w) = watchdog.take() {
            w.disarm();
        }
    }
    code
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
        ticket.extra.insert(
            "hook".into(),
            serde_json::json!({"accepted": accepted, "stages": self.stages, "secs": secs, "exit": exit}),
        );
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
    valid: impl FnOnce(&[String], &str) -> Result<bool, Failure>,
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
        match drv.outputs.get(name).filter(|p| !p.is_empty()) {
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
                paths.join(" ")
            )),
        ),
        Err(failure) => (EXIT_MISC, Some(failure.message)),
    }
}

/// `nix-store --check-validity`: from `nix_bin_dir`, else next to the
/// process that started the hook (the daemon or nix-build), else on PATH.
fn outputs_valid(nix_bin_dir: Option<&Path>, uri: &str, paths: &[String]) -> Result<bool, Failure> {
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
        .args(paths)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| Failure::config(format!("running {}: {e}", nix_store.display())))?;
    Ok(status.success())
}

/// A process in its own session that cancels the Slurm job if the hook
/// disappears before saying it is done. It reads, on stdin, one line per
/// update: the latest ticket with `alloc`; `cancel` (the hook was told to
/// stop: cancel now); `done` (nothing to cancel).
struct Watchdog {
    child: Child,
    stdin: ChildStdin,
}

impl Watchdog {
    fn spawn(alloc_tool: &Path) -> Option<Watchdog> {
        let exe = std::env::current_exe().ok()?;
        let mut cmd = Command::new(exe);
        cmd.arg("--watchdog")
            .arg(alloc_tool)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // A new session: the daemon's kill of the hook's process group does
        // not reach the watchdog.
        crate::sys::process::in_new_session(&mut cmd);
        let mut child = cmd.spawn().ok()?;
        let stdin = child.stdin.take()?;
        Some(Watchdog { child, stdin })
    }

    fn update(&mut self, ticket: &Ticket) {
        let _ = writeln!(self.stdin, "{}", ticket.to_line());
    }

    fn disarm(mut self) {
        let _ = writeln!(self.stdin, "done");
        drop(self.stdin);
        let _ = self.child.wait();
    }

    fn cancel_now(&mut self) {
        let _ = writeln!(self.stdin, "cancel");
    }

    /// No more updates: the watchdog cancels what it has not cancelled yet,
    /// on its own, and exits.
    fn hand_over(self) {
        drop(self.stdin);
    }
}

/// `nsh-hook --watchdog <nsh-alloc>`: see [`Watchdog`].
fn watchdog_main(args: &[String]) -> i32 {
    let Some(alloc_tool) = args.first() else {
        return 64;
    };
    // Signals that hit the hook's terminal or group are not for the watchdog.
    crate::sys::signals::ignore_terminal_signals();
    let cancel = |ticket: &str| {
        let _ = pipeline::run_bounded(
            Path::new(alloc_tool),
            &["--cancel"],
            ticket,
            CANCEL_IN_WATCHDOG,
        );
    };
    let mut latest: Option<String> = None;
    let mut cancelled: Option<String> = None;
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "done" => return 0,
            "" => {}
            "cancel" => {
                if let Some(ticket) = latest
                    .as_deref()
                    .filter(|t| cancelled.as_deref() != Some(*t))
                {
                    cancel(ticket);
                    cancelled = Some(ticket.to_string());
                }
            }
            _ => latest = Some(line),
        }
    }
    // The hook is gone without saying it is done; a ticket that came after
    // a `cancel` (nsh-alloc's job started as the hook was stopped) is
    // cancelled too.
    if let Some(ticket) = latest.filter(|t| cancelled.as_ref() != Some(t)) {
        cancel(&ticket);
    }
    0
}

/// Nix's own hook (or any), asked when nsh declines. It lives across `try`s,
/// like any hook.
struct Fallback {
    child: Child,
    stdin: ChildStdin,
    output: BufReader<File>,
}

/// Hands the `try` to the fallback hook (started on first use, given the
/// settings); forwards its reply. `Ok(true)` when it accepted: the caller
/// then relays.
fn ask_fallback(
    slot: &mut Option<Fallback>,
    argv: &[String],
    verbosity: Verbosity,
    settings: &Settings,
    t: &Try,
    log_fd: Option<&OwnedFd>,
    ui: &Ui,
) -> Result<bool, Failure> {
    if slot.is_none() {
        let (read, write) =
            pipeline::pipe().map_err(|e| Failure::transient(format!("creating a pipe: {e}")))?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .arg((verbosity as u8).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::from(write.try_clone().map_err(|e| {
                Failure::transient(format!("creating a pipe: {e}"))
            })?))
            .stderr(Stdio::from(write));
        if let Some(fd) = log_fd {
            use std::os::fd::AsRawFd;
            let raw = fd.as_raw_fd();
            crate::sys::process::with_fd_as(&mut cmd, raw, 4);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Failure::config(format!("starting {}: {e}", argv[0])))?;
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(&settings.to_bytes())
            .map_err(|e| Failure::transient(format!("writing the settings to {}: {e}", argv[0])))?;
        *slot = Some(Fallback {
            child,
            stdin,
            output: BufReader::new(read),
        });
    }
    let fb = slot.as_mut().expect("started");
    fb.stdin
        .write_all(&t.to_bytes())
        .and_then(|()| fb.stdin.flush())
        .map_err(|e| Failure::transient(format!("writing the try to {}: {e}", argv[0])))?;
    loop {
        let mut line = String::new();
        let n = fb
            .output
            .read_line(&mut line)
            .map_err(|e| Failure::transient(format!("reading {}'s reply: {e}", argv[0])))?;
        if n == 0 {
            return Err(Failure::transient(format!(
                "{} exited without replying",
                argv[0]
            )));
        }
        match Reply::parse(&line) {
            Some(ReplyWord::Accept) => {
                let mut machine = String::new();
                fb.output
                    .read_line(&mut machine)
                    .map_err(|e| Failure::transient(format!("reading {}'s reply: {e}", argv[0])))?;
                ui.reply(&Reply::Accept {
                    machine: machine.trim_end_matches('\n').to_string(),
                });
                return Ok(true);
            }
            Some(ReplyWord::Decline) => ui.reply(&Reply::Decline),
            Some(ReplyWord::Postpone) => ui.reply(&Reply::Postpone),
            Some(ReplyWord::DeclinePermanently) => {
                // Permanent for the fallback only: nsh may still take later ones.
                ui.reply(&Reply::Decline);
                *slot = None;
            }
            None => {
                // `@nix` lines and plain text: what the daemon would have seen.
                ui.write(line.as_bytes());
                continue;
            }
        }
        return Ok(false);
    }
}

/// After the fallback accepted: the daemon's bytes to it, its output to the
/// daemon, until it exits; its exit status is the hook's.
fn relay_fallback(fb: Fallback, mut input: BufReader<File>) -> i32 {
    let Fallback {
        mut child,
        mut stdin,
        mut output,
    } = fb;
    std::thread::spawn(move || {
        let _ = stdin.write_all(input.buffer());
        let consumed = input.buffer().len();
        input.consume(consumed);
        let _ = io::copy(input.get_mut(), &mut stdin);
    });
    let mut err = io::stderr();
    let _ = err.write_all(output.buffer());
    let consumed = output.buffer().len();
    output.consume(consumed);
    let _ = io::copy(output.get_mut(), &mut err);
    match child.wait() {
        Ok(status) => status.code().unwrap_or(EXIT_MISC),
        Err(_) => EXIT_MISC,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ticket::TicketError;

    fn settings() -> Settings {
        let bytes: &[u8] = include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/hook/nix-2.8-accept.bin"
        ));
        Settings::read(&mut &bytes[..]).unwrap()
    }

    fn the_try() -> Try {
        Try {
            am_willing: true,
            needed_system: "x86_64-linux".into(),
            drv_path: "/nix/store/1cj0fhkr5qn18x1zz61vdjrb58cfnzp5-nsh-hook-top.drv".into(),
            required_features: vec!["big-parallel".into()],
        }
    }

    #[test]
    fn the_initial_ticket() {
        let accepted = Accepted {
            inputs: vec!["/nix/store/vh2m0g9jsj81vrkr4m2sq2jz375ykp01-nsh-hook-dep".into()],
            wanted_outputs: vec!["doc".into(), "out".into()],
        };
        insta::assert_snapshot!(initial_ticket(&settings(), &the_try(), &accepted).to_line());
    }

    fn outcome(final_line: Option<&str>, statuses: &[i32]) -> Outcome {
        Outcome {
            final_ticket: final_line.map(|l| Ticket::from_line(l).unwrap()),
            statuses: statuses
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("stage{i}"), Some(*s)))
                .collect(),
            ..Outcome::default()
        }
    }

    const GOOD: &str = r#"{"v":1,"drv":{"path":"/nix/store/a-x.drv","name":"x","system":"s","outputs":{"out":"/nix/store/b-x","doc":"/nix/store/c-x-doc"},"wanted":["out"]},"store":{"dir":"/nix/store","uri":"daemon"}}"#;

    #[test]
    fn verdicts() {
        let valid = |paths: &[String], uri: &str| {
            assert_eq!(paths, ["/nix/store/b-x"]);
            assert_eq!(uri, "daemon");
            Ok(true)
        };
        assert_eq!(verdict(&outcome(Some(GOOD), &[0, 0]), valid), (0, None));
        let (code, msg) = verdict(&outcome(Some(GOOD), &[0, 0]), |_, _| Ok(false));
        assert_eq!(code, 1);
        assert!(msg.unwrap().contains("/nix/store/b-x"));
        let (code, msg) = verdict(&outcome(None, &[0, 75]), |_, _| unreachable!());
        assert_eq!(code, 1);
        assert_eq!(
            msg.unwrap(),
            "the pipeline wrote no final ticket (stage1 exited with status 75)"
        );
        let (code, _) = verdict(&outcome(Some(GOOD), &[0, 3]), |_, _| unreachable!());
        assert_eq!(code, 1);
        for (kind, want) in [
            (Kind::Permanent, 100),
            (Kind::TimedOut, 101),
            (Kind::Transient, 1),
            (Kind::Config, 1),
        ] {
            let mut ticket = Ticket::from_line(GOOD).unwrap();
            ticket.error = Some(TicketError {
                stage: "run".into(),
                kind,
                message: "builder failed".into(),
            });
            let o = Outcome {
                final_ticket: Some(ticket),
                ..Outcome::default()
            };
            let (code, msg) = verdict(&o, |_, _| unreachable!());
            assert_eq!(code, want, "{kind}");
            assert_eq!(msg.unwrap(), format!("run failed ({kind}): builder failed"));
        }
        let missing = GOOD.replace(r#""wanted":["out"]"#, r#""wanted":["out","dev"]"#);
        let (code, msg) = verdict(&outcome(Some(&missing), &[0]), |_, _| unreachable!());
        assert_eq!(code, 1);
        assert!(msg.unwrap().contains("`dev`"));
    }
}
