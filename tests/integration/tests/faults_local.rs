//! Faults on the node side and here, injected on the real cluster
//! (docs/reliability.md, "Faults"): a node's `nix-store --serve` that stops
//! answering in the middle of a fetch, an ssh connection dropped in the
//! middle of one, and a node's `work_root` that someone else made.
//!
//! The node misbehaves through a wrapper around its `nix-store`
//! (`remote.nix_bin_dir` pointing at it), as in `push_fetch.rs`: the
//! wrapper's filter passes the first bytes of the answers on, then does
//! the harm. No Slurm job is needed for the fetches: their tickets' `alloc`
//! sections are made by hand, so none can be left behind.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use nsh_cluster_tests::{unique_salt, wait_bounded, Cluster};
use serde_json::{json, Value};

const NODE: &str = "node1";

/// Held by every test here: they break connections to the nodes (an sshd
/// killed, a master closed after a stall), which would break the other
/// tests' connections over the same ssh master.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    // A test that failed holding it leaves it poisoned; the others still run.
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An output built on the node only (its derivation and inputs here), as
/// nsh-fetch finds it after a build.
struct NodeBuild {
    drv: String,
    out: String,
}

/// A derivation whose output holds `size` random bytes, built on the node.
fn build_on_node(c: &Cluster, salt: &str, size: u64) -> NodeBuild {
    let expr = format!(
        r#"builtins.derivation {{
             name = "nsh-fl-{salt}"; system = builtins.currentSystem;
             builder = "/bin/sh"; PATH = "/usr/bin:/bin";
             args = [ "-c" "head -c {size} /dev/urandom > $out" ];
           }}"#
    );
    let (drv, out) = c.instantiate_here_build_on(NODE, &expr);
    NodeBuild { drv, out }
}

fn fetch_ticket(built: &NodeBuild) -> Value {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let job = u64::from(std::process::id()) * 100 + n + 800_000_000;
    let name = built.out.split_once('-').map_or("", |(_, name)| name);
    json!({
        "v": 1,
        "store": {"dir": "/nix/store", "uri": "local"},
        "closure": {"paths": [], "nar_size": 0},
        "alloc": {"cluster": "test", "backend": "rest", "job": job, "node": NODE,
                  "ssh": NODE, "work": format!("/tmp/nsh/nsh-{job}")},
        "drv": {"path": built.drv, "name": name, "system": "x86_64-linux",
                "outputs": {"out": built.out}, "wanted": ["out"]},
    })
}

fn spawn_fetch(c: &Cluster, config: &Path, ticket: &Value) -> Child {
    let mut child = c
        .command(nsh_cluster_tests::nsh_tool("nsh-fetch"))
        .args(["--config", config.to_str().unwrap()])
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

/// (exit code, ticket out, stderr).
fn parse(out: &Output) -> (i32, Value, String) {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let ticket = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("not a ticket ({e}): {line:?}; stderr:\n{stderr}"));
    (out.status.code().unwrap_or(-1), ticket, stderr)
}

fn local_valid(c: &Cluster, path: &str) -> bool {
    c.command("nix-store")
        .args(["--check-validity", path])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// What is in the local store under `out_path`'s name, or a fetch's
/// temporary name (lock files aside).
fn leftovers_of(out_path: &str) -> Vec<String> {
    let name = out_path.rsplit('/').next().unwrap();
    std::fs::read_dir("/nix/store")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(name) && !n.ends_with(".lock") || n.starts_with(".nsh-fetch-"))
        .collect()
}

/// A directory for one test (shared with the nodes: /tmp is), with a
/// subdirectory `state` the node's build account may write into.
fn test_dir() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("nsh-fl-{}", unique_salt()));
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.join("state"), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// The cluster's configuration with the node's `nix-store` answers sent
/// through `python3 FILTER ARG STATE_DIR`, and `extra` added to `[remote]`.
fn config_with_node_filter(
    c: &Cluster,
    dir: &Path,
    filter: &str,
    arg: &str,
    extra: &str,
) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("filter.py");
    std::fs::write(&script, filter).unwrap();
    let wrapper = dir.join("nix-store");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n/usr/bin/nix-store \"$@\" | python3 {} {arg} {}\n",
            script.display(),
            dir.join("state").display()
        ),
    )
    .unwrap();
    for (path, mode) in [(&script, 0o644), (&wrapper, 0o755)] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let config = std::fs::read_to_string(c.nsh_config()).unwrap();
    let config = config.replace(
        "nix_bin_dir = \"\"",
        &format!("nix_bin_dir = \"{}\"\n{extra}", dir.display()),
    );
    assert!(config.contains(&dir.display().to_string()), "{config}");
    let config_file = dir.join("nsh.toml");
    std::fs::write(&config_file, config).unwrap();
    config_file
}

