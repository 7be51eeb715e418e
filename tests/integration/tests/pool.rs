//! Allocation reuse against the real cluster (`docs/pool.md`): one job
//! serving several builds, a killed owner's job coming back into use or
//! ending by itself, an idle job ending after `linger` with nothing running
//! on the login side, a build that does not fit getting its own job, and
//! `max_jobs` holding with a full pool.
//!
//! Each test has a pool of its own (`NSH_RUNTIME_DIR` in a temporary
//! directory) and a configuration of its own, so that tests running at the
//! same time never take each other's jobs.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nsh_cluster_tests::{
    closure_ticket, instantiate, slurm_cmd, unique_salt, Cluster, PrivateSite,
};
use serde_json::{json, Value};

/// One test's pool: a site of its own (configuration, runtime directory,
/// the jobs it saw: drained, then cancelled, when the test ends whatever
/// happened), its tools logging at debug level.
struct Pool {
    site: PrivateSite,
}

impl std::ops::Deref for Pool {
    type Target = PrivateSite;
    fn deref(&self) -> &PrivateSite {
        &self.site
    }
}

impl Pool {
    /// `cluster_keys` go into `[cluster.test]`, `remote_keys` into
    /// `[remote]` of the cluster's configuration.
    fn new(cluster_keys: &str, remote_keys: &str) -> Pool {
        Pool {
            site: PrivateSite::new("nsh-pool-test", cluster_keys, remote_keys),
        }
    }

    /// A tool with this pool's configuration and runtime directory.
    fn tool(&self, name: &str) -> Command {
        let mut cmd = self.site.tool(name);
        cmd.env("NSH_LOG", "debug");
        cmd
    }

    /// Starts `tool` with `ticket` on stdin; `owner`: the pool owner's pid.
    fn spawn(&self, name: &str, args: &[&str], ticket: &Value, owner: Option<u32>) -> Child {
        let mut cmd = self.tool(name);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(pid) = owner {
            cmd.env("NSH_POOL_OWNER", pid.to_string());
        }
        let mut child = cmd.spawn().unwrap();
        writeln!(child.stdin.take().unwrap(), "{ticket}").unwrap();
        child
    }

    /// Runs one tool to its end: (status, ticket out, stderr).
    fn pipe(&self, name: &str, args: &[&str], ticket: &Value, owner: Option<u32>) -> Step {
        finish(name, self.spawn(name, args, ticket, owner))
    }

    /// The ticket after `nsh-alloc`, the job noted for the clean-up.
    fn allocate(&self, ticket: &Value, owner: Option<u32>) -> Value {
        let step = self.pipe("nsh-alloc", &[], ticket, owner);
        step.ok();
        self.note_job(job_of(&step.ticket));
        step.ticket
    }

    /// A whole build: alloc, push, run, fetch; the final ticket.
    fn build(&self, drv: &str, owner: Option<u32>) -> Value {
        let mut ticket = self.allocate(&closure_ticket(&self.c, drv, Value::Null), owner);
        for tool in ["nsh-push", "nsh-run", "nsh-fetch"] {
            let step = self.pipe(tool, &[], &ticket, owner);
            step.ok();
            ticket = step.ticket;
        }
        ticket
    }

    /// `nsh-alloc --pool-list`, one value per job.
    fn list(&self) -> Vec<Value> {
        let out = self.tool("nsh-alloc").arg("--pool-list").output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// What one tool did.
struct Step {
    tool: String,
    status: i32,
    ticket: Value,
    stderr: String,
}

impl Step {
    fn ok(&self) {
        assert_eq!(self.status, 0, "{}: {}", self.tool, self.stderr);
        assert!(self.ticket.get("error").is_none(), "{}", self.ticket);
    }
}

fn finish(tool: &str, child: Child) -> Step {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let ticket = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{tool} wrote no ticket ({e}): {stdout:?}\n{stderr}"));
    Step {
        tool: tool.to_string(),
        status: out.status.code().unwrap_or(-1),
        ticket,
        stderr,
    }
}

fn job_of(ticket: &Value) -> u64 {
    ticket["alloc"]["job"].as_u64().expect("alloc.job")
}

/// A derivation built by `/bin/sh -c <script>` (no inputs); `features`:
/// its `requiredSystemFeatures`.
fn drv(c: &Cluster, name: &str, script: &str, features: &[&str]) -> String {
    let features: Vec<String> = features.iter().map(|f| format!("{f:?}")).collect();
    instantiate(
        c,
        &format!(
            r#"builtins.derivation {{
                 name = "{name}";
                 system = "x86_64-linux";
                 builder = "/bin/sh";
                 args = [ "-c" {script:?} ];
                 requiredSystemFeatures = [ {} ];
                 salt = "{}";
               }}"#,
            features.join(" "),
            unique_salt()
        ),
    )
}

