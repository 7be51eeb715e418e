//! Nix's binary-cache signatures (`docs/reference/nix-signing.md`): an
//! Ed25519 signature, by a key with a name, of a path's *fingerprint*
//! `1;<store path>;sha256:<nix32 NAR hash>;<NAR size>;<references, sorted,
//! comma-separated>`, written `<key name>:<base64 signature>`.
//!
//! The secret key file is what `nix-store --generate-binary-cache-key`
//! writes: `<key name>:<base64 of the 32-byte seed then the 32-byte public
//! key>`; the public key is `<key name>:<base64 of the public key>`, what a
//! site lists in `trusted-public-keys`.

use std::fmt;
use std::path::Path;

use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::error::Failure;
use crate::nix::hash;
use crate::nix::store_path::StorePath;

/// A Nix binary-cache secret key.
pub struct SecretKey {
    name: String,
    key_pair: Ed25519KeyPair,
}

/// Never the key itself.
impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public_key())
    }
}

impl SecretKey {
    /// Parses `<name>:<base64 seed+public key>` (surrounding white space
    /// allowed); the public half must be the seed's.
    pub fn parse(text: &str) -> Result<SecretKey, String> {
        let (name, encoded) = text
            .trim()
            .split_once(':')
            .ok_or("not of the form NAME:BASE64")?;
        if name.is_empty() {
            return Err("the key has no name (before ':')".into());
        }
        let bytes = base64_decode(encoded).ok_or("what follows ':' is not base64")?;
        if bytes.len() != 64 {
            return Err(format!(
                "the key has {} bytes, an Ed25519 secret key 64",
                bytes.len()
            ));
        }
        let key_pair = Ed25519KeyPair::from_seed_and_public_key(&bytes[..32], &bytes[32..])
            .map_err(|_| "its public half is not its seed's: not a Nix secret key")?;
        Ok(SecretKey {
            name: name.to_string(),
            key_pair,
        })
    }

    /// Reads the key file at `path`: a file that cannot be read, or that
    /// holds no key, is configuration (`what` names the setting).
    pub fn read(path: &Path, what: &str) -> Result<SecretKey, Failure> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::config(format!("{what}: cannot read {}: {e}", path.display())))?;
        SecretKey::parse(&text).map_err(|problem| {
            Failure::config(format!(
                "{what}: {} is not a Nix secret key (nix-store --generate-binary-cache-key \
                 makes one): {problem}",
                path.display()
            ))
        })
    }

    /// `<name>:<base64 public key>`, as `trusted-public-keys` lists it.
    pub fn public_key(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            base64_encode(self.key_pair.public_key().as_ref())
        )
    }

    /// `<name>:<base64 signature of message>`.
    pub fn sign(&self, message: &str) -> String {
        let signature = self.key_pair.sign(message.as_bytes());
        format!("{}:{}", self.name, base64_encode(signature.as_ref()))
    }
}

