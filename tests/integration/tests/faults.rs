//! The fault matrix of `docs/reliability.md`, through the hook: a build
//! started as the daemon starts `nsh-hook` (the protocol on stdin, the log on
//! fd 4, the real nsh-* tools), a fault injected on the test cluster while it
//! runs, and then what Nix would see (the hook's exit status, its outputs
//! valid in the local store) and what is left in Slurm (nothing).
//!
//! The tests of this file take the whole cluster (a node failed, slurmrestd
//! stopped): they run one at a time, and no other test binary runs beside
//! them (cargo runs test binaries one after the other).
// The test sets up a child's fd 4: libc, which needs unsafe.
#![allow(unsafe_code)]
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]
// Process ids fit an i32 (pid_max is at most 2^22).
#![allow(clippy::cast_possible_wrap)]

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nsh_cluster_tests::{instantiate, nsh_tool, run_ok, slurm_cmd, unique_salt, Cluster};
use nsh_core::build_hook::{Accepted, Settings, Try};

/// One fault at a time.
static CLUSTER: Mutex<()> = Mutex::new(());

fn alone() -> MutexGuard<'static, ()> {
    CLUSTER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the daemon says to a hook before and after `# accept`: one `try`
/// for `drv`, which the daemon cannot build itself.
fn handshake(drv: &str) -> Vec<u8> {
    let mut settings = Settings::default();
    for (k, v) in [
        ("store", "auto"),
        ("system", "x86_64-linux"),
        ("max-silent-time", "0"),
    ] {
        settings.values.insert(k.into(), v.into());
    }
    let the_try = Try {
        am_willing: false,
        needed_system: "x86_64-linux".into(),
        drv_path: drv.parse().unwrap(),
        required_features: vec![],
    };
    [settings.to_bytes(), the_try.to_bytes()].concat()
}

/// A configuration: the cluster's, with `cluster_keys` in its table and a
/// `[hook]` of the test's own.
fn config(c: &Cluster, dir: &Path, cluster_keys: &str) -> PathBuf {
    let text = fs::read_to_string(c.nsh_config()).unwrap();
    // One job per build unless the test says otherwise.
    let linger = if cluster_keys.contains("linger") {
        ""
    } else {
        "linger = 0\n"
    };
    let text = text.replacen(
        "[cluster.test]\n",
        &format!("[cluster.test]\n{linger}{cluster_keys}\n"),
        1,
    );
    let path = dir.join("nsh.toml");
    fs::write(
        &path,
        format!(
            "{text}\n[hook]\nslots_dir = \"{}\"\n",
            dir.join("slots").display()
        ),
    )
    .unwrap();
    path
}

/// A derivation that says `started`, takes `secs`, and writes its output.
fn slow_drv(c: &Cluster, name: &str, secs: u32) -> String {
    instantiate(
        c,
        &format!(
            r#"derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";
                 PATH = "/usr/bin:/bin";
                 args = ["-c" "echo started on $(cat /proc/sys/kernel/hostname); sleep {secs}; echo done >$out"]; }}"#
        ),
    )
}

/// The hook, started as the daemon starts it.
struct Hook {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stderr: mpsc::Receiver<String>,
    said: Vec<String>,
    log: PathBuf,
    drv: String,
}

/// A build of `secs` seconds named `faults-<tag>-…`, accepted by a hook
/// whose cluster has `cluster_keys` added; returns its name (what squeue
/// shows) and the hook.
fn accepted_build(
    c: &Cluster,
    dir: &Path,
    cluster_keys: &str,
    tag: &str,
    secs: u32,
) -> (String, Hook) {
    let config = config(c, dir, cluster_keys);
    let salt = unique_salt();
    let name = format!("faults-{tag}-{}", &salt[salt.len() - 10..]);
    let drv = slow_drv(c, &name, secs);
    let mut hook = Hook::start(c, dir, &config, &drv);
    hook.accepted();
    (name, hook)
}

