//! Retrying a build elsewhere: a build that failed transiently once it had
//! a job (its node died, the job was preempted, requeued or cancelled by an
//! admin, ssh to the node dropped) is run again from the first ticket in a
//! new job that excludes the nodes earlier attempts failed on, up to the
//! cluster's `retries`, with a pause between attempts, before Nix is told.
//!
//! Nothing of a failed attempt is imported: `nsh-fetch` only runs on a
//! built result, and what it registers is all or nothing.

use std::time::Duration;

use crate::error::Kind;
use crate::ticket::Ticket;

/// The stages whose transient failures are the job's or the node's: a
/// new job on another node may succeed. (`nsh-alloc`'s own are a queue
/// timeout or Slurm unreachable, which a new job does not cure.)
const NODE_STAGES: [&str; 3] = ["push", "run", "fetch"];

/// The pause before attempt `attempt` (2 for the first retry): 1 s, then
/// doubling, at most 30 s.
pub fn backoff(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(2).min(5);
    Duration::from_secs(1u64 << doublings).min(Duration::from_secs(30))
}

/// The ticket of the next attempt, if the attempt that ended in `last`
/// (the pipeline's final ticket) is to be retried: `first` (the ticket the
/// attempt started from) with its `retry` section advanced: the attempt's
/// number, the failed node excluded, the failed job recorded. `None`: the
/// outcome stands (success, a failure of the build itself or of the
/// configuration, or `retries` used up).
pub fn next_attempt(first: &Ticket, last: &Ticket, retries: u32) -> Option<Ticket> {
    let error = last.error.as_ref()?;
    if error.kind != Kind::Transient || !NODE_STAGES.contains(&error.stage.as_str()) {
        return None;
    }
    let attempt = first.retry.as_ref().map_or(1, |r| r.attempt.max(1));
    if attempt > retries {
        return None;
    }
    let mut retry = first.retry.clone().unwrap_or_default();
    retry.attempt = attempt + 1;
    if let Some(alloc) = &last.alloc {
        retry.excluding(&alloc.node);
        if !retry.jobs.contains(&alloc.job) {
            retry.jobs.push(alloc.job);
        }
    }
    let mut next = first.clone();
    next.retry = Some(retry);
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Failure;
    use crate::ticket::{AllocSection, TicketError};

    fn failed(stage: &str, kind: Kind, node: &str, job: u64) -> Ticket {
        let mut t = Ticket::new();
        t.alloc = Some(AllocSection {
            node: node.into(),
            job,
            ..AllocSection::default()
        });
        let mut failure =
            Failure::transient("Slurm job 7 on node1 ended: its node failed (NODE_FAIL)");
        failure.kind = kind;
        t.error = Some(TicketError::new(stage, &failure));
        t
    }

    #[test]
    fn a_node_fault_is_retried_elsewhere_until_retries_are_used_up() {
        let first = Ticket::new();
        let second = next_attempt(&first, &failed("run", Kind::Transient, "node1", 7), 2).unwrap();
        let retry = second.retry.clone().unwrap();
        assert_eq!(
            (retry.attempt, retry.exclude.clone(), retry.jobs.clone()),
            (2, vec!["node1".to_string()], vec![7])
        );
        // Everything else is the first ticket's: the new attempt starts over.
        assert_eq!(
            Ticket {
                retry: None,
                ..second.clone()
            },
            first
        );
        let third = next_attempt(&second, &failed("push", Kind::Transient, "node2", 8), 2).unwrap();
        let retry = third.retry.clone().unwrap();
        assert_eq!(
            (retry.attempt, retry.exclude, retry.jobs),
            (
                3,
                vec!["node1".to_string(), "node2".to_string()],
                vec![7, 8]
            )
        );
        assert_eq!(
            next_attempt(&third, &failed("fetch", Kind::Transient, "node3", 9), 2),
            None,
            "three attempts with retries = 2"
        );
        assert_eq!(
            next_attempt(&first, &failed("run", Kind::Transient, "node1", 7), 0),
            None,
            "retries = 0: never"
        );
    }

    #[test]
    fn only_transient_faults_of_a_job_are_retried() {
        let first = Ticket::new();
        for (stage, kind) in [
            ("run", Kind::Permanent),
            ("run", Kind::TimedOut),
            ("fetch", Kind::Permanent),
            ("alloc", Kind::Transient),
            ("alloc", Kind::Config),
            ("closure", Kind::Transient),
        ] {
            assert_eq!(
                next_attempt(&first, &failed(stage, kind, "node1", 7), 2),
                None,
                "{stage} {kind}"
            );
        }
        assert_eq!(next_attempt(&first, &Ticket::new(), 2), None, "success");
    }

    #[test]
    fn the_same_node_twice_is_excluded_once() {
        let first = Ticket::new();
        let second = next_attempt(&first, &failed("run", Kind::Transient, "node1", 7), 5).unwrap();
        let third = next_attempt(&second, &failed("run", Kind::Transient, "node1", 8), 5).unwrap();
        assert_eq!(third.retry.unwrap().exclude, vec!["node1".to_string()]);
    }

    #[test]
    fn backoff_doubles_from_one_second_up_to_thirty() {
        let pauses: Vec<u64> = (2..=9).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
