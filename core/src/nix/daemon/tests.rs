//! The worker-protocol codec and client against scripted daemons: byte
//! streams in memory, written as the daemons of Nix 2.8 (1.34), 2.26 and
//! 2.34 (1.38), Lix (1.35) and an old one would write them.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::client::{socket_for_store, DaemonClient};
use super::*;
use crate::error::Failure;
use crate::nix::store_path::StorePath;
use crate::nix::wire::test_bytes::{le, s};

const PATH_A: &str = "/nix/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-a";
const PATH_B: &str = "/nix/store/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-b";

/// What a daemon of `version` sends up to the end of the greeting: the
/// magic, its version, its Nix version (1.33+) and trust (1.35+) as the
/// version the conversation will use decides, then STDERR_LAST.
fn daemon_greeting(version: u64, nix: &str, trust: u64) -> Vec<u8> {
    let used = version.min(CLIENT_VERSION);
    let mut out = [le(WORKER_MAGIC_2), le(version)].concat();
    if minor(used) >= MINOR_NIX_VERSION {
        out.extend(s(nix));
    }
    if minor(used) >= MINOR_TRUST {
        out.extend(le(trust));
    }
    out.extend(le(STDERR_LAST));
    out
}

/// The failure of the client's handshake against `daemon` (the daemon's bytes).
fn handshake_failure(daemon: &[u8]) -> Failure {
    let mut written = Vec::new();
    let result = DaemonClient::handshake(daemon, &mut written, "daemon");
    match result {
        Ok(_) => panic!("the handshake succeeded"),
        Err(failure) => failure,
    }
}

