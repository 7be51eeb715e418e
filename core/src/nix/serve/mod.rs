//! The `nix-store --serve` protocol, client side: the pure codec.
//!
//! Every function here reads or writes one message with
//! [`WireReader`]/[`WireWriter`]; the I/O (a child process, an ssh
//! connection, a request file) is [`crate::nix::serve::client`]'s. Which
//! command is in which version, and which Nix removed what:
//! `docs/nsh-push-fetch.md`.
//!
//! The protocol version is `major << 8 | minor`. We announce 2.7 (`0x207`),
//! which Nix 2.8 and later servers accept and answer in; the version a
//! conversation uses is the lower of the server's and ours. Nix 2.8 to 2.34
//! announce 2.7, 2.35 announces 2.8.
//!
//! Which commands a peer has is decided from that version alone
//! ([`has_add_to_store_nar`], [`path_infos_have_nar_hash`]), the way Nix's
//! own ssh store decides. Nix has removed commands without a version bump
//! (ExportPaths in 2.32; ImportPaths in 2.32.0–2.32.1, restored in 2.32.2), so
//! nsh uses only commands every 2.x server it can meet has: QueryValidPaths,
//! QueryPathInfos, DumpStorePath, QueryClosure, BuildDerivation, and
//! AddToStoreNar (≥ 2.5) or, for an older peer, ImportPaths.

pub mod client;
#[cfg(test)]
pub(crate) mod test_server;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use crate::error::{Failure, Kind};
use crate::nix::drv::Drv;
use crate::nix::store_path::{StoreDir, StorePath};
use crate::nix::wire::{WireError, WireReader, WireWriter};
use crate::ticket::BuildOptions;

pub const SERVE_MAGIC_1: u64 = 0x390c_9deb;
pub const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// The version we announce: 2.7.
pub const CLIENT_VERSION: u64 = 0x207;
/// The export stream's per-path marker (`NIXE`).
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

pub const fn major(version: u64) -> u64 {
    version >> 8
}

pub const fn minor(version: u64) -> u64 {
    version & 0xff
}

/// The version a conversation uses: the lower of ours and the server's.
/// Servers of another major version are refused.
pub fn negotiate(server_version: u64) -> Result<u64, WireError> {
    if major(server_version) != major(CLIENT_VERSION) {
        return Err(WireError::Unexpected(format!(
            "the server speaks serve protocol {}.{}; nsh speaks {}.x",
            major(server_version),
            minor(server_version),
            major(CLIENT_VERSION)
        )));
    }
    Ok(server_version.min(CLIENT_VERSION))
}

/// The first minor version whose servers take AddToStoreNar. Nix's own ssh
/// store sends ImportPaths to older peers, and so does nsh.
pub const MINOR_ADD_TO_STORE_NAR: u64 = 5;
/// The first minor version whose QueryPathInfos answers carry the NAR hash
/// (without it a fetched NAR cannot be checked).
pub const MINOR_NAR_HASH: u64 = 4;

/// Whether a conversation at `version` may use AddToStoreNar.
pub const fn has_add_to_store_nar(version: u64) -> bool {
    minor(version) >= MINOR_ADD_TO_STORE_NAR
}

/// Whether QueryPathInfos at `version` tells each path's NAR hash.
pub const fn path_infos_have_nar_hash(version: u64) -> bool {
    minor(version) >= MINOR_NAR_HASH
}

/// `2.7` for `0x207`, for messages.
pub fn version_text(version: u64) -> String {
    format!("{}.{}", major(version), minor(version))
}

crate::derive::numbered_enum! {
    /// Command numbers (those nsh sends). 5, ExportPaths, is left out on
    /// purpose: Nix 2.32 removed it without a version bump, so a client cannot
    /// know whether a peer has it. 6, BuildPaths, nsh has no use for.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Command: u64 {
        QueryValidPaths = 1,
        QueryPathInfos = 2,
        DumpStorePath = 3,
        /// Present in every version except Nix 2.32.0 and 2.32.1.
        ImportPaths = 4,
        QueryClosure = 7,
        BuildDerivation = 8,
        AddToStoreNar = 9,
    }
}

