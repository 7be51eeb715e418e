//! Helpers for the cluster tests: where the running test cluster is and how to
//! reach it. The cluster is brought up by `tests/cluster/cluster up` (which
//! `scripts/test` does); these tests fail, loudly, when it is not up.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod site;
pub use site::PrivateSite;

/// The running test cluster, as `tests/cluster/cluster up` describes it in
/// `$NSH_CLUSTER_DIR/env.json`.
pub struct Cluster {
    /// `env.json`: addresses, versions, nodes.
    pub info: serde_json::Value,
    /// The cluster's state directory.
    pub dir: PathBuf,
}

impl Cluster {
    /// The cluster this test runs against (`$NSH_CLUSTER_DIR`, else `/tmp/nsh-cluster`).
    pub fn get() -> Cluster {
        let dir = PathBuf::from(
            std::env::var("NSH_CLUSTER_DIR").unwrap_or_else(|_| "/tmp/nsh-cluster".into()),
        );
        let env_json = dir.join("env.json");
        let text = std::fs::read_to_string(&env_json).unwrap_or_else(|e| {
            panic!(
                "the test cluster is not up ({}: {e}); run `tests/cluster/cluster up` \
                 or `scripts/test`",
                env_json.display()
            )
        });
        assert!(
            dir.join("ready").exists(),
            "the test cluster in {} is not ready",
            dir.display()
        );
        Cluster {
            info: serde_json::from_str(&text).expect("env.json is JSON"),
            dir,
        }
    }

    fn s(&self, key: &str) -> String {
        self.info[key]
            .as_str()
            .unwrap_or_else(|| panic!("env.json lacks {key}"))
            .to_string()
    }

