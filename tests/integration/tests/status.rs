//! `nsh-status` against the real cluster (`docs/nsh-status.md`): a build in
//! flight shows, as JSON and as a table, with its derivation, stage,
//! cluster, job (the one squeue lists) and node; its job shows in the pool
//! once the build gave it back; a failed build shows with its reason; a
//! build the nix-daemon's hook runs shows to root, from `/run/nsh`; a
//! user other than root sees its own runtime directory (the CLI backend
//! asking Slurm as that user); and the CI user `nshci` sees its own build
//! while it runs on a node, then its job in its own pool.
//!
//! Each test but the daemon's has a runtime directory of its own (the CI
//! user's, `/tmp/nsh-<uid>`, no other test here uses), so that tests
//! running at the same time never see each other's builds or jobs.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nsh_cluster_tests::{
    as_ci_user, ci_config, instantiate, nsh_tool, pipeline_script, run_ok, runnable_by_anyone,
    slurm_cmd, uid_of, unique_salt, wait_bounded, Cluster, PrivateSite, CI_TRUSTED,
};
use serde_json::Value;

/// A derivation built by `/bin/sh -c <script>`, no inputs.
fn drv(c: &Cluster, name: &str, script: &str) -> String {
    instantiate(
        c,
        &format!(
            r#"builtins.derivation {{
                 name = "{name}";
                 system = "x86_64-linux";
                 builder = "/bin/sh";
                 args = [ "-c" {script:?} ];
                 salt = "{}";
               }}"#,
            unique_salt()
        ),
    )
}

/// One test's site: a configuration whose jobs linger in the pool
/// (`linger = 20`), a runtime directory, and the jobs seen (let go when the
/// test ends).
struct Site {
    site: PrivateSite,
}

impl std::ops::Deref for Site {
    type Target = PrivateSite;
    fn deref(&self) -> &PrivateSite {
        &self.site
    }
}

impl Site {
    /// `cluster_keys` (one `key = value` per line) replace the cluster's own
    /// in `[cluster.test]`.
    fn new(cluster_keys: &str) -> Site {
        Site {
            site: PrivateSite::new(
                "nsh-status-test",
                &format!("linger = 20\n{cluster_keys}"),
                "",
            ),
        }
    }

    /// Starts the whole pipeline for `drv`, as a shell runs it by hand:
    /// closure, alloc, push, run, fetch, and the job given back.
    fn start_build(&self, drv: &str) -> Child {
        let tool = |name: &str| nsh_tool(name).display().to_string();
        let script = format!(
            "{} \"$1\" | {} | {} | {} | {} | {} --cancel",
            tool("nsh-closure"),
            tool("nsh-alloc"),
            tool("nsh-push"),
            tool("nsh-run"),
            tool("nsh-fetch"),
            tool("nsh-alloc"),
        );
        let mut cmd = self.c.command("sh");
        cmd.env("NSH_CONFIG", &self.config)
            .env("NSH_RUNTIME_DIR", self.runtime())
            .args(["-c", &script, "sh", drv])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().unwrap()
    }

    /// The final ticket of a pipeline started by [`Site::start_build`],
    /// its job noted for the clean-up.
    fn finish_build(&self, build: Child) -> Value {
        let out = build.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let ticket: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "no ticket ({e}): {stdout:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        if let Some(job) = ticket["alloc"]["job"].as_u64() {
            self.note_job(job);
        }
        ticket
    }

    /// `nsh-status ARGS` with this site's configuration: (status, stdout).
    fn status(&self, args: &[&str]) -> (i32, String) {
        let out = self.tool("nsh-status").args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8(out.stdout).unwrap(),
        )
    }

    /// `nsh-status --json ARGS`, which must succeed: its rows.
    fn rows(&self, args: &[&str]) -> Vec<Value> {
        let (status, stdout) = self.status(&[&["--json"], args].concat());
        assert_eq!(status, 0, "{stdout}");
        json_rows(&stdout)
    }
}

