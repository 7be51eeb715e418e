//! A Slurm client for one configured cluster, whichever backend it uses.

use std::time::Instant;

use super::http::{self, Method};
use super::model::{JobInfo, JobRequest, NodeInfo, PartitionInfo};
use super::{cli, rest, ApiVersion};
use crate::config::{ApiChoice, Backend, Cluster, RestUrl, TokenSource};
use crate::error::Failure;
use crate::log_debug;

/// Talks to one cluster's Slurm.
#[derive(Debug)]
pub enum Slurm {
    Rest(RestClient),
    /// `sbatch` & co., run as the submitter.
    Cli(cli::Submitter),
}

impl Slurm {
    /// Connects to the cluster: for REST, settles the API version (asking
    /// the server when `api = "auto"`) and learns the server's release.
    ///
    /// Refuses (exit 78) to submit as root unless `allow_root = true`: a
    /// CLI cluster run by root (the hook) without `submit_as`, a REST
    /// cluster whose `user` is root, or whose `token_command` mints root's
    /// token (no `username=`) when run by root.
    pub fn connect(cluster: &Cluster) -> Result<Slurm, Failure> {
        let root = crate::sys::process::euid() == 0;
        refuse_root(cluster, root)?;
        match cluster.backend {
            Backend::Cli => Ok(Slurm::Cli(submitter(cluster, root)?)),
            Backend::Rest => Ok(Slurm::Rest(RestClient::connect(cluster)?)),
        }
    }

    /// The cluster's Slurm as an earlier tool found it (a ticket's
    /// `alloc.api` and `alloc.slurm`): nothing is asked of the server until
    /// a job is (no version probe per build). Without both, or with a
    /// version this nsh does not speak, as [`Slurm::connect`].
    pub fn resume(
        cluster: &Cluster,
        api: Option<&str>,
        release: Option<&str>,
    ) -> Result<Slurm, Failure> {
        let known = api.and_then(|a| a.parse::<ApiVersion>().ok()).zip(release);
        match (cluster.backend, known) {
            (Backend::Rest, Some((version, release))) => {
                let mut client = RestClient::unconnected(cluster)?;
                client.version = version;
                client.release = Some(release.to_string());
                Ok(Slurm::Rest(client))
            }
            _ => Slurm::connect(cluster),
        }
    }

    pub fn submit(&self, req: &JobRequest) -> Result<u64, Failure> {
        match self {
            Slurm::Rest(client) => client.submit(req),
            Slurm::Cli(submitter) => cli::submit(submitter, req),
        }
    }

    pub fn job(&self, job: u64) -> Result<JobInfo, Failure> {
        match self {
            Slurm::Rest(client) => client.job(job),
            Slurm::Cli(_) => cli::job(job),
        }
    }

    /// The jobs whose comment is `tag` (nsh's `nsh:<nonce>`): a job whose
    /// submit reply was lost, found again.
    pub fn tagged(&self, tag: &str) -> Result<Vec<u64>, Failure> {
        match self {
            Slurm::Rest(client) => client.tagged(tag),
            Slurm::Cli(submitter) => cli::tagged(submitter, tag),
        }
    }

    pub fn cancel(&self, job: u64) -> Result<(), Failure> {
        match self {
            Slurm::Rest(client) => client.cancel(job),
            Slurm::Cli(submitter) => cli::cancel(submitter, job),
        }
    }

    /// The slurmrestd API version in use (`None` for the CLI).
    pub fn api_version(&self) -> Option<ApiVersion> {
        match self {
            Slurm::Rest(client) => Some(client.version),
            Slurm::Cli(_) => None,
        }
    }

    /// The server's Slurm release, when it said (slurmrestd's ping).
    pub fn release(&self) -> Option<&str> {
        match self {
            Slurm::Rest(client) => client.release.as_deref(),
            Slurm::Cli(_) => None,
        }
    }

