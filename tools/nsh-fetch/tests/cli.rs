//! nsh-fetch as a command, without a cluster: usage, ticket errors,
//! pass-through. (Fetches from the real nodes:
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

fn nsh_fetch() -> Command {
    let mut command = Command::cargo_bin("nsh-fetch").unwrap();
    command.env_remove("NSH_CONFIG");
    command
}

#[test]
fn help_version_and_usage() {
    nsh_fetch().arg("--help").assert().success().stdout(
        predicate::str::contains("--import-method").and(predicate::str::contains("--keep-job")),
    );
    nsh_fetch()
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::starts_with("nsh-fetch "));
    // `auto` chooses by who runs nsh-fetch (no Nix version probe).
    nsh_fetch()
        .args(["--import-method", "hope"])
        .assert()
        .code(64)
        .stderr(predicate::str::contains(
            "[possible values: auto, load-db, held-locks, daemon, signed]",
        ));
    nsh_fetch()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("[default: auto]"));
}

#[test]
fn nothing_to_fetch_is_bad_input() {
    let config = config_file(CONFIG);
    for (ticket, needle) in [
        (r#"{"v":1}"#, "drv"),
        (
            r#"{"v":1,"drv":{"path":"/nix/store/00000000000000000000000000000000-x.drv","name":"x","system":"x86_64-linux","outputs":{"out":""},"wanted":["out"]}}"#,
            "no known path",
        ),
        (
            r#"{"v":1,"drv":{"path":"/nix/store/00000000000000000000000000000000-x.drv","name":"x","system":"x86_64-linux","outputs":{"out":"/nix/store/11111111111111111111111111111111-x"},"wanted":["out"]}}"#,
            "alloc",
        ),
    ] {
        let out = nsh_fetch()
            .arg("--config")
            .arg(config.path())
            .write_stdin(format!("{ticket}\n"))
            .assert()
            .code(65)
            .get_output()
            .stdout
            .clone();
        let ticket: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(ticket["error"]["stage"], "fetch");
        let message = ticket["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message}");
    }
}

#[test]
fn failed_tickets_pass_through() {
    let config = config_file(CONFIG);
    let failed = r#"{"v":1,"error":{"stage":"run","kind":"permanent","message":"builder failed"}}"#;
    nsh_fetch()
        .arg("--config")
        .arg(config.path())
        .write_stdin(format!("{failed}\n"))
        .assert()
        .code(1)
        .stdout(format!("{failed}\n"));
}
