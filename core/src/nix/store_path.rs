//! Store directories and store paths.
//!
//! The store directory is configuration, never an assumption: it comes from
//! the store URI (`?store=` parameter), else `NIX_STORE_DIR`, else Nix's own
//! default `/nix/store`. A store path is `<store dir>/<hash>-<name>` with a
//! 32-character nix-base32 hash part and a name of at most 211 characters
//! from `[A-Za-z0-9+-._?=]`; anything else is refused with a message that
//! says what is wrong.

use std::fmt;

use crate::error::Failure;

/// Nix's default store directory, used only when nothing is configured.
pub const DEFAULT_STORE_DIR: &str = "/nix/store";

/// The length of a store path's hash part.
pub const HASH_PART_LEN: usize = 32;

/// An absolute, canonical store directory (no trailing slash, no `.`/`..`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl StoreDir {
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

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses an absolute path that must name a store path directly in this
    /// store directory (not a file inside one).
    pub fn parse(&self, path: &str) -> Result<StorePath, Failure> {
        let basename = path
            .strip_prefix(self.0.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| {
                Failure::input(format!("{path:?} is not in the store directory {}", self.0))
            })?;
        if basename.contains('/') {
            return Err(Failure::input(format!(
                "{path:?} is inside a store path, not a store path"
            )));
        }
        StorePath::from_basename(basename).map_err(|e| e.context(format!("{path:?}")))
    }

    /// The absolute path of `path` in this store directory.
    pub fn render(&self, path: &StorePath) -> String {
        format!("{}/{}", self.0, path.0)
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

/// A store path's base name, `<hash>-<name>`, validated.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath(String);

impl StorePath {
    pub fn from_basename(basename: &str) -> Result<StorePath, Failure> {
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
        Ok(StorePath(basename.to_string()))
    }

    /// `<hash>-<name>`.
    pub fn basename(&self) -> &str {
        &self.0
    }

    /// The 32-character hash part.
    pub fn hash_part(&self) -> &str {
        &self.0[..HASH_PART_LEN]
    }

    pub fn name(&self) -> &str {
        &self.0[HASH_PART_LEN + 1..]
    }

    pub fn is_derivation(&self) -> bool {
        self.0.ends_with(".drv")
    }

    pub(crate) fn from_nix(path: &nix_derivation::StorePath) -> StorePath {
        StorePath(path.to_basename())
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
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
    fn parses_and_renders_in_any_store_dir() {
        let p = dir("/gpfs/nix/store")
            .parse(&format!("/gpfs/nix/store/{HASH}-hello-2.12.drv"))
            .unwrap();
        assert_eq!(p.hash_part(), HASH);
        assert_eq!(p.name(), "hello-2.12.drv");
        assert!(p.is_derivation());
        assert_eq!(dir("/x").render(&p), format!("/x/{HASH}-hello-2.12.drv"));
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
