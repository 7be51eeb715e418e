//! `nsh-hook` driven as the Nix daemon drives it: real protocol bytes on
//! stdin, fd 4 open as the build log, replies and `@nix` lines read back from
//! stderr. The pipeline is made of small shell scripts (fake nsh-* tools, or
//! a pipeline command) that record what they saw, so these tests check the
//! hook's own logic: decline/postpone/accept, the log on fd 4 and to whom it
//! goes, exit statuses, signals, the watchdog and the fallback relay.
// The test signals the processes and groups it started (kill(2) with
// a negative pid) and sets up a child's fd 4: libc, which needs unsafe.
#![allow(unsafe_code)]
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]
// Process ids fit an i32 (pid_max is at most 2^22).
#![allow(clippy::cast_possible_wrap)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nsh_core::build_hook::SlotDir;
use nsh_core::build_hook::{Accepted, Settings, Try};
use serde_json::Value;

const DRV: &str = "/nix/store/1cj0fhkr5qn18x1zz61vdjrb58cfnzp5-hello.drv";

fn settings() -> Vec<u8> {
    let mut s = Settings::default();
    for (k, v) in [
        ("store", "auto"),
        ("system", "x86_64-linux"),
        ("system-features", "big-parallel"),
        ("max-silent-time", "7"),
        ("timeout", "3600"),
        ("max-build-log-size", "65536"),
        ("keep-failed", "true"),
        ("access-tokens", "github.com=SECRET-TOKEN"),
    ] {
        s.values.insert(k.into(), v.into());
    }
    s.to_bytes()
}

fn try_(am_willing: bool, system: &str, features: &[&str]) -> Vec<u8> {
    Try {
        am_willing,
        needed_system: system.into(),
        drv_path: DRV.parse().unwrap(),
        required_features: features
            .iter()
            .map(std::string::ToString::to_string)
            .collect(),
    }
    .to_bytes()
}

fn accepted() -> Vec<u8> {
    Accepted {
        inputs: vec!["/nix/store/vh2m0g9jsj81vrkr4m2sq2jz375ykp01-dep".into()],
        wanted_outputs: vec!["out".into()],
    }
    .to_bytes()
}

/// A directory with the hook (copied, so that its fake tools sit next to
/// it), the config, the build-log file and the scripts' records.
struct Site {
    dir: tempfile::TempDir,
}

const TOOL_PRELUDE: &str = r#"#!/bin/sh
me=$(basename "$0")
# Which descriptors this tool got: fd 4 (the build log) and whether its
# stderr is the hook's (it must not be).
if [ -e /proc/$$/fd/4 ]; then echo "$me fd4 ${NSH_LOG_FD:-unset}" >> "$T/fds"; fi
if [ "$(readlink /proc/$$/fd/2)" = "$(readlink /proc/$PPID/fd/2)" ]; then echo "$me shares-stderr" >> "$T/fds"; fi
echo "$me cluster=$NSH_CLUSTER" >> "$T/env"
"#;

impl Site {
    fn new(hook_section: &str, max_jobs: u32) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let site = Site { dir };
        fs::create_dir_all(site.bin()).unwrap();
        fs::copy(assert_cmd::cargo::cargo_bin("nsh-hook"), site.hook()).unwrap();
        site.script(
            "nix-store",
            "#!/bin/sh\n# --check-validity: every path exists\nwhile [ $# -gt 0 ]; do case $1 in --store) shift 2;; --*) shift;; *) [ -e \"$1\" ] || exit 1; shift;; esac; done\n",
        );
        let config = format!(
            // allow_root: these tests run as root (on the stacks), and the
            // fake tools submit nothing; without it the hook's check of the
            // cluster sets it aside (tested in tests/integration).
            "[cluster.main]\nbackend = \"cli\"\nallow_root = true\nsystems = [\"x86_64-linux\"]\nsupported_features = [\"big-parallel\"]\nmax_jobs = {max_jobs}\n\n\
             [hook]\nslots_dir = \"{}\"\nnix_bin_dir = \"{}\"\n{hook_section}\n",
            site.path("slots").display(),
            site.bin().display(),
        );
        fs::write(site.path("nsh.toml"), config).unwrap();
        site.fake_tools();
        site
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn bin(&self) -> PathBuf {
        self.path("bin")
    }
    fn hook(&self) -> PathBuf {
        self.bin().join("nsh-hook")
    }
    /// The build's output: a store path in the site's directory (the
    /// hook checks it with the fake nix-store).
    fn out(&self) -> PathBuf {
        self.path("0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-hello")
    }

    fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.bin().join(name);
        fs::write(&path, body).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// The five nsh-* tools as scripts that add their section with sed.
    fn fake_tools(&self) {
        let add = |section: &str| {
            format!("read -r t\necho \"$t\" >> \"$T/seen-$me\"\necho \"$t\" | sed 's|}}$|,{section}}}|'\n")
        };
        let out = self.out().display().to_string();
        self.script(
            "nsh-closure",
            &format!(
                "{TOOL_PRELUDE}read -r t\necho \"$t\" > \"$T/seen-$me\"\necho \"$t\" | sed 's|\"outputs\":{{}}|\"outputs\":{{\"out\":\"{out}\"}}|; s|}}$|,\"closure\":{{\"paths\":[\"/nix/store/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-a\",\"/nix/store/2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c-b\"],\"nar_size\":9}}}}|'\n"
            ),
        );
        self.script(
            "nsh-alloc",
            &format!(
                "{TOOL_PRELUDE}if [ \"$1\" = --cancel ]; then cat >> \"$T/cancelled\"; exit 0; fi\n\
                 if [ -e \"$T/hang-alloc\" ]; then\n\
                 trap 'kill $! 2>/dev/null; echo TERM >> \"$T/alloc-term\"; exit 75' TERM\n\
                 echo $$ > \"$T/alloc-pid\"; sleep 30 & wait $!; exit 1\n\
                 fi\n{}",
                add(r#""alloc":{"cluster":"main","backend":"cli","job":4242,"node":"node1","ssh":"nixbuild@node1","work":"/tmp/nsh/nsh-4242","request":1}"#)
            ),
        );
        self.script(
            "nsh-push",
            &format!(
                "{TOOL_PRELUDE}{}",
                add(r#""push":{"copied":2,"present":0,"bytes":9,"secs":0.1}"#)
            ),
        );
        self.script(
            "nsh-run",
            &format!(
                "{TOOL_PRELUDE}echo 'hello from the build' >&\"${{NSH_LOG_FD:-2}}\"\n{}",
                add(r#""run":{"status":"built"}"#).replacen(
                    "echo \"$t\" | sed",
                    "if [ -e \"$T/hang\" ]; then echo $$ > \"$T/run-pid\"; exec sleep 60; fi\n\
                     if [ -e \"$T/fail-run\" ]; then echo \"$t\" | sed 's|}$|,\"error\":{\"stage\":\"run\",\"kind\":\"permanent\",\"message\":\"builder failed\"}}|'; exit 1; fi\n\
                     echo \"$t\" | sed",
                    1
                )
            ),
        );
        self.script(
            "nsh-fetch",
            &format!(
                "{TOOL_PRELUDE}touch {out}\n\
                 if [ -e \"$T/linger\" ]; then sleep 30 & echo $! > \"$T/linger-pid\"; fi\n{}",
                add(r#""fetch":{"paths":[],"bytes":0}"#)
            ),
        );
    }

    /// Starts the hook as the daemon would: argv [nsh-hook, 3], fd 4 = the
    /// log file, stdin/stderr piped.
    fn spawn(&self) -> Child {
        let log = fs::File::create(self.path("build.log")).unwrap();
        let log_fd = log.as_raw_fd();
        let mut cmd = Command::new(self.hook());
        // As the daemon starts it: its own process group (setsid, there).
        cmd.process_group(0);
        cmd.arg("3")
            .env("NSH_CONFIG", self.path("nsh.toml"))
            .env("T", self.dir.path())
            .env("NSH_BIN_DIR", self.bin())
            .env("NSH_TICKET_LOG", self.path("tickets.jsonl"))
            .env("NSH_PROBE_DIR", self.path("probe"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        unsafe {
            cmd.pre_exec(move || {
                // dup2 onto itself would keep close-on-exec: clear it instead.
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
        // ETXTBSY: another test thread forked while this site's copy of the
        // hook was still open for writing; that fd closes when its child execs.
        let mut tries = 0;
        let child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                result => break result.unwrap(),
            }
        };
        drop(log);
        child
    }

    /// Runs the hook on `input` (then EOF); returns (exit code, stderr).
    fn run(&self, input: &[u8]) -> (i32, String) {
        let mut child = self.spawn();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let status = wait_for(&mut child, Duration::from_secs(30)).expect("the hook did not exit");
        (status, stderr)
    }

    /// Adds a line to `[hook]` (the config's last table).
    fn add_hook_key(&self, line: &str) {
        let config = fs::read_to_string(self.path("nsh.toml")).unwrap() + line + "\n";
        fs::write(self.path("nsh.toml"), config).unwrap();
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).unwrap_or_default()
    }
}

fn wait_for(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn eventually(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nix_lines(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("@nix "))
        .map(|j| serde_json::from_str(j).expect("valid @nix JSON"))
        .collect()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn declines_what_no_cluster_fits_and_exits_at_eof() {
    let site = Site::new("", 2);
    let (code, stderr) = site.run(&cat(&[
        &settings(),
        &try_(true, "aarch64-linux", &[]),
        &try_(true, "x86_64-linux", &["kvm"]),
    ]));
    assert_eq!(stderr, "# decline\n# decline\n");
    assert_eq!(code, 0);
}

#[test]
fn postpones_when_every_slot_is_taken_and_the_daemon_cannot_build() {
    let site = Site::new("", 1);
    let _held = SlotDir::new(site.path("slots"))
        .acquire("main", 1)
        .unwrap()
        .unwrap();
    let (code, stderr) = site.run(&cat(&[
        &settings(),
        &try_(false, "x86_64-linux", &[]),
        // With a free local slot, the daemon builds it itself.
        &try_(true, "x86_64-linux", &[]),
    ]));
    assert_eq!(stderr, "# postpone\n# decline\n");
    assert_eq!(code, 0);
}

#[test]
fn a_broken_configuration_declines_permanently_and_says_why() {
    let site = Site::new("", 1);
    fs::write(site.path("nsh.toml"), "[cluster.main]\nsystems = 3\n").unwrap();
    let (code, stderr) = site.run(&cat(&[&settings(), &try_(true, "x86_64-linux", &[])]));
    assert_eq!(code, 0);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    let msg = &nix_lines(lines[0])[0];
    assert_eq!(msg["action"], "msg");
    assert_eq!(msg["level"], 0);
    assert!(
        msg["msg"]
            .as_str()
            .unwrap()
            .contains("nsh.toml: TOML parse error at line 2"),
        "{msg}"
    );
    assert_eq!(lines[1], "# decline-permanently");
}

/// Lix 2.91–2.93 dump only the overridden settings: here none at all, the
/// dump being its end marker alone.
#[test]
fn a_lix_dump_without_settings_gets_nix_defaults() {
    let site = Site::new("", 1);
    let no_settings = 0u64.to_le_bytes();
    let (code, stderr) = site.run(&cat(&[
        &no_settings,
        &try_(false, "x86_64-linux", &["big-parallel"]),
        &accepted(),
    ]));
    assert!(stderr.starts_with("# accept\nslurm://main\n"), "{stderr}");
    assert_eq!(code, 0, "{stderr}");
    let first: Value = serde_json::from_str(site.read("seen-nsh-closure").trim()).unwrap();
    assert_eq!(
        first["store"],
        serde_json::json!({"dir": "/nix/store", "uri": "auto"})
    );
    assert_eq!(
        first["options"],
        serde_json::json!({"max_silent_time": 0, "timeout": 0, "max_log_size": 0, "keep_failed": false})
    );
    // Every slot taken: by Nix's defaults this daemon builds x86_64-linux
    // with big-parallel itself, so the try is declined; postponed only when
    // the daemon has no free slot.
    if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        let _held = SlotDir::new(site.path("slots"))
            .acquire("main", 1)
            .unwrap()
            .unwrap();
        let (code, stderr) = site.run(&cat(&[
            &no_settings,
            &try_(true, "x86_64-linux", &["big-parallel"]),
            &try_(false, "x86_64-linux", &["big-parallel"]),
        ]));
        assert_eq!((code, stderr.as_str()), (0, "# decline\n# postpone\n"));
    }
}

/// Every setting, as Nix 2.34.8 dumped them (122), then its try and accept.
#[test]
fn a_real_nix_2_34_dump_of_every_setting() {
    let site = Site::new("", 1);
    let transcript = include_bytes!("../../../core/tests/fixtures/hook/nix-2.34-accept.bin");
    let (_, stderr) = site.run(transcript);
    assert!(stderr.starts_with("# accept\nslurm://main\n"), "{stderr}");
    let first: Value = serde_json::from_str(site.read("seen-nsh-closure").trim()).unwrap();
    assert_eq!(first["drv"]["name"], "nsh-hook-top");
    assert_eq!(first["drv"]["wanted"], serde_json::json!(["doc", "out"]));
    assert_eq!(first["store"]["uri"], "auto");
    assert_eq!(
        first["options"],
        serde_json::json!({"max_silent_time": 0, "timeout": 0, "max_log_size": 0, "keep_failed": false})
    );
}

#[test]
fn accepts_and_runs_the_tools_with_the_log_on_fd_4_of_nsh_run_only() {
    let site = Site::new("", 2);
    let (code, stderr) = site.run(&cat(&[
        &settings(),
        &try_(false, "x86_64-linux", &["big-parallel"]),
        &accepted(),
    ]));
    assert!(stderr.starts_with("# accept\nslurm://main\n"), "{stderr}");
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("SECRET"));

    // The first ticket, as the hook made it.
    let first: Value = serde_json::from_str(site.read("seen-nsh-closure").trim()).unwrap();
    assert_eq!(first["drv"]["path"], DRV);
    assert_eq!(first["drv"]["name"], "hello");
    assert_eq!(first["drv"]["wanted"], serde_json::json!(["out"]));
    assert_eq!(
        first["drv"]["features"],
        serde_json::json!(["big-parallel"])
    );
    assert_eq!(
        first["store"],
        serde_json::json!({"dir": "/nix/store", "uri": "auto"})
    );
    assert_eq!(
        first["options"],
        serde_json::json!({"max_silent_time": 7, "timeout": 3600, "max_log_size": 65536, "keep_failed": true})
    );
    // Each stage got the previous one's ticket.
    assert!(site
        .read("seen-nsh-fetch")
        .contains(r#""run":{"status":"built"}"#));

    assert_eq!(site.read("build.log"), "hello from the build\n");
    assert_eq!(
        site.read("fds"),
        "nsh-run fd4 4\n",
        "only nsh-run gets fd 4; no tool gets the hook's stderr"
    );
    assert!(site
        .read("env")
        .lines()
        .all(|l| l.ends_with("cluster=main")));

    assert_one_activity_per_stage(&stderr);
    assert_the_ticket_log(&site);
}

/// Progress: one activity per stage, each stopped.
fn assert_one_activity_per_stage(stderr: &str) {
    let lines = nix_lines(stderr);
    let starts: Vec<(u64, String)> = lines
        .iter()
        .filter(|l| l["action"] == "start")
        .map(|l| {
            (
                l["type"].as_u64().unwrap(),
                l["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        starts,
        vec![
            (0, "waiting for a Slurm allocation on main".into()),
            (103, "copying 2 paths to node1 (Slurm job 4242)".into()),
            (105, format!("building '{DRV}' on node1 (Slurm job 4242)")),
            (103, "copying outputs from node1 (Slurm job 4242)".into()),
        ]
    );
    let stops = lines.iter().filter(|l| l["action"] == "stop").count();
    assert_eq!(stops, 4);
}

/// NSH_TICKET_LOG: the final ticket, with the hook's own clock.
fn assert_the_ticket_log(site: &Site) {
    let logged: Vec<Value> = site
        .read("tickets.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logged.len(), 1, "{logged:?}");
    let ticket = &logged[0];
    assert_eq!(ticket["drv"]["path"], DRV);
    assert_eq!(ticket["fetch"]["bytes"], 0);
    let hook = &ticket["hook"];
    assert_eq!(hook["exit"], 0);
    // Which configuration, and why: from the first ticket, kept by every stage.
    let config = site.path("nsh.toml").display().to_string();
    assert_eq!(hook["config"], config.as_str());
    assert_eq!(hook["config_from"], "$NSH_CONFIG");
    let stages = hook["stages"].as_object().unwrap();
    let names: Vec<&str> = stages.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "nsh-closure",
            "nsh-alloc",
            "nsh-push",
            "nsh-run",
            "nsh-fetch"
        ]
    );
    let at = |s: &str| stages[s].as_f64().unwrap();
    assert!(at("nsh-closure") <= at("nsh-alloc") && at("nsh-run") <= at("nsh-fetch"));
    assert!(at("nsh-fetch") <= hook["secs"].as_f64().unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - hook["accepted"].as_f64().unwrap()).abs() < 60.0,
        "{hook}"
    );
    // A successful build is not cancelled.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(site.read("cancelled"), "");
}

#[test]
fn a_lingering_grandchild_does_not_keep_the_daemon_waiting() {
    let site = Site::new("", 1);
    // nsh-fetch leaves a process behind that holds its stdout and stderr.
    fs::write(site.path("linger"), "").unwrap();
    let started = Instant::now();
    let (code, stderr) = site.run(&cat(&[
        &settings(),
        &try_(true, "x86_64-linux", &[]),
        &accepted(),
    ]));
    let took = started.elapsed();
    if let Ok(pid) = site.read("linger-pid").trim().parse::<i32>() {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    assert_eq!(code, 0, "{stderr}");
    // `run` read the hook's stderr to EOF: the grandchild never had it.
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn the_exit_status_follows_the_final_ticket() {
    let site = Site::new("", 1);
    let out = site.out().display().to_string();
    let pipeline = site.script(
        "pipeline.sh",
        &format!(
            "#!/bin/sh\nread -r t\necho 'log line' >&\"$NSH_LOG_FD\"\n\
             t=$(echo \"$t\" | sed 's|\"outputs\":{{}}|\"outputs\":{{\"out\":\"{out}\"}}|')\n\
             case $(cat \"$T/mode\") in\n\
             ok) touch {out}; echo \"$t\";;\n\
             missing) echo \"$t\";;\n\
             permanent|timed-out|transient) echo \"$t\" | sed \"s|}}\\$|,\\\"error\\\":{{\\\"stage\\\":\\\"run\\\",\\\"kind\\\":\\\"$(cat \"$T/mode\")\\\",\\\"message\\\":\\\"boom\\\"}}}}|\"; exit 1;;\n\
             silent) exit 75;;\n\
             esac\n"
        ),
    );
    site.add_hook_key(&format!("pipeline = [\"{}\"]", pipeline.display()));
    // A transient failure of a node's stage is run again, twice (the
    // default `retries`), before Nix is told: three builds, three logs.
    for (mode, want, said, attempts) in [
        ("ok", 0, "", 1),
        ("missing", 1, "not valid in the local store", 1),
        ("permanent", 100, "run failed (permanent): boom", 1),
        ("timed-out", 101, "run failed (timed-out): boom", 1),
        (
            "transient",
            1,
            "trying again in a new job (attempt 3 of 3)",
            3,
        ),
        ("silent", 1, "wrote no final ticket", 1),
    ] {
        let _ = fs::remove_file(site.out());
        fs::write(site.path("mode"), mode).unwrap();
        let (code, stderr) = site.run(&cat(&[
            &settings(),
            &try_(true, "x86_64-linux", &[]),
            &accepted(),
        ]));
        assert_eq!(code, want, "{mode}: {stderr}");
        assert!(stderr.contains(said), "{mode}: {stderr}");
        assert_eq!(
            site.read("build.log"),
            "log line\n".repeat(attempts),
            "{mode}"
        );
    }
    // NSH_TICKET_LOG: one line per build that wrote a ticket, with the
    // hook's exit status.
    let exits: Vec<i64> = site
        .read("tickets.jsonl")
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["hook"]["exit"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(exits, [0, 1, 100, 101, 1]);
}

/// Starts an accepted build whose nsh-run hangs; returns the hook once the
/// build is under way.
fn start_hanging_build(site: &Site) -> Child {
    fs::write(site.path("hang"), "").unwrap();
    let mut child = site.spawn();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(&cat(&[
            &settings(),
            &try_(true, "x86_64-linux", &[]),
            &accepted(),
        ]))
        .unwrap();
    // Keep stdin open, as the daemon may.
    std::mem::forget(stdin);
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert_eq!(line, "# accept\n");
    eventually("nsh-run to start", Duration::from_secs(10), || {
        site.path("run-pid").exists()
    });
    // Drain the rest so the hook never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = stderr.read_to_string(&mut sink);
    });
    child
}

#[test]
fn sigterm_stops_the_pipeline_cancels_the_job_and_exits_within_2s() {
    let site = Site::new("", 1);
    let mut hook = start_hanging_build(&site);
    let run_pid: i32 = site.read("run-pid").trim().parse().unwrap();
    let started = Instant::now();
    unsafe { libc::kill(hook.id() as i32, libc::SIGTERM) };
    let code = wait_for(&mut hook, Duration::from_secs(5)).expect("the hook did not exit");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(code, 1);
    // By the watchdog, told at the signal, outside the hook's group.
    eventually("the job to be cancelled", Duration::from_secs(2), || {
        site.read("cancelled").contains(r#""job":4242"#)
    });
    let cancelled: Value = serde_json::from_str(site.read("cancelled").trim()).unwrap();
    assert_eq!(cancelled["alloc"]["job"], 4242);
    assert!(
        !Path::new(&format!("/proc/{run_pid}")).exists(),
        "nsh-run still runs"
    );
    // The slot is free again.
    assert!(SlotDir::new(site.path("slots"))
        .acquire("main", 1)
        .unwrap()
        .is_some());
}

#[test]
fn a_killed_hook_leaves_the_cancel_to_its_watchdog() {
    let site = Site::new("", 1);
    let mut hook = start_hanging_build(&site);
    eventually("nsh-alloc's ticket to pass", Duration::from_secs(5), || {
        site.read("seen-nsh-run").contains("4242")
    });
    // As the daemon does: SIGKILL to the hook's process group.
    unsafe { libc::kill(-(hook.id() as i32), libc::SIGKILL) };
    let _ = hook.wait();
    eventually(
        "the watchdog to cancel the job",
        Duration::from_secs(10),
        || site.read("cancelled").contains("4242"),
    );
}

/// The processes whose environment has this site's `T` (every stage, the
/// watchdog and what they start).
fn processes_of(site: &Site) -> Vec<String> {
    let needle = format!("T={}", site.dir.path().display());
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
        })
        .collect()
}

#[test]
fn nix_2_35_stopping_the_hook_cancels_the_job_and_leaves_nothing() {
    let site = Site::new("", 1);
    let mut hook = start_hanging_build(&site);
    eventually("nsh-alloc's ticket to pass", Duration::from_secs(5), || {
        site.read("seen-nsh-run").contains("4242")
    });
    // As Nix 2.35 does: SIGTERM to the group, SIGKILL 500 ms later if the
    // hook is still there.
    let group = -(hook.id() as i32);
    unsafe { libc::kill(group, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_millis(500);
    while hook.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if hook.try_wait().unwrap().is_none() {
        unsafe { libc::kill(group, libc::SIGKILL) };
    }
    let _ = hook.wait();
    eventually("the job to be cancelled", Duration::from_secs(5), || {
        site.read("cancelled").contains(r#""job":4242"#)
    });
    eventually("every process to end", Duration::from_secs(5), || {
        processes_of(&site).is_empty()
    });
}

#[test]
fn a_hook_killed_while_nsh_alloc_waits_leaves_nsh_alloc_to_cancel_its_job() {
    let site = Site::new("", 1);
    fs::write(site.path("hang-alloc"), "").unwrap();
    let mut hook = site.spawn();
    let mut stdin = hook.stdin.take().unwrap();
    stdin
        .write_all(&cat(&[
            &settings(),
            &try_(true, "x86_64-linux", &[]),
            &accepted(),
        ]))
        .unwrap();
    std::mem::forget(stdin);
    eventually("nsh-alloc to wait", Duration::from_secs(10), || {
        site.path("alloc-pid").exists()
    });
    // As the daemon does: SIGKILL to the hook's process group, while no
    // ticket has told the watchdog of a job.
    unsafe { libc::kill(-(hook.id() as i32), libc::SIGKILL) };
    let _ = hook.wait();
    // Once or more: the parent-death signal is sent each time nsh-alloc's
    // parent *thread* dies, and a process killed whole loses its threads
    // one by one, nsh-alloc being handed to a surviving thread of the same
    // hook each time (Linux reparents to a live thread of the dying process
    // first). Which is harmless: nsh-alloc only sets a flag.
    eventually("nsh-alloc to get SIGTERM", Duration::from_secs(5), || {
        let term = site.read("alloc-term");
        !term.is_empty() && term.lines().all(|l| l == "TERM")
    });
}

const PROBE_NONCE: &str = "5f0c2a9e8b7d6c5e4f3a2b1c0d9e8f7a";

/// The `try` of `nsh-hook --check`'s probe derivation.
fn probe_try() -> Vec<u8> {
    let name = format!("nsh-probe-{PROBE_NONCE}");
    Try {
        am_willing: false,
        needed_system: "x86_64-linux".into(),
        drv_path: format!("/nix/store/9wz4rz0z6nxsdmyyq3amsirnkbm7yhgv-{name}.drv")
            .parse()
            .unwrap(),
        required_features: vec![name],
    }
    .to_bytes()
}

#[test]
fn the_check_probe_is_declined_with_a_marker_even_with_a_broken_configuration() {
    let site = Site::new("", 1);
    fs::create_dir(site.path("probe")).unwrap();
    fs::set_permissions(site.path("probe"), fs::Permissions::from_mode(0o700)).unwrap();
    for broken in [false, true] {
        if broken {
            fs::write(site.path("nsh.toml"), "[cluster.main]\nsystems = 3\n").unwrap();
        }
        let after_accept = if broken { vec![] } else { accepted() };
        let (code, stderr) = site.run(&cat(&[
            &settings(),
            &probe_try(),
            &try_(true, "x86_64-linux", &["big-parallel"]),
            &after_accept,
        ]));
        assert_eq!(code, 0, "{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        // The probe: a message and a decline; then the next try as usual.
        let said = &nix_lines(lines[0])[0];
        assert_eq!(said["level"], 3, "{said}");
        assert!(
            said["msg"]
                .as_str()
                .unwrap()
                .contains(&format!("probe {PROBE_NONCE}: marker left")),
            "{said}"
        );
        assert_eq!(lines[1], "# decline");
        let marker: Value =
            serde_json::from_str(&site.read(&format!("probe/{PROBE_NONCE}.json"))).unwrap();
        fs::remove_file(site.path(&format!("probe/{PROBE_NONCE}.json"))).unwrap();
        assert_eq!(marker["exe"], site.hook().display().to_string());
        assert_eq!(
            marker["config"],
            site.path("nsh.toml").display().to_string()
        );
        assert_eq!(marker["config_source"], "$NSH_CONFIG");
        assert_eq!(
            marker["build_hook"],
            Value::Null,
            "this dump has no build-hook"
        );
        if broken {
            assert!(
                marker["config_error"]
                    .as_str()
                    .unwrap()
                    .contains("nsh.toml"),
                "{marker}"
            );
            assert_eq!(lines.last().unwrap(), &"# decline-permanently", "{stderr}");
        } else {
            assert_eq!(marker["config_error"], Value::Null);
            assert!(lines[2].starts_with("# accept"), "{stderr}");
        }
    }
}

#[test]
fn a_probe_marker_is_never_written_into_a_directory_others_can_reach() {
    let site = Site::new("", 1);
    fs::create_dir(site.path("probe")).unwrap();
    fs::set_permissions(site.path("probe"), fs::Permissions::from_mode(0o755)).unwrap();
    let (code, stderr) = site.run(&cat(&[&settings(), &probe_try()]));
    assert_eq!(code, 0);
    let said = &nix_lines(&stderr)[0];
    assert_eq!(said["level"], 1, "a warning: {said}");
    assert!(
        said["msg"]
            .as_str()
            .unwrap()
            .contains("no marker: the probe directory"),
        "{said}"
    );
    assert!(stderr.ends_with("# decline\n"), "{stderr}");
    assert!(!site.path(&format!("probe/{PROBE_NONCE}.json")).exists());
}

#[test]
fn a_declined_try_goes_to_the_fallback_hook_which_is_then_relayed() {
    let site = Site::new("", 1);
    let fallback = site.script(
        "fallback.sh",
        "#!/bin/sh\necho \"$@\" > \"$T/fallback-argv\"\nls -l /proc/$$/fd > \"$T/fallback-fds\"\nprintf '# accept\\nssh://builder\\n' >&2\n\
         cat > \"$T/fallback-stdin\"\necho '@nix {\"action\":\"msg\",\"level\":3,\"msg\":\"built remotely\"}' >&2\n\
         echo 'remote log' >&4\nexit 100\n",
    );
    site.add_hook_key(&format!("fallback = [\"{}\"]", fallback.display()));
    let try_bytes = try_(true, "aarch64-linux", &[]);
    let (code, stderr) = site.run(&cat(&[&settings(), &try_bytes, &accepted()]));
    assert_eq!(
        stderr,
        "# accept\nssh://builder\n@nix {\"action\":\"msg\",\"level\":3,\"msg\":\"built remotely\"}\n"
    );
    assert_eq!(code, 100, "the fallback's exit status is the hook's");
    assert_eq!(site.read("fallback-argv"), "3\n");
    assert_eq!(
        fs::read(site.path("fallback-stdin")).unwrap(),
        cat(&[&settings(), &try_bytes, &accepted()]),
        "the fallback saw exactly what the daemon sent"
    );
    assert_eq!(site.read("build.log"), "remote log\n");
}

#[test]
fn a_fallback_that_declines_is_declined_and_nsh_still_takes_what_fits() {
    let site = Site::new("", 1);
    let fallback = site.script(
        "fallback.sh",
        "#!/bin/sh\nprintf '# decline\\n' >&2\ncat > \"$T/fallback-stdin\"\n",
    );
    site.add_hook_key(&format!("fallback = [\"{}\"]", fallback.display()));
    let (code, stderr) = site.run(&cat(&[&settings(), &try_(true, "aarch64-linux", &[])]));
    assert_eq!(stderr, "# decline\n");
    assert_eq!(code, 0);
}

fn hook_sh_site() -> Site {
    let site = Site::new("", 1);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hook.sh.example");
    site.add_hook_key(&format!("pipeline = [\"{}\"]", script.display()));
    site
}

#[test]
fn hook_sh_example_as_the_pipeline_command() {
    let site = hook_sh_site();
    let (code, stderr) = site.run(&cat(&[
        &settings(),
        &try_(true, "x86_64-linux", &[]),
        &accepted(),
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(site.read("seen-nsh-fetch").contains(r#""push":{"#));
    assert_eq!(site.read("build.log"), "hello from the build\n");
    let fd4: Vec<String> = site
        .read("fds")
        .lines()
        .filter(|l| l.contains("fd4"))
        .map(String::from)
        .collect();
    assert_eq!(fd4, vec!["nsh-run fd4 4"], "only nsh-run keeps the log fd");
    assert_eq!(site.read("cancelled"), "", "a good build is not cancelled");
}

#[test]
fn hook_sh_example_cancels_the_job_when_the_build_fails() {
    let site = hook_sh_site();
    fs::write(site.path("fail-run"), "").unwrap();
    let (code, stderr) = site.run(&cat(&[
        &settings(),
        &try_(true, "x86_64-linux", &[]),
        &accepted(),
    ]));
    assert_eq!(code, 100, "{stderr}");
    assert!(
        stderr.contains("run failed (permanent): builder failed"),
        "{stderr}"
    );
    assert!(site.read("cancelled").contains(r#""job":4242"#));
    assert_eq!(
        site.read("seen-nsh-fetch"),
        "",
        "no stage after the failed one"
    );
}

#[test]
fn hook_sh_example_cancels_the_job_on_sigterm_within_2s() {
    let site = hook_sh_site();
    let mut hook = start_hanging_build(&site);
    let run_pid: i32 = site.read("run-pid").trim().parse().unwrap();
    let started = Instant::now();
    unsafe { libc::kill(hook.id() as i32, libc::SIGTERM) };
    let code = wait_for(&mut hook, Duration::from_secs(5)).expect("the hook did not exit");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(code, 1);
    eventually("the script to cancel", Duration::from_secs(2), || {
        site.read("cancelled").contains(r#""job":4242"#)
    });
    assert!(
        !Path::new(&format!("/proc/{run_pid}")).exists(),
        "nsh-run still runs"
    );
}

#[test]
fn garbage_from_the_daemon_is_a_clean_error() {
    let site = Site::new("", 1);
    let real = cat(&[&settings(), &try_(true, "x86_64-linux", &[]), &accepted()]);
    let mut huge_string = settings();
    huge_string.extend_from_slice(&u64::MAX.to_le_bytes());
    for input in [
        b"hello, hook\n".to_vec(),
        vec![0xff; 64],
        real[..real.len() / 2].to_vec(),
        real[..settings().len() + 5].to_vec(),
        huge_string,
    ] {
        let started = Instant::now();
        let (code, stderr) = site.run(&input);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(code == 1 || code == 0, "{code}: {stderr}");
        for line in stderr.lines() {
            assert!(
                line.starts_with("@nix ") || line.starts_with("# "),
                "only protocol lines on stderr: {line:?}"
            );
        }
    }
}

#[test]
fn help_and_version() {
    let help = assert_cmd::Command::cargo_bin("nsh-hook")
        .unwrap()
        .arg("--help")
        .assert()
        .success();
    let out = String::from_utf8_lossy(&help.get_output().stdout).to_string();
    assert!(out.contains("build-hook"), "{out}");
    assert_cmd::Command::cargo_bin("nsh-hook")
        .unwrap()
        .arg("--version")
        .assert()
        .success()
        .stdout(predicates::str::starts_with("nsh-hook "));
}
