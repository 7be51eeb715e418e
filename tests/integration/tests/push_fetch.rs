//! `nsh-push` and `nsh-fetch` against the cluster's real nodes: real paths
//! built in the local store, copied into node1's own store over ssh and back,
//! with the daemon's output locks held, with corrupt data, and with the
//! connection killed in the middle of a copy. On every stack's Nix: the
//! `held-locks` import runs only where `NIX_HELD_LOCKS` exists (≤ 2.28).
//!
//! The tools run as processes (`target/<profile>/nsh-push`, built here with
//! `cargo build -p nsh-push -p nsh-fetch …`). No Slurm job is
//! needed: the tickets' `alloc` sections are made by hand.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nsh_cluster_tests::{
    build_input_here, instantiate, run_ok, unique_salt, wait_bounded, Cluster, NixVersion,
};
use serde_json::{json, Value};

const NODE: &str = "node1";
/// The pipeline, in order.
const TOOLS: [&str; 5] = [
    "nsh-closure",
    "nsh-alloc",
    "nsh-push",
    "nsh-run",
    "nsh-fetch",
];

fn tool(name: &str) -> PathBuf {
    nsh_cluster_tests::nsh_tool(name)
}

/// The paths of `nix-build`'s result, closed under references, in
/// dependency order (nix-store -qR lists dependencies first).
fn closure_of(c: &Cluster, path: &str) -> Vec<String> {
    run_ok(c.command("nix-store").args(["-qR", path]))
        .lines()
        .map(String::from)
        .collect()
}

/// Two paths, `b` referring to `a`; `b` holds `size` random bytes.
fn two_paths_expr(salt: &str, size: u64) -> String {
    format!(
        r#"let a = builtins.derivation {{
             name = "nsh-pf-a-{salt}"; system = builtins.currentSystem;
             builder = "/bin/sh"; PATH = "/usr/bin:/bin";
             args = [ "-c" "echo {salt} > $out" ];
           }};
           in builtins.derivation {{
             name = "nsh-pf-b-{salt}"; system = builtins.currentSystem;
             builder = "/bin/sh"; PATH = "/usr/bin:/bin";
             args = [ "-c" "mkdir $out; echo ${{a}} > $out/ref; head -c {size} /dev/urandom > $out/data" ];
           }}"#
    )
}

/// Builds locally; returns the closure of `b` in dependency order.
fn build_locally(c: &Cluster, salt: &str, size: u64) -> Vec<String> {
    let out =
        run_ok(
            c.command("nix-build")
                .args(["--no-out-link", "-E", &two_paths_expr(salt, size)]),
        );
    closure_of(c, out.trim())
}

/// `b` built on the node (valid only there), as a fetch finds it: its
/// derivation is here (nsh-fetch imports only the outputs of a derivation in
/// the local store) and so is `a`, its input, which the pipeline would have
/// pushed (every reference must be valid here).
struct NodeBuild {
    drv: String,
    out: String,
}

fn build_on_node(c: &Cluster, salt: &str, size: u64) -> NodeBuild {
    let expr = two_paths_expr(salt, size);
    let (drv, out) = c.instantiate_here_build_on(NODE, &expr);
    for input in run_ok(c.command("nix-store").args(["-q", "--references", &drv])).lines() {
        if input.ends_with(".drv") {
            run_ok(c.command("nix-store").args(["-r", input]));
        }
    }
    let here = run_ok(c.command("nix-store").args(["-q", "--outputs", &drv]));
    assert_eq!(here.trim(), out, "the node built another path than {drv}'s");
    NodeBuild { drv, out }
}

fn job_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    u64::from(std::process::id()) * 100 + n + 900_000_000
}

