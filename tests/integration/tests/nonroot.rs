//! The pipeline by hand as a non-root CI user (docs/user-guide.md, "The
//! tools as a non-root user (CI)"): `nsh-closure | nsh-alloc | nsh-push |
//! nsh-run | nsh-fetch` run with `runuser` as the test cluster's CI users
//! (tests/cluster/cluster: `nshci` is in the login daemon's trusted-users,
//! `nshci-signer` is not, and has a signing key whose public half is in its
//! trusted-public-keys), each with its own token and ssh key.
//!
//! * trusted: nsh-fetch imports through the daemon (`daemon`);
//! * untrusted with `[fetch] secret_key_file`: a signed binary cache of its
//!   own, `nix copy` (`signed`); the path keeps the signature;
//! * untrusted without a key: 78 naming both fixes, nothing imported, the
//!   job ended.
//!
//! Either way the outputs are valid in the login store and the daemon's
//! (root's), and the user's ssh sockets are in its own runtime directory.
// A test fails by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nsh_cluster_tests::{
    as_ci_user, build_input_here, ci_config, instantiate, pipeline_script, run_ok, uid_of,
    unique_salt, wait_bounded, Cluster, NixVersion, CI_SIGNER as SIGNER, CI_TRUSTED as TRUSTED,
};
use serde_json::Value;

/// A derivation whose output refers to an input built here first (so
/// that the import has a reference the daemon must find valid): (drv,
/// output path).
fn derivation(c: &Cluster, tag: &str) -> (String, String) {
    let salt = unique_salt();
    let expr = format!(
        r#"let a = builtins.derivation {{
             name = "nsh-nonroot-in-{tag}-{salt}"; system = builtins.currentSystem;
             builder = "/bin/sh"; args = [ "-c" "echo input > $out" ];
           }};
           in builtins.derivation {{
             name = "nsh-nonroot-{tag}-{salt}"; system = builtins.currentSystem;
             builder = "/bin/sh"; PATH = "/usr/bin:/bin";
             args = [ "-c" "mkdir $out; echo ${{a}} > $out/input; cat /proc/sys/kernel/hostname > $out/host" ];
           }}"#
    );
    let drv = instantiate(c, &expr);
    build_input_here(c, &drv);
    let out = run_ok(c.command("nix-store").args(["-q", "--outputs", &drv]))
        .trim()
        .to_string();
    (drv, out)
}

/// The five tools piped, by hand, as `user` with `config`: (status, last
/// ticket, stderr). The user's environment is its own: its home, no
/// runtime directory given (nsh then uses /tmp/nsh-<uid>).
fn pipeline_as(c: &Cluster, user: &str, config: &str, drv: &str) -> (i32, Value, String) {
    let child = as_ci_user(c, user, config, "sh")
        .args(["-c", &pipeline_script(), "sh", drv])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_bounded(child, Duration::from_secs(240));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let ticket = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no ticket ({e}): {stdout:?}\n{stderr}"));
    (out.status.code().unwrap_or(-1), ticket, stderr)
}