/// Client hello: `SERVE_MAGIC_1`. (The client's version follows once the
/// server's is known: [`write_client_version`].)
pub fn write_hello<W: Write>(w: &mut WireWriter<W>) -> io::Result<()> {
    w.u64(SERVE_MAGIC_1)
}

/// Server hello: `SERVE_MAGIC_2`, then its version. Returns the version.
pub fn read_server_hello<R: Read>(r: &mut WireReader<R>) -> Result<u64, WireError> {
    let magic = r.u64()?;
    if magic != SERVE_MAGIC_2 {
        return Err(WireError::Unexpected(format!(
            "not a nix-store --serve server (magic {magic:#x}, expected {SERVE_MAGIC_2:#x})"
        )));
    }
    r.u64()
}

pub fn write_client_version<W: Write>(w: &mut WireWriter<W>) -> io::Result<()> {
    w.u64(CLIENT_VERSION)
}

pub fn write_query_valid_paths<W: Write, S: AsRef<str>>(
    w: &mut WireWriter<W>,
    paths: &[S],
    lock: bool,
    substitute: bool,
) -> io::Result<()> {
    w.u64(Command::QueryValidPaths.into())?;
    w.bool(lock)?;
    w.bool(substitute)?;
    w.strings(paths.iter().map(std::convert::AsRef::as_ref))
}

pub fn write_query_path_infos<W: Write, S: AsRef<str>>(
    w: &mut WireWriter<W>,
    paths: &[S],
) -> io::Result<()> {
    w.u64(Command::QueryPathInfos.into())?;
    w.strings(paths.iter().map(std::convert::AsRef::as_ref))
}

pub fn write_query_closure<W: Write, S: AsRef<str>>(
    w: &mut WireWriter<W>,
    paths: &[S],
    include_outputs: bool,
) -> io::Result<()> {
    w.u64(Command::QueryClosure.into())?;
    w.bool(include_outputs)?;
    w.strings(paths.iter().map(std::convert::AsRef::as_ref))
}

pub fn write_dump_store_path<W: Write>(w: &mut WireWriter<W>, path: &StorePath) -> io::Result<()> {
    w.u64(Command::DumpStorePath.into())?;
    w.string(path.as_str())
}

/// A store path read off the wire: checked as a ticket's are, a bad one is
/// bytes nsh cannot use (permanent).
fn read_store_path<R: Read>(r: &mut WireReader<R>) -> Result<StorePath, WireError> {
    let text = r.string()?;
    StorePath::parse(&text).map_err(|e| WireError::Unexpected(e.message))
}

/// A list of store paths read off the wire.
pub fn read_store_paths<R: Read>(r: &mut WireReader<R>) -> Result<Vec<StorePath>, WireError> {
    r.strings()?
        .iter()
        .map(|text| StorePath::parse(text).map_err(|e| WireError::Unexpected(e.message)))
        .collect()
}

/// The deriver as the wire has it: `""` for none.
fn read_deriver<R: Read>(r: &mut WireReader<R>) -> Result<Option<StorePath>, WireError> {
    let text = r.string()?;
    if text.is_empty() {
        return Ok(None);
    }
    StorePath::parse(&text)
        .map(Some)
        .map_err(|e| WireError::Unexpected(e.message))
}

fn deriver_text(deriver: Option<&StorePath>) -> &str {
    deriver.map_or("", StorePath::as_str)
}

/// What the store knows about a valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The store path.
    pub path: StorePath,
    /// The derivation that built it, when known (`""` on the wire otherwise).
    pub deriver: Option<StorePath>,
    /// The paths it refers to (itself included when it does).
    pub references: Vec<StorePath>,
    /// The compressed size, where the store knows one (0 otherwise).
    pub download_size: u64,
    /// The size of its NAR.
    pub nar_size: u64,
    /// `sha256:<nix-base32>`.
    pub nar_hash: String,
    /// Content address, `""` for input-addressed paths.
    pub ca: String,
    /// Signatures (`<key name>:<base64>`).
    pub sigs: Vec<String>,
}

