//! What the login side tells a pooled job on its node, each one short
//! command over the node's ssh master: take it (claim the next request
//! number), give it back (its build is done), let it go (release). The job's
//! side of this is the batch script (`stage::alloc::batch_script`).

use std::process::Stdio;

use crate::stage::ssh::Ssh;

/// `sh -c TAKE_SCRIPT sh W N`: the job is free (every request it has has its
/// status: no build runs or waits) and number N is claimed for the caller
/// with `mkdir`, which only one process wins; then the doorbell rings, so
/// the job waits for request N from now on. Exit 3: the job is gone; 4: a
/// build runs or waits there; 5: the number is taken (the job claimed it
/// itself to leave).
pub const TAKE_SCRIPT: &str = r#"W=$1 n=$2
{ [ -d "$W" ] && [ ! -L "$W" ] && [ -O "$W" ]; } || exit 3
for f in "$W"/request.*; do
    k=${f##*.}
    case $k in ''|*[!0-9]*) continue ;; esac
    [ -e "$W/status.$k" ] || exit 4
done
mkdir "$W/claim.$n" 2>/dev/null || exit 5
if [ -p "$W/wake" ]; then
    { printf 'take %s\n' "$n" >&3; } 2>/dev/null 3<>"$W/wake"
fi
exit 0
"#;

/// `sh -c GIVE_BACK_SCRIPT sh W N`: the holder of claim N is done with the
/// job: no build runs or waits there any more, and `idle.N` says so, which
/// starts the job's linger. Exit 3: gone; 4: a build still runs or waits.
pub const GIVE_BACK_SCRIPT: &str = r#"W=$1 n=$2
{ [ -d "$W" ] && [ ! -L "$W" ] && [ -O "$W" ]; } || exit 3
for f in "$W"/request.*; do
    k=${f##*.}
    case $k in ''|*[!0-9]*) continue ;; esac
    [ -e "$W/status.$k" ] || exit 4
done
: > "$W/idle.$n" || exit 3
if [ -p "$W/wake" ]; then
    { printf 'idle %s\n' "$n" >&3; } 2>/dev/null 3<>"$W/wake"
fi
exit 0
"#;

/// `sh -c RELEASE_SCRIPT sh W`: the job ends (between requests); a job that
/// is gone needs nothing.
pub const RELEASE_SCRIPT: &str = r#"W=$1
{ [ -d "$W" ] && [ ! -L "$W" ] && [ -O "$W" ]; } || exit 0
: > "$W/release" || exit 3
if [ -p "$W/wake" ]; then
    { printf 'release\n' >&3; } 2>/dev/null 3<>"$W/wake"
fi
exit 0
"#;

/// `sh -c THEN_GIVE_BACK_SCRIPT sh W N GIVE_BACK COMMAND...`: runs COMMAND
/// (the fetch's `nix-store --serve`); once it ended well, gives the job back
/// as GIVE_BACK (the text of [`GIVE_BACK_SCRIPT`]) does, in the same ssh
/// session: one session fewer per build. COMMAND's own status when it
/// failed; else 0 (given back), 93 (gone), 94 (busy), 95 (the give-back
/// failed otherwise): [`after_serve`].
pub const THEN_GIVE_BACK_SCRIPT: &str = r#"W=$1 n=$2 g=$3
shift 3
"$@" || exit $?
sh -c "$g" sh "$W" "$n"
case $? in
    0) exit 0 ;;
    3) exit 93 ;;
    4) exit 94 ;;
    *) exit 95 ;;
esac
"#;

/// The remote argv that runs `command`, then gives back claim `n` of the
/// job whose work dir is `work` ([`THEN_GIVE_BACK_SCRIPT`]).
#[must_use]
pub fn then_give_back_argv(command: &[&str], work: &str, n: u32) -> Vec<String> {
    let n = n.to_string();
    [
        "sh",
        "-c",
        THEN_GIVE_BACK_SCRIPT,
        "sh",
        work,
        &n,
        GIVE_BACK_SCRIPT,
    ]
    .into_iter()
    .chain(command.iter().copied())
    .map(ToString::to_string)
    .collect()
}

/// The give-back's answer from the exit status of a
/// [`THEN_GIVE_BACK_SCRIPT`] command; `Err(status)` when the command before
/// it failed (or was killed: `None`).
pub fn after_serve(status: Option<i32>) -> Result<Answer, Option<i32>> {
    match status {
        Some(0) => Ok(Answer::Done),
        Some(93) => Ok(Answer::Gone),
        Some(94) => Ok(Answer::Busy),
        Some(95) => Ok(Answer::Unreachable(
            "the give-back after the fetch failed".to_string(),
        )),
        other => Err(other),
    }
}