impl Hook {
    fn start(c: &Cluster, dir: &Path, config: &Path, drv: &str) -> Hook {
        let log = dir.join(format!("build-{}.log", unique_salt()));
        let log_file = fs::File::create(&log).unwrap();
        let log_fd = log_file.as_raw_fd();
        let mut cmd = c.command(nsh_tool("nsh-hook"));
        cmd.arg("3")
            .env("NSH_CONFIG", config)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: dup2/fcntl in the child before exec.
        unsafe {
            cmd.pre_exec(move || {
                let rc = if log_fd == 4 {
                    libc::fcntl(4, libc::F_SETFD, 0)
                } else {
                    libc::dup2(log_fd, 4)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        drop(log_file);
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&handshake(drv)).unwrap();
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Hook {
            child,
            stdin: Some(stdin),
            stderr: rx,
            said: Vec::new(),
            log,
            drv: drv.to_string(),
        }
    }

    /// The first line `pick` takes among those the hook writes within
    /// `limit`; `None` if it answered the `try` otherwise.
    fn wait_for_line<T>(&mut self, limit: Duration, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    let found = pick(&line);
                    self.said.push(line);
                    if let Some(found) = found {
                        return found;
                    }
                }
                Err(e) => panic!(
                    "the hook never said it ({e}); it said:\n{}",
                    self.said.join("\n")
                ),
            }
        }
    }

    /// Sends what follows `# accept` once the hook accepted.
    fn accepted(&mut self) {
        self.wait_for_line(Duration::from_secs(30), |l| (l == "# accept").then_some(()));
        let accepted = Accepted {
            inputs: vec![],
            wanted_outputs: vec!["out".into()],
        };
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(&accepted.to_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the build to start on a node: (node, Slurm job).
    fn building(&mut self) -> (String, u64) {
        let found = self.wait_for_line(Duration::from_secs(90), |line| {
            let (head, tail) = line.split_once(" (Slurm job ")?;
            if !line.contains("building '") {
                return None;
            }
            let node = head.rsplit(' ').next()?.to_string();
            let job = tail.split(')').next()?.parse::<u64>().ok()?;
            Some((node, job))
        });
        let log = self.log.clone();
        eventually("the builder to start", Duration::from_secs(60), || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&format!("started on {}", found.0))
        });
        found
    }

