//! `builtInEndpoint`: in standalone mode, telemetry routed to `$upstream` is kept in a
//! retained, partitioned log that back ends read with the Event Hubs SDKs, as they read IoT
//! Hub's built-in endpoint. On by default in standalone mode (no `upstream`) with the defaults
//! below; `"builtInEndpoint": null` turns it off (`$upstream` then queues until its TTL). With
//! an upstream it is off, and configuring it is an error.

use serde_json::Value;

use super::walk::{child, Walk};

/// The consumer group every event hub has.
pub const DEFAULT_CONSUMER_GROUP: &str = "$Default";
/// Most partitions (Event Hubs' own maximum for a standard namespace).
pub const MAX_PARTITIONS: u64 = 32;
/// Most consumer groups besides `$Default` (Event Hubs standard tier: 20 in all).
pub const MAX_CONSUMER_GROUPS: usize = 19;
/// Longest retention: 7 days, as Event Hubs standard.
pub const MAX_RETENTION_HOURS: f64 = 7.0 * 24.0;
/// Shortest retention: one second (a fraction of an hour is accepted, for sites that keep
/// little and for tests).
pub const MIN_RETENTION_MS: u64 = 1000;
const HOUR_MS: f64 = 3_600_000.0;

/// The Event Hubs-compatible endpoint of a standalone hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltInEndpoint {
    /// The event hub name (`EntityPath`); default: the IoT hub's name (the first label of
    /// `iothubHostname`), as IoT Hub names its own.
    pub name: String,
    pub partition_count: u32,
    /// Events older than this (`retentionHours`, which may be a fraction) are removed, whoever
    /// has read them.
    pub retention_ms: u64,
    /// Consumer groups, `$Default` first; each reads every event independently.
    pub consumer_groups: Vec<String>,
}

impl BuiltInEndpoint {
    /// The consumer group as configured, matched ignoring case (the SDKs write `$default`).
    pub fn consumer_group(&self, name: &str) -> Option<&str> {
        self.consumer_groups
            .iter()
            .find(|g| g.eq_ignore_ascii_case(name))
            .map(String::as_str)
    }
}

