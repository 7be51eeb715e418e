//! Contract tests of the slurmrestd codec against the published OpenAPI
//! descriptions of every API version nsh speaks (`slurm-openapi/`, copies of
//! the files described in its SOURCES.md), and against real answers captured
//! from the test cluster's Slurm 22.05 (`slurm-responses/`).
//!
//! * every request body nsh builds validates against that version's schema,
//!   strictly: a property the schema does not declare is an error (a typo
//!   or a field from another version would otherwise be silently dropped by
//!   the server);
//! * answers of each version's shape, generated from the schema and filled
//!   in with realistic values, validate against the schema and parse.
//!
//! The validator is a small JSON-schema subset: `$ref`, `type`, `properties`,
//! `additionalProperties`, `items`, `enum`, `required` (entries containing a
//! `/` are skipped: a generator quirk of v0.0.40+, see
//! `docs/reference/slurm.md`).
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::path::PathBuf;

use nsh_core::rest;
use nsh_core::rest::{ApiVersion, JobRequest, JobState};
use serde_json::{json, Value};

struct Spec {
    version: ApiVersion,
    doc: Value,
}

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

impl Spec {
    fn load(version: ApiVersion) -> Spec {
        let file = format!("v00{}.openapi.json", version.minor());
        let text = std::fs::read_to_string(dir("slurm-openapi").join(&file)).unwrap();
        Spec {
            version,
            doc: serde_json::from_str(&text).unwrap(),
        }
    }

    /// The operation `method` of the `/slurm/vX{suffix}` path (v0.0.38's
    /// spec writes paths relative to its server URL).
    fn operation(&self, suffix: &str, method: &str) -> &Value {
        let want = format!("/slurm/{}{}", self.version, suffix);
        let norm = |p: &str| p.trim_end_matches('/').to_string();
        let paths = self.doc["paths"].as_object().unwrap();
        let (_, item) = paths
            .iter()
            .find(|(k, _)| norm(k) == norm(&want) || norm(k) == norm(suffix))
            .unwrap_or_else(|| panic!("{}: no path {want}", self.version));
        item.get(method)
            .unwrap_or_else(|| panic!("{}: no {method} {want}", self.version))
    }

    fn request_schema(&self, suffix: &str, method: &str) -> &Value {
        &self.operation(suffix, method)["requestBody"]["content"]["application/json"]["schema"]
    }

    /// The JSON schema of the answer `status` ("200", "default"), if any.
    fn response_schema(&self, suffix: &str, method: &str, status: &str) -> Option<&Value> {
        self.operation(suffix, method)["responses"]
            .get(status)?
            .get("content")?
            .get("application/json")?
            .get("schema")
    }

