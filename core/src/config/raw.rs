//! The file as written: strict serde structs (an unknown key is an error),
//! validated into the types of [`super`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::FeatureRequest;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) cluster: BTreeMap<String, RawCluster>,
    #[serde(default)]
    pub(super) ssh: RawSsh,
    #[serde(default)]
    pub(super) remote: RawRemote,
    #[serde(default)]
    pub(super) fetch: RawFetch,
    /// `[hook]`: read and validated by `crate::hook::config`.
    #[serde(default, rename = "hook")]
    pub(super) _hook: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) backend: Option<String>,
    pub(super) url: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) api: Option<String>,
    pub(super) user: Option<String>,
    pub(super) token_file: Option<PathBuf>,
    pub(super) token_command: Option<Vec<String>>,
    pub(super) partition: Option<String>,
    pub(super) account: Option<String>,
    pub(super) qos: Option<String>,
    pub(super) systems: Option<Vec<String>>,
    #[serde(default)]
    pub(super) supported_features: Vec<String>,
    #[serde(default)]
    pub(super) mandatory_features: Vec<String>,
    pub(super) max_jobs: Option<u32>,
    pub(super) time_limit: Option<NumberOrText>,
    pub(super) queue_timeout: Option<NumberOrText>,
    pub(super) linger: Option<NumberOrText>,
    pub(super) reuse_time: Option<NumberOrText>,
    pub(super) retries: Option<u32>,
    pub(super) connect_timeout: Option<NumberOrText>,
    pub(super) outage_tolerance: Option<NumberOrText>,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) features: BTreeMap<String, FeatureRequest>,
    pub(super) submit_as: Option<String>,
    #[serde(default)]
    pub(super) allow_root: bool,
    pub(super) priority: Option<i32>,
    pub(super) ssh: Option<RawClusterSsh>,
}

/// `[cluster.NAME.ssh]`: what may differ per cluster.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClusterSsh {
    pub(super) user: Option<String>,
    pub(super) identity: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_cpus: Option<u32>,
    pub(super) max_mem: Option<NumberOrText>,
    pub(super) max_time: Option<NumberOrText>,
    pub(super) default_cpus: Option<u32>,
    pub(super) default_mem: Option<NumberOrText>,
    #[serde(default)]
    pub(super) allow_gres: bool,
    #[serde(default)]
    pub(super) allow_constraint: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSsh {
    pub(super) user: Option<String>,
    pub(super) identity: Option<PathBuf>,
    pub(super) config_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) options: Vec<String>,
    pub(super) max_sessions: Option<u32>,
    pub(super) ciphers: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRemote {
    pub(super) nix_bin_dir: Option<String>,
    pub(super) store: Option<String>,
    pub(super) work_root: Option<String>,
    pub(super) idle_timeout: Option<NumberOrText>,
    pub(super) request_timeout: Option<NumberOrText>,
    pub(super) max_output_size: Option<NumberOrText>,
    pub(super) io_timeout: Option<NumberOrText>,
    pub(super) lock_timeout: Option<NumberOrText>,
}

/// `[fetch]`: how `nsh-fetch` makes paths valid here.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFetch {
    pub(super) secret_key_file: Option<PathBuf>,
}

/// A value that may be written as a number or a string (`90` or `"90m"`).
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum NumberOrText {
    Number(i64),
    Text(String),
}

impl fmt::Display for NumberOrText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NumberOrText::Number(n) => write!(f, "{n}"),
            NumberOrText::Text(s) => write!(f, "{s:?}"),
        }
    }
}
