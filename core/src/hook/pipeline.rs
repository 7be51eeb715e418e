//! Running the build pipeline for `nsh-hook`: the nsh-* tools connected
//! through the hook (so it sees every intermediate ticket), or one configured
//! pipeline command (a site's script) that reads the first ticket and writes
//! the final one.
//!
//! Descriptors: every child gets pipes for stdin, stdout and stderr, never
//! the hook's own fds 1 and 2 (the daemon waits for EOF on those, and a
//! long-lived grandchild such as an ssh ControlMaster must not hold them).
//! The build log (the daemon's fd 4) is handed, as fd 4 with
//! `NSH_LOG_FD=4`, to `nsh-run` (or the pipeline command) only.

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error::{Failure, Kind, ResultExt};
use crate::lines::{BoundedLines, MAX_LOG_LINE, MAX_TICKET_LINE};
use crate::ticket::Ticket;

/// The default pipeline, in order.
pub const TOOLS: [&str; 5] = [
    "nsh-closure",
    "nsh-alloc",
    "nsh-push",
    "nsh-run",
    "nsh-fetch",
];
/// The tool that writes the build log.
pub const LOG_WRITER: &str = "nsh-run";
/// The tool that submits the Slurm job and waits in the queue.
pub const QUEUE_WAITER: &str = "nsh-alloc";
/// The fd number the log writer gets, as in Nix's hook protocol.
pub const LOG_FD: i32 = 4;

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stages {
    /// The nsh-* tools (absolute paths, in [`TOOLS`] order).
    Tools(Vec<PathBuf>),
    /// A pipeline command (argv): ticket in on stdin, final ticket out on stdout.
    Command(Vec<String>),
}

impl Stages {
    /// The nsh-* tools in `dir`; a bad-config failure naming the first missing one.
    pub fn tools_in(dir: &Path) -> Result<Stages, Failure> {
        let mut paths = Vec::new();
        for tool in TOOLS {
            let path = dir.join(tool);
            if !path.is_file() {
                return Err(Failure::config(format!(
                    "{} not found (the nsh tools are expected next to nsh-hook, or set hook.pipeline)",
                    path.display()
                )));
            }
            paths.push(path);
        }
        Ok(Stages::Tools(paths))
    }

    fn commands(&self) -> Vec<(String, Command, bool)> {
        match self {
            Stages::Tools(paths) => paths
                .iter()
                .map(|p| {
                    let name = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let gets_log = name == LOG_WRITER;
                    (name, Command::new(p), gets_log)
                })
                .collect(),
            Stages::Command(argv) => {
                let program = argv.first().cloned().unwrap_or_default();
                let mut cmd = Command::new(&program);
                cmd.args(argv.iter().skip(1));
                vec![(program, cmd, true)]
            }
        }
    }
}

/// What the pipeline reports while it runs.
pub enum Event {
    /// Stage `stage` (its program name) wrote this ticket.
    Ticket { stage: String, ticket: Box<Ticket> },
    /// A line a stage wrote to stderr.
    Stderr(String),
    /// The hook got a signal. Every ticket written before it has been
    /// seen; the stages are stopped next. (Nix 2.35 sends the hook's group
    /// SIGTERM and SIGKILL 500 ms later: what must outlive the hook, the
    /// job's cancel, is started here.)
    Interrupted,
}

/// How the pipeline ended.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The last ticket the last stage wrote.
    pub final_ticket: Option<Ticket>,
    /// The latest ticket with an `alloc` section, from any stage.
    pub latest_alloc: Option<Ticket>,
    /// Each stage's exit status (`None`: killed by a signal or not reaped).
    pub statuses: Vec<(String, Option<i32>)>,
    /// The signal that interrupted the hook, if one did.
    pub interrupted_by: Option<i32>,
}

/// SIGTERM, SIGINT and SIGHUP set a flag the pipeline loop polls.
pub fn install_signal_handlers() {
    crate::sys::signals::catch_interrupts(crate::sys::signals::Syscalls::Interrupt);
}

/// The signal received so far, if any.
pub fn signalled() -> Option<i32> {
    crate::sys::signals::signalled()
}

/// How many lines (tickets, stderr) may wait for the hook's loop.
const MESSAGES_QUEUED: usize = 1024;

/// How long the children get between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_millis(700);
/// How long to wait for the last stage's stdout to close after every stage
/// exited (a grandchild may hold it).
const EOF_GRACE: Duration = Duration::from_millis(500);

