//! No Markdown page of the repository points at something that is not there
//! (see also `config_docs.rs`, which keeps the configuration's pages true).
//!
//! Every `*.md` file of the repository is read (README.md, docs/, and any
//! other outside `target/` and hidden directories), and these references in
//! it must resolve inside the repository:
//!
//! 1. **Links.** The target of `[text](target)`, `![alt](target)` and of a
//!    reference definition `[label]: target`, unless it is a URL (it has a
//!    scheme: `https:`, `mailto:` …), is a path relative to the page and must
//!    exist in the repository; an absolute path, or one that climbs out of
//!    the repository, never does. A `#fragment` on a Markdown page must be
//!    the anchor of one of its headings (GitHub's anchors: lower case, spaces
//!    to `-`, other punctuation dropped, `-1`, `-2` … for repeats).
//! 2. **Repository paths in code.** An inline code span whose first word
//!    starts with a top-level directory of the repository (`core/`, `docs/`,
//!    `scripts/`, `tests/`, `tools/` …) or with `reference/` names a path
//!    from the repository root (or from the page), which must exist. Only the
//!    components before a placeholder (`<name>`, `…`, `*`, `$VAR`, `{…}`) are
//!    checked, and a `:LINE` suffix is dropped: `tools/<name>/` checks
//!    `tools`, `tests/cluster/stack up trixie` checks `tests/cluster/stack`.
//! 3. **Pages named in the text.** A word ending in `.md`, in prose or in a
//!    code span (URLs and absolute paths aside), names a page relative to the
//!    page or to the repository root, which must exist: `design.md` or
//!    `SUMMARY.md` of another checkout fail here. (A file that a command
//!    writes elsewhere is named by its absolute path.)
//! 4. **Other checkouts.** An absolute path under `/work/` and the words
//!    `shared/reference` must not appear at all, code blocks included: they
//!    name the machine a page was written on, not the repository.
//!
//! Fenced code blocks (```` ``` ```` or `~~~`) are exempt from rules 1–3:
//! the commands there may create the files they name. Absolute paths such as
//! `/nix/store/…` or `/etc/nsh/nsh.toml` are examples of where things live on
//! a machine and are not checked (rule 4 aside).
// A test fails by panicking: its helpers unwrap too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// References in pages that someone else is rewriting right now, as
/// (page, reference). Each must still be reported: once it is fixed, this
/// test fails until the entry is removed here.
const PENDING: &[(&str, &str)] = &[];

/// What a check needs to know of the repository. Paths are relative to its
/// root, with `/` between components; `""` is the root.
trait Tree {
    fn exists(&self, path: &str) -> bool;
    fn read(&self, path: &str) -> Option<String>;
    /// The directories at the top of the repository (`core`, `docs`, …).
    fn top_dirs(&self) -> BTreeSet<String>;
}

/// The repository on disk.
struct Disk {
    root: PathBuf,
}

impl Disk {
    fn new() -> Disk {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("core/ is inside the repository")
            .to_path_buf();
        Disk { root }
    }

    /// Every Markdown page, outside `target/` and hidden directories.
    fn pages(&self) -> Vec<String> {
        fn walk(root: &Path, dir: &str, out: &mut Vec<String>) {
            let full = if dir.is_empty() {
                root.to_path_buf()
            } else {
                root.join(dir)
            };
            let mut entries: Vec<_> = std::fs::read_dir(&full)
                .unwrap_or_else(|e| panic!("{}: {e}", full.display()))
                .map(|entry| entry.unwrap())
                .collect();
            entries.sort_by_key(std::fs::DirEntry::file_name);
            for entry in entries {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || name == "target" {
                    continue;
                }
                let path = if dir.is_empty() {
                    name.clone()
                } else {
                    format!("{dir}/{name}")
                };
                let kind = entry.file_type().unwrap();
                if kind.is_dir() {
                    walk(root, &path, out);
                } else if name.ends_with(".md") {
                    out.push(path);
                }
            }
        }
        let mut pages = Vec::new();
        walk(&self.root, "", &mut pages);
        pages
    }
}

