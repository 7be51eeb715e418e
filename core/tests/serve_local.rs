//! The serve-protocol client, the build request file and the input closure
//! against the real `nix-store --serve` of this machine, each test in
//! private stores of its own (`local?store=…&state=…`), so nothing touches
//! /nix/store.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use nsh_core::serve::ServeProcess;
use nsh_core::serve::{self, BuildStatus, PathInfo};
use nsh_core::store::{self as local_store, LocalStore};
use nsh_core::BuildOptions;
use nsh_core::Kind;
use nsh_core::StorePath;

/// Settings that make Nix work on a machine without /etc/nix/nix.conf,
/// without a nixbld group and without network.
const NIX_CONFIG: &str = "substituters =\nbuild-users-group =\nsandbox = false\nbuilders =\n";

struct TestStore {
    dir: tempfile::TempDir,
    uri: String,
}

impl TestStore {
    fn new() -> TestStore {
        let dir = tempfile::Builder::new()
            .prefix("nsh-test-")
            .tempdir()
            .unwrap();
        let d = dir.path().display();
        let uri = format!("local?store={d}/store&state={d}/var&log={d}/log");
        TestStore { dir, uri }
    }

    fn store_dir(&self) -> String {
        format!("{}/store", self.dir.path().display())
    }

    fn nix(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("NIX_CONFIG", NIX_CONFIG)
            .arg("--store")
            .arg(&self.uri);
        command
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .nix(program)
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "{program} {args:?} failed");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// `nix-instantiate` of an expression; returns the .drv path.
    fn instantiate(&self, expr: &str) -> StorePath {
        let file = self.dir.path().join(format!("e{}.nix", rand_suffix()));
        fs::write(&file, expr).unwrap();
        StorePath::parse(&self.run("nix-instantiate", &[file.to_str().unwrap()])).unwrap()
    }

    fn realise(&self, drv: &str) -> Vec<StorePath> {
        self.run("nix-store", &["--realise", drv])
            .lines()
            .map(|line| StorePath::parse(line).unwrap())
            .collect()
    }

    fn serve(&self, write: bool) -> ServeProcess {
        let mut command = self.nix("nix-store");
        command.arg("--serve");
        if write {
            command.arg("--write");
        }
        ServeProcess::from_command(command, format!("test store {}", self.uri), None).unwrap()
    }

