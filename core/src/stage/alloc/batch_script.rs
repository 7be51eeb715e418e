//! The batch script `nsh-alloc` submits, and the environment it runs with.
//!
//! The script is static text: no value from a derivation, a ticket or the
//! configuration is ever written into it. Everything variable reaches it as
//! an environment variable set at submit time ([`environment`]), so nothing a
//! derivation names can reach a shell as code.
//!
//! What the job does (the contract between `nsh-alloc`, `nsh-push`,
//! `nsh-run`, `nsh-fetch` and the pool; `docs/pool.md` has the whole story):
//!
//! * work dir `W = $NSH_WORK_ROOT/nsh-$SLURM_JOB_ID`, made fresh with
//!   `mkdir -m 0700` (one already there is refused: exit 75), in a
//!   `work_root` that is the job account's own and writable by nobody else,
//!   or root's with the sticky bit (anything else, a symlink too: exit 78),
//!   and in it the doorbell `W/wake`, a FIFO the job holds open read-write
//!   for its whole life (so a ring is never lost and a writer never blocks);
//! * it serves `W/request.N` files (writers create `request.N.tmp`, rename
//!   it, then ring the doorbell) in increasing N, skipping gaps: for each it
//!   writes `started.N`, runs `nix-store --serve --write < request.N >
//!   response.N 2> log.N` with `system-features = $NSH_SYSTEM_FEATURES` in
//!   `NIX_CONFIG`, appends `@nsh-end $NSH_NONCE <status>` to `log.N` and
//!   writes `status.N` (temp + rename); the files of earlier requests go;
//! * between requests it waits on the doorbell (coreutils `timeout` bounds
//!   the wait; it looks again at least every 10 s, for a file put without a
//!   ring), for as long as its state allows: a claimed
//!   number's request (`claim.K`, see below; the first request is claimed
//!   for the submitter) `$NSH_REQUEST_TIMEOUT` s, and when that was the
//!   first it exits 75; a build whose owner has not returned the job yet
//!   `$NSH_IDLE_TIMEOUT` s; a job returned to the pool (`idle.K` for the
//!   latest claim K) `$NSH_LINGER` s, or not at all when less than two
//!   minutes of its time limit (`$NSH_TIME_LIMIT` s, set at submission) are
//!   left, too little for any build the pool hands out;
//! * a number is claimed with `mkdir W/claim.K`, which exactly one process
//!   wins: the tool that takes a pooled job claims the number it will use,
//!   and the job, when its time is up, claims the next number itself before
//!   it leaves. So a job never leaves under a tool that has just taken it:
//!   whoever claims first wins, and the loser knows at once;
//! * `W/release` ends it at once (between requests); SIGTERM (scancel)
//!   also removes W, and so does every other way out.
//!
//! The job stays alive between requests so that outputs can be fetched from
//! clusters whose sshd only admits users with a running job, and so that
//! later builds skip Slurm's queue (allocation reuse).

use crate::config::{Cluster, Config};

/// The script. POSIX sh; snapshot-tested, and run for real by the tests.
pub const SCRIPT: &str = r#"#!/bin/sh
# nsh build job. This text is the same for every job: everything variable
# comes from the environment set at submission (see nsh's batch_script.rs).
set -u

# Requeued (a node failed; Slurm 22.05's REST API ignores `requeue: false`,
# and an admin may requeue any job): no build will come for this run of
# the job, so it ends at once rather than wait for one.
if [ "${SLURM_RESTART_COUNT:-0}" != 0 ]; then
    echo "nsh: job ${SLURM_JOB_ID:-?} was requeued (restart $SLURM_RESTART_COUNT); ending" >&2
    exit 0
fi

W="${NSH_WORK_ROOT:?}/nsh-${SLURM_JOB_ID:?}"
owned=0
waiter=
cleanup() {
    if [ -n "$waiter" ]; then
        kill "$waiter" 2>/dev/null
    fi
    if [ "$owned" = 1 ]; then
        rm -rf "$W"
    fi
}
# Traps first: a scancel right after the start must not leave W behind.
trap 'cleanup; exit 143' TERM
trap 'cleanup; exit 129' HUP
trap 'cleanup; exit 130' INT

