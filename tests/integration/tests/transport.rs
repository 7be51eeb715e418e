//! The ssh transport against the cluster's real sshd: one shared master
//! connection per node, detached from the caller's stdio.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use nsh_cluster_tests::{unique_salt, Cluster};
use nsh_core::ssh::{self, Ssh};
use nsh_core::AllocSection;

fn settings(c: &Cluster) -> ssh::Settings {
    ssh::Settings {
        config_file: Some(c.ssh_config().into()),
        ..ssh::Settings::default()
    }
}

#[test]
fn a_master_is_shared_detached_and_closed() {
    let c = Cluster::get();
    let mut alloc = AllocSection {
        cluster: "test".into(),
        job: u64::from(std::process::id()) * 1000 + 7,
        ssh: "node1".into(),
        ..AllocSection::default()
    };
    // Starting the master must return promptly even though our stdout/stderr
    // are pipes the test harness reads: the master must not hold them.
    let started = Instant::now();
    let ssh = Ssh::ensure_master(&mut alloc, &settings(&c)).expect("master starts");
    assert!(started.elapsed() < Duration::from_secs(10));
    let control = alloc.control.clone().expect("control path recorded");
    assert!(std::path::Path::new(&control).exists());

    // Commands go through it and see the node, with arguments intact.
    let salt = unique_salt();
    let out = ssh
        .command(&[
            "sh",
            "-c",
            "cat /proc/sys/kernel/hostname; printf '%s\\n' \"$1\"",
            "sh",
            &format!("a b '{salt}'"),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("node1\na b '{salt}'\n")
    );

    // A second "tool" reuses it: ensure_master finds it alive.
    let again = Ssh::ensure_master(&mut alloc, &settings(&c)).unwrap();
    assert_eq!(again.control_path(), ssh.control_path());

    ssh.stop_master();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&control).exists() {
        assert!(Instant::now() < deadline, "control socket still there");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_unreachable_node_is_a_transient_failure() {
    let c = Cluster::get();
    let mut alloc = AllocSection {
        cluster: "test".into(),
        job: 1,
        ssh: "nixbuild@10.231.0.99".into(),
        ..AllocSection::default()
    };
    let mut s = settings(&c);
    s.options.push("ConnectTimeout=2".into());
    let err = Ssh::ensure_master(&mut alloc, &s).unwrap_err();
    assert_eq!(err.kind, nsh_core::Kind::Transient, "{err}");
    assert!(err.message.contains("10.231.0.99"), "{err}");
}
