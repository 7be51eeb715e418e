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

mod build;
mod failures;
mod fallback;
pub mod health;
pub mod retry;
use fallback::{Answer, Fallback};
mod watchdog;
use watchdog::watchdog_main;

#[cfg(test)]
use build::{initial_ticket, verdict};

use std::fs::File;
use std::io::{self, BufReader};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::Failure;
use crate::hook::check::probe;
use crate::hook::config::HookConfig;
use crate::hook::decision::{decide, ClusterCaps, Decision, LocalCaps};
use crate::hook::pipeline::Stages;
use crate::hook::protocol::{
    Accepted, ActivityType, Field, LogLine, NixDefaults, Reply, Request, Settings, Try, Verbosity,
};
use crate::hook::slots::{LockTable, Slot, SlotDir};

/// Nix's exit statuses for a hook (≤ 2.28 and Lix distinguish these).
pub const EXIT_PERMANENT: i32 = 100;
pub const EXIT_TIMED_OUT: i32 = 101;
pub const EXIT_MISC: i32 = 1;

/// How long the hook itself waits for `nsh-alloc --cancel` after a signal
/// when it has no watchdog to do it.
const CANCEL_IN_HOOK: Duration = Duration::from_secs(1);
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
        let base = u64::from(std::process::id()) << 32;
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
pub fn main(argv: &[String]) -> i32 {
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
    // Without the pipeline nsh builds nothing, but a fallback hook still may.
    let setup: Setup = HookConfig::load().map(|config| {
        let stages = match &config.pipeline {
            Some(argv) => Ok(Stages::Command(argv.clone())),
            None => own_dir().and_then(|dir| Stages::tools_in(&dir)),
        };
        (config, stages)
    });
    if let Ok((config, _)) = &setup {
        // Which file, and why that one: the daemon's environment, not the
        // caller's, decides (docs/admin-guide.md).
        ui.msg(
            Verbosity::Talkative,
            format!(
                "nsh-hook: configuration {} (from {})",
                config.path.display(),
                config.source
            ),
        );
    }
    let mut session = Session {
        verbosity,
        local: LocalCaps::from_settings(&settings, &NixDefaults::of_this_machine()),
        ui,
        settings,
        log_fd,
        fallback: None,
        reported_setup_error: false,
    };
    loop {
        let t = match Request::read(&mut input) {
            Ok(Request::Eof) => return 0,
            Ok(Request::Try(t)) => t,
            Err(e) => {
                session.ui.msg(Verbosity::Error, format!("nsh-hook: {e}"));
                return EXIT_MISC;
            }
        };
        match session.answer(&t, &setup, &mut input) {
            Next::Try => {}
            Next::Exit(code) => return code,
            Next::Relay(fallback) => return fallback.relay(input),
        }
    }
}

/// The configuration and, when it loaded, the stages it makes (or why
/// there are none).
type Setup = Result<(HookConfig, Result<Stages, Failure>), Failure>;

/// One hook process: what the daemon said first, and what is kept between
/// `try`s.
struct Session {
    verbosity: Verbosity,
    ui: Ui,
    settings: Settings,
    local: LocalCaps,
    log_fd: Option<OwnedFd>,
    fallback: Option<Fallback>,
    /// A broken setup is reported once, not at every `try`.
    reported_setup_error: bool,
}

/// What comes after a `try` was answered.
enum Next {
    /// The next `try`.
    Try,
    /// The hook is done, with this status.
    Exit(i32),
    /// The fallback accepted: the rest of the conversation is its.
    Relay(Fallback),
}

impl Session {
    fn answer(&mut self, t: &Try, setup: &Setup, input: &mut BufReader<File>) -> Next {
        // `nsh-hook --check` asking whether the daemon's hook is nsh:
        // answered before anything else, a broken configuration included.
        if let Some(nonce) = probe::probe_nonce(t) {
            answer_probe(
                &nonce,
                &self.settings,
                setup.as_ref().map(|(c, _)| c),
                &self.ui,
            );
            self.ui.reply(&Reply::Decline);
            return Next::Try;
        }
        let (config, stages) = match setup {
            Ok((config, stages)) => (config, stages),
            Err(failure) => {
                self.report_once(format!("nsh-hook: {failure}; building without nsh"));
                self.ui.reply(&Reply::DeclinePermanently);
                return Next::Try;
            }
        };
        let stages = match stages {
            Ok(stages) => stages,
            Err(failure) => {
                self.report_once(format!("nsh-hook: {failure}"));
                return self.decline(config, t, false);
            }
        };
        let slots = SlotDir::new(&config.slots_dir);
        let (clusters, unreachable) = self.usable_clusters(config, stages, t);
        let decision = decide_and_lock_with(&clusters, unreachable, &self.local, t, &slots)
            .unwrap_or_else(|e| {
                self.ui.msg(Verbosity::Error, format!("nsh-hook: {e}"));
                Locked::Decline
            });
        match decision {
            Locked::Accepted(cluster, slot) => {
                let code = self.accept(config, stages, cluster, t, input);
                drop(slot);
                Next::Exit(code)
            }
            Locked::Postpone => {
                self.ui.reply(&Reply::Postpone);
                Next::Try
            }
            Locked::Decline => self.decline(config, t, true),
        }
    }