impl PathInfo {
    /// The info of `path` with nothing else known: no deriver, no
    /// references, sizes 0, no hash.
    pub fn new(path: StorePath) -> PathInfo {
        PathInfo {
            path,
            deriver: None,
            references: Vec::new(),
            download_size: 0,
            nar_size: 0,
            nar_hash: String::new(),
            ca: String::new(),
            sigs: Vec::new(),
        }
    }
}

/// The reply to QueryPathInfos: one entry per valid path, ended by `""`.
pub fn read_path_infos<R: Read>(
    r: &mut WireReader<R>,
    version: u64,
) -> Result<Vec<PathInfo>, WireError> {
    let mut infos = Vec::new();
    loop {
        let path = r.string()?;
        if path.is_empty() {
            return Ok(infos);
        }
        let path = StorePath::parse(&path).map_err(|e| WireError::Unexpected(e.message))?;
        if infos.len() as u64 >= r.limits().max_list {
            return Err(WireError::TooLong {
                what: "path info list",
                len: infos.len() as u64 + 1,
                max: r.limits().max_list,
            });
        }
        let mut info = PathInfo {
            deriver: read_deriver(r)?,
            references: read_store_paths(r)?,
            download_size: r.u64()?,
            nar_size: r.u64()?,
            ..PathInfo::new(path)
        };
        if minor(version) >= 4 {
            info.nar_hash = r.string()?;
            info.ca = r.string()?;
            info.sigs = r.strings()?;
        }
        infos.push(info);
    }
}

/// AddToStoreNar's header; the NAR follows (streamed by the caller).
pub fn write_add_to_store_nar<W: Write>(w: &mut WireWriter<W>, info: &PathInfo) -> io::Result<()> {
    w.u64(Command::AddToStoreNar.into())?;
    w.string(info.path.as_str())?;
    w.string(deriver_text(info.deriver.as_ref()))?;
    w.string(&info.nar_hash)?;
    w.strings(info.references.iter().map(StorePath::as_str))?;
    w.u64(0)?; // registration time: now
    w.u64(info.nar_size)?;
    w.bool(false)?; // ultimate: not built here
    w.strings(&info.sigs)?;
    w.string(&info.ca)
}

/// The `u64 1` that ends ImportPaths and AddToStoreNar.
pub fn read_ack<R: Read>(r: &mut WireReader<R>, what: &str) -> Result<(), WireError> {
    match r.u64()? {
        1 => Ok(()),
        n => Err(WireError::Unexpected(format!(
            "{what}: the server answered {n}, not 1"
        ))),
    }
}

/// The metadata that follows each NAR in an export stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportTrailer {
    pub path: StorePath,
    pub references: Vec<StorePath>,
    /// `""` on the wire for none.
    pub deriver: Option<StorePath>,
}

impl ExportTrailer {
    /// The trailer that describes `info`'s path in an import stream.
    pub fn for_path(info: &PathInfo) -> ExportTrailer {
        ExportTrailer {
            path: info.path.clone(),
            references: info.references.clone(),
            deriver: info.deriver.clone(),
        }
    }
}

/// Reads what follows a NAR in an export stream.
pub fn read_export_trailer<R: Read>(r: &mut WireReader<R>) -> Result<ExportTrailer, WireError> {
    let magic = r.u64()?;
    if magic != EXPORT_MAGIC {
        return Err(WireError::Unexpected(format!(
            "export stream: expected the marker {EXPORT_MAGIC:#x} after a NAR, got {magic:#x}"
        )));
    }
    let trailer = ExportTrailer {
        path: read_store_path(r)?,
        references: read_store_paths(r)?,
        deriver: read_deriver(r)?,
    };
    // A signature was once possible here; Nix writes 0 and refuses 1.
    match r.u64()? {
        0 => Ok(trailer),
        n => Err(WireError::Unexpected(format!(
            "export stream: signed entries are not supported (flag {n})"
        ))),
    }
}

