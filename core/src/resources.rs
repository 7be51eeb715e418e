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
//! * `mem`: a number of MiB, or a number with a unit `K`, `M`, `G`, `T`
//!   (binary, as Slurm counts them; `GB`/`GiB` spellings accepted);
//! * `time`: a number of minutes, or units `s`, `m`, `h`, `d` in descending
//!   order (`"90m"`, `"1h30m"`, `"2d"`), rounded up to whole minutes.
//!
//! [`parse`] checks only syntax; [`bound`] checks a request against the
//! cluster's limits (nsh-alloc calls it, once it knows the cluster).

use serde_json::Value;

use crate::error::Failure;
use crate::ticket::Resources;

/// Parses an `nshResources` value (a JSON object, or a string holding one).
pub fn parse(value: &Value) -> Result<Resources, Failure> {
    let fail = |msg: String| Failure::input(format!("nshResources: {msg}"));
    let owned;
    let object = match value {
        Value::Object(map) => map,
        Value::String(text) => {
            owned =
                serde_json::from_str::<Value>(text).map_err(|e| fail(format!("not JSON: {e}")))?;
            match &owned {
                Value::Object(map) => map,
                _ => return Err(fail("must be a JSON object".into())),
            }
        }
        _ => return Err(fail("must be a JSON object".into())),
    };
    let mut resources = Resources::default();
    for (key, value) in object {
        match key.as_str() {
            "cpus" => {
                let cpus = value
                    .as_u64()
                    .filter(|&n| (1..=u32::MAX as u64).contains(&n))
                    .ok_or_else(|| fail(format!("cpus must be a positive integer, not {value}")))?;
                resources.cpus = Some(cpus as u32);
            }
            "mem" => resources.mem_mb = Some(parse_mem(value).map_err(fail)?),
            "time" => resources.time_min = Some(parse_time(value).map_err(fail)?),
            "gres" => resources.gres = Some(slurm_word(key, value, "_:.-,").map_err(fail)?),
            "constraint" => {
                resources.constraint = Some(slurm_word(key, value, "_.-&|!()[]*,:").map_err(fail)?)
            }
            other => {
                return Err(fail(format!(
                    "unknown key {other:?} (known: cpus, mem, time, gres, constraint)"
                )))
            }
        }
    }
    Ok(resources)
}

/// A memory size in MiB.
fn parse_mem(value: &Value) -> Result<u64, String> {
    let bad = || format!("mem must be MiB or a size like \"8G\", not {value}");
    let mb = match value {
        Value::Number(n) => n.as_u64().ok_or_else(bad)?,
        Value::String(s) => {
            let s = s.trim();
            let digits = s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            let (number, unit) = s.split_at(digits);
            let number: u64 = number.parse().map_err(|_| bad())?;
            let unit = unit.trim().to_ascii_uppercase();
            let unit = unit
                .strip_suffix("IB")
                .or_else(|| unit.strip_suffix('B'))
                .unwrap_or(&unit);
            match unit {
                "K" => number.div_ceil(1024),
                "" | "M" => number,
                "G" => number.checked_mul(1024).ok_or_else(bad)?,
                "T" => number.checked_mul(1024 * 1024).ok_or_else(bad)?,
                _ => return Err(bad()),
            }
        }
        _ => return Err(bad()),
    };
    if mb == 0 {
        return Err(bad());
    }
    Ok(mb)
}

/// A duration in whole minutes (rounded up).
fn parse_time(value: &Value) -> Result<u32, String> {
    let bad =
        || format!("time must be minutes or a duration like \"2h\" or \"1h30m\", not {value}");
    let seconds: u64 = match value {
        Value::Number(n) => n.as_u64().and_then(|m| m.checked_mul(60)).ok_or_else(bad)?,
        Value::String(s) => {
            let s = s.trim();
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                s.parse::<u64>()
                    .ok()
                    .and_then(|m| m.checked_mul(60))
                    .ok_or_else(bad)?
            } else {
                let mut total: u64 = 0;
                let mut rest = s;
                // Units must come in descending order, each at most once.
                let mut last_unit = u64::MAX;
                while !rest.is_empty() {
                    let digits =
                        rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
                    if digits == 0 {
                        return Err(bad());
                    }
                    let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
                    let unit = match rest[digits..].chars().next() {
                        Some('d') => 86400,
                        Some('h') => 3600,
                        Some('m') => 60,
                        Some('s') => 1,
                        _ => return Err(bad()),
                    };
                    if unit >= last_unit {
                        return Err(bad());
                    }
                    last_unit = unit;
                    total = number
                        .checked_mul(unit)
                        .and_then(|n| total.checked_add(n))
                        .ok_or_else(bad)?;
                    rest = &rest[digits + 1..];
                }
                total
            }
        }
        _ => return Err(bad()),
    };
    let minutes = seconds.div_ceil(60);
    if minutes == 0 || minutes > u32::MAX as u64 {
        return Err(bad());
    }
    Ok(minutes as u32)
}