    /// The clusters that fit `t` and are not set aside ([`health`]), and
    /// for each whether its Slurm does not answer now (it is then counted
    /// full: the `try` is postponed, or built locally, rather than accepted
    /// and failed). Only the nsh tools' clusters are checked: a pipeline
    /// command of the site's own does with them what it does.
    fn usable_clusters(
        &self,
        config: &HookConfig,
        stages: &Stages,
        t: &Try,
    ) -> (Vec<ClusterCaps>, Vec<bool>) {
        let health = health::Health::new(&config.slots_dir, &config.path);
        let fitting = config
            .clusters
            .iter()
            .filter(|c| c.fits(&t.needed_system, &t.required_features));
        let mut unreachable = Vec::new();
        let usable = fitting
            .filter(|caps| {
                let cluster = match stages {
                    Stages::Tools(_) => config.config.clusters.get(&caps.name),
                    Stages::Command(_) => None,
                };
                let waits = |why: String| {
                    self.ui.msg(
                        Verbosity::Info,
                        format!(
                            "nsh-hook: cluster {}: Slurm does not answer now ({why}); the build waits",
                            caps.name
                        ),
                    );
                    true
                };
                // First the quick check, so that a Slurm that hangs costs
                // `connect_timeout`, not the pre-flight check's deadlines.
                if let Err(why) = cluster.map_or(Ok(()), |c| health.reachable(c)) {
                    unreachable.push(waits(why));
                    return true;
                }
                let verdict = match cluster {
                    Some(cluster) => health.verdict(cluster),
                    None => health.known(&caps.name).unwrap_or(health::Verdict::Usable),
                };
                match verdict {
                    health::Verdict::Usable => {
                        unreachable.push(false);
                        true
                    }
                    // slurmrestd answered its ping, but the pre-flight check
                    // could not finish: from 23.02 on slurmrestd answers the
                    // ping with slurmctld down (seen on 24.11 and 26.05), and
                    // the check's first query to slurmctld then fails.
                    health::Verdict::Unchecked(why) => {
                        unreachable.push(waits(why));
                        true
                    }
                    health::Verdict::Broken(reason) => {
                        self.ui.msg(
                            Verbosity::Error,
                            format!(
                                "nsh-hook: cluster {} set aside (its configuration is refused; builds go elsewhere for up to {} minutes, or until {} changes): {reason}",
                                caps.name,
                                health::VERDICT_FOR.as_secs() / 60,
                                config.path.display()
                            ),
                        );
                        false
                    }
                }
            })
            .cloned()
            .collect();
        (usable, unreachable)
    }

    fn report_once(&mut self, message: String) {
        if !self.reported_setup_error {
            self.ui.msg(Verbosity::Error, message);
            self.reported_setup_error = true;
        }
    }

    /// `# accept`, the inputs and outputs, then the build; its status.
    fn accept(
        &mut self,
        config: &HookConfig,
        stages: &Stages,
        cluster: &ClusterCaps,
        t: &Try,
        input: &mut BufReader<File>,
    ) -> i32 {
        self.ui.reply(&Reply::Accept {
            machine: format!("slurm://{}", cluster.name),
        });
        let accepted = match Accepted::read(input) {
            Ok(a) => a,
            Err(e) => {
                self.ui.msg(Verbosity::Error, format!("nsh-hook: {e}"));
                return EXIT_MISC;
            }
        };
        self.fallback = None;
        build::Build {
            config,
            stages,
            cluster,
            settings: &self.settings,
            t,
            accepted: &accepted,
            log_fd: self.log_fd.as_ref(),
            ui: &self.ui,
        }
        .run()
    }