fn ticket(closure: &[String], built: Option<&NodeBuild>, job: u64) -> Value {
    let mut t = json!({
        "v": 1,
        "store": {"dir": "/nix/store", "uri": "local"},
        "closure": {"paths": closure, "nar_size": 0},
        "alloc": {"cluster": "test", "backend": "rest", "job": job, "node": NODE,
                  "ssh": NODE, "work": format!("/tmp/nsh/nsh-{job}")},
    });
    if let Some(NodeBuild { drv, out }) = built {
        let name = out.split_once('-').map_or("", |(_, name)| name);
        t["drv"] = json!({"path": drv, "name": name, "system": "x86_64-linux",
                          "outputs": {"out": out}, "wanted": ["out"]});
    }
    t
}

fn spawn_tool(c: &Cluster, name: &str, args: &[&str], ticket: &Value) -> Child {
    let mut child = c
        .command(tool(name))
        .args(args)
        .env("NSH_LOG", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{ticket}").unwrap();
    child
}

/// Runs a tool on one ticket; returns (exit code, ticket out, stderr).
fn run_tool(c: &Cluster, name: &str, args: &[&str], ticket: &Value) -> (i32, Value, String) {
    let out = wait_bounded(spawn_tool(c, name, args, ticket), Duration::from_secs(120));
    parse(&out)
}

fn parse(out: &Output) -> (i32, Value, String) {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let ticket = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("not a ticket ({e}): {line:?}; stderr:\n{stderr}"));
    (out.status.code().unwrap_or(-1), ticket, stderr)
}

fn node_valid(c: &Cluster, paths: &[String]) -> bool {
    c.ssh(
        NODE,
        &format!("nix-store --check-validity {}", paths.join(" ")),
    )
    .status
    .success()
}

fn node_verified(c: &Cluster, paths: &[String]) -> bool {
    let out = c.ssh(
        NODE,
        &format!("nix-store --verify-path {}", paths.join(" ")),
    );
    out.status.success()
}

