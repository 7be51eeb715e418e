//! Slurm: a version-neutral model of what nsh asks of Slurm and what it reads
//! back ([`model`]), the slurmrestd codec for every API version nsh speaks
//! ([`rest`], pure), the HTTP transport ([`http`]), and the command-line
//! backend ([`cli`]).

use std::fmt;
use std::str::FromStr;

/// A slurmrestd OpenAPI plugin version nsh can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ApiVersion {
    V0038,
    V0039,
    V0040,
    V0041,
    V0042,
    V0043,
    V0044,
    V0045,
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

    /// As slurmrestd spells it in paths: `v0.0.38`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ApiVersion::V0038 => "v0.0.38",
            ApiVersion::V0039 => "v0.0.39",
            ApiVersion::V0040 => "v0.0.40",
            ApiVersion::V0041 => "v0.0.41",
            ApiVersion::V0042 => "v0.0.42",
            ApiVersion::V0043 => "v0.0.43",
            ApiVersion::V0044 => "v0.0.44",
            ApiVersion::V0045 => "v0.0.45",
        }
    }

    /// The minor number: 38 … 45.
    pub const fn minor(self) -> u32 {
        match self {
            ApiVersion::V0038 => 38,
            ApiVersion::V0039 => 39,
            ApiVersion::V0040 => 40,
            ApiVersion::V0041 => 41,
            ApiVersion::V0042 => 42,
            ApiVersion::V0043 => 43,
            ApiVersion::V0044 => 44,
            ApiVersion::V0045 => 45,
        }
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ApiVersion {
    type Err = UnknownApiVersion;
    fn from_str(s: &str) -> Result<ApiVersion, UnknownApiVersion> {
        ApiVersion::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
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