    /// Every node (for `nsh-hook --check`). Through slurmrestd this is the
    /// first request slurmctld authenticates: from Slurm 23.02 on, a ping
    /// passes with any token.
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, Failure> {
        match self {
            Slurm::Rest(client) => client.nodes(),
            Slurm::Cli(_) => cli::nodes(),
        }
    }

    /// A partition; `None` when Slurm does not know it.
    pub fn partition(&self, name: &str) -> Result<Option<PartitionInfo>, Failure> {
        match self {
            Slurm::Rest(client) => client.partition(name),
            Slurm::Cli(_) => cli::partition(name),
        }
    }

    /// Whether the accounting database knows an account (`what` =
    /// `account`) or a `qos`; `None` when it cannot be asked (no slurmdbd).
    pub fn slurmdb_entry(&self, what: &str, name: &str) -> Result<Option<bool>, Failure> {
        match self {
            Slurm::Rest(client) => client.slurmdb_entry(what, name),
            Slurm::Cli(_) => cli::slurmdb_entry(what, name),
        }
    }
}

/// Who runs sbatch for a CLI cluster: `submit_as` through `runuser` when
/// this process is root, nobody else when it already is that user.
fn submitter(cluster: &Cluster, root: bool) -> Result<cli::Submitter, Failure> {
    let Some(user) = &cluster.submit.submit_as else {
        return Ok(cli::Submitter::default());
    };
    let me = crate::sys::process::user_name();
    if &me == user {
        return Ok(cli::Submitter::default());
    }
    if !root {
        return Err(Failure::config(format!(
            "cluster.{}.submit_as = {user:?}: this process runs as {me}, which cannot switch to {user} (run it as {user}, or as root, which switches with runuser)",
            cluster.name
        )));
    }
    Ok(cli::Submitter {
        run_as: Some(user.clone()),
    })
}

/// Whether jobs would be root's without the admin having said so.
fn refuse_root(cluster: &Cluster, root: bool) -> Result<(), Failure> {
    if cluster.submit.allow_root {
        return Ok(());
    }
    let name = &cluster.name;
    let why = match (cluster.backend, &cluster.token) {
        (Backend::Cli, _) if root && cluster.submit.submit_as.is_none() => format!(
            "cluster.{name}.submit_as: not set, and this process runs as root, so sbatch would submit the jobs as root; set submit_as = \"<build account>\" (or allow_root = true to submit as root on purpose)"
        ),
        (Backend::Cli, _) if cluster.submit.submit_as.as_deref() == Some("root") => format!(
            "cluster.{name}.submit_as = \"root\": jobs would be root's; set allow_root = true to mean it"
        ),
        (Backend::Rest, _) if cluster.user.as_deref() == Some("root") => format!(
            "cluster.{name}.user = \"root\": jobs would be root's; set allow_root = true to mean it"
        ),
        (Backend::Rest, Some(TokenSource::Command(argv)))
            if root && !argv.iter().any(|a| a.starts_with("username=")) =>
        {
            format!(
                "cluster.{name}.token_command = {argv:?}: run as root without username=, it mints root's token (jobs would be root's from Slurm 23.02 on); add \"username=<build account>\" (or allow_root = true)"
            )
        }
        _ => return Ok(()),
    };
    Err(Failure::config(why))
}

/// A server whose versions are all unknown to nsh: a configuration matter
/// (upgrade nsh, or point `url` at a server that speaks an older version).
fn none_known(url: &RestUrl, offered: &[String]) -> Failure {
    let known: Vec<String> = ApiVersion::ALL.iter().map(ToString::to_string).collect();
    Failure::config(format!(
        "slurmrestd at {url} offers API {}; this nsh speaks {}",
        offered.join(", "),
        known.join(", ")
    ))
}

/// slurmrestd, at one address, speaking one API version.
#[derive(Debug)]
pub struct RestClient {
    pub url: RestUrl,
    pub version: ApiVersion,
    /// The server's Slurm release (`22.05.8`), which decides the auth headers.
    pub release: Option<String>,
    user: Option<String>,
    token: Option<TokenSource>,
    /// The server refused the user name header next to the token.
    token_only: std::cell::Cell<bool>,
}

