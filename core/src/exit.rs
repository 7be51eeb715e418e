//! The exit-status convention shared by every nsh tool (and by `nsh-hook`'s
//! pipeline). One place, so that a shell script composing the tools can rely on
//! the numbers. The numbers follow BSD `sysexits.h` where one fits.

use crate::error::Kind;

crate::derive::numbered_enum! {
    /// How a tool ended; the number is the process exit status.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum ExitStatus: i32 {
        /// Everything asked for was done.
        Ok = 0,
        /// The build itself failed; retrying will not help.
        Permanent = 1,
        /// Cluster, network or node trouble; retrying may work (`EX_TEMPFAIL`).
        Transient = 75,
        /// The build or the wait for it ran out of time (Nix's own "timed out" status).
        TimedOut = 101,
        /// The command line was wrong (`EX_USAGE`).
        Usage = 64,
        /// The input (a ticket, a derivation, a store path) was wrong (`EX_DATAERR`).
        BadInput = 65,
        /// The configuration is wrong (`EX_CONFIG`).
        BadConfig = 78,
        /// A bug in nsh: it panicked (`EX_SOFTWARE`; never Rust's 101).
        Internal = 70,
    }
}

impl ExitStatus {
    /// The process exit status.
    pub const fn code(self) -> i32 {
        self as i32
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
            Kind::Internal => ExitStatus::Internal,
        }
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
            Kind::Internal,
        ];
        let mut seen = std::collections::BTreeSet::new();
        for kind in all {
            let status = ExitStatus::of(kind);
            assert!(seen.insert(status.code()), "duplicate code for {kind:?}");
            assert_eq!(ExitStatus::try_from(status.code()), Ok(status));
        }
        assert_eq!(ExitStatus::try_from(0), Ok(ExitStatus::Ok));
        assert_eq!(ExitStatus::try_from(2), Err(2));
    }

    #[test]
    fn the_documented_numbers() {
        assert_eq!(ExitStatus::of(Kind::Permanent).code(), 1);
        assert_eq!(ExitStatus::of(Kind::Transient).code(), 75);
        assert_eq!(ExitStatus::of(Kind::TimedOut).code(), 101);
        assert_eq!(ExitStatus::of(Kind::Usage).code(), 64);
        assert_eq!(ExitStatus::of(Kind::Input).code(), 65);
        assert_eq!(ExitStatus::of(Kind::Config).code(), 78);
        assert_eq!(ExitStatus::of(Kind::Internal).code(), 70);
    }
}
