//! The whole of nsh under the stack's real Nix and Slurm and the real node
//! stores: `nix-build --option build-hook nsh-hook` with the nsh-* tools next
//! to it. Every derivation of a DAG is built in a Slurm job on a compute node
//! (each output records the host it was built on), the one that requires the
//! `big` system feature on the node that has the Slurm feature `big`; Nix
//! stores the remote build log; a failing derivation fails the build with
//! its log. Both on the local store and through the cluster's nix-daemon.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::path::PathBuf;
use std::process::Output;

use nsh_cluster_tests::{nsh_tool, run_ok, unique_salt, Cluster, NixVersion};

/// `nix-build` of `tests/demo/dag.nix` (or `expr`) with nsh-hook as the hook
/// and no local build slots: every build must go to the cluster.
fn nix_build(c: &Cluster, salt: &str, expr: Option<&str>, through_daemon: bool) -> Output {
    let hook = nsh_tool("nsh-hook");
    let mut cmd = c.command("nix-build");
    match expr {
        Some(expr) => cmd.args(["-E", expr]),
        None => cmd
            .arg(Cluster::repo_root().join("tests/demo/dag.nix"))
            .args(["--argstr", "salt", salt]),
    };
    cmd.args(["--no-out-link", "--max-jobs", "0", "--option", "build-hook"])
        .arg(&hook);
    if through_daemon {
        cmd.args(["--store", "daemon"]);
    }
    cmd.env_remove("NIX_REMOTE");
    cmd.output().expect("nix-build runs")
}

fn builds_the_dag_on_the_nodes(through_daemon: bool) {
    let c = Cluster::get();
    let salt = unique_salt();
    let out = nix_build(&c, &salt, None, through_daemon);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nix-build failed:\n{stderr}");
    let result = String::from_utf8_lossy(&out.stdout).trim().to_string();

    // Where each derivation was built, as the outputs recorded it.
    let text = std::fs::read_to_string(&result).unwrap();
    let mut places: Vec<&str> = text.lines().collect();
    places.sort_unstable();
    places.dedup();
    let big = c.node_with_feature("big");
    let nodes = c.nodes();
    let mut names = Vec::new();
    for line in &places {
        let (name, host) = line.split_once(": built on ").expect(line);
        assert!(
            nodes.iter().any(|n| n == host),
            "{name} was built on {host}, not on a node: {text}"
        );
        if name == "nsh-demo-heavy" {
            assert_eq!(host, big, "the `big` derivation went to the wrong node");
        }
        names.push(name);
    }
    assert_eq!(
        names,
        [
            "nsh-demo-heavy",
            "nsh-demo-left",
            "nsh-demo-result",
            "nsh-demo-right",
            "nsh-demo-source"
        ]
    );
    // Nix showed which job and node each went to.
    assert!(
        stderr.contains(&format!("on {big} (Slurm job ")),
        "{stderr}"
    );

    // Nix stored the log the builder wrote on the node.
    let mut log = c.command("nix-store");
    if through_daemon {
        log.args(["--store", "daemon"]);
    }
    let log = run_ok(log.args(["--read-log", &result]));
    assert!(log.contains("nsh-demo-result: building on "), "{log}");

    // The outputs are valid in the local store (not only present).
    run_ok(c.command("nix-store").args(["--check-validity", &result]));
}

#[test]
fn a_dag_builds_on_the_nodes_from_the_local_store() {
    builds_the_dag_on_the_nodes(false);
}

#[test]
fn a_dag_builds_on_the_nodes_through_the_daemon() {
    builds_the_dag_on_the_nodes(true);
}

fn a_failing_derivation_fails_the_build_with_its_log(through_daemon: bool) {
    let c = Cluster::get();
    let salt = unique_salt();
    let expr = format!(
        r#"builtins.derivation {{
             name = "nsh-e2e-fails-{salt}";
             system = builtins.currentSystem;
             builder = "/bin/sh";
             args = [ "-c" "echo about to fail on purpose; exit 3" ];
           }}"#
    );
    let out = nix_build(&c, &salt, Some(&expr), through_daemon);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Nix's own status for a failed build: 100 on a local store; through
    // the daemon Nix 2.8 reports every failure as 1, built locally or not.
    // From 2.29 Nix takes any non-zero exit of a hook for a misc failure,
    // so nsh-hook's 100 becomes 1 on a local store too.
    let hook_status_kept = !NixVersion::of(&c).at_least(2, 29, 0);
    let expected = if !through_daemon && hook_status_kept {
        100
    } else {
        1
    };
    assert_eq!(out.status.code(), Some(expected), "{stderr}");
    assert!(stderr.contains("about to fail on purpose"), "{stderr}");
    assert!(stderr.contains("exit code 3"), "{stderr}");
    // The job ends by itself (nsh-run released it): none is left behind.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let queue = run_ok(c.command("squeue").args(["-h", "-o", "%j %T"]));
        if !queue.contains(&format!("nsh-e2e-fails-{salt}")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a job was left behind: {queue}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn a_failing_derivation_fails_the_build_with_its_log_on_the_local_store() {
    a_failing_derivation_fails_the_build_with_its_log(false);
}

#[test]
fn a_failing_derivation_fails_the_build_with_its_log_through_the_daemon() {
    a_failing_derivation_fails_the_build_with_its_log(true);
}

#[test]
fn the_builder_gets_the_cores_slurm_gave_the_job() {
    let c = Cluster::get();
    let salt = unique_salt();
    let expr = format!(
        r#"builtins.derivation {{
             name = "nsh-e2e-cores-{salt}";
             system = builtins.currentSystem;
             builder = "/bin/sh";
             nshResources = builtins.toJSON {{ cpus = 3; }};
             args = [ "-c" "echo $NIX_BUILD_CORES > $out" ];
           }}"#
    );
    let out = nix_build(&c, &salt, Some(&expr), false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let result = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(std::fs::read_to_string(&result).unwrap().trim(), "3");
}

