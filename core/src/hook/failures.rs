//! What the hook records in `failures.jsonl` (`docs/nsh-status.md`) when an
//! attempt at a build fails: the stages record the failures they see; the
//! hook marks those of an attempt it tries again, and records the failures
//! no stage could (a stage killed by a signal, a `[hook] pipeline` command
//! that failed, outputs not valid in the local store). Pure: the file is
//! `crate::status`'s.

use crate::error::Kind;
use crate::exit::ExitStatus;
use crate::hook::pipeline::Outcome;
use crate::status::record::{AttemptEnd, FailureLine};
use crate::ticket::Ticket;

/// One attempt at a build, as the hook started it.
#[derive(Debug, Clone)]
pub(super) struct Attempt {
    /// The ticket it started from.
    pub(super) ticket: Ticket,
    /// When (Unix seconds).
    pub(super) since: u64,
}

impl Attempt {
    pub(super) fn new(ticket: &Ticket, since: u64) -> Attempt {
        Attempt {
            ticket: ticket.clone(),
            since,
        }
    }

    fn number(&self) -> u32 {
        self.ticket.retry.as_ref().map_or(1, |r| r.attempt)
    }

    /// How the attempt ended, failed with `message` (the hook's verdict),
    /// at `time`; `retried`: the hook tries again.
    pub(super) fn end(
        &self,
        outcome: &Outcome,
        message: &str,
        retried: bool,
        time: u64,
    ) -> Option<AttemptEnd> {
        let drv = self.ticket.drv.as_ref()?.path.to_string();
        Some(AttemptEnd {
            drv,
            since: self.since,
            attempt: self.number(),
            retried,
            seen_by_hook: self.seen_by_hook(outcome, message, time),
        })
    }

    /// The failure as the hook saw it: from the last ticket it has (the
    /// final one, else the latest with a job, else the attempt's first),
    /// blaming the first stage that did not exit 0, else the hook.
    fn seen_by_hook(&self, outcome: &Outcome, message: &str, time: u64) -> FailureLine {
        let ticket = outcome
            .final_ticket
            .as_ref()
            .or(outcome.latest_alloc.as_ref())
            .unwrap_or(&self.ticket);
        if let Some(line) = FailureLine::of(ticket, None, time) {
            return line;
        }
        let stage = outcome
            .statuses
            .iter()
            .find(|(_, s)| *s != Some(0))
            .map_or("hook", |(name, _)| name.rsplit('/').next().unwrap_or(name));
        // A stage that died or a pipeline that failed says nothing of the
        // build: trying again may help.
        let kind = Kind::Transient;
        let drv = ticket.drv.as_ref().or(self.ticket.drv.as_ref());
        let alloc = ticket.alloc.as_ref();
        FailureLine {
            time,
            drv: drv.map(|d| d.path.to_string()).unwrap_or_default(),
            name: drv.map(|d| d.name.clone()).unwrap_or_default(),
            stage: stage.to_string(),
            cluster: alloc.map(|a| a.cluster.clone()),
            job: alloc.map(|a| a.job),
            node: alloc.map(|a| a.node.clone()).filter(|n| !n.is_empty()),
            error: kind,
            exit: ExitStatus::of(kind).code(),
            reason: message.to_string(),
            attempt: None,
            retried: false,
            by_hook: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Failure;
    use crate::status::record::settle_attempt;

    const DRV: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello.drv";

    fn first() -> Ticket {
        Ticket::from_line(&format!(
            r#"{{"v":1,"drv":{{"path":"{DRV}","name":"hello"}}}}"#
        ))
        .unwrap()
    }

    fn with_job(ticket: &Ticket, job: u64, node: &str) -> Ticket {
        let mut line: serde_json::Value = serde_json::from_str(&ticket.to_line()).unwrap();
        line["alloc"] = serde_json::json!({"cluster":"test","backend":"rest","job":job,
            "node":node,"ssh":node,"work":"/w"});
        Ticket::from_line(&line.to_string()).unwrap()
    }

    fn outcome(final_ticket: Option<Ticket>, statuses: &[(&str, Option<i32>)]) -> Outcome {
        Outcome {
            latest_alloc: final_ticket.clone().filter(|t| t.alloc.is_some()),
            final_ticket,
            statuses: statuses
                .iter()
                .map(|(n, s)| ((*n).to_string(), *s))
                .collect(),
            interrupted_by: None,
        }
    }

    /// What `nsh-run` records when it fails the ticket.
    fn stage_line(ticket: &Ticket, time: u64) -> String {
        let mut failed = ticket.clone();
        failed.fail("run", &Failure::transient("job 42 was cancelled"));
        FailureLine::of(&failed, None, time).unwrap().to_json() + "\n"
    }

    /// The end of an attempt that began at 100 and whose nsh-run failed at
    /// 101 (job 42 on node1 cancelled, status 75); `retried`: the hook
    /// tries again.
    fn run_cancelled_at_102(retried: bool) -> AttemptEnd {
        let mut last = with_job(&first(), 42, "node1");
        last.fail("run", &Failure::transient("job 42 was cancelled"));
        Attempt::new(&first(), 100)
            .end(
                &outcome(Some(last), &[("nsh-run", Some(75))]),
                "x",
                retried,
                102,
            )
            .unwrap()
    }

    #[test]
    fn a_retried_attempt_marks_the_stages_line_and_adds_none() {
        let failed = with_job(&first(), 42, "node1");
        let earlier = stage_line(&failed, 50);
        let text = format!("{earlier}{}", stage_line(&failed, 101));
        let end = run_cancelled_at_102(true);
        let text = settle_attempt(&text, &end, 100);
        assert!(
            text.starts_with(&earlier),
            "an earlier build's line is kept as it was"
        );
        insta::assert_snapshot!(text);
    }

    #[test]
    fn a_killed_stage_is_recorded_by_the_hook_once() {
        let attempt = Attempt::new(&first(), 100);
        let outcome = outcome(
            None,
            &[
                ("/usr/bin/nsh-closure", Some(0)),
                ("/usr/bin/nsh-alloc", None),
            ],
        );
        let end = attempt
            .end(
                &outcome,
                "the pipeline wrote no final ticket (nsh-alloc was killed)",
                false,
                103,
            )
            .unwrap();
        let text = settle_attempt("", &end, 100);
        insta::assert_snapshot!(text);
        assert_eq!(
            settle_attempt(&text, &end, 100),
            text,
            "one failure, one line"
        );
    }

    #[test]
    fn a_pipeline_commands_failure_after_a_retry_is_the_hooks() {
        let mut second = with_job(&first(), 43, "node2");
        second.retry = Some(crate::ticket::RetrySection {
            attempt: 2,
            exclude: vec!["node1".into()],
            jobs: vec![42],
            extra: crate::ticket::Extra::default(),
        });
        let attempt = Attempt::new(&second, 200);
        let earlier = stage_line(&with_job(&first(), 42, "node1"), 150);
        let outcome = outcome(Some(second), &[("/etc/nsh/hook.sh", Some(3))]);
        let end = attempt
            .end(
                &outcome,
                "/etc/nsh/hook.sh exited with status 3",
                false,
                201,
            )
            .unwrap();
        insta::assert_snapshot!(settle_attempt(&earlier, &end, 100));
    }

    #[test]
    fn the_final_failure_a_stage_recorded_is_left_alone() {
        let text = stage_line(&with_job(&first(), 42, "node1"), 101);
        let end = run_cancelled_at_102(false);
        assert_eq!(settle_attempt(&text, &end, 100), text);
    }
}
