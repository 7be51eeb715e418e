//! How long nsh-hook's decision takes: the daemon blocks a worker while it
//! waits for the reply to a `try`, so this must stay well under a millisecond.
//!
//!     cargo run --release -p nsh-core --example hook_decision
//!
//! Prints a Markdown table (median and 99th percentile per operation) for
//! `docs/benchmarks.md`.
// A measurement, not a tool: any failure ends it with a panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use nsh_core::build_hook::HookConfig;
use nsh_core::build_hook::SlotDir;
use nsh_core::build_hook::{decide, ClusterCaps, LocalCaps};
use nsh_core::build_hook::{decide_and_lock, Locked};
use nsh_core::build_hook::{Reply, Request, Settings, Try};

fn clusters(n: usize, max_jobs: u32) -> Vec<ClusterCaps> {
    (0..n)
        .map(|i| ClusterCaps {
            name: format!("c{i}"),
            systems: vec!["x86_64-linux".into(), "i686-linux".into()],
            supported_features: vec!["big-parallel".into(), "kvm".into(), "benchmark".into()],
            mandatory_features: if i % 2 == 1 {
                vec!["gpu".into()]
            } else {
                vec![]
            },
            max_jobs,
        })
        .collect()
}

fn the_try() -> Try {
    Try {
        am_willing: true,
        needed_system: "x86_64-linux".into(),
        drv_path: "/nix/store/1cj0fhkr5qn18x1zz61vdjrb58cfnzp5-hello-2.12.1.drv"
            .parse()
            .unwrap(),
        required_features: vec!["big-parallel".into()],
    }
}

/// (median, p99) of `f` over `runs` runs.
fn measure(runs: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    for _ in 0..runs / 10 {
        f();
    }
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    (times[runs / 2], times[runs * 99 / 100])
}

fn row(what: &str, (median, p99): (Duration, Duration)) {
    println!(
        "| {what} | {:.1} µs | {:.1} µs |",
        median.as_nanos() as f64 / 1000.0,
        p99.as_nanos() as f64 / 1000.0
    );
}

fn main() {
    let local = LocalCaps {
        systems: vec!["x86_64-linux".into()],
        features: vec!["big-parallel".into()],
    };
    let t = the_try();
    println!("| operation | median | p99 |");
    println!("|---|---|---|");
    decisions(&local, &t);
    slots(&local, &t);
    parsing();
}

/// `decide` alone, and with the protocol around it.
fn decisions(local: &LocalCaps, t: &Try) {
    let local = local.clone();
    let t = t.clone();
    for n in [1, 4, 16] {
        let cs = clusters(n, 64);
        row(
            &format!("decide, {n} cluster(s), loads given"),
            measure(100_000, || {
                black_box(decide(black_box(&cs), &local, black_box(&t), |i| {
                    u32::try_from(i).unwrap_or(u32::MAX)
                }));
            }),
        );
    }

    let try_bytes = t.to_bytes();
    let cs = clusters(4, 64);
    row(
        "parse a try + decide (4 clusters) + encode the reply",
        measure(100_000, || {
            let Ok(Request::Try(t)) = Request::read(&mut &try_bytes[..]) else {
                unreachable!()
            };
            let d = decide(&cs, &local, &t, |i| u32::try_from(i).unwrap_or(u32::MAX));
            black_box((d, Reply::Postpone.to_bytes()));
        }),
    );
}

/// Counting and taking slot locks, and the decision with its slot.
fn slots(local: &LocalCaps, t: &Try) {
    let dir = tempfile::tempdir().unwrap();
    let slots = SlotDir::new(dir.path());
    for max_jobs in [1, 8, 64] {
        let held: Vec<_> = (0..max_jobs / 2)
            .map(|_| slots.acquire_from("main", max_jobs, 0).unwrap().unwrap())
            .collect();
        row(
            &format!("count slot locks, max_jobs {max_jobs}, half held"),
            measure(5_000, || {
                black_box(slots.load("main", max_jobs).unwrap());
            }),
        );
        row(
            &format!("take + free a slot, max_jobs {max_jobs}, half held"),
            measure(5_000, || {
                black_box(slots.acquire("main", max_jobs).unwrap());
            }),
        );
        drop(held);
    }

    // What nsh-hook does per `try`: decide, count slots where it matters, take one.
    for (fitting, max_jobs) in [(1, 64), (2, 8), (2, 64)] {
        let cs: Vec<ClusterCaps> = clusters(2 * fitting, max_jobs);
        let held: Vec<_> = cs
            .iter()
            .filter(|c| c.mandatory_features.is_empty())
            .flat_map(|c| {
                (0..max_jobs / 2)
                    .map(|_| slots.acquire_from(&c.name, max_jobs, 0).unwrap().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        row(
            &format!(
                "nsh-hook's decision with its slot: {fitting} fitting cluster(s), max_jobs {max_jobs}, half held"
            ),
            measure(5_000, || {
                let locked = decide_and_lock(&cs, local, t, &slots).unwrap();
                assert!(matches!(locked, Locked::Accepted(..)));
                black_box(locked);
            }),
        );
        drop(held);
    }
}

/// What a hook parses once: the settings dump and the configuration.
fn parsing() {
    let fixture: &[u8] = include_bytes!("../tests/fixtures/hook/nix-2.8-accept.bin");
    row(
        "parse Nix 2.8's settings dump (91 settings), once per hook",
        measure(10_000, || {
            black_box(Settings::read(&mut &fixture[..]).unwrap());
        }),
    );
    let config = r#"
[cluster.main]
backend = "rest"
url = "http://slurm-head:6820"
user = "nixbuild"
token_file = "/etc/nsh/slurm.jwt"
partition = "build"
systems = ["x86_64-linux"]
supported_features = ["big-parallel", "kvm", "gpu"]
max_jobs = 64
time_limit = "4h"
[cluster.main.features]
kvm = { constraint = "kvm" }
gpu = { gres = "gpu:1", partition = "gpu" }
[ssh]
user = "nixbuild"
identity = "/etc/nsh/id_ed25519"
[remote]
work_root = "/tmp/nsh"
[hook]
slots_dir = "/run/nsh/slots"
"#;
    row(
        "parse and validate nsh.toml, once per hook",
        measure(10_000, || {
            black_box(HookConfig::parse(Path::new("nsh.toml"), config).unwrap());
        }),
    );
}
