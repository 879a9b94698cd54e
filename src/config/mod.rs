//! Configuration: a JSON file, overridden by a documented set of environment variables,
//! compiled into a validated [`Settings`].
//!
//! The file is first read as plain JSON and walked by hand so that *every* problem is reported
//! at once, each with its JSON path (`$.listen.amqps`, `$["$edgeHub"].routes.r1`). Unknown keys
//! are errors. A route that does not parse is reported like any other error by `check-config`,
//! but `run` starts with the valid routes and logs the invalid ones: one bad route never stops
//! the rest. Tests pass the environment as a map; nothing here reads the process environment.

//!
//! One function per section reads it: [`sections`] (listen, tls, limits, storage, log,
//! modules), [`devices`] (downstream devices, service policies), [`upstream`] and [`edge_hub`]
//! (routes, store and forward), all through the error-collecting [`walk::Walk`].

mod devices;
mod edge_hub;
pub mod runtime;
mod sections;
#[cfg(test)]
mod tests;
mod upstream;
mod walk;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};

mod builtin;
pub use builtin::{BuiltInEndpoint, DEFAULT_CONSUMER_GROUP};

pub use self::runtime::RuntimeSettings;
pub use self::upstream::{Proxy, UpstreamProtocol, UpstreamSettings};
use self::walk::{child, hostname_ok, Walk};
use crate::{
    model::identity::{DeviceId, Key, KeyPair, ModuleId},
    routing::route::Route,
};

/// Environment variables that override config keys, in the order they are applied.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("IOTEDGE_DEVICEID", "deviceId"),
    ("IOTEDGE_IOTHUBHOSTNAME", "iothubHostname"),
    ("EDGEDEVICEHOSTNAME", "gatewayHostname"),
    ("EDGEHUB_DEVICE_ID", "deviceId"),
    ("EDGEHUB_IOTHUB_HOSTNAME", "iothubHostname"),
    ("EDGEHUB_GATEWAY_HOSTNAME", "gatewayHostname"),
    ("EDGEHUB_LISTEN_AMQPS", "listen.amqps"),
    ("EDGEHUB_LISTEN_HTTPS", "listen.https"),
    ("EDGEHUB_LISTEN_MQTTS", "listen.mqtts"),
    ("EDGEHUB_LISTEN_METRICS", "listen.metrics"),
    ("EDGEHUB_DATA_DIR", "dataDir"),
    ("EDGEHUB_DEVICE_KEY", "deviceKey"),
];

/// One problem in the configuration, located by its JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every error found, plus the ones that only concern single routes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Where the hub listens. `https`, `mqtts` and `metrics` may be turned off with `null`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub amqps: SocketAddr,
    /// MQTT 3.1.1 over TLS; `0.0.0.0:8883` when absent (edgeHub's port).
    pub mqtts: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

/// edgeHub's MQTT port, the one the SDKs dial.
pub const DEFAULT_MQTTS_PORT: u16 = 8883;

/// User-supplied certificate files; when absent the hub makes its own under `dataDir`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsFiles {
    pub ca_cert: Option<PathBuf>,
    pub server_cert: Option<PathBuf>,
    pub server_key: Option<PathBuf>,
    /// PEM file of the CAs that sign devices' client certificates (`devices.<id>.x509.ca`).
    pub client_ca_certs: Option<PathBuf>,
}

