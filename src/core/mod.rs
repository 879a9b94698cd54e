//! The hub's core, independent of any transport: [`HubCore`] (settings, identities, routes, who
//! is connected), [`auth`], [`ingest`] (route + enqueue of an incoming message), [`delivery`]
//! (the windowed pump from an endpoint to a peer), [`twins`], [`twin_requests`] (a client's twin
//! GET or reported PATCH), [`methods`], the [`outbox`] of reported patches for the parent and
//! the identity [`registry`] of the service API. A transport turns its frames into calls on these and their
//! results back into frames; nothing here imports a server.

pub mod auth;
pub mod c2d;
pub mod delivery;
pub mod ingest;
pub mod methods;
pub mod outbox;
pub mod readers;
pub mod registry;
pub mod scope;
pub mod twin_requests;
pub mod twins;

use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::Settings,
    metrics as m,
    model::identity::{Identity, IdentityKey, Key},
    routing::router::Router,
};
use auth::Authenticator;

/// Ends an identity's connection when a newer one of the same identity arrives (over any
/// transport); called once, with the core, outside the registry's locks.
pub type Evict = Box<dyn FnOnce(&HubCore) + Send + Sync>;

/// State shared by every connection: settings, identities, routes and who is connected.
pub struct HubCore {
    pub settings: Settings,
    pub auth: Authenticator,
    router: RwLock<Arc<Router>>,
    /// Identity → number of connections holding a valid token for it.
    clients: DashMap<IdentityKey, usize>,
    /// Module → the cancel token of its current input link; a newer link replaces the older.
    input_links: DashMap<IdentityKey, CancellationToken>,
    /// Identity → its live connection, whatever the transport: (generation, what ends it).
    connections: DashMap<IdentityKey, (u64, Evict)>,
    connection_generation: std::sync::atomic::AtomicU64,
    /// Direct-method links and calls in flight.
    pub methods: crate::core::methods::Dispatcher,
    /// Module twins and twin links.
    pub twins: twins::TwinStore,
    /// Devices and modules created through the service API, and the revocations that cut
    /// their connections.
    pub registry: registry::Registry,
    /// The durable message store, when `storage.persistent`.
    pub store: Option<Arc<crate::store::durable::DurableStore>>,
    /// The retained log behind `$upstream` in standalone mode (`builtInEndpoint`).
    pub log: Option<Arc<crate::store::log::EventLog>>,
    /// Who reads which partition of the log, with Event Hubs' owner-level rules.
    pub readers: readers::Readers,
    /// Makes endpoint queues (in the store or in memory).
    queues: Box<crate::routing::router::QueueFactory>,
    /// Reported patches waiting to go upstream (empty in standalone mode).
    pub outbox: outbox::Outbox,
    /// Cloud-to-device queues (one per device) and feedback.
    pub c2d: Arc<c2d::C2d>,
    /// Client connection states not yet written to `$edgeHub`'s reported `clients`, by encoded
    /// client id: the newest state of each, so the map holds at most one entry per identity.
    /// Connects and disconnects (some inside the SASL exchange, which cannot wait) only record
    /// here; `report_clients` writes them in the background.
    client_reports: std::sync::Mutex<serde_json::Map<String, serde_json::Value>>,
    client_reports_ready: tokio::sync::Notify,
    /// This hub's device key (standalone mode): the keys of the identities it serves to child
    /// hubs' device-scope calls derive from it.
    pub device_key: Key,
    /// The downstream devices as the config names them now (replaced on reload): what the
    /// device-scope API serves to child hubs.
    served: RwLock<
        Arc<
            std::collections::BTreeMap<
                crate::model::identity::DeviceId,
                crate::config::DeviceSettings,
            >,
        >,
    >,
}

