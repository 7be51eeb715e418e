//! The site configuration: which Slurm clusters nsh may use and how, how to
//! reach the nodes over SSH, and where things are on the nodes.
//!
//! TOML, found at `--config FILE`, else `$NSH_CONFIG`, else
//! `/etc/nsh/nsh.toml` ([`Config::locate`]). Loading is strict: an unknown key
//! is an error (a typo must not silently fall back to a default), and every
//! error names the file, the key and what was expected. All configuration
//! errors are [`Kind::Config`] (exit 78).
//!
//! The Slurm token itself is never part of the configuration: only where to
//! get it ([`TokenSource`]), read when needed into a [`Secret`] that does not
//! print.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::error::{Failure, Kind, KindOf};
use crate::slurm::ApiVersion;

mod cluster;
mod raw;
mod values;

use raw::RawConfig;
pub use values::{parse_mem_mb_text, parse_minutes_text, BadValue};
use values::{parse_seconds, parse_size};

/// Where the configuration is read from when no `--config` is given and
/// `$NSH_CONFIG` is unset.
pub const DEFAULT_PATH: &str = "/etc/nsh/nsh.toml";

/// The loaded, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (for messages).
    pub path: PathBuf,
    /// The clusters, by name, in name order.
    pub clusters: BTreeMap<String, Cluster>,
    /// `[ssh]`: how nodes are reached.
    pub ssh: Ssh,
    /// `[remote]`: the Nix on the nodes.
    pub remote: Remote,
    /// `[fetch]`: how `nsh-fetch` makes paths valid in the local store.
    pub fetch: Fetch,
}

/// `[fetch]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fetch {
    /// A Nix binary-cache secret key (`name:base64`, as `nix-store
    /// --generate-binary-cache-key` writes it) with which a user the Nix
    /// daemon does not trust signs what it imports (`nsh-fetch
    /// --import-method signed`); the daemon checks the signatures against
    /// its `trusted-public-keys`.
    pub secret_key_file: Option<PathBuf>,
}

/// How nsh talks to a cluster's Slurm (`alloc.backend` in the ticket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// slurmrestd over HTTP or a unix socket.
    #[default]
    Rest,
    /// `sbatch`, `squeue`/`scontrol`, `scancel` on this machine.
    Cli,
}

/// The ticket's name (`rest`), for messages.
impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::derive::serde_name(self))
    }
}

/// Where slurmrestd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestUrl {
    /// `http://host:port` (the base; API paths are appended).
    Http(String),
    /// `https://host:port` (the base), usually a TLS-terminating proxy in
    /// front of slurmrestd, which speaks plain HTTP itself.
    Https {
        /// The base URL, API paths are appended.
        base: String,
        /// The PEM file of the certificate authorities trusted for it
        /// (`ca_file`); `None`: the system's bundle.
        ca_file: Option<PathBuf>,
    },
    /// `unix:/path/to/socket`.
    Unix(PathBuf),
}

impl fmt::Display for RestUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestUrl::Http(url) | RestUrl::Https { base: url, .. } => f.write_str(url),
            RestUrl::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Which slurmrestd API version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiChoice {
    /// The newest version both the server and nsh support, found by asking.
    Auto,
    Fixed(ApiVersion),
}

/// Where the Slurm JWT comes from. Read on use, never kept in the config.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A file holding the token (`SLURM_JWT=` prefix allowed).
    File(PathBuf),
    /// A command printing the token, e.g. `["scontrol","token","lifespan=3600"]`
    /// (which prints `SLURM_JWT=<token>`).
    Command(Vec<String>),
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::File(path) => write!(f, "File({path:?})"),
            TokenSource::Command(argv) => write!(f, "Command({argv:?})"),
        }
    }
}

/// A secret (the Slurm token): printing it, with `{:?}` or `{}`, shows
/// `<redacted>`; only [`Secret::expose`] gives the value, for the one place
/// that sends it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The value, to put in a request header. Never log or format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How long a `token_command` may run before it is stopped and the token
/// counts as not had (transient): `scontrol token` answers at once.
pub const TOKEN_COMMAND_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

impl TokenSource {
    /// Reads the token now. Failures are transient (a token file being
    /// rotated, a token command failing): they name the file or command but
    /// never contain token text.
    pub fn read(&self) -> Result<Secret, Failure> {
        let raw = match self {
            TokenSource::File(path) => std::fs::read_to_string(path).map_err(|e| {
                let message = format!("reading the Slurm token file {}: {e}", path.display());
                // Not there, or not ours to read: the configuration's (a
                // file being rotated is replaced, never missing).
                let kind = match e.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                        Kind::Config
                    }
                    _ => Kind::Transient,
                };
                Failure::from(TokenError(message, kind))
            })?,
            TokenSource::Command(argv) => {
                let mut command = Command::new(&argv[0]);
                command.args(&argv[1..]).stdin(Stdio::null());
                let output =
                    crate::sys::process::output_within(&mut command, TOKEN_COMMAND_DEADLINE)
                        .map_err(|e| {
                            token_error(format!("running the token command {argv:?}: {e}"))
                        })?;
                if !output.status.success() {
                    return Err(token_error(format!(
                        "the token command {argv:?} failed ({})",
                        output.status
                    )));
                }
                String::from_utf8(output.stdout).map_err(|_| {
                    token_error(format!("the token command {argv:?} printed non-UTF-8"))
                })?
            }
        };
        let token = token_from_text(&raw);
        if token.is_empty() {
            return Err(token_error(format!("{self:?} gave an empty Slurm token")));
        }
        Ok(Secret(token.to_string()))
    }
}