    /// slurmrestd's URL.
    pub fn rest_url(&self) -> String {
        self.s("rest_url")
    }
    /// slurmrestd behind the test cluster's TLS proxy (`https://…`).
    pub fn rest_tls_url(&self) -> String {
        self.s("rest_tls_url")
    }
    /// The test CA that signed the TLS proxy's certificate (PEM).
    pub fn rest_ca_file(&self) -> String {
        self.s("rest_ca_file")
    }
    /// The build account.
    pub fn user(&self) -> String {
        self.s("user")
    }
    /// The build account's Slurm token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.s("token_file"))
            .expect("token file")
            .trim()
            .to_string()
    }
    /// The ssh configuration that names the nodes.
    pub fn ssh_config(&self) -> String {
        self.s("ssh_config")
    }
    /// The nsh configuration for this cluster.
    pub fn nsh_config(&self) -> String {
        self.s("config")
    }
    /// The compute nodes' names.
    pub fn nodes(&self) -> Vec<String> {
        self.info["nodes"]
            .as_object()
            .expect("nodes")
            .keys()
            .cloned()
            .collect()
    }
    /// The node that has Slurm feature `feature`.
    pub fn node_with_feature(&self, feature: &str) -> String {
        self.info["nodes"]
            .as_object()
            .expect("nodes")
            .iter()
            .find(|(_, n)| {
                n["features"]
                    .as_str()
                    .unwrap_or("")
                    .split(',')
                    .any(|f| f == feature)
            })
            .map_or_else(
                || panic!("no node has feature {feature}"),
                |(name, _)| name.clone(),
            )
    }

    /// The environment a test process needs: Slurm's and Nix's configuration
    /// for this cluster.
    pub fn envs(&self) -> Vec<(String, String)> {
        vec![
            ("SLURM_CONF".into(), self.s("slurm_conf")),
            ("NIX_CONF_DIR".into(), self.s("nix_conf_dir")),
            ("NIX_SSHOPTS".into(), format!("-F {}", self.ssh_config())),
            ("NSH_CONFIG".into(), self.nsh_config()),
        ]
    }

    /// A command with the cluster's environment.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(self.envs());
        cmd
    }

    /// Runs `script` with `sh -c` on `node` over ssh as the build user.
    pub fn ssh(&self, node: &str, script: &str) -> Output {
        Command::new("ssh")
            .args(["-F", &self.ssh_config(), node, script])
            .output()
            .expect("ssh runs")
    }

    /// Instantiates the Nix expression `expr` here and builds it on `node`
    /// only (the output exists there, not here), as nsh-fetch finds a
    /// build; returns (the derivation here, the output the node built).
    pub fn instantiate_here_build_on(&self, node: &str, expr: &str) -> (String, String) {
        let drv = run_ok(self.command("nix-instantiate").args(["-E", expr]))
            .trim()
            .to_string();
        let built = self.ssh(
            node,
            &format!(
                "nix-build --no-out-link -E {}",
                nsh_core::ssh::shell_quote(expr)
            ),
        );
        assert!(
            built.status.success(),
            "{}",
            String::from_utf8_lossy(&built.stderr)
        );
        let out = String::from_utf8(built.stdout).unwrap().trim().to_string();
        (drv, out)
    }

    /// The same cluster with `lines` added to its `[cluster.test]` table
    /// (e.g. `linger = 0`): `nsh_config()`, `envs()` and `command()` then
    /// use that configuration, written once per test process beside the
    /// cluster's own.
    #[must_use]
    pub fn with_cluster_keys(mut self, lines: &str) -> Cluster {
        use std::hash::{Hash, Hasher};
        let text = std::fs::read_to_string(self.nsh_config()).expect("the cluster's nsh.toml");
        assert!(
            text.contains("[cluster.test]\n"),
            "no [cluster.test] in nsh.toml"
        );
        let text = text.replacen("[cluster.test]\n", &format!("[cluster.test]\n{lines}\n"), 1);
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut hasher);
        let name = format!("nsh-{}-{:x}.toml", std::process::id(), hasher.finish());
        let path = std::env::temp_dir().join(name);
        if !path.exists() {
            let tmp = path.with_extension(format!("tmp{:?}", std::thread::current().id()));
            std::fs::write(&tmp, text).expect("writing a configuration");
            std::fs::rename(&tmp, &path).expect("renaming a configuration");
        }
        self.info["config"] = path.display().to_string().into();
        self
    }

    /// The cluster as it was before allocation reuse: one Slurm job per
    /// build (`linger = 0`), for the tests of a job's own life.
    #[must_use]
    pub fn one_job_per_build(self) -> Cluster {
        self.with_cluster_keys("linger = 0")
    }

    /// Where `tests/cluster` is.
    pub fn repo_root() -> &'static Path {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
    }
}

/// Runs a command, panicking with its stderr if it fails; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A salt that makes each test's derivations new, so that nothing is already built.
pub fn unique_salt() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    format!("{}-{}", t.as_nanos(), std::process::id())
}

/// The path of an nsh tool's binary (`nsh-alloc`, `nsh-run`, …):
/// `target/<profile>/<name>`, next to this test's own executable, as
/// `cargo test --workspace` builds it (Cargo gives a test only its own
/// crate's binaries, hence this). Tests never build: on a stack's machine
/// a build would link against that stack's C library, and the binary would
/// then fail on an older stack (`scripts/test` builds once, on the host).
pub fn nsh_tool(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo test --workspace, or scripts/test)",
        path.display()
    );
    path
}

/// A copy of `binary` that any user may run, for tests that run a tool as
/// the build account (`runuser`): the checkout itself may lie under a
/// directory only root can enter (`/root` is 0700).
pub fn runnable_by_anyone(binary: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("nsh-test-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the copy");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let name = binary.file_name().expect("a binary's file name");
    let copy = dir.join(name);
    // Copied under a temporary name and renamed: a test thread that forks
    // meanwhile never holds the final name open for writing (ETXTBSY).
    let temp = dir.join(format!(
        "{}.tmp{:?}",
        name.to_string_lossy(),
        std::thread::current().id()
    ));
    std::fs::copy(binary, &temp).expect("copying the binary");
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&temp, &copy).expect("renaming the copy");
    copy
}

