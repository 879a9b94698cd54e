//! The hub: builds the core from settings, starts the listeners, and stops them on shutdown.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{config::Settings, core::HubCore, metrics as m, model::identity::Key, ops::tls};

/// Re-reads the config file and applies what can change while running: the routes, the TTL,
/// the store's size limit and desired properties.
/// Returns the number of routes now running; on a config error nothing changes.
pub async fn reload(
    core: &HubCore,
    path: &std::path::Path,
    env: &std::collections::HashMap<String, String>,
) -> Result<usize, crate::config::ConfigErrors> {
    let next = crate::config::load(path, env)?;
    for e in &next.route_errors {
        warn!(path = %e.path, "invalid route skipped: {}", e.message);
    }
    m::invalid_routes(next.route_errors.len());
    let n = next.routes.len();
    core.reload_routes(next.routes, next.time_to_live_secs);
    if let Some(store) = &core.store {
        if store.usage().1 != next.max_store_bytes {
            info!(limit = ?next.max_store_bytes, "store limit changed (storeLimits.maxSizeBytes)");
            store.set_limit(next.max_store_bytes);
        }
        store.set_commit_interval(std::time::Duration::from_millis(
            next.storage.commit_interval_ms,
        ));
    }
    core.apply_desired(&next.modules).await;
    core.set_served_devices(next.devices);
    Ok(n)
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("certificates: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("device key: {0}")]
    DeviceKey(String),
    #[error("client certificates: {0}")]
    X509(#[from] crate::ops::x509::X509Error),
    #[error("the $edgeHub module id: {0}")]
    EdgeHubId(String),
    #[error("twins: {0}")]
    Twins(#[from] crate::core::twins::TwinError),
    #[error("{0}")]
    Store(#[from] crate::store::durable::StoreError),
    #[error("{0}")]
    MqttSessions(#[from] crate::servers::mqtt::sessions::SessionStoreError),
    #[error("runtime mode: {0}")]
    Runtime(#[from] crate::ops::runtime::RuntimeError),
    #[error("{0}")]
    Registry(#[from] crate::store::registry::RegistryStoreError),
}

/// Reads the device key from the config, else from `dataDir/device.key`, creating it once.
pub fn device_key(settings: &Settings) -> Result<Key, StartError> {
    if let Some(k) = &settings.device_key {
        return Ok(k.clone());
    }
    let path = settings.data_dir.join("device.key");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Key::from_base64(&text)
            .map_err(|e| StartError::DeviceKey(format!("{}: {e}", path.display())));
    }
    std::fs::create_dir_all(&settings.data_dir)
        .map_err(|e| StartError::DeviceKey(format!("{}: {e}", settings.data_dir.display())))?;
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| StartError::DeviceKey("no randomness available".into()))?;
    let key = Key::from_base64(&base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        bytes,
    ))
    .map_err(StartError::DeviceKey)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    let written = opts
        .open(&path)
        .and_then(|mut f| f.write_all(key.to_base64().as_bytes()));
    if let Err(e) = written {
        // Another process created it first: use theirs.
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            let text =
                std::fs::read_to_string(&path).map_err(|e| StartError::DeviceKey(e.to_string()))?;
            return Key::from_base64(&text).map_err(StartError::DeviceKey);
        }
        return Err(StartError::DeviceKey(format!("{}: {e}", path.display())));
    }
    Ok(key)
}

/// A running hub: its bound addresses, and the handle that stops it.
pub struct Hub {
    pub amqps_addr: SocketAddr,
    pub mqtts_addr: Option<SocketAddr>,
    pub https_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub core: Arc<HubCore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Hub {
    /// Binds every listener and starts serving; returns once all listeners are ready.
    pub async fn start(mut settings: Settings) -> Result<Self, StartError> {
        let key = device_key(&settings)?;
        // Runtime mode: certificate, trust bundle and signatures from the workload API.
        let runtime = match settings.runtime.clone() {
            Some(rt) => Some(crate::ops::runtime::prepare(&settings, &rt).await?),
            None => None,
        };
        if let (Some(rt), Some(up)) = (&runtime, settings.upstream.as_mut()) {
            if up.ca.is_none() {
                up.ca = Some(rt.trust_bundle_path.clone());
            }
        }
        // The trust bundle is also the CA of devices that authenticate by certificate
        // (`certificateAuthority` in the device scope), as edgeHub trusts it.
        if let Some(rt) = &runtime {
            if settings.tls.client_ca_certs.is_none() {
                settings.tls.client_ca_certs = Some(rt.trust_bundle_path.clone());
            }
        }
        // Devices that authenticate with certificates: only then are clients asked for one.
        let x509 = Arc::new(crate::ops::x509::Matcher::from_settings(&settings)?);
        // The identity registry (service policies, no upstream) may add such devices later.
        // So may the device scope in runtime mode.
        let registry_x509 = (!settings.service_policies.is_empty() && settings.upstream.is_none())
            || runtime.is_some();
        let client_auth = (!x509.is_empty() || registry_x509).then(|| {
            crate::ops::x509::AnyClientCert::new()
                as Arc<dyn rustls::server::danger::ClientCertVerifier>
        });
        let tls_config = match &runtime {
            Some(rt) => tls::server_config_swappable(rt.cert.clone(), client_auth)?,
            None => tls::server_config_with(&tls::ensure_certs(&settings)?, client_auth)?,
        };
        let handle = m::install(&settings.iothub_hostname, settings.device_id.as_str());
        m::start_gauges(settings.upstream.is_some());
        m::invalid_routes(settings.route_errors.len());
        for e in &settings.route_errors {
            warn!(path = %e.path, "invalid route skipped: {}", e.message);
        }

        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let amqps = bind("amqps", settings.listen.amqps).await?;
        let https = match settings.listen.https {
            Some(a) => Some(bind("https", a).await?),
            None => None,
        };
        let mqtts = match settings.listen.mqtts {
            Some(a) => Some(bind("mqtts", a).await?),
            None => None,
        };
        let metrics = match settings.listen.metrics {
            Some(a) => Some(bind("metrics", a).await?),
            None => None,
        };
        let local = |l: &TcpListener, what, addr| {
            l.local_addr()
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let amqps_addr = local(&amqps, "amqps", settings.listen.amqps)?;
        let https_addr = match (&https, settings.listen.https) {
            (Some(l), Some(a)) => Some(local(l, "https", a)?),
            _ => None,
        };
        let mqtts_addr = match (&mqtts, settings.listen.mqtts) {
            (Some(l), Some(a)) => Some(local(l, "mqtts", a)?),
            _ => None,
        };
        let metrics_addr = match (&metrics, settings.listen.metrics) {
            (Some(l), Some(a)) => Some(local(l, "metrics", a)?),
            _ => None,
        };

        let store_dir = settings.data_dir.join("store");
        let keyspace = crate::store::durable::open_keyspace(&store_dir, settings.max_store_bytes)?;
        let twins = crate::core::twins::TwinStore::with_keyspace(keyspace.clone())?;
        let scope = match &runtime {
            Some(rt) => {
                Some(crate::ops::runtime::open_scope(&settings, rt, keyspace.clone()).await?)
            }
            None => None,
        };
        let mqtt_sessions = crate::servers::mqtt::sessions::SessionStore::open(keyspace.clone())?;
        let log_keyspace = keyspace.clone();
        let (registry_store, records) =
            crate::store::registry::RegistryStore::open(keyspace.clone())?;
        let registry = crate::core::registry::Registry::open(registry_store, records);
        let store = match settings.storage.persistent {
            true => Some(crate::store::durable::DurableStore::open(
                &store_dir,
                keyspace,
                settings.storage.sync,
                settings.max_store_bytes,
                settings.storage.overflow,
            )?),
            false => None,
        };
        if let Some(store) = &store {
            store.set_commit_interval(std::time::Duration::from_millis(
                settings.storage.commit_interval_ms,
            ));
        }
        let log = match (&settings.built_in_endpoint, &settings.upstream) {
            (Some(b), None) => Some(crate::store::log::EventLog::open(
                log_keyspace,
                store.clone(),
                settings.max_store_bytes,
                b.partition_count,
                b.retention_ms,
                crate::model::message::now_ms(),
            )?),
            _ => None,
        };
        let core = Arc::new(HubCore::new(settings, &key, twins, registry, store, log));
        for r in &core.settings.routes {
            if let crate::routing::route::Sink::ModuleInput { module, .. } = &r.statement.sink {
                let id = crate::model::identity::Identity::Module(
                    core.settings.device_id.clone(),
                    module.clone(),
                );
                if core.auth.known(&id).is_none() {
                    warn!(route = %r.name, %module, "this route feeds a module that is neither in the config nor in the registry; it delivers once the module is added");
                }
            }
        }
        core.apply_desired(&core.settings.modules).await;
        if core.settings.runtime.is_some() {
            // The routes the `$edgeHub` twin last brought, until the parent sends it again.
            let edge_hub = crate::model::identity::ModuleId::parse("$edgeHub")
                .map_err(|e| StartError::EdgeHubId(e.to_string()))?;
            let me =
                crate::model::identity::Identity::Module(core.settings.device_id.clone(), edge_hub);
            core.apply_edge_hub_twin(&core.twins.get(&me).desired);
        }
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        if let Some(scope) = scope {
            scope.set_revocations(core.registry.revocations.clone());
            core.auth.attach_scope(scope.clone());
            tasks.spawn(scope.run(shutdown.clone()));
        }
        if let Some(rt) = &runtime {
            tasks.spawn(crate::ops::runtime::renew_certificate(
                rt.workload.clone(),
                rt.cert.clone(),
                core.settings.gateway_hostname.clone(),
                rt.not_after,
                shutdown.clone(),
            ));
        }
        let tls = TlsAcceptor::from(tls_config);
        // AMQPS and AMQP over WebSockets (on the HTTPS listener) share the connection slots.
        let gate = crate::servers::amqp::Gate::new(core.clone(), shutdown.clone(), x509.clone());
        tasks.spawn(crate::servers::amqp::serve(
            amqps,
            tls.clone(),
            gate.clone(),
        ));
        // MQTTS and MQTT over WebSockets (on the HTTPS listener) share the MQTT slots.
        let mqtt =
            crate::servers::mqtt::Mqtt::new(core.clone(), mqtt_sessions, x509, shutdown.clone());
        if let Some(l) = mqtts {
            tasks.spawn(crate::servers::mqtt::serve(l, tls.clone(), mqtt.clone()));
        }
        if let Some(l) = https {
            tasks.spawn(crate::servers::http::serve_https(
                l,
                tls,
                core.clone(),
                shutdown.clone(),
                crate::servers::http::Upgrades { amqp: gate, mqtt },
            ));
        }
        tasks.spawn(crate::core::housekeeping(core.clone(), shutdown.clone()));
        tasks.spawn(m::upkeep(handle.clone(), shutdown.clone()));
        tasks.spawn(crate::core::c2d::feedback_writer(
            core.clone(),
            shutdown.clone(),
        ));
        if let Some(up) = core.settings.upstream.clone() {
            tasks.spawn(crate::core::report_clients(core.clone(), shutdown.clone()));
            let edge_hub = crate::model::identity::ModuleId::parse("$edgeHub")
                .map_err(|e| StartError::EdgeHubId(e.to_string()))?;
            use crate::servers::upstream::EdgeHubSigner;
            let edge_hub = match &runtime {
                Some(rt) => EdgeHubSigner::Workload(rt.workload.clone()),
                None => EdgeHubSigner::Key(up.edge_hub_key.clone().unwrap_or_else(|| {
                    crate::core::auth::module_keys(&core.settings, &key, &edge_hub).primary
                })),
            };
            let keys = crate::servers::upstream::UpstreamKeys {
                edge_hub,
                device: key.clone(),
            };
            tasks.spawn(crate::servers::upstream::run(
                core.clone(),
                up,
                keys,
                shutdown.clone(),
            ));
        }
        if let Some(l) = metrics {
            let c = core.clone();
            let refresh: crate::servers::http::Refresh = Arc::new(move || c.refresh_gauges());
            let limits = &core.settings.limits;
            let bounds = crate::servers::http::Bounds {
                max_connections: limits.metrics_max_connections,
                header_timeout: std::time::Duration::from_secs(limits.http_header_timeout_secs),
            };
            tasks.spawn(crate::servers::http::serve_metrics(
                l,
                handle,
                shutdown.clone(),
                refresh,
                bounds,
            ));
        }
        tasks.close();
        crate::servers::amqp::log_ready(amqps_addr);
        if let Some(a) = mqtts_addr {
            crate::servers::mqtt::log_ready(a);
        }
        info!(amqps = %amqps_addr, mqtts = ?mqtts_addr, https = ?https_addr, metrics = ?metrics_addr, "edgehub ready");
        Ok(Self {
            amqps_addr,
            mqtts_addr,
            https_addr,
            metrics_addr,
            core,
            shutdown,
            tasks,
        })
    }

    /// Stops accepting, closes every connection and waits for all tasks, at most
    /// `limits.shutdownTimeoutSecs`: peers that stop answering do not hold the hub.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let bound = std::time::Duration::from_secs(self.core.settings.limits.shutdown_timeout_secs);
        if tokio::time::timeout(bound, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                secs = bound.as_secs(),
                "shutdown: tasks still running after the timeout; stopping anyway"
            );
        }
    }

    /// A token that stops the hub when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}
