//! HTTP to slurmrestd: ureq for `http://` and `https://` URLs (rustls), and
//! for `unix:/path` sockets a small HTTP/1.1 client (one request per
//! connection, `Connection: close`), which is all slurmrestd's socket needs.
//!
//! The token goes to slurmrestd and nowhere else: no proxy from the
//! environment (`HTTP(S)_PROXY`, `ALL_PROXY`, often set for nix-daemon), no
//! redirect followed (a redirect is refused and named). Over `https://` the
//! server is checked against `ca_file`, or the system's CA bundle.
//!
//! A failure to reach slurmrestd is transient; a refused certificate, an
//! unreadable `ca_file` or a redirect is configuration (the same next time).
//! Messages name the address and what was being done; header values (the
//! token) never appear in one.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::config::RestUrl;
use crate::error::{Failure, Kind, KindOf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Delete,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
}

/// An answer: the HTTP status and the body as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// How long one request may take, connect to last byte.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A shorter limit than [`TIMEOUT`] for this whole process, in ms (0: none).
static TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sets how long every request of this process may take, instead of
/// [`TIMEOUT`] (`nsh-hook --check` waits a few seconds, not 30). Call it
/// before the first request: the TCP agent is made once.
pub fn set_timeout(limit: Duration) {
    let ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
    TIMEOUT_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

fn timeout() -> Duration {
    match TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => TIMEOUT,
        ms => Duration::from_millis(ms),
    }
}

/// The most of a body nsh reads (slurmrestd's OpenAPI document is the
/// biggest thing asked for, well under this).
const MAX_BODY: u64 = 16 << 20;

/// Sends one request. `body` is JSON (sent with its content type).
pub fn request(
    url: &RestUrl,
    method: Method,
    path: &str,
    headers: &[(&'static str, String)],
    body: Option<&str>,
) -> Result<Response, Failure> {
    let result = match url {
        RestUrl::Http(base) => agent(&Transport::Plain)
            .and_then(|agent| over_tcp(&agent, base, method, path, headers, body)),
        RestUrl::Https { base, ca_file } => agent(&Transport::Tls(ca_file.clone()))
            .and_then(|agent| over_tcp(&agent, base, method, path, headers, body)),
        RestUrl::Unix(socket) => over_unix(socket, method, path, headers, body),
    };
    result.map_err(|cause| {
        Failure::from(RequestError {
            url: url.to_string(),
            method,
            path: path.to_string(),
            cause,
        })
    })
}

/// A request to slurmrestd that got no usable answer: always transient
/// (slurmrestd or the network may be back in a moment).
#[derive(Debug)]
pub struct RequestError {
    url: String,
    method: Method,
    path: String,
    /// What went wrong.
    pub cause: HttpError,
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "slurmrestd at {}: {} {}: {}",
            self.url,
            self.method.as_str(),
            self.path,
            self.cause
        )
    }
}

impl std::error::Error for RequestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.cause)
    }
}

impl KindOf for RequestError {
    fn kind(&self) -> Kind {
        match &self.cause {
            HttpError::CaFile(..) | HttpError::Redirect { .. } => Kind::Config,
            HttpError::Client(e) if refused_by_tls(e) => Kind::Config,
            _ => Kind::Transient,
        }
    }
}

/// TLS said no: the certificate is not vouched for, the name does not
/// match, the peer does not speak TLS. The same next time, so configuration.
/// rustls's errors reach ureq's caller inside an I/O error.
fn refused_by_tls(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_) => true,
        ureq::Error::Io(io) => io
            .get_ref()
            .is_some_and(<dyn std::error::Error + Send + Sync>::is::<rustls::Error>),
        _ => false,
    }
}

/// Why an HTTP exchange failed.
#[derive(Debug)]
pub enum HttpError {
    /// Connecting, sending or reading over the unix socket failed.
    Io(std::io::Error),
    /// ureq failed (TCP).
    Client(ureq::Error),
    /// No answer within the time limit (TCP).
    TimedOut(Duration),
    /// The answer is not HTTP as slurmrestd sends it.
    Malformed(&'static str),
    /// The status line is not HTTP/1.x's.
    NotHttp(String),
    /// The answer is a redirect, which nsh does not follow (the token would
    /// go with it).
    Redirect {
        /// The HTTP status (3xx).
        status: u16,
        /// Where it points, as sent.
        location: String,
    },
    /// `ca_file` could not be read, or holds no certificate.
    CaFile(std::path::PathBuf, String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Io(e) => e.fmt(f),
            HttpError::Client(ureq::Error::Io(e)) => e.fmt(f),
            HttpError::Client(e) => e.fmt(f),
            HttpError::TimedOut(limit) => {
                write!(f, "no answer within {} s", limit.as_secs_f64())
            }
            HttpError::Malformed(what) => f.write_str(what),
            HttpError::NotHttp(status_line) => {
                write!(f, "the answer is not HTTP: {status_line:?}")
            }
            HttpError::Redirect { status, location } => write!(
                f,
                "HTTP {status}: a redirect to {location:?}, not followed (the token goes to the configured url only; set url to where slurmrestd answers)"
            ),
            HttpError::CaFile(path, why) => {
                write!(f, "ca_file {}: {why}", path.display())
            }
        }
    }
}