fn local_valid(c: &Cluster, paths: &[String]) -> bool {
    c.command("nix-store")
        .arg("--check-validity")
        .args(paths)
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Held by the test that copies 256 MiB paths and by the one that times a
/// re-push: on two cores the copy's hashing and ssh would be measured too.
static HEAVY_COPY: Mutex<()> = Mutex::new(());

fn no_heavy_copy_meanwhile() -> MutexGuard<'static, ()> {
    // A test that failed holding it leaves it poisoned; the others still run.
    HEAVY_COPY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn push_copies_what_is_missing_and_a_repush_moves_nothing() {
    let _quiet = no_heavy_copy_meanwhile();
    let c = Cluster::get();
    let closure = build_locally(&c, &unique_salt(), 2_000_000);
    assert_eq!(closure.len(), 2);
    assert!(!node_valid(&c, &closure));

    let t = ticket(&closure, None, job_id());
    let (code, out, stderr) = run_tool(&c, "nsh-push", &[], &t);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(out["push"]["copied"], 2, "{out}");
    assert_eq!(out["push"]["present"], 0);
    assert!(out["push"]["bytes"].as_u64().unwrap() > 2_000_000);
    assert!(
        out["alloc"]["control"].is_string(),
        "the master is recorded"
    );
    assert!(node_valid(&c, &closure) && node_verified(&c, &closure));

    // Again, over the master the first push left: nothing moves, fast.
    let started = Instant::now();
    let (code, again, stderr) = run_tool(&c, "nsh-push", &[], &out);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(again["push"]["copied"], 0);
    assert_eq!(again["push"]["present"], 2);
    assert_eq!(again["push"]["bytes"], 0);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// nsh-push reads the local store's files itself: the NAR it makes of a
/// tree with directories, an executable, an empty file and symlinks is the
/// one whose hash the local store recorded, and the node holds the same.
#[test]
fn a_pushed_tree_is_the_nar_the_local_store_recorded() {
    let c = Cluster::get();
    let salt = unique_salt();
    let expr = format!(
        r#"builtins.derivation {{
             name = "nsh-pf-tree-{salt}"; system = builtins.currentSystem;
             builder = "/bin/sh"; PATH = "/usr/bin:/bin";
             args = [ "-c" "mkdir -p $out/bin $out/share/z; printf '#!/bin/sh\\n' > $out/bin/run;
                            chmod 555 $out/bin/run; : > $out/empty; head -c 300000 /dev/urandom > $out/B;
                            echo a > $out/a; ln -s bin/run $out/link; ln -s /nowhere $out/share/z/dangling" ];
           }}"#
    );
    let out = run_ok(c.command("nix-build").args(["--no-out-link", "-E", &expr]));
    let closure = vec![out.trim().to_string()];
    let (code, pushed, stderr) = run_tool(&c, "nsh-push", &[], &ticket(&closure, None, job_id()));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(pushed["push"]["copied"], 1, "{pushed}");
    // The node took the NAR only if it matched the hash the local store
    // recorded for it; its files hash the same again.
    assert!(node_verified(&c, &closure));
    let node_dump = c.ssh(
        NODE,
        &format!("nix-store --dump {} | sha256sum", closure[0]),
    );
    let local_dump = run_ok(c.command("sh").args([
        "-c",
        &format!("nix-store --dump {} | sha256sum", closure[0]),
    ]));
    assert_eq!(String::from_utf8_lossy(&node_dump.stdout), local_dump);
}

#[test]
fn every_push_method_copies_the_closure() {
    let c = Cluster::get();
    for method in ["auto", "add-to-store-nar", "import", "import-export"] {
        let closure = build_locally(&c, &unique_salt(), 100_000);
        let t = ticket(&closure, None, job_id());
        let (code, out, stderr) = run_tool(&c, "nsh-push", &["--method", method], &t);
        assert_eq!(code, 0, "{method}: {stderr}");
        assert_eq!(out["push"]["copied"], 2, "{method}");
        assert!(out["push"]["bytes"].as_u64().unwrap() > 100_000);
        assert!(node_valid(&c, &closure) && node_verified(&c, &closure));
    }
}

#[test]
fn a_path_missing_locally_is_bad_input_naming_it() {
    let c = Cluster::get();
    let mut closure = build_locally(&c, &unique_salt(), 10);
    let absent = format!("/nix/store/{}-nsh-absent", "0".repeat(32));
    closure.push(absent.clone());
    let t = ticket(&closure, None, job_id());
    let (code, out, _) = run_tool(&c, "nsh-push", &[], &t);
    assert_eq!(code, 65, "{out}");
    let message = out["error"]["message"].as_str().unwrap();
    assert!(message.contains(&absent), "{message}");
    assert_eq!(out["error"]["stage"], "push");
}

#[test]
fn an_unreachable_node_is_transient_after_a_retry() {
    let c = Cluster::get();
    let closure = build_locally(&c, &unique_salt(), 10);
    let mut t = ticket(&closure, None, job_id());
    t["alloc"]["ssh"] = json!("nixbuild@10.231.0.99");
    let started = Instant::now();
    let mut cmd = c.command(tool("nsh-push"));
    // Fail fast: the unreachable address would otherwise take ssh's
    // ConnectTimeout twice.
    let config = std::fs::read_to_string(c.nsh_config()).unwrap();
    let dir = tempfile_dir();
    let file = dir.join("nsh.toml");
    std::fs::write(
        &file,
        config.replace("[ssh]\n", "[ssh]\noptions = [\"ConnectTimeout=1\"]\n"),
    )
    .unwrap();
    cmd.args(["--config", file.to_str().unwrap()]);
    let out = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(|mut child| {
            use std::io::Write;
            writeln!(child.stdin.take().unwrap(), "{t}").unwrap();
            wait_bounded(child, Duration::from_secs(60))
        })
        .unwrap();
    let (code, out, stderr) = parse(&out);
    assert_eq!(code, 75, "{out}");
    assert!(stderr.contains("trying again"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nsh-pf-{}", unique_salt()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn two_pushes_of_the_same_paths_copy_them_once() {
    let c = Cluster::get();
    let closure = build_locally(&c, &unique_salt(), 20_000_000);
    let first = spawn_tool(&c, "nsh-push", &[], &ticket(&closure, None, job_id()));
    let second = spawn_tool(&c, "nsh-push", &[], &ticket(&closure, None, job_id()));
    let (c1, t1, e1) = parse(&wait_bounded(first, Duration::from_secs(120)));
    let (c2, t2, e2) = parse(&wait_bounded(second, Duration::from_secs(120)));
    assert_eq!((c1, c2), (0, 0), "{e1}\n{e2}");
    let copied = t1["push"]["copied"].as_u64().unwrap() + t2["push"]["copied"].as_u64().unwrap();
    assert_eq!(copied, 2, "{t1}\n{t2}");
    assert!(node_valid(&c, &closure));
}

/// The pids of `parent`'s ssh children that carry a serve conversation (not
/// the short-lived `ssh -O check` or the master being started).
fn serve_connections(parent: u32) -> Vec<u32> {
    children_named(parent, "ssh")
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("--serve"))
        })
        .collect()
}

