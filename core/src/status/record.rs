//! What `nsh-status` reads, as the stages write it (pure: no files here).
//!
//! * [`InFlight`]: one stage working on one build now, a JSON file per
//!   stage process (`builds/<drv>.<pid>.json`), written whole and renamed,
//!   removed when the stage is done with the ticket;
//! * [`FailureLine`]: one failed build, a line of `failures.jsonl`, the
//!   file kept to its last [`MAX_FAILURES`] lines.

use serde::{Deserialize, Serialize};

use crate::error::Kind;
use crate::exit::ExitStatus;
use crate::pool::record::Owner;
use crate::ticket::Ticket;

/// How many failures `failures.jsonl` keeps (the oldest go first).
pub const MAX_FAILURES: usize = 100;

/// One stage working on one build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// The `.drv` store path.
    pub drv: String,
    /// The derivation's name (empty when the ticket did not say).
    #[serde(default)]
    pub name: String,
    /// The stage: `closure`, `alloc`, `push`, `run` or `fetch`.
    pub stage: String,
    /// The cluster, once one is chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The Slurm job, once submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<u64>,
    /// The node, once the job runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When the stage took the ticket (Unix seconds).
    pub since: u64,
    /// The stage process: a record whose process is gone (a pid handed out
    /// again does not count) is stale.
    pub owner: Owner,
}

impl InFlight {
    /// The record of `stage` starting on `ticket`; `None` for a ticket
    /// that names no derivation (nothing to show).
    pub fn of(ticket: &Ticket, stage: &str, since: u64, owner: Owner) -> Option<InFlight> {
        let drv = ticket.drv.as_ref()?;
        let alloc = ticket.alloc.as_ref();
        Some(InFlight {
            drv: drv.path.to_string(),
            name: drv.name.clone(),
            stage: stage.to_string(),
            cluster: alloc.map(|a| a.cluster.clone()),
            job: alloc.map(|a| a.job),
            node: alloc.map(|a| a.node.clone()).filter(|n| !n.is_empty()),
            since,
            owner,
        })
    }

    /// The record's file name: the derivation's base name and the pid,
    /// safe for a file name.
    pub fn file_name(&self) -> String {
        let base = self.drv.rsplit('/').next().unwrap_or_default();
        format!(
            "{}.{}.json",
            crate::runtime::file_name_safe(base),
            self.owner.pid
        )
    }

    /// The record as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a record; `None` for text that is not one (a stray file, a
    /// half-written temporary file, another nsh version's).
    pub fn parse(text: &str) -> Option<InFlight> {
        serde_json::from_str(text.trim()).ok()
    }
}

/// One failed build, as `failures.jsonl` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureLine {
    /// When it failed (Unix seconds).
    pub time: u64,
    /// The `.drv` store path (empty when the ticket named none).
    pub drv: String,
    #[serde(default)]
    pub name: String,
    /// The stage that failed.
    pub stage: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The failure's kind (`permanent`, `transient`, `timed-out`, …) and
    /// the exit status it means.
    pub error: Kind,
    pub exit: i32,
    /// The failure's message.
    pub reason: String,
    /// The hook's attempt at the build (2 for the first retry); absent for
    /// a build tried once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The hook tried the build again after this failure, in a new job not
    /// on this node: the build may have succeeded since (a flaky node).
    #[serde(default, skip_serializing_if = "is_false")]
    pub retried: bool,
    /// Recorded by the hook, as no stage did: a stage killed by a signal, a
    /// `[hook] pipeline` command that failed, outputs not valid.
    #[serde(default, skip_serializing_if = "is_false")]
    pub by_hook: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if takes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

impl FailureLine {
    /// The failure recorded in `ticket` (none if it has no `error`), with
    /// what `flight` learnt meanwhile (a job submitted, then cancelled,
    /// is in no ticket).
    pub fn of(ticket: &Ticket, flight: Option<&InFlight>, time: u64) -> Option<FailureLine> {
        let error = ticket.error.as_ref()?;
        let alloc = ticket.alloc.as_ref();
        let drv = ticket.drv.as_ref();
        Some(FailureLine {
            time,
            drv: drv.map(|d| d.path.to_string()).unwrap_or_default(),
            name: drv.map(|d| d.name.clone()).unwrap_or_default(),
            stage: error.stage.clone(),
            cluster: alloc
                .map(|a| a.cluster.clone())
                .or_else(|| flight.and_then(|f| f.cluster.clone())),
            job: alloc.map(|a| a.job).or_else(|| flight.and_then(|f| f.job)),
            node: alloc
                .map(|a| a.node.clone())
                .filter(|n| !n.is_empty())
                .or_else(|| flight.and_then(|f| f.node.clone())),
            error: error.kind,
            exit: ExitStatus::of(error.kind).code(),
            reason: error.message.clone(),
            attempt: ticket.retry.as_ref().map(|r| r.attempt),
            retried: false,
            by_hook: false,
        })
    }

