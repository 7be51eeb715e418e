//! Derivations (`.drv` files): what nsh needs to know about one, read with
//! the `nix-derivation` crate.
//!
//! [`parse`] is pure (bytes in, [`Drv`] out); [`read`] reads the file. Both
//! check that the path the derivation was read from is the path its contents
//! hash to (a text path: sha256 of the ATerm, references = inputSrcs ∪
//! inputDrvs), so a stale, edited or misnamed file is bad input rather than a
//! build of something else.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

use crate::error::Failure;
use crate::nix::resources;
use crate::nix::store_path::{StoreDir, StorePath};
use crate::ticket::{DrvSection, Resources};

/// One output as the derivation declares it, in the ATerm's own terms (the
/// serve protocol's BasicDerivation sends these three strings as they are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrvOutput {
    /// The output path, when known before the build (input-addressed and
    /// fixed outputs); `None` for floating / deferred / impure outputs.
    pub path: Option<StorePath>,
    /// `""` for input-addressed outputs; `sha256`, `r:sha256`, `text:sha256`…
    /// for content-addressed ones.
    pub hash_algo: String,
    /// The expected hash (base16) of a fixed output; `""` otherwise
    /// (`impure` for impure outputs).
    pub hash: String,
}

/// A parsed derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drv {
    /// The `.drv` store path.
    pub path: StorePath,
    pub store_dir: StoreDir,
    /// The derivation's name (the path's name without `.drv`).
    pub name: String,
    pub outputs: BTreeMap<String, DrvOutput>,
    /// Input derivation → the outputs of it this derivation uses.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    pub input_srcs: BTreeSet<StorePath>,
    pub system: String,
    pub builder: String,
    pub args: Vec<String>,
    /// The environment exactly as the ATerm has it (with `__json` for
    /// structured attributes): values may be arbitrary bytes.
    pub env: BTreeMap<String, Vec<u8>>,
    /// `__structuredAttrs = true`.
    pub structured_attrs: bool,
    /// `requiredSystemFeatures`.
    pub features: Vec<String>,
    /// `nshResources`, syntax-checked (bounds are nsh-alloc's business).
    pub resources: Resources,
}

/// Reads and parses the derivation at `path` (an absolute path in
/// `store_dir`). `file` is where its bytes are on disk: the same path for
/// an ordinary store, somewhere else for a store with a different root
/// (`local?root=…`).
pub fn read(store_dir: &StoreDir, path: &StorePath, file: &Path) -> Result<Drv, Failure> {
    store_dir.check(path)?;
    if !path.is_derivation() {
        return Err(Failure::input(format!("{path} is not a derivation (.drv)")));
    }
    let bytes = std::fs::read(file).map_err(|e| {
        let what = if e.kind() == std::io::ErrorKind::NotFound {
            "does not exist".to_string()
        } else {
            format!("cannot be read: {e}")
        };
        Failure::input(format!("derivation {} {what}", file.display()))
    })?;
    parse(store_dir, path, &bytes)
}

/// The store path `bytes` belong at is `path`: the file is what its name
/// says it is.
fn check_path(
    nix_store_dir: &nix_derivation::StoreDir,
    path: &StorePath,
    name: &str,
    bytes: &[u8],
    parsed: &nix_derivation::Derivation,
    fail: &dyn Fn(String) -> Failure,
) -> Result<(), Failure> {
    let expected = nix_store_dir
        .build_text_path(
            &format!("{name}.drv"),
            bytes,
            parsed
                .input_derivations()
                .keys()
                .chain(parsed.input_sources().iter()),
        )
        .map_err(|e| fail(format!("cannot compute its store path: {e}")))?;
    if expected.to_basename() != path.basename() {
        return Err(fail(format!(
            "its contents belong at {}, not here (the file was changed or misnamed)",
            nix_store_dir.render_path(&expected)
        )));
    }
    Ok(())
}

/// `requiredSystemFeatures`: a space-separated string, or (structured
/// attributes) a list of strings.
fn required_features(
    value: Option<Value>,
    fail: &dyn Fn(String) -> Failure,
) -> Result<Vec<String>, Failure> {
    match value {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(s.split_whitespace().map(str::to_string).collect()),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| fail(format!("requiredSystemFeatures has a non-string: {v}")))
            })
            .collect(),
        Some(other) => Err(fail(format!(
            "requiredSystemFeatures must be a list of strings, not {other}"
        ))),
    }
}