/// The pids of `parent`'s children whose command is `name`.
fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        let comm = comm.split_once(" (").map_or("", |(_, c)| c);
        let ppid: u32 = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == parent && comm == name {
            pids.push(pid);
        }
    }
    pids
}

fn kill9(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// The store directory entries on the node whose names contain `part`.
fn node_entries(c: &Cluster, part: &str) -> Vec<String> {
    let out = c.ssh(NODE, "ls -a /nix/store");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(part))
        .map(String::from)
        .collect()
}

#[test]
fn a_connection_killed_mid_copy_leaves_no_invalid_path_and_a_repush_completes() {
    let _heavy = no_heavy_copy_meanwhile();
    let c = Cluster::get();
    let salt = unique_salt();
    let closure = build_locally(&c, &salt, 256 << 20);
    let big = closure.last().unwrap().clone();

    // Kill the ssh that carries the stream once, early: the retry completes.
    let t = ticket(&closure, None, job_id());
    let child = spawn_tool(&c, "nsh-push", &[], &t);
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    let victim = loop {
        if let Some(&p) = serve_connections(pid).first() {
            break p;
        }
        assert!(Instant::now() < deadline, "nsh-push never started ssh");
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_millis(300));
    kill9(victim);
    let (code, _, stderr) = parse(&wait_bounded(child, Duration::from_secs(120)));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("trying again"),
        "the copy was not cut:\n{stderr}"
    );
    assert!(node_valid(&c, &closure) && node_verified(&c, &closure));

    // Kill every connection it makes: it gives up with 75, and the path it
    // was sending is not valid on the node. With ImportPaths (the node holds
    // the NAR in memory) nothing of it is there at all; AddToStoreNar (the
    // default) streams it to its place, so an unregistered partial
    // directory may be left, which the next import of that path replaces.
    for (n, method) in ["import", "auto"].into_iter().enumerate() {
        let closure = build_locally(&c, &format!("{salt}-{}", n + 2), 256 << 20);
        let top = closure.last().unwrap().clone();
        assert_ne!(big, top);
        let out = push_with_every_connection_killed(&c, &closure, method);
        assert!(!node_valid(&c, std::slice::from_ref(&top)), "{method}");
        if method == "import" {
            let name = top.rsplit('/').next().unwrap();
            assert_eq!(
                node_entries(&c, name),
                Vec::<String>::new(),
                "a partial path was left on the node"
            );
        }

        // And a push now completes.
        let (code, _, stderr) = run_tool(&c, "nsh-push", &[], &out_without_error(out));
        assert_eq!(code, 0, "{method}: {stderr}");
        assert!(node_valid(&c, &closure) && node_verified(&c, &closure));
    }
}

/// Runs nsh-push with `method`, killing every serve connection it opens a
/// moment after it opens it; returns the ticket once nsh-push gave up (75).
fn push_with_every_connection_killed(c: &Cluster, closure: &[String], method: &str) -> Value {
    let t = ticket(closure, None, job_id());
    let mut child = spawn_tool(c, "nsh-push", &["--method", method], &t);
    let pid = child.id();
    let mut killed = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "nsh-push does not give up");
        for p in serve_connections(pid) {
            // Let it start sending, so the cut is mid-stream.
            std::thread::sleep(Duration::from_millis(300));
            kill9(p);
            killed += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (code, out, stderr) = parse(&child.wait_with_output().unwrap());
    assert!(killed >= 2, "{method}: {stderr}");
    assert_eq!(code, 75, "{method}: {stderr}");
    assert_eq!(out["error"]["kind"], "transient");
    out
}

