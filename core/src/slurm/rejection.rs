//! Slurm saying no to the configuration rather than to the moment: an
//! unknown partition, account, QOS, node feature or gres in a submit, a
//! token file that is not there, a token slurmctld refuses. Such a failure
//! is bad configuration (exit 78), named by its key and value
//! (`cluster.main.partition = "nosuch": …`), and is not tried again; under
//! the hook it sets the cluster aside (see `docs/admin-guide.md`, "When a
//! cluster is broken").
//!
//! What each release answers is in `docs/reference/slurm.md`: the words
//! below are Slurm's error strings (`slurm_strerror`), the same from sbatch
//! and from slurmrestd's `errors[]`, whatever HTTP status carries them.

use crate::config::{Cluster, TokenSource};
use crate::error::{Failure, Kind, KindOf};
use crate::slurm::model::JobRequest;

/// A request setting Slurm refused: which one, with the value sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedSetting {
    /// `partition`, `account`, `qos`, `constraint` or `gres`.
    pub setting: &'static str,
    /// The value that was sent.
    pub value: String,
}

/// Slurm's words for a refused setting, lower-cased, and which setting.
const REFUSALS: [(&str, &str); 7] = [
    ("invalid partition name", "partition"),
    ("unable to find partition", "partition"),
    ("invalid account", "account"),
    ("invalid qos", "qos"),
    ("invalid feature specification", "constraint"),
    ("invalid generic resource", "gres"),
    ("invalid gres", "gres"),
];

/// Which of `req`'s settings the text `said` (sbatch's stderr, slurmrestd's
/// errors) refuses, if any; `None` also when the setting was not sent (the
/// refusal is then about something else).
pub fn rejected_setting(req: &JobRequest, said: &str) -> Option<RejectedSetting> {
    let lower = said.to_ascii_lowercase();
    let (_, setting) = REFUSALS.iter().find(|(words, _)| lower.contains(words))?;
    let value = match *setting {
        "partition" => req.partition.as_ref(),
        "account" => req.account.as_ref(),
        "qos" => req.qos.as_ref(),
        "constraint" => req.constraint.as_ref(),
        _ => req.gres.as_ref(),
    }?;
    Some(RejectedSetting {
        setting,
        value: value.clone(),
    })
}

/// The configuration key that gave a cluster's request `setting = value`:
/// the cluster's own key, else the routed feature's that has that value.
fn key_of(cluster: &Cluster, setting: &str, value: &str) -> String {
    let own = match setting {
        "partition" => cluster.partition.as_deref(),
        "account" => cluster.account.as_deref(),
        "qos" => cluster.qos.as_deref(),
        _ => None,
    };
    if own == Some(value) {
        return format!("cluster.{}.{setting}", cluster.name);
    }
    let routed = cluster.features.iter().find(|(_, request)| {
        let given = match setting {
            "partition" => request.partition.as_deref(),
            "constraint" => request.constraint.as_deref(),
            "gres" => request.gres.as_deref(),
            _ => None,
        };
        given.is_some_and(|given| value.split([',', '&']).any(|part| part == given))
    });
    match routed {
        Some((feature, _)) => format!("cluster.{}.features.{feature}.{setting}", cluster.name),
        // Asked for by the derivation (`nshResources`), not configured.
        None => format!("nshResources.{setting}"),
    }
}

/// A submit's failure, classified: a refused setting becomes a
/// configuration error naming the key and value (a derivation's own
/// `nshResources` value is bad input instead); a refused or missing token,
/// as [`classify_connect`]; anything else stays as it was, with the cluster
/// named.
pub fn classify_submit(cluster: &Cluster, req: &JobRequest, failure: Failure) -> Failure {
    let Some(rejected) = rejected_setting(req, &failure.message) else {
        return classify_connect(cluster, failure);
    };
    let key = key_of(cluster, rejected.setting, &rejected.value);
    let kind = if key.starts_with("nshResources.") {
        Kind::Input
    } else {
        Kind::Config
    };
    Failure::new(
        kind,
        format!("{key} = {:?}: {}", rejected.value, failure.message),
    )
}

