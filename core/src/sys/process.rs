//! Processes: ids, signalling children, what a child does between fork and
//! exec, and a child's output within a time limit.
#![allow(unsafe_code)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// This process's effective user id.
#[must_use]
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// This process's real user id.
#[must_use]
pub fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// This process's parent's id.
#[must_use]
pub fn parent_pid() -> u32 {
    std::os::unix::process::parent_id()
}

/// When process `pid` started, in clock ticks since boot (`/proc/<pid>/stat`
/// field 22): with the pid, it names one process, never a later one that
/// got the same pid. `None` when there is no such process.
#[must_use]
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything,
    // spaces and parentheses too: the fields after it follow its last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 (the state) is the first after the name; 22 is 19 further.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// This process's user name (its uid when it has none).
#[must_use]
pub fn user_name() -> String {
    let uid = uid();
    // SAFETY: getpwuid's answer is read at once, before another call could
    // overwrite it (nsh looks users up nowhere else).
    unsafe {
        let entry = libc::getpwuid(uid);
        if entry.is_null() || (*entry).pw_name.is_null() {
            return format!("uid {uid}");
        }
        std::ffi::CStr::from_ptr((*entry).pw_name)
            .to_string_lossy()
            .into_owned()
    }
}

/// The pipe to a child's stdin (spawned with `Stdio::piped()`).
///
/// # Errors
/// The child's stdin is not a pipe (it was not spawned with one, or was
/// taken already).
pub fn stdin_of(child: &mut Child) -> std::io::Result<std::process::ChildStdin> {
    child.stdin.take().ok_or_else(|| not_piped("stdin"))
}

/// The pipe from a child's stdout (spawned with `Stdio::piped()`).
///
/// # Errors
/// As [`stdin_of`].
pub fn stdout_of(child: &mut Child) -> std::io::Result<std::process::ChildStdout> {
    child.stdout.take().ok_or_else(|| not_piped("stdout"))
}

/// The pipe from a child's stderr (spawned with `Stdio::piped()`).
///
/// # Errors
/// As [`stdin_of`].
pub fn stderr_of(child: &mut Child) -> std::io::Result<std::process::ChildStderr> {
    child.stderr.take().ok_or_else(|| not_piped("stderr"))
}

fn not_piped(which: &str) -> std::io::Error {
    std::io::Error::other(format!("the child's {which} is not a pipe"))
}

/// Sends SIGTERM to `child` if it has not been reaped (best effort).
pub fn terminate(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        if let Some(pid) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, Signal::TERM);
        }
    }
}

/// The child starts a session of its own, so that a kill of the parent's
/// process group does not reach it.
pub fn in_new_session(cmd: &mut Command) {
    // SAFETY: setsid is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            let _ = rustix::process::setsid();
            Ok(())
        });
    }
}

/// The child gets a process group of its own (a SIGKILL to the parent's
/// group misses it) and SIGTERM when this process dies. It fails to start
/// when this process died before the death signal was armed.
pub fn in_own_group_terminated_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: setpgid, prctl and getppid are async-signal-safe and touch no
    // memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setpgid(None, None)?;
            rustix::process::set_parent_process_death_signal(Some(Signal::TERM))?;
            let ppid = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
            if u32::try_from(ppid).ok() != Some(parent) {
                return Err(std::io::Error::other("the parent is gone"));
            }
            Ok(())
        });
    }
}

/// The child gets `fd` (of this process) as its descriptor `target`, not
/// close-on-exec.
pub fn with_fd_as(cmd: &mut Command, fd: std::os::fd::RawFd, target: std::os::fd::RawFd) {
    // SAFETY: dup2 is async-signal-safe; `target` in the child is replaced
    // on purpose (libc: rustix's dup2 wants to own the target).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `command` with its output read, for at most `limit`; a command still
/// running then is stopped (see [`output_within_feeding`]) and reported as
/// timed out.
///
/// # Errors
/// Starting or waiting for the command; `TimedOut` when it took too long.
pub fn output_within(command: &mut Command, limit: Duration) -> std::io::Result<Output> {
    output_within_feeding(command, None, limit)
}

/// How long a command told to stop (SIGTERM) has before it is killed: time
/// for `runuser` to pass the signal on to the command it runs and reap it.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// Runs `command` with `input` (if any) on its stdin and its output read, for
/// at most `limit`. A command still running then gets SIGTERM, and SIGKILL
/// [`STOP_GRACE`] later: `runuser` forwards SIGTERM to the program it
/// runs, where a SIGKILL would leave that program running on its own.
///
/// # Errors
/// Starting or waiting for the command; `TimedOut` ("no answer within N s")
/// when it took too long.
pub fn output_within_feeding(
    command: &mut Command,
    input: Option<&[u8]>,
    limit: Duration,
) -> std::io::Result<Output> {
    if input.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let writer = input.map(|bytes| {
        let bytes = bytes.to_vec();
        let stdin = child.stdin.take();
        std::thread::spawn(move || match stdin {
            Some(mut stdin) => std::io::Write::write_all(&mut stdin, &bytes),
            None => Err(not_piped("stdin")),
        })
    });
    let stdout = read_all_in_thread(child.stdout.take());
    let stderr = read_all_in_thread(child.stderr.take());
    let Some(status) = wait_within(&mut child, limit)? else {
        return Err(timed_out(limit));
    };
    if let Some(writer) = writer {
        // A command that exits without reading its input is not an error of
        // ours; one that read part of it and failed says so in its status.
        let _ = writer.join();
    }
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn read_all_in_thread<R: Read + Send + 'static>(
    pipe: Option<R>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// The error of a command that ran past its deadline.
fn timed_out(limit: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer within {} s", limit.as_secs_f64()),
    )
}

/// Waits for `child` at most `limit`: its status, or `None` once it was
/// stopped (SIGTERM, SIGKILL after [`STOP_GRACE`]) and reaped for running
/// too long.
///
/// # Errors
/// Waiting for the child.
pub fn wait_within(
    child: &mut Child,
    limit: Duration,
) -> std::io::Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            stop(child);
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGTERM to `child`, SIGKILL [`STOP_GRACE`] later if it still runs; reaped.
fn stop(child: &mut Child) {
    terminate(child);
    let grace = Instant::now() + STOP_GRACE;
    while Instant::now() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `command` (its stdio as set) to its end, for at most `limit`.
///
/// # Errors
/// Starting or waiting for it; `TimedOut` as [`output_within_feeding`].
pub fn status_within(
    command: &mut Command,
    limit: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    let mut child = command.spawn()?;
    wait_within(&mut child, limit)?.ok_or_else(|| timed_out(limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_past_its_deadline_is_stopped_and_timed_out() {
        let started = Instant::now();
        let err =
            output_within(Command::new("sleep").arg("30"), Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("no answer within 0.2 s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_command_ignoring_sigterm_is_killed_after_the_grace() {
        let started = Instant::now();
        let err = status_within(
            Command::new("sh").args(["-c", "trap '' TERM; exec sleep 30"]),
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(took >= STOP_GRACE && took < STOP_GRACE * 3, "{took:?}");
    }

    #[test]
    fn input_reaches_the_command_and_its_output_comes_back() {
        let out = output_within_feeding(
            &mut Command::new("cat"),
            Some(b"the script\n"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"the script\n");
    }
}