/// Which versions this stack runs (`tests/cluster/cluster` env.json).
impl Cluster {
    /// The stack's name (`bookworm`, `trixie`, `sid`).
    pub fn stack(&self) -> String {
        self.s("stack")
    }
    /// The login side's Nix version (`2.34.8`).
    pub fn nix_version(&self) -> String {
        self.s("nix_version")
    }
    /// The Slurm release (`24.11.5`).
    pub fn slurm_version(&self) -> String {
        self.s("slurm_version")
    }
    /// The OpenAPI plugin slurmrestd runs with (`openapi/slurmctld`, or
    /// `openapi/v0.0.38` on 22.05).
    pub fn rest_plugin(&self) -> String {
        self.s("rest_plugin")
    }
    /// The data_parser versions slurmrestd serves, oldest first.
    pub fn rest_versions(&self) -> Vec<String> {
        self.info["rest_versions"]
            .as_array()
            .expect("rest_versions")
            .iter()
            .map(|v| v.as_str().expect("a version").to_string())
            .collect()
    }
}

/// Instantiates a Nix expression in the login node's store; returns the
/// `.drv` path.
pub fn instantiate(c: &Cluster, expr: &str) -> String {
    run_ok(
        c.command("nix-instantiate")
            .args(["--expr", expr])
            .stderr(std::process::Stdio::piped()),
    )
    .trim()
    .to_string()
}

/// Builds here the one input derivation of `drv` (so that a build of
/// `drv` has a path to push, and an output that refers to it); returns the
/// input's output path.
pub fn build_input_here(c: &Cluster, drv: &str) -> String {
    let input_drv = run_ok(c.command("nix-store").args(["-q", "--references", drv]))
        .lines()
        .find(|l| l.ends_with(".drv"))
        .unwrap_or_else(|| panic!("{drv} has no input derivation"))
        .to_string();
    run_ok(c.command("nix-store").args(["-r", &input_drv]))
        .trim()
        .to_string()
}

/// The ticket `nsh-closure` writes for `drv`, with build `options` added
/// (`null` for none).
pub fn closure_ticket(c: &Cluster, drv: &str, options: serde_json::Value) -> serde_json::Value {
    let text = run_ok(c.command(nsh_tool("nsh-closure")).arg(drv));
    let mut ticket: serde_json::Value =
        serde_json::from_str(text.trim()).expect("nsh-closure writes a ticket");
    if !options.is_null() {
        ticket["options"] = options;
    }
    ticket
}

