//! What `nsh-status` prints (pure: the caller gathers, this renders):
//! one JSON object per row with its `kind` (`build`, `job`, `failure`),
//! and the same rows as a table for a person.

use serde_json::{json, Value};

use crate::pool::record::JobRecord;
use crate::status::record::{FailureLine, InFlight};

/// What Slurm said about a row's job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlurmSays {
    /// Not asked (no job yet, `--no-slurm`, or no such cluster configured).
    NotAsked,
    /// Its state (`RUNNING`, `PENDING`), with the pending reason if any.
    State(String),
    /// Asking failed: why.
    Unknown(String),
}

impl SlurmSays {
    fn insert_into(&self, row: &mut Value) {
        match self {
            SlurmSays::NotAsked => row["slurm"] = Value::Null,
            SlurmSays::State(state) => row["slurm"] = state.clone().into(),
            SlurmSays::Unknown(why) => {
                row["slurm"] = Value::Null;
                row["slurm_error"] = why.clone().into();
            }
        }
    }

    fn cell(&self) -> String {
        match self {
            SlurmSays::NotAsked => "-".into(),
            SlurmSays::State(state) => state.clone(),
            SlurmSays::Unknown(_) => "?".into(),
        }
    }
}

/// A build in flight as a row.
pub fn build_row(flight: &InFlight, slurm: &SlurmSays) -> Value {
    let mut row = json!({
        "kind": "build",
        "drv": flight.drv,
        "name": flight.name,
        "stage": flight.stage,
        "cluster": flight.cluster,
        "job": flight.job,
        "node": flight.node,
        "since": flight.since,
        "pid": flight.owner.pid,
    });
    slurm.insert_into(&mut row);
    row
}

/// A pooled job as a row: its pool `state` (`crate::stage::alloc::admin::state`),
/// its owner's pid, builds served, seconds left of its time limit.
pub fn job_row(
    cluster: &str,
    record: &JobRecord,
    state: &str,
    now: u64,
    slurm: &SlurmSays,
) -> Value {
    let mut row = json!({
        "kind": "job",
        "cluster": cluster,
        "job": record.job,
        "node": record.node,
        "state": state,
        "owner": record.owner.map(|o| o.pid),
        "builds": record.request,
        "started": record.started,
        "ends": record.ends,
        "left": (record.ends != 0).then(|| record.ends.saturating_sub(now)),
    });
    if record.owner.is_none() && record.job.is_some() {
        row["leaves_in"] = (record.last_used + record.linger)
            .saturating_sub(now)
            .into();
    }
    slurm.insert_into(&mut row);
    row
}

/// A recorded failure as a row.
pub fn failure_row(line: &FailureLine) -> Value {
    let mut row = json!({"kind": "failure"});
    if let (Value::Object(row), Ok(Value::Object(fields))) = (&mut row, serde_json::to_value(line))
    {
        row.extend(fields);
    }
    row
}

/// `3s`, `4m05s`, `2h03m`: a duration for a person.
pub fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

