//! Cancels owed: a job nsh-alloc gave up on while Slurm did not answer
//! (its wait outlasted `outage_tolerance`, and the cancel then failed too)
//! is recorded in the runtime directory (`cancel/<cluster>-<job>`), and
//! cancelled by the next `nsh-alloc` that reaches that cluster's Slurm,
//! so that no job is left pending for nobody.

use std::path::PathBuf;
use std::time::Duration;

use crate::runtime;
use crate::slurm::Slurm;
use crate::{log_info, log_warn};

/// How long a cancel is owed: a record older than this is dropped (the job
/// has long hit its time limit by then).
const OWED_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

fn dir() -> Option<PathBuf> {
    runtime::subdir("cancel").ok()
}

/// The record's file name for `job` of `cluster`.
fn file_name(cluster: &str, job: u64) -> String {
    format!("{}-{job}", runtime::file_name_safe(cluster))
}

/// The job of `cluster` named by a record's file name, if it is one.
fn job_of(cluster: &str, name: &str) -> Option<u64> {
    name.strip_prefix(&format!("{}-", runtime::file_name_safe(cluster)))?
        .parse()
        .ok()
}

/// Records that `job` of `cluster` is still to be cancelled.
pub fn owe(cluster: &str, job: u64) {
    let written = dir().map(|d| std::fs::write(d.join(file_name(cluster, job)), ""));
    match written {
        Some(Ok(())) => log_warn!(
            "job {job} could not be cancelled now; the next nsh-alloc that reaches cluster {cluster} cancels it"
        ),
        _ => log_warn!("job {job} could not be cancelled, nor the cancel recorded: scancel {job}"),
    }
}

/// After a submit that failed: the jobs tagged with `nonce` (queued all
/// the same) are cancelled; if Slurm cannot be asked, that is owed.
pub fn cancel_tagged(cluster: &str, slurm: &Slurm, nonce: &str) {
    match slurm.tagged(&super::job_tag(nonce)) {
        Ok(jobs) => {
            for job in jobs {
                log_warn!("job {job} was queued although the submit failed; cancelling it");
                if slurm.cancel(job).is_err() {
                    owe(cluster, job);
                }
            }
        }
        Err(_) => owe_tagged(cluster, nonce),
    }
}

/// Records that the jobs tagged with `nonce`, if any, are to be cancelled.
fn owe_tagged(cluster: &str, nonce: &str) {
    if let Some(dir) = dir() {
        let name = format!(
            "{}-t{}",
            runtime::file_name_safe(cluster),
            runtime::file_name_safe(nonce)
        );
        if std::fs::write(dir.join(name), "").is_ok() {
            log_warn!(
                "the submit's answer was lost; the next nsh-alloc that reaches cluster {cluster} cancels its job if there is one"
            );
        }
    }
}

/// The nonce of a tag record of `cluster`, if the name is one.
fn nonce_of(cluster: &str, name: &str) -> Option<String> {
    let nonce = name.strip_prefix(&format!("{}-t", runtime::file_name_safe(cluster)))?;
    (!nonce.is_empty() && nonce.bytes().all(|b| b.is_ascii_hexdigit())).then(|| nonce.to_string())
}

/// Cancels what is owed on `cluster` (a job, or the jobs of a tag), now
/// that its Slurm answers; what fails stays owed.
pub fn pay(cluster: &str, slurm: &Slurm) {
    let Some(dir) = dir() else { return };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let jobs = match (job_of(cluster, &name), nonce_of(cluster, &name)) {
            (Some(job), _) => Ok(vec![job]),
            (None, Some(nonce)) => slurm.tagged(&super::job_tag(&nonce)),
            (None, None) => continue,
        };
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > OWED_FOR));
        let paid =
            stale || jobs.is_ok_and(|jobs| jobs.into_iter().all(|job| slurm.cancel(job).is_ok()));
        if paid {
            let _ = std::fs::remove_file(entry.path());
            if !stale {
                log_info!("cancelled {name}, owed since Slurm did not answer");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_name_their_cluster_and_job() {
        assert_eq!(file_name("main", 42), "main-42");
        assert_eq!(job_of("main", "main-42"), Some(42));
        assert_eq!(job_of("main", "main-x"), None);
        assert_eq!(job_of("main", "other-42"), None);
        // A cluster whose name prefixes another's takes only its own.
        assert_eq!(job_of("main", "main-2-42"), None);
        assert_eq!(job_of("main", "main-tab12"), None);
        assert_eq!(nonce_of("main", "main-tab12").as_deref(), Some("ab12"));
        assert_eq!(nonce_of("main", "main-42"), None);
        assert_eq!(nonce_of("main", "main-t"), None);
    }
}
