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
/// running then is killed and reported as timed out.
///
/// # Errors
/// Starting or waiting for the command; `TimedOut` when it took too long.
pub fn output_within(command: &mut Command, limit: Duration) -> std::io::Result<Output> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", limit.as_secs_f64()),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}
