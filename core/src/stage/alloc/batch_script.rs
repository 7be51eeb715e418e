//! The batch script `nsh-alloc` submits, and the environment it runs with.
//!
//! The script is static text: no value from a derivation, a ticket or the
//! configuration is ever written into it. Everything variable reaches it as
//! an environment variable set at submit time ([`environment`]), so nothing a
//! derivation names can reach a shell as code.
//!
//! What the job does (the contract between `nsh-alloc`, `nsh-push`,
//! `nsh-run` and `nsh-fetch`):
//!
//! * work dir `W = $NSH_WORK_ROOT/nsh-$SLURM_JOB_ID`, `mkdir -p -m 0700`;
//! * requests are numbered from 1. The job waits (at most
//!   `$NSH_REQUEST_TIMEOUT` s for the first, else exit 75) for `W/request.N`
//!   (writers create `W/request.N.tmp` and rename it), then runs
//!   `nix-store --serve --write < request.N > response.N 2> log.N` with
//!   `system-features = $NSH_SYSTEM_FEATURES` in `NIX_CONFIG`, appends
//!   `@nsh-end $NSH_NONCE <status>` to `log.N` and writes `<status>` to
//!   `status.N` (temp + rename);
//! * after request N it waits up to `$NSH_IDLE_TIMEOUT` s for
//!   `W/request.N+1` (while N < `$NSH_MAX_REQUESTS`) or `W/release`, then
//!   removes W and exits 0; SIGTERM (scancel) also removes W.
//!
//! The job stays alive until `release` so that outputs can be fetched from
//! clusters whose sshd only admits users with a running job.
//!
//! Waiting is a 0.1 s poll (or `inotifywait` where the node has it), so a
//! request is picked up within a tenth of a second of its rename.

use crate::config::{Cluster, Config};

/// The script. POSIX sh; snapshot-tested, and run for real by the tests.
pub const SCRIPT: &str = r#"#!/bin/sh
# nsh build job. This text is the same for every job: everything variable
# comes from the environment set at submission (see nsh's batch_script.rs).
set -u

W="${NSH_WORK_ROOT:?}/nsh-${SLURM_JOB_ID:?}"
owned=0
cleanup() {
    if [ "$owned" = 1 ]; then
        rm -rf "$W"
    fi
}
# Traps first: a scancel right after the start must not leave W behind.
trap 'cleanup; exit 143' TERM
trap 'cleanup; exit 129' HUP
trap 'cleanup; exit 130' INT

umask 077
mkdir -p -m 0700 "$W" || exit 75
# The work dir may have been made by the tools already (same account); one
# made by anybody else, or a symlink, is not used (nor removed).
if [ -L "$W" ] || [ ! -O "$W" ]; then
    echo "nsh: $W is not this job's own directory" >&2
    exit 75
fi
owned=1

if [ -n "${NSH_NIX_BIN:-}" ]; then
    nix_store="$NSH_NIX_BIN/nix-store"
else
    nix_store=nix-store
fi
if command -v inotifywait >/dev/null 2>&1; then
    have_inotify=1
else
    have_inotify=0
fi

# await FILE SECONDS: wait until FILE or $W/release exists.
# Returns 0 for FILE, 1 for release, 2 when SECONDS have passed.
await() {
    ticks=$(( $2 * 10 ))
    while :; do
        [ -e "$1" ] && return 0
        [ -e "$W/release" ] && return 1
        [ "$ticks" -le 0 ] && return 2
        if [ "$have_inotify" = 1 ]; then
            inotifywait -qq -t 1 -e moved_to -e create "$W" >/dev/null 2>&1
            case $? in
                0|2) ticks=$(( ticks - 10 )) ;;
                # Not usable here (no watches left, …): poll instead.
                *) have_inotify=0 ;;
            esac
        else
            sleep 0.1
            ticks=$(( ticks - 1 ))
        fi
    done
}

