//! The upstream: one AMQP connection from this hub to its parent (Azure IoT Hub, or a parent
//! edge hub in nested mode) that carries every identity of this hub.
//!
//! Frames follow what the C# device SDK sends IoT Hub, since that is what edgeHub itself uses:
//! TLS on port 5671, `$cbs` on its own session with one `put-token` per identity
//! (`azure-devices.net:sastoken`), then one session per identity with absolute link addresses
//! `amqps://{host}:{port}/devices/{d}/modules/{m}/…`. Tokens are those of this hub's own
//! `$edgeHub` identity, put on behalf of each module (the audience names the module), as IoT Edge
//! does. Per module identity the hub holds: an events sender (forwarded telemetry), a twin link
//! pair (reported patches up, desired patches down) and a method link pair (cloud calls down);
//! per leaf device also its C2D receiver (`…/messages/deviceBound`, see `c2d.rs`).
//!
//! Any failure ends the whole connection: every unacknowledged message goes back to its place in
//! the `$upstream` queue, and the hub reconnects with exponential backoff and jitter.

mod c2d;
mod error;
pub mod transport;

pub use self::error::UpstreamError;

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use fe2o3_amqp::{
    connection::ConnectionHandle,
    link::{Receiver, Sender},
    session::SessionHandle,
    types::{
        definitions::Fields,
        messaging::{
            annotations::OwnedKey, ApplicationProperties, Body, Data, Message as AmqpMessage,
            MessageAnnotations, MessageId, Properties,
        },
        primitives::{Binary, SimpleValue, Symbol, Value},
    },
    Connection, Sendable, Session,
};
use serde_json::Map;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    config::UpstreamSettings,
    core::{delivery, HubCore},
    metrics as m,
    model::identity::{Identity, IdentityKey, Key, ModuleId},
    model::sas::{make_token, now_secs, resource_for},
    servers::amqp::{
        cbs_client::{CbsClient, CbsError, IOTHUB_TOKEN},
        convert,
    },
    store::queue::{Endpoint, Queued},
};

/// Default lifetime of the tokens put upstream (`upstream.tokenLifetimeSecs`); they are renewed
/// at three quarters of it.
const TOKEN_LIFETIME_SECS: u64 = 3600;

/// The lifetime of the tokens this hub puts upstream (`upstream.tokenLifetimeSecs`).
fn token_lifetime(core: &HubCore) -> u64 {
    core.settings
        .upstream
        .as_ref()
        .map_or(TOKEN_LIFETIME_SECS, |u| u.token_lifetime_secs)
}
/// Bound on connecting, on one put-token and on one twin request.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on waiting for link credit for one transfer.
const SEND_WAIT: Duration = Duration::from_secs(60);
/// How long a call from upstream may wait for the module (edgeHub's internal 5 min 30 s).
const METHOD_TIMEOUT: Duration = Duration::from_secs(330);
const DESIRED_NOTIFICATIONS: &str = "/notifications/twin/properties/desired";
const API_VERSION: &str = "2021-04-12";

/// The identities this hub carries upstream: its `$edgeHub`, every configured module, and every
/// downstream leaf device (`devices.<id>` without `edge`; a child edge device's own modules are
/// its hub's to carry); in runtime mode also the modules and leaf devices of its device scope.
fn identities(core: &HubCore) -> Vec<Identity> {
    let device = core.settings.device_id.clone();
    let edge_hub = ModuleId::parse("$edgeHub").ok();
    let leaves = core
        .settings
        .devices
        .iter()
        .filter(|(_, spec)| !spec.edge)
        .map(|(d, _)| Identity::Device(d.clone()));
    // In runtime mode, the modules of this device that the device scope names as well.
    let scoped = core
        .auth
        .scope()
        .map(|s| s.own_modules())
        .unwrap_or_default()
        .into_iter()
        .filter(|m| !core.settings.modules.contains_key(m));
    // In runtime mode, the leaf devices the device scope puts directly below this device.
    let scoped_leaves = core
        .auth
        .scope()
        .map(|s| s.own_leaves())
        .unwrap_or_default()
        .into_iter()
        .filter(|d| !core.settings.devices.contains_key(d))
        .map(Identity::Device);
    edge_hub
        .into_iter()
        .chain(core.settings.modules.keys().cloned())
        .chain(scoped)
        .map(|m| Identity::Module(device.clone(), m))
        .chain(leaves)
        .chain(scoped_leaves)
        .collect()
}

/// What signs this hub's `$edgeHub` tokens.
#[derive(Clone)]
pub enum EdgeHubSigner {
    /// A key from the config or derived from the device key (standalone mode).
    Key(Key),
    /// The workload API (runtime mode): the hub holds no key.
    Workload(crate::ops::workload::Workload),
}

/// The keys tokens upstream are signed with.
#[derive(Clone)]
pub struct UpstreamKeys {
    /// This hub's `$edgeHub` signer: tokens on behalf of its own modules.
    pub edge_hub: EdgeHubSigner,
    /// This hub's device key: leaf devices' keys derive from it unless configured.
    pub device: Key,
}

