//! One `[cluster.NAME]` table, validated: every check names its key and
//! says what was expected.

use std::collections::{BTreeMap, BTreeSet};

use super::raw::{NumberOrText, RawCluster, RawClusterSsh, RawLimits};
use super::values::{
    is_slurm_word, parse_mem_mb, parse_minutes, parse_minutes_or_zero, parse_seconds,
    parse_seconds_or_zero, parse_url,
};
use super::{
    ApiChoice, Backend, Cluster, FeatureRequest, Limits, Problems, RestUrl, SubmitIdentity,
    TokenSource, DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_LINGER_S, DEFAULT_MAX_JOBS,
    DEFAULT_OUTAGE_TOLERANCE_S, DEFAULT_QUEUE_TIMEOUT_S, DEFAULT_RETRIES, DEFAULT_REUSE_TIME_MIN,
    DEFAULT_TIME_LIMIT_MIN,
};
use crate::error::Failure;

/// The cluster `name` as configured, checked in the order the keys are
/// documented (so that the first error reported is the first in the file's
/// usual layout).
pub(super) fn validate(
    name: &str,
    rc: RawCluster,
    problems: &Problems,
) -> Result<Cluster, Failure> {
    let (backend, url) = backend_and_url(rc.backend.as_deref(), rc.url.as_deref(), problems)?;
    let url = with_ca_file(url, rc.ca_file, problems)?;
    let api = api_choice(rc.api.as_deref(), problems)?;
    let token = token_source(rc.token_file, rc.token_command, problems)?;
    check_credentials(
        backend,
        url.as_ref(),
        token.as_ref(),
        rc.user.is_some(),
        problems,
    )?;
    let systems = systems(rc.systems, problems)?;
    let supported_features: BTreeSet<String> = rc.supported_features.into_iter().collect();
    let mandatory_features: BTreeSet<String> = rc.mandatory_features.into_iter().collect();
    check_features(
        &supported_features,
        &mandatory_features,
        &rc.features,
        problems,
    )?;
    let max_jobs = rc.max_jobs.unwrap_or(DEFAULT_MAX_JOBS);
    if max_jobs == 0 {
        return Err(problems.at("max_jobs", "0: expected at least 1"));
    }
    let Durations {
        time_limit_min,
        queue_timeout_s,
        linger_s,
        reuse_time_min,
    } = durations(
        [
            &rc.time_limit,
            &rc.queue_timeout,
            &rc.linger,
            &rc.reuse_time,
        ],
        problems,
    )?;
    let limits = limits(&rc.limits, time_limit_min, problems)?;
    let (connect_timeout_s, outage_tolerance_s) = slurm_patience(
        rc.connect_timeout.as_ref(),
        rc.outage_tolerance.as_ref(),
        problems,
    )?;
    slurm_words(
        [
            ("partition", &rc.partition),
            ("account", &rc.account),
            ("qos", &rc.qos),
        ],
        problems,
    )?;
    let submit = submit_identity(backend, rc.submit_as, rc.allow_root, rc.ssh, problems)?;
    Ok(Cluster {
        name: name.to_string(),
        backend,
        url,
        api,
        user: rc.user,
        token,
        partition: rc.partition,
        account: rc.account,
        qos: rc.qos,
        systems,
        supported_features,
        mandatory_features,
        max_jobs,
        time_limit_min,
        queue_timeout_s,
        linger_s,
        reuse_time_min,
        retries: rc.retries.unwrap_or(DEFAULT_RETRIES),
        connect_timeout_s,
        outage_tolerance_s,
        limits,
        features: rc.features,
        priority: rc.priority.unwrap_or(0),
        submit,
    })
}

/// `partition`, `account` and `qos`: Slurm names.
fn slurm_words(words: [(&str, &Option<String>); 3], problems: &Problems) -> Result<(), Failure> {
    for (key, value) in words {
        if let Some(value) = value {
            if !is_slurm_word(value) {
                return Err(problems.at(key, format!("{value:?}: expected a Slurm {key} name")));
            }
        }
    }
    Ok(())
}