/// What a path's signature signs: `1;<path>;sha256:<nix32 NAR
/// hash>;<NAR size>;<references, sorted, comma-separated>`.
pub fn fingerprint(
    path: &StorePath,
    nar_sha256: &[u8; 32],
    nar_size: u64,
    references: &[StorePath],
) -> String {
    let mut references: Vec<&str> = references.iter().map(StorePath::as_str).collect();
    references.sort_unstable();
    references.dedup();
    format!(
        "1;{path};sha256:{};{nar_size};{}",
        hash::nix_base32(nar_sha256),
        references.join(",")
    )
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 §4), as Nix writes keys and
/// signatures.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 with padding; `None` for anything else.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if bytes.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (i, quad) in bytes.chunks(4).enumerate() {
        let last = i + 1 == bytes.len() / 4;
        let padding = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if padding > 2 || (padding > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - padding] {
            let value = BASE64.iter().position(|&a| a == c)?;
            n = (n << 6) | u32::try_from(value).ok()?;
        }
        n <<= 6 * padding;
        let decoded = &n.to_be_bytes()[1..];
        out.extend_from_slice(&decoded[..3 - padding]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::store_path::test_path;

    // A test vector made by Nix 2.8 itself: `nix-store
    // --generate-binary-cache-key nsh-test-1 sec pub`, then in a chroot
    // store `builtins.toFile "b" "uses ${toFile "a" "x"} and ${toFile "c"
    // "y"}"`, signed with `nix store sign -k sec -r`, read back with `nix
    // path-info --json --sigs`.
    const SECRET: &str = "nsh-test-1:aOGb2Dcm4ZV6oT61I+sDq1GOcLv8mQVcLGy9jMiSodv7P+9qRjyQgE3QFbomrQQ31vlDp09LDK/2yxX0iK2KaQ==";
    const PUBLIC: &str = "nsh-test-1:+z/vakY8kIBN0BW6Jq0EN9b5Q6dPSwyv9ssV9Iitimk=";
    const B: &str = "/nix/store/qf189ln795ghsr3053yjvpadjfx7dlk7-b";
    const B_NAR_HASH: &str = "OpW8xcxgW95pB9ru4eo35e+xiAwJ8cdvAPIxXsV2mq0=";
    const A: &str = "/nix/store/12wigjpizrn8axaqxj288q1b751qmwya-a";
    const C: &str = "/nix/store/apxsqdxczpngmp2qlqkjj6k7qy5ywhij-c";
    const B_SIG: &str = "nsh-test-1:pi0RcYUCrddZGK2cmq2QQbs25jxemv8djZEfJWzivW8edM0lSvnEQxf5yFapipLwtWXRzbaXAxHal3ghuYsdCw==";

    fn b_fingerprint() -> String {
        let digest: [u8; 32] = base64_decode(B_NAR_HASH).unwrap().try_into().unwrap();
        // References in another order than Nix's: sorted for the fingerprint.
        fingerprint(&test_path(B), &digest, 216, &[test_path(C), test_path(A)])
    }

    #[test]
    fn signatures_are_those_nix_makes_with_the_same_key() {
        let key = SecretKey::parse(SECRET).unwrap();
        assert_eq!(key.public_key(), PUBLIC);
        assert_eq!(key.sign(&b_fingerprint()), B_SIG);
        assert!(!format!("{key:?}").contains(&SECRET[12..]));
    }

    #[test]
    fn the_fingerprint_has_nix32_hash_and_sorted_references() {
        insta::assert_snapshot!(b_fingerprint(), @"1;/nix/store/qf189ln795ghsr3053yjvpadjfx7dlk7-b;sha256:1bcsfv2mwcgj01pwgw891j4b3vz56zmf3vns0xlxwnv0rk2vr59s;216;/nix/store/12wigjpizrn8axaqxj288q1b751qmwya-a,/nix/store/apxsqdxczpngmp2qlqkjj6k7qy5ywhij-c");
    }

    #[test]
    fn what_is_not_a_secret_key_is_refused_with_why() {
        let cases = [
            ("nsh-test-1", "NAME:BASE64"),
            (":aGVsbG8=", "no name"),
            ("k:%%%%", "not base64"),
            ("k:aGVsbG8=", "5 bytes"),
            (PUBLIC, "32 bytes"),
        ];
        for (text, why) in cases {
            let problem = SecretKey::parse(text).unwrap_err();
            assert!(problem.contains(why), "{text}: {problem}");
        }
        // The public half of another key.
        let mut bytes = base64_decode(&SECRET[11..]).unwrap();
        bytes[40] ^= 1;
        let other = format!("k:{}", base64_encode(&bytes));
        assert!(SecretKey::parse(&other).unwrap_err().contains("seed"));
    }

    #[test]
    fn base64_round_trips_every_length_and_refuses_bad_padding() {
        for len in 0..10u8 {
            let bytes: Vec<u8> = (0..len).map(|i| i.wrapping_mul(37)).collect();
            let text = base64_encode(&bytes);
            assert_eq!(base64_decode(&text).unwrap(), bytes, "{text}");
        }
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        for bad in ["aGVsbG8", "a===", "aG=v", "aGVs=G8="] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }
}
