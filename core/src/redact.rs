//! Tickets made fit for snapshots (`nsh-redact`): every value that changes
//! from one run of the same pipeline to the next is replaced by a stable
//! placeholder, and everything else, the keys and their order included, is
//! kept, so that a snapshot still shows the shape of the tickets.
//!
//! Identities (a Slurm job, a node, a store hash, a nonce) become numbered
//! placeholders, `<JOB:1>`, `<NODE:2>`, `<HASH:3>`, numbered in the order
//! they are first seen in the stream, so that the same job or path stays the
//! same placeholder across fields and tickets and two different ones stay
//! apart. Measurements (times, durations, counts that depend on timing) and
//! what differs between installations (the Slurm release, the slurmrestd
//! API version, the directory of the ssh control sockets) become a plain
//! placeholder. `docs/snapshots.md` lists every rule and why.

use std::collections::HashMap;
use std::io::{BufRead, Write};

use serde_json::{Map, Value};

use crate::error::{Failure, Kind, ResultExt};
use crate::exit::ExitStatus;

/// Rewrites tickets; keeps the numbering of what it has seen, so that one
/// `Redactor` is used for a whole stream.
#[derive(Debug, Default)]
pub struct Redactor {
    /// Store hash parts → `<HASH:n>`.
    hashes: Numbering,
    /// Slurm job ids → `<JOB:n>`.
    jobs: Numbering,
    /// Node names → `<NODE:n>`.
    nodes: Numbering,
    /// Job nonces → `<NONCE:n>`.
    nonces: Numbering,
    /// Process ids → `<PID:n>`.
    pids: Numbering,
    /// IPv4 addresses, with their port → `<ADDR:n>`.
    addresses: Numbering,
    /// Random temporary names (`.tmpXXXXXX`, `tmp.XXXXXXXXXX`) → `<TEMP:n>`.
    temps: Numbering,
    /// Whole strings seen in a ticket (a job's work directory, its control
    /// socket) → what they become, replaced wherever they occur.
    literals: Vec<(String, String)>,
}

/// Values of one kind, numbered from 1 in the order they were first seen.
#[derive(Debug, Default)]
struct Numbering(HashMap<String, usize>);

impl Numbering {
    /// `<KIND:n>` for `value`, the same `n` each time it is asked.
    fn placeholder(&mut self, kind: &str, value: &str) -> String {
        let next = self.0.len() + 1;
        let n = *self.0.entry(value.to_string()).or_insert(next);
        format!("<{kind}:{n}>")
    }

    fn contains(&self, value: &str) -> bool {
        self.0.contains_key(value)
    }
}

/// A time of day (seconds since the epoch).
const TIME: &str = "<TIME>";
/// A duration in seconds.
const SECS: &str = "<SECS>";
/// A count that depends on timing (how often Slurm was polled) or on the
/// node's Nix (`times_built`).
const COUNT: &str = "<COUNT>";

impl Redactor {
    /// A redactor that has seen nothing yet.
    pub fn new() -> Redactor {
        Redactor::default()
    }

    /// Reads tickets (one JSON object per line) from `input` and writes each,
    /// redacted, to `output`: one line each, or indented over several lines
    /// with `pretty` (for a snapshot a person reads). Blank lines are skipped.
    ///
    /// Returns the status of the first ticket that carries an `error`, as
    /// every tool does, or `Ok`; a line that is not a JSON object is bad
    /// input (it stops the stream: numbering after it would be a guess).
    pub fn stream(
        &mut self,
        input: impl BufRead,
        mut output: impl Write,
        pretty: bool,
    ) -> Result<ExitStatus, Failure> {
        let mut status = ExitStatus::Ok;
        for (index, line) in input.lines().enumerate() {
            let line = line.or_fail(Kind::Transient, || "reading stdin".to_string())?;
            if line.trim().is_empty() {
                continue;
            }
            let ticket: Value = match serde_json::from_str(&line) {
                Ok(value @ Value::Object(_)) => value,
                Ok(_) => {
                    return Err(Failure::input(format!(
                        "line {}: not a ticket: not a JSON object",
                        index + 1
                    )))
                }
                Err(e) => {
                    return Err(Failure::input(format!(
                        "line {}: not a ticket: {e}",
                        index + 1
                    )))
                }
            };
            if status == ExitStatus::Ok {
                status = error_status(&ticket);
            }
            let redacted = self.ticket(&ticket);
            let line = if pretty {
                // Plain data with string keys: serialising cannot fail.
                serde_json::to_string_pretty(&redacted).unwrap_or_else(|_| redacted.to_string())
            } else {
                redacted.to_string()
            };
            writeln!(output, "{line}")
                .and_then(|()| output.flush())
                .or_fail(Kind::Transient, || "writing stdout".to_string())?;
        }
        Ok(status)
    }