fn out_without_error(mut ticket: Value) -> Value {
    ticket.as_object_mut().unwrap().remove("error");
    ticket
}

/// Holds `<path>.lock` the way the Nix daemon does while a hook runs.
struct HeldLock(Child);

impl HeldLock {
    fn take(path: &str) -> HeldLock {
        let lock = format!("{path}.lock");
        // --no-fork: flock becomes the sleep, so killing it releases the
        // lock (a forked sleep would keep it, and the test's stdout, for
        // five minutes).
        let held = HeldLock(
            Command::new("flock")
                .args(["--no-fork", &lock, "sleep", "300"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        // Wait until the lock is really held.
        loop {
            let free = Command::new("flock")
                .args(["-n", &lock, "true"])
                .status()
                .unwrap()
                .success();
            if !free {
                return held;
            }
            assert!(Instant::now() < deadline, "could not take {lock}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn still_held(&self, path: &str) -> bool {
        !Command::new("flock")
            .args(["-n", &format!("{path}.lock"), "true"])
            .status()
            .unwrap()
            .success()
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fetch_with_a_held_lock(method: &str) {
    let c = Cluster::get();
    let salt = unique_salt();
    let built = build_on_node(&c, &salt, 1_000_000);
    let out_path = built.out.clone();
    let job = job_id();
    let work = format!("/tmp/nsh/nsh-{job}");
    assert!(c.ssh(NODE, &format!("mkdir -p {work}")).status.success());
    assert!(!local_valid(&c, std::slice::from_ref(&out_path)));

    let lock = HeldLock::take(&out_path);
    let t = ticket(&[], Some(&built), job);
    let (code, out, stderr) = run_tool(&c, "nsh-fetch", &["--import-method", method], &t);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        lock.still_held(&out_path),
        "the test's lock was not held throughout"
    );
    drop(lock);
    assert!(stderr.contains(method), "{stderr}");

    // The output is valid and intact here, with `a`, which it refers to
    // and which was here already (only the output was fetched).
    let closure = closure_of(&c, &out_path);
    assert_eq!(closure.len(), 2);
    assert_eq!(out["fetch"]["paths"], json!([out_path]), "{out}");
    assert!(out["fetch"]["bytes"].as_u64().unwrap() > 1_000_000);
    run_ok(c.command("nix-store").arg("--verify-path").args(&closure));
    let data = std::fs::read(format!("{out_path}/data")).unwrap();
    assert_eq!(data.len(), 1_000_000);

    // The job was released (it is in no pool).
    assert!(c
        .ssh(NODE, &format!("test -e {work}/release"))
        .status
        .success());
    // The node's ssh master stays for the next build on that node.
    let control = out["alloc"]["control"].as_str().unwrap();
    assert!(Path::new(control).exists(), "the node's ssh master is gone");
    let _ = c.ssh(NODE, &format!("rm -rf {work}"));

    // Fetching again finds everything present.
    let (code, again, stderr) = run_tool(&c, "nsh-fetch", &["--keep-job"], &t);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(again["fetch"]["paths"], json!([]));
}

#[test]
fn fetch_with_held_locks_does_not_deadlock() {
    let c = Cluster::get();
    if NixVersion::of(&c).lacks("NIX_HELD_LOCKS", (2, 29)) {
        return;
    }
    fetch_with_a_held_lock("held-locks");
}

/// The import methods this stack's Nix has: `held-locks` needs
/// `NIX_HELD_LOCKS`, which Nix 2.29 removed (the skip is printed).
fn import_methods(c: &Cluster) -> Vec<&'static str> {
    if NixVersion::of(c).lacks("NIX_HELD_LOCKS (import method held-locks)", (2, 29)) {
        vec!["load-db"]
    } else {
        vec!["held-locks", "load-db"]
    }
}

#[test]
fn fetch_with_load_db_does_not_deadlock() {
    fetch_with_a_held_lock("load-db");
}

/// The node's copy of `b` is corrupted after it was built (same size,
/// other bytes): DumpStorePath sends it as it is, nsh-fetch's hash check
/// refuses it; nothing of it may appear locally, whichever import method.
#[test]
fn a_corrupt_path_on_the_node_leaves_nothing_behind() {
    let c = Cluster::get();
    for method in import_methods(&c) {
        let salt = unique_salt();
        let built = build_on_node(&c, &salt, 300_000);
        let out_path = built.out.clone();
        let corrupt = c.ssh(
            NODE,
            &format!(
                "chmod u+w {out_path} {out_path}/data && \
                 printf XXXXXXXX | dd of={out_path}/data bs=1 seek=1000 conv=notrunc 2>/dev/null && \
                 chmod a-w {out_path}/data {out_path}"
            ),
        );
        assert!(corrupt.status.success());
        let t = ticket(&[], Some(&built), job_id());
        let (code, out, stderr) = run_tool(&c, "nsh-fetch", &["--import-method", method], &t);
        assert_eq!(code, 1, "{method}: {stderr}");
        let message = out["error"]["message"].as_str().unwrap();
        assert!(message.contains("hash mismatch"), "{method}: {message}");
        assert!(out["error"].is_object());
        assert!(
            !local_valid(&c, std::slice::from_ref(&out_path)),
            "{method}"
        );
        assert_eq!(
            leftovers_of(&out_path),
            Vec::<String>::new(),
            "{method}: {stderr}"
        );
    }
}

/// `nsh-closure DRV | nsh-alloc | nsh-push | nsh-run | nsh-fetch` with a real
/// Slurm job: the input built here is pushed, the build runs on a node, the
/// output comes back valid, and the job ends once nsh-fetch released it.
#[test]
fn the_whole_pipeline_builds_on_a_node_and_the_job_ends() {
    // One job per build: this is about the job's own end (pool.rs has the
    // pooled pipeline).
    let c = Cluster::get().one_job_per_build();
    let salt = unique_salt();
    let expr = format!(
        r#"let a = builtins.derivation {{
             name = "nsh-pf-in-{salt}"; system = builtins.currentSystem;
             builder = "/bin/sh"; PATH = "/usr/bin:/bin";
             args = [ "-c" "head -c 100000 /dev/urandom > $out" ];
           }};
           in builtins.derivation {{
             name = "nsh-pf-out-{salt}"; system = builtins.currentSystem;
             builder = "/bin/sh"; PATH = "/usr/bin:/bin";
             args = [ "-c" "mkdir $out; cp ${{a}} $out/copy; cat /proc/sys/kernel/hostname > $out/host" ];
           }}"#
    );
    let drv = instantiate(&c, &expr);
    // Build the input here (only the input: the output is the cluster's job).
    let input = build_input_here(&c, &drv);

    let script = TOOLS
        .iter()
        .map(|t| tool(t).display().to_string())
        .collect::<Vec<_>>()
        .join(" | ");
    // nsh-closure takes the .drv as its argument.
    let first = tool("nsh-closure").display().to_string();
    let mut cmd = c.command("sh");
    cmd.args(["-c", &script.replacen(&first, &format!("{first} {drv}"), 1)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = wait_bounded(cmd.spawn().unwrap(), Duration::from_secs(180));
    let (code, ticket, stderr) = parse(&out);
    assert_eq!(code, 0, "{ticket}\n{stderr}");
    assert_eq!(ticket["push"]["copied"], 1, "{ticket}");
    assert_eq!(ticket["run"]["status"], "built");
    let output = ticket["drv"]["outputs"]["out"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(ticket["fetch"]["paths"], json!([output]));
    run_ok(c.command("nix-store").args(["--verify-path", &output]));
    let node = ticket["alloc"]["node"].as_str().unwrap();
    let host = std::fs::read_to_string(format!("{output}/host")).unwrap();
    assert_eq!(host.trim(), node);
    assert_eq!(
        std::fs::read(format!("{output}/copy")).unwrap(),
        std::fs::read(&input).unwrap()
    );

    // Released: the job ends at once rather than after its idle timeout.
    let job = ticket["alloc"]["job"].as_u64().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state = run_ok(c.command("squeue").args(["-h", "-j", &job, "-o", "%T"]));
        if state.trim().is_empty() || state.contains("COMPLET") {
            break;
        }
        assert!(Instant::now() < deadline, "job {job} still {state}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What is in the local store under `out_path`'s name (or a fetch's
/// temporary name), lock files aside: nothing, after a refused fetch.
fn leftovers_of(out_path: &str) -> Vec<String> {
    let name = out_path.rsplit('/').next().unwrap();
    std::fs::read_dir("/nix/store")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(name) && !n.ends_with(".lock") || n.starts_with(".nsh-fetch-"))
        .collect()
}

/// A configuration whose node-side `nix-store` sends its answers through
/// `python3 FILTER.py ARG` (in `dir`): a node that tampers with what it
/// sends. `filter` reads stdin and writes stdout.
fn config_with_node_filter(c: &Cluster, dir: &Path, filter: &str, arg: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("filter.py");
    std::fs::write(&script, filter).unwrap();
    let wrapper = dir.join("nix-store");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n/usr/bin/nix-store \"$@\" | python3 {} {arg}\n",
            script.display()
        ),
    )
    .unwrap();
    for (path, mode) in [(dir, 0o755), (&script, 0o644), (&wrapper, 0o755)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let config = std::fs::read_to_string(c.nsh_config()).unwrap();
    let config = config.replace(
        "nix_bin_dir = \"\"",
        &format!("nix_bin_dir = \"{}\"", dir.display()),
    );
    assert!(config.contains(&dir.display().to_string()), "{config}");
    let config_file = dir.join("nsh.toml");
    std::fs::write(&config_file, config).unwrap();
    config_file
}

/// Fetches `built` from the node with `config` and each import method,
/// expecting a permanent refusal whose message has `words` and the path,
/// within `limit`, with nothing of it left here.
fn fetch_is_refused(c: &Cluster, config: &Path, built: &dyn Fn() -> NodeBuild, words: &str) {
    for method in import_methods(c) {
        let built = built();
        let t = ticket(&[], Some(&built), job_id());
        let config = config.to_str().unwrap();
        let child = spawn_tool(
            c,
            "nsh-fetch",
            &["--config", config, "--import-method", method],
            &t,
        );
        let (code, out, stderr) = parse(&wait_bounded(child, Duration::from_secs(120)));
        assert_eq!(code, 1, "{method}: {out}\n{stderr}");
        let message = out["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{method}: {message}");
        assert!(message.contains(&built.out), "{method}: {message}");
        assert!(
            !local_valid(c, std::slice::from_ref(&built.out)),
            "{method}"
        );
        assert_eq!(leftovers_of(&built.out), Vec::<String>::new(), "{method}");
    }
}

/// A filter that flips one byte at the offset given: a NAR corrupted on
/// the way.
const FLIP_ONE_BYTE: &str = "import os, sys\n\
     at = int(sys.argv[1]); seen = 0\n\
     while True:\n\
     \x20   chunk = os.read(0, 65536)\n\
     \x20   if not chunk: break\n\
     \x20   if seen <= at < seen + len(chunk):\n\
     \x20       i = at - seen; chunk = chunk[:i] + bytes([chunk[i] ^ 0xff]) + chunk[i + 1:]\n\
     \x20   seen += len(chunk)\n\
     \x20   sys.stdout.buffer.write(chunk); sys.stdout.buffer.flush()\n";

/// A filter that passes the first bytes on, then sends `y` for ever: a
/// node that claims one size and streams without end.
const ENDLESS_AFTER: &str = "import os, sys\n\
     left = int(sys.argv[1])\n\
     while left > 0:\n\
     \x20   chunk = os.read(0, min(65536, left))\n\
     \x20   if not chunk: break\n\
     \x20   sys.stdout.buffer.write(chunk); sys.stdout.buffer.flush(); left -= len(chunk)\n\
     junk = b'y' * 65536\n\
     try:\n\
     \x20   while True: sys.stdout.buffer.write(junk)\n\
     except BrokenPipeError:\n\
     \x20   pass\n";

/// The output's NAR is corrupted between the node's nix-store and nsh-fetch
/// (one byte flipped 200 kB in): the hash check refuses it and nothing of
/// it appears here, whichever import method.
#[test]
fn a_nar_corrupted_in_transit_is_refused_by_hash_and_leaves_nothing() {
    tampered_fetch_is_refused(FLIP_ONE_BYTE, "NAR hash mismatch");
}

/// A hostile node streams without end once 200 kB of the answers are out:
/// nsh-fetch reads no further than the size the node declared and refuses
/// the path (by its hash, or as a malformed NAR when the junk lands in its
/// structure), in bounded time and memory.
#[test]
fn an_endless_stream_from_the_node_is_cut_at_the_declared_size() {
    tampered_fetch_is_refused(ENDLESS_AFTER, "NAR");
}

/// A 1 MB output built on the node and fetched through `filter` (given
/// 200000, where it starts to tamper) is refused with `words`.
fn tampered_fetch_is_refused(filter: &str, words: &str) {
    let c = Cluster::get();
    let dir = tempfile_dir();
    let config = config_with_node_filter(&c, &dir, filter, "200000");
    fetch_is_refused(
        &c,
        &config,
        &|| build_on_node(&c, &unique_salt(), 1_000_000),
        words,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Someone with a build on the node plants a store path there (valid only
/// on the node) and makes an output refer to it: nsh-fetch refuses the
/// output, naming the planted path, and registers nothing.
#[test]
fn a_path_planted_on_the_node_never_reaches_the_local_store() {
    let c = Cluster::get();
    let salt = unique_salt();
    let planted = c.ssh(
        NODE,
        &format!("f=$(mktemp -d)/openssl-{salt} && printf evil > $f && nix-store --add $f"),
    );
    assert!(
        planted.status.success(),
        "{}",
        String::from_utf8_lossy(&planted.stderr)
    );
    let planted = String::from_utf8(planted.stdout)
        .unwrap()
        .trim()
        .to_string();
    assert!(!local_valid(&c, std::slice::from_ref(&planted)));
    // The output names the planted path; Nix on the node does not count it
    // as a reference (it is no input), the rewritten database below does.
    let expr = format!(
        r#"builtins.derivation {{
             name = "nsh-plant-{salt}"; system = builtins.currentSystem;
             builder = "/bin/sh"; PATH = "/usr/bin:/bin";
             args = [ "-c" "echo {planted} > $out" ];
           }}"#
    );
    let (drv, out) = c.instantiate_here_build_on(NODE, &expr);
    // The node's store belongs to the build account, so whoever builds
    // there can rewrite its database: add the planted path to the output's
    // references, as a hostile node would report them.
    let rewrite = format!(
        "nix-store --dump-db {out} | {{ read p; read h; read s; read d; read n; refs=$(cat); \
         printf '%s\\n' \"$p\" \"$h\" \"$s\" \"$d\" $((n+1)) {planted}; \
         [ -z \"$refs\" ] || printf '%s\\n' \"$refs\"; }} | nix-store --load-db && \
         nix-store -q --references {out}"
    );
    let refs = c.ssh(NODE, &rewrite);
    assert!(
        String::from_utf8_lossy(&refs.stdout).contains(&planted),
        "the node did not take the reference: {}",
        String::from_utf8_lossy(&refs.stderr)
    );
    let built = NodeBuild { drv, out };
    fetch_is_refused(
        &c,
        Path::new(&c.nsh_config()),
        &|| NodeBuild {
            drv: built.drv.clone(),
            out: built.out.clone(),
        },
        &planted,
    );
    assert!(!local_valid(&c, std::slice::from_ref(&planted)));
}
