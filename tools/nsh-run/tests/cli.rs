//! nsh-run as a command, without a cluster: usage, the log fd, configuration
//! and ticket errors, pass-through. (Builds on the real cluster:
//! tests/integration/tests/run.rs.)
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;

const CONFIG: &str = "[cluster.test]\nbackend = \"cli\"\nsystems = [\"x86_64-linux\"]\n";

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

fn nsh_run() -> Command {
    let mut command = Command::cargo_bin("nsh-run").unwrap();
    command.env_remove("NSH_CONFIG").env_remove("NSH_LOG_FD");
    command
}

fn ticket_out(stdout: &[u8]) -> Value {
    serde_json::from_slice(stdout).expect("one ticket")
}

#[test]
fn help_and_version() {
    nsh_run()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("--log-fd").and(predicate::str::contains("101")));
    nsh_run()
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::starts_with("nsh-run "));
}

#[test]
fn wrong_usage_is_64() {
    nsh_run().arg("--frobnicate").assert().code(64);
    nsh_run()
        .args(["--log-fd", "97"])
        .assert()
        .code(64)
        .stderr(predicate::str::contains("log fd 97"));
    nsh_run().env("NSH_LOG_FD", "four").assert().code(64);
}

#[test]
fn a_bad_configuration_is_78_and_the_ticket_says_why() {
    let config = config_file("[cluster.test]\nbakend = \"cli\"\n");
    let out = nsh_run()
        .arg("--config")
        .arg(config.path())
        .write_stdin("{\"v\":1}\n")
        .assert()
        .code(78)
        .get_output()
        .stdout
        .clone();
    let ticket = ticket_out(&out);
    assert_eq!(ticket["error"]["stage"], "run");
    assert_eq!(ticket["error"]["kind"], "config");
}

#[test]
fn a_ticket_without_its_sections_is_bad_input() {
    let config = config_file(CONFIG);
    let out = nsh_run()
        .arg("--config")
        .arg(config.path())
        .write_stdin("{\"v\":1,\"site\":\"kept\"}\n")
        .assert()
        .code(65)
        .get_output()
        .stdout
        .clone();
    let ticket = ticket_out(&out);
    assert_eq!(ticket["error"]["kind"], "input");
    assert!(ticket["error"]["message"]
        .as_str()
        .unwrap()
        .contains("nsh-closure"));
    assert_eq!(ticket["site"], "kept");
}

#[test]
fn a_failed_ticket_passes_through_with_its_status() {
    let config = config_file(CONFIG);
    let failed = r#"{"v":1,"error":{"stage":"alloc","kind":"transient","message":"queue"}}"#;
    nsh_run()
        .arg("--config")
        .arg(config.path())
        .write_stdin(format!("{failed}\n"))
        .assert()
        .code(75)
        .stdout(format!("{failed}\n"));
}
