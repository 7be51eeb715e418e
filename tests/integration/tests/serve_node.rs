//! The serve-protocol client against a real node's `nix-store --serve --write`
//! over ssh, and a build request file built on that node: what nsh-push and
//! nsh-run do, without Slurm. The node's store starts without the paths
//! (each run makes new ones), so they are really copied.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::io::Write;
use std::process::Stdio;

use nsh_cluster_tests::{run_ok, unique_salt, Cluster};
use nsh_core::serve::ServeProcess;
use nsh_core::serve::{self, BuildStatus};
use nsh_core::ssh::{self, Ssh};
use nsh_core::store::{self as local_store, LocalStore};
use nsh_core::BuildOptions;

#[test]
fn inputs_are_copied_to_a_node_and_a_request_file_builds_there() {
    let c = Cluster::get();
    let salt = unique_salt();
    let dir = tempfile::tempdir().unwrap();
    let expr = chain_expression(dir.path(), &salt);
    // The login node's own store, through its daemon.
    let b_path = run_ok(c.command("nix-instantiate").arg(&expr))
        .trim()
        .to_string();
    let local = LocalStore::new("", "").unwrap();
    let b = local.read_drv(&local.dir.parse(&b_path).unwrap()).unwrap();
    let a_drv = b.input_drvs.keys().next().unwrap();
    run_ok(c.command("nix-store").args(["--realise", a_drv.as_str()]));
    let mut here = local.serve(false).unwrap();
    let closure =
        local_store::input_closure(&mut here.client, &local.input_roots(&b).unwrap()).unwrap();
    assert_eq!(closure.paths.len(), 1);

    // Copy what node1 lacks, streamed from the local store.
    let ssh = Ssh::new(
        "node1",
        &ssh::Settings {
            config_file: Some(c.ssh_config().into()),
            ..ssh::Settings::default()
        },
    );
    let mut node = ServeProcess::from_command(
        ssh.command(&["nix-store", "--serve", "--write"]),
        ssh.describe(),
        Some(std::time::Duration::from_secs(120)),
    )
    .unwrap();
    let present = node
        .client
        .query_valid_paths(&closure.paths, true, false)
        .unwrap();
    assert!(
        present.is_empty(),
        "new paths are already on node1: {present:?}"
    );
    for info in &closure.infos {
        node.client
            .add_to_store_nar_with(info, |w| here.client.dump_store_path(&info.path, w))
            .unwrap();
    }
    assert_eq!(
        node.client
            .query_valid_paths(&closure.paths, false, false)
            .unwrap(),
        closure.paths
    );

    // The build request as a file, run on the node as the job runs it.
    let mut request = Vec::new();
    serve::write_build_request(&mut request, &b, &closure.paths, &BuildOptions::default()).unwrap();
    let script = "d=$(mktemp -d) && cat > $d/request && \
                  nix-store --serve --write < $d/request > $d/response 2> $d/log; \
                  cat $d/response; rm -rf $d";
    let mut child = ssh
        .command(&["sh", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&request).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let response = serve::read_build_response(&out.stdout[..]).unwrap();
    // The node had every input when the build began.
    assert_eq!(response.inputs_valid, closure.paths);
    let result = response.result.unwrap();
    assert_eq!(result.status, BuildStatus::Built, "{}", result.error_msg);
    let b_out = b.outputs["out"].path.clone().unwrap();
    assert_eq!(result.output_paths(&local.dir).unwrap()["out"], b_out);
    assert_eq!(
        node.client
            .query_valid_paths(std::slice::from_ref(&b_out), false, false)
            .unwrap(),
        [b_out]
    );
    node.finish().unwrap();
    here.finish().unwrap();
}

/// `b`, whose builder reads `a`'s output, as a Nix file in `dir`.
fn chain_expression(dir: &std::path::Path, salt: &str) -> std::path::PathBuf {
    let expr = dir.join("chain.nix");
    std::fs::write(
        &expr,
        format!(
            r#"let
              a = builtins.derivation {{ name = "nsh-serve-a"; system = "x86_64-linux"; builder = "/bin/sh";
                    salt = "{salt}"; args = [ "-c" "echo a > $out" ]; }};
            in builtins.derivation {{ name = "nsh-serve-b"; system = "x86_64-linux"; builder = "/bin/sh";
                 args = [ "-c" "read x < ${{a}}; echo $x-b > $out" ]; }}"#
        ),
    )
    .unwrap();
    expr
}
