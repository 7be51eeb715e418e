//! A stand-in slurmrestd for unit tests of decision logic (version
//! negotiation, waiting): a unix socket that answers scripted responses and
//! records what it was asked. The real server is exercised by the cluster
//! tests (`tests/integration/tests/alloc.rs`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Request line without the protocol (`GET /slurm/v0.0.42/job/7`) → the
/// answers to give, in turn; the last one repeats. Anything else: 404.
pub type Routes = Vec<(&'static str, Vec<Answer>)>;

/// An HTTP status and a body.
pub type Answer = (u16, String);

/// Starts serving on `socket`; returns the request heads seen so far.
pub fn serve(socket: &Path, routes: Routes) -> Arc<Mutex<Vec<String>>> {
    let listener = UnixListener::bind(socket).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    // Each route's answers and the index of the next one to give.
    let mut routes: HashMap<&'static str, (Vec<Answer>, usize)> =
        routes.into_iter().map(|(k, v)| (k, (v, 0))).collect();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match conn.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let head = String::from_utf8_lossy(&head).to_string();
            // Read the body too: closing with unread bytes resets the
            // connection under the client's feet.
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; length];
            let _ = conn.read_exact(&mut body);
            let request = head
                .lines()
                .next()
                .and_then(|l| l.rsplit_once(' '))
                .map(|(r, _)| r.to_string())
                .unwrap_or_default();
            log.lock().unwrap().push(head);
            let (status, body) = match routes.get_mut(request.as_str()) {
                Some((answers, next)) => {
                    let answer = answers[(*next).min(answers.len() - 1)].clone();
                    *next += 1;
                    answer
                }
                None => (404, "Unable find requested URL.".to_string()),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: Close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    seen
}