umask 077
# work_root: this account's own (the first job makes it, 0700), writable by
# nobody else unless sticky; or root's with the sticky bit (like /tmp). One
# that another user owns or can rename in, or a symlink, could be swapped
# under the job: refused (78), naming it and its owner.
R=$NSH_WORK_ROOT
[ -e "$R" ] || [ -L "$R" ] || mkdir -m 0700 "$R" 2>/dev/null || [ -d "$R" ] || exit 75
if [ -L "$R" ] || [ ! -d "$R" ]; then
    echo "nsh: work_root $R is not a directory but a symbolic link or a file; refusing to use it" >&2
    exit 78
fi
mode=$(stat -c %A "$R") || exit 75
case $mode in
    *[tT]) others_may_rename=0 ;;
    ?????w????|????????w?) others_may_rename=1 ;;
    *) others_may_rename=0 ;;
esac
if { [ -O "$R" ] && [ "$others_may_rename" = 0 ]; } ||
    { [ "$(stat -c %u "$R")" = 0 ] && [ -k "$R" ]; }; then
    :
else
    echo "nsh: work_root $R ($mode) is owned by $(stat -c '%U (uid %u)' "$R"), not by this job's user $(id -un) (uid $(id -u)) alone nor by root with the sticky bit; refusing to use it" >&2
    exit 78
fi
# The job's own dir, made fresh: never one that is there already (someone
# else's, a symlink, a leftover), which is not used (nor removed).
if ! mkdir -m 0700 "$W" 2>/dev/null; then
    echo "nsh: $W is there already (owned by $(stat -c '%U (uid %u)' "$W" 2>/dev/null)); refusing to use it" >&2
    exit 75
fi
owned=1

if [ -n "${NSH_NIX_BIN:-}" ]; then
    nix_store="$NSH_NIX_BIN/nix-store"
else
    nix_store=nix-store
fi
request_timeout=${NSH_REQUEST_TIMEOUT:-300}
idle_timeout=${NSH_IDLE_TIMEOUT:-120}
linger=${NSH_LINGER:-0}
recheck=10
# The job's time limit in seconds (0: unknown), and when it started: a
# returned job whose time is too short for any build leaves at once.
time_limit=${NSH_TIME_LIMIT:-0}
born=$(date +%s)

# The doorbell: whoever puts a file here for the job rings it (a line into
# W/wake). Held open read-write (fd 3) for the job's whole life: a ring is
# never lost, and a writer never blocks. The files are the truth; a ring
# only says "look again". Without a FIFO or `timeout` the job polls.
doorbell=0
if mkfifo -m 0600 "$W/wake" 2>/dev/null && command exec 3<>"$W/wake"; then
    if command -v timeout >/dev/null 2>&1; then
        doorbell=1
    fi
fi

# wait_event SECONDS: until the doorbell rings or SECONDS have passed. In
# the background, so that a signal is acted on at once (`wait` returns).
wait_event() {
    if [ "$doorbell" = 1 ]; then
        timeout "$1" dd bs=512 count=1 <&3 >/dev/null 2>&1 &
        waiter=$!
        wait "$waiter"
        rang=$?
        waiter=
        case $rang in
            0|124) ;;
            # Not usable after all: poll from now on.
            *) doorbell=0 ;;
        esac
    else
        sleep 0.1
    fi
}

# next_request: the lowest request number above $last, in $next (empty if
# none). Numbers may have gaps: a tool may die after claiming one.
next_request() {
    next=
    if [ -e "$W/request.$((last + 1))" ]; then
        next=$((last + 1))
        return
    fi
    for f in "$W"/request.*; do
        k=${f##*.}
        case $k in ''|*[!0-9]*) continue ;; esac
        if [ "$k" -gt "$last" ] && { [ -z "$next" ] || [ "$k" -lt "$next" ]; }; then
            next=$k
        fi
    done
}

# top_claim: the highest claimed number, at least $last, in $top.
top_claim() {
    top=$last
    for f in "$W"/claim.*; do
        k=${f##*.}
        case $k in ''|*[!0-9]*) continue ;; esac
        if [ "$k" -gt "$top" ]; then
            top=$k
        fi
    done
}

