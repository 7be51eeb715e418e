//! How the daemon stops a build hook, on the test cluster: Nix up to 2.34
//! kills the hook's process group with SIGKILL; Nix 2.35 sends the group
//! SIGTERM and, if the hook has not exited 500 ms later, SIGKILL
//! (`Pid::kill` with `setKillTimeout(500ms)`). Either way, at either stage
//! (nsh-alloc waiting for its job to start, or the build running on the
//! node), the Slurm job must be cancelled and no process of the hook's may
//! be left (the tools, the watchdog, ssh and its ControlMaster).
//!
//! The hook runs as the daemon runs it (its own process group, the protocol
//! on stdin and stderr, the build log on fd 4) with the real nsh-* tools.
//! Every process it starts inherits `NSH_TEST_TAG`, which is how the test
//! finds what is left. A job is kept waiting in a partition of its own that
//! is DOWN (made with `scontrol create` and deleted afterwards).
// The test signals the processes and groups it started (kill(2) with
// a negative pid) and sets up a child's fd 4: libc, which needs unsafe.
#![allow(unsafe_code)]
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]
// Process ids fit an i32 (pid_max is at most 2^22).
#![allow(clippy::cast_possible_wrap)]

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nsh_cluster_tests::{instantiate, nsh_tool, run_ok, slurm_cmd, unique_salt, Cluster};
use nsh_core::build_hook::{Accepted, Settings, Try};

#[derive(Clone, Copy, Debug)]
enum Stage {
    /// nsh-alloc waits for a job Slurm will not start.
    WaitingForAllocation,
    /// The builder runs on the node.
    Building,
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    /// Nix ≤ 2.34: SIGKILL to the hook's process group.
    GroupKill,
    /// Nix 2.35: SIGTERM to the group, SIGKILL 500 ms later if the hook
    /// has not exited by then.
    TermThenKill,
}

/// A partition that holds every job submitted to it (State=DOWN).
struct HoldPartition<'c> {
    cluster: &'c Cluster,
    name: String,
}

impl<'c> HoldPartition<'c> {
    fn new(cluster: &'c Cluster, _salt: &str) -> HoldPartition<'c> {
        // Unique among this process's tests (they run at once) and across
        // processes: the salt's last digits are not (two tests in one
        // process collided on them, and Slurm refuses a duplicate name).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("nsh-hold-{}-{n}", std::process::id());
        let spec = format!("PartitionName={name}");
        run_ok(
            cluster
                .command("scontrol")
                .args(["create", &spec, "Nodes=ALL", "State=DOWN"]),
        );
        HoldPartition { cluster, name }
    }
}

impl Drop for HoldPartition<'_> {
    fn drop(&mut self) {
        let spec = format!("PartitionName={}", self.name);
        let _ = slurm_cmd(self.cluster, "scontrol", &["delete", &spec]);
    }
}

/// What the daemon writes to a hook that accepts `drv`: the settings, the
/// `try`, the inputs and the wanted output.
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
    let accepted = Accepted {
        inputs: vec![],
        wanted_outputs: vec!["out".into()],
    };
    [settings.to_bytes(), the_try.to_bytes(), accepted.to_bytes()].concat()
}

/// The hook, started as the daemon starts it.
struct RunningHook {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stderr: mpsc::Receiver<String>,
    log: PathBuf,
}

fn start_hook(
    c: &Cluster,
    dir: &std::path::Path,
    config: &str,
    drv: &str,
    tag: &str,
) -> RunningHook {
    let config_path = dir.join("nsh.toml");
    fs::write(&config_path, config).unwrap();
    let log = dir.join("build.log");
    let log_file = fs::File::create(&log).unwrap();
    let log_fd = log_file.as_raw_fd();
    let mut cmd = c.command(nsh_tool("nsh-hook"));
    cmd.arg("3")
        .env("NSH_CONFIG", &config_path)
        // For a pipeline command (hook.sh.example): where the tools are.
        .env("NSH_BIN_DIR", nsh_tool("nsh-alloc").parent().unwrap())
        .env("NSH_TEST_TAG", tag)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2/fcntl in the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            // Another test thread may have left fd 4 free for this file:
            // dup2 onto itself would keep it close-on-exec.
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
    RunningHook {
        child,
        stdin: Some(stdin),
        stderr: rx,
        log,
    }
}

