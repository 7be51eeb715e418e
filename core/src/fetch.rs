//! `nsh-fetch`: copy the built outputs (and whatever of their closure the
//! local store lacks) from the node into the local store, then let the job
//! end.
//!
//! The node exports the paths (ExportPaths over the same kind of serve
//! connection `nsh-push` uses); every NAR is checked against the hash and
//! size the node's database records before the path may become valid here.
//!
//! While a build hook runs, the Nix daemon holds `<output>.lock` on every
//! wanted output, so a plain `nix-store --import` of an output would wait for
//! the daemon, which waits for the hook: a deadlock
//! (`reference/nix-build-hook.md`, "Importing outputs"). Two ways around it
//! ([`ImportMethod`]):
//!
//! * `held-locks` (Nix ≤ 2.28, Lix): `nix-store --import` against the local
//!   store directly, with `NIX_HELD_LOCKS` naming the outputs, so it does not
//!   take their locks again;
//! * `load-db` (every version, the only way on Nix ≥ 2.29): we unpack each
//!   NAR ourselves into a temporary name in the store directory (hashing it on
//!   the way), give it the store's canonical metadata, rename it into place
//!   and register it with `nix-store --load-db`. Paths that are not outputs
//!   are locked the way Nix locks them while we do that.
//!
//! A truncated or corrupt stream never leaves a partial or invalid path: with
//! `held-locks` the entry is refused before `nix-store --import` sees its
//! trailer (it registers a path only after the trailer); with `load-db` the
//! temporary tree is removed and nothing is renamed or registered.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::error::{Failure, Kind, ResultExt};
use crate::nar;
use crate::serve::{self, PathInfo};
use crate::serve_client::ServeProcess;
use crate::store::LocalStore;
use crate::ticket::{AllocSection, FetchSection, Ticket};
use crate::transfer::{self, Hashing, TransferProgress};
use crate::transport::{Ssh, Transport};
use crate::wire::{WireError, WireReader, WireWriter};
use crate::{log_info, log_warn};

/// How fetched paths become valid in the local store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImportMethod {
    /// `NIX_HELD_LOCKS` + `nix-store --import` (Nix ≤ 2.28, Lix).
    HeldLocks,
    /// Unpack, canonicalise, `nix-store --load-db` (every version).
    LoadDb,
    /// By the local Nix's version.
    #[default]
    Auto,
}

impl ImportMethod {
    pub fn parse(s: &str) -> Option<ImportMethod> {
        match s {
            "held-locks" => Some(ImportMethod::HeldLocks),
            "load-db" => Some(ImportMethod::LoadDb),
            "auto" => Some(ImportMethod::Auto),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            ImportMethod::HeldLocks => "held-locks",
            ImportMethod::LoadDb => "load-db",
            ImportMethod::Auto => "auto",
        }
    }
}

/// What `nix-store --version` says about which method works: `NIX_HELD_LOCKS`
/// was removed in Nix 2.29; Lix keeps it.
pub fn method_for_version(version_line: &str) -> ImportMethod {
    if version_line.contains("Lix") {
        return ImportMethod::HeldLocks;
    }
    let version = version_line
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .map(|s| s.parse::<u32>().unwrap_or(0))
        .collect::<Vec<_>>();
    match version.as_slice() {
        [2, minor] if *minor <= 28 => ImportMethod::HeldLocks,
        [major, _] if *major < 2 => ImportMethod::HeldLocks,
        _ => ImportMethod::LoadDb,
    }
}

/// What `nsh-fetch` is asked to do.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    pub method: ImportMethod,
    /// Leave the job running and the ssh master open (no `release`).
    pub keep_job: bool,
}

pub const RETRIES: u32 = 1;
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The output paths to fetch: what the run reported as built, else the
/// wanted outputs of the derivation (all of them when none is named).
pub fn wanted_outputs(ticket: &Ticket) -> Result<Vec<String>, Failure> {
    if let Some(run) = &ticket.run {
        if !run.built_outputs.is_empty() {
            return Ok(run.built_outputs.values().cloned().collect());
        }
    }
    let drv = ticket.need_drv()?;
    let mut outputs = Vec::new();
    for (name, path) in &drv.outputs {
        if !drv.wanted.is_empty() && !drv.wanted.contains(name) {
            continue;
        }
        if path.is_empty() {
            return Err(Failure::input(format!(
                "output {name:?} of {} has no known path and the ticket has no run.built_outputs",
                drv.path
            )));
        }
        outputs.push(path.clone());
    }
    if outputs.is_empty() {
        return Err(Failure::input(format!(
            "no wanted output of {} to fetch",
            drv.path
        )));
    }
    Ok(outputs)
}

