//! nsh-run against real jobs from nsh-alloc on the test cluster: builds that
//! succeed, fail, print a lot, fall silent, run out of time, and jobs that
//! die under them (scancel, a node's slurmd killed).
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use nsh_cluster_tests::{
    closure_ticket, instantiate, nsh_tool, pipe_ticket, run_ok, slurm_cmd, unique_salt, Cluster,
    NixVersion,
};
use serde_json::{json, Value};

/// The node-failure test takes a node out of service: the other tests of
/// this file wait for it, and it for them.
static NODES: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    NODES
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A derivation whose builder is `/bin/sh -c <script>`: no inputs, so
/// nothing needs pushing (`/bin/sh` is on every node outside its store).
/// The builder has no PATH: commands are named by absolute path.
fn sh_drv(c: &Cluster, name: &str, outputs: &[&str], script: &str) -> String {
    let outputs: Vec<String> = outputs.iter().map(|o| format!("{o:?}")).collect();
    instantiate(
        c,
        &format!(
            r#"builtins.derivation {{
                 name = "{name}";
                 system = "x86_64-linux";
                 builder = "/bin/sh";
                 outputs = [ {} ];
                 salt = "{}";
                 args = [ "-c" {script:?} ];
               }}"#,
            outputs.join(" "),
            unique_salt()
        ),
    )
}

/// A running Slurm job from nsh-alloc, cancelled when the test ends
/// whatever happened.
struct Job {
    id: u64,
    node: String,
    work: String,
}

impl Drop for Job {
    fn drop(&mut self) {
        let c = Cluster::get().one_job_per_build();
        let _ = slurm_cmd(&c, "scancel", &[&self.id.to_string()]);
    }
}

/// nsh-alloc for a ticket: the ticket with `alloc`, and the job.
fn allocate(c: &Cluster, ticket: &Value) -> (Value, Job) {
    let (status, ticket, stderr) = pipe_ticket(c, "nsh-alloc", &[], ticket);
    assert_eq!(status, 0, "nsh-alloc: {stderr}");
    let alloc = &ticket["alloc"];
    let job = Job {
        id: alloc["job"].as_u64().expect("alloc.job"),
        node: alloc["node"].as_str().expect("alloc.node").to_string(),
        work: alloc["work"].as_str().expect("alloc.work").to_string(),
    };
    (ticket, job)
}