/// A Slurm token that could not be had: transient (a command failing), or
/// the configuration's (a token file that is missing or unreadable); the
/// message names the file or command, never the token.
#[derive(Debug, Clone)]
pub struct TokenError(String, Kind);

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TokenError {}

impl KindOf for TokenError {
    fn kind(&self) -> Kind {
        self.1
    }
}

fn token_error(message: String) -> Failure {
    Failure::from(TokenError(message, Kind::Transient))
}

/// The token in what a token file or `scontrol token` holds: the last
/// non-empty line, without a `SLURM_JWT=` prefix.
fn token_from_text(text: &str) -> &str {
    let line = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    line.strip_prefix("SLURM_JWT=").unwrap_or(line).trim()
}

/// One configured Slurm cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub name: String,
    pub backend: Backend,
    /// slurmrestd's address (REST backend only).
    pub url: Option<RestUrl>,
    pub api: ApiChoice,
    /// The Slurm user the token belongs to (sent as `X-SLURM-USER-NAME`).
    pub user: Option<String>,
    /// Where the token comes from; `None` where no token is needed (a unix
    /// socket with `rest_auth/local`, or the CLI backend).
    pub token: Option<TokenSource>,
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Nix system types the nodes build for (`x86_64-linux`).
    pub systems: Vec<String>,
    /// `requiredSystemFeatures` the cluster can satisfy.
    pub supported_features: BTreeSet<String>,
    /// Features a derivation must require to be built here.
    pub mandatory_features: BTreeSet<String>,
    /// How many nsh jobs may be queued or running at once.
    pub max_jobs: u32,
    /// The job time limit when neither the derivation nor the build timeout
    /// says otherwise, in minutes.
    pub time_limit_min: u32,
    /// How long to wait for a submitted job to start running, in seconds.
    pub queue_timeout_s: u64,
    /// Seconds a job waits, idle in the pool, for another build after its
    /// last one; 0: one job per build (`docs/pool.md`).
    pub linger_s: u64,
    /// Minutes a pooled job is asked for beyond the time its first build
    /// needs, so that later builds fit in what is left (capped by
    /// `limits.max_time`).
    pub reuse_time_min: u32,
    /// How many times a build that failed transiently on a node (it died,
    /// the job was preempted or cancelled, ssh dropped) is tried again in a
    /// new job, elsewhere, before Nix is told.
    pub retries: u32,
    /// How long the hook waits for Slurm to answer before it postpones a
    /// build, in seconds.
    pub connect_timeout_s: u64,
    /// How long a wait for a job rides out Slurm not answering, in seconds.
    pub outage_tolerance_s: u64,
    pub limits: Limits,
    /// requiredSystemFeature → what to ask Slurm for.
    pub features: BTreeMap<String, FeatureRequest>,
    /// Which fitting cluster is tried first: higher first (default 0).
    pub priority: i32,
    /// Who submits the jobs and who logs in to them.
    pub submit: SubmitIdentity,
}

/// Who a cluster's jobs belong to, and who reaches them over ssh (the keys
/// `submit_as`, `allow_root` and `[cluster.NAME.ssh]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubmitIdentity {
    /// The account `sbatch`/`scancel` run as (`runuser -u`, or `sudo -n -u`
    /// when not root); the CLI backend only.
    pub submit_as: Option<String>,
    /// Whether jobs may be submitted as root (off: nsh-alloc refuses).
    pub allow_root: bool,
    /// `[cluster.NAME.ssh] user`, over `[ssh] user`.
    pub ssh_user: Option<String>,
    /// `[cluster.NAME.ssh] identity`, over `[ssh] identity`.
    pub ssh_identity: Option<PathBuf>,
}

/// What a derivation may ask for with `nshResources`, and what it gets when
/// it asks for nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_cpus: Option<u32>,
    pub max_mem_mb: Option<u64>,
    pub max_time_min: Option<u32>,
    pub default_cpus: Option<u32>,
    pub default_mem_mb: Option<u64>,
    /// Whether a derivation may ask for generic resources (`nshResources.gres`).
    pub allow_gres: bool,
    /// Whether a derivation may ask for node features (`nshResources.constraint`).
    pub allow_constraint: bool,
}

/// What one `requiredSystemFeature` turns into in the Slurm request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureRequest {
    /// A node feature (`sbatch --constraint`).
    pub constraint: Option<String>,
    /// A partition to submit to instead of the cluster's.
    pub partition: Option<String>,
    /// Generic resources (`sbatch --gres`), e.g. `gpu:1`.
    pub gres: Option<String>,
}

/// How to reach the nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ssh {
    /// The login user on the nodes; the cluster's `user` when unset.
    pub user: Option<String>,
    /// `ssh -i`.
    pub identity: Option<PathBuf>,
    /// `ssh -F`.
    pub config_file: Option<PathBuf>,
    /// Extra `-o` options, as `Key=Value`.
    pub options: Vec<String>,
    /// How many sessions one ssh connection may carry at once: the nodes'
    /// sshd `MaxSessions`.
    pub max_sessions: u32,
    /// Which ciphers the connection prefers (`ssh -o Ciphers=`).
    pub ciphers: Ciphers,
}

/// `[ssh] ciphers`: the cipher preference nsh hands ssh.
///
/// Bulk copies (a closure pushed, outputs fetched) are bound by the CPU at
/// both ends, and OpenSSH's first choice, chacha20-poly1305, costs several
/// times what AES-GCM costs on a CPU with AES instructions: on the test
/// machine it was a third of a push's CPU time (docs/benchmarks.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Ciphers {
    /// AES-GCM first when this machine's CPU has AES instructions, else
    /// ssh's own choice.
    #[default]
    Auto,
    /// Whatever ssh and its `ssh_config` choose (`ciphers = ""`).
    SshDefault,
    /// This list, as for `ssh -o Ciphers=` (`+`, `-`, `^` prefixes included).
    List(String),
}

