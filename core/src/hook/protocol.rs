//! Nix's build-hook protocol, as bytes: a pure codec, no process and no I/O
//! beyond the `Read`/`Write` it is handed.
//!
//! The daemon → hook direction is binary (worker-protocol framing): the
//! settings dump, then `try` messages until one is accepted (or EOF), then,
//! after `# accept`, the input closure and the wanted outputs. The hook →
//! daemon direction is text lines on stderr: one reply per `try`, and `@nix`
//! JSON log lines. The protocol as nsh meets it on each Nix: `docs/hook.md`;
//! byte-exact transcripts: `core/tests/fixtures/hook/`.
//!
//! Every read is bounded (string length, list length, settings count), so a
//! garbled or hostile stream ends in a [`ProtoError`], never in a panic, a hang
//! on a slice, or an allocation larger than what was actually received.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};

use serde_json::{json, Value};

use crate::error::{Kind, KindOf};
use crate::nix::store_path::StorePath;

/// The longest string accepted (a setting value, a store path, a feature).
pub const MAX_STRING: u64 = 1 << 20;
/// The most settings accepted in the dump (Nix 2.8 sends 91).
pub const MAX_SETTINGS: usize = 4096;
/// The most strings accepted in one list (the input closure is the longest).
pub const MAX_LIST: u64 = 1 << 20;

/// What went wrong reading the daemon's side of the protocol.
#[derive(Debug)]
pub enum ProtoError {
    /// The stream ended in the middle of a message.
    Truncated(&'static str),
    /// The bytes are not what the protocol allows here.
    Malformed(String),
    /// Reading failed.
    Io(io::Error),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Truncated(what) => {
                write!(f, "the daemon's stream ended in the middle of {what}")
            }
            ProtoError::Malformed(what) => write!(f, "bad build-hook message: {what}"),
            ProtoError::Io(e) => write!(f, "reading from the daemon: {e}"),
        }
    }
}

impl std::error::Error for ProtoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProtoError::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// A daemon that stops answering is transient; bytes the protocol does not
/// allow are bad input.
impl KindOf for ProtoError {
    fn kind(&self) -> Kind {
        match self {
            ProtoError::Io(_) => Kind::Transient,
            _ => Kind::Input,
        }
    }
}

/// The framing ([`crate::nix::wire`]) as the hook uses it: bounded reads with the
/// hook's limits, errors as [`ProtoError`], and EOF told apart when it falls
/// exactly between two messages (the daemon's way of saying "no more work").
mod hook_wire {
    use super::{io, ProtoError, Read, MAX_LIST, MAX_STRING};
    use crate::nix::wire::{Limits, WireError, WireReader, WireWriter};

    const LIMITS: Limits = Limits {
        max_string: MAX_STRING,
        max_list: MAX_LIST,
        max_message: Limits::DEFAULT.max_message,
    };

    fn proto_error(e: WireError, what: &'static str) -> ProtoError {
        match e {
            WireError::Eof => ProtoError::Truncated(what),
            WireError::Io(e) => ProtoError::Io(e),
            other => ProtoError::Malformed(format!("{what}: {other}")),
        }
    }

    /// A u64, or `None` on EOF exactly at a message boundary.
    pub fn read_u64_or_eof(
        r: &mut impl Read,
        what: &'static str,
    ) -> Result<Option<u64>, ProtoError> {
        let mut buf = [0u8; 8];
        let mut filled = 0;
        while filled < buf.len() {
            match r.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => return Err(ProtoError::Truncated(what)),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ProtoError::Io(e)),
            }
        }
        Ok(Some(u64::from_le_bytes(buf)))
    }

    pub fn read_u64(r: &mut impl Read, what: &'static str) -> Result<u64, ProtoError> {
        WireReader::with_limits(r, LIMITS)
            .u64()
            .map_err(|e| proto_error(e, what))
    }

    pub fn read_string(r: &mut impl Read, what: &'static str) -> Result<String, ProtoError> {
        WireReader::with_limits(r, LIMITS)
            .string()
            .map_err(|e| proto_error(e, what))
    }

    pub fn read_strings(r: &mut impl Read, what: &'static str) -> Result<Vec<String>, ProtoError> {
        WireReader::with_limits(r, LIMITS)
            .strings()
            .map_err(|e| proto_error(e, what))
    }

    // Writing to a Vec cannot fail: its io::Result is always Ok.
    pub fn write_u64(w: &mut Vec<u8>, n: u64) {
        let _ = WireWriter::new(w).u64(n);
    }

    pub fn write_string(w: &mut Vec<u8>, s: &str) {
        let _ = WireWriter::new(w).string(s);
    }

    pub fn write_strings(w: &mut Vec<u8>, list: &[String]) {
        let _ = WireWriter::new(w).strings(list);
    }
}

