//! Letting a job end: `W/release` on the node tells the job script that
//! nothing more will come, and it removes its work dir and exits. `nsh-fetch`
//! releases once the outputs are home, `nsh-run` when a build failed or did
//! not finish (nothing will be fetched then).

use std::process::Stdio;

use crate::stage::ssh::Ssh;
use crate::ticket::AllocSection;
use crate::{log_info, log_warn};

/// Writes `W/release` on the node. Best effort: a job that is gone (its
/// work dir removed) needs no release, and one that cannot be reached ends
/// after its idle timeout.
pub fn release(ssh: &Ssh, alloc: &AllocSection) {
    let out = ssh
        .command(&[
            "sh",
            "-c",
            r#"[ ! -d "$1" ] || : >"$1/release""#,
            "sh",
            &alloc.work,
        ])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(out) if out.status.success() => {
            log_info!("released job {} on {}", alloc.job, ssh.describe());
        }
        Ok(out) => log_warn!(
            "could not write {}/release on {} ({}); the job ends after its idle timeout",
            alloc.work,
            ssh.describe(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => log_warn!(
            "running ssh to release job {}: {e}; the job ends after its idle timeout",
            alloc.job
        ),
    }
}

/// Releases the job when dropped, unless [`ReleaseOnDrop::keep`] was called:
/// every way out of a build that does not end in a fetch releases the job.
pub struct ReleaseOnDrop<'a> {
    ssh: &'a Ssh,
    alloc: &'a AllocSection,
    armed: bool,
}

impl<'a> ReleaseOnDrop<'a> {
    /// Armed: dropping it releases the job.
    #[must_use]
    pub fn new(ssh: &'a Ssh, alloc: &'a AllocSection) -> ReleaseOnDrop<'a> {
        ReleaseOnDrop {
            ssh,
            alloc,
            armed: true,
        }
    }

    /// The job stays (its outputs are to be fetched).
    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            release(self.ssh, self.alloc);
        }
    }
}
