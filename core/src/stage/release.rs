//! Letting a job end, or giving it back to the pool: `W/release` on the
//! node tells the job script that nothing more will come, and it removes
//! its work dir and exits. `nsh-fetch` releases once the outputs are home
//! (or gives the job back to the pool), `nsh-run` when a build failed or
//! did not finish (nothing will be fetched then).

use crate::pool::node::{self, Answer};
use crate::stage::ssh::Ssh;
use crate::ticket::AllocSection;
use crate::{log_info, log_warn};

/// Writes `W/release` on the node and rings the job's doorbell. Best
/// effort: a job that is gone (its work dir removed) needs no release, and
/// one that cannot be reached ends after its idle timeout.
pub fn release(ssh: &Ssh, alloc: &AllocSection) {
    match node::release(ssh, &alloc.work) {
        Answer::Done | Answer::Gone => {
            log_info!("released job {} on {}", alloc.job, ssh.describe());
        }
        answer => log_warn!(
            "could not write {}/release on {} ({answer:?}); the job ends after its idle timeout",
            alloc.work,
            ssh.describe(),
        ),
    }
}

/// Ends the build's use of its job when dropped, unless [`ReleaseOnDrop::keep`]
/// or [`ReleaseOnDrop::give_back`] was called: every way out of a build that
/// does not end in a fetch lets the job go (and out of the pool).
pub struct ReleaseOnDrop<'a> {
    ssh: &'a Ssh,
    alloc: &'a AllocSection,
    pooled: bool,
    armed: bool,
}

impl<'a> ReleaseOnDrop<'a> {
    /// Armed: dropping it releases the job. `pooled`: the job is in its
    /// cluster's pool (`linger` > 0).
    #[must_use]
    pub fn new(ssh: &'a Ssh, alloc: &'a AllocSection, pooled: bool) -> ReleaseOnDrop<'a> {
        ReleaseOnDrop {
            ssh,
            alloc,
            pooled,
            armed: true,
        }
    }

    /// The job stays (its outputs are to be fetched).
    pub fn keep(mut self) {
        self.armed = false;
    }

    /// The build failed on its own and the job is fine: a pooled job goes
    /// back to the pool, any other is released.
    pub fn give_back(mut self) {
        self.armed = false;
        if self.pooled {
            crate::stage::alloc::pooled::give_back(self.ssh, self.alloc, None);
        } else {
            release(self.ssh, self.alloc);
        }
    }
}

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            release(self.ssh, self.alloc);
            if self.pooled {
                crate::stage::alloc::pooled::forget(self.alloc);
            }
        }
    }
}
