//! The per-derivation resource request (`nshResources`) and the bounds a
//! site puts on it.
//!
//! A derivation asks, as JSON (a string attribute, or an attribute set with
//! `__structuredAttrs`):
//!
//! ```json
//! {"cpus": 8, "mem": "16G", "time": "2h", "gres": "gpu:1", "constraint": "avx512"}
//! ```
//!
//! * `mem`: a number of MiB, or `"512M"`, `"16G"`, `"1T"` (binary units, as
//!   Slurm reads them);
//! * `time`: a number of minutes, or `"90m"`, `"4h"`, `"2d"`, or Slurm's
//!   `"MM:SS"`, `"HH:MM:SS"`, `"D-HH:MM:SS"`, rounded up to whole minutes.
//!
//! The same notation as the site configuration's limits.
//!
//! [`parse`] checks only syntax; the cluster's limits are applied by
//! [`crate::stage::alloc`], once the cluster is known.

use serde_json::Value;

use crate::config;
use crate::error::{Failure, Kind, KindOf};
use crate::ticket::Resources;

/// Why an `nshResources` value was refused: bad input (exit 65).
#[derive(Debug, Clone, PartialEq)]
pub enum ResourcesError {
    /// A string that is not JSON (serde's message).
    NotJson(String),
    /// JSON, but not an object.
    NotObject,
    /// `cpus` is not a positive integer.
    Cpus(Value),
    /// `mem` is not a size.
    Mem(Value),
    /// `time` is not a duration.
    Time(Value),
    /// `gres` or `constraint` is not a string.
    NotString(String, Value),
    /// `gres` or `constraint` is empty or too long.
    Length(String),
    /// `gres` or `constraint` has a character Slurm would read otherwise:
    /// the key, the text, the character, the characters allowed.
    BadChar(String, String, char, &'static str),
    /// A key nsh does not know.
    UnknownKey(String),
}

impl std::fmt::Display for ResourcesError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("nshResources: ")?;
        match self {
            ResourcesError::NotJson(e) => write!(f, "not JSON: {e}"),
            ResourcesError::NotObject => f.write_str("must be a JSON object"),
            ResourcesError::Cpus(v) => write!(f, "cpus must be a positive integer, not {v}"),
            ResourcesError::Mem(v) => write!(
                f,
                "mem must be MiB (2048) or a size like \"512M\", \"16G\", \"1T\", not {v}"
            ),
            ResourcesError::Time(v) => write!(
                f,
                "time must be minutes (90) or a duration like \"90m\", \"4h\", \"2d\", \"D-HH:MM:SS\", not {v}"
            ),
            ResourcesError::NotString(key, v) => write!(f, "{key} must be a string, not {v}"),
            ResourcesError::Length(key) => write!(f, "{key} must be 1 to 256 characters"),
            ResourcesError::BadChar(key, text, bad, extra) => write!(
                f,
                "{key} {text:?} has {bad:?} (allowed: letters, digits and {extra})"
            ),
            ResourcesError::UnknownKey(key) => write!(
                f,
                "unknown key {key:?} (known: cpus, mem, time, gres, constraint)"
            ),
        }
    }
}

impl std::error::Error for ResourcesError {}

impl KindOf for ResourcesError {
    fn kind(&self) -> Kind {
        Kind::Input
    }
}

/// Parses an `nshResources` value (a JSON object, or a string holding one).
///
/// # Errors
/// What is wrong with the value (bad input; a [`ResourcesError`] is the
/// cause).
pub fn parse(value: &Value) -> Result<Resources, Failure> {
    read(value).map_err(Failure::from)
}

fn read(value: &Value) -> Result<Resources, ResourcesError> {
    let owned;
    let object = match value {
        Value::Object(map) => map,
        Value::String(text) => {
            owned = serde_json::from_str::<Value>(text)
                .map_err(|e| ResourcesError::NotJson(e.to_string()))?;
            match &owned {
                Value::Object(map) => map,
                _ => return Err(ResourcesError::NotObject),
            }
        }
        _ => return Err(ResourcesError::NotObject),
    };
    let mut resources = Resources::default();
    for (key, value) in object {
        match key.as_str() {
            "cpus" => {
                let cpus = value
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|&n| n >= 1)
                    .ok_or_else(|| ResourcesError::Cpus(value.clone()))?;
                resources.cpus = Some(cpus);
            }
            "mem" => resources.mem_mb = Some(parse_mem(value)?),
            "time" => resources.time_min = Some(parse_time(value)?),
            "gres" => resources.gres = Some(slurm_word(key, value, "_:.-,")?),
            "constraint" => {
                resources.constraint = Some(slurm_word(key, value, "_.-&|!()[]*,:")?);
            }
            other => return Err(ResourcesError::UnknownKey(other.to_string())),
        }
    }
    Ok(resources)
}