impl RestClient {
    /// The client of `cluster`, its version not settled yet.
    fn unconnected(cluster: &Cluster) -> Result<RestClient, Failure> {
        let url = cluster.url.clone().ok_or_else(|| {
            Failure::config(format!(
                "cluster {}: the rest backend needs a url",
                cluster.name
            ))
        })?;
        Ok(RestClient {
            url,
            version: ApiVersion::V0038,
            release: None,
            user: cluster.user.clone(),
            token: cluster.token.clone(),
            token_only: std::cell::Cell::new(false),
        })
    }

    pub fn connect(cluster: &Cluster) -> Result<RestClient, Failure> {
        let mut client = RestClient::unconnected(cluster)?;
        let started = Instant::now();
        client.version = match cluster.api {
            ApiChoice::Fixed(v) => v,
            ApiChoice::Auto => client.negotiate()?,
        };
        // The ping tells the release (for the auth headers) and that the
        // server and slurmctld answer, before anything is submitted. The
        // token it checks only on 22.05: from 23.02 on a ping passes with any
        // token (seen on 24.11 and 26.05), and a refused one shows at the
        // first request slurmctld authenticates (HTTP 511, error 1007).
        let ping = client.call(Method::Get, &rest::ping_path(client.version), None)?;
        let value = rest::check(
            &format!("pinging slurmrestd ({})", client.version),
            ping.status,
            &ping.body,
        )
        .map_err(|failure| {
            // slurmrestd 22.05 does not check tokens itself: slurmctld
            // refuses a bad one, and the ping then fails like this.
            let release = serde_json::from_str(&ping.body)
                .ok()
                .and_then(|v| rest::server_release(&v));
            if ping.status == 500 && release.is_some_and(|r| r.starts_with("22.05")) {
                Failure::from(TokenRefused(format!(
                    "{} (Slurm 22.05 answers this way when slurmctld refuses the token: check the cluster's token_file/token_command and user)",
                    failure.message
                )))
            } else {
                failure
            }
        })?;
        client.release = rest::server_release(&value);
        log_debug!(
            "slurmrestd at {}: Slurm {}, API {} ({} ms)",
            client.url,
            client.release.as_deref().unwrap_or("?"),
            client.version,
            started.elapsed().as_millis()
        );
        Ok(client)
    }

    /// The newest API version both sides speak: from the server's OpenAPI
    /// document, else by pinging each version, newest first.
    fn negotiate(&self) -> Result<ApiVersion, Failure> {
        match self.call(Method::Get, rest::OPENAPI_PATH, None) {
            Ok(response) if response.status == 200 => {
                if let Some(v) = rest::choose_version(&rest::offered_versions(&response.body)) {
                    return Ok(v);
                }
                let offered = rest::offered_version_names(&response.body);
                if !offered.is_empty() {
                    return Err(none_known(&self.url, &offered));
                }
            }
            Ok(response) if matches!(response.status, 401 | 403) => {
                rest::check(
                    "asking slurmrestd for its API versions",
                    response.status,
                    &response.body,
                )?;
            }
            Ok(_) => {}
            Err(failure) => return Err(failure),
        }
        for v in ApiVersion::ALL.into_iter().rev() {
            let response = self.call(Method::Get, &rest::ping_path(v), None)?;
            if response.status == 404 {
                continue;
            }
            rest::check(
                &format!("pinging slurmrestd ({v})"),
                response.status,
                &response.body,
            )?;
            return Ok(v);
        }
        Err(Failure::transient(format!(
            "slurmrestd at {} offers none of the API versions nsh speaks ({} … {})",
            self.url,
            ApiVersion::V0038,
            ApiVersion::V0045
        )))
    }

    fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> Result<http::Response, Failure> {
        let Some(source) = &self.token else {
            return http::request(&self.url, method, path, &[], body);
        };
        // Re-read per call: tokens are rotated under a running nsh.
        let token = source.read()?;
        let user = if self.token_only.get() {
            None
        } else {
            self.user.as_deref()
        };
        let headers = rest::auth_headers(self.release.as_deref(), user, &token);
        let response = http::request(&self.url, method, path, &headers, body)?;
        // Until the release is known both headers go out, as 22.05 needs;
        // should a later server refuse the pair, the token alone is tried
        // (and kept to).
        let sent_user = headers.iter().any(|(name, _)| *name == "X-SLURM-USER-NAME");
        if response.status == 401 && sent_user {
            self.token_only.set(true);
            let headers = rest::auth_headers(self.release.as_deref(), None, &token);
            return http::request(&self.url, method, path, &headers, body);
        }
        Ok(response)
    }

    pub fn submit(&self, req: &JobRequest) -> Result<u64, Failure> {
        let body = rest::submit_body(self.version, req).to_string();
        let response = self.call(Method::Post, &rest::submit_path(self.version), Some(&body))?;
        rest::parse_submit(response.status, &response.body)
    }

    pub fn tagged(&self, tag: &str) -> Result<Vec<u64>, Failure> {
        let response = self.call(Method::Get, &rest::jobs_path(self.version), None)?;
        rest::parse_tagged(response.status, &response.body, tag)
    }

    pub fn job(&self, job: u64) -> Result<JobInfo, Failure> {
        let response = self.call(Method::Get, &rest::job_path(self.version, job), None)?;
        rest::parse_job(job, response.status, &response.body)
    }

    pub fn cancel(&self, job: u64) -> Result<(), Failure> {
        let response = self.call(Method::Delete, &rest::job_path(self.version, job), None)?;
        rest::parse_cancel(job, response.status, &response.body)
    }

    pub fn nodes(&self) -> Result<Vec<NodeInfo>, Failure> {
        let response = self.call(Method::Get, &rest::nodes_path(self.version), None)?;
        rest::parse_nodes(response.status, &response.body)
            .map_err(|f| self.explain_refusal(f, response.status))
    }

    pub fn partition(&self, name: &str) -> Result<Option<PartitionInfo>, Failure> {
        let path = rest::partition_path(self.version, name);
        let response = self.call(Method::Get, &path, None)?;
        rest::parse_partition(name, response.status, &response.body)
            .map_err(|f| self.explain_refusal(f, response.status))
    }

    pub fn slurmdb_entry(&self, what: &str, name: &str) -> Result<Option<bool>, Failure> {
        if self.version == ApiVersion::V0038 {
            return Ok(None);
        }
        let response = self.call(
            Method::Get,
            &rest::slurmdb_path(self.version, what, name),
            None,
        )?;
        rest::parse_slurmdb_entry(what, name, response.status, &response.body)
    }

    /// A refused token, as each release says it: 22.05 answers 500 (with
    /// "Unspecified error"), 24.11 and later 511 "Protocol authentication
    /// error".
    fn explain_refusal(&self, failure: Failure, status: u16) -> Failure {
        let slurm_says = failure
            .cause::<rest::AnswerError>()
            .map_or("", |answer| answer.slurm_says.as_str());
        let refused = status == 511
            || slurm_says.contains("Protocol authentication error")
            || (status == 500
                && self
                    .release
                    .as_deref()
                    .is_some_and(|r| r.starts_with("22.05"))
                && slurm_says.contains("Unspecified error"));
        if refused && self.token.is_some() {
            Failure::from(TokenRefused(format!(
                "{} (slurmctld refused the token: check the cluster's token_file/token_command and user)",
                failure.message
            )))
        } else {
            failure
        }
    }
}

/// slurmctld (or slurmrestd) refused the token, as the release in use says
/// it; transient for a stage (the token may be renewed), a configuration
/// problem for `nsh-hook --check`.
#[derive(Debug, Clone)]
pub struct TokenRefused(String);

impl std::fmt::Display for TokenRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TokenRefused {}

impl crate::error::KindOf for TokenRefused {
    fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::Transient
    }
}

/// Whether `failure` is a refused token (whatever the release's way of
/// saying it).
#[must_use]
pub fn token_refused(failure: &Failure) -> bool {
    failure.cause::<TokenRefused>().is_some()
        || failure
            .cause::<rest::AnswerError>()
            .is_some_and(rest::AnswerError::token_refused)
}

