//! The slurmrestd codec, pure (no I/O): the paths, request bodies and
//! headers nsh sends, and how it reads the answers, for every API version
//! from v0.0.38 (Slurm 22.05) to v0.0.45 (Slurm 26.05).
//!
//! Requests are built per version, because the servers are strict about
//! shapes: v0.0.38 wants the script at the top level and the environment as
//! a dictionary; v0.0.39+ take `["K=V"]` arrays, `{set,infinite,number}`
//! numbers and the script inside `job`.
//!
//! Responses are read by shape rather than by version, because one version
//! number covers several shapes across Slurm patch releases (`exit_code` is
//! an int in 23.02.0–3 and a no_val object from 23.02.4, for instance):
//! `job_state` as a string or an array, `exit_code` as an int, a no_val
//! object or the verbose object, meta under `Slurm` or `slurm`. The
//! published specifications these shapes come from are in
//! `core/tests/slurm-openapi/`, checked by `core/tests/slurm_contract.rs`.

use serde_json::{json, Map, Value};

use super::model::{JobInfo, JobRequest, NodeInfo, PartitionInfo};
use super::ApiVersion;
use crate::config::Secret;
use crate::error::{Failure, Kind, KindOf};

/// `/slurm/v0.0.NN/ping/`
pub fn ping_path(v: ApiVersion) -> String {
    format!("/slurm/{v}/ping/")
}

/// `/slurm/v0.0.NN/job/submit`
pub fn submit_path(v: ApiVersion) -> String {
    format!("/slurm/{v}/job/submit")
}

/// `/slurm/v0.0.NN/job/ID` (GET: state; DELETE: cancel)
pub fn job_path(v: ApiVersion, job: u64) -> String {
    format!("/slurm/{v}/job/{job}")
}

/// `/slurm/v0.0.NN/jobs/`: every job slurmctld knows.
pub fn jobs_path(v: ApiVersion) -> String {
    format!("/slurm/{v}/jobs/")
}

/// The jobs in a `jobs` answer whose comment is `tag`, but for those that
/// have ended: the answer lists those too (until `MinJobAge`), and a
/// submit Slurm refused can leave one (24.11: `FAILED`, `BadConstraints`,
/// for a job that excludes every node), which no cancel would end.
///
/// # Errors
/// What `check` says of the answer.
pub fn parse_tagged(status: u16, body: &str, tag: &str) -> Result<Vec<u64>, Failure> {
    let value = check("listing the jobs", status, body)?;
    let jobs = value.get("jobs").and_then(Value::as_array);
    Ok(jobs
        .into_iter()
        .flatten()
        .filter(|job| job.get("comment").and_then(Value::as_str) == Some(tag))
        .filter(|job| may_still_run(job))
        .filter_map(|job| job.get("job_id").and_then(Value::as_u64))
        .collect())
}

/// Whether a `jobs[]` entry is queued, running or suspended (or in a
/// state this nsh cannot read: cancelling it is the safe side).
fn may_still_run(entry: &Value) -> bool {
    use super::model::JobState;
    job_from_value(0, entry).map_or(true, |job| {
        matches!(
            job.state,
            JobState::Pending | JobState::Running | JobState::Suspended | JobState::Other(_)
        )
    })
}

/// `/slurm/v0.0.NN/nodes/`: every node.
pub fn nodes_path(v: ApiVersion) -> String {
    format!("/slurm/{v}/nodes/")
}

/// `/slurm/v0.0.NN/partition/NAME`
pub fn partition_path(v: ApiVersion, name: &str) -> String {
    format!("/slurm/{v}/partition/{name}")
}

/// `/slurmdb/v0.0.NN/{account,qos}/NAME`: the accounting database's entry
/// (`what` = `account` or `qos`). Served only with slurmdbd, from v0.0.39.
pub fn slurmdb_path(v: ApiVersion, what: &str, name: &str) -> String {
    format!("/slurmdb/{v}/{what}/{name}")
}

/// The OpenAPI document of everything the server serves, which names the
/// API versions it offers.
pub const OPENAPI_PATH: &str = "/openapi/v3";