    /// One ticket, redacted. `ticket` is any JSON value; a ticket of a newer
    /// nsh, or a site's own fields, go through the same rules (strings are
    /// searched for store paths, jobs, nodes…, values under a `secs` key are
    /// durations).
    pub fn ticket(&mut self, ticket: &Value) -> Value {
        if let Some(alloc) = ticket.get("alloc").and_then(Value::as_object) {
            self.learn_alloc(alloc);
        }
        self.value(&mut Vec::new(), ticket)
    }

    /// Numbers the job, node and nonce of an `alloc` section, and learns
    /// what its work directory and control socket become, before any other
    /// field (a message may name them) is rewritten.
    fn learn_alloc(&mut self, alloc: &Map<String, Value>) {
        let job = alloc
            .get("job")
            .map(number_text)
            .filter(|job| !job.is_empty());
        let redacted_job = job.as_ref().map(|job| self.jobs.placeholder("JOB", job));
        if let Some(node) = alloc
            .get("node")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            self.nodes.placeholder("NODE", node);
        }
        if let Some(nonce) = alloc
            .get("nonce")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            let redacted = self.nonces.placeholder("NONCE", nonce);
            self.learn_literal(nonce, &redacted);
        }
        let (Some(job), Some(redacted_job)) = (job, redacted_job) else {
            return;
        };
        let with_job = |path: &str| ends_with_job(path, &job, &redacted_job);
        if let Some(work) = alloc.get("work").and_then(Value::as_str) {
            if let Some(redacted) = with_job(work) {
                self.learn_literal(work, &redacted);
            }
        }
        if let Some(control) = alloc.get("control").and_then(Value::as_str) {
            // The socket's directory is the user's runtime directory (or
            // /tmp/nsh-<uid>): it differs between users and machines.
            if let Some((dir, file)) = control.rsplit_once('/').filter(|(dir, _)| !dir.is_empty()) {
                let file = with_job(file).unwrap_or_else(|| file.to_string());
                self.learn_literal(control, &format!("<CONTROL-DIR>/{file}"));
                self.learn_literal(dir, "<CONTROL-DIR>");
            }
        }
    }

    fn learn_literal(&mut self, original: &str, redacted: &str) {
        if self.literals.iter().any(|(known, _)| known == original) {
            return;
        }
        self.literals
            .push((original.to_string(), redacted.to_string()));
        // Longest first, so that a socket's path is replaced before its
        // directory alone.
        self.literals
            .sort_by_key(|(original, _)| std::cmp::Reverse(original.len()));
    }

    /// `value`, found under the keys `path`, redacted.
    fn value(&mut self, path: &mut Vec<String>, value: &Value) -> Value {
        if let Some(placeholder) = self.by_field(path, value) {
            return placeholder;
        }
        match value {
            Value::String(text) => Value::String(self.text(text)),
            Value::Array(items) => {
                Value::Array(items.iter().map(|item| self.value(path, item)).collect())
            }
            Value::Object(map) => {
                let mut out = Map::with_capacity(map.len());
                for (key, item) in map {
                    path.push(key.clone());
                    out.insert(key.clone(), self.value(path, item));
                    path.pop();
                }
                Value::Object(out)
            }
            Value::Number(_) | Value::Bool(_) | Value::Null => value.clone(),
        }
    }

    /// The placeholder a field gets by where it is, if it has one.
    fn by_field(&mut self, path: &[String], value: &Value) -> Option<Value> {
        let keys: Vec<&str> = path.iter().map(String::as_str).collect();
        let placeholder = match keys.as_slice() {
            ["alloc", "job"] => self.jobs.placeholder("JOB", &number_text(value)),
            ["alloc", "node"] => self.nodes.placeholder("NODE", value.as_str()?),
            // What the cluster runs, not what this run did: a snapshot
            // taken on one Slurm stays valid on the next.
            ["alloc", "api"] => "<API-VERSION>".into(),
            ["alloc", "slurm"] => "<SLURM-VERSION>".into(),
            ["run", "start" | "stop"] | ["hook", "accepted"] => TIME.into(),
            // With allocation reuse, which job a build gets, its age and
            // its request number depend on what ran before.
            ["alloc", "age"] => SECS.into(),
            ["alloc", "request"] => COUNT.into(),
            ["alloc", "reused"] => "<REUSED>".into(),
            // 1 for a build, but 0 from a node on Nix 2.34.8, which sends
            // 0 whatever happened (docs/reference/versions.md).
            ["run", "times_built"] => COUNT.into(),
            ["hook", "stages", _] => SECS.into(),
            [.., "pid"] => self.pids.placeholder("PID", &number_text(value)),
            [.., "secs"] => return Some(durations(value)),
            _ => return None,
        };
        Some(Value::String(placeholder))
    }

    /// A string with every volatile part inside it replaced.
    fn text(&mut self, text: &str) -> String {
        let mut text = text.to_string();
        for (original, redacted) in &self.literals {
            if text.contains(original.as_str()) {
                text = text.replace(original.as_str(), redacted);
            }
        }
        // Each pass leaves the placeholders of the passes before it alone
        // (`<JOB:1>` has a number after a word).
        let passes: [fn(&mut Redactor, &str) -> String; 6] = [
            Redactor::store_hashes,
            Redactor::node_names,
            |r, text| r.mentions(text, &["job", "jobid", "job_id"], |r| &mut r.jobs, "JOB"),
            |r, text| r.mentions(text, &["pid"], |r| &mut r.pids, "PID"),
            Redactor::ipv4_addresses,
            Redactor::temp_names,
        ];
        for pass in passes {
            text = outside_placeholders(&text, |part| pass(self, part));
        }
        text
    }

    /// `/<32 nix-base32 characters>-` anywhere (any store directory) → the
    /// hash part numbered.
    fn store_hashes(&mut self, text: &str) -> String {
        const HASH_LEN: usize = 32;
        let bytes = text.as_bytes();
        let mut out = String::with_capacity(text.len());
        let mut copied = 0;
        let mut i = 0;
        while i < bytes.len() {
            let is_hash = bytes[i] == b'/'
                && bytes.get(i + 1 + HASH_LEN) == Some(&b'-')
                && bytes[i + 1..=i + HASH_LEN]
                    .iter()
                    .all(|b| crate::nix::hash::NIX_BASE32.contains(b));
            if is_hash {
                out.push_str(&text[copied..=i]);
                out.push_str(&self.hashes.placeholder("HASH", &text[i + 1..=i + HASH_LEN]));
                i += 1 + HASH_LEN;
                copied = i;
            } else {
                i += 1;
            }
        }
        out.push_str(&text[copied..]);
        out
    }

    /// Every node name seen in an `alloc` section, as a whole word.
    fn node_names(&mut self, text: &str) -> String {
        replace_words(text, |word| {
            self.nodes
                .contains(word)
                .then(|| self.nodes.placeholder("NODE", word))
        })
    }

    /// A number that follows one of `words` (`job 42`, `JobId=42`, `pid
    /// 7`), whole words in any case, numbered in `numbering`.
    fn mentions(
        &mut self,
        text: &str,
        words: &[&str],
        numbering: fn(&mut Redactor) -> &mut Numbering,
        kind: &str,
    ) -> String {
        let mut previous_word = String::new();
        let mut out = String::with_capacity(text.len());
        for token in tokens(text) {
            if token.is_word && token.text.bytes().all(|b| b.is_ascii_digit()) {
                let after_word = words.iter().any(|w| previous_word.eq_ignore_ascii_case(w));
                if after_word && token.separator_before {
                    out.push_str(&numbering(self).placeholder(kind, token.text));
                    previous_word.clear();
                    continue;
                }
            }
            if token.is_word {
                previous_word = token.text.to_string();
            } else if !matches!(token.text, " " | "=" | "#" | ":") {
                previous_word.clear();
            }
            out.push_str(token.text);
        }
        out
    }

    /// `a.b.c.d` and `a.b.c.d:port` → `<ADDR:n>`.
    fn ipv4_addresses(&mut self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
            let (before, from) = rest.split_at(start);
            out.push_str(before);
            let preceded_by_number = out.ends_with(|c: char| c.is_ascii_alphanumeric() || c == '.');
            let (len, is_address) = match ipv4_len(from).filter(|_| !preceded_by_number) {
                Some(len) => (len, true),
                None => (
                    from.find(|c: char| !c.is_ascii_digit())
                        .unwrap_or(from.len()),
                    false,
                ),
            };
            if is_address {
                out.push_str(&self.addresses.placeholder("ADDR", &from[..len]));
            } else {
                out.push_str(&from[..len]);
            }
            rest = &from[len..];
        }
        out.push_str(rest);
        out
    }

    /// The random file names `mktemp` (`tmp.XXXXXXXXXX`) and Rust's
    /// `tempfile` (`.tmpXXXXXX`) make, each at the start of a path
    /// component → `<TEMP:n>`.
    fn temp_names(&mut self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some((start, len)) = next_temp_name(rest) {
            out.push_str(&rest[..start]);
            out.push_str(&self.temps.placeholder("TEMP", &rest[start..start + len]));
            rest = &rest[start + len..];
        }
        out.push_str(rest);
        out
    }
}