impl Default for Ssh {
    fn default() -> Ssh {
        Ssh {
            user: None,
            identity: None,
            config_file: None,
            options: Vec::new(),
            max_sessions: DEFAULT_MAX_SESSIONS,
            ciphers: Ciphers::Auto,
        }
    }
}

/// sshd's own default for `MaxSessions`.
const DEFAULT_MAX_SESSIONS: u32 = 10;

/// Where things are on the nodes, and how long the job waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// Directory of the node's `nix-store`; empty: the node's PATH.
    pub nix_bin_dir: String,
    /// The node's store URI; empty: Nix's default.
    pub store: String,
    /// Parent of the jobs' work dirs on node-local disk.
    pub work_root: String,
    /// Seconds the job waits for its next request or `release`.
    pub idle_timeout_s: u64,
    /// Seconds the job waits for its first request.
    pub request_timeout_s: u64,
    /// The most NAR bytes one build's outputs may bring back from a node.
    pub max_output_size: u64,
    /// Seconds a node's `nix-store --serve` may send (or take) nothing while
    /// nsh-push or nsh-fetch waits for it, before the copy fails (75).
    pub io_timeout_s: u64,
    /// Seconds a tool waits for a lock (a node's push lock, a store path's
    /// lock, the pool's) another process holds, before it fails (75)
    /// naming the lock file.
    pub lock_timeout_s: u64,
}

impl Default for Remote {
    fn default() -> Remote {
        Remote {
            nix_bin_dir: String::new(),
            store: String::new(),
            work_root: "/tmp/nsh".into(),
            idle_timeout_s: 120,
            request_timeout_s: 300,
            max_output_size: DEFAULT_MAX_OUTPUT_SIZE,
            io_timeout_s: 300,
            lock_timeout_s: 3600,
        }
    }
}

/// 64 GiB: larger than most outputs (a CUDA toolkit's NAR is a few GiB),
/// small enough that a node sending endless data stops long before the
/// store's disk is full.
const DEFAULT_MAX_OUTPUT_SIZE: u64 = 64 << 30;
const DEFAULT_MAX_JOBS: u32 = 64;
/// `retries`: a build is tried at most three times.
const DEFAULT_RETRIES: u32 = 2;
/// `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT_S: u64 = 2;
/// `outage_tolerance`.
const DEFAULT_OUTAGE_TOLERANCE_S: u64 = 60;
const DEFAULT_TIME_LIMIT_MIN: u32 = 4 * 60;
const DEFAULT_QUEUE_TIMEOUT_S: u64 = 3600;
const DEFAULT_LINGER_S: u64 = 60;
const DEFAULT_REUSE_TIME_MIN: u32 = 60;

/// A value in the configuration file that is missing or wrong.
#[derive(Debug, Clone)]
pub struct ConfigError {
    /// The file, for the message.
    pub file: String,
    /// The key, dotted (`cluster.main.time_limit`).
    pub key: String,
    /// What is wrong, for a person.
    pub problem: String,
    /// The value that did not parse, when one did not.
    pub value: Option<BadValue>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file, self.key, self.problem)
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.value
            .as_ref()
            .map(|v| v as &(dyn std::error::Error + 'static))
    }
}

/// Every configuration error is bad configuration (exit 78).
impl KindOf for ConfigError {
    fn kind(&self) -> Kind {
        Kind::Config
    }
}

/// Makes the errors of one file: the key and what is wrong with it.
pub(crate) struct Problems<'a> {
    file: &'a str,
    prefix: String,
}

impl Problems<'_> {
    /// `key` is wrong: `problem` says how.
    pub(crate) fn at(&self, key: &str, problem: impl Into<String>) -> Failure {
        Failure::from(ConfigError {
            file: self.file.to_string(),
            key: format!("{}{key}", self.prefix),
            problem: problem.into(),
            value: None,
        })
    }

    /// `key`'s value does not parse.
    pub(crate) fn bad_value(&self, key: &str, value: BadValue) -> Failure {
        Failure::from(ConfigError {
            file: self.file.to_string(),
            key: format!("{}{key}", self.prefix),
            problem: value.to_string(),
            value: Some(value),
        })
    }

    /// The errors of the keys under `prefix` (`cluster.main.`).
    pub(crate) fn under(&self, prefix: &str) -> Problems<'_> {
        Problems {
            file: self.file,
            prefix: format!("{}{prefix}", self.prefix),
        }
    }
}

/// Why a configuration file was the one read (for `nsh-hook --check` and
/// messages): which of the three places named it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    /// `--config FILE`.
    Flag,
    /// `$NSH_CONFIG`.
    Env,
    /// Neither: [`DEFAULT_PATH`].
    Default,
}

impl ConfigSource {
    pub const fn describe(self) -> &'static str {
        match self {
            ConfigSource::Flag => "--config",
            ConfigSource::Env => "$NSH_CONFIG",
            ConfigSource::Default => "the default path",
        }
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

impl Config {
    /// The file to read: `explicit` (`--config`), else `$NSH_CONFIG`, else
    /// `DEFAULT_PATH`.
    pub fn locate(explicit: Option<&Path>) -> PathBuf {
        Config::locate_with_source(explicit).0
    }

