//! Configuration: a JSON file, overridden by a documented set of environment variables,
//! compiled into a validated [`Settings`].
//!
//! The file is first read as plain JSON and walked by hand so that *every* problem is reported
//! at once, each with its JSON path (`$.listen.amqps`, `$["$edgeHub"].routes.r1`). Unknown keys
//! are errors. A route that does not parse is reported like any other error by `check-config`,
//! but `run` starts with the valid routes and logs the invalid ones: one bad route never stops
//! the rest. Tests pass the environment as a map; nothing here reads the process environment.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};

mod builtin;
pub use builtin::{BuiltInEndpoint, DEFAULT_CONSUMER_GROUP};

use crate::{
    model::identity::{DeviceId, Key, KeyPair, ModuleId},
    routing::route::{parse_statement, Route, DEFAULT_PRIORITY},
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
        }
    }
}

/// Where queued messages live and what "durable" means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    /// Queues in the store under `dataDir/store` (default) or in memory only.
    pub persistent: bool,
    pub sync: crate::store::durable::SyncPolicy,
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
}

/// Where and how this hub connects upstream.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub hostname: String,
    pub port: u16,
    /// PEM bundle of the CAs to trust; `None` = the system's roots.
    pub ca: Option<PathBuf>,
    /// The key of this hub's `$edgeHub` identity; `None` = derived from `deviceKey`.
    pub edge_hub_key: Option<Key>,
    /// Reconnect backoff bounds, in milliseconds.
    pub min_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Most unacknowledged telemetry transfers in flight upstream.
    pub window: usize,
    /// Lifetime of the tokens put upstream, in seconds; they are renewed on the live
    /// connection at three quarters of it.
    pub token_lifetime_secs: u64,
    /// AMQP over TLS (port 5671), or AMQP over WebSockets (port 443).
    pub protocol: UpstreamProtocol,
    /// The HTTP proxy the WebSocket connection goes through (`upstream.proxy`, else
    /// `https_proxy` as edgeHub reads it); only with `amqpws`.
    pub proxy: Option<Proxy>,
}

/// How the hub reaches its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Amqp,
    AmqpWs,
}

/// An HTTP proxy reached with `CONNECT`.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    /// `user:password` for basic authentication, from the URL.
    pub basic_auth: Option<String>,
}

impl fmt::Debug for Proxy {
    // The password stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)?;
        if self.basic_auth.is_some() {
            write!(f, " (with basic authentication)")?;
        }
        Ok(())
    }
}

impl Proxy {
    /// `http://[user[:password]@]host[:port]` (port default 80; a bare `host:port` is taken
    /// as http too, as curl does).
    pub fn parse(text: &str) -> Result<Self, String> {
        let with_scheme = if text.contains("://") {
            text.to_owned()
        } else {
            format!("http://{text}")
        };
        let url = url::Url::parse(&with_scheme).map_err(|e| format!("not a URL: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "the proxy is reached with http, not {}",
                url.scheme()
            ));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let basic_auth = (!url.username().is_empty()).then(|| {
            format!(
                "{}:{}",
                decode(url.username()),
                decode(url.password().unwrap_or_default())
            )
        });
        Ok(Self {
            host,
            port: url.port().unwrap_or(80),
            basic_auth,
        })
    }
}

fn upstream_settings(w: &mut Walk, u: &Value) -> Option<UpstreamSettings> {
    let p = "$.upstream";
    let u = w.object(
        u,
        p,
        &[
            "hostname",
            "port",
            "caCert",
            "sharedAccessKey",
            "connectionString",
            "minBackoffMs",
            "maxBackoffMs",
            "window",
            "tokenLifetimeSecs",
            "protocol",
            "proxy",
        ],
    )?;
    let hostname = w.string(u, p, "hostname", true).and_then(|h| {
        if hostname_ok(h) {
            Some(h.to_owned())
        } else {
            w.err(
                "$.upstream.hostname",
                format!("{h:?} is not a valid host name"),
            );
            None
        }
    });
    let protocol = match w.string(u, p, "protocol", false) {
        None | Some("amqp") => UpstreamProtocol::Amqp,
        Some("amqpws") => UpstreamProtocol::AmqpWs,
        Some(other) => {
            w.err(
                "$.upstream.protocol",
                format!("{other:?}: must be \"amqp\" or \"amqpws\""),
            );
            UpstreamProtocol::Amqp
        }
    };
    let default_port = match protocol {
        UpstreamProtocol::Amqp => 5671,
        UpstreamProtocol::AmqpWs => 443,
    };
    let port = w.uint(u, p, "port", 65_535).unwrap_or(default_port) as u16;
    let configured_proxy = w.string(u, p, "proxy", false);
    if configured_proxy.is_some() && protocol == UpstreamProtocol::Amqp {
        w.err(
            "$.upstream.proxy",
            "a proxy carries only \"amqpws\": set upstream.protocol to \"amqpws\"",
        );
    }
    let proxy = configured_proxy.and_then(|text| match Proxy::parse(text) {
        Ok(proxy) => Some(proxy),
        Err(e) => {
            w.err("$.upstream.proxy", e);
            None
        }
    });
    let ca = w.string(u, p, "caCert", false).map(PathBuf::from);
    let mut edge_hub_key = w.key(u, p, "sharedAccessKey");
    if let Some(cs) = w.string(u, p, "connectionString", false) {
        match crate::model::identity::ConnectionString::parse(cs) {
            Ok(c) if c.module_id.as_deref() == Some("$edgeHub") => {
                if edge_hub_key.is_some() {
                    w.err(p, "give sharedAccessKey or connectionString, not both");
                }
                match c.shared_access_key.as_deref().map(Key::from_base64) {
                    Some(Ok(k)) => edge_hub_key = Some(k),
                    Some(Err(e)) => w.err("$.upstream.connectionString", e),
                    None => w.err("$.upstream.connectionString", "has no SharedAccessKey"),
                }
            }
            Ok(_) => w.err(
                "$.upstream.connectionString",
                "must be the connection string of this device's $edgeHub module",
            ),
            Err(e) => w.err("$.upstream.connectionString", e),
        }
    }
    let min_backoff_ms = w.uint(u, p, "minBackoffMs", 60_000).unwrap_or(100).max(1);
    let max_backoff_ms = w.uint(u, p, "maxBackoffMs", 600_000).unwrap_or(10_000);
    if max_backoff_ms < min_backoff_ms {
        w.err("$.upstream.maxBackoffMs", "must be at least minBackoffMs");
    }
    let window = w.uint(u, p, "window", 65_535).unwrap_or(1000).max(1) as usize;
    let token_lifetime_secs = w.uint(u, p, "tokenLifetimeSecs", 86_400).unwrap_or(3600);
    if token_lifetime_secs < 4 {
        w.err("$.upstream.tokenLifetimeSecs", "must be at least 4");
    }
    Some(UpstreamSettings {
        hostname: hostname?,
        port,
        ca,
        edge_hub_key,
        min_backoff_ms,
        max_backoff_ms,
        window,
        token_lifetime_secs,
        protocol,
        proxy,
    })
}