/// Passes the first ARG bytes on, writes its pid to STATE/stopped.pid and
/// stops itself (SIGSTOP): a node whose nix-store stops answering in the
/// middle of a NAR, with the connection still up.
const STOP_AFTER: &str = "import os, signal, sys\n\
     left = int(sys.argv[1])\n\
     while left > 0:\n\
     \x20   chunk = os.read(0, min(65536, left))\n\
     \x20   if not chunk: break\n\
     \x20   sys.stdout.buffer.write(chunk); sys.stdout.buffer.flush(); left -= len(chunk)\n\
     open(os.path.join(sys.argv[2], 'stopped.pid'), 'a').write('%d\\n' % os.getpid())\n\
     os.kill(os.getpid(), signal.SIGSTOP)\n\
     while True: sys.stdout.buffer.write(os.read(0, 65536) or sys.exit(0)); sys.stdout.buffer.flush()\n";

/// On the first connection only (STATE/dropped marks it done): passes the
/// first ARG bytes on, then kills the sshd serving the session: the ssh
/// connection dropped in the middle of a NAR. Later connections pass
/// everything.
const DROP_SSH_ONCE_AFTER: &str = "import os, signal, sys\n\
     mark = os.path.join(sys.argv[2], 'dropped')\n\
     first = not os.path.exists(mark)\n\
     left = int(sys.argv[1]) if first else -1\n\
     while True:\n\
     \x20   chunk = os.read(0, 65536 if left < 0 else min(65536, left))\n\
     \x20   if not chunk: break\n\
     \x20   sys.stdout.buffer.write(chunk); sys.stdout.buffer.flush()\n\
     \x20   if left > 0:\n\
     \x20       left -= len(chunk)\n\
     \x20       if left == 0: break\n\
     if first:\n\
     \x20   open(mark, 'w').write('')\n\
     \x20   pid = os.getppid()\n\
     \x20   while pid > 1:\n\
     \x20       name = open('/proc/%d/comm' % pid).read().strip()\n\
     \x20       if name.startswith('sshd'):\n\
     \x20           os.kill(pid, signal.SIGKILL); break\n\
     \x20       pid = int(open('/proc/%d/stat' % pid).read().rsplit(')', 1)[1].split()[1])\n";

