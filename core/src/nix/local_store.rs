//! The local store: where its files are, and the input closure a
//! derivation's build needs.
//!
//! All queries for a derivation go over one `nix-store --serve` process
//! ([`ServeProcess`]): QueryValidPaths for the roots, QueryClosure, then one
//! QueryPathInfos for the whole closure. Never one process per path.
//!
//! Which paths are valid is asked of the Nix daemon instead when it serves
//! the store ([`Validity`]): a connection to its socket starts no process
//! here, where each `nix-store` costs an exec and its dynamic linking
//! (`docs/reference/nix-daemon-protocol.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::PathBuf;

use crate::error::Failure;
use crate::nix::daemon::client::{self as daemon, DaemonConnection};
use crate::nix::drv::{self, Drv};
use crate::nix::serve::client::{ServeClient, ServeProcess};
use crate::nix::serve::PathInfo;
use crate::nix::store_path::{store_uri_param, StoreDir, StorePath};

/// The store URI that means "Nix's default store" (the daemon when one
/// runs, else the local store): what a ticket without `store.uri` uses.
pub const DEFAULT_STORE_URI: &str = "auto";

/// The `--store` argument for `uri`: none for Nix's default store (`""` or
/// `auto`), so that every Nix command here picks the store the same way.
#[must_use]
pub fn store_arg(uri: &str) -> Option<&str> {
    (!uri.is_empty() && uri != DEFAULT_STORE_URI).then_some(uri)
}

/// The local store, as named by a Nix store URI (`""`/`auto`, `daemon`,
/// `local`, `local?root=/r`, `/r` …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalStore {
    /// The URI, passed to Nix as `--store` unless it names the default
    /// store (`store_arg`).
    pub uri: String,
    /// The logical store directory (what store paths start with).
    pub dir: StoreDir,
    /// The directory holding `nix-store` (empty: from PATH).
    pub nix_bin_dir: String,
    /// The socket of the Nix daemon that serves this store, if one does
    /// ([`daemon::socket_for_store`]); validity is asked there.
    pub daemon_socket: Option<PathBuf>,
}

impl LocalStore {
    /// The store at `uri`, its directory from the URI (else `NIX_STORE_DIR`, else `/nix/store`).
    pub fn new(uri: &str, nix_bin_dir: &str) -> Result<LocalStore, Failure> {
        Ok(LocalStore {
            uri: uri.to_string(),
            dir: StoreDir::for_store_uri(uri)?,
            nix_bin_dir: nix_bin_dir.to_string(),
            daemon_socket: daemon::socket_for_store(uri, &|name| std::env::var(name).ok()),
        })
    }

    /// Where the store's files are on this machine's file system. The
    /// logical directory, except for stores with another root: a URI that
    /// is an absolute path, or one with `root=` or `real=`.
    pub fn real_dir(&self) -> PathBuf {
        if let Some(real) = store_uri_param(&self.uri, "real") {
            return PathBuf::from(real);
        }
        let root = if self.uri.starts_with('/') {
            Some(self.uri.split('?').next().unwrap_or_default())
        } else {
            store_uri_param(&self.uri, "root")
        };
        match root {
            Some(root) => PathBuf::from(format!("{root}{}", self.dir)),
            None => PathBuf::from(self.dir.as_str()),
        }
    }

    /// The store's state directory (its database, `temproots/`, `gc.lock`):
    /// the `state=` parameter, else `<root>/nix/var/nix` for a store with
    /// another root, else `NIX_STATE_DIR`, else `/nix/var/nix` (as Nix's
    /// `LocalFSStoreConfig` decides).
    pub fn state_dir(&self) -> PathBuf {
        if let Some(state) = store_uri_param(&self.uri, "state") {
            return PathBuf::from(state);
        }
        let root = if self.uri.starts_with('/') {
            Some(self.uri.split('?').next().unwrap_or_default())
        } else {
            store_uri_param(&self.uri, "root")
        };
        if let Some(root) = root {
            return PathBuf::from(format!("{root}/nix/var/nix"));
        }
        match std::env::var_os("NIX_STATE_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => PathBuf::from("/nix/var/nix"),
        }
    }