/// The request body for submitting `req` with API version `v`.
pub fn submit_body(v: ApiVersion, req: &JobRequest) -> Value {
    let mut job = Map::new();
    let mut put = |k: &str, val: Value| {
        job.insert(k.to_string(), val);
    };
    put("name", json!(req.name));
    if v == ApiVersion::V0038 {
        let env: Map<String, Value> = req
            .env
            .iter()
            .map(|(k, val)| (k.clone(), json!(val)))
            .collect();
        put("environment", Value::Object(env));
    } else {
        let env: Vec<String> = req
            .env
            .iter()
            .map(|(k, val)| format!("{k}={val}"))
            .collect();
        put("environment", json!(env));
        put("script", json!(req.script));
    }
    put("current_working_directory", json!(req.work_dir));
    put("standard_output", json!(req.stdout));
    put("standard_error", json!(req.stdout));
    for (key, value) in [
        ("partition", &req.partition),
        ("account", &req.account),
        ("qos", &req.qos),
        ("constraints", &req.constraint),
    ] {
        if let Some(value) = value {
            put(key, json!(value));
        }
    }
    if let Some(gres) = &req.gres {
        if v == ApiVersion::V0038 {
            put("gres", json!(gres));
        } else {
            // From 23.02 the job description carries generic resources as
            // TRES, which sbatch's --gres spells with a "gres/" prefix.
            put("tres_per_node", json!(gres_as_tres(gres)));
        }
    }
    if let Some(cpus) = req.cpus {
        put("cpus_per_task", json!(cpus));
    }
    if let Some(mem) = req.mem_mb {
        put("memory_per_node", number(v, mem));
    }
    put("time_limit", number(v, u64::from(req.time_min)));
    if let Some(comment) = &req.comment {
        put("comment", json!(comment));
    }
    // v0.0.38's job description has no field for it (22.05): a job may land
    // on a node an earlier attempt failed on; Slurm places none on a node
    // it has set DOWN, the usual case.
    if v != ApiVersion::V0038 && !req.exclude.is_empty() {
        put("excluded_nodes", json!(req.exclude));
    }
    // A failed node should fail the job (nsh retries elsewhere), not requeue
    // it under the same id with a stale work dir.
    put("requeue", json!(false));

    if v == ApiVersion::V0038 {
        json!({"script": req.script, "job": Value::Object(job)})
    } else {
        // The portable form from v0.0.39 on (SUMMARY.md §3.1): the script
        // inside `job`, no deprecated top-level `script`.
        json!({"job": Value::Object(job)})
    }
}

/// A number as the version's job description wants it: plain for v0.0.38,
/// a no_val object after.
fn number(v: ApiVersion, n: u64) -> Value {
    if v == ApiVersion::V0038 {
        json!(n)
    } else {
        json!({"set": true, "infinite": false, "number": n})
    }
}