/// `submit_as`, `allow_root` and `[cluster.NAME.ssh]`: who the jobs are and
/// who logs in to them.
fn submit_identity(
    backend: Backend,
    submit_as: Option<String>,
    allow_root: bool,
    ssh: Option<RawClusterSsh>,
    problems: &Problems,
) -> Result<SubmitIdentity, Failure> {
    if let Some(user) = &submit_as {
        if backend != Backend::Cli {
            return Err(problems.at(
                "submit_as",
                format!("{user:?}: only the cli backend runs sbatch; a rest cluster's jobs are its token's user (`user`)"),
            ));
        }
        if !is_user_name(user) {
            return Err(problems.at("submit_as", format!("{user:?}: expected a user name")));
        }
    }
    let ssh = ssh.unwrap_or_default();
    if let Some(user) = ssh.user.as_ref().filter(|u| !is_user_name(u)) {
        return Err(problems.at("ssh.user", format!("{user:?}: expected a user name")));
    }
    if let Some(path) = ssh.identity.as_ref().filter(|p| !p.is_absolute()) {
        return Err(problems.at(
            "ssh.identity",
            format!("{} is not an absolute path", path.display()),
        ));
    }
    Ok(SubmitIdentity {
        submit_as,
        allow_root,
        ssh_user: ssh.user,
        ssh_identity: ssh.identity,
    })
}

/// A login name as `useradd` takes it (and nothing `runuser`/`sudo` would
/// read as an option).
fn is_user_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

/// A cluster's durations, each with its default.
struct Durations {
    time_limit_min: u32,
    queue_timeout_s: u64,
    linger_s: u64,
    reuse_time_min: u32,
}

/// `keys`: `time_limit`, `queue_timeout`, `linger`, `reuse_time` as written.
fn durations(keys: [&Option<NumberOrText>; 4], problems: &Problems) -> Result<Durations, Failure> {
    let [time_limit, queue_timeout, linger, reuse_time] = keys;
    let time_limit_min = optional(time_limit.as_ref(), parse_minutes, "time_limit", problems)?
        .unwrap_or(DEFAULT_TIME_LIMIT_MIN);
    let queue_timeout_s = optional(
        queue_timeout.as_ref(),
        parse_seconds,
        "queue_timeout",
        problems,
    )?
    .unwrap_or(DEFAULT_QUEUE_TIMEOUT_S);
    let linger_s = optional(linger.as_ref(), parse_seconds_or_zero, "linger", problems)?
        .unwrap_or(DEFAULT_LINGER_S);
    let reuse_time_min = optional(
        reuse_time.as_ref(),
        parse_minutes_or_zero,
        "reuse_time",
        problems,
    )?
    .unwrap_or(DEFAULT_REUSE_TIME_MIN);
    Ok(Durations {
        time_limit_min,
        queue_timeout_s,
        linger_s,
        reuse_time_min,
    })
}

/// `connect_timeout` and `outage_tolerance`, in seconds, with their defaults.
fn slurm_patience(
    connect_timeout: Option<&NumberOrText>,
    outage_tolerance: Option<&NumberOrText>,
    problems: &Problems,
) -> Result<(u64, u64), Failure> {
    let connect = optional(connect_timeout, parse_seconds, "connect_timeout", problems)?
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT_S);
    let outage = optional(
        outage_tolerance,
        parse_seconds_or_zero,
        "outage_tolerance",
        problems,
    )?
    .unwrap_or(DEFAULT_OUTAGE_TOLERANCE_S);
    Ok((connect, outage))
}

/// A value that may be absent, parsed when present.
fn optional<T>(
    value: Option<&NumberOrText>,
    parse: fn(&NumberOrText) -> Result<T, super::BadValue>,
    key: &str,
    problems: &Problems,
) -> Result<Option<T>, Failure> {
    value
        .map(parse)
        .transpose()
        .map_err(|bad| problems.bad_value(key, bad))
}

fn backend_and_url(
    backend: Option<&str>,
    url: Option<&str>,
    problems: &Problems,
) -> Result<(Backend, Option<RestUrl>), Failure> {
    let backend = match backend {
        None | Some("rest") => Backend::Rest,
        Some("cli") => Backend::Cli,
        Some(other) => {
            return Err(problems.at(
                "backend",
                format!("{other:?}: expected \"rest\" or \"cli\""),
            ))
        }
    };
    let url = url
        .map(parse_url)
        .transpose()
        .map_err(|bad| problems.bad_value("url", bad))?;
    if backend == Backend::Rest && url.is_none() {
        return Err(problems.at(
            "url",
            "missing: the rest backend needs slurmrestd's address (\"http://host:6820\" or \"unix:/path\")",
        ));
    }
    Ok((backend, url))
}

