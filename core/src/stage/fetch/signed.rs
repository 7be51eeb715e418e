//! `signed`: for a user the Nix daemon does not trust. Each checked NAR is
//! written, uncompressed, into a binary cache of our own in a private
//! directory under nsh's runtime directory, with a `.narinfo` signed by
//! `[fetch] secret_key_file`; then `nix copy --from file://… --no-recursive`
//! hands the paths to the daemon, which accepts them only if it trusts the
//! key (`trusted-public-keys`). The cache is removed afterwards, whatever
//! happened.
//!
//! Nothing reaches the daemon before every NAR passed the checks of
//! [`super::read_checked`]: `nix copy` runs once the whole cache is written.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::daemon::import_refused;
use super::held_locks::relay_stderr_tail;
use super::receive_checked;
use super::trust::Declared;
use crate::error::{Failure, Kind, ResultExt};
use crate::nix::hash;
use crate::nix::local_store::store_arg;
use crate::nix::serve::client::ServeClient;
use crate::nix::serve::PathInfo;
use crate::nix::signing::{fingerprint, SecretKey};
use crate::nix::store_path::{StoreDir, StorePath};
use crate::stage::progress::TransferProgress;

/// Writes the checked paths as a signed binary cache, then copies them into
/// the store at `store_uri` with `nix copy`.
pub(super) fn import_signed<R: Read, W: Write>(
    remote: &mut ServeClient<R, W>,
    needed: &[PathInfo],
    declared: &Declared,
    key: &SecretKey,
    store: (&str, &StoreDir),
    progress: &mut dyn TransferProgress,
) -> Result<Vec<StorePath>, Failure> {
    let cache = CacheDir::new(&crate::runtime::subdir("fetch")?, store.1)?;
    for info in needed {
        let digest = receive_into(remote, info, declared, &cache.nar_file(info), progress)?;
        let narinfo = narinfo_text(info, &digest, key);
        let file = cache
            .path
            .join(format!("{}.narinfo", info.path.hash_part()));
        std::fs::write(&file, narinfo)
            .or_fail(Kind::Transient, || format!("writing {}", file.display()))?;
        progress.path_done();
    }
    let mut command = Command::new("nix");
    command
        .args(["--extra-experimental-features", "nix-command", "copy"])
        .arg("--from")
        .arg(format!("file://{}", cache.path.display()))
        .arg("--no-recursive");
    if let Some(uri) = store_arg(store.0) {
        command.arg("--to").arg(uri);
    }
    command.args(needed.iter().map(|i| i.path.as_str()));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .or_fail(Kind::Config, || "starting nix copy")?;
    let tail = relay_stderr_tail(&mut child);
    let status = child
        .wait()
        .or_fail(Kind::Transient, || "waiting for nix copy")?;
    let said = tail.join().unwrap_or_default();
    if !status.success() {
        return Err(import_refused(
            "nix copy",
            status,
            &said,
            Some(&key.public_key()),
        ));
    }
    Ok(needed.iter().map(|i| i.path.clone()).collect())
}

/// Reads the NAR of `info` into `file`, checked; returns its SHA-256.
fn receive_into<R: Read, W: Write>(
    remote: &mut ServeClient<R, W>,
    info: &PathInfo,
    declared: &Declared,
    file: &Path,
    progress: &mut dyn TransferProgress,
) -> Result<[u8; 32], Failure> {
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
        .or_fail(Kind::Transient, || format!("creating {}", file.display()))?;
    let write_fail = |e| Failure::transient(format!("writing {}: {e}", file.display()));
    receive_checked(remote, info, declared, &mut out, progress, &write_fail)
}

/// The `.narinfo` of `info` (whose NAR, uncompressed, is at
/// `nar/<hash part>.nar`), signed with `key`.
pub(super) fn narinfo_text(info: &PathInfo, nar_sha256: &[u8; 32], key: &SecretKey) -> String {
    let nar_hash = format!("sha256:{}", hash::nix_base32(nar_sha256));
    let mut references: Vec<&str> = info.references.iter().map(StorePath::basename).collect();
    references.sort_unstable();
    references.dedup();
    let signature = key.sign(&fingerprint(
        &info.path,
        nar_sha256,
        info.nar_size,
        &info.references,
    ));
    let mut text = String::new();
    let _ = writeln!(text, "StorePath: {}", info.path);
    let _ = writeln!(text, "URL: nar/{}.nar", info.path.hash_part());
    let _ = writeln!(text, "Compression: none");
    let _ = writeln!(text, "FileHash: {nar_hash}");
    let _ = writeln!(text, "FileSize: {}", info.nar_size);
    let _ = writeln!(text, "NarHash: {nar_hash}");
    let _ = writeln!(text, "NarSize: {}", info.nar_size);
    let _ = writeln!(text, "References: {}", references.join(" "));
    if let Some(deriver) = &info.deriver {
        let _ = writeln!(text, "Deriver: {}", deriver.basename());
    }
    let _ = writeln!(text, "Sig: {signature}");
    text
}

/// A binary cache in a private directory of nsh's runtime directory,
/// removed with everything in it when dropped.
struct CacheDir {
    path: PathBuf,
}

impl CacheDir {
    /// A new cache in `parent` (a private directory).
    fn new(parent: &Path, store_dir: &StoreDir) -> Result<CacheDir, Failure> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = parent.join(format!("cache-{}-{nanos}", std::process::id()));
        crate::runtime::private_dir(&path.join("nar"))?;
        let cache = CacheDir { path };
        let info = cache.path.join("nix-cache-info");
        std::fs::write(&info, format!("StoreDir: {store_dir}\n"))
            .or_fail(Kind::Transient, || format!("writing {}", info.display()))?;
        Ok(cache)
    }

    fn nar_file(&self, info: &PathInfo) -> PathBuf {
        self.path
            .join("nar")
            .join(format!("{}.nar", info.path.hash_part()))
    }
}

impl Drop for CacheDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::store_path::test_path;

    #[test]
    fn a_narinfo_is_uncompressed_signed_and_names_references_by_basename() {
        let key = SecretKey::parse(
            "nsh-test-1:aOGb2Dcm4ZV6oT61I+sDq1GOcLv8mQVcLGy9jMiSodv7P+9qRjyQgE3QFbomrQQ31vlDp09LDK/2yxX0iK2KaQ==",
        )
        .unwrap();
        let info = PathInfo {
            deriver: Some(test_path(
                "/nix/store/22222222222222222222222222222222-x.drv",
            )),
            references: vec![
                test_path("/nix/store/11111111111111111111111111111111-x-lib"),
                test_path("/nix/store/00000000000000000000000000000000-x"),
            ],
            nar_size: 216,
            ..PathInfo::new(test_path("/nix/store/00000000000000000000000000000000-x"))
        };
        insta::assert_snapshot!(narinfo_text(&info, &[7; 32], &key));
    }

    #[test]
    fn the_cache_is_private_and_gone_when_dropped() {
        use std::os::unix::fs::PermissionsExt;
        let runtime = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(runtime.path(), &StoreDir::new("/nix/store").unwrap()).unwrap();
        let mode = std::fs::metadata(&cache.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(
            std::fs::read_to_string(cache.path.join("nix-cache-info")).unwrap(),
            "StoreDir: /nix/store\n"
        );
        let path = cache.path.clone();
        drop(cache);
        assert!(!path.exists());
    }
}
