//! The hub: builds the core from settings, starts the listeners, and stops them on shutdown.

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use dashmap::DashMap;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    auth::Authenticator,
    config::Settings,
    identity::{Identity, Key},
    metrics as m,
    router::Router,
    tls,
};

/// State shared by every connection: settings, identities, routes and who is connected.
pub struct HubCore {
    pub settings: Settings,
    pub auth: Authenticator,
    router: RwLock<Arc<Router>>,
    /// Identity → number of connections holding a valid token for it.
    clients: DashMap<String, usize>,
    /// Module → the cancel token of its current input link; a newer link replaces the older.
    input_links: DashMap<String, CancellationToken>,
    /// Direct-method links and calls in flight.
    pub methods: crate::methods::Dispatcher,
    /// Module twins and twin links.
    pub twins: crate::twins::TwinStore,
    /// The durable message store, when `storage.persistent`.
    pub store: Option<Arc<crate::store::DurableStore>>,
    /// Makes endpoint queues (in the store or in memory).
    queues: Box<crate::router::QueueFactory>,
    /// Reported patches waiting to go upstream (empty in standalone mode).
    pub upstream: crate::upstream::Outbox,
    /// Client connection states not yet written to `$edgeHub`'s reported `clients`, by encoded
    /// client id: the newest state of each, so the map holds at most one entry per identity.
    /// Connects and disconnects (some inside the SASL exchange, which cannot wait) only record
    /// here; `report_clients` writes them in the background.
    client_reports: std::sync::Mutex<serde_json::Map<String, serde_json::Value>>,
    client_reports_ready: tokio::sync::Notify,
}

impl HubCore {
    pub fn new(
        settings: Settings,
        device_key: &Key,
        twins: crate::twins::TwinStore,
        store: Option<Arc<crate::store::DurableStore>>,
    ) -> Self {
        let auth = Authenticator::new(&settings, device_key);
        let capacity = settings.limits.queue_capacity;
        let live = settings.storage.live_first.clone();
        let live_first =
            move |id: &str| crate::router::sink_of(id).is_some_and(|s| live.contains(&s));
        let queues: Box<crate::router::QueueFactory> = match &store {
            Some(s) => {
                let s = s.clone();
                Box::new(move |id: &str| {
                    Arc::new(s.queue(id, capacity, live_first(id)))
                        as Arc<dyn crate::queue::QueueStore>
                })
            }
            None => Box::new(move |id: &str| {
                let q = crate::queue::MemoryQueue::new(capacity);
                let q = if live_first(id) { q.live_first() } else { q };
                Arc::new(q) as Arc<dyn crate::queue::QueueStore>
            }),
        };
        // Queues that hold messages from before a restart exist even if no route feeds them.
        let recovered: Vec<crate::route::Sink> = store
            .as_ref()
            .map(|s| {
                s.recovered_endpoints()
                    .iter()
                    .filter_map(|id| crate::router::sink_of(id))
                    .collect()
            })
            .unwrap_or_default();
        let router = Router::new(
            &settings.device_id,
            settings.routes.clone(),
            settings.time_to_live_secs,
            &*queues,
            &recovered,
        );
        let upstream = crate::upstream::Outbox::new(settings.upstream.is_some());
        Self {
            settings,
            auth,
            router: RwLock::new(Arc::new(router)),
            clients: DashMap::new(),
            input_links: DashMap::new(),
            methods: crate::methods::Dispatcher::default(),
            twins,
            upstream,
            store,
            queues,
            client_reports: Default::default(),
            client_reports_ready: tokio::sync::Notify::new(),
        }
    }

    /// Makes every message queued so far durable (see `store`); a no-op in memory.
    pub async fn sync(&self) -> Result<(), crate::store::StoreError> {
        match &self.store {
            Some(s) => s.sync().await,
            None => Ok(()),
        }
    }

    /// Makes each module's desired properties those of the config (a change is pushed to the
    /// module as a patch). With an upstream, desired properties come from the parent instead.
    pub async fn apply_desired(
        &self,
        modules: &std::collections::BTreeMap<
            crate::identity::ModuleId,
            crate::config::ModuleSettings,
        >,
    ) {
        if self.settings.upstream.is_some() {
            return;
        }
        for (module, spec) in modules {
            let id = Identity::Module(self.settings.device_id.clone(), module.clone());
            match self.twins.apply_config_desired(&id, &spec.desired).await {
                Ok(Some(v)) => info!(identity = %id, version = v, "desired properties updated"),
                Ok(None) => {}
                Err(e) => tracing::error!(identity = %id, "desired properties not updated: {e}"),
            }
        }
    }

