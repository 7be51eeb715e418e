//! Values written in more than one way: slurmrestd's address, time limits,
//! durations and memory sizes, and the Slurm words a site may route to.

use std::fmt;
use std::path::PathBuf;

use super::raw::NumberOrText;
use super::RestUrl;

/// A value that does not parse; the key it belongs to is the caller's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadValue {
    /// slurmrestd's address (as written), and what is wrong with it.
    Url(String, UrlProblem),
    /// A time limit (as written).
    TimeLimit(String),
    /// A duration in seconds (as written).
    Duration(String),
    /// A memory size (as written).
    Memory(String),
    /// A size in bytes (as written).
    Size(String),
}

/// What is wrong with slurmrestd's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlProblem {
    /// `unix:` with a relative path.
    RelativeSocket,
    /// `http://` without a host.
    NoHost,
    /// Neither `http://` nor `unix:`.
    Scheme,
}

impl fmt::Display for BadValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadValue::Url(url, UrlProblem::RelativeSocket) => {
                write!(f, "{url:?}: expected \"unix:/absolute/path/to/socket\"")
            }
            BadValue::Url(url, UrlProblem::NoHost) => {
                write!(f, "{url:?}: no host; expected \"http(s)://host:port\"")
            }
            BadValue::Url(url, UrlProblem::Scheme) => write!(
                f,
                "{url:?}: expected \"http://host:port\", \"https://host:port\" or \"unix:/path/to/socket\""
            ),
            BadValue::TimeLimit(v) => write!(
                f,
                "{v}: expected a time limit: minutes (90), \"90m\", \"4h\", \"2d\" or Slurm's \"D-HH:MM:SS\""
            ),
            BadValue::Duration(v) => write!(
                f,
                "{v}: expected a duration: seconds (300), or \"30s\", \"10m\", \"1h\""
            ),
            BadValue::Size(v) => write!(
                f,
                "{v}: expected a size: bytes (1048576), or \"512M\", \"64G\", \"1T\""
            ),
            BadValue::Memory(v) => write!(
                f,
                "{v}: expected memory: megabytes (2048), or \"512M\", \"16G\", \"1T\""
            ),
        }
    }
}

impl std::error::Error for BadValue {}

pub(super) fn parse_url(url: &str) -> Result<RestUrl, BadValue> {
    if let Some(path) = url.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if !path.starts_with('/') {
            return Err(BadValue::Url(url.to_string(), UrlProblem::RelativeSocket));
        }
        return Ok(RestUrl::Unix(PathBuf::from(path)));
    }
    for (scheme, tls) in [("http://", false), ("https://", true)] {
        let Some(rest) = url.strip_prefix(scheme) else {
            continue;
        };
        if rest.split('/').next().unwrap_or("").is_empty() {
            return Err(BadValue::Url(url.to_string(), UrlProblem::NoHost));
        }
        let base = url.trim_end_matches('/').to_string();
        return Ok(if tls {
            RestUrl::Https {
                base,
                ca_file: None,
            }
        } else {
            RestUrl::Http(base)
        });
    }
    Err(BadValue::Url(url.to_string(), UrlProblem::Scheme))
}

/// A Slurm name, option value or expression: nothing that could be taken
/// for another option or word.
pub(super) fn is_slurm_word(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.:,&|=*[]!".contains(c))
}

/// A Slurm time limit in minutes: a plain number of minutes, `"90m"`,
/// `"4h"`, `"2d"`, or Slurm's own `"MM"`, `"MM:SS"`, `"HH:MM:SS"`,
/// `"D-HH"`, `"D-HH:MM"`, `"D-HH:MM:SS"`. Seconds round up.
pub fn parse_minutes_text(s: &str) -> Option<u32> {
    let s = s.trim();
    let secs: u64 = if let Some(n) = unit_number(s) {
        n
    } else {
        let (days, clock) = match s.split_once('-') {
            Some((d, rest)) => (d.parse::<u64>().ok()?, Some(rest)),
            None => (0, None),
        };
        let fields: Vec<u64> = match clock {
            Some(rest) => rest
                .split(':')
                .map(|f| f.parse().ok())
                .collect::<Option<_>>()?,
            None => s
                .split(':')
                .map(|f| f.parse().ok())
                .collect::<Option<_>>()?,
        };
        // Every number is the writer's (a derivation's `nshResources.time`
        // among them): checked arithmetic, an overflow is no time limit.
        let (h, m, sec) = match (clock.is_some(), fields.as_slice()) {
            // D-HH, D-HH:MM, D-HH:MM:SS
            (true, [h]) => (*h, 0, 0),
            (true, [h, m]) => (*h, *m, 0),
            (true, [h, m, sec]) => (*h, *m, *sec),
            // MM, MM:SS, HH:MM:SS
            (false, [m]) => (0, *m, 0),
            (false, [m, sec]) => (0, *m, *sec),
            (false, [h, m, sec]) => (*h, *m, *sec),
            _ => return None,
        };
        days.checked_mul(86400)?
            .checked_add(h.checked_mul(3600)?)?
            .checked_add(m.checked_mul(60)?)?
            .checked_add(sec)?
    };
    u32::try_from(secs.div_ceil(60)).ok()
}

