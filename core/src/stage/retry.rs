//! The one retry rule of the stages that talk to a node: a transient
//! failure (ssh refused, a connection dropped) is tried again once, after a
//! pause; anything else is final.

use std::time::Duration;

use crate::error::{Failure, Kind};
use crate::log_warn;

/// How many times a transient failure is tried again.
pub const RETRIES: u32 = 1;
/// The pause before trying again.
const PAUSE: Duration = Duration::from_secs(1);

/// Runs `attempt` until it succeeds, fails other than transiently, or has
/// been retried [`RETRIES`] times.
///
/// # Errors
/// The last attempt's failure.
pub fn transient<T>(mut attempt: impl FnMut() -> Result<T, Failure>) -> Result<T, Failure> {
    let mut retried = 0;
    loop {
        match attempt() {
            Err(failure) if failure.kind == Kind::Transient && retried < RETRIES => {
                retried += 1;
                log_warn!("{failure}; trying again");
                std::thread::sleep(PAUSE);
            }
            other => return other,
        }
    }
}