/// A failure to reach a cluster's Slurm, classified: a token slurmctld
/// refuses, or a token file that cannot be read, is the configuration's
/// (`cluster.NAME.token_file = "…": …`); anything else stays as it was,
/// with the cluster named.
pub fn classify_connect(cluster: &Cluster, failure: Failure) -> Failure {
    let token_key = || match &cluster.token {
        Some(TokenSource::File(path)) => format!(
            "cluster.{}.token_file = {:?}",
            cluster.name,
            path.display().to_string()
        ),
        Some(TokenSource::Command(argv)) => {
            format!("cluster.{}.token_command = {argv:?}", cluster.name)
        }
        None => format!("cluster.{}.user = {:?}", cluster.name, cluster.user),
    };
    if failure.kind == Kind::Config && failure.message.starts_with("cluster.") {
        return failure;
    }
    if crate::slurm::client::token_refused(&failure)
        || failure
            .cause::<crate::config::TokenError>()
            .is_some_and(|e| e.kind() == Kind::Config)
    {
        return Failure::new(
            Kind::Config,
            format!("{}: {}", token_key(), failure.message),
        );
    }
    failure.context(format!("cluster {}", cluster.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn cluster() -> Cluster {
        let text = "[cluster.main]\nbackend = \"cli\"\nsystems = [\"x\"]\npartition = \"nosuch\"\n\
                    account = \"acct\"\nsupported_features = [\"gpu\"]\n\
                    [cluster.main.features]\ngpu = { partition = \"gpus\", gres = \"gpu:1\" }\n";
        Config::parse(Path::new("nsh.toml"), text).unwrap().clusters["main"].clone()
    }

    fn request(partition: &str) -> JobRequest {
        JobRequest {
            partition: Some(partition.into()),
            account: Some("acct".into()),
            qos: Some("mine".into()),
            gres: Some("gpu:1".into()),
            ..JobRequest::default()
        }
    }

    #[test]
    fn refusals_name_the_key_and_value() {
        let c = cluster();
        let cases = [
            (
                request("nosuch"),
                "sbatch failed (exit status: 1): sbatch: error: Batch job submission failed: Invalid partition name specified",
                Kind::Config,
                "cluster.main.partition = \"nosuch\": sbatch failed (exit status: 1): sbatch: error: Batch job submission failed: Invalid partition name specified",
            ),
            (
                request("gpus"),
                "submitting the job: HTTP 500: Invalid partition name specified",
                Kind::Config,
                "cluster.main.features.gpu.partition = \"gpus\": submitting the job: HTTP 500: Invalid partition name specified",
            ),
            (
                request("nosuch"),
                "submitting the job: Invalid account or account/partition combination specified",
                Kind::Config,
                "cluster.main.account = \"acct\": submitting the job: Invalid account or account/partition combination specified",
            ),
            (
                request("nosuch"),
                "submitting the job: HTTP 500: Invalid qos specification",
                Kind::Input,
                "nshResources.qos = \"mine\": submitting the job: HTTP 500: Invalid qos specification",
            ),
            (
                request("nosuch"),
                "submitting the job: HTTP 503: Slurm controller not responding",
                Kind::Transient,
                "cluster main: submitting the job: HTTP 503: Slurm controller not responding",
            ),
        ];
        for (req, said, kind, message) in cases {
            let failure = classify_submit(&c, &req, Failure::transient(said));
            assert_eq!((failure.kind, failure.message.as_str()), (kind, message));
        }
    }

    #[test]
    fn a_setting_not_sent_is_not_blamed() {
        let req = JobRequest::default();
        assert_eq!(
            rejected_setting(&req, "Invalid partition name specified"),
            None
        );
    }
}