    fn resolve<'a>(&'a self, mut schema: &'a Value) -> &'a Value {
        while let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            let pointer = reference.strip_prefix('#').expect("local $ref");
            schema = self
                .doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("{}: dangling $ref {reference}", self.version));
        }
        schema
    }

    /// Validates `value`; `strict` rejects properties the schema does not
    /// declare (for what nsh sends).
    fn validate(&self, schema: &Value, value: &Value, strict: bool) -> Vec<String> {
        let mut errors = Vec::new();
        self.check(schema, value, "$", strict, &mut errors);
        errors
    }

    fn check(
        &self,
        schema: &Value,
        value: &Value,
        at: &str,
        strict: bool,
        errors: &mut Vec<String>,
    ) {
        let schema = self.resolve(schema);
        // Real answers carry `null` for unset fields (22.05 does, widely);
        // nsh never sends one.
        if value.is_null() && !strict {
            return;
        }
        if let Some(options) = schema.get("enum").and_then(Value::as_array) {
            if !options.contains(value) {
                errors.push(format!("{at}: {value} is not one of {options:?}"));
            }
        }
        let ty = schema
            .get("type")
            .and_then(Value::as_str)
            .or_else(|| schema.get("properties").map(|_| "object"));
        let ok = match ty {
            None => true,
            Some("object") => value.is_object(),
            Some("array") => value.is_array(),
            Some("string") => value.is_string(),
            Some("integer") => value.is_i64() || value.is_u64(),
            Some("number") => value.is_number(),
            Some("boolean") => value.is_boolean(),
            Some(other) => panic!("{}: schema type {other} at {at}", self.version),
        };
        if !ok {
            errors.push(format!("{at}: {value} is not of type {}", ty.unwrap()));
            return;
        }
        if let Value::Object(object) = value {
            let properties = schema.get("properties").and_then(Value::as_object);
            for (key, item) in object {
                let at = format!("{at}.{key}");
                match properties.and_then(|p| p.get(key)) {
                    Some(sub) => self.check(sub, item, &at, strict, errors),
                    None => match schema.get("additionalProperties") {
                        Some(Value::Bool(true)) => {}
                        Some(sub @ Value::Object(_)) => self.check(sub, item, &at, strict, errors),
                        // A free-form object (v0.0.38's environment dict)
                        // declares no properties at all.
                        _ if strict && properties.is_some() => {
                            errors.push(format!("{at}: not in the schema"));
                        }
                        _ => {}
                    },
                }
            }
            for name in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .filter(|name| !name.contains('/'))
            {
                if !object.contains_key(name) {
                    errors.push(format!("{at}: required {name} is missing"));
                }
            }
        }
        if let (Value::Array(items), Some(item_schema)) = (value, schema.get("items")) {
            for (i, item) in items.iter().enumerate() {
                self.check(item_schema, item, &format!("{at}[{i}]"), strict, errors);
            }
        }
    }

    /// An instance of `schema` with every property filled in (to a depth).
    fn sample(&self, schema: &Value, depth: u32) -> Value {
        let schema = self.resolve(schema);
        if let Some(first) = schema
            .get("enum")
            .and_then(Value::as_array)
            .and_then(|e| e.first())
        {
            return first.clone();
        }
        let ty = schema
            .get("type")
            .and_then(Value::as_str)
            .or_else(|| schema.get("properties").map(|_| "object"));
        match ty {
            Some("object") => {
                let mut object = serde_json::Map::new();
                if depth < 16 {
                    for (key, sub) in schema
                        .get("properties")
                        .and_then(Value::as_object)
                        .into_iter()
                        .flatten()
                    {
                        object.insert(key.clone(), self.sample(sub, depth + 1));
                    }
                }
                Value::Object(object)
            }
            Some("array") if depth < 8 => match schema.get("items") {
                Some(items) => json!([self.sample(items, depth + 1)]),
                None => json!([]),
            },
            Some("array") => json!([]),
            Some("string") => json!("x"),
            Some("integer") => json!(1),
            Some("number") => json!(1.5),
            Some("boolean") => json!(false),
            _ => Value::Null,
        }
    }

    /// The schema of property `name` of `schema` (resolved).
    fn property<'a>(&'a self, schema: &'a Value, name: &str) -> &'a Value {
        self.resolve(&self.resolve(schema)["properties"][name])
    }
}

fn request() -> JobRequest {
    JobRequest {
        name: "nsh-hello".into(),
        script: nsh_core::alloc::batch_script::SCRIPT.into(),
        env: vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("NSH_WORK_ROOT".into(), "/tmp/nsh".into()),
            ("NSH_NONCE".into(), "0123456789abcdef".into()),
        ],
        partition: Some("build".into()),
        account: Some("nix".into()),
        qos: Some("normal".into()),
        constraint: Some("big&kvm".into()),
        gres: Some("gpu:1".into()),
        cpus: Some(4),
        mem_mb: Some(8192),
        time_min: 120,
        work_dir: "/".into(),
        stdout: "/dev/null".into(),
        comment: Some("nsh:abc".into()),
        exclude: vec!["node1".into(), "node3".into()],
    }
}

