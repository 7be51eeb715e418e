//! `nsh-fetch`: copy the built outputs from the node into the local store,
//! then let the job end.
//!
//! The node is not trusted ([`trust`]): what may be imported is decided
//! from the derivation in the local store: its declared outputs, of which
//! the wanted ones and the others they refer to, whose other references
//! must be valid here already. Each NAR is read no further than the size
//! the node declared (and all of them together within `[remote]
//! max_output_size`), hashed as it arrives and checked against the node's
//! hash and size, and a fixed output's hash is recomputed ([`fixed`]),
//! before the path may become valid here.
//!
//! From the node: QueryValidPaths, QueryPathInfos, then one DumpStorePath
//! per path, in dependency order — commands every serve protocol version
//! has (ExportPaths, which Nix 2.32 removed without a version bump, is
//! never used).
//!
//! While a build hook runs, the Nix daemon holds `<output>.lock` on every
//! output, so a plain `nix-store --import` of an output would wait for the
//! daemon, which waits for the hook: a deadlock (`docs/nsh-push-fetch.md`,
//! "Importing while the daemon holds the output locks"). Two ways around it
//! ([`ImportMethod`]):
//!
//! * `load-db` (the default; every Nix version): we unpack each NAR ourselves
//!   into a temporary name in the store directory (hashing it on the way),
//!   give it the store's canonical metadata, rename it into place and
//!   register it with `nix-store --load-db`. Paths that are not outputs are
//!   locked the way Nix locks them, from before their validity is checked
//!   until they are registered, and a path found valid is never registered
//!   again; every placed path (and its temporary name) is a temporary GC
//!   root until it is registered;
//! * `daemon` and `signed`, for a user who may not write the store (a CI
//!   user running the tools by hand; no hook holds locks then): through the
//!   daemon, as a trusted user or with signatures it trusts ([`daemon`],
//!   [`signed`]);
//! * `held-locks` (Nix ≤ 2.28 and Lix only: Nix 2.29 removed
//!   `NIX_HELD_LOCKS`): `nix-store --import` against the local store
//!   directly, with `NIX_HELD_LOCKS` naming the outputs, so it does not take
//!   their locks again. On a newer Nix the import waits for the daemon
//!   forever; nsh cannot tell, so this is for an admin who chose it.
//!
//! A truncated, oversized or corrupt NAR never leaves a partial or invalid
//! path: with `load-db` the temporary tree is removed and nothing is renamed
//! or registered; with `held-locks` the entry's trailer, which is what makes
//! `nix-store --import` register a path, is written only after its NAR
//! checked out.

pub mod daemon;
mod fixed;
mod held_locks;
mod load_db;
mod signed;
pub mod trust;

use held_locks::{import_held_locks, import_stream, Importer};
use load_db::import_load_db;
use signed::import_signed;
pub use trust::{Declared, ImportRefused};

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Failure, KindOf};
use crate::nix::hash::{self, Hashing};
use crate::nix::local_store::LocalStore;
use crate::nix::nar::{Bounds, NarError, NarRead};
use crate::nix::serve::client::{ServeClient, ServeProcess};
use crate::nix::serve::PathInfo;
use crate::nix::signing::SecretKey;
use crate::nix::store_path::StorePath;
use crate::nix::temp_roots::TempRoots;
use crate::pool::node::{self, Answer};
use crate::stage::alloc::pooled::is_pooled;
use crate::stage::progress::{human_bytes, Reporting, TransferProgress};
use crate::stage::release::release;
use crate::stage::retry;
use crate::stage::ssh::Ssh;
use crate::ticket::{AllocSection, FetchSection, Ticket};
use crate::{log_info, log_warn};
use fixed::{FixedCheck, FixedHash, Tee};
use trust::Here;

/// How fetched paths become valid in the local store (`nsh-fetch
/// --import-method`, whose names are `nsh-fetch`'s; the same here, for log
/// lines and the ticket's `fetch.import_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImportMethod {
    /// The first of the others that applies ([`daemon::choose`]).
    #[default]
    Auto,
    /// Unpack, canonicalise, `nix-store --load-db` (every version).
    LoadDb,
    /// `NIX_HELD_LOCKS` + `nix-store --import` (Nix ≤ 2.28, Lix).
    HeldLocks,
    /// `nix-store --import` through the daemon (a trusted user).
    Daemon,
    /// A signed binary cache of our own, `nix copy` into the daemon's store.
    Signed,
}

/// `load-db`, `held-locks`.
impl std::fmt::Display for ImportMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::derive::serde_name(self))
    }
}

/// What `nsh-fetch` is asked to do.
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// How fetched paths become valid locally.
    pub method: ImportMethod,
    /// Leave the job running and the ssh master open (no `release`).
    pub keep_job: bool,
}