/// Whether `failure` is the token's: refused, or not to be had.
#[must_use]
pub fn token_trouble(failure: &Failure) -> bool {
    token_refused(failure) || failure.cause::<crate::config::TokenError>().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    fn server(socket: &Path, routes: Vec<(&'static str, u16, String)>) -> Arc<Mutex<Vec<String>>> {
        let routes = routes
            .into_iter()
            .map(|(r, status, body)| (r, vec![(status, body)]))
            .collect();
        crate::slurm::test_server::serve(socket, routes)
    }

    fn cluster(socket: &Path, extra: &str) -> Cluster {
        let text = format!(
            "[cluster.c]\nurl = \"unix:{}\"\nsystems = [\"x86_64-linux\"]\n{extra}",
            socket.display()
        );
        Config::parse(Path::new("t.toml"), &text).unwrap().clusters["c"].clone()
    }

    const PING_2511: &str = r#"{"meta":{"slurm":{"release":"25.11.2"}},"errors":[],"pings":[]}"#;

    #[test]
    fn without_an_openapi_document_the_newest_answering_ping_wins() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let seen = server(
            &socket,
            vec![
                ("GET /slurm/v0.0.43/ping/", 200, PING_2511.into()),
                ("GET /slurm/v0.0.42/ping/", 200, PING_2511.into()),
            ],
        );
        let client = RestClient::connect(&cluster(&socket, "")).unwrap();
        assert_eq!(client.version, ApiVersion::V0043);
        assert_eq!(client.release.as_deref(), Some("25.11.2"));
        let seen = seen.lock().unwrap();
        let lines: Vec<&str> = seen.iter().map(|h| h.lines().next().unwrap()).collect();
        assert_eq!(
            lines,
            [
                "GET /openapi/v3 HTTP/1.1",
                "GET /slurm/v0.0.45/ping/ HTTP/1.1",
                "GET /slurm/v0.0.44/ping/ HTTP/1.1",
                "GET /slurm/v0.0.43/ping/ HTTP/1.1",
                "GET /slurm/v0.0.43/ping/ HTTP/1.1",
            ]
        );
    }

    #[test]
    fn the_openapi_document_decides_and_tokens_go_by_release() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let token = dir.path().join("jwt");
        std::fs::write(&token, "SLURM_JWT=tok\n").unwrap();
        let doc = r#"{"paths":{"\/slurm\/v0.0.41\/ping\/":{},"\/slurm\/v0.0.42\/ping\/":{}}}"#;
        let seen = server(
            &socket,
            vec![
                ("GET /openapi/v3", 200, doc.into()),
                ("GET /slurm/v0.0.42/ping/", 200, PING_2511.into()),
                ("GET /slurm/v0.0.42/job/7", 200, r#"{"jobs":[{"job_id":7,"job_state":["PENDING"],"state_reason":"Priority"}],"errors":[]}"#.into()),
            ],
        );
        let extra = format!("user = \"u\"\ntoken_file = \"{}\"\n", token.display());
        let client = RestClient::connect(&cluster(&socket, &extra)).unwrap();
        assert_eq!(client.version, ApiVersion::V0042);
        let job = client.job(7).unwrap();
        assert_eq!(job.reason.as_deref(), Some("Priority"));
        let seen = seen.lock().unwrap();
        // Before the release is known: user and token; after (25.11): token only.
        assert!(
            seen[0].contains("X-SLURM-USER-NAME: u\r\n")
                && seen[0].contains("X-SLURM-USER-TOKEN: tok\r\n")
        );
        let last = seen.last().unwrap();
        assert!(last.starts_with("GET /slurm/v0.0.42/job/7 "));
        assert!(
            last.contains("X-SLURM-USER-TOKEN: tok\r\n") && !last.contains("X-SLURM-USER-NAME")
        );
    }

    /// A later tool resumes the connection from the ticket: no version
    /// probe and no ping, only the job query it needs, with the headers of
    /// the release the ticket names; without the ticket's words, it asks.
    #[test]
    fn a_resumed_connection_asks_nothing_until_a_job_is_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let token = dir.path().join("jwt");
        std::fs::write(&token, "SLURM_JWT=tok\n").unwrap();
        let seen = server(
            &socket,
            vec![
                ("GET /slurm/v0.0.42/ping/", 200, PING_2511.into()),
                (
                    "GET /slurm/v0.0.42/job/7",
                    200,
                    r#"{"jobs":[{"job_id":7,"job_state":["RUNNING"]}],"errors":[]}"#.into(),
                ),
            ],
        );
        let extra = format!("user = \"u\"\ntoken_file = \"{}\"\n", token.display());
        let c = cluster(&socket, &extra);
        let slurm = Slurm::resume(&c, Some("v0.0.42"), Some("25.11.2")).unwrap();
        assert!(seen.lock().unwrap().is_empty(), "nothing asked yet");
        slurm.job(7).unwrap();
        {
            let seen = seen.lock().unwrap();
            assert_eq!(seen.len(), 1, "{seen:?}");
            assert!(seen[0].starts_with("GET /slurm/v0.0.42/job/7 "));
            assert!(
                !seen[0].contains("X-SLURM-USER-NAME"),
                "25.11: the token alone"
            );
        }
        // An unknown version in the ticket: connected as usual.
        let unknown = Slurm::resume(&c, Some("v9.9.9"), Some("25.11.2"));
        assert!(unknown.is_ok());
        let seen = seen.lock().unwrap();
        assert!(seen[1].starts_with("GET /openapi/v3 "), "{seen:?}");
    }

    #[test]
    fn a_server_refusing_the_user_header_gets_the_token_alone() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let token = dir.path().join("jwt");
        std::fs::write(&token, "tok").unwrap();
        let doc = r#"{"paths":{"/slurm/v0.0.44/ping/":{}}}"#;
        let seen = crate::slurm::test_server::serve(
            &socket,
            vec![
                (
                    "GET /openapi/v3",
                    vec![(401, "Authentication failure".into()), (200, doc.into())],
                ),
                ("GET /slurm/v0.0.44/ping/", vec![(200, PING_2511.into())]),
            ],
        );
        let extra = format!("user = \"u\"\ntoken_file = \"{}\"\n", token.display());
        let client = RestClient::connect(&cluster(&socket, &extra)).unwrap();
        assert_eq!(client.version, ApiVersion::V0044);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        assert!(seen[0].contains("X-SLURM-USER-NAME: u"));
        assert!(
            !seen[1].contains("X-SLURM-USER-NAME") && seen[1].contains("X-SLURM-USER-TOKEN: tok")
        );
        assert!(!seen[2].contains("X-SLURM-USER-NAME"));
    }

    #[test]
    fn a_server_offering_only_unknown_versions_is_a_config_error_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let doc = r#"{"paths":{"\/slurm\/v0.0.46\/ping\/":{},"\/slurm\/v0.0.47\/ping\/":{}}}"#;
        server(&socket, vec![("GET /openapi/v3", 200, doc.into())]);
        let failure = RestClient::connect(&cluster(&socket, "")).unwrap_err();
        assert_eq!(failure.kind, crate::Kind::Config);
        assert!(
            failure
                .message
                .contains("offers API v0.0.46, v0.0.47; this nsh speaks v0.0.38, v0.0.39"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn a_fixed_version_the_server_lacks_is_transient() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        server(&socket, vec![]);
        let failure = RestClient::connect(&cluster(&socket, "api = \"v0.0.40\"\n")).unwrap_err();
        assert_eq!(failure.kind, crate::Kind::Transient);
        assert!(failure.message.contains("HTTP 404"), "{}", failure.message);
        let failure = RestClient::connect(&cluster(&socket, "")).unwrap_err();
        assert!(
            failure.message.contains("offers none of the API versions"),
            "{}",
            failure.message
        );
    }
}