/// A node whose `nix-store --serve` stops (SIGSTOP) 200 kB into a 1 MB
/// output: nsh-fetch fails as transient (75) once nothing has come for
/// `remote.io_timeout` (in each of its tries), naming the node, what it
/// awaited and the limit, with nothing of the output here.
#[test]
fn a_node_that_stops_answering_mid_fetch_is_transient_within_the_io_timeout() {
    let _alone = alone();
    let c = Cluster::get();
    let dir = test_dir();
    let config = config_with_node_filter(&c, &dir, STOP_AFTER, "200000", "io_timeout = 3");
    let built = build_on_node(&c, &unique_salt(), 1_000_000);
    let started = Instant::now();
    let child = spawn_fetch(&c, &config, &fetch_ticket(&built));
    let (code, out, stderr) = parse(&wait_bounded(child, Duration::from_secs(120)));
    let took = started.elapsed();
    // The stopped filters (one per try) are ours to end.
    let pids = std::fs::read_to_string(dir.join("state/stopped.pid")).unwrap_or_default();
    for pid in pids.split_whitespace() {
        let _ = c.ssh(NODE, &format!("kill -KILL {pid}"));
    }
    assert!(!pids.trim().is_empty(), "the node never stopped: {stderr}");
    assert_eq!(code, 75, "{out}\n{stderr}");
    let message = out["error"]["message"].as_str().unwrap();
    let stalled = format!("nothing came from {NODE} for 3 s (remote.io_timeout)");
    // What was awaited: the output being unpacked (under its name).
    for words in [
        stalled.as_str(),
        "unpacking into /nix/store/",
        built.out.split_once('-').unwrap().1,
    ] {
        assert!(message.contains(words), "{words}: {message}");
    }
    // Two tries of 3 s each, and the pause between them.
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert!(!local_valid(&c, &built.out));
    assert_eq!(leftovers_of(&built.out), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The ssh connection to the node dies 200 kB into a 1 MB output (its sshd
/// killed): the try fails as transient, nothing half-copied is registered,
/// and the next try fetches the output whole.
#[test]
fn ssh_dropped_mid_fetch_is_retried_and_the_output_arrives_whole() {
    let _alone = alone();
    let c = Cluster::get();
    let dir = test_dir();
    let config = config_with_node_filter(&c, &dir, DROP_SSH_ONCE_AFTER, "200000", "");
    let built = build_on_node(&c, &unique_salt(), 1_000_000);
    let child = spawn_fetch(&c, &config, &fetch_ticket(&built));
    let (code, out, stderr) = parse(&wait_bounded(child, Duration::from_secs(120)));
    assert!(
        dir.join("state/dropped").exists(),
        "the connection was never dropped: {stderr}"
    );
    assert_eq!(code, 0, "{out}\n{stderr}");
    assert!(stderr.contains("trying again"), "no retry said: {stderr}");
    assert!(local_valid(&c, &built.out));
    let verified = c
        .command("nix-store")
        .args(["--verify-path", &built.out])
        .status()
        .unwrap();
    assert!(verified.success(), "{} does not verify", built.out);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The cluster's configuration (one job per build) with `work_root` set to
/// `root`, written in `dir`.
fn config_with_work_root(c: &Cluster, dir: &Path, root: &Path) -> PathBuf {
    let config = std::fs::read_to_string(c.nsh_config()).unwrap();
    let config = config.replace(
        "work_root = \"/tmp/nsh\"",
        &format!("work_root = \"{}\"", root.display()),
    );
    assert!(config.contains(&root.display().to_string()), "{config}");
    let file = dir.join("nsh.toml");
    std::fs::write(&file, config).unwrap();
    file
}

/// Whether Slurm still knows `job` as queued or running.
fn job_alive(c: &Cluster, job: u64) -> bool {
    let out =
        nsh_cluster_tests::slurm_cmd(c, "squeue", &["-h", "-j", &job.to_string(), "-o", "%T"]);
    let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
    matches!(state.as_str(), "RUNNING" | "PENDING" | "COMPLETING")
}

/// A `work_root` another user made (nobody's, open to all: a Slurm user
/// could have made it before the first nsh job), or a symlink to a
/// directory: the job refuses it and ends, nsh-run refuses it too (78),
/// naming it, and the job is not left running. Nothing is written there.
#[test]
fn a_work_root_another_user_made_or_a_symlink_is_refused_naming_it() {
    let _alone = alone();
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::get().one_job_per_build();
    let dir = test_dir();
    let target = dir.join("state/target");
    std::fs::create_dir(&target).unwrap();
    let foreign = dir.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o777)).unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for (root, words) in [
        (&foreign, "is owned by nobody (uid 65534)"),
        (&link, "is a symbolic link"),
    ] {
        let config = config_with_work_root(&c, &dir, root);
        let config = config.to_str().unwrap();
        let drv = nsh_cluster_tests::instantiate(
            &c,
            &format!(
                r#"builtins.derivation {{
                     name = "nsh-wr-{}"; system = "x86_64-linux"; builder = "/bin/sh";
                     args = [ "-c" "echo hi > $out" ];
                   }}"#,
                unique_salt()
            ),
        );
        let ticket = nsh_cluster_tests::closure_ticket(&c, &drv, Value::Null);
        let (code, ticket, stderr) =
            nsh_cluster_tests::pipe_ticket(&c, "nsh-alloc", &["--config", config], &ticket);
        let job = ticket["alloc"]["job"].as_u64();
        if code == 0 {
            let (code, out, stderr) =
                nsh_cluster_tests::pipe_ticket(&c, "nsh-run", &["--config", config], &ticket);
            assert_eq!(code, 78, "{}: {out}\n{stderr}", root.display());
            let message = out["error"]["message"].as_str().unwrap();
            let named = format!("work_root {}", root.display());
            for words in [named.as_str(), words, "refusing"] {
                assert!(message.contains(words), "{words}: {message}");
            }
        } else {
            // The job refused its work_root before nsh-alloc saw it run:
            // its exit status says so (its words go to no file).
            assert_eq!(code, 75, "{}: {ticket}\n{stderr}", root.display());
            let message = ticket["error"]["message"].as_str().unwrap();
            assert!(message.contains("exit code 78"), "{message}");
        }
        if let Some(job) = job {
            let deadline = Instant::now() + Duration::from_secs(30);
            while job_alive(&c, job) {
                assert!(Instant::now() < deadline, "job {job} left running");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        assert!(std::fs::read_dir(&foreign).unwrap().next().is_none());
        assert!(std::fs::read_dir(&target).unwrap().next().is_none());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two `nix-build`s (two daemons' worth of hooks: each its own nsh-hook) of
/// the same derivation at once, on the local store: Nix's lock on the
/// output makes one wait for the other, so the derivation is built once on
/// the cluster; both succeed with the same valid, verified output, and no
/// job is left.
#[test]
fn two_hooks_building_the_same_derivation_build_it_once_and_both_succeed() {
    let _alone = alone();
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::get().one_job_per_build();
    let dir = test_dir();
    let count = dir.join("state/builds");
    let salt = unique_salt();
    let name = format!("nsh-twice-{salt}");
    let expr = format!(
        r#"derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";
             PATH = "/usr/bin:/bin";
             args = ["-c" "echo built on $(hostname) >> {}; sleep 3; echo {salt} > $out"]; }}"#,
        count.display()
    );
    std::fs::set_permissions(dir.join("state"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let spawn = || {
        c.command("nix-build")
            .args(["-E", &expr, "--no-out-link", "--max-jobs", "0"])
            .args(["--option", "build-hook"])
            .arg(nsh_cluster_tests::nsh_tool("nsh-hook"))
            .env_remove("NIX_REMOTE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let outs: Vec<Output> = [first, second]
        .into_iter()
        .map(|child| wait_bounded(child, Duration::from_secs(240)))
        .collect();
    let mut paths = Vec::new();
    for out in &outs {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        paths.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    assert_eq!(paths[0], paths[1]);
    let built = std::fs::read_to_string(&count).unwrap_or_default();
    assert_eq!(built.lines().count(), 1, "built more than once:\n{built}");
    assert!(built.contains("built on node"), "{built}");
    let verified = c
        .command("nix-store")
        .args(["--verify-path", &paths[0]])
        .status()
        .unwrap();
    assert!(verified.success(), "{} does not verify", paths[0]);
    let job_name = format!("nsh-{name}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out =
            nsh_cluster_tests::slurm_cmd(&c, "squeue", &["-h", "-n", &job_name, "-o", "%i %T"]);
        let left = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "jobs left: {left}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The local store's disk fills up during a fetch: a store with another
/// root (`nsh-fetch` writes it directly, as it writes `/nix/store`) on a
/// 16 MiB file system (room for the new database, and the 8 MiB that Nix
/// 2.34 reserves beside it for the collector), and a 24 MB output. The fetch fails naming the full
/// disk, nothing of the output is valid there and no temporary tree is
/// left (the file system has its space back).
#[test]
fn a_full_local_disk_fails_the_fetch_and_leaves_nothing() {
    let _alone = alone();
    let c = Cluster::get();
    let dir = test_dir();
    let root = dir.join("root");
    std::fs::create_dir(&root).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&root)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a small file system");
    let built = build_on_node(&c, &unique_salt(), 24_000_000);
    // The derivation (no inputs) into the small store: nsh-fetch reads the
    // outputs it may import from there.
    let export = c
        .command("nix-store")
        .args(["--export", &built.drv])
        .output()
        .unwrap();
    assert!(export.status.success());
    let mut import = c
        .command("nix-store")
        .arg("--store")
        .arg(&root)
        .arg("--import")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        import
            .stdin
            .take()
            .unwrap()
            .write_all(&export.stdout)
            .unwrap();
    }
    assert!(import.wait().unwrap().success(), "importing the .drv");
    let mut ticket = fetch_ticket(&built);
    ticket["store"]["uri"] = json!(root.display().to_string());
    let child = spawn_fetch(&c, Path::new(&c.nsh_config()), &ticket);
    let (code, out, stderr) = parse(&wait_bounded(child, Duration::from_secs(120)));
    let store_files: Vec<String> = std::fs::read_dir(root.join("nix/store"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // Nix's own: lock files, the derivation, the hard-link directory.
        .filter(|n| !n.ends_with(".lock") && !n.ends_with(".drv") && n != ".links")
        .collect();
    let valid = c
        .command("nix-store")
        .arg("--store")
        .arg(&root)
        .args(["--check-validity", &built.out])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&root)
        .status();
    assert_ne!(code, 0, "{out}\n{stderr}");
    let message = out["error"]["message"].as_str().unwrap();
    assert!(message.contains("No space left on device"), "{message}");
    assert!(!valid, "{} is valid in the full store", built.out);
    assert_eq!(store_files, Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}