/// Where the next random temporary name in `text` starts, and its length.
fn next_temp_name(text: &str) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    (0..bytes.len()).find_map(|start| {
        let at_component_start =
            start == 0 || matches!(bytes[start - 1], b'/' | b' ' | b'\'' | b'"' | b'(');
        if !at_component_start {
            return None;
        }
        let random_len = [(".tmp", 6), ("tmp.", 10)]
            .iter()
            .find(|(prefix, _)| text[start..].starts_with(prefix))
            .map(|(prefix, len)| (prefix.len(), *len))?;
        let (prefix_len, len) = random_len;
        let run = bytes[start + prefix_len..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        (run == len).then_some((start, prefix_len + len))
    })
}

/// `text` with `rewrite` applied to the parts between placeholders
/// (`<NAME>`, `<NAME:n>`).
fn outside_placeholders(text: &str, mut rewrite: impl FnMut(&str) -> String) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some((start, len)) = next_placeholder(rest) {
        out.push_str(&rewrite(&rest[..start]));
        out.push_str(&rest[start..start + len]);
        rest = &rest[start + len..];
    }
    out.push_str(&rewrite(rest));
    out
}

/// Where the next placeholder in `text` starts, and its length.
fn next_placeholder(text: &str) -> Option<(usize, usize)> {
    text.match_indices('<').find_map(|(start, _)| {
        let inner = &text[start + 1..];
        let end = inner.find('>')?;
        let (name, number) = inner[..end].split_once(':').unwrap_or((&inner[..end], "1"));
        let is_placeholder = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_uppercase() || b == b'-')
            && !number.is_empty()
            && number.bytes().all(|b| b.is_ascii_digit());
        is_placeholder.then_some((start, end + 2))
    })
}