/// Parses the ATerm `bytes` of the derivation at `path`.
pub fn parse(store_dir: &StoreDir, path: &StorePath, bytes: &[u8]) -> Result<Drv, Failure> {
    store_dir.check(path)?;
    let fail = |msg: String| Failure::input(format!("derivation {path}: {msg}"));
    let name = path
        .name()
        .strip_suffix(".drv")
        .ok_or_else(|| fail("is not a derivation (.drv)".into()))?;
    let nix_store_dir = store_dir.to_nix()?;
    let parsed =
        nix_derivation::Derivation::from_aterm_bytes_in(bytes, name, nix_store_dir.clone())
            .map_err(|e| fail(format!("does not parse: {e}")))?;
    check_path(&nix_store_dir, path, name, bytes, &parsed, &fail)?;
    let mut outputs = BTreeMap::new();
    for (output_name, output) in parsed.outputs() {
        let out_path = output
            .path_in(&nix_store_dir, name, output_name)
            .map_err(|e| fail(format!("output {output_name}: {e}")))?
            .map(|p| store_dir.join_nix(&p));
        outputs.insert(output_name.clone(), aterm_output(output, out_path));
    }
    let mut input_drvs = BTreeMap::new();
    for (drv_path, wanted) in parsed.input_derivations() {
        if wanted.is_dynamic() {
            return Err(fail(format!(
                "input {} uses dynamic derivation outputs, which nsh does not build",
                nix_store_dir.render_path(drv_path)
            )));
        }
        input_drvs.insert(store_dir.join_nix(drv_path), wanted.outputs().clone());
    }
    let mut env = parsed.environment().clone();
    let attrs = parsed.structured_attrs();
    if let Some(attrs) = attrs {
        env.insert("__json".to_string(), attrs.raw_json().to_vec());
    }
    let attr = |key: &str| -> Option<Value> {
        match attrs {
            Some(attrs) => attrs.get(key).cloned(),
            None => parsed
                .environment()
                .get(key)
                .map(|v| Value::String(String::from_utf8_lossy(v).into_owned())),
        }
    };
    let features = required_features(attr("requiredSystemFeatures"), &fail)?;
    let resources = match attr("nshResources") {
        None => Resources::default(),
        Some(value) => {
            resources::parse(&value).map_err(|e| e.context(format!("derivation {path}")))?
        }
    };

    Ok(Drv {
        path: path.clone(),
        store_dir: store_dir.clone(),
        name: name.to_string(),
        outputs,
        input_drvs,
        input_srcs: parsed
            .input_sources()
            .iter()
            .map(|p| store_dir.join_nix(p))
            .collect(),
        system: parsed.system().to_string(),
        builder: parsed.builder().to_string(),
        args: parsed.arguments().to_vec(),
        env,
        structured_attrs: attrs.is_some(),
        features,
        resources,
    })
}

fn aterm_output(output: &nix_derivation::Output, path: Option<StorePath>) -> DrvOutput {
    use nix_derivation::{CAHash, Output};
    let (hash_algo, hash) = match output {
        Output::InputAddressed { .. } | Output::Deferred => (String::new(), String::new()),
        Output::Fixed { ca } => {
            let hash = ca.hash();
            let algo = hash.algorithm();
            let method = match ca {
                CAHash::Flat(_) => "",
                CAHash::Nar(_) => "r:",
                CAHash::Text(_) => "text:",
                CAHash::Git(_) => "git:",
            };
            (format!("{method}{algo}"), hash.to_nix_base16_string_bare())
        }
        Output::Floating {
            method,
            hash_algorithm,
        } => (method_algo(*method, *hash_algorithm), String::new()),
        Output::Impure {
            method,
            hash_algorithm,
        } => (method_algo(*method, *hash_algorithm), "impure".into()),
    };
    DrvOutput {
        path,
        hash_algo,
        hash,
    }
}

fn method_algo(
    method: nix_derivation::ContentAddressMethod,
    algo: nix_derivation::HashAlgorithm,
) -> String {
    use nix_derivation::ContentAddressMethod as M;
    let prefix = match method {
        M::Flat => "",
        M::Nar => "r:",
        M::Text => "text:",
        M::Git => "git:",
    };
    format!("{prefix}{algo}")
}

/// Base16 without the `algo:` prefix, as the ATerm writes fixed hashes.
trait Base16Bare {
    fn to_nix_base16_string_bare(&self) -> String;
}