/// `ca_file` belongs to an `https://` url, and is an absolute path.
fn with_ca_file(
    url: Option<RestUrl>,
    ca_file: Option<std::path::PathBuf>,
    problems: &Problems,
) -> Result<Option<RestUrl>, Failure> {
    let Some(path) = ca_file else {
        return Ok(url);
    };
    if !path.is_absolute() {
        return Err(problems.at(
            "ca_file",
            format!("{} is not an absolute path", path.display()),
        ));
    }
    match url {
        Some(RestUrl::Https { base, .. }) => Ok(Some(RestUrl::Https {
            base,
            ca_file: Some(path),
        })),
        _ => Err(problems.at(
            "ca_file",
            "only for an \"https://\" url (the certificate authority slurmrestd's proxy is checked against)",
        )),
    }
}

fn api_choice(api: Option<&str>, problems: &Problems) -> Result<ApiChoice, Failure> {
    match api {
        None | Some("auto") => Ok(ApiChoice::Auto),
        Some(v) => v.parse().map(ApiChoice::Fixed).map_err(|_| {
            problems.at(
                "api",
                format!("{v:?}: expected \"auto\" or one of \"v0.0.38\" … \"v0.0.45\""),
            )
        }),
    }
}

fn token_source(
    file: Option<std::path::PathBuf>,
    command: Option<Vec<String>>,
    problems: &Problems,
) -> Result<Option<TokenSource>, Failure> {
    match (file, command) {
        (Some(_), Some(_)) => {
            Err(problems.at("token_file", "give token_file or token_command, not both"))
        }
        (Some(path), None) => {
            if !path.is_absolute() {
                return Err(problems.at(
                    "token_file",
                    format!("{} is not an absolute path", path.display()),
                ));
            }
            Ok(Some(TokenSource::File(path)))
        }
        (None, Some(argv)) => {
            if argv.first().is_none_or(String::is_empty) {
                return Err(problems.at(
                    "token_command",
                    "empty: expected a command as a list, e.g. [\"scontrol\", \"token\"]",
                ));
            }
            Ok(Some(TokenSource::Command(argv)))
        }
        (None, None) => Ok(None),
    }
}

/// slurmrestd over HTTP needs a token, and a token needs its user.
fn check_credentials(
    backend: Backend,
    url: Option<&RestUrl>,
    token: Option<&TokenSource>,
    has_user: bool,
    problems: &Problems,
) -> Result<(), Failure> {
    if backend == Backend::Rest
        && matches!(url, Some(RestUrl::Http(_) | RestUrl::Https { .. }))
        && token.is_none()
    {
        return Err(problems.at(
            "token_file",
            "missing: slurmrestd over HTTP needs a token (token_file or token_command)",
        ));
    }
    if backend == Backend::Rest && token.is_some() && !has_user {
        return Err(problems.at(
            "user",
            "missing: the Slurm user the token belongs to (sent with the token)",
        ));
    }
    Ok(())
}

fn systems(systems: Option<Vec<String>>, problems: &Problems) -> Result<Vec<String>, Failure> {
    let systems = systems.ok_or_else(|| {
        problems.at(
            "systems",
            "missing: expected the Nix systems the nodes build for, e.g. [\"x86_64-linux\"]",
        )
    })?;
    if systems.is_empty() {
        return Err(problems.at("systems", "empty: expected at least one Nix system"));
    }
    Ok(systems)
}

