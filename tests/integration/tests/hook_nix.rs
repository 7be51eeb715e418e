//! `nsh-hook` under the stack's real Nix (2.8, 2.26, 2.34): `nix-build
//! --option build-hook` on the local store and through the test cluster's
//! nix-daemon. Every derivation is instantiated before it is built (as
//! nix-build does), since from Nix 2.30 the daemon asks no hook about a
//! `.drv` that is not valid in its store. The pipeline is
//! `tests/hook/build-here.sh`, which builds on this machine and registers the
//! outputs the way nsh-fetch must (the daemon holds their locks), so these
//! tests prove that Nix accepts the hook's side of the protocol: the accept,
//! the inputs and wanted outputs read, the log on fd 4, the exit statuses and
//! outputs valid at exit. (The builds on the cluster's nodes come with the
//! other tools.)
// The test signals the processes and groups it started (kill(2) with
// a negative pid) and sets up a child's fd 4: libc, which needs unsafe.
#![allow(unsafe_code)]
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]
// Process ids fit an i32 (pid_max is at most 2^22).
#![allow(clippy::cast_possible_wrap)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nsh_cluster_tests::{run_ok, unique_salt, Cluster};

/// `target/<profile>/nsh-hook`, built by `cargo test --workspace`.
fn nsh_hook() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let hook = exe.parent().unwrap().parent().unwrap().join("nsh-hook");
    assert!(
        hook.exists(),
        "{} is missing: build it (cargo build -p nsh-hook, or cargo test --workspace)",
        hook.display()
    );
    hook
}

struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        Site::with(&current_system(), "")
    }

    /// A site whose one cluster builds `system`, with more `[hook]` keys.
    fn with(system: &str, hook_keys: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let site = Site { dir };
        fs::create_dir_all(site.path("conf")).unwrap();
        fs::write(
            site.path("conf/nix.conf"),
            "substituters =\nsandbox = false\nbuild-users-group =\nexperimental-features = nix-command\n",
        )
        .unwrap();
        let pipeline = Cluster::repo_root().join("tests/integration/tests/hook/build-here.sh");
        fs::write(
            site.path("nsh.toml"),
            format!(
                "[cluster.main]\nbackend = \"cli\"\nsystems = [\"{system}\"]\nmax_jobs = 4\n\n\
                 [hook]\npipeline = [\"{}\"]\nslots_dir = \"{}\"\n{hook_keys}\n",
                pipeline.display(),
                site.path("slots").display()
            ),
        )
        .unwrap();
        // What the daemon runs: its own environment is not the test's.
        let wrapper = site.path("hook");
        fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexport NSH_CONFIG={} NSH_TEST_RECORD={} NIX_CONF_DIR={} PATH=/usr/bin:/bin\nexec {} \"$@\"\n",
                site.path("nsh.toml").display(),
                site.path("record").display(),
                site.path("conf").display(),
                nsh_hook().display()
            ),
        )
        .unwrap();
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
        site
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A derivation `top` depending on `dep`; `top` fails when `fail`.
    fn dag(&self, salt: &str, fail: bool) -> PathBuf {
        let expr = format!(
            r#"let mk = name: script: derivation {{
                 inherit name; system = builtins.currentSystem; builder = "/bin/sh";
                 PATH = "/usr/bin:/bin"; args = ["-c" script]; }};
               dep = mk "nsh-hook-dep-{salt}" "echo building dep; echo dep > $out";
             in mk "nsh-hook-top-{salt}" "echo building top; {} cat ${{dep}} > $out""#,
            if fail {
                "echo about to fail; exit 3;"
            } else {
                ""
            }
        );
        let file = self.path(&format!("dag-{salt}.nix"));
        fs::write(&file, expr).unwrap();
        file
    }

    fn nix_build(&self, file: &Path, extra: &[&str]) -> Output {
        Command::new("nix-build")
            .arg(file)
            .args(["--no-out-link", "--option", "build-hook"])
            .arg(self.path("hook"))
            .args(extra)
            .env("NIX_CONF_DIR", self.path("conf"))
            .env_remove("NIX_REMOTE")
            .output()
            .expect("nix-build runs")
    }

    /// The derivations the pipeline built, by name, in order.
    fn built_by_the_hook(&self) -> Vec<String> {
        fs::read_to_string(self.path("record"))
            .unwrap_or_default()
            .lines()
            .map(|drv| {
                let base = drv.rsplit('/').next().unwrap_or(drv);
                // `<hash>-nsh-hook-top-<salt>.drv` → `top`
                base.split('-').nth(3).unwrap_or(base).to_string()
            })
            .collect()
    }
}

