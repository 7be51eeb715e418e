//! Clusters the hook sets aside: a cluster whose Slurm rejects its
//! configuration (an unknown partition, account or QOS, a missing or
//! refused token, jobs that would be root's) gets no builds for a while, so
//! that Nix builds them elsewhere — the fallback hook, or locally when
//! `max-jobs` allows — instead of failing them.
//!
//! Before a cluster takes its first build, the hook asks its Slurm, within
//! [`PREFLIGHT_DEADLINE`], what `nsh-alloc` would need (see [`preflight`]);
//! the verdict is kept as a file beside the slot locks
//! (`<slots_dir>/<cluster>.ok` or `.broken`, the latter holding the reason)
//! and trusted for [`VERDICT_FOR`], or until the configuration file
//! changes. A build that fails with a configuration error (exit 78) after
//! the check marks its cluster broken too. Failures that may pass
//! (slurmrestd down, a timeout) set nothing aside: the pipeline reports
//! them as before.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::config::{Backend, Cluster};
use crate::error::{Failure, Kind};
use crate::slurm::rejection::classify_connect;
use crate::slurm::Slurm;

/// How long a verdict on a cluster is trusted.
pub const VERDICT_FOR: Duration = Duration::from_secs(10 * 60);
/// How long the hook waits for each answer of the pre-flight check.
pub const PREFLIGHT_DEADLINE: Duration = Duration::from_secs(5);

/// How long a cluster that answered is taken to answer without asking
/// again (the check is one ping; a `try` comes per derivation).
pub const REACHED_FOR: Duration = Duration::from_secs(2);

/// The verdicts beside the slot locks of one configuration.
pub struct Health<'a> {
    dir: &'a Path,
    /// When the configuration file last changed: older verdicts are stale.
    config_changed: Option<SystemTime>,
}

/// What is known of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Checked and usable.
    Usable,
    /// Set aside, for this reason.
    Broken(String),
    /// Could not be checked now (not the configuration's fault: slurmrestd
    /// down, a timeout); used as before, and checked again next time.
    Unchecked(String),
}

