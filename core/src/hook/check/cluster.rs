//! `nsh-hook --check` for one cluster, live: what the pipeline will need
//! from its Slurm and its nodes, each step bounded by the check's deadline
//! (set process-wide on the HTTP client and the Slurm commands).
//!
//! REST: `slurmrestd` (it answers at all), `api` (the version chosen and
//! the release), `token` (slurmctld accepts it: the node list is asked,
//! since from Slurm 23.02 on a ping passes with any token). CLI: `commands`
//! (sbatch & co. on PATH) and `slurmctld` (sinfo answers). Then, for both:
//! `partition`, `account`, `qos`, each routed `feature <name>`, and `ssh` to
//! a node of the partition, which reports that node's Nix.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::{executable, Line};
use crate::config::{Backend, Cluster, Config};
use crate::error::{Failure, Kind};
use crate::slurm::http::{self, Method};
use crate::slurm::model::{NodeInfo, PartitionInfo};
use crate::slurm::{rest, Slurm};
use crate::stage::ssh::Ssh;
use crate::sys::process::output_within;

/// Checks `cluster`; its lines, in the order above. A step that fails stops
/// those that need it (no token: no partition to ask for).
pub fn check(config: &Config, cluster: &Cluster, timeout: Duration) -> Vec<Line> {
    let scope = format!("cluster {}", cluster.name);
    let mut lines = Vec::new();
    let Some((slurm, nodes)) = reach_slurm(cluster, &scope, &mut lines) else {
        return lines;
    };
    let partitions = check_partitions(&slurm, cluster, &scope, &mut lines);
    for (what, name) in [("account", &cluster.account), ("qos", &cluster.qos)] {
        if let Some(name) = name {
            lines.push(check_accounting(&slurm, what, name, &partitions, &scope));
        }
    }
    // A partition Slurm does not know has failed already: what goes there
    // cannot be checked.
    let known = |name: &String| partitions.iter().any(|p| &p.name == name);
    for (feature, request) in &cluster.features {
        let partition = request.partition.as_ref().or(cluster.partition.as_ref());
        if let Some(name) = partition.filter(|name| !known(name)) {
            let detail = format!("not checked: partition {name} is unknown");
            lines.push(Line::warn(&scope, &format!("feature {feature}"), detail));
            continue;
        }
        let in_partition = nodes_of(&nodes, partition.map(String::as_str));
        lines.push(check_feature(
            feature,
            request,
            partition,
            &in_partition,
            &scope,
        ));
    }
    if let Some(name) = cluster.partition.as_ref().filter(|name| !known(name)) {
        lines.push(Line::warn(
            &scope,
            "ssh",
            format!("not tried: partition {name} is unknown"),
        ));
        return lines;
    }
    let in_partition = nodes_of(&nodes, cluster.partition.as_deref());
    lines.push(check_ssh(config, cluster, &in_partition, timeout, &scope));
    lines
}

/// Slurm reached and answering for nsh's user: the client and every node.
fn reach_slurm(
    cluster: &Cluster,
    scope: &str,
    lines: &mut Vec<Line>,
) -> Option<(Slurm, Vec<NodeInfo>)> {
    let slurm = match cluster.backend {
        Backend::Rest => connect_rest(cluster, scope, lines)?,
        Backend::Cli => {
            let found: Result<Vec<_>, _> = ["sbatch", "scontrol", "scancel", "sinfo"]
                .iter()
                .map(|p| executable(p).map_err(|f| Failure::transient(f.message)))
                .collect();
            match found {
                Ok(paths) => {
                    // The jobs are this user's: sbatch submits as whoever runs it.
                    let detail = format!(
                        "{}; jobs run as {}",
                        list(&paths),
                        crate::sys::process::user_name()
                    );
                    lines.push(Line::ok(scope, "commands", detail));
                }
                Err(failure) => {
                    lines.push(Line::fail(scope, "commands", failure));
                    return None;
                }
            }
            Slurm::Cli
        }
    };
    let started = Instant::now();
    let (step, what) = match cluster.backend {
        Backend::Rest if cluster.token.is_some() => ("token", "accepted by slurmctld"),
        Backend::Rest => ("token", "none needed (unix socket, rest_auth/local)"),
        Backend::Cli => ("slurmctld", "answers sinfo"),
    };
    match slurm.nodes() {
        Ok(nodes) => {
            let user = cluster
                .user
                .as_deref()
                .map(|u| format!(" for {u}"))
                .unwrap_or_default();
            let detail = format!("{what}{user}; {} nodes", nodes.len());
            lines.push(Line::ok(scope, step, detail).timed(started));
            Some((slurm, nodes))
        }
        Err(failure) => {
            let refused = crate::slurm::client::token_refused(&failure);
            let kind = if refused {
                Kind::Config
            } else {
                Kind::Transient
            };
            lines.push(Line::fail(scope, step, Failure::new(kind, failure.message)).timed(started));
            None
        }
    }
}