    /// [`Config::locate`], and which of the three places named the file.
    pub fn locate_with_source(explicit: Option<&Path>) -> (PathBuf, ConfigSource) {
        if let Some(path) = explicit {
            return (path.to_path_buf(), ConfigSource::Flag);
        }
        match std::env::var_os("NSH_CONFIG") {
            Some(path) if !path.is_empty() => (PathBuf::from(path), ConfigSource::Env),
            _ => (PathBuf::from(DEFAULT_PATH), ConfigSource::Default),
        }
    }

    /// Finds ([`Config::locate`]), reads and validates the configuration.
    pub fn load(explicit: Option<&Path>) -> Result<Config, Failure> {
        let path = Config::locate(explicit);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Failure::config(format!(
                "reading the nsh configuration {}: {e} (give one with --config FILE or $NSH_CONFIG)",
                path.display()
            ))
        })?;
        Config::parse(&path, &text)
    }

    /// Parses and validates configuration text; `path` is only for messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, Failure> {
        let file = path.display().to_string();
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml's message names the line, shows it and says what was
            // expected; keep it, minus its trailing newline.
            let message = format!("{file}: {}", e.to_string().trim_end());
            Failure::caused_by(Kind::Config, message, e)
        })?;
        let problems = Problems {
            file: &file,
            prefix: String::new(),
        };
        if raw.cluster.is_empty() {
            return Err(problems.at(
                "cluster",
                "no cluster is configured (expected at least one [cluster.NAME] table)",
            ));
        }
        let mut clusters = BTreeMap::new();
        for (name, rc) in raw.cluster {
            let cluster =
                cluster::validate(&name, rc, &problems.under(&format!("cluster.{name}.")))?;
            clusters.insert(name, cluster);
        }
        let ssh = ssh_settings(raw.ssh, &problems)?;
        let remote = remote_settings(raw.remote, &problems)?;
        let fetch = fetch_settings(raw.fetch, &problems)?;
        Ok(Config {
            path: path.to_path_buf(),
            clusters,
            ssh,
            remote,
            fetch,
        })
    }

    /// Keeps only the cluster `name` (for a caller that already chose it,
    /// as `nsh-hook` does when it takes a slot on that cluster).
    pub fn restrict_to_cluster(&mut self, name: &str) -> Result<(), Failure> {
        if !self.clusters.contains_key(name) {
            return Err(Failure::config(format!(
                "{}: there is no [cluster.{name}] (asked for by --cluster / NSH_CLUSTER)",
                self.path.display()
            )));
        }
        self.clusters.retain(|n, _| n == name);
        Ok(())
    }

    /// The SSH login user for a cluster's nodes: `[cluster.NAME.ssh] user`,
    /// else `[ssh] user`, else the cluster's `submit_as` or `user` (whose
    /// jobs they are), else `None` (ssh's own default).
    pub fn ssh_user<'a>(&'a self, cluster: &'a Cluster) -> Option<&'a str> {
        cluster
            .submit
            .ssh_user
            .as_deref()
            .or(self.ssh.user.as_deref())
            .or(cluster.submit.submit_as.as_deref())
            .or(cluster.user.as_deref())
    }

    /// The `[ssh]` settings for the cluster `name`, its own
    /// `[cluster.NAME.ssh]` keys over the global ones.
    pub fn ssh_for(&self, name: &str) -> Ssh {
        let mut ssh = self.ssh.clone();
        if let Some(cluster) = self.clusters.get(name) {
            if let Some(user) = &cluster.submit.ssh_user {
                ssh.user = Some(user.clone());
            }
            if let Some(identity) = &cluster.submit.ssh_identity {
                ssh.identity = Some(identity.clone());
            }
        }
        ssh
    }
}

/// `[ssh]`: every option must look like one (`Key=Value`, as for `ssh -o`).
fn ssh_settings(raw: raw::RawSsh, problems: &Problems) -> Result<Ssh, Failure> {
    let ssh = Ssh {
        user: raw.user,
        identity: raw.identity,
        config_file: raw.config_file,
        options: raw.options,
        max_sessions: raw.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS),
        ciphers: ciphers_setting(raw.ciphers.as_deref(), problems)?,
    };
    if ssh.max_sessions == 0 {
        return Err(problems.at("ssh.max_sessions", "0: expected at least 1"));
    }
    for (i, option) in ssh.options.iter().enumerate() {
        if !option.contains('=') || option.starts_with('-') {
            return Err(problems.at(
                &format!("ssh.options[{i}]"),
                format!("{option:?} is not an ssh option; expected \"Key=Value\" (as for ssh -o)"),
            ));
        }
    }
    Ok(ssh)
}

/// `[ssh] ciphers`: "auto" (the default), "" (ssh's own choice) or a cipher
/// list as `ssh -o Ciphers=` takes it.
fn ciphers_setting(raw: Option<&str>, problems: &Problems) -> Result<Ciphers, Failure> {
    let list = match raw {
        None | Some("auto") => return Ok(Ciphers::Auto),
        Some("") => return Ok(Ciphers::SshDefault),
        Some(list) => list,
    };
    let names = list.strip_prefix(['+', '-', '^']).unwrap_or(list);
    let is_name = |name: &str| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "@.-_*?!".contains(c))
    };
    if names.split(',').all(is_name) {
        Ok(Ciphers::List(list.to_string()))
    } else {
        Err(problems.at(
            "ssh.ciphers",
            format!(
                "{list:?}: expected \"auto\", \"\" (ssh's own choice) or a comma-separated \
                 cipher list as for ssh -o Ciphers= (see ssh -Q cipher)"
            ),
        ))
    }
}