/// Event Hubs entity names: letters, digits, `-`, `_`, `.`, starting with a letter or digit.
fn name_ok(s: &str) -> bool {
    (1..=50).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

pub(super) fn built_in_endpoint(
    w: &mut Walk,
    v: Option<&Value>,
    iothub_hostname: Option<&str>,
    with_upstream: bool,
) -> Option<BuiltInEndpoint> {
    let p = "$.builtInEndpoint";
    let v = match v {
        // Absent: on in standalone mode, with the defaults.
        None if with_upstream => return None,
        None => &Value::Object(Default::default()),
        Some(Value::Null) => return None,
        Some(v) => v,
    };
    let o = w.object(
        v,
        p,
        &["name", "partitionCount", "retentionHours", "consumerGroups"],
    )?;
    if with_upstream {
        w.err(
            p,
            "only in standalone mode: with an upstream, IoT Hub's own built-in endpoint serves the telemetry",
        );
    }
    let name = match w.string(o, p, "name", false) {
        Some(n) if name_ok(n) => n.to_owned(),
        Some(n) => {
            w.err(
                &child(p, "name"),
                format!(
                    "{n:?}: 1–50 letters, digits, '-', '_', '.', starting with a letter or digit"
                ),
            );
            String::new()
        }
        None => iothub_hostname
            .and_then(|h| h.split('.').next())
            .unwrap_or_default()
            .to_owned(),
    };
    let partition_count = match w.uint(o, p, "partitionCount", MAX_PARTITIONS) {
        Some(0) => {
            w.err(&child(p, "partitionCount"), "must be at least 1");
            1
        }
        Some(n) => n as u32,
        None => 4,
    };
    let retention_ms = match o.get("retentionHours") {
        None => 24 * HOUR_MS as u64,
        Some(v) => {
            match v.as_f64() {
                Some(h)
                    if h > 0.0
                        && h <= MAX_RETENTION_HOURS
                        && (h * HOUR_MS) as u64 >= MIN_RETENTION_MS =>
                {
                    (h * HOUR_MS).round() as u64
                }
                _ => {
                    w.err(
                    &child(p, "retentionHours"),
                    format!("must be a number of hours from 1 second (0.0003) to {MAX_RETENTION_HOURS}"),
                );
                    HOUR_MS as u64
                }
            }
        }
    };
    let mut consumer_groups = vec![DEFAULT_CONSUMER_GROUP.to_owned()];
    match o.get("consumerGroups") {
        None => {}
        Some(Value::Array(groups)) => {
            for (i, g) in groups.iter().enumerate() {
                let at = format!("{p}.consumerGroups[{i}]");
                match g.as_str() {
                    Some(g) if consumer_groups.iter().any(|c| c.eq_ignore_ascii_case(g)) => {
                        if !g.eq_ignore_ascii_case(DEFAULT_CONSUMER_GROUP) {
                            w.err(&at, format!("{g:?} is listed twice"));
                        }
                    }
                    Some(g) if name_ok(g) => consumer_groups.push(g.to_owned()),
                    _ => w.err(
                        &at,
                        "a consumer group is 1–50 letters, digits, '-', '_', '.', starting with a letter or digit",
                    ),
                }
            }
            if consumer_groups.len() > MAX_CONSUMER_GROUPS + 1 {
                w.err(
                    &child(p, "consumerGroups"),
                    format!("at most {MAX_CONSUMER_GROUPS} besides $Default"),
                );
                consumer_groups.truncate(MAX_CONSUMER_GROUPS + 1);
            }
        }
        Some(_) => w.err(
            &child(p, "consumerGroups"),
            "must be an array of consumer group names",
        ),
    }
    Some(BuiltInEndpoint {
        name,
        partition_count,
        retention_ms,
        consumer_groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value, upstream: bool) -> (Option<BuiltInEndpoint>, Vec<String>) {
        parse_key(Some(&v), upstream)
    }

    fn parse_key(v: Option<&Value>, upstream: bool) -> (Option<BuiltInEndpoint>, Vec<String>) {
        let mut w = Walk { errors: Vec::new() };
        let b = built_in_endpoint(&mut w, v, Some("myhub.azure-devices.net"), upstream);
        (b, w.errors.into_iter().map(|e| e.path).collect())
    }

    #[test]
    fn on_by_default_in_standalone_mode_off_with_null_or_an_upstream() {
        let (absent, errors) = parse_key(None, false);
        assert!(errors.is_empty());
        assert_eq!(absent, parse(serde_json::json!({}), false).0);
        assert!(absent.is_some());
        assert_eq!(parse_key(Some(&Value::Null), false), (None, vec![]));
        assert_eq!(parse_key(None, true), (None, vec![]));
        assert_eq!(parse_key(Some(&Value::Null), true), (None, vec![]));
    }

    #[test]
    fn retention_may_be_a_fraction_of_an_hour() {
        let ms = |h: Value| parse(serde_json::json!({ "retentionHours": h }), false);
        assert_eq!(
            ms(serde_json::json!(0.5)).0.unwrap().retention_ms,
            1_800_000
        );
        assert_eq!(
            ms(serde_json::json!(168)).0.unwrap().retention_ms,
            168 * 3_600_000
        );
        assert_eq!(ms(serde_json::json!(0.001)).0.unwrap().retention_ms, 3_600);
        for bad in [
            serde_json::json!(0),
            serde_json::json!(-1),
            serde_json::json!(0.0001),
            serde_json::json!(168.5),
            serde_json::json!("1"),
        ] {
            assert_eq!(
                ms(bad.clone()).1,
                ["$.builtInEndpoint.retentionHours"],
                "{bad}"
            );
        }
    }

    #[test]
    fn defaults_and_errors() {
        let (b, errors) = parse(serde_json::json!({}), false);
        assert!(errors.is_empty());
        assert_eq!(
            b,
            Some(BuiltInEndpoint {
                name: "myhub".into(),
                partition_count: 4,
                retention_ms: 24 * 3_600_000,
                consumer_groups: vec!["$Default".into()],
            })
        );
        let (b, errors) = parse(
            serde_json::json!({"name": "telemetry", "partitionCount": 2, "retentionHours": 1,
                "consumerGroups": ["dashboards", "$default", "Stream.Analytics"]}),
            false,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let b = b.unwrap();
        assert_eq!(
            b.consumer_groups,
            ["$Default", "dashboards", "Stream.Analytics"]
        );
        assert_eq!(b.consumer_group("DASHBOARDS"), Some("dashboards"));
        assert_eq!(b.consumer_group("$DEFAULT"), Some("$Default"));
        assert_eq!(b.consumer_group("other"), None);
        let (_, errors) = parse(
            serde_json::json!({"name": "a/b", "partitionCount": 0, "retentionHours": 1000,
                "consumerGroups": ["x", "X", "bad name"], "extra": 1}),
            true,
        );
        assert_eq!(
            errors,
            [
                "$.builtInEndpoint.extra",
                "$.builtInEndpoint",
                "$.builtInEndpoint.name",
                "$.builtInEndpoint.partitionCount",
                "$.builtInEndpoint.retentionHours",
                "$.builtInEndpoint.consumerGroups[1]",
                "$.builtInEndpoint.consumerGroups[2]",
            ]
        );
    }
}
