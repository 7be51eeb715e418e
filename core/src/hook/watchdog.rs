//! The watchdog: a process in a session of its own that cancels the Slurm
//! job if the hook dies without finishing (the daemon kills the hook's
//! process group when a build is interrupted or done).

use std::io::{self, BufRead, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use super::pipeline;
use super::CANCEL_IN_WATCHDOG;
use crate::ticket::Ticket;

/// A process in its own session that cancels the Slurm job if the hook
/// disappears before saying it is done. It reads, on stdin, one line per
/// update: the latest ticket with `alloc`; `cancel` (the hook was told to
/// stop: cancel now); `done` (nothing to cancel).
pub(super) struct Watchdog {
    child: Child,
    stdin: ChildStdin,
}

impl Watchdog {
    pub(super) fn spawn(alloc_tool: &Path) -> Option<Watchdog> {
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

    pub(super) fn update(&mut self, ticket: &Ticket) {
        let _ = writeln!(self.stdin, "{}", ticket.to_line());
    }

    pub(super) fn disarm(mut self) {
        let _ = writeln!(self.stdin, "done");
        drop(self.stdin);
        let _ = self.child.wait();
    }

    pub(super) fn cancel_now(&mut self) {
        let _ = writeln!(self.stdin, "cancel");
    }

    /// No more updates: the watchdog cancels what it has not cancelled yet,
    /// on its own, and exits.
    pub(super) fn hand_over(self) {
        drop(self.stdin);
    }
}

/// `nsh-hook --watchdog <nsh-alloc>`: see [`Watchdog`].
pub(super) fn watchdog_main(args: &[String]) -> i32 {
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