/// Runs the pipeline on `ticket`. `env` is set for every stage; `log_fd`
/// becomes fd 4 of the log writer. `observe` sees every event, on this thread.
pub fn run(
    stages: &Stages,
    ticket: &Ticket,
    env: &[(&str, String)],
    log_fd: Option<BorrowedFd<'_>>,
    mut observe: impl FnMut(&Event),
) -> Result<Outcome, Failure> {
    // Bounded: a flood of stderr lines waits for the loop that shows them.
    let (tx, rx) = mpsc::sync_channel::<Message>(MESSAGES_QUEUED);
    let (err_read, err_write) =
        pipe().or_fail(Kind::Transient, || "creating a pipe for the stages' stderr")?;
    let mut children = spawn_all(stages, env, log_fd, &err_write)?;
    drop(err_write);
    relay_stderr(err_read, tx.clone());
    let first_stdin = connect(&mut children, &tx)?;
    drop(tx);
    if let Some(mut w) = first_stdin {
        // One small line into an empty pipe: this does not block.
        let _ = writeln!(w, "{}", ticket.to_line());
    }
    Ok(watch(&mut children, &rx, &mut observe))
}

/// Starts every stage, its stderr to `err_write`; on a failure, stops the
/// ones started.
fn spawn_all(
    stages: &Stages,
    env: &[(&str, String)],
    log_fd: Option<BorrowedFd<'_>>,
    err_write: &File,
) -> Result<Vec<(String, Child)>, Failure> {
    let mut children: Vec<(String, Child)> = Vec::new();
    for (name, mut cmd, gets_log) in stages.commands() {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(match err_write.try_clone() {
                Ok(w) => Stdio::from(w),
                Err(_) => Stdio::null(),
            });
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.env_remove("NSH_LOG_FD");
        if let (true, Some(fd)) = (gets_log, log_fd) {
            cmd.env("NSH_LOG_FD", LOG_FD.to_string());
            crate::sys::process::with_fd_as(&mut cmd, fd.as_raw_fd(), LOG_FD);
        }
        if name == QUEUE_WAITER || matches!(stages, Stages::Command(_)) {
            outlive_the_group_kill(&mut cmd);
        }
        match cmd.spawn() {
            Ok(child) => children.push((name, child)),
            Err(e) => {
                stop(&mut children);
                return Err(Failure::config(format!("starting {name}: {e}")));
            }
        }
    }
    Ok(children)
}

/// stderr of every stage → events (not joined: a grandchild may keep it
/// open).
///
/// Lines are cut at [`MAX_LOG_LINE`] and decoded lossily: a node's
/// `nix-store` writes to a stage's stderr, and a line that is endless or not
/// UTF-8 must neither grow the hook nor stop the relay (the stages would
/// then die of SIGPIPE).
fn relay_stderr(err_read: File, tx: mpsc::SyncSender<Message>) {
    std::thread::spawn(move || {
        for line in BoundedLines::new(BufReader::new(err_read), MAX_LOG_LINE) {
            let Ok(line) = line else { break };
            if tx.send(Message::Stderr(line.lossy())).is_err() {
                break;
            }
        }
    });
}

/// Stage i's stdout → (the hook sees it) → stage i+1's stdin, one thread
/// per stage; returns the first stage's stdin.
fn connect(
    children: &mut [(String, Child)],
    tx: &mpsc::SyncSender<Message>,
) -> Result<Option<ChildStdin>, Failure> {
    let count = children.len();
    let mut stdins: Vec<_> = children.iter_mut().map(|(_, c)| c.stdin.take()).collect();
    let first_stdin = stdins.first_mut().and_then(Option::take);
    for (i, (name, child)) in children.iter_mut().enumerate() {
        let stdout = crate::sys::process::stdout_of(child)
            .or_fail(Kind::Transient, || format!("connecting {name}"))?;
        let next = stdins.get_mut(i + 1).and_then(Option::take);
        let name = name.clone();
        let last = i + 1 == count;
        let tx = tx.clone();
        std::thread::spawn(move || forward(stdout, next, &name, last, &tx));
    }
    Ok(first_stdin)
}

/// One stage's tickets: each to the hook, then to the next stage.
fn forward(
    stdout: ChildStdout,
    mut next: Option<ChildStdin>,
    name: &str,
    last: bool,
    tx: &mpsc::SyncSender<Message>,
) {
    for line in BoundedLines::new(BufReader::new(stdout), MAX_TICKET_LINE) {
        let Ok(line) = line else { break };
        // A cut line is no ticket; the next stage (or the verdict) says so.
        let line = String::from_utf8_lossy(&line.bytes).into_owned();
        // Seen by the hook before the next stage gets it: a signal
        // arriving meanwhile still finds the latest `alloc`.
        let _ = tx.send(Message::Line {
            stage: name.to_string(),
            last,
            line: line.clone(),
        });
        if let Some(w) = next.as_mut() {
            if writeln!(w, "{line}").and_then(|()| w.flush()).is_err() {
                // The next stage is gone; keep draining this one.
                next = None;
            }
        }
    }
    drop(next);
    let _ = tx.send(Message::Eof { last });
}