/// Tunables with safe defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Open AMQP connections at most; more are closed right after accept.
    pub max_connections: usize,
    /// TLS + AMQP open must finish within this many seconds.
    pub handshake_timeout_secs: u64,
    /// Messages each endpoint queue holds before senders are held back.
    pub queue_capacity: usize,
    /// Unsettled messages in flight to one module.
    pub delivery_window: usize,
    /// Largest message accepted from a client, in bytes.
    pub max_message_size: u64,
    /// Longest direct-method name accepted by the method API.
    pub method_name_max_len: usize,
    /// Largest direct-method payload accepted by the method API, in bytes.
    pub method_payload_max_bytes: usize,
    /// Seconds after the AMQP open within which a connection must hold a valid token (or a
    /// SASL PLAIN identity); a connection that never authenticates is closed then.
    pub auth_timeout_secs: u64,
    /// Connections still in their TLS, AMQP or authentication handshake at most; a new one
    /// beyond this closes the oldest of them, so unauthenticated peers never hold every slot.
    pub max_pending_connections: usize,
    /// The idle-time-out the hub announces, in seconds: a peer that sends no frame for this
    /// long is closed (0 = none).
    pub idle_timeout_secs: u64,
    /// Sessions one AMQP connection may begin (the hub announces `channel-max` one less).
    pub max_sessions_per_connection: usize,
    /// Links one session may hold attached; more are refused with
    /// `amqp:resource-limit-exceeded`.
    pub max_links_per_session: usize,
    /// Bytes of unfinished multi-frame deliveries one authenticated connection may hold (at
    /// least `max_message_size` is allowed).
    pub max_incomplete_bytes_per_connection: u64,
    /// Seconds shutdown waits for connections and tasks before the hub exits anyway.
    pub shutdown_timeout_secs: u64,
    /// Open connections on the HTTPS listener at most; more are closed right after accept.
    pub https_max_connections: usize,
    /// Open connections on the metrics listener at most; more are closed right after accept.
    pub metrics_max_connections: usize,
    /// An HTTP request's head (and an idle keep-alive connection's next one) must arrive
    /// within this many seconds, on both HTTP listeners.
    pub http_header_timeout_secs: u64,
    /// An HTTP request's whole body must arrive within this many seconds.
    pub http_body_timeout_secs: u64,
    /// Bytes of unsettled deliveries in flight to one module input link: the hub sends no
    /// more while this many wait for the module's outcome (one message always goes, so a
    /// link may hold this plus one message).
    pub max_unsettled_bytes_per_link: u64,
    /// Identities (devices and modules) the service API's registry may hold, besides those of
    /// the config file; a create beyond it is refused (403, IoT Hub's quota error).
    pub max_registry_identities: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1000,
            handshake_timeout_secs: 10,
            queue_capacity: 10_000,
            delivery_window: 256,
            max_message_size: 1024 * 1024,
            method_name_max_len: 100,
            method_payload_max_bytes: 128 * 1024,
            auth_timeout_secs: 10,
            max_pending_connections: 500,
            idle_timeout_secs: 240,
            max_sessions_per_connection: 256,
            max_links_per_session: 64,
            max_unsettled_bytes_per_link: 8 * 1024 * 1024,
            max_incomplete_bytes_per_connection: 8 * 1024 * 1024,
            shutdown_timeout_secs: 10,
            https_max_connections: 100,
            metrics_max_connections: 16,
            http_header_timeout_secs: 10,
            http_body_timeout_secs: 30,
            max_registry_identities: 1000,
        }
    }
}

/// `storage.commitIntervalMs` when the config does not set it.
pub const DEFAULT_COMMIT_INTERVAL_MS: u64 = 2;
/// The largest `storage.commitIntervalMs` taken: a sender waits up to this for its
/// acknowledgement.
pub const MAX_COMMIT_INTERVAL_MS: u64 = 100;

/// Where queued messages live and what "durable" means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    /// Queues in the store under `dataDir/store` (default) or in memory only.
    pub persistent: bool,
    pub sync: crate::store::durable::SyncPolicy,
    /// `commitIntervalMs`: with `sync = "commit"`, the least time between the starts of two
    /// fsyncs (see `DurableStore::set_commit_interval`).
    pub commit_interval_ms: u64,
    /// What happens when `storeLimits.maxSizeBytes` is reached.
    pub overflow: crate::store::durable::Overflow,
    /// Endpoints that serve fresh messages interleaved with their backlog.
    pub live_first: Vec<crate::routing::route::Sink>,
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            persistent: true,
            sync: crate::store::durable::SyncPolicy::Commit,
            commit_interval_ms: DEFAULT_COMMIT_INTERVAL_MS,
            overflow: crate::store::durable::Overflow::RejectNew,
            live_first: Vec::new(),
        }
    }
}

/// A module this hub serves.
#[derive(Debug, Clone)]
pub struct ModuleSettings {
    /// Explicit keys; `None` means derived from the device key.
    pub keys: Option<KeyPair>,
    /// The module's desired properties from the deployment manifest.
    pub desired: Map<String, Value>,
}