/// A Slurm gres or constraint expression: letters, digits and `extra`.
fn slurm_word(key: &str, value: &Value, extra: &str) -> Result<String, String> {
    let text = value
        .as_str()
        .ok_or_else(|| format!("{key} must be a string, not {value}"))?;
    if text.is_empty() || text.len() > 256 {
        return Err(format!("{key} must be 1 to 256 characters"));
    }
    if let Some(bad) = text
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || extra.contains(c)))
    {
        return Err(format!(
            "{key} {text:?} has {bad:?} (allowed: letters, digits and {extra})"
        ));
    }
    Ok(text.to_string())
}

/// What a cluster allows a single derivation to ask for; `None` = no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceLimits {
    pub max_cpus: Option<u32>,
    pub max_mem_mb: Option<u64>,
    pub max_time_min: Option<u32>,
    /// Whether derivations may ask for gres / constraints of their own.
    pub allow_gres: bool,
    pub allow_constraint: bool,
}

/// Checks `request` against `limits`: a request above a limit is bad input
/// (the derivation asks for more than the cluster gives), naming the limit.
pub fn bound(request: &Resources, limits: &ResourceLimits) -> Result<(), Failure> {
    fn over<T: PartialOrd + std::fmt::Display>(
        what: &str,
        asked: Option<T>,
        max: Option<T>,
    ) -> Result<(), Failure> {
        match (asked, max) {
            (Some(asked), Some(max)) if asked > max => Err(Failure::input(format!(
                "nshResources: {what} {asked} is above the cluster's limit of {max}"
            ))),
            _ => Ok(()),
        }
    }
    over("cpus", request.cpus, limits.max_cpus)?;
    over("mem (MiB)", request.mem_mb, limits.max_mem_mb)?;
    over("time (minutes)", request.time_min, limits.max_time_min)?;
    if request.gres.is_some() && !limits.allow_gres {
        return Err(Failure::input(
            "nshResources: gres is not allowed on this cluster",
        ));
    }
    if request.constraint.is_some() && !limits.allow_constraint {
        return Err(Failure::input(
            "nshResources: constraint is not allowed on this cluster",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_field() {
        let r = parse(&json!({"cpus": 8, "mem": "16G", "time": "1h30m", "gres": "gpu:a100:1", "constraint": "avx512&ib"})).unwrap();
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
            ("8GiB", 8192),
            ("1T", 1 << 20),
            ("1536K", 2),
            ("100", 100),
        ] {
            assert_eq!(parse_mem(&json!(mem)), Ok(mb), "{mem}");
        }
        for (time, min) in [
            ("2h", 120),
            ("90m", 90),
            ("1d", 1440),
            ("1h30m", 90),
            ("61s", 2),
            ("45", 45),
        ] {
            assert_eq!(parse_time(&json!(time)), Ok(min), "{time}");
        }
        assert_eq!(parse_time(&json!(7)), Ok(7));
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases = [
            (json!({"cpus": 0}), "cpus must be a positive integer"),
            (json!({"cpus": "4"}), "cpus must be a positive integer"),
            (json!({"mem": "8X"}), "mem must be"),
            (json!({"mem": 0}), "mem must be"),
            (json!({"time": "30m2h"}), "time must be"),
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

    #[test]
    fn bounds() {
        let limits = ResourceLimits {
            max_cpus: Some(16),
            max_mem_mb: Some(65536),
            max_time_min: None,
            allow_gres: false,
            allow_constraint: true,
        };
        let ok =
            parse(&json!({"cpus": 16, "mem": "64G", "time": "30d", "constraint": "x"})).unwrap();
        assert!(bound(&ok, &limits).is_ok());
        let err = bound(&parse(&json!({"cpus": 17})).unwrap(), &limits).unwrap_err();
        assert_eq!(
            err.message,
            "nshResources: cpus 17 is above the cluster's limit of 16"
        );
        let err = bound(&parse(&json!({"gres": "gpu:1"})).unwrap(), &limits).unwrap_err();
        assert!(err.message.contains("gres is not allowed"));
    }
}