    /// nsh does not take this `try`: the fallback hook may; without one,
    /// a hook that cannot build at all declines for good.
    fn decline(&mut self, config: &HookConfig, t: &Try, can_build: bool) -> Next {
        let Some(argv) = &config.fallback else {
            self.ui.reply(if can_build {
                &Reply::Decline
            } else {
                &Reply::DeclinePermanently
            });
            return Next::Try;
        };
        let started = match self.fallback.take() {
            Some(fallback) => Ok(fallback),
            None => Fallback::start(argv, self.verbosity, &self.settings, self.log_fd.as_ref()),
        };
        let asked = started.and_then(|mut fallback| Ok((fallback.ask(t, &self.ui)?, fallback)));
        match asked {
            Ok((Answer::Accepted, fallback)) => Next::Relay(fallback),
            Ok((Answer::Answered, fallback)) => {
                self.fallback = Some(fallback);
                Next::Try
            }
            Ok((Answer::Gone, _)) => Next::Try,
            Err(failure) => {
                self.ui.msg(
                    Verbosity::Error,
                    format!("nsh-hook: fallback hook: {failure}"),
                );
                self.ui.reply(&Reply::Decline);
                Next::Try
            }
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
    /// Fitting clusters are full and the daemon cannot build it now: ask again later.
    Postpone,
    /// Not for this hook: the daemon builds it elsewhere.
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
    decide_and_lock_with(clusters, vec![false; clusters.len()], local, t, slots)
}

/// [`decide_and_lock`], with the clusters whose Slurm does not answer now
/// (`unreachable[i]`) counted full.
fn decide_and_lock_with<'c>(
    clusters: &'c [ClusterCaps],
    unreachable: Vec<bool>,
    local: &LocalCaps,
    t: &Try,
    slots: &SlotDir,
) -> Result<Locked<'c>, Failure> {
    let fitting = clusters
        .iter()
        .filter(|c| c.fits(&t.needed_system, &t.required_features))
        .count();
    let mut full = unreachable;
    full.resize(clusters.len(), false);
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

#[cfg(test)]
mod tests {
    use super::pipeline::Outcome;
    use super::*;
    use crate::error::Kind;
    use crate::ticket::Ticket;
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
            drv_path: crate::nix::store_path::test_path(
                "/nix/store/1cj0fhkr5qn18x1zz61vdjrb58cfnzp5-nsh-hook-top.drv",
            ),
            required_features: vec!["big-parallel".into()],
        }
    }

    #[test]
    fn a_cluster_whose_slurm_does_not_answer_counts_as_full() {
        let dir = tempfile::tempdir().unwrap();
        let slots = SlotDir::new(dir.path());
        let caps = |name: &str| ClusterCaps {
            name: name.into(),
            systems: vec!["x86_64-linux".into()],
            supported_features: vec!["big-parallel".into()],
            max_jobs: 2,
            ..ClusterCaps::default()
        };
        let clusters = [caps("a"), caps("b")];
        let local = LocalCaps::default();
        let mut t = the_try();
        t.am_willing = false;
        // The one that answers takes it.
        let locked = decide_and_lock_with(&clusters, vec![true, false], &local, &t, &slots);
        assert!(matches!(locked, Ok(Locked::Accepted(c, _)) if c.name == "b"));
        // None answers: the daemon cannot build it, so it waits …
        let locked = decide_and_lock_with(&clusters, vec![true, true], &local, &t, &slots);
        assert!(matches!(locked, Ok(Locked::Postpone)));
        // … unless it can build it itself.
        let local = LocalCaps {
            systems: vec!["x86_64-linux".into()],
            features: vec!["big-parallel".into()],
        };
        t.am_willing = true;
        let locked = decide_and_lock_with(&clusters[..1], vec![true], &local, &t, &slots);
        assert!(matches!(locked, Ok(Locked::Decline)));
    }

    #[test]
    fn the_initial_ticket() {
        let accepted = Accepted {
            inputs: vec!["/nix/store/vh2m0g9jsj81vrkr4m2sq2jz375ykp01-nsh-hook-dep".into()],
            wanted_outputs: vec!["doc".into(), "out".into()],
        };
        let config = (
            Path::new("/etc/nsh/nsh.toml"),
            crate::config::ConfigSource::Env,
        );
        insta::assert_snapshot!(
            initial_ticket(&settings(), &the_try(), &accepted, config).to_line()
        );
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

    const GOOD: &str = r#"{"v":1,"drv":{"path":"/nix/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-x.drv","name":"x","system":"s","outputs":{"out":"/nix/store/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-x","doc":"/nix/store/2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c-x-doc"},"wanted":["out"]},"store":{"dir":"/nix/store","uri":"daemon"}}"#;

    #[test]
    fn verdicts() {
        let valid = |paths: &[crate::nix::store_path::StorePath], uri: &str| {
            assert_eq!(paths, ["/nix/store/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-x"]);
            assert_eq!(uri, "daemon");
            Ok(true)
        };
        assert_eq!(verdict(&outcome(Some(GOOD), &[0, 0]), valid), (0, None));
        let (code, msg) = verdict(&outcome(Some(GOOD), &[0, 0]), |_, _| Ok(false));
        assert_eq!(code, 1);
        assert!(msg
            .unwrap()
            .contains("/nix/store/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-x"));
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