use hook_wire::{
    read_string, read_strings, read_u64, read_u64_or_eof, write_string, write_strings, write_u64,
};

/// The daemon's settings, as dumped to the hook: name → value (lists
/// space-joined, booleans `true`/`false`).
///
/// Nix sends every setting; Lix 2.91–2.93 only the overridden ones, so
/// every accessor falls back to Nix's default (and `NixDefaults` has the
/// machine-dependent ones). Values may be secret
/// (`access-tokens`): never log or display the map.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// Setting name → value, as the daemon sent them.
    pub values: BTreeMap<String, String>,
}

impl fmt::Debug for Settings {
    // Names only: values may hold tokens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("names", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Settings {
    /// The value of setting `name`, if the daemon sent it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    fn get_u64(&self, name: &str) -> u64 {
        self.get(name)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    fn get_list(&self, name: &str) -> Vec<String> {
        self.get(name)
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// `store`: the local store URI (default `auto`).
    pub fn store(&self) -> &str {
        match self.get("store") {
            Some(s) if !s.is_empty() => s,
            _ => "auto",
        }
    }
    /// `system`: the daemon's own platform; absent from a partial dump, the
    /// caller falls back to the `try`'s system check alone.
    pub fn system(&self) -> Option<&str> {
        self.get("system").filter(|s| !s.is_empty())
    }
    /// `extra-platforms`.
    pub fn extra_platforms(&self) -> Vec<String> {
        self.get_list("extra-platforms")
    }
    /// `system-features`: what the daemon can build locally.
    pub fn system_features(&self) -> Vec<String> {
        self.get_list("system-features")
    }
    /// `max-silent-time` in seconds, 0 = no limit.
    pub fn max_silent_time(&self) -> u64 {
        self.get_u64("max-silent-time")
    }
    /// `timeout` in seconds, 0 = no limit.
    pub fn timeout(&self) -> u64 {
        self.get_u64("timeout")
    }
    /// `max-build-log-size` in bytes, 0 = no limit. (Nix has always dumped
    /// it under this name; `max-log-size` is only the CLI flag `--max-log-size`.)
    pub fn max_log_size(&self) -> u64 {
        self.get_u64("max-build-log-size")
    }
    /// `keep-failed`.
    pub fn keep_failed(&self) -> bool {
        self.get("keep-failed") == Some("true")
    }

    /// Reads the dump: `repeat { u64 1; string name; string value }; u64 0`.
    pub fn read(r: &mut impl Read) -> Result<Settings, ProtoError> {
        let mut values = BTreeMap::new();
        loop {
            match read_u64(r, "the settings")? {
                0 => return Ok(Settings { values }),
                1 => {}
                n => {
                    return Err(ProtoError::Malformed(format!(
                        "the settings: expected 0 or 1 before a setting, got {n}"
                    )))
                }
            }
            if values.len() >= MAX_SETTINGS {
                return Err(ProtoError::Malformed(format!(
                    "the settings: more than {MAX_SETTINGS}"
                )));
            }
            let name = read_string(r, "a setting's name")?;
            let value = read_string(r, "a setting's value")?;
            values.insert(name, value);
        }
    }

    /// The dump as the daemon writes it (for the fallback hook, and tests).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in &self.values {
            write_u64(&mut out, 1);
            write_string(&mut out, name);
            write_string(&mut out, value);
        }
        write_u64(&mut out, 0);
        out
    }
}

/// What a daemon assumes for the settings a partial dump leaves out (Lix
/// 2.91–2.93 send only the overridden ones): Nix's defaults on this machine,
/// by Nix's own rules (`Settings::getDefaultSystemFeatures` and
/// `getDefaultExtraPlatforms` in libstore/globals.cc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixDefaults {
    /// `system`: the platform the daemon was built for.
    pub system: String,
    pub extra_platforms: Vec<String>,
    pub system_features: Vec<String>,
}