impl Tree for Disk {
    fn exists(&self, path: &str) -> bool {
        self.root.join(path).exists()
    }

    fn read(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.root.join(path)).ok()
    }

    fn top_dirs(&self) -> BTreeSet<String> {
        std::fs::read_dir(&self.root)
            .unwrap()
            .map(|entry| entry.unwrap())
            .filter(|entry| entry.file_type().unwrap().is_dir())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with('.') && name != "target")
            .collect()
    }
}

/// A reference that does not resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Problem {
    page: String,
    line: usize,
    reference: String,
    why: &'static str,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.page, self.line, self.reference, self.why
        )
    }
}

/// `dir` joined with the relative `path`, `.` and `..` resolved; `None` for
/// an absolute path or one that leaves the repository.
fn resolve(dir: &str, path: &str) -> Option<String> {
    if path.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            _ => parts.push(part),
        }
    }
    Some(parts.join("/"))
}

/// The directory of a page (`""` at the root).
fn dir_of(page: &str) -> &str {
    page.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// Whether `path` exists relative to the page's directory or to the root.
fn found(tree: &dyn Tree, page: &str, path: &str) -> bool {
    [dir_of(page), ""]
        .iter()
        .any(|dir| resolve(dir, path).is_some_and(|p| tree.exists(&p)))
}

/// The text with every line inside a fenced code block emptied (line
/// numbers and byte offsets of other lines stay).
fn without_code_blocks(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut fence: Option<(char, usize)> = None;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let opener = trimmed
            .chars()
            .next()
            .filter(|c| *c == '`' || *c == '~')
            .map(|c| (c, trimmed.chars().take_while(|x| *x == c).count()))
            .filter(|(_, n)| *n >= 3);
        let blank = match (fence, opener) {
            (None, Some(open)) => {
                fence = Some(open);
                true
            }
            (Some((c, n)), Some((c2, n2))) if c == c2 && n2 >= n => {
                fence = None;
                true
            }
            (Some(_), _) => true,
            (None, None) => false,
        };
        if blank {
            out.extend(line.chars().map(|c| if c == '\n' { '\n' } else { ' ' }));
        } else {
            out.push_str(line);
        }
    }
    out
}

/// The inline code spans of `text`: (byte offset of the span, its content).
fn code_spans(text: &str) -> Vec<(usize, usize, String)> {
    let bytes = text.as_bytes();
    let run_at = |i: usize| bytes[i..].iter().take_while(|b| **b == b'`').count();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'`' {
            i += 1;
            continue;
        }
        let n = run_at(i);
        let mut j = i + n;
        let mut close = None;
        while j < bytes.len() {
            if bytes[j] == b'`' {
                let m = run_at(j);
                if m == n {
                    close = Some(j);
                    break;
                }
                j += m;
            } else {
                j += 1;
            }
        }
        match close {
            Some(j) => {
                spans.push((i, j + n, text[i + n..j].trim().to_string()));
                i = j + n;
            }
            None => i += n,
        }
    }
    spans
}

/// `text` with the byte ranges replaced by spaces (offsets stay).
fn blank(text: &str, ranges: &[(usize, usize)]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for &(from, to) in ranges {
        bytes[from..to].fill(b' ');
    }
    // Whole UTF-8 sequences are replaced: the ranges start and end at ASCII.
    String::from_utf8(bytes).expect("ranges on character boundaries")
}

/// Whether a link target is a URL (`scheme:…`) rather than a path.
fn is_url(target: &str) -> bool {
    match target.split_once(':') {
        Some((scheme, _)) => {
            !scheme.is_empty()
                && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        }
        None => false,
    }
}