    /// Closes stdin (the daemon's end of the conversation) and waits for
    /// the hook to exit: its status and everything it said.
    fn finish(mut self, limit: Duration) -> (i32, String) {
        drop(self.stdin.take());
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.stderr.recv_timeout(Duration::from_millis(200)) {
                    self.said.push(line);
                }
                return (status.code().unwrap_or(-1), self.said.join("\n"));
            }
            while let Ok(line) = self.stderr.try_recv() {
                self.said.push(line);
            }
            assert!(
                Instant::now() < deadline,
                "the hook is still running after {limit:?}:\n{}",
                self.said.join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the hook's process group.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

fn eventually(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The jobs named `nsh-<name>` still in squeue, with their states.
fn jobs_named(c: &Cluster, name: &str) -> String {
    let out = slurm_cmd(
        c,
        "squeue",
        &["-h", "-n", &format!("nsh-{name}"), "-o", "%i %T"],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn assert_no_job_left(c: &Cluster, name: &str) {
    let mut left = String::new();
    eventually(
        &format!("jobs left in squeue: {left}"),
        Duration::from_secs(30),
        || {
            left = jobs_named(c, name);
            left.is_empty()
        },
    );
}

fn valid_locally(c: &Cluster, drv: &str) -> bool {
    let out = run_ok(c.command("nix-store").args(["-q", "--outputs", drv]));
    c.command("nix-store")
        .arg("--check-validity")
        .args(out.split_whitespace())
        .status()
        .unwrap()
        .success()
}

/// Puts a node back into service when the test ends, whatever happened.
struct RestoreNode(String);

impl Drop for RestoreNode {
    fn drop(&mut self) {
        let script = Cluster::repo_root().join("tests/cluster/cluster");
        let out = Command::new(&script)
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

/// The node's slurmd dies and the controller declares the node down (as it
/// would after SlurmdTimeout, minutes). Other jobs are kept off it first.
fn fail_node(c: &Cluster, node: &str) {
    run_ok(c.command("scontrol").args([
        "update",
        &format!("nodename={node}"),
        "state=drain",
        "reason=nsh faults test: failing this node",
    ]));
    let pid = fs::read_to_string(c.dir.join(format!("pids/slurmd-{node}.pid"))).unwrap();
    run_ok(Command::new("kill").args(["-KILL", pid.trim()]));
    let stat = format!("/proc/{}/stat", pid.trim());
    eventually("slurmd to die", Duration::from_secs(5), || {
        fs::read_to_string(&stat).map_or(true, |s| s.contains(") Z "))
    });
    run_ok(c.command("scontrol").args([
        "update",
        &format!("nodename={node}"),
        "state=down",
        "reason=nsh faults test: slurmd killed",
    ]));
}

/// A build whose node dies mid-build: the hook runs it again in a new job
/// on the other node, the build succeeds, and no job is left.
#[test]
fn a_node_that_dies_mid_build_costs_no_build() {
    let _alone = alone();
    let c = Cluster::get();
    let dir = tempfile::tempdir().unwrap();
    let (name, mut hook) = accepted_build(&c, dir.path(), "", "node-dies", 8);
    let (node, job) = hook.building();
    let _restore = RestoreNode(node.clone());
    fail_node(&c, &node);
    let (second_node, second_job) = hook.building();
    assert_ne!(second_node, node, "the retry excludes the failed node");
    assert_ne!(second_job, job);
    let drv = hook.drv.clone();
    let (status, said) = hook.finish(Duration::from_secs(120));
    assert_eq!(status, 0, "{said}");
    assert!(
        said.contains("trying again in a new job (attempt 2 of 3, not on "),
        "{said}"
    );
    assert!(valid_locally(&c, &drv), "{said}");
    assert_no_job_left(&c, &name);
}

/// An admin's `scancel` mid-build: the build is run again in a new job and
/// succeeds; no job is left.
#[test]
fn a_job_cancelled_by_an_admin_mid_build_is_retried_and_succeeds() {
    let _alone = alone();
    let c = Cluster::get();
    let dir = tempfile::tempdir().unwrap();
    let (name, mut hook) = accepted_build(&c, dir.path(), "", "scancel", 6);
    let (_, job) = hook.building();
    run_ok(c.command("scancel").arg(job.to_string()));
    let (_, second_job) = hook.building();
    assert_ne!(second_job, job);
    let drv = hook.drv.clone();
    let (status, said) = hook.finish(Duration::from_secs(120));
    assert_eq!(status, 0, "{said}");
    // nsh-run sees the job gone (CANCELLED, or already COMPLETED once its
    // script cleaned up on the SIGTERM).
    assert!(said.contains("trying again in a new job"), "{said}");
    assert!(valid_locally(&c, &drv), "{said}");
    assert_no_job_left(&c, &name);
    // The admin sees the flaky attempt: its job and node, and that the
    // build was tried again; once (nsh-run recorded it, the hook marked it).
    let failures = failures_of(&c, &drv);
    let first: Vec<&serde_json::Value> = failures.iter().filter(|f| f["job"] == job).collect();
    assert_eq!(first.len(), 1, "{failures:?}");
    let row = first[0];
    assert_eq!(row["retried"], true, "{row}");
    assert_eq!(row["attempt"], 1, "{row}");
    assert_eq!(
        row["by_hook"],
        serde_json::Value::Null,
        "a stage recorded it: {row}"
    );
    assert!(row["node"].as_str().is_some_and(|n| !n.is_empty()), "{row}");
    assert!(
        failures.iter().all(|f| f["job"] != second_job),
        "the attempt that succeeded is no failure: {failures:?}"
    );
}

/// Root's `nsh-status --json --failures`, as the hook's runtime directory
/// has them: the rows of `drv`.
fn failures_of(c: &Cluster, drv: &str) -> Vec<serde_json::Value> {
    let out = c
        .command(nsh_tool("nsh-status"))
        .args(["--json", "--failures"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|row| row["kind"] == "failure" && row["drv"] == drv)
        .collect()
}

/// A `[hook] pipeline` command that fails writes no failure of its own:
/// the hook records it, once.
#[test]
fn a_failing_pipeline_command_is_recorded_by_the_hook() {
    let _alone = alone();
    let c = Cluster::get();
    let dir = tempfile::tempdir().unwrap();
    let config = config(&c, dir.path(), "");
    let mut text = fs::read_to_string(&config).unwrap();
    text.push_str("pipeline = [\"/bin/sh\", \"-c\", \"cat >/dev/null; exit 3\"]\n");
    fs::write(&config, text).unwrap();
    let salt = unique_salt();
    let name = format!("faults-pipeline-{}", &salt[salt.len() - 10..]);
    let drv = slow_drv(&c, &name, 1);
    let mut hook = Hook::start(&c, dir.path(), &config, &drv);
    hook.accepted();
    let drv = hook.drv.clone();
    let (status, said) = hook.finish(Duration::from_secs(60));
    assert_ne!(status, 0, "{said}");
    let failures = failures_of(&c, &drv);
    assert_eq!(failures.len(), 1, "{failures:?}\n{said}");
    let row = &failures[0];
    assert_eq!(row["by_hook"], true, "{row}");
    assert_eq!(row["stage"], "sh", "{row}");
    assert!(
        row["reason"]
            .as_str()
            .unwrap()
            .contains("exited with status 3"),
        "{row}"
    );
    assert_eq!(row["retried"], serde_json::Value::Null, "{row}");
}

/// `retries = 0`: the fault is Nix's to see, at once, and nothing is left.
#[test]
fn without_retries_a_cancelled_job_fails_the_build_and_leaves_nothing() {
    let _alone = alone();
    let c = Cluster::get();
    let dir = tempfile::tempdir().unwrap();
    let (name, mut hook) = accepted_build(&c, dir.path(), "retries = 0", "no-retry", 30);
    let (_, job) = hook.building();
    run_ok(c.command("scancel").arg(job.to_string()));
    let (status, said) = hook.finish(Duration::from_secs(60));
    assert_eq!(status, 1, "{said}");
    assert!(!said.contains("trying again"), "{said}");
    assert_no_job_left(&c, &name);
}

/// `tests/cluster/cluster service ACTION DAEMON`.
fn service(action: &str, daemon: &str) {
    let script = Cluster::repo_root().join("tests/cluster/cluster");
    let out = Command::new(&script)
        .args(["service", action, daemon])
        .output()
        .expect("cluster service runs");
    assert!(
        out.status.success(),
        "service {action} {daemon}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A login-side Slurm daemon stopped (or frozen) until dropped.
struct Outage {
    daemon: &'static str,
    frozen: bool,
    over: bool,
}

impl Outage {
    fn stop(daemon: &'static str) -> Outage {
        service("stop", daemon);
        Outage {
            daemon,
            frozen: false,
            over: false,
        }
    }

    fn freeze(daemon: &'static str) -> Outage {
        service("pause", daemon);
        Outage {
            daemon,
            frozen: true,
            over: false,
        }
    }

    fn end(&mut self) {
        if !self.over {
            self.over = true;
            service(if self.frozen { "resume" } else { "start" }, self.daemon);
        }
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.end();
        } else if !self.over {
            let _ = Command::new(Cluster::repo_root().join("tests/cluster/cluster"))
                .args([
                    "service",
                    if self.frozen { "resume" } else { "start" },
                    self.daemon,
                ])
                .status();
        }
    }
}

impl Hook {
    /// The hook's answer to the latest `try`: `# accept`, `# postpone`, …
    fn reply(&mut self) -> String {
        self.wait_for_line(Duration::from_secs(30), |l| {
            (l.starts_with("# ") && !l.starts_with("# log")).then(|| l.to_string())
        })
    }

    /// The daemon asks again about the same derivation.
    fn ask_again(&mut self) {
        let the_try = Try {
            am_willing: false,
            needed_system: "x86_64-linux".into(),
            drv_path: self.drv.parse().unwrap(),
            required_features: vec![],
        };
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(&the_try.to_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Sends what follows `# accept` (the hook has said it).
    fn send_accepted(&mut self) {
        let accepted = Accepted {
            inputs: vec![],
            wanted_outputs: vec!["out".into()],
        };
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(&accepted.to_bytes()).unwrap();
        stdin.flush().unwrap();
    }
}

/// `daemon` stopped when a build arrives: the hook postpones within its
/// `connect_timeout` (2 s) instead of accepting and failing; once the
/// daemon is back, the next `try` is accepted and the build succeeds.
fn a_build_arriving_while_stopped(daemon: &'static str) {
    let _alone = alone();
    let c = Cluster::get();
    let dir = tempfile::tempdir().unwrap();
    let config = config(&c, dir.path(), "");
    let salt = unique_salt();
    let name = format!("faults-{daemon}-down-{}", &salt[salt.len() - 10..]);
    let drv = slow_drv(&c, &name, 1);
    // The cluster was checked a moment ago (its pre-flight verdict is
    // kept): only the quick check at each `try` can see the outage.
    fs::create_dir_all(dir.path().join("slots")).unwrap();
    fs::write(dir.path().join("slots/test.ok"), "").unwrap();
    let mut outage = Outage::stop(daemon);
    let asked = Instant::now();
    let mut hook = Hook::start(&c, dir.path(), &config, &drv);
    assert_eq!(hook.reply(), "# postpone", "{}", hook.said.join("\n"));
    let answered = asked.elapsed();
    assert!(
        answered < Duration::from_millis(2500),
        "postponed after {answered:?}"
    );
    outage.end();
    // Nix asks again after a while, until the hook takes it.
    let mut tries = 1;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        hook.ask_again();
        tries += 1;
        match hook.reply().as_str() {
            "# accept" => break,
            "# postpone" if tries < 60 => {}
            other => panic!("try {tries}: {other}\n{}", hook.said.join("\n")),
        }
    }
    hook.send_accepted();
    let drv = hook.drv.clone();
    let (status, said) = hook.finish(Duration::from_secs(120));
    assert_eq!(status, 0, "{said}");
    assert!(valid_locally(&c, &drv), "{said}");
    assert_no_job_left(&c, &name);
    eprintln!("{daemon} down: postponed in {answered:?}, accepted at try {tries}");
}

#[test]
fn slurmrestd_stopped_when_a_build_arrives_postpones_it_and_it_goes_through_later() {
    a_build_arriving_while_stopped("slurmrestd");
}

#[test]
fn slurmctld_stopped_when_a_build_arrives_postpones_it_and_it_goes_through_later() {
    a_build_arriving_while_stopped("slurmctld");
}

/// A partition that holds every job submitted to it (State=DOWN) until
/// opened.
struct HoldPartition<'c> {
    cluster: &'c Cluster,
    name: String,
}

impl<'c> HoldPartition<'c> {
    fn new(cluster: &'c Cluster, salt: &str) -> HoldPartition<'c> {
        let name = format!("nsh-hold-{}", &salt[salt.len() - 8..]);
        let spec = format!("PartitionName={name}");
        run_ok(
            cluster
                .command("scontrol")
                .args(["create", &spec, "Nodes=ALL", "State=DOWN"]),
        );
        HoldPartition { cluster, name }
    }

    fn open(&self) {
        let spec = format!("PartitionName={}", self.name);
        run_ok(
            self.cluster
                .command("scontrol")
                .args(["update", &spec, "State=UP"]),
        );
    }
}

impl Drop for HoldPartition<'_> {
    fn drop(&mut self) {
        let spec = format!("PartitionName={}", self.name);
        let _ = slurm_cmd(self.cluster, "scontrol", &["delete", &spec]);
    }
}

/// nsh-alloc waiting for a job held in its queue, with `cluster_keys`:
/// (the running nsh-alloc, the partition, the job name).
fn waiting_alloc<'c>(
    c: &'c Cluster,
    dir: &Path,
    cluster_keys: &str,
) -> (Child, HoldPartition<'c>, String, PathBuf) {
    let salt = unique_salt();
    let hold = HoldPartition::new(c, &salt);
    let keys = format!("partition = \"{}\"\n{cluster_keys}", hold.name);
    let text = fs::read_to_string(c.nsh_config()).unwrap();
    let text = text.replace("partition = \"build\"\n", "");
    let text = text.replacen(
        "[cluster.test]\n",
        &format!("[cluster.test]\nlinger = 0\n{keys}\n"),
        1,
    );
    let config = dir.join("nsh.toml");
    fs::write(&config, text).unwrap();
    let name = format!("faults-wait-{}", &salt[salt.len() - 10..]);
    let drv = slow_drv(c, &name, 1);
    let ticket = nsh_cluster_tests::closure_ticket(c, &drv, serde_json::Value::Null);
    let mut child = c
        .command(nsh_tool("nsh-alloc"))
        .env("NSH_CONFIG", &config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{ticket}").unwrap();
    eventually("the job to be queued", Duration::from_secs(30), || {
        jobs_named(c, &name).contains("PENDING")
    });
    (child, hold, name, config)
}

/// Waits for nsh-alloc: (status, ticket, stderr).
fn alloc_result(child: Child) -> (i32, serde_json::Value, String) {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let ticket = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no ticket ({e}): {stdout:?}\n{stderr}"));
    (out.status.code().unwrap_or(-1), ticket, stderr)
}

/// An outage of slurmrestd (stopped, or frozen: a slurmrestd that does
/// not answer) shorter than `outage_tolerance` while nsh-alloc waits for a
/// queued job: the wait goes on, and the job is had once it runs.
fn a_wait_survives(outage: fn() -> Outage) {
    let _alone = alone();
    let c = Cluster::get();
    let dir = tempfile::tempdir().unwrap();
    let (child, hold, name, config) = waiting_alloc(&c, dir.path(), "outage_tolerance = \"60s\"");
    let mut down = outage();
    std::thread::sleep(Duration::from_secs(5));
    down.end();
    hold.open();
    let (status, ticket, stderr) = alloc_result(child);
    assert_eq!(status, 0, "{stderr}");
    // Let the job go, as a failed build would.
    let cancel = c
        .command(nsh_tool("nsh-alloc"))
        .args(["--cancel"])
        .env("NSH_CONFIG", &config)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut p| {
            writeln!(p.stdin.take().unwrap(), "{ticket}")?;
            p.wait()
        })
        .unwrap();
    assert!(cancel.success());
    assert_no_job_left(&c, &name);
}

#[test]
fn slurmrestd_stopped_during_a_wait_shorter_than_the_tolerance_is_ridden_out() {
    a_wait_survives(|| Outage::stop("slurmrestd"));
}

#[test]
fn a_slurmrestd_that_hangs_during_a_wait_shorter_than_the_tolerance_is_ridden_out() {
    a_wait_survives(|| Outage::freeze("slurmrestd"));
}

/// An outage longer than `outage_tolerance`: the wait ends (75), its cancel
/// cannot reach Slurm and is owed; the next nsh-alloc that reaches the
/// cluster cancels the job. No job is left.
#[test]
fn a_wait_that_outlasts_the_tolerance_ends_and_its_cancel_is_not_lost() {
    let _alone = alone();
    let c = Cluster::get();
    let dir = tempfile::tempdir().unwrap();
    let (child, _hold, name, _) = waiting_alloc(&c, dir.path(), "outage_tolerance = 3");
    let mut down = Outage::stop("slurmrestd");
    let (status, _, stderr) = alloc_result(child);
    down.end();
    assert_eq!(status, 75, "{stderr}");
    assert!(stderr.contains("Slurm did not answer for"), "{stderr}");
    assert!(stderr.contains("the next nsh-alloc"), "{stderr}");
    assert!(
        !jobs_named(&c, &name).is_empty(),
        "the job waits for its cancel"
    );
    // The next allocation on the cluster pays what is owed.
    let drv = slow_drv(&c, &format!("{name}-next"), 1);
    let ticket = nsh_cluster_tests::closure_ticket(&c, &drv, serde_json::Value::Null);
    let (status, next, stderr) = nsh_cluster_tests::pipe_ticket(
        &Cluster::get().with_cluster_keys("linger = 0"),
        "nsh-alloc",
        &[],
        &ticket,
    );
    assert_eq!(status, 0, "{stderr}");
    assert!(
        stderr.contains("owed since Slurm did not answer"),
        "{stderr}"
    );
    assert_no_job_left(&c, &name);
    let _ = nsh_cluster_tests::pipe_ticket(
        &Cluster::get().with_cluster_keys("linger = 0"),
        "nsh-alloc",
        &["--cancel"],
        &next,
    );
}

/// A pooled job requeued after its build (as Slurm does when its node
/// fails, and an admin may): it runs again with `SLURM_RESTART_COUNT` set,
/// and ends at once instead of waiting for a request that never comes
/// (before, it waited its idle timeout); none is left.
#[test]
fn a_job_requeued_after_its_build_ends_and_is_not_left() {
    let _alone = alone();
    let c = Cluster::get();
    let dir = tempfile::tempdir().unwrap();
    let config = config(&c, dir.path(), "linger = 300");
    let salt = unique_salt();
    let name = format!("faults-requeued-{}", &salt[salt.len() - 10..]);
    let drv = slow_drv(&c, &name, 1);
    let mut hook = Hook::start(&c, dir.path(), &config, &drv);
    hook.accepted();
    let (_, job) = hook.building();
    let (status, said) = hook.finish(Duration::from_secs(60));
    assert_eq!(status, 0, "{said}");
    assert!(
        jobs_named(&c, &name).contains("RUNNING"),
        "job {job} waits in the pool"
    );
    let requeue = slurm_cmd(&c, "scontrol", &["requeue", &job.to_string()]);
    let refused = String::from_utf8_lossy(&requeue.stderr).to_string();
    if !requeue.status.success() && refused.contains("presently disabled") {
        // The job was submitted with `requeue: false`, which only Slurm
        // 22.05's REST API ignores: elsewhere no requeue can happen.
        eprintln!(
            "skipped on {}: Slurm {} honours requeue: false ({})",
            c.stack(),
            c.slurm_version(),
            refused.trim()
        );
        let drained = c
            .command(nsh_tool("nsh-alloc"))
            .arg("--pool-drain")
            .env("NSH_CONFIG", &config)
            .output()
            .unwrap();
        assert!(drained.status.success(), "{drained:?}");
        assert_no_job_left(&c, &name);
        return;
    }
    assert!(
        requeue.status.success(),
        "scontrol requeue {job}: {}",
        String::from_utf8_lossy(&requeue.stderr)
    );
    // Slurm holds a requeued job back (COMPLETING for up to a minute, then
    // PENDING with a BeginTime 2 minutes after the requeue, seen on 22.05):
    // once it is pending, let it start now, as it would later.
    eventually(
        &format!("job {job} pending again: {}", jobs_named(&c, &name)),
        Duration::from_secs(150),
        || {
            let left = jobs_named(&c, &name);
            left.is_empty() || left.contains("PENDING")
        },
    );
    let _ = slurm_cmd(
        &c,
        "scontrol",
        &["update", &format!("jobid={job}"), "StartTime=now"],
    );
    eventually(
        &format!(
            "the requeued job {job} is still there: {}",
            jobs_named(&c, &name)
        ),
        Duration::from_secs(60),
        || jobs_named(&c, &name).is_empty(),
    );
}

/// slurmctld stopped mid-build and started again 3 s later (with its saved
/// state): the build succeeds; no job is left.
#[test]
fn slurmctld_restarted_mid_build_costs_no_build() {
    let _alone = alone();
    let c = Cluster::get();
    let dir = tempfile::tempdir().unwrap();
    let (name, mut hook) = accepted_build(&c, dir.path(), "", "ctld-restart", 8);
    hook.building();
    let mut down = Outage::stop("slurmctld");
    std::thread::sleep(Duration::from_secs(3));
    down.end();
    let drv = hook.drv.clone();
    let (status, said) = hook.finish(Duration::from_secs(180));
    assert_eq!(status, 0, "{said}");
    assert!(valid_locally(&c, &drv), "{said}");
    assert_no_job_left(&c, &name);
    eprintln!(
        "slurmctld restarted mid-build: {}",
        if said.contains("trying again") {
            "retried in a new job"
        } else {
            "the build went on"
        }
    );
}

/// A small file system (4 MiB, the store's owner and mode) mounted over a
/// node's `/nix/store`, in the node's own mount namespace (entered through
/// its slurmd); unmounted when dropped, whatever happened.
struct FullStore {
    node_pid: String,
}

impl FullStore {
    fn mount(c: &Cluster, node: &str) -> FullStore {
        let pid = fs::read_to_string(c.dir.join(format!("pids/slurmd-{node}.pid"))).unwrap();
        let full = FullStore {
            node_pid: pid.trim().to_string(),
        };
        full.in_node(
            "set -e; s=/nix/store; o=$(stat -c %u $s); g=$(stat -c %g $s); m=$(stat -c %a $s)
             mount -t tmpfs -o size=4m,mode=$m,uid=$o,gid=$g nsh-full-store $s",
        );
        full
    }

    fn in_node(&self, script: &str) -> std::process::Output {
        Command::new("nsenter")
            .args(["-t", &self.node_pid, "-m", "sh", "-c", script])
            .output()
            .unwrap()
    }
}

impl Drop for FullStore {
    fn drop(&mut self) {
        let out = self.in_node(
            "while grep -q ' /nix/store tmpfs ' /proc/self/mounts; do umount /nix/store || exit 1; done",
        );
        if !std::thread::panicking() {
            assert!(
                out.status.success(),
                "unmounting the small store: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The nodes' disks are full: every node's store has 4 MiB free (a small
/// file system over `/nix/store`, in the node's mount namespace) and the
/// build writes a 16 MB output. The builder fails on "No space left on
/// device"; Nix on the node sees its store all but full after the failure
/// and reports it as a transient failure ("may have been caused by lack of
/// free disk space"), so the hook tries again in new jobs, excluding the
/// full nodes (where the REST API can: not 22.05's), until `retries` are
/// used up or Slurm refuses a job that excludes every node, then fails the
/// build as transient. Nothing is imported here, no job is left.
#[test]
fn a_full_node_disk_fails_the_build_naming_it_and_leaves_nothing() {
    let _alone = alone();
    let c = Cluster::get();
    let stores: Vec<FullStore> = c.nodes().iter().map(|n| FullStore::mount(&c, n)).collect();
    for store in &stores {
        let mounts = store.in_node("grep ' /nix/store tmpfs ' /proc/self/mounts");
        assert!(mounts.status.success(), "the small store is mounted");
    }
    let dir = tempfile::tempdir().unwrap();
    let config = config(&c, dir.path(), "");
    let salt = unique_salt();
    let name = format!("faults-disk-full-{}", &salt[salt.len() - 10..]);
    let drv = instantiate(
        &c,
        &format!(
            r#"derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";
                 PATH = "/usr/bin:/bin";
                 args = ["-c" "echo started on $(cat /proc/sys/kernel/hostname); head -c 16000000 /dev/zero >$out"]; }}"#
        ),
    );
    let mut hook = Hook::start(&c, dir.path(), &config, &drv);
    hook.accepted();
    hook.building();
    let log = hook.log.clone();
    let (status, said) = hook.finish(Duration::from_secs(120));
    let log = fs::read_to_string(log).unwrap();
    assert_eq!(status, 1, "{said}\n{log}");
    assert!(
        log.contains("No space left on device"),
        "the log: {log}\nthe hook: {said}"
    );
    for words in [
        "lack of free disk space",
        "trying again in a new job (attempt 2 of 3",
    ] {
        assert!(said.contains(words), "{words}: {said}");
    }
    // The last attempt: on a node already full where Slurm cannot exclude
    // it (22.05's REST API), or refused by Slurm (every node excluded).
    let last = said.lines().last().unwrap_or_default();
    assert!(
        last.contains("nsh-hook: run failed (transient)")
            || last.contains("nsh-hook: alloc failed (transient)")
                && last.contains("Requested node configuration is not available"),
        "{said}"
    );
    // A refused submit's job record (24.11: FAILED) is not a job to cancel.
    assert!(!said.contains("could not be cancelled"), "{said}");
    assert!(!valid_locally(&c, &drv), "{said}");
    assert_no_job_left(&c, &name);
    drop(stores);
}
