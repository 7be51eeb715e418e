//! Store directories and store paths.
//!
//! The store directory is configuration, never an assumption: it comes from
//! the store URI (`?store=` parameter), else `NIX_STORE_DIR`, else Nix's own
//! default `/nix/store`. A store path is `<store dir>/<hash>-<name>` with a
//! 32-character nix-base32 hash part and a name of at most 211 characters
//! from `[A-Za-z0-9+-._?=]`; anything else is refused with a message that
//! says what is wrong.
//!
//! A [`StorePath`] is checked for that shape wherever it is made (a ticket
//! read, a serve-protocol answer, a derivation); it keeps its directory,
//! and whether that is the directory of the store at hand is checked where
//! the store is known ([`StoreDir::parse`], [`StoreDir::check`]). In
//! tickets it is the plain string, so the format does not change.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Failure;

/// Nix's default store directory, used only when nothing is configured.
pub const DEFAULT_STORE_DIR: &str = "/nix/store";

/// The length of a store path's hash part.
pub const HASH_PART_LEN: usize = 32;

/// An absolute, canonical store directory (no trailing slash, no `.`/`..`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl StoreDir {
    /// A store directory, checked: absolute and canonical.
    pub fn new(dir: impl Into<String>) -> Result<StoreDir, Failure> {
        let dir = dir.into();
        nix_derivation::StoreDir::new(dir.clone())
            .map(|_| StoreDir(dir.clone()))
            .map_err(|_| {
                Failure::config(format!(
                    "store directory {dir:?} is not an absolute, canonical path"
                ))
            })
    }

    /// The store directory of the store at `uri` (a Nix store URI or `""`
    /// for the default store): its `store=` parameter when it has one, else
    /// `NIX_STORE_DIR`, else `/nix/store`.
    pub fn for_store_uri(uri: &str) -> Result<StoreDir, Failure> {
        if let Some(dir) = store_uri_param(uri, "store") {
            return StoreDir::new(dir).map_err(|e| e.context(format!("store URI {uri:?}")));
        }
        StoreDir::from_env()
    }

    /// `NIX_STORE_DIR`, else `/nix/store`.
    pub fn from_env() -> Result<StoreDir, Failure> {
        match std::env::var("NIX_STORE_DIR") {
            Ok(dir) if !dir.is_empty() => {
                StoreDir::new(dir).map_err(|e| e.context("NIX_STORE_DIR"))
            }
            _ => Ok(StoreDir(DEFAULT_STORE_DIR.to_string())),
        }
    }

    /// The directory, without a trailing `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses an absolute path that must name a store path directly in this
    /// store directory (not a file inside one).
    pub fn parse(&self, path: &str) -> Result<StorePath, Failure> {
        let basename = path
            .strip_prefix(self.0.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| self.outside(path))?;
        if basename.contains('/') {
            return Err(Failure::input(format!(
                "{path:?} is inside a store path, not a store path"
            )));
        }
        self.join(basename)
            .map_err(|e| e.context(format!("{path:?}")))
    }

    /// The store path `<this dir>/<basename>`, checked.
    pub fn join(&self, basename: &str) -> Result<StorePath, Failure> {
        check_basename(basename)?;
        Ok(StorePath {
            path: format!("{}/{basename}", self.0),
            base: self.0.len() + 1,
        })
    }

    /// Whether `path`, already a store path, is in this store directory.
    pub fn check(&self, path: &StorePath) -> Result<(), Failure> {
        if path.dir() == self.0 {
            Ok(())
        } else {
            Err(self.outside(path.as_str()))
        }
    }

    fn outside(&self, path: &str) -> Failure {
        Failure::input(format!("{path:?} is not in the store directory {}", self.0))
    }

    /// The store path `nix-derivation` made in this directory (which it
    /// has checked already).
    pub(crate) fn join_nix(&self, path: &nix_derivation::StorePath) -> StorePath {
        let basename = path.to_basename();
        StorePath {
            path: format!("{}/{basename}", self.0),
            base: self.0.len() + 1,
        }
    }

    /// This directory for `nix-derivation` (which checks it as
    /// [`StoreDir::new`] did).
    pub(crate) fn to_nix(&self) -> Result<nix_derivation::StoreDir, Failure> {
        nix_derivation::StoreDir::new(self.0.clone()).map_err(|_| {
            Failure::config(format!(
                "store directory {:?} is not an absolute, canonical path",
                self.0
            ))
        })
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An absolute store path, `<store dir>/<hash>-<name>`, checked: a
/// canonical absolute directory, a 32-character nix-base32 hash part and a
/// name Nix accepts. Written (in tickets, on the wire) as the plain path;
/// compared, ordered and hashed as that string.
#[derive(Clone)]
pub struct StorePath {
    path: String,
    /// Where the base name starts: just after the directory's `/`.
    base: usize,
}

impl StorePath {
    /// Parses an absolute store path in any store directory; the store
    /// that must hold it checks the directory ([`StoreDir::check`]).
    pub fn parse(path: &str) -> Result<StorePath, Failure> {
        let not_one = |why: String| {
            Failure::input(format!(
                "{path:?} is not a store path (<store dir>/<32-character hash>-<name>): {why}"
            ))
        };
        let Some((dir, basename)) = path.rsplit_once('/') else {
            return Err(not_one("it is not absolute".into()));
        };
        check_basename(basename).map_err(|e| not_one(e.message))?;
        if dir.is_empty() {
            return Err(not_one("it has no store directory".into()));
        }
        if nix_derivation::StoreDir::new(dir.to_string()).is_err() {
            return Err(not_one(format!(
                "{dir:?} is not an absolute, canonical directory"
            )));
        }
        Ok(StorePath {
            path: path.to_string(),
            base: dir.len() + 1,
        })
    }

    /// The whole path.
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// The store directory it is in (without the trailing `/`).
    pub fn dir(&self) -> &str {
        &self.path[..self.base - 1]
    }

    /// `<hash>-<name>`.
    pub fn basename(&self) -> &str {
        &self.path[self.base..]
    }

    /// The 32-character hash part.
    pub fn hash_part(&self) -> &str {
        &self.basename()[..HASH_PART_LEN]
    }

    /// The name after the hash part.
    pub fn name(&self) -> &str {
        &self.basename()[HASH_PART_LEN + 1..]
    }

    /// Whether it names a derivation (`.drv`).
    pub fn is_derivation(&self) -> bool {
        self.path.ends_with(".drv")
    }
}

/// A base name `<hash>-<name>` as Nix accepts it.
fn check_basename(basename: &str) -> Result<(), Failure> {
    let (hash, name) = match basename.split_at_checked(HASH_PART_LEN) {
        Some((hash, rest)) if rest.starts_with('-') => (hash, &rest[1..]),
        _ => {
            return Err(Failure::input(format!(
                "{basename:?} is not <32-character hash>-<name>"
            )))
        }
    };
    if let Some(bad) = hash
        .chars()
        .find(|c| !c.is_ascii() || !crate::nix::hash::NIX_BASE32.contains(&(*c as u8)))
    {
        return Err(Failure::input(format!(
            "hash part {hash:?} has {bad:?}, which is not a nix-base32 digit"
        )));
    }
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Failure::input(format!(
            "name {name:?} must be 1 to {MAX_NAME_LEN} characters long"
        )));
    }
    if let Some(bad) = name.chars().find(|&c| !is_name_char(c)) {
        return Err(Failure::input(format!(
            "name {name:?} has {bad:?} (allowed: letters, digits and +-._?=)"
        )));
    }
    // Everything else Nix insists on (a canonical hash encoding, no `.`
    // or `..` names) is checked by nix-derivation's own parser.
    nix_derivation::StorePath::from_basename(basename.as_bytes())
        .map_err(|e| Failure::input(format!("{basename:?}: {e}")))?;
    Ok(())
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.path, f)
    }
}