/// What the node said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Done,
    /// The job's work dir is gone: the job ended.
    Gone,
    /// A build runs or waits in the job.
    Busy,
    /// The number was claimed already: the job is leaving.
    Lost,
    /// ssh failed (the words are ssh's).
    Unreachable(String),
}

/// Runs one of the scripts above on the node.
pub fn tell(ssh: &Ssh, script: &str, args: &[&str]) -> Answer {
    let mut argv = vec!["sh", "-c", script, "sh"];
    argv.extend_from_slice(args);
    let out = ssh.command(&argv).stdin(Stdio::null()).output();
    match out {
        Ok(out) => match out.status.code() {
            Some(0) => Answer::Done,
            Some(3) => Answer::Gone,
            Some(4) => Answer::Busy,
            Some(5) => Answer::Lost,
            _ => Answer::Unreachable(format!(
                "{} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            )),
        },
        Err(e) => Answer::Unreachable(format!("running ssh: {e}")),
    }
}

/// Claims request number `n` of the job whose work dir is `work`.
pub fn take(ssh: &Ssh, work: &str, n: u32) -> Answer {
    tell(ssh, TAKE_SCRIPT, &[work, &n.to_string()])
}

/// Gives the job back after claim `n`: it lingers from now on.
pub fn give_back(ssh: &Ssh, work: &str, n: u32) -> Answer {
    tell(ssh, GIVE_BACK_SCRIPT, &[work, &n.to_string()])
}

/// Lets the job end.
pub fn release(ssh: &Ssh, work: &str) -> Answer {
    tell(ssh, RELEASE_SCRIPT, &[work])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    fn run(script: &str, work: &Path, n: &str) -> i32 {
        Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(work)
            .arg(n)
            .status()
            .unwrap()
            .code()
            .unwrap()
    }

    #[test]
    fn a_take_claims_once_and_only_a_free_job() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("nsh-1");
        assert_eq!(run(TAKE_SCRIPT, &w, "2"), 3, "gone");
        std::fs::create_dir(&w).unwrap();
        std::fs::write(w.join("request.1"), "r").unwrap();
        assert_eq!(run(TAKE_SCRIPT, &w, "2"), 4, "building");
        assert_eq!(run(GIVE_BACK_SCRIPT, &w, "1"), 4, "building");
        std::fs::write(w.join("status.1"), "0\n").unwrap();
        std::fs::write(w.join("request.1.tmp"), "r").unwrap();
        assert_eq!(run(GIVE_BACK_SCRIPT, &w, "1"), 0);
        assert!(w.join("idle.1").exists());
        assert_eq!(run(TAKE_SCRIPT, &w, "2"), 0);
        assert!(w.join("claim.2").is_dir());
        assert_eq!(run(TAKE_SCRIPT, &w, "2"), 5, "claimed already");
        assert_eq!(run(RELEASE_SCRIPT, &w, ""), 0);
        assert!(w.join("release").exists());
    }

    #[test]
    fn a_give_back_follows_a_command_that_ended_well() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("nsh-1");
        std::fs::create_dir(&w).unwrap();
        std::fs::write(w.join("request.1"), "r").unwrap();
        std::fs::write(w.join("status.1"), "0\n").unwrap();
        let work = w.to_str().unwrap();
        let run = |command: &[&str]| {
            let argv = then_give_back_argv(command, work, 1);
            let status = Command::new(&argv[0]).args(&argv[1..]).status().unwrap();
            after_serve(status.code())
        };
        assert_eq!(run(&["sh", "-c", "exit 1"]), Err(Some(1)));
        assert!(!w.join("idle.1").exists(), "no give-back after a failure");
        assert_eq!(run(&["true"]), Ok(Answer::Done));
        assert!(w.join("idle.1").exists());
        std::fs::remove_file(w.join("status.1")).unwrap();
        assert_eq!(run(&["true"]), Ok(Answer::Busy));
        std::fs::remove_dir_all(&w).unwrap();
        assert_eq!(run(&["true"]), Ok(Answer::Gone));
    }

    #[test]
    fn the_doorbell_rings_only_when_it_is_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("nsh-1");
        std::fs::create_dir(&w).unwrap();
        assert_eq!(run(TAKE_SCRIPT, &w, "2"), 0);
        assert!(!w.join("wake").exists(), "no doorbell was made");
        let status = Command::new("mkfifo").arg(w.join("wake")).status().unwrap();
        assert!(status.success());
        // Held open read-write, as the job holds it.
        let mut fifo = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(w.join("wake"))
            .unwrap();
        assert_eq!(run(TAKE_SCRIPT, &w, "3"), 0);
        use std::io::Read;
        let mut line = [0u8; 7];
        fifo.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"take 3\n");
    }
}