impl std::error::Error for HttpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HttpError::Io(e) => Some(e),
            HttpError::Client(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for HttpError {
    fn from(e: std::io::Error) -> HttpError {
        HttpError::Io(e)
    }
}

impl From<ureq::Error> for HttpError {
    fn from(e: ureq::Error) -> HttpError {
        match e {
            ureq::Error::Timeout(_) => HttpError::TimedOut(timeout()),
            other => HttpError::Client(other),
        }
    }
}

fn over_tcp(
    agent: &ureq::Agent,
    base: &str,
    method: Method,
    path: &str,
    headers: &[(&'static str, String)],
    body: Option<&str>,
) -> Result<Response, HttpError> {
    let url = format!("{base}{path}");
    let response = match method {
        Method::Get | Method::Delete => {
            let mut req = if method == Method::Get {
                agent.get(&url)
            } else {
                agent.delete(&url)
            };
            req = req.header("Accept", "application/json");
            for (name, value) in headers {
                req = req.header(*name, value);
            }
            req.call()
        }
        Method::Post => {
            let mut req = agent
                .post(&url)
                .header("Accept", "application/json")
                .header("Content-Type", "application/json");
            for (name, value) in headers {
                req = req.header(*name, value);
            }
            req.send(body.unwrap_or(""))
        }
    };
    let mut response = response?;
    let status = response.status().as_u16();
    if (300..400).contains(&status) {
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        return Err(HttpError::Redirect { status, location });
    }
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_string()?;
    Ok(Response { status, body })
}

/// Where the system's CA bundle is, on Debian and NixOS alike (the
/// `ca-certificates` layout); Mozilla's roots, built in, where it is absent.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How a TCP connection to slurmrestd is made.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Transport {
    /// Plain HTTP.
    Plain,
    /// TLS, the server checked against this `ca_file` (`None`: the system's).
    Tls(Option<std::path::PathBuf>),
}

/// The agent for a transport: one per process and trust anchor, so that the
/// state queries of a wait reuse their connection.
fn agent(transport: &Transport) -> Result<ureq::Agent, HttpError> {
    type Agents = std::collections::HashMap<Transport, ureq::Agent>;
    static AGENTS: std::sync::Mutex<Option<Agents>> = std::sync::Mutex::new(None);
    let mut agents = AGENTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let agents = agents.get_or_insert_with(Agents::new);
    if let Some(agent) = agents.get(transport) {
        return Ok(agent.clone());
    }
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout()))
        .proxy(None)
        .max_redirects(0);
    if let Transport::Tls(ca_file) = transport {
        config = config.tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(root_certs(ca_file.as_deref())?)
                .build(),
        );
    }
    let agent: ureq::Agent = config.build().into();
    agents.insert(transport.clone(), agent.clone());
    Ok(agent)
}

/// The certificates in `ca_file`, or in the system's bundle.
fn root_certs(ca_file: Option<&std::path::Path>) -> Result<ureq::tls::RootCerts, HttpError> {
    let system = std::path::Path::new(SYSTEM_CA_BUNDLE);
    let path = match ca_file {
        Some(path) => path,
        None if system.exists() => system,
        None => return Ok(ureq::tls::RootCerts::WebPki),
    };
    let bad = |why: String| HttpError::CaFile(path.to_path_buf(), why);
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(cert) =
            item.map_err(|e| bad(format!("not PEM: {e}")))?
        {
            certs.push(cert);
        }
    }
    if certs.is_empty() {
        return Err(bad("no certificate in it".to_string()));
    }
    Ok(ureq::tls::RootCerts::new_with_certs(&certs))
}

fn over_unix(
    socket: &std::path::Path,
    method: Method,
    path: &str,
    headers: &[(&'static str, String)],
    body: Option<&str>,
) -> Result<Response, HttpError> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout()))?;
    stream.set_write_timeout(Some(timeout()))?;
    let request = encode_request(method, path, headers, body);
    stream.write_all(&request)?;
    let mut raw = Vec::new();
    stream.take(MAX_BODY + 65536).read_to_end(&mut raw)?;
    decode_response(&raw)
}

