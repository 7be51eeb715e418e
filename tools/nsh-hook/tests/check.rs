//! `nsh-hook --check` without a cluster: the configuration checks, the
//! output formats, the exit statuses, an unreachable slurmrestd. (On the
//! test cluster: `tests/integration/tests/hook_check.rs`.)
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

fn check(config: Option<&Path>, env_config: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("nsh-hook"));
    cmd.arg("--check").args(args).env_remove("NSH_CONFIG");
    if let Some(path) = config {
        cmd.arg("--config").arg(path);
    }
    if let Some(path) = env_config {
        cmd.env("NSH_CONFIG", path);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, url: &str, hook: &str) -> PathBuf {
    let token = dir.join("jwt");
    fs::write(&token, "SLURM_JWT=x\n").unwrap();
    let path = dir.join("nsh.toml");
    fs::write(
        &path,
        format!(
            "[cluster.main]\nurl = \"{url}\"\nuser = \"nixbuild\"\ntoken_file = \"{}\"\n\
             systems = [\"x86_64-linux\"]\n\n[hook]\nslots_dir = \"{}\"\n{hook}",
            token.display(),
            dir.join("slots").display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_broken_file_is_78_and_the_check_says_which_file_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    fs::write(&bad, "[cluster.main]\npartiton = \"build\"\n").unwrap();
    let (code, stdout, _) = check(Some(&bad), None, &["--no-daemon"]);
    assert_eq!(code, 78, "{stdout}");
    let first = stdout.lines().nth(1).unwrap();
    assert!(first.starts_with("config"), "{stdout}");
    assert!(
        first.contains(&format!(
            "{} (from --config): TOML parse error at line 2",
            bad.display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("unknown field `partiton`"), "{stdout}");
    let (code, stdout, _) = check(None, Some(&bad), &["--no-daemon", "--json"]);
    assert_eq!(code, 78);
    let lines = json_lines(&stdout);
    assert_eq!(lines[0]["check"], "file");
    assert_eq!(lines[0]["status"], "fail");
    assert_eq!(lines[0]["kind"], "config");
    assert!(lines[0]["detail"]
        .as_str()
        .unwrap()
        .contains("(from $NSH_CONFIG)"));
    assert_eq!(lines.last().unwrap()["exit"], 78);
    if !Path::new("/etc/nsh/nsh.toml").exists() {
        let (code, stdout, _) = check(None, None, &["--no-daemon"]);
        assert_eq!(code, 78);
        assert!(
            stdout.contains("/etc/nsh/nsh.toml (from the default path): "),
            "{stdout}"
        );
    }
}

#[test]
fn an_unreachable_slurmrestd_is_75_within_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let config = write_config(dir.path(), &format!("http://127.0.0.1:{port}"), "");
    let started = Instant::now();
    let (code, stdout, stderr) = check(Some(&config), None, &["--no-daemon", "--json"]);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(code, 75, "{stdout}{stderr}");
    let lines = json_lines(&stdout);
    let rest = lines
        .iter()
        .find(|l| l["check"] == "slurmrestd")
        .expect("a slurmrestd line");
    assert_eq!(rest["scope"], "cluster");
    assert_eq!(rest["cluster"], "main");
    assert_eq!(rest["status"], "fail");
    assert_eq!(rest["kind"], "transient");
    assert!(
        rest["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{port}")),
        "{rest}"
    );
    // Nothing is asked of a slurmrestd that does not answer.
    assert!(!lines.iter().any(|l| l["check"] == "token"), "{stdout}");
    let summary = lines.last().unwrap();
    assert_eq!(summary["scope"], "summary");
    assert_eq!(summary["exit"], 75);
}

#[test]
fn the_hook_table_is_checked_too() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let config = write_config(
        dir.path(),
        &format!("http://127.0.0.1:{port}"),
        "pipeline = [\"/nonexistent/hook.sh\"]\nfallback = [\"/bin/true\"]\nnix_bin_dir = \"/nonexistent\"\n",
    );
    let (code, stdout, _) = check(Some(&config), None, &["--no-daemon", "--json"]);
    assert_eq!(code, 78, "{stdout}");
    let lines = json_lines(&stdout);
    let by_check = |name: &str| {
        lines
            .iter()
            .find(|l| l["scope"] == "config" && l["check"] == name)
            .unwrap_or_else(|| panic!("no {name} line: {stdout}"))
            .clone()
    };
    assert_eq!(by_check("pipeline")["status"], "fail");
    assert!(by_check("pipeline")["detail"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/hook.sh"));
    assert_eq!(by_check("fallback")["status"], "ok");
    assert_eq!(by_check("nix_bin_dir")["status"], "fail");
    assert_eq!(by_check("slots_dir")["status"], "ok");
}

#[test]
fn the_tools_must_be_next_to_the_hook() {
    let dir = tempfile::tempdir().unwrap();
    let lonely = dir.path().join("nsh-hook");
    fs::copy(assert_cmd::cargo::cargo_bin("nsh-hook"), &lonely).unwrap();
    let config = write_config(dir.path(), "http://127.0.0.1:1", "");
    let out = Command::new(&lonely)
        .args(["--check", "--no-daemon", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(78), "{stdout}");
    let pipeline = stdout.lines().find(|l| l.contains("pipeline")).unwrap();
    assert!(
        pipeline.contains("FAIL") && pipeline.contains("nsh-closure not found"),
        "{pipeline}"
    );
}

#[test]
fn usage() {
    let (code, _, stderr) = check(None, None, &["--bogus"]);
    assert_eq!(code, 64, "{stderr}");
    let (code, stdout, _) = check(None, None, &["--help"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("Exit status: 0 nothing failed") && stdout.contains("--no-daemon"),
        "{stdout}"
    );
    let (code, _, _) = check(None, None, &["--timeout", "0"]);
    assert_eq!(code, 64);
}