/// The token put for `id`: this hub's `$edgeHub` token for its own identities (the audience
/// names the one acted for), a leaf device's own token for a configured leaf device; in
/// runtime mode the `$edgeHub` token for every identity.
async fn token_for(core: &HubCore, keys: &UpstreamKeys, id: &Identity) -> Result<String, String> {
    match id {
        // In runtime mode this hub holds no device key: it acts for every identity of its
        // scope with its own `$edgeHub` token, as edgeHub does.
        Identity::Device(d)
            if *d != core.settings.device_id && matches!(keys.edge_hub, EdgeHubSigner::Key(_)) =>
        {
            let key = crate::core::auth::device_keys(&core.settings, &keys.device, d).primary;
            Ok(make_token(
                &resource_for(&core.settings.iothub_hostname, id),
                &key,
                now_secs() + token_lifetime(core),
                None,
            ))
        }
        _ => edge_hub_token(core, &keys.edge_hub).await,
    }
}

/// Keeps the upstream connected until `shutdown`: connects, serves, and on any failure waits
/// an exponentially growing, jittered delay before trying again.
pub async fn run(
    core: Arc<HubCore>,
    up: UpstreamSettings,
    keys: UpstreamKeys,
    shutdown: CancellationToken,
) {
    let me = format!("{}/$edgeHub", core.settings.device_id);
    let min = Duration::from_millis(up.min_backoff_ms);
    let max = Duration::from_millis(up.max_backoff_ms);
    let mut backoff = min;
    let mut offline_since: Option<Instant> = None;
    let mut failures = 0u32;
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = connect(&core, &up, &keys) => r,
        };
        match attempt {
            Ok(live) => {
                backoff = min;
                failures = 0;
                let offline = offline_since.take().map(|t| t.elapsed().as_secs_f64());
                m::back_online(&me, offline);
                info!(
                    host = %up.hostname,
                    port = up.port,
                    identities = live.links.len(),
                    offline_secs = offline.unwrap_or(0.0),
                    "upstream connected"
                );
                // A reconnection may follow changes made meanwhile: refresh the device scope
                // (throttled), as edgeHub does.
                if let Some(scope) = core.auth.scope() {
                    scope.request_refresh();
                }
                let why = serve(&core, &up, live, &keys, &shutdown).await;
                if shutdown.is_cancelled() {
                    return;
                }
                warn!(host = %up.hostname, "upstream connection lost: {why}; messages stay queued");
                offline_since = Some(Instant::now());
                m::went_offline(&me);
            }
            Err(e) => {
                if offline_since.is_none() {
                    offline_since = Some(Instant::now());
                    m::went_offline(&me);
                }
                m::retry(&me, "connect");
                failures += 1;
                if e.is_unauthorized() && (failures == 1 || failures.is_power_of_two()) {
                    // Retrying cannot help until the parent knows this hub's keys.
                    tracing::error!(host = %up.hostname, port = up.port, attempts = failures, "the parent refused this hub: {e}; retrying");
                } else if failures == 1 || failures.is_power_of_two() {
                    warn!(host = %up.hostname, port = up.port, attempts = failures, "upstream unreachable: {e}; retrying");
                } else {
                    debug!(host = %up.hostname, "upstream unreachable: {e}");
                }
            }
        }
        let delay = jitter(backoff);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        backoff = (backoff * 2).min(max);
    }
}

/// A delay between half of `d` and `d`, so that many hubs do not retry in step.
fn jitter(d: Duration) -> Duration {
    let r = (uuid::Uuid::new_v4().as_u128() % 1000) as u32;
    d / 2 + (d / 2) * r / 1000
}

/// The links of one identity on its own session.
struct IdentityLinks {
    id: Identity,
    session: SessionHandle<()>,
    events: Sender,
    twin: Option<(Sender, Receiver)>,
    methods: Option<(Receiver, Sender)>,
    /// A leaf device's C2D link, held on its behalf.
    c2d: Option<Receiver>,
}

/// An open upstream connection with every identity authenticated and attached.
struct Live {
    connection: ConnectionHandle<()>,
    _cbs_session: SessionHandle<()>,
    cbs: Cbs,
    links: Vec<IdentityLinks>,
    /// The identities this connection was opened for (refused ones included).
    carrying: Vec<Identity>,
}

fn audience(host: &str, id: &Identity) -> String {
    resource_for(host, id)
}

async fn edge_hub_token(core: &HubCore, signer: &EdgeHubSigner) -> Result<String, String> {
    let edge_hub = ModuleId::parse("$edgeHub").map_err(|e| e.to_string())?;
    let expiry = now_secs() + token_lifetime(core);
    match signer {
        EdgeHubSigner::Key(key) => {
            let me = Identity::Module(core.settings.device_id.clone(), edge_hub);
            Ok(make_token(
                &resource_for(&core.settings.iothub_hostname, &me),
                key,
                expiry,
                None,
            ))
        }
        EdgeHubSigner::Workload(w) => {
            let sr = crate::ops::workload::client_sr(
                &core.settings.iothub_hostname,
                &core.settings.device_id,
                &edge_hub,
            );
            w.token(&sr, expiry).await.map_err(|e| e.to_string())
        }
    }
}

/// The link property naming the identity's auth chain (target first, up to this hub's
/// device), which the C# SDK puts on every link when edgeHub acts for a downstream identity.
const AUTH_CHAIN: &str = "com.microsoft:auth-chain";