/// A downstream device of this hub: a leaf device, or with `edge` a child edge hub.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    /// Explicit keys; `None` means derived from this hub's device key
    /// ([`Key::derive_device_key`]).
    pub keys: Option<KeyPair>,
    /// A child edge device: its `$edgeHub` authenticates, and may put tokens on behalf of,
    /// its own modules.
    pub edge: bool,
    /// Authentication by client certificate (see `x509`); the keys work as well.
    pub x509: Option<crate::model::x509::X509Auth>,
    /// A child edge device's modules, served to its hub by the device-scope API with their
    /// keys (explicit, else derived from the child's device key by the module-key rule).
    pub modules: BTreeMap<ModuleId, Option<KeyPair>>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub device_id: DeviceId,
    pub iothub_hostname: String,
    pub gateway_hostname: String,
    pub listen: Listen,
    pub data_dir: PathBuf,
    /// `None`: generated on first start and kept in `dataDir/device.key`.
    pub device_key: Option<Key>,
    pub tls: TlsFiles,
    pub modules: BTreeMap<ModuleId, ModuleSettings>,
    /// Downstream devices (leaf devices and child edge devices).
    pub devices: BTreeMap<DeviceId, DeviceSettings>,
    /// Shared access policies for the service API: name → keys.
    pub service_policies: BTreeMap<String, KeyPair>,
    pub routes: Vec<Route>,
    /// Routes that did not parse; the hub runs without them.
    pub route_errors: Vec<ConfigError>,
    /// Global message TTL in seconds; `None` = never expire.
    pub time_to_live_secs: Option<u64>,
    pub max_store_bytes: Option<u64>,
    pub limits: Limits,
    pub storage: Storage,
    /// Log format: `text` (default) or `json`.
    pub log_format: String,
    /// Log filter when `RUST_LOG` is not set.
    pub log_level: String,
    /// The parent this hub forwards to (IoT Hub or a parent edge hub); `None` = standalone.
    pub upstream: Option<UpstreamSettings>,
    /// Standalone only: `$upstream` is a retained log read through Event Hubs.
    pub built_in_endpoint: Option<BuiltInEndpoint>,
    /// Runtime mode (started by the IoT Edge runtime as `$edgeHub`): its workload API.
    pub runtime: Option<RuntimeSettings>,
}

/// Reads, overrides and compiles a config file. In runtime mode a missing file is an empty one.
pub fn load(path: &Path, env: &HashMap<String, String>) -> Result<Settings, ConfigErrors> {
    if runtime::detected(env) && !path.exists() {
        return from_str("{}", env);
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: "$".into(),
            message: format!("cannot read {}: {e}", path.display()),
        }])
    })?;
    from_str(&text, env)
}

/// Parses and compiles config text.
pub fn from_str(text: &str, env: &HashMap<String, String>) -> Result<Settings, ConfigErrors> {
    let mut value: Value = serde_json::from_str(text).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: "$".into(),
            message: format!("not valid JSON: {e}"),
        }])
    })?;
    let mut duplicates = duplicate_keys(text);
    let runtime = runtime::from_env(env);
    if let (Some(_), Some(root)) = (&runtime, value.as_object_mut()) {
        duplicates.extend(runtime::check(root));
        runtime::fill_defaults(root, env);
    }
    apply_env(&mut value, env);
    let runtime = match runtime.transpose() {
        Ok(r) => r,
        Err(errors) => {
            duplicates.extend(errors);
            None
        }
    };
    match compile(&value) {
        Ok(settings) if duplicates.is_empty() => Ok(Settings {
            runtime,
            ..settings
        }),
        Ok(_) => Err(ConfigErrors(duplicates)),
        Err(ConfigErrors(errors)) => {
            Err(ConfigErrors(duplicates.into_iter().chain(errors).collect()))
        }
    }
}

/// Keys that appear more than once in one object, by path: JSON parsers keep only one of them
/// (serde_json the last), so such a file does not say what its writer may think it says.
fn duplicate_keys(text: &str) -> Vec<ConfigError> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

    /// Walks one value at `path`, recording the duplicates it finds.
    struct Walker<'a> {
        path: String,
        found: &'a mut Vec<ConfigError>,
    }

    impl<'de> DeserializeSeed<'de> for Walker<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Walker<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0;
            loop {
                let item = Walker {
                    path: format!("{}[{i}]", self.path),
                    found: &mut *self.found,
                };
                if seq.next_element_seed(item)?.is_none() {
                    return Ok(());
                }
                i += 1;
            }
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = map.next_key::<String>()? {
                let path = child(&self.path, &k);
                if !seen.insert(k) && !self.found.iter().any(|e| e.path == path) {
                    self.found.push(ConfigError {
                        path: path.clone(),
                        message: "appears more than once in its object (only one would be used); keep one".into(),
                    });
                }
                map.next_value_seed(Walker {
                    path,
                    found: &mut *self.found,
                })?;
            }
            Ok(())
        }
    }

    let mut found = Vec::new();
    let mut de = serde_json::Deserializer::from_str(text);
    // The text already parsed as JSON; an error here can only repeat that one.
    let _ = Walker {
        path: "$".into(),
        found: &mut found,
    }
    .deserialize(&mut de);
    found
}