/// The client's words as `u64`s in hex, one line.
fn words(bytes: &[u8]) -> String {
    bytes
        .chunks(8)
        .map(|word| format!("{:#x}", u64::from_le_bytes(word.try_into().unwrap())))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn handshake_per_daemon_version() {
    let daemons = [
        ("Nix 2.26/2.34", 0x126, "2.34.8", 1),
        ("Lix 2.95", 0x123, "2.95.3", 2),
        ("Nix 2.8", 0x122, "2.8.0", 0),
        ("1.32", 0x120, "", 0),
        ("1.13", 0x10d, "", 0),
        ("1.10", 0x10a, "", 0),
    ];
    let mut table = String::new();
    for (name, version, nix, trust) in daemons {
        let greeting = daemon_greeting(version, nix, trust);
        let mut written = Vec::new();
        let client = DaemonClient::handshake(&greeting[..], &mut written, "daemon").unwrap();
        let (used, info) = (client.version(), client.info().clone());
        drop(client);
        writeln!(
            table,
            "{name}: uses {}; client sends {}; daemon is {:?}, trust {:?}",
            version_text(used),
            words(&written),
            info.nix_version,
            info.trust,
        )
        .unwrap();
    }
    insta::assert_snapshot!(table);
}

#[test]
fn handshake_bytes_at_1_34_are_exact() {
    let greeting = daemon_greeting(0x122, "2.8.0", 0);
    let mut written = Vec::new();
    drop(DaemonClient::handshake(&greeting[..], &mut written, "daemon").unwrap());
    // Magic and 1.37, then no CPU affinity and no reserved space.
    assert_eq!(written, [le(0x6e69_7863), le(0x125), le(0), le(0)].concat());
}

#[test]
fn daemons_we_cannot_speak_with_are_refused() {
    for (version, why) in [
        (0x209, "worker protocol 2.9"),
        (0x109, "worker protocol 1.9"),
    ] {
        let bytes = [le(WORKER_MAGIC_2), le(version)].concat();
        let err = handshake_failure(&bytes);
        assert!(err.message.contains(why), "{}", err.message);
        assert_eq!(err.kind, Kind::Permanent);
    }
    let err = handshake_failure(&le(0x1234));
    assert!(err.message.contains("not a Nix daemon"), "{}", err.message);
    // A daemon that closes the connection at once (Nix refuses a user not
    // in allowed-users so).
    let err = handshake_failure(&[]);
    assert_eq!(err.kind, Kind::Transient, "{}", err.message);
}

#[test]
fn query_valid_paths_bytes_per_version() {
    let mut out = Vec::new();
    write_query_valid_paths(&mut WireWriter::new(&mut out), 0x125, &[PATH_A], false).unwrap();
    assert_eq!(out, [le(31), le(1), s(PATH_A), le(0)].concat());
    // Before 1.27: no substitute flag.
    let mut out = Vec::new();
    write_query_valid_paths(
        &mut WireWriter::new(&mut out),
        0x11a,
        &[PATH_A, PATH_B],
        true,
    )
    .unwrap();
    assert_eq!(out, [le(31), le(2), s(PATH_A), s(PATH_B)].concat());
}

/// A conversation at 1.34: greeting, then `answer` to the one question.
fn ask(answer: &[u8]) -> (Result<Vec<StorePath>, Failure>, Vec<u8>) {
    let daemon = [daemon_greeting(0x122, "2.8.0", 0), answer.to_vec()].concat();
    let mut written = Vec::new();
    let mut client = DaemonClient::handshake(&daemon[..], &mut written, "daemon").unwrap();
    let result = client.query_valid_paths(&[PATH_A, PATH_B]);
    drop(client);
    (result, written)
}

fn start_activity(id: u64, text: &str, fields: &[u8]) -> Vec<u8> {
    [
        le(STDERR_START_ACTIVITY),
        le(id),
        le(3),
        le(105),
        s(text),
        fields.to_vec(),
        le(0),
    ]
    .concat()
}

#[test]
fn log_lines_and_activities_are_read_past_to_the_answer() {
    let fields = [le(2), le(0), le(42), le(1), s("text")].concat();
    let answer = [
        le(STDERR_NEXT),
        s("warning: \x1b[35;1mdisk\x1b[0m is slow\n"),
        start_activity(7, "querying", &fields),
        le(STDERR_RESULT),
        le(7),
        le(101),
        fields.clone(),
        le(STDERR_STOP_ACTIVITY),
        le(7),
        le(STDERR_LAST),
        le(1),
        s(PATH_B),
    ]
    .concat();
    let (valid, written) = ask(&answer);
    assert_eq!(valid.unwrap(), [StorePath::parse(PATH_B).unwrap()]);
    let request = [le(31), le(2), s(PATH_A), s(PATH_B), le(0)].concat();
    assert!(written.ends_with(&request));
}

#[test]
fn a_structured_error_is_a_failure_naming_the_daemons_message() {
    let answer = [
        le(STDERR_ERROR),
        s("Error"),
        le(0),
        s("Error"),
        s("path '\x1b[35;1m/x/y\x1b[0m' is not in the Nix store"),
        le(0),
        le(1),
        le(0),
        s("while reading the paths"),
    ]
    .concat();
    let err = ask(&answer).0.unwrap_err();
    insta::assert_snapshot!(err.message, @"daemon: QueryValidPaths: path '/x/y' is not in the Nix store; while reading the paths");
    assert_eq!(err.kind, Kind::Permanent);
    let cause = err.cause::<DaemonError>().unwrap();
    assert_eq!(cause.message, "path '/x/y' is not in the Nix store");
    assert_eq!(cause.status, None);
}

#[test]
fn errors_before_1_26_are_a_message_and_a_status() {
    let bytes = [le(STDERR_ERROR), s("out of luck"), le(2)].concat();
    let mut r = WireReader::new(&bytes[..]);
    assert_eq!(
        read_stderr(&mut r, 0x119).unwrap(),
        Stderr::Error(DaemonError {
            message: "out of luck".into(),
            traces: Vec::new(),
            status: Some(2),
        })
    );
}

#[test]
fn data_requests_and_unknown_messages_are_errors() {
    for (code, says) in [
        (STDERR_READ, "wants to read data"),
        (STDERR_WRITE, "wants to write data"),
        (0x1234, "unknown message type 0x1234"),
    ] {
        let err = ask(&[le(code), le(8)].concat()).0.unwrap_err();
        assert!(err.message.contains(says), "{}", err.message);
        assert_eq!(err.kind, Kind::Permanent);
    }
    let bad_field = start_activity(1, "x", &[le(1), le(7)].concat());
    let err = ask(&bad_field).0.unwrap_err();
    assert!(err.message.contains("field type 7"), "{}", err.message);
    let err = ask(&[le(STDERR_ERROR), s("Oops")].concat()).0.unwrap_err();
    assert!(err.message.contains("not \"Error\""), "{}", err.message);
}

#[test]
fn a_cut_answer_is_transient() {
    let err = ask(&[le(STDERR_LAST), le(2), s(PATH_A)].concat())
        .0
        .unwrap_err();
    assert_eq!(err.kind, Kind::Transient, "{}", err.message);
}

#[test]
fn which_stores_the_daemon_serves() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_string())
        }
    };
    let none = env(&[]);
    let default = Some(PathBuf::from("/nix/var/nix/daemon-socket/socket"));
    for uri in ["", "auto", "daemon", "local", "unix://"] {
        assert_eq!(socket_for_store(uri, &none), default, "{uri}");
    }
    assert_eq!(
        socket_for_store("unix:///run/d.sock", &none),
        Some(PathBuf::from("/run/d.sock"))
    );
    for uri in [
        "local?root=/r",
        "daemon?trusted=1",
        "/r",
        "ssh://node1",
        "ssh-ng://node1",
        "file:///cache",
    ] {
        assert_eq!(socket_for_store(uri, &none), None, "{uri}");
    }
    let moved = env(&[("NIX_STATE_DIR", "/st"), ("NIX_REMOTE", "")]);
    assert_eq!(
        socket_for_store("auto", &moved),
        Some(PathBuf::from("/st/daemon-socket/socket"))
    );
    let socket = env(&[("NIX_DAEMON_SOCKET_PATH", "/s"), ("NIX_STATE_DIR", "/st")]);
    assert_eq!(
        socket_for_store("daemon", &socket),
        Some(PathBuf::from("/s"))
    );
    let remote = env(&[("NIX_REMOTE", "local?root=/r")]);
    assert_eq!(socket_for_store("auto", &remote), None);
    assert_eq!(socket_for_store("daemon", &remote), default);
}

#[test]
fn colours_are_removed_and_other_escapes_kept() {
    assert_eq!(without_colours("a \x1b[35;1mb\x1b[0m c\n"), "a b c");
    assert_eq!(without_colours("\x1b[Kx \x1b["), "\x1b[Kx \x1b[");
}
