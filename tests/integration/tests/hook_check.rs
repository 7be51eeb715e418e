//! `nsh-hook --check` on the test cluster: green with the cluster's own
//! configuration (REST) and with a CLI-backend one; red, with a message that
//! says what to fix, for a partition Slurm does not know, a token slurmctld
//! refuses and a slurmrestd that does not answer; and the daemon's build hook
//! reported both when it is nsh-hook (the login daemon restarted with
//! `tests/cluster/cluster daemon-hook`) and when it is not.
//!
//! The tests that restart or probe the login daemon take [`DAEMON`], so
//! they never see each other's daemon; every one puts the daemon back as
//! `up` made it.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nsh_cluster_tests::{nsh_tool, run_ok, Cluster};
use serde_json::Value;

static DAEMON: Mutex<()> = Mutex::new(());

/// The login daemon with `hook` as its build hook until dropped.
struct DaemonHook<'c> {
    cluster: &'c Cluster,
}

impl<'c> DaemonHook<'c> {
    fn set(cluster: &'c Cluster, hook: &Path, place: &str) -> DaemonHook<'c> {
        daemon_hook(cluster, &[&hook.display().to_string(), place]);
        DaemonHook { cluster }
    }
}

impl Drop for DaemonHook<'_> {
    fn drop(&mut self) {
        daemon_hook(self.cluster, &["none"]);
    }
}

fn daemon_hook(c: &Cluster, args: &[&str]) {
    run_ok(
        c.command(Cluster::repo_root().join("tests/cluster/cluster"))
            .arg("daemon-hook")
            .args(args)
            .env("NSH_CLUSTER_DIR", &c.dir),
    );
}

/// Runs `nsh-hook --check --json --config CONFIG ARGS…`; the exit status
/// and the lines.
fn check(c: &Cluster, config: &Path, args: &[&str]) -> (i32, Vec<Value>) {
    let out = c
        .command(nsh_tool("nsh-hook"))
        .args(["--check", "--json", "--config"])
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}

fn find<'a>(lines: &'a [Value], scope: &str, check: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["scope"] == scope && l["check"] == check)
        .unwrap_or_else(|| panic!("no {scope} {check} line in {lines:#?}"))
}

fn detail(line: &Value) -> &str {
    line["detail"].as_str().unwrap_or("")
}

/// The cluster's configuration with `edit` applied to its text.
fn config_with(c: &Cluster, dir: &Path, name: &str, edit: impl Fn(&str) -> String) -> PathBuf {
    let text = fs::read_to_string(c.nsh_config()).unwrap();
    let path = dir.join(name);
    fs::write(&path, edit(&text)).unwrap();
    path
}

