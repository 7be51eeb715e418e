//! The login side on one stack and the nodes' Nix on another: sites upgrade
//! their login nodes and their compute images at different times. On a
//! stack's machine the other suites' Nix runs on the nodes through
//! `remote.nix_bin_dir` (`tests/cluster/cluster` write_cross_nix), so here
//! e.g. a Nix 2.34 login side builds through nodes running Nix 2.8, and the
//! reverse on the other stack. The whole pipeline runs by hand, a derivation
//! with an input that must be pushed, with a multi-output result to fetch.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::io::Write;
use std::process::{Command, Stdio};

use nsh_cluster_tests::{instantiate, nsh_tool, run_ok, unique_salt, Cluster};
use serde_json::Value;

/// A derivation with two outputs whose input (a source file) is only in the
/// login store, so that push has something to copy.
fn two_output_drv(c: &Cluster, suite: &str) -> String {
    let salt = unique_salt();
    instantiate(
        c,
        &format!(
            r#"let src = builtins.toFile "nsh-cross-src-{salt}" "from the login side";
               in builtins.derivation {{
                 name = "nsh-cross-{suite}-{salt}";
                 system = builtins.currentSystem;
                 builder = "/bin/sh";
                 outputs = [ "out" "doc" ];
                 args = [ "-c" "read h < /proc/sys/kernel/hostname; echo $h > $out; read l < ${{src}}; echo $l > $doc" ];
               }}"#
        ),
    )
}

/// The configuration of the cluster with the nodes' `nix-store` from `bin_dir`.
fn config_with_node_nix(c: &Cluster, dir: &std::path::Path, bin_dir: &str) -> String {
    let text = std::fs::read_to_string(c.nsh_config()).unwrap();
    let text = text.replace(
        "nix_bin_dir = \"\"",
        &format!("nix_bin_dir = \"{bin_dir}\""),
    );
    assert!(
        text.contains(bin_dir),
        "the cluster's nsh.toml has no nix_bin_dir line"
    );
    let path = dir.join("cross.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// `nsh-closure DRV | nsh-alloc | nsh-push | nsh-run | nsh-fetch`, all
/// with `--config config`; the final ticket and everything they logged.
fn pipeline(c: &Cluster, config: &str, drv: &str) -> (bool, Value, String) {
    let tools = [
        "nsh-closure",
        "nsh-alloc",
        "nsh-push",
        "nsh-run",
        "nsh-fetch",
    ];
    let script = tools
        .iter()
        .map(|t| format!("{} --config {config}", nsh_tool(t).display()))
        .collect::<Vec<_>>()
        .join(" | ");
    let mut child = c
        .command("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the pipeline starts");
    writeln!(child.stdin.take().unwrap(), "{drv}").unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ticket = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (
        out.status.success(),
        ticket,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_pipeline_builds_through_nodes_that_run_another_stacks_nix() {
    let c = Cluster::get();
    let cross = c.info["cross_nix"].as_object().cloned().unwrap_or_default();
    assert!(
        !cross.is_empty(),
        "no other stack's Nix on this machine (tests/cluster/stack makes the other \
         suites' root filesystems visible under /opt/nsh-stacks; scripts/test makes them all)"
    );
    let dir = tempfile::tempdir().unwrap();
    for (suite, nix) in &cross {
        let bin_dir = nix["bin_dir"].as_str().unwrap();
        let node_version = nix["version"].as_str().unwrap();
        let config = config_with_node_nix(&c, dir.path(), bin_dir);
        let drv = two_output_drv(&c, suite);
        let (ok, ticket, stderr) = pipeline(&c, &config, &drv);
        let what = format!(
            "login Nix {} ({}), node Nix {node_version} ({suite})",
            c.nix_version(),
            c.stack()
        );
        assert!(ok, "{what}: {ticket}\n{stderr}");
        assert_eq!(ticket["run"]["status"], "built", "{what}: {ticket}");
        assert_eq!(ticket["push"]["copied"], 1, "{what}: {ticket}");
        let node = ticket["alloc"]["node"].as_str().unwrap();
        let outputs = &ticket["drv"]["outputs"];
        let out = outputs["out"].as_str().unwrap();
        let doc = outputs["doc"].as_str().unwrap();
        run_ok(c.command("nix-store").args(["--verify-path", out, doc]));
        assert_eq!(std::fs::read_to_string(out).unwrap().trim(), node);
        assert_eq!(
            std::fs::read_to_string(doc).unwrap().trim(),
            "from the login side"
        );
        // Built by the other Nix: its serve process answered on the node.
        let version = Command::new("ssh")
            .args(["-F", &c.ssh_config(), node])
            .arg(format!("{bin_dir}/nix-store --version"))
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&version.stdout).contains(node_version),
            "{what}: {}",
            String::from_utf8_lossy(&version.stderr)
        );
        eprintln!("{what}: built {out} on {node}");
    }
}