/// `devices`: device id → `{primaryKey?, secondaryKey?, edge?}`.
fn downstream_devices(
    w: &mut Walk,
    v: Option<&Value>,
    own: Option<&DeviceId>,
) -> BTreeMap<DeviceId, DeviceSettings> {
    let mut devices = BTreeMap::new();
    let Some(v) = v else { return devices };
    let Some(m) = v.as_object() else {
        w.err("$.devices", "must be an object of device id → device");
        return devices;
    };
    for (id, spec) in m {
        let p = child("$.devices", id);
        let device = match DeviceId::parse(id) {
            Ok(d) if own.is_some_and(|o| o.as_str().eq_ignore_ascii_case(d.as_str())) => {
                w.err(&p, "is this hub's own deviceId");
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                w.err(&p, format!("invalid device id: {e}"));
                None
            }
        };
        let Some(spec) = w.object(spec, &p, &["primaryKey", "secondaryKey", "edge", "x509"]) else {
            continue;
        };
        let keys = w.key_pair(spec, &p, false);
        let x509 = spec
            .get("x509")
            .and_then(|x| device_x509(w, x, &child(&p, "x509")));
        let edge = match spec.get("edge") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                w.err(&child(&p, "edge"), "must be true or false");
                false
            }
        };
        if let Some(device) = device {
            let duplicate = devices
                .keys()
                .any(|d: &DeviceId| d.as_str().eq_ignore_ascii_case(device.as_str()));
            if duplicate {
                w.err(&p, "appears twice (ids compare case-insensitively)");
            }
            devices.insert(device, DeviceSettings { keys, edge, x509 });
        }
    }
    devices
}

/// `devices.<id>.x509`: `{primaryThumbprint?, secondaryThumbprint?}` or `{"ca": true}`.
fn device_x509(w: &mut Walk, v: &Value, p: &str) -> Option<crate::model::x509::X509Auth> {
    use crate::model::x509::{Thumbprint, X509Auth};
    let o = w.object(v, p, &["primaryThumbprint", "secondaryThumbprint", "ca"])?;
    let ca = match o.get("ca") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            w.err(&child(p, "ca"), "must be true or false");
            return None;
        }
    };
    let mut thumbprints = Vec::new();
    for key in ["primaryThumbprint", "secondaryThumbprint"] {
        if let Some(t) = w.string(o, p, key, false) {
            match Thumbprint::parse(t) {
                Ok(t) => thumbprints.push(t),
                Err(e) => w.err(&child(p, key), e),
            }
        }
    }
    match (ca, thumbprints.is_empty()) {
        (true, true) => Some(X509Auth::Ca),
        (false, false) => Some(X509Auth::Thumbprints(thumbprints)),
        (true, false) => {
            w.err(
                p,
                "either thumbprints or \"ca\": true, not both (as IoT Hub's authentication types)",
            );
            None
        }
        (false, true) => {
            if !o.contains_key("primaryThumbprint") && !o.contains_key("secondaryThumbprint") {
                w.err(
                    p,
                    "needs primaryThumbprint (and optionally secondaryThumbprint) or \"ca\": true",
                );
            }
            None
        }
    }
}

/// `servicePolicies`: policy name → `{primaryKey, secondaryKey?}`.
fn service_policies(w: &mut Walk, v: Option<&Value>) -> BTreeMap<String, KeyPair> {
    let mut policies = BTreeMap::new();
    let Some(v) = v else { return policies };
    let Some(m) = v.as_object() else {
        w.err(
            "$.servicePolicies",
            "must be an object of policy name → keys",
        );
        return policies;
    };
    for (name, spec) in m {
        let p = child("$.servicePolicies", name);
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            w.err(
                &p,
                "a policy name is 1–64 characters: letters, digits, '-', '_', '.'",
            );
        }
        let Some(spec) = w.object(spec, &p, &["primaryKey", "secondaryKey"]) else {
            continue;
        };
        if let Some(keys) = w.key_pair(spec, &p, true) {
            if name_ok {
                policies.insert(name.clone(), keys);
            }
        }
    }
    policies
}