impl Base16Bare for nix_derivation::NixHash {
    fn to_nix_base16_string_bare(&self) -> String {
        self.digest_as_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl Drv {
    /// Checks `wanted` output names against the derivation's outputs; empty
    /// means all of them.
    pub fn wanted_outputs(&self, wanted: &[String]) -> Result<Vec<String>, Failure> {
        if wanted.is_empty() {
            return Ok(self.outputs.keys().cloned().collect());
        }
        for name in wanted {
            if !self.outputs.contains_key(name) {
                return Err(Failure::input(format!(
                    "derivation {} has no output {name:?} (it has: {})",
                    self.path,
                    self.outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        let mut out = wanted.to_vec();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The ticket's `drv` section.
    pub fn section(&self, wanted: Vec<String>) -> DrvSection {
        DrvSection {
            path: self.path.clone(),
            name: self.name.clone(),
            system: self.system.clone(),
            features: self.features.clone(),
            outputs: self
                .outputs
                .iter()
                .map(|(name, out)| (name.clone(), out.path.clone()))
                .collect(),
            wanted,
            resources: self.resources.clone(),
            extra: crate::ticket::Extra::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Kind;

    // A real derivation, made with nix-instantiate 2.8 from
    // builtins.derivation { name = "a"; system = "x86_64-linux"; builder = "/bin/sh";
    //   args = ["-c" "echo a > $out"]; }
    // in the store /tmp/nshc-try/store.
    const A_PATH: &str = "2hhpx3ayp9ddygkfzmxy0q8zcmj7y5hy-a.drv";

    fn a_bytes() -> Vec<u8> {
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/a.drv")).unwrap()
    }

    fn store() -> StoreDir {
        StoreDir::new("/tmp/nshc-try/store").unwrap()
    }

    #[test]
    fn parses_a_real_derivation() {
        let drv = parse(&store(), &store().join(A_PATH).unwrap(), &a_bytes()).unwrap();
        assert_eq!(drv.name, "a");
        assert_eq!(drv.builder, "/bin/sh");
        assert_eq!(drv.args, ["-c", "echo a > $out"]);
        assert_eq!(drv.outputs.len(), 1);
        let out = &drv.outputs["out"];
        assert!(out.path.is_some());
        assert_eq!((out.hash_algo.as_str(), out.hash.as_str()), ("", ""));
        assert!(drv.input_drvs.is_empty() && drv.input_srcs.is_empty());
        assert!(!drv.structured_attrs);
        assert_eq!(
            drv.section(drv.wanted_outputs(&[]).unwrap()).path,
            format!("/tmp/nshc-try/store/{A_PATH}")
        );
    }

    #[test]
    fn a_path_that_does_not_match_the_contents_is_bad_input() {
        let other = store()
            .join("0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-a.drv")
            .unwrap();
        let err = parse(&store(), &other, &a_bytes()).unwrap_err();
        assert_eq!(err.kind, Kind::Input);
        assert!(
            err.message
                .contains(&format!("belong at /tmp/nshc-try/store/{A_PATH}")),
            "{}",
            err.message
        );
        // The same bytes read as if from another store directory: their
        // output paths are outside it.
        let nix_store = StoreDir::new("/nix/store").unwrap();
        let err = parse(&nix_store, &nix_store.join(A_PATH).unwrap(), &a_bytes()).unwrap_err();
        assert!(
            err.message
                .contains("outside the configured store directory"),
            "{}",
            err.message
        );
    }

    #[test]
    fn garbage_is_bad_input() {
        let path = store().join(A_PATH).unwrap();
        let err = parse(&store(), &path, b"Derive([").unwrap_err();
        assert_eq!(err.kind, Kind::Input);
        assert!(err.message.contains("does not parse"), "{}", err.message);
        let err = read(
            &store(),
            &store().join("0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a-x").unwrap(),
            Path::new("/nonexistent"),
        )
        .unwrap_err();
        assert!(
            err.message.contains("is not a derivation"),
            "{}",
            err.message
        );
    }

    #[test]
    fn wanted_outputs_must_exist() {
        let drv = parse(&store(), &store().join(A_PATH).unwrap(), &a_bytes()).unwrap();
        assert_eq!(
            drv.wanted_outputs(&["out".into(), "out".into()]).unwrap(),
            ["out"]
        );
        let err = drv.wanted_outputs(&["dev".into()]).unwrap_err();
        assert!(
            err.message.ends_with("has no output \"dev\" (it has: out)"),
            "{}",
            err.message
        );
    }
}