impl PartialEq for StorePath {
    fn eq(&self, other: &StorePath) -> bool {
        self.path == other.path
    }
}

impl Eq for StorePath {}

impl PartialOrd for StorePath {
    fn partial_cmp(&self, other: &StorePath) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for StorePath {
    fn cmp(&self, other: &StorePath) -> Ordering {
        self.path.cmp(&other.path)
    }
}

impl Hash for StorePath {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.path.hash(state);
    }
}

/// Sound because equality, order and hash are the string's.
impl Borrow<str> for StorePath {
    fn borrow(&self) -> &str {
        &self.path
    }
}

impl AsRef<str> for StorePath {
    fn as_ref(&self) -> &str {
        &self.path
    }
}

impl PartialEq<str> for StorePath {
    fn eq(&self, other: &str) -> bool {
        self.path == other
    }
}

impl PartialEq<&str> for StorePath {
    fn eq(&self, other: &&str) -> bool {
        self.path == *other
    }
}

impl PartialEq<String> for StorePath {
    fn eq(&self, other: &String) -> bool {
        self.path == *other
    }
}

/// A store path reads as the string it is (`ends_with`, `len`, …).
impl std::ops::Deref for StorePath {
    type Target = str;

    fn deref(&self) -> &str {
        &self.path
    }
}

impl std::str::FromStr for StorePath {
    type Err = Failure;

    fn from_str(path: &str) -> Result<StorePath, Failure> {
        StorePath::parse(path)
    }
}

impl Serialize for StorePath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.path)
    }
}

impl<'de> Deserialize<'de> for StorePath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<StorePath, D::Error> {
        let path = String::deserialize(deserializer)?;
        StorePath::parse(&path).map_err(|e| serde::de::Error::custom(e.message))
    }
}

/// `path` as a store path, for tests (which name valid ones).
#[cfg(test)]
pub(crate) fn test_path(path: &str) -> StorePath {
    StorePath::parse(path).unwrap()
}

const MAX_NAME_LEN: usize = 211;

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "+-._?=".contains(c)
}

