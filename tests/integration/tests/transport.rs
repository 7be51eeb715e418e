//! The ssh transport against the cluster's real sshd: one shared master
//! connection per node (not per job), detached from the caller's stdio,
//! and a second master when a node carries more sessions than sshd's
//! MaxSessions.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nsh_cluster_tests::{unique_salt, Cluster};
use nsh_core::ssh::Ssh;
use nsh_core::{AllocSection, Config};

/// The masters of these tests live in a runtime directory of their own
/// (set once for the whole test binary): closing one must not cut the
/// sessions of other tests running meanwhile.
fn private_runtime_dir() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let dir = std::env::temp_dir().join(format!("nsh-transport-{}", std::process::id()));
        std::env::set_var(nsh_core::RUNTIME_DIR_ENV, dir);
    });
}

fn config(c: &Cluster, ssh_extra: &str) -> Config {
    private_runtime_dir();
    let text = format!(
        "[cluster.test]\nbackend = \"cli\"\nsystems = [\"x86_64-linux\"]\n[ssh]\nconfig_file = \"{}\"\n{ssh_extra}",
        c.ssh_config()
    );
    Config::parse(Path::new("t.toml"), &text).unwrap()
}

fn alloc(job: u64, node: &str) -> AllocSection {
    AllocSection {
        cluster: "test".into(),
        job,
        node: node.into(),
        ssh: node.into(),
        ..AllocSection::default()
    }
}

fn hostname_and_word(ssh: &Ssh, word: &str) -> String {
    let out = ssh
        .command(&[
            "sh",
            "-c",
            "cat /proc/sys/kernel/hostname; printf '%s\\n' \"$1\"",
            "sh",
            word,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn one_master_per_node_is_shared_by_jobs_and_detached() {
    let c = Cluster::get();
    let config = config(&c, "");
    let mut first = alloc(u64::from(std::process::id()) * 1000 + 7, "node1");
    // Starting the master must return promptly even though our stdout/stderr
    // are pipes the test harness reads: the master must not hold them.
    let started = Instant::now();
    let ssh = Ssh::ensure_master(&mut first, &config).expect("master starts");
    assert!(started.elapsed() < Duration::from_secs(10));
    let control = first.control.clone().expect("control path recorded");
    assert!(Path::new(&control).exists());
    assert!(control.ends_with("/ssh/test-node1"), "{control}");

    // Commands go through it and see the node, with arguments intact.
    let salt = unique_salt();
    let word = format!("a b '{salt}'");
    assert_eq!(hostname_and_word(&ssh, &word), format!("node1\n{word}\n"));
    drop(ssh);

    // Another job's tools on the same node use the same master.
    let mut second = alloc(first.job + 1, "node1");
    let again = Ssh::ensure_master(&mut second, &config).unwrap();
    assert_eq!(second.control, first.control);
    assert_eq!(hostname_and_word(&again, "x"), "node1\nx\n");

    again.stop_master();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&control).exists() {
        assert!(Instant::now() < deadline, "control socket still there");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A master that went away is started again by the next tool.
    let third = Ssh::ensure_master(&mut second, &config).unwrap();
    assert_eq!(hostname_and_word(&third, "y"), "node1\ny\n");
    third.stop_master();
}

#[test]
fn more_sessions_than_max_sessions_open_a_second_master() {
    let c = Cluster::get();
    let config = config(&c, "max_sessions = 1\n");
    let (mut a, mut b) = (alloc(1, "node2"), alloc(2, "node2"));
    let one = Ssh::ensure_master(&mut a, &config).unwrap();
    let two = Ssh::ensure_master(&mut b, &config).unwrap();
    assert_ne!(a.control, b.control);
    assert!(b.control.as_deref().unwrap().ends_with("/ssh/test-node2-1"));
    assert_eq!(hostname_and_word(&one, "1"), "node2\n1\n");
    assert_eq!(hostname_and_word(&two, "2"), "node2\n2\n");
    // The slots go with the tools: the next one is back on the first master.
    drop(two);
    drop(one);
    let mut d = alloc(3, "node2");
    let three = Ssh::ensure_master(&mut d, &config).unwrap();
    assert_eq!(d.control, a.control);
    three.stop_master();
    Ssh::for_alloc(&b, &config.ssh).stop_master();
}

#[test]
fn an_unreachable_node_is_a_transient_failure() {
    let c = Cluster::get();
    let config = config(&c, "options = [\"ConnectTimeout=2\"]\n");
    let mut alloc = AllocSection {
        cluster: "test".into(),
        job: 1,
        ssh: "nixbuild@10.231.0.99".into(),
        ..AllocSection::default()
    };
    let err = Ssh::ensure_master(&mut alloc, &config).unwrap_err();
    assert_eq!(err.kind, nsh_core::Kind::Transient, "{err}");
    assert!(err.message.contains("10.231.0.99"), "{err}");
}