/// An HTTP/1.1 request for a unix socket.
fn encode_request(
    method: Method,
    path: &str,
    headers: &[(&'static str, String)],
    body: Option<&str>,
) -> Vec<u8> {
    let mut head = format!(
        "{} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n",
        method.as_str()
    );
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    if let Some(body) = body {
        let _ = write!(
            head,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    if let Some(body) = body {
        bytes.extend_from_slice(body.as_bytes());
    }
    bytes
}

/// Parses a whole HTTP/1.x response read until the server closed.
fn decode_response(raw: &[u8]) -> Result<Response, HttpError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(HttpError::Malformed(
            "the answer is not HTTP (no end of headers)",
        ))?;
    let head = std::str::from_utf8(&raw[..split])
        .map_err(|_| HttpError::Malformed("the answer's headers are not text"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| HttpError::NotHttp(status_line.to_string()))?;
    let mut chunked = false;
    let mut length: Option<usize> = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().ok();
            }
        }
    }
    let rest = &raw[split + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or(HttpError::Malformed(
                "the connection closed before the whole answer came",
            ))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    let body = String::from_utf8(body)
        .map_err(|_| HttpError::Malformed("the answer's body is not UTF-8"))?;
    Ok(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::new();
    loop {
        let end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or(HttpError::Malformed("a chunked answer ended early"))?;
        let size_text = std::str::from_utf8(&data[..end])
            .map_err(|_| HttpError::Malformed("bad chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Malformed("bad chunk size"))?;
        data = &data[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data
            .get(..size)
            .ok_or(HttpError::Malformed("a chunked answer ended early"))?;
        out.extend_from_slice(chunk);
        data = data
            .get(size + 2..)
            .ok_or(HttpError::Malformed("a chunked answer ended early"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn decodes_plain_and_chunked_answers() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(
            decode_response(plain).unwrap(),
            Response {
                status: 200,
                body: "{}".into()
            }
        );
        let chunked = b"HTTP/1.1 500 Err\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n";
        assert_eq!(decode_response(chunked).unwrap().body, "abcde");
        let until_close = b"HTTP/1.0 401 Unauthorized\r\n\r\nAuthentication failure";
        assert_eq!(decode_response(until_close).unwrap().status, 401);
        assert!(decode_response(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(decode_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
    }

    #[test]
    fn requests_over_a_unix_socket() {
        // A one-shot server on a real socket: checks what the client sends.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rest.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            // Read until the body (Content-Length 2) has arrived.
            while !seen.ends_with(b"{}") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0);
                seen.extend_from_slice(&buf[..n]);
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{\"job_id\":7}")
                .unwrap();
            String::from_utf8(seen).unwrap()
        });
        let url = RestUrl::Unix(path);
        let headers = [("X-SLURM-USER-NAME", "u".to_string())];
        let response = request(
            &url,
            Method::Post,
            "/slurm/v0.0.38/job/submit",
            &headers,
            Some("{}"),
        );
        let seen = server.join().unwrap();
        assert!(
            seen.starts_with("POST /slurm/v0.0.38/job/submit HTTP/1.1\r\n"),
            "{seen}"
        );
        assert!(seen.contains("X-SLURM-USER-NAME: u\r\n"));
        assert!(seen.contains("Content-Type: application/json\r\n"));
        assert!(seen.contains("Content-Length: 2\r\n"));
        assert_eq!(response.unwrap().body, "{\"job_id\":7}");
    }

    /// A one-shot TCP server that answers `answer` to the first request and
    /// hands back what it was sent.
    fn tcp_server(answer: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.ends_with(b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0);
                seen.extend_from_slice(&buf[..n]);
            }
            conn.write_all(answer.as_bytes()).unwrap();
            String::from_utf8(seen).unwrap()
        });
        (base, server)
    }

    #[test]
    fn a_redirect_is_not_followed_and_is_configuration() {
        let (base, server) = tcp_server(
            "HTTP/1.1 302 Found\r\nLocation: http://elsewhere:6820/x\r\nContent-Length: 0\r\n\r\n",
        );
        let secret = [("X-SLURM-USER-TOKEN", "sekrit".to_string())];
        let failure = request(&RestUrl::Http(base), Method::Get, "/x", &secret, None).unwrap_err();
        server.join().unwrap();
        assert_eq!(failure.kind, crate::Kind::Config);
        assert!(failure.message.contains("HTTP 302"), "{}", failure.message);
        assert!(
            failure.message.contains("elsewhere:6820"),
            "{}",
            failure.message
        );
        assert!(!failure.message.contains("sekrit"));
    }

    #[test]
    fn a_ca_file_without_certificates_is_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("empty.pem");
        std::fs::write(&pem, "not a certificate\n").unwrap();
        let url = RestUrl::Https {
            base: "https://127.0.0.1:9".into(),
            ca_file: Some(pem.clone()),
        };
        let failure = request(&url, Method::Get, "/x", &[], None).unwrap_err();
        assert_eq!(failure.kind, crate::Kind::Config);
        assert!(
            failure
                .message
                .contains(&format!("ca_file {}: no certificate", pem.display())),
            "{}",
            failure.message
        );
    }

    #[test]
    fn refused_connections_are_transient_and_name_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let url = RestUrl::Unix(dir.path().join("absent.sock"));
        let secret = [("X-SLURM-USER-TOKEN", "sekrit".to_string())];
        let failure = request(&url, Method::Get, "/x", &secret, None).unwrap_err();
        assert_eq!(failure.kind, crate::Kind::Transient);
        assert!(
            failure.message.contains("absent.sock"),
            "{}",
            failure.message
        );
        assert!(!failure.message.contains("sekrit"));
        // A TCP port nobody listens on.
        let url = RestUrl::Http("http://127.0.0.1:9".into());
        let failure = request(&url, Method::Get, "/x", &secret, None).unwrap_err();
        assert!(
            failure.message.contains("127.0.0.1:9"),
            "{}",
            failure.message
        );
        assert!(!failure.message.contains("sekrit"));
    }
}