/// The link targets of `text` (code spans already blanked): (start, end,
/// target) for inline links and reference definitions.
fn link_targets(text: &str) -> Vec<(usize, usize, String)> {
    let mut links = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("](") {
        let start = from + at + 2;
        let rest = &text[start..];
        let end = rest.find(')').map_or(text.len(), |e| start + e);
        let inside = text[start..end].trim();
        let target = match inside.strip_prefix('<') {
            Some(angled) => angled.split('>').next().unwrap_or(""),
            None => inside.split_whitespace().next().unwrap_or(""),
        };
        links.push((start, end, target.to_string()));
        from = start;
    }
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') && line.len() - trimmed.len() <= 3 {
            if let Some((_, rest)) = trimmed.split_once("]:") {
                if let Some(target) = rest.split_whitespace().next() {
                    let start = offset + line.find("]:").unwrap() + 2;
                    links.push((start, offset + line.trim_end().len(), target.into()));
                }
            }
        }
        offset += line.len();
    }
    links
}

/// GitHub's anchor for a heading's text.
fn anchor(heading: &str) -> String {
    // A link in a heading keeps its text only.
    let mut text = heading.to_string();
    while let Some(at) = text.find("](") {
        let end = text[at..].find(')').map_or(text.len(), |e| at + e + 1);
        text.replace_range(at + 1..end, "");
    }
    text.trim()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .flat_map(char::to_lowercase)
        .collect()
}

/// The anchors of a Markdown page's headings.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in without_code_blocks(text).lines() {
        let trimmed = line.trim_start();
        let hashes = trimmed.chars().take_while(|c| *c == '#').count();
        if line.len() - trimmed.len() > 3 || !(1..=6).contains(&hashes) {
            continue;
        }
        let Some(title) = trimmed[hashes..].strip_prefix(' ') else {
            continue;
        };
        let base = anchor(title.trim().trim_end_matches('#'));
        let count = seen.entry(base.clone()).or_insert(0);
        out.insert(if *count == 0 {
            base.clone()
        } else {
            format!("{base}-{count}")
        });
        *count += 1;
    }
    out
}

/// Byte ranges of `http://` and `https://` URLs in `text`.
fn urls(text: &str) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    for scheme in ["http://", "https://"] {
        let mut from = 0;
        while let Some(at) = text[from..].find(scheme) {
            let start = from + at;
            let len = text[start..]
                .find(|c: char| c.is_whitespace() || ")>]\"'`".contains(c))
                .unwrap_or(text.len() - start);
            ranges.push((start, start + len));
            from = start + len;
        }
    }
    ranges
}

/// The words ending in `.md` in `text`: (byte offset, word).
fn page_names(text: &str) -> Vec<(usize, String)> {
    let is_name = |c: char| c.is_alphanumeric() || "_-".contains(c);
    let mut names = Vec::new();
    for (at, _) in text.match_indices(".md") {
        let after = text[at + 3..].chars().next();
        let before = text[..at].chars().next_back();
        if after.is_some_and(is_name) || !before.is_some_and(is_name) {
            continue;
        }
        let start = text[..at]
            .char_indices()
            .rev()
            .take_while(|(_, c)| is_name(*c) || "./".contains(*c))
            .last()
            .map_or(at, |(i, _)| i);
        names.push((start, text[start..at + 3].to_string()));
    }
    names
}

/// The repository path a code span names (rule 2), if it names one.
fn repository_path(span: &str, top_dirs: &BTreeSet<String>) -> Option<String> {
    let word = span.split_whitespace().next()?;
    let word = word.split("::").next()?;
    let word = word.trim_end_matches([',', '.', ';', ')']);
    // `file.rs:12`, `file.rs:12-20`
    let word = match word.split_once(':') {
        Some((path, line)) if line.starts_with(|c: char| c.is_ascii_digit()) => path,
        _ => word,
    };
    let (top, _) = word.split_once('/')?;
    if !top_dirs.contains(top) && top != "reference" {
        return None;
    }
    let placeholder = |part: &&str| {
        part.is_empty()
            || part.contains(|c: char| "<>…*?${}[]|".contains(c))
            || part.contains("...")
    };
    let parts: Vec<&str> = word
        .split('/')
        .take_while(|part| !placeholder(part))
        .collect();
    Some(parts.join("/"))
}