pub fn write_export_trailer<W: Write>(
    w: &mut WireWriter<W>,
    trailer: &ExportTrailer,
) -> io::Result<()> {
    w.u64(EXPORT_MAGIC)?;
    w.string(trailer.path.as_str())?;
    w.strings(trailer.references.iter().map(StorePath::as_str))?;
    w.string(deriver_text(trailer.deriver.as_ref()))?;
    w.u64(0)
}

/// BuildDerivation: the derivation as a BasicDerivation, its inputSrcs
/// replaced by `input_closure` (the node needs the input paths, not the
/// .drv files), then the build options.
pub fn write_build_derivation<W: Write, S: AsRef<str>>(
    w: &mut WireWriter<W>,
    version: u64,
    drv: &Drv,
    input_closure: &[S],
    options: &BuildOptions,
) -> io::Result<()> {
    w.u64(Command::BuildDerivation.into())?;
    w.string(drv.path.as_str())?;
    write_basic_derivation(w, drv, input_closure)?;
    write_build_options(w, version, options)
}

pub fn write_basic_derivation<W: Write, S: AsRef<str>>(
    w: &mut WireWriter<W>,
    drv: &Drv,
    input_closure: &[S],
) -> io::Result<()> {
    w.u64(drv.outputs.len() as u64)?;
    for (name, output) in &drv.outputs {
        w.string(name)?;
        w.string(output.path.as_ref().map_or("", StorePath::as_str))?;
        w.string(&output.hash_algo)?;
        w.string(&output.hash)?;
    }
    w.strings(input_closure.iter().map(std::convert::AsRef::as_ref))?;
    w.string(&drv.system)?;
    w.string(&drv.builder)?;
    w.strings(&drv.args)?;
    w.u64(drv.env.len() as u64)?;
    for (key, value) in &drv.env {
        w.string(key)?;
        w.bytes(value)?;
    }
    Ok(())
}

pub fn write_build_options<W: Write>(
    w: &mut WireWriter<W>,
    version: u64,
    options: &BuildOptions,
) -> io::Result<()> {
    w.u64(options.max_silent_time)?;
    w.u64(options.timeout)?;
    if minor(version) >= 2 {
        w.u64(options.max_log_size)?;
    }
    if minor(version) >= 3 {
        w.u64(0)?; // nrRepeats
        w.u64(0)?; // enforceDeterminism
    }
    if minor(version) >= 7 {
        w.bool(options.keep_failed)?;
    }
    Ok(())
}

crate::derive::numbered_enum! {
    /// BuildResult statuses, numbered as Nix numbers them; in tickets
    /// (`run.status`) by their kebab-case names.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub enum BuildStatus: u64 {
        /// Built now.
        #[default]
        Built = 0,
        /// Fetched from a substituter.
        Substituted = 1,
        /// The outputs were valid already.
        AlreadyValid = 2,
        /// The builder failed.
        PermanentFailure = 3,
        /// An input was refused.
        InputRejected = 4,
        /// An output was refused (hash mismatch, …).
        OutputRejected = 5,
        /// Worth another try.
        TransientFailure = 6,
        /// Failed before and remembered.
        CachedFailure = 7,
        /// Ran out of time (`timeout`, `max-silent-time`).
        TimedOut = 8,
        /// Anything else, such as a missing system feature.
        MiscFailure = 9,
        /// A dependency failed.
        DependencyFailed = 10,
        /// The log grew past `max-log-size`.
        LogLimitExceeded = 11,
        /// A repeated build differed.
        NotDeterministic = 12,
        /// A resolved derivation's outputs were valid already.
        ResolvesToAlreadyValid = 13,
        /// No substituter had it.
        NoSubstituters = 14,
    }
}

/// The ticket's name (`permanent-failure`), for messages.
impl std::fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::derive::serde_name(self))
    }
}