/// slurmrestd answers at all (any HTTP status), then the version is
/// settled and pinged.
fn connect_rest(cluster: &Cluster, scope: &str, lines: &mut Vec<Line>) -> Option<Slurm> {
    let url = cluster.url.as_ref()?;
    let started = Instant::now();
    match http::request(url, Method::Get, rest::OPENAPI_PATH, &[], None) {
        Ok(response) => lines.push(
            Line::ok(
                scope,
                "slurmrestd",
                format!("{url} answers (HTTP {})", response.status),
            )
            .timed(started),
        ),
        Err(failure) => {
            lines.push(Line::fail(scope, "slurmrestd", failure).timed(started));
            return None;
        }
    }
    let started = Instant::now();
    match crate::slurm::RestClient::connect(cluster) {
        Ok(client) => {
            let chosen = match cluster.api {
                crate::config::ApiChoice::Auto => "api = auto",
                crate::config::ApiChoice::Fixed(_) => "pinned",
            };
            let release = client.release.as_deref().unwrap_or("release unknown");
            let detail = format!("{} ({chosen}), Slurm {release}", client.version);
            lines.push(Line::ok(scope, "api", detail).timed(started));
            Some(Slurm::Rest(client))
        }
        Err(failure) => {
            // A token refused at the ping (22.05, or a 401) is the token's fault.
            let token = crate::slurm::client::token_trouble(&failure);
            let (step, kind) = if token {
                ("token", Kind::Config)
            } else {
                ("api", failure.kind)
            };
            lines.push(Line::fail(scope, step, Failure::new(kind, failure.message)).timed(started));
            None
        }
    }
}

/// The cluster's partition and every partition a feature routes to.
fn check_partitions(
    slurm: &Slurm,
    cluster: &Cluster,
    scope: &str,
    lines: &mut Vec<Line>,
) -> Vec<PartitionInfo> {
    let mut names: BTreeSet<&str> = cluster
        .features
        .values()
        .filter_map(|f| f.partition.as_deref())
        .collect();
    match &cluster.partition {
        Some(name) => {
            names.insert(name);
        }
        None => lines.push(Line::ok(
            scope,
            "partition",
            "not set: Slurm's default partition",
        )),
    }
    let mut known = Vec::new();
    for name in names {
        let started = Instant::now();
        let line = match slurm.partition(name) {
            Ok(Some(p)) => {
                let line = match p.state.as_str() {
                    "UP" => Line::ok(scope, "partition", format!("{name}: nodes {}, UP", p.nodes)),
                    state => Line::warn(
                        scope,
                        "partition",
                        format!("{name}: nodes {}, {state} (jobs will wait)", p.nodes),
                    ),
                };
                known.push(p);
                line
            }
            Ok(None) => Line::fail(
                scope,
                "partition",
                Failure::config(format!("{name}: Slurm has no such partition")),
            ),
            Err(failure) => Line::fail(scope, "partition", failure.context(name)),
        };
        lines.push(line.timed(started));
    }
    known
}

/// `account` or `qos`: allowed by the partitions, and known to the
/// accounting database where there is one.
fn check_accounting(
    slurm: &Slurm,
    what: &str,
    name: &str,
    partitions: &[PartitionInfo],
    scope: &str,
) -> Line {
    for p in partitions {
        let (allow, deny) = match what {
            "qos" => (&p.allow_qos, &p.deny_qos),
            _ => (&p.allow_accounts, &p.deny_accounts),
        };
        if let Some(why) = PartitionInfo::refuses(allow.as_deref(), deny, name) {
            return Line::fail(
                scope,
                what,
                Failure::config(format!("{name}: partition {} {why}", p.name)),
            );
        }
    }
    let started = Instant::now();
    let line = match slurm.slurmdb_entry(what, name) {
        Ok(Some(true)) => Line::ok(scope, what, format!("{name}: known to slurmdbd")),
        Ok(Some(false)) => Line::fail(
            scope,
            what,
            Failure::config(format!("{name}: slurmdbd knows no such {what}")),
        ),
        Ok(None) => Line::warn(
            scope,
            what,
            format!("{name}: not checked (no accounting database to ask; the partitions allow it)"),
        ),
        Err(failure) => Line::fail(scope, what, failure.context(name)),
    };
    line.timed(started)
}