/// Every reference of `page` (its `text`) that does not resolve in `tree`.
fn check_page(tree: &dyn Tree, page: &str, text: &str) -> Vec<Problem> {
    let line_of = |offset: usize| text[..offset].matches('\n').count() + 1;
    let mut problems = Vec::new();
    let mut report = |offset: usize, reference: &str, why: &'static str| {
        problems.push(Problem {
            page: page.to_string(),
            line: line_of(offset),
            reference: reference.to_string(),
            why,
        });
    };

    // Rule 4, everywhere.
    for (at, _) in text.match_indices("/work/") {
        let before = text[..at].chars().next_back();
        if !before.is_some_and(|c| c.is_alphanumeric() || "_-./$}".contains(c)) {
            let end = text[at..]
                .find(|c: char| c.is_whitespace() || "`)]\"'".contains(c))
                .map_or(text.len(), |e| at + e);
            report(at, &text[at..end], "an absolute path into another checkout");
        }
    }
    for (at, found) in text.match_indices("shared/reference") {
        report(at, found, "a directory outside the repository");
    }

    let prose = without_code_blocks(text);
    let spans = code_spans(&prose);
    let span_ranges: Vec<(usize, usize)> = spans.iter().map(|(s, e, _)| (*s, *e)).collect();
    let unspanned = blank(&prose, &span_ranges);

    // Rule 1.
    let links = link_targets(&unspanned);
    for (at, _, target) in &links {
        if target.is_empty() || is_url(target) {
            continue;
        }
        let (path, fragment) = match target.split_once('#') {
            Some((path, fragment)) => (path, Some(fragment)),
            None => (target.as_str(), None),
        };
        let resolved = if path.is_empty() {
            Some(page.to_string())
        } else {
            resolve(dir_of(page), path)
        };
        let Some(resolved) = resolved.filter(|p| tree.exists(p)) else {
            report(*at, target, "links to a path that does not exist");
            continue;
        };
        if let (Some(fragment), true) = (fragment, resolved.ends_with(".md")) {
            let headings = tree.read(&resolved).map(|t| anchors(&t));
            if !headings.is_some_and(|h| h.contains(fragment)) {
                report(*at, target, "links to a heading that does not exist");
            }
        }
    }

    // Rule 2.
    let top_dirs = tree.top_dirs();
    for (at, _, span) in &spans {
        if let Some(path) = repository_path(span, &top_dirs) {
            if !found(tree, page, &path) {
                report(*at, span, "names a repository path that does not exist");
            }
        }
    }

    // Rule 3: link targets and URLs are not page names.
    let link_ranges: Vec<(usize, usize)> = links.iter().map(|(s, e, _)| (*s, *e)).collect();
    let named = blank(&blank(&prose, &link_ranges), &urls(&prose));
    for (at, name) in page_names(&named) {
        if !name.starts_with('/') && !found(tree, page, &name) {
            report(at, &name, "names a page that does not exist");
        }
    }
    // A code span naming a page breaks rules 2 and 3 at once: say it once.
    let mut seen = BTreeSet::new();
    problems.retain(|p| seen.insert((p.line, p.reference.clone())));
    problems
}

/// Every problem of every page, with the pending ones apart.
fn every_problem() -> (Vec<Problem>, Vec<Problem>) {
    let disk = Disk::new();
    let mut problems = Vec::new();
    for page in disk.pages() {
        let text = disk.read(&page).unwrap();
        problems.extend(check_page(&disk, &page, &text));
    }
    problems.into_iter().partition(|p| {
        !PENDING
            .iter()
            .any(|(page, reference)| p.page == *page && p.reference == *reference)
    })
}

#[test]
fn every_reference_in_the_docs_resolves() {
    let (problems, _) = every_problem();
    let list: Vec<String> = problems.iter().map(Problem::to_string).collect();
    assert!(
        list.is_empty(),
        "references that do not resolve in the repository:\n{}",
        list.join("\n")
    );
}