/// `"30s"`, `"10m"`, `"4h"`, `"2d"` in seconds.
fn unit_number(s: &str) -> Option<u64> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = number.parse().ok()?;
    let factor = match unit {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    n.checked_mul(factor)
}

pub(super) fn parse_minutes(v: &NumberOrText) -> Result<u32, BadValue> {
    let minutes = match v {
        NumberOrText::Number(n) => u32::try_from(*n).ok(),
        NumberOrText::Text(s) => parse_minutes_text(s),
    };
    match minutes {
        Some(m) if m > 0 => Ok(m),
        _ => Err(BadValue::TimeLimit(v.to_string())),
    }
}

pub(super) fn parse_seconds(v: &NumberOrText) -> Result<u64, BadValue> {
    let secs = match v {
        NumberOrText::Number(n) => u64::try_from(*n).ok(),
        NumberOrText::Text(s) => unit_number(s.trim()),
    };
    match secs {
        Some(s) if s > 0 => Ok(s),
        _ => Err(BadValue::Duration(v.to_string())),
    }
}

/// Seconds as [`parse_seconds`] reads them, where 0 is allowed too (it
/// switches something off: `linger = 0`).
pub(super) fn parse_seconds_or_zero(v: &NumberOrText) -> Result<u64, BadValue> {
    match v {
        NumberOrText::Number(0) => Ok(0),
        NumberOrText::Text(s) if s.trim() == "0" => Ok(0),
        _ => parse_seconds(v),
    }
}

/// Minutes as [`parse_minutes`] reads them, where 0 is allowed too.
pub(super) fn parse_minutes_or_zero(v: &NumberOrText) -> Result<u32, BadValue> {
    match v {
        NumberOrText::Number(0) => Ok(0),
        NumberOrText::Text(s) if s.trim() == "0" => Ok(0),
        _ => parse_minutes(v),
    }
}

/// Memory in MB: a plain number of MB, or `"512M"`, `"16G"`, `"1T"` (binary
/// units, as Slurm reads them).
pub fn parse_mem_mb_text(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().ok()?;
    let factor = match unit.to_ascii_uppercase().as_str() {
        "" | "M" | "MB" => 1,
        "G" | "GB" => 1024,
        "T" | "TB" => 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(factor)
}

pub(super) fn parse_mem_mb(v: &NumberOrText) -> Result<u64, BadValue> {
    let mb = match v {
        NumberOrText::Number(n) => u64::try_from(*n).ok(),
        NumberOrText::Text(s) => parse_mem_mb_text(s),
    };
    match mb {
        Some(m) if m > 0 => Ok(m),
        _ => Err(BadValue::Memory(v.to_string())),
    }
}

/// A size in bytes: a plain number of bytes, or `"512K"`, `"512M"`, `"64G"`,
/// `"1T"` (binary units; a trailing `B` or `iB` allowed).
pub fn parse_size_text(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().ok()?;
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit
        .strip_suffix("IB")
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

pub(super) fn parse_size(v: &NumberOrText) -> Result<u64, BadValue> {
    let bytes = match v {
        NumberOrText::Number(n) => u64::try_from(*n).ok(),
        NumberOrText::Text(s) => parse_size_text(s),
    };
    match bytes {
        Some(b) if b > 0 => Ok(b),
        _ => Err(BadValue::Size(v.to_string())),
    }
}
