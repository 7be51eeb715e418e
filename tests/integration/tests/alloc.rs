//! `nsh-alloc` against the real test cluster: REST (slurmrestd with JWT,
//! whatever version the stack runs) and CLI backends, placement by feature, release, cancel,
//! queue timeout, signals, a refused token, and no token in any output.
// The test signals the processes and groups it started (kill(2) with
// a negative pid) and sets up a child's fd 4: libc, which needs unsafe.
#![allow(unsafe_code)]
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]
// Process ids fit an i32 (pid_max is at most 2^22).
#![allow(clippy::cast_possible_wrap)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nsh_cluster_tests::{run_ok, Cluster};
use serde_json::Value;

fn nsh_alloc() -> PathBuf {
    nsh_cluster_tests::nsh_tool("nsh-alloc")
}

fn ticket(features: &[&str]) -> String {
    serde_json::json!({"v": 1, "drv": {
        "path": "/nix/store/00000000000000000000000000000000-alloc-test.drv",
        "name": "alloc-test",
        "system": "x86_64-linux",
        "features": features,
    }})
    .to_string()
}

/// Runs nsh-alloc (as `user`, when given) with `stdin`; `(status, stdout, stderr)`.
fn run(c: &Cluster, user: Option<&str>, args: &[&str], stdin: &str) -> (i32, String, String) {
    let child = spawn(c, user, args, stdin);
    finish(child)
}

fn spawn(c: &Cluster, user: Option<&str>, args: &[&str], stdin: &str) -> std::process::Child {
    let binary = nsh_alloc();
    let mut command = match user {
        Some(user) => {
            let mut command = Command::new("runuser");
            command
                .args(["-u", user, "--"])
                .arg(nsh_cluster_tests::runnable_by_anyone(&binary));
            command
        }
        None => Command::new(&binary),
    };
    command
        .envs(c.envs())
        .args(args)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("nsh-alloc runs");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{stdin}\n").as_bytes())
        .unwrap();
    child
}

fn finish(child: std::process::Child) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

fn parse(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
}

/// The job's state word from `scontrol show job`.
fn job_state(c: &Cluster, job: u64) -> String {
    let out = run_ok(
        c.command("scontrol")
            .args(["show", "job", "-o", &job.to_string()]),
    );
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("JobState="))
        .unwrap_or("?")
        .to_string()
}

/// Rings a job's doorbell (`sh -c RING sh W/wake`, as a shell command
/// prefix: `{RING} W/wake`): one line into the FIFO, opened read-write so
/// that it never blocks. A writer puts its file, then rings.
const RING: &str = "sh -c 'printf \"r\\n\" 1<>\"$1\"' sh";