#[test]
fn every_pending_reference_still_needs_its_exception() {
    let (_, pending) = every_problem();
    for (page, reference) in PENDING {
        assert!(
            pending
                .iter()
                .any(|p| p.page == *page && p.reference == *reference),
            "{page} no longer refers to {reference}: remove it from PENDING in {}",
            file!()
        );
    }
}

#[test]
fn the_pages_are_found() {
    let pages = Disk::new().pages();
    for page in [
        "README.md",
        "docs/admin-guide.md",
        "docs/reference/slurm.md",
    ] {
        assert!(pages.iter().any(|p| p == page), "{page} in {pages:?}");
    }
    assert!(!pages.iter().any(|p| p.starts_with("target/")), "{pages:?}");
}

/// A repository in memory, for the rules' own tests.
struct Fake(BTreeMap<&'static str, &'static str>);

impl Tree for Fake {
    fn exists(&self, path: &str) -> bool {
        path.is_empty()
            || self
                .0
                .keys()
                .any(|p| *p == path || p.starts_with(&format!("{path}/")))
    }

    fn read(&self, path: &str) -> Option<String> {
        self.0.get(path).map(ToString::to_string)
    }

    fn top_dirs(&self) -> BTreeSet<String> {
        self.0
            .keys()
            .filter_map(|p| p.split_once('/'))
            .map(|(top, _)| top.to_string())
            .collect()
    }
}

fn problems_in(page_text: &'static str) -> Vec<String> {
    let fake = Fake(BTreeMap::from([
        ("README.md", ""),
        ("docs/guide.md", page_text),
        (
            "docs/other.md",
            "# Other\n## `nsh-hook --check`\n## Twice\n## Twice\n```\n# not a heading\n```\n",
        ),
        ("docs/reference/slurm.md", "# Slurm\n"),
        ("tools/nsh-run/src/main.rs", ""),
        ("tests/cluster/stack", ""),
        ("core/src/lib.rs", ""),
    ]));
    check_page(&fake, "docs/guide.md", page_text)
        .iter()
        .map(|p| format!("{}: {}", p.line, p.reference))
        .collect()
}

#[test]
fn what_resolves_passes() {
    let page = "\
See [the other page](other.md), [a heading](other.md#nsh-hook---check),
[the second one](other.md#twice-1), [this page](#a-heading), [up](../README.md)
and the [Slurm facts](reference/slurm.md) or `reference/slurm.md`, `docs/other.md`,
`tools/<name>/`, `tools/nsh-run/src/main.rs:12`, `tests/cluster/stack up sid`,
`docs/…`, `core/src/lib.rs`'s doc, and [[label]] below.

## A heading

URLs are not paths: [Nix](https://nixos.org/manual/x.md), https://example.org/y.md,
<https://example.org/z.md>; neither are machine paths: `/nix/store/…-hello`,
`/etc/nsh/nsh.toml`, `/tmp/bench/<date>/report.md`, `$inst/work/x`, nor a `*.md`
glob or `cli.rs` alone.

```sh
mkdir -p docs/new && echo hi > docs/new/notes.md   # makes what it names
cat [x](missing.md)
```

[label]: other.md#other
";
    assert_eq!(problems_in(page), Vec::<String>::new());
}

#[test]
fn what_does_not_resolve_is_reported() {
    let page = "\
[gone](missing.md) and [bad heading](other.md#nope), [outside](../../x.md),
[absolute](/etc/x.md), `docs/missing.md`, `reference/nix-build-hook.md`,
`tests/nope.rs:3`, see design.md, \"Importing outputs\" in `SUMMARY.md`.
~~~
ls /work/shared/reference
~~~
";
    assert_eq!(
        problems_in(page),
        [
            "5: /work/shared/reference",
            "5: shared/reference",
            "1: missing.md",
            "1: other.md#nope",
            "1: ../../x.md",
            "2: /etc/x.md",
            "2: docs/missing.md",
            "2: reference/nix-build-hook.md",
            "3: tests/nope.rs:3",
            "3: design.md",
            "3: SUMMARY.md",
        ]
    );
}
