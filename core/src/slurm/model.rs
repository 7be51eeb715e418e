//! What nsh asks of Slurm and what it reads back, independent of how it is
//! asked (REST version, CLI).

use std::fmt;

/// A batch job to submit. Every field is a value nsh chose or the
/// configuration allowed; the script is static text (see
/// `crate::stage::alloc::batch_script`) and everything variable reaches it through `env`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobRequest {
    /// The job name (`sbatch --job-name`).
    pub name: String,
    /// The batch script.
    pub script: String,
    /// The job's whole environment (nothing is inherited from the submitter).
    pub env: Vec<(String, String)>,
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// `--qos`.
    pub qos: Option<String>,
    /// Node features (`--constraint`).
    pub constraint: Option<String>,
    /// Generic resources per node (`--gres`), as sbatch spells them: `gpu:1`.
    pub gres: Option<String>,
    /// CPUs for the one task (`--cpus-per-task`).
    pub cpus: Option<u32>,
    /// Memory per node in MB (`--mem`).
    pub mem_mb: Option<u64>,
    /// The time limit in minutes.
    pub time_min: u32,
    /// The job's working directory (must exist on the node).
    pub work_dir: String,
    /// Where Slurm writes the script's own stdout/stderr (on the node).
    pub stdout: String,
    /// The job's comment (`--comment`): nsh's tag, `nsh:<nonce>`, by which
    /// a job whose submit reply was lost is found again.
    pub comment: Option<String>,
    /// Nodes the job must not run on (`--exclude`): where earlier attempts
    /// of the build failed.
    pub exclude: Vec<String>,
}

/// A job's base state. Flags (`COMPLETING`, `CONFIGURING`, …) are kept apart
/// in [`JobInfo::flags`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// `PENDING` (`PD`).
    Pending,
    /// `RUNNING` (`R`).
    Running,
    /// `SUSPENDED` (`S`).
    Suspended,
    /// `COMPLETED` (`CD`).
    Completed,
    /// `CANCELLED` (`CA`).
    Cancelled,
    /// `FAILED` (`F`).
    Failed,
    /// `TIMEOUT` (`TO`).
    Timeout,
    /// `NODE_FAIL` (`NF`).
    NodeFail,
    /// `PREEMPTED` (`PR`).
    Preempted,
    /// `BOOT_FAIL` (`BF`).
    BootFail,
    /// `DEADLINE` (`DL`).
    Deadline,
    /// `OUT_OF_MEMORY` (`OOM`).
    OutOfMemory,
    /// A state this nsh does not know (a newer Slurm).
    Other(String),
}

impl JobState {
    /// Parses a base state as Slurm spells it (`RUNNING`, also the short
    /// squeue codes such as `R`, `PD`).
    ///
    /// Written out, not derived: Slurm's words come in two spellings each
    /// (long and squeue's code), in any case, and a word this nsh does not
    /// know is kept as `Other`, which no derive gives.
    pub fn parse(s: &str) -> JobState {
        match s.trim().to_ascii_uppercase().as_str() {
            "PENDING" | "PD" => JobState::Pending,
            "RUNNING" | "R" => JobState::Running,
            "SUSPENDED" | "S" => JobState::Suspended,
            "COMPLETED" | "CD" => JobState::Completed,
            "CANCELLED" | "CA" => JobState::Cancelled,
            "FAILED" | "F" => JobState::Failed,
            "TIMEOUT" | "TO" => JobState::Timeout,
            "NODE_FAIL" | "NF" => JobState::NodeFail,
            "PREEMPTED" | "PR" => JobState::Preempted,
            "BOOT_FAIL" | "BF" => JobState::BootFail,
            "DEADLINE" | "DL" => JobState::Deadline,
            "OUT_OF_MEMORY" | "OOM" => JobState::OutOfMemory,
            other => JobState::Other(other.to_string()),
        }
    }

