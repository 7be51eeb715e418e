//! The hook's decision: may this `try` go to a cluster, wait, or stay local?
//!
//! Pure and fast: configuration, the `try` and the current slot loads in, a
//! [`Decision`] out. The daemon blocks a whole worker while it waits for the
//! answer, so nothing here touches the network or spawns a process; the only
//! I/O of a decision is counting slot locks ([`crate::hook::slots`]), done by the
//! caller through the `load` callback and only for the clusters that fit.
//!
//! The rules are those of Nix's own `build-remote` for its machines:
//! * a cluster fits when it has the system, supports every required feature
//!   (supported or mandatory), and every one of its mandatory features is
//!   required;
//! * the least loaded fitting cluster with a free slot is chosen (load =
//!   slots in use / max_jobs; ties go to the first in configuration order);
//! * fitting but all busy: postpone if the daemon cannot build it locally
//!   right now, else decline;
//! * nothing fits: decline.

use crate::hook::protocol::{NixDefaults, Settings, Try};

/// What a cluster can build: the part of its configuration the hook decides on.
/// (`nsh_core::config` converts a cluster's section into this.)
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterCaps {
    /// The configured name (`[cluster.<name>]`).
    pub name: String,
    /// Platforms it builds for (`x86_64-linux`, …).
    pub systems: Vec<String>,
    /// Features a derivation may require.
    pub supported_features: Vec<String>,
    /// Features a derivation must require to be built there.
    pub mandatory_features: Vec<String>,
    /// Builds at once; 0 disables the cluster.
    pub max_jobs: u32,
}

impl ClusterCaps {
    /// Whether this cluster can build a derivation of `system` requiring `features`.
    pub fn fits(&self, system: &str, features: &[String]) -> bool {
        self.max_jobs > 0
            && self.systems.iter().any(|s| s == system)
            && features
                .iter()
                .all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
            && self.mandatory_features.iter().all(|m| features.contains(m))
    }
}

/// What the daemon itself can build, from its settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalCaps {
    /// `system` and `extra-platforms`.
    pub systems: Vec<String>,
    /// `system-features`.
    pub features: Vec<String>,
}

impl LocalCaps {
    /// From the dump; a setting it leaves out (Lix's partial dumps) has
    /// Nix's default. One that is there but empty is empty.
    pub fn from_settings(settings: &Settings, defaults: &NixDefaults) -> LocalCaps {
        let list = |name: &str, default: &[String]| match settings.get(name) {
            Some(value) => value.split_whitespace().map(str::to_string).collect(),
            None => default.to_vec(),
        };
        let mut systems = vec![settings.system().unwrap_or(&defaults.system).to_string()];
        systems.extend(list("extra-platforms", &defaults.extra_platforms));
        LocalCaps {
            systems,
            features: list("system-features", &defaults.system_features),
        }
    }

    /// Whether the daemon could build it locally now (`amWilling` says a
    /// local slot is free).
    pub fn can_build_now(&self, t: &Try) -> bool {
        t.am_willing
            && self.systems.contains(&t.needed_system)
            && t.required_features
                .iter()
                .all(|f| self.features.contains(f))
    }
}

/// Why a `try` is declined (for logs and the fallback hook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeclineReason {
    /// No cluster has the system and features.
    NoClusterFits,
    /// Every fitting cluster is busy and the daemon can build it itself.
    BusyAndLocalCanBuild,
}

/// The answer to a `try`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Build it on this cluster (an index into the clusters given).
    Accept {
        cluster: usize,
    },
    /// It fits, every slot is taken and the daemon cannot build it: ask again later.
    Postpone,
    Decline(DeclineReason),
}