/// The ticket names a derivation and, for every wanted output, a path (its
/// own or the one `run.built_outputs` reports): checked before anything is
/// read or asked.
fn check_ticket(ticket: &Ticket) -> Result<(), Failure> {
    let drv = ticket.need_drv()?;
    let reported = ticket.run.as_ref().map(|run| &run.built_outputs);
    let mut wanted = 0;
    for (name, path) in &drv.outputs {
        if !drv.wanted.is_empty() && !drv.wanted.contains(name) {
            continue;
        }
        wanted += 1;
        if path.is_none() && reported.and_then(|r| r.get(name)).is_none() {
            return Err(Failure::input(format!(
                "output {name:?} of {} has no known path and the ticket has no run.built_outputs",
                drv.path
            )));
        }
    }
    if wanted == 0 {
        return Err(Failure::input(format!(
            "no wanted output of {} to fetch",
            drv.path
        )));
    }
    Ok(())
}

/// Fetches the ticket's outputs; returns the `fetch` section. When no way
/// to import is open to this user (configuration), the job is ended too
/// (unless `keep_job`): fetching again cannot succeed before an admin acts.
pub fn fetch(
    ticket: &mut Ticket,
    config: &Config,
    options: &FetchOptions,
    progress: &mut dyn TransferProgress,
) -> Result<FetchSection, Failure> {
    let started = Instant::now();
    check_ticket(ticket)?;
    let mut alloc = ticket.need_alloc()?.clone();
    let local = LocalStore::new(ticket.store_uri(), "")?;
    // A pooled job is given back in the fetch's own ssh session, once its
    // `nix-store --serve` ended well: one ssh session fewer per build.
    let give_back = !options.keep_job && is_pooled(config, &alloc);
    let mut told = None;
    let result = choose_way(options.method, config, &local).and_then(|way| {
        let fetched = fetch_with(
            &way, ticket, &local, config, &mut alloc, give_back, progress,
        )?;
        told = fetched.given_back;
        let section = FetchSection {
            paths: fetched.paths,
            bytes: fetched.bytes,
            secs: started.elapsed().as_secs_f64(),
            import_method: Some(way.method.to_string()),
            extra: crate::ticket::Extra::default(),
        };
        Ok((section, fetched.wanted))
    });
    match &result {
        Ok((_, wanted)) => {
            crate::stage::alloc::pooled::note_paths(config, &alloc, wanted);
            if !options.keep_job {
                end_use(config, &mut alloc, told);
            }
        }
        Err(failure) if failure.kind == crate::Kind::Config && !options.keep_job => {
            end_use(config, &mut alloc, None);
        }
        Err(_) => {}
    }
    ticket.alloc = Some(alloc);
    result.map(|(section, _)| section)
}

/// What [`fetch_with`] did.
struct Fetched {
    /// The paths imported.
    paths: Vec<StorePath>,
    /// Their NAR bytes.
    bytes: u64,
    /// The wanted outputs, valid here now.
    wanted: Vec<StorePath>,
    /// What the node said to the give-back in the fetch's session, if one
    /// was asked for and the session got that far.
    given_back: Option<Answer>,
}

/// What one attempt did: paths imported, their NAR bytes, the give-back's
/// answer.
type Attempt = (Vec<StorePath>, u64, Option<Answer>);

/// How this nsh-fetch imports: the method, the store it writes directly
/// (`load-db`, `held-locks`), the signing key (`signed`).
struct Way {
    method: ImportMethod,
    direct: Option<LocalStore>,
    key: Option<SecretKey>,
    /// How long a store path's lock is waited for (`remote.lock_timeout`).
    lock_limit: Duration,
}

/// Decides the import method ([`daemon::choose`]) and gets what it needs.
fn choose_way(
    requested: ImportMethod,
    config: &Config,
    local: &LocalStore,
) -> Result<Way, Failure> {
    let root = crate::sys::process::euid() == 0;
    let store_writable = direct_store_uri(&local.uri)
        .and_then(|uri| LocalStore::new(&uri, ""))
        .is_ok_and(|direct| crate::sys::fs::check_writable(&direct.real_dir()).is_ok());
    let situation = daemon::Situation {
        root,
        store_writable,
        has_key: config.fetch.secret_key_file.is_some(),
    };
    let method = daemon::choose(requested, situation, || daemon::ask_trust(&local.uri))?;
    let mut way = Way {
        method,
        direct: None,
        key: None,
        lock_limit: Duration::from_secs(config.remote.lock_timeout_s),
    };
    match method {
        ImportMethod::LoadDb | ImportMethod::HeldLocks => {
            let direct = LocalStore::new(&direct_store_uri(&local.uri)?, "")?;
            check_writable(&direct.real_dir())?;
            way.direct = Some(direct);
        }
        ImportMethod::Signed => {
            if let Some(file) = &config.fetch.secret_key_file {
                way.key = Some(SecretKey::read(file, "fetch.secret_key_file")?);
            }
        }
        ImportMethod::Daemon | ImportMethod::Auto => {}
    }
    Ok(way)
}

