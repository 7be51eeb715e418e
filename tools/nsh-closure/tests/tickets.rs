//! Snapshot tests of `nsh-closure`'s tickets for real derivations made by
//! `nix-instantiate` on this machine.
//!
//! Each test uses a private store at a fixed directory
//! (`/tmp/nsh-closure-test/<test>/store`, wiped first), so store paths, and
//! so the snapshots, are deterministic without redaction. The derivations
//! use `builder = "/bin/sh"` and no nixpkgs; those that are built name
//! `x86_64-linux` as their system.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use nsh_core::{lock_exclusive, Wait};
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use serde_json::Value;

const NIX_CONFIG: &str = "substituters =\nbuild-users-group =\nsandbox = false\nbuilders =\n";

struct Store {
    root: PathBuf,
    uri: String,
    /// Held for the test's lifetime: another checkout's test run on the
    /// same machine uses the same directory.
    _lock: fs::File,
}

impl Store {
    fn new(test: &str) -> Store {
        let base = PathBuf::from("/tmp/nsh-closure-test");
        fs::create_dir_all(&base).unwrap();
        let lock = fs::File::create(base.join(format!("{test}.lock"))).unwrap();
        // Blocks until free.
        let locked = lock_exclusive(&lock, Wait::Block);
        assert!(locked.is_ok(), "locking {test}.lock");
        let root = base.join(test);
        if root.exists() {
            // Store paths are read-only directories: make them writable first.
            let _ = Command::new("chmod")
                .arg("-R")
                .arg("u+w")
                .arg(&root)
                .status();
            fs::remove_dir_all(&root).unwrap();
        }
        fs::create_dir_all(&root).unwrap();
        let r = root.display();
        let uri = format!("local?store={r}/store&state={r}/var&log={r}/log");
        Store {
            root,
            uri,
            _lock: lock,
        }
    }

