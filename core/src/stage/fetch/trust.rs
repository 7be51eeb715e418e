//! What nsh-fetch may import: decided from the derivation in the local
//! store, never from what the node says.
//!
//! The node (its store, its `nix-store`, whoever builds on it) is not
//! trusted. So:
//!
//! * the outputs are exactly those the `.drv` declares: their paths for an
//!   input-addressed or fixed derivation, their names for a floating
//!   content-addressed one (whose paths only the build tells);
//! * what is fetched is the wanted outputs, and the other outputs of the
//!   same derivation they refer to, that the local store lacks; every other
//!   reference must be valid in the local store already (it is kept valid
//!   by a temporary GC root until the import is done), else the import is
//!   refused, naming the path, and nothing is registered;
//! * a fixed output has no references, and its hash is recomputed here
//!   ([`super::fixed`]);
//! * the outputs' NARs together may not be larger than `[remote]
//!   max_output_size`, and each is cut at the size the node declared;
//! * what is registered (`nix-store --load-db`, an export trailer) is made
//!   here: the node's path, references and sizes, once checked, and the
//!   derivation as deriver. The node's deriver, content address and
//!   signatures are not kept.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{Read, Write};

use super::fixed::FixedHash;
use crate::error::{Failure, Kind, KindOf};
use crate::nix::local_store::{self, LocalStore, Validity};
use crate::nix::serve::client::ServeClient;
use crate::nix::serve::{self, PathInfo};
use crate::nix::store_path::StorePath;
use crate::nix::temp_roots::TempRoots;
use crate::ticket::Ticket;

/// Why something the node sent is not imported. Permanent: the node (or
/// the build on it) sent it; asking the same node again gives the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportRefused {
    /// The node reports an output at another path than the derivation
    /// declares, or a floating output whose name is not the output's.
    Undeclared {
        drv: StorePath,
        output: String,
        declared: String,
        reported: StorePath,
    },
    /// An output refers to a path that is neither an output of the same
    /// derivation nor valid in the local store.
    ForeignReference {
        output: StorePath,
        reference: StorePath,
        drv: StorePath,
    },
    /// A fixed output with references (Nix forbids them).
    FixedWithReferences {
        output: StorePath,
        reference: StorePath,
    },
    /// A fixed output whose hash nsh cannot recompute (`git:`, an unknown
    /// algorithm).
    UncheckableFixed { output: StorePath, algo: String },
    /// A flat fixed output that is not one non-executable regular file.
    FixedNotAFile { output: StorePath },
    /// A fixed output whose contents have another hash than declared.
    FixedHashMismatch {
        output: StorePath,
        declared: String,
        got: String,
    },
    /// The outputs' NARs are larger than `[remote] max_output_size`.
    TooLarge { total: u64, max: u64 },
    /// The node answered QueryPathInfos with another set of paths than
    /// asked (one missing, one not asked for, one twice).
    UnaskedAnswer { path: StorePath },
}

impl fmt::Display for ImportRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImportRefused::Undeclared {
                drv,
                output,
                declared,
                reported,
            } => write!(
                f,
                "the node reports output {output:?} of {drv} at {reported}, but the derivation \
                 declares {declared}"
            ),
            ImportRefused::ForeignReference {
                output,
                reference,
                drv,
            } => write!(
                f,
                "{output} refers to {reference}, which is neither an output of {drv} nor valid \
                 in the local store"
            ),
            ImportRefused::FixedWithReferences { output, reference } => write!(
                f,
                "the fixed output {output} refers to {reference}; a fixed-output derivation \
                 must not refer to store paths"
            ),
            ImportRefused::UncheckableFixed { output, algo } => write!(
                f,
                "the fixed output {output} has a hash nsh cannot recompute ({algo:?}), so it \
                 cannot check what the node sends"
            ),
            ImportRefused::FixedNotAFile { output } => write!(
                f,
                "the fixed output {output} is not one non-executable regular file, as its flat \
                 hash requires"
            ),
            ImportRefused::FixedHashMismatch {
                output,
                declared,
                got,
            } => write!(
                f,
                "hash mismatch in the fixed output {output}: the derivation declares \
                 {declared}, the node sent contents with {got}"
            ),
            ImportRefused::TooLarge { total, max } => write!(
                f,
                "the outputs are {total} bytes (NAR), more than max_output_size = {max}"
            ),
            ImportRefused::UnaskedAnswer { path } => write!(
                f,
                "the node's path infos do not match what was asked (at {path})"
            ),
        }
    }
}