/// Empties `errors`/`warnings` the sample generator filled in.
fn no_errors(body: &mut Value) {
    for key in ["errors", "warnings"] {
        if body.get(key).is_some() {
            body[key] = json!([]);
        }
    }
}

#[test]
fn request_bodies_validate_strictly_against_every_version() {
    let minimal = JobRequest {
        partition: None,
        account: None,
        qos: None,
        constraint: None,
        gres: None,
        cpus: None,
        mem_mb: None,
        ..request()
    };
    for version in ApiVersion::ALL {
        let spec = Spec::load(version);
        let schema = spec.request_schema("/job/submit", "post");
        for req in [request(), minimal.clone()] {
            let body = rest::submit_body(version, &req);
            let errors = spec.validate(schema, &body, true);
            assert!(errors.is_empty(), "{version}: {errors:#?}\n{body:#}");
        }
    }
}

#[test]
fn the_validator_catches_wrong_bodies() {
    // v0.0.38 wants a dictionary environment; v0.0.39+ a list.
    let v38 = Spec::load(ApiVersion::V0038);
    let v41 = Spec::load(ApiVersion::V0041);
    let body38 = rest::submit_body(ApiVersion::V0038, &request());
    let body41 = rest::submit_body(ApiVersion::V0041, &request());
    assert!(!v41
        .validate(v41.request_schema("/job/submit", "post"), &body38, true)
        .is_empty());
    assert!(!v38
        .validate(v38.request_schema("/job/submit", "post"), &body41, true)
        .is_empty());
    let mut typo = body41.clone();
    typo["job"]["partiton"] = json!("build");
    let errors = v41.validate(v41.request_schema("/job/submit", "post"), &typo, true);
    assert_eq!(errors, ["$.job.partiton: not in the schema"]);
    // v0.0.38 requires the top-level script.
    let mut no_script = body38.clone();
    no_script.as_object_mut().unwrap().remove("script");
    let errors = v38.validate(v38.request_schema("/job/submit", "post"), &no_script, true);
    assert_eq!(errors, ["$: required script is missing"]);
}

#[test]
fn generated_answers_of_every_version_parse() {
    for version in ApiVersion::ALL {
        let spec = Spec::load(version);
        submit_answer(&spec, version);
        job_answers(&spec, version);
        ping_answer(&spec, version);
        cancel_answer(&spec, version);
        error_answer(&spec, version);
    }
}

/// The submit answer: the job id.
fn submit_answer(spec: &Spec, version: ApiVersion) {
    let schema = spec.response_schema("/job/submit", "post", "200").unwrap();
    let mut body = spec.sample(schema, 0);
    no_errors(&mut body);
    body["job_id"] = json!(4242);
    assert_eq!(
        spec.validate(schema, &body, false),
        Vec::<String>::new(),
        "{version}"
    );
    assert_eq!(
        rest::parse_submit(200, &body.to_string()).unwrap(),
        4242,
        "{version}"
    );
}