impl RunningHook {
    /// The first stderr line `pick` takes, within `limit`.
    fn wait_for_line<T>(&mut self, limit: Duration, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    if let Some(found) = pick(&line) {
                        return found;
                    }
                    seen.push(line);
                }
                Err(e) => panic!(
                    "the hook never said it ({e}); it said:\n{}",
                    seen.join("\n")
                ),
            }
        }
    }

    /// Stops the hook as the daemon does; returns once the hook is reaped.
    fn stop(&mut self, how: Stop) {
        // The daemon closes the hook's stdin first (~HookInstance).
        drop(self.stdin.take());
        let group = -(self.child.id() as i32);
        match how {
            Stop::GroupKill => {
                // SAFETY: kill(2) on the hook's process group.
                unsafe { libc::kill(group, libc::SIGKILL) };
            }
            Stop::TermThenKill => {
                // SAFETY: as above.
                unsafe { libc::kill(group, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_millis(500);
                while Instant::now() < deadline && self.child.try_wait().unwrap().is_none() {
                    std::thread::sleep(Duration::from_millis(25));
                }
                if self.child.try_wait().unwrap().is_none() {
                    eprintln!("the hook is still there after 500 ms: SIGKILL");
                    // SAFETY: as above.
                    unsafe { libc::kill(group, libc::SIGKILL) };
                }
            }
        }
        let _ = self.child.wait();
    }
}

impl Drop for RunningHook {
    /// A test that failed half-way leaves no hook running (its watchdog
    /// then cancels the job).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the hook's process group.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

fn in_squeue(c: &Cluster, job: u64) -> bool {
    let out = slurm_cmd(c, "squeue", &["-h", "-j", &job.to_string(), "-o", "%T"]);
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

/// The processes whose environment holds `NSH_TEST_TAG=<tag>`.
fn tagged_processes(tag: &str) -> Vec<String> {
    let needle = format!("NSH_TEST_TAG={tag}");
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
        })
        .map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            format!(
                "{pid}: {}",
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            )
        })
        .collect()
}

