//! nsh-alloc as a command, without a cluster: usage, configuration errors,
//! placement failures and ticket pass-through. (Against the real cluster:
//! tests/integration/tests/alloc.rs.)
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use assert_cmd::Command;
use predicates::prelude::*;
use serde_json::Value;

const CONFIG: &str = "[cluster.only]\nbackend = \"cli\"\nsystems = [\"x86_64-linux\"]\nsupported_features = [\"big\"]\n";

fn ticket(system: &str, features: &[&str]) -> String {
    serde_json::json!({"v": 1, "drv": {"path": "/nix/store/00000000000000000000000000000000-t.drv",
        "name": "t", "system": system, "features": features}})
    .to_string()
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

fn nsh_alloc() -> Command {
    let mut command = Command::cargo_bin("nsh-alloc").unwrap();
    command.env_remove("NSH_CONFIG");
    command
}

#[test]
fn help_and_version() {
    nsh_alloc()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("--config").and(predicate::str::contains("--cancel")));
    nsh_alloc()
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::starts_with("nsh-alloc "));
}

#[test]
fn wrong_usage_is_64() {
    nsh_alloc().arg("--frobnicate").assert().code(64);
}

#[test]
fn a_bad_configuration_is_78_and_the_ticket_says_why() {
    let config = config_file("[cluster.only]\nbackend = \"cli\"\nsystem = [\"x86_64-linux\"]\n");
    let out = nsh_alloc()
        .arg("--config")
        .arg(config.path())
        .write_stdin(ticket("x86_64-linux", &[]))
        .assert()
        .code(78)
        .get_output()
        .stdout
        .clone();
    let t: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(t["error"]["kind"], "config");
    assert!(t["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown field `system`"));
    // $NSH_CONFIG is honoured, and a missing file is named.
    nsh_alloc()
        .env("NSH_CONFIG", "/nonexistent/nsh.toml")
        .write_stdin(ticket("x86_64-linux", &[]))
        .assert()
        .code(78)
        .stderr(predicate::str::contains("/nonexistent/nsh.toml"));
}

#[test]
fn nothing_fits_is_65() {
    let config = config_file(CONFIG);
    nsh_alloc()
        .arg("--config")
        .arg(config.path())
        .write_stdin(ticket("x86_64-linux", &["kvm"]))
        .assert()
        .code(65)
        .stdout(predicate::str::contains("does not support kvm"));
    nsh_alloc()
        .arg("--config")
        .arg(config.path())
        .write_stdin(r#"{"v":1}"#)
        .assert()
        .code(65)
        .stdout(predicate::str::contains("run nsh-closure first"));
}

#[test]
fn failed_tickets_pass_through_untouched() {
    let config = config_file(CONFIG);
    let failed = r#"{"v":1,"error":{"stage":"closure","kind":"input","message":"bad drv"}}"#;
    nsh_alloc()
        .arg("--config")
        .arg(config.path())
        .write_stdin(failed)
        .assert()
        .code(65)
        .stdout(format!("{failed}\n"));
}

#[test]
fn cancel_passes_tickets_on_and_keeps_their_status() {
    let config = config_file(CONFIG);
    let failed = r#"{"v":1,"error":{"stage":"run","kind":"transient","message":"node gone"}}"#;
    let plain = r#"{"v":1,"site":"x"}"#;
    nsh_alloc()
        .arg("--config")
        .arg(config.path())
        .arg("--cancel")
        .write_stdin(format!("{plain}\n{failed}\n"))
        .assert()
        .code(75)
        .stdout(format!("{plain}\n{failed}\n"));
    // A ticket whose job is on a cluster the configuration does not know.
    let elsewhere = r#"{"v":1,"alloc":{"cluster":"gone","backend":"rest","job":7,"node":"n","ssh":"u@n","work":"/w","nonce":"x","request":1}}"#;
    nsh_alloc()
        .arg("--config")
        .arg(config.path())
        .arg("--cancel")
        .write_stdin(elsewhere)
        .assert()
        .code(78)
        .stdout(predicate::str::contains(r#"on cluster \"gone\", which"#));
}

/// `--pool-list` prints the pool's records, one JSON line each, with their
/// state; an empty pool prints nothing; `--pool-drain` of an empty pool does
/// nothing; the pool options do not go with `--cancel`.
#[test]
fn the_pool_is_listed_and_drained_by_hand() {
    let config = config_file(CONFIG);
    let runtime = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let mut command = nsh_alloc();
        command
            .arg("--config")
            .arg(config.path())
            .env("NSH_RUNTIME_DIR", runtime.path())
            .args(args);
        command
    };
    run(&["--pool-list"]).assert().success().stdout("");
    run(&["--pool-drain"]).assert().success().stdout("");
    run(&["--pool-list", "--cancel"]).assert().code(64);

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let record = serde_json::json!({
        "job": 5, "node": "node1", "ssh": "node1", "work": "/tmp/nsh/nsh-5", "nonce": "n",
        "backend": "cli", "env": "e", "started": now - 100, "ends": now + 3600,
        "linger": 60, "request": 2, "last_used": now - 10, "owner": null,
    });
    let dir = runtime.path().join("pool/only");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("job-5.json"), record.to_string()).unwrap();
    let out = run(&["--pool-list"])
        .assert()
        .success()
        .get_output()
        .stdout
        .clone();
    let lines: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["cluster"], "only");
    assert_eq!(lines[0]["job"], 5);
    assert_eq!(lines[0]["state"], "idle");
    let leaves_in = lines[0]["leaves_in"].as_u64().unwrap();
    assert!((45..=50).contains(&leaves_in), "{leaves_in}");
}
