//! Logging to stderr, filtered by `NSH_LOG` (`error`, `warn`, `info`,
//! `debug`, `trace`; default `info`). Lines are prefixed with the tool's name
//! so that the interleaved stderr of a pipeline stays readable.
//!
//! stdout belongs to tickets; nothing here ever writes to it.

use std::io::Write;
use std::sync::OnceLock;

/// How much `NSH_LOG` lets through, least first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Failures only (`error`, `quiet`).
    Error = 1,
    /// And warnings (`warn`).
    Warn = 2,
    /// And what happens (`info`, the default).
    Info = 3,
    /// And the details (`debug`).
    Debug = 4,
    /// Everything (`trace`).
    Trace = 5,
}

impl Level {
    /// Parses an `NSH_LOG` value; unknown values mean the default, `info`.
    /// Written out, not derived: the setting takes aliases (`quiet`,
    /// `warning`), any case, and never fails.
    pub fn parse(s: &str) -> Level {
        match s.trim().to_ascii_lowercase().as_str() {
            "error" | "quiet" => Level::Error,
            "warn" | "warning" => Level::Warn,
            "debug" => Level::Debug,
            "trace" => Level::Trace,
            _ => Level::Info,
        }
    }
}

static MAX: OnceLock<Level> = OnceLock::new();
static PROGRAM: OnceLock<String> = OnceLock::new();

/// The current filter (from `NSH_LOG`, read once).
pub fn max_level() -> Level {
    *MAX.get_or_init(|| std::env::var("NSH_LOG").map_or(Level::Info, |v| Level::parse(&v)))
}

/// Sets the name printed before every line (the tool's name).
pub fn set_program(name: &str) {
    let _ = PROGRAM.set(name.to_string());
}

pub fn enabled(level: Level) -> bool {
    level <= max_level()
}

#[doc(hidden)]
pub fn write(level: Level, args: std::fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let program = PROGRAM.get().map_or("nsh", String::as_str);
    let tag = match level {
        Level::Error => "error: ",
        Level::Warn => "warning: ",
        _ => "",
    };
    // One write per line, so that lines from several tools do not interleave.
    let line = format!("{program}: {tag}{args}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Logs a failure to stderr, prefixed with the tool's name.
#[macro_export]
macro_rules! log_error { ($($t:tt)*) => { $crate::__log_write($crate::__LogLevel::Error, format_args!($($t)*)) } }
/// Logs a warning to stderr (unless `NSH_LOG=error`).
#[macro_export]
macro_rules! log_warn { ($($t:tt)*) => { $crate::__log_write($crate::__LogLevel::Warn, format_args!($($t)*)) } }
/// Logs what happens to stderr (the default level).
#[macro_export]
macro_rules! log_info { ($($t:tt)*) => { $crate::__log_write($crate::__LogLevel::Info, format_args!($($t)*)) } }
/// Logs details to stderr with `NSH_LOG=debug`.
#[macro_export]
macro_rules! log_debug { ($($t:tt)*) => { $crate::__log_write($crate::__LogLevel::Debug, format_args!($($t)*)) } }