    /// Reads the derivation at the store path `path` (which must be in
    /// this store's directory).
    pub fn read_drv(&self, path: &StorePath) -> Result<Drv, Failure> {
        drv::read(&self.dir, path, &self.real_dir().join(path.basename()))
    }

    /// A `nix-store` command (from `nix_bin_dir`) on this store.
    #[must_use]
    pub fn nix_store(&self) -> std::process::Command {
        let program = if self.nix_bin_dir.is_empty() {
            PathBuf::from("nix-store")
        } else {
            std::path::Path::new(&self.nix_bin_dir).join("nix-store")
        };
        let mut command = std::process::Command::new(program);
        if let Some(uri) = store_arg(&self.uri) {
            command.arg("--store").arg(uri);
        }
        command
    }

    /// Starts one serve-protocol conversation with this store.
    pub fn serve(&self, write: bool) -> Result<ServeProcess, Failure> {
        ServeProcess::spawn_local(&self.nix_bin_dir, &self.uri, write)
    }

    /// Which of `paths` are valid in this store now, asked of a new daemon
    /// worker or a new `nix-store --serve` (not one that answered before,
    /// say, locks were taken).
    pub fn valid_paths<S: AsRef<str>>(&self, paths: &[S]) -> Result<BTreeSet<StorePath>, Failure> {
        let mut validity = self.validity();
        let valid = validity.of(paths);
        let finished = validity.finish();
        let valid = valid?;
        finished?;
        Ok(valid)
    }

    /// Validity questions to one daemon worker or one `nix-store --serve`,
    /// started at the first.
    #[must_use]
    pub fn validity(&self) -> Validity<'_> {
        Validity {
            store: self,
            asker: None,
        }
    }

    /// Connects to the daemon serving this store, else starts a
    /// `nix-store --serve` on it.
    fn validity_asker(&self) -> Result<Asker, Failure> {
        if let Some(socket) = &self.daemon_socket {
            if let Some(daemon) = daemon::connect(socket)? {
                crate::log_debug!(
                    "validity in {}: asking the Nix daemon at {} (worker protocol {}, Nix {})",
                    self.describe(),
                    socket.display(),
                    crate::nix::daemon::version_text(daemon.version()),
                    daemon.info().nix_version.as_deref().unwrap_or("unknown")
                );
                return Ok(Asker::Daemon(daemon));
            }
        }
        crate::log_debug!(
            "validity in {}: asking a local nix-store --serve",
            self.describe()
        );
        Ok(Asker::Serve(self.serve(false)?))
    }

    /// The store, for messages.
    fn describe(&self) -> &str {
        if self.uri.is_empty() {
            DEFAULT_STORE_URI
        } else {
            &self.uri
        }
    }

    /// What the build of `drv` needs as input before it is closed under
    /// references: its inputSrcs and, of every input derivation, the
    /// outputs it uses. Input derivations are read from the store's files.
    pub fn input_roots(&self, drv: &Drv) -> Result<Vec<StorePath>, Failure> {
        let mut roots: BTreeSet<StorePath> = drv.input_srcs.iter().cloned().collect();
        for (input_path, outputs) in &drv.input_drvs {
            let input = self
                .read_drv(input_path)
                .map_err(|e| e.context(format!("input of {}", drv.path)))?;
            for output in outputs {
                let Some(out) = input.outputs.get(output) else {
                    return Err(Failure::input(format!(
                        "derivation {} uses output {output:?} of {input_path}, which has no such output",
                        drv.path
                    )));
                };
                let Some(path) = &out.path else {
                    return Err(Failure::input(format!(
                        "derivation {} uses output {output:?} of {input_path}, whose path is not known \
                         in advance (content-addressed derivations are not supported)",
                        drv.path
                    )));
                };
                roots.insert(path.clone());
            }
        }
        Ok(roots.into_iter().collect())
    }
}

/// The paths a build needs, closed under references.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputClosure {
    /// In dependency order: every path after all the paths it refers to.
    pub paths: Vec<StorePath>,
    /// Sum of the NAR sizes.
    pub nar_size: u64,
    /// The path infos, in the order of `paths`.
    pub infos: Vec<PathInfo>,
}

