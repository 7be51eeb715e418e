//! The man pages and shell completions `scripts/manuals install` makes from
//! the tools (`TOOL --generate …`, the clap command of each tool's
//! `--help`): every long flag a tool's `-h` lists is in its man page and
//! in its bash, zsh and fish completions, and bash's completion function
//! completes each one from its first letters. (That `man TOOL` finds and
//! renders the pages is `scripts/manuals check`, which needs man-db: run by
//! `scripts/setup release` and by `scripts/test` on the host.)
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::path::Path;
use std::process::Command;

use nsh_cluster_tests::{nsh_tool, run_ok, Cluster};

/// Every tool of the workspace: each crate under `tools/` is one binary of
/// its name (as `scripts/manuals` finds them).
fn tools() -> Vec<String> {
    let mut tools: Vec<String> = std::fs::read_dir(Cluster::repo_root().join("tools"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("nsh-"))
        .collect();
    tools.sort();
    for tool in [
        "nsh-closure",
        "nsh-alloc",
        "nsh-push",
        "nsh-run",
        "nsh-fetch",
        "nsh-hook",
        "nsh-redact",
        "nsh-status",
    ] {
        assert!(
            tools.iter().any(|t| t == tool),
            "tools/{tool} is missing: {tools:?}"
        );
    }
    tools
}

/// The long flags `-h` lists (nsh-hook's are `--check`'s): the words that
/// begin each option's line (`-h, --help`, `--config <FILE>`).
fn long_flags(tool: &str) -> Vec<String> {
    let mut help = Command::new(nsh_tool(tool));
    if tool == "nsh-hook" {
        help.arg("--check");
    }
    let text = run_ok(help.arg("-h"));
    let mut flags: Vec<String> = text
        .lines()
        .flat_map(|line| {
            line.split_whitespace()
                .take_while(|word| word.starts_with('-'))
                .map(|word| word.trim_end_matches(',').to_string())
                .filter(|word| word.starts_with("--") && word.len() > 2)
                .collect::<Vec<_>>()
        })
        .collect();
    if tool == "nsh-hook" {
        flags.push("--check".into());
    }
    flags.sort();
    flags.dedup();
    assert!(flags.iter().any(|f| f == "--help"), "{tool} -h: {text}");
    assert!(flags.len() > 2, "{tool} -h: {text}");
    flags
}

/// What bash's completion for `tool` offers for the words `words` (the last
/// one being completed), from its installed script.
fn bash_completes(script: &Path, tool: &str, words: &[&str]) -> Vec<String> {
    let out = run_ok(
        Command::new("bash")
            .args(["--norc", "--noprofile", "-c"])
            .arg(
                r#"tool=$1 script=$2; shift 2
                . "$script"
                spec=$(complete -p "$tool"); fn=${spec#*-F }; fn=${fn%% *}
                COMP_WORDS=("$tool" "$@"); COMP_CWORD=$#
                COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}
                "$fn" "$tool" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
                printf '%s\n' "${COMPREPLY[@]}""#,
            )
            .arg("bash")
            .arg(tool)
            .arg(script)
            .args(words),
    );
    out.lines().map(str::to_string).collect()
}

#[test]
fn every_flag_is_in_the_man_page_and_the_completions() {
    let prefix = tempfile::tempdir().unwrap();
    let bin = nsh_tool("nsh-alloc").parent().unwrap().to_path_buf();
    run_ok(
        Command::new(Cluster::repo_root().join("scripts/manuals"))
            .arg("install")
            .arg("--prefix")
            .arg(prefix.path())
            .arg("--bin")
            .arg(&bin),
    );
    let share = prefix.path().join("share");
    for tool in tools() {
        let tool = tool.as_str();
        let read = |path: &str| {
            std::fs::read_to_string(share.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        let man = read(&format!("man/man1/{tool}.1"));
        assert!(man.contains(&format!(".TH {tool} 1")), "{tool}.1:\n{man}");
        let bash_path = format!("bash-completion/completions/{tool}");
        let bash = read(&bash_path);
        let zsh = read(&format!("zsh/site-functions/_{tool}"));
        let fish = read(&format!("fish/vendor_completions.d/{tool}.fish"));
        for flag in long_flags(tool) {
            let name = &flag[2..];
            // roff writes every `-` of a flag as `\-`.
            let in_roff = flag.replace('-', "\\-");
            assert!(man.contains(&in_roff), "{tool}.1 lacks {flag}:\n{man}");
            assert!(bash.contains(&flag), "bash's {tool} lacks {flag}");
            assert!(zsh.contains(&flag), "zsh's _{tool} lacks {flag}");
            assert!(
                fish.contains(&format!("-l {name}")),
                "fish's {tool} lacks {flag}"
            );
            // Bash completes the flag from all but its last letter.
            let offered = bash_completes(&share.join(&bash_path), tool, &[&flag[..flag.len() - 1]]);
            assert!(
                offered.contains(&flag),
                "{tool} {}<TAB> offers {offered:?}",
                &flag[..flag.len() - 1]
            );
        }
    }
    // A flag's values complete too.
    let push = share.join("bash-completion/completions/nsh-push");
    let offered = bash_completes(&push, "nsh-push", &["--method", "add"]);
    assert_eq!(offered, ["add-to-store-nar"]);
}