/// nsh-run started in the background, its stderr read line by line.
struct Running {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

fn start_run(c: &Cluster, ticket: &Value) -> Running {
    start_run_with(c, ticket, &[])
}

fn start_run_with(c: &Cluster, ticket: &Value, envs: &[(&str, &std::path::Path)]) -> Running {
    let mut child = c
        .command(nsh_tool("nsh-run"))
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nsh-run starts");
    writeln!(child.stdin.take().unwrap(), "{ticket}").unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    Running {
        child,
        lines,
        seen: Vec::new(),
    }
}

impl Running {
    fn wait_for_line(&mut self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.seen.iter().any(|l| l.contains(text)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(e) => panic!(
                    "no line with {text:?} within {within:?} ({e}); stderr so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits (at most `within`) for nsh-run to end: (status, ticket, stderr).
    fn finish(mut self, within: Duration) -> (i32, Value, String) {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "nsh-run did not end within {within:?}; stderr:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stdout = String::new();
        std::io::Read::read_to_string(&mut self.child.stdout.take().unwrap(), &mut stdout).unwrap();
        self.seen.extend(self.lines.iter());
        let ticket = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("nsh-run wrote no ticket ({e}): {stdout:?}"));
        (status.code().unwrap_or(-1), ticket, self.seen.join("\n"))
    }
}

/// The job's state as squeue shows it (`""` once Slurm forgot it).
fn job_state(c: &Cluster, job: u64) -> String {
    let out = slurm_cmd(c, "squeue", &["-h", "-j", &job.to_string(), "-o", "%T"]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits until the job has ended and its work dir is gone from its node.
fn assert_job_ends_clean(c: &Cluster, job: &Job, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let state = job_state(c, job.id);
        let ended = !matches!(state.as_str(), "RUNNING" | "PENDING" | "COMPLETING");
        if ended {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job {} still {state} after {within:?}",
            job.id
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = c.ssh(
        &job.node,
        &format!("test -e {} && echo there || echo gone", job.work),
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "gone",
        "the work dir {} on {} was left behind",
        job.work,
        job.node
    );
}

#[test]
fn a_multi_output_build() {
    let _shared = shared();
    let c = Cluster::get().one_job_per_build();
    let drv = sh_drv(
        &c,
        "nsh-run-multi",
        &["out", "dev"],
        "read host </proc/sys/kernel/hostname; echo \"hello from $host\"; \
         echo a >$out; echo b >$dev",
    );
    let (ticket, job) = allocate(&c, &closure_ticket(&c, &drv, Value::Null));
    let (status, ticket, stderr) = pipe_ticket(&c, "nsh-run", &[], &ticket);
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l == format!("hello from {}", job.node)),
        "the build log reaches stderr: {stderr}"
    );
    let run = &ticket["run"];
    assert_eq!(run["status"], "built", "{ticket}");
    // Nix 2.34.8 and later (NixOS/nix 5b0278c, "Fix #15916") answer
    // BuildDerivation with an aggregated result whose timesBuilt is 0.
    let times_built = i32::from(!NixVersion::of(&c).at_least(2, 34, 8));
    assert_eq!(run["times_built"], times_built, "{ticket}");
    assert!(run["stop"].as_u64().unwrap() >= run["start"].as_u64().unwrap());
    assert!(ticket.get("error").is_none());
    // Both outputs, at the paths the derivation names, exist on the node.
    let outputs = &ticket["drv"]["outputs"];
    assert_eq!(run["built_outputs"], *outputs);
    for (name, path) in outputs.as_object().unwrap() {
        let path = path.as_str().unwrap();
        let out = c.ssh(&job.node, &format!("cat {path}"));
        let want = if name == "out" { "a\n" } else { "b\n" };
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{name} on node");
    }
    // The job waits for nsh-fetch: still running, its work dir there.
    assert_eq!(job_state(&c, job.id), "RUNNING");
}

#[test]
fn a_failing_build_reports_nix_error_and_its_log_and_leaves_the_node_clean() {
    let _shared = shared();
    let c = Cluster::get().one_job_per_build();
    let drv = sh_drv(
        &c,
        "nsh-run-fails",
        &["out"],
        "echo 'about to fail' >&2; echo 'last words'; exit 3",
    );
    let (ticket, job) = allocate(&c, &closure_ticket(&c, &drv, Value::Null));
    let (status, ticket, stderr) = pipe_ticket(&c, "nsh-run", &[], &ticket);
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("\nabout to fail\n"), "{stderr}");
    assert!(stderr.contains("\nlast words\n"), "{stderr}");
    let error = &ticket["error"];
    assert_eq!(error["stage"], "run");
    assert_eq!(error["kind"], "permanent");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("exit code 3"), "Nix's own text: {message}");
    assert!(message.contains(&drv), "{message}");
    assert_eq!(ticket["run"]["status"], "permanent-failure");
    assert!(ticket["run"]["built_outputs"]
        .as_object()
        .unwrap()
        .is_empty());
    // The log's last line tells an admin where to look.
    let last_log_line = stderr
        .lines()
        .rfind(|l| l.starts_with("nsh-run: build of"))
        .expect("a closing line");
    assert!(
        last_log_line.contains(&job.node)
            && last_log_line.contains(&format!("Slurm job {}", job.id)),
        "{last_log_line}"
    );
    // Nothing will be fetched: the job is released, cleans up and ends.
    assert_job_ends_clean(&c, &job, Duration::from_secs(10));
}

#[test]
fn a_hundred_thousand_lines_arrive_in_order_on_the_log_fd() {
    let _shared = shared();
    let c = Cluster::get().one_job_per_build();
    let drv = sh_drv(
        &c,
        "nsh-run-chatty",
        &["out"],
        "i=0; while [ $i -lt 100000 ]; do echo \"line $i\"; i=$((i + 1)); done; \
         printf 'no newline at the end'; echo done >$out",
    );
    let (ticket, job) = allocate(&c, &closure_ticket(&c, &drv, Value::Null));
    let log = tempfile_path("chatty.log");
    let started = Instant::now();
    // The log goes to fd 3, as nsh-hook passes Nix's fd 4.
    let mut child = c
        .command("sh")
        .args([
            "-c",
            "exec 3>\"$1\"; exec \"$2\" --log-fd 3",
            "sh",
            log.to_str().unwrap(),
            nsh_tool("nsh-run").to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{ticket}").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let ticket: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ticket["run"]["status"], "built");

    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        100_001,
        "every line, and the unterminated last one"
    );
    for (i, line) in lines[..100_000].iter().enumerate() {
        assert_eq!(*line, format!("line {i}"));
    }
    assert_eq!(lines[100_000], "no newline at the end");
    assert!(!stderr.contains("line 0"), "the log went to fd 3 only");
    drop(job);
}

fn tempfile_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("nsh-run-test-{}-{name}", unique_salt()))
}

#[test]
fn a_silent_build_is_stopped_by_max_silent_time() {
    let _shared = shared();
    let c = Cluster::get().one_job_per_build();
    let drv = sh_drv(
        &c,
        "nsh-run-silent",
        &["out"],
        "echo 'going quiet'; exec /bin/sleep 120",
    );
    let (ticket, job) = allocate(&c, &closure_ticket(&c, &drv, json!({"max_silent_time": 3})));
    let started = Instant::now();
    let (status, ticket, stderr) = pipe_ticket(&c, "nsh-run", &[], &ticket);
    assert_eq!(status, 101, "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "{stderr}");
    assert!(stderr.contains("going quiet"), "{stderr}");
    assert_eq!(ticket["error"]["kind"], "timed-out");
    assert_eq!(ticket["run"]["status"], "timed-out");
    // Up to 2.33 Nix says "… timed out after 3 seconds of silence"; from
    // 2.34 both timeouts say "timed out after N seconds", and the 3 is
    // max-silent-time's (the build timeout is unset).
    let said = if NixVersion::of(&c).at_least(2, 34, 0) {
        "timed out after 3 seconds"
    } else {
        "after 3 seconds of silence"
    };
    assert!(
        ticket["error"]["message"].as_str().unwrap().contains(said),
        "{ticket}"
    );
    assert_job_ends_clean(&c, &job, Duration::from_secs(10));
}

#[test]
fn a_build_timeout_is_enforced_and_the_job_time_limit_covers_it() {
    let _shared = shared();
    let c = Cluster::get().one_job_per_build();
    let drv = sh_drv(
        &c,
        "nsh-run-slow",
        &["out"],
        "while :; do echo tick; /bin/sleep 1; done",
    );
    let (ticket, job) = allocate(&c, &closure_ticket(&c, &drv, json!({"timeout": 4})));
    // 4 s rounds up to a minute, plus nsh-alloc's 10-minute margin.
    let limit = slurm_cmd(&c, "squeue", &["-h", "-j", &job.id.to_string(), "-o", "%l"]);
    assert_eq!(String::from_utf8_lossy(&limit.stdout).trim(), "11:00");
    let started = Instant::now();
    let (status, ticket, stderr) = pipe_ticket(&c, "nsh-run", &[], &ticket);
    assert_eq!(status, 101, "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30), "{stderr}");
    assert!(stderr.matches("tick").count() >= 2, "{stderr}");
    assert_eq!(ticket["run"]["status"], "timed-out");
    assert_job_ends_clean(&c, &job, Duration::from_secs(10));
}

#[test]
fn a_job_cancelled_mid_build_is_transient() {
    let _shared = shared();
    let c = Cluster::get().one_job_per_build();
    let drv = sh_drv(
        &c,
        "nsh-run-cancelled",
        &["out"],
        "echo started; /bin/sleep 120; echo x >$out",
    );
    let (ticket, job) = allocate(&c, &closure_ticket(&c, &drv, Value::Null));
    let mut run = start_run(&c, &ticket);
    run.wait_for_line("started", Duration::from_secs(20));
    run_ok(c.command("scancel").arg(job.id.to_string()));
    let cancelled = Instant::now();
    let (status, ticket, stderr) = run.finish(Duration::from_secs(20));
    assert_eq!(status, 75, "{stderr}");
    assert!(cancelled.elapsed() < Duration::from_secs(10), "{stderr}");
    assert_eq!(ticket["error"]["kind"], "transient", "{ticket}");
    assert!(ticket.get("run").is_none(), "{ticket}");
    let message = ticket["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("job {}", job.id)), "{message}");
}

/// Puts a node back into service when the test ends, whatever happened.
struct RestoreNode(String);

impl Drop for RestoreNode {
    fn drop(&mut self) {
        let script = Cluster::repo_root().join("tests/cluster/cluster");
        let out = std::process::Command::new(&script)
            .args(["restart-node", &self.0])
            .output()
            .expect("cluster restart-node runs");
        if !std::thread::panicking() {
            assert!(
                out.status.success(),
                "restart-node {}: {}",
                self.0,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn a_node_whose_slurmd_dies_mid_build_is_transient_and_nothing_is_built() {
    let _alone = NODES
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let c = Cluster::get().one_job_per_build();
    let drv = sh_drv(
        &c,
        "nsh-run-node-fails",
        &["out"],
        // Chatty: the job is watched also while the log streams.
        "echo started; while :; do echo tick; /bin/sleep 0.1; done",
    );
    let (ticket, job) = allocate(&c, &closure_ticket(&c, &drv, Value::Null));
    let node = job.node.clone();
    let mut run = start_run(&c, &ticket);
    run.wait_for_line("started", Duration::from_secs(20));

    let _restore = RestoreNode(node.clone());
    fail_node(&c, &node, job.id);
    let failed = Instant::now();
    let (status, ticket, stderr) = run.finish(Duration::from_secs(40));
    assert_eq!(status, 75, "{stderr}");
    assert!(
        failed.elapsed() < Duration::from_secs(15),
        "noticed within a few job checks: {stderr}"
    );
    assert_eq!(ticket["error"]["kind"], "transient", "{ticket}");
    assert!(
        ticket.get("run").is_none(),
        "nothing reported built: {ticket}"
    );
    let message = ticket["error"]["message"].as_str().unwrap();
    // Slurm 22.05's REST API ignores `requeue: false`: the job may be
    // requeued (then nsh-run cancels it) rather than end in NODE_FAIL.
    assert!(
        message.contains("NODE_FAIL") || message.contains("requeued"),
        "{message}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = job_state(&c, job.id);
        if !matches!(state.as_str(), "PENDING" | "RUNNING") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job {} is still {state}: a requeued job must not wait for a request",
            job.id
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Drains `node` (only `job` stays on it), kills its slurmd and declares it
/// down, as the controller would after SlurmdTimeout (minutes).
fn fail_node(c: &Cluster, node: &str, job: u64) {
    // Other jobs (other people's tests) must not land on the node we are
    // about to fail, and those on it get a moment to end.
    run_ok(c.command("scontrol").args([
        "update",
        &format!("nodename={node}"),
        "state=drain",
        "reason=nsh-run test: failing this node",
    ]));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = slurm_cmd(c, "squeue", &["-h", "-w", node, "-o", "%i"]);
        let jobs = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if jobs == job.to_string() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    // The node's slurmd dies; the controller declares the node down (as it
    // would after SlurmdTimeout, which is minutes).
    let pid = std::fs::read_to_string(c.dir.join(format!("pids/slurmd-{node}.pid"))).unwrap();
    run_ok(std::process::Command::new("kill").args(["-KILL", pid.trim()]));
    // Gone, not just signalled (restart-node must not find it alive).
    let stat = format!("/proc/{}/stat", pid.trim());
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z ")) {
        assert!(
            Instant::now() < deadline,
            "slurmd {} did not die",
            pid.trim()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    run_ok(c.command("scontrol").args([
        "update",
        &format!("nodename={node}"),
        "state=down",
        "reason=nsh-run test: slurmd killed",
    ]));
}

#[test]
fn losing_ssh_mid_build_reconnects_and_loses_no_line() {
    let _shared = shared();
    let c = Cluster::get().one_job_per_build();
    let drv = sh_drv(
        &c,
        "nsh-run-ssh-lost",
        &["out"],
        "i=0; while [ $i -lt 40 ]; do echo \"tick $i\"; /bin/sleep 0.1; i=$((i + 1)); done; \
         echo x >$out",
    );
    let (ticket, job) = allocate(&c, &closure_ticket(&c, &drv, Value::Null));
    // A runtime directory of its own: the node's master that goes away is
    // this test's alone.
    let runtime = tempfile::tempdir().unwrap();
    let ssh = ticket["alloc"]["ssh"].as_str().unwrap().to_string();
    let control = runtime.path().join(format!("ssh/test-{ssh}"));
    let mut run = start_run_with(&c, &ticket, &[("NSH_RUNTIME_DIR", runtime.path())]);
    run.wait_for_line("tick 5", Duration::from_secs(20));
    assert!(control.exists(), "no master at {}", control.display());
    // The shared connection goes away under the follower.
    run_ok(
        std::process::Command::new("ssh")
            .args(["-F", &c.ssh_config(), "-o"])
            .arg(format!("ControlPath={}", control.display()))
            .args(["-O", "exit", &ssh]),
    );
    let (status, ticket, stderr) = run.finish(Duration::from_secs(60));
    assert_eq!(status, 0, "{stderr}");
    assert!(stderr.contains("reconnecting"), "{stderr}");
    assert_eq!(ticket["run"]["status"], "built");
    let ticks: Vec<&str> = stderr.lines().filter(|l| l.starts_with("tick ")).collect();
    let expected: Vec<String> = (0..40).map(|i| format!("tick {i}")).collect();
    assert_eq!(ticks, expected, "every line once, in order");
    drop(job);
}

#[test]
fn sigterm_stops_nsh_run_at_once_as_transient() {
    let _shared = shared();
    let c = Cluster::get().one_job_per_build();
    let drv = sh_drv(
        &c,
        "nsh-run-interrupted",
        &["out"],
        "echo started; /bin/sleep 60; echo x >$out",
    );
    let (ticket, job) = allocate(&c, &closure_ticket(&c, &drv, Value::Null));
    let mut run = start_run(&c, &ticket);
    run.wait_for_line("started", Duration::from_secs(20));
    run_ok(std::process::Command::new("kill").args(["-TERM", &run.child.id().to_string()]));
    let (status, ticket, stderr) = run.finish(Duration::from_secs(2));
    assert_eq!(status, 75, "{stderr}");
    assert_eq!(ticket["error"]["kind"], "transient");
    assert!(
        ticket["error"]["message"]
            .as_str()
            .unwrap()
            .contains("interrupted"),
        "{ticket}"
    );
    drop(job);
}

#[test]
fn max_log_size_stops_a_build_that_says_too_much() {
    let _shared = shared();
    let c = Cluster::get().one_job_per_build();
    let drv = sh_drv(
        &c,
        "nsh-run-verbose",
        &["out"],
        "while :; do echo 'far too much to say'; done",
    );
    let (ticket, job) = allocate(&c, &closure_ticket(&c, &drv, json!({"max_log_size": 4096})));
    let (status, ticket, stderr) = pipe_ticket(&c, "nsh-run", &[], &ticket);
    assert_eq!(status, 1, "{stderr}");
    assert_eq!(ticket["run"]["status"], "log-limit-exceeded", "{ticket}");
    assert!(stderr.matches("far too much to say").count() < 1000);
    assert_job_ends_clean(&c, &job, Duration::from_secs(10));
}

#[test]
fn keep_failed_keeps_the_build_directory_on_the_node() {
    let _shared = shared();
    let c = Cluster::get().one_job_per_build();
    let marker = format!("evidence-{}", unique_salt());
    let drv = sh_drv(
        &c,
        "nsh-run-keep-failed",
        &["out"],
        &format!("echo {marker} >evidence; echo \"kept in $PWD\"; exit 1"),
    );
    let (ticket, job) = allocate(&c, &closure_ticket(&c, &drv, json!({"keep_failed": true})));
    let (status, ticket, stderr) = pipe_ticket(&c, "nsh-run", &[], &ticket);
    assert_eq!(status, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("kept on {} (keep-failed)", job.node)),
        "{stderr}"
    );
    let build_dir = stderr
        .lines()
        .find_map(|l| l.strip_prefix("kept in "))
        .expect("the builder printed its directory")
        .to_string();
    let out = c.ssh(
        &job.node,
        &format!("cat {build_dir}/evidence && rm -rf {build_dir}"),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), marker);
    // nsh's own work dir goes all the same: the log is already with the user.
    assert_job_ends_clean(&c, &job, Duration::from_secs(10));
    drop(ticket);
}