    fn local_store(&self) -> LocalStore {
        LocalStore::new(&self.uri, "").unwrap()
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

const CHAIN: &str = r#"
let
  a = builtins.derivation { name = "a"; system = builtins.currentSystem; builder = "/bin/sh";
        args = ["-c" "echo a > $out"]; };
  b = builtins.derivation { name = "b"; system = builtins.currentSystem; builder = "/bin/sh";
        outputs = ["out" "dev"];
        args = ["-c" "echo ${a} > $out; echo dev > $dev"]; };
in builtins.derivation { name = "c"; system = builtins.currentSystem; builder = "/bin/sh";
     args = ["-c" "cat ${b} > $out; echo ${builtins.toFile "src" "hi"} >> $out"]; }
"#;

#[test]
fn queries_dump_and_closure_over_one_process() {
    let s = TestStore::new();
    let c_drv = s.instantiate(CHAIN);
    let store = s.local_store();
    let drv = store.read_drv(&c_drv).unwrap();
    let roots = store.input_roots(&drv).unwrap();
    // c uses b.out (not b.dev) and the source file.
    assert_eq!(roots.len(), 2, "{roots:?}");
    assert!(roots.iter().any(|r| r.ends_with("-src")));
    assert!(roots.iter().any(|r| r.ends_with("-b")));

    // Nothing built yet: the missing input is named.
    let mut serve = s.serve(false);
    let err = local_store::input_closure(&mut serve.client, &roots).unwrap_err();
    assert_eq!(err.kind, Kind::Input);
    assert!(
        err.message
            .contains("1 input path(s) are not in the local store"),
        "{}",
        err.message
    );
    assert!(err.message.contains("-b"), "{}", err.message);
    serve.finish().unwrap();

    let b_drv = drv.input_drvs.keys().next().unwrap();
    s.realise(b_drv);
    let mut serve = s.serve(false);
    let closure = local_store::input_closure(&mut serve.client, &roots).unwrap();
    let names: Vec<&str> = closure.paths.iter().map(|p| &p[p.len() - 2..]).collect();
    // a before b (b refers to a); the source anywhere.
    let pos = |suffix: &str| names.iter().position(|n| *n == suffix).unwrap();
    assert_eq!(closure.paths.len(), 3, "{:?}", closure.paths);
    assert!(pos("-a") < pos("-b"));
    let expected_size: u64 = closure.infos.iter().map(|i| i.nar_size).sum();
    assert_eq!(closure.nar_size, expected_size);
    assert!(closure.nar_size > 0);
    let b_out = closure
        .paths
        .iter()
        .find(|p| p.ends_with("-b"))
        .unwrap()
        .clone();
    let b_info = closure.infos.iter().find(|i| i.path == b_out).unwrap();
    assert!(b_info.references.iter().any(|r| r.ends_with("-a")));
    assert!(b_info.nar_hash.starts_with("sha256:"));
    assert!(b_info.deriver.as_ref().unwrap().ends_with("-b.drv"));

    assert_same_as_requisites(&s, &roots, &closure.paths);

    // DumpStorePath streams exactly what nix-store --dump gives.
    let mut nar = Vec::new();
    let size = serve.client.dump_store_path(&b_out, &mut nar).unwrap();
    let dump = s
        .nix("nix-store")
        .args(["--dump", &b_out])
        .output()
        .unwrap();
    assert_eq!(size, nar.len() as u64);
    assert_eq!(nar, dump.stdout);
    // The same connection still works afterwards.
    let valid = serve
        .client
        .query_valid_paths(
            &[
                b_out.to_string(),
                format!("{}/00000000000000000000000000000000-x", s.store_dir()),
            ],
            false,
            false,
        )
        .unwrap();
    assert_eq!(valid, [b_out]);
    serve.finish().unwrap();
}

/// The closure is what `nix-store --query --requisites` gives.
fn assert_same_as_requisites(s: &TestStore, roots: &[StorePath], paths: &[StorePath]) {
    let mut requisites: Vec<String> = s
        .run(
            "nix-store",
            &["--query", "--requisites", &roots[0], &roots[1]],
        )
        .lines()
        .map(str::to_string)
        .collect();
    requisites.sort();
    let mut ours: Vec<String> = paths.iter().map(ToString::to_string).collect();
    ours.sort();
    assert_eq!(ours, requisites);
}

/// A store that shares `from`'s store directory (every path names its
/// directory) but keeps its files and database elsewhere: `store=` is the
/// source's, `real=` and `state=` are new.
fn sharing_store_dir(from: &TestStore) -> (tempfile::TempDir, String) {
    let d = from.dir.path().display();
    let to_dir = tempfile::tempdir().unwrap();
    let t = to_dir.path().display();
    let uri = format!("local?store={d}/store&real={t}/store&state={t}/var&log={t}/log");
    (to_dir, uri)
}

fn serve_on(uri: &str, write: bool) -> ServeProcess {
    let mut command = Command::new("nix-store");
    command
        .env("NIX_CONFIG", NIX_CONFIG)
        .args(["--store", uri, "--serve"]);
    if write {
        command.arg("--write");
    }
    ServeProcess::from_command(command, "target store", None).unwrap()
}

#[test]
fn import_paths_and_add_to_store_nar_from_dumps() {
    // The local Nix's own nix-store --serve takes ImportPaths (which Nix
    // 2.32.0 and 2.32.1 lacked) and AddToStoreNar, fed from DumpStorePath:
    // the commands nsh-push uses.
    let from = TestStore::new();
    let outs = from.realise(&from.instantiate(CHAIN));
    let (_to_dir, to_uri) = sharing_store_dir(&from);

    let mut source = from.serve(false);
    let closure = source.client.query_closure(&outs[..1], false).unwrap();
    let infos = source.client.query_path_infos(&closure).unwrap();
    let infos = local_store::dependency_order(infos).unwrap();
    // All but the top path in one ImportPaths stream.
    let (top, rest) = infos.split_last().unwrap();
    let rest: Vec<&PathInfo> = rest.iter().collect();
    let rest_paths: Vec<StorePath> = rest.iter().map(|i| i.path.clone()).collect();
    let mut target = serve_on(&to_uri, true);
    target
        .client
        .import_paths_from(&rest, |info, w| {
            source.client.dump_store_path(&info.path, w)
        })
        .unwrap();
    assert_eq!(
        target
            .client
            .query_valid_paths(&rest_paths, true, false)
            .unwrap(),
        rest_paths
    );

    // The top path with AddToStoreNar, its NAR read into memory first.
    let mut nar = Vec::new();
    source.client.dump_store_path(&top.path, &mut nar).unwrap();
    let size = target.client.add_to_store_nar(top, &mut &nar[..]).unwrap();
    assert_eq!(size, top.nar_size);
    let there = target
        .client
        .query_path_infos(std::slice::from_ref(&top.path))
        .unwrap();
    assert_eq!(there[0].nar_hash, top.nar_hash);
    assert_eq!(there[0].references, top.references);
    source.finish().unwrap();
    target.finish().unwrap();
}

#[test]
fn build_derivation_live_and_as_a_request_file() {
    let s = TestStore::new();
    let drv_path = s.instantiate(CHAIN);
    let store = s.local_store();
    let c = store.read_drv(&drv_path).unwrap();
    let b_drv = c.input_drvs.keys().next().unwrap();
    let b = store.read_drv(b_drv).unwrap();
    let a_drv = b.input_drvs.keys().next().unwrap();
    let a = store.read_drv(a_drv).unwrap();

    // Live: build a (no inputs) over the connection.
    let mut serve = s.serve(true);
    let result = serve
        .client
        .build_derivation(&a, &[] as &[String], &BuildOptions::default())
        .unwrap();
    assert_eq!(result.status, BuildStatus::Built, "{}", result.error_msg);
    let a_out = a.outputs["out"].path.clone().unwrap();
    assert_eq!(result.output_paths(&store.dir).unwrap()["out"], a_out);
    // Nix 2.34.8 and later answer with an aggregated result that leaves the
    // times out (both 0, NixOS/nix 5b0278c); older ones report both.
    let no_times = result.start_time == 0 && result.stop_time == 0;
    assert!(
        no_times || (result.start_time > 0 && result.stop_time >= result.start_time),
        "{result:?}"
    );
    serve.finish().unwrap();

    // As files: build b with its input closure, exactly as a node would:
    // nix-store --serve --write < request > response.
    let mut serve = s.serve(false);
    let roots = store.input_roots(&b).unwrap();
    let closure = local_store::input_closure(&mut serve.client, &roots).unwrap();
    serve.finish().unwrap();
    assert_eq!(closure.paths, std::slice::from_ref(&a_out));
    let request = s.dir.path().join("request");
    let response = s.dir.path().join("response");
    let mut file = fs::File::create(&request).unwrap();
    serve::write_build_request(&mut file, &b, &closure.paths, &BuildOptions::default()).unwrap();
    file.flush().unwrap();
    drop(file);
    let log = s.dir.path().join("log");
    let status = s
        .nix("nix-store")
        .args(["--serve", "--write"])
        .stdin(fs::File::open(&request).unwrap())
        .stdout(fs::File::create(&response).unwrap())
        .stderr(fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let response = serve::read_build_response(fs::File::open(&response).unwrap()).unwrap();
    // The request's first question: the store had every input.
    assert_eq!(response.inputs_valid, closure.paths);
    let result = response.result.unwrap();
    assert_eq!(result.status, BuildStatus::Built, "{}", result.error_msg);
    assert_eq!(
        result.built_outputs.keys().collect::<Vec<_>>(),
        ["dev", "out"]
    );
    for (name, path) in &result.output_paths(&store.dir).unwrap() {
        assert_eq!(Some(path), b.outputs[name].path.as_ref());
        assert!(PathBuf::from(path.as_str()).exists());
    }

    a_failing_build_says_why(&s, &store);
    // An input no store has (as if the node's garbage collector took it).
    let gone = store
        .dir
        .join("0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-gone")
        .unwrap();
    let inputs = [closure.paths[0].clone(), gone];
    let mut request = Vec::new();
    serve::write_build_request(&mut request, &b, &inputs, &BuildOptions::default()).unwrap();
    a_build_without_an_input_says_which(&s, &request, &closure.paths[0]);
}

/// A request with an input the store lacks (a push skipped on the pool's
/// word, whose path the node's garbage collector took): the response still
/// parses, and its first answer leaves out what was missing, whatever the
/// build result says.
fn a_build_without_an_input_says_which(s: &TestStore, request: &[u8], there: &StorePath) {
    let out = s
        .nix("nix-store")
        .args(["--serve", "--write"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(request)?;
            child.wait_with_output()
        })
        .unwrap();
    let response = serve::read_build_response(&out.stdout[..]).unwrap();
    assert_eq!(response.inputs_valid, std::slice::from_ref(there));
    // Built it is not; some versions end the conversation at the missing
    // input, without a build result.
    if let Ok(result) = &response.result {
        assert_ne!(result.status, BuildStatus::Built);
    }
    eprintln!(
        "with an input missing: {:?}; the server said: {}",
        response.result.map(|r| (r.status, r.error_msg)),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A failing build: the status and message come back.
fn a_failing_build_says_why(s: &TestStore, store: &LocalStore) {
    let bad = s.instantiate(r#"builtins.derivation { name = "bad"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "echo oops >&2; exit 3"]; }"#);
    let bad = store.read_drv(&bad).unwrap();
    let mut serve = s.serve(true);
    let result = serve
        .client
        .build_derivation(&bad, &[] as &[String], &BuildOptions::default())
        .unwrap();
    assert_eq!(result.status, BuildStatus::PermanentFailure);
    assert!(
        result.error_msg.contains("exit code 3"),
        "{}",
        result.error_msg
    );
    serve.finish().unwrap();
}

#[test]
fn a_server_that_is_not_one_is_refused() {
    let mut command = Command::new("sh");
    command.args(["-c", "printf NOTSERVE; cat >/dev/null"]);
    let err = ServeProcess::from_command(command, "sh", None)
        .err()
        .unwrap();
    assert!(
        err.message.contains("not a nix-store --serve server"),
        "{}",
        err.message
    );
    let command = Command::new("/nonexistent/nix-store");
    assert_eq!(
        ServeProcess::from_command(command, "x", None)
            .err()
            .unwrap()
            .kind,
        Kind::Config
    );
}

/// A server that answers part of a reply and then goes silent (a node
/// whose nix-store is stopped) fails the conversation as transient after
/// the idle limit, naming the peer, what was awaited and the key; the
/// child is killed with the conversation.
#[test]
fn a_server_that_stops_answering_is_transient_after_the_idle_limit() {
    let mut command = Command::new("sh");
    // Half of the 8-byte magic, then nothing (and stdin still open).
    command.args(["-c", "printf '\\357\\315'; exec sleep 60"]);
    let started = std::time::Instant::now();
    let err = ServeProcess::from_command(
        command,
        "nixbuild@node9",
        Some(std::time::Duration::from_millis(500)),
    )
    .err()
    .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(err.kind, Kind::Transient, "{}", err.message);
    for words in [
        "nixbuild@node9",
        "handshake",
        "nothing came from nixbuild@node9 for 0.5 s (remote.io_timeout)",
    ] {
        assert!(err.message.contains(words), "{words}: {}", err.message);
    }
}

#[test]
fn a_structured_attrs_derivation_builds_from_a_request_file() {
    // __json must reach the node as it is in the .drv: the builder reads
    // its output path from .attrs.json, which Nix writes from it.
    let s = TestStore::new();
    let drv_path = s.instantiate(
        r#"builtins.derivation {
             name = "sa"; system = builtins.currentSystem; builder = "/bin/sh";
             __structuredAttrs = true; greeting = "hello from json";
             args = [ "-c" "out=$(/bin/sed -n 's/.*\"out\":\"\\([^\"]*\\)\".*/\\1/p' .attrs.json); /bin/grep -o 'hello from json' .attrs.json > $out" ];
           }"#,
    );
    let store = s.local_store();
    let drv = store.read_drv(&drv_path).unwrap();
    assert!(drv.structured_attrs);
    assert!(drv.env.contains_key("__json"));
    let request = s.dir.path().join("request");
    let response = s.dir.path().join("response");
    serve::write_build_request(
        fs::File::create(&request).unwrap(),
        &drv,
        &[] as &[String],
        &BuildOptions::default(),
    )
    .unwrap();
    let status = s
        .nix("nix-store")
        .args(["--serve", "--write"])
        .stdin(fs::File::open(&request).unwrap())
        .stdout(fs::File::create(&response).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let response = serve::read_build_response(fs::File::open(&response).unwrap()).unwrap();
    // No inputs: the request's first question asks about none.
    assert!(response.inputs_valid.is_empty(), "no inputs were asked");
    let result = response.result.unwrap();
    assert_eq!(result.status, BuildStatus::Built, "{}", result.error_msg);
    let out = &result.output_paths(&store.dir).unwrap()["out"];
    assert_eq!(
        fs::read_to_string(out.as_str()).unwrap(),
        "hello from json\n"
    );
}

#[test]
fn paths_stream_from_one_store_to_another() {
    // The way nsh-push moves paths: one client's DumpStorePath written
    // straight into another's AddToStoreNar, never held whole.
    let from = TestStore::new();
    let outs = from.realise(&from.instantiate(CHAIN));
    let (to_dir, to_uri) = sharing_store_dir(&from);
    let t = to_dir.path().display();
    let d = from.dir.path().display();
    let mut target = serve_on(&to_uri, true);
    let mut source = from.serve(false);

    let closure = source.client.query_closure(&outs, false).unwrap();
    let infos =
        local_store::dependency_order(source.client.query_path_infos(&closure).unwrap()).unwrap();
    for info in &infos {
        let size = target
            .client
            .add_to_store_nar_with(info, |w| source.client.dump_store_path(&info.path, w))
            .unwrap();
        assert_eq!(size, info.nar_size);
    }
    let top = infos.last().unwrap();
    let all: Vec<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
    let mut valid = target.client.query_valid_paths(&all, false, false).unwrap();
    valid.sort();
    let mut want = all.clone();
    want.sort();
    assert_eq!(valid, want);
    // Files arrived intact.
    for path in &all {
        let there = PathBuf::from(format!("{t}/store")).join(path.basename());
        let here = PathBuf::from(path.as_str());
        if here.is_file() {
            assert_eq!(fs::read(&there).unwrap(), fs::read(&here).unwrap());
        }
    }
    // A size that does not match the path info is refused.
    let wrong = PathInfo {
        nar_size: top.nar_size + 8,
        path: StorePath::parse(&format!("{d}/store/00000000000000000000000000000000-wrong"))
            .unwrap(),
        ..top.clone()
    };
    let err = target
        .client
        .add_to_store_nar_with(&wrong, |w| source.client.dump_store_path(&top.path, w))
        .unwrap_err();
    assert!(
        err.message.contains("its path info says"),
        "{}",
        err.message
    );
}

#[test]
fn fixed_output_derivations_build_from_request_files() {
    // The output's hashAlgo/hash strings must reach the node exactly as in
    // the .drv, or the node computes another output path, or rejects the
    // output. Flat (sha256) and recursive (r:sha256) both.
    let s = TestStore::new();
    let sample = s.dir.path().join("sample");
    fs::write(&sample, "hello\n").unwrap();
    let nar_hash = s.run("nix-hash", &["--type", "sha256", sample.to_str().unwrap()]);
    let flat_hash = s.run(
        "nix-hash",
        &["--type", "sha256", "--flat", sample.to_str().unwrap()],
    );
    let store = s.local_store();
    for (mode, hash) in [("flat", &flat_hash), ("recursive", &nar_hash)] {
        let drv_path = s.instantiate(&format!(
            r#"builtins.derivation {{
                 name = "fixed-{mode}"; system = builtins.currentSystem; builder = "/bin/sh";
                 outputHashMode = "{mode}"; outputHashAlgo = "sha256"; outputHash = "{hash}";
                 args = [ "-c" "echo hello > $out" ];
               }}"#
        ));
        let drv = store.read_drv(&drv_path).unwrap();
        let out = &drv.outputs["out"];
        let algo = if mode == "flat" { "sha256" } else { "r:sha256" };
        assert_eq!(
            (out.hash_algo.as_str(), out.hash.as_str()),
            (algo, hash.as_str())
        );
        let request = s.dir.path().join(format!("request-{mode}"));
        let response = s.dir.path().join(format!("response-{mode}"));
        serve::write_build_request(
            fs::File::create(&request).unwrap(),
            &drv,
            &[] as &[String],
            &BuildOptions::default(),
        )
        .unwrap();
        let status = s
            .nix("nix-store")
            .args(["--serve", "--write"])
            .stdin(fs::File::open(&request).unwrap())
            .stdout(fs::File::create(&response).unwrap())
            .status()
            .unwrap();
        assert!(status.success());
        let result = serve::read_build_response(fs::File::open(&response).unwrap())
            .unwrap()
            .result
            .unwrap();
        assert_eq!(
            result.status,
            BuildStatus::Built,
            "{mode}: {}",
            result.error_msg
        );
        assert_eq!(
            Some(&result.output_paths(&store.dir).unwrap()["out"]),
            out.path.as_ref()
        );
    }
}
