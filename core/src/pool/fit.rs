//! Which pooled job a build may take: the fit decision and the order in
//! which fitting jobs are tried. Pure: the records, the build's need and
//! the clock in, the answer out.

use std::collections::BTreeSet;

use super::record::JobRecord;

/// What a build needs of a job (from its placement: `stage::alloc::place`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Need {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub constraint: Option<String>,
    pub gres: Option<String>,
    pub cpus: Option<u32>,
    pub mem_mb: Option<u64>,
    /// The build's time need, in minutes (what its own job would be given).
    pub time_min: u32,
    /// The job environment's digest under the configuration in use.
    pub env: String,
}

/// Seconds a job must have left beyond a build's time need: the push
/// before the build and the fetch after it, and clocks that disagree a
/// little.
pub const TIME_MARGIN_S: u64 = 60;

/// Seconds before the end of its linger after which a returned job is no
/// longer tried: it is about to leave, and a claim would most likely lose.
pub const LINGER_MARGIN_S: u64 = 1;

/// Why a job does not fit a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unfit {
    /// Its owner still runs (it builds, or fetches).
    Busy,
    /// Not running yet (being submitted).
    Pending,
    /// Asked for by an admin's `--pool-drain`.
    Draining,
    /// Returned, but its linger is (nearly) over: it leaves by itself.
    Lingered,
    /// Made under other settings (work dir, Nix, store, features, linger…).
    Environment,
    Partition,
    Account,
    Qos,
    /// Its node is not known to have the features the build constrains.
    Features,
    Gres,
    Cpus,
    Mem,
    /// Too little of its time limit is left.
    Time,
}

/// Whether `record` is free for a build at `now`: returned (and not about
/// to leave), or held by an owner that is gone (the node then says whether
/// its last build is over). `owner_alive` answers for the record's owner.
pub fn free(record: &JobRecord, now: u64, owner_alive: bool) -> Result<(), Unfit> {
    if record.job.is_none() || record.node.is_empty() {
        return Err(Unfit::Pending);
    }
    if record.draining {
        return Err(Unfit::Draining);
    }
    match record.owner {
        Some(_) if owner_alive => Err(Unfit::Busy),
        Some(_) => Ok(()),
        None if now + LINGER_MARGIN_S >= record.last_used + record.linger => Err(Unfit::Lingered),
        None => Ok(()),
    }
}

/// Whether the job of `record` can run a build that needs `need`, at `now`
/// (Unix seconds): same partition, account, QOS and settings; its node has
/// the constrained features; its allocation covers the build's cpus, memory
/// and gres; its time limit leaves the build's time need and a margin.
pub fn fits(record: &JobRecord, need: &Need, now: u64) -> Result<(), Unfit> {
    if record.env != need.env {
        return Err(Unfit::Environment);
    }
    if record.partition != need.partition {
        return Err(Unfit::Partition);
    }
    if record.account != need.account {
        return Err(Unfit::Account);
    }
    if record.qos != need.qos {
        return Err(Unfit::Qos);
    }
    if !features_cover(record, need.constraint.as_deref()) {
        return Err(Unfit::Features);
    }
    if need.gres.is_some() && record.gres != need.gres {
        return Err(Unfit::Gres);
    }
    // A job asked for no cpus has Slurm's one.
    if need.cpus.unwrap_or(1) > record.cpus.unwrap_or(1) {
        return Err(Unfit::Cpus);
    }
    // A job asked for no memory has Slurm's default, unknown here.
    if let Some(mem) = need.mem_mb {
        if record.mem_mb.is_none_or(|have| have < mem) {
            return Err(Unfit::Mem);
        }
    }
    let needed = u64::from(need.time_min) * 60 + TIME_MARGIN_S;
    if record.ends < now + needed {
        return Err(Unfit::Time);
    }
    Ok(())
}

/// The node features a plain constraint (`a`, `a&b`) requires; `None` for
/// any other expression (`a|b`, counts, brackets), which only a job with
/// the very same constraint is known to satisfy.
pub fn plain_features(constraint: &str) -> Option<Vec<String>> {
    let atoms: Vec<String> = constraint.split('&').map(str::to_string).collect();
    let plain = atoms.iter().all(|a| {
        !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    });
    plain.then_some(atoms)
}

fn features_cover(record: &JobRecord, constraint: Option<&str>) -> bool {
    let Some(constraint) = constraint else {
        return true;
    };
    if record.constraint.as_deref() == Some(constraint) {
        return true;
    }
    match plain_features(constraint) {
        Some(wanted) => {
            let known: BTreeSet<&str> = record.features.iter().map(String::as_str).collect();
            wanted.iter().all(|f| known.contains(f.as_str()))
        }
        None => false,
    }
}