/// Decides one `try`. `load(i)` is the number of slots of cluster `i` in use;
/// it is called only for clusters that fit.
pub fn decide(
    clusters: &[ClusterCaps],
    local: &LocalCaps,
    t: &Try,
    mut load: impl FnMut(usize) -> u32,
) -> Decision {
    let mut any_fits = false;
    // (load / max_jobs) compared as a fraction without floats: a/b < c/d ⇔ a·d < c·b.
    let mut best: Option<(usize, u32, u32)> = None;
    for (i, cluster) in clusters.iter().enumerate() {
        if !cluster.fits(&t.needed_system, &t.required_features) {
            continue;
        }
        any_fits = true;
        let used = load(i);
        if used >= cluster.max_jobs {
            continue;
        }
        let better = match best {
            None => true,
            Some((_, b_used, b_max)) => {
                u64::from(used) * u64::from(b_max) < u64::from(b_used) * u64::from(cluster.max_jobs)
            }
        };
        if better {
            best = Some((i, used, cluster.max_jobs));
        }
    }
    match best {
        Some((cluster, _, _)) => Decision::Accept { cluster },
        None if any_fits && !local.can_build_now(t) => Decision::Postpone,
        None if any_fits => Decision::Decline(DeclineReason::BusyAndLocalCanBuild),
        None => Decision::Decline(DeclineReason::NoClusterFits),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;

    fn caps(
        name: &str,
        systems: &[&str],
        supported: &[&str],
        mandatory: &[&str],
        max_jobs: u32,
    ) -> ClusterCaps {
        let v = |l: &[&str]| l.iter().map(std::string::ToString::to_string).collect();
        ClusterCaps {
            name: name.into(),
            systems: v(systems),
            supported_features: v(supported),
            mandatory_features: v(mandatory),
            max_jobs,
        }
    }

    fn try_(am_willing: bool, system: &str, features: &[&str]) -> Try {
        Try {
            am_willing,
            needed_system: system.into(),
            drv_path: crate::nix::store_path::test_path(
                "/nix/store/00000000000000000000000000000000-x.drv",
            ),
            required_features: features
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
        }
    }

    fn local() -> LocalCaps {
        LocalCaps {
            systems: vec!["x86_64-linux".into(), "i686-linux".into()],
            features: vec!["big-parallel".into()],
        }
    }

    fn clusters() -> Vec<ClusterCaps> {
        vec![
            caps("main", &["x86_64-linux"], &["big-parallel", "kvm"], &[], 2),
            caps("gpu", &["x86_64-linux"], &["cuda"], &["cuda"], 4),
            caps("arm", &["aarch64-linux"], &[], &[], 8),
            caps("off", &["x86_64-linux", "riscv64-linux"], &[], &[], 0),
        ]
    }

    /// Every interesting case, one line each, as a table snapshot.
    #[test]
    fn the_decision_table() {
        let cases: Vec<(&str, Try, [u32; 4])> = vec![
            ("plain x86", try_(true, "x86_64-linux", &[]), [0, 0, 0, 0]),
            (
                "supported feature",
                try_(true, "x86_64-linux", &["kvm"]),
                [0, 0, 0, 0],
            ),
            (
                "mandatory feature required",
                try_(true, "x86_64-linux", &["cuda"]),
                [0, 0, 0, 0],
            ),
            (
                "mandatory plus unsupported",
                try_(true, "x86_64-linux", &["cuda", "kvm"]),
                [0, 0, 0, 0],
            ),
            (
                "unsupported feature",
                try_(true, "x86_64-linux", &["nixos-test"]),
                [0, 0, 0, 0],
            ),
            (
                "other system",
                try_(true, "aarch64-linux", &[]),
                [0, 0, 0, 0],
            ),
            (
                "unknown system",
                try_(true, "mips-linux", &[]),
                [0, 0, 0, 0],
            ),
            (
                "disabled cluster only",
                try_(false, "riscv64-linux", &[]),
                [0, 0, 0, 0],
            ),
            (
                "busy, local can build",
                try_(true, "x86_64-linux", &[]),
                [2, 0, 0, 0],
            ),
            (
                "busy, local slots full",
                try_(false, "x86_64-linux", &[]),
                [2, 0, 0, 0],
            ),
            (
                "busy, local lacks feature",
                try_(true, "x86_64-linux", &["kvm"]),
                [2, 0, 0, 0],
            ),
            (
                "busy, local lacks system",
                try_(true, "aarch64-linux", &[]),
                [0, 0, 8, 0],
            ),
            (
                "one slot left",
                try_(true, "x86_64-linux", &[]),
                [1, 0, 0, 0],
            ),
        ];
        let mut table = String::new();
        for (name, t, loads) in cases {
            let d = decide(&clusters(), &local(), &t, |i| loads[i]);
            let shown = match d {
                Decision::Accept { cluster } => format!("accept {}", clusters()[cluster].name),
                other => format!("{other:?}"),
            };
            let _ = writeln!(table, "{name:<30} {shown}");
        }
        insta::assert_snapshot!(table);
    }

    #[test]
    fn ties_go_to_the_first_and_loads_compare_as_fractions() {
        let two = vec![
            caps("a", &["x86_64-linux"], &[], &[], 2),
            caps("b", &["x86_64-linux"], &[], &[], 10),
        ];
        let t = try_(true, "x86_64-linux", &[]);
        assert_eq!(
            decide(&two, &local(), &t, |_| 0),
            Decision::Accept { cluster: 0 }
        );
        // a: 1/2 = 0.5, b: 4/10 = 0.4 → b.
        assert_eq!(
            decide(&two, &local(), &t, |i| [1, 4][i]),
            Decision::Accept { cluster: 1 }
        );
        // a: 1/2, b: 5/10: equal → the first.
        assert_eq!(
            decide(&two, &local(), &t, |i| [1, 5][i]),
            Decision::Accept { cluster: 0 }
        );
    }

    #[test]
    fn loads_are_asked_only_for_fitting_clusters() {
        let mut asked = vec![];
        decide(
            &clusters(),
            &local(),
            &try_(true, "aarch64-linux", &[]),
            |i| {
                asked.push(i);
                0
            },
        );
        assert_eq!(asked, vec![2]);
    }

    #[test]
    fn a_partial_dump_takes_nix_defaults_for_what_it_leaves_out() {
        let defaults = NixDefaults::for_system("x86_64-linux", false);
        let mut settings = Settings::default();
        let local = LocalCaps::from_settings(&settings, &defaults);
        assert_eq!(local.systems, ["x86_64-linux", "i686-linux"]);
        assert_eq!(
            local.features,
            ["nixos-test", "benchmark", "big-parallel", "uid-range"]
        );
        assert!(local.can_build_now(&try_(true, "i686-linux", &["big-parallel"])));
        assert!(!local.can_build_now(&try_(true, "aarch64-linux", &[])));
        assert!(!local.can_build_now(&try_(true, "x86_64-linux", &["kvm"])));
        // Set but empty is empty, not the default.
        settings
            .values
            .insert("system-features".into(), String::new());
        settings
            .values
            .insert("system".into(), "aarch64-linux".into());
        let local = LocalCaps::from_settings(&settings, &defaults);
        assert_eq!(local.systems, ["aarch64-linux", "i686-linux"]);
        assert!(local.features.is_empty());
        let kvm = NixDefaults::for_system("x86_64-linux", true);
        assert!(kvm.system_features.contains(&"kvm".to_string()));
        let darwin = NixDefaults::for_system("aarch64-darwin", true);
        assert_eq!(
            darwin.system_features,
            ["nixos-test", "benchmark", "big-parallel"]
        );
        assert!(darwin.extra_platforms.is_empty());
    }

    #[test]
    fn local_caps_from_a_real_settings_dump() {
        let bytes: &[u8] = include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/hook/nix-2.8-accept.bin"
        ));
        let settings = Settings::read(&mut &bytes[..]).unwrap();
        // Every setting is in a Nix dump: the defaults are not used.
        let elsewhere = NixDefaults::for_system("riscv64-linux", true);
        let local = LocalCaps::from_settings(&settings, &elsewhere);
        assert_eq!(local.systems[0], "x86_64-linux");
        assert!(local.systems.contains(&"i686-linux".to_string()));
        assert_eq!(local.features, vec!["big-parallel"]);
    }
}
