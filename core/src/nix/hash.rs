//! NAR hashes: SHA-256 over what passes through a reader or writer, and
//! the encodings stores report them in (Nix's base-32, hex); and the
//! algorithms a fixed-output derivation may name ([`HashAlgo`]).

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

use crate::error::Failure;

/// A reader or writer that hashes (SHA-256) and counts what passes through
/// it.
pub struct Hashing<W> {
    pub inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W> Hashing<W> {
    pub fn new(inner: W) -> Hashing<W> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// The digest and byte count so far; resets the hasher.
    pub fn take_digest(&mut self) -> ([u8; 32], u64) {
        let digest = std::mem::take(&mut self.hasher).finalize().into();
        (digest, std::mem::take(&mut self.count))
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A hash algorithm a fixed-output derivation may name (`outputHashAlgo`):
/// the four Nix has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    /// `md5`, `sha1`, `sha256` or `sha512`, as Nix writes them.
    pub fn parse(name: &str) -> Option<HashAlgo> {
        match name {
            "md5" => Some(HashAlgo::Md5),
            "sha1" => Some(HashAlgo::Sha1),
            "sha256" => Some(HashAlgo::Sha256),
            "sha512" => Some(HashAlgo::Sha512),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// A hasher of this algorithm.
    pub fn hasher(self) -> AnyHasher {
        match self {
            HashAlgo::Md5 => AnyHasher::Md5(md5::Md5::new()),
            HashAlgo::Sha1 => AnyHasher::Sha1(sha1::Sha1::new()),
            HashAlgo::Sha256 => AnyHasher::Sha256(Sha256::new()),
            HashAlgo::Sha512 => AnyHasher::Sha512(sha2::Sha512::new()),
        }
    }
}

/// A hasher of any [`HashAlgo`]; bytes go in with `write`.
#[derive(Clone)]
pub enum AnyHasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha256(Sha256),
    Sha512(sha2::Sha512),
}

impl AnyHasher {
    /// The digest of what was written.
    pub fn finish(self) -> Vec<u8> {
        match self {
            AnyHasher::Md5(h) => h.finalize().to_vec(),
            AnyHasher::Sha1(h) => h.finalize().to_vec(),
            AnyHasher::Sha256(h) => h.finalize().to_vec(),
            AnyHasher::Sha512(h) => h.finalize().to_vec(),
        }
    }
}

impl Write for AnyHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            AnyHasher::Md5(h) => h.update(buf),
            AnyHasher::Sha1(h) => h.update(buf),
            AnyHasher::Sha256(h) => h.update(buf),
            AnyHasher::Sha512(h) => h.update(buf),
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Nix's base-32 digits (no e, o, u, t).
pub const NIX_BASE32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Nix's base-32 (the digest in `sha256:…` and in store path hashes).
pub fn nix_base32(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    let len = (bytes.len() * 8 - 1) / 5 + 1;
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let low = u32::from(bytes[i]) >> j;
        let high = bytes.get(i + 1).map_or(0, |&c| u32::from(c) << (8 - j));
        out.push(NIX_BASE32[((low | high) & 0x1f) as usize] as char);
    }
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `digest` is the SHA-256 a store reports as `nar_hash`
/// (`sha256:<nix-base32>` or `sha256:<hex>`). Any other form is an error:
/// a hash we cannot check is not a hash we may trust.
pub fn nar_hash_matches(nar_hash: &str, digest: &[u8; 32]) -> Result<bool, Failure> {
    let Some(value) = nar_hash.strip_prefix("sha256:") else {
        return Err(Failure::permanent(format!(
            "cannot check the NAR hash {nar_hash:?}: only sha256 is supported"
        )));
    };
    match value.len() {
        52 => Ok(value == nix_base32(digest)),
        64 => Ok(value.eq_ignore_ascii_case(&hex(digest))),
        _ => Err(Failure::permanent(format!(
            "cannot check the NAR hash {nar_hash:?}: unknown encoding"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_nix() {
        // `nix-hash --type sha256 --to-base32` of sha256("").
        let empty: [u8; 32] = Sha256::digest(b"").into();
        assert_eq!(
            nix_base32(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert!(nar_hash_matches(
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            &empty
        )
        .unwrap());
        assert!(nar_hash_matches(&format!("sha256:{}", hex(&empty)), &empty).unwrap());
        let other: [u8; 32] = Sha256::digest(b"x").into();
        assert!(!nar_hash_matches(&format!("sha256:{}", nix_base32(&other)), &empty).unwrap());
        assert!(nar_hash_matches("md5:abc", &empty).is_err());
    }
}
