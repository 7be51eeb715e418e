//! The Nix daemon's worker protocol, client side: the pure codec.
//!
//! Every function here reads or writes one message with
//! [`WireReader`]/[`WireWriter`]; the socket is [`client`]'s. nsh asks the
//! daemon only which paths are valid (QueryValidPaths): a connection costs
//! the daemon a `fork`, where a `nix-store --serve` costs us an `exec` and
//! dynamic linking. The facts relied on here, per Nix version, are in
//! `docs/reference/nix-daemon-protocol.md`.
//!
//! The version is `major << 8 | minor`. We announce 1.37; the conversation
//! uses the lower of the daemon's and ours, and every optional field is
//! decided from that version. 1.38 would add a feature exchange, which nsh
//! does not speak, so it is never offered. Lix daemons refuse clients below
//! 1.35, Nix daemons below 1.10 (2.8) or 1.18 (2.34).

pub mod client;

use std::fmt;
use std::io::{self, Read, Write};

use crate::error::{Kind, KindOf};
use crate::nix::wire::{WireError, WireReader, WireWriter};

/// The client's greeting.
pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
/// The daemon's answer to it.
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;
/// The version we announce: 1.37 (the last before the feature exchange).
pub const CLIENT_VERSION: u64 = 0x125;

/// The oldest minor version we talk to (as Nix's own client).
pub const MINOR_OLDEST: u64 = 10;
/// From this minor version on, the client sends the obsolete reserve-space word.
pub const MINOR_RESERVE_SPACE: u64 = 11;
/// From this minor version on, the client sends the obsolete CPU-affinity word.
pub const MINOR_CPU_AFFINITY: u64 = 14;
/// From this minor version on, the daemon's errors are structured.
pub const MINOR_STRUCTURED_ERROR: u64 = 26;
/// From this minor version on, QueryValidPaths carries a substitute flag.
pub const MINOR_SUBSTITUTE_FLAG: u64 = 27;
/// From this minor version on, the daemon tells its Nix version.
pub const MINOR_NIX_VERSION: u64 = 33;
/// From this minor version on, the daemon tells whether it trusts us.
pub const MINOR_TRUST: u64 = 35;

/// The daemon's log messages and the end of each answer's preamble.
pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
/// The daemon asks for data (only for operations that upload).
pub const STDERR_READ: u64 = 0x6461_7461;
/// The daemon sends data (only for operations that download).
pub const STDERR_WRITE: u64 = 0x6461_7416;
/// The end of the messages: the answer follows.
pub const STDERR_LAST: u64 = 0x616c_7473;
/// The operation failed: an error follows, and no answer.
pub const STDERR_ERROR: u64 = 0x6378_7470;
/// An activity (a download, a build …) started.
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
/// An activity ended.
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
/// An activity's result (progress, a log line …).
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// The minor part of a version.
pub const fn minor(version: u64) -> u64 {
    version & 0xff
}

/// `1.37` for `0x125`, for messages.
pub fn version_text(version: u64) -> String {
    format!("{}.{}", version >> 8, minor(version))
}

crate::derive::numbered_enum! {
    /// Operation numbers (those nsh sends).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Op: u64 {
        QueryValidPaths = 31,
    }
}

/// The version a conversation uses: the lower of ours and the daemon's.
/// Another major version, or one older than 1.10, is refused.
pub fn negotiate(daemon_version: u64) -> Result<u64, WireError> {
    if daemon_version >> 8 != CLIENT_VERSION >> 8 || minor(daemon_version) < MINOR_OLDEST {
        return Err(WireError::Unexpected(format!(
            "the daemon speaks worker protocol {}; nsh speaks 1.{MINOR_OLDEST} to {}",
            version_text(daemon_version),
            version_text(CLIENT_VERSION)
        )));
    }
    Ok(daemon_version.min(CLIENT_VERSION))
}

/// Client hello: `WORKER_MAGIC_1` and our version, sent together (the
/// daemon answers the magic before it reads the version; a socket holds both).
pub fn write_hello<W: Write>(w: &mut WireWriter<W>) -> io::Result<()> {
    w.u64(WORKER_MAGIC_1)?;
    w.u64(CLIENT_VERSION)
}

