//! The ticket: one JSON object per line, passed from tool to tool.
//!
//! Each tool adds its own section and re-emits the ticket. Fields a tool does
//! not know (a newer tool's section, a site's own annotations) are kept in
//! `extra` maps and written back unchanged, so that tools of different versions
//! and site scripts can be mixed in one pipeline.
//!
//! A ticket that carries `error` has failed at an earlier stage; later tools
//! pass it through untouched and exit with the status that error implies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::Backend;
use crate::error::{Failure, Kind};
use crate::nix::serve::BuildStatus;
use crate::nix::store_path::StorePath;

/// The ticket format version this library writes and understands.
pub const TICKET_VERSION: u32 = 1;

/// Unknown fields, kept in their original order and re-emitted as they were.
pub type Extra = Map<String, Value>;

/// One ticket: a section per tool that has run, and whatever else it carried.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    /// Format version; a ticket with a newer major version is refused.
    pub v: u32,
    /// The derivation (`nsh-hook`, `nsh-closure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drv: Option<DrvSection>,
    /// The local store (`nsh-hook`, `nsh-closure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreSection>,
    /// Nix's build settings (`nsh-hook`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<BuildOptions>,
    /// The input closure (`nsh-closure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closure: Option<ClosureSection>,
    /// The Slurm job (`nsh-alloc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc: Option<AllocSection>,
    /// What was copied to the node (`nsh-push`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushSection>,
    /// How the build ended (`nsh-run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunSection>,
    /// What was copied back (`nsh-fetch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<FetchSection>,
    /// The first failure, by the stage where it happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TicketError>,
    /// Earlier attempts of this build that failed transiently (`nsh-hook`,
    /// `nsh-alloc --exclude`): the nodes its next job must avoid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySection>,
    /// Fields this nsh does not know (a newer tool's, a site's), kept in order.
    #[serde(flatten)]
    pub extra: Extra,
}

/// What the derivation is: written by `nsh-closure`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrvSection {
    /// The `.drv` store path.
    pub path: StorePath,
    /// The derivation's `name`.
    #[serde(default)]
    pub name: String,
    /// The derivation's `system` (e.g. `x86_64-linux`).
    #[serde(default)]
    pub system: String,
    /// `requiredSystemFeatures`.
    #[serde(default)]
    pub features: Vec<String>,
    /// Output name → output path; `None` (written `""`) for an output whose
    /// path is not known in advance, as for content-addressed derivations.
    #[serde(default, with = "unknown_as_empty")]
    pub outputs: BTreeMap<String, Option<StorePath>>,
    /// The outputs the caller wants (names).
    #[serde(default)]
    pub wanted: Vec<String>,
    /// What the derivation asks of Slurm (`nshResources`), already validated.
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    #[serde(flatten)]
    pub extra: Extra,
}

impl DrvSection {
    /// The section of a derivation known only by its path.
    pub fn new(path: StorePath) -> DrvSection {
        DrvSection {
            path,
            name: String::new(),
            system: String::new(),
            features: Vec::new(),
            outputs: BTreeMap::new(),
            wanted: Vec::new(),
            resources: Resources::default(),
            extra: Extra::default(),
        }
    }
}

/// A per-derivation resource request (`nshResources`), bounded by configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_mb: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_min: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gres: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<String>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }
}

/// Where the local store is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreSection {
    /// The store directory (`/nix/store` unless configured otherwise).
    pub dir: String,
    /// The store URI local imports go to (`daemon`, `local`, `auto`, …).
    pub uri: String,
    #[serde(flatten)]
    pub extra: Extra,
}

/// Build options from the caller (Nix settings, when run by `nsh-hook`).
/// Zero means "no limit", as in Nix.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BuildOptions {
    /// Nix's `max-silent-time`, seconds.
    #[serde(default)]
    pub max_silent_time: u64,
    /// Nix's `timeout`, seconds.
    #[serde(default)]
    pub timeout: u64,
    /// Nix's `max-log-size`, bytes.
    #[serde(default)]
    pub max_log_size: u64,
    /// Nix's `keep-failed`.
    #[serde(default)]
    pub keep_failed: bool,
    /// Fields this nsh does not know, kept.
    #[serde(flatten)]
    pub extra: Extra,
}

