//! Runtime mode: the hub started by edgeAgent as `$edgeHub`, with the environment the IoT Edge
//! runtime injects (`IOTEDGE_WORKLOADURI`, `IOTEDGE_DEVICEID`, `IOTEDGE_MODULEID`,
//! `IOTEDGE_MODULEGENERATIONID`, `IOTEDGE_IOTHUBHOSTNAME`, `EdgeDeviceHostName`,
//! `IOTEDGE_GATEWAYHOSTNAME` on a nested child, `IOTEDGE_APIVERSION`). Names are looked up
//! ignoring case, as .NET configuration does for edgeHub.
//!
//! The presence of `IOTEDGE_WORKLOADURI` selects runtime mode. The config file is then optional:
//! what it leaves out gets edgeHub's defaults (listeners on 5671/8883/443, metrics on 9600,
//! `dataDir` = `{StorageFolder}/edgeHub`, no routes until the `$edgeHub` twin's desired
//! properties bring them, the upstream = the parent (`IOTEDGE_GATEWAYHOSTNAME`) or IoT Hub).
//! No key of `$edgeHub` may be configured: every token is signed through the workload API.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::ConfigError;
use crate::model::identity::ModuleId;

/// The workload API of the runtime and this module's identity there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeSettings {
    /// `unix:///path` (or `http://host:port`).
    pub workload_uri: String,
    /// `$edgeHub`.
    pub module_id: ModuleId,
    /// The generation id of the `$edgeHub` identity (part of every workload path).
    pub generation_id: String,
    /// The runtime's api-version (`IOTEDGE_APIVERSION`), for the log; the hub speaks
    /// `2020-07-07`, as edgeHub does.
    pub api_version: Option<String>,
    /// `IOTEDGE_GATEWAYHOSTNAME`: the parent edge device on a nested child.
    pub parent_hostname: Option<String>,
    /// `DeviceScopeCacheRefreshRateSecs`: between full refreshes of the device scope (3600).
    pub scope_refresh_rate_secs: u64,
    /// `DeviceScopeCacheRefreshDelaySecs`: the least time between two on-demand refreshes, and
    /// between two lookups of one identity (120).
    pub scope_refresh_delay_secs: u64,
}

/// edgeHub's defaults of the device-scope refresh settings.
const DEFAULT_REFRESH_RATE_SECS: u64 = 3600;
const DEFAULT_REFRESH_DELAY_SECS: u64 = 120;

