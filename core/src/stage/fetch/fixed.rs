//! Fixed-output derivations: the hash their `.drv` declares
//! (`outputHash`, `outputHashAlgo`, `outputHashMode`), recomputed here over
//! what the node sends, so that a node cannot hand back other contents for a
//! path whose name promises these.
//!
//! * `flat` (and `text`): the hash of the file's contents; the output must
//!   be one regular, non-executable file, as Nix requires;
//! * `recursive` (`r:`): the hash of the NAR;
//! * `git:` hashes are refused: nsh cannot compute them, so it cannot check
//!   them.
//!
//! With md5, sha1, sha256 or sha512, the algorithms Nix has.

use std::io::{self, Read, Write};

use super::trust::ImportRefused;
use crate::nix::drv::DrvOutput;
use crate::nix::hash::{nix_base32, AnyHasher, HashAlgo};
use crate::nix::nar::Root;
use crate::nix::store_path::StorePath;

/// What a fixed output's hash covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingestion {
    /// The contents of one regular file (`flat`, and `text`).
    Flat,
    /// The NAR of the whole tree (`recursive`).
    Nar,
}

/// The hash a fixed output must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedHash {
    pub ingestion: Ingestion,
    pub algo: HashAlgo,
    pub digest: Vec<u8>,
}

impl FixedHash {
    /// The hash `output` declares, if it is a fixed output (`None` for an
    /// input-addressed, floating or impure one).
    ///
    /// # Errors
    /// A fixed output whose hash nsh cannot recompute (`git:`, an unknown
    /// algorithm or a hash that is not hex).
    pub fn of(path: &StorePath, output: &DrvOutput) -> Result<Option<FixedHash>, ImportRefused> {
        if output.hash.is_empty() || output.hash == "impure" {
            return Ok(None);
        }
        let unsupported = || ImportRefused::UncheckableFixed {
            output: path.clone(),
            algo: output.hash_algo.clone(),
        };
        let (ingestion, algo) = match output.hash_algo.split_once(':') {
            None => (Ingestion::Flat, output.hash_algo.as_str()),
            Some(("r", algo)) => (Ingestion::Nar, algo),
            Some(("text", algo)) => (Ingestion::Flat, algo),
            Some(_) => return Err(unsupported()),
        };
        let algo = HashAlgo::parse(algo).ok_or_else(unsupported)?;
        let digest = from_hex(&output.hash).ok_or_else(unsupported)?;
        Ok(Some(FixedHash {
            ingestion,
            algo,
            digest,
        }))
    }

    /// `sha256:<nix-base32>` of a digest of this hash's algorithm.
    pub fn show(&self, digest: &[u8]) -> String {
        format!("{}:{}", self.algo.name(), nix_base32(digest))
    }
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The hash of one fixed output, computed as its NAR passes: fed the whole
/// NAR ([`Ingestion::Nar`]) or the root file's contents.
pub struct FixedCheck<'a> {
    fixed: &'a FixedHash,
    hasher: AnyHasher,
}

impl<'a> FixedCheck<'a> {
    pub fn new(fixed: &'a FixedHash) -> FixedCheck<'a> {
        FixedCheck {
            fixed,
            hasher: fixed.algo.hasher(),
        }
    }

    /// Whether it is fed the whole NAR (else the root file's contents).
    pub fn whole_nar(&self) -> bool {
        self.fixed.ingestion == Ingestion::Nar
    }

    /// Checks what was fed against the declared hash; `root` is what the
    /// NAR's root was.
    ///
    /// # Errors
    /// A flat output that is not one non-executable regular file, or a hash
    /// other than the declared one.
    pub fn finish(self, output: &StorePath, root: Root) -> Result<(), ImportRefused> {
        if self.fixed.ingestion == Ingestion::Flat && root != (Root::Regular { executable: false })
        {
            return Err(ImportRefused::FixedNotAFile {
                output: output.clone(),
            });
        }
        let got = self.hasher.finish();
        if got != self.fixed.digest {
            return Err(ImportRefused::FixedHashMismatch {
                output: output.clone(),
                declared: self.fixed.show(&self.fixed.digest),
                got: self.fixed.show(&got),
            });
        }
        Ok(())
    }
}

impl Write for FixedCheck<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that also writes what it reads to `tap`, if there is one.
pub struct Tee<'t, R> {
    pub inner: R,
    pub tap: Option<&'t mut dyn Write>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(tap) = &mut self.tap {
            tap.write_all(&buf[..n])?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::store_path::test_path;

    const OUT: &str = "/nix/store/00000000000000000000000000000000-src.tar.gz";

    fn output(algo: &str, hash: &str) -> DrvOutput {
        DrvOutput {
            path: Some(test_path(OUT)),
            hash_algo: algo.into(),
            hash: hash.into(),
        }
    }

    fn check(fixed: &FixedHash, data: &[u8], root: Root) -> Result<(), ImportRefused> {
        let mut check = FixedCheck::new(fixed);
        check.write_all(data).unwrap();
        check.finish(&test_path(OUT), root)
    }

    #[test]
    fn every_algorithm_nix_has() {
        let file = Root::Regular { executable: false };
        for (algo, hex) in [
            ("md5", "900150983cd24fb0d6963f7d28e17f72"),
            ("sha1", "a9993e364706816aba3e25717850c26c9cd0d89d"),
            (
                "sha256",
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
            (
                "sha512",
                "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
                 2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
            ),
        ] {
            let fixed = FixedHash::of(&test_path(OUT), &output(algo, hex))
                .unwrap()
                .unwrap();
            assert_eq!(fixed.ingestion, Ingestion::Flat);
            check(&fixed, b"abc", file).unwrap();
            let err = check(&fixed, b"abd", file).unwrap_err();
            assert!(
                matches!(err, ImportRefused::FixedHashMismatch { .. }),
                "{err:?}"
            );
        }
    }

    #[test]
    fn methods() {
        let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let path = test_path(OUT);
        let nar = FixedHash::of(&path, &output("r:sha256", sha))
            .unwrap()
            .unwrap();
        assert_eq!(nar.ingestion, Ingestion::Nar);
        // A recursive hash covers any tree.
        check(&nar, b"abc", Root::Directory).unwrap();
        let text = FixedHash::of(&path, &output("text:sha256", sha))
            .unwrap()
            .unwrap();
        assert_eq!(text.ingestion, Ingestion::Flat);
        // Flat: one non-executable regular file only.
        for root in [
            Root::Directory,
            Root::Symlink,
            Root::Regular { executable: true },
        ] {
            let err = check(&text, b"abc", root).unwrap_err();
            assert!(
                matches!(err, ImportRefused::FixedNotAFile { .. }),
                "{err:?}"
            );
        }
        for (algo, hash) in [("git:sha1", sha), ("sha3", sha), ("sha256", "xyz")] {
            let err = FixedHash::of(&path, &output(algo, hash)).unwrap_err();
            assert!(
                matches!(err, ImportRefused::UncheckableFixed { .. }),
                "{algo}"
            );
        }
        // Not fixed: input-addressed, floating, impure.
        assert_eq!(FixedHash::of(&path, &output("", "")).unwrap(), None);
        assert_eq!(FixedHash::of(&path, &output("r:sha256", "")).unwrap(), None);
        assert_eq!(
            FixedHash::of(&path, &output("r:sha256", "impure")).unwrap(),
            None
        );
    }
}