impl NixDefaults {
    /// For a daemon of `system` (`kvm`: whether `/dev/kvm` is usable there).
    /// The `x86_64-v*-linux` levels Nix adds from the CPU are left out: no
    /// cluster is ever asked for them that would not also be asked for
    /// `x86_64-linux`.
    pub fn for_system(system: &str, kvm: bool) -> NixDefaults {
        let linux = system.ends_with("-linux");
        let mut features: Vec<String> = ["nixos-test", "benchmark", "big-parallel"]
            .map(String::from)
            .to_vec();
        if linux {
            features.push("uid-range".into());
        }
        if linux && kvm {
            features.push("kvm".into());
        }
        NixDefaults {
            system: system.to_string(),
            extra_platforms: match system {
                "x86_64-linux" => vec!["i686-linux".into()],
                _ => vec![],
            },
            system_features: features,
        }
    }

    /// The defaults of a daemon on this machine: the platform nsh was built
    /// for, spelt as Nix spells it, and `kvm` if `/dev/kvm` is usable.
    pub fn of_this_machine() -> NixDefaults {
        let arch = match std::env::consts::ARCH {
            "x86" => "i686",
            "arm" => "armv7l",
            "powerpc64" if cfg!(target_endian = "little") => "powerpc64le",
            other => other,
        };
        let os = match std::env::consts::OS {
            "macos" => "darwin",
            other => other,
        };
        let kvm = crate::sys::fs::is_read_writable(std::path::Path::new("/dev/kvm"));
        NixDefaults::for_system(&format!("{arch}-{os}"), kvm)
    }
}

/// One `try`: may the hook build this derivation?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Try {
    /// The daemon has a free local build slot now.
    pub am_willing: bool,
    /// The derivation's `system`.
    pub needed_system: String,
    /// The `.drv` store path.
    pub drv_path: StorePath,
    /// `requiredSystemFeatures`.
    pub required_features: Vec<String>,
}

impl Try {
    /// The message as the daemon writes it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        write_string(&mut out, "try");
        write_u64(&mut out, u64::from(self.am_willing));
        write_string(&mut out, &self.needed_system);
        write_string(&mut out, self.drv_path.as_str());
        write_strings(&mut out, &self.required_features);
        out
    }
}

/// What the daemon sends after the settings, until the hook accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A derivation the daemon offers to this hook.
    Try(Try),
    /// The daemon closed stdin: no more work; the hook exits 0.
    Eof,
}

impl Request {
    /// Reads the next request.
    pub fn read(r: &mut impl Read) -> Result<Request, ProtoError> {
        // EOF is only clean at a message boundary: peek the length word.
        let Some(len) = read_u64_or_eof(r, "a try message")? else {
            return Ok(Request::Eof);
        };
        if len != 3 {
            return Err(ProtoError::Malformed(format!(
                "expected the word `try` (length 3), got a string of length {len}"
            )));
        }
        let mut word = [0u8; 8];
        r.read_exact(&mut word)
            .map_err(|_| ProtoError::Truncated("a try message"))?;
        if &word != b"try\0\0\0\0\0" {
            return Err(ProtoError::Malformed(format!(
                "expected the word `try`, got {:?}",
                String::from_utf8_lossy(&word[..3])
            )));
        }
        let am_willing = match read_u64(r, "a try message")? {
            0 => false,
            1 => true,
            n => return Err(ProtoError::Malformed(format!("amWilling = {n}"))),
        };
        Ok(Request::Try(Try {
            am_willing,
            needed_system: read_string(r, "the try's system")?,
            drv_path: read_string(r, "the try's derivation").and_then(|path| {
                StorePath::parse(&path).map_err(|e| ProtoError::Malformed(e.message))
            })?,
            required_features: read_strings(r, "the try's required features")?,
        }))
    }
}

/// What the daemon sends after `# accept`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The input closure (store paths; not the `.drv`).
    pub inputs: Vec<String>,
    /// The wanted outputs: names since Nix 2.4 (paths up to 2.3).
    pub wanted_outputs: Vec<String>,
}

impl Accepted {
    /// Reads what follows `# accept`: the inputs and the wanted outputs.
    pub fn read(r: &mut impl Read) -> Result<Accepted, ProtoError> {
        Ok(Accepted {
            inputs: read_strings(r, "the inputs")?,
            wanted_outputs: read_strings(r, "the wanted outputs")?,
        })
    }

    /// The message as the daemon writes it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        write_strings(&mut out, &self.inputs);
        write_strings(&mut out, &self.wanted_outputs);
        out
    }
}