/// The ticket's job leaves the queue soon (released, not left to idle out).
fn job_ends(c: &Cluster, ticket: &Value) {
    let job = ticket["alloc"]["job"].as_u64().expect("a job").to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = run_ok(c.command("squeue").args(["-h", "-j", &job, "-o", "%T"]));
        if state.trim().is_empty() || state.contains("COMPLET") {
            return;
        }
        assert!(Instant::now() < deadline, "job {job} still {state}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The output is valid in the login store, its files the daemon's, its
/// reference to the input kept; the user's ssh sockets and push lock were
/// in its own runtime directory.
fn imported_and_private(c: &Cluster, user: &str, out: &str, ticket: &Value) {
    run_ok(c.command("nix-store").args(["--verify-path", out]));
    let meta = std::fs::metadata(format!("{out}/host")).unwrap();
    assert_eq!(meta.uid(), 0, "{out}/host belongs to uid {}", meta.uid());
    let node = ticket["alloc"]["node"].as_str().unwrap();
    let host = std::fs::read_to_string(format!("{out}/host")).unwrap();
    assert_eq!(host.trim(), node);
    let refs = run_ok(c.command("nix-store").args(["-q", "--references", out]));
    let input = std::fs::read_to_string(format!("{out}/input")).unwrap();
    assert!(refs.contains(input.trim()), "{refs}");
    let runtime = PathBuf::from(format!("/tmp/nsh-{}", uid_of(user)));
    let ssh = std::fs::metadata(runtime.join("ssh")).unwrap();
    assert_eq!(ssh.uid(), uid_of(user));
    assert_eq!(ssh.mode() & 0o777, 0o700);
    // The push lock of the node is there too, the user's own.
    let lock = std::fs::read_dir(runtime.join("ssh"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("push-test-"))
        .expect("the push lock in the user's runtime directory");
    assert_eq!(lock.metadata().unwrap().uid(), uid_of(user));
}

#[test]
fn a_trusted_user_imports_through_the_daemon() {
    let c = Cluster::get();
    let (drv, out) = derivation(&c, "trusted");
    let config = ci_config(&c, TRUSTED, "nsh.toml", 0);
    let (code, ticket, stderr) = pipeline_as(&c, TRUSTED, &config, &drv);
    assert_eq!(code, 0, "{ticket}\n{stderr}");
    assert_eq!(ticket["fetch"]["import_method"], "daemon", "{ticket}");
    assert_eq!(ticket["fetch"]["paths"], serde_json::json!([out]));
    imported_and_private(&c, TRUSTED, &out, &ticket);
    job_ends(&c, &ticket);
}

#[test]
fn an_untrusted_user_imports_paths_signed_with_its_key() {
    let c = Cluster::get();
    let (drv, out) = derivation(&c, "signed");
    let config = ci_config(&c, SIGNER, "nsh-signed.toml", 0);
    let (code, ticket, stderr) = pipeline_as(&c, SIGNER, &config, &drv);
    assert_eq!(code, 0, "{ticket}\n{stderr}");
    assert_eq!(ticket["fetch"]["import_method"], "signed", "{ticket}");
    imported_and_private(&c, SIGNER, &out, &ticket);
    // The daemon kept the signature it checked.
    let info = run_ok(
        c.command("nix")
            .args(["path-info", "--json", "--sigs", &out]),
    );
    assert!(info.contains("\"nsh-test-ci-1:"), "{info}");
    // The user's binary cache is gone.
    let fetch_dir = PathBuf::from(format!("/tmp/nsh-{}/fetch", uid_of(SIGNER)));
    let left: Vec<_> = std::fs::read_dir(&fetch_dir).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
    job_ends(&c, &ticket);
}

#[test]
fn an_untrusted_user_without_a_key_gets_78_naming_the_fix_and_nothing_is_imported() {
    let c = Cluster::get();
    let (drv, out) = derivation(&c, "refused");
    let config = ci_config(&c, SIGNER, "nsh.toml", 0);
    let (code, ticket, stderr) = pipeline_as(&c, SIGNER, &config, &drv);
    assert_eq!(code, 78, "{ticket}\n{stderr}");
    assert_eq!(ticket["error"]["stage"], "fetch", "{ticket}");
    assert_eq!(ticket["run"]["status"], "built", "{ticket}");
    let message = ticket["error"]["message"].as_str().unwrap();
    for fix in ["trusted-users", "secret_key_file", "trusted-public-keys"] {
        assert!(message.contains(fix), "{message}");
    }
    if NixVersion::of(&c).at_least(2, 15, 0) {
        // The daemon says it does not trust the user: decided before any
        // output is read from the node.
        assert!(!stderr.contains("fetching"), "{stderr}");
    } else {
        // Nix < 2.15 does not say: the daemon's refusal of the first path.
        assert!(message.contains("lacks a valid signature"), "{message}");
    }
    let valid = c
        .command("nix-store")
        .args(["--check-validity", &out])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!valid.success(), "{out} was imported");
    job_ends(&c, &ticket);
}