fn current_system() -> String {
    run_ok(Command::new("nix-instantiate").args(["--eval", "-E", "builtins.currentSystem"]))
        .trim()
        .trim_matches('"')
        .to_string()
}

fn read_log(drv_file: &Path, conf: &Path) -> String {
    let drv = run_ok(
        Command::new("nix-instantiate")
            .arg(drv_file)
            .env("NIX_CONF_DIR", conf),
    );
    run_ok(
        Command::new("nix-store")
            .args(["--read-log", drv.trim()])
            .env("NIX_CONF_DIR", conf),
    )
}

fn check_built(site: &Site, file: &Path, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nix-build failed:\n{stderr}");
    assert!(stderr.contains("on 'slurm://main'"), "{stderr}");
    assert_eq!(site.built_by_the_hook(), vec!["dep", "top"], "{stderr}");
    let result = String::from_utf8_lossy(&out.stdout).trim().to_string();
    run_ok(Command::new("nix-store").args(["--verify-path", &result]));
    assert_eq!(fs::read_to_string(&result).unwrap(), "dep\n");
    // `nix log`: what the pipeline wrote to fd 4.
    assert!(read_log(file, &site.path("conf")).contains("building top"));
}

#[test]
fn nix_build_on_the_local_store_builds_a_dag_through_the_hook() {
    let site = Site::new();
    let file = site.dag(&unique_salt(), false);
    let out = site.nix_build(&file, &[]);
    check_built(&site, &file, &out);
}

#[test]
fn nix_build_through_the_daemon_builds_a_dag_through_the_hook() {
    // The test cluster's nix-daemon (root is a trusted user there, so the
    // client's build-hook applies).
    let _cluster = Cluster::get();
    let site = Site::new();
    let file = site.dag(&unique_salt(), false);
    let out = site.nix_build(&file, &["--store", "daemon"]);
    check_built(&site, &file, &out);
}

#[test]
fn a_failing_derivation_fails_the_build_with_its_log() {
    let site = Site::new();
    let file = site.dag(&unique_salt(), true);
    let out = site.nix_build(&file, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(site.built_by_the_hook(), vec!["dep", "top"], "{stderr}");
    assert!(stderr.contains("about to fail"), "{stderr}");
    assert!(
        stderr.contains("the builder failed"),
        "the hook's @nix msg names the failure: {stderr}"
    );
    assert!(read_log(&file, &site.path("conf")).contains("about to fail"));
}

#[test]
fn what_nsh_declines_goes_to_nix_own_hook_which_builds_on_a_node() {
    let c = Cluster::get();
    // nsh's only cluster builds another system: every try is declined and
    // handed to Nix's build-remote, which has node1 as an ssh builder.
    let site = Site::with(
        "riscv64-linux",
        "fallback = [\"/usr/libexec/nix/build-remote\"]",
    );
    let salt = unique_salt();
    let file = site.path("remote.nix");
    fs::write(
        &file,
        format!(
            r#"builtins.derivation {{
                 name = "nsh-hook-fallback-{salt}";
                 system = builtins.currentSystem;
                 builder = "/bin/sh";
                 args = [ "-c" "read h < /proc/sys/kernel/hostname; echo $h > $out" ];
               }}"#
        ),
    )
    .unwrap();
    let out = Command::new("nix-build")
        .arg(&file)
        .args([
            "--no-out-link",
            "--max-jobs",
            "0",
            "--builders",
            "ssh://node1",
        ])
        .args(["--option", "build-hook"])
        .arg(site.path("hook"))
        .envs(c.envs())
        .env("NIX_CONF_DIR", site.path("conf"))
        .env_remove("NIX_REMOTE")
        .output()
        .expect("nix-build runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nix-build failed:\n{stderr}");
    let result = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        fs::read_to_string(&result).unwrap().trim(),
        "node1",
        "{stderr}"
    );
    assert!(stderr.contains("ssh://node1"), "{stderr}");
    assert!(
        site.built_by_the_hook().is_empty(),
        "nsh's pipeline must not run"
    );
    run_ok(Command::new("nix-store").args(["--verify-path", &result]));
}