/// Fetches with `way`, retrying transient failures; the wanted outputs
/// must be valid afterwards.
fn fetch_with(
    way: &Way,
    ticket: &Ticket,
    local: &LocalStore,
    config: &Config,
    alloc: &mut AllocSection,
    give_back: bool,
    progress: &mut dyn TransferProgress,
) -> Result<Fetched, Failure> {
    let declared = Declared::of(ticket, way.direct.as_ref().unwrap_or(local))?;
    // Writing the store directly, we keep what we rely on alive ourselves;
    // through the daemon, the daemon does.
    let mut roots = way.direct.as_ref().map(temp_roots).transpose()?;
    let (paths, bytes, given_back) = retry::transient(|| {
        let mut here = Here {
            local,
            roots: roots.as_mut(),
            max_output_size: config.remote.max_output_size,
        };
        let session = Session { way, give_back };
        fetch_once(&declared, alloc, config, &mut here, &session, progress)
    })?;
    if way.method == ImportMethod::LoadDb {
        // Every wanted output was found valid (and made a temporary root
        // first, so it stays so) or was registered by the `nix-store
        // --load-db` that just succeeded: asking the store again would cost
        // one more process per build for an answer already had.
        return Ok(Fetched {
            paths,
            bytes,
            wanted: declared.wanted,
            given_back,
        });
    }
    // Through the daemon, whatever happened in between, the outputs must be
    // valid now.
    let valid = local.valid_paths(&declared.wanted)?;
    if let Some(missing) = declared.wanted.iter().find(|o| !valid.contains(*o)) {
        return Err(Failure::permanent(format!(
            "{missing} is not valid in the local store after fetching it"
        )));
    }
    Ok(Fetched {
        paths,
        bytes,
        wanted: declared.wanted,
        given_back,
    })
}

/// The build is over: a pooled job (the cluster's `linger` > 0) goes back
/// to the pool, any other is released. The node's ssh master stays for the
/// next build (it ends by itself when unused).
/// `told`: what the node answered to a give-back already asked in the
/// fetch's session.
fn end_use(config: &Config, alloc: &mut AllocSection, told: Option<Answer>) {
    let pooled = is_pooled(config, alloc);
    let ssh = match Ssh::ensure_master(alloc, config) {
        Ok(ssh) => ssh,
        Err(failure) => {
            log_warn!(
                "job {}: {failure}; it ends after its idle timeout",
                alloc.job
            );
            return;
        }
    };
    if pooled {
        crate::stage::alloc::pooled::give_back(&ssh, alloc, told);
    } else {
        release(&ssh, alloc);
    }
}

/// This process's temporary GC roots in the store imported into.
fn temp_roots(direct: &LocalStore) -> Result<TempRoots, Failure> {
    let state_dir = direct.state_dir();
    TempRoots::new(&state_dir).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::PermissionDenied {
            crate::Kind::Config
        } else {
            crate::Kind::Transient
        };
        Failure::new(
            kind,
            format!(
                "making this process's temporary GC roots in {}: {e}",
                state_dir.join("temproots").display()
            ),
        )
    })
}

/// The store to import into without going through the daemon (which would
/// take the output locks again): the local store itself. `daemon` means the
/// store the daemon serves, which only its owner (root) may write directly.
pub fn direct_store_uri(uri: &str) -> Result<String, Failure> {
    let through_daemon = uri == "daemon" || uri.starts_with("unix://");
    if !through_daemon {
        return Ok(uri.to_string());
    }
    if crate::sys::process::euid() != 0 {
        return Err(Failure::config(format!(
            "the local store is {uri:?}: importing outputs while the daemon holds their \
             locks needs direct access to the store (run nsh-fetch as root, or set \
             store.uri to the local store; without root, --import-method auto imports \
             through the daemon)"
        )));
    }
    Ok("local".into())
}

/// Both import methods write the store directly; without the right to,
/// Nix would fall back to the daemon, which takes the output locks again.
fn check_writable(real_dir: &Path) -> Result<(), Failure> {
    crate::sys::fs::check_writable(real_dir).map_err(|e| {
        Failure::config(format!(
            "cannot write the local store {} directly ({e}); nsh-fetch imports outputs \
             while the daemon holds their locks, which needs the store owner (root); \
             without root, --import-method auto imports through the daemon",
            real_dir.display(),
        ))
    })
}