fn eventually(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the job named `nsh-<name>` is in `state` (squeue's `%T`);
/// its id.
fn job_in_state(c: &Cluster, name: &str, state: &str, limit: Duration) -> u64 {
    let job_name = format!("nsh-{name}");
    let mut job = None;
    eventually(&format!("the job to be {state}"), limit, || {
        let out = slurm_cmd(c, "squeue", &["-h", "-n", &job_name, "-o", "%i %T"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        job = text
            .split_whitespace()
            .next()
            .and_then(|id| id.parse::<u64>().ok());
        text.contains(state)
    });
    job.unwrap()
}

/// Waits until the build reaches `stage`; the Slurm job.
fn reach(
    c: &Cluster,
    hook: &mut RunningHook,
    (stage, pipeline): (Stage, Pipeline),
    name: &str,
) -> u64 {
    match stage {
        Stage::WaitingForAllocation => job_in_state(c, name, "PENDING", Duration::from_secs(30)),
        Stage::Building if pipeline == Pipeline::Command => {
            // The hook shows no stage of a pipeline command: the job by name.
            let job = job_in_state(c, name, "RUNNING", Duration::from_secs(60));
            eventually("the builder to start", Duration::from_secs(60), || {
                fs::read_to_string(&hook.log)
                    .unwrap_or_default()
                    .contains("started")
            });
            job
        }
        Stage::Building => {
            let job = hook.wait_for_line(Duration::from_secs(60), |line| {
                let text = line.split("(Slurm job ").nth(1)?;
                line.contains("building '")
                    .then(|| text.split(')').next()?.parse::<u64>().ok())?
            });
            eventually("the builder to start", Duration::from_secs(60), || {
                fs::read_to_string(&hook.log)
                    .unwrap_or_default()
                    .contains("started")
            });
            job
        }
    }
}

/// What the hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pipeline {
    /// The nsh-* tools, connected by the hook.
    Tools,
    /// `hook.sh.example` as `[hook] pipeline` (the hook sees no ticket).
    Command,
}

/// Starts a build through the hook, lets it reach `stage`, stops the hook
/// `how`, and checks that the job is cancelled and nothing is left.
fn stop_at(stage: Stage, how: Stop) {
    stop_at_with(stage, how, Pipeline::Tools);
}

fn stop_at_with(stage: Stage, how: Stop, pipeline: Pipeline) {
    // A pipeline command's job is found by its name: it must be a new job,
    // not an idle one of another test's build from the pool.
    let c = match pipeline {
        Pipeline::Tools => Cluster::get(),
        Pipeline::Command => Cluster::get().one_job_per_build(),
    };
    let salt = unique_salt();
    let dir = tempfile::tempdir().unwrap();
    let hold = matches!(stage, Stage::WaitingForAllocation).then(|| HoldPartition::new(&c, &salt));
    let mut config = fs::read_to_string(c.nsh_config()).unwrap();
    if let Some(hold) = &hold {
        config = config.replace(
            "partition = \"build\"",
            &format!("partition = \"{}\"", hold.name),
        );
    }
    let command = match pipeline {
        Pipeline::Tools => String::new(),
        Pipeline::Command => format!(
            "pipeline = [\"{}\"]\n",
            Cluster::repo_root().join("hook.sh.example").display()
        ),
    };
    config = format!(
        "{config}\n[hook]\nslots_dir = \"{}\"\n{command}",
        dir.path().join("slots").display()
    );
    let name = format!(
        "sig-{}-{}",
        &salt[salt.len() - 10..],
        stage as u8 * 2 + how as u8 + 4 * u8::from(pipeline == Pipeline::Command)
    );
    let drv = instantiate(
        &c,
        &format!(
            r#"derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";
                 PATH = "/usr/bin:/bin"; args = ["-c" "echo started; exec sleep 120"]; }}"#
        ),
    );
    let tag = format!("{name}-{}", std::process::id());
    let mut hook = start_hook(&c, dir.path(), &config, &drv, &tag);
    let job = reach(&c, &mut hook, (stage, pipeline), &name);
    assert!(in_squeue(&c, job), "job {job} should be in squeue");
    let stopped = Instant::now();
    hook.stop(how);
    eventually(
        &format!("job {job} is still in squeue ({stage:?}, {how:?})"),
        Duration::from_secs(30),
        || !in_squeue(&c, job),
    );
    eventually(
        &format!(
            "processes of the hook are left ({stage:?}, {how:?}): {:#?}",
            tagged_processes(&tag)
        ),
        Duration::from_secs(30),
        || tagged_processes(&tag).is_empty(),
    );
    eprintln!(
        "{stage:?}, {how:?}: job {job} gone and nothing left {:?} after the stop",
        stopped.elapsed()
    );
}

#[test]
fn nix_2_35_stopping_the_hook_while_nsh_alloc_waits_cancels_the_job() {
    stop_at(Stage::WaitingForAllocation, Stop::TermThenKill);
}

#[test]
fn nix_2_35_stopping_the_hook_during_the_build_cancels_the_job() {
    stop_at(Stage::Building, Stop::TermThenKill);
}

#[test]
fn a_group_sigkill_while_nsh_alloc_waits_cancels_the_job() {
    stop_at(Stage::WaitingForAllocation, Stop::GroupKill);
}

#[test]
fn a_group_sigkill_during_the_build_cancels_the_job() {
    stop_at(Stage::Building, Stop::GroupKill);
}

/// `[hook] pipeline` (hook.sh.example): the command outlives the group kill
/// in a group of its own and, on the SIGTERM it gets when the hook is gone,
/// stops nsh-alloc (which cancels the job it waits for).
#[test]
fn a_group_sigkill_of_a_pipeline_command_while_nsh_alloc_waits_cancels_the_job() {
    stop_at_with(
        Stage::WaitingForAllocation,
        Stop::GroupKill,
        Pipeline::Command,
    );
}

/// As above, during the build: the command ends the job's use with
/// `nsh-alloc --cancel`.
#[test]
fn a_group_sigkill_of_a_pipeline_command_during_the_build_cancels_the_job() {
    stop_at_with(Stage::Building, Stop::GroupKill, Pipeline::Command);
}

#[test]
fn nix_2_35_stopping_a_pipeline_command_during_the_build_cancels_the_job() {
    stop_at_with(Stage::Building, Stop::TermThenKill, Pipeline::Command);
}