/// A site whose one cluster is the CLI backend, given to the daemon's hook
/// the documented way (a wrapper that exports `NSH_CONFIG` and execs
/// nsh-hook): the hook runs as root, the jobs are the build account's
/// (`submit_as`), the nodes are reached as it, and every ticket says which
/// configuration the hook read and why.
#[test]
fn a_cli_cluster_builds_through_the_daemon_as_the_build_account() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::get();
    let user = c.user();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (config, tickets, wrapper) = cli_site(&c, dir.path());
    let salt = unique_salt();
    let out = c
        .command("nix-build")
        .arg(Cluster::repo_root().join("tests/demo/dag.nix"))
        .args(["--argstr", "salt", &salt])
        .args([
            "--no-out-link",
            "--max-jobs",
            "0",
            "-v",
            "--option",
            "build-hook",
        ])
        .arg(&wrapper)
        .args(["--store", "daemon"])
        .env_remove("NIX_REMOTE")
        .output()
        .expect("nix-build runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nix-build failed:\n{stderr}");
    // At -v the hook says which configuration it read, and why.
    let said = format!(
        "nsh-hook: configuration {} (from $NSH_CONFIG)",
        config.display()
    );
    assert!(stderr.contains(&said), "{stderr}");

    let log = std::fs::read_to_string(&tickets).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{log}");
    for t in &lines {
        assert_eq!(t["hook"]["config"], config.display().to_string().as_str());
        assert_eq!(t["hook"]["config_from"], "$NSH_CONFIG");
        assert_eq!(t["hook"]["exit"], 0);
        assert_eq!(t["alloc"]["backend"], "cli");
        assert!(t["alloc"]["ssh"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{user}@")));
        // The job was the build account's (Slurm keeps ended jobs a while).
        let job = t["alloc"]["job"].as_u64().unwrap().to_string();
        let shown = run_ok(c.command("scontrol").args(["show", "job", "-o", &job]));
        assert!(shown.contains(&format!("UserId={user}(")), "{shown}");
    }
}

/// A CLI-cluster site in `dir`: its nsh.toml (the cluster's, as the CLI
/// backend submitting as the build account), where the tickets are logged,
/// and the hook wrapper that gives nsh-hook both.
fn cli_site(c: &Cluster, dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let user = c.user();
    let config = dir.join("nsh.toml");
    let text = std::fs::read_to_string(c.nsh_config()).unwrap().replace(
        "backend = \"rest\"",
        &format!("backend = \"cli\"\nsubmit_as = \"{user}\"\npriority = 1"),
    );
    std::fs::write(
        &config,
        format!(
            "{text}\n[hook]\nslots_dir = \"{}\"\n",
            dir.join("slots").display()
        ),
    )
    .unwrap();
    let tickets = dir.join("tickets.jsonl");
    let slurm_conf = c
        .envs()
        .into_iter()
        .find(|(k, _)| k == "SLURM_CONF")
        .unwrap()
        .1;
    let wrapper = dir.join("nsh-hook-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexport NSH_CONFIG={} NSH_TICKET_LOG={} SLURM_CONF={slurm_conf}\nexec {} \"$@\"\n",
            config.display(),
            tickets.display(),
            nsh_tool("nsh-hook").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();

    (config, tickets, wrapper)
}

/// A cluster whose partition Slurm does not know, under the hook: the hook
/// checks the cluster before its first build, sets it aside, and declines,
/// so Nix builds the derivation locally (`--max-jobs 1`) instead of failing
/// it; the verdict is kept beside the slots.
#[test]
fn a_broken_cluster_makes_the_hook_decline_so_nix_builds_locally() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::get();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (config, tickets, wrapper) = cli_site(&c, dir.path());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("partition = \"build\"", "partition = \"nosuch\"");
    std::fs::write(&config, text).unwrap();
    let salt = unique_salt();
    let expr = format!(
        r#"builtins.derivation {{
             name = "nsh-e2e-broken-{salt}";
             system = builtins.currentSystem;
             builder = "/bin/sh";
             args = [ "-c" "echo built here > $out" ];
           }}"#
    );
    let out = c
        .command("nix-build")
        .args(["-E", &expr, "--no-out-link", "--max-jobs", "1"])
        .args(["--option", "build-hook"])
        .arg(&wrapper)
        .env_remove("NIX_REMOTE")
        .output()
        .expect("nix-build runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nix-build failed:\n{stderr}");
    assert!(
        stderr.contains("nsh-hook: cluster test set aside")
            && stderr.contains("cluster.test.partition = \"nosuch\""),
        "{stderr}"
    );
    let result = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        std::fs::read_to_string(&result).unwrap().trim(),
        "built here"
    );
    // Nothing went to Slurm: the hook accepted nothing.
    assert!(
        !tickets.exists(),
        "{}",
        std::fs::read_to_string(&tickets).unwrap()
    );
    let verdict = std::fs::read_to_string(dir.path().join("slots/test.broken")).unwrap();
    assert!(verdict.contains("nosuch"), "{verdict}");
}