/// The order in which fitting free jobs are tried: the node that already
/// holds most of the build's inputs first (`locality`: paths known there),
/// then a returned job before one whose owner died (which needs a look at
/// its node), then the most recently used (so the others linger out and the
/// pool stays as small as the load).
pub fn rank<'a>(
    candidates: &[&'a JobRecord],
    locality: impl Fn(&str) -> usize,
) -> Vec<&'a JobRecord> {
    let mut ranked: Vec<(usize, bool, u64, &JobRecord)> = candidates
        .iter()
        .map(|r| (locality(&r.node), r.owner.is_none(), r.last_used, *r))
        .collect();
    ranked.sort_by_key(|&(score, returned, used, _)| std::cmp::Reverse((score, returned, used)));
    ranked.into_iter().map(|(_, _, _, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::record::Owner;

    fn job() -> JobRecord {
        JobRecord {
            job: Some(42),
            node: "node2".into(),
            ssh: "node2".into(),
            work: "/w".into(),
            nonce: "n".into(),
            backend: crate::config::Backend::Rest,
            api: None,
            slurm: None,
            partition: Some("build".into()),
            account: None,
            qos: Some("normal".into()),
            constraint: Some("big&ssd".into()),
            features: vec!["big".into(), "ssd".into()],
            gres: None,
            cpus: Some(4),
            mem_mb: Some(4096),
            env: "e".into(),
            started: 0,
            ends: 10_000,
            linger: 60,
            request: 1,
            last_used: 1000,
            owner: None,
            draining: false,
        }
    }

    fn need() -> Need {
        Need {
            partition: Some("build".into()),
            qos: Some("normal".into()),
            time_min: 60,
            env: "e".into(),
            ..Need::default()
        }
    }

    /// Every reason, in a table: what was changed, and the answer.
    #[test]
    fn the_fit_decision() {
        let now = 1010;
        let with = |change: fn(&mut Need)| {
            let mut n = need();
            change(&mut n);
            n
        };
        let cases: Vec<(&str, Need)> = vec![
            ("plain build", need()),
            (
                "same constraint",
                with(|n| n.constraint = Some("big&ssd".into())),
            ),
            (
                "a feature the node has",
                with(|n| n.constraint = Some("ssd".into())),
            ),
            (
                "a feature not known there",
                with(|n| n.constraint = Some("gpu".into())),
            ),
            (
                "another expression",
                with(|n| n.constraint = Some("big|gpu".into())),
            ),
            (
                "other partition",
                with(|n| n.partition = Some("gpu".into())),
            ),
            (
                "other account",
                with(|n| n.account = Some("physics".into())),
            ),
            ("no qos", with(|n| n.qos = None)),
            ("as many cpus", with(|n| n.cpus = Some(4))),
            ("more cpus", with(|n| n.cpus = Some(5))),
            ("less memory", with(|n| n.mem_mb = Some(1024))),
            ("more memory", with(|n| n.mem_mb = Some(8192))),
            ("gres", with(|n| n.gres = Some("gpu:1".into()))),
            ("other settings", with(|n| n.env = "f".into())),
            ("time left exactly", with(|n| n.time_min = 148)),
            ("a minute too much", with(|n| n.time_min = 149)),
        ];
        let table: Vec<String> = cases
            .iter()
            .map(|(what, n)| format!("{what}: {:?}", fits(&job(), n, now)))
            .collect();
        insta::assert_snapshot!(table.join("\n"));
    }

    #[test]
    fn a_job_without_cpus_or_memory_asked_has_one_cpu_and_unknown_memory() {
        let bare = JobRecord {
            cpus: None,
            mem_mb: None,
            ..job()
        };
        assert_eq!(
            fits(
                &bare,
                &Need {
                    cpus: Some(1),
                    ..need()
                },
                1010
            ),
            Ok(())
        );
        assert_eq!(
            fits(
                &bare,
                &Need {
                    cpus: Some(2),
                    ..need()
                },
                1010
            ),
            Err(Unfit::Cpus)
        );
        assert_eq!(
            fits(
                &bare,
                &Need {
                    mem_mb: Some(1),
                    ..need()
                },
                1010
            ),
            Err(Unfit::Mem)
        );
    }

    #[test]
    fn which_jobs_are_free() {
        let owner = Some(Owner { pid: 1, start: 1 });
        assert_eq!(free(&job(), 1010, false), Ok(()));
        assert_eq!(free(&job(), 1058, false), Ok(()));
        assert_eq!(free(&job(), 1059, false), Err(Unfit::Lingered));
        let held = JobRecord { owner, ..job() };
        assert_eq!(free(&held, 5000, true), Err(Unfit::Busy));
        assert_eq!(free(&held, 5000, false), Ok(()), "its owner died");
        let pending = JobRecord {
            job: None,
            owner,
            ..job()
        };
        assert_eq!(free(&pending, 1010, false), Err(Unfit::Pending));
        let draining = JobRecord {
            draining: true,
            ..job()
        };
        assert_eq!(free(&draining, 1010, false), Err(Unfit::Draining));
    }

    #[test]
    fn the_node_with_the_inputs_comes_first_then_returned_then_recent() {
        let a = JobRecord {
            job: Some(1),
            node: "a".into(),
            last_used: 5,
            ..job()
        };
        let b = JobRecord {
            job: Some(2),
            node: "b".into(),
            last_used: 9,
            ..job()
        };
        let c = JobRecord {
            job: Some(3),
            node: "b".into(),
            last_used: 7,
            ..job()
        };
        let orphan = JobRecord {
            job: Some(4),
            node: "b".into(),
            last_used: 99,
            owner: Some(Owner { pid: 1, start: 1 }),
            ..job()
        };
        let ids =
            |ranked: Vec<&JobRecord>| -> Vec<u64> { ranked.iter().filter_map(|r| r.job).collect() };
        let all = [&a, &b, &c, &orphan];
        assert_eq!(ids(rank(&all, |_| 0)), [2, 3, 1, 4]);
        assert_eq!(
            ids(rank(&all, |n| usize::from(n == "a") * 10)),
            [1, 2, 3, 4]
        );
    }

    #[test]
    fn plain_constraints_name_features() {
        assert_eq!(plain_features("big"), Some(vec!["big".into()]));
        assert_eq!(
            plain_features("big&ssd"),
            Some(vec!["big".into(), "ssd".into()])
        );
        assert_eq!(plain_features("big|ssd"), None);
        assert_eq!(plain_features("[a*2&b]"), None);
        assert_eq!(plain_features("a&"), None);
    }
}