impl<'a> Health<'a> {
    /// The verdicts in `slots_dir`, for the configuration file `config_file`.
    pub fn new(slots_dir: &'a Path, config_file: &Path) -> Health<'a> {
        Health {
            dir: slots_dir,
            config_changed: std::fs::metadata(config_file)
                .and_then(|m| m.modified())
                .ok(),
        }
    }

    fn marker(&self, cluster: &str, what: &str) -> PathBuf {
        self.dir.join(format!("{cluster}.{what}"))
    }

    /// Whether `path` was written after the configuration changed and less
    /// than [`VERDICT_FOR`] ago.
    fn fresh(&self, path: &Path) -> bool {
        let Ok(written) = std::fs::metadata(path).and_then(|m| m.modified()) else {
            return false;
        };
        let recent = written.elapsed().is_ok_and(|age| age < VERDICT_FOR);
        recent && self.config_changed.is_none_or(|changed| written >= changed)
    }

    /// The verdict on `cluster` still trusted, if there is one.
    pub fn known(&self, cluster: &str) -> Option<Verdict> {
        let broken = self.marker(cluster, "broken");
        if self.fresh(&broken) {
            let reason = std::fs::read_to_string(&broken).unwrap_or_default();
            return Some(Verdict::Broken(reason.trim().to_string()));
        }
        self.fresh(&self.marker(cluster, "ok"))
            .then_some(Verdict::Usable)
    }

    /// Records a verdict (a failure to write it only means asking again).
    pub fn record(&self, cluster: &str, verdict: &Verdict) {
        let _ = std::fs::create_dir_all(self.dir);
        let (keep, drop, text) = match verdict {
            Verdict::Usable | Verdict::Unchecked(_) => ("ok", "broken", String::new()),
            Verdict::Broken(reason) => ("broken", "ok", format!("{reason}\n")),
        };
        let _ = std::fs::remove_file(self.marker(cluster, drop));
        let path = self.marker(cluster, keep);
        let tmp = self.marker(cluster, &format!("{keep}.{}", std::process::id()));
        if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Whether `cluster`'s Slurm answers now (REST: slurmrestd's ping and
    /// the cluster's partition, which slurmctld answers), within its
    /// `connect_timeout`; why not,
    /// if not. An answer is trusted for [`REACHED_FOR`], a failure for
    /// `connect_timeout` (the `try`s that come meanwhile are answered at
    /// once). A configuration error is left to the verdict and the
    /// pipeline to report; the CLI backend is not checked here.
    pub fn reachable(&self, cluster: &Cluster) -> Result<(), String> {
        if cluster.backend != Backend::Rest {
            return Ok(());
        }
        let limit = Duration::from_secs(cluster.connect_timeout_s.max(1));
        if self.written_within(&self.marker(&cluster.name, "reached"), REACHED_FOR) {
            return Ok(());
        }
        let down = self.marker(&cluster.name, "unreachable");
        if self.written_within(&down, limit) {
            let why = std::fs::read_to_string(&down).unwrap_or_default();
            return Err(why.trim().to_string());
        }
        crate::slurm::http::set_timeout(limit);
        // From 23.02 on slurmrestd answers its ping with slurmctld down
        // (seen on 24.11 and 26.05): one small query slurmctld must answer.
        let partition = cluster.partition.as_deref().unwrap_or("nsh-probe");
        let answer =
            Slurm::connect(cluster).and_then(|slurm| slurm.partition(partition).map(|_| ()));
        let _ = std::fs::create_dir_all(self.dir);
        match answer {
            Err(failure) if failure.kind != Kind::Config => {
                let _ = std::fs::remove_file(self.marker(&cluster.name, "reached"));
                let _ = std::fs::write(&down, format!("{}\n", failure.message));
                Err(failure.message)
            }
            _ => {
                let _ = std::fs::remove_file(&down);
                let _ = std::fs::write(self.marker(&cluster.name, "reached"), "");
                Ok(())
            }
        }
    }

    /// Whether `path` was written less than `limit` ago.
    fn written_within(&self, path: &Path, limit: Duration) -> bool {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|written| written.elapsed().is_ok_and(|age| age < limit))
    }

    /// The verdict on `cluster`: the one kept, else [`preflight`]'s, which
    /// is then kept. Only a configuration error makes it broken.
    pub fn verdict(&self, cluster: &Cluster) -> Verdict {
        if let Some(known) = self.known(&cluster.name) {
            return known;
        }
        let verdict = match preflight(cluster) {
            Err(failure) if failure.kind == Kind::Config => Verdict::Broken(failure.message),
            // Not the configuration's: not kept, asked again next time.
            Err(failure) => return Verdict::Unchecked(failure.message),
            Ok(()) => Verdict::Usable,
        };
        self.record(&cluster.name, &verdict);
        verdict
    }
}

/// What `nsh-alloc` will need from the cluster's Slurm, each answer within
/// [`PREFLIGHT_DEADLINE`]: the connection (and who the jobs would be: see
/// `Slurm::connect`), the token (slurmctld answering the node list through
/// slurmrestd), the partitions (the cluster's and its features'), and the
/// account and QOS where slurmdbd can be asked.
///
/// # Errors
/// The first thing missing, as a configuration error naming its key when
/// it is the configuration's.
pub fn preflight(cluster: &Cluster) -> Result<(), Failure> {
    crate::slurm::http::set_timeout(PREFLIGHT_DEADLINE);
    crate::slurm::cli::set_query_timeout(PREFLIGHT_DEADLINE);
    let slurm = Slurm::connect(cluster).map_err(|f| classify_connect(cluster, f))?;
    if cluster.backend == Backend::Rest {
        slurm.nodes().map_err(|f| classify_connect(cluster, f))?;
    }
    let name = &cluster.name;
    let own = cluster
        .partition
        .iter()
        .map(|p| (format!("cluster.{name}.partition"), p));
    let routed = cluster.features.iter().filter_map(|(feature, request)| {
        let key = format!("cluster.{name}.features.{feature}.partition");
        request.partition.as_ref().map(|p| (key, p))
    });
    for (key, partition) in own.chain(routed) {
        if slurm.partition(partition)?.is_none() {
            return Err(Failure::config(format!(
                "{key} = {partition:?}: Slurm has no such partition"
            )));
        }
    }
    for (what, value) in [("account", &cluster.account), ("qos", &cluster.qos)] {
        if let Some(value) = value {
            if slurm.slurmdb_entry(what, value)? == Some(false) {
                return Err(Failure::config(format!(
                    "cluster.{name}.{what} = {value:?}: slurmdbd knows no such {what}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn verdicts_are_kept_until_the_configuration_changes() {
        let dir = tempfile::tempdir().unwrap();
        let config_file = dir.path().join("nsh.toml");
        std::fs::write(&config_file, "").unwrap();
        let slots = dir.path().join("slots");
        let health = Health::new(&slots, &config_file);
        assert_eq!(health.known("main"), None);
        let broken = Verdict::Broken("cluster.main.partition = \"x\": no".into());
        health.record("main", &broken);
        assert_eq!(health.known("main"), Some(broken));
        assert_eq!(health.known("other"), None);
        health.record("main", &Verdict::Usable);
        assert_eq!(health.known("main"), Some(Verdict::Usable));
        // A configuration written after the verdict makes it stale.
        let later = SystemTime::now() + Duration::from_secs(5);
        let file = std::fs::File::options()
            .write(true)
            .open(&config_file)
            .unwrap();
        file.set_modified(later).unwrap();
        let health = Health::new(&slots, &config_file);
        assert_eq!(health.known("main"), None);
    }

    #[test]
    fn a_cli_cluster_run_by_root_without_submit_as_is_broken() {
        let text = "[cluster.c]\nbackend = \"cli\"\nsystems = [\"x\"]\n";
        let config = Config::parse(Path::new("nsh.toml"), text).unwrap();
        let verdict = preflight(&config.clusters["c"]);
        if crate::sys::process::euid() == 0 {
            let failure = verdict.unwrap_err();
            assert_eq!(failure.kind, Kind::Config);
            assert!(
                failure.message.starts_with("cluster.c.submit_as: not set"),
                "{failure}"
            );
        } else {
            verdict.unwrap();
        }
    }
}