/// Until every stage exited and the last one's stdout ended (or a grace
/// period passed), or a signal came: events to `observe`; the outcome.
fn watch(
    children: &mut [(String, Child)],
    rx: &mpsc::Receiver<Message>,
    observe: &mut impl FnMut(&Event),
) -> Outcome {
    let mut outcome = Outcome::default();
    let mut last_eof = false;
    let mut all_exited_at: Option<Instant> = None;
    let mut statuses: Vec<Option<Option<i32>>> = vec![None; children.len()];
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(message) => handle(message, &mut outcome, &mut last_eof, observe),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => last_eof = true,
        }
        if let Some(signal) = signalled() {
            outcome.interrupted_by = Some(signal);
            while let Ok(message) = rx.try_recv() {
                handle(message, &mut outcome, &mut last_eof, observe);
            }
            observe(&Event::Interrupted);
            stop(children);
            break;
        }
        for ((_, child), status) in children.iter_mut().zip(statuses.iter_mut()) {
            if status.is_none() {
                if let Ok(Some(exited)) = child.try_wait() {
                    *status = Some(exited.code());
                }
            }
        }
        if statuses.iter().all(Option::is_some) {
            let since = *all_exited_at.get_or_insert_with(Instant::now);
            if last_eof || since.elapsed() > EOF_GRACE {
                break;
            }
        }
    }
    while let Ok(message) = rx.try_recv() {
        handle(message, &mut outcome, &mut last_eof, observe);
    }
    outcome.statuses = children
        .iter()
        .zip(statuses)
        .map(|((name, _), s)| (name.clone(), s.flatten()))
        .collect();
    outcome
}

enum Message {
    Line {
        stage: String,
        last: bool,
        line: String,
    },
    Eof {
        last: bool,
    },
    Stderr(String),
}

fn handle(
    message: Message,
    outcome: &mut Outcome,
    last_eof: &mut bool,
    observe: &mut impl FnMut(&Event),
) {
    match message {
        Message::Line { stage, last, line } => {
            if line.trim().is_empty() {
                return;
            }
            match Ticket::from_line(&line) {
                Ok(ticket) => {
                    if ticket.alloc.is_some() {
                        outcome.latest_alloc = Some(ticket.clone());
                    }
                    if last {
                        outcome.final_ticket = Some(ticket.clone());
                    }
                    observe(&Event::Ticket {
                        stage,
                        ticket: Box::new(ticket),
                    });
                }
                Err(e) => observe(&Event::Stderr(format!(
                    "{stage}: error: wrote a line that is not a ticket: {e}"
                ))),
            }
        }
        Message::Eof { last } => *last_eof |= last,
        Message::Stderr(line) => observe(&Event::Stderr(line)),
    }
}

/// A pipe, both ends close-on-exec (`std::io::pipe` needs Rust 1.87).
pub fn pipe() -> std::io::Result<(File, File)> {
    crate::sys::fds::pipe()
}

/// SIGTERM to every child still running, SIGKILL after a grace period.
pub fn stop(children: &mut [(String, Child)]) {
    for (_, child) in children.iter_mut() {
        if let Ok(None) = child.try_wait() {
            crate::sys::process::terminate(child);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    for (_, child) in children.iter_mut() {
        loop {
            match child.try_wait() {
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                _ => break,
            }
        }
    }
}

/// The daemon ends a build it no longer wants (another one failed, the user
/// pressed ^C) with SIGKILL to the hook's process group. The watchdog learns
/// of a Slurm job only from nsh-alloc's ticket, so a job nsh-alloc has
/// submitted but is still waiting for would be left to its request timeout
/// (minutes, holding a node's CPUs). So nsh-alloc gets a process group of its
/// own, which that SIGKILL misses, and SIGTERM when the hook is gone, on
/// which it cancels its job and exits. (The parent-death signal follows the
/// spawning thread: `run` is called on the hook's main thread.)
///
/// A pipeline command is started the same way, for the same reason: the
/// hook cannot see its job, so the command must outlive the group kill to
/// cancel it, which it does on the SIGTERM (`hook.sh.example` stops its
/// running stage, nsh-alloc cancelling a job it waits for, and ends the
/// job's use with `nsh-alloc --cancel`).
fn outlive_the_group_kill(cmd: &mut Command) {
    crate::sys::process::in_own_group_terminated_with_parent(cmd);
}

/// Runs `program args…` with `input` on stdin and no output, for at most
/// `limit`; its exit status, or a failure.
pub fn run_bounded(
    program: &Path,
    args: &[&str],
    input: &str,
    limit: Duration,
) -> Result<i32, Failure> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .or_fail(Kind::Config, || format!("starting {}", program.display()))?;
    if let Some(mut w) = child.stdin.take() {
        let _ = writeln!(w, "{input}");
    }
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status.code().unwrap_or(-1)),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Failure::timed_out(format!(
                    "{} did not finish within {:?}",
                    program.display(),
                    limit
                )));
            }
        }
    }
}
