//! Failures as the tools report them: a [`Kind`] that decides the exit status,
//! a message for a person, and the typed error that caused it.
//!
//! Each layer has its own error type (the wire format's [`WireError`], a
//! NAR's, the hook protocol's, Slurm's HTTP, the configuration's values, …)
//! that implements [`KindOf`]: the kind is decided there, where the cause is
//! known (an HTTP 503 is transient, a bad store path is bad input), once.
//! A stage returns [`Failure`], which keeps that error as its source, so code
//! that must tell causes apart matches on the type ([`Failure::cause`]) and
//! never reads a message back.
//!
//! [`WireError`]: crate::nix::wire::WireError

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What kind of failure, which decides the exit status (see `crate::exit`).
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
    /// A bug in nsh: a stage panicked. Its own kind so that a panic never
    /// ends with Rust's status 101, which is Nix's "timed out".
    Internal,
}

/// The ticket's name (`timed-out`), for messages.
impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::derive::serde_name(self))
    }
}

/// Errors that know what kind of failure they are: each layer's error type
/// (the wire format, a NAR, the serve protocol, Slurm's HTTP, the
/// configuration, …) decides its kind here, in one place, and becomes a
/// [`Failure`] with `?` (keeping itself as the [`Failure`]'s source).
pub trait KindOf {
    /// The kind of failure this error is, which decides the exit status.
    fn kind(&self) -> Kind;
}

/// The cause of a failure, shared so that a [`Failure`] stays cheap to clone
/// (a configuration failure is reported on every ticket).
type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// A failure with its kind, a message meant for a person and, when it came
/// from a typed error, that error as its [`source`](std::error::Error::source),
/// so that code can match on the cause ([`Failure::cause`]) instead of
/// reading the message.
///
/// Messages name what was wrong (the file, the key, the path, the HTTP status)
/// and never contain a secret.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What kind of failure: decides the exit status.
    pub kind: Kind,
    /// What went wrong, for a person (the ticket's `error.message`).
    pub message: String,
    source: Option<Cause>,
}

/// Two failures are the same when they say the same (the source is how it
/// came about, not what it is).
impl PartialEq for Failure {
    fn eq(&self, other: &Failure) -> bool {
        self.kind == other.kind && self.message == other.message
    }
}

impl Eq for Failure {}

impl Failure {
    /// A failure without a typed cause.
    pub fn new(kind: Kind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A failure caused by `source`, with a message of its own (which
    /// usually ends with the source's).
    pub fn caused_by(
        kind: Kind,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Failure {
        Failure {
            kind,
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// A typed error as a failure: its kind, its message, itself as the
    /// source.
    pub fn from_error<E: KindOf + std::error::Error + Send + Sync + 'static>(error: E) -> Failure {
        Failure {
            kind: error.kind(),
            message: error.to_string(),
            source: Some(Arc::new(error)),
        }
    }

    /// The first error of type `E` in this failure's chain of causes.
    #[must_use]
    pub fn cause<E: std::error::Error + 'static>(&self) -> Option<&E> {
        let mut next = std::error::Error::source(self);
        while let Some(error) = next {
            if let Some(found) = error.downcast_ref::<E>() {
                return Some(found);
            }
            next = error.source();
        }
        None
    }

    /// The build itself failed; retrying will not help.
    pub fn permanent(message: impl Into<String>) -> Failure {
        Failure::new(Kind::Permanent, message)
    }
    /// Cluster, network or node trouble; retrying may help.
    pub fn transient(message: impl Into<String>) -> Failure {
        Failure::new(Kind::Transient, message)
    }
    /// Out of time.
    pub fn timed_out(message: impl Into<String>) -> Failure {
        Failure::new(Kind::TimedOut, message)
    }
    /// A wrong command line.
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure::new(Kind::Usage, message)
    }
    /// Wrong input: a ticket, a derivation, a store path.
    pub fn input(message: impl Into<String>) -> Failure {
        Failure::new(Kind::Input, message)
    }
    /// A wrong configuration.
    pub fn config(message: impl Into<String>) -> Failure {
        Failure::new(Kind::Config, message)
    }

    /// Prefixes the message with what was being done: `"{context}: {message}"`.
    /// The cause stays.
    #[must_use]
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

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl<E: KindOf + std::error::Error + Send + Sync + 'static> From<E> for Failure {
    fn from(error: E) -> Failure {
        Failure::from_error(error)
    }
}

/// Turns any error into a [`Failure`] of a chosen kind, with context; the
/// error stays as the failure's source.
///
/// ```
/// use nsh_core::{Kind, ResultExt};
/// let r: Result<String, _> = std::fs::read_to_string("/nonexistent/nsh.toml")
///     .or_fail(Kind::Config, || "reading /nonexistent/nsh.toml");
/// let failure = r.unwrap_err();
/// assert_eq!(failure.kind, Kind::Config);
/// assert!(failure.cause::<std::io::Error>().is_some());
/// ```
pub trait ResultExt<T> {
    /// The error as a failure of `kind`: `"{context}: {error}"`.
    ///
    /// # Errors
    /// The failure, when `self` is an error.
    fn or_fail<C: fmt::Display>(
        self,
        kind: Kind,
        context: impl FnOnce() -> C,
    ) -> Result<T, Failure>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> ResultExt<T> for Result<T, E> {
    fn or_fail<C: fmt::Display>(
        self,
        kind: Kind,
        context: impl FnOnce() -> C,
    ) -> Result<T, Failure> {
        self.map_err(|e| Failure::caused_by(kind, format!("{}: {e}", context()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Refused;

    impl fmt::Display for Refused {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("refused")
        }
    }

    impl std::error::Error for Refused {}

    impl KindOf for Refused {
        fn kind(&self) -> Kind {
            Kind::Transient
        }
    }

    #[test]
    fn a_typed_error_keeps_its_kind_and_stays_the_cause_through_context() {
        let failure = Failure::from(Refused).context("ssh node1");
        assert_eq!(failure.kind, Kind::Transient);
        assert_eq!(failure.message, "ssh node1: refused");
        assert!(failure.cause::<Refused>().is_some());
        assert!(failure.cause::<std::io::Error>().is_none());
    }
}