fn quick(c: &Cluster, name: &str) -> String {
    drv(c, name, "echo built > $out", &[])
}

/// A process to stand for a build's owner (a hook), killed at will.
struct Owner(Child);

impl Owner {
    fn start() -> Owner {
        Owner(Command::new("sleep").arg("600").spawn().unwrap())
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether Slurm still lists `job` as pending or running.
fn in_queue(c: &Cluster, job: u64) -> bool {
    let out = slurm_cmd(c, "squeue", &["-h", "-j", &job.to_string(), "-o", "%T"]);
    let state = String::from_utf8_lossy(&out.stdout);
    matches!(
        state.trim(),
        "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING"
    )
}

/// Waits until `job` has left Slurm's queue; the seconds it took.
fn wait_gone(c: &Cluster, job: u64, within: Duration) -> f64 {
    let start = Instant::now();
    while in_queue(c, job) {
        assert!(
            start.elapsed() < within,
            "job {job} still in the queue after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    start.elapsed().as_secs_f64()
}

#[test]
fn one_job_serves_several_builds() {
    let pool = Pool::new("linger = 30", "");
    let c = &pool.c;
    let tickets: Vec<Value> = (1..=3)
        .map(|i| pool.build(&quick(c, &format!("pool-serial-{i}")), None))
        .collect();
    let jobs: Vec<u64> = tickets.iter().map(job_of).collect();
    assert!(jobs.iter().all(|&j| j == jobs[0]), "one job: {jobs:?}");
    let alloc = |i: usize, key: &str| tickets[i]["alloc"][key].clone();
    assert_eq!(alloc(0, "reused"), false);
    assert_eq!(alloc(1, "reused"), true);
    assert_eq!(alloc(2, "reused"), true);
    assert_eq!(
        [
            alloc(0, "request"),
            alloc(1, "request"),
            alloc(2, "request")
        ],
        [json!(1), json!(2), json!(3)]
    );
    assert!(alloc(2, "age").as_u64().unwrap() >= alloc(1, "age").as_u64().unwrap());
    for t in &tickets {
        assert_eq!(t["run"]["status"], "built", "{t}");
        assert!(!t["fetch"]["paths"].as_array().unwrap().is_empty(), "{t}");
    }
    // Back in the pool, idle, waiting for the next build.
    let listed = pool.list();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["job"], jobs[0]);
    assert_eq!(listed[0]["state"], "idle");
    assert!(in_queue(c, jobs[0]));
    // Drained, it ends at once.
    let out = pool.tool("nsh-alloc").arg("--pool-drain").output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("\"released\""), "{report}");
    wait_gone(c, jobs[0], Duration::from_secs(15));
    assert!(pool.list().is_empty());
}

#[test]
fn an_idle_job_ends_after_linger_with_nothing_running_on_the_login_side() {
    let pool = Pool::new("linger = 4", "");
    let c = &pool.c;
    let ticket = pool.build(&quick(c, "pool-linger"), None);
    let job = job_of(&ticket);
    let node = ticket["alloc"]["node"].as_str().unwrap().to_string();
    let work = ticket["alloc"]["work"].as_str().unwrap().to_string();
    // Every nsh process of this build has exited; the masters go too.
    pool.stop_masters();
    assert!(in_queue(c, job), "the job lingers");
    let took = wait_gone(c, job, Duration::from_secs(30));
    assert!(took <= 4.0 + 10.0, "it left {took} s after the build");
    let gone = c.ssh(&node, &format!("test ! -e {work}"));
    assert!(gone.status.success(), "{work} is left on {node}");
    // Its record is dropped at the next look.
    std::thread::sleep(Duration::from_secs(11));
    assert!(pool.list().is_empty(), "{:?}", pool.list());
}

#[test]
fn a_build_that_does_not_fit_gets_its_own_job() {
    let pool = Pool::new("linger = 30", "");
    let c = &pool.c;
    let first = pool.build(&quick(c, "pool-plain"), None);
    // The idle job's node is not known to have `big`: a job of its own.
    let big = pool.build(&drv(c, "pool-big", "echo big > $out", &["big"]), None);
    assert_ne!(job_of(&big), job_of(&first));
    assert_eq!(big["alloc"]["reused"], false);
    assert_eq!(big["alloc"]["node"], c.node_with_feature("big").as_str());
    // Nor is a job that has fewer cpus than a build asks for.
    let mut wide = closure_ticket(c, &quick(c, "pool-wide"), Value::Null);
    wide["drv"]["resources"] = json!({"cpus": 2});
    let wide = pool.allocate(&wide, None);
    assert_eq!(wide["alloc"]["reused"], false, "{wide}");
    assert!(![job_of(&first), job_of(&big)].contains(&job_of(&wide)));
    let cancelled = pool.pipe("nsh-alloc", &["--cancel"], &wide, None);
    cancelled.ok();
    // A plain build fits both pooled jobs: it takes one of them.
    let plain = pool.build(&quick(c, "pool-plain-again"), None);
    assert_eq!(plain["alloc"]["reused"], true);
    assert!([job_of(&first), job_of(&big), job_of(&wide)].contains(&job_of(&plain)));
}

#[test]
fn a_killed_owners_job_comes_back_into_use_or_ends_by_itself() {
    let pool = Pool::new("linger = 30", "idle_timeout = 4");
    let c = &pool.c;
    // A "hook" allocates, pushes and builds, and is SIGKILLed before it
    // fetches: the job is held by a dead owner.
    let mut hook = Owner::start();
    let t = pool.allocate(
        &closure_ticket(c, &quick(c, "pool-killed"), Value::Null),
        hook.pid().into(),
    );
    let held = job_of(&t);
    let t = pool.pipe("nsh-push", &[], &t, hook.pid().into()).ticket;
    pool.pipe("nsh-run", &[], &t, hook.pid().into()).ok();
    hook.kill();
    let listed = pool.list();
    assert_eq!(listed[0]["state"], "orphaned", "{listed:?}");
    // Its node says no build runs there: the next build takes it.
    let next = pool.build(&quick(c, "pool-after-kill"), None);
    assert_eq!(job_of(&next), held);
    assert_eq!(next["alloc"]["reused"], true);
    assert_eq!(next["alloc"]["request"], 2);

    // Killed mid-build: the job is busy on its node, so the next build
    // gets a job of its own, and the killed one ends by itself once its
    // build is over (idle_timeout 4 s).
    let mut hook = Owner::start();
    let slow = drv(c, "pool-slow", "/bin/sleep 5; echo slow > $out", &[]);
    let t = pool.allocate(&closure_ticket(c, &slow, Value::Null), hook.pid().into());
    assert_eq!(job_of(&t), held, "the idle job is taken again");
    let t = pool.pipe("nsh-push", &[], &t, hook.pid().into()).ticket;
    let mut run = pool.spawn("nsh-run", &[], &t, hook.pid().into());
    let node = t["alloc"]["node"].as_str().unwrap().to_string();
    let started = format!("{}/started.3", t["alloc"]["work"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !c.ssh(&node, &format!("test -e {started}")).status.success() {
        assert!(Instant::now() < deadline, "the build did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    run.kill().unwrap();
    let _ = run.wait();
    hook.kill();
    let other = pool.build(&quick(c, "pool-while-busy"), None);
    assert_ne!(job_of(&other), held, "a busy job is never shared");
    assert_eq!(other["alloc"]["reused"], false);
    wait_gone(c, held, Duration::from_secs(5 + 4 + 20));
}

#[test]
fn max_jobs_holds_with_a_full_pool() {
    let pool = Pool::new("linger = 30\nmax_jobs = 1", "");
    let c = &pool.c;
    let first_owner = Owner::start();
    let a = pool.allocate(
        &closure_ticket(c, &quick(c, "pool-full-a"), Value::Null),
        first_owner.pid().into(),
    );
    let second_owner = Owner::start();
    let b_ticket = closure_ticket(c, &quick(c, "pool-full-b"), Value::Null);
    let waiting = pool.spawn("nsh-alloc", &[], &b_ticket, second_owner.pid().into());
    std::thread::sleep(Duration::from_secs(3));
    let listed = pool.list();
    assert_eq!(listed.len(), 1, "one job, max_jobs 1: {listed:?}");
    // A's build is over (here: given back by hand): B takes its job.
    pool.pipe("nsh-alloc", &["--cancel"], &a, first_owner.pid().into())
        .ok();
    let b = finish("nsh-alloc", waiting);
    b.ok();
    assert_eq!(job_of(&b.ticket), job_of(&a), "{}", b.stderr);
    assert_eq!(b.ticket["alloc"]["reused"], true);
    assert!(b.stderr.contains("full"), "{}", b.stderr);
    // Given back, idle, it fits no build that needs `big`: with the pool
    // full, it is let go to make room for that build's own job.
    let back = pool.pipe(
        "nsh-alloc",
        &["--cancel"],
        &b.ticket,
        second_owner.pid().into(),
    );
    back.ok();
    assert_eq!(back.ticket["alloc"]["returned"], true);
    let big = pool.allocate(
        &closure_ticket(
            c,
            &drv(c, "pool-full-big", "echo > $out", &["big"]),
            Value::Null,
        ),
        None,
    );
    assert_ne!(job_of(&big), job_of(&a));
    wait_gone(c, job_of(&a), Duration::from_secs(15));
    let listed = pool.list();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["job"], job_of(&big));
}

/// Three derivations, each copying the one before and adding a line (`a`
/// ← `b` ← `c`; the shell's own `read`: a builder has no PATH), new each
/// run; their derivation paths, `a` first.
fn chain(c: &Cluster, prefix: &str) -> Vec<String> {
    let salt = unique_salt();
    let expr = |top: &str| {
        format!(
            r#"let mk = name: script: builtins.derivation {{
                 inherit name;
                 system = "x86_64-linux";
                 builder = "/bin/sh";
                 args = [ "-c" script ];
                 salt = "{salt}";
               }};
               a = mk "{prefix}-a" "echo a > $out";
               copy = from: "while read -r l; do echo $l; done < ${{from}} > $out";
               b = mk "{prefix}-b" "${{copy a}}; echo b >> $out";
               c = mk "{prefix}-c" "${{copy b}}; echo c >> $out";
             in {top}"#
        )
    };
    ["a", "b", "c"]
        .iter()
        .map(|top| instantiate(c, &expr(top)))
        .collect()
}

/// A chain's next build on the node that built its input skips the push's
/// session (the pool knows the node holds the input: `push.by_locality`);
/// when the node lost that input after all (its garbage collector took it),
/// nsh-run finds it out from its request's first answer: a transient
/// failure naming the node, and the pool forgets the path, so the next try
/// pushes it and builds.
#[test]
fn a_chain_skips_the_push_and_a_lost_input_is_found_by_the_run() {
    let pool = Pool::new("linger = 30", "");
    let c = &pool.c;
    let drvs = chain(c, "pool-chain");
    let a = pool.build(&drvs[0], None);
    assert_eq!(a["push"]["by_locality"], Value::Null, "no inputs: {a}");
    let b = pool.build(&drvs[1], None);
    assert_eq!(b["alloc"]["reused"], true, "{b}");
    assert_eq!(b["push"]["by_locality"], true, "{b}");
    assert_eq!(b["push"]["present"], 1, "{b}");
    assert_eq!(b["run"]["status"], "built", "{b}");

    // The node loses b's output; the pool still thinks it is there.
    let node = b["alloc"]["node"].as_str().unwrap().to_string();
    let b_out = b["fetch"]["paths"][0].as_str().unwrap().to_string();
    let deleted = c.ssh(&node, &format!("nix-store --delete {b_out}"));
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    let mut ticket = pool.allocate(&closure_ticket(c, &drvs[2], Value::Null), None);
    assert_eq!(ticket["alloc"]["node"], node.as_str(), "{ticket}");
    let pushed = pool.pipe("nsh-push", &[], &ticket, None);
    pushed.ok();
    assert_eq!(
        pushed.ticket["push"]["by_locality"], true,
        "{}",
        pushed.ticket
    );
    ticket = pushed.ticket;
    let run = pool.pipe("nsh-run", &[], &ticket, None);
    assert_eq!(run.status, 75, "{}", run.stderr);
    let error = run.ticket["error"]["message"].as_str().unwrap_or_default();
    assert!(
        error.contains(&node) && error.contains("lacked 1 of the build's 1 input paths"),
        "{}",
        run.ticket
    );
    assert_eq!(run.ticket["error"]["kind"], "transient", "{}", run.ticket);

    // Tried again: the push asks the node and copies b's output back.
    let again = pool.build(&drvs[2], None);
    assert_eq!(again["push"]["by_locality"], Value::Null, "{again}");
    assert_eq!(again["push"]["copied"], 1, "{again}");
    assert_eq!(again["run"]["status"], "built", "{again}");
    let c_out = again["fetch"]["paths"][0].as_str().unwrap();
    assert_eq!(std::fs::read_to_string(c_out).unwrap(), "a\nb\nc\n");
}