impl std::error::Error for ImportRefused {}

impl KindOf for ImportRefused {
    fn kind(&self) -> Kind {
        Kind::Permanent
    }
}

impl ImportRefused {
    /// The failure, saying where it came from and that nothing was
    /// registered.
    pub fn fail(self, peer: &str) -> Failure {
        let message = format!("refusing what {peer} sent: {self}; nothing was registered");
        Failure::caused_by(Kind::Permanent, message, self)
    }
}

/// One output the derivation declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredOutput {
    pub name: String,
    /// The hash a fixed output must have.
    pub fixed: Option<FixedHash>,
}

/// What may be imported for one ticket: the derivation's outputs (by path)
/// and the wanted ones among them.
#[derive(Debug, Clone)]
pub struct Declared {
    pub drv: StorePath,
    pub outputs: BTreeMap<StorePath, DeclaredOutput>,
    /// The wanted outputs (all of them when the ticket names none).
    pub wanted: Vec<StorePath>,
}

impl Declared {
    /// The hash `path` must have, if it is a fixed output.
    pub fn fixed(&self, path: &StorePath) -> Option<&FixedHash> {
        self.outputs.get(path).and_then(|o| o.fixed.as_ref())
    }
}

/// `<drv name>` for `out`, `<drv name>-<output>` otherwise: the name of an
/// output path (Nix's `outputPathName`).
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_string()
    } else {
        format!("{drv_name}-{output}")
    }
}

impl Declared {
    /// Reads the ticket's derivation from `local` and decides what may be
    /// imported: every output path from the `.drv`; for an output whose
    /// path only the build tells (floating content-addressed), the path
    /// `run.built_outputs` reports, if its name is the output's.
    ///
    /// # Errors
    /// The derivation cannot be read (bad input), the ticket contradicts it
    /// (bad input), or the node's report does (refused).
    pub fn of(ticket: &Ticket, local: &LocalStore) -> Result<Declared, Failure> {
        let section = ticket.need_drv()?;
        let drv = local.read_drv(&section.path).map_err(|e| {
            e.context("nsh-fetch imports only the outputs of a derivation in the local store")
        })?;
        let wanted_names = drv.wanted_outputs(&section.wanted)?;
        let reported = ticket.run.as_ref().map(|run| &run.built_outputs);
        let mut declared = Declared {
            drv: drv.path.clone(),
            outputs: BTreeMap::new(),
            wanted: Vec::new(),
        };
        for (name, output) in &drv.outputs {
            let from_ticket = section.outputs.get(name).cloned().flatten();
            let from_node = reported.and_then(|r| r.get(name));
            let path = match &output.path {
                Some(path) => {
                    if from_ticket.as_ref().is_some_and(|t| t != path) {
                        return Err(Failure::input(format!(
                            "the ticket's drv.outputs.{name} is not the path {} declares ({path})",
                            drv.path
                        )));
                    }
                    if let Some(reported) = from_node.filter(|r| *r != path) {
                        return Err(undeclared(&drv.path, name, path.as_str(), reported));
                    }
                    path.clone()
                }
                None => match from_node {
                    Some(reported) => {
                        local.dir.check(reported)?;
                        let want = output_path_name(&drv.name, name);
                        if reported.name() != want {
                            let shape = format!("a path named {want}");
                            return Err(undeclared(&drv.path, name, &shape, reported));
                        }
                        reported.clone()
                    }
                    None if wanted_names.contains(name) => {
                        return Err(Failure::input(format!(
                            "output {name:?} of {} has no known path and the ticket has no \
                             run.built_outputs",
                            drv.path
                        )))
                    }
                    None => continue,
                },
            };
            let fixed = FixedHash::of(&path, output).map_err(|e| e.fail("the node"))?;
            if wanted_names.contains(name) {
                declared.wanted.push(path.clone());
            }
            let name = name.clone();
            declared
                .outputs
                .insert(path, DeclaredOutput { name, fixed });
        }
        Ok(declared)
    }
}

fn undeclared(drv: &StorePath, output: &str, declared: &str, reported: &StorePath) -> Failure {
    ImportRefused::Undeclared {
        drv: drv.clone(),
        output: output.to_string(),
        declared: declared.to_string(),
        reported: reported.clone(),
    }
    .fail("the node")
}