/// Daemon hello: `WORKER_MAGIC_2`, then its version. Returns the version.
pub fn read_daemon_hello<R: Read>(r: &mut WireReader<R>) -> Result<u64, WireError> {
    let magic = r.u64()?;
    if magic != WORKER_MAGIC_2 {
        return Err(WireError::Unexpected(format!(
            "not a Nix daemon (magic {magic:#x}, expected {WORKER_MAGIC_2:#x})"
        )));
    }
    r.u64()
}

/// The words that follow the versions, at `version`: no CPU affinity (from
/// 1.14), no reserved space (from 1.11).
pub fn write_obsolete_fields<W: Write>(w: &mut WireWriter<W>, version: u64) -> io::Result<()> {
    if minor(version) >= MINOR_CPU_AFFINITY {
        w.u64(0)?;
    }
    if minor(version) >= MINOR_RESERVE_SPACE {
        w.u64(0)?;
    }
    Ok(())
}

/// Whether the daemon trusts us (`trusted-users`), as it says from 1.35.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// A trusted user.
    Trusted,
    /// Not a trusted user.
    NotTrusted,
}

/// What the daemon tells about itself after the versions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonInfo {
    /// Its Nix version (`2.26.3`), from 1.33.
    pub nix_version: Option<String>,
    /// Whether it trusts us, from 1.35 (and then only if it knows).
    pub trust: Option<Trust>,
}

/// The daemon's words about itself at `version`.
pub fn read_daemon_info<R: Read>(
    r: &mut WireReader<R>,
    version: u64,
) -> Result<DaemonInfo, WireError> {
    let mut info = DaemonInfo::default();
    if minor(version) >= MINOR_NIX_VERSION {
        info.nix_version = Some(r.string()?);
    }
    if minor(version) >= MINOR_TRUST {
        info.trust = match r.u64()? {
            0 => None,
            1 => Some(Trust::Trusted),
            2 => Some(Trust::NotTrusted),
            n => {
                return Err(WireError::Unexpected(format!(
                    "the daemon's trust status is {n} (0, 1 or 2 expected)"
                )))
            }
        };
    }
    Ok(info)
}

/// QueryValidPaths: the paths, then (from 1.27) whether the daemon may
/// substitute the missing ones first.
pub fn write_query_valid_paths<W: Write, S: AsRef<str>>(
    w: &mut WireWriter<W>,
    version: u64,
    paths: &[S],
    substitute: bool,
) -> io::Result<()> {
    w.u64(Op::QueryValidPaths.into())?;
    w.strings(paths.iter().map(std::convert::AsRef::as_ref))?;
    if minor(version) >= MINOR_SUBSTITUTE_FLAG {
        w.bool(substitute)?;
    }
    Ok(())
}

/// A field of an activity or a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// Type 0.
    Int(u64),
    /// Type 1.
    Text(String),
}

/// One message of the daemon's between an operation and its answer
/// (activities and results only from 1.20; older daemons log them as lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stderr {
    /// A log line.
    Next(String),
    /// The end: the answer follows.
    Last,
    /// The operation failed; nothing follows.
    Error(DaemonError),
    /// An activity started.
    StartActivity {
        /// Its id.
        id: u64,
        /// Its verbosity level.
        level: u64,
        /// Its type (Nix's `ActivityType`).
        kind: u64,
        /// What it says.
        text: String,
        /// Its fields.
        fields: Vec<Field>,
        /// The activity it is part of (0: none).
        parent: u64,
    },
    /// An activity ended.
    StopActivity {
        /// Its id.
        id: u64,
    },
    /// An activity's result.
    Result {
        /// The activity's id.
        id: u64,
        /// The result's type (Nix's `ResultType`).
        kind: u64,
        /// Its fields.
        fields: Vec<Field>,
    },
}

