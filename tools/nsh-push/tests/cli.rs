//! nsh-push as a command, without a cluster: usage, configuration and ticket
//! errors, pass-through. (Copies to the real nodes:
//! tests/integration/tests/push_fetch.rs.)
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

fn nsh_push() -> Command {
    let mut command = Command::cargo_bin("nsh-push").unwrap();
    command.env_remove("NSH_CONFIG");
    command
}

fn ticket_out(stdout: &[u8]) -> Value {
    serde_json::from_slice(stdout).expect("one ticket")
}

#[test]
fn help_version_and_usage() {
    nsh_push()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("--method").and(predicate::str::contains("75")));
    nsh_push()
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::starts_with("nsh-push "));
    nsh_push()
        .args(["--method", "carrier-pigeon"])
        .assert()
        .code(64)
        .stderr(predicate::str::contains(
            "[possible values: auto, add-to-store-nar, import, import-export]",
        ));
}

#[test]
fn a_ticket_without_closure_or_alloc_is_bad_input() {
    let config = config_file(CONFIG);
    let out = nsh_push()
        .arg("--config")
        .arg(config.path())
        .write_stdin("{\"v\":1}\n")
        .assert()
        .code(65)
        .get_output()
        .stdout
        .clone();
    let ticket = ticket_out(&out);
    assert_eq!(ticket["error"]["stage"], "push");
    assert!(ticket["error"]["message"]
        .as_str()
        .unwrap()
        .contains("closure"));
}

#[test]
fn a_closure_path_outside_the_store_is_bad_input_naming_it() {
    let config = config_file(CONFIG);
    let ticket = r#"{"v":1,"store":{"dir":"/nix/store","uri":"local"},"closure":{"paths":["/etc/passwd"],"nar_size":0},"alloc":{"cluster":"test","backend":"cli","job":1,"node":"n","ssh":"n","work":"/tmp/nsh/nsh-1"}}"#;
    let out = nsh_push()
        .arg("--config")
        .arg(config.path())
        .write_stdin(format!("{ticket}\n"))
        .assert()
        .code(65)
        .get_output()
        .stdout
        .clone();
    let message = ticket_out(&out)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("/etc/passwd"), "{message}");
}

#[test]
fn a_bad_configuration_is_78_and_failed_tickets_pass_through() {
    let config = config_file("[cluster.test]\nbackend = 7\n");
    nsh_push()
        .arg("--config")
        .arg(config.path())
        .write_stdin("{\"v\":1}\n")
        .assert()
        .code(78);
    let failed = r#"{"v":1,"error":{"stage":"alloc","kind":"timed-out","message":"queue"}}"#;
    nsh_push()
        .arg("--config")
        .arg(config.path())
        .write_stdin(format!("{failed}\n"))
        .assert()
        .code(101)
        .stdout(format!("{failed}\n"));
}