/// Fetches the ticket's outputs; returns the `fetch` section.
pub fn fetch(
    ticket: &mut Ticket,
    config: &Config,
    options: &FetchOptions,
    progress: &mut dyn TransferProgress,
) -> Result<FetchSection, Failure> {
    let started = Instant::now();
    let outputs = wanted_outputs(ticket)?;
    let mut alloc = ticket.need_alloc()?.clone();
    let store_uri = ticket
        .store
        .as_ref()
        .map_or("", |s| s.uri.as_str())
        .to_string();
    let local = LocalStore::new(&store_uri, "")?;
    for output in &outputs {
        local.dir.parse(output)?;
    }
    let method = match options.method {
        ImportMethod::Auto => local_method(&local)?,
        chosen => chosen,
    };
    let direct = LocalStore::new(&direct_store_uri(&store_uri)?, "")?;
    check_writable(&direct.real_dir())?;

    let mut attempt = 0;
    let outcome = loop {
        match fetch_once(
            &outputs, &mut alloc, config, &local, &direct, method, progress,
        ) {
            Err(failure) if failure.kind == Kind::Transient && attempt < RETRIES => {
                attempt += 1;
                log_warn!("{failure}; trying again");
                std::thread::sleep(RETRY_PAUSE);
            }
            other => break other,
        }
    };
    let finished = outcome.and_then(|(paths, bytes)| {
        // Whatever happened in between, the outputs must be valid now.
        let mut serve = local.serve(false)?;
        let valid: BTreeSet<String> = serve
            .client
            .query_valid_paths(&outputs, false, false)?
            .into_iter()
            .collect();
        serve.finish()?;
        if let Some(missing) = outputs.iter().find(|o| !valid.contains(*o)) {
            return Err(Failure::permanent(format!(
                "{missing} is not valid in the local store after fetching it"
            )));
        }
        Ok((paths, bytes))
    });
    let result = finished.map(|(paths, bytes)| FetchSection {
        paths,
        bytes,
        secs: started.elapsed().as_secs_f64(),
        extra: Default::default(),
    });
    if result.is_ok() && !options.keep_job {
        release(&alloc, config);
    }
    ticket.alloc = Some(alloc);
    result
}

/// Tells the job it may end (`W/release`) and closes the ssh master.
fn release(alloc: &AllocSection, config: &Config) {
    let ssh = Ssh::for_alloc(alloc, &config.ssh);
    let status = ssh
        .command(&["sh", "-c", ": > \"$1/release\"", "sh", &alloc.work])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => log_info!("released job {} on {}", alloc.job, ssh.describe()),
        // The job is gone already, or the node is: it ends on its own.
        _ => log_warn!(
            "could not write {}/release on {}; the job ends after its idle timeout",
            alloc.work,
            ssh.describe()
        ),
    }
    ssh.stop_master();
}

fn local_method(local: &LocalStore) -> Result<ImportMethod, Failure> {
    let line = local_nix_version(local)?;
    let method = method_for_version(&line);
    log_info!("local Nix is {line:?}: importing with {}", method.name());
    Ok(method)
}

/// `nix-store --version`, remembered per binary (its path, size and mtime)
/// in the caller's private nsh directory: the hook runs nsh-fetch once per
/// build, and the probe is a process start each time.
fn local_nix_version(local: &LocalStore) -> Result<String, Failure> {
    let program = nix_tool(local, "nix-store");
    let key = resolve_program(&program).and_then(|path| {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&path).ok()?;
        Some(format!(
            "{}\t{}\t{}",
            path.display(),
            meta.len(),
            meta.mtime()
        ))
    });
    let cache = crate::transport::control_dir()
        .ok()
        .map(|dir| dir.join("nix-store-version"));
    if let (Some(key), Some(cache)) = (&key, &cache) {
        if let Ok(text) = std::fs::read_to_string(cache) {
            if let Some(line) = text
                .strip_prefix(key.as_str())
                .and_then(|t| t.strip_prefix('\t'))
            {
                return Ok(line.trim().to_string());
            }
        }
    }
    let out = Command::new(&program)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .or_fail(Kind::Config, || {
            format!("running {} --version", program.display())
        })?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if let (Some(key), Some(cache), true) = (&key, &cache, out.status.success()) {
        // Temp + rename: concurrent fetches never read half a line.
        let temp = cache.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&temp, format!("{key}\t{line}\n")).is_ok() {
            let _ = std::fs::rename(&temp, cache);
        }
    }
    Ok(line)
}