fn text(row: &Value, key: &str) -> String {
    match &row[key] {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn age(row: &Value, key: &str, now: u64) -> String {
    row[key]
        .as_u64()
        .map_or_else(|| "-".into(), |t| duration(now.saturating_sub(t)))
}

fn slurm_cell(row: &Value) -> String {
    if row.get("slurm_error").is_some() {
        return SlurmSays::Unknown(String::new()).cell();
    }
    match row["slurm"].as_str() {
        Some(state) => SlurmSays::State(state.into()).cell(),
        None => SlurmSays::NotAsked.cell(),
    }
}

/// The derivation as a table shows it: its base name (`<hash>-<name>.drv`).
fn drv_cell(row: &Value) -> String {
    let drv = text(row, "drv");
    drv.rsplit('/').next().unwrap_or_default().to_string()
}

/// `text` with each store path's directory and hash left out
/// (`/nix/store/<hash>-hello.drv` → `hello.drv`): the table names the
/// derivation in its own column, and a reason reads better without them.
fn without_store_hashes(text: &str) -> String {
    const PREFIX: &str = "/nix/store/";
    const HASH_LEN: usize = 32;
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(PREFIX) {
        out.push_str(&rest[..at]);
        let after = &rest[at + PREFIX.len()..];
        let is_hash = after.len() > HASH_LEN
            && after.as_bytes()[HASH_LEN] == b'-'
            && after.as_bytes()[..HASH_LEN]
                .iter()
                .all(u8::is_ascii_alphanumeric);
        if is_hash {
            rest = &after[HASH_LEN + 1..];
        } else {
            out.push_str(PREFIX);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A reason on one line, store hashes left out, cut to `max` characters.
fn one_line(reason: &str, max: usize) -> String {
    let flat = without_store_hashes(reason)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

/// Columns padded to their widest cell, two spaces apart.
fn columns(header: &[&str], cells: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(ToString::to_string).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(cells) {
        let last = row.len().saturating_sub(1);
        let line: String = row
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i == last {
                    cell.clone()
                } else {
                    let pad = widths[i] - cell.chars().count();
                    format!("{cell}{}  ", " ".repeat(pad))
                }
            })
            .collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn of_kind<'a>(rows: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    rows.iter().filter(move |r| r["kind"] == kind)
}

fn builds_table(rows: &[Value], now: u64) -> String {
    let cells: Vec<Vec<String>> = of_kind(rows, "build")
        .map(|r| {
            vec![
                drv_cell(r),
                text(r, "stage"),
                text(r, "cluster"),
                text(r, "job"),
                text(r, "node"),
                age(r, "since", now),
                slurm_cell(r),
            ]
        })
        .collect();
    let header = [
        "DERIVATION",
        "STAGE",
        "CLUSTER",
        "JOB",
        "NODE",
        "FOR",
        "SLURM",
    ];
    section("Builds in flight", &header, &cells)
}

fn jobs_table(rows: &[Value]) -> String {
    let cells: Vec<Vec<String>> = of_kind(rows, "job")
        .map(|r| {
            let left = r["left"].as_u64().map_or_else(|| "-".into(), duration);
            vec![
                text(r, "cluster"),
                text(r, "job"),
                text(r, "node"),
                text(r, "state"),
                text(r, "owner"),
                text(r, "builds"),
                left,
                slurm_cell(r),
            ]
        })
        .collect();
    let header = [
        "CLUSTER", "JOB", "NODE", "STATE", "OWNER", "BUILDS", "LEFT", "SLURM",
    ];
    section("Jobs held", &header, &cells)
}

fn failures_table(rows: &[Value], now: u64) -> String {
    let cells: Vec<Vec<String>> = of_kind(rows, "failure")
        .map(|r| {
            vec![
                age(r, "time", now),
                drv_cell(r),
                text(r, "stage"),
                text(r, "cluster"),
                text(r, "job"),
                text(r, "node"),
                text(r, "exit"),
                one_line(&format!("{}{}", retry_note(r), text(r, "reason")), 160),
            ]
        })
        .collect();
    let header = [
        "AGO",
        "DERIVATION",
        "STAGE",
        "CLUSTER",
        "JOB",
        "NODE",
        "EXIT",
        "REASON",
    ];
    section("Recent failures", &header, &cells)
}

/// `(attempt 1, retried) `: a failure the hook tried again after; empty
/// for a build tried once.
fn retry_note(row: &Value) -> String {
    let retried = row.get("retried").and_then(Value::as_bool) == Some(true);
    match (row.get("attempt").and_then(Value::as_u64), retried) {
        (Some(n), true) => format!("(attempt {n}, retried) "),
        (Some(n), false) => format!("(attempt {n}) "),
        (None, true) => "(retried) ".to_string(),
        (None, false) => String::new(),
    }
}

fn section(title: &str, header: &[&str], cells: &[Vec<String>]) -> String {
    if cells.is_empty() {
        return format!("{title}: none\n");
    }
    format!("{title}:\n{}", columns(header, cells))
}

/// Which sections a table shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sections {
    /// The builds in flight.
    pub builds: bool,
    /// The pooled jobs.
    pub jobs: bool,
    /// The recent failures.
    pub failures: bool,
}

/// The rows as a table for a person: one section per kind asked for, ages
/// counted to `now`.
pub fn table(rows: &[Value], sections: Sections, now: u64) -> String {
    let mut parts = Vec::new();
    if sections.builds {
        parts.push(builds_table(rows, now));
    }
    if sections.jobs {
        parts.push(jobs_table(rows));
    }
    if sections.failures {
        parts.push(failures_table(rows, now));
    }
    parts.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::record::Owner;
    use crate::ticket::Ticket;

    const NOW: u64 = 10_000;

    fn rows() -> Vec<Value> {
        let ticket = |alloc: &str| {
            Ticket::from_line(&format!(
                r#"{{"v":1,"drv":{{"path":"/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello.drv","name":"hello"}}{alloc}}}"#
            ))
            .unwrap()
        };
        let owner = Owner {
            pid: 4242,
            start: 1,
        };
        let running = ticket(
            r#","alloc":{"cluster":"test","backend":"rest","job":42,"node":"node1","ssh":"node1","work":"/w"}"#,
        );
        let queued = ticket("");
        let run = InFlight::of(&running, "run", NOW - 65, owner).unwrap();
        let alloc = InFlight {
            cluster: Some("test".into()),
            job: Some(43),
            ..InFlight::of(&queued, "alloc", NOW - 3, owner).unwrap()
        };
        let record: JobRecord = serde_json::from_value(json!({
            "job": 44, "node": "node2", "backend": "rest", "env": "e", "started": NOW - 300,
            "ends": NOW + 7_200, "linger": 60, "request": 3, "last_used": NOW - 10, "owner": null,
        }))
        .unwrap();
        let mut failed = running.clone();
        failed.fail(
            "run",
            &crate::error::Failure::permanent(
                "builder for '/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello.drv' failed with exit code 1;\nlast 10 log lines: …",
            ),
        );
        let failure = FailureLine::of(&failed, None, NOW - 600).unwrap();
        vec![
            build_row(&run, &SlurmSays::State("RUNNING".into())),
            build_row(&alloc, &SlurmSays::State("PENDING (Priority)".into())),
            job_row(
                "test",
                &record,
                "idle",
                NOW,
                &SlurmSays::Unknown("unreachable".into()),
            ),
            failure_row(&FailureLine {
                time: NOW - 900,
                attempt: Some(1),
                retried: true,
                reason: "job 42 was cancelled".into(),
                error: crate::error::Kind::Transient,
                exit: 75,
                ..failure.clone()
            }),
            failure_row(&failure),
        ]
    }

    #[test]
    fn rows_as_json_lines() {
        let lines: Vec<String> = rows().iter().map(Value::to_string).collect();
        insta::assert_snapshot!(lines.join("\n"));
    }

    #[test]
    fn rows_as_a_table() {
        let all = Sections {
            builds: true,
            jobs: true,
            failures: true,
        };
        insta::assert_snapshot!(table(&rows(), all, NOW));
        let only_jobs = Sections {
            builds: false,
            jobs: true,
            failures: false,
        };
        insta::assert_snapshot!(table(&[], only_jobs, NOW));
    }

    #[test]
    fn durations_and_reasons_for_a_person() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(245), "4m05s");
        assert_eq!(duration(7_380), "2h03m");
        assert_eq!(one_line("a\n  b", 10), "a b");
        assert_eq!(one_line("abcdefghijkl", 5), "abcd…");
        assert_eq!(
            one_line(
                "of /nix/store/0123456789abcdfghijklmnpqrsvwxyz-a.drv, /nix/store/x",
                80
            ),
            "of a.drv, /nix/store/x"
        );
    }
}