/// Reads, overrides and compiles a config file.
pub fn load(path: &Path, env: &HashMap<String, String>) -> Result<Settings, ConfigErrors> {
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
    let duplicates = duplicate_keys(text);
    apply_env(&mut value, env);
    match compile(&value) {
        Ok(settings) if duplicates.is_empty() => Ok(settings),
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
        let Some(v) = env.get(*var) else { continue };
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
        obj.insert(leaf.to_owned(), Value::String(v.clone()));
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

/// Collects errors while walking the JSON.
struct Walk {
    errors: Vec<ConfigError>,
}

fn child(path: &str, key: &str) -> String {
    if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !key.is_empty() {
        format!("{path}.{key}")
    } else {
        format!("{path}[{}]", Value::String(key.to_owned()))
    }
}

impl Walk {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    fn object<'a>(
        &mut self,
        v: &'a Value,
        path: &str,
        known: &[&str],
    ) -> Option<&'a Map<String, Value>> {
        match v.as_object() {
            Some(o) => {
                for k in o.keys() {
                    if !known.contains(&k.as_str()) {
                        self.err(
                            &child(path, k),
                            format!("unknown key (expected one of: {})", known.join(", ")),
                        );
                    }
                }
                Some(o)
            }
            None => {
                self.err(path, "must be an object");
                None
            }
        }
    }

    fn string<'a>(
        &mut self,
        o: &'a Map<String, Value>,
        path: &str,
        key: &str,
        required: bool,
    ) -> Option<&'a str> {
        match o.get(key) {
            None | Some(Value::Null) => {
                if required {
                    self.err(&child(path, key), "is required");
                }
                None
            }
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s),
            Some(_) => {
                self.err(&child(path, key), "must be a non-empty string");
                None
            }
        }
    }

    fn uint(&mut self, o: &Map<String, Value>, path: &str, key: &str, max: u64) -> Option<u64> {
        match o.get(key) {
            None => None,
            Some(v) => match v.as_u64() {
                Some(n) if n <= max => Some(n),
                _ => {
                    self.err(
                        &child(path, key),
                        format!("must be an integer from 0 to {max}"),
                    );
                    None
                }
            },
        }
    }

    fn addr(
        &mut self,
        o: &Map<String, Value>,
        path: &str,
        key: &str,
        required: bool,
    ) -> Option<SocketAddr> {
        if !required && matches!(o.get(key), Some(Value::Null)) {
            return None;
        }
        let s = self.string(o, path, key, required)?;
        match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    &child(path, key),
                    format!("{s:?} is not an address like \"0.0.0.0:5671\""),
                );
                None
            }
        }
    }

    /// `primaryKey` and `secondaryKey` (which defaults to the primary key).
    fn key_pair(&mut self, o: &Map<String, Value>, path: &str, required: bool) -> Option<KeyPair> {
        let primary = self.key(o, path, "primaryKey");
        let secondary = self.key(o, path, "secondaryKey");
        let absent = |k: &str| matches!(o.get(k), None | Some(Value::Null));
        if absent("primaryKey") {
            if required {
                self.err(&child(path, "primaryKey"), "is required");
            } else if !absent("secondaryKey") {
                self.err(
                    &child(path, "primaryKey"),
                    "is required when secondaryKey is set",
                );
            }
            return None;
        }
        let primary = primary?;
        Some(KeyPair {
            secondary: secondary.unwrap_or_else(|| primary.clone()),
            primary,
        })
    }

    fn key(&mut self, o: &Map<String, Value>, path: &str, key: &str) -> Option<Key> {
        let s = self.string(o, path, key, false)?;
        match Key::from_base64(s) {
            Ok(k) => Some(k),
            Err(e) => {
                self.err(&child(path, key), e);
                None
            }
        }
    }
}