/// The auth chain of an identity this hub carries: in runtime mode as its device scope gives
/// it, else built from the config (`{id};{device}`).
fn auth_chain(core: &HubCore, id: &Identity) -> String {
    if let Some(e) = core.auth.scope().and_then(|s| s.entry(id)) {
        return e.auth_chain;
    }
    let own = &core.settings.device_id;
    match id {
        Identity::Device(d) if d == own => own.to_string(),
        Identity::Device(d) => format!("{d};{own}"),
        Identity::Module(d, m) => format!("{d}/{m};{own}"),
    }
}

/// `link_properties` with the identity's auth chain.
fn link_properties_for(channel: Option<String>, chain: &str) -> Fields {
    let mut f = link_properties(channel);
    f.insert(Symbol::from(AUTH_CHAIN), Value::String(chain.to_owned()));
    f
}

fn link_properties(channel: Option<String>) -> Fields {
    let mut f = Fields::new();
    f.insert(
        Symbol::from("com.microsoft:client-version"),
        Value::String(format!("edgehub/{}", env!("CARGO_PKG_VERSION"))),
    );
    f.insert(
        Symbol::from("com.microsoft:api-version"),
        Value::String(API_VERSION.into()),
    );
    if let Some(c) = channel {
        f.insert(
            Symbol::from("com.microsoft:channel-correlation-id"),
            Value::String(c),
        );
    }
    f
}

async fn connect(
    core: &HubCore,
    up: &UpstreamSettings,
    keys: &UpstreamKeys,
) -> Result<Live, UpstreamError> {
    tokio::time::timeout(OP_TIMEOUT, connect_inner(core, up, keys))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(OP_TIMEOUT))?
}

async fn connect_inner(
    core: &HubCore,
    up: &UpstreamSettings,
    keys: &UpstreamKeys,
) -> Result<Live, UpstreamError> {
    let stream = transport::open(up).await?;
    let mut connection = Connection::builder()
        .container_id(format!(
            "{}-{}",
            core.settings.device_id,
            uuid::Uuid::new_v4()
        ))
        .hostname(up.hostname.as_str())
        .max_frame_size(256 * 1024)
        // Keep-alives at half the parent's idle-time-out, as towards clients.
        .open_with_stream(crate::servers::amqp::tags::WideTags::new(
            stream,
            crate::servers::amqp::tags::Limits::for_parent(256 * 1024),
        ))
        .await
        .map_err(|e| UpstreamError::Open(Box::new(e)))?;
    let mut cbs_session =
        Session::begin(&mut connection)
            .await
            .map_err(|source| UpstreamError::Session {
                what: "$cbs session".into(),
                source,
            })?;
    let mut cbs = Cbs::attach(&mut cbs_session)
        .await
        .map_err(|source| UpstreamError::Cbs {
            what: "$cbs link".into(),
            source,
        })?;
    let host = &core.settings.iothub_hostname;
    let mut ids = Vec::new();
    let carrying = identities(core);
    for id in carrying.clone() {
        let token = token_for(core, keys, &id)
            .await
            .map_err(|reason| UpstreamError::Sign {
                identity: id.to_string(),
                reason,
            })?;
        match cbs.put_token(&audience(host, &id), &token).await {
            Ok(()) => ids.push(id),
            // One identity the parent does not know must not keep the others offline.
            Err(CbsError::Refused(status, why)) => tracing::error!(
                identity = %id,
                status,
                "the parent refused this identity's token ({why}); its messages cannot go upstream \
                 until the parent knows it with the same key"
            ),
            Err(source @ CbsError::Failed(_)) => {
                return Err(UpstreamError::Cbs {
                    what: format!("put-token for {id}"),
                    source,
                })
            }
        }
    }
    let base = format!("amqps://{}:{}", up.hostname, up.port);
    let mut links = Vec::new();
    for id in ids {
        let mut session = Session::builder()
            .incoming_window(4096)
            .outgoing_window(4096)
            .begin(&mut connection)
            .await
            .map_err(|source| UpstreamError::Session {
                what: format!("session for {id}"),
                source,
            })?;
        let path = id_path(&id);
        let chain = auth_chain(core, &id);
        let events = Sender::builder()
            .name(format!("events-{}", uuid::Uuid::new_v4()))
            .target(format!("{base}{path}/messages/events"))
            .properties(link_properties_for(None, &chain))
            .attach(&mut session)
            .await
            .map_err(|e| UpstreamError::attach("events", &id, &e))?;
        let twin_addr = format!("{base}{path}/twin");
        let channel = uuid::Uuid::new_v4();
        let twin_tx = Sender::builder()
            .name(format!("twin-sender-{channel}"))
            .target(twin_addr.clone())
            .properties(link_properties_for(Some(format!("twin:{channel}")), &chain))
            .attach(&mut session)
            .await
            .map_err(|e| UpstreamError::attach("twin", &id, &e))?;
        let twin_rx = Receiver::builder()
            .name(format!("twin-receiver-{channel}"))
            .source(twin_addr)
            .target(format!("twin-receiver-{channel}"))
            .properties(link_properties_for(Some(format!("twin:{channel}")), &chain))
            .attach(&mut session)
            .await
            .map_err(|e| UpstreamError::attach("twin", &id, &e))?;
        let methods_addr = format!("{base}{path}/methods/devicebound");
        let channel = uuid::Uuid::new_v4();
        let method_rx = Receiver::builder()
            .name(format!("methods-receiver-{channel}"))
            .source(methods_addr.clone())
            .target(format!("methods-receiver-{channel}"))
            .properties(link_properties_for(
                Some(format!("methods:{channel}")),
                &chain,
            ))
            .attach(&mut session)
            .await
            .map_err(|e| UpstreamError::attach("methods", &id, &e))?;
        let method_tx = Sender::builder()
            .name(format!("methods-sender-{channel}"))
            .target(methods_addr)
            .properties(link_properties_for(
                Some(format!("methods:{channel}")),
                &chain,
            ))
            .attach(&mut session)
            .await
            .map_err(|e| UpstreamError::attach("methods", &id, &e))?;
        let c2d = match &id {
            Identity::Device(d) if *d != core.settings.device_id => Some(
                c2d::attach(&mut session, &base, &path, &chain)
                    .await
                    .map_err(|e| UpstreamError::attach("C2D", &id, &e))?,
            ),
            _ => None,
        };
        links.push(IdentityLinks {
            id,
            session,
            events,
            twin: Some((twin_tx, twin_rx)),
            methods: Some((method_rx, method_tx)),
            c2d,
        });
    }
    Ok(Live {
        connection,
        _cbs_session: cbs_session,
        cbs,
        links,
        carrying,
    })
}