/// Several validity questions to one daemon worker (when the daemon
/// serves the store, [`LocalStore::daemon_socket`]) or else one
/// `nix-store --serve`, started at the first question: one connection or
/// process where each question would start its own. Only for questions
/// about paths nothing is known to have made valid in between: a newer Nix
/// may answer from what it looked up before. A question after locks were
/// taken or after an import goes to a new one ([`LocalStore::valid_paths`]):
/// each connection to the daemon is a new worker, with a store of its own.
pub struct Validity<'s> {
    store: &'s LocalStore,
    asker: Option<Asker>,
}

/// Who answers a [`Validity`]'s questions.
enum Asker {
    /// A daemon worker.
    Daemon(DaemonConnection),
    /// A local `nix-store --serve`.
    Serve(ServeProcess),
}

/// Which way a [`Validity`] asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidityWay {
    /// The Nix daemon, over its socket.
    Daemon,
    /// A local `nix-store --serve`.
    Serve,
}

impl Validity<'_> {
    /// Which of `paths` are valid. After a failure the conversation may be
    /// out of step: ask no more of this `Validity`.
    pub fn of<S: AsRef<str>>(&mut self, paths: &[S]) -> Result<BTreeSet<StorePath>, Failure> {
        if paths.is_empty() {
            return Ok(BTreeSet::new());
        }
        let asker = match &mut self.asker {
            Some(asker) => asker,
            None => self.asker.insert(self.store.validity_asker()?),
        };
        let valid = match asker {
            Asker::Daemon(daemon) => daemon.query_valid_paths(paths)?,
            Asker::Serve(serve) => serve.client.query_valid_paths(paths, false, false)?,
        };
        Ok(valid.into_iter().collect())
    }

    /// Which way the questions went; `None` before the first.
    #[must_use]
    pub fn way(&self) -> Option<ValidityWay> {
        self.asker.as_ref().map(|asker| match asker {
            Asker::Daemon(_) => ValidityWay::Daemon,
            Asker::Serve(_) => ValidityWay::Serve,
        })
    }

    /// Ends the conversation, if one was started (a daemon worker ends when
    /// its connection closes).
    pub fn finish(self) -> Result<(), Failure> {
        match self.asker {
            Some(Asker::Serve(serve)) => serve.finish(),
            Some(Asker::Daemon(_)) | None => Ok(()),
        }
    }
}

/// Closes `roots` under references in the store `client` talks to. Roots
/// that are not valid there (outputs not built yet) are bad input, listed.
pub fn input_closure<R: Read, W: Write>(
    client: &mut ServeClient<R, W>,
    roots: &[StorePath],
) -> Result<InputClosure, Failure> {
    if roots.is_empty() {
        return Ok(InputClosure::default());
    }
    let valid: BTreeSet<StorePath> = client
        .query_valid_paths(roots, false, false)?
        .into_iter()
        .collect();
    let missing: Vec<&str> = roots
        .iter()
        .filter(|p| !valid.contains(*p))
        .map(StorePath::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(Failure::input(format!(
            "{} input path(s) are not in the local store (input derivations not built yet?): {}",
            missing.len(),
            missing.join(" ")
        )));
    }
    let closure = client.query_closure(roots, false)?;
    let infos = client.query_path_infos(&closure)?;
    if infos.len() != closure.len() {
        let known: BTreeSet<&str> = infos.iter().map(|i| i.path.as_str()).collect();
        let gone: Vec<&str> = closure
            .iter()
            .map(StorePath::as_str)
            .filter(|p| !known.contains(p))
            .collect();
        // Valid a moment ago, gone now: the garbage collector ran.
        return Err(Failure::transient(format!(
            "paths vanished from the local store while being queried: {}",
            gone.join(" ")
        )));
    }
    let infos = dependency_order(infos)?;
    Ok(InputClosure {
        paths: infos.iter().map(|i| i.path.clone()).collect(),
        nar_size: infos.iter().map(|i| i.nar_size).sum(),
        infos,
    })
}