    fn nix(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(program)
            .env("NIX_CONFIG", NIX_CONFIG)
            .arg("--store")
            .arg(&self.uri)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn instantiate(&self, name: &str, expr: &str) -> String {
        let file = self.root.join(format!("{name}.nix"));
        fs::write(&file, expr).unwrap();
        self.nix("nix-instantiate", &[file.to_str().unwrap()])
    }

    fn realise(&self, drv: &str) {
        self.nix("nix-store", &["--realise", drv]);
    }

    /// Runs nsh-closure with `args` and `stdin`; returns the exit status and
    /// the tickets.
    fn closure(&self, args: &[&str], stdin: &str) -> (i32, Vec<Value>) {
        let out = Command::cargo_bin("nsh-closure")
            .unwrap()
            .env("NIX_CONFIG", NIX_CONFIG)
            .env("NSH_LOG", "error")
            .arg("--store")
            .arg(&self.uri)
            .args(args)
            .write_stdin_compat(stdin)
            .unwrap();
        let tickets = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (out.status.code().unwrap(), tickets)
    }
}

/// `Command` with stdin from a string (assert_cmd's own `write_stdin` is on
/// its `Command` type; this keeps std's).
trait WriteStdin {
    fn write_stdin_compat(&mut self, stdin: &str) -> std::io::Result<std::process::Output>;
}

impl WriteStdin for Command {
    fn write_stdin_compat(&mut self, stdin: &str) -> std::io::Result<std::process::Output> {
        use std::io::Write;
        use std::process::Stdio;
        let mut child = self
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().unwrap().write_all(stdin.as_bytes())?;
        child.wait_with_output()
    }
}

const NO_INPUTS: &str = r#"
builtins.derivation {
  name = "multi";
  system = "x86_64-linux";
  builder = "/bin/sh";
  outputs = [ "out" "dev" "doc" ];
  requiredSystemFeatures = [ "big-parallel" "kvm" ];
  nshResources = builtins.toJSON { cpus = 8; mem = "16G"; time = "2h"; };
  args = [ "-c" "echo > $out; echo > $dev; echo > $doc" ];
}
"#;

#[test]
fn no_inputs_multiple_outputs_features_and_resources() {
    let s = Store::new("no-inputs");
    let drv = s.instantiate("multi", NO_INPUTS);
    let (status, tickets) = s.closure(&[&drv], "");
    assert_eq!(status, 0);
    insta::assert_json_snapshot!(tickets);
    // A GC root pointing at the derivation stands for it.
    let link = s.root.join("multi.drv");
    std::os::unix::fs::symlink(&drv, &link).unwrap();
    let (status, linked) = s.closure(&[link.to_str().unwrap()], "");
    assert_eq!(status, 0);
    assert_eq!(linked, tickets);
    // --wanted picks outputs; an unknown one is bad input.
    let (status, tickets) = s.closure(&["--wanted", "dev,out", &drv], "");
    assert_eq!(status, 0);
    assert_eq!(
        tickets[0]["drv"]["wanted"],
        serde_json::json!(["dev", "out"])
    );
    let (status, tickets) = s.closure(&["--wanted", "lib", &drv], "");
    assert_eq!(status, 65);
    insta::assert_json_snapshot!("unknown_output", tickets);
}

const STRUCTURED: &str = r#"
builtins.derivation {
  name = "structured";
  system = "x86_64-linux";
  builder = "/bin/sh";
  __structuredAttrs = true;
  requiredSystemFeatures = [ "gpu" ];
  nshResources = { cpus = 2; mem = 4096; time = 90; gres = "gpu:1"; constraint = "a100"; };
  nested = { list = [ 1 2 3 ]; text = "x\ny"; };
  args = [ "-c" ". .attrs.sh; echo > $out" ];
}
"#;

#[test]
fn structured_attrs() {
    let s = Store::new("structured");
    let drv = s.instantiate("structured", STRUCTURED);
    let (status, tickets) = s.closure(&[&drv], "");
    assert_eq!(status, 0);
    insta::assert_json_snapshot!(tickets);
}

const CHAIN: &str = r#"
let
  a = builtins.derivation { name = "a"; system = "x86_64-linux"; builder = "/bin/sh";
        args = [ "-c" "echo a > $out" ]; };
  b = builtins.derivation { name = "b"; system = "x86_64-linux"; builder = "/bin/sh";
        outputs = [ "out" "dev" ];
        args = [ "-c" "echo ${a} > $out; echo ${a} > $dev" ]; };
  src = builtins.toFile "script.sh" "echo hello";
in builtins.derivation { name = "c"; system = "x86_64-linux"; builder = "/bin/sh";
     args = [ "-c" "cat ${b} ${src} > $out" ]; }
"#;

#[test]
fn a_dependency_chain_before_and_after_its_inputs_are_built() {
    let s = Store::new("chain");
    let c = s.instantiate("chain", CHAIN);
    // Not built yet: bad input, listing what is missing.
    let (status, tickets) = s.closure(&[&c], "");
    assert_eq!(status, 65);
    insta::assert_json_snapshot!("chain_missing", tickets);

    let b = s.nix("nix-store", &["--query", "--references", &c]);
    let b = b.lines().find(|l| l.ends_with("-b.drv")).unwrap();
    s.realise(b);
    let (status, tickets) = s.closure(&[], &format!("{c}\n"));
    assert_eq!(status, 0);
    // c needs b.out (not b.dev), a (b.out refers to it) and the source.
    insta::assert_json_snapshot!("chain_built", tickets);
}

#[test]
fn tickets_on_stdin_keep_their_fields() {
    let s = Store::new("stdin");
    let drv = s.instantiate("multi", NO_INPUTS);
    let input = format!(
        "{{\"v\":1,\"drv\":{{\"path\":\"{drv}\",\"wanted\":[\"doc\"],\"hook\":7}},\"site\":\"x\"}}\n\n{drv}\n"
    );
    let (status, tickets) = s.closure(&[], &input);
    assert_eq!(status, 0);
    assert_eq!(tickets.len(), 2);
    assert_eq!(tickets[0]["drv"]["wanted"], serde_json::json!(["doc"]));
    assert_eq!(tickets[0]["drv"]["hook"], 7);
    assert_eq!(tickets[0]["site"], "x");
    assert_eq!(
        tickets[1]["drv"]["wanted"],
        serde_json::json!(["dev", "doc", "out"])
    );
}

#[test]
fn bad_derivations_are_bad_input() {
    let s = Store::new("bad");
    let drv = s.instantiate("multi", NO_INPUTS);
    let store = s.root.join("store");
    // The right bytes under the wrong name.
    let fake = store.join("0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-multi.drv");
    fs::copy(&drv, &fake).unwrap();
    // Not a derivation at all.
    let junk = store.join("1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-junk.drv");
    fs::write(&junk, "Derive([(\"out\"").unwrap();
    let missing = store.join("2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c-gone.drv");
    let not_drv = store.join("3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d3d-x");
    let (status, tickets) = s.closure(
        &[
            fake.to_str().unwrap(),
            junk.to_str().unwrap(),
            missing.to_str().unwrap(),
            not_drv.to_str().unwrap(),
            "/etc/passwd",
            &drv,
        ],
        "",
    );
    assert_eq!(status, 65);
    insta::assert_json_snapshot!(tickets);
}

#[test]
fn help_and_version() {
    let out = Command::cargo_bin("nsh-closure")
        .unwrap()
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(
        help.contains("--wanted <OUTPUTS>") && help.contains("--store <URI>"),
        "{help}"
    );
    let out = Command::cargo_bin("nsh-closure")
        .unwrap()
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("nsh-closure {}\n", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::cargo_bin("nsh-closure")
        .unwrap()
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}