/// `/devices/{d}` or `/devices/{d}/modules/{m}`, ids percent-encoded.
fn id_path(id: &Identity) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, crate::model::sas::URI_COMPONENT).to_string()
    };
    match id.module() {
        Some(m) => format!(
            "/devices/{}/modules/{}",
            enc(id.device().as_str()),
            enc(m.as_str())
        ),
        None => format!("/devices/{}", enc(id.device().as_str())),
    }
}

/// Runs the connection's tasks until one fails, the connection ends, or `shutdown`; then ends
/// them all (unacknowledged messages go back to the queue) and says why it stopped.
async fn serve(
    core: &Arc<HubCore>,
    up: &UpstreamSettings,
    mut live: Live,
    token_keys: &UpstreamKeys,
    shutdown: &CancellationToken,
) -> String {
    let dead = CancellationToken::new();
    let mut tasks: JoinSet<Result<(), UpstreamError>> = JoinSet::new();
    let carried: Vec<Identity> = live.links.iter().map(|l| l.id.clone()).collect();
    let mut senders = HashMap::new();
    // Dropping a session handle ends the session: they live as long as the connection.
    let mut sessions = Vec::new();
    for l in live.links.drain(..) {
        sessions.push(l.session);
        senders.insert(l.id.key(), l.events);
        if let Some((tx, rx)) = l.twin {
            let twin = TwinLink {
                id: l.id.clone(),
                tx,
                rx,
                last_version: None,
                pushes: VecDeque::new(),
            };
            tasks.spawn(twin_sync(core.clone(), twin, dead.clone()));
        }
        if let Some((rx, tx)) = l.methods {
            tasks.spawn(methods(core.clone(), l.id.clone(), rx, tx, dead.clone()));
        }
        if let (Some(rx), Identity::Device(d)) = (l.c2d, &l.id) {
            tasks.spawn(c2d::receive(core.clone(), d.clone(), rx, dead.clone()));
        }
    }
    tasks.spawn(telemetry(
        core.clone(),
        senders,
        up.window,
        dead.clone(),
        Instant::now(),
    ));
    let mut cbs = live.cbs;
    let renew_core = core.clone();
    let renew_keys = token_keys.clone();
    let renew_dead = dead.clone();
    tasks.spawn(async move {
        let every = Duration::from_millis(token_lifetime(&renew_core) * 750);
        loop {
            tokio::select! {
                _ = renew_dead.cancelled() => return Ok(()),
                _ = tokio::time::sleep(every) => {}
            }
            let host = renew_core.settings.iothub_hostname.clone();
            for id in &carried {
                let token = token_for(&renew_core, &renew_keys, id)
                    .await
                    .map_err(|reason| UpstreamError::Sign {
                        identity: id.to_string(),
                        reason,
                    })?;
                cbs.put_token(&audience(&host, id), &token)
                    .await
                    .map_err(|source| UpstreamError::Cbs {
                        what: format!("renewing the token of {id}"),
                        source,
                    })?;
            }
            debug!("upstream tokens renewed");
        }
    });
    // Runtime mode: a module of this device that the device scope adds (or removes) needs its
    // own links, which are made at connect: reconnect when the carried set changes.
    let mut scope_changes = core.auth.scope().map(|s| s.watch());
    let carried_now = std::mem::take(&mut live.carrying);
    let scope_changed = async {
        let Some(rx) = scope_changes.as_mut() else {
            return std::future::pending().await;
        };
        // A change between the connect and the subscription.
        if identities(core) != carried_now {
            return;
        }
        loop {
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            if identities(core) != carried_now {
                return;
            }
        }
    };
    let why = tokio::select! {
        _ = shutdown.cancelled() => "shutting down".to_owned(),
        () = scope_changed => "the device scope changed the identities to carry; reconnecting".to_owned(),
        r = live.connection.on_close() => match r {
            Ok(()) => "the parent closed the connection".to_owned(),
            Err(e) => format!("connection ended: {e}"),
        },
        Some(r) = tasks.join_next() => match r {
            Ok(Ok(())) => "a link task ended".to_owned(),
            Ok(Err(e)) => {
                if e.is_unauthorized() {
                    tracing::error!(host = %up.hostname, "the parent refused this hub: {e}");
                }
                e.to_string()
            }
            Err(e) => format!("a link task failed: {e}"),
        },
    };
    dead.cancel();
    // Each task releases what it holds and returns promptly once `dead` fires.
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    for mut s in sessions {
        let _ = tokio::time::timeout(Duration::from_secs(1), s.end()).await;
    }
    if !live.connection.is_closed() {
        let _ = tokio::time::timeout(Duration::from_secs(2), live.connection.close()).await;
    }
    why
}