fn json_rows(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The rows of `kind` whose `key` is `value`.
fn matching<'a>(rows: &'a [Value], kind: &str, key: &str, value: &Value) -> Vec<&'a Value> {
    rows.iter()
        .filter(|r| r["kind"] == kind && &r[key] == value)
        .collect()
}

/// Asks `rows_now` until one row has `stage` for `drv`, within `within`.
fn await_stage(rows_now: impl Fn() -> Vec<Value>, drv: &str, stage: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows = rows_now();
        if let Some(row) = matching(&rows, "build", "drv", &drv.into())
            .into_iter()
            .find(|r| r["stage"] == stage)
        {
            return row.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{drv} never reached stage {stage}: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `table` (`nsh-status --table`) has `drv`'s line: stage `run` on
/// cluster `test`, `job`, `node`.
fn table_shows_running(table: &str, drv: &str, job: u64, node: &str) {
    let base = drv.rsplit('/').next().unwrap();
    let line = table
        .lines()
        .find(|l| l.starts_with(base))
        .unwrap_or_else(|| panic!("{base} not in the table:\n{table}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        cells[1..5],
        ["run", "test", &job.to_string(), node],
        "{table}"
    );
}

/// Root's `nsh-status --json ARGS`, no runtime directory named (so
/// `/run/nsh`), which must succeed: its rows.
fn root_rows(c: &Cluster, args: &[&str]) -> Vec<Value> {
    let out = c
        .command(nsh_tool("nsh-status"))
        .arg("--json")
        .args(args)
        .env_remove("NSH_RUNTIME_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_rows(&String::from_utf8(out.stdout).unwrap())
}

/// What squeue says of `job`: (state, node).
fn squeue(c: &Cluster, job: u64) -> (String, String) {
    let out = slurm_cmd(c, "squeue", &["-h", "-j", &job.to_string(), "-o", "%T %N"]);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (state, node) = text.split_once(' ').unwrap_or((&text, ""));
    (state.to_string(), node.to_string())
}

#[test]
fn status_shows_a_running_build_as_json_and_as_a_table_then_its_job_in_the_pool() {
    let site = Site::new("");
    let c = &site.c;
    let drv = drv(c, "status-slow", "/bin/sleep 12; echo built > $out");
    let build = site.start_build(&drv);
    let row = await_stage(|| site.rows(&["--builds"]), &drv, "run");
    let job = row["job"].as_u64().expect("a job while it runs");
    let node = row["node"]
        .as_str()
        .expect("a node while it runs")
        .to_string();
    assert_eq!(row["cluster"], "test", "{row}");
    assert!(drv.ends_with(&format!("-{}.drv", row["name"].as_str().unwrap())));
    assert_eq!(row["slurm"], "RUNNING", "{row}");
    assert_eq!(squeue(c, job), ("RUNNING".to_string(), node.clone()));
    // The same, as a table for a person.
    let (status, table) = site.status(&["--table", "--builds"]);
    assert_eq!(status, 0, "{table}");
    table_shows_running(&table, &drv, job, &node);
    assert!(
        table.starts_with("Builds in flight:\nDERIVATION"),
        "{table}"
    );

    let ticket = site.finish_build(build);
    assert!(ticket.get("error").is_none(), "{ticket}");
    assert_eq!(ticket["alloc"]["job"], job);
    let rows = site.rows(&[]);
    assert!(
        matching(&rows, "build", "drv", &drv.clone().into()).is_empty(),
        "{rows:?}"
    );
    // Given back, the job waits in the pool for the next build.
    let jobs = matching(&rows, "job", "job", &job.into());
    assert_eq!(jobs.len(), 1, "{rows:?}");
    assert_eq!(jobs[0]["state"], "idle", "{rows:?}");
    assert_eq!(jobs[0]["node"], node.as_str());
    assert_eq!(jobs[0]["slurm"], "RUNNING");
    assert!(jobs[0]["leaves_in"].as_u64().unwrap() <= 20);
    let (status, table) = site.status(&["--table", "--jobs"]);
    assert_eq!(status, 0, "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("test ") && l.contains(&format!(" {job} "))),
        "{table}"
    );
}

#[test]
fn status_shows_a_failed_build_with_its_reason_and_says_when_slurm_is_down() {
    let site = Site::new("");
    let c = &site.c;
    let drv = drv(c, "status-fails", "echo about to fail; exit 3");
    let ticket = site.finish_build(site.start_build(&drv));
    assert_eq!(ticket["error"]["stage"], "run", "{ticket}");
    let rows = site.rows(&["--failures"]);
    let failed = matching(&rows, "failure", "drv", &drv.clone().into());
    assert_eq!(failed.len(), 1, "{rows:?}");
    let failed = failed[0];
    assert_eq!(failed["stage"], "run");
    assert_eq!(failed["error"], "permanent");
    assert_eq!(failed["exit"], 1);
    assert_eq!(failed["cluster"], "test");
    assert_eq!(failed["job"], ticket["alloc"]["job"]);
    assert_eq!(failed["node"], ticket["alloc"]["node"]);
    assert_eq!(failed["reason"], ticket["error"]["message"]);
    assert!(
        failed["reason"].as_str().unwrap().contains("exit code 3"),
        "{failed}"
    );
    let (status, table) = site.status(&["--table", "--failures"]);
    assert_eq!(status, 0, "{table}");
    // One line of it, without store hashes.
    assert!(
        table.contains("build of status-fails.drv failed (permanent-failure) on"),
        "{table}"
    );

    // With slurmrestd out of reach, what nsh recorded is shown all the
    // same, each job's Slurm state unknown, and the status says so (75).
    let down = Site::new("url = \"http://127.0.0.1:9\"");
    std::fs::create_dir_all(down.runtime()).unwrap();
    std::fs::copy(
        site.runtime().join("failures.jsonl"),
        down.runtime().join("failures.jsonl"),
    )
    .unwrap();
    let (status, stdout) = down.status(&["--json"]);
    assert_eq!(status, 0, "no job to ask about: {stdout}");
    assert_eq!(json_rows(&stdout).len(), 1, "{stdout}");
    // A pooled job (a record as nsh-alloc writes it) to ask about.
    let pool = down.runtime().join("pool/test");
    std::fs::create_dir_all(&pool).unwrap();
    for dir in [down.runtime(), down.runtime().join("pool"), pool.clone()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let record = serde_json::json!({
        "job": 999_999, "node": "node1", "backend": "rest", "env": "e", "started": now,
        "ends": now + 600, "linger": 60, "request": 1, "last_used": now, "owner": null,
    });
    let record_path = pool.join("job-999999.json");
    std::fs::write(&record_path, record.to_string()).unwrap();
    let (status, stdout) = down.status(&["--json"]);
    std::fs::remove_file(&record_path).unwrap();
    assert_eq!(status, 75, "{stdout}");
    let rows = json_rows(&stdout);
    assert_eq!(rows.len(), 2, "{stdout}");
    let job = matching(&rows, "job", "job", &999_999.into());
    assert_eq!(job.len(), 1, "{stdout}");
    assert!(job[0]["slurm"].is_null(), "{stdout}");
    assert!(job[0]["slurm_error"].is_string(), "{stdout}");
}

/// The build account running the tools (`runuser`), with its own
/// `XDG_RUNTIME_DIR`.
struct AsUser<'a> {
    site: &'a Site,
    name: String,
    xdg: PathBuf,
}

impl AsUser<'_> {
    /// Starts `tool` as this user, `stdin` written to it; `owner`: the
    /// pool owner's pid.
    fn spawn(&self, tool: &str, args: &[&str], stdin: &str, owner: Option<u32>) -> Child {
        use std::io::Write;
        let mut cmd = Command::new("runuser");
        if let Some(pid) = owner {
            cmd.env("NSH_POOL_OWNER", pid.to_string());
        }
        let mut child = cmd
            .args(["-u", &self.name, "--"])
            .arg(runnable_by_anyone(&nsh_tool(tool)))
            .args(args)
            .envs(self.site.c.envs())
            .env("NSH_CONFIG", &self.site.config)
            .env_remove("NSH_RUNTIME_DIR")
            .env("XDG_RUNTIME_DIR", &self.xdg)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{stdin}").unwrap();
        child
    }

    /// Runs `tool` to its end: (status, stdout, stderr).
    fn run(
        &self,
        tool: &str,
        args: &[&str],
        stdin: &str,
        owner: Option<u32>,
    ) -> (i32, String, String) {
        let out = self
            .spawn(tool, args, stdin, owner)
            .wait_with_output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `nsh-status --json ARGS` as this user, which must succeed: its rows.
    fn rows(&self, args: &[&str]) -> Vec<Value> {
        let (status, stdout, stderr) =
            self.run("nsh-status", &[&["--json"], args].concat(), "", None);
        assert_eq!(status, 0, "{stderr}");
        json_rows(&stdout)
    }
}

/// The build account, not root: its runtime directory is
/// `$XDG_RUNTIME_DIR/nsh`, and what it records there is what its
/// `nsh-status` shows (root's shows none of it). The CLI backend asks
/// Slurm as that user.
#[test]
fn status_of_a_user_other_than_root_is_its_own() {
    // One job at most: a second build waits in nsh-alloc for the first's.
    let site = Site::new("backend = \"cli\"\nmax_jobs = 1");
    let c = &site.c;
    let xdg = site.dir.path().join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    run_ok(Command::new("chown").arg(c.user()).arg(&xdg));
    let user = AsUser {
        site: &site,
        name: c.user(),
        xdg,
    };
    let ticket = |name: &str, features: &[&str]| {
        serde_json::json!({"v": 1, "drv": {
            "path": format!("/nix/store/00000000000000000000000000000000-{name}-{}.drv", unique_salt()),
            "name": name, "system": "x86_64-linux", "features": features,
        }})
    };
    // A failure: nothing fits kvm.
    let kvm = ticket("status-kvm", &["kvm"]);
    let (status, _, stderr) = user.run("nsh-alloc", &[], &kvm.to_string(), None);
    assert_eq!(status, 65, "{stderr}");
    // A job held for a build (its owner, as under a hook, a process that
    // lives on). Giving it back is the pool tests' business, and needs ssh
    // to its node: the build account has no key for that here (the test
    // cluster's identity is root's, 0600).
    let mut owner = Command::new("sleep").arg("600").spawn().unwrap();
    let held = ticket("status-user", &[]).to_string();
    let (status, allocated, stderr) = user.run("nsh-alloc", &[], &held, Some(owner.id()));
    assert_eq!(status, 0, "{stderr}");
    let job = serde_json::from_str::<Value>(allocated.trim()).unwrap()["alloc"]["job"]
        .as_u64()
        .unwrap();
    site.note_job(job);
    // A build in flight: waiting for the only job.
    let waits = ticket("status-waits", &[]);
    let mut waiting = user.spawn("nsh-alloc", &[], &waits.to_string(), Some(owner.id()));
    let row = await_stage(
        || user.rows(&["--builds"]),
        waits["drv"]["path"].as_str().unwrap(),
        "alloc",
    );
    assert_eq!(row["name"], "status-waits");
    let pid = row["pid"].as_u64().unwrap().to_string();
    // It stops when asked (its record goes, its failure is recorded).
    run_ok(Command::new("kill").args(["-TERM", &pid]));
    let stopped = waiting.wait().unwrap();
    assert!(!stopped.success());

    let rows = user.rows(&[]);
    let failed = matching(&rows, "failure", "drv", &kvm["drv"]["path"]);
    assert_eq!(failed.len(), 1, "{rows:?}");
    assert_eq!(failed[0]["stage"], "alloc");
    assert_eq!(failed[0]["exit"], 65);
    assert!(
        failed[0]["reason"].as_str().unwrap().contains("kvm"),
        "{rows:?}"
    );
    let jobs = matching(&rows, "job", "job", &job.into());
    assert_eq!(jobs.len(), 1, "{rows:?}");
    assert_eq!(jobs[0]["state"], "in-use");
    assert_eq!(jobs[0]["owner"], owner.id());
    assert_eq!(
        jobs[0]["slurm"], "RUNNING",
        "the CLI backend, as {}: {rows:?}",
        user.name
    );
    assert!(Path::new(&user.xdg).join("nsh/failures.jsonl").is_file());
    assert!(
        matching(&rows, "build", "drv", &waits["drv"]["path"]).is_empty(),
        "{rows:?}"
    );
    let interrupted = matching(&rows, "failure", "drv", &waits["drv"]["path"]);
    assert_eq!(interrupted.len(), 1, "{rows:?}");
    assert_eq!(interrupted[0]["exit"], 75, "{rows:?}");
    let (status, table, stderr) = user.run("nsh-status", &["--table"], "", None);
    assert_eq!(status, 0, "{stderr}");
    assert!(table.contains("status-kvm"), "{table}");
    // Root's runtime directory is another one: none of it is there.
    let (_, stdout) = site.status(&["--json", "--no-slurm"]);
    assert!(!stdout.contains("status-kvm"), "{stdout}");
    owner.kill().unwrap();
    owner.wait().unwrap();
}

/// Root, with no runtime directory named: `/run/nsh`, where the
/// nix-daemon's hook (root, the daemon's environment) records. A build
/// through the daemon shows there while it runs on a node.
#[test]
fn status_shows_the_daemons_hook_build_to_root() {
    let c = Cluster::get();
    let name = format!("status-hook-{}", unique_salt());
    let expr = format!(
        r#"builtins.derivation {{
             name = "{name}";
             system = builtins.currentSystem;
             builder = "/bin/sh";
             args = [ "-c" "/bin/sleep 12; echo built > $out" ];
           }}"#
    );
    let build = c
        .command("nix-build")
        .args(["-E", &expr, "--no-out-link", "--max-jobs", "0"])
        .args(["--option", "build-hook"])
        .arg(nsh_tool("nsh-hook"))
        .args(["--store", "daemon"])
        .env_remove("NIX_REMOTE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rows_now = || root_rows(&c, &["--builds"]);
    let ours = |rows: &[Value]| -> Option<Value> {
        matching(rows, "build", "name", &name.clone().into())
            .into_iter()
            .find(|r| r["stage"] == "run")
            .cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let row = loop {
        if let Some(row) = ours(&rows_now()) {
            break row;
        }
        assert!(Instant::now() < deadline, "{name} never ran on a node");
        std::thread::sleep(Duration::from_millis(300));
    };
    let job = row["job"].as_u64().unwrap();
    assert_eq!(row["cluster"], "test", "{row}");
    assert_eq!(row["slurm"], "RUNNING", "{row}");
    assert_eq!(
        squeue(&c, job),
        (
            "RUNNING".to_string(),
            row["node"].as_str().unwrap().to_string()
        )
    );
    let out = build.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !rows_now().iter().any(|r| r["name"] == name.as_str()),
        "the build is over"
    );
}

/// `nsh-status ARGS` as the CI user `nshci` with `config`: (status,
/// stdout, stderr).
fn status_as_ci(c: &Cluster, config: &str, args: &[&str]) -> (i32, String, String) {
    let out = as_ci_user(
        c,
        CI_TRUSTED,
        config,
        runnable_by_anyone(&nsh_tool("nsh-status")),
    )
    .args(args)
    .output()
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `nsh-status --json ARGS` as `nshci`, which must succeed: its rows.
fn rows_as_ci(c: &Cluster, config: &str, args: &[&str]) -> Vec<Value> {
    let (status, stdout, stderr) = status_as_ci(c, config, &[&["--json"], args].concat());
    assert_eq!(status, 0, "{stderr}");
    json_rows(&stdout)
}

/// Drains `nshci`'s pool and cancels `job` when the test ends, however
/// it ends: no job of the test is left in the queue.
struct CiPool<'a> {
    c: &'a Cluster,
    config: String,
    job: std::cell::Cell<Option<u64>>,
}

impl Drop for CiPool<'_> {
    fn drop(&mut self) {
        let alloc = runnable_by_anyone(&nsh_tool("nsh-alloc"));
        let _ = as_ci_user(self.c, CI_TRUSTED, &self.config, alloc)
            .arg("--pool-drain")
            .output();
        if let Some(job) = self.job.get() {
            let _ = slurm_cmd(self.c, "scancel", &[&job.to_string()]);
        }
    }
}

/// The CI user `nshci` (tests/cluster/cluster: its own token, ssh key and
/// nsh.toml, trusted by the daemon) runs the pipeline by hand, with no
/// runtime directory given (so `/tmp/nsh-<uid>`). While the build runs on
/// a node, its `nsh-status` shows it, as JSON and as a table, with the job
/// squeue lists (asked with nshci's token) and its node; root's does not
/// (it reads `/run/nsh`). Once `nsh-fetch` has imported through the daemon
/// and given the job back, no build is in flight and the job waits in
/// nshci's pool, idle, for nshci's next build (`docs/pool.md`: a pool is
/// its runtime directory's, so per user); draining the pool ends it.
#[test]
fn status_of_the_ci_user_shows_its_build_on_a_node_then_its_pooled_job() {
    let c = Cluster::get();
    let config = ci_config(&c, CI_TRUSTED, "nsh.toml", 20);
    let pool = CiPool {
        c: &c,
        config: config.clone(),
        job: std::cell::Cell::new(None),
    };
    let drv = drv(&c, "status-ci", "/bin/sleep 12; echo built > $out");
    let build = as_ci_user(&c, CI_TRUSTED, &config, "sh")
        .args(["-c", &pipeline_script(), "sh", &drv])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let row = await_stage(|| rows_as_ci(&c, &config, &["--builds"]), &drv, "run");
    let job = row["job"].as_u64().expect("a job while it runs");
    pool.job.set(Some(job));
    let node = row["node"].as_str().expect("a node").to_string();
    assert_eq!(row["cluster"], "test", "{row}");
    assert_eq!(row["slurm"], "RUNNING", "nshci's token: {row}");
    assert_eq!(squeue(&c, job), ("RUNNING".to_string(), node.clone()));
    let (status, table, stderr) = status_as_ci(&c, &config, &["--table", "--builds"]);
    assert_eq!(status, 0, "{stderr}");
    table_shows_running(&table, &drv, job, &node);
    // Root's runtime directory is /run/nsh: nshci's build is not there.
    let root = root_rows(&c, &["--no-slurm"]);
    assert!(
        !root.iter().any(|r| r["drv"] == drv.as_str()),
        "root's: {root:?}"
    );

    let out = wait_bounded(build, Duration::from_secs(240));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ticket: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "no ticket ({e}): {stdout:?}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "{ticket}");
    assert_eq!(ticket["fetch"]["import_method"], "daemon", "{ticket}");
    assert_eq!(ticket["alloc"]["job"], job, "{ticket}");
    let rows = rows_as_ci(&c, &config, &[]);
    assert!(
        !rows.iter().any(|r| r["kind"] == "build"),
        "nothing in flight: {rows:?}"
    );
    let jobs = matching(&rows, "job", "job", &job.into());
    assert_eq!(jobs.len(), 1, "the job lingers in nshci's pool: {rows:?}");
    assert_eq!(jobs[0]["state"], "idle", "{rows:?}");
    assert_eq!(jobs[0]["node"], node.as_str(), "{rows:?}");
    assert_eq!(jobs[0]["slurm"], "RUNNING", "{rows:?}");
    assert!(jobs[0]["leaves_in"].as_u64().unwrap() <= 20, "{rows:?}");
    assert!(Path::new(&format!("/tmp/nsh-{}/pool/test", uid_of(CI_TRUSTED))).is_dir());

    // Drained (by nshci: its pool), the job leaves the queue.
    let alloc = runnable_by_anyone(&nsh_tool("nsh-alloc"));
    run_ok(as_ci_user(&c, CI_TRUSTED, &config, alloc).arg("--pool-drain"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (state, _) = squeue(&c, job);
        if state.is_empty() || state == "COMPLETED" {
            break;
        }
        assert!(Instant::now() < deadline, "job {job} still {state}");
        std::thread::sleep(Duration::from_millis(300));
    }
}
