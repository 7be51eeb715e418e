//! The command-line backend, for sites without slurmrestd: `sbatch
//! --parsable` (the script on stdin, every option its own argv word, no
//! shell anywhere), `scontrol show job -o` for the state, `scancel`.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::model::{JobInfo, JobRequest, NodeInfo, PartitionInfo};
use crate::error::Failure;
use crate::sys::process::{output_within, output_within_feeding};

/// How long one Slurm command (`sbatch`, `scontrol`, `scancel`, `sinfo`,
/// `sacctmgr`) may run before it is stopped and the step fails as
/// transient: slurmctld answers in seconds, and a client retrying a
/// slurmctld that is down gives up well within it (`MessageTimeout`, 10 s
/// by default, a few times over).
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(90);

/// The sbatch options for `req` (without the program name).
pub fn sbatch_args(req: &JobRequest) -> Vec<String> {
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name={}", req.name),
        format!("--chdir={}", req.work_dir),
        format!("--output={}", req.stdout),
        format!("--error={}", req.stdout),
        "--nodes=1".to_string(),
        "--no-requeue".to_string(),
        // The job gets exactly the environment sbatch runs with, which
        // nsh sets to `req.env` (see `submit`).
        "--export=ALL".to_string(),
        format!("--time={}", req.time_min),
    ];
    for (option, value) in [
        ("partition", &req.partition),
        ("account", &req.account),
        ("qos", &req.qos),
        ("constraint", &req.constraint),
        ("gres", &req.gres),
    ] {
        if let Some(value) = value {
            args.push(format!("--{option}={value}"));
        }
    }
    if let Some(cpus) = req.cpus {
        args.push(format!("--cpus-per-task={cpus}"));
    }
    if let Some(mem) = req.mem_mb {
        args.push(format!("--mem={mem}M"));
    }
    if let Some(comment) = &req.comment {
        args.push(format!("--comment={comment}"));
    }
    if !req.exclude.is_empty() {
        args.push(format!("--exclude={}", req.exclude.join(",")));
    }
    args
}

/// The submitting user's jobs whose comment is `tag` (`squeue --me`).
///
/// # Errors
/// squeue could not be run or failed.
pub fn tagged(submitter: &Submitter, tag: &str) -> Result<Vec<u64>, Failure> {
    let output = submitter
        .command("squeue")
        .args(["-h", "--me", "-o", "%i|%k"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Failure::transient(format!("running squeue: {e}")))?;
    if !output.status.success() {
        return Err(Failure::transient(format!(
            "squeue --me failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(parse_tagged(&String::from_utf8_lossy(&output.stdout), tag))
}

/// The jobs in `squeue -o %i|%k` output whose comment is `tag`.
pub fn parse_tagged(text: &str, tag: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|line| line.trim().split_once('|'))
        .filter(|(_, comment)| comment.trim() == tag)
        .filter_map(|(id, _)| id.trim().parse().ok())
        .collect()
}

/// The job id in `sbatch --parsable`'s output: `jobid` or `jobid;cluster`.
pub fn parse_sbatch_output(stdout: &str) -> Option<u64> {
    let line = stdout.lines().map(str::trim).rfind(|l| !l.is_empty())?;
    line.split(';').next()?.trim().parse().ok()
}

/// `scontrol show job -o ID`'s one line as a `JobInfo`.
pub fn parse_scontrol(job: u64, line: &str) -> Result<JobInfo, Failure> {
    let fields = scontrol_fields(line);
    let state_word = fields.get("JobState").ok_or_else(|| {
        Failure::transient(format!(
            "scontrol show job {job}: no JobState in {:?}",
            line.chars().take(200).collect::<String>()
        ))
    })?;
    let (state, flags) = JobInfo::state_from_words(&[state_word.to_string()]);
    let text = |k: &str| {
        fields
            .get(k)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty() && *s != "None" && *s != "(null)")
            .map(str::to_string)
    };
    let node = text("BatchHost").or_else(|| text("NodeList").filter(|n| !n.contains([',', '['])));
    let exit_code = fields.get("ExitCode").and_then(|code| {
        let (status, signal) = code.split_once(':')?;
        let status: i64 = status.parse().ok()?;
        let signal: i64 = signal.parse().ok()?;
        Some(if signal > 0 { 128 + signal } else { status })
    });
    Ok(JobInfo {
        id: fields
            .get("JobId")
            .and_then(|id| id.parse().ok())
            .unwrap_or(job),
        state,
        flags,
        reason: text("Reason"),
        node,
        exit_code: if state_is_over(&fields) {
            exit_code
        } else {
            None
        },
        start: None,
        end: None,
    })
}

fn state_is_over(fields: &BTreeMap<&str, &str>) -> bool {
    fields
        .get("JobState")
        .is_some_and(|s| JobInfo::state_from_words(&[s.to_string()]).0.is_finished())
}

/// `Key=Value Key=Value …`. A value runs to the next ` Key=`, so values with
/// spaces (`Reason=…`, `Command=…`) stay whole.
fn scontrol_fields(line: &str) -> BTreeMap<&str, &str> {
    let mut fields = BTreeMap::new();
    let mut starts: Vec<usize> = Vec::new();
    let bytes = line.as_bytes();
    for (i, word) in line.split(' ').scan(0usize, |pos, w| {
        let start = *pos;
        *pos += w.len() + 1;
        Some((start, w))
    }) {
        let is_key = word.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
        });
        if is_key && (i == 0 || bytes[i - 1] == b' ') {
            starts.push(i);
        }
    }
    for (n, &start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).map_or(line.len(), |&e| e - 1);
        let field = line[start..end].trim_end();
        if let Some((k, v)) = field.split_once('=') {
            fields.entry(k).or_insert(v);
        }
    }
    fields
}