/// The `$cbs` link pair to the parent.
struct Cbs(CbsClient);

impl Cbs {
    async fn attach(session: &mut SessionHandle<()>) -> Result<Self, CbsError> {
        CbsClient::attach(session, "$cbs-sender", "$cbs-receiver")
            .await
            .map(Cbs)
    }

    /// Puts this hub's token for `audience`, waiting at most [`OP_TIMEOUT`] for the reply.
    async fn put_token(&mut self, audience: &str, token: &str) -> Result<(), CbsError> {
        tokio::time::timeout(OP_TIMEOUT, self.0.put_token(IOTHUB_TOKEN, audience, token))
            .await
            .map_err(|_| CbsError::Failed("no put-token reply".to_owned()))?
    }
}

/// Drains the `$upstream` queue onto each origin's events link through the core's delivery
/// pump (see [`delivery`]): up to `window` transfers in flight; a message leaves the queue only
/// when the parent accepts it (or rejects it as invalid, which is counted and logged).
async fn telemetry(
    core: Arc<HubCore>,
    senders: HashMap<IdentityKey, Sender>,
    window: usize,
    dead: CancellationToken,
    connected_at: Instant,
) -> Result<(), UpstreamError> {
    let link = Telemetry {
        senders,
        sent_metrics: m::SentCache::default(),
        first: true,
        connected_at,
    };
    let window = delivery::Window {
        messages: window,
        bytes: u64::MAX,
    };
    match delivery::pump(delivery::Upstream::new(core), link, window, &dead).await {
        delivery::Ended::Stopped => Ok(()),
        delivery::Ended::Stalled => Err(UpstreamError::Stalled),
        delivery::Ended::Failed(reason) => Err(UpstreamError::Link {
            what: "telemetry".into(),
            reason,
        }),
    }
}

/// The events links of every identity carried upstream, as the delivery pump's
/// [`delivery::Link`]: each message goes on the link of its origin.
struct Telemetry {
    senders: HashMap<IdentityKey, Sender>,
    sent_metrics: m::SentCache,
    /// No message forwarded yet on this connection.
    first: bool,
    connected_at: Instant,
}

impl delivery::Link for Telemetry {
    async fn send(
        &mut self,
        _: &Endpoint,
        q: &Queued,
        _key: u64,
    ) -> Result<delivery::Sent, String> {
        let Some(tx) = self.senders.get_mut(&q.msg.from.key()) else {
            tracing::error!(origin = %q.msg.from, "message for upstream dropped: its origin is not carried upstream (not this hub's, or refused by the parent)");
            m::dropped(m::DROP_UPSTREAM_UNKNOWN, &q.msg);
            return Ok(delivery::Sent::Dropped);
        };
        let amqp = q.msg.to_upstream_message();
        let sendable = Sendable::builder().message(amqp).settled(false).build();
        let fut = tx
            .send_batchable(sendable)
            .await
            .map_err(|e| format!("sending upstream: {e}"))?;
        Ok(delivery::Sent::InFlight(Box::pin(async move {
            fut.await
                .map(convert::outcome)
                .map_err(|e| format!("delivery upstream failed: {e}"))
        })))
    }

    fn settled(
        &mut self,
        _: &Endpoint,
        q: &Queued,
        outcome: &Result<delivery::Outcome, String>,
        sent: Instant,
    ) {
        match outcome {
            Ok(delivery::Outcome::Accepted) => {
                let elapsed = sent.elapsed().as_secs_f64();
                self.sent_metrics
                    .record(&q.msg, "upstream", "", q.priority, elapsed);
                if std::mem::take(&mut self.first) {
                    info!(
                        after_ms = self.connected_at.elapsed().as_millis() as u64,
                        "upstream: first message forwarded after connecting"
                    );
                }
            }
            Ok(delivery::Outcome::Rejected(why)) => {
                warn!(origin = %q.msg.from, "the parent rejected a message as invalid; dropped: {why}");
                m::dropped(m::DROP_UPSTREAM_REJECTED, &q.msg);
            }
            Ok(delivery::Outcome::Released) | Err(_) => {
                m::retry(&q.msg.from.to_string(), "send_event");
            }
        }
    }

    async fn close(&mut self, _: &delivery::Ended) {
        // Dropping the links ends them; the connection's end is the caller's.
        self.senders.clear();
    }
}

/// One identity's twin links upstream.
struct TwinLink {
    id: Identity,
    tx: Sender,
    rx: Receiver,
    /// The version of the parent's desired properties last applied here.
    last_version: Option<i64>,
    /// Desired patches that arrived while waiting for a response.
    pushes: VecDeque<AmqpMessage<Body<Value>>>,
}

