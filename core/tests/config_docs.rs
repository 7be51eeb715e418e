//! The configuration's documentation cannot drift from the code: every key
//! the loader accepts is in `docs/nsh.toml.example` and in the admin guide's
//! key tables, and the example itself loads (see also `config.rs`).
//!
//! The keys are not listed here by hand: each table's known keys are read
//! from the loader's own "unknown field …, expected one of …" error, so a key
//! added to the code without documentation fails this test.
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::path::Path;

use nsh_core::build_hook::HookConfig;
use nsh_core::Config;

const EXAMPLE: &str = include_str!("../../docs/nsh.toml.example");
const ADMIN_GUIDE: &str = include_str!("../../docs/admin-guide.md");

/// A configuration the loader accepts; tables are added to it.
const BASE: &str = "[cluster.c]\nbackend = \"cli\"\nsystems = [\"x86_64-linux\"]\nsupported_features = [\"kvm\"]\n";

/// The key names in backquotes after "expected one of" in a loader error.
fn expected_keys(message: &str) -> Vec<String> {
    // serde says "expected one of `a`, `b`, …", or "expected `a` or `b`" for two.
    let list = message
        .split_once("expected one of ")
        .or_else(|| {
            message
                .split_once("expected `")
                .map(|(head, _)| (head, &message[head.len() + 9..]))
        })
        .unwrap_or_else(|| panic!("not an unknown-field error: {message}"))
        .1;
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The keys of one table: what the loader lists when given an unknown one.
fn known_keys(table: &str, text: &str) -> Vec<String> {
    let Err(failure) = HookConfig::parse(Path::new("t.toml"), text) else {
        panic!("{table}: an unknown key was accepted")
    };
    let keys = expected_keys(&failure.message);
    assert!(!keys.is_empty(), "{table}: {}", failure.message);
    keys
}

/// Whether `text` has the table header of `key`: `[key]`, `[key.NAME]` or
/// `[….key]`.
fn names_table(text: &str, key: &str) -> bool {
    text.contains(&format!("[{key}]"))
        || text.contains(&format!("[{key}."))
        || text.contains(&format!(".{key}]"))
}

fn every_table() -> Vec<(&'static str, Vec<String>)> {
    const BAD: &str = "nsh_no_such_key = 1\n";
    vec![
        ("(top level)", known_keys("top", &format!("{BAD}{BASE}"))),
        (
            "cluster.NAME",
            known_keys("cluster", &format!("{BASE}{BAD}")),
        ),
        (
            "cluster.NAME.limits",
            known_keys("limits", &format!("{BASE}[cluster.c.limits]\n{BAD}")),
        ),
        (
            "cluster.NAME.features",
            known_keys(
                "features",
                &format!("{BASE}[cluster.c.features]\nkvm = {{ nsh_no_such_key = 1 }}\n"),
            ),
        ),
        ("ssh", known_keys("ssh", &format!("{BASE}[ssh]\n{BAD}"))),
        (
            "cluster.NAME.ssh",
            known_keys("ssh", &format!("{BASE}[cluster.c.ssh]\n{BAD}")),
        ),
        (
            "remote",
            known_keys("remote", &format!("{BASE}[remote]\n{BAD}")),
        ),
        ("hook", known_keys("hook", &format!("{BASE}[hook]\n{BAD}"))),
        (
            "fetch",
            known_keys("fetch", &format!("{BASE}[fetch]\n{BAD}")),
        ),
    ]
}

#[test]
fn the_tables_are_found() {
    let tables = every_table();
    let cluster = &tables[1].1;
    assert!(cluster.contains(&"token_file".to_string()), "{cluster:?}");
    let hook = &tables[7].1;
    assert!(hook.contains(&"fallback".to_string()), "{hook:?}");
}

#[test]
fn the_example_names_every_key() {
    let mut missing = Vec::new();
    for (table, keys) in every_table() {
        for key in keys {
            // Values are written `key =` (also in a comment, for
            // alternatives such as token_command).
            if !EXAMPLE.contains(&format!("{key} =")) && !names_table(EXAMPLE, &key) {
                missing.push(format!("{table}: {key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/nsh.toml.example does not mention: {missing:?}"
    );
}

#[test]
fn the_admin_guide_documents_every_key() {
    let mut missing = Vec::new();
    for (table, keys) in every_table() {
        for key in keys {
            // A row of a key table, or a table's own heading.
            if !ADMIN_GUIDE.contains(&format!("| `{key}` |")) && !names_table(ADMIN_GUIDE, &key) {
                missing.push(format!("{table}: {key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/admin-guide.md has no table row for: {missing:?}"
    );
}

#[test]
fn the_example_loads_for_every_tool_and_the_hook() {
    Config::parse(Path::new("nsh.toml.example"), EXAMPLE).unwrap();
    HookConfig::parse(Path::new("nsh.toml.example"), EXAMPLE).unwrap();
}