/// Job state: running, then ended with `exit 3`.
fn job_answers(spec: &Spec, version: ApiVersion) {
    let schema = spec.response_schema("/job/{job_id}", "get", "200").unwrap();
    let job_schema = spec.resolve(&spec.property(schema, "jobs")["items"]);
    let state_is_array = spec.property(job_schema, "job_state")["type"] == "array";
    let state = |s: &str| if state_is_array { json!([s]) } else { json!(s) };
    let mut body = spec.sample(schema, 0);
    no_errors(&mut body);
    body["jobs"][0]["job_id"] = json!(4242);
    body["jobs"][0]["job_state"] = state("RUNNING");
    body["jobs"][0]["batch_host"] = json!("node2");
    body["jobs"][0]["state_reason"] = json!("None");
    assert_eq!(
        spec.validate(schema, &body, false),
        Vec::<String>::new(),
        "{version}"
    );
    let job = rest::parse_job(4242, 200, &body.to_string()).unwrap();
    assert!(job.is_running(), "{version}: {job:?}");
    assert_eq!(job.node.as_deref(), Some("node2"));
    assert_eq!(job.reason, None);

    body["jobs"][0]["job_state"] = state("FAILED");
    let exit_schema = spec.property(job_schema, "exit_code");
    body["jobs"][0]["exit_code"] = if exit_schema["type"] == "integer" {
        json!(3 << 8) // a wait status
    } else if exit_schema["properties"].get("return_code").is_some() {
        json!({"status": ["ERROR"], "return_code": {"set": true, "infinite": false, "number": 3}})
    } else {
        json!({"set": true, "infinite": false, "number": 3 << 8})
    };
    assert_eq!(
        spec.validate(schema, &body, false),
        Vec::<String>::new(),
        "{version}"
    );
    let job = rest::parse_job(4242, 200, &body.to_string()).unwrap();
    assert_eq!(job.state, JobState::Failed, "{version}");
    assert_eq!(job.exit_code, Some(3), "{version}");
}

/// Ping: the release, under `Slurm` or `slurm`.
fn ping_answer(spec: &Spec, version: ApiVersion) {
    let schema = spec.response_schema("/ping", "get", "200").unwrap();
    let mut body = spec.sample(schema, 0);
    let meta = body["meta"].as_object_mut().unwrap();
    let key = if meta.contains_key("slurm") {
        "slurm"
    } else {
        "Slurm"
    };
    meta[key]["release"] = json!("25.11.2");
    assert_eq!(
        spec.validate(schema, &body, false),
        Vec::<String>::new(),
        "{version}"
    );
    assert_eq!(
        rest::server_release(&body).as_deref(),
        Some("25.11.2"),
        "{version}"
    );
}

/// Cancel: v0.0.38 answers without a body.
fn cancel_answer(spec: &Spec, version: ApiVersion) {
    match spec.response_schema("/job/{job_id}", "delete", "200") {
        None => rest::parse_cancel(4242, 200, "").unwrap(),
        Some(schema) => {
            let mut body = spec.sample(schema, 0);
            no_errors(&mut body);
            if let Some(entries) = body.get_mut("status").and_then(Value::as_array_mut) {
                for entry in entries {
                    entry["error"]["code"] = json!(0);
                }
            }
            assert_eq!(
                spec.validate(schema, &body, false),
                Vec::<String>::new(),
                "{version}"
            );
            rest::parse_cancel(4242, 200, &body.to_string()).unwrap();
        }
    }
}

/// An error answer: transient, with Slurm's words.
fn error_answer(spec: &Spec, version: ApiVersion) {
    let schema = spec
        .response_schema("/job/{job_id}", "get", "default")
        .or_else(|| spec.response_schema("/job/{job_id}", "get", "200"))
        .unwrap();
    let mut body = spec.sample(schema, 0);
    no_errors(&mut body);
    let mut error = spec.sample(&spec.property(schema, "errors")["items"], 0);
    error["error"] = json!("Invalid job id specified");
    body["errors"] = json!([error]);
    assert_eq!(
        spec.validate(schema, &body, false),
        Vec::<String>::new(),
        "{version}"
    );
    let failure = rest::parse_job(4242, 500, &body.to_string()).unwrap_err();
    assert_eq!(failure.kind, nsh_core::Kind::Transient);
    assert!(
        failure
            .message
            .contains("HTTP 500: Invalid job id specified"),
        "{version}: {}",
        failure.message
    );
}