/// The input closure the node needs: written by `nsh-closure`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClosureSection {
    /// Store paths, closed under references, in dependency order
    /// (a path comes after every path it refers to).
    pub paths: Vec<StorePath>,
    /// Sum of the NAR sizes of `paths`.
    pub nar_size: u64,
    #[serde(flatten)]
    pub extra: Extra,
}

/// The Slurm job the build runs in: written by `nsh-alloc`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocSection {
    /// The configured cluster name.
    pub cluster: String,
    /// `rest` or `cli`.
    pub backend: Backend,
    /// The slurmrestd API version spoken (`v0.0.42`; REST only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// The Slurm release the server reported (`24.11.5`; REST only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm: Option<String>,
    /// The Slurm job id.
    pub job: u64,
    /// The node the job runs on.
    pub node: String,
    /// The SSH destination for the node (`user@host`).
    pub ssh: String,
    /// The job's private work directory on the node.
    pub work: String,
    /// The SSH ControlMaster socket shared by the tools of this ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<String>,
    /// Random per job; the job's end-of-request sentinel line carries it, so
    /// that builder output cannot fake the end of a build.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nonce: String,
    /// The number of the request to hand to the job (1 for a fresh job;
    /// higher when an allocation is reused).
    #[serde(default = "first_request")]
    pub request: u32,
    /// Whether the job came from the pool (it ran earlier builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused: Option<bool>,
    /// Seconds since the job started, when it was handed to this build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age: Option<u64>,
    /// Fields this nsh does not know, kept.
    #[serde(flatten)]
    pub extra: Extra,
}

fn first_request() -> u32 {
    1
}

/// A build tried again in a new job after a transient failure.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RetrySection {
    /// This attempt's number: 2 for the first retry.
    pub attempt: u32,
    /// Nodes the job must not run on (Slurm's `--exclude`): those where
    /// earlier attempts failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
    /// The Slurm jobs of the earlier attempts, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<u64>,
    /// Fields this nsh does not know, kept.
    #[serde(flatten)]
    pub extra: Extra,
}

impl RetrySection {
    /// The nodes to avoid, once each, in order.
    pub fn excluding(&mut self, node: &str) {
        if !node.is_empty() && !self.exclude.iter().any(|n| n == node) {
            self.exclude.push(node.to_string());
        }
    }
}

/// What `nsh-push` moved.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PushSection {
    pub copied: u64,
    pub present: u64,
    pub bytes: u64,
    pub secs: f64,
    /// The node was not asked: the pool knew it to hold the whole closure
    /// (nsh-run's request asks it, and a build it lacked inputs for fails
    /// as transient).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_locality: bool,
    #[serde(flatten)]
    pub extra: Extra,
}

/// How the build ended: written by `nsh-run`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSection {
    /// Nix's BuildResult status, in kebab case (`built`, `permanent-failure`, …).
    pub status: BuildStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(default)]
    pub times_built: u64,
    #[serde(default)]
    pub start: u64,
    #[serde(default)]
    pub stop: u64,
    /// Output name → output path of what was built.
    #[serde(default)]
    pub built_outputs: BTreeMap<String, StorePath>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// What `nsh-fetch` brought back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FetchSection {
    /// The paths imported into the local store.
    pub paths: Vec<StorePath>,
    pub bytes: u64,
    #[serde(default)]
    pub secs: f64,
    /// How they became valid (`load-db`, `held-locks`, `daemon`, `signed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_method: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// The ticket's way of writing "no path": `""` (as the first tools wrote