/// Every number in a `secs` value (one duration, or an object of them) → a
/// placeholder: `<SECS>` for a duration (written with a fraction), `<COUNT>`
/// for a whole number beside them (nsh-alloc's `polls`).
fn durations(value: &Value) -> Value {
    match value {
        Value::Number(_) => Value::String(SECS.into()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, item)| {
                    let item = match item {
                        Value::Number(n) if n.is_f64() => Value::String(SECS.into()),
                        Value::Number(_) => Value::String(COUNT.into()),
                        other => durations(other),
                    };
                    (key.clone(), item)
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The status a ticket's `error` means (its `kind`), or `Ok`.
fn error_status(ticket: &Value) -> ExitStatus {
    let Some(error) = ticket.get("error") else {
        return ExitStatus::Ok;
    };
    let kind = error
        .get("kind")
        .and_then(|kind| serde_json::from_value::<Kind>(kind.clone()).ok())
        .unwrap_or(Kind::Permanent);
    ExitStatus::of(kind)
}

/// A job id or pid as text, whether written as a number or a string.
fn number_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// `path` with the job id that ends it (`/tmp/nsh/nsh-42`, `test-42`)
/// replaced, if it ends so.
fn ends_with_job(path: &str, job: &str, redacted: &str) -> Option<String> {
    let head = path.strip_suffix(job)?;
    head.ends_with(['-', '/'])
        .then(|| format!("{head}{redacted}"))
}

/// The length of the IPv4 address (with `:port`) that starts `text`.
fn ipv4_len(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = 0;
    for part in 0..4 {
        let digits = bytes[i..].iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=3).contains(&digits) {
            return None;
        }
        i += digits;
        if part < 3 {
            if bytes.get(i) != Some(&b'.') {
                return None;
            }
            i += 1;
        }
    }
    // A fifth number (`1.2.3.4.5`) makes it something else.
    if bytes.get(i) == Some(&b'.') && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    if bytes.get(i) == Some(&b':') {
        let port = bytes[i + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        i += 1 + port;
        if port == 0 {
            i -= 1;
        }
    }
    Some(i)
}

/// A piece of text: a word (letters, digits, `_`, `-`) or one other
/// character (a `.` too, so that `node1.` at the end of a sentence, or
/// `node1.example.org`, has the word `node1`).
struct Token<'a> {
    text: &'a str,
    is_word: bool,
    /// A word directly after one separator (` `, `=`, `#`, `:`).
    separator_before: bool,
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '-')
}

fn tokens(text: &str) -> Vec<Token<'_>> {
    let mut out: Vec<Token<'_>> = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if is_word_char(c) {
            let end = loop {
                match chars.peek() {
                    Some(&(_, next)) if is_word_char(next) => {
                        chars.next();
                    }
                    Some(&(j, _)) => break j,
                    None => break text.len(),
                }
            };
            let separator_before = out
                .last()
                .is_some_and(|t| matches!(t.text, " " | "=" | "#" | ":"));
            out.push(Token {
                text: &text[i..end],
                is_word: true,
                separator_before,
            });
        } else {
            out.push(Token {
                text: &text[i..i + c.len_utf8()],
                is_word: false,
                separator_before: false,
            });
        }
    }
    out
}