/// An error the daemon sent (STDERR_ERROR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonError {
    /// Its message, as the daemon wrote it (terminal colours removed).
    pub message: String,
    /// The traces that explain it, innermost first.
    pub traces: Vec<String>,
    /// The exit status it carries (only in the form before 1.26).
    pub status: Option<u64>,
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        for trace in &self.traces {
            write!(f, "; {trace}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DaemonError {}

/// The daemon refused the operation: asking again gets the same answer.
impl KindOf for DaemonError {
    fn kind(&self) -> Kind {
        Kind::Permanent
    }
}

/// Reads the next message of the daemon's at `version`. STDERR_READ and
/// STDERR_WRITE are errors: no operation nsh sends uploads or downloads.
pub fn read_stderr<R: Read>(r: &mut WireReader<R>, version: u64) -> Result<Stderr, WireError> {
    match r.u64()? {
        STDERR_NEXT => Ok(Stderr::Next(r.string()?)),
        STDERR_LAST => Ok(Stderr::Last),
        STDERR_ERROR => read_error(r, version).map(Stderr::Error),
        STDERR_START_ACTIVITY => Ok(Stderr::StartActivity {
            id: r.u64()?,
            level: r.u64()?,
            kind: r.u64()?,
            text: r.string()?,
            fields: read_fields(r)?,
            parent: r.u64()?,
        }),
        STDERR_STOP_ACTIVITY => Ok(Stderr::StopActivity { id: r.u64()? }),
        STDERR_RESULT => Ok(Stderr::Result {
            id: r.u64()?,
            kind: r.u64()?,
            fields: read_fields(r)?,
        }),
        code @ (STDERR_READ | STDERR_WRITE) => Err(WireError::Unexpected(format!(
            "the daemon wants to {} data ({code:#x}), which no operation nsh sends does",
            if code == STDERR_READ { "read" } else { "write" }
        ))),
        code => Err(WireError::Unexpected(format!(
            "unknown message type {code:#x} from the daemon"
        ))),
    }
}

fn read_fields<R: Read>(r: &mut WireReader<R>) -> Result<Vec<Field>, WireError> {
    let count = r.list_len()?;
    let mut fields = Vec::with_capacity(count.min(64) as usize);
    for _ in 0..count {
        fields.push(match r.u64()? {
            0 => Field::Int(r.u64()?),
            1 => Field::Text(r.string()?),
            other => {
                return Err(WireError::Unexpected(format!(
                    "unknown field type {other} from the daemon"
                )))
            }
        });
    }
    Ok(fields)
}

/// An error at `version`: from 1.26 `"Error"`, level, name (unused),
/// message, no position, the traces (each without a position); before,
/// the message and an exit status.
fn read_error<R: Read>(r: &mut WireReader<R>, version: u64) -> Result<DaemonError, WireError> {
    if minor(version) < MINOR_STRUCTURED_ERROR {
        let message = without_colours(&r.string()?);
        let status = r.u64()?;
        return Ok(DaemonError {
            message,
            traces: Vec::new(),
            status: Some(status),
        });
    }
    let tag = r.string()?;
    if tag != "Error" {
        return Err(WireError::Unexpected(format!(
            "the daemon's error starts with {tag:?}, not \"Error\""
        )));
    }
    let _level = r.u64()?;
    let _name = r.string()?;
    let message = without_colours(&r.string()?);
    no_position(r)?;
    let count = r.list_len()?;
    let mut traces = Vec::with_capacity(count.min(64) as usize);
    for _ in 0..count {
        no_position(r)?;
        traces.push(without_colours(&r.string()?));
    }
    Ok(DaemonError {
        message,
        traces,
        status: None,
    })
}

/// Nix never sends an error position (the field is always 0).
fn no_position<R: Read>(r: &mut WireReader<R>) -> Result<(), WireError> {
    match r.u64()? {
        0 => Ok(()),
        n => Err(WireError::Unexpected(format!(
            "the daemon's error has a position ({n}), which Nix never sends"
        ))),
    }
}

/// `text` without the terminal colour sequences (`ESC [ … m`) Nix puts
/// around the names in its messages.
pub fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("\x1b[") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find(|c: char| !(c.is_ascii_digit() || c == ';')) {
            Some(end) if after[end..].starts_with('m') => rest = &after[end + 1..],
            _ => {
                out.push_str("\x1b[");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests;
