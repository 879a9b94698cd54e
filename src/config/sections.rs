//! The hub's own sections: where it listens, its TLS files, its limits, its storage, its log
//! and its modules. Each reads one key of the root object and reports its errors into the
//! [`Walk`].

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde_json::{Map, Value};

use super::{
    walk::{child, Walk},
    Limits, Listen, ModuleSettings, Storage, TlsFiles, DEFAULT_MQTTS_PORT,
};
use crate::model::identity::ModuleId;

/// `listen` (required): `{amqps, https?, metrics?, mqtts?}`.
pub(super) fn listen(w: &mut Walk, v: Option<&Value>) -> Option<Listen> {
    let Some(l) = v else {
        w.err("$.listen", "is required");
        return None;
    };
    let l = w.object(l, "$.listen", &["amqps", "https", "metrics", "mqtts"])?;
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
}

/// `tls`: `{caCert?, serverCert?, serverKey?, clientCaCerts?}`.
pub(super) fn tls(w: &mut Walk, v: Option<&Value>) -> TlsFiles {
    let mut tls = TlsFiles::default();
    let Some(t) = v else { return tls };
    let Some(t) = w.object(
        t,
        "$.tls",
        &["caCert", "serverCert", "serverKey", "clientCaCerts"],
    ) else {
        return tls;
    };
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
    tls
}

/// `limits`: each key optional, each within its own bounds.
pub(super) fn limits(w: &mut Walk, v: Option<&Value>) -> Limits {
    let limits = Limits::default();
    let Some(l) = v else { return limits };
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
        "maxRegistryIdentities",
    ];
    let Some(l) = w.object(l, "$.limits", &keys) else {
        return limits;
    };
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
        limits.max_registry_identities as u64,
    ];
    set(w, keys[0], 1, 1_000_000, &mut v[0]);
    set(w, keys[1], 1, 3600, &mut v[1]);
    set(w, keys[2], 1, 100_000_000, &mut v[2]);
    set(w, keys[3], 1, 65_535, &mut v[3]);
    set(w, keys[4], 1024, 64 * 1024 * 1024, &mut v[4]);
    set(w, keys[5], 1, 65_536, &mut v[5]);
    set(w, keys[6], 2, 64 * 1024 * 1024, &mut v[6]);
    set(w, keys[7], 1, 3600, &mut v[7]);
    // Unless given, half of maxConnections: the other half stays for clients that
    // authenticate.
    v[8] = (v[0] / 2).max(1);
    set(w, keys[8], 1, 1_000_000, &mut v[8]);
    set(w, keys[9], 0, 3600, &mut v[9]);
    set(w, keys[10], 1, 65_536, &mut v[10]);
    set(w, keys[11], 1, 1_000_000, &mut v[11]);
    set(w, keys[12], 64 * 1024, 1 << 40, &mut v[12]);
    set(w, keys[13], 1, 3600, &mut v[13]);
    set(w, keys[14], 1, 1_000_000, &mut v[14]);
    set(w, keys[15], 1, 1_000_000, &mut v[15]);
    set(w, keys[16], 1, 3600, &mut v[16]);
    set(w, keys[17], 1, 3600, &mut v[17]);
    set(w, keys[18], 1024, 1 << 40, &mut v[18]);
    set(w, keys[19], 0, 1_000_000, &mut v[19]);
    Limits {
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
        max_registry_identities: v[19] as usize,
    }
}

/// `storage`: `{persistent?, sync?, commitIntervalMs?, overflow?, liveFirst?}`.
pub(super) fn storage(w: &mut Walk, v: Option<&Value>) -> Storage {
    use crate::store::durable::{Overflow, SyncPolicy};

    let mut storage = Storage::default();
    let Some(s) = v else { return storage };
    let Some(s) = w.object(
        s,
        "$.storage",
        &[
            "persistent",
            "sync",
            "commitIntervalMs",
            "overflow",
            "liveFirst",
        ],
    ) else {
        return storage;
    };
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
        Some(Some("rejectNew")) => storage.overflow = Overflow::RejectNew,
        Some(Some("dropOldest")) => storage.overflow = Overflow::DropOldest,
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
        Some(Some("commit")) => storage.sync = SyncPolicy::Commit,
        Some(Some("os")) => storage.sync = SyncPolicy::Os,
        Some(_) => w.err(
            "$.storage.sync",
            "must be \"commit\" (fsync before acknowledging) or \"os\"",
        ),
    }
    match s.get("commitIntervalMs") {
        None => {}
        Some(v) => match v.as_u64() {
            Some(ms) if ms <= super::MAX_COMMIT_INTERVAL_MS => storage.commit_interval_ms = ms,
            _ => w.err(
                "$.storage.commitIntervalMs",
                format!(
                    "must be a whole number of milliseconds from 0 to {}",
                    super::MAX_COMMIT_INTERVAL_MS
                ),
            ),
        },
    }
    storage
}

/// `log`: `{format?, level?}`; returns the format (`text` by default) and the level (`info`).
pub(super) fn log(w: &mut Walk, v: Option<&Value>) -> (String, String) {
    let (mut log_format, mut log_level) = ("text".to_owned(), "info".to_owned());
    let Some(l) = v.and_then(|l| w.object(l, "$.log", &["format", "level"])) else {
        return (log_format, log_level);
    };
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
    (log_format, log_level)
}

/// `modules`: module id → `{primaryKey?, secondaryKey?, "properties.desired"?}`.
pub(super) fn modules(w: &mut Walk, v: Option<&Value>) -> BTreeMap<ModuleId, ModuleSettings> {
    let mut modules = BTreeMap::new();
    let Some(m) = v else { return modules };
    let Some(m) = m.as_object() else {
        w.err("$.modules", "must be an object of module id → module");
        return modules;
    };
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
    modules
}