/// `[fetch]`: a key file is named by its absolute path.
fn fetch_settings(raw: raw::RawFetch, problems: &Problems) -> Result<Fetch, Failure> {
    if let Some(file) = &raw.secret_key_file {
        if !file.is_absolute() {
            return Err(problems.at(
                "fetch.secret_key_file",
                format!("{:?} is not an absolute path", file.display()),
            ));
        }
    }
    Ok(Fetch {
        secret_key_file: raw.secret_key_file,
    })
}

/// `[remote]`: what the nodes have where, defaults for what is not given.
fn remote_settings(raw: raw::RawRemote, problems: &Problems) -> Result<Remote, Failure> {
    let defaults = Remote::default();
    let seconds = |key: &str, value: Option<raw::NumberOrText>, default: u64| match value {
        None => Ok(default),
        Some(v) => parse_seconds(&v).map_err(|bad| problems.bad_value(key, bad)),
    };
    let remote = Remote {
        nix_bin_dir: raw.nix_bin_dir.unwrap_or(defaults.nix_bin_dir),
        store: raw.store.unwrap_or(defaults.store),
        work_root: raw.work_root.unwrap_or(defaults.work_root),
        idle_timeout_s: seconds(
            "remote.idle_timeout",
            raw.idle_timeout,
            defaults.idle_timeout_s,
        )?,
        request_timeout_s: seconds(
            "remote.request_timeout",
            raw.request_timeout,
            defaults.request_timeout_s,
        )?,
        max_output_size: match raw.max_output_size {
            None => defaults.max_output_size,
            Some(v) => {
                parse_size(&v).map_err(|bad| problems.bad_value("remote.max_output_size", bad))?
            }
        },
        io_timeout_s: seconds("remote.io_timeout", raw.io_timeout, defaults.io_timeout_s)?,
        lock_timeout_s: seconds(
            "remote.lock_timeout",
            raw.lock_timeout,
            defaults.lock_timeout_s,
        )?,
    };
    for (key, value) in [
        ("remote.io_timeout", remote.io_timeout_s),
        ("remote.lock_timeout", remote.lock_timeout_s),
    ] {
        if value == 0 {
            return Err(problems.at(key, "0 would fail every wait; give at least 1 second"));
        }
    }
    if !remote.work_root.starts_with('/') {
        return Err(problems.at(
            "remote.work_root",
            format!("{:?} is not an absolute path", remote.work_root),
        ));
    }
    if !remote.nix_bin_dir.is_empty() && !remote.nix_bin_dir.starts_with('/') {
        return Err(problems.at(
            "remote.nix_bin_dir",
            format!(
                "{:?} is not an absolute path (leave it empty for the node's PATH)",
                remote.nix_bin_dir
            ),
        ));
    }
    Ok(remote)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    const FULL: &str = r#"
[cluster.main]
backend = "rest"
url = "http://slurm-head:6820"
api = "auto"
user = "nixbuild"
token_file = "/etc/nsh/slurm.jwt"
partition = "build"
account = "nix"
qos = "normal"
systems = ["x86_64-linux"]
supported_features = ["big-parallel", "kvm", "gpu"]
mandatory_features = []
max_jobs = 64
time_limit = "4h"
queue_timeout = "10m"
[cluster.main.limits]
max_cpus = 32
max_mem = "128G"
max_time = "1-00:00:00"
default_cpus = 2
default_mem = 4096
allow_gres = true
[cluster.main.features]
kvm = { constraint = "kvm" }
gpu = { gres = "gpu:1", partition = "gpu" }

[cluster.sock]
url = "unix:/run/slurmrestd.sock"
api = "v0.0.41"
systems = ["aarch64-linux"]

[cluster.old]
backend = "cli"
systems = ["x86_64-linux"]
time_limit = 90

[ssh]
user = "nixbuild"
identity = "/etc/nsh/id_ed25519"
config_file = "/etc/nsh/ssh_config"
options = ["StrictHostKeyChecking=yes"]

[remote]
nix_bin_dir = "/nix/var/nix/profiles/default/bin"
store = ""
work_root = "/scratch/nsh"
idle_timeout = 60
request_timeout = "5m"
"#;

    fn parse(text: &str) -> Result<Config, Failure> {
        Config::parse(Path::new("/etc/nsh/nsh.toml"), text)
    }

    fn error(text: &str) -> String {
        let failure = parse(text).unwrap_err();
        assert_eq!(failure.kind, Kind::Config);
        failure.message
    }

    const MINIMAL: &str = "[cluster.c]\nbackend = \"cli\"\nsystems = [\"x86_64-linux\"]\n";

    #[test]
    fn limits_are_bounded_when_the_site_says_nothing() {
        let parse = |text: &str| {
            Config::parse(Path::new("t.toml"), text).unwrap().clusters["c"]
                .limits
                .clone()
        };
        let limits = parse(MINIMAL);
        assert_eq!(limits.max_cpus, Some(64));
        assert_eq!(limits.max_mem_mb, Some(256 * 1024));
        assert_eq!(limits.max_time_min, Some(2 * 24 * 60));
        // A default or a time limit above them raises them to it.
        let limits = parse(&format!(
            "{MINIMAL}time_limit = \"3d\"\n[cluster.c.limits]\ndefault_cpus = 128\ndefault_mem = \"1T\"\n"
        ));
        assert_eq!(limits.max_cpus, Some(128));
        assert_eq!(limits.max_mem_mb, Some(1 << 20));
        assert_eq!(limits.max_time_min, Some(3 * 24 * 60));
        // What the site says is what counts.
        let limits = parse(&format!("{MINIMAL}[cluster.c.limits]\nmax_cpus = 1000\n"));
        assert_eq!(limits.max_cpus, Some(1000));
    }

    #[test]
    fn io_and_lock_timeouts() {
        let config = Config::parse(Path::new("t.toml"), MINIMAL).unwrap();
        assert_eq!(config.remote.io_timeout_s, 300);
        assert_eq!(config.remote.lock_timeout_s, 3600);
        let config = Config::parse(
            Path::new("t.toml"),
            &format!("{MINIMAL}[remote]\nio_timeout = \"2m\"\nlock_timeout = 90\n"),
        )
        .unwrap();
        assert_eq!(config.remote.io_timeout_s, 120);
        assert_eq!(config.remote.lock_timeout_s, 90);
        for key in ["io_timeout", "lock_timeout"] {
            let err = Config::parse(
                Path::new("t.toml"),
                &format!("{MINIMAL}[remote]\n{key} = 0\n"),
            )
            .unwrap_err();
            assert_eq!(err.kind, Kind::Config);
            assert!(
                err.message.contains(&format!("remote.{key}")),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn max_output_size() {
        let config = Config::parse(Path::new("t.toml"), MINIMAL).unwrap();
        assert_eq!(config.remote.max_output_size, 64 << 30);
        for (text, bytes) in [
            ("\"512M\"", 512 << 20),
            ("\"1TiB\"", 1 << 40),
            ("4096", 4096),
        ] {
            let config = Config::parse(
                Path::new("t.toml"),
                &format!("{MINIMAL}[remote]\nmax_output_size = {text}\n"),
            )
            .unwrap();
            assert_eq!(config.remote.max_output_size, bytes, "{text}");
        }
        let err = Config::parse(
            Path::new("t.toml"),
            &format!("{MINIMAL}[remote]\nmax_output_size = \"lots\"\n"),
        )
        .unwrap_err();
        assert!(
            err.message.contains("remote.max_output_size"),
            "{}",
            err.message
        );
    }

    #[test]
    fn https_with_and_without_a_ca_file() {
        let cluster = |extra: &str| {
            let text = format!("[cluster.c]\nurl = \"https://head:6821/\"\nuser = \"u\"\ntoken_file = \"/t\"\nsystems = [\"x\"]\n{extra}");
            Config::parse(Path::new("t.toml"), &text).unwrap().clusters["c"]
                .url
                .clone()
        };
        assert_eq!(
            cluster(""),
            Some(RestUrl::Https {
                base: "https://head:6821".into(),
                ca_file: None
            })
        );
        assert_eq!(
            cluster("ca_file = \"/etc/nsh/ca.pem\"\n"),
            Some(RestUrl::Https {
                base: "https://head:6821".into(),
                ca_file: Some("/etc/nsh/ca.pem".into())
            })
        );
    }

    #[test]
    fn a_full_configuration() {
        let config = parse(FULL).unwrap();
        let main = &config.clusters["main"];
        assert_eq!(main.backend, Backend::Rest);
        assert_eq!(
            main.url,
            Some(RestUrl::Http("http://slurm-head:6820".into()))
        );
        assert_eq!(main.api, ApiChoice::Auto);
        assert_eq!(
            main.token,
            Some(TokenSource::File("/etc/nsh/slurm.jwt".into()))
        );
        assert_eq!(main.time_limit_min, 240);
        assert_eq!(main.queue_timeout_s, 600);
        assert_eq!(
            main.limits,
            Limits {
                max_cpus: Some(32),
                max_mem_mb: Some(128 * 1024),
                max_time_min: Some(24 * 60),
                default_cpus: Some(2),
                default_mem_mb: Some(4096),
                allow_gres: true,
                allow_constraint: false,
            }
        );
        assert_eq!(main.features["gpu"].gres.as_deref(), Some("gpu:1"));
        let sock = &config.clusters["sock"];
        assert_eq!(sock.url, Some(RestUrl::Unix("/run/slurmrestd.sock".into())));
        assert_eq!(sock.api, ApiChoice::Fixed(ApiVersion::V0041));
        assert_eq!(sock.token, None);
        assert_eq!(config.clusters["old"].time_limit_min, 90);
        assert_eq!(config.remote.request_timeout_s, 300);
        assert_eq!(config.remote.idle_timeout_s, 60);
        assert_eq!(config.ssh_user(main), Some("nixbuild"));
    }

    #[test]
    fn ssh_settings_per_cluster_override_the_global_ones() {
        let text = "[cluster.a]\nbackend = \"cli\"\nsystems = [\"x\"]\nsubmit_as = \"builder\"\n\
                    [cluster.b]\nbackend = \"cli\"\nsystems = [\"x\"]\n\
                    [cluster.b.ssh]\nuser = \"other\"\nidentity = \"/etc/nsh/id_b\"\n\
                    [ssh]\nidentity = \"/etc/nsh/id\"\noptions = [\"A=b\"]\n";
        let config = parse(text).unwrap();
        let (a, b) = (&config.clusters["a"], &config.clusters["b"]);
        // No [ssh] user: the account that owns the jobs logs in.
        assert_eq!(config.ssh_user(a), Some("builder"));
        assert_eq!(config.ssh_user(b), Some("other"));
        assert_eq!(config.ssh_for("a").identity, Some("/etc/nsh/id".into()));
        let for_b = config.ssh_for("b");
        assert_eq!(for_b.identity, Some("/etc/nsh/id_b".into()));
        assert_eq!(for_b.user.as_deref(), Some("other"));
        assert_eq!(for_b.options, ["A=b"]);
        assert_eq!(for_b.ciphers, Ciphers::Auto);
        assert_eq!(a.submit.submit_as.as_deref(), Some("builder"));
        assert!(!a.submit.allow_root);
        assert_eq!((a.priority, b.priority), (0, 0));
    }

    #[test]
    fn ssh_ciphers_are_auto_ssh_s_own_or_a_list() {
        let ciphers = |value: &str| {
            parse(&format!("{MINIMAL}[ssh]\nciphers = \"{value}\"\n"))
                .unwrap()
                .ssh
                .ciphers
        };
        assert_eq!(ciphers("auto"), Ciphers::Auto);
        assert_eq!(ciphers(""), Ciphers::SshDefault);
        assert_eq!(
            ciphers("^aes256-gcm@openssh.com,aes128-ctr"),
            Ciphers::List("^aes256-gcm@openssh.com,aes128-ctr".into())
        );
    }

    #[test]
    fn restricting_to_a_cluster() {
        let text = "[cluster.a]\nbackend = \"cli\"\nsystems = [\"x\"]\n\
                    [cluster.b]\nbackend = \"cli\"\nsystems = [\"x\"]\n";
        let mut config = parse(text).unwrap();
        config.restrict_to_cluster("b").unwrap();
        assert_eq!(config.clusters.keys().collect::<Vec<_>>(), ["b"]);
        let err = config.restrict_to_cluster("c").unwrap_err();
        assert_eq!(err.kind, Kind::Config);
        assert!(err.message.contains("[cluster.c]"), "{err}");
    }

    #[test]
    fn defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.remote, Remote::default());
        assert_eq!(config.ssh, Ssh::default());
        let c = &config.clusters["c"];
        assert_eq!(c.max_jobs, DEFAULT_MAX_JOBS);
        assert_eq!(c.time_limit_min, DEFAULT_TIME_LIMIT_MIN);
        assert_eq!(c.queue_timeout_s, DEFAULT_QUEUE_TIMEOUT_S);
    }

    #[test]
    fn the_example_in_docs_is_valid() {
        let text = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/nsh.toml.example"
        ));
        let config = parse(text).unwrap();
        assert!(!config.clusters.is_empty());
        // The hook's own reading of the same file ([hook]).
        crate::hook::config::HookConfig::parse(Path::new("nsh.toml.example"), text).unwrap();
    }

    #[test]
    fn time_limits() {
        for (text, minutes) in [
            ("90", Some(90)),
            ("90m", Some(90)),
            ("4h", Some(240)),
            ("2d", Some(2880)),
            ("30s", Some(1)),
            ("10:30", Some(11)),
            ("1:00:00", Some(60)),
            ("1-00:00:00", Some(1440)),
            ("1-2", Some(1560)),
            ("1-2:30", Some(1590)),
            ("", None),
            ("4 h", None),
            ("h", None),
            ("1:2:3:4", None),
            ("-5", None),
        ] {
            assert_eq!(parse_minutes_text(text), minutes, "{text:?}");
        }
    }

    #[test]
    fn memory() {
        assert_eq!(parse_mem_mb_text("2048"), Some(2048));
        assert_eq!(parse_mem_mb_text("16G"), Some(16384));
        assert_eq!(parse_mem_mb_text("1t"), Some(1 << 20));
        assert_eq!(parse_mem_mb_text("1.5G"), None);
        assert_eq!(parse_mem_mb_text("G"), None);
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("eyJhbGciOi.secret");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(format!("{secret}"), "<redacted>");
        assert_eq!(secret.expose(), "eyJhbGciOi.secret");
    }

    #[test]
    fn tokens_from_files_and_commands() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jwt");
        std::fs::write(&file, "SLURM_JWT=abc.def\n").unwrap();
        assert_eq!(
            TokenSource::File(file.clone()).read().unwrap().expose(),
            "abc.def"
        );
        std::fs::write(&file, "  xyz \n\n").unwrap();
        assert_eq!(TokenSource::File(file).read().unwrap().expose(), "xyz");
        let cmd = TokenSource::Command(vec!["echo".into(), "SLURM_JWT=t0k".into()]);
        assert_eq!(cmd.read().unwrap().expose(), "t0k");
        let failing = TokenSource::Command(vec!["false".into()])
            .read()
            .unwrap_err();
        assert_eq!(failing.kind, Kind::Transient);
        let missing = TokenSource::File(dir.path().join("nope"))
            .read()
            .unwrap_err();
        assert_eq!(missing.kind, Kind::Config);
        assert!(missing.message.contains("nope"), "{}", missing.message);
    }

    #[test]
    fn locate_prefers_the_explicit_path() {
        assert_eq!(
            Config::locate(Some(Path::new("/x/nsh.toml"))),
            PathBuf::from("/x/nsh.toml")
        );
    }

    #[test]
    fn a_missing_file_is_a_config_error_naming_it() {
        let failure = Config::load(Some(Path::new("/nonexistent/nsh.toml"))).unwrap_err();
        assert_eq!(failure.kind, Kind::Config);
        assert!(failure.message.contains("/nonexistent/nsh.toml"));
    }

    #[test]
    fn errors_name_the_file_the_key_and_what_is_expected() {
        let cases: &[(&str, String)] = &[
            ("typo_in_a_cluster_key", format!("{MINIMAL}partiton = \"x\"\n")),
            ("typo_in_a_section", format!("{MINIMAL}[remotee]\n")),
            ("wrong_type", format!("{MINIMAL}max_jobs = \"many\"\n")),
            ("no_cluster", "[ssh]\nuser = \"u\"\n".into()),
            ("bad_backend", "[cluster.c]\nbackend = \"ssh\"\nsystems = [\"x\"]\n".into()),
            ("rest_without_url", "[cluster.c]\nsystems = [\"x\"]\n".into()),
            (
                "unknown_api",
                "[cluster.c]\nurl = \"unix:/s\"\napi = \"v0.0.37\"\nsystems = [\"x\"]\n".into(),
            ),
            ("no_systems", "[cluster.c]\nbackend = \"cli\"\n".into()),
            ("bad_time_limit", format!("{MINIMAL}time_limit = \"4 hours\"\n")),
            ("bad_queue_timeout", format!("{MINIMAL}queue_timeout = -1\n")),
            (
                "mandatory_not_supported",
                format!("{MINIMAL}mandatory_features = [\"kvm\"]\n"),
            ),
            (
                "feature_map_not_supported",
                format!("{MINIMAL}[cluster.c.features]\nkvm = {{ constraint = \"kvm\" }}\n"),
            ),
            (
                "feature_map_unknown_key",
                format!("{MINIMAL}supported_features = [\"kvm\"]\n[cluster.c.features]\nkvm = {{ constriant = \"kvm\" }}\n"),
            ),
            (
                "feature_map_option_injection",
                format!("{MINIMAL}supported_features = [\"kvm\"]\n[cluster.c.features]\nkvm = {{ constraint = \"--wrap=x\" }}\n"),
            ),
            ("bad_memory", format!("{MINIMAL}[cluster.c.limits]\nmax_mem = \"lots\"\n")),
            (
                "default_above_max",
                format!("{MINIMAL}[cluster.c.limits]\nmax_cpus = 4\ndefault_cpus = 8\n"),
            ),
            (
                "time_limit_above_max",
                format!("{MINIMAL}time_limit = \"8h\"\n[cluster.c.limits]\nmax_time = \"4h\"\n"),
            ),
            ("relative_work_root", format!("{MINIMAL}[remote]\nwork_root = \"tmp\"\n")),
            ("bad_ssh_option", format!("{MINIMAL}[ssh]\noptions = [\"-v\"]\n")),
            (
                "bad_ssh_ciphers",
                format!("{MINIMAL}[ssh]\nciphers = \"aes128-gcm -c none\"\n"),
            ),
            (
                "submit_as_on_rest",
                "[cluster.c]\nurl = \"unix:/s\"\nsystems = [\"x\"]\nsubmit_as = \"u\"\n".into(),
            ),
            ("submit_as_option", format!("{MINIMAL}submit_as = \"-u\"\n")),
            (
                "relative_cluster_identity",
                format!("{MINIMAL}[cluster.c.ssh]\nidentity = \"id\"\n"),
            ),
        ];
        snapshot_errors(cases);
    }

    #[test]
    fn address_and_token_errors_name_the_key() {
        let cases: &[(&str, String)] = &[
            (
                "https_without_token",
                "[cluster.c]\nurl = \"https://h:6820\"\nuser = \"u\"\nsystems = [\"x\"]\n".into(),
            ),
            (
                "ca_file_without_https",
                "[cluster.c]\nurl = \"unix:/s\"\nca_file = \"/etc/ca.pem\"\nsystems = [\"x\"]\n".into(),
            ),
            (
                "relative_ca_file",
                "[cluster.c]\nurl = \"https://h\"\nca_file = \"ca.pem\"\nsystems = [\"x\"]\n".into(),
            ),
            (
                "http_without_token",
                "[cluster.c]\nurl = \"http://h:6820\"\nuser = \"u\"\nsystems = [\"x\"]\n".into(),
            ),
            (
                "token_without_user",
                "[cluster.c]\nurl = \"http://h:6820\"\ntoken_file = \"/t\"\nsystems = [\"x\"]\n".into(),
            ),
            (
                "both_token_sources",
                "[cluster.c]\nurl = \"http://h:6820\"\nuser = \"u\"\ntoken_file = \"/t\"\ntoken_command = [\"scontrol\"]\nsystems = [\"x\"]\n".into(),
            ),
        ];
        snapshot_errors(cases);
    }

    /// Each case's error starts with the file and matches its snapshot.
    fn snapshot_errors(cases: &[(&str, String)]) {
        for (name, text) in cases {
            let message = error(text);
            assert!(
                message.starts_with("/etc/nsh/nsh.toml: "),
                "{name}: {message}"
            );
            insta::assert_snapshot!(*name, message);
        }
    }

    #[test]
    fn debug_output_never_contains_a_token() {
        // The config holds only where the token is; make sure a Debug dump of
        // a loaded config shows the path and nothing read from it.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jwt");
        std::fs::write(&file, "SLURM_JWT=very-secret").unwrap();
        let text = format!(
            "[cluster.c]\nurl = \"http://h:1\"\nuser = \"u\"\ntoken_file = \"{}\"\nsystems = [\"x\"]\n",
            file.display()
        );
        let config = parse(&text).unwrap();
        let secret = config.clusters["c"].token.as_ref().unwrap().read().unwrap();
        let dump = format!("{config:?} {secret:?} {secret}");
        assert!(!dump.contains("very-secret"), "{dump}");
    }

    proptest::proptest! {
        /// A configuration that does not parse is an error naming the file,
        /// never a panic: arbitrary text, and the full example with a few
        /// characters changed (which reaches every key's validation).
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            let _ = Config::parse(Path::new("t.toml"), &text);
        }

        #[test]
        fn a_mutated_configuration_never_panics(
            flips in proptest::collection::vec((0usize..FULL.len(), proptest::char::any()), 1..6),
        ) {
            let mut chars: Vec<char> = FULL.chars().collect();
            for (at, c) in flips {
                let at = at % chars.len();
                chars[at] = c;
            }
            let text: String = chars.into_iter().collect();
            if let Err(failure) = Config::parse(Path::new("t.toml"), &text) {
                proptest::prop_assert!(failure.message.contains("t.toml"), "{}", failure.message);
            }
        }
    }
}