/// Pipes one ticket through an nsh tool; returns (exit code, ticket out,
/// stderr).
pub fn pipe_ticket(
    c: &Cluster,
    tool: &str,
    args: &[&str],
    ticket: &serde_json::Value,
) -> (i32, serde_json::Value, String) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = c
        .command(nsh_tool(tool))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    writeln!(child.stdin.take().unwrap(), "{ticket}").unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).expect("utf-8 ticket");
    let ticket = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{tool} wrote no ticket ({e}): {stdout:?}"));
    (
        out.status.code().unwrap_or(-1),
        ticket,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `scontrol`/`squeue`/`scancel` … with the cluster's Slurm configuration.
pub fn slurm_cmd(c: &Cluster, program: &str, args: &[&str]) -> Output {
    c.command(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// The Nix this stack runs (env.json's `nix_version`, the same on the login
/// side and the nodes), for tests that expect what that version does or skip
/// a feature it does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixVersion {
    /// As `nix-store --version` ends: `2.34.8`.
    pub text: String,
    /// `(2, 34, 8)`.
    pub number: (u32, u32, u32),
}

impl NixVersion {
    /// The Nix of the login side.
    pub fn of(c: &Cluster) -> NixVersion {
        let text = c.info["nix_version"]
            .as_str()
            .expect("env.json has nix_version")
            .to_string();
        let mut parts = text
            .split(|ch: char| !ch.is_ascii_digit())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let mut next = || parts.next().unwrap_or(0);
        let number = (next(), next(), next());
        NixVersion { text, number }
    }

    /// Whether this Nix is `major.minor.patch` or later.
    pub fn at_least(&self, major: u32, minor: u32, patch: u32) -> bool {
        self.number >= (major, minor, patch)
    }

    /// True, after printing why, when a feature this test needs was removed
    /// in `removed_in` (`(2, 29)`) and this Nix is that or later.
    pub fn lacks(&self, feature: &str, removed_in: (u32, u32)) -> bool {
        if !self.at_least(removed_in.0, removed_in.1, 0) {
            return false;
        }
        println!(
            "skipped: {feature} was removed in Nix {}.{}; this stack runs Nix {}",
            removed_in.0, removed_in.1, self.text
        );
        true
    }
}

/// The test cluster's CI user in the login daemon's `trusted-users`
/// (`tests/cluster/cluster`, `docs/test-cluster.md`).
pub const CI_TRUSTED: &str = "nshci";
/// The test cluster's CI user the daemon does not trust; it has a signing
/// key whose public half is in the daemon's `trusted-public-keys`.
pub const CI_SIGNER: &str = "nshci-signer";

/// `user`'s uid.
pub fn uid_of(user: &str) -> u32 {
    run_ok(Command::new("id").args(["-u", user]))
        .trim()
        .parse()
        .unwrap()
}

/// The CI user's configuration `name` (in its own directory under the
/// cluster's, with its token and ssh key), with the test cluster's `linger`
/// set to `linger`, written where the user can read it.
pub fn ci_config(c: &Cluster, user: &str, name: &str, linger: u32) -> String {
    let own = c.dir.join("ci").join(user).join(name);
    let text = std::fs::read_to_string(&own).unwrap();
    let set = format!("[cluster.test]\nlinger = {linger}\n");
    let text = text.replacen("[cluster.test]\n", &set, 1);
    assert!(text.contains(&set), "{}", own.display());
    let path = std::env::temp_dir().join(format!(
        "nsh-ci-{}-{user}-linger{linger}-{name}",
        std::process::id()
    ));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// `program` run by `user` (`runuser`) with `config`, in the user's own
/// environment: its home, no runtime directory given (nsh then uses
/// `/tmp/nsh-<uid>`), no ssh options of root's. `program` must be one any
/// user may run ([`runnable_by_anyone`]).
pub fn as_ci_user(
    c: &Cluster,
    user: &str,
    config: &str,
    program: impl AsRef<std::ffi::OsStr>,
) -> Command {
    let mut command = Command::new("runuser");
    command
        .args(["-u", user, "--"])
        .arg(program)
        .envs(c.envs())
        .env_remove("NIX_SSHOPTS")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NSH_RUNTIME_DIR")
        .env("HOME", format!("/var/lib/{user}"))
        .env("NSH_CONFIG", config)
        .current_dir("/");
    command
}

/// The shell script piping the five tools of a build by hand
/// (`nsh-closure "$1" | nsh-alloc | nsh-push | nsh-run | nsh-fetch`),
/// copies any user may run: for `sh -c SCRIPT sh DRV`.
pub fn pipeline_script() -> String {
    [
        "nsh-closure \"$1\"",
        "nsh-alloc",
        "nsh-push",
        "nsh-run",
        "nsh-fetch",
    ]
    .iter()
    .map(|tool| {
        let (name, args) = tool.split_once(' ').unwrap_or((tool, ""));
        let path = runnable_by_anyone(&nsh_tool(name)).display().to_string();
        format!("{path} {args}").trim_end().to_string()
    })
    .collect::<Vec<_>>()
    .join(" | ")
}

/// Waits for `child`, killing it (and failing, with its stderr) after
/// `limit`: a deadlock must fail the test, not hang it.
pub fn wait_bounded(mut child: std::process::Child, limit: std::time::Duration) -> Output {
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?} (deadlock?); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}
