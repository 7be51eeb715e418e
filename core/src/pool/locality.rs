//! Where a build's inputs already are: per node, the store paths nsh put
//! there (pushed inputs, built outputs), newest last, in a bounded file of
//! the pool directory. Slurm knows nothing of Nix stores; this lets the
//! pool prefer the node that holds most of a build's input closure, so a
//! chain of derivations stays on one node and pushes little.
//!
//! Why a file and not a QueryValidPaths on each candidate node: no process
//! and no round trip per build (a query costs an ssh session and a
//! `nix-store --serve` on the node per candidate), and what nsh itself put
//! on a node is most of what a DAG's next build needs. What it misses (paths
//! that got there otherwise) or holds wrongly (paths the node's GC took)
//! costs only a push; the push itself always asks the node.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::{Failure, Kind, ResultExt};

/// At most this many paths are kept per node; the oldest go first.
pub const MAX_PATHS_PER_NODE: usize = 20_000;

/// The known paths of one node, in the pool directory `dir`.
pub fn node_file(dir: &Path, node: &str) -> PathBuf {
    dir.join("nodes").join(crate::runtime::file_name_safe(node))
}

/// The paths known to be on `node`.
pub fn known(dir: &Path, node: &str) -> HashSet<String> {
    std::fs::read_to_string(node_file(dir, node))
        .map(|text| text.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// How many of `paths` are known to be on `node`.
pub fn score<S: std::hash::BuildHasher, P: AsRef<str>>(
    known: &HashSet<String, S>,
    paths: &[P],
) -> usize {
    paths.iter().filter(|p| known.contains(p.as_ref())).count()
}

/// Adds `paths` to what `node` holds (the caller holds the pool's lock).
pub fn note<P: AsRef<str>>(dir: &Path, node: &str, paths: &[P]) -> Result<(), Failure> {
    let file = node_file(dir, node);
    if let Some(parent) = file.parent() {
        crate::runtime::private_dir(parent)?;
    }
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    let mut lines: Vec<&str> = text.lines().collect();
    let mut seen: HashSet<&str> = lines.iter().copied().collect();
    let before = lines.len();
    for path in paths {
        if seen.insert(path.as_ref()) {
            lines.push(path.as_ref());
        }
    }
    if lines.len() == before {
        return Ok(());
    }
    let keep_from = lines.len().saturating_sub(MAX_PATHS_PER_NODE);
    replace(&file, &lines[keep_from..])
}

/// Takes `paths` out of what `node` holds: the node was found without them
/// (the caller holds the pool's lock).
pub fn forget<P: AsRef<str>>(dir: &Path, node: &str, paths: &[P]) -> Result<(), Failure> {
    let file = node_file(dir, node);
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Ok(());
    };
    let gone: HashSet<&str> = paths.iter().map(AsRef::as_ref).collect();
    let kept: Vec<&str> = text.lines().filter(|l| !gone.contains(l)).collect();
    if kept.len() == text.lines().count() {
        return Ok(());
    }
    replace(&file, &kept)
}

/// Writes `lines` as the node's record, whole (a temporary file renamed
/// over it: a reader without the lock sees the old record or the new one).
fn replace(file: &Path, lines: &[&str]) -> Result<(), Failure> {
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, out).or_fail(Kind::Transient, || format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, file).or_fail(Kind::Transient, || format!("renaming {}", tmp.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_noted_once_scored_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = |i: usize| format!("/nix/store/{i:032}-x");
        note(dir.path(), "node1", &[p(1), p(2)]).unwrap();
        note(dir.path(), "node1", &[p(2), p(3)]).unwrap();
        let known1 = known(dir.path(), "node1");
        assert_eq!(known1.len(), 3);
        assert_eq!(score(&known1, &[p(1), p(3), p(9)]), 2);
        assert!(known(dir.path(), "node2").is_empty());
        forget(dir.path(), "node1", &[p(2)]).unwrap();
        forget(dir.path(), "node2", &[p(2)]).unwrap();
        assert_eq!(known(dir.path(), "node1").len(), 2, "p(2) forgotten");
        note(dir.path(), "node1", &[p(2)]).unwrap();
        let many: Vec<String> = (10..10 + MAX_PATHS_PER_NODE).map(p).collect();
        note(dir.path(), "node1", &many).unwrap();
        let known1 = known(dir.path(), "node1");
        assert_eq!(known1.len(), MAX_PATHS_PER_NODE);
        assert!(!known1.contains(&p(1)), "the oldest went first");
        assert!(known1.contains(&p(9 + MAX_PATHS_PER_NODE)));
    }
}
