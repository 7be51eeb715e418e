//! `tests/bench/dag.sh` on a small DAG (2 × 2 small derivations, the three
//! large ones at 1 MiB, the top): the benchmark harness itself, and through
//! it `nix-build` with nsh-hook and the real nsh tools on the test cluster's
//! nodes — on the local store, again with every output deleted locally, and
//! through the local nix-daemon — next to Nix's own ssh builder.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::collections::BTreeMap;
use std::process::Command;

use nsh_cluster_tests::{nsh_tool, Cluster};

/// The rows of the report's Markdown table whose header starts with `header`:
/// mode → cells.
fn table(report: &str, header: &str) -> BTreeMap<String, Vec<String>> {
    let mut rows = BTreeMap::new();
    let mut lines = report.lines().skip_while(|l| !l.starts_with(header));
    assert!(lines.next().is_some(), "no table {header:?} in:\n{report}");
    for line in lines.skip(1).take_while(|l| l.starts_with('|')) {
        let cells: Vec<String> = line
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect();
        rows.insert(cells[0].clone(), cells[1..].to_vec());
    }
    rows
}

#[test]
fn the_dag_benchmark_builds_through_every_mode_and_its_figures_agree() {
    let cluster = Cluster::get();
    let tools = nsh_tool("nsh-hook")
        .parent()
        .expect("target dir")
        .to_path_buf();
    let bench_dir = tempfile::tempdir().unwrap();
    let modes = ["local", "ssh", "nsh", "nsh-rebuild", "nsh-daemon"];
    let out = Command::new(Cluster::repo_root().join("tests/bench/dag.sh"))
        .args(modes)
        .env("NSH_CLUSTER_DIR", &cluster.dir)
        .env("DAG_WIDTH", "2")
        .env("DAG_DEPTH", "2")
        .env("BIG_MB", "1")
        // The reuse modes wait for their jobs to leave after linger.
        .env("LINGER", "5")
        .env("NSH_BIN", &tools)
        .env("BENCH_DIR", bench_dir.path())
        .output()
        .expect("dag.sh runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dag.sh failed:\n{stderr}");
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        report,
        std::fs::read_to_string(bench_dir.path().join("report.md")).unwrap()
    );

    // Every mode built all 8 derivations; the remote ones on the nodes.
    let wall = table(&report, "| mode | result | wall (s) | builds |");
    for mode in modes {
        let row = &wall[mode];
        assert_eq!(row[0], "ok", "{mode}: {report}");
        assert_eq!(row[2], "8", "{mode}: {report}");
        let machines = &row[7];
        match mode {
            "local" => assert_eq!(machines, "local"),
            "ssh" => assert!(machines.contains("ssh://"), "{machines}"),
            _ => assert_eq!(machines, "slurm://test"),
        }
    }

    // What appeared in the node stores is what the tickets say nsh moved;
    // every output came back.
    let moved = table(&report, "| mode | pushed (paths / MiB) |");
    for mode in ["nsh", "nsh-rebuild", "nsh-daemon"] {
        let row = &moved[mode];
        assert_eq!(row[0], row[3], "{mode}: pushed per node stores vs tickets");
        assert_eq!(row[2], row[4], "{mode}: fetched per local store vs tickets");
        assert!(row[2].starts_with("8 / "), "{mode}: {row:?}");
    }
    // The nodes keep what the first build put there: the rebuild pushes
    // only what a build placed on the other node than before lacks (with
    // the pool, a new job goes where Slurm puts it), never the DAG again.
    let paths_and_mib = |cell: &str| -> (u32, f64) {
        let (paths, mib) = cell.split_once(" / ").unwrap();
        (paths.parse().unwrap(), mib.parse().unwrap())
    };
    let (pushed, pushed_mib) = paths_and_mib(&moved["nsh-rebuild"][0]);
    let (fetched, fetched_mib) = paths_and_mib(&moved["nsh-rebuild"][2]);
    assert!(
        pushed < fetched && pushed_mib < fetched_mib,
        "the rebuild pushed the DAG again: {report}"
    );

    // The per-stage split comes from one final ticket per build.
    let split = table(&report, "| mode | builds | total |");
    for mode in ["nsh", "nsh-rebuild", "nsh-daemon"] {
        assert_eq!(split[mode][0], "8", "{mode}: {report}");
    }
    let tickets = std::fs::read_to_string(bench_dir.path().join("nsh/tickets.jsonl")).unwrap();
    assert_eq!(tickets.lines().count(), 8);
    for line in tickets.lines() {
        let t: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(t["hook"]["exit"], 0, "{line}");
        assert_eq!(t["hook"]["stages"].as_object().unwrap().len(), 5, "{line}");
        assert!(t["alloc"]["job"].as_u64().unwrap() > 0, "{line}");
    }

    // With the pool, a few jobs served the builds and left by themselves
    // after linger.
    let slurm = table(&report, "| mode | builds | Slurm jobs |");
    for mode in ["nsh", "nsh-rebuild", "nsh-daemon"] {
        let row = &slurm[mode];
        let jobs: u32 = row[1].parse().unwrap();
        assert!(
            (1..8).contains(&jobs),
            "{mode}: {jobs} jobs for 8 builds: {report}"
        );
        assert!(row[5].starts_with("0 "), "{mode}: jobs left: {report}");
    }

    // Peak memory was recorded for the hook and every tool.
    let rss = table(&report, "| mode | nsh-hook |");
    for cell in &rss["nsh"][..7] {
        assert!(cell.ends_with("(8)"), "{cell}: {report}");
    }
}