    /// Swaps in new routes and TTL; queues and connections stay as they are.
    pub fn reload_routes(&self, routes: Vec<crate::route::Route>, global_ttl_secs: Option<u64>) {
        let mut guard = self.router.write().unwrap_or_else(|p| p.into_inner());
        let next = Router::rebuild(
            &guard,
            &self.settings.device_id,
            routes,
            global_ttl_secs,
            &*self.queues,
        );
        for e in next.endpoints() {
            // Wake input links so they pick up endpoints the new routes added.
            e.ready.notify_one();
        }
        *guard = Arc::new(next);
    }

    /// Sets the gauges that are computed rather than counted: queue lengths and store size.
    pub fn refresh_gauges(&self) {
        for e in self.router().endpoints() {
            e.publish_lengths();
        }
        if let Some(s) = &self.store {
            let (held, limit) = s.usage();
            m::store_bytes(s.disk_bytes(), held, limit);
        }
    }

    pub fn router(&self) -> Arc<Router> {
        self.router
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn client_connected(&self, id: &Identity) {
        let key = id.to_string();
        let first = {
            let mut n = self.clients.entry(key.clone()).or_insert(0);
            *n += 1;
            *n == 1
        };
        m::connect_success(&key);
        m::connected_clients(self.clients.len());
        if first {
            self.report_client(id, true);
        }
    }

    /// Records a client's connection state for this hub's `$edgeHub` reported properties
    /// (`clients`), which go upstream as edgeHub reports them. Devices that leave are removed;
    /// modules stay as `Disconnected`. Never waits: the write happens in `report_clients`.
    fn report_client(&self, id: &Identity, connected: bool) {
        if self.settings.upstream.is_none() || id.module().is_some_and(|m| m.as_str() == "$edgeHub")
        {
            return;
        }
        let now = crate::twins::utc_now();
        let entry = match (connected, id.module().is_some()) {
            (true, _) => serde_json::json!({ "status": "Connected", "lastConnectedTimeUtc": now }),
            (false, true) => {
                serde_json::json!({ "status": "Disconnected", "lastDisconnectedTimeUtc": now })
            }
            (false, false) => serde_json::Value::Null,
        };
        self.client_reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(crate::twins::encode_key(&id.to_string()), entry);
        self.client_reports_ready.notify_one();
    }

    /// Writes the client states recorded since the last call into `$edgeHub`'s reported
    /// properties as one patch (one fsync however many clients came and went) and queues the
    /// patch for upstream.
    pub async fn write_client_reports(&self) {
        let clients = std::mem::take(
            &mut *self
                .client_reports
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if clients.is_empty() {
            return;
        }
        let Ok(edge_hub) = crate::identity::ModuleId::parse("$edgeHub") else {
            return;
        };
        let me = Identity::Module(self.settings.device_id.clone(), edge_hub);
        let mut patch = serde_json::Map::new();
        patch.insert("schemaVersion".into(), "1.0".into());
        patch.insert("clients".into(), serde_json::Value::Object(clients));
        if let Err(e) = self.twins.update_reported(&me, &patch).await {
            warn!("connected clients not recorded in the $edgeHub twin: {e}");
            return;
        }
        self.upstream.report(&me, &patch);
    }

    /// Does some connection hold a valid token for `id`?
    pub fn is_connected(&self, id: &Identity) -> bool {
        self.clients.get(&id.to_string()).is_some_and(|n| *n > 0)
    }

    pub fn client_disconnected(&self, id: &Identity) {
        let key = id.to_string();
        let gone = match self.clients.get_mut(&key) {
            Some(mut n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if gone {
            self.clients.remove_if(&key, |_, n| *n == 0);
            self.report_client(id, false);
        }
        m::disconnected(&key);
        m::connected_clients(self.clients.len());
    }

    /// Registers a module's new input link and cancels the one it replaces.
    pub fn replace_input_link(&self, id: &Identity, link: CancellationToken) {
        let key = id.to_string().to_ascii_lowercase();
        if let Some(old) = self.input_links.insert(key, link) {
            old.cancel();
        }
    }
}

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
    }
    core.apply_desired(&next.modules).await;
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
    #[error("twins: {0}")]
    Twins(#[from] crate::twins::TwinError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    MqttSessions(#[from] crate::mqtt::sessions::SessionStoreError),
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
    pub async fn start(settings: Settings) -> Result<Self, StartError> {
        let key = device_key(&settings)?;
        let certs = tls::ensure_certs(&settings)?;
        let tls_config = tls::server_config(&certs)?;
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
        let keyspace = crate::store::open_keyspace(&store_dir, settings.max_store_bytes)?;
        let twins = crate::twins::TwinStore::with_keyspace(keyspace.clone())?;
        let mqtt_sessions = crate::mqtt::sessions::SessionStore::open(keyspace.clone())?;
        let store = match settings.storage.persistent {
            true => Some(crate::store::DurableStore::open(
                &store_dir,
                keyspace,
                settings.storage.sync,
                settings.max_store_bytes,
                settings.storage.overflow,
            )?),
            false => None,
        };
        let core = Arc::new(HubCore::new(settings, &key, twins, store));
        core.apply_desired(&core.settings.modules).await;
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let tls = TlsAcceptor::from(tls_config);
        tasks.spawn(crate::amqp::serve(
            amqps,
            tls.clone(),
            core.clone(),
            shutdown.clone(),
        ));
        if let Some(l) = mqtts {
            let mqtt = crate::mqtt::Mqtt::new(core.clone(), mqtt_sessions);
            tasks.spawn(crate::mqtt::serve(l, tls.clone(), mqtt, shutdown.clone()));
        }
        if let Some(l) = https {
            tasks.spawn(crate::http::serve_https(
                l,
                tls,
                core.clone(),
                shutdown.clone(),
            ));
        }
        tasks.spawn(housekeeping(core.clone(), shutdown.clone()));
        if let Some(up) = core.settings.upstream.clone() {
            tasks.spawn(report_clients(core.clone(), shutdown.clone()));
            let edge_hub = crate::identity::ModuleId::parse("$edgeHub")
                .map_err(|e| StartError::DeviceKey(e.to_string()))?;
            let keys = crate::upstream::UpstreamKeys {
                edge_hub: up.edge_hub_key.clone().unwrap_or_else(|| {
                    crate::auth::module_keys(&core.settings, &key, &edge_hub).primary
                }),
                device: key.clone(),
            };
            tasks.spawn(crate::upstream::run(
                core.clone(),
                up,
                keys,
                shutdown.clone(),
            ));
        }
        if let Some(l) = metrics {
            let c = core.clone();
            let refresh: crate::http::Refresh = Arc::new(move || c.refresh_gauges());
            let limits = &core.settings.limits;
            let bounds = crate::http::Bounds {
                max_connections: limits.metrics_max_connections,
                header_timeout: std::time::Duration::from_secs(limits.http_header_timeout_secs),
            };
            tasks.spawn(crate::http::serve_metrics(
                l,
                handle,
                shutdown.clone(),
                refresh,
                bounds,
            ));
        }
        tasks.close();
        crate::amqp::log_ready(amqps_addr);
        if let Some(a) = mqtts_addr {
            crate::mqtt::log_ready(a);
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

/// Once a second: drops expired messages from every queue, so a message with a short TTL does
/// not wait behind longer-lived ones, measures the store's files and writes out its removals;
/// on a blocking thread, since each of these may wait on the disk. On shutdown the removals are
/// written out a last time: nothing acknowledged comes back after a restart.
async fn housekeeping(core: Arc<HubCore>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        let core = core.clone();
        let chores = tokio::task::spawn_blocking(move || {
            if !stop {
                for e in core.router().endpoints() {
                    e.expire_now();
                }
            }
            if let Some(store) = &core.store {
                if !stop {
                    store.reclaim();
                }
                store.write_removals();
            }
        });
        if let Err(e) = chores.await {
            warn!(error = %e, "the housekeeping chores failed");
        }
        if stop {
            return;
        }
    }
}

/// Writes recorded client connection states to `$edgeHub`'s twin as they come, batched; what
/// is left at shutdown is written before the task ends.
async fn report_clients(core: Arc<HubCore>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = core.client_reports_ready.notified() => {}
        }
        core.write_client_reports().await;
    }
    core.write_client_reports().await;
}
