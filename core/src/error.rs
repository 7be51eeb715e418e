//! Failures as the tools report them: a [`Kind`] that decides the exit status
//! and a message for a person. Every fallible function in nsh returns
//! [`Failure`], so that the kind is decided where the cause is known (an HTTP
//! 503 is transient, a bad store path is bad input) and not guessed later from
//! a string.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What kind of failure, which decides the exit status (see [`crate::exit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The build failed; retrying will not help.
    Permanent,
    /// Cluster, network or node trouble; retrying may help.
    Transient,
    /// Out of time.
    TimedOut,
    /// Wrong command line.
    Usage,
    /// Wrong input: ticket, derivation, store path.
    Input,
    /// Wrong configuration.
    Config,
}

impl Kind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Permanent => "permanent",
            Kind::Transient => "transient",
            Kind::TimedOut => "timed-out",
            Kind::Usage => "usage",
            Kind::Input => "input",
            Kind::Config => "config",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure with its kind and a message meant for a person.
///
/// Messages name what was wrong (the file, the key, the path, the HTTP status)
/// and never contain a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: Kind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: Kind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
    pub fn permanent(message: impl Into<String>) -> Failure {
        Failure::new(Kind::Permanent, message)
    }
    pub fn transient(message: impl Into<String>) -> Failure {
        Failure::new(Kind::Transient, message)
    }
    pub fn timed_out(message: impl Into<String>) -> Failure {
        Failure::new(Kind::TimedOut, message)
    }
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure::new(Kind::Usage, message)
    }
    pub fn input(message: impl Into<String>) -> Failure {
        Failure::new(Kind::Input, message)
    }
    pub fn config(message: impl Into<String>) -> Failure {
        Failure::new(Kind::Config, message)
    }

    /// Prefixes the message with what was being done: `"{context}: {message}"`.
    pub fn context(mut self, context: impl fmt::Display) -> Failure {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Turns any error into a [`Failure`] of a chosen kind, with context.
///
/// ```
/// use nsh_core::{Kind, ResultExt};
/// let r: Result<String, _> = std::fs::read_to_string("/nonexistent/nsh.toml")
///     .or_fail(Kind::Config, || "reading /nonexistent/nsh.toml");
/// assert_eq!(r.unwrap_err().kind, Kind::Config);
/// ```
pub trait ResultExt<T> {
    fn or_fail<C: fmt::Display>(
        self,
        kind: Kind,
        context: impl FnOnce() -> C,
    ) -> Result<T, Failure>;
}

impl<T, E: fmt::Display> ResultExt<T> for Result<T, E> {
    fn or_fail<C: fmt::Display>(
        self,
        kind: Kind,
        context: impl FnOnce() -> C,
    ) -> Result<T, Failure> {
        self.map_err(|e| Failure::new(kind, format!("{}: {e}", context())))
    }
}