/// The captured answers that refuse: cancels, an unknown job, a bad token,
/// a bad submission.
fn real_refusals_from_slurm_22_05() {
    let (status, body, _) = captured("cancel");
    rest::parse_cancel(1, status, &body).unwrap();

    let (status, body, _) = captured("cancel-unknown");
    let failure = rest::parse_cancel(999_999, status, &body).unwrap_err();
    assert!(
        failure
            .message
            .contains("HTTP 500: Invalid job id specified"),
        "{}",
        failure.message
    );

    let (status, body, _) = captured("job-unknown");
    let failure = rest::parse_job(999_999, status, &body).unwrap_err();
    assert!(
        failure.message.contains("Unable to find JobId=999999"),
        "{}",
        failure.message
    );

    let (status, body, _) = captured("ping-bad-token");
    let failure = rest::check("ping", status, &body).unwrap_err();
    assert_eq!(failure.kind, nsh_core::Kind::Transient);
    assert!(failure.message.contains("HTTP 500"), "{}", failure.message);

    // 22.05's parser errors use `error_code`, not `error_number`.
    let (status, body, _) = captured("submit-no-environment");
    let failure = rest::parse_submit(status, &body).unwrap_err();
    assert!(
        failure
            .message
            .contains("HTTP 400: environment must be set"),
        "{}",
        failure.message
    );
}

/// A captured answer: `{"status": 200, "body": "<text>"}`.
fn captured(name: &str) -> (u16, String, Value) {
    let path = dir("slurm-responses")
        .join("v0.0.38")
        .join(format!("{name}.json"));
    let file: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let body = file["body"].as_str().unwrap().to_string();
    let parsed = serde_json::from_str(&body).unwrap_or(Value::Null);
    (
        u16::try_from(file["status"].as_u64().unwrap()).unwrap(),
        body,
        parsed,
    )
}

#[test]
fn real_answers_from_slurm_22_05() {
    let spec = Spec::load(ApiVersion::V0038);
    let job_schema = spec.response_schema("/job/{job_id}", "get", "200").unwrap();

    // The one place where 22.05.8 differs from its own spec: the version
    // numbers in meta are integers, not strings.
    let meta_numbers = [
        "$.meta.Slurm.version.major: 22 is not of type string",
        "$.meta.Slurm.version.micro: 8 is not of type string",
        "$.meta.Slurm.version.minor: 5 is not of type string",
    ];
    let (status, body, value) = captured("ping");
    assert_eq!(
        spec.validate(
            spec.response_schema("/ping/", "get", "200").unwrap(),
            &value,
            false
        ),
        meta_numbers
    );
    rest::check("ping", status, &body).unwrap();
    assert_eq!(rest::server_release(&value).as_deref(), Some("22.05.8"));

    let (status, body, value) = captured("submit");
    assert_eq!(
        spec.validate(
            spec.response_schema("/job/submit", "post", "200").unwrap(),
            &value,
            false
        ),
        meta_numbers
    );
    assert!(rest::parse_submit(status, &body).unwrap() > 0);

    let job_id = |v: &Value| v["jobs"][0]["job_id"].as_u64().unwrap();
    let (status, body, value) = captured("job-pending");
    assert_eq!(spec.validate(job_schema, &value, false), meta_numbers);
    let job = rest::parse_job(job_id(&value), status, &body).unwrap();
    assert_eq!(
        (job.state, job.node, job.exit_code.is_some()),
        (JobState::Pending, None, true)
    );

    let (status, body, value) = captured("job-running");
    let job = rest::parse_job(job_id(&value), status, &body).unwrap();
    assert!(job.is_running());
    assert_eq!(job.node.as_deref(), Some("node2"));
    assert!(job.start.is_some());

    // The script ran `exit 3`; Slurm 22.05 reports the wait status 768.
    let (status, body, value) = captured("job-failed");
    assert_eq!(value["jobs"][0]["exit_code"], 768);
    let job = rest::parse_job(job_id(&value), status, &body).unwrap();
    assert_eq!((job.state, job.exit_code), (JobState::Failed, Some(3)));
    assert_eq!(job.reason.as_deref(), Some("NonZeroExitCode"));

    let (status, body, value) = captured("job-cancelled");
    let job = rest::parse_job(job_id(&value), status, &body).unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert!(job.state.is_finished());

    real_refusals_from_slurm_22_05();
}
