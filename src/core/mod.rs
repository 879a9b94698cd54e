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

/// State shared by every connection: settings, identities, routes and who is connected.
pub struct HubCore {
    pub settings: Settings,
    pub auth: Authenticator,
    router: RwLock<Arc<Router>>,
    /// Identity → number of connections holding a valid token for it.
    clients: DashMap<IdentityKey, usize>,
    /// Module → the cancel token of its current input link; a newer link replaces the older.
    input_links: DashMap<IdentityKey, CancellationToken>,
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
}

impl HubCore {
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
        Self {
            settings,
            auth,
            router: RwLock::new(Arc::new(router)),
            clients: DashMap::new(),
            input_links: DashMap::new(),
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
