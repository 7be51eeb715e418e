//! Slurm: a version-neutral model of what nsh asks of Slurm and what it reads
//! back ([`model`]), the slurmrestd codec for every API version nsh speaks
//! ([`rest`], pure), the HTTP transport ([`http`]), and the command-line
//! backend ([`cli`]).

use std::fmt;
use std::str::FromStr;

crate::derive::numbered_enum! {
    /// A slurmrestd OpenAPI plugin version nsh can speak, numbered by its
    /// minor version (`v0.0.42` is 42).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum ApiVersion: u32 {
        /// `v0.0.38`.
        V0038 = 38,
        /// `v0.0.39`.
        V0039 = 39,
        /// `v0.0.40`.
        V0040 = 40,
        /// `v0.0.41`.
        V0041 = 41,
        /// `v0.0.42`.
        V0042 = 42,
        /// `v0.0.43`.
        V0043 = 43,
        /// `v0.0.44`.
        V0044 = 44,
        /// `v0.0.45`.
        V0045 = 45,
    }
}

impl ApiVersion {
    /// Every supported version, oldest first.
    pub const ALL: [ApiVersion; 8] = [
        ApiVersion::V0038,
        ApiVersion::V0039,
        ApiVersion::V0040,
        ApiVersion::V0041,
        ApiVersion::V0042,
        ApiVersion::V0043,
        ApiVersion::V0044,
        ApiVersion::V0045,
    ];

    /// The minor number: 38 … 45.
    pub const fn minor(self) -> u32 {
        self as u32
    }
}

/// As slurmrestd spells it in paths: `v0.0.38`.
impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v0.0.{}", self.minor())
    }
}

impl FromStr for ApiVersion {
    type Err = UnknownApiVersion;
    fn from_str(s: &str) -> Result<ApiVersion, UnknownApiVersion> {
        s.strip_prefix("v0.0.")
            .filter(|minor| minor.len() == 2)
            .and_then(|minor| minor.parse::<u32>().ok())
            .and_then(|minor| ApiVersion::try_from(minor).ok())
            .ok_or_else(|| UnknownApiVersion(s.to_string()))
    }
}

/// A slurmrestd API version nsh does not speak (as written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownApiVersion(pub String);

impl fmt::Display for UnknownApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a slurmrestd API version nsh speaks ({} … {})",
            self.0,
            ApiVersion::ALL[0],
            ApiVersion::ALL[ApiVersion::ALL.len() - 1]
        )
    }
}

impl std::error::Error for UnknownApiVersion {}

pub mod model;
pub mod rest;

pub use model::{JobInfo, JobRequest, JobState};
pub mod cli;
pub mod client;
mod clusters;
pub mod http;

pub use clusters::Clusters;
#[cfg(test)]
pub(crate) mod test_server;

pub use client::{RestClient, Slurm};
