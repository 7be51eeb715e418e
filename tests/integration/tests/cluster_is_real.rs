//! The test cluster is the real thing: Slurm schedules through slurmrestd with a
//! JWT, jobs land on the node their features ask for, every node has its own
//! Nix store, and Nix's own ssh:// remote builder builds on a node.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::time::{Duration, Instant};

use nsh_cluster_tests::{run_ok, unique_salt, Cluster};

fn rest_get(c: &Cluster, path: &str) -> serde_json::Value {
    let mut resp = ureq::get(&format!("{}{path}", c.rest_url()))
        .header("X-SLURM-USER-NAME", &c.user())
        .header("X-SLURM-USER-TOKEN", &c.token())
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    resp.body_mut().read_json().expect("JSON")
}

#[test]
fn a_rest_job_lands_on_the_node_its_feature_asks_for_and_sees_that_nodes_store() {
    let c = Cluster::get();
    // A path that exists in the login node's store only.
    let marker = std::env::temp_dir().join(format!("nsh-marker-{}", unique_salt()));
    std::fs::write(&marker, unique_salt()).unwrap();
    let login_path = run_ok(c.command("nix-store").arg("--add").arg(&marker))
        .trim()
        .to_string();
    std::fs::remove_file(&marker).unwrap();
    assert!(std::path::Path::new(&login_path).exists());

    let out_file = format!("/tmp/nsh/cluster-test-{}.out", unique_salt());
    let script = format!(
        "#!/bin/sh\n\
         cat /proc/sys/kernel/hostname\n\
         if [ -e '{login_path}' ]; then echo login-store-visible; else echo own-store; fi\n\
         test -d /nix/store && echo has-store\n"
    );
    // The newest API version the server serves, written by hand (not by
    // nsh's codec): v0.0.38 takes the environment as an object, later
    // versions as a list of KEY=VALUE.
    let api = c
        .rest_versions()
        .pop()
        .expect("slurmrestd serves a version");
    let environment = if api == "v0.0.38" {
        serde_json::json!({"PATH": "/usr/bin:/bin"})
    } else {
        serde_json::json!(["PATH=/usr/bin:/bin"])
    };
    let body = serde_json::json!({
        "script": script,
        "job": {
            "name": "nsh-cluster-test",
            "constraints": "big",
            "current_working_directory": "/tmp",
            "environment": environment,
            "standard_output": out_file,
        }
    });
    let mut resp = ureq::post(&format!("{}/slurm/{api}/job/submit", c.rest_url()))
        .config()
        .http_status_as_error(false)
        .build()
        .header("X-SLURM-USER-NAME", &c.user())
        .header("X-SLURM-USER-TOKEN", &c.token())
        .header("Content-Type", "application/json")
        // A sized body: slurmrestd 22.05 answers a chunked one with 400.
        .send(body.to_string().as_bytes())
        .expect("submit");
    let submitted: serde_json::Value = resp.body_mut().read_json().unwrap();
    assert_eq!(submitted["errors"], serde_json::json!([]), "{submitted}");
    let job_id = submitted["job_id"].as_u64().expect("job_id");

    let job = wait_until_completed(&c, &api, job_id);
    let big = c.node_with_feature("big");
    assert_eq!(job["batch_host"], big.as_str(), "{job}");

    // The job's output is on the node's own /tmp/nsh, reachable over ssh.
    let out = c.ssh(&big, &format!("cat {out_file} && rm {out_file}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec![big.as_str(), "own-store", "has-store"],
        "{text}"
    );
}

#[test]
fn nix_own_ssh_remote_builder_builds_on_a_node() {
    let c = Cluster::get();
    let salt = unique_salt();
    let expr = format!(
        r#"builtins.derivation {{
             name = "nsh-cluster-test-{salt}";
             system = builtins.currentSystem;
             builder = "/bin/sh";
             args = [ "-c" "read h < /proc/sys/kernel/hostname; echo $h > $out" ];
           }}"#
    );
    let out_path = run_ok(
        c.command("nix-build")
            .args([
                "--no-out-link",
                "--max-jobs",
                "0",
                "--builders",
                "ssh://node1",
            ])
            .args(["-E", &expr]),
    )
    .trim()
    .to_string();
    assert_eq!(std::fs::read_to_string(&out_path).unwrap().trim(), "node1");
    // It was built in node1's own store, and is valid there.
    let out = c.ssh("node1", &format!("nix-store --check-validity {out_path}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.ssh("node2", &format!("test -e {out_path}"));
    assert!(!out.status.success(), "node2 must not see node1's store");
}

/// The job's REST record once it completed; a failed test if it ended
/// otherwise or took over a minute.
fn wait_until_completed(c: &Cluster, api: &str, job_id: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = rest_get(c, &format!("/slurm/{api}/job/{job_id}"));
        let job = info["jobs"][0].clone();
        // A word up to v0.0.38, a list of words (state and flags) after.
        let state = match &job["job_state"] {
            serde_json::Value::Array(words) => words[0].as_str().unwrap_or("").to_string(),
            word => word.as_str().unwrap_or("").to_string(),
        };
        if state == "COMPLETED" {
            return job;
        }
        assert!(
            matches!(
                state.as_str(),
                "PENDING" | "CONFIGURING" | "RUNNING" | "COMPLETING"
            ),
            "job {job_id} ended as {state}: {job}"
        );
        assert!(
            Instant::now() < deadline,
            "job {job_id} still {state} after 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