/// What [`plan`] needs besides the node.
pub(super) struct Here<'a> {
    pub local: &'a LocalStore,
    /// This process's temporary roots, when it writes the store itself.
    pub roots: Option<&'a mut TempRoots>,
    pub max_output_size: u64,
}

/// The outputs to fetch, with the path infos to register (checked, the
/// derivation as deriver), in dependency order. Every output fetched and
/// every path they refer to is a temporary GC root here from before its
/// validity is looked at; the wanted outputs (and the other outputs they
/// need) are locked on the node for the rest of the conversation.
pub(super) fn plan<R: Read, W: Write>(
    remote: &mut ServeClient<R, W>,
    declared: &Declared,
    here: &mut Here,
) -> Result<Vec<PathInfo>, Failure> {
    let peer = remote.peer().to_string();
    // Every local question of the plan goes to one daemon worker or one
    // `nix-store --serve`: nothing here makes a path valid, so no answer
    // goes stale.
    let mut validity = here.local.validity();
    let planned = plan_with_validity(remote, declared, here, &mut validity, &peer);
    let finished = validity.finish();
    let planned = planned?;
    finished?;
    Ok(planned)
}

fn plan_with_validity<R: Read, W: Write>(
    remote: &mut ServeClient<R, W>,
    declared: &Declared,
    here: &mut Here,
    validity: &mut Validity,
    peer: &str,
) -> Result<Vec<PathInfo>, Failure> {
    let mut todo = missing_here(&declared.wanted, here, validity)?;
    lock_on_node(remote, &todo, &BTreeMap::new())?;
    let mut infos: BTreeMap<StorePath, PathInfo> = BTreeMap::new();
    // A reference that is no output → the first output referring to it.
    let mut others: BTreeMap<StorePath, StorePath> = BTreeMap::new();
    while !todo.is_empty() {
        let answered = path_infos(remote, &todo)?;
        // Another output that is needed → the output that refers to it.
        let mut next: BTreeMap<StorePath, StorePath> = BTreeMap::new();
        for info in answered {
            let fixed = declared.outputs[&info.path].fixed.is_some();
            for reference in &info.references {
                here.local.dir.check(reference)?;
                if *reference == info.path && !fixed {
                    continue;
                }
                if fixed {
                    return Err(ImportRefused::FixedWithReferences {
                        output: info.path.clone(),
                        reference: reference.clone(),
                    }
                    .fail(peer));
                }
                if declared.outputs.contains_key(reference) {
                    let planned = infos.contains_key(reference) || todo.contains(reference);
                    if !planned {
                        next.entry(reference.clone())
                            .or_insert_with(|| info.path.clone());
                    }
                } else {
                    others
                        .entry(reference.clone())
                        .or_insert_with(|| info.path.clone());
                }
            }
            infos.insert(info.path.clone(), registered(info, &declared.drv));
        }
        let needed: Vec<StorePath> = next.keys().cloned().collect();
        let needed = missing_here(&needed, here, validity)?;
        lock_on_node(remote, &needed, &next)?;
        todo = needed;
    }
    check_others(&others, declared, here, validity, peer)?;
    let total = infos
        .values()
        .fold(0u64, |sum, info| sum.saturating_add(info.nar_size));
    if total > here.max_output_size {
        let max = here.max_output_size;
        return Err(ImportRefused::TooLarge { total, max }.fail(peer));
    }
    local_store::dependency_order(infos.into_values().collect())
}

/// Of `paths`, those the local store lacks; each is made a temporary root
/// first, so that what is found valid stays valid.
fn missing_here(
    paths: &[StorePath],
    here: &mut Here,
    validity: &mut Validity,
) -> Result<Vec<StorePath>, Failure> {
    if let Some(roots) = here.roots.as_deref_mut() {
        for path in paths {
            roots.add(path).map_err(|e| {
                Failure::transient(format!("adding a temporary GC root for {path}: {e}"))
            })?;
        }
    }
    let valid = validity.of(paths)?;
    Ok(paths
        .iter()
        .filter(|p| !valid.contains(*p))
        .cloned()
        .collect())
}

/// The node must have `paths` (outputs to fetch), which it keeps for the
/// rest of the conversation (`lock`). `referrers`: the output that needs
/// each, for those that are not wanted themselves.
fn lock_on_node<R: Read, W: Write>(
    remote: &mut ServeClient<R, W>,
    paths: &[StorePath],
    referrers: &BTreeMap<StorePath, StorePath>,
) -> Result<(), Failure> {
    if paths.is_empty() {
        return Ok(());
    }
    let on_node: BTreeSet<StorePath> = remote
        .query_valid_paths(paths, true, false)?
        .into_iter()
        .collect();
    let Some(missing) = paths.iter().find(|p| !on_node.contains(*p)) else {
        return Ok(());
    };
    let why = referrers
        .get(missing)
        .map_or("was it built?".to_string(), |r| format!("{r} refers to it"));
    Err(Failure::permanent(format!(
        "{missing} is not valid on {} ({why})",
        remote.peer()
    )))
}