/// Who runs `sbatch` and `scancel`: this process's user, or another one
/// (`submit_as`) through `runuser -u USER --` (this process being root).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Submitter {
    /// The account switched to; `None`: this process's own.
    pub run_as: Option<String>,
}

impl Submitter {
    /// The command that runs the Slurm program `name` as this submitter.
    fn command(&self, name: &str) -> Command {
        match &self.run_as {
            None => Command::new(program(name)),
            Some(user) => {
                let mut command = Command::new(program("runuser"));
                command.args(["-u", user, "--"]).arg(program(name));
                command
            }
        }
    }
}

/// Submits with `sbatch`. The job's environment is exactly `req.env` (plus
/// `SLURM_CONF` when set here, so that sbatch finds the cluster).
pub fn submit(submitter: &Submitter, req: &JobRequest) -> Result<u64, Failure> {
    let mut command = submitter.command("sbatch");
    command
        .args(sbatch_args(req))
        .env_clear()
        .envs(req.env.iter().map(|(k, v)| (k, v)));
    if let Some(conf) = std::env::var_os("SLURM_CONF") {
        command.env("SLURM_CONF", conf);
    }
    let output = output_within_feeding(&mut command, Some(req.script.as_bytes()), COMMAND_DEADLINE)
        .map_err(|e| Failure::transient(format!("running sbatch: {e}")))?;
    if !output.status.success() {
        // Transient here; nsh-alloc tells a refused setting by Slurm's
        // words (`slurm::rejection`).
        return Err(Failure::transient(format!(
            "sbatch failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    parse_sbatch_output(&stdout)
        .ok_or_else(|| Failure::transient(format!("sbatch printed no job id: {:?}", stdout.trim())))
}

/// The job's state from `scontrol show job -o`.
pub fn job(job: u64) -> Result<JobInfo, Failure> {
    let mut command = Command::new(program("scontrol"));
    command
        .args(["show", "job", "-o", &job.to_string()])
        .stdin(Stdio::null());
    let output = output_within(&mut command, COMMAND_DEADLINE)
        .map_err(|e| Failure::transient(format!("running scontrol: {e}")))?;
    if !output.status.success() {
        return Err(Failure::transient(format!(
            "scontrol show job {job} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find(|l| l.contains("JobId=")).unwrap_or("");
    parse_scontrol(job, line)
}

/// Cancels with `scancel`. A job that already ended is not an error.
pub fn cancel(submitter: &Submitter, job: u64) -> Result<(), Failure> {
    let mut command = submitter.command("scancel");
    command.arg(job.to_string()).stdin(Stdio::null());
    let output = output_within(&mut command, COMMAND_DEADLINE)
        .map_err(|e| Failure::transient(format!("running scancel: {e}")))?;
    if !output.status.success() {
        return Err(Failure::transient(format!(
            "scancel {job} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// The `sinfo` format [`nodes`] asks for: one line per node and partition.
pub const SINFO_FORMAT: &str = "%N|%T|%f|%G|%P";

/// Every node, from `sinfo -h -N -o SINFO_FORMAT` (a node in two partitions
/// is two lines; the default partition has a `*`).
pub fn parse_sinfo(stdout: &str) -> Vec<NodeInfo> {
    let mut nodes: Vec<NodeInfo> = Vec::new();
    for line in stdout.lines() {
        let fields: Vec<&str> = line.trim().split('|').collect();
        let [name, state, features, gres, partition] = fields[..] else {
            continue;
        };
        let at = if let Some(at) = nodes.iter().position(|n| n.name == name) {
            at
        } else {
            nodes.push(NodeInfo {
                name: name.to_string(),
                // `down*`: not responding; `drained+` …: flags.
                state: state
                    .split('+')
                    .map(|s| s.trim_end_matches(['*', '~', '#', '!', '%', '$', '@', '^', '-']))
                    .map(str::to_ascii_lowercase)
                    .collect(),
                features: PartitionInfo::list(features),
                gres: NodeInfo::gres_names(gres),
                partitions: Vec::new(),
            });
            nodes.len() - 1
        };
        nodes[at]
            .partitions
            .push(partition.trim_end_matches('*').to_string());
    }
    nodes
}

/// Every node, from `sinfo`.
pub fn nodes() -> Result<Vec<NodeInfo>, Failure> {
    let stdout = run_query("sinfo", &["-h", "-N", "-o", SINFO_FORMAT])?;
    Ok(parse_sinfo(&stdout))
}

/// `scontrol show partition -o NAME`'s line; `None` when there is none.
pub fn parse_partition_line(name: &str, line: &str) -> Option<PartitionInfo> {
    let fields = scontrol_fields(line);
    if fields.get("PartitionName") != Some(&name) {
        return None;
    }
    let get = |k: &str| fields.get(k).copied().unwrap_or("");
    Some(PartitionInfo {
        name: name.to_string(),
        nodes: get("Nodes").to_string(),
        state: get("State").to_string(),
        allow_accounts: PartitionInfo::allow_list(get("AllowAccounts")),
        deny_accounts: PartitionInfo::list(get("DenyAccounts")),
        allow_qos: PartitionInfo::allow_list(get("AllowQos")),
        deny_qos: PartitionInfo::list(get("DenyQos")),
    })
}

/// A partition from `scontrol show partition`; `None` when Slurm does not
/// know it ("Partition NAME not found", exit 1).
pub fn partition(name: &str) -> Result<Option<PartitionInfo>, Failure> {
    match run_query("scontrol", &["show", "partition", "-o", name]) {
        Ok(stdout) => Ok(stdout.lines().find_map(|l| parse_partition_line(name, l))),
        Err(failure)
            if failure
                .cause::<CommandError>()
                // scontrol says it on stdout (22.05) or stderr.
                .is_some_and(|e| {
                    e.stderr.contains("not found") || e.stdout.contains("not found")
                }) =>
        {
            Ok(None)
        }
        Err(failure) => Err(failure),
    }
}

/// Whether the accounting database knows account (`what` = `account`) or
/// `qos` `name`: `None` when `sacctmgr` cannot tell (no slurmdbd).
// Fallible like the REST backend's, which the caller matches beside it.
#[allow(clippy::unnecessary_wraps)]
pub fn slurmdb_entry(what: &str, name: &str) -> Result<Option<bool>, Failure> {
    let name_filter = format!("name={name}");
    let format = if what == "qos" {
        "format=name"
    } else {
        "format=account"
    };
    match run_query(
        "sacctmgr",
        &["-n", "-P", "show", what, &name_filter, format],
    ) {
        Ok(stdout) => Ok(Some(stdout.lines().any(|l| l.trim() == name))),
        Err(_) => Ok(None),
    }
}

/// How long a query command ([`nodes`], [`partition`], [`slurmdb_entry`])
/// may run, in ms (0: [`COMMAND_DEADLINE`]; `nsh-hook --check` sets a few
/// seconds).
static QUERY_TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bounds every query command of this process (see [`QUERY_TIMEOUT_MS`]).
pub fn set_query_timeout(limit: std::time::Duration) {
    let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
    QUERY_TIMEOUT_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// Runs a Slurm query command; its stdout, or a failure with its stderr.
fn run_query(name: &str, args: &[&str]) -> Result<String, Failure> {
    let mut command = Command::new(program(name));
    command.args(args).stdin(Stdio::null());
    let limit = match QUERY_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => COMMAND_DEADLINE,
        ms => Duration::from_millis(ms).min(COMMAND_DEADLINE),
    };
    let output = output_within(&mut command, limit)
        .map_err(|e| Failure::transient(format!("running {name}: {e}")))?;
    if !output.status.success() {
        return Err(Failure::from(CommandError {
            command: format!("{name} {}", args.join(" ")),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            stdout: String::from_utf8_lossy(&output.stdout).trim().to_string(),
        }));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A Slurm command that ended with a failure status: transient (slurmctld
/// may be back in a moment), with what it printed kept apart for callers
/// that recognise an answer (`scontrol`: "Partition NAME not found").
#[derive(Debug)]
pub struct CommandError {
    /// The command line, for the message.
    pub command: String,
    /// How it ended.
    pub status: std::process::ExitStatus,
    /// What it wrote to stderr, trimmed.
    pub stderr: String,
    /// What it wrote to stdout, trimmed.
    pub stdout: String,
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed ({}): {}{}",
            self.command, self.status, self.stderr, self.stdout
        )
    }
}

impl std::error::Error for CommandError {}

impl crate::error::KindOf for CommandError {
    fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::Transient
    }
}

/// A Slurm command, looked up on PATH (resolved here so that a cleared child
/// environment does not change which one runs).
fn program(name: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| name.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slurm::model::JobState;

    #[test]
    fn sbatch_argv() {
        let req = JobRequest {
            name: "nsh".into(),
            script: "#!/bin/sh\n".into(),
            env: vec![("PATH".into(), "/bin".into())],
            partition: Some("build".into()),
            constraint: Some("big".into()),
            gres: Some("gpu:1".into()),
            cpus: Some(2),
            mem_mb: Some(1024),
            time_min: 60,
            work_dir: "/tmp".into(),
            stdout: "/dev/null".into(),
            comment: Some("nsh:abc".into()),
            exclude: vec!["node1".into(), "node3".into()],
            ..JobRequest::default()
        };
        insta::assert_debug_snapshot!(sbatch_args(&req));
    }

    #[test]
    fn tagged_jobs_are_found_by_their_comment() {
        let out = "41|nsh:aa\n42|nsh:bb\n43|(null)\n44|nsh:bb\n";
        assert_eq!(parse_tagged(out, "nsh:bb"), vec![42, 44]);
        assert_eq!(parse_tagged(out, "nsh:cc"), Vec::<u64>::new());
    }

    #[test]
    fn sbatch_output() {
        assert_eq!(parse_sbatch_output("42\n"), Some(42));
        assert_eq!(parse_sbatch_output("42;main\n"), Some(42));
        assert_eq!(parse_sbatch_output("Submitted batch job 42\n"), None);
    }

    #[test]
    fn scontrol_lines() {
        let running = "JobId=12 JobName=nsh UserId=nixbuild(999) GroupId=nixbuild(995) MCS_label=N/A Priority=4294901748 Nice=0 Account=(null) QOS=(null) JobState=RUNNING Reason=None Dependency=(null) Requeue=0 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:01 TimeLimit=01:00:00 NodeList=node2 BatchHost=node2 NumNodes=1 Command=(null) WorkDir=/tmp";
        let job = parse_scontrol(12, running).unwrap();
        assert!(job.is_running());
        assert_eq!(job.node.as_deref(), Some("node2"));
        assert_eq!(job.exit_code, None);
        let pending = "JobId=13 JobName=nsh JobState=PENDING Reason=ReqNodeNotAvail,_UnavailableNodes:node2 Dependency=(null) ExitCode=0:0 NodeList=(null) BatchHost=(null)";
        let job = parse_scontrol(13, pending).unwrap();
        assert_eq!(job.state, JobState::Pending);
        assert_eq!(
            job.reason.as_deref(),
            Some("ReqNodeNotAvail,_UnavailableNodes:node2")
        );
        assert_eq!(job.node, None);
        let killed =
            "JobId=14 JobState=CANCELLED Reason=None ExitCode=0:15 NodeList=node1 BatchHost=node1";
        let job = parse_scontrol(14, killed).unwrap();
        assert_eq!(job.state, JobState::Cancelled);
        assert_eq!(job.exit_code, Some(143));
        assert!(parse_scontrol(1, "slurm_load_jobs error: Invalid job id specified").is_err());
    }

    #[test]
    fn sinfo_lines() {
        // `sinfo -h -N -o '%N|%T|%f|%G|%P'` on the test cluster (22.05), plus a
        // node in two partitions that is down and not responding.
        let out = "node1|idle|(null)|(null)|build*\nnode2|idle|big|gpu:2|build*\nnode3|down*|(null)|(null)|build*\nnode3|down*|(null)|(null)|gpu\n";
        let nodes = parse_sinfo(out);
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[0].features, Vec::<String>::new());
        assert_eq!(nodes[1].features, ["big"]);
        assert_eq!(nodes[1].gres, ["gpu"]);
        assert_eq!(nodes[2].partitions, ["build", "gpu"]);
        assert_eq!(nodes[2].state, ["down"]);
        assert!(!nodes[2].is_usable() && nodes[0].is_usable());
    }

    #[test]
    fn scontrol_partition_lines() {
        let line = "PartitionName=build AllowGroups=ALL AllowAccounts=ALL AllowQos=normal,high AllocNodes=ALL Default=YES QoS=N/A DenyAccounts=guests Nodes=node[1-2] State=UP TotalCPUs=16";
        let p = parse_partition_line("build", line).unwrap();
        assert_eq!((p.nodes.as_str(), p.state.as_str()), ("node[1-2]", "UP"));
        assert_eq!(p.allow_accounts, None);
        assert_eq!(p.deny_accounts, ["guests"]);
        assert_eq!(p.allow_qos.unwrap(), ["normal", "high"]);
        assert_eq!(parse_partition_line("other", line), None);
    }
}