/// Sorts `infos` so that every path comes after the paths it refers to
/// (self-references aside). Ties are broken by path, so the order is
/// deterministic. References outside the set are ignored (the caller
/// passes a closure, so there are none).
pub fn dependency_order(infos: Vec<PathInfo>) -> Result<Vec<PathInfo>, Failure> {
    let mut by_path: BTreeMap<StorePath, PathInfo> =
        infos.into_iter().map(|i| (i.path.clone(), i)).collect();
    let paths: Vec<StorePath> = by_path.keys().cloned().collect();
    let index: BTreeMap<&str, usize> = paths
        .iter()
        .enumerate()
        .map(|(n, p)| (p.as_str(), n))
        .collect();
    // Iterative depth-first post-order: long chains must not overflow the stack.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark = vec![Mark::New; paths.len()];
    let mut order = Vec::with_capacity(paths.len());
    for start in 0..paths.len() {
        if mark[start] != Mark::New {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        mark[start] = Mark::Open;
        while let Some((node, next_ref)) = stack.last_mut() {
            let refs = &by_path[&paths[*node]].references;
            if *next_ref < refs.len() {
                let r = &refs[*next_ref];
                *next_ref += 1;
                let Some(&child) = index.get(r.as_str()) else {
                    continue;
                };
                if child == *node {
                    continue;
                }
                match mark[child] {
                    Mark::New => {
                        mark[child] = Mark::Open;
                        stack.push((child, 0));
                    }
                    Mark::Open => {
                        return Err(Failure::input(format!(
                            "the store's references form a cycle through {}",
                            paths[child]
                        )))
                    }
                    Mark::Done => {}
                }
            } else {
                mark[*node] = Mark::Done;
                order.push(*node);
                stack.pop();
            }
        }
    }
    // Each path is in `order` once, so each is found.
    Ok(order
        .into_iter()
        .filter_map(|n| by_path.remove(&paths[n]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::store_path::test_path;

    /// The store path named `name` in the store `/s`.
    fn p(name: &str) -> String {
        format!("/s/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-{name}")
    }

    fn info(path: &str, refs: &[&str]) -> PathInfo {
        PathInfo {
            references: refs.iter().map(|r| test_path(&p(r))).collect(),
            nar_size: 1,
            ..PathInfo::new(test_path(&p(path)))
        }
    }

    #[test]
    fn dependencies_come_first() {
        let infos = vec![
            info("a", &["b", "c", "a"]),
            info("c", &["d"]),
            info("b", &["d"]),
            info("d", &[]),
            info("e", &[]),
        ];
        let order: Vec<StorePath> = dependency_order(infos)
            .unwrap()
            .into_iter()
            .map(|i| i.path)
            .collect();
        assert_eq!(order, [p("d"), p("b"), p("c"), p("a"), p("e")]);
    }

    #[test]
    fn a_long_chain_does_not_overflow() {
        let n = 200_000;
        let infos: Vec<PathInfo> = (0..n)
            .map(|i| {
                let refs: &[&str] = if i + 1 < n {
                    &[&format!("{:07}", i + 1)]
                } else {
                    &[]
                };
                info(&format!("{i:07}"), refs)
            })
            .collect();
        let order = dependency_order(infos).unwrap();
        assert_eq!(order[0].path, p(&format!("{:07}", n - 1)));
        assert_eq!(order[n - 1].path, p("0000000"));
    }

    #[test]
    fn cycles_are_reported() {
        let err = dependency_order(vec![info("a", &["b"]), info("b", &["a"])]).unwrap_err();
        assert!(err.message.contains("cycle"), "{}", err.message);
    }

    #[test]
    fn real_dirs() {
        let store = |uri: &str| LocalStore::new(uri, "").unwrap();
        assert_eq!(
            store("local?root=/r").real_dir(),
            PathBuf::from("/r/nix/store")
        );
        assert_eq!(store("/r").real_dir(), PathBuf::from("/r/nix/store"));
        assert_eq!(
            store("local?store=/s&real=/x").real_dir(),
            PathBuf::from("/x")
        );
        assert_eq!(store("local?store=/s").real_dir(), PathBuf::from("/s"));
        assert_eq!(
            store("local?root=/r").state_dir(),
            PathBuf::from("/r/nix/var/nix")
        );
        assert_eq!(
            store("local?store=/s&state=/st").state_dir(),
            PathBuf::from("/st")
        );
    }
}
