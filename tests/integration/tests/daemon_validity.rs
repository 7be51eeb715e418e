//! Validity asked of the login machine's real Nix daemon over its worker
//! protocol (what nsh-fetch asks before and after importing), against
//! `nix-store --check-validity`; and the fall-back to `nix-store --serve`
//! when no daemon answers on the socket.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::collections::BTreeSet;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use nsh_cluster_tests::{instantiate, run_ok, unique_salt, Cluster};
use nsh_core::store::{LocalStore, ValidityWay};

/// A derivation (valid), its output (not built yet) and a path nothing made.
struct Paths {
    drv: String,
    out: String,
    none: String,
}

impl Paths {
    fn new(c: &Cluster, name: &str) -> Paths {
        let salt = unique_salt();
        let drv = instantiate(
            c,
            &format!(
                r#"builtins.derivation {{
                     name = "nsh-{name}-{salt}"; system = builtins.currentSystem;
                     builder = "/bin/sh"; args = [ "-c" "echo {salt} > $out" ];
                   }}"#
            ),
        );
        let out = run_ok(c.command("nix-store").args(["--query", "--outputs", &drv]))
            .trim()
            .to_string();
        let none = format!("/nix/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-nsh-{name}-none-{salt}");
        Paths { drv, out, none }
    }

    fn all(&self) -> Vec<String> {
        vec![self.drv.clone(), self.out.clone(), self.none.clone()]
    }
}

/// The valid ones among `paths`, as `nix-store --check-validity` sees them.
fn valid_by_nix_store(c: &Cluster, paths: &[String]) -> BTreeSet<String> {
    let invalid = run_ok(
        c.command("nix-store")
            .args(["--check-validity", "--print-invalid"])
            .args(paths),
    );
    let invalid: BTreeSet<&str> = invalid.lines().collect();
    paths
        .iter()
        .filter(|p| !invalid.contains(p.as_str()))
        .cloned()
        .collect()
}

/// Asks `store` which of `paths` are valid, through one [`Validity`];
/// returns the answer and the way it went.
fn ask(store: &LocalStore, paths: &[String]) -> (BTreeSet<String>, ValidityWay) {
    let mut validity = store.validity();
    let valid = validity.of(paths).unwrap();
    let way = validity.way().unwrap();
    validity.finish().unwrap();
    let valid = valid.iter().map(|p| p.as_str().to_string()).collect();
    (valid, way)
}

#[test]
fn daemon_validity_matches_nix_store_for_every_store_the_daemon_serves() {
    let c = Cluster::get();
    let paths = Paths::new(&c, "daemonq");
    let expected = valid_by_nix_store(&c, &paths.all());
    assert_eq!(expected, BTreeSet::from([paths.drv.clone()]));
    for uri in [
        "",
        "auto",
        "daemon",
        "local",
        "unix:///nix/var/nix/daemon-socket/socket",
    ] {
        let store = LocalStore::new(uri, "").unwrap();
        assert_eq!(
            ask(&store, &paths.all()),
            (expected.clone(), ValidityWay::Daemon),
            "{uri:?}"
        );
    }
    // One connection, several questions.
    let store = LocalStore::new("daemon", "").unwrap();
    let mut validity = store.validity();
    assert_eq!(validity.of(&[&paths.out]).unwrap().len(), 0);
    let valid = validity.of(&[&paths.drv, &paths.none]).unwrap();
    assert_eq!(
        valid
            .iter()
            .map(nsh_core::StorePath::as_str)
            .collect::<Vec<_>>(),
        [paths.drv.as_str()]
    );
    validity.finish().unwrap();
    // Built now: a new question is a new worker, which sees it.
    run_ok(c.command("nix-store").args(["--realise", &paths.drv]));
    let now = valid_by_nix_store(&c, &paths.all());
    assert_eq!(now.len(), 2);
    let valid: BTreeSet<String> = store
        .valid_paths(&paths.all())
        .unwrap()
        .iter()
        .map(|p| p.as_str().to_string())
        .collect();
    assert_eq!(valid, now);
}

#[test]
fn daemon_validity_error_names_the_daemons_message() {
    let store = LocalStore::new("daemon", "").unwrap();
    let outside = "/elsewhere/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-nsh-daemonq";
    let err = store.valid_paths(&[outside]).unwrap_err();
    assert!(
        err.message.contains("the Nix daemon at ")
            && err.message.contains("QueryValidPaths")
            && err.message.contains("is not in the Nix store")
            && err.message.contains(outside),
        "{}",
        err.message
    );
    assert_eq!(err.kind, nsh_core::Kind::Permanent, "{}", err.message);
}

#[test]
fn daemon_validity_falls_back_to_serve_without_a_daemon_on_the_socket() {
    let c = Cluster::get();
    let paths = Paths::new(&c, "daemonq-fallback");
    let expected = valid_by_nix_store(&c, &paths.all());
    let dir = tempfile::tempdir().unwrap();
    // A socket file nothing listens on any more: the connection is refused.
    let refused = dir.path().join("refused");
    drop(UnixListener::bind(&refused).unwrap());
    let missing = dir.path().join("missing");
    let mut store = LocalStore::new("auto", "").unwrap();
    for socket in [Some(refused), Some(missing), None] {
        store.daemon_socket = socket.clone();
        assert_eq!(
            ask(&store, &paths.all()),
            (expected.clone(), ValidityWay::Serve),
            "{socket:?}"
        );
    }
    // A store the daemon does not serve as it is named has no socket.
    let other = LocalStore::new("local?root=/tmp/nsh-daemonq-none", "").unwrap();
    assert_eq!(other.daemon_socket, None::<PathBuf>);
}