/// Where `program` is: itself when it has a `/`, else found on PATH.
fn resolve_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return Some(program.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}

fn nix_tool(local: &LocalStore, tool: &str) -> PathBuf {
    if local.nix_bin_dir.is_empty() {
        PathBuf::from(tool)
    } else {
        Path::new(&local.nix_bin_dir).join(tool)
    }
}

/// The store to import into without going through the daemon (which would
/// take the output locks again): the local store itself. `daemon` means the
/// store the daemon serves, which only its owner (root) may write directly.
pub fn direct_store_uri(uri: &str) -> Result<String, Failure> {
    let through_daemon = uri == "daemon" || uri.starts_with("unix://");
    if !through_daemon {
        return Ok(uri.to_string());
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Failure::config(format!(
            "the local store is {uri:?}: importing outputs while the daemon holds their \
             locks needs direct access to the store (run nsh-fetch as root, or set \
             store.uri to the local store)"
        )));
    }
    Ok("local".into())
}

/// Both import methods write the store directly; without the right to,
/// Nix would fall back to the daemon, which takes the output locks again.
fn check_writable(real_dir: &Path) -> Result<(), Failure> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(real_dir.as_os_str().as_bytes())
        .map_err(|_| Failure::config(format!("{}: a NUL in the path", real_dir.display())))?;
    // SAFETY: a valid C string.
    if unsafe { libc::access(c_path.as_ptr(), libc::W_OK) } != 0 {
        return Err(Failure::config(format!(
            "cannot write the local store {} directly ({}); nsh-fetch imports outputs \
             while the daemon holds their locks, which needs the store owner (root)",
            real_dir.display(),
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// One attempt: returns (paths copied, NAR bytes).
fn fetch_once(
    outputs: &[String],
    alloc: &mut AllocSection,
    config: &Config,
    local: &LocalStore,
    direct: &LocalStore,
    method: ImportMethod,
    progress: &mut dyn TransferProgress,
) -> Result<(Vec<String>, u64), Failure> {
    let ssh = Ssh::ensure_master(alloc, &config.ssh)?;
    let argv = transfer::remote_serve_argv(&config.remote);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut remote = ServeProcess::from_command(ssh.command(&argv), ssh.describe())?;
    let on_node: BTreeSet<String> = remote
        .client
        .query_valid_paths(outputs, true, false)?
        .into_iter()
        .collect();
    if let Some(missing) = outputs.iter().find(|o| !on_node.contains(*o)) {
        return Err(Failure::permanent(format!(
            "{missing} is not valid on {} (was it built?)",
            ssh.describe()
        )));
    }
    let closure = remote.client.query_closure(outputs, false)?;
    let mut local_serve = local.serve(false)?;
    let here: BTreeSet<String> = local_serve
        .client
        .query_valid_paths(&closure, false, false)?
        .into_iter()
        .collect();
    let needed: Vec<String> = closure.into_iter().filter(|p| !here.contains(p)).collect();
    if needed.is_empty() {
        log_info!(
            "all {} outputs are already in the local store",
            outputs.len()
        );
        remote.finish()?;
        return Ok((Vec::new(), 0));
    }
    let infos: BTreeMap<String, PathInfo> = remote
        .client
        .query_path_infos(&needed)?
        .into_iter()
        .map(|i| (i.path.clone(), i))
        .collect();
    if let Some(gone) = needed.iter().find(|p| !infos.contains_key(*p)) {
        return Err(Failure::transient(format!(
            "{gone} vanished from {} while being fetched",
            ssh.describe()
        )));
    }
    let total: u64 = infos.values().map(|i| i.nar_size).sum();
    log_info!(
        "{}: fetching {} paths ({}) with {}",
        ssh.describe(),
        needed.len(),
        transfer::human_bytes(total),
        method.name()
    );
    progress.begin(needed.len() as u64, total);
    let expected = Expected {
        infos,
        outputs: outputs.iter().cloned().collect(),
    };
    let stream = remote.client.start_export(&needed)?;
    let mut stream = WireReader::new(stream);
    let imported = match method {
        ImportMethod::LoadDb => {
            import_load_db(&mut stream, &expected, direct, &mut local_serve, progress)?
        }
        _ => import_held_locks(&mut stream, &expected, direct, progress)?,
    };
    progress.end();
    remote.finish()?;
    local_serve.finish()?;
    let bytes = imported.iter().map(|p| expected.infos[p].nar_size).sum();
    Ok((imported, bytes))
}

/// What the node said about the paths it sends.
struct Expected {
    infos: BTreeMap<String, PathInfo>,
    outputs: BTreeSet<String>,
}

impl Expected {
    /// Checks one received entry against the node's records.
    fn check(
        &self,
        trailer: &serve::ExportTrailer,
        digest: &[u8; 32],
        size: u64,
    ) -> Result<&PathInfo, Failure> {
        let Some(info) = self.infos.get(&trailer.path) else {
            return Err(Failure::permanent(format!(
                "the node sent {}, which was not asked for",
                trailer.path
            )));
        };
        if size != info.nar_size {
            return Err(Failure::permanent(format!(
                "{}: the NAR has {size} bytes, the node's database says {}",
                info.path, info.nar_size
            )));
        }
        if !transfer::nar_hash_matches(&info.nar_hash, digest)? {
            return Err(Failure::permanent(format!(
                "{}: NAR hash mismatch: got sha256:{}, the node's database says {}",
                info.path,
                transfer::nix_base32(digest),
                info.nar_hash
            )));
        }
        let sent: BTreeSet<&String> = trailer.references.iter().collect();
        let recorded: BTreeSet<&String> = info.references.iter().collect();
        if sent != recorded {
            return Err(Failure::permanent(format!(
                "{}: the export stream's references differ from the node's database",
                info.path
            )));
        }
        Ok(info)
    }
}

fn stream_error(e: WireError) -> Failure {
    e.fail("the export stream from the node")
}

/// Relays the stream to `nix-store --import` with `NIX_HELD_LOCKS`, checking
/// each entry before its trailer (which is what makes the importer register
/// it) is passed on.
fn import_held_locks<R: Read>(
    stream: &mut WireReader<R>,
    expected: &Expected,
    direct: &LocalStore,
    progress: &mut dyn TransferProgress,
) -> Result<Vec<String>, Failure> {
    let held: Vec<&str> = expected.outputs.iter().map(String::as_str).collect();
    let mut command = Command::new(nix_tool(direct, "nix-store"));
    if !direct.uri.is_empty() {
        command.arg("--store").arg(&direct.uri);
    }
    let mut child = command
        .arg("--import")
        .env("NIX_HELD_LOCKS", held.join(" "))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .or_fail(Kind::Config, || "starting nix-store --import")?;
    let stdin = child.stdin.take().expect("piped");
    let mut to = Hashing::new(BufWriter::with_capacity(1 << 16, stdin));
    let relayed = relay_checked(stream, &mut to, expected, progress);
    let closed = relayed.and_then(|paths| {
        to.flush()
            .or_fail(Kind::Transient, || "writing to nix-store --import")?;
        Ok(paths)
    });
    drop(to);
    match closed {
        Ok(paths) => {
            let status = child
                .wait()
                .or_fail(Kind::Transient, || "waiting for nix-store --import")?;
            if !status.success() {
                return Err(Failure::permanent(format!(
                    "nix-store --import ended with {status}"
                )));
            }
            Ok(paths)
        }
        Err(failure) => {
            // Killed before it read the failed entry's trailer: that entry
            // is never registered.
            let _ = child.kill();
            let _ = child.wait();
            Err(failure)
        }
    }
}

fn relay_checked<R: Read, W: Write>(
    stream: &mut WireReader<R>,
    to: &mut Hashing<W>,
    expected: &Expected,
    progress: &mut dyn TransferProgress,
) -> Result<Vec<String>, Failure> {
    let write_fail =
        |e: io::Error| Failure::transient(format!("writing to nix-store --import: {e}"));
    let mut paths = Vec::new();
    loop {
        match stream.u64().map_err(stream_error)? {
            0 => {
                to.write_all(&0u64.to_le_bytes()).map_err(write_fail)?;
                return Ok(paths);
            }
            1 => {
                to.write_all(&1u64.to_le_bytes()).map_err(write_fail)?;
                to.take();
                let mut counting = transfer::Counting {
                    inner: stream.get_mut(),
                    progress: &mut *progress,
                };
                nar::copy_nar(&mut counting, to).map_err(|e| match e {
                    WireError::Io(e) if e.kind() == io::ErrorKind::BrokenPipe => write_fail(e),
                    other => stream_error(other),
                })?;
                let (digest, size) = to.take();
                let trailer = serve::read_export_trailer(stream).map_err(stream_error)?;
                expected.check(&trailer, &digest, size)?;
                serve::write_export_trailer(&mut WireWriter::new(&mut *to), &trailer)
                    .map_err(write_fail)?;
                progress.path_done();
                paths.push(trailer.path);
            }
            n => {
                return Err(Failure::permanent(format!(
                    "the export stream from the node: expected 0 or 1 before an entry, got {n}"
                )))
            }
        }
    }
}

/// A reader that hashes what it reads.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks every entry into the store directory and registers the complete
/// ones with `nix-store --load-db`.
fn import_load_db<R: Read>(
    stream: &mut WireReader<R>,
    expected: &Expected,
    direct: &LocalStore,
    local_serve: &mut ServeProcess,
    progress: &mut dyn TransferProgress,
) -> Result<Vec<String>, Failure> {
    let real_dir = direct.real_dir();
    let mut placed: Vec<(PathInfo, PathBuf)> = Vec::new();
    let unpacked = unpack_entries(
        stream,
        expected,
        direct,
        &real_dir,
        local_serve,
        progress,
        &mut placed,
    );
    // Register what is complete even when a later entry failed: those paths
    // are whole and verified, and their references come before them.
    let registered = register(direct, &placed);
    if registered.is_err() {
        for (_, real) in &placed {
            let _ = remove_tree(real);
        }
    }
    unpacked?;
    registered?;
    Ok(placed.into_iter().map(|(info, _)| info.path).collect())
}

#[allow(clippy::too_many_arguments)]
fn unpack_entries<R: Read>(
    stream: &mut WireReader<R>,
    expected: &Expected,
    direct: &LocalStore,
    real_dir: &Path,
    local_serve: &mut ServeProcess,
    progress: &mut dyn TransferProgress,
    placed: &mut Vec<(PathInfo, PathBuf)>,
) -> Result<(), Failure> {
    for n in 0.. {
        match stream.u64().map_err(stream_error)? {
            0 => return Ok(()),
            1 => {}
            other => {
                return Err(Failure::permanent(format!(
                    "the export stream from the node: expected 0 or 1 before an entry, got {other}"
                )))
            }
        }
        let temp = real_dir.join(format!(".nsh-fetch-{}-{n}", std::process::id()));
        let result = unpack_one(
            stream,
            expected,
            direct,
            real_dir,
            &temp,
            local_serve,
            progress,
        );
        match result {
            Ok(Some(entry)) => {
                progress.path_done();
                placed.push(entry);
            }
            Ok(None) => progress.path_done(),
            Err(failure) => {
                let _ = remove_tree(&temp);
                return Err(failure);
            }
        }
    }
    unreachable!("the loop returns")
}

/// One entry: unpack to `temp`, verify, then (under the path's lock, unless
/// the daemon holds it for us) move it into place. `None`: it became valid
/// meanwhile.
#[allow(clippy::too_many_arguments)]
fn unpack_one<R: Read>(
    stream: &mut WireReader<R>,
    expected: &Expected,
    direct: &LocalStore,
    real_dir: &Path,
    temp: &Path,
    local_serve: &mut ServeProcess,
    progress: &mut dyn TransferProgress,
) -> Result<Option<(PathInfo, PathBuf)>, Failure> {
    let mut reader = HashingReader {
        inner: transfer::Counting {
            inner: stream.get_mut(),
            progress: &mut *progress,
        },
        hasher: Sha256::new(),
    };
    let size = nar::unpack(&mut reader, temp).map_err(|e| match e {
        WireError::Io(e) if e.kind() != io::ErrorKind::UnexpectedEof => {
            Failure::transient(format!("unpacking into {}: {e}", temp.display()))
        }
        other => stream_error(other),
    })?;
    let digest: [u8; 32] = reader.hasher.finalize().into();
    let trailer = serve::read_export_trailer(stream).map_err(stream_error)?;
    let info = expected.check(&trailer, &digest, size)?.clone();
    let store_path = direct.dir.parse(&info.path)?;
    let real = real_dir.join(store_path.basename());
    // The daemon holds the outputs' locks for us; other paths we lock as
    // Nix does, so that no other Nix process writes them meanwhile.
    let _lock = if expected.outputs.contains(&info.path) {
        None
    } else {
        Some(NixPathLock::acquire(&real)?)
    };
    if !local_serve
        .client
        .query_valid_paths(&[&info.path], false, false)?
        .is_empty()
    {
        remove_tree(temp)?;
        return Ok(None);
    }
    // Not valid, so anything at its place is a leftover of an interrupted
    // import: Nix would delete it too.
    if real.symlink_metadata().is_ok() {
        remove_tree(&real)?;
    }
    std::fs::rename(temp, &real).or_fail(Kind::Transient, || {
        format!("moving {} to {}", temp.display(), real.display())
    })?;
    Ok(Some((info, real)))
}

/// `nix-store --load-db` input: per path `path`, the NAR's sha256 in hex,
/// the NAR size, the deriver, the number of references, the references.
pub fn load_db_input(infos: &[&PathInfo], digests: &[[u8; 32]]) -> String {
    let mut text = String::new();
    for (info, digest) in infos.iter().zip(digests) {
        text.push_str(&format!(
            "{}\n{}\n{}\n{}\n{}\n",
            info.path,
            transfer::hex(digest),
            info.nar_size,
            info.deriver,
            info.references.len()
        ));
        for r in &info.references {
            text.push_str(r);
            text.push('\n');
        }
    }
    text
}

fn register(direct: &LocalStore, placed: &[(PathInfo, PathBuf)]) -> Result<(), Failure> {
    if placed.is_empty() {
        return Ok(());
    }
    let infos: Vec<&PathInfo> = placed.iter().map(|(i, _)| i).collect();
    // The hashes were checked against these records already.
    let digests = infos
        .iter()
        .map(|i| decode_nar_hash(&i.nar_hash))
        .collect::<Result<Vec<_>, _>>()?;
    let input = load_db_input(&infos, &digests);
    let mut command = Command::new(nix_tool(direct, "nix-store"));
    if !direct.uri.is_empty() {
        command.arg("--store").arg(&direct.uri);
    }
    let mut child = command
        .arg("--load-db")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .or_fail(Kind::Config, || "starting nix-store --load-db")?;
    let written = child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes());
    let out = child
        .wait_with_output()
        .or_fail(Kind::Transient, || "waiting for nix-store --load-db")?;
    if !out.status.success() || written.is_err() {
        return Err(Failure::permanent(format!(
            "nix-store --load-db failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The digest of a `sha256:<nix-base32 | hex>` NAR hash.
fn decode_nar_hash(nar_hash: &str) -> Result<[u8; 32], Failure> {
    let bad = || Failure::permanent(format!("cannot decode the NAR hash {nar_hash:?}"));
    let value = nar_hash.strip_prefix("sha256:").ok_or_else(bad)?;
    let mut digest = [0u8; 32];
    match value.len() {
        64 => {
            for (i, byte) in digest.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&value[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
            }
        }
        52 => {
            // Nix's base-32 is written most significant character first,
            // least significant bits of the digest last.
            const CHARS: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
            for (n, c) in value.bytes().rev().enumerate() {
                let digit = CHARS.iter().position(|&x| x == c).ok_or_else(bad)? as u16;
                let b = n * 5;
                let (i, j) = (b / 8, b % 8);
                digest[i] |= (digit << j) as u8;
                if i + 1 < 32 {
                    digest[i + 1] |= (digit >> (8 - j)) as u8;
                } else if digit >> (8 - j) != 0 {
                    return Err(bad());
                }
            }
        }
        _ => return Err(bad()),
    }
    Ok(digest)
}

/// Removes a tree that may be read-only (store metadata).
fn remove_tree(path: &Path) -> Result<(), Failure> {
    let meta = match path.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Failure::transient(format!("{}: {e}", path.display()))),
    };
    if meta.is_dir() {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755));
        let entries = std::fs::read_dir(path)
            .or_fail(Kind::Transient, || format!("reading {}", path.display()))?;
        for entry in entries {
            let entry = entry.or_fail(Kind::Transient, || format!("reading {}", path.display()))?;
            remove_tree(&entry.path())?;
        }
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    }
    .or_fail(Kind::Transient, || format!("removing {}", path.display()))
}

/// Nix's lock on a store path: flock(2) on `<path>.lock`; a lock file that
/// has content was deleted by its last holder (stale) and is opened again.
/// Released like Nix releases it: unlink, then mark the open file stale.
struct NixPathLock {
    file: std::fs::File,
    path: PathBuf,
}

impl NixPathLock {
    fn acquire(real: &Path) -> Result<NixPathLock, Failure> {
        let mut name = real.as_os_str().to_owned();
        name.push(".lock");
        let path = PathBuf::from(name);
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .or_fail(Kind::Transient, || format!("opening {}", path.display()))?;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(Failure::transient(format!(
                    "locking {}: {}",
                    path.display(),
                    io::Error::last_os_error()
                )));
            }
            let stale = file.metadata().map(|m| m.len() != 0).unwrap_or(true);
            if !stale {
                return Ok(NixPathLock { file, path });
            }
        }
    }
}

impl Drop for NixPathLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.write_all(b"d");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_by_version() {
        assert_eq!(
            method_for_version("nix-store (Nix) 2.8.0"),
            ImportMethod::HeldLocks
        );
        assert_eq!(
            method_for_version("nix-store (Nix) 2.28.4"),
            ImportMethod::HeldLocks
        );
        assert_eq!(
            method_for_version("nix-store (Nix) 2.29.0"),
            ImportMethod::LoadDb
        );
        assert_eq!(
            method_for_version("nix-store (Nix) 3.0.0pre"),
            ImportMethod::LoadDb
        );
        assert_eq!(
            method_for_version("nix-store (Lix, like Nix) 2.91.1"),
            ImportMethod::HeldLocks
        );
        assert_eq!(method_for_version("garbage"), ImportMethod::LoadDb);
    }

    #[test]
    fn nar_hashes_decode_both_ways() {
        let digest: [u8; 32] = Sha256::digest(b"nsh").into();
        let b32 = format!("sha256:{}", transfer::nix_base32(&digest));
        assert_eq!(decode_nar_hash(&b32).unwrap(), digest);
        let hex = format!("sha256:{}", transfer::hex(&digest));
        assert_eq!(decode_nar_hash(&hex).unwrap(), digest);
        assert!(decode_nar_hash("sha256:zz").is_err());
    }

    /// An export stream of one path whose NAR is `contents` as a file.
    fn one_entry_stream(path: &str, contents: &[u8]) -> (Vec<u8>, PathInfo) {
        let mut nar_bytes = Vec::new();
        nar::write::nar(
            &mut nar_bytes,
            &nar::write::Node::Regular {
                executable: false,
                contents,
            },
        )
        .unwrap();
        let digest: [u8; 32] = Sha256::digest(&nar_bytes).into();
        let mut stream = 1u64.to_le_bytes().to_vec();
        stream.extend_from_slice(&nar_bytes);
        let trailer = serve::ExportTrailer {
            path: path.into(),
            references: vec![],
            deriver: String::new(),
        };
        serve::write_export_trailer(&mut WireWriter::new(&mut stream), &trailer).unwrap();
        stream.extend_from_slice(&0u64.to_le_bytes());
        let info = PathInfo {
            path: path.into(),
            nar_size: nar_bytes.len() as u64,
            nar_hash: format!("sha256:{}", transfer::nix_base32(&digest)),
            ..PathInfo::default()
        };
        (stream, info)
    }

    fn expected(info: PathInfo) -> Expected {
        Expected {
            outputs: [info.path.clone()].into(),
            infos: [(info.path.clone(), info)].into(),
        }
    }

    fn relay(stream: &[u8], expected: &Expected) -> (Result<Vec<String>, Failure>, Vec<u8>) {
        let mut out = Hashing::new(Vec::new());
        let result = relay_checked(
            &mut WireReader::new(stream),
            &mut out,
            expected,
            &mut transfer::NoProgress,
        );
        (result, out.inner)
    }

    #[test]
    fn a_good_entry_is_relayed_unchanged() {
        let (stream, info) = one_entry_stream("/nix/store/aaaa-x", b"hello");
        let (result, out) = relay(&stream, &expected(info));
        assert_eq!(result.unwrap(), ["/nix/store/aaaa-x"]);
        assert_eq!(out, stream);
    }

    #[test]
    fn a_bad_hash_stops_the_entry_before_its_trailer() {
        let (stream, info) = one_entry_stream("/nix/store/aaaa-x", b"hello");
        let (bad_stream, _) = one_entry_stream("/nix/store/aaaa-x", b"hellp");
        let (result, out) = relay(&bad_stream, &expected(info));
        let err = result.unwrap_err();
        assert!(err.message.contains("NAR hash mismatch"), "{}", err.message);
        assert_eq!(err.kind, Kind::Permanent);
        // The importer never saw the trailer, which is what makes it register
        // the path.
        let magic = serve::EXPORT_MAGIC.to_le_bytes();
        assert!(!out.windows(8).any(|w| w == magic));
        assert!(out.len() < stream.len());
    }

    #[test]
    fn a_truncated_stream_is_transient_and_stops_before_the_trailer() {
        let (stream, info) = one_entry_stream("/nix/store/aaaa-x", b"hello world");
        let cut = &stream[..stream.len() / 2];
        let (result, out) = relay(cut, &expected(info));
        assert_eq!(result.unwrap_err().kind, Kind::Transient);
        let magic = serve::EXPORT_MAGIC.to_le_bytes();
        assert!(!out.windows(8).any(|w| w == magic));
    }

    #[test]
    fn a_path_not_asked_for_is_refused() {
        let (stream, _) = one_entry_stream("/nix/store/bbbb-evil", b"hello");
        let (_, info) = one_entry_stream("/nix/store/aaaa-x", b"hello");
        let (result, _) = relay(&stream, &expected(info));
        assert!(result.unwrap_err().message.contains("not asked for"));
    }

    #[test]
    fn load_db_unpacks_verifies_and_cleans_up() {
        // The unpacking half of load-db against a scratch "store dir"; the
        // registration half needs a real store (cluster tests).
        let dir = tempfile::tempdir().unwrap();
        let (stream, info) = one_entry_stream("/nix/store/aaaa-x", b"hello");
        let (bad_stream, _) = one_entry_stream("/nix/store/aaaa-x", b"hellp");
        let temp = dir.path().join(".nsh-fetch-test");
        let mut r = WireReader::new(&bad_stream[..]);
        assert_eq!(r.u64().unwrap(), 1);
        let mut reader = HashingReader {
            inner: r.get_mut(),
            hasher: Sha256::new(),
        };
        let size = nar::unpack(&mut reader, &temp).unwrap();
        let digest: [u8; 32] = reader.hasher.finalize().into();
        let trailer = serve::read_export_trailer(&mut r).unwrap();
        let expected = expected(info);
        assert!(expected.check(&trailer, &digest, size).is_err());
        remove_tree(&temp).unwrap();
        assert!(!temp.exists());
        let mut r = WireReader::new(&stream[..]);
        r.u64().unwrap();
        let mut reader = HashingReader {
            inner: r.get_mut(),
            hasher: Sha256::new(),
        };
        let size = nar::unpack(&mut reader, &temp).unwrap();
        let digest: [u8; 32] = reader.hasher.finalize().into();
        let trailer = serve::read_export_trailer(&mut r).unwrap();
        assert!(expected.check(&trailer, &digest, size).is_ok());
        assert_eq!(std::fs::read(&temp).unwrap(), b"hello");
    }

    #[test]
    fn load_db_lines() {
        let info = PathInfo {
            path: "/s/aaaa-x".into(),
            deriver: "/s/bbbb-x.drv".into(),
            references: vec!["/s/aaaa-x".into(), "/s/cccc-y".into()],
            nar_size: 120,
            ..PathInfo::default()
        };
        let text = load_db_input(&[&info], &[[0xab; 32]]);
        assert_eq!(
            text,
            format!(
                "/s/aaaa-x\n{}\n120\n/s/bbbb-x.drv\n2\n/s/aaaa-x\n/s/cccc-y\n",
                "ab".repeat(32)
            )
        );
    }

    #[test]
    fn the_daemon_store_is_imported_into_directly() {
        assert_eq!(direct_store_uri("local").unwrap(), "local");
        assert_eq!(direct_store_uri("").unwrap(), "");
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(direct_store_uri("daemon").unwrap(), "local");
        } else {
            assert_eq!(direct_store_uri("daemon").unwrap_err().kind, Kind::Config);
        }
    }
}