    /// As Slurm spells it (`RUNNING`); an unknown state as it came.
    pub fn as_str(&self) -> &str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Running => "RUNNING",
            JobState::Suspended => "SUSPENDED",
            JobState::Completed => "COMPLETED",
            JobState::Cancelled => "CANCELLED",
            JobState::Failed => "FAILED",
            JobState::Timeout => "TIMEOUT",
            JobState::NodeFail => "NODE_FAIL",
            JobState::Preempted => "PREEMPTED",
            JobState::BootFail => "BOOT_FAIL",
            JobState::Deadline => "DEADLINE",
            JobState::OutOfMemory => "OUT_OF_MEMORY",
            JobState::Other(s) => s,
        }
    }

    /// The job is over: it will never run (again).
    pub fn is_finished(&self) -> bool {
        !matches!(
            self,
            JobState::Pending | JobState::Running | JobState::Suspended | JobState::Other(_)
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// State flags that Slurm reports next to the base state (v0.0.40+ arrays;
/// `scontrol`'s JobState shows the most telling one instead of the base).
const FLAG_NAMES: &[&str] = &[
    "LAUNCH_FAILED",
    "UPDATE_DB",
    "REQUEUED",
    "REQUEUE_HOLD",
    "SPECIAL_EXIT",
    "RESIZING",
    "CONFIGURING",
    "COMPLETING",
    "STOPPED",
    "RECONFIG_FAIL",
    "POWER_UP_NODE",
    "REVOKED",
    "REQUEUE_FED",
    "RESV_DEL_HOLD",
    "SIGNALING",
    "STAGE_OUT",
    "EXPEDITING",
];

/// Is this state word a flag rather than a base state?
pub fn is_state_flag(word: &str) -> bool {
    FLAG_NAMES.contains(&word)
}

/// What Slurm says about a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    /// The job id.
    pub id: u64,
    /// The base state.
    pub state: JobState,
    /// State flags (`CONFIGURING`, `COMPLETING`, …).
    pub flags: Vec<String>,
    /// Why it is pending (`Priority`, `Resources`, …); `None` for `None`.
    pub reason: Option<String>,
    /// The node the batch script runs on.
    pub node: Option<String>,
    /// The batch script's exit status, once it ended.
    pub exit_code: Option<i64>,
    /// When it started / ended, Unix seconds.
    pub start: Option<u64>,
    /// (See `start`.)
    pub end: Option<u64>,
}

impl JobInfo {
    /// A job the script runs in now, on a known node. A job still
    /// `CONFIGURING` (nodes booting) is not there yet.
    pub fn is_running(&self) -> bool {
        self.state == JobState::Running
            && self.node.is_some()
            && !self.flags.iter().any(|f| f == "CONFIGURING")
    }

    /// Builds a `JobInfo` from a state word list as Slurm gives it:
    /// `["RUNNING"]`, `["COMPLETED","COMPLETING"]`, or a single word that may
    /// be a flag (`CONFIGURING` from scontrol, which then means RUNNING or
    /// PENDING depending on whether a node is allocated).
    pub(crate) fn state_from_words(words: &[String]) -> (JobState, Vec<String>) {
        let mut base = None;
        let mut flags = Vec::new();
        for word in words {
            let word = word.trim().to_ascii_uppercase();
            if is_state_flag(&word) {
                flags.push(word);
            } else if base.is_none() {
                base = Some(JobState::parse(&word));
            }
        }
        let base = base.unwrap_or_else(|| {
            if flags.iter().any(|f| f == "CONFIGURING") {
                JobState::Running
            } else if flags.iter().any(|f| f == "COMPLETING") {
                JobState::Completed
            } else {
                JobState::Other(flags.join(","))
            }
        });
        (base, flags)
    }
}

/// A compute node, as `nsh-hook --check` needs it: where it is, what it has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// Slurm's state words, lower case (`idle`, `mixed`, `down`, `drain`, …).
    pub state: Vec<String>,
    /// Node features (`AvailableFeatures`).
    pub features: Vec<String>,
    /// Generic resource names (`gpu` of `gpu:a100:2(S:0)`).
    pub gres: Vec<String>,
    pub partitions: Vec<String>,
}

impl NodeInfo {
    /// Whether the node can take a job now or soon (not down, drained or
    /// failing): the one the check's ssh should try first.
    pub fn is_usable(&self) -> bool {
        const BAD: [&str; 7] = [
            "down",
            "drain",
            "drained",
            "draining",
            "fail",
            "failing",
            "not_responding",
        ];
        !self.state.is_empty() && !self.state.iter().any(|s| BAD.contains(&s.as_str()))
    }

    /// The names in a gres list: `gpu:a100:2(S:0),mps:100` → `gpu`, `mps`.
    pub fn gres_names(spec: &str) -> Vec<String> {
        spec.split(',')
            .map(|g| g.split([':', '(']).next().unwrap_or("").trim().to_string())
            .filter(|g| !g.is_empty() && g != "(null)")
            .collect()
    }
}

/// A partition, as `nsh-hook --check` needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionInfo {
    pub name: String,
    /// Its nodes as Slurm writes them (`node[1-2]`).
    pub nodes: String,
    /// `UP`, `DOWN`, `DRAIN`, `INACTIVE`.
    pub state: String,
    /// `None`: every account (or QOS) may use it.
    pub allow_accounts: Option<Vec<String>>,
    pub deny_accounts: Vec<String>,
    pub allow_qos: Option<Vec<String>>,
    pub deny_qos: Vec<String>,
}

impl PartitionInfo {
    /// Slurm's comma lists, where `ALL` (or nothing) means no restriction.
    pub fn allow_list(text: &str) -> Option<Vec<String>> {
        let list = Self::list(text);
        (!list.is_empty() && !list.iter().any(|a| a == "ALL")).then_some(list)
    }

    pub fn list(text: &str) -> Vec<String> {
        text.split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty() && *a != "(null)")
            .map(str::to_string)
            .collect()
    }

    /// Why `name` may not use this partition as an account (`what` =
    /// "account") or QOS, if it may not.
    pub fn refuses(allow: Option<&[String]>, deny: &[String], name: &str) -> Option<String> {
        if deny.iter().any(|d| d == name) {
            return Some(format!("denied ({})", deny.join(",")));
        }
        match allow {
            Some(allowed) if !allowed.iter().any(|a| a == name) => {
                Some(format!("not allowed (only {})", allowed.join(",")))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_flags() {
        let (state, flags) =
            JobInfo::state_from_words(&["COMPLETED".to_string(), "COMPLETING".to_string()]);
        assert_eq!(state, JobState::Completed);
        assert_eq!(flags, vec!["COMPLETING"]);
        let (state, _) = JobInfo::state_from_words(&["CONFIGURING".to_string()]);
        assert_eq!(state, JobState::Running);
        assert_eq!(JobState::parse("PD"), JobState::Pending);
        assert_eq!(JobState::parse("node_fail"), JobState::NodeFail);
        assert!(JobState::Timeout.is_finished());
        assert!(!JobState::Pending.is_finished());
        assert_eq!(JobState::parse("WEIRD").as_str(), "WEIRD");
    }

    #[test]
    fn configuring_is_not_running_yet() {
        let job = JobInfo {
            id: 1,
            state: JobState::Running,
            flags: vec!["CONFIGURING".into()],
            reason: None,
            node: Some("node1".into()),
            exit_code: None,
            start: None,
            end: None,
        };
        assert!(!job.is_running());
        assert!(JobInfo {
            flags: vec![],
            ..job
        }
        .is_running());
    }
}