/// `gpu:1,nvme:2` → `gres/gpu:1,gres/nvme:2`.
fn gres_as_tres(gres: &str) -> String {
    gres.split(',')
        .map(|g| {
            if g.starts_with("gres/") || g.starts_with("gres:") {
                g.replacen("gres:", "gres/", 1)
            } else {
                format!("gres/{g}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The authentication headers for a server of Slurm `release` (e.g.
/// `"22.05.8"`; `None` when not known yet).
///
/// 22.05's rest_auth/jwt requires the user name and the token headers
/// together; from 23.02 the token header alone identifies the user (a user
/// name header then only matters for proxying, which needs privileges), and
/// sending it alongside `Authorization: Bearer` is refused, so nsh sends the
/// token header alone. Unknown release: both headers, which every release
/// accepts for a user's own token.
pub fn auth_headers(
    release: Option<&str>,
    user: Option<&str>,
    token: &Secret,
) -> Vec<(&'static str, String)> {
    let mut headers = Vec::new();
    let old = match release.and_then(release_number) {
        Some((major, minor)) => (major, minor) < (23, 2),
        None => true,
    };
    if old {
        if let Some(user) = user {
            headers.push(("X-SLURM-USER-NAME", user.to_string()));
        }
    }
    headers.push(("X-SLURM-USER-TOKEN", token.expose().to_string()));
    headers
}

/// `"22.05.8"` → `(22, 5)`.
fn release_number(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split('.');
    let major = parts.next()?.trim().parse().ok()?;
    let minor = parts.next()?.trim().parse().ok()?;
    Some((major, minor))
}

/// The Slurm release named in a response's meta (`meta.Slurm.release` up to
/// v0.0.39, `meta.slurm.release` after).
pub fn server_release(body: &Value) -> Option<String> {
    let meta = body.get("meta")?;
    let slurm = meta.get("slurm").or_else(|| meta.get("Slurm"))?;
    if let Some(release) = slurm.get("release").and_then(Value::as_str) {
        return Some(release.to_string());
    }
    let version = slurm.get("version")?;
    let part = |k: &str| -> Option<String> {
        match version.get(k)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    Some(format!(
        "{}.{}.{}",
        part("major")?,
        part("minor")?,
        part("micro")?
    ))
}

/// The API versions an OpenAPI document (from [`OPENAPI_PATH`]) offers,
/// among those nsh speaks, oldest first.
pub fn offered_versions(openapi_text: &str) -> Vec<ApiVersion> {
    offered_version_names(openapi_text)
        .iter()
        .filter_map(|name| name.parse().ok())
        .collect()
}

/// Every `/slurm/vX.Y.Z/` version an OpenAPI document names, known to nsh
/// or not, oldest first (for messages: what the server offers).
pub fn offered_version_names(openapi_text: &str) -> Vec<String> {
    // slurmrestd's JSON writer escapes slashes (`\/slurm\/v0.0.38\/ping\/`).
    let text = openapi_text.replace("\\/", "/");
    let mut names: Vec<String> = text
        .match_indices("/slurm/v")
        .filter_map(|(at, _)| {
            let rest = &text[at + "/slurm/".len()..];
            let end = rest.find('/')?;
            let name = &rest[..end];
            let numeric = name[1..]
                .split('.')
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
            numeric.then(|| name.to_string())
        })
        .collect();
    names.sort_by_key(|name| {
        name[1..]
            .split('.')
            .map(|part| part.parse::<u32>().unwrap_or(0))
            .collect::<Vec<_>>()
    });
    names.dedup();
    names
}

/// The newest version in `offered`.
pub fn choose_version(offered: &[ApiVersion]) -> Option<ApiVersion> {
    offered.iter().copied().max()
}

/// Slurm's own error texts in a response (`errors[]`), joined; empty when
/// there are none.
pub fn error_text(body: &Value) -> String {
    let Some(errors) = body.get("errors").and_then(Value::as_array) else {
        return String::new();
    };
    errors
        .iter()
        .map(|e| {
            let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").trim();
            let mut parts: Vec<String> = Vec::new();
            for k in ["error", "description"] {
                let t = text(k);
                if !t.is_empty() && !parts.iter().any(|p| p == t) {
                    parts.push(t.to_string());
                }
            }
            if let Some(n) = e.get("error_number").and_then(Value::as_i64) {
                if n != 0 {
                    parts.push(format!("error {n}"));
                }
            }
            parts.join(": ")
        })
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Checks an HTTP answer: 2xx with a JSON body (whose `errors[]` is empty)
/// gives the body; anything else is a transient failure naming `what`, the
/// HTTP status and Slurm's own words.
pub fn check(what: &str, status: u16, body: &str) -> Result<Value, Failure> {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let slurm_says = parsed.as_ref().map(error_text).unwrap_or_default();
    let plain = || {
        let text = body.trim();
        if text.is_empty() || text.starts_with('{') {
            String::new()
        } else {
            // A plain-text error page, e.g. 401's "Authentication failure".
            let short: String = text.chars().take(200).collect();
            format!(": {short}")
        }
    };
    let refused = |answer: Answer| {
        Failure::from(AnswerError {
            what: what.to_string(),
            status,
            slurm_says: slurm_says.clone(),
            answer,
        })
    };
    match status {
        200..=299 => {}
        // 511: slurmctld refused the credential slurmrestd passed on
        // (Slurm ≥ 23.11 says "Protocol authentication error", error 1007).
        401 | 403 | 511 => return Err(refused(Answer::TokenRefused { plain: plain() })),
        _ => return Err(refused(Answer::Status { plain: plain() })),
    }
    let Some(value) = parsed else {
        return Err(Failure::transient(format!(
            "{what}: HTTP {status} with a body that is not JSON"
        )));
    };
    if !slurm_says.is_empty() {
        return Err(refused(Answer::Errors));
    }
    Ok(value)
}

/// An answer of slurmrestd that says no: always transient (the token may be
/// renewed, slurmctld may be back), with Slurm's own words kept apart so
/// that a caller can tell a refused credential without reading a message.
#[derive(Debug, Clone)]
pub struct AnswerError {
    /// What was being asked (`asking for job 7`).
    pub what: String,
    /// The HTTP status.
    pub status: u16,
    /// Slurm's `errors[]`, joined (`Protocol authentication error: error 1007`).
    pub slurm_says: String,
    answer: Answer,
}

/// How the answer said no.
#[derive(Debug, Clone)]
enum Answer {
    /// 401, 403 or 511: the token was refused; `plain` is a plain-text page.
    TokenRefused { plain: String },
    /// Any other non-2xx status.
    Status { plain: String },
    /// 2xx, but with `errors[]`.
    Errors,
}

impl std::fmt::Display for AnswerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, status, says) = (&self.what, self.status, &self.slurm_says);
        let with_says = if says.is_empty() {
            String::new()
        } else {
            format!(": {says}")
        };
        match &self.answer {
            Answer::TokenRefused { plain } => write!(
                f,
                "{what}: Slurm refused the token (HTTP {status}{plain}{with_says}): check the cluster's token_file/token_command and user"
            ),
            Answer::Status { plain } => {
                let detail = if says.is_empty() { plain } else { &with_says };
                write!(f, "{what}: HTTP {status}{detail}")
            }
            Answer::Errors => write!(f, "{what}: {says}"),
        }
    }
}

impl AnswerError {
    /// The answer was a refused token (HTTP 401, 403 or 511).
    #[must_use]
    pub fn token_refused(&self) -> bool {
        matches!(self.answer, Answer::TokenRefused { .. })
    }
}

impl std::error::Error for AnswerError {}

impl KindOf for AnswerError {
    fn kind(&self) -> Kind {
        Kind::Transient
    }
}

/// The job id from a submit response.
pub fn parse_submit(status: u16, body: &str) -> Result<u64, Failure> {
    let value = check("submitting the job", status, body)?;
    value
        .get("job_id")
        .and_then(as_u64)
        .ok_or_else(|| Failure::transient("submitting the job: the response has no job_id"))
}

/// The job from a `GET job/ID` response.
pub fn parse_job(job: u64, status: u16, body: &str) -> Result<JobInfo, Failure> {
    let value = check(&format!("asking for job {job}"), status, body)?;
    let entry = value
        .get("jobs")
        .and_then(Value::as_array)
        .and_then(|jobs| {
            jobs.iter()
                .find(|j| j.get("job_id").and_then(as_u64) == Some(job))
                .or(jobs.first())
        })
        .ok_or_else(|| {
            Failure::transient(format!("asking for job {job}: no such job in the answer"))
        })?;
    job_from_value(job, entry)
}

/// One entry of `jobs[]`, of any version's shape.
pub fn job_from_value(job: u64, entry: &Value) -> Result<JobInfo, Failure> {
    let words: Vec<String> = match entry.get("job_state") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    if words.is_empty() {
        return Err(Failure::transient(format!(
            "asking for job {job}: the answer has no job_state"
        )));
    }
    let (state, flags) = JobInfo::state_from_words(&words);
    let text = |k: &str| {
        entry
            .get(k)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty() && *s != "None" && *s != "(null)")
            .map(str::to_string)
    };
    let node = text("batch_host").or_else(|| {
        // One node per nsh job: the node list is that node.
        text("nodes").filter(|n| !n.contains([',', '[']))
    });
    Ok(JobInfo {
        id: entry.get("job_id").and_then(as_u64).unwrap_or(job),
        state,
        flags,
        reason: text("state_reason"),
        node,
        exit_code: entry.get("exit_code").and_then(exit_code),
        start: entry.get("start_time").and_then(as_u64).filter(|&t| t > 0),
        end: entry.get("end_time").and_then(as_u64).filter(|&t| t > 0),
    })
}

/// Checks a cancel (`DELETE job/ID`) response. v0.0.38 sends no body;
/// v0.0.42+ report per job in `status[]`.
pub fn parse_cancel(job: u64, status: u16, body: &str) -> Result<(), Failure> {
    let what = format!("cancelling job {job}");
    if (200..300).contains(&status) && body.trim().is_empty() {
        return Ok(());
    }
    let value = check(&what, status, body)?;
    if let Some(entries) = value.get("status").and_then(Value::as_array) {
        for entry in entries {
            let code = entry
                .pointer("/error/code")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if code != 0 {
                let message = entry
                    .pointer("/error/message")
                    .or_else(|| entry.pointer("/error/string"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                return Err(Failure::transient(format!(
                    "{what}: {message} (error {code})"
                )));
            }
        }
    }
    Ok(())
}

/// Text, a list of texts, or Slurm's `csv_string` (a list): as one list.
fn words(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => PartitionInfo::list(s),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .flat_map(PartitionInfo::list)
            .collect(),
        _ => Vec::new(),
    }
}

/// The nodes from a `GET nodes/` response, of any version's shape (v0.0.38:
/// features and state as text; later: lists).
pub fn parse_nodes(status: u16, body: &str) -> Result<Vec<NodeInfo>, Failure> {
    let value = check("listing the nodes", status, body)?;
    let nodes = value
        .get("nodes")
        .and_then(Value::as_array)
        .ok_or_else(|| Failure::transient("listing the nodes: the answer has no nodes"))?;
    Ok(nodes
        .iter()
        .map(|n| NodeInfo {
            name: n
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            state: words(n.get("state"))
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
            features: words(n.get("features")),
            gres: NodeInfo::gres_names(n.get("gres").and_then(Value::as_str).unwrap_or("")),
            partitions: words(n.get("partitions")),
        })
        .collect())
}

/// A partition from a `GET partition/NAME` response; `None` when Slurm does
/// not know it (22.05: HTTP 500 "Invalid partition name specified"; 24.11:
/// HTTP 422 "Unable to find partition").
pub fn parse_partition(
    name: &str,
    status: u16,
    body: &str,
) -> Result<Option<PartitionInfo>, Failure> {
    let what = format!("asking for partition {name}");
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let said = parsed.as_ref().map(error_text).unwrap_or_default();
    if said.contains("Invalid partition name") || said.contains("Unable to find partition") {
        return Ok(None);
    }
    let value = check(&what, status, body)?;
    let Some(p) = value
        .get("partitions")
        .and_then(Value::as_array)
        .and_then(|all| {
            all.iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        })
    else {
        return Ok(None);
    };
    let text = |ptr: &str| {
        p.pointer(ptr)
            .map(|v| words(Some(v)).join(","))
            .unwrap_or_default()
    };
    // v0.0.38 is flat; v0.0.40+ nests (`nodes.configured`, `accounts.allowed`).
    let either = |flat: &str, nested: &str| {
        let t = text(flat);
        if t.is_empty() {
            text(nested)
        } else {
            t
        }
    };
    Ok(Some(PartitionInfo {
        name: name.to_string(),
        nodes: either("/nodes", "/nodes/configured"),
        state: either("/state", "/partition/state").to_ascii_uppercase(),
        allow_accounts: PartitionInfo::allow_list(&either(
            "/allowed_accounts",
            "/accounts/allowed",
        )),
        deny_accounts: PartitionInfo::list(&either("/denied_accounts", "/accounts/deny")),
        allow_qos: PartitionInfo::allow_list(&either("/allowed_qos", "/qos/allowed")),
        deny_qos: PartitionInfo::list(&either("/denied_qos", "/qos/deny")),
    }))
}

/// Whether a slurmdb `GET account/NAME` or `qos/NAME` answer lists `name`:
/// `Some(true)` yes, `Some(false)` Slurm does not know it, `None` the server
/// has no accounting API (HTTP 404: slurmrestd runs without slurmdbd).
pub fn parse_slurmdb_entry(
    what: &str,
    name: &str,
    status: u16,
    body: &str,
) -> Result<Option<bool>, Failure> {
    if status == 404 {
        return Ok(None);
    }
    let list_key = if what == "qos" { "qos" } else { "accounts" };
    let value = match check(&format!("asking slurmdbd for {what} {name}"), status, body) {
        Ok(value) => value,
        // Asking for one that does not exist is an error on some releases.
        Err(_) if status == 200 || status == 422 => return Ok(Some(false)),
        Err(failure) => return Err(failure),
    };
    let found = value
        .get(list_key)
        .and_then(Value::as_array)
        .is_some_and(|all| {
            all.iter()
                .any(|e| e.get("name").and_then(Value::as_str) == Some(name))
        });
    Ok(Some(found))
}

/// A number in any of Slurm's spellings: a plain int, or
/// `{set, infinite, number}` (unset or infinite → `None`).
fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::Object(o) => {
            let set = o.get("set").and_then(Value::as_bool).unwrap_or(true);
            let infinite = o.get("infinite").and_then(Value::as_bool).unwrap_or(false);
            if !set || infinite {
                return None;
            }
            o.get("number").and_then(Value::as_u64)
        }
        _ => None,
    }
}

/// `exit_code` as an int (v0.0.38), a no_val object (v0.0.39), or the
/// verbose `{status, return_code, signal}` object (v0.0.40+). A job killed by
/// a signal reports 128 + signal, as a shell would.
///
/// The int and no_val forms carry the raw wait(2) status, not the exit
/// code: Slurm 22.05 reports `exit 3` as 768 (seen on the test cluster).
fn exit_code(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().map(from_wait_status),
        Value::Object(o) if o.contains_key("return_code") || o.contains_key("status") => {
            let signalled = o
                .get("status")
                .and_then(Value::as_array)
                .is_some_and(|s| s.iter().any(|x| x == "SIGNALED" || x == "CORE_DUMPED"));
            if signalled {
                if let Some(sig) = v.pointer("/signal/id").and_then(as_u64) {
                    return Some(128 + i64::try_from(sig).unwrap_or(i64::MAX - 128));
                }
            }
            if o.get("status")
                .and_then(Value::as_array)
                .is_some_and(|s| s.iter().any(|x| x == "PENDING"))
            {
                return None;
            }
            o.get("return_code")
                .and_then(as_u64)
                .and_then(|n| i64::try_from(n).ok())
        }
        Value::Object(_) => as_u64(v)
            .and_then(|n| i64::try_from(n).ok())
            .map(from_wait_status),
        _ => None,
    }
}

/// A wait(2) status as a shell reports it: the exit code, or 128 + signal.
fn from_wait_status(status: i64) -> i64 {
    let signal = status & 0x7f;
    if signal != 0 {
        128 + signal
    } else {
        (status >> 8) & 0xff
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slurm::model::JobState;

    pub(crate) fn sample_request() -> JobRequest {
        JobRequest {
            name: "nsh".into(),
            script: "#!/bin/sh\nexit 0\n".into(),
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("NSH_NONCE".into(), "abc".into()),
            ],
            partition: Some("build".into()),
            account: None,
            qos: None,
            constraint: Some("big".into()),
            gres: Some("gpu:1".into()),
            cpus: Some(4),
            mem_mb: Some(8192),
            time_min: 120,
            work_dir: "/tmp".into(),
            stdout: "/dev/null".into(),
            comment: Some("nsh:abc".into()),
            exclude: vec!["node1".into(), "node3".into()],
        }
    }

    #[test]
    fn bodies_per_version() {
        let req = sample_request();
        insta::assert_json_snapshot!("submit_v0038", submit_body(ApiVersion::V0038, &req));
        insta::assert_json_snapshot!("submit_v0039", submit_body(ApiVersion::V0039, &req));
        // v0.0.40 … v0.0.45 send the same body as v0.0.39.
        for v in &ApiVersion::ALL[2..] {
            assert_eq!(
                submit_body(*v, &req),
                submit_body(ApiVersion::V0039, &req),
                "{v}"
            );
        }
    }

    #[test]
    fn tagged_jobs_are_found_by_their_comment() {
        let body = json!({"jobs": [
            {"job_id": 41, "comment": "nsh:aa"},
            {"job_id": 42, "comment": "nsh:bb"},
            {"job_id": 43},
        ], "errors": []})
        .to_string();
        assert_eq!(parse_tagged(200, &body, "nsh:bb").unwrap(), vec![42]);
        // Ended jobs are not cancelled: a submit refused on 24.11 leaves one.
        let body = json!({"jobs": [
            {"job_id": 3, "comment": "nsh:bb", "job_state": ["FAILED"], "state_reason": "BadConstraints"},
            {"job_id": 4, "comment": "nsh:bb", "job_state": "COMPLETED"},
            {"job_id": 5, "comment": "nsh:bb", "job_state": ["PENDING"]},
            {"job_id": 6, "comment": "nsh:bb", "job_state": "RUNNING"},
        ], "errors": []})
        .to_string();
        assert_eq!(parse_tagged(200, &body, "nsh:bb").unwrap(), vec![5, 6]);
        assert!(parse_tagged(500, "{}", "nsh:bb").is_err());
    }

    #[test]
    fn auth_by_release() {
        let token = Secret::new("t");
        let names = |r: Option<&str>| {
            auth_headers(r, Some("nixbuild"), &token)
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(Some("22.05.8")),
            ["X-SLURM-USER-NAME", "X-SLURM-USER-TOKEN"]
        );
        assert_eq!(names(None), ["X-SLURM-USER-NAME", "X-SLURM-USER-TOKEN"]);
        assert_eq!(names(Some("23.02.1")), ["X-SLURM-USER-TOKEN"]);
        assert_eq!(names(Some("25.11.0")), ["X-SLURM-USER-TOKEN"]);
    }

    #[test]
    fn releases_from_meta() {
        let old = json!({"meta":{"plugin":{},"Slurm":{"version":{"major":"22","micro":"8","minor":"05"},"release":"22.05.8"}}});
        assert_eq!(server_release(&old).as_deref(), Some("22.05.8"));
        let new = json!({"meta":{"slurm":{"version":{"major":"25","micro":2,"minor":"11"}}}});
        assert_eq!(server_release(&new).as_deref(), Some("25.11.2"));
        assert_eq!(server_release(&json!({})), None);
    }

    #[test]
    fn version_choice() {
        let doc = r#"{"paths":{"\/slurm\/v0.0.39\/ping\/":{},"/slurm/v0.0.40/ping/":{},"/slurm/v0.0.41/ping/":{},"/slurm/v0.0.99/ping/":{},"/slurmdb/v0.0.41/x":{}}}"#;
        let offered = offered_versions(doc);
        assert_eq!(
            offered,
            [ApiVersion::V0039, ApiVersion::V0040, ApiVersion::V0041]
        );
        assert_eq!(choose_version(&offered), Some(ApiVersion::V0041));
        assert_eq!(choose_version(&[]), None);
    }

    #[test]
    fn errors_carry_status_and_slurm_words_and_stay_transient() {
        let body =
            r#"{"errors":[{"error":"Unable to find job","error_number":2017,"description":"x"}]}"#;
        let failure = check("asking", 500, body).unwrap_err();
        assert_eq!(failure.kind, crate::Kind::Transient);
        insta::assert_snapshot!("error_500", failure.message);
        let failure = check("asking", 401, "Authentication failure").unwrap_err();
        insta::assert_snapshot!("error_401", failure.message);
        // What 24.11 and 26.05 answer a submit with a token slurmctld refuses.
        let failure = check(
            "submitting the job",
            511,
            r#"{"errors":[{"error":"Protocol authentication error","error_number":1007,"description":"Batch job submission failed"}]}"#,
        )
        .unwrap_err();
        assert_eq!(failure.kind, crate::Kind::Transient);
        insta::assert_snapshot!("error_511", failure.message);
        let failure = check(
            "asking",
            200,
            r#"{"errors":[{"error":"bad","error_number":1}]}"#,
        )
        .unwrap_err();
        assert_eq!(failure.message, "asking: bad: error 1");
        assert!(check("asking", 200, "<html>").is_err());
    }

    #[test]
    fn offered_versions_known_or_not() {
        let doc = r#"{"paths":{"\/slurm\/v0.0.42\/ping\/":{},"\/slurm\/v0.0.46\/ping\/":{},"/slurm/v0.0.9/jobs/":{},"/slurmdb/v0.0.42/jobs/":{},"/slurm/vX/ping":{}}}"#;
        assert_eq!(offered_version_names(doc), ["v0.0.9", "v0.0.42", "v0.0.46"]);
        assert_eq!(offered_versions(doc), [ApiVersion::V0042]);
        assert_eq!(
            choose_version(&offered_versions(doc)),
            Some(ApiVersion::V0042)
        );
    }

    #[test]
    fn job_states_of_every_shape() {
        let v38 = r#"{"jobs":[{"job_id":7,"job_state":"RUNNING","batch_host":"node2","nodes":"node2","exit_code":768,"state_reason":"None","start_time":1700000000,"end_time":1700003600}]}"#;
        let job = parse_job(7, 200, v38).unwrap();
        assert!(job.is_running());
        assert_eq!(job.node.as_deref(), Some("node2"));
        assert_eq!(job.reason, None);
        assert_eq!(job.exit_code, Some(3));
        let v40 = r#"{"jobs":[{"job_id":7,"job_state":["COMPLETED","COMPLETING"],"batch_host":"n1","exit_code":{"status":["SIGNALED"],"return_code":{"set":true,"infinite":false,"number":0},"signal":{"id":{"set":true,"infinite":false,"number":9},"name":"KILL"}},"start_time":{"set":true,"infinite":false,"number":5}}]}"#;
        let job = parse_job(7, 200, v40).unwrap();
        assert_eq!(job.state, JobState::Completed);
        assert_eq!(job.flags, ["COMPLETING"]);
        assert_eq!(job.exit_code, Some(137));
        assert_eq!(job.start, Some(5));
        let v39 = r#"{"jobs":[{"job_id":7,"job_state":"PENDING","state_reason":"Resources","exit_code":{"set":false,"infinite":false,"number":0},"nodes":""}]}"#;
        let job = parse_job(7, 200, v39).unwrap();
        assert_eq!(job.state, JobState::Pending);
        assert_eq!(job.reason.as_deref(), Some("Resources"));
        assert_eq!(job.exit_code, None);
        assert_eq!(job.node, None);
    }

    #[test]
    fn cancels() {
        assert!(parse_cancel(1, 200, "").is_ok());
        assert!(parse_cancel(1, 200, r#"{"errors":[],"warnings":[]}"#).is_ok());
        let failed = r#"{"status":[{"error":{"string":"x","code":2017,"message":"Invalid job id specified"},"step_id":"","job_id":{"set":true,"infinite":false,"number":1}}],"errors":[]}"#;
        let failure = parse_cancel(1, 200, failed).unwrap_err();
        assert!(
            failure.message.contains("Invalid job id"),
            "{}",
            failure.message
        );
        assert!(parse_cancel(1, 500, r#"{"errors":[{"error":"nope"}]}"#).is_err());
    }

    #[test]
    fn gres_spelling() {
        assert_eq!(gres_as_tres("gpu:1"), "gres/gpu:1");
        assert_eq!(
            gres_as_tres("gpu:a100:2,nvme:1"),
            "gres/gpu:a100:2,gres/nvme:1"
        );
        assert_eq!(gres_as_tres("gres/gpu:1"), "gres/gpu:1");
    }

    // Shapes as slurmrestd 22.05.8 (v0.0.38) and 24.11.5 (v0.0.42) sent them
    // on the test cluster, shortened.
    #[test]
    fn nodes_of_every_shape() {
        let v38 = r#"{"errors":[],"nodes":[{"name":"node1","features":"","state":"idle","gres":"","partitions":["build"]},
            {"name":"node2","features":"big,kvm","state":"drained","gres":"gpu:a100:2(S:0)","partitions":["build","gpu"]}]}"#;
        let v42 = r#"{"errors":[],"nodes":[{"name":"node2","features":["big"],"state":["IDLE","DRAIN"],"gres":"","partitions":["build"]}]}"#;
        let nodes = parse_nodes(200, v38).unwrap();
        assert_eq!(nodes[1].features, ["big", "kvm"]);
        assert_eq!(nodes[1].gres, ["gpu"]);
        assert_eq!(nodes[1].partitions, ["build", "gpu"]);
        assert!(nodes[0].is_usable() && !nodes[1].is_usable());
        let nodes = parse_nodes(200, v42).unwrap();
        assert_eq!(nodes[0].state, ["idle", "drain"]);
        assert_eq!(nodes[0].features, ["big"]);
        let refused = r#"{"errors":[{"description":"Failure to query nodes","error_number":1007,"error":"Protocol authentication error","source":"_dump_nodes"}]}"#;
        let failure = parse_nodes(511, refused).unwrap_err();
        assert!(
            failure.message.contains("Protocol authentication error"),
            "{failure}"
        );
    }

    #[test]
    fn a_partition_of_every_shape_and_one_slurm_does_not_know() {
        let v38 = r#"{"errors":[],"partitions":[{"name":"build","nodes":"node[1-2]","state":"UP",
            "allowed_accounts":"","denied_accounts":"guests","allowed_qos":"normal,high","denied_qos":""}]}"#;
        let p = parse_partition("build", 200, v38).unwrap().unwrap();
        assert_eq!((p.nodes.as_str(), p.state.as_str()), ("node[1-2]", "UP"));
        assert_eq!(p.allow_accounts, None);
        assert_eq!(p.deny_accounts, ["guests"]);
        assert_eq!(
            p.allow_qos,
            Some(vec!["normal".to_string(), "high".to_string()])
        );
        let v42 = r#"{"errors":[],"partitions":[{"name":"build","nodes":{"allowed_allocation":"","configured":"node[1-2]","total":2},
            "accounts":{"allowed":"ALL","deny":""},"qos":{"allowed":"","deny":"","assigned":""},"partition":{"state":["UP"]}}]}"#;
        let p = parse_partition("build", 200, v42).unwrap().unwrap();
        assert_eq!((p.nodes.as_str(), p.state.as_str()), ("node[1-2]", "UP"));
        assert_eq!((p.allow_accounts, p.allow_qos), (None, None));
        let unknown_2205 = r#"{"errors":[{"error":"Invalid partition name specified","errno":2000}],"partitions":[]}"#;
        assert_eq!(parse_partition("nope", 500, unknown_2205).unwrap(), None);
        let unknown_2411 = r#"{"errors":[{"description":"Unable to find partition nope","error_number":9000,"error":"Query empty or not RFC7320 compliant"}]}"#;
        assert_eq!(parse_partition("nope", 422, unknown_2411).unwrap(), None);
        let refused = r#"{"errors":[{"error":"Unspecified error","errno":-1}],"partitions":[]}"#;
        assert!(parse_partition("build", 500, refused).is_err());
    }

    #[test]
    fn slurmdb_entries() {
        assert_eq!(
            parse_slurmdb_entry("qos", "normal", 404, "Unable find requested URL.").unwrap(),
            None
        );
        let qos = r#"{"errors":[],"qos":[{"name":"normal"}]}"#;
        assert_eq!(
            parse_slurmdb_entry("qos", "normal", 200, qos).unwrap(),
            Some(true)
        );
        assert_eq!(
            parse_slurmdb_entry("qos", "high", 200, qos).unwrap(),
            Some(false)
        );
        let accounts = r#"{"errors":[],"accounts":[{"name":"physics"}]}"#;
        assert_eq!(
            parse_slurmdb_entry("account", "physics", 200, accounts).unwrap(),
            Some(true)
        );
    }
}