/// How long a connecting client waits for its identity to be looked up at the parent.
pub(crate) const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl HubCore {
    /// A core on in-memory twins and registry, without a store, from a config's text and the
    /// all-zero device key: for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests(config: &str) -> Self {
        let settings = crate::config::from_str(config, &Default::default()).unwrap();
        let key = Key::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap();
        HubCore::new(
            settings,
            &key,
            twins::TwinStore::in_memory(),
            registry::Registry::in_memory(),
            None,
            None,
        )
    }

    pub fn new(
        settings: Settings,
        device_key: &Key,
        twins: twins::TwinStore,
        registry: registry::Registry,
        store: Option<Arc<crate::store::durable::DurableStore>>,
        log: Option<Arc<crate::store::log::EventLog>>,
    ) -> Self {
        let auth = Authenticator::new(&settings, device_key);
        registry.install(&auth);
        m::registry_identities(registry.len());
        let capacity = settings.limits.queue_capacity;
        let live = settings.storage.live_first.clone();
        let live_first =
            move |id: &str| crate::routing::router::sink_of(id).is_some_and(|s| live.contains(&s));
        let queues: Box<crate::routing::router::QueueFactory> = match &store {
            // `$upstream` of a standalone hub with a built-in endpoint appends to the log.
            _ if log.is_some() => {
                let (log, store) = (log.clone(), store.clone());
                Box::new(move |id: &str| match (&log, &store) {
                    (Some(log), _) if id == crate::routing::router::UPSTREAM_ENDPOINT => {
                        Arc::new(crate::store::log::LogQueue(log.clone()))
                            as Arc<dyn crate::store::queue::QueueStore>
                    }
                    (_, Some(s)) => Arc::new(s.queue(id, capacity, live_first(id))),
                    (_, None) => Arc::new(crate::store::queue::MemoryQueue::new(capacity)),
                })
            }
            Some(s) => {
                let s = s.clone();
                Box::new(move |id: &str| {
                    Arc::new(s.queue(id, capacity, live_first(id)))
                        as Arc<dyn crate::store::queue::QueueStore>
                })
            }
            None => Box::new(move |id: &str| {
                let q = crate::store::queue::MemoryQueue::new(capacity);
                let q = if live_first(id) { q.live_first() } else { q };
                Arc::new(q) as Arc<dyn crate::store::queue::QueueStore>
            }),
        };
        // Queues that hold messages from before a restart exist even if no route feeds them.
        let recovered_ids = store
            .as_ref()
            .map(|s| s.recovered_endpoints())
            .unwrap_or_default();
        let recovered: Vec<crate::routing::route::Sink> = recovered_ids
            .iter()
            .filter_map(|id| crate::routing::router::sink_of(id))
            .collect();
        let c2d = Arc::new(c2d::C2d::new(
            settings.device_id.clone(),
            c2d_queues(store.clone()),
            &recovered_ids,
        ));
        let router = Router::new(
            &settings.device_id,
            settings.routes.clone(),
            settings.time_to_live_secs,
            &*queues,
            &recovered,
        );
        let outbox = outbox::Outbox::new(settings.upstream.is_some());
        let served = RwLock::new(Arc::new(settings.devices.clone()));
        Self {
            device_key: device_key.clone(),
            served,
            settings,
            auth,
            router: RwLock::new(Arc::new(router)),
            clients: DashMap::new(),
            input_links: DashMap::new(),
            connections: DashMap::new(),
            connection_generation: std::sync::atomic::AtomicU64::new(0),
            methods: crate::core::methods::Dispatcher::default(),
            twins,
            registry,
            outbox,
            c2d,
            store,
            log,
            readers: Default::default(),
            queues,
            client_reports: Default::default(),
            client_reports_ready: tokio::sync::Notify::new(),
        }
    }

    /// Makes every message queued so far durable (see `store`); a no-op in memory.
    pub async fn sync(&self) -> Result<(), crate::store::durable::StoreError> {
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
            crate::model::identity::ModuleId,
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

    /// Runtime mode: before a token is verified, makes sure the device-scope cache can judge
    /// it. An identity it does not know, or whose token its keys do not verify (keys rotated),
    /// is looked up at the parent once (throttled per identity), for at most
    /// [`LOOKUP_TIMEOUT`]. Service tokens and standalone mode pass through.
    pub async fn learn(&self, token: &str) {
        let Some(scope) = self.auth.scope() else {
            return;
        };
        let Ok(t) = crate::model::sas::SasToken::parse(token) else {
            return;
        };
        if t.skn.is_some() {
            return;
        }
        let Ok((_, id)) = t.audience() else { return };
        match self.auth.verify(token, crate::model::sas::now_secs()) {
            Err(crate::model::sas::SasError::UnknownIdentity(_))
            | Err(crate::model::sas::SasError::BadSignature(_)) => {}
            _ => return,
        }
        if tokio::time::timeout(LOOKUP_TIMEOUT, scope.lookup(&id))
            .await
            .is_err()
        {
            warn!(identity = %id, "the identity lookup at the parent timed out");
        }
    }

    /// The downstream devices the device-scope API serves (the config's, as last reloaded).
    pub fn served_devices(
        &self,
    ) -> Arc<
        std::collections::BTreeMap<crate::model::identity::DeviceId, crate::config::DeviceSettings>,
    > {
        self.served
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the downstream devices the device-scope API serves (config reload).
    pub fn set_served_devices(
        &self,
        devices: std::collections::BTreeMap<
            crate::model::identity::DeviceId,
            crate::config::DeviceSettings,
        >,
    ) {
        *self.served.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(devices);
    }

    /// Runtime mode: the `$edgeHub` twin's desired properties (from the parent) are the
    /// deployment's `$edgeHub` section: its routes, TTL and store limit replace the running ones,
    /// as a config reload does. A section that does not compile changes nothing.
    pub fn apply_edge_hub_twin(&self, desired: &serde_json::Map<String, serde_json::Value>) {
        if self.settings.runtime.is_none() || !desired.contains_key("routes") {
            return;
        }
        match crate::config::runtime::edge_hub_desired(&self.settings, desired) {
            Ok(d) => {
                for e in &d.route_errors {
                    warn!(path = %e.path, "invalid route from the $edgeHub twin skipped: {}", e.message);
                }
                m::invalid_routes(d.route_errors.len());
                let n = d.routes.len();
                self.reload_routes(d.routes, d.time_to_live_secs);
                if let Some(store) = &self.store {
                    if store.usage().1 != d.max_store_bytes {
                        store.set_limit(d.max_store_bytes);
                    }
                }
                info!(routes = n, "routes from the $edgeHub twin");
            }
            Err(errs) => {
                for e in &errs.0 {
                    warn!("the $edgeHub twin's desired properties are not applied: {e}");
                }
            }
        }
    }

    /// Swaps in new routes and TTL; queues and connections stay as they are.
    pub fn reload_routes(
        &self,
        routes: Vec<crate::routing::route::Route>,
        global_ttl_secs: Option<u64>,
    ) {
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
        m::c2d_queue_length(self.c2d.queued());
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
        let first = {
            let mut n = self.clients.entry(id.key()).or_insert(0);
            *n += 1;
            *n == 1
        };
        m::connect_success(&id.to_string());
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
        let now = twins::utc_now();
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
            .insert(twins::encode_key(&id.to_string()), entry);
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
        let Ok(edge_hub) = crate::model::identity::ModuleId::parse("$edgeHub") else {
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
        self.outbox.report(&me, &patch);
    }

    /// Does some connection hold a valid token for `id`?
    pub fn is_connected(&self, id: &Identity) -> bool {
        self.clients.get(&id.key()).is_some_and(|n| *n > 0)
    }

    pub fn client_disconnected(&self, id: &Identity) {
        let key = id.key();
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
        m::disconnected(&id.to_string());
        m::connected_clients(self.clients.len());
    }

    /// Makes a newly authenticated connection the live connection of `id`, whatever its
    /// transport, and ends the one it replaces (edgeHub's rule: one connection per identity, the
    /// newer wins, an MQTT connection replaces an AMQP one and the other way round). Returns the
    /// generation to release it with.
    pub fn claim_connection(&self, id: &Identity, evict: Evict) -> u64 {
        use std::sync::atomic::Ordering;
        let generation = self.connection_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let old = self.connections.insert(id.key(), (generation, evict));
        // The map's guard is gone: the old connection's teardown may touch the core freely.
        if let Some((_, evict)) = old {
            info!(identity = %id, "a newer connection of this identity replaces the older");
            evict(self);
        }
        generation
    }

    /// Forgets `id`'s live connection of `generation` (it ended) unless a newer one took over.
    pub fn release_connection(&self, id: &Identity, generation: u64) {
        self.connections
            .remove_if(&id.key(), |_, (g, _)| *g == generation);
    }

    /// Identities with a live connection.
    pub fn live_connections(&self) -> usize {
        self.connections.len()
    }

    /// Registers a module's new input link and cancels the one it replaces.
    pub fn replace_input_link(&self, id: &Identity, link: CancellationToken) {
        let key = id.key();
        if let Some(old) = self.input_links.insert(key, link) {
            old.cancel();
        }
    }
}

/// The queues of C2D messages: [`c2d::MAX_QUEUED`] per device, [`c2d::FEEDBACK_QUEUE`]
/// feedback messages; in the durable store when there is one.
fn c2d_queues(
    store: Option<Arc<crate::store::durable::DurableStore>>,
) -> Box<crate::routing::router::QueueFactory> {
    let capacity = |id: &str| match id.starts_with('$') && !id.starts_with("$c2d/") {
        true => c2d::FEEDBACK_QUEUE,
        false => c2d::MAX_QUEUED,
    };
    match store {
        Some(s) => Box::new(move |id: &str| {
            Arc::new(s.queue(id, capacity(id), false)) as Arc<dyn crate::store::queue::QueueStore>
        }),
        None => Box::new(move |id: &str| {
            Arc::new(crate::store::queue::MemoryQueue::new(capacity(id)))
                as Arc<dyn crate::store::queue::QueueStore>
        }),
    }
}

/// Once a second: drops expired messages from every queue, so a message with a short TTL does
/// not wait behind longer-lived ones, measures the store's files and writes out its removals;
/// on a blocking thread, since each of these may wait on the disk. On shutdown the removals are
/// written out a last time: nothing acknowledged comes back after a restart.
pub async fn housekeeping(core: Arc<HubCore>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        let after = core.clone();
        let core = core.clone();
        let chores = tokio::task::spawn_blocking(move || {
            if !stop {
                for e in core.router().endpoints() {
                    e.expire_now();
                }
                core.c2d.expire_now();
            }
            if let (Some(log), false) = (&core.log, stop) {
                if let Err(e) = log.expire(crate::model::message::now_ms()) {
                    warn!(error = %e, "removing old events from the event log failed");
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
        // Appends to the event log are shown to readers once a sync covers them; a sender
        // syncs before it is acknowledged, and this covers any write no sender waits for.
        if let (Some(_), false) = (&after.log, stop) {
            if let Err(e) = after.sync().await {
                warn!(error = %e, "syncing the store failed");
            }
        }
        if stop {
            return;
        }
    }
}

/// Writes recorded client connection states to `$edgeHub`'s twin as they come, batched; what
/// is left at shutdown is written before the task ends.
pub async fn report_clients(core: Arc<HubCore>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = core.client_reports_ready.notified() => {}
        }
        core.write_client_reports().await;
    }
    core.write_client_reports().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    fn core() -> HubCore {
        let text = r#"{"deviceId": "edge1", "iothubHostname": "hub.azure-devices.net", "gatewayHostname": "gw.local",
            "listen": {"amqps": "127.0.0.1:0"}, "dataDir": "/nonexistent",
            "modules": {"filter": {}}, "$edgeHub": {"schemaVersion": "1.0", "routes": {}}}"#;
        HubCore::for_tests(text)
    }

    fn counter(n: &Arc<AtomicUsize>) -> Evict {
        let n = n.clone();
        Box::new(move |_| {
            n.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn a_newer_connection_of_an_identity_evicts_the_older_once() {
        let core = core();
        let id = Identity::Module(
            crate::model::identity::DeviceId::parse("edge1").unwrap(),
            crate::model::identity::ModuleId::parse("filter").unwrap(),
        );
        let same = Identity::Module(
            crate::model::identity::DeviceId::parse("EDGE1").unwrap(),
            crate::model::identity::ModuleId::parse("Filter").unwrap(),
        );
        let (first, second) = (Arc::default(), Arc::default());
        let g1 = core.claim_connection(&id, counter(&first));
        assert_eq!(first.load(Ordering::SeqCst), 0);
        // Ids compare case-insensitively, as IoT Hub compares them.
        let g2 = core.claim_connection(&same, counter(&second));
        assert_eq!(first.load(Ordering::SeqCst), 1);
        assert_eq!(core.live_connections(), 1);
        // The older one's end does not forget the newer.
        core.release_connection(&id, g1);
        assert_eq!(core.live_connections(), 1);
        core.release_connection(&id, g2);
        assert_eq!(core.live_connections(), 0);
        assert_eq!(second.load(Ordering::SeqCst), 0, "released, never evicted");
    }
}
