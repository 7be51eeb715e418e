//! What `nsh-hook` needs from the configuration: each cluster's build
//! capabilities (from [`crate::config`], converted to [`ClusterCaps`]) and the
//! `[hook]` table, which only the hook reads:
//!
//! ```toml
//! [hook]
//! # The pipeline to run after accept; default: the nsh-* tools next to nsh-hook.
//! pipeline = ["/etc/nsh/hook.sh"]
//! # A hook to ask when nsh declines (Nix's own, for `builders`); the
//! # verbosity is appended to this argv, as Nix does.
//! fallback = ["/usr/libexec/nix/build-remote"]
//! # Where the per-cluster slot locks live.
//! slots_dir = "/run/nsh/slots"
//! # Where `nix-store` is, to check the outputs; default: next to the daemon.
//! nix_bin_dir = "/usr/bin"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{Cluster, Config};
use crate::error::Failure;
use crate::hook::decision::ClusterCaps;
use crate::hook::slots::{check_cluster_name, DEFAULT_SLOTS_DIR};

/// The hook's view of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookConfig {
    /// The file it came from (for messages).
    pub path: PathBuf,
    /// Sorted by name (ties in the decision go to the first, as in nsh-alloc).
    pub clusters: Vec<ClusterCaps>,
    /// A pipeline command (argv) replacing the nsh-* tools.
    pub pipeline: Option<Vec<String>>,
    /// A build hook (argv; the verbosity is appended) for declined `try`s.
    pub fallback: Option<Vec<String>>,
    /// Where the per-cluster slot locks live.
    pub slots_dir: PathBuf,
    /// The directory holding `nix-store` for the validity check (default: next to the daemon, else PATH).
    pub nix_bin_dir: Option<PathBuf>,
}

impl From<&Cluster> for ClusterCaps {
    fn from(cluster: &Cluster) -> ClusterCaps {
        ClusterCaps {
            name: cluster.name.clone(),
            systems: cluster.systems.clone(),
            supported_features: cluster.supported_features.iter().cloned().collect(),
            mandatory_features: cluster.mandatory_features.iter().cloned().collect(),
            max_jobs: cluster.max_jobs,
        }
    }
}

#[derive(Deserialize)]
struct RawFile {
    hook: Option<RawHook>,
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
    /// `$NSH_CONFIG`, else the default path (the hook's argv is Nix's).
    pub fn load() -> Result<HookConfig, Failure> {
        HookConfig::load_from(None)
    }

    /// `explicit` (`nsh-hook --check --config FILE`), else as [`HookConfig::load`].
    pub fn load_from(explicit: Option<&Path>) -> Result<HookConfig, Failure> {
        let path = Config::locate(explicit);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Failure::config(format!(
                "reading the nsh configuration {}: {e} (set $NSH_CONFIG in the daemon's environment)",
                path.display()
            ))
        })?;
        HookConfig::parse(&path, &text)
    }

    /// Validates the whole file (as every tool will read it), then takes the
    /// hook's part.
    pub fn parse(path: &Path, text: &str) -> Result<HookConfig, Failure> {
        let config = Config::parse(path, text)?;
        let file = path.display();
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| Failure::config(format!("{file}: {}", e.to_string().trim_end())))?;
        let mut clusters = Vec::new();
        for cluster in config.clusters.values() {
            check_cluster_name(&cluster.name)
                .map_err(|e| e.context(format!("{file}: cluster.{}", cluster.name)))?;
            clusters.push(ClusterCaps::from(cluster));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    #[test]
    fn the_clusters_capabilities_and_the_hook_table() {
        let text = r#"
[cluster.main]
backend = "rest"
url = "http://slurm:6820"
user = "nixbuild"
token_file = "/etc/nsh/slurm.jwt"
systems = ["x86_64-linux"]
supported_features = ["kvm", "big-parallel"]
max_jobs = 4
[cluster.main.features]
kvm = { constraint = "kvm" }

[cluster.arm]
backend = "cli"
systems = ["aarch64-linux"]
supported_features = ["arm"]
mandatory_features = ["arm"]

[ssh]
user = "nixbuild"

[hook]
pipeline = ["/etc/nsh/hook.sh", "-v"]
fallback = ["/usr/libexec/nix/build-remote"]
slots_dir = "/tmp/slots"
"#;
        let config = HookConfig::parse(Path::new("nsh.toml"), text).unwrap();
        assert_eq!(
            config.clusters,
            vec![
                ClusterCaps {
                    name: "arm".into(),
                    systems: vec!["aarch64-linux".into()],
                    supported_features: vec!["arm".into()],
                    mandatory_features: vec!["arm".into()],
                    max_jobs: 64,
                },
                ClusterCaps {
                    name: "main".into(),
                    systems: vec!["x86_64-linux".into()],
                    supported_features: vec!["big-parallel".into(), "kvm".into()],
                    mandatory_features: vec![],
                    max_jobs: 4,
                },
            ]
        );
        assert_eq!(config.pipeline.unwrap(), vec!["/etc/nsh/hook.sh", "-v"]);
        assert_eq!(config.fallback.unwrap()[0], "/usr/libexec/nix/build-remote");
        assert_eq!(config.slots_dir, PathBuf::from("/tmp/slots"));
        assert_eq!(config.nix_bin_dir, None);
    }

    #[test]
    fn the_documented_example_parses() {
        let text = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/nsh.toml.example"
        ));
        let config = HookConfig::parse(Path::new("nsh.toml.example"), text).unwrap();
        assert_eq!(config.slots_dir, PathBuf::from("/run/nsh/slots"));
        // Site-specific keys are commented out: the example works as installed.
        assert_eq!(config.pipeline, None);
        assert_eq!(config.fallback, None);
        assert!(!config.clusters.is_empty());
    }

    #[test]
    fn errors_name_the_file_and_key() {
        const C: &str = "[cluster.main]\nbackend = \"cli\"\nsystems = [\"x86_64-linux\"]\n";
        for (text, wanted) in [
            (
                format!("{C}[hook]\npipeline = []\n"),
                "nsh.toml: hook.pipeline: empty",
            ),
            (
                format!("{C}[hook]\npipe = [\"x\"]\n"),
                "nsh.toml: TOML parse error at line 5",
            ),
            ("[cluster.main]\nsystems = 3\n".into(), "nsh.toml: "),
        ] {
            let err = HookConfig::parse(Path::new("nsh.toml"), &text).unwrap_err();
            assert_eq!(err.kind, Kind::Config);
            assert!(err.message.starts_with(wanted), "{text:?}: {}", err.message);
        }
    }
}
