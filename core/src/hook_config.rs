//! What `nsh-hook` reads from the configuration file: each cluster's build
//! capabilities and the `[hook]` table.
//!
//! The full configuration (Slurm, ssh, remote) is `nsh_core::config`'s; this
//! reads only the keys the hook decides on and ignores the rest, so the hook
//! starts fast and keeps working when the other sections grow. When the two
//! meet, `config` should parse `[hook]` and convert its clusters into
//! [`ClusterCaps`]; this module then shrinks to that conversion.
//!
//! ```toml
//! [cluster.main]
//! systems = ["x86_64-linux"]
//! supported_features = ["big-parallel", "kvm"]
//! mandatory_features = []
//! max_jobs = 64
//!
//! [hook]
//! # The pipeline to run after accept; default: the nsh-* tools next to nsh-hook.
//! pipeline = ["/etc/nsh/hook.sh"]
//! # A hook to ask when nsh declines (Nix's own, for `builders`).
//! fallback = ["/usr/libexec/nix/build-remote"]
//! slots_dir = "/run/nsh/slots"
//! # Where `nix-store` is, to check the outputs; default: next to the daemon.
//! nix_bin_dir = "/usr/bin"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Failure, Kind, ResultExt};
use crate::hook_decision::ClusterCaps;
use crate::slots::{check_cluster_name, DEFAULT_SLOTS_DIR};

/// The default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/nsh/nsh.toml";
/// `max_jobs` when a cluster does not say.
pub const DEFAULT_MAX_JOBS: u32 = 64;

/// The hook's part of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookConfig {
    /// The file it came from (for messages).
    pub path: PathBuf,
    /// Sorted by name (ties in the decision go to the first).
    pub clusters: Vec<ClusterCaps>,
    /// A pipeline command (argv) replacing the nsh-* tools.
    pub pipeline: Option<Vec<String>>,
    /// A build hook (argv, verbosity appended) to hand declined `try`s to.
    pub fallback: Option<Vec<String>>,
    pub slots_dir: PathBuf,
    pub nix_bin_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(default)]
    cluster: toml::Table,
    #[serde(default)]
    hook: Option<RawHook>,
}

#[derive(Deserialize)]
struct RawCluster {
    #[serde(default)]
    systems: Vec<String>,
    #[serde(default)]
    supported_features: Vec<String>,
    #[serde(default)]
    mandatory_features: Vec<String>,
    max_jobs: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHook {
    pipeline: Option<Vec<String>>,
    fallback: Option<Vec<String>>,
    slots_dir: Option<PathBuf>,
    nix_bin_dir: Option<PathBuf>,
}

impl HookConfig {
    /// `$NSH_CONFIG`, else [`DEFAULT_CONFIG`].
    pub fn locate() -> PathBuf {
        std::env::var_os("NSH_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
    }

    pub fn load(path: &Path) -> Result<HookConfig, Failure> {
        let text = std::fs::read_to_string(path)
            .or_fail(Kind::Config, || format!("reading {}", path.display()))?;
        HookConfig::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<HookConfig, Failure> {
        let file = path.display();
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| Failure::config(format!("{file}: {}", e.to_string().trim_end())))?;
        // `toml::Table` is sorted by name: a stable, documented tie-break.
        let mut clusters = Vec::new();
        for (name, value) in raw.cluster {
            check_cluster_name(&name).map_err(|e| e.context(format!("{file}: cluster.{name}")))?;
            let rc: RawCluster = value
                .try_into()
                .map_err(|e| Failure::config(format!("{file}: cluster.{name}: {e}")))?;
            if rc.systems.is_empty() {
                return Err(Failure::config(format!(
                    "{file}: cluster.{name}.systems: empty (expected e.g. [\"x86_64-linux\"])"
                )));
            }
            clusters.push(ClusterCaps {
                name,
                systems: rc.systems,
                supported_features: rc.supported_features,
                mandatory_features: rc.mandatory_features,
                max_jobs: rc.max_jobs.unwrap_or(DEFAULT_MAX_JOBS),
            });
        }
        let hook = raw.hook.unwrap_or_default();
        let argv = |key: &str, v: Option<Vec<String>>| -> Result<Option<Vec<String>>, Failure> {
            match v {
                Some(v) if v.is_empty() || v[0].is_empty() => Err(Failure::config(format!(
                    "{file}: hook.{key}: empty (expected [\"/path/to/program\", args…])"
                ))),
                v => Ok(v),
            }
        };
        Ok(HookConfig {
            path: path.to_path_buf(),
            clusters,
            pipeline: argv("pipeline", hook.pipeline)?,
            fallback: argv("fallback", hook.fallback)?,
            slots_dir: hook
                .slots_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SLOTS_DIR)),
            nix_bin_dir: hook.nix_bin_dir,
        })
    }
}

/// Capabilities by name, for tests and tools.
pub fn by_name(clusters: &[ClusterCaps]) -> BTreeMap<&str, &ClusterCaps> {
    clusters.iter().map(|c| (c.name.as_str(), c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_hook_keys_and_ignores_the_rest() {
        let text = r#"
[cluster.main]
backend = "rest"
url = "http://slurm:6820"
systems = ["x86_64-linux"]
supported_features = ["big-parallel", "kvm"]
max_jobs = 4
[cluster.main.features]
kvm = { constraint = "kvm" }

[cluster.arm]
systems = ["aarch64-linux"]
mandatory_features = ["arm"]

[ssh]
user = "nixbuild"

[hook]
pipeline = ["/etc/nsh/hook.sh", "-v"]
fallback = ["/usr/libexec/nix/build-remote"]
slots_dir = "/tmp/slots"
"#;
        let config = HookConfig::parse(Path::new("nsh.toml"), text).unwrap();
        let clusters = by_name(&config.clusters);
        assert_eq!(clusters["main"].max_jobs, 4);
        assert_eq!(clusters["main"].supported_features, vec!["big-parallel", "kvm"]);
        assert_eq!(clusters["arm"].max_jobs, DEFAULT_MAX_JOBS);
        assert_eq!(clusters["arm"].mandatory_features, vec!["arm"]);
        assert_eq!(config.pipeline.unwrap(), vec!["/etc/nsh/hook.sh", "-v"]);
        assert_eq!(config.fallback.unwrap()[0], "/usr/libexec/nix/build-remote");
        assert_eq!(config.slots_dir, PathBuf::from("/tmp/slots"));
    }

    #[test]
    fn errors_name_the_file_and_key() {
        for (text, wanted) in [
            ("[cluster.main]\nmax_jobs = 1\n", "nsh.toml: cluster.main.systems: empty"),
            ("[cluster.main]\nsystems = \"x\"\n", "nsh.toml: cluster.main:"),
            ("[cluster.\"a/b\"]\nsystems = [\"x\"]\n", "nsh.toml: cluster.a/b:"),
            ("[hook]\npipeline = []\n", "nsh.toml: hook.pipeline: empty"),
            ("[hook]\npipe = [\"x\"]\n", "nsh.toml: TOML parse error at line 2"),
            ("[cluster\n", "nsh.toml: "),
        ] {
            let err = HookConfig::parse(Path::new("nsh.toml"), text).unwrap_err();
            assert_eq!(err.kind, Kind::Config);
            assert!(err.message.starts_with(wanted), "{text:?}: {}", err.message);
        }
    }
}