/// A routed feature: each node feature its constraint names and its gres
/// are on some node of the partition it goes to.
fn check_feature(
    feature: &str,
    request: &crate::config::FeatureRequest,
    partition: Option<&String>,
    nodes: &[&NodeInfo],
    scope: &str,
) -> Line {
    let check = format!("feature {feature}");
    let whose = partition.map_or("the cluster".to_string(), |p| format!("partition {p}"));
    let mut found = Vec::new();
    for word in request
        .constraint
        .iter()
        .flat_map(|c| constraint_features(c))
    {
        let having: Vec<&str> = nodes
            .iter()
            .filter(|n| n.features.contains(&word))
            .map(|n| n.name.as_str())
            .collect();
        if having.is_empty() {
            return Line::fail(
                scope,
                &check,
                Failure::config(format!("no node of {whose} has the node feature {word:?}")),
            );
        }
        found.push(format!("{word}: {}", having.join(",")));
    }
    for gres in request.gres.iter().flat_map(|g| NodeInfo::gres_names(g)) {
        let having: Vec<&str> = nodes
            .iter()
            .filter(|n| n.gres.contains(&gres))
            .map(|n| n.name.as_str())
            .collect();
        if having.is_empty() {
            return Line::fail(
                scope,
                &check,
                Failure::config(format!("no node of {whose} has the gres {gres:?}")),
            );
        }
        found.push(format!("gres {gres}: {}", having.join(",")));
    }
    if found.is_empty() {
        Line::ok(scope, &check, format!("goes to {whose}"))
    } else {
        Line::ok(scope, &check, found.join("; "))
    }
}

/// The node features a `--constraint` expression names: `big&(gpu|kvm)*2`
/// → `big`, `gpu`, `kvm` (operators, brackets and counts dropped).
pub fn constraint_features(expression: &str) -> Vec<String> {
    expression
        .split(['&', '|', ',', '(', ')', '[', ']'])
        .map(|word| word.split('*').next().unwrap_or("").trim())
        .filter(|word| !word.is_empty())
        .map(str::to_string)
        .collect()
}

/// The nodes in `partition` (all of them when it is Slurm's default).
fn nodes_of<'n>(nodes: &'n [NodeInfo], partition: Option<&str>) -> Vec<&'n NodeInfo> {
    nodes
        .iter()
        .filter(|n| partition.is_none_or(|p| n.partitions.iter().any(|q| q == p)))
        .collect()
}

/// ssh to a usable node of the partition, as the tools do, asking its
/// `nix-store --version`.
fn check_ssh(
    config: &Config,
    cluster: &Cluster,
    nodes: &[&NodeInfo],
    timeout: Duration,
    scope: &str,
) -> Line {
    let Some(node) = nodes.iter().find(|n| n.is_usable()).or(nodes.first()) else {
        let failure = Failure::config("the partition has no nodes to reach");
        return Line::fail(scope, "ssh", failure);
    };
    let destination = match config.ssh_user(cluster) {
        Some(user) => format!("{user}@{}", node.name),
        None => node.name.clone(),
    };
    let nix_store = match config.remote.nix_bin_dir.trim_end_matches('/') {
        "" => "nix-store".to_string(),
        dir => format!("{dir}/nix-store"),
    };
    let ssh = Ssh::new(&destination, &config.ssh);
    let mut command = ssh.command(&[&nix_store, "--version"]);
    command.stdin(std::process::Stdio::null());
    let started = Instant::now();
    // ssh's own ConnectTimeout is 15 s; the check's deadline is shorter.
    let line = match output_within(&mut command, timeout) {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Line::ok(scope, "ssh", format!("{destination}: {version}"))
        }
        Ok(out) => Line::fail(
            scope,
            "ssh",
            Failure::transient(format!(
                "ssh {destination} {nix_store} --version: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        ),
        Err(e) => Line::fail(
            scope,
            "ssh",
            Failure::transient(format!("ssh {destination}: {e}")),
        ),
    };
    line.timed(started)
}

fn list(paths: &[std::path::PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraint_words() {
        assert_eq!(constraint_features("big"), ["big"]);
        assert_eq!(constraint_features("big&(gpu|kvm)"), ["big", "gpu", "kvm"]);
        assert_eq!(constraint_features("[rack1*2&rack2*4]"), ["rack1", "rack2"]);
    }

    fn node(name: &str, features: &[&str], gres: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            state: vec!["idle".into()],
            features: features
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
            gres: NodeInfo::gres_names(gres),
            partitions: vec!["build".into()],
        }
    }

    #[test]
    fn a_feature_is_known_when_some_node_of_its_partition_has_it() {
        let nodes = [node("n1", &[], ""), node("n2", &["big"], "gpu:a100:2(S:0)")];
        let refs: Vec<&NodeInfo> = nodes.iter().collect();
        let partition = Some("build".to_string());
        let request =
            |constraint: Option<&str>, gres: Option<&str>| crate::config::FeatureRequest {
                constraint: constraint.map(str::to_string),
                gres: gres.map(str::to_string),
                partition: None,
            };
        let line = check_feature(
            "big",
            &request(Some("big"), Some("gpu:1")),
            partition.as_ref(),
            &refs,
            "c",
        );
        assert_eq!(line.detail, "big: n2; gres gpu: n2");
        assert_eq!(line.status, super::super::Status::Ok);
        let line = check_feature(
            "kvm",
            &request(Some("kvm"), None),
            partition.as_ref(),
            &refs,
            "c",
        );
        assert_eq!(line.status, super::super::Status::Fail(Kind::Config));
        assert_eq!(
            line.detail,
            "no node of partition build has the node feature \"kvm\""
        );
    }
}