/// it, so that tickets stay byte-compatible), read and written as `None`.
mod unknown_as_empty {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    use crate::nix::store_path::StorePath;

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<String, Option<StorePath>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_map(
            map.iter()
                .map(|(name, path)| (name, path.as_ref().map_or("", StorePath::as_str))),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<String, Option<StorePath>>, D::Error> {
        BTreeMap::<String, PathOrEmpty>::deserialize(deserializer)
            .map(|map| map.into_iter().map(|(name, path)| (name, path.0)).collect())
    }

    /// One value: `""`, or a store path (checked).
    struct PathOrEmpty(Option<StorePath>);

    impl<'de> Deserialize<'de> for PathOrEmpty {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PathOrEmpty, D::Error> {
            let text = String::deserialize(deserializer)?;
            if text.is_empty() {
                return Ok(PathOrEmpty(None));
            }
            StorePath::parse(&text)
                .map(|path| PathOrEmpty(Some(path)))
                .map_err(|e| serde::de::Error::custom(e.message))
        }
    }
}

/// A failure recorded in the ticket by the stage where it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketError {
    /// The tool/stage that failed: `closure`, `alloc`, `push`, `run`, `fetch`, `hook`.
    pub stage: String,
    pub kind: Kind,
    pub message: String,
}

impl TicketError {
    pub fn new(stage: &str, failure: &Failure) -> TicketError {
        TicketError {
            stage: stage.to_string(),
            kind: failure.kind,
            message: failure.message.clone(),
        }
    }
}

impl Ticket {
    /// A fresh ticket of the current version.
    pub fn new() -> Ticket {
        Ticket {
            v: TICKET_VERSION,
            ..Ticket::default()
        }
    }

    /// Parses one line. Empty or malformed lines, a field of the wrong
    /// type or a malformed store path (the message names the field), and
    /// tickets of another format version, are bad input.
    pub fn from_line(line: &str) -> Result<Ticket, Failure> {
        let mut json = serde_json::Deserializer::from_str(line.trim());
        let ticket: Ticket = serde_path_to_error::deserialize(&mut json).map_err(|e| {
            let field = e.path().to_string();
            let e = e.into_inner();
            if field == "." {
                Failure::input(format!("not a ticket: {e}"))
            } else {
                Failure::input(format!("not a ticket: {field}: {e}"))
            }
        })?;
        json.end()
            .map_err(|e| Failure::input(format!("not a ticket: {e}")))?;
        if ticket.v != TICKET_VERSION {
            return Err(Failure::input(format!(
                "ticket version {} is not supported (this nsh reads version {TICKET_VERSION})",
                ticket.v
            )));
        }
        Ok(ticket)
    }

    /// One line of JSON, without the trailing newline.
    pub fn to_line(&self) -> String {
        // Serialising plain data (string keys, no fallible Serialize impls)
        // cannot fail; were it to, the next tool still gets a ticket that
        // says so.
        serde_json::to_string(self).unwrap_or_else(|e| {
            serde_json::json!({
                "v": TICKET_VERSION,
                "error": {"stage": "ticket", "kind": "permanent",
                          "message": format!("the ticket could not be written: {e}")},
            })
            .to_string()
        })
    }

    /// Records a failure of `stage`.
    pub fn fail(&mut self, stage: &str, failure: &Failure) {
        self.error = Some(TicketError::new(stage, failure));
    }

    /// The local store's URI: the `store` section's, else Nix's default
    /// store (`crate::nix::local_store::DEFAULT_STORE_URI`).
    #[must_use]
    pub fn store_uri(&self) -> &str {
        self.store
            .as_ref()
            .map(|s| s.uri.as_str())
            .filter(|uri| !uri.is_empty())
            .unwrap_or(crate::nix::local_store::DEFAULT_STORE_URI)
    }

    /// The `drv` section, or a bad-input failure naming the stage that should
    /// have written it.
    pub fn need_drv(&self) -> Result<&DrvSection, Failure> {
        self.drv.as_ref().ok_or_else(|| {
            Failure::input("the ticket has no `drv` section (run nsh-closure first)")
        })
    }

    /// The `closure` section, or a bad-input failure naming the stage that writes it.
    pub fn need_closure(&self) -> Result<&ClosureSection, Failure> {
        self.closure.as_ref().ok_or_else(|| {
            Failure::input("the ticket has no `closure` section (run nsh-closure first)")
        })
    }