impl TwinLink {
    async fn request(
        &mut self,
        operation: &str,
        resource: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<(i64, Vec<u8>), UpstreamError> {
        let cid = uuid::Uuid::new_v4().to_string();
        let mut ann = MessageAnnotations::builder().insert(
            OwnedKey::Symbol(Symbol::from("operation")),
            Value::String(operation.into()),
        );
        if let Some(r) = resource {
            ann = ann.insert(
                OwnedKey::Symbol(Symbol::from("resource")),
                Value::String(r.into()),
            );
        }
        let msg = AmqpMessage {
            header: None,
            delivery_annotations: None,
            message_annotations: Some(ann.build()),
            properties: Some(Properties {
                correlation_id: Some(MessageId::String(cid.clone())),
                ..Default::default()
            }),
            application_properties: None,
            // A request without content carries a data section of one space, as the Node and C
            // SDKs send it; fe2o3 would encode `Body::Empty` as an `amqp-value` null.
            body: Body::<Value>::Data(
                vec![Data(Binary::from(body.unwrap_or_else(|| b" ".to_vec())))].into(),
            ),
            footer: None,
        };
        let id = self.id.to_string();
        tokio::time::timeout(OP_TIMEOUT, async {
            self.tx
                .send(Sendable::builder().message(msg).settled(true).build())
                .await
                .map_err(|e| UpstreamError::Link {
                    what: format!("twin {operation} for {id}"),
                    reason: e.to_string(),
                })?;
            loop {
                let d = self
                    .rx
                    .recv::<Body<Value>>()
                    .await
                    .map_err(|e| UpstreamError::Link {
                        what: format!("twin response for {id}"),
                        reason: e.to_string(),
                    })?;
                let _ = self.rx.accept(&d).await;
                let msg = d.into_message();
                let matches = msg
                    .properties
                    .as_ref()
                    .and_then(|p| p.correlation_id.as_ref())
                    .is_some_and(|c| *c == MessageId::String(cid.clone()));
                if !matches {
                    self.pushes.push_back(msg);
                    continue;
                }
                let status = convert::annotation(&msg, "status")
                    .and_then(convert::value_int)
                    .unwrap_or(0);
                return Ok((status, convert::body_bytes(&msg.body)));
            }
        })
        .await
        .map_err(|_| {
            UpstreamError::NoResponse(format!("twin {operation} for {}: no response", self.id))
        })?
    }

    /// Reads the parent's twin and returns one of its sections (`desired`, `reported`), empty
    /// when the twin has none.
    async fn twin_section(
        &mut self,
        section: &str,
    ) -> Result<Map<String, serde_json::Value>, UpstreamError> {
        let (status, body) = self.request("GET", None, None).await?;
        if status != 200 {
            return Err(self.refused("twin GET", status));
        }
        let doc: serde_json::Value =
            serde_json::from_slice(&body).map_err(|source| UpstreamError::Decode {
                what: "twin GET",
                identity: self.id.to_string(),
                source,
            })?;
        Ok(doc
            .get(section)
            .and_then(|d| d.as_object())
            .cloned()
            .unwrap_or_default())
    }

    /// Reads the whole twin upstream and makes its desired properties this hub's (a change
    /// reaches the module as a patch through the twin store).
    async fn full_sync(&mut self, core: &HubCore) -> Result<(), UpstreamError> {
        let started = Instant::now();
        let desired = self.twin_section("desired").await?;
        m::twin_get_upstream(&self.id.to_string(), started.elapsed().as_secs_f64());
        let version = desired.get("$version").and_then(|v| v.as_i64());
        self.apply(core, crate::core::twins::strip_meta(desired))
            .await;
        self.last_version = version;
        Ok(())
    }

    /// Reads the parent's twin and returns the patch that makes its reported properties this
    /// hub's (after too many changes piled up to keep them one by one).
    async fn reported_resync(
        &mut self,
        core: &HubCore,
    ) -> Result<crate::core::outbox::Patch, UpstreamError> {
        let parent = self.twin_section("reported").await?;
        info!(identity = %self.id, "reported properties resynchronised with the parent");
        Ok(crate::core::outbox::resync_patch(
            &parent,
            &core.twins.get(&self.id).reported,
        ))
    }

    /// The parent answered `what` with `status`, not a success.
    fn refused(&self, what: &'static str, status: i64) -> UpstreamError {
        UpstreamError::Status {
            what,
            identity: self.id.to_string(),
            status,
        }
    }

    async fn apply(&self, core: &HubCore, desired: Map<String, serde_json::Value>) {
        let own_edge_hub = Identity::Module(
            core.settings.device_id.clone(),
            ModuleId::parse("$edgeHub").expect("$edgeHub is a valid module id"),
        );
        if self.id == own_edge_hub {
            core.apply_edge_hub_twin(&desired);
        }
        match core.twins.set_desired(&self.id, &desired).await {
            Ok(Some(v)) => {
                info!(identity = %self.id, version = v, "desired properties updated from upstream")
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(identity = %self.id, "desired properties from upstream not stored: {e}")
            }
        }
    }

    /// Applies a desired patch pushed by the parent; returns false when a version was missed
    /// (then the caller reads the whole twin).
    async fn apply_push(&mut self, core: &HubCore, msg: &AmqpMessage<Body<Value>>) -> bool {
        let Ok(serde_json::Value::Object(patch)) =
            serde_json::from_slice::<serde_json::Value>(&convert::body_bytes(&msg.body))
        else {
            return false;
        };
        let version = convert::annotation(msg, "version").and_then(convert::value_int);
        match next_desired(self.last_version, version, &patch) {
            Push::Apply(v) => {
                let mut desired = core.twins.get(&self.id).desired;
                crate::core::twins::merge(&mut desired, &crate::core::twins::strip_meta(patch));
                self.apply(core, desired).await;
                self.last_version = Some(v);
                true
            }
            Push::Stale => true,
            Push::Gap => false,
        }
    }
}

/// What to do with a desired patch pushed from upstream.
#[derive(Debug, PartialEq, Eq)]
enum Push {
    /// The next version: merge it in.
    Apply(i64),
    /// Already seen (a duplicate or an older one): ignore it.
    Stale,
    /// A version was missed (or there is none to compare): read the whole twin.
    Gap,
}

/// Decides on a pushed patch from its version (the `version` annotation, else the patch's
/// `$version`) and the last version applied.
fn next_desired(
    last: Option<i64>,
    annotated: Option<i64>,
    patch: &Map<String, serde_json::Value>,
) -> Push {
    let version = annotated.or_else(|| patch.get("$version").and_then(|v| v.as_i64()));
    match (last, version) {
        (Some(last), Some(v)) if v == last + 1 => Push::Apply(v),
        (Some(last), Some(v)) if v <= last => Push::Stale,
        _ => Push::Gap,
    }
}

/// Keeps one identity's twin in step with the parent: subscribes to desired patches, applies
/// them (a version gap reads the whole twin), and sends reported patches as they come.
async fn twin_sync(
    core: Arc<HubCore>,
    mut link: TwinLink,
    dead: CancellationToken,
) -> Result<(), UpstreamError> {
    let label = link.id.to_string();
    let work = async {
        let (status, _) = link
            .request("PUT", Some(DESIRED_NOTIFICATIONS), None)
            .await?;
        if !(200..300).contains(&status) {
            return Err(link.refused("desired subscription", status));
        }
        link.full_sync(&core).await?;
        loop {
            let mut gap = false;
            while let Some(p) = link.pushes.pop_front() {
                gap |= !link.apply_push(&core, &p).await;
            }
            if gap {
                link.full_sync(&core).await?;
                continue;
            }
            let notified = core.outbox.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(pending) = core.outbox.take(&link.id) {
                let resync = pending == crate::core::outbox::Pending::Resync;
                let patch = match pending {
                    crate::core::outbox::Pending::Patch(p) => p,
                    crate::core::outbox::Pending::Resync => match link.reported_resync(&core).await
                    {
                        Ok(p) => p,
                        Err(e) => {
                            core.outbox
                                .put_back(&link.id, crate::core::outbox::Pending::Resync);
                            m::retry(&label, "update_reported_properties");
                            return Err(e);
                        }
                    },
                };
                if patch.is_empty() {
                    continue;
                }
                let back = |patch| match resync {
                    true => crate::core::outbox::Pending::Resync,
                    false => crate::core::outbox::Pending::Patch(patch),
                };
                let started = Instant::now();
                let body = serde_json::Value::Object(patch.clone())
                    .to_string()
                    .into_bytes();
                match link
                    .request("PATCH", Some("/properties/reported"), Some(body))
                    .await
                {
                    Ok((s, _)) if (200..300).contains(&s) => {
                        m::twin_reported_upstream(&label, started.elapsed().as_secs_f64());
                    }
                    Ok((s, b)) if (400..500).contains(&s) => {
                        warn!(identity = %label, status = s, "the parent refused a reported patch; dropped: {}", String::from_utf8_lossy(&b));
                    }
                    Ok((s, _)) => {
                        core.outbox.put_back(&link.id, back(patch));
                        m::retry(&label, "update_reported_properties");
                        return Err(link.refused("reported patch", s));
                    }
                    Err(e) => {
                        core.outbox.put_back(&link.id, back(patch));
                        m::retry(&label, "update_reported_properties");
                        return Err(e);
                    }
                }
                continue;
            }
            tokio::select! {
                _ = &mut notified => {}
                d = link.rx.recv::<Body<Value>>() => {
                    let d = d.map_err(|e| UpstreamError::Link {
                        what: format!("twin link of {label}"),
                        reason: e.to_string(),
                    })?;
                    let _ = link.rx.accept(&d).await;
                    link.pushes.push_back(d.into_message());
                }
            }
        }
    };
    tokio::select! {
        _ = dead.cancelled() => Ok(()),
        r = work => r,
    }
}

/// Serves calls from upstream to one identity through the method dispatcher; each answer
/// carries the module's status (404 when it has no method link, 504 when it does not answer).
async fn methods(
    core: Arc<HubCore>,
    id: Identity,
    mut rx: Receiver,
    mut tx: Sender,
    dead: CancellationToken,
) -> Result<(), UpstreamError> {
    // An answer, and the identities to refresh once it is sent (the refresh method: a refresh
    // that changes the scope reconnects the upstream, which would lose the answer).
    type Answer = (MessageId, i32, Vec<u8>, Vec<Identity>);
    let (answers, mut answered) = tokio::sync::mpsc::channel::<Answer>(64);
    loop {
        tokio::select! {
            _ = dead.cancelled() => return Ok(()),
            d = rx.recv::<Body<Value>>() => {
                let d = d.map_err(|e| UpstreamError::Link { what: format!("method link of {id}"), reason: e.to_string() })?;
                let _ = rx.accept(&d).await;
                let msg = d.into_message();
                let Some(cid) = msg.properties.as_ref().and_then(|p| p.correlation_id.clone()) else {
                    debug!(identity = %id, "method call without a correlation id ignored");
                    continue;
                };
                let name = match msg.application_properties.as_ref().and_then(|a| a.0.get("IoThub-methodname")) {
                    Some(SimpleValue::String(s)) => s.clone(),
                    _ => String::new(),
                };
                let payload = convert::body_bytes(&msg.body);
                let core = core.clone();
                let target = id.clone();
                let answers = answers.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    // edgeHub's own method: the cloud (or a parent) changed the device scope.
                    let own_refresh = name.eq_ignore_ascii_case(REFRESH_METHOD)
                        && target.device() == &core.settings.device_id
                        && target.module().is_some_and(|m| m.as_str().eq_ignore_ascii_case("$edgeHub"));
                    let mut refresh = Vec::new();
                    let (status, body) = if own_refresh && core.auth.scope().is_some() {
                        match crate::core::scope::parse_refresh_request(&payload) {
                            Ok(ids) => {
                                refresh = ids;
                                (200, b"null".to_vec())
                            }
                            Err(why) => (400, error_json(&why)),
                        }
                    } else { match core.methods.invoke(&target, &name, payload, METHOD_TIMEOUT, Duration::ZERO).await {
                        Ok(r) => (r.status, r.payload),
                        Err(e @ crate::core::methods::MethodError::NotConnected(_)) => (404, error_json(&e.to_string())),
                        Err(e) => (504, error_json(&e.to_string())),
                    } };
                    m::direct_method("upstream", &target.to_string(), started.elapsed().as_secs_f64());
                    let _ = answers.send((cid, status, body, refresh)).await;
                });
            }
            Some((cid, status, body, refresh)) = answered.recv() => {
                let msg = AmqpMessage {
                    header: None,
                    delivery_annotations: None,
                    message_annotations: None,
                    properties: Some(Properties { correlation_id: Some(cid), ..Default::default() }),
                    application_properties: Some(ApplicationProperties::builder().insert("IoThub-status", status).build()),
                    body: Body::<Value>::Data(vec![Data(Binary::from(body))].into()),
                    footer: None,
                };
                tokio::time::timeout(SEND_WAIT, tx.send(Sendable::builder().message(msg).settled(true).build()))
                    .await
                    .map_err(|_| UpstreamError::NoResponse(format!("no credit for a method response of {id}")))?
                    .map_err(|e| UpstreamError::Link { what: format!("method response of {id}"), reason: e.to_string() })?;
                if let (false, Some(scope)) = (refresh.is_empty(), core.auth.scope().cloned()) {
                    tokio::spawn(async move { scope.refresh_ids(&refresh).await });
                }
            }
        }
    }
}