/// One attempt: returns (paths copied, NAR bytes).
fn fetch_once(
    declared: &Declared,
    alloc: &mut AllocSection,
    config: &Config,
    here: &mut Here,
    session: &Session,
    progress: &mut dyn TransferProgress,
) -> Result<Attempt, Failure> {
    let way = session.way;
    let ssh = Ssh::ensure_master(alloc, config)?;
    let serve = crate::stage::ssh::remote_serve_argv(&config.remote);
    let serve: Vec<&str> = serve.iter().map(String::as_str).collect();
    let argv = if session.give_back {
        node::then_give_back_argv(&serve, &alloc.work, alloc.request)
    } else {
        serve.iter().map(ToString::to_string).collect()
    };
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut remote = ServeProcess::from_command(
        ssh.command(&argv),
        ssh.describe(),
        Some(Duration::from_secs(config.remote.io_timeout_s)),
    )?
    .when_stalled(crate::stage::ssh::stop_master_of(&ssh));
    let needed = trust::plan(&mut remote.client, declared, here)?;
    if needed.is_empty() {
        log_info!(
            "all {} wanted outputs are already in the local store",
            declared.wanted.len()
        );
        let told = end_session(remote, session)?;
        return Ok((Vec::new(), 0, told));
    }
    let total: u64 = needed.iter().map(|i| i.nar_size).sum();
    log_info!(
        "{}: fetching {} paths ({}) with DumpStorePath, importing with {}",
        ssh.describe(),
        needed.len(),
        human_bytes(total),
        way.method
    );
    progress.begin(needed.len() as u64, total);
    let imported = import(&mut remote.client, &needed, declared, here, way, progress)?;
    progress.end();
    let told = end_session(remote, session)?;
    let sizes: BTreeMap<&str, u64> = needed
        .iter()
        .map(|i| (i.path.as_str(), i.nar_size))
        .collect();
    let bytes = imported.iter().map(|p| sizes[p.as_str()]).sum();
    Ok((imported, bytes, told))
}

/// How one attempt talks to the node: the import method, and whether its
/// session gives the job back at its end.
struct Session<'w> {
    way: &'w Way,
    give_back: bool,
}

/// Ends the node's `nix-store --serve` (which must have ended well) and
/// returns what the give-back after it answered, when there was one.
fn end_session(remote: ServeProcess, session: &Session) -> Result<Option<Answer>, Failure> {
    if !session.give_back {
        remote.finish()?;
        return Ok(None);
    }
    let status = remote.finish_with_status()?;
    node::after_serve(status.code())
        .map(Some)
        .map_err(|_| Failure::transient(format!("nix-store --serve ended with {status}")))
}

/// Imports `needed` (checked on the way) from the node with `way`.
fn import<R: Read, W: Write>(
    remote: &mut ServeClient<R, W>,
    needed: &[PathInfo],
    declared: &Declared,
    here: &mut Here,
    way: &Way,
    progress: &mut dyn TransferProgress,
) -> Result<Vec<StorePath>, Failure> {
    let missing = |what: &str| {
        Failure::new(
            crate::Kind::Internal,
            format!("import method {} without {what}", way.method),
        )
    };
    match way.method {
        ImportMethod::LoadDb => {
            let direct = way.direct.as_ref().ok_or_else(|| missing("a store"))?;
            let roots = here.roots.as_deref_mut().ok_or_else(|| missing("roots"))?;
            import_load_db(
                remote,
                needed,
                declared,
                direct,
                roots,
                progress,
                way.lock_limit,
            )
        }
        ImportMethod::HeldLocks => {
            let direct = way.direct.as_ref().ok_or_else(|| missing("a store"))?;
            import_held_locks(remote, needed, declared, direct, progress)
        }
        ImportMethod::Daemon => {
            let mut command = here.local.nix_store();
            command.arg("--import");
            let importer = Importer {
                command,
                refused: &|status, said| {
                    daemon::import_refused("nix-store --import", status, said, None)
                },
            };
            import_stream(importer, remote, needed, declared, progress)
        }
        ImportMethod::Signed => {
            let key = way.key.as_ref().ok_or_else(|| missing("a key"))?;
            let store = (here.local.uri.as_str(), &here.local.dir);
            import_signed(remote, needed, declared, key, store, progress)
        }
        ImportMethod::Auto => Err(missing("a choice")),
    }
}