fn apply_env(value: &mut Value, env: &HashMap<String, String>) {
    let Some(root) = value.as_object_mut() else {
        return;
    };
    for (var, key) in ENV_OVERRIDES {
        // Ignoring case: edgeAgent injects `EdgeDeviceHostName`.
        let Some(v) = runtime::env_get(env, var) else {
            continue;
        };
        let (obj, leaf) = match key.split_once('.') {
            Some((parent, leaf)) => {
                let p = root
                    .entry(parent.to_owned())
                    .or_insert_with(|| Value::Object(Map::new()));
                match p.as_object_mut() {
                    Some(o) => (o, leaf),
                    None => continue,
                }
            }
            None => (&mut *root, *key),
        };
        obj.insert(leaf.to_owned(), Value::String(v.to_owned()));
    }
    // As edgeHub: the environment's proxy carries AMQP over WebSockets to the parent, unless
    // the config names one.
    let proxy = ["https_proxy", "HTTPS_PROXY"]
        .iter()
        .find_map(|k| env.get(*k).filter(|v| !v.trim().is_empty()));
    if let (Some(proxy), Some(up)) = (
        proxy,
        root.get_mut("upstream").and_then(|u| u.as_object_mut()),
    ) {
        if up.get("protocol").and_then(Value::as_str) == Some("amqpws") && !up.contains_key("proxy")
        {
            up.insert("proxy".to_owned(), Value::String(proxy.trim().to_owned()));
        }
    }
}

/// Compiles the whole document, section by section, in the order its errors are listed.
fn compile(root: &Value) -> Result<Settings, ConfigErrors> {
    let mut w = Walk { errors: Vec::new() };
    let Some(o) = w.object(
        root,
        "$",
        &[
            "deviceId",
            "iothubHostname",
            "gatewayHostname",
            "listen",
            "dataDir",
            "deviceKey",
            "tls",
            "limits",
            "storage",
            "log",
            "modules",
            "devices",
            "servicePolicies",
            "upstream",
            "builtInEndpoint",
            "$edgeHub",
        ],
    ) else {
        return Err(ConfigErrors(w.errors));
    };

    let device_id = w
        .string(o, "$", "deviceId", true)
        .and_then(|s| match DeviceId::parse(s) {
            Ok(d) => Some(d),
            Err(e) => {
                w.err("$.deviceId", e.to_string());
                None
            }
        });
    let host = |w: &mut Walk, key: &str| {
        w.string(o, "$", key, true).and_then(|s| {
            if hostname_ok(s) {
                Some(s.to_owned())
            } else {
                w.err(&child("$", key), format!("{s:?} is not a valid host name"));
                None
            }
        })
    };
    let iothub_hostname = host(&mut w, "iothubHostname");
    let gateway_hostname = host(&mut w, "gatewayHostname");
    let listen = sections::listen(&mut w, o.get("listen"));
    let data_dir = w.string(o, "$", "dataDir", true).map(PathBuf::from);
    let device_key = w.key(o, "$", "deviceKey");
    let tls = sections::tls(&mut w, o.get("tls"));
    let limits = sections::limits(&mut w, o.get("limits"));
    let storage = sections::storage(&mut w, o.get("storage"));
    let upstream = o
        .get("upstream")
        .and_then(|u| upstream::upstream_settings(&mut w, u));
    let built_in_endpoint = builtin::built_in_endpoint(
        &mut w,
        o.get("builtInEndpoint"),
        iothub_hostname.as_deref(),
        upstream.is_some(),
    );
    let (log_format, log_level) = sections::log(&mut w, o.get("log"));
    let modules = sections::modules(&mut w, o.get("modules"));
    let devices = devices::downstream_devices(&mut w, o.get("devices"), device_id.as_ref());
    devices::client_ca_needed(&mut w, &devices, &tls);
    let service_policies = devices::service_policies(&mut w, o.get("servicePolicies"));
    let edge_hub::EdgeHub {
        routes,
        route_errors,
        time_to_live_secs,
        max_store_bytes,
    } = edge_hub::edge_hub(&mut w, o.get("$edgeHub"));

    if !w.errors.is_empty() {
        w.errors.extend(route_errors);
        return Err(ConfigErrors(w.errors));
    }
    match (
        device_id,
        iothub_hostname,
        gateway_hostname,
        listen,
        data_dir,
    ) {
        (
            Some(device_id),
            Some(iothub_hostname),
            Some(gateway_hostname),
            Some(listen),
            Some(data_dir),
        ) => Ok(Settings {
            device_id,
            iothub_hostname,
            gateway_hostname,
            listen,
            data_dir,
            device_key,
            tls,
            modules,
            devices,
            service_policies,
            routes,
            route_errors,
            time_to_live_secs,
            max_store_bytes,
            limits,
            storage,
            log_format,
            log_level,
            upstream,
            built_in_endpoint,
            runtime: None,
        }),
        _ => Err(ConfigErrors(vec![ConfigError {
            path: "$".into(),
            message: "incomplete configuration".into(),
        }])),
    }
}
