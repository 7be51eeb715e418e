//! Following one request on the node: the remote loop that writes the
//! request and streams the log and the response, its ssh process, and the
//! state kept while following (reconnects, the job watch).

use std::io::{self, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::error::{Failure, ResultExt};
use crate::slurm::{JobInfo, Slurm};
use crate::stage::ssh::Ssh;
use crate::sys::process::{stderr_of, stdin_of, stdout_of};
use crate::ticket::AllocSection;
use crate::{log_debug, log_info, log_warn, Kind};

use super::{job_gone, Job, LogEvent, LogSink, LogSplitter, Watch, FOLLOW_RECONNECTS};

/// The remote side of a build: `sh -c FOLLOW_SCRIPT sh W N OFFSET`, with the
/// request on stdin.
///
/// It waits (at most 30 s) for the work dir, which the job makes as it
/// starts; writes the request atomically unless a previous attempt already
/// did, and rings the job's doorbell (`W/wake`); then copies the bytes of
/// `log.N` from OFFSET on to stdout as they are written, polling every 20 ms
/// ten times, then every tenth of a second. Once `status.N` exists
/// (the job writes it after the sentinel line) it copies the rest of the log
/// and then `response.N`, and exits 0. Exit 3: the work dir is gone (the job
/// ended); 4: the request could not be written; 5: stdout was closed; 6:
/// `work_root` or the work dir is not the ssh user's own (a symlink, or
/// another user's), so it is not used.
///
/// `status.N` is looked at *before* the log is read, so the final read
/// always includes the sentinel. Writes to the log file never wait for this
/// reader: a builder is never slowed down by a slow connection.
pub const FOLLOW_SCRIPT: &str = r#"set -u
W=$1 n=$2 off=$3
log="$W/log.$n"
R=${W%/*}
if [ -L "$R" ]; then
    cat >/dev/null
    echo "work_root $R is a symbolic link" >&2
    exit 6
fi
if [ -d "$R" ]; then
    mode=$(stat -c %A "$R")
    case $mode in
        *[tT]) alone=1 ;;
        ?????w????|????????w?) alone=0 ;;
        *) alone=1 ;;
    esac
    if ! { [ -O "$R" ] && [ "$alone" = 1 ]; } &&
        ! { [ "$(stat -c %u "$R")" = 0 ] && [ -k "$R" ]; }; then
        cat >/dev/null
        echo "work_root $R ($mode) is owned by $(stat -c '%U (uid %u)' "$R"), not by $(id -un) (uid $(id -u)) alone nor by root with the sticky bit" >&2
        exit 6
    fi
fi
tries=0
while [ ! -d "$W" ]; do
    if [ "$tries" -ge 300 ]; then
        cat >/dev/null
        echo "no work dir $W on this node" >&2
        exit 3
    fi
    sleep 0.1
    tries=$((tries + 1))
done
if [ -L "$W" ] || [ ! -O "$W" ]; then
    cat >/dev/null
    echo "the work dir $W is not $(id -un)'s own directory (a symbolic link, or owned by $(stat -c '%U (uid %u)' "$W"))" >&2
    exit 6
fi
if [ -e "$W/request.$n" ] || [ -e "$log" ]; then
    cat >/dev/null
else
    cat >"$W/request.$n.tmp" && mv "$W/request.$n.tmp" "$W/request.$n" || exit 4
    if [ -p "$W/wake" ]; then
        { printf 'request %s\n' "$n" >&3; } 2>/dev/null 3<>"$W/wake"
    fi
fi
looks=0
while :; do
    if [ -e "$W/status.$n" ]; then ended=1; else ended=0; fi
    if [ -f "$log" ]; then
        size=$(wc -c <"$log") || exit 3
        if [ "$size" -gt "$off" ]; then
            tail -c "+$((off + 1))" "$log" | head -c "$((size - off))" || exit 5
            off=$size
        fi
    fi
    if [ "$ended" = 1 ]; then
        cat "$W/response.$n" || exit 3
        exit 0
    fi
    [ -d "$W" ] || exit 3
    # Quick looks first: most builds a pooled job serves end within a
    # fraction of a second, and each look later costs that build its wait.
    if [ "$looks" -lt 10 ]; then
        looks=$((looks + 1))
        sleep 0.02
    else
        sleep 0.1
    fi
done
"#;

/// How the followed request ended: the serve process's exit status, the
/// response bytes, and the last lines of the log (for messages).
pub(super) struct Ended {
    pub(super) status: i32,
    pub(super) response: Vec<u8>,
    pub(super) last_lines: Vec<String>,
}

/// Writes the request and follows the log to its sentinel, watching the job.
pub(super) fn follow(
    job: &Job,
    request: &[u8],
    log: &mut LogSink,
    watch: &Watch,
) -> Result<Ended, Failure> {
    let mut following = Following {
        job,
        request,
        log,
        watch,
        splitter: LogSplitter::new(&job.alloc.nonce),
        last_lines: Vec::new(),
        next_check: Instant::now() + watch.check_every,
        reconnects: 0,
    };
    match following.until_end() {
        Ok(_) if following.splitter.response_overflowed() => Err(Failure::permanent(format!(
            "the build response from {} is longer than {} bytes: not a BuildResult",
            job.alloc.node,
            super::log::MAX_RESPONSE
        ))),
        Ok(status) => Ok(Ended {
            status,
            response: following.splitter.response().to_vec(),
            last_lines: following.last_lines,
        }),
        Err(failure) => {
            // The log broke off mid-line: that line is still worth showing.
            if let Some(partial) = following.splitter.take_partial() {
                following.log.line(&partial);
            }
            Err(failure)
        }
    }
}

/// The state of following one request's log: where the log is, what was
/// seen of it, when the job is looked at next, how often ssh was lost.
struct Following<'a> {
    job: &'a Job<'a>,
    request: &'a [u8],
    log: &'a mut LogSink,
    watch: &'a Watch<'a>,
    splitter: LogSplitter,
    pub(super) last_lines: Vec<String>,
    next_check: Instant,
    reconnects: u32,
}

impl Following<'_> {
    /// The serve process's exit status once the sentinel and the whole
    /// response are in. A line the stream broke off in stays in the
    /// splitter: a reconnected follower resumes right after its last byte.
    fn until_end(&mut self) -> Result<i32, Failure> {
        loop {
            let follower = Follower::start(
                self.job.ssh,
                self.job.alloc,
                self.splitter.log_bytes(),
                self.request,
            )?;
            self.splitter.reset_response();
            let exit = self.read_to_eof(follower)?;
            if let Some(status) = self.after(exit)? {
                return Ok(status);
            }
        }
    }

    /// Reads until the follower's stream ends, looking at the job now and
    /// then: also while the log streams, since a chatty build on a failed
    /// node must not hide that its job is gone.
    fn read_to_eof(&mut self, follower: Follower) -> Result<FollowExit, Failure> {
        loop {
            if self.watch.interrupted.load(Ordering::SeqCst) {
                follower.stop();
                return Err(Failure::transient(format!(
                    "interrupted; Slurm job {} keeps running until it is cancelled",
                    self.job.alloc.job
                )));
            }
            let wait = self
                .next_check
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200));
            match follower.chunks.recv_timeout(wait) {
                Ok(chunk) => self.forward(&chunk),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(follower.finish()),
            }
            if Instant::now() >= self.next_check {
                self.next_check = Instant::now() + self.watch.check_every;
                if let Some(gone) = self.job_gone_now() {
                    follower.stop();
                    return Err(Failure::transient(gone));
                }
            }
        }
    }

    /// Log lines to the log sink; the sentinel only to the debug log.
    fn forward(&mut self, chunk: &[u8]) {
        for event in self.splitter.push(chunk) {
            match event {
                LogEvent::Line(line) => {
                    remember(&mut self.last_lines, &line);
                    self.log.line(&line);
                }
                LogEvent::End(status) => log_debug!("sentinel: status {status}"),
            }
        }
    }

    /// Why the job can no longer finish the build, if it cannot (a job
    /// Slurm requeued is cancelled). The controller being slow or briefly
    /// away is no reason to give up a build that runs.
    fn job_gone_now(&self) -> Option<String> {
        match self.job.slurm.job(self.job.alloc.job) {
            Ok(info) => {
                let gone = job_gone(self.job.alloc, &info)?;
                cancel_if_requeued(self.job.slurm, &info);
                Some(gone)
            }
            Err(e) => {
                log_warn!("looking at Slurm job {}: {e}", self.job.alloc.job);
                None
            }
        }
    }

    /// What a follower's end means: the status (done), a failure, or `None`
    /// to reconnect.
    fn after(&mut self, exit: FollowExit) -> Result<Option<i32>, Failure> {
        let alloc = self.job.alloc;
        match (exit, self.splitter.end()) {
            (FollowExit::Done, Some(status)) => Ok(Some(status)),
            (FollowExit::Done, None) => Err(Failure::transient(format!(
                "the log of request {} on {} ended without the job's end mark",
                alloc.request, alloc.node
            ))),
            (FollowExit::WorkDirGone, _) => {
                let state = match self.job.slurm.job(alloc.job) {
                    Ok(info) => job_gone(alloc, &info).unwrap_or_else(|| {
                        format!("Slurm job {} on {} is ending", alloc.job, alloc.node)
                    }),
                    Err(e) => format!("Slurm job {}: {e}", alloc.job),
                };
                Err(Failure::transient(format!(
                    "the job's work dir {} on {} is gone: {state}",
                    alloc.work, alloc.node
                )))
            }
            (FollowExit::Unwritable(why), _) => Err(Failure::new(
                Kind::Config,
                format!(
                    "ssh.user: {} cannot write the job's work dir {} on {}, so the job runs as \
                     another account ({why}); log in as the account the jobs run as \
                     ([ssh] user or [cluster.{}.ssh] user; submit_as for a cli cluster)",
                    self.job.ssh.describe(),
                    alloc.work,
                    alloc.node,
                    alloc.cluster
                ),
            )),
            (FollowExit::NotOurs(why), _) => Err(Failure::new(
                Kind::Config,
                format!(
                    "remote.work_root on {}: {why}; refusing to use it (the job refuses it \
                     too): make it the build account's own directory, writable by nobody \
                     else, or root's with the sticky bit",
                    alloc.node
                ),
            )),
            (FollowExit::Failed(why), _) => self.reconnect(&why).map(|()| None),
        }
    }

    /// After ssh was lost: fails when the job is gone or the reconnects are
    /// used up, else waits a moment before the next follower.
    fn reconnect(&mut self, why: &str) -> Result<(), Failure> {
        let alive = match self.job.slurm.job(self.job.alloc.job) {
            Ok(info) => {
                if let Some(gone) = job_gone(self.job.alloc, &info) {
                    cancel_if_requeued(self.job.slurm, &info);
                    return Err(Failure::transient(gone));
                }
                true
            }
            Err(_) => false,
        };
        let node = self.job.ssh.describe();
        if !alive || self.reconnects >= FOLLOW_RECONNECTS {
            return Err(Failure::transient(format!(
                "following the build on {node}: {why}"
            )));
        }
        self.reconnects += 1;
        log_warn!(
            "following the build on {node}: {why}; reconnecting ({}/{FOLLOW_RECONNECTS})",
            self.reconnects
        );
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    }
}

/// A job that failed under the build but is not over (requeued after a
/// node failure, now pending or running elsewhere) would only wait for a
/// request that never comes: cancel it. Best effort.
pub(super) fn cancel_if_requeued(slurm: &Slurm, info: &JobInfo) {
    if info.state.is_finished() {
        return;
    }
    match slurm.cancel(info.id) {
        Ok(()) => log_info!("cancelled job {}, which Slurm requeued", info.id),
        Err(e) => log_warn!("cancelling the requeued job {}: {e}", info.id),
    }
}

/// Keeps the last few lines of log, for error messages.
fn remember(lines: &mut Vec<String>, line: &[u8]) {
    const KEEP: usize = 10;
    if lines.len() == KEEP {
        lines.remove(0);
    }
    lines.push(String::from_utf8_lossy(line).into_owned());
}

pub(super) fn tail_text(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!(":\n{}", lines.join("\n"))
    }
}

/// How the follower process ended.
enum FollowExit {
    /// It sent the log to its end and the response.
    Done,
    /// The work dir vanished: the job ended (scancel, time limit, …).
    WorkDirGone,
    /// The request could not be written: the work dir is not the ssh
    /// user's (permission denied), so the job runs as another account. The
    /// same next time: configuration, not retried.
    Unwritable(String),
    /// `work_root` or the work dir belongs to someone else or is a
    /// symlink: not used; the same next time (configuration, 78).
    NotOurs(String),
    /// ssh failed, or something else went wrong; the job may still run.
    Failed(String),
}

/// How the follower ended, from its exit status and what it said: 3, 4 and
/// 6 are [`FOLLOW_SCRIPT`]'s own.
fn follow_exit(status: std::process::ExitStatus, stderr: &str) -> FollowExit {
    let said = stderr.trim();
    match status.code() {
        Some(0) => FollowExit::Done,
        Some(3) => FollowExit::WorkDirGone,
        Some(6) => FollowExit::NotOurs(said.to_string()),
        Some(4) if said.contains("Permission denied") => FollowExit::Unwritable(said.to_string()),
        Some(4) => FollowExit::Failed(format!(
            "could not write the request into the job's work dir: {said}"
        )),
        _ => FollowExit::Failed(format!("ssh ended with {status}: {said}")),
    }
}

/// The ssh process running [`FOLLOW_SCRIPT`] on the node, and a thread
/// reading its stdout into a channel (so that the job can be looked at
/// while no log comes).
struct Follower {
    child: Child,
    chunks: Receiver<Vec<u8>>,
    stderr: std::thread::JoinHandle<String>,
}

impl Follower {
    fn start(
        ssh: &Ssh,
        alloc: &AllocSection,
        offset: u64,
        request: &[u8],
    ) -> Result<Follower, Failure> {
        let offset = offset.to_string();
        let request_number = alloc.request.to_string();
        let mut cmd: Command = ssh.command(&[
            "sh",
            "-c",
            FOLLOW_SCRIPT,
            "sh",
            &alloc.work,
            &request_number,
            &offset,
        ]);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .or_fail(Kind::Transient, || "running ssh")?;
        // The script reads all of stdin before it writes anything, so
        // writing first and reading after cannot deadlock. A write error
        // (ssh could not connect) shows in its exit status.
        if let Ok(mut stdin) = stdin_of(&mut child) {
            let _ = stdin.write_all(request);
        }
        let stdout = stdout_of(&mut child).or_fail(Kind::Transient, || "running ssh")?;
        // Bounded: a node that sends faster than the log is written waits.
        let (tx, chunks) = mpsc::sync_channel(CHUNKS_QUEUED);
        std::thread::spawn(move || pump(stdout, &tx));
        let mut stderr_pipe = stderr_of(&mut child).or_fail(Kind::Transient, || "running ssh")?;
        let stderr = std::thread::spawn(move || {
            // The first bytes are the message; the rest is read and dropped,
            // so that ssh never blocks on a full pipe.
            let mut kept = Vec::new();
            let _ = (&mut stderr_pipe).take(STDERR_KEPT).read_to_end(&mut kept);
            let _ = io::copy(&mut stderr_pipe, &mut io::sink());
            String::from_utf8_lossy(&kept).into_owned()
        });
        Ok(Follower {
            child,
            chunks,
            stderr,
        })
    }

    /// Waits for the process once its stdout has ended.
    fn finish(mut self) -> FollowExit {
        let status = match self.child.wait() {
            Ok(status) => status,
            Err(e) => return FollowExit::Failed(format!("waiting for ssh: {e}")),
        };
        let stderr = self.stderr.join().unwrap_or_default();
        follow_exit(status, &stderr)
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many chunks of the follower's output may wait to be split.
const CHUNKS_QUEUED: usize = 16;
/// How much of the follower's stderr is kept for a message.
const STDERR_KEPT: u64 = 64 * 1024;

fn pump(mut from: ChildStdout, to: &mpsc::SyncSender<Vec<u8>>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn exited(code: i32) -> std::process::ExitStatus {
        std::process::ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn a_work_dir_of_another_account_is_unwritable_not_a_lost_connection() {
        let denied = "sh: 17: cannot create /tmp/nsh/nsh-306/request.1.tmp: Permission denied\n";
        assert!(matches!(
            follow_exit(exited(4), denied),
            FollowExit::Unwritable(why) if why.ends_with("Permission denied")
        ));
        // Another reason to fail the write (a full disk) may pass: retried.
        assert!(matches!(
            follow_exit(exited(4), "No space left on device"),
            FollowExit::Failed(_)
        ));
        assert!(matches!(follow_exit(exited(0), ""), FollowExit::Done));
        assert!(matches!(
            follow_exit(exited(3), ""),
            FollowExit::WorkDirGone
        ));
        assert!(matches!(
            follow_exit(exited(6), "work_root /tmp/nsh is a symbolic link\n"),
            FollowExit::NotOurs(why) if why == "work_root /tmp/nsh is a symbolic link"
        ));
        assert!(matches!(
            follow_exit(exited(255), "Connection reset"),
            FollowExit::Failed(why) if why.contains("Connection reset")
        ));
    }
}
