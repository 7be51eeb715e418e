//! The example of a snapshot test of a pipeline (docs/snapshots.md): a
//! derivation built with the tools by hand on the cluster,
//! `nsh-closure | nsh-alloc | nsh-push | nsh-run | nsh-fetch | nsh-redact
//! --pretty`, and the redacted ticket compared with the snapshot kept in
//! `snapshots/`. Every run builds a new derivation (a new salt, so other
//! store hashes, another Slurm job, maybe another node, other times), on
//! every stack (other Slurm releases and slurmrestd API versions), and the
//! snapshot stays the same.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nsh_cluster_tests::{instantiate, nsh_tool, run_ok, Cluster};

/// A salt of always the same length, so that the input's and the output's
/// sizes (`closure.nar_size`, `push.bytes`, `fetch.bytes`) stay the same.
fn fixed_width_salt() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:020}-{:010}", std::process::id())
}

#[test]
fn a_pipeline_run_by_hand_redacts_to_the_same_snapshot_every_time() {
    // One job per build: a pooled job would leave out the submit's times.
    let c = Cluster::get().one_job_per_build();
    let salt = fixed_width_salt();
    let drv = instantiate(
        &c,
        &format!(
            r#"builtins.derivation {{
                 name = "nsh-snapshot";
                 system = builtins.currentSystem;
                 input = builtins.toFile "nsh-snapshot-input" "{salt}";
                 builder = "/bin/sh";
                 args = [ "-c" "read -r line < $input; echo \"built from $line\" > $out" ];
               }}"#
        ),
    );
    let tool = |name: &str| nsh_tool(name).display().to_string();
    let out = c
        .command("bash")
        .args([
            "-o",
            "pipefail",
            "-c",
            r#""$1" "$7" | "$2" | "$3" | "$4" | "$5" | "$6" --pretty"#,
            "bash",
        ])
        .args(
            [
                "nsh-closure",
                "nsh-alloc",
                "nsh-push",
                "nsh-run",
                "nsh-fetch",
                "nsh-redact",
            ]
            .map(tool),
        )
        .arg(&drv)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let tickets = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "the pipeline failed ({}):\n{tickets}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    insta::assert_snapshot!(tickets);

    // nsh-fetch released the job: it ends by itself.
    let deadline = Instant::now() + Duration::from_secs(15);
    while run_ok(c.command("squeue").args(["-h", "-o", "%j"])).contains("nsh-snapshot") {
        assert!(Instant::now() < deadline, "the job was left behind");
        std::thread::sleep(Duration::from_millis(200));
    }
}