/// Reads the NAR of `info` with `read` (a copy or an unpack) from `nar`,
/// never past the size the node declared, and checks it: the size and
/// SHA-256 the node declared and, for a fixed output, the hash its
/// derivation declares. Returns the NAR's SHA-256. `fail` makes a failure
/// of `read`'s errors.
pub(super) fn read_checked(
    nar: &mut dyn Read,
    info: &PathInfo,
    fixed: Option<&FixedHash>,
    progress: &mut dyn TransferProgress,
    read: &mut dyn FnMut(&mut dyn Read, Bounds<'_>) -> Result<NarRead, NarError>,
    fail: &dyn Fn(NarError) -> Failure,
) -> Result<[u8; 32], Failure> {
    let mut check = fixed.map(FixedCheck::new);
    let (nar_tap, root_tap): (Option<&mut dyn Write>, Option<&mut dyn Write>) = match check.as_mut()
    {
        Some(check) if check.whole_nar() => (Some(check), None),
        Some(check) => (None, Some(check)),
        None => (None, None),
    };
    let mut reader = Hashing::new(Tee {
        inner: Reporting {
            inner: nar,
            to: progress,
        },
        tap: nar_tap,
    });
    let bounds = Bounds {
        max_size: info.nar_size,
        root_contents: root_tap,
    };
    let got = read(&mut reader, bounds).map_err(fail)?;
    let (digest, size) = reader.take_digest();
    check_nar(info, &digest, size)?;
    if let Some(check) = check {
        check
            .finish(&info.path, got.root)
            .map_err(|refused| refused.fail("the node"))?;
    }
    Ok(digest)
}

/// Checks a received NAR against the node's path info.
pub(super) fn check_nar(info: &PathInfo, digest: &[u8; 32], size: u64) -> Result<(), Failure> {
    if size != info.nar_size {
        return Err(Failure::permanent(format!(
            "{}: the NAR has {size} bytes, the node's database says {}",
            info.path, info.nar_size
        )));
    }
    if !hash::nar_hash_matches(&info.nar_hash, digest)? {
        return Err(Failure::permanent(format!(
            "{}: NAR hash mismatch: got sha256:{}, the node's database says {}",
            info.path,
            hash::nix_base32(digest),
            info.nar_hash
        )));
    }
    Ok(())
}

/// DumpStorePath of `info` from `remote`, its NAR copied to `to` as it
/// arrives and checked as [`read_checked`] does; a failed write to `to` is
/// `write_fail`'s to describe. Returns the NAR's SHA-256.
pub(super) fn receive_checked<R: Read, W: Write>(
    remote: &mut ServeClient<R, W>,
    info: &PathInfo,
    declared: &trust::Declared,
    to: &mut dyn Write,
    progress: &mut dyn TransferProgress,
    write_fail: &dyn Fn(std::io::Error) -> Failure,
) -> Result<[u8; 32], Failure> {
    remote.receive_nar(&info.path, |nar| {
        let mut copy = |from: &mut dyn Read, bounds: Bounds<'_>| {
            crate::nix::nar::copy_nar_bounded(from, &mut *to, bounds)
        };
        let fail = |e: NarError| match e {
            NarError::Write(e) => write_fail(e),
            other => nar_error(&info.path, other),
        };
        read_checked(
            nar,
            info,
            declared.fixed(&info.path),
            progress,
            &mut copy,
            &fail,
        )
    })
}

/// A failure reading the NAR of `path` from the node.
pub(super) fn nar_error(path: &StorePath, e: NarError) -> Failure {
    let message = match &e {
        NarError::Oversized { max } => format!(
            "the NAR of {path} from the node goes on past the {max} bytes the node declared; \
             cut there and refused"
        ),
        _ => format!("the NAR of {path} from the node: {e}"),
    };
    Failure::caused_by(e.kind(), message, e)
}

#[cfg(test)]
mod tests {
    use super::held_locks::relay_checked;
    use super::load_db::{load_db_input, lock_non_outputs, receive_into_store, Target};
    use super::*;
    use crate::error::Kind;
    use crate::nix::serve::client::ServeClient;
    use crate::nix::serve::test_server::{file_nar, FakeNode, StoredPath};
    use crate::nix::serve::{self};
    use crate::nix::store_path::test_path;
    use crate::nix::wire::test_bytes::{le, s};
    use crate::stage::progress::NoProgress;
    use sha2::{Digest, Sha256};
    use std::collections::BTreeSet;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    /// What may be imported when nothing is a fixed output.
    fn plain() -> Declared {
        Declared {
            drv: test_path("/nix/store/22222222222222222222222222222222-x.drv"),
            outputs: BTreeMap::new(),
            wanted: Vec::new(),
        }
    }

    const A: &str = "/nix/store/00000000000000000000000000000000-a";
    const B: &str = "/nix/store/11111111111111111111111111111111-b";

