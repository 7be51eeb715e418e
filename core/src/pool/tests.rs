//! The pool's decisions against records on disk: taking, making room,
//! waiting, giving back, dropping what is gone, draining.

use std::collections::BTreeSet;
use std::process::{Child, Command};

use super::fit::Need;
use super::node::Answer;
use super::record::{JobRecord, Owner};
use super::{Plan, PlanRequest, Pool};
use crate::config::Backend;
use crate::nix::store_path::StorePath;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A process that lives as long as the value: a live owner.
struct Alive(Child, Owner);

impl Alive {
    fn new() -> Alive {
        let child = Command::new("sleep").arg("60").spawn().unwrap();
        let owner = Owner::of(child.id()).unwrap();
        Alive(child, owner)
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An owner that is gone.
fn dead() -> Owner {
    let mut child = Command::new("true").spawn().unwrap();
    let owner = Owner {
        pid: child.id(),
        start: 1,
    };
    child.wait().unwrap();
    owner
}

fn job(id: u64, node: &str, owner: Option<Owner>) -> JobRecord {
    JobRecord {
        job: Some(id),
        node: node.into(),
        ssh: node.into(),
        work: format!("/tmp/nsh/nsh-{id}"),
        nonce: format!("n{id}"),
        backend: Backend::Rest,
        api: None,
        slurm: None,
        partition: None,
        account: None,
        qos: None,
        constraint: None,
        features: vec![],
        gres: None,
        cpus: None,
        mem_mb: None,
        env: "e".into(),
        started: now() - 100,
        ends: now() + 7200,
        linger: 60,
        request: 1,
        last_used: now(),
        owner,
        draining: false,
    }
}

fn pending(owner: Owner) -> JobRecord {
    JobRecord {
        job: None,
        node: String::new(),
        nonce: "fresh".into(),
        owner: Some(owner),
        ..job(0, "", None)
    }
}

fn need() -> Need {
    Need {
        time_min: 60,
        env: "e".into(),
        ..Need::default()
    }
}

fn plan(pool: &Pool, owner: Owner, max_jobs: u32, inputs: &[StorePath]) -> Plan {
    pool.plan(&PlanRequest {
        need: &need(),
        inputs,
        owner,
        max_jobs,
        skip: &BTreeSet::new(),
        pending: &pending(owner),
    })
    .unwrap()
}

fn files(pool: &Pool) -> Vec<String> {
    let mut names: Vec<String> = pool
        .entries()
        .iter()
        .map(|e| e.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_free_job_that_fits_is_taken_with_the_next_number() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::at(dir.path()).unwrap();
    let me = Alive::new();
    job(7, "node1", None).write(pool.dir()).unwrap();
    let Plan::Take { taken, previous } = plan(&pool, me.1, 8, &[]) else {
        panic!("not taken")
    };
    assert_eq!(
        (taken.job, taken.request, taken.owner),
        (Some(7), 2, Some(me.1))
    );
    assert_eq!(previous.request, 1);
    assert_eq!(pool.record(7).unwrap(), taken);
    // Now busy: the next build submits.
    let other = Alive::new();
    assert!(matches!(
        plan(&pool, other.1, 8, &[]),
        Plan::Submit { release: None, .. }
    ));
    assert_eq!(files(&pool), ["job-7.json", "new-fresh.json"]);
}

#[test]
fn a_job_whose_owner_died_is_taken_and_put_back_when_its_node_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::at(dir.path()).unwrap();
    let me = Alive::new();
    job(7, "node1", Some(dead())).write(pool.dir()).unwrap();
    let Plan::Take { previous, .. } = plan(&pool, me.1, 8, &[]) else {
        panic!("not taken")
    };
    pool.untake(&previous, &Answer::Busy).unwrap();
    assert_eq!(pool.record(7).unwrap(), previous);
    let Plan::Take { previous, .. } = plan(&pool, me.1, 8, &[]) else {
        panic!("not taken")
    };
    pool.untake(&previous, &Answer::Gone).unwrap();
    assert_eq!(pool.record(7), None, "a job that is gone leaves the pool");
}

#[test]
fn max_jobs_holds_an_idle_misfit_makes_room_and_a_busy_pool_waits() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::at(dir.path()).unwrap();
    let (a, b, me) = (Alive::new(), Alive::new(), Alive::new());
    job(1, "node1", Some(a.1)).write(pool.dir()).unwrap();
    job(2, "node1", Some(b.1)).write(pool.dir()).unwrap();
    assert!(matches!(plan(&pool, me.1, 2, &[]), Plan::Full { jobs: 2 }));
    // An idle job made under other settings fits nothing: it makes room.
    let mut other = job(3, "node2", None);
    other.env = "f".into();
    other.write(pool.dir()).unwrap();
    let Plan::Submit { release, .. } = plan(&pool, me.1, 4, &[]) else {
        panic!("no submit")
    };
    assert!(release.is_none(), "room was left: nothing to let go");
    pool.forget_pending(&pending(me.1));
    let Plan::Submit { release, .. } = plan(&pool, me.1, 2, &[]) else {
        panic!("no submit")
    };
    assert_eq!(release.unwrap().job, Some(3));
    assert_eq!(files(&pool), ["job-1.json", "job-2.json", "new-fresh.json"]);
}

#[test]
fn the_node_with_the_inputs_wins() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::at(dir.path()).unwrap();
    let me = Alive::new();
    job(1, "node1", None).write(pool.dir()).unwrap();
    let mut older = job(2, "node2", None);
    older.last_used -= 5;
    older.write(pool.dir()).unwrap();
    let inputs = vec![StorePath::parse("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-in").unwrap()];
    pool.note_paths("node2", &inputs).unwrap();
    let Plan::Take { taken, .. } = plan(&pool, me.1, 8, &inputs) else {
        panic!("not taken")
    };
    assert_eq!(taken.node, "node2");
}