# serve N: one request through nix-store --serve --write.
serve() {
    if [ -n "${NSH_STORE:-}" ]; then
        set -- "$1" --store "$NSH_STORE"
    fi
    n=$1
    shift
    # The builder gets as many cores as Slurm gave the job (NIX_BUILD_CORES).
    NIX_CONFIG="${NIX_CONFIG:+$NIX_CONFIG
}system-features = ${NSH_SYSTEM_FEATURES:-}
cores = ${SLURM_CPUS_ON_NODE:-0}" \
        "$nix_store" "$@" --serve --write \
        < "$W/request.$n" > "$W/response.$n" 2> "$W/log.$n"
    status=$?
    printf '@nsh-end %s %s\n' "${NSH_NONCE:?}" "$status" >> "$W/log.$n"
    printf '%s\n' "$status" > "$W/status.$n.tmp"
    mv "$W/status.$n.tmp" "$W/status.$n"
}

n=1
await "$W/request.$n" "${NSH_REQUEST_TIMEOUT:-300}"
case $? in
    1) cleanup; exit 0 ;;
    2) echo "nsh: no request came within ${NSH_REQUEST_TIMEOUT:-300} s" >&2
       cleanup; exit 75 ;;
esac
while :; do
    serve "$n"
    if [ "$n" -lt "${NSH_MAX_REQUESTS:-1}" ]; then
        next="$W/request.$(( n + 1 ))"
    else
        next="$W/release"
    fi
    await "$next" "${NSH_IDLE_TIMEOUT:-120}"
    [ $? -eq 0 ] && [ "$next" != "$W/release" ] || break
    n=$(( n + 1 ))
done
cleanup
exit 0
"#;

/// `PATH` for the job when the configuration names no Nix bin dir: the usual
/// places, the Nix profile ones first.
pub const JOB_PATH: &str =
    "/run/current-system/sw/bin:/nix/var/nix/profiles/default/bin:/usr/local/bin:/usr/bin:/bin";

/// How many requests one job serves (allocation reuse will raise this).
pub const MAX_REQUESTS: u32 = 1;