    /// The line as written (no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a line; `None` for one that is not a failure.
    pub fn parse(line: &str) -> Option<FailureLine> {
        serde_json::from_str(line.trim()).ok()
    }
}

/// The text of `failures.jsonl` once `line` is added to `old`: the last
/// `keep` lines, lines that are not failures (a torn last line after a
/// crash) dropped.
pub fn append_bounded(old: &str, line: &FailureLine, keep: usize) -> String {
    let mut lines: Vec<String> = old
        .lines()
        .filter(|l| FailureLine::parse(l).is_some())
        .map(str::to_string)
        .collect();
    lines.push(line.to_json());
    let skip = lines.len().saturating_sub(keep);
    lines[skip..].iter().map(|l| format!("{l}\n")).collect()
}

/// How one failed attempt of a build under the hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptEnd {
    /// The `.drv` store path.
    pub drv: String,
    /// When the attempt started (Unix seconds): the lines its stages added
    /// are those of `drv` since then, not yet marked retried.
    pub since: u64,
    /// The attempt's number (1 for the first).
    pub attempt: u32,
    /// The hook tries the build again.
    pub retried: bool,
    /// The line the hook adds when no stage recorded the failure.
    pub seen_by_hook: FailureLine,
}

/// The text of `failures.jsonl` once the hook has settled `end`: the lines
/// the attempt's stages added say the attempt and whether it was retried;
/// when there is none, the hook's own line is added (never both: one
/// failure, one line). At most `keep` lines stay.
pub fn settle_attempt(old: &str, end: &AttemptEnd, keep: usize) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut found = false;
    for text in old.lines() {
        let Some(mut line) = FailureLine::parse(text) else {
            continue;
        };
        if line.drv != end.drv || line.time < end.since || line.retried {
            lines.push(text.to_string());
            continue;
        }
        found = true;
        if end.retried || end.attempt > 1 {
            line.attempt = Some(line.attempt.unwrap_or(end.attempt));
        }
        line.retried = end.retried;
        lines.push(line.to_json());
    }
    if !found {
        let mut own = end.seen_by_hook.clone();
        own.by_hook = true;
        own.retried = end.retried;
        if end.retried || end.attempt > 1 {
            own.attempt = Some(end.attempt);
        }
        lines.push(own.to_json());
    }
    let skip = lines.len().saturating_sub(keep);
    lines[skip..].iter().map(|l| format!("{l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn ticket() -> Ticket {
        Ticket::from_line(
            r#"{"v":1,"drv":{"path":"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello.drv","name":"hello"},
                "alloc":{"cluster":"test","backend":"rest","job":42,"node":"node1","ssh":"node1","work":"/w"}}"#,
        )
        .unwrap()
    }

    const OWNER: Owner = Owner {
        pid: 4242,
        start: 77,
    };

    #[test]
    fn a_build_in_flight_as_written() {
        let flight = InFlight::of(&ticket(), "run", 1_000, OWNER).unwrap();
        assert_eq!(
            flight.file_name(),
            "0123456789abcdfghijklmnpqrsvwxyz-hello.drv.4242.json"
        );
        insta::assert_snapshot!(flight.to_json());
        assert_eq!(InFlight::parse(&flight.to_json()), Some(flight));
        assert_eq!(InFlight::parse("{\"drv\":"), None);
        let before_alloc = Ticket::from_line(
            r#"{"v":1,"drv":{"path":"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello.drv"}}"#,
        )
        .unwrap();
        let flight = InFlight::of(&before_alloc, "alloc", 1, OWNER).unwrap();
        assert_eq!(
            (flight.cluster, flight.job, flight.node),
            (None, None, None)
        );
        assert_eq!(InFlight::of(&Ticket::new(), "closure", 1, OWNER), None);
    }

    #[test]
    fn a_failure_takes_what_the_stage_learnt_when_the_ticket_lacks_it() {
        let mut failed = ticket();
        failed.alloc = None;
        failed.fail("alloc", &crate::error::Failure::timed_out("queue timeout"));
        let flight = InFlight {
            job: Some(7),
            cluster: Some("test".into()),
            ..InFlight::of(&ticket(), "alloc", 1, OWNER).unwrap()
        };
        let line = FailureLine::of(&failed, Some(&flight), 2_000).unwrap();
        insta::assert_snapshot!(line.to_json());
        assert_eq!(line.exit, 101);
        assert_eq!(FailureLine::parse(&line.to_json()), Some(line));
        assert_eq!(FailureLine::of(&ticket(), None, 1), None);
    }

    #[test]
    fn the_failures_file_keeps_its_last_lines_and_drops_torn_ones() {
        let mut failed = ticket();
        failed.fail("run", &crate::error::Failure::permanent("builder failed"));
        let mut text = String::from("{\"time\":");
        for time in 0..5 {
            let line = FailureLine::of(&failed, None, time).unwrap();
            text = append_bounded(&text, &line, 3);
        }
        let times: Vec<u64> = text
            .lines()
            .map(|l| FailureLine::parse(l).unwrap().time)
            .collect();
        assert_eq!(times, [2, 3, 4]);
    }
}