/// The hook's answer to a `try`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The hook builds it; `machine` is shown to the user (`building … on '<machine>'`).
    Accept {
        /// The name Nix shows (`slurm://<cluster>`).
        machine: String,
    },
    /// Build it locally or elsewhere; the next `try` comes to this hook.
    Decline,
    /// Ask again later (after `build-poll-interval`).
    Postpone,
    /// No more `try`s to any hook in this build.
    DeclinePermanently,
}

impl Reply {
    /// The bytes, to be written to stderr in ONE write: the accept line and
    /// the machine line must not be split by another writer's line.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Reply::Accept { machine } => {
                // A newline in the name would end the reply early.
                let machine: String = machine
                    .chars()
                    .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
                    .collect();
                format!("# accept\n{machine}\n").into_bytes()
            }
            Reply::Decline => b"# decline\n".to_vec(),
            Reply::Postpone => b"# postpone\n".to_vec(),
            Reply::DeclinePermanently => b"# decline-permanently\n".to_vec(),
        }
    }

    /// Parses a reply as the daemon would (for the fallback hook's answers).
    /// After `# accept` the next line is the machine name; the caller reads it.
    pub fn parse(line: &str) -> Option<ReplyWord> {
        match line.trim_end_matches('\n') {
            "# accept" => Some(ReplyWord::Accept),
            "# decline" => Some(ReplyWord::Decline),
            "# postpone" => Some(ReplyWord::Postpone),
            "# decline-permanently" => Some(ReplyWord::DeclinePermanently),
            _ => None,
        }
    }
}

/// The first line of a reply, as read back (the accept's machine name is on
/// the next line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyWord {
    Accept,
    Decline,
    Postpone,
    DeclinePermanently,
}

crate::derive::numbered_enum! {
    /// Nix's verbosity levels (`lvlError` … `lvlVomit`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    pub enum Verbosity: u8 {
        Error = 0,
        Warn = 1,
        Notice = 2,
        Info = 3,
        Talkative = 4,
        Chatty = 5,
        Debug = 6,
        Vomit = 7,
    }
}

impl Verbosity {
    /// From the hook's argv (`"3"`); out of range saturates.
    pub fn parse(s: &str) -> Option<Verbosity> {
        let n: u64 = s.trim().parse().ok()?;
        let n = u8::try_from(n)
            .unwrap_or(u8::MAX)
            .min(Verbosity::Vomit.into());
        Verbosity::try_from(n).ok()
    }
}

crate::derive::numbered_enum! {
    /// Activity types (Nix's `ActivityType`), the ones nsh reports.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ActivityType: u32 {
        Unknown = 0,
        CopyPath = 100,
        FileTransfer = 101,
        CopyPaths = 103,
        Build = 105,
    }
}

crate::derive::numbered_enum! {
    /// Result types (Nix's `ResultType`), the ones nsh reports.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ResultType: u32 {
        BuildLogLine = 101,
        SetPhase = 104,
        /// Fields `[done, expected, running, failed]`.
        Progress = 105,
    }
}

/// A field of an activity: Nix accepts integers and strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Int(u64),
    Str(String),
}

impl From<u64> for Field {
    fn from(n: u64) -> Field {
        Field::Int(n)
    }
}
impl From<&str> for Field {
    fn from(s: &str) -> Field {
        Field::Str(s.to_string())
    }
}
impl From<String> for Field {
    fn from(s: String) -> Field {
        Field::Str(s)
    }
}

fn fields_json(fields: &[Field]) -> Value {
    Value::Array(
        fields
            .iter()
            .map(|f| match f {
                Field::Int(n) => json!(n),
                Field::Str(s) => json!(s),
            })
            .collect(),
    )
}

/// One `@nix` JSON log line (for stderr, or fd 4 for `setPhase`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogLine {
    Msg {
        level: Verbosity,
        msg: String,
    },
    Start {
        id: u64,
        level: Verbosity,
        kind: ActivityType,
        text: String,
        parent: u64,
        fields: Vec<Field>,
    },
    // The codec has Nix's whole `@nix` vocabulary; the hook reports with
    // `msg`, `start` and `stop` today, the tests cover the rest.
    #[cfg_attr(not(test), allow(dead_code))]
    Result {
        id: u64,
        kind: ResultType,
        fields: Vec<Field>,
    },
    Stop {
        id: u64,
    },
    /// Sets the build phase shown in the UI (written to the build log, fd 4).
    #[cfg_attr(not(test), allow(dead_code))]
    SetPhase {
        phase: String,
    },
}

