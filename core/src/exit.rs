//! The exit-status convention shared by every nsh tool (and by `nsh-hook`'s
//! pipeline). One place, so that a shell script composing the tools can rely on
//! the numbers. The numbers follow BSD `sysexits.h` where one fits.

use crate::error::Kind;

/// How a tool ended. `code()` is the process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExitStatus {
    /// Everything asked for was done.
    Ok,
    /// The build itself failed; retrying will not help.
    Permanent,
    /// Cluster, network or node trouble; retrying may work (`EX_TEMPFAIL`).
    Transient,
    /// The build or the wait for it ran out of time (Nix's own "timed out" status).
    TimedOut,
    /// The command line was wrong (`EX_USAGE`).
    Usage,
    /// The input (a ticket, a derivation, a store path) was wrong (`EX_DATAERR`).
    BadInput,
    /// The configuration is wrong (`EX_CONFIG`).
    BadConfig,
}

impl ExitStatus {
    /// The process exit status.
    pub const fn code(self) -> i32 {
        match self {
            ExitStatus::Ok => 0,
            ExitStatus::Permanent => 1,
            ExitStatus::Transient => 75,
            ExitStatus::TimedOut => 101,
            ExitStatus::Usage => 64,
            ExitStatus::BadInput => 65,
            ExitStatus::BadConfig => 78,
        }
    }

    /// The status a failure of this kind ends with.
    pub const fn of(kind: Kind) -> ExitStatus {
        match kind {
            Kind::Permanent => ExitStatus::Permanent,
            Kind::Transient => ExitStatus::Transient,
            Kind::TimedOut => ExitStatus::TimedOut,
            Kind::Usage => ExitStatus::Usage,
            Kind::Input => ExitStatus::BadInput,
            Kind::Config => ExitStatus::BadConfig,
        }
    }

    /// Inverse of [`ExitStatus::code`], for a pipeline that reads a child's status.
    pub const fn from_code(code: i32) -> Option<ExitStatus> {
        Some(match code {
            0 => ExitStatus::Ok,
            1 => ExitStatus::Permanent,
            75 => ExitStatus::Transient,
            101 => ExitStatus::TimedOut,
            64 => ExitStatus::Usage,
            65 => ExitStatus::BadInput,
            78 => ExitStatus::BadConfig,
            _ => return None,
        })
    }
}

impl From<ExitStatus> for std::process::ExitCode {
    fn from(status: ExitStatus) -> Self {
        // Every code is in 0..=255 by construction.
        std::process::ExitCode::from(u8::try_from(status.code()).unwrap_or(u8::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_distinct() {
        let all = [
            Kind::Permanent,
            Kind::Transient,
            Kind::TimedOut,
            Kind::Usage,
            Kind::Input,
            Kind::Config,
        ];
        let mut seen = std::collections::BTreeSet::new();
        for kind in all {
            let status = ExitStatus::of(kind);
            assert!(seen.insert(status.code()), "duplicate code for {kind:?}");
            assert_eq!(ExitStatus::from_code(status.code()), Some(status));
        }
        assert_eq!(ExitStatus::from_code(0), Some(ExitStatus::Ok));
        assert_eq!(ExitStatus::from_code(2), None);
    }

    #[test]
    fn the_documented_numbers() {
        assert_eq!(ExitStatus::of(Kind::Permanent).code(), 1);
        assert_eq!(ExitStatus::of(Kind::Transient).code(), 75);
        assert_eq!(ExitStatus::of(Kind::TimedOut).code(), 101);
        assert_eq!(ExitStatus::of(Kind::Usage).code(), 64);
        assert_eq!(ExitStatus::of(Kind::Input).code(), 65);
        assert_eq!(ExitStatus::of(Kind::Config).code(), 78);
    }
}