impl BuildStatus {
    /// What kind of failure this status is; `None` for success.
    ///
    /// TransientFailure is transient; TimedOut is timed out (Nix's own
    /// "timed out" exit); everything else would fail the same way again.
    /// MiscFailure is what a node answers when it lacks a required system
    /// feature: a placement or configuration problem that retrying on the
    /// same kind of node does not fix.
    pub const fn failure_kind(self) -> Option<Kind> {
        match self {
            BuildStatus::Built
            | BuildStatus::Substituted
            | BuildStatus::AlreadyValid
            | BuildStatus::ResolvesToAlreadyValid => None,
            BuildStatus::TransientFailure => Some(Kind::Transient),
            BuildStatus::TimedOut => Some(Kind::TimedOut),
            BuildStatus::PermanentFailure
            | BuildStatus::InputRejected
            | BuildStatus::OutputRejected
            | BuildStatus::CachedFailure
            | BuildStatus::MiscFailure
            | BuildStatus::DependencyFailed
            | BuildStatus::LogLimitExceeded
            | BuildStatus::NotDeterministic
            | BuildStatus::NoSubstituters => Some(Kind::Permanent),
        }
    }

    /// Built, Substituted, AlreadyValid, ResolvesToAlreadyValid: the outputs exist.
    pub const fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

/// The outcome of BuildDerivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    pub status: BuildStatus,
    pub error_msg: String,
    pub times_built: u64,
    pub is_non_deterministic: bool,
    /// Unix seconds.
    pub start_time: u64,
    pub stop_time: u64,
    /// Output name → output path *base name* `<hash>-<name>` (protocol
    /// ≥ 2.6; empty before). Nix 2.8 sends base names, others absolute
    /// paths; [`BuildResult::output_paths`] gives absolute ones.
    pub built_outputs: BTreeMap<String, String>,
}

impl BuildResult {
    /// Output name → output path in `store_dir`; a base name that is not
    /// one of a store path is bad bytes from the node (permanent).
    pub fn output_paths(
        &self,
        store_dir: &StoreDir,
    ) -> Result<BTreeMap<String, StorePath>, Failure> {
        self.built_outputs
            .iter()
            .map(|(name, base)| {
                let path = store_dir.join(base).map_err(|e| {
                    Failure::permanent(format!("built output {name}: {}", e.message))
                })?;
                Ok((name.clone(), path))
            })
            .collect()
    }
}

pub fn read_build_result<R: Read>(
    r: &mut WireReader<R>,
    version: u64,
) -> Result<BuildResult, WireError> {
    let code = r.u64()?;
    let status = BuildStatus::try_from(code)
        .map_err(|code| WireError::Unexpected(format!("unknown build status {code}")))?;
    let mut result = BuildResult {
        status,
        error_msg: r.string()?,
        times_built: 0,
        is_non_deterministic: false,
        start_time: 0,
        stop_time: 0,
        built_outputs: BTreeMap::new(),
    };
    if minor(version) >= 3 {
        result.times_built = r.u64()?;
        result.is_non_deterministic = r.bool()?;
        result.start_time = r.u64()?;
        result.stop_time = r.u64()?;
    }
    if minor(version) >= 6 {
        let count = r.list_len()?;
        for _ in 0..count {
            // 2.6–2.7: "<drv hash>!<output>" → realisation JSON;
            // ≥ 2.8: output name → realisation JSON.
            let key = r.string()?;
            let realisation = r.string()?;
            let output = match key.rsplit_once('!') {
                Some((_, output)) if minor(version) < 8 => output.to_string(),
                _ => key,
            };
            result
                .built_outputs
                .insert(output, realisation_out_path(&realisation)?);
        }
    }
    Ok(result)
}

fn realisation_out_path(json: &str) -> Result<String, WireError> {
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| WireError::Unexpected(format!("a built output is not JSON: {e}")))?;
    let path = value
        .get("outPath")
        .and_then(|p| p.as_str())
        .ok_or_else(|| WireError::Unexpected("a built output has no outPath".into()))?;
    Ok(path.rsplit('/').next().unwrap_or(path).to_string())
}