impl LogLine {
    /// `@nix {json}\n`, one line (JSON escapes every newline in the text).
    pub fn to_line(&self) -> String {
        let value = match self {
            LogLine::Msg { level, msg } => {
                json!({"action": "msg", "level": u8::from(*level), "msg": msg})
            }
            LogLine::Start {
                id,
                level,
                kind,
                text,
                parent,
                fields,
            } => json!({
                "action": "start", "id": id, "level": u8::from(*level), "type": u32::from(*kind),
                "text": text, "parent": parent, "fields": fields_json(fields),
            }),
            LogLine::Result { id, kind, fields } => json!({
                "action": "result", "id": id, "type": u32::from(*kind), "fields": fields_json(fields),
            }),
            LogLine::Stop { id } => json!({"action": "stop", "id": id}),
            LogLine::SetPhase { phase } => json!({"action": "setPhase", "phase": phase}),
        };
        format!("@nix {value}\n")
    }

    /// Parses an `@nix` line (for tests and for reading a relayed stream).
    pub fn parse(line: &str) -> Option<Value> {
        let json = line.trim_end().strip_prefix("@nix ")?;
        serde_json::from_str(json).ok()
    }
}

/// Writes one line in one `write` call, so lines from concurrent writers to
/// the same pipe (up to `PIPE_BUF`) never interleave.
pub fn write_line(w: &mut impl Write, line: &[u8]) -> io::Result<()> {
    w.write_all(line)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECLINE: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hook/nix-2.8-decline.bin"
    ));
    const ACCEPT: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hook/nix-2.8-accept.bin"
    ));
    const ACCEPT_2_34: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hook/nix-2.34-accept.bin"
    ));

    #[test]
    fn a_real_nix_2_8_decline_transcript() {
        let mut r = DECLINE;
        let settings = Settings::read(&mut r).unwrap();
        assert_eq!(settings.values.len(), 91);
        assert_eq!(settings.store(), "auto");
        assert_eq!(settings.system(), Some("x86_64-linux"));
        assert_eq!(settings.max_silent_time(), 0);
        assert!(!settings.keep_failed());
        assert_eq!(settings.get("build-hook"), Some("/tmp/hookcap/decline.sh"));
        let request = Request::read(&mut r).unwrap();
        assert_eq!(
            request,
            Request::Try(Try {
                am_willing: true,
                needed_system: "x86_64-linux".into(),
                drv_path: StorePath::parse(
                    "/nix/store/ln651pxapnxq10gd3b4gp2pk710hl9qj-nsh-hook-dep.drv"
                )
                .unwrap(),
                required_features: vec![],
            })
        );
        // The derivation was then built locally and the daemon closed stdin.
        assert_eq!(Request::read(&mut r).unwrap(), Request::Eof);
    }

    #[test]
    fn a_real_nix_2_8_accept_transcript() {
        let mut r = ACCEPT;
        let settings = Settings::read(&mut r).unwrap();
        assert_eq!(settings.system_features(), vec!["big-parallel"]);
        assert_eq!(
            settings.extra_platforms(),
            vec![
                "i686-linux",
                "x86_64-v1-linux",
                "x86_64-v2-linux",
                "x86_64-v3-linux"
            ]
        );
        let Request::Try(t) = Request::read(&mut r).unwrap() else {
            panic!("expected a try")
        };
        assert_eq!(t.required_features, vec!["big-parallel"]);
        assert!(t.am_willing);
        let accepted = Accepted::read(&mut r).unwrap();
        assert_eq!(
            accepted.inputs,
            vec!["/nix/store/vh2m0g9jsj81vrkr4m2sq2jz375ykp01-nsh-hook-dep"]
        );
        assert_eq!(accepted.wanted_outputs, vec!["doc", "out"]);
        assert!(r.is_empty(), "nothing after the wanted outputs");
    }

    #[test]
    fn encoding_reproduces_the_transcripts_byte_for_byte() {
        let mut r = ACCEPT;
        let settings = Settings::read(&mut r).unwrap();
        let Request::Try(t) = Request::read(&mut r).unwrap() else {
            panic!()
        };
        let accepted = Accepted::read(&mut r).unwrap();
        let mut again = settings.to_bytes();
        again.extend(t.to_bytes());
        again.extend(accepted.to_bytes());
        assert_eq!(again, ACCEPT);
    }

    #[test]
    fn a_real_nix_2_34_accept_transcript() {
        let mut r = ACCEPT_2_34;
        let settings = Settings::read(&mut r).unwrap();
        assert_eq!(settings.values.len(), 122);
        assert_eq!(settings.store(), "auto");
        assert_eq!(settings.system(), Some("x86_64-linux"));
        assert_eq!(settings.get("max-build-log-size"), Some("0"));
        assert_eq!(settings.get("max-log-size"), None, "not a setting's name");
        assert_eq!(settings.system_features(), vec!["big-parallel"]);
        let Request::Try(t) = Request::read(&mut r).unwrap() else {
            panic!("expected a try")
        };
        assert!(t.drv_path.ends_with("-nsh-hook-top.drv"));
        assert_eq!(t.required_features, vec!["big-parallel"]);
        let accepted = Accepted::read(&mut r).unwrap();
        assert_eq!(accepted.wanted_outputs, vec!["doc", "out"]);
        assert!(r.is_empty());
        let mut again = settings.to_bytes();
        again.extend(t.to_bytes());
        again.extend(accepted.to_bytes());
        assert_eq!(again, ACCEPT_2_34, "byte for byte");
    }

    /// Lix 2.91–2.93 dump only the settings that were overridden (its
    /// nix.conf counts as defaults): here the daemon's NIX_CONFIG gave
    /// `build-hook` and a trusted client `--max-log-size` and
    /// `--option keep-failed true`. Then one try, the accept's inputs and
    /// outputs. Written word by word as the daemon writes them.
    #[test]
    fn a_lix_dump_of_only_the_overridden_settings() {
        use crate::nix::wire::test_bytes::{le, s};
        let drv = "/nix/store/1cj0fhkr5qn18x1zz61vdjrb58cfnzp5-hello.drv";
        let transcript = [
            le(1),
            s("build-hook"),
            s("/usr/local/bin/nsh-hook"),
            le(1),
            s("keep-failed"),
            s("true"),
            le(1),
            s("max-build-log-size"),
            s("1048576"),
            le(0),
            s("try"),
            le(1),
            s("x86_64-linux"),
            s(drv),
            le(0),
            le(1),
            s("/nix/store/vh2m0g9jsj81vrkr4m2sq2jz375ykp01-dep"),
            le(1),
            s("out"),
        ]
        .concat();
        let mut r = &transcript[..];
        let settings = Settings::read(&mut r).unwrap();
        assert_eq!(settings.values.len(), 3);
        // What the dump left out is Nix's default.
        assert_eq!(settings.store(), "auto");
        assert_eq!(settings.system(), None);
        assert_eq!((settings.max_silent_time(), settings.timeout()), (0, 0));
        // What it has is used.
        assert_eq!(settings.max_log_size(), 1 << 20);
        assert!(settings.keep_failed());
        let Request::Try(t) = Request::read(&mut r).unwrap() else {
            panic!("expected a try")
        };
        assert_eq!((t.drv_path.as_str(), t.am_willing), (drv, true));
        assert!(t.required_features.is_empty());
        let accepted = Accepted::read(&mut r).unwrap();
        assert_eq!(accepted.wanted_outputs, vec!["out"]);
        assert!(r.is_empty());
        let mut again = settings.to_bytes();
        again.extend(t.to_bytes());
        again.extend(accepted.to_bytes());
        assert_eq!(again, transcript, "byte for byte");
        // Nothing overridden at all: the dump is its end marker alone.
        let empty = le(0);
        let settings = Settings::read(&mut &empty[..]).unwrap();
        assert!(settings.values.is_empty());
        assert_eq!(settings.to_bytes(), empty);
    }

    #[test]
    fn a_partial_settings_dump_falls_back_to_defaults() {
        let mut settings = Settings::default();
        settings
            .values
            .insert("max-silent-time".into(), "60".into());
        let bytes = settings.to_bytes();
        let read = Settings::read(&mut &bytes[..]).unwrap();
        assert_eq!(read.max_silent_time(), 60);
        assert_eq!(read.timeout(), 0);
        assert_eq!(read.store(), "auto");
        assert_eq!(read.system(), None);
        assert!(read.system_features().is_empty());
    }

    #[test]
    fn settings_debug_output_shows_no_values() {
        let mut settings = Settings::default();
        settings
            .values
            .insert("access-tokens".into(), "github.com=SECRET".into());
        assert!(!format!("{settings:?}").contains("SECRET"));
    }

    #[test]
    fn replies_are_exact() {
        assert_eq!(
            Reply::Accept {
                machine: "slurm://main".into()
            }
            .to_bytes(),
            b"# accept\nslurm://main\n"
        );
        assert_eq!(
            Reply::Accept {
                machine: "a\nb".into()
            }
            .to_bytes(),
            b"# accept\na b\n"
        );
        assert_eq!(Reply::Decline.to_bytes(), b"# decline\n");
        assert_eq!(Reply::Postpone.to_bytes(), b"# postpone\n");
        assert_eq!(
            Reply::DeclinePermanently.to_bytes(),
            b"# decline-permanently\n"
        );
        assert_eq!(Reply::parse("# accept\n"), Some(ReplyWord::Accept));
        assert_eq!(Reply::parse("# nonsense"), None);
    }

    #[test]
    fn log_lines() {
        insta::assert_snapshot!([
            LogLine::Msg {
                level: Verbosity::Error,
                msg: "nsh: slurmrestd: HTTP 503\nretry later".into()
            },
            LogLine::Start {
                id: 7,
                level: Verbosity::Info,
                kind: ActivityType::Build,
                text: "building on node1 (Slurm job 42)".into(),
                parent: 0,
                fields: vec![
                    "/nix/store/x-a.drv".into(),
                    "node1 (job 42)".into(),
                    1.into(),
                    1.into()
                ],
            },
            LogLine::Result {
                id: 8,
                kind: ResultType::Progress,
                fields: vec![1.into(), 3.into(), 0.into(), 0.into()]
            },
            LogLine::Stop { id: 7 },
            LogLine::SetPhase {
                phase: "buildPhase".into()
            },
        ]
        .iter()
        .map(LogLine::to_line)
        .collect::<String>());
    }

    #[test]
    fn truncations_and_garbage_are_clean_errors() {
        let full = ACCEPT;
        // Every prefix of a real transcript either parses or errors cleanly.
        for cut in 0..full.len() {
            let mut r = &full[..cut];
            if Settings::read(&mut r).is_ok() {
                match Request::read(&mut r) {
                    Ok(Request::Try(_)) => {
                        let _ = Accepted::read(&mut r);
                    }
                    Ok(Request::Eof) => assert_eq!(r.len(), 0),
                    Err(_) => {}
                }
            }
        }
        // A huge announced length does not allocate.
        let mut huge = Vec::new();
        write_u64(&mut huge, 1);
        write_u64(&mut huge, u64::MAX);
        assert!(matches!(
            Settings::read(&mut &huge[..]),
            Err(ProtoError::Malformed(_))
        ));
        let mut bad_word = Vec::new();
        write_string(&mut bad_word, "yes");
        assert!(Request::read(&mut &bad_word[..]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            let mut r = &bytes[..];
            if Settings::read(&mut r).is_ok() {
                while let Ok(Request::Try(_)) = Request::read(&mut r) {}
            }
            let _ = Accepted::read(&mut &bytes[..]);
        }

        #[test]
        fn a_mutated_real_transcript_never_panics(
            flips in proptest::collection::vec((0usize..ACCEPT.len(), proptest::num::u8::ANY), 1..8),
            cut in 0usize..ACCEPT.len() + 1,
        ) {
            let mut bytes = ACCEPT.to_vec();
            for (at, value) in flips {
                bytes[at] = value;
            }
            let mut r = &bytes[..cut];
            if Settings::read(&mut r).is_ok() {
                if let Ok(Request::Try(_)) = Request::read(&mut r) {
                    let _ = Accepted::read(&mut r);
                }
            }
        }

        #[test]
        fn a_try_round_trips(
            am_willing: bool,
            system in "[a-z0-9_-]{0,20}",
            drv in "(/[a-z]{1,8}){1,3}/[0-9a-df-np-sv-z]{32}-[a-z0-9][a-z0-9+._?=-]{0,20}\\.drv",
            features in proptest::collection::vec("[a-z-]{0,12}", 0..5),
        ) {
            let drv_path = StorePath::parse(&drv).unwrap();
            let t = Try { am_willing, needed_system: system, drv_path, required_features: features };
            let bytes = t.to_bytes();
            proptest::prop_assert_eq!(Request::read(&mut &bytes[..]).unwrap(), Request::Try(t));
        }
    }
}
