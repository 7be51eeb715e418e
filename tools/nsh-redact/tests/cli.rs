//! nsh-redact as a command: tickets in, redacted tickets out, statuses.
//! (The rules: nsh-core's redact tests; a real pipeline:
//! tests/integration/tests/snapshot.rs.)
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;

const TICKET: &str = r#"{"v":1,"drv":{"path":"/nix/store/xps6s36j325jrz0syj4dz75mrj71nwf1-nsh-snap.drv","name":"nsh-snap"},"alloc":{"cluster":"test","backend":"cli","job":7,"node":"node1","ssh":"nixbuild@node1","work":"/tmp/nsh/nsh-7","request":1},"run":{"status":"built","times_built":1,"start":1796078905,"stop":1796078906,"built_outputs":{}}}"#;

fn nsh_redact() -> Command {
    Command::cargo_bin("nsh-redact").unwrap()
}

#[test]
fn help_and_version() {
    nsh_redact()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("--pretty").and(predicate::str::contains("<JOB:n>")));
    nsh_redact()
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::starts_with("nsh-redact "));
}

#[test]
fn wrong_usage_is_64() {
    nsh_redact().arg("--frobnicate").assert().code(64);
}

#[test]
fn tickets_come_out_one_per_line_redacted() {
    let out = nsh_redact()
        .write_stdin(format!("{TICKET}\n{TICKET}\n"))
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let out = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0], lines[1]);
    let ticket: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(ticket["drv"]["path"], "/nix/store/<HASH:1>-nsh-snap.drv");
    assert_eq!(ticket["alloc"]["job"], "<JOB:1>");
    assert_eq!(ticket["alloc"]["work"], "/tmp/nsh/nsh-<JOB:1>");
    assert_eq!(ticket["run"]["start"], "<TIME>");
}

#[test]
fn pretty_indents_each_ticket() {
    nsh_redact()
        .arg("--pretty")
        .write_stdin(format!("{TICKET}\n"))
        .assert()
        .success()
        .stdout(predicate::str::starts_with(
            "{\n  \"v\": 1,\n  \"drv\": {\n",
        ));
}

#[test]
fn a_failed_ticket_gives_its_status() {
    nsh_redact()
        .write_stdin(r#"{"v":1,"error":{"stage":"alloc","kind":"transient","message":"Slurm job 12 ended"}}"#)
        .assert()
        .code(75)
        .stdout(predicate::str::contains("Slurm job <JOB:1> ended"));
}

#[test]
fn a_line_that_is_not_a_ticket_is_65_naming_the_line() {
    nsh_redact()
        .write_stdin(format!("{TICKET}\nnot json\n"))
        .assert()
        .code(65)
        .stderr(predicate::str::contains("line 2: not a ticket"));
}