fn replace_line(text: &str, key: &str, new: &str) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with(&format!("{key} =")) {
                new
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// `(major, minor)` of the Nix the stack runs.
fn nix_version(c: &Cluster) -> (u32, u32) {
    let text = c.info["nix_version"].as_str().expect("nix_version");
    let mut parts = text.split('.').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn probe_leftovers() -> Vec<String> {
    fs::read_dir("/nix/store")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("-nsh-probe-"))
        .collect()
}

#[test]
fn the_check_is_green_on_the_test_cluster_with_nsh_as_the_daemon_hook() {
    let _daemon = DAEMON
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let c = Cluster::get();
    let hook = nsh_tool("nsh-hook").canonicalize().unwrap();
    let _hook = DaemonHook::set(&c, &hook, "env");
    let (code, lines) = check(&c, Path::new(&c.nsh_config()), &[]);
    let not_ok: Vec<&Value> = lines[..lines.len() - 1]
        .iter()
        .filter(|l| l["status"] != "ok")
        .collect();
    assert!(not_ok.is_empty(), "{not_ok:#?}");
    assert_eq!(code, 0, "{lines:#?}");
    let nix = c.info["nix_version"].as_str().unwrap();
    let ssh = detail(find(&lines, "cluster", "ssh"));
    assert!(ssh.ends_with(&format!("(Nix) {nix}")), "{ssh}");
    let api = detail(find(&lines, "cluster", "api"));
    let newest = c.info["rest_versions"].as_array().unwrap().last().unwrap();
    assert!(api.starts_with(newest.as_str().unwrap()), "{api} {newest}");
    assert!(detail(find(&lines, "cluster", "partition")).starts_with("build: "));
    assert_eq!(detail(find(&lines, "cluster", "feature big")), "big: node2");
    let answered = detail(find(&lines, "daemon", "build-hook"));
    assert!(
        answered.contains(&format!("at {} ", hook.display()))
            && answered.contains(&format!("it reads {} (from $NSH_CONFIG)", c.nsh_config())),
        "{answered}"
    );
    assert_eq!(find(&lines, "daemon", "hook config")["status"], "ok");
    let summary = lines.last().unwrap();
    assert_eq!(
        (summary["scope"].as_str(), summary["exit"].as_i64()),
        (Some("summary"), Some(0))
    );
    assert_eq!(
        probe_leftovers(),
        Vec::<String>::new(),
        "the probe is deleted"
    );
}

#[test]
fn a_cli_backend_cluster_is_green() {
    let c = Cluster::get();
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(&c, dir.path(), "cli.toml", |text| {
        text.lines()
            .filter(|l| {
                !["url =", "api =", "token_file ="]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .map(|l| {
                if l.starts_with("backend =") {
                    format!("backend = \"cli\"\nsubmit_as = \"{}\"", c.user())
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    let (code, lines) = check(&c, &config, &["--no-daemon"]);
    assert_eq!(code, 0, "{lines:#?}");
    for name in ["commands", "slurmctld", "partition", "feature big", "ssh"] {
        assert_eq!(find(&lines, "cluster", name)["status"], "ok", "{name}");
    }
    let commands = detail(find(&lines, "cluster", "commands"));
    assert!(commands.contains("sbatch"), "{commands}");
    assert!(
        commands.ends_with(&format!("jobs run as {}", c.user())),
        "{commands}"
    );

    // Run by root (as the hook is) without submit_as: red, naming the key.
    let as_root = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("submit_as = \"{}\"", c.user()), "");
    std::fs::write(&config, as_root).unwrap();
    let (code, lines) = check(&c, &config, &["--no-daemon"]);
    assert_eq!(code, 78, "{lines:#?}");
    let submit = find(&lines, "cluster", "submit");
    assert_eq!(submit["status"], "fail");
    assert!(
        detail(submit).contains("cluster.test.submit_as: not set"),
        "{submit}"
    );
}

#[test]
fn a_wrong_partition_a_refused_token_and_an_unreachable_slurmrestd_are_red() {
    let c = Cluster::get();
    let dir = tempfile::tempdir().unwrap();

    let config = config_with(&c, dir.path(), "partition.toml", |t| {
        replace_line(t, "partition", "partition = \"nsh-no-such-partition\"")
    });
    let (code, lines) = check(&c, &config, &["--no-daemon"]);
    assert_eq!(code, 78, "{lines:#?}");
    let partition = find(&lines, "cluster", "partition");
    assert_eq!(
        (partition["status"].as_str(), partition["kind"].as_str()),
        (Some("fail"), Some("config"))
    );
    assert_eq!(
        detail(partition),
        "nsh-no-such-partition: Slurm has no such partition"
    );
    assert_eq!(find(&lines, "cluster", "ssh")["status"], "warn");

    let token = dir.path().join("bad.jwt");
    fs::write(
        &token,
        "SLURM_JWT=eyJhbGciOiJIUzI1NiJ9.e30.bm90LWEtc2lnbmF0dXJl\n",
    )
    .unwrap();
    let config = config_with(&c, dir.path(), "token.toml", |t| {
        replace_line(
            t,
            "token_file",
            &format!("token_file = \"{}\"", token.display()),
        )
    });
    let (code, lines) = check(&c, &config, &["--no-daemon"]);
    assert_eq!(code, 78, "{lines:#?}");
    let refused = find(&lines, "cluster", "token");
    assert_eq!(
        (refused["status"].as_str(), refused["kind"].as_str()),
        (Some("fail"), Some("config"))
    );
    assert!(
        detail(refused).contains("token_file/token_command and user"),
        "{refused}"
    );
    assert!(
        !lines.iter().any(|l| l["check"] == "partition"),
        "nothing asked after a refused token"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = config_with(&c, dir.path(), "url.toml", |t| {
        replace_line(t, "url", &format!("url = \"http://127.0.0.1:{port}\""))
    });
    let (code, lines) = check(&c, &config, &["--no-daemon", "--timeout", "3"]);
    assert_eq!(code, 75, "{lines:#?}");
    let rest = find(&lines, "cluster", "slurmrestd");
    assert_eq!(
        (rest["status"].as_str(), rest["kind"].as_str()),
        (Some("fail"), Some("transient"))
    );
    assert!(
        detail(rest).contains(&format!("127.0.0.1:{port}")),
        "{rest}"
    );
}

#[test]
fn the_daemon_hook_is_reported_when_it_is_not_nsh() {
    let _daemon = DAEMON
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let c = Cluster::get();
    // As `up` made it: the daemon has no build-hook of its own.
    daemon_hook(&c, &["none"]);
    let (code, lines) = check(&c, Path::new(&c.nsh_config()), &[]);
    assert_eq!(code, 78, "{lines:#?}");
    let hook = find(&lines, "daemon", "build-hook");
    assert_eq!(
        (hook["status"].as_str(), hook["kind"].as_str()),
        (Some("fail"), Some("config"))
    );
    assert!(
        detail(hook).contains("not nsh-hook")
            && detail(hook)
                .contains("no build-hook in the daemon's command line, NIX_CONFIG or nix.conf"),
        "{hook}"
    );
    assert_eq!(find(&lines, "daemon", "nix-daemon")["status"], "ok");
    assert_eq!(
        probe_leftovers(),
        Vec::<String>::new(),
        "the probe is deleted"
    );

    // In nix.conf: Nix 2.25–2.33 replace it with the default.
    let nsh_hook = nsh_tool("nsh-hook").canonicalize().unwrap();
    let _hook = DaemonHook::set(&c, &nsh_hook, "nix.conf");
    let (code, lines) = check(&c, Path::new(&c.nsh_config()), &[]);
    let hook = find(&lines, "daemon", "build-hook");
    if ((2, 25)..(2, 34)).contains(&nix_version(&c)) {
        assert_eq!(code, 78, "{lines:#?}");
        assert!(
            detail(hook).contains(&format!(
                "sets build-hook = {}, but Nix",
                nsh_hook.display()
            )) && detail(hook).contains("ignores build-hook in nix.conf"),
            "{hook}"
        );
    } else {
        assert_eq!(code, 0, "{lines:#?}");
        assert!(
            detail(hook).contains(&format!("at {} ", nsh_hook.display())),
            "{hook}"
        );
    }
}