/// Writes a complete build request as a file: the client's half of a whole
/// conversation (hello, version, QueryValidPaths of the input closure with
/// `lock`, BuildDerivation), for `nix-store --serve --write < request >
/// response` on a node.
///
/// The QueryValidPaths comes first so that the response says which inputs
/// the node had when the build began (a build without them fails on the
/// node, however Nix words it), and so that the node keeps them as
/// temporary GC roots until the build is done.
pub fn write_build_request<W: Write, S: AsRef<str>>(
    to: W,
    drv: &Drv,
    input_closure: &[S],
    options: &BuildOptions,
) -> io::Result<()> {
    let mut w = WireWriter::new(to);
    write_hello(&mut w)?;
    write_client_version(&mut w)?;
    write_query_valid_paths(&mut w, input_closure, true, false)?;
    write_build_derivation(&mut w, CLIENT_VERSION, drv, input_closure, options)?;
    w.flush()
}

/// What the node answered to a build request.
#[derive(Debug, Clone)]
pub struct BuildResponse {
    /// The inputs the node had when the build began (of the closure asked).
    pub inputs_valid: Vec<StorePath>,
    /// The build's result; none when the server ended without one (a bad
    /// request, a missing input on some versions, a killed server).
    pub result: Result<BuildResult, Failure>,
}