/// The value of query parameter `key` in a store URI (`local?store=/x`).
pub fn store_uri_param<'a>(uri: &'a str, key: &str) -> Option<&'a str> {
    let (_, query) = uri.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Kind;

    const HASH: &str = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a";

    fn dir(d: &str) -> StoreDir {
        StoreDir::new(d).unwrap()
    }

    #[test]
    fn parses_in_any_store_dir() {
        let p = dir("/gpfs/nix/store")
            .parse(&format!("/gpfs/nix/store/{HASH}-hello-2.12.drv"))
            .unwrap();
        assert_eq!(p.hash_part(), HASH);
        assert_eq!(p.name(), "hello-2.12.drv");
        assert_eq!(p.dir(), "/gpfs/nix/store");
        assert_eq!(p.basename(), format!("{HASH}-hello-2.12.drv"));
        assert!(p.is_derivation());
        let elsewhere = dir("/x").join(p.basename()).unwrap();
        assert_eq!(elsewhere.as_str(), format!("/x/{HASH}-hello-2.12.drv"));
        assert_eq!(StorePath::parse(p.as_str()).unwrap(), p);
        assert!(dir("/gpfs/nix/store").check(&p).is_ok());
        let err = dir("/nix/store").check(&p).unwrap_err();
        assert_eq!(err.kind, Kind::Input);
        assert!(err
            .message
            .contains("is not in the store directory /nix/store"));
    }

    #[test]
    fn without_a_store_the_shape_is_checked() {
        for (path, why) in [
            ("/p", "\"p\" is not <32-character hash>-<name>"),
            (
                "/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-a",
                "it has no store directory",
            ),
            ("p", "it is not absolute"),
            (
                "nix/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-a",
                "\"nix/store\" is not an absolute, canonical directory",
            ),
            ("/nix/store/", "\"\" is not <32-character hash>-<name>"),
            (
                "/nix/../store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-a",
                "canonical",
            ),
            ("/nix/store/0a0a-a", "is not <32-character hash>-<name>"),
        ] {
            let err = StorePath::parse(path).unwrap_err();
            assert_eq!(err.kind, Kind::Input, "{path}");
            assert!(
                err.message
                    .starts_with(&format!("{path:?} is not a store path")),
                "{path}: {}",
                err.message
            );
            assert!(err.message.contains(why), "{path}: {}", err.message);
        }
    }

    #[test]
    fn in_json_it_is_the_plain_string() {
        let path = format!("/nix/store/{HASH}-a");
        let p: StorePath = serde_json::from_str(&format!("{path:?}")).unwrap();
        assert_eq!(p, path.as_str());
        assert_eq!(serde_json::to_string(&p).unwrap(), format!("{path:?}"));
        let err = serde_json::from_str::<StorePath>("\"/p\"").unwrap_err();
        assert!(
            err.to_string().contains("\"/p\" is not a store path"),
            "{err}"
        );
    }

    #[test]
    fn refuses_what_is_not_a_store_path_and_says_why() {
        let d = dir("/nix/store");
        let cases = [
            (
                format!("/nix/storex/{HASH}-a"),
                "is not in the store directory /nix/store",
            ),
            (
                format!("/nix/store/{HASH}-a/bin/sh"),
                "is inside a store path",
            ),
            (
                "/nix/store/abc-a".into(),
                "is not <32-character hash>-<name>",
            ),
            (
                format!("/nix/store/{HASH}_a"),
                "is not <32-character hash>-<name>",
            ),
            (
                "/nix/store/0e0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-a".into(),
                "'e', which is not a nix-base32 digit",
            ),
            (format!("/nix/store/{HASH}-"), "must be 1 to 211 characters"),
            (
                format!("/nix/store/{HASH}-{}", "a".repeat(212)),
                "must be 1 to 211 characters",
            ),
            (format!("/nix/store/{HASH}-a b"), "has ' '"),
            (format!("/nix/store/{HASH}-.."), "invalid name"),
        ];
        for (path, why) in cases {
            let err = d.parse(&path).unwrap_err();
            assert_eq!(err.kind, Kind::Input);
            assert!(err.message.contains(why), "{path}: {}", err.message);
        }
        assert!(d
            .parse(&format!("/nix/store/{HASH}-{}", "a".repeat(211)))
            .is_ok());
    }

    #[test]
    fn store_dirs_must_be_canonical() {
        for bad in ["nix/store", "/nix/store/", "/nix/../store", ""] {
            assert_eq!(StoreDir::new(bad).unwrap_err().kind, Kind::Config, "{bad}");
        }
    }

    #[test]
    fn the_store_uri_decides_the_dir() {
        assert_eq!(
            StoreDir::for_store_uri("local?root=/r&store=/opt/store").unwrap(),
            dir("/opt/store")
        );
        assert_eq!(store_uri_param("daemon", "store"), None);
        assert_eq!(store_uri_param("ssh://h?store=/s", "store"), Some("/s"));
    }
}