/// Mandatory and routed features must be supported; what a feature routes
/// to must be a Slurm word.
fn check_features(
    supported: &BTreeSet<String>,
    mandatory: &BTreeSet<String>,
    routes: &BTreeMap<String, FeatureRequest>,
    problems: &Problems,
) -> Result<(), Failure> {
    if let Some(feature) = mandatory.iter().find(|f| !supported.contains(*f)) {
        return Err(problems.at(
            "mandatory_features",
            format!("{feature:?} is not in supported_features"),
        ));
    }
    for (feature, request) in routes {
        if !supported.contains(feature) {
            return Err(problems.at(
                &format!("features.{feature}"),
                format!(
                    "{feature:?} is not in supported_features, so no derivation could ask for it"
                ),
            ));
        }
        for (key, value) in [
            ("constraint", &request.constraint),
            ("partition", &request.partition),
            ("gres", &request.gres),
        ] {
            if let Some(value) = value {
                if !is_slurm_word(value) {
                    return Err(problems.at(
                        &format!("features.{feature}.{key}"),
                        format!(
                            "{value:?}: expected a Slurm {key} (letters, digits, and _-.:,&|=*[]!)"
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// What a derivation may ask for when the site says nothing: bounded, so
/// that no user's `nshResources` asks Slurm for a whole cluster or a year
/// (a configured default or time limit above them raises them to it).
pub(super) const DEFAULT_MAX_CPUS: u32 = 64;
pub(super) const DEFAULT_MAX_MEM_MB: u64 = 256 * 1024;
pub(super) const DEFAULT_MAX_TIME_MIN: u32 = 2 * 24 * 60;

/// `[cluster.NAME.limits]`: each value parsed, defaults within the maxima,
/// the cluster's time limit within `max_time`; a maximum not given is the
/// conservative default ([`DEFAULT_MAX_CPUS`] & co.), or the configured
/// default or time limit if that is higher.
fn limits(rl: &RawLimits, time_limit_min: u32, problems: &Problems) -> Result<Limits, Failure> {
    let mut limits = configured_limits(rl, problems)?;
    check_limits(&limits, time_limit_min, problems)?;
    limits.max_cpus = limits.max_cpus.or(Some(
        limits
            .default_cpus
            .map_or(DEFAULT_MAX_CPUS, |d| d.max(DEFAULT_MAX_CPUS)),
    ));
    limits.max_mem_mb = limits.max_mem_mb.or(Some(
        limits
            .default_mem_mb
            .map_or(DEFAULT_MAX_MEM_MB, |d| d.max(DEFAULT_MAX_MEM_MB)),
    ));
    limits.max_time_min = limits
        .max_time_min
        .or(Some(time_limit_min.max(DEFAULT_MAX_TIME_MIN)));
    Ok(limits)
}

/// The limits as the file has them, parsed.
fn configured_limits(rl: &RawLimits, problems: &Problems) -> Result<Limits, Failure> {
    Ok(Limits {
        max_cpus: rl.max_cpus,
        max_mem_mb: optional(
            rl.max_mem.as_ref(),
            parse_mem_mb,
            "limits.max_mem",
            problems,
        )?,
        max_time_min: optional(
            rl.max_time.as_ref(),
            parse_minutes,
            "limits.max_time",
            problems,
        )?,
        default_cpus: rl.default_cpus,
        default_mem_mb: optional(
            rl.default_mem.as_ref(),
            parse_mem_mb,
            "limits.default_mem",
            problems,
        )?,
        allow_gres: rl.allow_gres,
        allow_constraint: rl.allow_constraint,
    })
}

/// Defaults within the maxima, the time limit within `max_time`.
fn check_limits(limits: &Limits, time_limit_min: u32, problems: &Problems) -> Result<(), Failure> {
    for (key, value) in [
        ("limits.max_cpus", limits.max_cpus),
        ("limits.default_cpus", limits.default_cpus),
    ] {
        if value == Some(0) {
            return Err(problems.at(key, "0: expected at least 1"));
        }
    }
    if let (Some(default), Some(max)) = (limits.default_cpus, limits.max_cpus) {
        if default > max {
            return Err(problems.at(
                "limits.default_cpus",
                format!("{default} is above limits.max_cpus = {max}"),
            ));
        }
    }
    if let (Some(default), Some(max)) = (limits.default_mem_mb, limits.max_mem_mb) {
        if default > max {
            return Err(problems.at(
                "limits.default_mem",
                format!("{default} MB is above limits.max_mem = {max} MB"),
            ));
        }
    }
    if let Some(max) = limits.max_time_min {
        if time_limit_min > max {
            return Err(problems.at(
                "time_limit",
                format!("{time_limit_min} minutes is above limits.max_time = {max} minutes"),
            ));
        }
    }
    Ok(())
}