/// QueryPathInfos for exactly `paths`: each answered once, nothing else.
fn path_infos<R: Read, W: Write>(
    remote: &mut ServeClient<R, W>,
    paths: &[StorePath],
) -> Result<Vec<PathInfo>, Failure> {
    if !serve::path_infos_have_nar_hash(remote.version()) {
        return Err(Failure::permanent(format!(
            "{} speaks serve protocol {}, whose path infos carry no NAR hash: nsh cannot \
             check what it would fetch (2.{} or later is needed)",
            remote.peer(),
            serve::version_text(remote.version()),
            serve::MINOR_NAR_HASH
        )));
    }
    let infos = remote.query_path_infos(paths)?;
    let peer = remote.peer().to_string();
    let mut seen = BTreeSet::new();
    for info in &infos {
        if !paths.contains(&info.path) || !seen.insert(&info.path) {
            return Err(ImportRefused::UnaskedAnswer {
                path: info.path.clone(),
            }
            .fail(&peer));
        }
    }
    if let Some(gone) = paths.iter().find(|p| !seen.contains(p)) {
        return Err(Failure::transient(format!(
            "{gone} vanished from {peer} while being fetched"
        )));
    }
    Ok(infos)
}

/// Every reference that is no output of the derivation must be valid here
/// (and stays so: a temporary root).
fn check_others(
    others: &BTreeMap<StorePath, StorePath>,
    declared: &Declared,
    here: &mut Here,
    validity: &mut Validity,
    peer: &str,
) -> Result<(), Failure> {
    let paths: Vec<StorePath> = others.keys().cloned().collect();
    let missing = missing_here(&paths, here, validity)?;
    let Some(reference) = missing.into_iter().next() else {
        return Ok(());
    };
    Err(ImportRefused::ForeignReference {
        output: others[&reference].clone(),
        reference,
        drv: declared.drv.clone(),
    }
    .fail(peer))
}