fn hostname_ok(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

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

    let listen = match o.get("listen") {
        None => {
            w.err("$.listen", "is required");
            None
        }
        Some(l) => w
            .object(l, "$.listen", &["amqps", "https", "metrics", "mqtts"])
            .and_then(|l| {
                let amqps = w.addr(l, "$.listen", "amqps", true);
                let https = w.addr(l, "$.listen", "https", false);
                let metrics = w.addr(l, "$.listen", "metrics", false);
                let mqtts = match l.get("mqtts") {
                    None => Some(SocketAddr::from(([0, 0, 0, 0], DEFAULT_MQTTS_PORT))),
                    Some(_) => w.addr(l, "$.listen", "mqtts", false),
                };
                amqps.map(|amqps| Listen {
                    amqps,
                    mqtts,
                    https,
                    metrics,
                })
            }),
    };
    let data_dir = w.string(o, "$", "dataDir", true).map(PathBuf::from);
    let device_key = w.key(o, "$", "deviceKey");

    let mut tls = TlsFiles::default();
    if let Some(t) = o.get("tls") {
        if let Some(t) = w.object(
            t,
            "$.tls",
            &["caCert", "serverCert", "serverKey", "clientCaCerts"],
        ) {
            tls.ca_cert = w.string(t, "$.tls", "caCert", false).map(PathBuf::from);
            tls.client_ca_certs = w
                .string(t, "$.tls", "clientCaCerts", false)
                .map(PathBuf::from);
            tls.server_cert = w.string(t, "$.tls", "serverCert", false).map(PathBuf::from);
            tls.server_key = w.string(t, "$.tls", "serverKey", false).map(PathBuf::from);
            if tls.server_cert.is_some() != tls.server_key.is_some() {
                w.err("$.tls", "serverCert and serverKey go together");
            }
            if tls.server_cert.is_some() && tls.ca_cert.is_none() {
                w.err(
                    "$.tls.caCert",
                    "is required with serverCert: modules need the CA that signed it",
                );
            }
        }
    }

    let mut limits = Limits::default();
    if let Some(l) = o.get("limits") {
        let keys = [
            "maxConnections",
            "handshakeTimeoutSecs",
            "queueCapacity",
            "deliveryWindow",
            "maxMessageSize",
            "methodNameMaxLength",
            "methodPayloadMaxBytes",
            "authTimeoutSecs",
            "maxPendingConnections",
            "idleTimeoutSecs",
            "maxSessionsPerConnection",
            "maxLinksPerSession",
            "maxIncompleteBytesPerConnection",
            "shutdownTimeoutSecs",
            "httpsMaxConnections",
            "metricsMaxConnections",
            "httpHeaderTimeoutSecs",
            "httpBodyTimeoutSecs",
            "maxUnsettledBytesPerLink",
        ];
        if let Some(l) = w.object(l, "$.limits", &keys) {
            let p = "$.limits";
            let set = |w: &mut Walk, key: &str, min: u64, max: u64, slot: &mut u64| {
                if let Some(n) = w.uint(l, p, key, max) {
                    if n < min {
                        w.err(&child(p, key), format!("must be at least {min}"));
                    } else {
                        *slot = n;
                    }
                }
            };
            let mut v = [
                limits.max_connections as u64,
                limits.handshake_timeout_secs,
                limits.queue_capacity as u64,
                limits.delivery_window as u64,
                limits.max_message_size,
                limits.method_name_max_len as u64,
                limits.method_payload_max_bytes as u64,
                limits.auth_timeout_secs,
                limits.max_pending_connections as u64,
                limits.idle_timeout_secs,
                limits.max_sessions_per_connection as u64,
                limits.max_links_per_session as u64,
                limits.max_incomplete_bytes_per_connection,
                limits.shutdown_timeout_secs,
                limits.https_max_connections as u64,
                limits.metrics_max_connections as u64,
                limits.http_header_timeout_secs,
                limits.http_body_timeout_secs,
                limits.max_unsettled_bytes_per_link,
            ];
            set(&mut w, keys[0], 1, 1_000_000, &mut v[0]);
            set(&mut w, keys[1], 1, 3600, &mut v[1]);
            set(&mut w, keys[2], 1, 100_000_000, &mut v[2]);
            set(&mut w, keys[3], 1, 65_535, &mut v[3]);
            set(&mut w, keys[4], 1024, 64 * 1024 * 1024, &mut v[4]);
            set(&mut w, keys[5], 1, 65_536, &mut v[5]);
            set(&mut w, keys[6], 2, 64 * 1024 * 1024, &mut v[6]);
            set(&mut w, keys[7], 1, 3600, &mut v[7]);
            // Unless given, half of maxConnections: the other half stays for clients that
            // authenticate.
            v[8] = (v[0] / 2).max(1);
            set(&mut w, keys[8], 1, 1_000_000, &mut v[8]);
            set(&mut w, keys[9], 0, 3600, &mut v[9]);
            set(&mut w, keys[10], 1, 65_536, &mut v[10]);
            set(&mut w, keys[11], 1, 1_000_000, &mut v[11]);
            set(&mut w, keys[12], 64 * 1024, 1 << 40, &mut v[12]);
            set(&mut w, keys[13], 1, 3600, &mut v[13]);
            set(&mut w, keys[14], 1, 1_000_000, &mut v[14]);
            set(&mut w, keys[15], 1, 1_000_000, &mut v[15]);
            set(&mut w, keys[16], 1, 3600, &mut v[16]);
            set(&mut w, keys[17], 1, 3600, &mut v[17]);
            set(&mut w, keys[18], 1024, 1 << 40, &mut v[18]);
            limits = Limits {
                max_connections: v[0] as usize,
                handshake_timeout_secs: v[1],
                queue_capacity: v[2] as usize,
                delivery_window: v[3] as usize,
                max_message_size: v[4],
                method_name_max_len: v[5] as usize,
                method_payload_max_bytes: v[6] as usize,
                auth_timeout_secs: v[7],
                max_pending_connections: v[8] as usize,
                idle_timeout_secs: v[9],
                max_sessions_per_connection: v[10] as usize,
                max_links_per_session: v[11] as usize,
                max_incomplete_bytes_per_connection: v[12],
                shutdown_timeout_secs: v[13],
                https_max_connections: v[14] as usize,
                metrics_max_connections: v[15] as usize,
                http_header_timeout_secs: v[16],
                http_body_timeout_secs: v[17],
                max_unsettled_bytes_per_link: v[18],
            };
        }
    }

    let mut storage = Storage::default();
    if let Some(s) = o.get("storage") {
        if let Some(s) = w.object(
            s,
            "$.storage",
            &["persistent", "sync", "overflow", "liveFirst"],
        ) {
            match s.get("liveFirst") {
                None => {}
                Some(Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        let path = format!("$.storage.liveFirst[{i}]");
                        let sink = item.as_str().and_then(|t| {
                            if t.eq_ignore_ascii_case("$upstream") {
                                Some(crate::routing::route::Sink::Upstream)
                            } else {
                                let f = format!("FROM /x INTO BrokeredEndpoint(\"{t}\")");
                                crate::routing::route::parse_statement(&f)
                                    .ok()
                                    .map(|st| st.sink)
                            }
                        });
                        match sink {
                            Some(s) => storage.live_first.push(s),
                            None => w.err(
                                &path,
                                "must be \"$upstream\" or \"/modules/<module>/inputs/<input>\"",
                            ),
                        }
                    }
                }
                Some(_) => w.err("$.storage.liveFirst", "must be a list of endpoints"),
            }
            match s.get("overflow").map(|v| v.as_str()) {
                None => {}
                Some(Some("rejectNew")) => {
                    storage.overflow = crate::store::durable::Overflow::RejectNew
                }
                Some(Some("dropOldest")) => {
                    storage.overflow = crate::store::durable::Overflow::DropOldest
                }
                Some(_) => w.err(
                    "$.storage.overflow",
                    "must be \"rejectNew\" or \"dropOldest\"",
                ),
            }
            match s.get("persistent") {
                None => {}
                Some(Value::Bool(b)) => storage.persistent = *b,
                Some(_) => w.err("$.storage.persistent", "must be true or false"),
            }
            match s.get("sync").map(|v| v.as_str()) {
                None => {}
                Some(Some("commit")) => storage.sync = crate::store::durable::SyncPolicy::Commit,
                Some(Some("os")) => storage.sync = crate::store::durable::SyncPolicy::Os,
                Some(_) => w.err(
                    "$.storage.sync",
                    "must be \"commit\" (fsync before acknowledging) or \"os\"",
                ),
            }
        }
    }

    let upstream = o.get("upstream").and_then(|u| upstream_settings(&mut w, u));
    let built_in_endpoint = builtin::built_in_endpoint(
        &mut w,
        o.get("builtInEndpoint"),
        iothub_hostname.as_deref(),
        upstream.is_some(),
    );

    let (mut log_format, mut log_level) = ("text".to_owned(), "info".to_owned());
    if let Some(l) = o.get("log") {
        if let Some(l) = w.object(l, "$.log", &["format", "level"]) {
            if let Some(f) = w.string(l, "$.log", "format", false) {
                if f == "text" || f == "json" {
                    log_format = f.to_owned();
                } else {
                    w.err("$.log.format", "must be \"text\" or \"json\"");
                }
            }
            if let Some(lv) = w.string(l, "$.log", "level", false) {
                log_level = lv.to_owned();
            }
        }
    }

    let mut modules = BTreeMap::new();
    match o.get("modules") {
        None => {}
        Some(m) => {
            if let Some(m) = m.as_object().or_else(|| {
                w.err("$.modules", "must be an object of module id → module");
                None
            }) {
                for (id, spec) in m {
                    let p = child("$.modules", id);
                    let module = match ModuleId::parse(id) {
                        Ok(mid) => Some(mid),
                        Err(e) => {
                            w.err(&p, format!("invalid module id: {e}"));
                            None
                        }
                    };
                    let Some(spec) = w.object(
                        spec,
                        &p,
                        &["primaryKey", "secondaryKey", "properties.desired"],
                    ) else {
                        continue;
                    };
                    let keys = w.key_pair(spec, &p, false);
                    let desired = match spec.get("properties.desired") {
                        None => Map::new(),
                        Some(Value::Object(d)) => d.clone(),
                        Some(_) => {
                            w.err(&child(&p, "properties.desired"), "must be an object");
                            Map::new()
                        }
                    };
                    if let Some(module) = module {
                        modules.insert(module, ModuleSettings { keys, desired });
                    }
                }
            }
        }
    }

    let devices = downstream_devices(&mut w, o.get("devices"), device_id.as_ref());
    if tls.client_ca_certs.is_none() {
        for (d, spec) in &devices {
            if spec.x509 == Some(crate::model::x509::X509Auth::Ca) {
                w.err(
                    &child(&child(&child("$.devices", d.as_str()), "x509"), "ca"),
                    "needs tls.clientCaCerts, the CAs that sign the devices' certificates",
                );
            }
        }
    }
    let service_policies = service_policies(&mut w, o.get("servicePolicies"));

    let mut routes = Vec::new();
    let mut route_errors = Vec::new();
    let mut time_to_live_secs = Some(7200);
    let mut max_store_bytes = None;
    match o.get("$edgeHub") {
        None => w.err(
            "$[\"$edgeHub\"]",
            "is required (the $edgeHub properties.desired of a deployment manifest)",
        ),
        Some(eh) => {
            let p = "$[\"$edgeHub\"]";
            if let Some(eh) = w.object(
                eh,
                p,
                &[
                    "schemaVersion",
                    "routes",
                    "storeAndForwardConfiguration",
                    "mqttBroker",
                    "integrity",
                ],
            ) {
                let schema = w.string(eh, p, "schemaVersion", true);
                let minor = match schema {
                    Some("1.0") => Some(0),
                    Some("1.1") => Some(1),
                    Some("1.2") => Some(2),
                    Some("1.3") => Some(3),
                    Some(other) => {
                        w.err(
                            &child(p, "schemaVersion"),
                            format!("{other:?} is not supported (1.0 to 1.3)"),
                        );
                        None
                    }
                    None => None,
                };
                if let Some(r) = eh.get("routes") {
                    match r.as_object() {
                        None => w.err(&child(p, "routes"), "must be an object of name → route"),
                        Some(r) => {
                            for (name, spec) in r {
                                match compile_route(name, spec, minor.unwrap_or(1)) {
                                    Ok(route) => routes.push(route),
                                    Err(message) => route_errors.push(ConfigError {
                                        path: child(&child(p, "routes"), name),
                                        message,
                                    }),
                                }
                            }
                        }
                    }
                }
                let sp = child(p, "storeAndForwardConfiguration");
                match eh.get("storeAndForwardConfiguration") {
                    None if minor.unwrap_or(0) >= 1 => w.err(&sp, "is required from schema 1.1"),
                    None => {}
                    Some(sf) => {
                        if let Some(sf) = w.object(sf, &sp, &["timeToLiveSecs", "storeLimits"]) {
                            match sf.get("timeToLiveSecs") {
                                None => {}
                                Some(v) => match v.as_i64() {
                                    Some(n) if n < 0 => time_to_live_secs = None,
                                    Some(n) => time_to_live_secs = Some(n as u64),
                                    None => w.err(
                                        &child(&sp, "timeToLiveSecs"),
                                        "must be an integer (negative = keep forever)",
                                    ),
                                },
                            }
                            if let Some(sl) = sf.get("storeLimits") {
                                let slp = child(&sp, "storeLimits");
                                if let Some(sl) = w.object(sl, &slp, &["maxSizeBytes"]) {
                                    max_store_bytes = w.uint(sl, &slp, "maxSizeBytes", u64::MAX);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    // A route into a module this hub does not know can never deliver.
    route_errors.extend(routes.iter().filter_map(|r| match &r.statement.sink {
        crate::routing::route::Sink::ModuleInput { module, .. }
            if !modules.contains_key(module) =>
        {
            Some(ConfigError {
                path: child("$[\"$edgeHub\"].routes", &r.name),
                message: format!("module {module:?} is not in $.modules"),
            })
        }
        _ => None,
    }));
    let bad: Vec<String> = route_errors.iter().map(|e| e.path.clone()).collect();
    routes.retain(|r| !bad.contains(&child("$[\"$edgeHub\"].routes", &r.name)));

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
        }),
        _ => Err(ConfigErrors(vec![ConfigError {
            path: "$".into(),
            message: "incomplete configuration".into(),
        }])),
    }
}

fn compile_route(name: &str, spec: &Value, minor: u32) -> Result<Route, String> {
    let (text, priority, ttl) = match spec {
        Value::String(s) => (s.as_str(), DEFAULT_PRIORITY, 0),
        Value::Object(o) if minor >= 1 => {
            for k in o.keys() {
                if !["route", "priority", "timeToLiveSecs"].contains(&k.as_str()) {
                    return Err(format!(
                        "unknown key {k:?} (expected route, priority, timeToLiveSecs)"
                    ));
                }
            }
            let text = o
                .get("route")
                .and_then(Value::as_str)
                .ok_or("`route` must be a string")?;
            let priority = match o.get("priority") {
                None => DEFAULT_PRIORITY,
                Some(v) => match v.as_u64() {
                    Some(p) if p <= 9 => p as u32,
                    _ => return Err("`priority` must be an integer from 0 to 9".into()),
                },
            };
            let ttl = match o.get("timeToLiveSecs") {
                None => 0,
                Some(v) => match v.as_u64() {
                    Some(t) if t <= u32::MAX as u64 => t as u32,
                    _ => return Err("`timeToLiveSecs` must be a non-negative integer".into()),
                },
            };
            (text, priority, ttl)
        }
        Value::Object(_) => {
            return Err("schema 1.0 routes are strings; use schemaVersion 1.1 for objects".into())
        }
        _ => return Err("a route must be a string or {route, priority, timeToLiveSecs}".into()),
    };
    let statement = parse_statement(text).map_err(|e| format!("invalid route {text:?}: {e}"))?;
    Ok(Route {
        name: name.to_owned(),
        statement,
        priority,
        time_to_live_secs: ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "deviceId": "edge1",
        "iothubHostname": "hub.example.net",
        "gatewayHostname": "localhost",
        "listen": {"amqps": "127.0.0.1:5671", "https": "127.0.0.1:8443", "metrics": null},
        "dataDir": "data",
        "modules": {"a": {}, "b": {"primaryKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}},
        "$edgeHub": {
            "schemaVersion": "1.1",
            "routes": {
                "r1": "FROM /messages/modules/a/outputs/* INTO BrokeredEndpoint(\"/modules/b/inputs/in1\")",
                "r2": {"route": "FROM /messages/* INTO $upstream", "priority": 0, "timeToLiveSecs": 60}
            },
            "storeAndForwardConfiguration": {"timeToLiveSecs": -1}
        }
    }"#;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_good_config_compiles() {
        let s = from_str(GOOD, &env(&[])).unwrap();
        assert_eq!(s.device_id.as_str(), "edge1");
        assert_eq!(s.listen.metrics, None);
        assert_eq!(s.routes.len(), 2);
        let r2 = s.routes.iter().find(|r| r.name == "r2").unwrap();
        assert_eq!((r2.priority, r2.time_to_live_secs), (0, 60));
        assert_eq!(s.time_to_live_secs, None);
        assert!(s.modules[&ModuleId::parse("a").unwrap()].keys.is_none());
        assert!(s.modules[&ModuleId::parse("b").unwrap()].keys.is_some());
    }

    #[test]
    fn proxy_urls_parse_with_their_credentials() {
        let p = Proxy::parse("http://user:p%40ss@proxy.local:3128").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.basic_auth.as_deref()),
            ("proxy.local", 3128, Some("user:p@ss"))
        );
        let p = Proxy::parse("10.0.0.1:8080").unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.basic_auth),
            ("10.0.0.1", 8080, None)
        );
        assert_eq!(Proxy::parse("http://proxy").unwrap().port, 80);
        assert!(Proxy::parse("https://proxy:443").is_err());
        assert!(Proxy::parse("http://").is_err());
        // The password never shows in a log line.
        assert!(!format!("{:?}", Proxy::parse("http://u:secret@h:1").unwrap()).contains("secret"));
    }

    #[test]
    fn connection_limits_have_defaults_and_pending_follows_max_connections() {
        let s = from_str(GOOD, &env(&[])).unwrap();
        assert_eq!(s.limits.auth_timeout_secs, 10);
        assert_eq!(s.limits.shutdown_timeout_secs, 10);
        assert_eq!(s.limits.max_pending_connections, 500);
        let with = |limits: &str| {
            let text = GOOD.replacen(
                r#""dataDir": "data","#,
                &format!(r#""dataDir": "data", "limits": {limits},"#),
                1,
            );
            from_str(&text, &env(&[]))
        };
        let s = with(r#"{"maxConnections": 50}"#).unwrap();
        assert_eq!(s.limits.max_pending_connections, 25);
        let s = with(r#"{"maxConnections": 50, "maxPendingConnections": 5, "idleTimeoutSecs": 0, "maxLinksPerSession": 8}"#).unwrap();
        assert_eq!(
            (
                s.limits.max_pending_connections,
                s.limits.idle_timeout_secs,
                s.limits.max_links_per_session
            ),
            (5, 0, 8)
        );
        // Every key lands in its own field.
        let s = with(r#"{"authTimeoutSecs": 6, "maxPendingConnections": 9, "shutdownTimeoutSecs": 11, "httpsMaxConnections": 7, "metricsMaxConnections": 3, "httpHeaderTimeoutSecs": 4, "httpBodyTimeoutSecs": 5}"#).unwrap();
        let l = &s.limits;
        assert_eq!(
            (
                l.auth_timeout_secs,
                l.max_pending_connections,
                l.shutdown_timeout_secs,
                l.https_max_connections,
                l.metrics_max_connections,
                l.http_header_timeout_secs,
                l.http_body_timeout_secs
            ),
            (6, 9, 11, 7, 3, 4, 5)
        );
        assert_eq!(
            from_str(GOOD, &env(&[]))
                .unwrap()
                .limits
                .max_unsettled_bytes_per_link,
            8 * 1024 * 1024
        );
        let s = with(r#"{"maxUnsettledBytesPerLink": 65536}"#).unwrap();
        assert_eq!(s.limits.max_unsettled_bytes_per_link, 65536);
        assert!(with(r#"{"maxUnsettledBytesPerLink": 10}"#).is_err());
        let errs =
            with(r#"{"maxSessionsPerConnection": 0, "maxIncompleteBytesPerConnection": 10}"#)
                .unwrap_err();
        assert_eq!(errs.0.len(), 2, "{errs:?}");
    }

    #[test]
    fn the_mqtt_listener_defaults_to_8883_and_can_be_moved_or_turned_off() {
        let s = from_str(GOOD, &HashMap::new()).unwrap();
        assert_eq!(s.listen.mqtts, Some("0.0.0.0:8883".parse().unwrap()));
        let moved = GOOD.replacen(r#""amqps": "#, r#""mqtts": "127.0.0.1:0", "amqps": "#, 1);
        let s = from_str(&moved, &HashMap::new()).unwrap();
        assert_eq!(s.listen.mqtts, Some("127.0.0.1:0".parse().unwrap()));
        let off = GOOD.replacen(r#""amqps": "#, r#""mqtts": null, "amqps": "#, 1);
        assert_eq!(from_str(&off, &HashMap::new()).unwrap().listen.mqtts, None);
        let bad = GOOD.replacen(r#""amqps": "#, r#""mqtts": "nowhere", "amqps": "#, 1);
        let errs = from_str(&bad, &HashMap::new()).unwrap_err();
        assert_eq!(errs.0[0].path, "$.listen.mqtts", "{errs:?}");
        let s = from_str(GOOD, &env(&[("EDGEHUB_LISTEN_MQTTS", "127.0.0.2:8883")])).unwrap();
        assert_eq!(s.listen.mqtts, Some("127.0.0.2:8883".parse().unwrap()));
    }

    #[test]
    fn environment_overrides_keys() {
        let s = from_str(
            GOOD,
            &env(&[
                ("EDGEHUB_DEVICE_ID", "other"),
                ("EDGEHUB_LISTEN_AMQPS", "127.0.0.9:1234"),
            ]),
        )
        .unwrap();
        assert_eq!(s.device_id.as_str(), "other");
        assert_eq!(s.listen.amqps, "127.0.0.9:1234".parse().unwrap());
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let bad = r#"{
            "deviceId": "bad id",
            "iothubHostname": "",
            "listen": {"amqps": "nowhere", "extra": 1},
            "dataDir": 5,
            "deviceKey": "short",
            "colour": "blue",
            "modules": {"a/b": {}, "c": {"key": "x"}},
            "$edgeHub": {"schemaVersion": "2.0", "routes": {"bad": "FROM nowhere"}}
        }"#;
        let errs = from_str(bad, &env(&[])).unwrap_err().0;
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "$.deviceId",
            "$.iothubHostname",
            "$.gatewayHostname",
            "$.listen.amqps",
            "$.listen.extra",
            "$.dataDir",
            "$.deviceKey",
            "$.colour",
            "$.modules[\"a/b\"]",
            "$.modules.c.key",
            "$[\"$edgeHub\"].schemaVersion",
            "$[\"$edgeHub\"].routes.bad",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn a_bad_route_is_set_aside_and_the_rest_run() {
        let text = GOOD.replace(
            "\"r1\":",
            "\"broken\": \"FROM /messages INTO Nowhere()\", \"ghost\": \"FROM /messages INTO BrokeredEndpoint('/modules/zz/inputs/i')\", \"r1\":",
        );
        let s = from_str(&text, &env(&[])).unwrap();
        assert_eq!(s.routes.len(), 2);
        let paths: Vec<&str> = s.route_errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths.len(), 2, "{paths:?}");
        assert!(paths.contains(&"$[\"$edgeHub\"].routes.broken"));
        assert!(paths.contains(&"$[\"$edgeHub\"].routes.ghost"));
    }

    #[test]
    fn storage_options() {
        let text = GOOD.replace(
            "\"dataDir\": \"data\",",
            "\"dataDir\": \"data\", \"storage\": {\"sync\": \"os\", \"overflow\": \"dropOldest\", \"liveFirst\": [\"$upstream\", \"/modules/b/inputs/in1\"]},",
        );
        let s = from_str(&text, &env(&[])).unwrap();
        assert_eq!(s.storage.sync, crate::store::durable::SyncPolicy::Os);
        assert_eq!(
            s.storage.overflow,
            crate::store::durable::Overflow::DropOldest
        );
        assert_eq!(s.storage.live_first.len(), 2);
        let bad = GOOD.replace("\"dataDir\": \"data\",", "\"dataDir\": \"data\", \"storage\": {\"liveFirst\": [\"nowhere\"], \"sync\": \"sometimes\"},");
        let errs = from_str(&bad, &env(&[])).unwrap_err().0;
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert!(
            paths.contains(&"$.storage.liveFirst[0]") && paths.contains(&"$.storage.sync"),
            "{paths:?}"
        );
    }

    #[test]
    fn device_certificates_and_the_client_ca_file() {
        let t = "A".repeat(40);
        let text = GOOD.replace(
            "\"modules\":",
            &format!(
                r#""devices": {{"thumb": {{"x509": {{"primaryThumbprint": "{t}"}}}}, "signed": {{"x509": {{"ca": true}}}}}},
                   "tls": {{"clientCaCerts": "cas.pem"}},
                   "modules":"#
            ),
        );
        let s = from_str(&text, &env(&[])).unwrap();
        assert_eq!(
            s.tls.client_ca_certs.as_deref(),
            Some(std::path::Path::new("cas.pem"))
        );
        let thumb = &s.devices[&DeviceId::parse("thumb").unwrap()];
        assert!(
            matches!(&thumb.x509, Some(crate::model::x509::X509Auth::Thumbprints(v)) if v.len() == 1)
        );
        let signed = &s.devices[&DeviceId::parse("signed").unwrap()];
        assert_eq!(signed.x509, Some(crate::model::x509::X509Auth::Ca));

        let bad = GOOD.replace(
            "\"modules\":",
            r#""devices": {"a": {"x509": {"ca": true}}, "b": {"x509": {}}, "c": {"x509": {"primaryThumbprint": "xyz"}},
                           "d": {"x509": {"ca": true, "primaryThumbprint": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}},
                           "e": {"x509": {"ca": "yes", "thumbprint": "x"}}},
               "modules":"#,
        );
        let errs = from_str(&bad, &env(&[])).unwrap_err().0;
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "$.devices.a.x509.ca",
            "$.devices.b.x509",
            "$.devices.c.x509.primaryThumbprint",
            "$.devices.d.x509",
            "$.devices.e.x509.ca",
            "$.devices.e.x509.thumbprint",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn downstream_devices_and_service_policies() {
        let k = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let text = GOOD.replace(
            "\"modules\":",
            &format!(
                r#""devices": {{"leaf": {{}}, "child": {{"edge": true, "primaryKey": "{k}"}}}},
                   "servicePolicies": {{"service": {{"primaryKey": "{k}"}}, "owner": {{"primaryKey": "{k}", "secondaryKey": "{k}"}}}},
                   "modules":"#
            ),
        );
        let s = from_str(&text, &env(&[])).unwrap();
        let leaf = &s.devices[&DeviceId::parse("leaf").unwrap()];
        assert!(!leaf.edge && leaf.keys.is_none());
        let child = &s.devices[&DeviceId::parse("child").unwrap()];
        assert!(child.edge && child.keys.is_some());
        assert_eq!(
            s.service_policies.keys().collect::<Vec<_>>(),
            ["owner", "service"]
        );
        let p = &s.service_policies["service"];
        assert_eq!(
            p.primary, p.secondary,
            "the secondary defaults to the primary"
        );
        // Neither is required.
        let s = from_str(GOOD, &env(&[])).unwrap();
        assert!(s.devices.is_empty() && s.service_policies.is_empty());

        let bad = GOOD.replace(
            "\"modules\":",
            r#""devices": {"edge1": {}, "a b": {}, "x": {"edge": "yes", "key": 1}, "y": {"secondaryKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}},
               "servicePolicies": {"no keys": {}, "p": {"secondaryKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}, "q": {"primaryKey": "short"}, "r": 5},
               "modules":"#,
        );
        let errs = from_str(&bad, &env(&[])).unwrap_err().0;
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "$.devices.edge1",
            "$.devices[\"a b\"]",
            "$.devices.x.edge",
            "$.devices.x.key",
            "$.devices.y.primaryKey",
            "$.servicePolicies[\"no keys\"]",
            "$.servicePolicies[\"no keys\"].primaryKey",
            "$.servicePolicies.p.primaryKey",
            "$.servicePolicies.q.primaryKey",
            "$.servicePolicies.r",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn duplicate_keys_are_refused_with_their_paths() {
        let text = GOOD
            .replacen(
                "\"dataDir\": \"data\",",
                "\"dataDir\": \"data\", \"dataDir\": \"other\",",
                1,
            )
            .replacen(
                "\"r1\":",
                "\"r2\": \"FROM /messages/* INTO $upstream\", \"r1\":",
                1,
            )
            .replacen("\"b\": {", "\"b\": {\"primaryKey\": \"x\", ", 1);
        let errs = from_str(&text, &env(&[])).unwrap_err().0;
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "$.dataDir",
            "$[\"$edgeHub\"].routes.r2",
            "$.modules.b.primaryKey",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
        // The same key in different objects, or in objects inside a list, is no duplicate.
        let fine = r#"{"a": {"k": 1}, "b": {"k": 1}, "l": [{"k": 1}, {"k": 2}]}"#;
        assert!(duplicate_keys(fine).is_empty());
        let in_list = duplicate_keys(r#"{"l": [{"k": 1, "k": 2}]}"#);
        assert_eq!(in_list.len(), 1);
        assert_eq!(in_list[0].path, "$.l[0].k");
    }

    #[test]
    fn not_json_is_one_clear_error() {
        let e = from_str("{", &env(&[])).unwrap_err().0;
        assert_eq!(e.len(), 1);
        assert!(e[0].message.contains("not valid JSON"));
    }
}