#[test]
fn what_is_gone_is_dropped_and_a_submission_becomes_a_record() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::at(dir.path()).unwrap();
    let me = Alive::new();
    let mut lingered = job(1, "node1", None);
    lingered.last_used = now() - 200;
    lingered.write(pool.dir()).unwrap();
    let mut timed_out = job(2, "node1", Some(me.1));
    timed_out.ends = now() - 1;
    timed_out.write(pool.dir()).unwrap();
    pending(dead()).write(pool.dir()).unwrap();
    let Plan::Submit { pending, .. } = plan(&pool, me.1, 8, &[]) else {
        panic!("no submit")
    };
    assert_eq!(files(&pool), ["new-fresh.json"]);
    let running = JobRecord {
        job: Some(9),
        node: "node1".into(),
        ..pending.clone()
    };
    pool.running(&pending, &running).unwrap();
    assert_eq!(files(&pool), ["job-9.json"]);
}

#[test]
fn giving_back_needs_the_claim_that_holds_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::at(dir.path()).unwrap();
    let me = Alive::new();
    let mut held = job(7, "node1", Some(me.1));
    held.request = 3;
    held.write(pool.dir()).unwrap();
    assert!(!pool.returned(7, 2).unwrap(), "an older claim");
    assert!(pool.returned(7, 3).unwrap());
    let back = pool.record(7).unwrap();
    assert_eq!(back.owner, None);
    assert!(!pool.returned(7, 3).unwrap(), "returned already");
    pool.forget(7, 2).unwrap();
    assert!(pool.record(7).is_some(), "not that claim's to forget");
    pool.forget(7, 3).unwrap();
    assert!(pool.record(7).is_none());
}

#[test]
fn draining_takes_the_free_marks_the_busy_and_leaves_the_pending() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::at(dir.path()).unwrap();
    let me = Alive::new();
    job(1, "node1", None).write(pool.dir()).unwrap();
    job(2, "node1", Some(me.1)).write(pool.dir()).unwrap();
    job(3, "node2", Some(dead())).write(pool.dir()).unwrap();
    pending(me.1).write(pool.dir()).unwrap();
    let drained = pool.drain().unwrap();
    let ids = |v: &[JobRecord]| v.iter().map(|r| r.job).collect::<Vec<_>>();
    assert_eq!(ids(&drained.free), [Some(1), Some(3)]);
    assert_eq!(ids(&drained.in_use), [Some(2)]);
    assert_eq!(ids(&drained.pending), [None]);
    assert!(pool.record(2).unwrap().draining);
    assert_eq!(files(&pool), ["job-2.json", "new-fresh.json"]);
}