    /// A node like Nix 2.34 (no ExportPaths) holding `a` and `b` → `a`.
    fn node() -> FakeNode {
        FakeNode::nix_2_34()
            .with_file(A, &[], b"a")
            .with_file(B, &[A], b"bb")
    }

    fn infos(node: &FakeNode) -> Vec<PathInfo> {
        [A, B].iter().map(|p| node.store[*p].info.clone()).collect()
    }

    /// `path`'s NAR on the node replaced by another of the same size: the
    /// node's database and its files disagree.
    fn corrupt(mut node: FakeNode, path: &str) -> FakeNode {
        let stored = node.store.get_mut(path).unwrap();
        let wrong = file_nar(&vec![b'x'; stored.nar.len() - file_nar(b"").len()]);
        *stored = StoredPath {
            info: stored.info.clone(),
            nar: wrong,
        };
        node
    }

    #[test]
    fn import_methods_are_named_as_on_the_command_line() {
        assert_eq!(ImportMethod::default(), ImportMethod::Auto);
        assert_eq!(ImportMethod::Signed.to_string(), "signed");
        assert_eq!(ImportMethod::LoadDb.to_string(), "load-db");
        assert_eq!(ImportMethod::HeldLocks.to_string(), "held-locks");
    }

    #[test]
    fn an_importer_refusing_mid_stream_is_its_refusal_not_a_broken_pipe() {
        // 1 MiB: more than a pipe holds, so the importer's end is seen as a
        // failed write, whose exit status and words are the importer's.
        let node = FakeNode::nix_2_34().with_file(A, &[], &vec![b'x'; 1 << 20]);
        let needed = vec![node.store[A].info.clone()];
        let (mut client, _thread) = node.start();
        let mut command = std::process::Command::new("sh");
        command.args([
            "-c",
            "echo \"error: cannot add path '/nix/store/x' because it lacks a valid signature\" >&2; exit 1",
        ]);
        let importer = Importer {
            command,
            refused: &|status, said| {
                assert_eq!(status.code(), Some(1));
                daemon::import_refused("nix-store --import", status, said, None)
            },
        };
        let err =
            import_stream(importer, &mut client, &needed, &plain(), &mut NoProgress).unwrap_err();
        assert_eq!(err.kind, Kind::Config, "{}", err.message);
        assert!(
            err.message.contains("lacks a valid signature"),
            "{}",
            err.message
        );
        assert!(err.message.contains("trusted-users"), "{}", err.message);
    }

    #[test]
    fn held_locks_gets_an_export_stream_made_of_dump_store_path_byte_for_byte() {
        let node = node();
        let needed = infos(&node);
        let (nar_a, nar_b) = (node.store[A].nar.clone(), node.store[B].nar.clone());
        let (mut client, thread) = node.start();
        let mut out = Vec::new();
        let sent = relay_checked(&mut client, &needed, &plain(), &mut out, &mut NoProgress);
        assert_eq!(sent.unwrap(), [A, B]);
        let trailer = |path: &str, references: &[&str]| {
            let refs: Vec<Vec<u8>> = references.iter().map(|r| s(r)).collect();
            [
                le(serve::EXPORT_MAGIC),
                s(path),
                le(references.len() as u64),
                refs.concat(),
                s(""),
                le(0),
            ]
            .concat()
        };
        let stream = [
            le(1),
            nar_a,
            trailer(A, &[]),
            le(1),
            nar_b,
            trailer(B, &[A]),
            le(0),
        ]
        .concat();
        assert_eq!(out, stream);
        drop(client);
        let node = thread.join().unwrap();
        // DumpStorePath per path; nothing a 2.34 node lacks.
        assert_eq!(node.error, None);
        let asked = [
            le(serve::SERVE_MAGIC_1),
            le(serve::CLIENT_VERSION),
            le(3),
            s(A),
            le(3),
            s(B),
        ]
        .concat();
        assert_eq!(node.received, asked);
    }

    #[test]
    fn a_nar_unlike_the_nodes_record_stops_before_its_trailer() {
        let node = corrupt(node(), B);
        let needed = infos(&node);
        let (mut client, _thread) = node.start();
        let mut out = Vec::new();
        let err =
            relay_checked(&mut client, &needed, &plain(), &mut out, &mut NoProgress).unwrap_err();
        assert_eq!(err.kind, Kind::Permanent);
        assert!(err.message.contains("NAR hash mismatch"), "{}", err.message);
        assert!(err.message.contains(B), "{}", err.message);
        // `a` went through whole; `b`'s trailer, which makes the importer
        // register it, never did.
        let magic = serve::EXPORT_MAGIC.to_le_bytes();
        assert_eq!(out.windows(8).filter(|w| *w == magic).count(), 1);
    }