/// The value of `name` in `env`, ignoring case (an exact match wins).
pub fn env_get<'a>(env: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    env.get(name)
        .or_else(|| {
            env.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .map(String::as_str)
        .filter(|v| !v.trim().is_empty())
}

/// Is the hub started by the IoT Edge runtime?
pub fn detected(env: &HashMap<String, String>) -> bool {
    env_get(env, "IOTEDGE_WORKLOADURI").is_some()
}

/// Reads the runtime's variables; `None` outside runtime mode.
pub fn from_env(
    env: &HashMap<String, String>,
) -> Option<Result<RuntimeSettings, Vec<ConfigError>>> {
    let workload_uri = env_get(env, "IOTEDGE_WORKLOADURI")?.trim().to_owned();
    let mut errors = Vec::new();
    let mut err = |var: &str, message: String| {
        errors.push(ConfigError {
            path: format!("env {var}"),
            message,
        })
    };
    for var in [
        "IOTEDGE_DEVICEID",
        "IOTEDGE_IOTHUBHOSTNAME",
        "EdgeDeviceHostName",
        "IOTEDGE_MODULEGENERATIONID",
    ] {
        if env_get(env, var).is_none() {
            err(
                var,
                "is required in runtime mode (IOTEDGE_WORKLOADURI is set)".into(),
            );
        }
    }
    let module_id = match env_get(env, "IOTEDGE_MODULEID") {
        Some(m) if m == "$edgeHub" => ModuleId::parse(m).ok(),
        Some(m) => {
            err(
                "IOTEDGE_MODULEID",
                format!("{m:?}: this hub runs as the $edgeHub module"),
            );
            None
        }
        None => {
            err("IOTEDGE_MODULEID", "is required in runtime mode".into());
            None
        }
    };
    if let Some(scheme) = env_get(env, "IOTEDGE_AUTHSCHEME") {
        if !scheme.eq_ignore_ascii_case("sasToken") {
            err(
                "IOTEDGE_AUTHSCHEME",
                format!("{scheme:?}: only sasToken is supported"),
            );
        }
    }
    if !(workload_uri.starts_with("unix:///") || workload_uri.starts_with("http://")) {
        err(
            "IOTEDGE_WORKLOADURI",
            format!("{workload_uri:?}: must be unix:///path or http://host:port"),
        );
    }
    let mut seconds = |var: &str, default: u64, min: u64| match env_get(env, var) {
        None => default,
        Some(v) => match v.trim().parse::<u64>() {
            Ok(n) if n >= min => n,
            _ => {
                err(
                    var,
                    format!("{v:?}: must be a whole number of seconds, at least {min}"),
                );
                default
            }
        },
    };
    let scope_refresh_rate_secs = seconds(
        "DeviceScopeCacheRefreshRateSecs",
        DEFAULT_REFRESH_RATE_SECS,
        1,
    );
    let scope_refresh_delay_secs = seconds(
        "DeviceScopeCacheRefreshDelaySecs",
        DEFAULT_REFRESH_DELAY_SECS,
        0,
    );
    let generation_id = env_get(env, "IOTEDGE_MODULEGENERATIONID")
        .unwrap_or_default()
        .to_owned();
    if !errors.is_empty() {
        return Some(Err(errors));
    }
    Some(Ok(RuntimeSettings {
        workload_uri,
        module_id: module_id?,
        generation_id,
        api_version: env_get(env, "IOTEDGE_APIVERSION").map(str::to_owned),
        parent_hostname: env_get(env, "IOTEDGE_GATEWAYHOSTNAME").map(str::to_owned),
        scope_refresh_rate_secs,
        scope_refresh_delay_secs,
    }))
}

/// Fills in what a runtime-mode config file may leave out, before the file is compiled.
pub fn fill_defaults(root: &mut Map<String, Value>, env: &HashMap<String, String>) {
    let default = |root: &mut Map<String, Value>, key: &str, v: Value| {
        root.entry(key.to_owned()).or_insert(v);
    };
    default(
        root,
        "listen",
        json!({"amqps": "0.0.0.0:5671", "mqtts": "0.0.0.0:8883", "https": "0.0.0.0:443",
               "metrics": "0.0.0.0:9600"}),
    );
    // edgeAgent's .NET level names (text after a comma ignored, as edgeHub reads it).
    let level = env_get(env, "RuntimeLogLevel").and_then(|l| {
        match l.split(',').next()?.trim().to_ascii_lowercase().as_str() {
            "verbose" => Some("trace"),
            "debug" => Some("debug"),
            "info" | "information" => Some("info"),
            "warning" => Some("warn"),
            "error" | "fatal" => Some("error"),
            _ => None,
        }
    });
    if let Some(level) = level {
        let log = root.entry("log".to_owned()).or_insert_with(|| json!({}));
        if let Some(log) = log.as_object_mut() {
            log.entry("level".to_owned())
                .or_insert(Value::String(level.to_owned()));
        }
    }
    let storage = env_get(env, "StorageFolder").unwrap_or("/tmp");
    default(
        root,
        "dataDir",
        Value::String(format!("{}/edgeHub", storage.trim_end_matches('/'))),
    );
    default(
        root,
        "$edgeHub",
        json!({"schemaVersion": "1.1", "routes": {}, "storeAndForwardConfiguration": {}}),
    );
    let parent = env_get(env, "IOTEDGE_GATEWAYHOSTNAME")
        .or_else(|| env_get(env, "IOTEDGE_IOTHUBHOSTNAME"))
        .map(str::to_owned);
    if let Some(host) = parent {
        let up = root
            .entry("upstream".to_owned())
            .or_insert_with(|| json!({}));
        if let Some(up) = up.as_object_mut() {
            up.entry("hostname".to_owned())
                .or_insert(Value::String(host));
            if let Some(p) = env_get(env, "UpstreamProtocol") {
                let protocol = if p.eq_ignore_ascii_case("amqpws") {
                    "amqpws"
                } else {
                    "amqp"
                };
                up.entry("protocol".to_owned())
                    .or_insert(Value::String(protocol.to_owned()));
            }
        }
    }
}

/// The `$edgeHub` section of a deployment as the `$edgeHub` twin's desired properties carry it
/// (edgeHub's `configSource: twin`), compiled as the config file's section is.
#[derive(Debug, Clone)]
pub struct EdgeHubDesired {
    pub routes: Vec<crate::routing::route::Route>,
    /// Routes that did not compile; the others run.
    pub route_errors: Vec<ConfigError>,
    pub time_to_live_secs: Option<u64>,
    pub max_store_bytes: Option<u64>,
}

/// Compiles the `$edgeHub` twin's desired properties (`$`-prefixed metadata ignored).
pub fn edge_hub_desired(
    settings: &super::Settings,
    desired: &Map<String, Value>,
) -> Result<EdgeHubDesired, super::ConfigErrors> {
    let section: Map<String, Value> = desired
        .iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let root = json!({
        "deviceId": settings.device_id.as_str(),
        "iothubHostname": settings.iothub_hostname,
        "gatewayHostname": settings.gateway_hostname,
        "listen": {"amqps": settings.listen.amqps.to_string()},
        "dataDir": settings.data_dir,
        "$edgeHub": section,
    });
    let s = super::compile(&root)?;
    Ok(EdgeHubDesired {
        routes: s.routes,
        route_errors: s.route_errors,
        time_to_live_secs: s.time_to_live_secs,
        max_store_bytes: s.max_store_bytes,
    })
}

/// What runtime mode forbids in the file: keys of `$edgeHub` (the workload API signs).
pub fn check(root: &Map<String, Value>) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if let Some(up) = root.get("upstream").and_then(Value::as_object) {
        for key in ["sharedAccessKey", "connectionString"] {
            if up.contains_key(key) {
                errors.push(ConfigError {
                    path: format!("$.upstream.{key}"),
                    message:
                        "not in runtime mode: $edgeHub's tokens are signed by the workload API"
                            .into(),
                });
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn runtime_env() -> HashMap<String, String> {
        env(&[
            (
                "IOTEDGE_WORKLOADURI",
                "unix:///var/run/iotedge/workload.sock",
            ),
            ("IOTEDGE_DEVICEID", "edge1"),
            ("IOTEDGE_MODULEID", "$edgeHub"),
            ("IOTEDGE_MODULEGENERATIONID", "638412345678901234"),
            ("IOTEDGE_IOTHUBHOSTNAME", "contoso.azure-devices.net"),
            ("IOTEDGE_AUTHSCHEME", "sasToken"),
            ("IOTEDGE_APIVERSION", "2022-08-03"),
            ("EdgeDeviceHostName", "Edge1.Contoso.Local"),
        ])
    }

    #[test]
    fn names_are_looked_up_ignoring_case() {
        let e = env(&[("edgeDEVICEhostname", "h"), ("x", "")]);
        assert_eq!(env_get(&e, "EdgeDeviceHostName"), Some("h"));
        assert_eq!(env_get(&e, "x"), None, "empty is absent");
    }

    #[test]
    fn the_runtime_environment_is_the_whole_config() {
        let e = runtime_env();
        let r = from_env(&e).unwrap().unwrap();
        assert_eq!(r.module_id.as_str(), "$edgeHub");
        assert_eq!(r.generation_id, "638412345678901234");
        assert_eq!(r.parent_hostname, None);
        assert_eq!(r.scope_refresh_rate_secs, 3600);
        assert_eq!(r.scope_refresh_delay_secs, 120);
        let s = crate::config::from_str("{}", &e).unwrap();
        assert_eq!(s.device_id.as_str(), "edge1");
        assert_eq!(s.iothub_hostname, "contoso.azure-devices.net");
        assert_eq!(s.gateway_hostname, "Edge1.Contoso.Local");
        assert_eq!(s.listen.amqps.port(), 5671);
        assert_eq!(s.listen.https.map(|a| a.port()), Some(443));
        assert_eq!(s.data_dir, std::path::PathBuf::from("/tmp/edgeHub"));
        assert!(s.routes.is_empty());
        let up = s.upstream.as_ref().unwrap();
        assert_eq!(up.hostname, "contoso.azure-devices.net");
        assert_eq!(s.runtime, Some(r));
    }

    #[test]
    fn a_nested_child_goes_upstream_to_its_parent() {
        let mut e = runtime_env();
        e.insert("IOTEDGE_GATEWAYHOSTNAME".into(), "parent1.local".into());
        e.insert("storagefolder".into(), "/data/".into());
        e.insert("UpstreamProtocol".into(), "AmqpWs".into());
        e.insert("RuntimeLogLevel".into(), "Warning".into());
        let s = crate::config::from_str("{}", &e).unwrap();
        assert_eq!(s.log_level, "warn");
        let up = s.upstream.unwrap();
        assert_eq!(up.hostname, "parent1.local");
        assert_eq!(up.protocol, crate::config::UpstreamProtocol::AmqpWs);
        assert_eq!(s.data_dir, std::path::PathBuf::from("/data/edgeHub"));
    }

    #[test]
    fn the_edge_hub_twin_brings_routes_and_store_settings() {
        let s = crate::config::from_str("{}", &runtime_env()).unwrap();
        let desired = json!({
            "schemaVersion": "1.1",
            "routes": {"r1": "FROM /messages/modules/a/* INTO BrokeredEndpoint(\"/modules/b/inputs/in\")",
                       "bad": "FROM nowhere"},
            "storeAndForwardConfiguration": {"timeToLiveSecs": 60, "storeLimits": {"maxSizeBytes": 1048576}},
            "$version": 4
        });
        let d = edge_hub_desired(&s, desired.as_object().unwrap()).unwrap();
        assert_eq!(d.routes.len(), 1);
        assert_eq!(d.route_errors.len(), 1);
        assert_eq!(d.time_to_live_secs, Some(60));
        assert_eq!(d.max_store_bytes, Some(1_048_576));
        let wrong = json!({"schemaVersion": "9.9", "routes": {}});
        assert!(edge_hub_desired(&s, wrong.as_object().unwrap()).is_err());
    }

    #[test]
    fn what_is_missing_or_wrong_is_named() {
        let mut e = runtime_env();
        e.remove("EdgeDeviceHostName");
        e.insert("IOTEDGE_MODULEID".into(), "filter".into());
        let errs = crate::config::from_str("{}", &e).unwrap_err();
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert!(paths.contains(&"env EdgeDeviceHostName"), "{paths:?}");
        assert!(paths.contains(&"env IOTEDGE_MODULEID"), "{paths:?}");

        let mut e = runtime_env();
        e.insert("devicescopecacherefreshratesecs".into(), "0".into());
        e.insert("DeviceScopeCacheRefreshDelaySecs".into(), "soon".into());
        let errs = crate::config::from_str("{}", &e).unwrap_err();
        let paths: Vec<&str> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert!(
            paths.contains(&"env DeviceScopeCacheRefreshRateSecs"),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"env DeviceScopeCacheRefreshDelaySecs"),
            "{paths:?}"
        );
        let mut e = runtime_env();
        e.insert("DEVICESCOPECACHEREFRESHRATESECS".into(), "600".into());
        e.insert("DeviceScopeCacheRefreshDelaySecs".into(), "0".into());
        let r = from_env(&e).unwrap().unwrap();
        assert_eq!(
            (r.scope_refresh_rate_secs, r.scope_refresh_delay_secs),
            (600, 0)
        );

        let errs = crate::config::from_str(
            r#"{"upstream": {"sharedAccessKey": "AAAA"}}"#,
            &runtime_env(),
        )
        .unwrap_err();
        assert!(
            errs.0
                .iter()
                .any(|e| e.path == "$.upstream.sharedAccessKey"),
            "{errs}"
        );
    }
}