fn await_state(c: &Cluster, job: u64, want: &[&str], within: Duration) -> String {
    let start = Instant::now();
    loop {
        let state = job_state(c, job);
        if want.contains(&state.as_str()) {
            return state;
        }
        assert!(
            start.elapsed() < within,
            "job {job} is {state}, not one of {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn exists_on(c: &Cluster, node: &str, path: &str) -> bool {
    let out = c.ssh(node, &format!("test -d '{path}' && stat -c %a '{path}'"));
    out.status.success()
}

/// A copy of the cluster's nsh.toml with `edit` applied, readable by the
/// build user.
fn config_with(c: &Cluster, dir: &Path, name: &str, edit: impl Fn(String) -> String) -> String {
    let text = std::fs::read_to_string(c.nsh_config()).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, edit(text)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path.display().to_string()
}

/// The cluster's nsh.toml with `token_file` set to `token_file`.
fn with_token_file(c: &Cluster, dir: &Path, name: &str, token_file: &Path) -> String {
    config_with(c, dir, name, |t| {
        t.lines()
            .map(|l| {
                if l.starts_with("token_file") {
                    format!("token_file = \"{}\"", token_file.display())
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}

fn shared_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn rest_lands_on_the_big_node_and_release_ends_the_job() {
    let c = Cluster::get().one_job_per_build();
    let (status, stdout, stderr) = run(&c, None, &[], &ticket(&["big"]));
    assert_eq!(status, 0, "{stderr}");
    let token = c.token();
    let token = token.trim_start_matches("SLURM_JWT=");
    assert!(!stdout.contains(token) && !stderr.contains(token));
    let t = parse(&stdout);
    let alloc = &t["alloc"];
    let job = alloc["job"].as_u64().unwrap();
    let node = alloc["node"].as_str().unwrap();
    assert_eq!(alloc["backend"], "rest");
    assert_eq!(node, c.node_with_feature("big"));
    assert_eq!(alloc["ssh"], format!("{}@{node}", c.user()));
    assert_eq!(alloc["request"], 1);
    assert_eq!(alloc["nonce"].as_str().unwrap().len(), 32);
    let work = alloc["work"].as_str().unwrap();
    assert_eq!(work, format!("/tmp/nsh/nsh-{job}"));
    assert_eq!(job_state(&c, job), "RUNNING");

    // The job made its private work dir on the node, and waits.
    let start = Instant::now();
    while !exists_on(&c, node, work) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{work} never appeared on {node}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mode = c.ssh(node, &format!("stat -c %a {work}"));
    assert_eq!(String::from_utf8_lossy(&mode.stdout).trim(), "700");

    // `release` ends it: COMPLETED, work dir gone.
    let out = c.ssh(
        node,
        &format!(
            "touch {work}/release.tmp && mv {work}/release.tmp {work}/release && {RING} {work}/wake"
        ),
    );
    assert!(out.status.success());
    await_state(&c, job, &["COMPLETED"], Duration::from_secs(10));
    assert!(!exists_on(&c, node, work));
}

#[test]
fn rest_cancel_ends_the_job_and_removes_its_work_dir() {
    let c = Cluster::get().one_job_per_build();
    let (status, stdout, stderr) = run(&c, None, &[], &ticket(&[]));
    assert_eq!(status, 0, "{stderr}");
    let t = parse(&stdout);
    let job = t["alloc"]["job"].as_u64().unwrap();
    let node = t["alloc"]["node"].as_str().unwrap().to_string();
    let work = t["alloc"]["work"].as_str().unwrap().to_string();

    // (The node's ssh master is shared by every build there and outlives
    // jobs: a cancel leaves it; transport.rs tests it.)
    let (status, out, stderr) = run(&c, None, &["--cancel"], &t.to_string());
    assert_eq!(status, 0, "{stderr}");
    let cancelled = parse(&out);
    assert_eq!(cancelled["alloc"]["cancelled"], true);
    assert_eq!(cancelled["alloc"]["job"], job);
    await_state(&c, job, &["CANCELLED"], Duration::from_secs(10));
    let start = Instant::now();
    while exists_on(&c, &node, &work) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{work} stays on {node}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn cli_backend_as_the_build_user() {
    let c = Cluster::get().one_job_per_build();
    let dir = shared_tempdir();
    let config = config_with(&c, dir.path(), "cli.toml", |t| {
        t.replace("backend = \"rest\"", "backend = \"cli\"")
    });
    let user = c.user();
    let (status, stdout, stderr) = run(&c, Some(&user), &["--config", &config], &ticket(&["big"]));
    assert_eq!(status, 0, "{stderr}");
    let t = parse(&stdout);
    assert_eq!(t["alloc"]["backend"], "cli");
    assert_eq!(t["alloc"]["node"], c.node_with_feature("big").as_str());
    let job = t["alloc"]["job"].as_u64().unwrap();
    assert_eq!(job_state(&c, job), "RUNNING");
    let owner = run_ok(
        c.command("squeue")
            .args(["-h", "-o", "%u", "-j", &job.to_string()]),
    );
    assert_eq!(owner.trim(), user);
    record_exercised(&c, "cli");

    let (status, _, stderr) = run(
        &c,
        Some(&user),
        &["--config", &config, "--cancel"],
        stdout.trim(),
    );
    assert_eq!(status, 0, "{stderr}");
    await_state(&c, job, &["CANCELLED"], Duration::from_secs(10));
}

#[test]
fn a_refused_token_is_a_config_error_naming_the_key_and_never_printed() {
    let c = Cluster::get().one_job_per_build();
    let dir = shared_tempdir();
    let canary = "nsh-canary-token-5f1d2c";
    let token_file = dir.path().join("bad.jwt");
    std::fs::write(&token_file, format!("SLURM_JWT={canary}\n")).unwrap();
    let config = with_token_file(&c, dir.path(), "bad-token.toml", &token_file);
    let (status, stdout, stderr) = run(&c, None, &["--config", &config], &ticket(&[]));
    assert_eq!(status, 78, "{stderr}");
    assert!(
        !stdout.contains(canary) && !stderr.contains(canary),
        "{stdout}{stderr}"
    );
    let t = parse(&stdout);
    let message = t["error"]["message"].as_str().unwrap();
    assert_eq!(t["error"]["kind"], "config");
    let key = format!(
        "cluster.test.token_file = {:?}: ",
        token_file.display().to_string()
    );
    assert!(message.starts_with(&key), "{message}");
    // Slurm 22.05's slurmrestd passes the token on and answers 500 when
    // slurmctld refuses it; 24.11 and 26.05 answer 511 (error 1007) at the
    // submit (docs/reference/slurm.md, "Authentication, by release").
    let (status, words) = if c.slurm_version().starts_with("22.05") {
        ("HTTP 500", "refuses the token")
    } else {
        ("HTTP 511", "Slurm refused the token")
    };
    assert!(message.contains(status), "{message}");
    assert!(message.contains(words), "{message}");

    // And slurmrestd not there at all.
    let config = config_with(&c, dir.path(), "down.toml", |t| {
        t.replace("127.0.0.1:6820", "127.0.0.1:9")
    });
    let (status, stdout, _) = run(&c, None, &["--config", &config], &ticket(&[]));
    assert_eq!(status, 75);
    assert!(parse(&stdout)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Connection refused"));
}

/// A configuration Slurm refuses is 78, naming the key and the value, on
/// every release (an unknown partition is HTTP 500 on 22.05, 422 or 200
/// with errors later: docs/reference/slurm.md), through slurmrestd and
/// sbatch; so is a token file that is not there.
#[test]
fn what_slurm_refuses_is_a_config_error_naming_the_key_and_value() {
    let c = Cluster::get();
    let dir = shared_tempdir();
    let user = c.user();
    let nosuch = |t: String| t.replace("partition = \"build\"", "partition = \"nosuch\"");
    let rest = config_with(&c, dir.path(), "nosuch-rest.toml", nosuch);
    let cli = config_with(&c, dir.path(), "nosuch-cli.toml", |t| {
        nosuch(t).replace("backend = \"rest\"", "backend = \"cli\"")
    });
    // The token file is root's; sbatch runs as the build account.
    for (config, as_user) in [(&rest, None), (&cli, Some(user.as_str()))] {
        let (status, stdout, stderr) = run(&c, as_user, &["--config", config], &ticket(&[]));
        assert_eq!(status, 78, "{config}: {stderr}");
        let t = parse(&stdout);
        let message = t["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("cluster.test.partition = \"nosuch\": "),
            "{config}: {message}"
        );
        assert!(message.to_lowercase().contains("partition"), "{message}");
        // Not tried again: one attempt, no "trying again" warning.
        assert!(!stderr.contains("trying again"), "{stderr}");
    }
    let missing = with_token_file(
        &c,
        dir.path(),
        "no-token.toml",
        Path::new("/nonexistent/nsh.jwt"),
    );
    let (status, stdout, stderr) = run(&c, None, &["--config", &missing], &ticket(&[]));
    assert_eq!(status, 78, "{stderr}");
    let message = parse(&stdout)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.starts_with("cluster.test.token_file = \"/nonexistent/nsh.jwt\": "),
        "{message}"
    );
}

/// Run by root (as under the hook), a CLI cluster submits as `submit_as`
/// through runuser, and without it refuses to submit as root (78, naming
/// the key) unless `allow_root = true`.
#[test]
fn cli_backend_run_by_root_submits_as_the_build_account() {
    // One job per build: the cancel ends the job rather than pooling it.
    let c = Cluster::get().one_job_per_build();
    let dir = shared_tempdir();
    let user = c.user();
    let as_root = config_with(&c, dir.path(), "cli-root.toml", |t| {
        t.replace("backend = \"rest\"", "backend = \"cli\"")
    });
    let (status, stdout, stderr) = run(&c, None, &["--config", &as_root], &ticket(&[]));
    assert_eq!(status, 78, "{stderr}");
    let message = parse(&stdout)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.starts_with("cluster.test.submit_as: not set"),
        "{message}"
    );
    assert!(message.contains("allow_root = true"), "{message}");

    let submit_as = config_with(&c, dir.path(), "cli-submit-as.toml", |t| {
        t.replace(
            "backend = \"rest\"",
            &format!("backend = \"cli\"\nsubmit_as = \"{user}\""),
        )
    });
    let (status, stdout, stderr) = run(&c, None, &["--config", &submit_as], &ticket(&[]));
    assert_eq!(status, 0, "{stderr}");
    let job = parse(&stdout)["alloc"]["job"].as_u64().unwrap();
    let owner = run_ok(
        c.command("squeue")
            .args(["-h", "-o", "%u", "-j", &job.to_string()]),
    );
    assert_eq!(owner.trim(), user);
    let (status, _, stderr) = run(
        &c,
        None,
        &["--config", &submit_as, "--cancel"],
        stdout.trim(),
    );
    assert_eq!(status, 0, "{stderr}");
    await_state(&c, job, &["CANCELLED"], Duration::from_secs(10));
}

#[test]
fn nothing_fits_and_bad_config() {
    let c = Cluster::get().one_job_per_build();
    let (status, stdout, _) = run(&c, None, &[], &ticket(&["kvm"]));
    assert_eq!(status, 65);
    assert!(parse(&stdout)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("does not support kvm"));
    let dir = shared_tempdir();
    let config = config_with(&c, dir.path(), "typo.toml", |t| {
        t.replace("partition =", "partiton =")
    });
    let (status, stdout, _) = run(&c, None, &["--config", &config], &ticket(&[]));
    assert_eq!(status, 78);
    assert!(parse(&stdout)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("partiton"));
}

/// Fills the big node (a job asking for all of its 8 CPUs),
/// then: a second job hits the queue timeout (75, cancelled), a third is
/// interrupted by SIGTERM while pending (cancelled).
#[test]
fn queue_timeout_and_signals_cancel_the_pending_job() {
    let c = Cluster::get().one_job_per_build();
    let dir = shared_tempdir();
    let config = config_with(&c, dir.path(), "full.toml", |t| {
        t.replace(
            "time_limit = \"1h\"",
            "time_limit = \"1h\"\nqueue_timeout = 2\n[cluster.test.limits]\ndefault_cpus = 8",
        )
    });
    // The holder itself may have to wait for other jobs on the big node to
    // end: it gets the ordinary queue timeout.
    let patient = config_with(&c, dir.path(), "holder.toml", |t| {
        t.replace(
            "time_limit = \"1h\"",
            "time_limit = \"1h\"\n[cluster.test.limits]\ndefault_cpus = 8",
        )
    });
    let (status, holder, stderr) = run(&c, None, &["--config", &patient], &ticket(&["big"]));
    assert_eq!(status, 0, "{stderr}");

    let job_of = |message: &str| -> u64 {
        let after = message
            .split(" job ")
            .nth(1)
            .expect("the message names the job");
        after.split(':').next().unwrap().trim().parse().unwrap()
    };

    let started = Instant::now();
    let (status, stdout, stderr) = run(&c, None, &["--config", &config], &ticket(&["big"]));
    assert_eq!(status, 75, "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let message = parse(&stdout)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("PENDING") && message.contains("queue timeout of 2 s"),
        "{message}"
    );
    assert!(
        stderr.contains("PENDING"),
        "pending reasons are reported: {stderr}"
    );
    await_state(&c, job_of(&message), &["CANCELLED"], Duration::from_secs(5));

    let slow = config_with(&c, dir.path(), "slow.toml", |t| {
        t.replace(
            "time_limit = \"1h\"",
            "time_limit = \"1h\"\nqueue_timeout = 600\n[cluster.test.limits]\ndefault_cpus = 8",
        )
    });
    let child = spawn(&c, None, &["--config", &slow], &ticket(&["big"]));
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let interrupted = Instant::now();
    let (status, stdout, _) = finish(child);
    assert!(interrupted.elapsed() < Duration::from_secs(2));
    assert_eq!(status, 75);
    let message = parse(&stdout)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("interrupted"), "{message}");
    await_state(&c, job_of(&message), &["CANCELLED"], Duration::from_secs(5));

    let (status, _, _) = run(&c, None, &["--cancel"], holder.trim());
    assert_eq!(status, 0);
}

/// slurmrestd on a unix socket with `rest_auth/local` (no token: the
/// socket's peer credentials say who is asking), started here as the build
/// user, and nsh-alloc as the same user talking HTTP/1.1 over the socket.
#[test]
fn rest_over_a_unix_socket_with_local_auth() {
    use std::os::unix::process::CommandExt;
    let c = Cluster::get().one_job_per_build();
    let user = c.user();
    let id = |flag: &str| -> u32 {
        run_ok(Command::new("id").args([flag, &user]))
            .trim()
            .parse()
            .unwrap()
    };
    let dir = shared_tempdir();
    std::os::unix::fs::chown(dir.path(), Some(id("-u")), Some(id("-g"))).unwrap();
    let socket = dir.path().join("rest.sock");
    let mut slurmrestd = c
        .command("slurmrestd")
        .args(["-a", "rest_auth/local", "-s", &c.rest_plugin()])
        .arg(format!("unix:{}", socket.display()))
        .uid(id("-u"))
        .gid(id("-g"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("slurmrestd starts");
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let config = config_with(&c, dir.path(), "unix.toml", |t| {
        t.lines()
            .filter(|l| !l.starts_with("token_file"))
            .map(|l| {
                if l.starts_with("url") {
                    format!("url = \"unix:{}\"", socket.display())
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    let (status, stdout, stderr) = run(&c, Some(&user), &["--config", &config], &ticket(&["big"]));
    let (cancel_status, _, cancel_stderr) = run(
        &c,
        Some(&user),
        &["--config", &config, "--cancel"],
        stdout.trim(),
    );
    let _ = slurmrestd.kill();
    let _ = slurmrestd.wait();
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(cancel_status, 0, "{cancel_stderr}");
    let t = parse(&stdout);
    assert_eq!(t["alloc"]["node"], c.node_with_feature("big").as_str());
    await_state(
        &c,
        t["alloc"]["job"].as_u64().unwrap(),
        &["CANCELLED"],
        Duration::from_secs(10),
    );
}

/// The job on a real node runs the node's own `nix-store --serve --write`
/// on a request file: here only the serve-protocol greeting, to which
/// nix-store answers with its own magic and version, then ends (EOF). Then
/// the sentinel with the ticket's nonce, the status file, and release.
#[test]
fn the_job_serves_a_request_with_the_nodes_nix_store() {
    let c = Cluster::get().one_job_per_build();
    let (status, stdout, stderr) = run(&c, None, &[], &ticket(&[]));
    assert_eq!(status, 0, "{stderr}");
    let t = parse(&stdout);
    let node = t["alloc"]["node"].as_str().unwrap();
    let work = t["alloc"]["work"].as_str().unwrap();
    let nonce = t["alloc"]["nonce"].as_str().unwrap();
    let job = t["alloc"]["job"].as_u64().unwrap();

    // SERVE_MAGIC_1, protocol 2.5, as little-endian u64s.
    let mut request = Vec::new();
    request.extend_from_slice(&0x390c_9debu64.to_le_bytes());
    request.extend_from_slice(&0x205u64.to_le_bytes());
    let mut put = Command::new("ssh")
        .args(["-F", &c.ssh_config(), node])
        .arg(format!(
            "mkdir -p -m 0700 {work} && cat > {work}/request.1.tmp && mv {work}/request.1.tmp {work}/request.1 && {RING} {work}/wake"
        ))
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    put.stdin.take().unwrap().write_all(&request).unwrap();
    assert!(put.wait().unwrap().success());

    let start = Instant::now();
    let status_file = format!("{work}/status.1");
    loop {
        let out = c.ssh(node, &format!("cat {status_file} 2>/dev/null"));
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no status.1");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = c.ssh(node, &format!("tail -n 1 {work}/log.1"));
    assert_eq!(
        String::from_utf8_lossy(&log.stdout),
        format!("@nsh-end {nonce} 0\n")
    );
    let response = c.ssh(node, &format!("od -An -tx1 -N8 {work}/response.1"));
    // SERVE_MAGIC_2 = 0x5452eecb, little-endian.
    assert_eq!(
        String::from_utf8_lossy(&response.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["cb", "ee", "52", "54", "00", "00", "00", "00"]
    );
    let out = c.ssh(node, &format!("touch {work}/release"));
    assert!(out.status.success());
    await_state(&c, job, &["COMPLETED"], Duration::from_secs(10));
}

/// What the derivation asks for (`nshResources`) and Nix's build timeout
/// reach Slurm as asked, through both backends.
#[test]
fn resources_and_time_limits_reach_slurm() {
    let c = Cluster::get().one_job_per_build();
    let dir = shared_tempdir();
    let cli = config_with(&c, dir.path(), "cli.toml", |t| {
        t.replace("backend = \"rest\"", "backend = \"cli\"")
    });
    let user = c.user();
    let with_resources = serde_json::json!({"v": 1, "drv": {
        "path": "/nix/store/00000000000000000000000000000000-res.drv", "name": "res",
        "system": "x86_64-linux", "features": [],
        "resources": {"cpus": 2, "mem_mb": 1024, "time_min": 30}}})
    .to_string();
    let with_timeout = serde_json::json!({"v": 1, "options": {"timeout": 3600}, "drv": {
        "path": "/nix/store/00000000000000000000000000000000-res.drv", "name": "res",
        "system": "x86_64-linux", "features": []}})
    .to_string();
    for (config, as_user) in [(None, None), (Some(cli.as_str()), Some(user.as_str()))] {
        let args: Vec<&str> = config.map(|c| vec!["--config", c]).unwrap_or_default();
        for (ticket, want) in [
            (
                &with_resources,
                ["NumCPUs=2", "mem=1G", "TimeLimit=00:30:00"],
            ),
            // 60 minutes of build timeout + 10 for the rest; Slurm's defaults
            // (1 CPU, DefMemPerCPU=512) otherwise.
            (
                &with_timeout,
                ["NumCPUs=1", "mem=512M", "TimeLimit=01:10:00"],
            ),
        ] {
            let (status, stdout, stderr) = run(&c, as_user, &args, ticket);
            assert_eq!(status, 0, "{stderr}");
            let t = parse(&stdout);
            let job = t["alloc"]["job"].as_u64().unwrap();
            let shown = run_ok(
                c.command("scontrol")
                    .args(["show", "job", "-o", &job.to_string()]),
            );
            let mut cancel_args = args.clone();
            cancel_args.push("--cancel");
            let (status, _, _) = run(&c, as_user, &cancel_args, stdout.trim());
            assert_eq!(status, 0);
            for want in want {
                assert!(shown.contains(want), "{config:?}: no {want} in {shown}");
            }
        }
    }
}

/// Every API version this stack's slurmrestd serves, live: nsh-alloc with
/// `api` fixed to it submits a job with resources and a feature, waits for
/// it to run (reading the job back), and cancels it. The ticket names the
/// version; `api = "auto"` picks the newest. Each version seen is recorded
/// in the cluster's state directory, for the matrix `scripts/test` prints.
#[test]
fn every_rest_api_version_the_server_offers_submits_reads_and_cancels() {
    let c = Cluster::get().one_job_per_build();
    let offered = c.rest_versions();
    assert!(!offered.is_empty(), "slurmrestd serves no version");
    let dir = shared_tempdir();
    let ticket = serde_json::json!({"v": 1, "drv": {
        "path": "/nix/store/00000000000000000000000000000000-api.drv", "name": "api",
        "system": "x86_64-linux", "features": ["big"],
        "resources": {"cpus": 2, "mem_mb": 1024, "time_min": 30}}})
    .to_string();
    for api in offered.iter().map(String::as_str).chain(["auto"]) {
        let config = config_with(&c, dir.path(), &format!("{api}.toml"), |t| {
            t.replace("api = \"auto\"", &format!("api = \"{api}\""))
        });
        let (status, stdout, stderr) = run(&c, None, &["--config", &config], &ticket);
        assert_eq!(status, 0, "api {api}: {stderr}");
        let t = parse(&stdout);
        let want = if api == "auto" {
            offered.last().unwrap().as_str()
        } else {
            api
        };
        assert_eq!(t["alloc"]["api"], want, "api {api}: {t}");
        assert_eq!(t["alloc"]["slurm"], c.slurm_version().as_str());
        assert_eq!(t["alloc"]["node"], c.node_with_feature("big").as_str());
        let job = t["alloc"]["job"].as_u64().unwrap();
        let shown = run_ok(
            c.command("scontrol")
                .args(["show", "job", "-o", &job.to_string()]),
        );
        let (status, _, stderr) = run(&c, None, &["--config", &config, "--cancel"], stdout.trim());
        assert_eq!(status, 0, "api {api}: {stderr}");
        for field in [
            "JobState=RUNNING",
            "NumCPUs=2",
            "mem=1G",
            "TimeLimit=00:30:00",
        ] {
            assert!(shown.contains(field), "api {api}: no {field} in {shown}");
        }
        await_state(&c, job, &["CANCELLED"], Duration::from_secs(10));
        if api != "auto" {
            record_exercised(&c, api);
        }
    }
}

/// Notes in the cluster's state directory that a Slurm interface (`cli`,
/// or a REST version) worked live; `scripts/test` prints them per stack.
fn record_exercised(c: &Cluster, interface: &str) {
    use std::io::Write;
    let mut seen = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(c.dir.join("slurm-interfaces-exercised"))
        .unwrap();
    writeln!(seen, "{interface}").unwrap();
}

/// nsh-alloc with `--config config` and every proxy variable pointing at a
/// port where nothing listens: nsh must not use them.
fn alloc_past_proxies(
    c: &Cluster,
    config: &str,
    args: &[&str],
    stdin: &str,
) -> (i32, String, String) {
    let mut cmd = c.command(nsh_alloc());
    for proxy in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
    ] {
        cmd.env(proxy, "http://127.0.0.1:9");
    }
    let mut child = cmd
        .args(["--config", config])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut input = child.stdin.take().unwrap();
    input.write_all(format!("{stdin}\n").as_bytes()).unwrap();
    drop(input);
    finish(child)
}

/// A CA of its own (PEM, readable by all), which vouches for nothing the
/// test cluster serves.
fn unrelated_ca(dir: &Path) -> String {
    let key = dir.join("other-ca.key");
    let pem = dir.join("other-ca.pem");
    run_ok(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=not-the-test-ca", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&pem),
    );
    std::fs::set_permissions(&pem, std::fs::Permissions::from_mode(0o644)).unwrap();
    pem.display().to_string()
}

/// slurmrestd behind a TLS-terminating proxy (stunnel, certificate from the
/// test CA): allocation and cancel over `https://` with `ca_file`, with
/// proxies set in the environment that nsh must not use (the token would go
/// to them). A CA that does not vouch for the server, or a `ca_file` that
/// is not there, is configuration (78) naming the problem.
#[test]
fn rest_over_https_checks_the_server_and_ignores_proxies() {
    let c = Cluster::get().one_job_per_build();
    // One job per build: the cancel ends the job (a pooled one would go back to the pool).
    let dir = shared_tempdir();
    let with_ca = |name: &str, ca: &str| {
        config_with(&c, dir.path(), name, |t| {
            t.replace(
                &format!("url = \"{}\"", c.rest_url()),
                &format!("url = \"{}\"\nca_file = \"{ca}\"", c.rest_tls_url()),
            )
        })
    };
    let good = with_ca("tls.toml", &c.rest_ca_file());
    assert!(std::fs::read_to_string(&good).unwrap().contains("https://"));
    let (status, stdout, stderr) = alloc_past_proxies(&c, &good, &[], &ticket(&[]));
    assert_eq!(status, 0, "{stderr}");
    let job = parse(&stdout)["alloc"]["job"].as_u64().unwrap();
    assert_eq!(job_state(&c, job), "RUNNING");
    let (status, _, stderr) = alloc_past_proxies(&c, &good, &["--cancel"], &stdout);
    assert_eq!(status, 0, "{stderr}");
    await_state(&c, job, &["CANCELLED"], Duration::from_secs(10));

    // Another CA: the handshake fails, nothing reaches slurmrestd.
    let wrong = with_ca("wrong-ca.toml", &unrelated_ca(dir.path()));
    let (status, stdout, _) = alloc_past_proxies(&c, &wrong, &[], &ticket(&[]));
    assert_eq!(status, 78, "{stdout}");
    let message = parse(&stdout)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains(&c.rest_tls_url()), "{message}");
    assert!(message.to_lowercase().contains("certificate"), "{message}");

    let absent = with_ca("absent-ca.toml", "/nonexistent/ca.pem");
    let (status, stdout, _) = alloc_past_proxies(&c, &absent, &[], &ticket(&[]));
    assert_eq!(status, 78, "{stdout}");
    let message = parse(&stdout)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("ca_file /nonexistent/ca.pem"), "{message}");
}