    #[test]
    fn a_nar_cut_short_is_transient_and_stops_before_its_trailer() {
        let info = node().store[A].info.clone();
        let nar = file_nar(b"a");
        let server = [
            le(serve::SERVE_MAGIC_2),
            le(0x207),
            nar[..nar.len() / 2].to_vec(),
        ]
        .concat();
        let mut client = ServeClient::handshake(&server[..], Vec::new(), "node1").unwrap();
        let mut out = Vec::new();
        let err =
            relay_checked(&mut client, &[info], &plain(), &mut out, &mut NoProgress).unwrap_err();
        assert_eq!(err.kind, Kind::Transient, "{}", err.message);
        let magic = serve::EXPORT_MAGIC.to_le_bytes();
        assert!(!out.windows(8).any(|w| w == magic));
    }

    /// A scratch store directory (`/nix/store` by name, `real=` a temp dir).
    fn scratch_store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("local?store=/nix/store&real={}", dir.path().display());
        (dir, LocalStore::new(&uri, "").unwrap())
    }

    /// Temporary roots in a scratch state directory.
    fn scratch_roots() -> (tempfile::TempDir, TempRoots) {
        let state = tempfile::tempdir().unwrap();
        let roots = TempRoots::new(state.path()).unwrap();
        (state, roots)
    }

    /// Receives `invalid` from `client` into `store` (at `dir`).
    fn receive(
        client: &mut crate::nix::serve::test_server::FakeClient,
        invalid: &[&PathInfo],
        store: &LocalStore,
        dir: &Path,
        declared: &Declared,
        placed: &mut Vec<super::load_db::Placed>,
    ) -> Result<(), Failure> {
        let (_state, mut roots) = scratch_roots();
        let mut target = Target {
            direct: store,
            real_dir: dir.to_path_buf(),
            roots: &mut roots,
        };
        receive_into_store(
            client,
            invalid,
            &mut target,
            declared,
            &mut NoProgress,
            placed,
        )
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn load_db_unpacks_each_nar_into_place_replacing_a_leftover() {
        let (dir, store) = scratch_store();
        let node = node();
        let needed = infos(&node);
        let invalid: Vec<&PathInfo> = needed.iter().collect();
        // A partial `b` left by an interrupted import.
        let b_real = dir.path().join(&B["/nix/store/".len()..]);
        std::fs::create_dir(&b_real).unwrap();
        std::fs::write(b_real.join("junk"), "x").unwrap();
        let (mut client, _thread) = node.start();
        let mut placed = Vec::new();
        receive(
            &mut client,
            &invalid,
            &store,
            dir.path(),
            &plain(),
            &mut placed,
        )
        .unwrap();
        assert_eq!(placed.len(), 2);
        assert_eq!(std::fs::read(&b_real).unwrap(), b"bb");
        let mode = std::fs::metadata(&b_real).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        assert_eq!(
            entries(dir.path()),
            [&A["/nix/store/".len()..], &B["/nix/store/".len()..]]
        );
        let digest: [u8; 32] = Sha256::digest(file_nar(b"bb")).into();
        assert_eq!(placed[1].digest, digest);
    }

    #[test]
    fn load_db_leaves_nothing_of_a_bad_nar() {
        let (dir, store) = scratch_store();
        let node = corrupt(node(), B);
        let needed = infos(&node);
        let invalid: Vec<&PathInfo> = needed.iter().collect();
        let (mut client, _thread) = node.start();
        let mut placed = Vec::new();
        let err = receive(
            &mut client,
            &invalid,
            &store,
            dir.path(),
            &plain(),
            &mut placed,
        )
        .unwrap_err();
        assert!(err.message.contains("NAR hash mismatch"), "{}", err.message);
        // `a` is whole and verified, for registration; of `b` nothing, not
        // even its temporary name.
        assert_eq!(placed.len(), 1);
        assert_eq!(entries(dir.path()), [&A["/nix/store/".len()..]]);
    }

    /// `A` declared as a fixed output (flat sha256) of `contents`.
    fn fixed_a(contents: &[u8]) -> Declared {
        let hex = crate::nix::hash::hex(&Sha256::digest(contents));
        let output = crate::nix::drv::DrvOutput {
            path: Some(test_path(A)),
            hash_algo: "sha256".into(),
            hash: hex,
        };
        let fixed = FixedHash::of(&test_path(A), &output).unwrap();
        Declared {
            outputs: [(
                test_path(A),
                trust::DeclaredOutput {
                    name: "out".into(),
                    fixed,
                },
            )]
            .into(),
            ..plain()
        }
    }

    #[test]
    fn a_fixed_output_is_checked_against_its_derivation_not_the_node() {
        // The node's database agrees with what it sends (its NAR hash
        // matches): only the derivation's hash can tell.
        for (declared, ok) in [(fixed_a(b"a"), true), (fixed_a(b"b"), false)] {
            let (dir, store) = scratch_store();
            let node = FakeNode::nix_2_34().with_file(A, &[], b"a");
            let info = node.store[A].info.clone();
            let (mut client, _thread) = node.start();
            let mut placed = Vec::new();
            let got = receive(
                &mut client,
                &[&info],
                &store,
                dir.path(),
                &declared,
                &mut placed,
            );
            if ok {
                got.unwrap();
                assert_eq!(placed.len(), 1);
                continue;
            }
            let err = got.unwrap_err();
            assert!(
                matches!(
                    err.cause::<ImportRefused>(),
                    Some(ImportRefused::FixedHashMismatch { .. })
                ),
                "{}",
                err.message
            );
            assert!(placed.is_empty());
            assert_eq!(entries(dir.path()), Vec::<String>::new());
            // The same through the held-locks relay: no trailer.
            let node = FakeNode::nix_2_34().with_file(A, &[], b"a");
            let (mut client, _thread) = node.start();
            let mut out = Vec::new();
            let err = relay_checked(&mut client, &[info], &declared, &mut out, &mut NoProgress)
                .unwrap_err();
            assert!(err.cause::<ImportRefused>().is_some(), "{}", err.message);
            let magic = serve::EXPORT_MAGIC.to_le_bytes();
            assert!(!out.windows(8).any(|w| w == magic));
        }
    }

    #[test]
    fn a_nar_longer_than_declared_is_cut_there_and_refused() {
        let (dir, store) = scratch_store();
        let node = FakeNode::nix_2_34().with_file(A, &[], &vec![b'x'; 100_000]);
        let mut info = node.store[A].info.clone();
        info.nar_size = 1000;
        let (mut client, _thread) = node.start();
        let mut placed = Vec::new();
        let err = receive(
            &mut client,
            &[&info],
            &store,
            dir.path(),
            &plain(),
            &mut placed,
        )
        .unwrap_err();
        assert_eq!(err.kind, Kind::Permanent);
        assert!(
            matches!(
                err.cause::<NarError>(),
                Some(NarError::Oversized { max: 1000 })
            ),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("1000 bytes the node declared"),
            "{}",
            err.message
        );
        assert_eq!(entries(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn only_paths_that_are_not_outputs_are_locked_and_only_until_dropped() {
        let (dir, store) = scratch_store();
        let needed = infos(&node());
        let outputs: BTreeSet<StorePath> = [test_path(B)].into();
        let locks = lock_non_outputs(
            &needed,
            &outputs,
            &store,
            dir.path(),
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(locks.len(), 1);
        let lock_file = |p: &str| {
            dir.path()
                .join(format!("{}.lock", &p["/nix/store/".len()..]))
        };
        assert!(lock_file(A).exists() && !lock_file(B).exists());
        drop(locks);
        assert!(!lock_file(A).exists(), "released as Nix releases it");
    }

    #[test]
    fn load_db_lines() {
        const X: &str = "/s/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-x";
        const X_DRV: &str = "/s/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-x.drv";
        const Y: &str = "/s/2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c-y";
        let info = PathInfo {
            deriver: Some(test_path(X_DRV)),
            references: vec![test_path(X), test_path(Y)],
            nar_size: 120,
            ..PathInfo::new(test_path(X))
        };
        let dir = crate::nix::store_path::StoreDir::new("/s").unwrap();
        let text = load_db_input(&[&info], &[[0xab; 32]], &dir).unwrap();
        assert_eq!(
            text,
            format!("{X}\n{}\n120\n{X_DRV}\n2\n{X}\n{Y}\n", "ab".repeat(32))
        );
        // Nothing outside the store imported into reaches --load-db.
        let other = crate::nix::store_path::StoreDir::new("/t").unwrap();
        assert!(load_db_input(&[&info], &[[0xab; 32]], &other).is_err());
        let elsewhere = PathInfo {
            references: vec![test_path("/t/2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c-y")],
            ..info
        };
        assert!(load_db_input(&[&elsewhere], &[[0xab; 32]], &dir).is_err());
    }

    #[test]
    fn the_daemon_store_is_imported_into_directly() {
        assert_eq!(direct_store_uri("local").unwrap(), "local");
        assert_eq!(direct_store_uri("").unwrap(), "");
        if crate::sys::process::euid() == 0 {
            assert_eq!(direct_store_uri("daemon").unwrap(), "local");
        } else {
            assert_eq!(direct_store_uri("daemon").unwrap_err().kind, Kind::Config);
        }
    }
}