# prune N: the files of the requests before N; their owners are done.
prune() {
    below=$1
    set --
    for f in "$W"/request.* "$W"/response.* "$W"/log.* "$W"/status.* \
        "$W"/started.* "$W"/idle.* "$W"/claim.*; do
        k=${f##*.}
        case $k in ''|*[!0-9]*) continue ;; esac
        if [ "$k" -lt "$below" ]; then
            set -- "$@" "$f"
        fi
    done
    if [ $# -gt 0 ]; then
        rm -rf "$@"
    fi
}

# serve N: one request through nix-store --serve --write.
serve() {
    n=$1
    : > "$W/started.$n"
    prune "$n"
    set --
    if [ -n "${NSH_STORE:-}" ]; then
        set -- --store "$NSH_STORE"
    fi
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

# Request 1 is the submitter's: claimed on its behalf.
mkdir "$W/claim.1" 2>/dev/null
last=0
state=
since=0
while :; do
    if [ -e "$W/release" ]; then
        break
    fi
    next_request
    if [ -n "$next" ]; then
        serve "$next"
        last=$next
        state=
        continue
    fi
    # What the job waits for now, and how long it may: returned to the pool
    # (idle.K for the latest claim K: its build is done, or it never came),
    # claimed for a request still to come, or held by the owner of the
    # build it just ran (who fetches, then returns it).
    top_claim
    if [ -e "$W/idle.$top" ]; then
        now_state="idle $top" limit=$linger
    elif [ "$top" -gt "$last" ]; then
        now_state="claimed $top" limit=$request_timeout
    else
        now_state="held $top" limit=$idle_timeout
    fi
    now=$(date +%s)
    if [ "$now_state" != "$state" ]; then
        state=$now_state
        since=$now
    fi
    left=$((since + limit - now))
    # Returned, with less time left than the shortest build is handed
    # (a minute, and a minute's margin): no build will come.
    if [ "$time_limit" -gt 0 ] && [ "${now_state%% *}" = idle ] &&
        [ $((now + 120)) -ge $((born + time_limit)) ]; then
        left=0
    fi
    if [ "$left" -gt 0 ]; then
        # At most $recheck s at a time: a file put without a ring (by hand,
        # or by a writer killed between its rename and its ring) is still
        # seen, only later.
        if [ "$left" -gt "$recheck" ]; then
            left=$recheck
        fi
        wait_event "$left"
        continue
    fi
    # Time is up: leave by claiming the next number, so that no tool can
    # take the job as it goes. A tool that claimed it first wins, and the
    # job waits for that tool's request instead.
    if mkdir "$W/claim.$((top + 1))" 2>/dev/null; then
        if [ "$last" = 0 ]; then
            echo "nsh: no request came within $request_timeout s" >&2
            cleanup
            exit 75
        fi
        break
    fi
done
cleanup
exit 0
"#;

/// `PATH` for the job when the configuration names no Nix bin dir: the usual
/// places, the Nix profile ones first.
pub const JOB_PATH: &str =
    "/run/current-system/sw/bin:/nix/var/nix/profiles/default/bin:/usr/local/bin:/usr/bin:/bin";

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
        ("NSH_LINGER", cluster.linger_s.to_string()),
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
        let text = "[cluster.c]\nbackend = \"cli\"\nsystems = [\"x86_64-linux\"]\nsupported_features = [\"kvm\", \"big\"]\nlinger = 30\n[remote]\nnix_bin_dir = \"/opt/nix/bin\"\nstore = \"local\"\n";
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

    fn executable(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Starts the job with the timeouts 5 s, linger 0, and `env` on top;
    /// `fakes` are (name, script) put first on its PATH.
    fn start(env: &[(&str, &str)], fakes: &[(&str, &str)]) -> Job {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        executable(&bin.join("nix-store"), FAKE_NIX_STORE);
        for (name, text) in fakes {
            executable(&bin.join(name), text);
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
            .env("NSH_REQUEST_TIMEOUT", "5")
            .env("NSH_IDLE_TIMEOUT", "5")
            .env("NSH_LINGER", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
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
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        /// Rings the doorbell, as the tools do: one line, the FIFO opened
        /// read-write (which never blocks).
        fn ring(&self) {
            use std::io::Write;
            let wake = self.work.join("wake");
            let mut fifo = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&wake)
                .unwrap();
            fifo.write_all(b"r\n").unwrap();
        }
        /// Writes `name` the way writers must: temp file, rename, ring.
        fn put(&self, name: &str, content: &str) {
            self.wait_for(&self.work.join("wake"), Duration::from_secs(5));
            let tmp = self.work.join(format!("{name}.tmp"));
            std::fs::write(&tmp, content).unwrap();
            std::fs::rename(&tmp, self.work.join(name)).unwrap();
            self.ring();
        }
        /// Claims number `n` as a tool taking the job does; whether it won.
        fn claim(&self, n: u32) -> bool {
            let won = std::fs::create_dir(self.work.join(format!("claim.{n}"))).is_ok();
            if won {
                self.ring();
            }
            won
        }
        fn read(&self, name: &str) -> String {
            std::fs::read_to_string(self.work.join(name)).unwrap()
        }
        fn alive(&mut self) -> bool {
            self.child.try_wait().unwrap().is_none()
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
    fn a_requeued_job_ends_at_once_and_makes_no_work_dir() {
        let job = start(&[("SLURM_RESTART_COUNT", "1")], &[]);
        let work = job.work.clone();
        let (status, stderr) = job.finish(Duration::from_secs(2));
        assert_eq!(status, 0, "{stderr}");
        assert!(stderr.contains("was requeued"), "{stderr}");
        assert!(!work.exists());
    }

    #[test]
    fn serves_one_request_then_waits_for_release() {
        let job = start(&[("SLURM_CPUS_ON_NODE", "3")], &[]);
        let work = job.work.clone();
        let mode = {
            job.wait_for(&work, Duration::from_secs(5));
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(&work).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode, 0o700);
        job.put("request.1", "REQUEST BYTES");
        job.wait_for(&work.join("status.1"), Duration::from_secs(2));
        assert!(work.join("started.1").exists());
        assert_eq!(job.read("status.1"), "0\n");
        assert_eq!(job.read("response.1"), "REQUEST BYTES");
        assert_eq!(
            job.read("log.1"),
            "args: --serve --write\nconfig: system-features = kvm big\ncores = 3\n@nsh-end n0nce 0\n"
        );
        // Still alive (waiting for release), then gone promptly on release.
        std::thread::sleep(Duration::from_millis(300));
        assert!(work.exists());
        let released = Instant::now();
        job.put("release", "");
        let (status, _) = job.finish(Duration::from_secs(3));
        assert_eq!(status, 0);
        assert!(released.elapsed() < Duration::from_millis(500));
        assert!(!work.exists(), "the work dir is removed");
    }

    #[test]
    fn a_failing_build_is_reported_with_its_status_and_the_store_option() {
        let job = start(
            &[
                ("FAKE_STATUS", "3"),
                ("NSH_STORE", "local?root=/x"),
                ("NSH_IDLE_TIMEOUT", "1"),
            ],
            &[],
        );
        let work = job.work.clone();
        job.put("request.1", "");
        job.wait_for(&work.join("status.1"), Duration::from_secs(2));
        assert_eq!(job.read("status.1"), "3\n");
        let log = job.read("log.1");
        assert!(
            log.starts_with("args: --store local?root=/x --serve --write\n"),
            "{log}"
        );
        assert!(log.ends_with("@nsh-end n0nce 3\n"), "{log}");
        // Never returned nor released: the idle timeout (1 s) ends the job,
        // cleanly.
        let (status, _) = job.finish(Duration::from_secs(4));
        assert_eq!(status, 0);
        assert!(!work.exists());
    }

    #[test]
    fn no_request_in_time_is_transient() {
        let job = start(&[("NSH_REQUEST_TIMEOUT", "1")], &[]);
        let work = job.work.clone();
        let (status, stderr) = job.finish(Duration::from_secs(4));
        assert_eq!(status, 75);
        assert!(stderr.contains("no request came within 1 s"), "{stderr}");
        assert!(!work.exists());
    }

    /// A `sleep` that would make a polling job miss every deadline here: a
    /// request served at once proves the job woke on the doorbell.
    const SLOW_SLEEP: &str = "#!/bin/sh\nexec /bin/sleep 5\n";

    #[test]
    fn requests_are_served_in_turn_on_the_doorbell() {
        let job = start(&[("NSH_LINGER", "5")], &[("sleep", SLOW_SLEEP)]);
        let work = job.work.clone();
        job.put("request.1", "ONE");
        job.wait_for(&work.join("status.1"), Duration::from_secs(2));
        // Returned by its owner, then taken (claim 2) and the request put.
        assert!(job.put_and_time("idle.1") < Duration::from_secs(1));
        assert!(job.claim(2));
        let rang = Instant::now();
        job.put("request.2", "TWO");
        job.wait_for(&work.join("started.2"), Duration::from_secs(2));
        assert!(
            rang.elapsed() < Duration::from_millis(500),
            "picked up after {:?}",
            rang.elapsed()
        );
        job.wait_for(&work.join("status.2"), Duration::from_secs(2));
        assert_eq!(job.read("response.2"), "TWO");
        assert!(job.read("log.2").ends_with("@nsh-end n0nce 0\n"));
        // The first request's files are gone; the second's stay.
        for name in ["request.1", "response.1", "log.1", "status.1", "idle.1"] {
            assert!(!work.join(name).exists(), "{name} is left");
        }
        assert!(work.join("status.2").exists());
        job.put("release", "");
        assert_eq!(job.finish(Duration::from_secs(3)).0, 0);
    }

    impl Job {
        /// Puts `name` (an empty file) and returns how long that took.
        fn put_and_time(&self, name: &str) -> Duration {
            let t = Instant::now();
            self.put(name, "");
            t.elapsed()
        }
    }

    #[test]
    fn a_gap_left_by_a_dead_taker_is_skipped() {
        let job = start(&[("NSH_LINGER", "5")], &[]);
        let work = job.work.clone();
        job.put("request.1", "ONE");
        job.wait_for(&work.join("status.1"), Duration::from_secs(2));
        // 2 was claimed by a tool that died before writing its request;
        // the next taker claims 3.
        assert!(job.claim(2));
        assert!(job.claim(3));
        job.put("request.3", "THREE");
        job.wait_for(&work.join("status.3"), Duration::from_secs(2));
        assert_eq!(job.read("response.3"), "THREE");
        assert!(!work.join("started.2").exists());
        job.put("release", "");
        assert_eq!(job.finish(Duration::from_secs(3)).0, 0);
    }

    #[test]
    fn a_returned_job_lingers_then_leaves_by_itself() {
        let job = start(&[("NSH_LINGER", "1")], &[]);
        let work = job.work.clone();
        job.put("request.1", "ONE");
        job.wait_for(&work.join("status.1"), Duration::from_secs(2));
        // Held (not returned yet) it waits the idle timeout, 5 s.
        std::thread::sleep(Duration::from_millis(1500));
        assert!(work.exists());
        let returned = Instant::now();
        job.put("idle.1", "");
        let (status, _) = job.finish(Duration::from_secs(4));
        assert_eq!(status, 0);
        let lingered = returned.elapsed();
        assert!(lingered >= Duration::from_millis(900), "{lingered:?}");
        assert!(!work.exists());
    }

    #[test]
    fn a_returned_job_near_its_time_limit_leaves_at_once() {
        let job = start(&[("NSH_LINGER", "30"), ("NSH_TIME_LIMIT", "100")], &[]);
        let work = job.work.clone();
        job.put("request.1", "ONE");
        job.wait_for(&work.join("status.1"), Duration::from_secs(2));
        job.put("idle.1", "");
        let (status, _) = job.finish(Duration::from_secs(3));
        assert_eq!(status, 0);
        assert!(!work.exists());
    }

    #[test]
    fn a_claim_keeps_a_lingering_job() {
        let mut job = start(&[("NSH_LINGER", "1"), ("NSH_REQUEST_TIMEOUT", "2")], &[]);
        let work = job.work.clone();
        job.put("request.1", "ONE");
        job.wait_for(&work.join("status.1"), Duration::from_secs(2));
        job.put("idle.1", "");
        // Taken at once: past its linger it still waits for request 2.
        assert!(job.claim(2));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(job.alive(), "the job left under a taker");
        job.put("request.2", "TWO");
        job.wait_for(&work.join("status.2"), Duration::from_secs(2));
        // Returned again: when its linger is up it claims 3 itself and
        // leaves.
        job.put("idle.2", "");
        let (status, _) = job.finish(Duration::from_secs(4));
        assert_eq!(status, 0);
        assert!(!work.exists());
    }

    #[test]
    fn a_claimed_number_whose_request_never_comes_lets_the_job_go() {
        let job = start(&[("NSH_LINGER", "5"), ("NSH_REQUEST_TIMEOUT", "1")], &[]);
        let work = job.work.clone();
        job.put("request.1", "ONE");
        job.wait_for(&work.join("status.1"), Duration::from_secs(2));
        job.put("idle.1", "");
        assert!(job.claim(2));
        let (status, _) = job.finish(Duration::from_secs(4));
        assert_eq!(status, 0);
        assert!(!work.exists());
    }

    #[test]
    fn without_a_usable_timeout_the_job_polls() {
        // A `timeout` that fails at once must neither spin the deadline
        // away nor stop requests from being seen.
        let job = start(
            &[("NSH_REQUEST_TIMEOUT", "4")],
            &[("timeout", "#!/bin/sh\nexit 126\n")],
        );
        let work = job.work.clone();
        // From the moment the job runs (a loaded machine may take a while
        // to start it).
        job.wait_for(&work.join("wake"), Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(work.exists(), "the job gave up early");
        let put = Instant::now();
        job.put("request.1", "R");
        job.wait_for(&work.join("status.1"), Duration::from_secs(2));
        assert!(put.elapsed() < Duration::from_secs(2));
        job.put("release", "");
        let (status, _) = job.finish(Duration::from_secs(2));
        assert_eq!(status, 0);
    }

    #[test]
    fn release_before_any_request_ends_the_job() {
        let job = start(&[], &[]);
        let work = job.work.clone();
        job.put("release", "");
        let (status, _) = job.finish(Duration::from_secs(2));
        assert_eq!(status, 0);
        assert!(!work.exists());
    }

    #[test]
    fn sigterm_removes_the_work_dir() {
        let mut job = start(&[("NSH_REQUEST_TIMEOUT", "30")], &[]);
        let work = job.work.clone();
        job.wait_for(&work.join("wake"), Duration::from_secs(5));
        // Past the few builtins between mkfifo and the wait: this is about a
        // job that is waiting for its request.
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
        assert!(String::from_utf8_lossy(&out.stderr).contains("is there already"));
        assert!(
            elsewhere.path().join("keep").exists(),
            "the target is left alone"
        );
    }

    /// Runs the script with `work_root` as NSH_WORK_ROOT until it starts
    /// serving or refuses: (exit status, stderr). A job that starts is
    /// stopped at once (its first request never comes: 75 after 1 s).
    fn run_in(work_root: &Path) -> (Option<i32>, String) {
        let root = tempfile::tempdir().unwrap();
        let script = root.path().join("job.sh");
        std::fs::write(&script, SCRIPT).unwrap();
        let out = Command::new("sh")
            .arg(&script)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("SLURM_JOB_ID", "42")
            .env("NSH_WORK_ROOT", work_root)
            .env("NSH_NONCE", "n")
            .env("NSH_REQUEST_TIMEOUT", "1")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn a_work_root_others_could_swap_is_refused_naming_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // A symlink (to a directory that would do).
        let target = dir.path().join("target");
        std::fs::create_dir(&target).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let (status, stderr) = run_in(&link);
        assert_eq!(status, Some(78), "{stderr}");
        assert!(
            stderr.contains(&format!("work_root {}", link.display())),
            "{stderr}"
        );
        assert!(stderr.contains("symbolic link"), "{stderr}");
        assert!(std::fs::read_dir(&target).unwrap().next().is_none());
        // Ours, but anybody may rename in it (0777, not sticky).
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (status, stderr) = run_in(&open);
        assert_eq!(status, Some(78), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "work_root {} (drwxrwxrwx) is owned by",
                open.display()
            )),
            "{stderr}"
        );
        assert!(std::fs::read_dir(&open).unwrap().next().is_none());
    }

    #[test]
    fn a_work_root_of_our_own_is_made_private_or_used_when_sticky() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // Not there yet: made, 0700.
        let fresh = dir.path().join("fresh");
        let (status, stderr) = run_in(&fresh);
        assert_eq!(status, Some(75), "no first request: {stderr}");
        assert!(!stderr.contains("refusing"), "{stderr}");
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o700);
        // Ours, sticky and open to all (as an admin may make it).
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let (status, stderr) = run_in(&fresh);
        assert_eq!(status, Some(75), "{stderr}");
        assert!(!stderr.contains("refusing"), "{stderr}");
    }

    #[test]
    fn work_dirs() {
        assert_eq!(work_dir("/tmp/nsh/", 7), "/tmp/nsh/nsh-7");
    }
}