    /// The `alloc` section, or a bad-input failure naming the stage that writes it.
    pub fn need_alloc(&self) -> Result<&AllocSection, Failure> {
        self.alloc.as_ref().ok_or_else(|| {
            Failure::input("the ticket has no `alloc` section (run nsh-alloc first)")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"{"v":1,"drv":{"path":"/nix/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-hello.drv","name":"hello","system":"x86_64-linux","features":["big-parallel"],"outputs":{"out":"/nix/store/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-hello"},"wanted":["out"],"resources":{"cpus":4,"mem_mb":8192,"time_min":120}},"store":{"dir":"/nix/store","uri":"daemon"},"closure":{"paths":["/nix/store/2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c-bash"],"nar_size":123456},"alloc":{"cluster":"main","backend":"rest","job":4242,"node":"node7","ssh":"nixbuild@node7","work":"/tmp/nsh/nsh-4242","request":1},"push":{"copied":3,"present":118,"bytes":1048576,"secs":0.41},"run":{"status":"built","times_built":1,"start":1795300000,"stop":1795300042,"built_outputs":{"out":"/nix/store/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-hello"}},"fetch":{"paths":["/nix/store/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-hello"],"bytes":52000,"secs":0.1}}"#;

    #[test]
    fn a_full_ticket_round_trips_byte_for_byte() {
        let ticket = Ticket::from_line(FULL).unwrap();
        assert_eq!(ticket.to_line(), FULL);
    }

    /// Every section as today's tools write it: the hook's `drv`, `store`
    /// and `options`, nsh-closure's `closure`, nsh-alloc's `alloc` (REST:
    /// `api`, `slurm`, `secs`; the `control` a later tool adds; `cancelled`
    /// from `--cancel`), `push`, a failed `run` with Nix's `error`, `fetch`,
    /// the `error` of the stage that failed, and a site's own field. The
    /// format is a contract between tool versions: parsing and re-emitting
    /// must give the same bytes, and the snapshot keeps the bytes.
    const EVERY_SECTION: &str = concat!(
        r#"{"v":1,"#,
        r#""drv":{"path":"/nix/store/bwgf0a0a0a0a0a0a0a0a0a0a0a0a0a0a-docs12-hello.drv","name":"docs12-hello","system":"x86_64-linux","features":["big"],"outputs":{"dev":"","out":"/nix/store/j9m90a0a0a0a0a0a0a0a0a0a0a0a0a0a-docs12-hello"},"wanted":["out"],"resources":{"cpus":2,"mem_mb":1024,"time_min":20,"gres":"gpu:1","constraint":"avx2"}},"#,
        r#""store":{"dir":"/nix/store","uri":"auto"},"#,
        r#""options":{"max_silent_time":600,"timeout":0,"max_log_size":0,"keep_failed":false},"#,
        r#""closure":{"paths":["/nix/store/1xv10a0a0a0a0a0a0a0a0a0a0a0a0a0a-docs12-dep"],"nar_size":120},"#,
        r#""alloc":{"cluster":"test","backend":"rest","api":"v0.0.42","slurm":"24.11.5","job":553,"node":"node2","ssh":"nixbuild@node2","work":"/tmp/nsh/nsh-553","control":"/tmp/nsh-0/test-553","nonce":"ce6a1ceeb69da34a926df2c6c811d639","request":1,"secs":{"connect":0.01,"submit":0.003,"queued":2.531,"polls":16,"polling":0.052},"cancelled":true},"#,
        r#""push":{"copied":1,"present":0,"bytes":120,"secs":0.347029311},"#,
        r#""run":{"status":"permanent-failure","error":"builder for '/nix/store/bwgf0a0a0a0a0a0a0a0a0a0a0a0a0a0a-docs12-hello.drv' failed with exit code 1","times_built":1,"start":1795314353,"stop":1795314354,"built_outputs":{}},"#,
        r#""fetch":{"paths":[],"bytes":0,"secs":0.138744302},"#,
        r#""error":{"stage":"run","kind":"permanent","message":"build of /nix/store/bwgf0a0a0a0a0a0a0a0a0a0a0a0a0a0a-docs12-hello.drv failed (permanent-failure) on node2"},"#,
        r#""site":{"queue":"night"}}"#
    );

    #[test]
    fn every_section_round_trips_byte_for_byte() {
        let ticket = Ticket::from_line(EVERY_SECTION).unwrap();
        let line = ticket.to_line();
        assert_eq!(line, EVERY_SECTION);
        insta::assert_snapshot!(line);
    }

    #[test]
    fn unknown_fields_survive_at_every_level() {
        let line = r#"{"v":1,"site":{"queue":"night"},"drv":{"path":"/nix/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-n.drv","name":"n","system":"s","future":[1,2]},"alloc":{"cluster":"c","backend":"cli","job":1,"node":"n1","ssh":"u@n1","work":"/w","reservation":"r1"}}"#;
        let ticket = Ticket::from_line(line).unwrap();
        let out: Value = serde_json::from_str(&ticket.to_line()).unwrap();
        assert_eq!(out["site"]["queue"], "night");
        assert_eq!(out["drv"]["future"], serde_json::json!([1, 2]));
        assert_eq!(out["alloc"]["reservation"], "r1");
    }

    #[test]
    fn errors_carry_stage_kind_and_message() {
        let mut ticket = Ticket::new();
        ticket.fail("alloc", &Failure::transient("slurmrestd: HTTP 503"));
        let line = ticket.to_line();
        assert_eq!(
            line,
            r#"{"v":1,"error":{"stage":"alloc","kind":"transient","message":"slurmrestd: HTTP 503"}}"#
        );
        assert_eq!(Ticket::from_line(&line).unwrap(), ticket);
    }

    /// A store path is checked as the ticket is read: a malformed one is
    /// bad input, named with its field.
    #[test]
    fn a_malformed_store_path_is_bad_input_naming_the_field() {
        let good = "/nix/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-x";
        for (line, field, value) in [
            (r#"{"v":1,"drv":{"path":"/p"}}"#.to_string(), "drv.path", "/p"),
            (
                format!(r#"{{"v":1,"drv":{{"path":"{good}.drv","outputs":{{"out":"{good}","dev":"x"}}}}}}"#),
                "drv.outputs.dev",
                "x",
            ),
            (
                format!(r#"{{"v":1,"closure":{{"paths":["{good}","/nix/store/abc-y"],"nar_size":0}}}}"#),
                "closure.paths[1]",
                "/nix/store/abc-y",
            ),
            (
                r#"{"v":1,"run":{"status":"built","built_outputs":{"out":"/nix/store/x y"}}}"#.into(),
                "run.built_outputs.out",
                "/nix/store/x y",
            ),
            (
                r#"{"v":1,"fetch":{"paths":["relative/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-x"],"bytes":0}}"#.into(),
                "fetch.paths[0]",
                "relative/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-x",
            ),
        ] {
            let err = Ticket::from_line(&line).unwrap_err();
            assert_eq!(err.kind, Kind::Input, "{line}");
            assert!(
                err.message
                    .starts_with(&format!("not a ticket: {field}: {value:?} is not a store path")),
                "{line}: {}",
                err.message
            );
        }
        // The exact message, once.
        let err = Ticket::from_line(r#"{"v":1,"drv":{"path":"/p"}}"#).unwrap_err();
        insta::assert_snapshot!(err.message);
    }

    #[test]
    fn bad_lines_are_bad_input() {
        for line in ["", "{", "[]", r#"{"v":2}"#, r#"{"drv":{}}"#] {
            let err = Ticket::from_line(line).unwrap_err();
            assert_eq!(err.kind, Kind::Input, "{line:?}");
        }
    }

    proptest::proptest! {
        /// A line that is not a ticket is an error, never a panic: arbitrary
        /// text, and the full ticket with a few characters changed (which
        /// reaches the store path, number and enum checks).
        #[test]
        fn arbitrary_lines_never_panic(line in "\\PC{0,400}") {
            let _ = Ticket::from_line(&line);
        }

        #[test]
        fn a_mutated_ticket_never_panics(
            flips in proptest::collection::vec((0usize..FULL.len(), proptest::char::any()), 1..6),
        ) {
            let mut chars: Vec<char> = FULL.chars().collect();
            for (at, c) in flips {
                let at = at % chars.len();
                chars[at] = c;
            }
            let line: String = chars.into_iter().collect();
            if let Ok(ticket) = Ticket::from_line(&line) {
                // What parses writes back out and parses again the same.
                let again = Ticket::from_line(&ticket.to_line()).unwrap();
                proptest::prop_assert_eq!(again.to_line(), ticket.to_line());
            }
        }
    }
}