/// Parses the response file of such a request: the server's hello and
/// version, the valid inputs, then the BuildResult. Only a response that
/// does not get as far as the inputs is an error.
pub fn read_build_response<R: Read>(from: R) -> Result<BuildResponse, Failure> {
    let mut r = WireReader::new(from);
    let server = read_server_hello(&mut r).map_err(|e| e.fail("reading the build response"))?;
    let version = negotiate(server).map_err(|e| e.fail("reading the build response"))?;
    let inputs_valid =
        read_store_paths(&mut r).map_err(|e| e.fail("reading the node's valid inputs"))?;
    let result = read_build_result(&mut r, version).map_err(|e| e.fail("reading the build result"));
    Ok(BuildResponse {
        inputs_valid,
        result,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::drv;
    use crate::nix::store_path::{test_path, StoreDir};

    use crate::nix::wire::test_bytes::{le, s};

    #[test]
    fn query_valid_paths_bytes() {
        let mut out = Vec::new();
        write_query_valid_paths(&mut WireWriter::new(&mut out), &["/s/p"], true, false).unwrap();
        assert_eq!(out, [le(1), le(1), le(0), le(1), s("/s/p")].concat());
    }

    #[test]
    fn path_infos_at_2_7_and_2_3() {
        const A: &str = "/s/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-a";
        const A_DRV: &str = "/s/1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a-a.drv";
        const B: &str = "/s/2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b-b";
        let entry = [s(A), s(A_DRV), le(1), s(B), le(0), le(120)].concat();
        let v7 = [entry.clone(), s("sha256:xyz"), s(""), le(0), s("")].concat();
        let infos = read_path_infos(&mut WireReader::new(&v7[..]), 0x207).unwrap();
        assert_eq!(
            infos,
            [PathInfo {
                deriver: Some(test_path(A_DRV)),
                references: vec![test_path(B)],
                nar_size: 120,
                nar_hash: "sha256:xyz".into(),
                ..PathInfo::new(test_path(A))
            }]
        );
        let v3 = [entry, s("")].concat();
        let infos = read_path_infos(&mut WireReader::new(&v3[..]), 0x203).unwrap();
        assert_eq!(infos[0].nar_hash, "");
        // No deriver is `""`; a path that is not one is bad bytes.
        let none = [s(A), s(""), le(0), le(0), le(0), s("")].concat();
        let infos = read_path_infos(&mut WireReader::new(&none[..]), 0x203).unwrap();
        assert_eq!(infos[0].deriver, None);
        let bad = [s("/s/a"), s(""), le(0), le(0), le(0), s("")].concat();
        let err = read_path_infos(&mut WireReader::new(&bad[..]), 0x203).unwrap_err();
        assert!(
            err.to_string().contains("\"/s/a\" is not a store path"),
            "{err}"
        );
    }

    #[test]
    fn build_result_at_2_7() {
        let bytes = [
            le(0),
            s(""),
            le(1),
            le(0),
            le(1_700_000_000),
            le(1_700_000_042),
            le(1),
            s("sha256:abcd!out"),
            s(r#"{"id":"sha256:abcd!out","outPath":"/s/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-x-out","signatures":[],"dependentRealisations":{}}"#),
        ]
        .concat();
        let result = read_build_result(&mut WireReader::new(&bytes[..]), 0x207).unwrap();
        assert_eq!(result.status, BuildStatus::Built);
        assert_eq!(result.stop_time - result.start_time, 42);
        assert_eq!(
            result.built_outputs["out"],
            "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-x-out"
        );
        let dir = StoreDir::new("/s").unwrap();
        assert_eq!(
            result.output_paths(&dir).unwrap()["out"],
            "/s/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-x-out"
        );
        // Version 2.2: no times, no outputs.
        let old = [le(3), s("builder failed")].concat();
        let result = read_build_result(&mut WireReader::new(&old[..]), 0x202).unwrap();
        assert_eq!(result.status.to_string(), "permanent-failure");
        assert_eq!(result.error_msg, "builder failed");
        let bad = [le(15), s("")].concat();
        assert!(read_build_result(&mut WireReader::new(&bad[..]), 0x207).is_err());
    }

    #[test]
    fn every_status_has_its_number_and_name() {
        let all: Vec<BuildStatus> = (0..15).map(|n| BuildStatus::try_from(n).unwrap()).collect();
        assert_eq!(BuildStatus::try_from(15), Err(15));
        for (code, status) in all.iter().enumerate() {
            assert_eq!(u64::from(*status), code as u64);
        }
        assert_eq!(
            BuildStatus::try_from(13).unwrap().to_string(),
            "resolves-to-already-valid"
        );
        assert_eq!(
            serde_json::to_string(&BuildStatus::LogLimitExceeded).unwrap(),
            r#""log-limit-exceeded""#
        );
        assert!(BuildStatus::AlreadyValid.is_success() && !BuildStatus::TimedOut.is_success());
        for status in all {
            assert_eq!(
                status.is_success(),
                status.failure_kind().is_none(),
                "{status:?}"
            );
        }
        assert_eq!(BuildStatus::TimedOut.failure_kind(), Some(Kind::TimedOut));
        assert_eq!(
            BuildStatus::TransientFailure.failure_kind(),
            Some(Kind::Transient)
        );
        assert_eq!(
            BuildStatus::MiscFailure.failure_kind(),
            Some(Kind::Permanent)
        );
    }

    #[test]
    fn versions() {
        assert_eq!(negotiate(0x208).unwrap(), 0x207);
        assert_eq!(negotiate(0x205).unwrap(), 0x205);
        assert!(negotiate(0x307).is_err());
        assert_eq!(version_text(0x207), "2.7");
    }

    #[test]
    fn what_each_version_has() {
        // Nix 2.8 – 2.35 all negotiate 2.7 with us: AddToStoreNar and hashes.
        assert!(has_add_to_store_nar(0x207) && path_infos_have_nar_hash(0x207));
        assert!(has_add_to_store_nar(0x205));
        assert!(!has_add_to_store_nar(0x204) && path_infos_have_nar_hash(0x204));
        assert!(!path_infos_have_nar_hash(0x203));
    }

    #[test]
    fn build_options_by_version() {
        let options = BuildOptions {
            max_silent_time: 1,
            timeout: 2,
            max_log_size: 3,
            keep_failed: true,
            extra: crate::ticket::Extra::default(),
        };
        let mut out = Vec::new();
        write_build_options(&mut WireWriter::new(&mut out), 0x207, &options).unwrap();
        assert_eq!(out, [le(1), le(2), le(3), le(0), le(0), le(1)].concat());
        out.clear();
        write_build_options(&mut WireWriter::new(&mut out), 0x206, &options).unwrap();
        assert_eq!(out, [le(1), le(2), le(3), le(0), le(0)].concat());
    }

    #[test]
    fn a_build_request_file() {
        let store = StoreDir::new("/tmp/nshc-try/store").unwrap();
        let bytes =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/a.drv")).unwrap();
        let path = store
            .join("2hhpx3ayp9ddygkfzmxy0q8zcmj7y5hy-a.drv")
            .unwrap();
        let drv = drv::parse(&store, &path, &bytes).unwrap();
        let mut out = Vec::new();
        write_build_request(
            &mut out,
            &drv,
            &["/tmp/nshc-try/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-src"],
            &BuildOptions::default(),
        )
        .unwrap();
        let mut r = WireReader::new(&out[..]);
        assert_eq!(r.u64().unwrap(), SERVE_MAGIC_1);
        assert_eq!(r.u64().unwrap(), CLIENT_VERSION);
        // The inputs, asked with `lock` before the build.
        assert_eq!(r.u64().unwrap(), u64::from(Command::QueryValidPaths));
        assert_eq!((r.u64().unwrap(), r.u64().unwrap()), (1, 0));
        assert_eq!(
            r.strings().unwrap(),
            ["/tmp/nshc-try/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-src"]
        );
        assert_eq!(r.u64().unwrap(), u64::from(Command::BuildDerivation));
        assert_eq!(r.string().unwrap(), path.as_str());
        assert_eq!(r.u64().unwrap(), 1);
        assert_eq!(r.string().unwrap(), "out");
        let out_path = r.string().unwrap();
        assert!(out_path.starts_with("/tmp/nshc-try/store/") && out_path.ends_with("-a"));
        assert_eq!(
            (r.string().unwrap(), r.string().unwrap()),
            (String::new(), String::new())
        );
        assert_eq!(
            r.strings().unwrap(),
            ["/tmp/nshc-try/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-src"]
        );
        assert_eq!(r.string().unwrap(), "x86_64-linux");
        assert_eq!(r.string().unwrap(), "/bin/sh");
        assert_eq!(r.strings().unwrap(), ["-c", "echo a > $out"]);
        let env_len = r.u64().unwrap();
        let env: Vec<(String, String)> = (0..env_len)
            .map(|_| (r.string().unwrap(), r.string().unwrap()))
            .collect();
        assert!(env.contains(&("name".into(), "a".into())));
        assert!(env.contains(&("out".into(), out_path.clone())));
        // BuildOptions at 2.7: six numbers, then the end.
        for _ in 0..6 {
            assert_eq!(r.u64().unwrap(), 0);
        }
        assert!(r.u64().is_err());
    }

    #[test]
    fn a_build_response_file() {
        const SRC: &str = "/s/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-src";
        let bytes = [
            le(SERVE_MAGIC_2),
            le(0x207),
            le(1),
            s(SRC),
            le(8),
            s("timed out after 5 seconds"),
            le(1),
            le(0),
            le(1),
            le(6),
            le(0),
        ]
        .concat();
        let response = read_build_response(&bytes[..]).unwrap();
        assert_eq!(response.inputs_valid, [test_path(SRC)]);
        let result = response.result.unwrap();
        assert_eq!(result.status, BuildStatus::TimedOut);
        assert_eq!(result.error_msg, "timed out after 5 seconds");
        let err = read_build_response(&le(7)[..]).unwrap_err();
        assert!(
            err.message.contains("not a nix-store --serve server"),
            "{}",
            err.message
        );
        let err = read_build_response(&le(SERVE_MAGIC_2)[..]).unwrap_err();
        assert_eq!(err.kind, crate::Kind::Transient);
        // The inputs, then nothing: the result is what is missing.
        let cut = [le(SERVE_MAGIC_2), le(0x207), le(0)].concat();
        let response = read_build_response(&cut[..]).unwrap();
        assert!(response.inputs_valid.is_empty());
        let err = response.result.unwrap_err();
        assert!(err.message.contains("build result"), "{}", err.message);
    }

    proptest::proptest! {
        /// Decoders given arbitrary bytes return an error or a value, never
        /// panic, whatever version is in use.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512), minor in 0u64..10) {
            let version = 0x200 | minor;
            let _ = read_path_infos(&mut WireReader::new(&bytes[..]), version);
            let _ = read_build_result(&mut WireReader::new(&bytes[..]), version);
            let _ = read_export_trailer(&mut WireReader::new(&bytes[..]));
            let _ = read_build_response(&bytes[..]);
        }
    }
}