/// The direct method on `$edgeHub` that refreshes identities of the device scope.
const REFRESH_METHOD: &str = "RefreshDeviceScopeIdentityCache";

fn error_json(message: &str) -> Vec<u8> {
    serde_json::json!({ "message": message })
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: serde_json::Value) -> crate::core::outbox::Patch {
        v.as_object().cloned().unwrap()
    }

    fn module(m: &str) -> Identity {
        Identity::Module(
            crate::model::identity::DeviceId::parse("d").unwrap(),
            ModuleId::parse(m).unwrap(),
        )
    }

    #[test]
    fn jitter_stays_between_half_and_whole() {
        let d = Duration::from_millis(800);
        for _ in 0..200 {
            let j = jitter(d);
            assert!(j >= d / 2 && j <= d, "{j:?}");
        }
    }

    #[test]
    fn desired_metadata_is_stripped() {
        let m =
            crate::core::twins::strip_meta(obj(json!({"$version": 3, "$metadata": {}, "a": 1})));
        assert_eq!(m, obj(json!({"a": 1})));
    }

    #[test]
    fn desired_pushes_apply_in_order_and_a_gap_reads_the_twin() {
        let p = obj(json!({"a": 1, "$version": 5}));
        assert_eq!(next_desired(Some(4), None, &p), Push::Apply(5));
        assert_eq!(
            next_desired(Some(4), Some(5), &obj(json!({}))),
            Push::Apply(5)
        );
        assert_eq!(next_desired(Some(5), None, &p), Push::Stale);
        assert_eq!(next_desired(Some(7), None, &p), Push::Stale);
        assert_eq!(next_desired(Some(3), None, &p), Push::Gap);
        assert_eq!(next_desired(None, None, &p), Push::Gap);
        assert_eq!(
            next_desired(Some(4), None, &obj(json!({"a": 1}))),
            Push::Gap
        );
    }

    #[test]
    fn identity_paths_are_encoded() {
        assert_eq!(
            id_path(&module("$edgeHub")),
            "/devices/d/modules/%24edgeHub"
        );
    }
}