/// `text` with each whole word for which `replace` has an answer replaced.
fn replace_words(text: &str, mut replace: impl FnMut(&str) -> Option<String>) -> String {
    tokens(text)
        .into_iter()
        .map(|token| {
            if token.is_word {
                if let Some(replaced) = replace(token.text) {
                    return replaced;
                }
            }
            token.text.to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole pipeline's ticket as nsh-fetch writes it (bookworm's
    /// cluster), with a site's own field.
    const FETCHED: &str = concat!(
        r#"{"v":1,"drv":{"path":"/nix/store/xps6s36j325jrz0syj4dz75mrj71nwf1-nsh-snap.drv","name":"nsh-snap","system":"x86_64-linux","features":[],"outputs":{"out":"/nix/store/s8mdsg7j6j6m26jk59b1gm20hy1dixj4-nsh-snap"},"wanted":["out"]},"#,
        r#""store":{"dir":"/nix/store","uri":"auto"},"#,
        r#""closure":{"paths":["/nix/store/gsrsn8pm5dfmcbch8phiiif8zy7zpdmk-nsh-snap-input"],"nar_size":136},"#,
        r#""alloc":{"cluster":"test","backend":"rest","api":"v0.0.38","slurm":"22.05.8","job":2,"node":"node1","ssh":"nixbuild@node1","work":"/tmp/nsh/nsh-2","control":"/tmp/nsh-0/test-2","nonce":"821d54682493850513bc8e2a57c06166","request":1,"secs":{"connect":0.034,"submit":0.003,"queued":0.444,"polls":5,"polling":0.033}},"#,
        r#""push":{"copied":1,"present":0,"bytes":136,"secs":0.572172572},"#,
        r#""run":{"status":"built","times_built":1,"start":1796078905,"stop":1796078905,"built_outputs":{"out":"/nix/store/s8mdsg7j6j6m26jk59b1gm20hy1dixj4-nsh-snap"}},"#,
        r#""fetch":{"paths":["/nix/store/s8mdsg7j6j6m26jk59b1gm20hy1dixj4-nsh-snap"],"bytes":136,"secs":0.534247208},"#,
        r#""site":{"queue":"night"}}"#
    );

    /// The same pipeline run again: other hashes, job, node, nonce, times,
    /// another Slurm, another user's control directory, a node on Nix
    /// 2.34.8 (`times_built` 0).
    const FETCHED_AGAIN: &str = concat!(
        r#"{"v":1,"drv":{"path":"/nix/store/0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-nsh-snap.drv","name":"nsh-snap","system":"x86_64-linux","features":[],"outputs":{"out":"/nix/store/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-nsh-snap"},"wanted":["out"]},"#,
        r#""store":{"dir":"/nix/store","uri":"auto"},"#,
        r#""closure":{"paths":["/nix/store/2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c2c-nsh-snap-input"],"nar_size":136},"#,
        r#""alloc":{"cluster":"test","backend":"rest","api":"v0.0.42","slurm":"24.11.5","job":553,"node":"node2","ssh":"nixbuild@node2","work":"/tmp/nsh/nsh-553","control":"/run/user/1000/nsh/test-553","nonce":"ce6a1ceeb69da34a926df2c6c811d639","request":1,"secs":{"connect":0.01,"submit":0.003,"queued":2.531,"polls":16,"polling":0.052}},"#,
        r#""push":{"copied":1,"present":0,"bytes":136,"secs":0.347029311},"#,
        r#""run":{"status":"built","times_built":0,"start":1795314353,"stop":1795314354,"built_outputs":{"out":"/nix/store/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-nsh-snap"}},"#,
        r#""fetch":{"paths":["/nix/store/1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b-nsh-snap"],"bytes":136,"secs":0.1},"#,
        r#""site":{"queue":"night"}}"#
    );

    fn redact(line: &str) -> String {
        Redactor::new()
            .ticket(&serde_json::from_str(line).unwrap())
            .to_string()
    }

    #[test]
    fn a_fetched_ticket_keeps_its_shape_and_loses_what_varies() {
        let redacted = Redactor::new().ticket(&serde_json::from_str(FETCHED).unwrap());
        insta::assert_snapshot!(serde_json::to_string_pretty(&redacted).unwrap());
    }

    #[test]
    fn two_runs_of_the_same_pipeline_redact_alike() {
        assert_eq!(redact(FETCHED), redact(FETCHED_AGAIN));
    }

    #[test]
    fn keys_and_their_order_are_kept() {
        fn keys(value: &Value, path: &str, out: &mut Vec<String>) {
            if let Value::Object(map) = value {
                for (key, item) in map {
                    let path = format!("{path}.{key}");
                    out.push(path.clone());
                    keys(item, &path, out);
                }
            }
        }
        let before: Value = serde_json::from_str(FETCHED).unwrap();
        let after = Redactor::new().ticket(&before);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        keys(&before, "", &mut a);
        keys(&after, "", &mut b);
        assert_eq!(a, b);
    }

    /// The same job, node or path is the same placeholder in every field and
    /// ticket of a stream; different ones are numbered apart.
    #[test]
    fn placeholders_are_numbered_consistently_across_a_stream() {
        let input = format!("{FETCHED}\n\n{FETCHED_AGAIN}\n{FETCHED}\n");
        let mut out = Vec::new();
        let status = Redactor::new()
            .stream(input.as_bytes(), &mut out, false)
            .unwrap();
        assert_eq!(status, ExitStatus::Ok);
        let lines: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], lines[2]);
        assert_eq!(lines[0]["alloc"]["job"], "<JOB:1>");
        assert_eq!(lines[1]["alloc"]["job"], "<JOB:2>");
        assert_eq!(lines[1]["alloc"]["node"], "<NODE:2>");
        assert_eq!(lines[1]["alloc"]["work"], "/tmp/nsh/nsh-<JOB:2>");
        assert_eq!(lines[1]["alloc"]["ssh"], "nixbuild@<NODE:2>");
        assert_eq!(lines[1]["alloc"]["nonce"], "<NONCE:2>");
        assert_eq!(lines[1]["alloc"]["control"], "<CONTROL-DIR>/test-<JOB:2>");
        assert_eq!(
            lines[0]["drv"]["outputs"]["out"],
            "/nix/store/<HASH:2>-nsh-snap"
        );
        assert_eq!(
            lines[0]["run"]["built_outputs"]["out"],
            "/nix/store/<HASH:2>-nsh-snap"
        );
        assert_eq!(
            lines[0]["fetch"]["paths"][0],
            "/nix/store/<HASH:2>-nsh-snap"
        );
        assert_eq!(lines[1]["drv"]["path"], "/nix/store/<HASH:4>-nsh-snap.drv");
    }

    /// A failed build: Nix's message and nsh's name the derivation, the node
    /// and the job; the status is the error's.
    #[test]
    fn messages_lose_paths_nodes_and_jobs_and_the_status_is_the_errors() {
        let line = r#"{"v":1,"alloc":{"cluster":"test","backend":"cli","job":1,"node":"node1","ssh":"nixbuild@node1","work":"/tmp/nsh/nsh-1","request":1},"run":{"status":"permanent-failure","error":"builder for '/nix/store/x52qbalyq2dl9nhj07q2fmb7dl05kzk7-nsh-snap.drv' failed with exit code 1","times_built":1,"start":1796078873,"stop":1796078873,"built_outputs":{}},"error":{"stage":"run","kind":"permanent","message":"build of /nix/store/x52qbalyq2dl9nhj07q2fmb7dl05kzk7-nsh-snap.drv failed (permanent-failure) on node1 (cluster test, Slurm job 1): see /tmp/nsh/nsh-1/log."}}"#;
        let mut out = Vec::new();
        let status = Redactor::new()
            .stream(line.as_bytes(), &mut out, false)
            .unwrap();
        assert_eq!(status, ExitStatus::Permanent);
        let out: Value = serde_json::from_slice(&out).unwrap();
        // `exit code 1` is not the job, though job 1 ran it.
        assert_eq!(
            out["run"]["error"],
            "builder for '/nix/store/<HASH:1>-nsh-snap.drv' failed with exit code 1"
        );
        assert_eq!(
            out["error"]["message"],
            "build of /nix/store/<HASH:1>-nsh-snap.drv failed (permanent-failure) on <NODE:1> \
             (cluster test, Slurm job <JOB:1>): see /tmp/nsh/nsh-<JOB:1>/log."
        );
    }

    #[test]
    fn jobs_pids_addresses_and_temporary_names_in_free_text() {
        let line = r#"{"v":1,"error":{"stage":"alloc","kind":"transient","message":"slurmrestd at http://10.1.2.3:6820: job 553 (JobId=553) ended; pid 4242 left /tmp/.tmpAb12Cd and /tmp/tmp.AbCdEf1234; Slurm 24.11.5, nix 1.2.3.4.5, job-77"},"hook":{"accepted":1796078873.25,"stages":{"alloc":1.5,"run":3.25},"secs":4.0,"exit":0,"pid":4242}}"#;
        let out = redact(line);
        let out: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            out["error"]["message"],
            "slurmrestd at http://<ADDR:1>: job <JOB:1> (JobId=<JOB:1>) ended; pid <PID:1> left \
             /tmp/<TEMP:1> and /tmp/<TEMP:2>; Slurm 24.11.5, nix 1.2.3.4.5, job-77"
        );
        assert_eq!(
            out["hook"],
            serde_json::json!({"accepted": "<TIME>", "stages": {"alloc": "<SECS>", "run": "<SECS>"},
                               "secs": "<SECS>", "exit": 0, "pid": "<PID:1>"})
        );
    }

    #[test]
    fn a_line_that_is_not_a_json_object_is_bad_input_naming_the_line() {
        for (input, message) in [
            (
                "{\"v\":1}\n[1]\n",
                "line 2: not a ticket: not a JSON object",
            ),
            (
                "{\"v\":1}\n\n{\"v\":\n",
                "line 3: not a ticket: EOF while parsing",
            ),
        ] {
            let mut out = Vec::new();
            let err = Redactor::new()
                .stream(input.as_bytes(), &mut out, false)
                .unwrap_err();
            assert_eq!(err.kind, Kind::Input);
            assert!(err.message.starts_with(message), "{}", err.message);
            assert_eq!(out, b"{\"v\":1}\n", "the tickets before it are written");
        }
    }

    #[test]
    fn what_is_not_volatile_is_left_alone() {
        // Versions, exit codes, counts and a store path of another shape.
        let line = r#"{"v":1,"push":{"copied":3,"present":118,"bytes":1048576},"note":"nix 2.26.3 exit 100; /nix/store/short-name; node10 is not node1"}"#;
        assert_eq!(redact(line), line);
    }
}