/// The job's whole environment. Every value comes from the configuration or
/// from nsh-alloc itself (the nonce); `system_features` is the cluster's
/// supported feature list.
pub fn environment(config: &Config, cluster: &Cluster, nonce: &str) -> Vec<(String, String)> {
    let remote = &config.remote;
    let features: Vec<&str> = cluster
        .supported_features
        .iter()
        .map(String::as_str)
        .collect();
    let path = if remote.nix_bin_dir.is_empty() {
        JOB_PATH.to_string()
    } else {
        format!("{}:{JOB_PATH}", remote.nix_bin_dir)
    };
    [
        ("PATH", path),
        ("NSH_WORK_ROOT", remote.work_root.clone()),
        ("NSH_NONCE", nonce.to_string()),
        ("NSH_SYSTEM_FEATURES", features.join(" ")),
        ("NSH_NIX_BIN", remote.nix_bin_dir.clone()),
        ("NSH_STORE", remote.store.clone()),
        ("NSH_REQUEST_TIMEOUT", remote.request_timeout_s.to_string()),
        ("NSH_IDLE_TIMEOUT", remote.idle_timeout_s.to_string()),
        ("NSH_MAX_REQUESTS", MAX_REQUESTS.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The job's work dir on the node.
pub fn work_dir(work_root: &str, job: u64) -> String {
    format!("{}/nsh-{job}", work_root.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    #[test]
    fn the_script() {
        insta::assert_snapshot!(SCRIPT);
    }

    #[test]
    fn the_environment() {
        let text = "[cluster.c]\nbackend = \"cli\"\nsystems = [\"x86_64-linux\"]\nsupported_features = [\"kvm\", \"big\"]\n[remote]\nnix_bin_dir = \"/opt/nix/bin\"\nstore = \"local\"\n";
        let config = Config::parse(Path::new("t.toml"), text).unwrap();
        let env = environment(&config, &config.clusters["c"], "n0nce");
        insta::assert_debug_snapshot!(env);
    }

    /// A job run locally: the script under `sh`, a fake `nix-store`.
    struct Job {
        root: tempfile::TempDir,
        child: Child,
        work: PathBuf,
    }

    const FAKE_NIX_STORE: &str = "#!/bin/sh\n\
        echo \"args: $*\" >&2\n\
        echo \"config: $NIX_CONFIG\" >&2\n\
        cat\n\
        exit \"${FAKE_STATUS:-0}\"\n";

    fn start(request_timeout: u32, idle_timeout: u32, extra_env: &[(&str, &str)]) -> Job {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let fake = bin.join("nix-store");
        std::fs::write(&fake, FAKE_NIX_STORE).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        if extra_env.iter().any(|(k, _)| *k == "FAKE_INOTIFY") {
            let fake = bin.join("inotifywait");
            std::fs::write(&fake, "#!/bin/sh\nexit 1\n").unwrap();
            std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let script = root.path().join("job.sh");
        std::fs::write(&script, SCRIPT).unwrap();
        let work_root = root.path().join("work");
        let mut command = Command::new("sh");
        command
            .arg(&script)
            .env_clear()
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .env("SLURM_JOB_ID", "42")
            .env("NSH_WORK_ROOT", &work_root)
            .env("NSH_NONCE", "n0nce")
            .env("NSH_SYSTEM_FEATURES", "kvm big")
            .env("NSH_NIX_BIN", &bin)
            .env("NSH_STORE", "")
            .env("NSH_REQUEST_TIMEOUT", request_timeout.to_string())
            .env("NSH_IDLE_TIMEOUT", idle_timeout.to_string())
            .env("NSH_MAX_REQUESTS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            command.env(k, v);
        }
        let child = command.spawn().unwrap();
        let work = work_root.join("nsh-42");
        Job { root, child, work }
    }

    impl Job {
        fn wait_for(&self, path: &Path, within: Duration) {
            let start = Instant::now();
            while !path.exists() {
                assert!(
                    start.elapsed() < within,
                    "{} did not appear",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        /// Writes `name` the way writers must: temp file, then rename.
        fn put(&self, name: &str, content: &str) {
            self.wait_for(&self.work, Duration::from_secs(5));
            let tmp = self.work.join(format!("{name}.tmp"));
            std::fs::write(&tmp, content).unwrap();
            std::fs::rename(&tmp, self.work.join(name)).unwrap();
        }
        fn finish(mut self, within: Duration) -> (i32, String) {
            let start = Instant::now();
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    let mut stderr = String::new();
                    use std::io::Read;
                    self.child
                        .stderr
                        .take()
                        .unwrap()
                        .read_to_string(&mut stderr)
                        .unwrap();
                    let _ = &self.root;
                    return (status.code().unwrap_or(-1), stderr);
                }
                if start.elapsed() > within {
                    let _ = self.child.kill();
                    panic!("the job did not end within {within:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    #[test]
    fn serves_one_request_then_waits_for_release() {
        let job = start(5, 5, &[("SLURM_CPUS_ON_NODE", "3")]);
        let work = job.work.clone();
        let mode = {
            job.wait_for(&work, Duration::from_secs(5));
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(&work).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode, 0o700);
        job.put("request.1", "REQUEST BYTES");
        job.wait_for(&work.join("status.1"), Duration::from_secs(2));
        assert_eq!(
            std::fs::read_to_string(work.join("status.1")).unwrap(),
            "0\n"
        );
        assert_eq!(
            std::fs::read_to_string(work.join("response.1")).unwrap(),
            "REQUEST BYTES"
        );
        let log = std::fs::read_to_string(work.join("log.1")).unwrap();
        assert_eq!(
            log,
            "args: --serve --write\nconfig: system-features = kvm big\ncores = 3\n@nsh-end n0nce 0\n"
        );
        // Still alive (waiting for release), then gone promptly on release.
        std::thread::sleep(Duration::from_millis(300));
        assert!(work.exists());
        let released = Instant::now();
        job.put("release", "");
        let (status, _) = job.finish(Duration::from_secs(3));
        assert_eq!(status, 0);
        assert!(released.elapsed() < Duration::from_millis(1500));
        assert!(!work.exists(), "the work dir is removed");
    }

    #[test]
    fn a_failing_build_is_reported_with_its_status_and_the_store_option() {
        let job = start(
            5,
            1,
            &[("FAKE_STATUS", "3"), ("NSH_STORE", "local?root=/x")],
        );
        let work = job.work.clone();
        job.put("request.1", "");
        job.wait_for(&work.join("status.1"), Duration::from_secs(2));
        assert_eq!(
            std::fs::read_to_string(work.join("status.1")).unwrap(),
            "3\n"
        );
        let log = std::fs::read_to_string(work.join("log.1")).unwrap();
        assert!(
            log.starts_with("args: --store local?root=/x --serve --write\n"),
            "{log}"
        );
        assert!(log.ends_with("@nsh-end n0nce 3\n"), "{log}");
        // No release: the idle timeout (1 s) ends the job, cleanly.
        let (status, _) = job.finish(Duration::from_secs(4));
        assert_eq!(status, 0);
        assert!(!work.exists());
    }

    #[test]
    fn no_request_in_time_is_transient() {
        let job = start(1, 5, &[]);
        let work = job.work.clone();
        let (status, stderr) = job.finish(Duration::from_secs(4));
        assert_eq!(status, 75);
        assert!(stderr.contains("no request came within 1 s"), "{stderr}");
        assert!(!work.exists());
    }

    #[test]
    fn a_broken_inotifywait_falls_back_to_polling() {
        // An inotifywait that fails at once must neither spin the timeout
        // away nor stop requests from being seen.
        let job = start(2, 5, &[("FAKE_INOTIFY", "1")]);
        let work = job.work.clone();
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(1200));
        assert!(work.exists(), "the job gave up early");
        job.put("request.1", "R");
        job.wait_for(&work.join("status.1"), Duration::from_secs(2));
        assert!(started.elapsed() < Duration::from_secs(2));
        job.put("release", "");
        let (status, _) = job.finish(Duration::from_secs(2));
        assert_eq!(status, 0);
    }

    #[test]
    fn release_before_any_request_ends_the_job() {
        let job = start(5, 5, &[]);
        let work = job.work.clone();
        job.put("release", "");
        let (status, _) = job.finish(Duration::from_secs(2));
        assert_eq!(status, 0);
        assert!(!work.exists());
    }

    #[test]
    fn sigterm_removes_the_work_dir() {
        let mut job = start(30, 30, &[]);
        let work = job.work.clone();
        job.wait_for(&work, Duration::from_secs(5));
        // Past the few builtins between mkdir and taking ownership: this is
        // about a job that is waiting for its request.
        std::thread::sleep(Duration::from_millis(200));
        crate::sys::process::terminate(&mut job.child);
        let (status, _) = job.finish(Duration::from_secs(3));
        assert_eq!(status, 143);
        assert!(!work.exists());
    }

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("keep"), "x").unwrap();
        // W is a symlink before the job starts.
        let root = tempfile::tempdir().unwrap();
        let work_root = root.path().join("work");
        std::fs::create_dir(&work_root).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), work_root.join("nsh-42")).unwrap();
        let script = root.path().join("job.sh");
        std::fs::write(&script, SCRIPT).unwrap();
        let out = Command::new("sh")
            .arg(&script)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("SLURM_JOB_ID", "42")
            .env("NSH_WORK_ROOT", &work_root)
            .env("NSH_NONCE", "n")
            .env("NSH_REQUEST_TIMEOUT", "1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(75));
        assert!(String::from_utf8_lossy(&out.stderr).contains("is not this job's own directory"));
        assert!(
            elsewhere.path().join("keep").exists(),
            "the target is left alone"
        );
    }

    #[test]
    fn work_dirs() {
        assert_eq!(work_dir("/tmp/nsh/", 7), "/tmp/nsh/nsh-7");
    }
}