/// The path info to register for an output: what the node said of its
/// path, references and NAR (all checked on arrival), the derivation as
/// its deriver, and nothing else of the node's.
fn registered(info: PathInfo, drv: &StorePath) -> PathInfo {
    PathInfo {
        deriver: Some(drv.clone()),
        ca: String::new(),
        sigs: Vec::new(),
        ..info
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::serve::test_server::FakeNode;
    use crate::nix::store_path::test_path;

    const DRV: &str = "/nix/store/22222222222222222222222222222222-x.drv";
    const OUT: &str = "/nix/store/00000000000000000000000000000000-x";
    const LIB: &str = "/nix/store/11111111111111111111111111111111-x-lib";
    const PLANTED: &str = "/nix/store/33333333333333333333333333333333-openssl-3.0";

    /// A local store of its own (a chroot store in a temp dir), its
    /// temporary roots, and a path valid in it.
    struct Scratch {
        _dir: tempfile::TempDir,
        local: LocalStore,
        roots: TempRoots,
        valid: StorePath,
    }

    fn scratch() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalStore::new(&format!("local?root={}", dir.path().display()), "").unwrap();
        let file = dir.path().join("dep");
        std::fs::write(&file, "a dependency").unwrap();
        let out = local
            .nix_store()
            .arg("--add")
            .arg(&file)
            .stderr(std::process::Stdio::null())
            .output()
            .expect("nix-store is needed for this test");
        assert!(out.status.success());
        let valid = test_path(String::from_utf8(out.stdout).unwrap().trim());
        let roots = TempRoots::new(&local.state_dir()).unwrap();
        Scratch {
            _dir: dir,
            local,
            roots,
            valid,
        }
    }

    fn declared(fixed: Option<FixedHash>) -> Declared {
        let output = |name: &str, fixed| DeclaredOutput {
            name: name.into(),
            fixed,
        };
        Declared {
            drv: test_path(DRV),
            outputs: [
                (test_path(OUT), output("out", fixed)),
                (test_path(LIB), output("lib", None)),
            ]
            .into(),
            wanted: vec![test_path(OUT)],
        }
    }

    fn plan_with(node: FakeNode, declared: &Declared, max: u64) -> Result<Vec<PathInfo>, Failure> {
        let mut s = scratch();
        let (mut client, _thread) = node.start();
        let mut here = Here {
            local: &s.local,
            roots: Some(&mut s.roots),
            max_output_size: max,
        };
        plan(&mut client, declared, &mut here)
    }

    #[test]
    fn the_wanted_outputs_and_the_outputs_they_need_with_the_drv_as_deriver() {
        let s = scratch();
        let valid = s.valid.as_str().to_string();
        drop(s);
        // The scratch store of `plan_with` is another one: make the
        // dependency valid there by referring to what it adds (same
        // contents, same path).
        let node = FakeNode::nix_2_34()
            .with_file(LIB, &[LIB], b"lib")
            .with_file(OUT, &[LIB, &valid], b"out");
        let infos = plan_with(node, &declared(None), u64::MAX).unwrap();
        let paths: Vec<&str> = infos.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, [LIB, OUT]);
        for info in &infos {
            assert_eq!(info.deriver.as_ref().unwrap().as_str(), DRV);
        }
    }

    #[test]
    fn a_planted_reference_is_refused_by_name() {
        let node = FakeNode::nix_2_34()
            .with_file(PLANTED, &[], b"evil")
            .with_file(OUT, &[PLANTED], b"out");
        let err = plan_with(node, &declared(None), u64::MAX).unwrap_err();
        let refused = err.cause::<ImportRefused>().expect("refused");
        assert!(
            matches!(refused, ImportRefused::ForeignReference { reference, .. } if reference.as_str() == PLANTED),
            "{}",
            err.message
        );
        assert!(err.message.contains(PLANTED), "{}", err.message);
    }

    #[test]
    fn a_fixed_output_with_references_and_outputs_over_the_limit_are_refused() {
        let fixed = FixedHash {
            ingestion: super::super::fixed::Ingestion::Nar,
            algo: crate::nix::hash::HashAlgo::Sha256,
            digest: vec![0; 32],
        };
        let node = FakeNode::nix_2_34()
            .with_file(LIB, &[], b"lib")
            .with_file(OUT, &[LIB], b"out");
        let err = plan_with(node, &declared(Some(fixed)), u64::MAX).unwrap_err();
        assert!(
            matches!(
                err.cause::<ImportRefused>(),
                Some(ImportRefused::FixedWithReferences { .. })
            ),
            "{}",
            err.message
        );
        let node = FakeNode::nix_2_34().with_file(OUT, &[], &[7; 1000]);
        let err = plan_with(node, &declared(None), 100).unwrap_err();
        assert!(
            matches!(
                err.cause::<ImportRefused>(),
                Some(ImportRefused::TooLarge { max: 100, .. })
            ),
            "{}",
            err.message
        );
    }

    #[test]
    fn an_output_the_node_does_not_have_is_permanent() {
        let err = plan_with(FakeNode::nix_2_34(), &declared(None), u64::MAX).unwrap_err();
        assert_eq!(err.kind, Kind::Permanent);
        assert!(err.message.contains("was it built?"), "{}", err.message);
    }

    #[test]
    fn output_path_names() {
        assert_eq!(output_path_name("hello-2.12", "out"), "hello-2.12");
        assert_eq!(output_path_name("hello-2.12", "dev"), "hello-2.12-dev");
    }

    #[test]
    fn refusals_name_the_path_and_are_permanent() {
        let failure = ImportRefused::ForeignReference {
            output: crate::nix::store_path::test_path(
                "/nix/store/00000000000000000000000000000000-x",
            ),
            reference: crate::nix::store_path::test_path(
                "/nix/store/11111111111111111111111111111111-openssl-3.0",
            ),
            drv: crate::nix::store_path::test_path(
                "/nix/store/22222222222222222222222222222222-x.drv",
            ),
        }
        .fail("nixbuild@node1");
        assert_eq!(failure.kind, Kind::Permanent);
        assert_eq!(
            failure.message,
            "refusing what nixbuild@node1 sent: /nix/store/00000000000000000000000000000000-x \
             refers to /nix/store/11111111111111111111111111111111-openssl-3.0, which is \
             neither an output of /nix/store/22222222222222222222222222222222-x.drv nor valid \
             in the local store; nothing was registered"
        );
        assert!(failure.cause::<ImportRefused>().is_some());
    }
}