/// The real nsh-closure and nsh-alloc (next to a copy of nsh-hook), and an
/// nsh-push that records its ticket and hangs, as a build would.
fn site_with_real_alloc(c: &Cluster) -> Site {
    let site = Site::new();
    let bin = site.path("bin");
    fs::create_dir_all(&bin).unwrap();
    let target = nsh_hook().parent().unwrap().to_path_buf();
    for tool in ["nsh-hook", "nsh-closure", "nsh-alloc"] {
        let built = target.join(tool);
        assert!(
            built.exists(),
            "{} is missing: cargo build --workspace",
            built.display()
        );
        fs::copy(&built, bin.join(tool)).unwrap();
    }
    let script = |name: &str, body: &str| {
        let path = bin.join(name);
        fs::write(&path, body).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    };
    script(
        "nsh-push",
        &format!(
            "#!/bin/sh\nread -r t\necho \"$t\" > {}\nexec sleep 120\n",
            site.path("pushed").display()
        ),
    );
    script("nsh-run", "#!/bin/sh\ncat\n");
    script("nsh-fetch", "#!/bin/sh\ncat\n");
    let config = fs::read_to_string(c.nsh_config()).unwrap()
        + &format!(
            "\n[hook]\nslots_dir = \"{}\"\n",
            site.path("slots").display()
        );
    fs::write(site.path("nsh.toml"), config).unwrap();
    fs::write(
        site.path("hook"),
        format!(
            "#!/bin/sh\nexport NSH_CONFIG={}\nexec {} \"$@\"\n",
            site.path("nsh.toml").display(),
            bin.join("nsh-hook").display()
        ),
    )
    .unwrap();
    site
}

fn in_squeue(c: &Cluster, job: u64) -> bool {
    let out = run_ok(
        c.command("squeue")
            .args(["-h", "-j", &job.to_string(), "-o", "%T"]),
    );
    !out.trim().is_empty()
}

#[test]
fn ctrl_c_on_nix_build_leaves_no_job_in_squeue() {
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};

    // The interrupted build's job is healthy (no build ran in it), so it
    // goes back to the pool rather than being cancelled, and leaves after
    // its linger: 2 s here.
    let c = Cluster::get().with_cluster_keys("linger = 2");
    let site = site_with_real_alloc(&c);
    let file = site.path("cancel.nix");
    fs::write(
        &file,
        format!(
            r#"derivation {{ name = "nsh-hook-cancel-{}"; system = builtins.currentSystem;
                 builder = "/bin/sh"; args = ["-c" "echo hi > $out"]; }}"#,
            unique_salt()
        ),
    )
    .unwrap();
    let mut nix_build = Command::new("nix-build")
        .arg(&file)
        .args(["--no-out-link", "--option", "build-hook"])
        .arg(site.path("hook"))
        .envs(c.envs())
        .env_remove("NIX_REMOTE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        // Its own process group, as a shell gives a foreground job.
        .process_group(0)
        .spawn()
        .unwrap();

    // Wait until the job runs and the build is under way (nsh-push got the ticket).
    let deadline = Instant::now() + Duration::from_secs(60);
    let ticket: serde_json::Value = loop {
        if let Ok(text) = fs::read_to_string(site.path("pushed")) {
            if let Ok(ticket) = serde_json::from_str(text.trim()) {
                break ticket;
            }
        }
        assert!(Instant::now() < deadline, "the job never started");
        assert!(
            nix_build.try_wait().unwrap().is_none(),
            "nix-build ended early"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let job = ticket["alloc"]["job"].as_u64().expect("alloc.job");
    assert!(in_squeue(&c, job), "job {job} should be running");

    // Ctrl-C: SIGINT to nix-build's process group. Nix kills the hook's
    // process group; the watchdog gives the job back (or cancels it).
    unsafe { libc::kill(-(nix_build.id() as i32), libc::SIGINT) };
    let _ = nix_build.wait();
    let deadline = Instant::now() + Duration::from_secs(15);
    while in_squeue(&c, job) {
        assert!(Instant::now() < deadline, "job {job} is still in squeue");
        std::thread::sleep(Duration::from_millis(200));
    }
}
