//! Signal handling, set up in one place: SIGINT, SIGTERM and SIGHUP record
//! the signal in an atomic that the tools poll ([`interrupted`],
//! [`signalled`]); nothing else happens in the handler.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// What an interrupted system call does once the handler returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syscalls {
    /// Restarted (`SA_RESTART`): blocking reads of the stages (`nsh-alloc`,
    /// `nsh-run`) go on, and their loops notice the flag at their next turn.
    Restart,
    /// Interrupted with EINTR: the hook, whose waits are short and polled.
    Interrupt,
}

static SIGNAL: AtomicI32 = AtomicI32::new(0);
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    SIGNAL.store(signal, Ordering::SeqCst);
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the handlers for SIGINT, SIGTERM and SIGHUP; returns the flag
/// they set.
pub fn catch_interrupts(syscalls: Syscalls) -> &'static AtomicBool {
    let flags = match syscalls {
        Syscalls::Restart => libc::SA_RESTART,
        Syscalls::Interrupt => 0,
    };
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // value; the handler only stores to atomics, which is
        // async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            action.sa_flags = flags;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(signal, &raw const action, std::ptr::null_mut());
        }
    }
    &INTERRUPTED
}

/// The last signal received, if any.
pub fn signalled() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Ignores SIGINT, SIGHUP and SIGPIPE (a process that must outlive its
/// terminal and its reader: the hook's watchdog).
pub fn ignore_terminal_signals() {
    for signal in [libc::SIGINT, libc::SIGHUP, libc::SIGPIPE] {
        // SAFETY: setting a disposition to SIG_IGN has no preconditions.
        unsafe {
            libc::signal(signal, libc::SIG_IGN);
        }
    }
}