// Sizes and durations are written as in the site configuration (one
// notation for admins and derivation authors): `config`'s parsers.

/// A memory size in MiB.
fn parse_mem(value: &Value) -> Result<u64, ResourcesError> {
    let mb = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => config::parse_mem_mb_text(s),
        _ => None,
    };
    mb.filter(|&mb| mb > 0)
        .ok_or_else(|| ResourcesError::Mem(value.clone()))
}

/// A duration in whole minutes (seconds round up).
fn parse_time(value: &Value) -> Result<u32, ResourcesError> {
    let minutes = match value {
        Value::Number(n) => n.as_u64().and_then(|m| u32::try_from(m).ok()),
        Value::String(s) => config::parse_minutes_text(s),
        _ => None,
    };
    minutes
        .filter(|&m| m > 0)
        .ok_or_else(|| ResourcesError::Time(value.clone()))
}

/// A Slurm gres or constraint expression: letters, digits and `extra`.
fn slurm_word(key: &str, value: &Value, extra: &'static str) -> Result<String, ResourcesError> {
    let text = value
        .as_str()
        .ok_or_else(|| ResourcesError::NotString(key.to_string(), value.clone()))?;
    if text.is_empty() || text.len() > 256 {
        return Err(ResourcesError::Length(key.to_string()));
    }
    if let Some(bad) = text
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || extra.contains(c)))
    {
        return Err(ResourcesError::BadChar(
            key.to_string(),
            text.to_string(),
            bad,
            extra,
        ));
    }
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_field() {
        let r = parse(&json!({"cpus": 8, "mem": "16G", "time": "1:30:00", "gres": "gpu:a100:1", "constraint": "avx512&ib"})).unwrap();
        assert_eq!(
            r,
            Resources {
                cpus: Some(8),
                mem_mb: Some(16384),
                time_min: Some(90),
                gres: Some("gpu:a100:1".into()),
                constraint: Some("avx512&ib".into()),
            }
        );
        // The string form (a plain derivation attribute).
        let r = parse(&json!(r#"{"mem": 8192, "time": 120}"#)).unwrap();
        assert_eq!((r.mem_mb, r.time_min), (Some(8192), Some(120)));
    }

    #[test]
    fn sizes_and_durations() {
        for (mem, mb) in [
            ("512M", 512),
            ("8G", 8192),
            ("8GB", 8192),
            ("1T", 1 << 20),
            ("100", 100),
        ] {
            assert_eq!(parse_mem(&json!(mem)), Ok(mb), "{mem}");
        }
        for (time, min) in [
            ("2h", 120),
            ("90m", 90),
            ("1d", 1440),
            ("1-00:30", 1470),
            ("61s", 2),
            ("45", 45),
        ] {
            assert_eq!(parse_time(&json!(time)), Ok(min), "{time}");
        }
        assert_eq!(parse_time(&json!(7)), Ok(7));
        // Numbers a derivation may write that overflow: refused, not
        // wrapped (nor a panic).
        for time in [
            "213503982334601-00:00:00",
            "99999999999999999-00",
            "5124095576030431:00:00",
            "307445734561825861",
            "18446744073709551615:00",
            "1-18446744073709551615",
            "99999999999d",
        ] {
            assert!(parse_time(&json!(time)).is_err(), "{time}");
        }
        assert!(parse_mem(&json!("18446744073709551615T")).is_err());
        assert!(parse_time(&json!(u64::MAX)).is_err());
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases = [
            (json!({"cpus": 0}), "cpus must be a positive integer"),
            (json!({"cpus": "4"}), "cpus must be a positive integer"),
            (json!({"mem": "8X"}), "mem must be"),
            (json!({"mem": 0}), "mem must be"),
            (json!({"time": "1h30m"}), "time must be"),
            (json!({"time": "h"}), "time must be"),
            (json!({"time": "0m"}), "time must be"),
            (json!({"gres": "gpu:1; rm -rf /"}), "has ';'"),
            (json!({"constraint": ""}), "1 to 256 characters"),
            (json!({"cpu": 4}), "unknown key \"cpu\""),
            (json!([1]), "must be a JSON object"),
            (json!("{"), "not JSON"),
        ];
        for (value, why) in cases {
            let err = parse(&value).unwrap_err();
            assert!(err.message.starts_with("nshResources: "), "{}", err.message);
            assert!(err.message.contains(why), "{value}: {}", err.message);
        }
    }
}
