//! The AMQP 1.0 listener: TLS, protocol-header sniffing, SASL, connections, sessions and the
//! dispatch of each link attach to its task.
//!
//! One task per connection accepts sessions; one task per session accepts links; one task per
//! link moves messages. Every link is authorised at attach from its address (the identity) and
//! the tokens this connection has put on `$cbs` (or its SASL PLAIN identity).
//!
//! Until a connection authenticates it is pending: it may hold only `$cbs` links and little
//! buffered data (see `tags::Guard`), it must authenticate within `limits.authTimeoutSecs`, and
//! a newer connection may evict it when the pending queue or every slot is full. Every wait for
//! a peer's detach, end or close is bounded, so a silent peer holds no task.

mod c2d;
pub mod cbs;
pub mod cbs_client;
pub(crate) mod convert;
mod eventhubs;
mod full;
mod links;
mod service;
pub(crate) mod tags;

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use fe2o3_amqp::{
    acceptor::{
        sasl_acceptor::SaslServerFrame, ConnectionAcceptor, LinkAcceptor, LinkEndpoint,
        ListenerConnectionHandle, ListenerSessionHandle, SaslAcceptor, SessionAcceptor,
    },
    types::{
        definitions::{AmqpError, Error as AmqpErrorBody, ErrorCondition, Role},
        messaging::TargetArchetype,
        primitives::{Array, Symbol},
        sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse},
    },
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpListener,
    sync::{mpsc, Semaphore},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::{
    core::HubCore,
    metrics as m,
    model::address::{classify, AddressError, ClientRole, LinkKind},
    model::identity::{Identity, IdentityKey},
    model::sas::now_secs,
};

/// An AMQP error with a condition and a description.
pub(crate) fn amqp_error(
    condition: impl Into<ErrorCondition>,
    description: impl Into<String>,
) -> AmqpErrorBody {
    AmqpErrorBody::new(condition, Some(description.into()), None)
}

pub(crate) fn custom_condition(name: &str) -> ErrorCondition {
    ErrorCondition::Custom(Symbol::from(name))
}

pub(crate) use crate::model::clip;

/// Bound on waiting for the peer's answer to a detach, end or close the hub sent: a peer
/// that stops answering holds no task beyond it.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// How long a put-token reply waits for the `$cbs` response link to attach.
const CBS_REPLY_WAIT: Duration = Duration::from_secs(10);
/// Put-token replies held for a response link that has not attached yet.
const CBS_REPLY_QUEUE: usize = 16;

/// An identity proven on a connection: the token's expiry, and what stops that identity's links.
struct Grant {
    id: Identity,
    expiry: u64,
    links: links::LinkStop,
    /// Its registration as the identity's live connection (`HubCore::claim_connection`).
    generation: u64,
}

/// What one connection has proven: identities with a valid token, and their expiry.
pub(crate) struct ConnState {
    authorized: Mutex<HashMap<IdentityKey, Grant>>,
    /// Cancelled when the connection ends (or is evicted while pending); every link's stop
    /// signal descends from it.
    root: CancellationToken,
    /// Put-token replies: the sender side, and the receiver until a response link takes it.
    /// Replies put before the response link attaches wait here (bounded) for it. Made on the
    /// first `$cbs` use: a connection that authenticates by SASL PLAIN never needs it, and a
    /// tokio channel holds a block of 32 slots (about 5 KB here) from its creation on.
    cbs_replies: Mutex<Option<CbsReplies>>,
    /// Set by the first valid token or SASL PLAIN identity; read by the frame guard.
    authenticated: Arc<AtomicBool>,
    /// This connection's place among the pending ones, until it authenticates.
    pending: Mutex<Option<PendingTicket>>,
    /// The error the connection closes with, when the hub closes it for a reason of its own.
    close_reason: Arc<Mutex<Option<AmqpErrorBody>>>,
    /// `$cbs` links attached: (request links, response links).
    cbs_links: Mutex<(usize, usize)>,
    /// Sessions the frame guard found broken by the peer.
    faults: Arc<tags::SessionFaults>,
    /// What the client's TLS certificate proved (`None`: it sent none).
    x509: Mutex<Option<crate::ops::x509::Presented>>,
    /// The registry's revocation epoch this connection has acted on; taken when the connection
    /// is admitted, before it can authenticate anything, so no revocation slips between.
    revocations_seen: std::sync::atomic::AtomicU64,
    /// The stop signal of the links that belong to no identity (`$cbs`): they end with the
    /// connection, with the error it closes with.
    others: links::LinkStop,
    /// Woken when an identity is newly granted, so that the grant watcher sleeps until the
    /// earliest expiry instead of ticking.
    granted: tokio::sync::Notify,
    /// Service-policy grants for the Event Hubs-compatible endpoint, and its readers.
    services: eventhubs::ServiceGrants,
}

struct CbsReplies {
    tx: mpsc::Sender<(tokio::time::Instant, cbs::CbsReply)>,
    rx: Option<mpsc::Receiver<(tokio::time::Instant, cbs::CbsReply)>>,
}

impl CbsReplies {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel(CBS_REPLY_QUEUE);
        Self { tx, rx: Some(rx) }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ConnState {
    fn new(root: CancellationToken, revocations_seen: u64) -> Self {
        Self {
            revocations_seen: std::sync::atomic::AtomicU64::new(revocations_seen),
            others: links::LinkStop::new(root.child_token()),
            authorized: Mutex::new(HashMap::new()),
            root,
            cbs_replies: Mutex::new(None),
            authenticated: Arc::new(AtomicBool::new(false)),
            pending: Mutex::new(None),
            close_reason: Arc::default(),
            cbs_links: Mutex::new((0, 0)),
            faults: Arc::default(),
            x509: Mutex::new(None),
            granted: tokio::sync::Notify::new(),
            services: Default::default(),
        }
    }

    /// Records a verified service-policy token (a renewal moves its expiry); `false` when the
    /// connection holds its maximum of grants. A token for the whole hub (IoT Hub's service
    /// token, `sr = {host}`, or `sb://{host}/`) gives the connection the service role
    /// ([`ConnState::is_service`]); one for an entity path (`sb://{host}/{eventHub}…`) only
    /// the Event Hubs links under that path.
    fn grant_service(&self, g: &cbs::ServiceGrant) -> bool {
        if !self.services.grant(&self.root, g.scope.clone(), g.expiry) {
            return false;
        }
        self.authenticated.store(true, Ordering::Relaxed);
        drop(lock(&self.pending).take());
        // The grant watcher sleeps until the earliest expiry: this one may be earlier.
        self.granted.notify_one();
        true
    }

    /// Does this connection hold an unexpired service token for the whole hub?
    pub fn is_service(&self, now: u64) -> bool {
        self.services.whole_hub(now)
    }

    /// Records what the client's certificate proved: an identity is granted until the
    /// certificate expires, as a token would be; a certificate that matches nothing grants
    /// nothing (the connection may still put a token).
    fn presented(self: &Arc<Self>, core: &HubCore, presented: Option<crate::ops::x509::Presented>) {
        match &presented {
            Some(crate::ops::x509::Presented::Identity { id, not_after }) => {
                debug!(identity = %id, "authenticated by its client certificate");
                self.grant(core, id, *not_after);
            }
            Some(crate::ops::x509::Presented::Unmatched(why)) => {
                info!("client certificate not accepted: {why}");
                m::connect_failed("unknown", "certificate_not_accepted");
            }
            None => {}
        }
        *lock(&self.x509) = presented;
    }

    fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Relaxed)
    }

    /// Closes the connection with `error`.
    fn close_with(&self, error: AmqpErrorBody) {
        // The links of no identity detach with the same error, so a client that reads the
        // first error it gets (the Node SDK) sees why.
        self.others.stop_with(error.clone());
        lock(&self.close_reason).get_or_insert(error);
        self.root.cancel();
    }

    /// Counts a new `$cbs` link of a role; `None` when the connection holds its maximum of
    /// them before authenticating. The guard uncounts it.
    fn cbs_link(self: &Arc<Self>, request: bool) -> Option<CbsLinkGuard> {
        let mut n = lock(&self.cbs_links);
        let slot = if request { &mut n.0 } else { &mut n.1 };
        if *slot >= MAX_CBS_LINKS_PER_ROLE && !self.is_authenticated() {
            return None;
        }
        *slot += 1;
        Some(CbsLinkGuard {
            conn: self.clone(),
            request,
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<IdentityKey, Grant>> {
        self.authorized.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a verified identity (a renewal moves its expiry); returns true when it is new on
    /// this connection.
    pub fn authorize(&self, id: Identity, expiry: u64) -> bool {
        self.authenticated.store(true, Ordering::Relaxed);
        // Authenticated: no longer counted among the pending connections.
        drop(lock(&self.pending).take());
        let key = id.key();
        let mut map = self.map();
        match map.get_mut(&key) {
            Some(g) => {
                g.expiry = g.expiry.max(expiry);
                false
            }
            None => {
                let links = links::LinkStop::new(self.root.child_token());
                map.insert(
                    key,
                    Grant {
                        id,
                        expiry,
                        links,
                        generation: 0,
                    },
                );
                self.granted.notify_one();
                true
            }
        }
    }

    /// Records a verified identity (see `authorize`). One new on this connection is counted as
    /// connected and becomes the identity's live connection hub-wide: the connection that had
    /// it (AMQP or MQTT) loses it, and this one loses it in turn to a newer one ([`Self::evicted`]).
    pub fn grant(self: &Arc<Self>, core: &HubCore, id: &Identity, expiry: u64) {
        if !self.authorize(id.clone(), expiry) {
            return;
        }
        core.client_connected(id);
        let (conn, who) = (Arc::downgrade(self), id.clone());
        let generation = core.claim_connection(
            id,
            Box::new(move |core| {
                if let Some(conn) = conn.upgrade() {
                    conn.evicted(core, &who);
                }
            }),
        );
        if let Some(g) = self.map().get_mut(&id.key()) {
            g.generation = generation;
        }
    }

    /// A newer connection of `id` took over: its links here detach with `amqp:link:stolen`, and
    /// a connection left with no identity (and no service grant) closes with
    /// `amqp:connection:forced` (as edgeHub closes the AMQP connection whose last identity goes).
    fn evicted(&self, core: &HubCore, id: &Identity) {
        let (grant, empty) = {
            let mut map = self.map();
            let g = map.remove(&id.key());
            (g, map.is_empty() && self.services.is_empty())
        };
        let Some(grant) = grant else { return };
        let why = "a newer connection of this identity replaced this one";
        grant.links.stop_with(amqp_error(
            fe2o3_amqp::types::definitions::LinkError::Stolen,
            why,
        ));
        core.client_disconnected(id);
        if empty {
            self.close_with(amqp_error(
                fe2o3_amqp::types::definitions::ConnectionError::ConnectionForced,
                why,
            ));
        }
    }

    /// Ends every identity of a closing connection: each leaves the connected clients and,
    /// unless a newer connection took it over, the live connections.
    fn release_all(&self, core: &HubCore) {
        let grants: Vec<Grant> = self.map().drain().map(|(_, g)| g).collect();
        for g in grants {
            core.client_disconnected(&g.id);
            core.release_connection(&g.id, g.generation);
        }
    }

    /// Does this connection hold an unexpired token for `id`?
    pub fn is_authorized(&self, id: &Identity, now: u64) -> bool {
        let key = id.key();
        self.map().get(&key).is_some_and(|g| {
            g.expiry
                .saturating_add(crate::model::sas::MAX_CLOCK_SKEW_SECS)
                >= now
        })
    }

    /// The stop signal of a new link of `id` (ends with the identity's grant).
    fn link_stop(&self, id: &Identity) -> Option<links::LinkStop> {
        let key = id.key();
        self.map().get(&key).map(|g| g.links.child())
    }

    /// How long from `now` (Unix seconds) until the earliest grant can have expired (beyond
    /// the clock skew), at most [`GRANT_CHECK_MAX`]; `None` when the connection holds no grant.
    fn next_expiry_check(&self, now: u64) -> Option<Duration> {
        let identities = self.map().values().map(|g| g.expiry).min();
        let earliest = match (identities, self.services.earliest_expiry()) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        let due = earliest
            .saturating_add(crate::model::sas::MAX_CLOCK_SKEW_SECS)
            .saturating_add(1);
        Some(Duration::from_secs(due.saturating_sub(now)).min(GRANT_CHECK_MAX))
    }

    /// Ends the grants whose token expired (beyond the clock skew) without a renewal: their
    /// links are closed with `amqp:unauthorized-access`. Returns the identities that expired.
    fn expire(&self, now: u64) -> Vec<(Identity, u64)> {
        let mut map = self.map();
        let gone: Vec<IdentityKey> = map
            .iter()
            .filter(|(_, g)| {
                g.expiry
                    .saturating_add(crate::model::sas::MAX_CLOCK_SKEW_SECS)
                    < now
            })
            .map(|(k, _)| k.clone())
            .collect();
        gone.iter()
            .filter_map(|k| map.remove(k))
            .map(|g| {
                let why = format!(
                    "the token for {} has expired; put a new token and reattach",
                    g.id
                );
                g.links
                    .stop_with(amqp_error(AmqpError::UnauthorizedAccess, why));
                (g.id, g.generation)
            })
            .collect()
    }

    /// Ends the grants of identities the registry revoked (deleted, disabled, new credentials):
    /// their links are closed with `amqp:unauthorized-access`, and the connection too when it
    /// holds no other identity. Returns the identities that lost their grant.
    fn revoke(
        &self,
        which: &crate::core::registry::Revoked,
        auth: &crate::core::auth::Authenticator,
    ) -> Vec<Identity> {
        use crate::core::registry::Revoked;
        let mut map = self.map();
        // A child hub's `$edgeHub` revoked: what it put tokens for on this connection (its
        // modules, the leaf devices under its scope) goes with it.
        let edge_hub_gone = matches!(which, Revoked::Keys(keys) if map.iter().any(|(k, g)| {
            keys.contains(k)
                && matches!(&g.id, Identity::Module(_, m) if m.as_str().eq_ignore_ascii_case("$edgeHub"))
        }));
        let gone: Vec<IdentityKey> = map
            .iter()
            .filter(|(k, g)| {
                edge_hub_gone
                    || match which {
                        // A module granted on behalf goes with its device (a child edge hub's).
                        Revoked::Keys(keys) => {
                            keys.contains(k)
                                || matches!(&g.id, Identity::Module(d, _)
                            if keys.contains(&IdentityKey::from(d)) && !auth.is_active(&g.id))
                        }
                        Revoked::Unknown => !auth.is_active(&g.id),
                    }
            })
            .map(|(k, _)| k.clone())
            .collect();
        let ids: Vec<Identity> = gone
            .iter()
            .filter_map(|k| map.remove(k))
            .map(|g| {
                let why = format!(
                    "{} was disabled, deleted or given new credentials (registry or device scope)",
                    g.id
                );
                g.links
                    .stop_with(amqp_error(AmqpError::UnauthorizedAccess, why));
                g.id
            })
            .collect();
        let emptied = !ids.is_empty() && map.is_empty();
        drop(map);
        if emptied {
            self.close_with(amqp_error(
                AmqpError::UnauthorizedAccess,
                "the identity of this connection was disabled, deleted or given new credentials",
            ));
        }
        ids
    }

    /// Makes a new `$cbs` response link the one replies go to: the first one takes the
    /// replies queued before it attached; a later one takes over and the older one ends.
    pub fn take_cbs_replies(&self) -> mpsc::Receiver<(tokio::time::Instant, cbs::CbsReply)> {
        let mut r = lock(&self.cbs_replies);
        let r = r.get_or_insert_with(CbsReplies::new);
        match r.rx.take() {
            Some(rx) => rx,
            None => {
                let (tx, rx) = mpsc::channel(CBS_REPLY_QUEUE);
                r.tx = tx;
                rx
            }
        }
    }

    /// Queues a put-token reply for the response link (attached or still to come); it waits
    /// at most [`CBS_REPLY_WAIT`] for room and for the link.
    pub async fn send_cbs_reply(&self, reply: cbs::CbsReply) -> bool {
        let tx = lock(&self.cbs_replies)
            .get_or_insert_with(CbsReplies::new)
            .tx
            .clone();
        let deadline = tokio::time::Instant::now() + CBS_REPLY_WAIT;
        matches!(
            tokio::time::timeout_at(deadline, tx.send((deadline, reply))).await,
            Ok(Ok(()))
        )
    }
}

/// `$cbs` links of each role a connection may hold before it authenticates.
const MAX_CBS_LINKS_PER_ROLE: usize = 2;

/// Uncounts a `$cbs` link when its task ends.
struct CbsLinkGuard {
    conn: Arc<ConnState>,
    request: bool,
}

impl Drop for CbsLinkGuard {
    fn drop(&mut self) {
        let mut n = lock(&self.conn.cbs_links);
        let slot = if self.request { &mut n.0 } else { &mut n.1 };
        *slot = slot.saturating_sub(1);
    }
}

/// The connections still in their TLS, AMQP or authentication handshake, oldest first. When
/// it is full, a new connection evicts the oldest: a peer that never authenticates can hold
/// at most this many slots, and only until newer connections push it out.
struct Pending {
    cap: usize,
    queue: Mutex<std::collections::VecDeque<(u64, Stop)>>,
    next: std::sync::atomic::AtomicU64,
}

/// How a pending connection is ended: its token, and where the reason goes.
#[derive(Clone, Default)]
struct Stop {
    token: CancellationToken,
    reason: Arc<Mutex<Option<AmqpErrorBody>>>,
}

impl Stop {
    fn evict(&self) {
        lock(&self.reason).get_or_insert_with(|| {
            amqp_error(
                AmqpError::ResourceLimitExceeded,
                "too many connections are waiting to authenticate; this, the oldest, is closed",
            )
        });
        self.token.cancel();
    }
}

/// A connection's place in [`Pending`]; dropping it (authenticated or gone) frees it.
struct PendingTicket {
    pending: Arc<Pending>,
    id: u64,
}

impl Drop for PendingTicket {
    fn drop(&mut self) {
        lock(&self.pending.queue).retain(|(id, _)| *id != self.id);
    }
}

impl Pending {
    fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            queue: Mutex::new(std::collections::VecDeque::new()),
            next: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Registers a connection whose `stop` ends it; evicts the oldest when full.
    fn admit(self: &Arc<Self>, stop: Stop) -> PendingTicket {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut q = lock(&self.queue);
        while q.len() >= self.cap {
            if let Some((_, oldest)) = q.pop_front() {
                debug!("pending connections at their limit; closing the oldest");
                oldest.evict();
            }
        }
        q.push_back((id, stop));
        PendingTicket {
            pending: self.clone(),
            id,
        }
    }

    /// Ends the oldest pending connection; false when there is none.
    fn evict_oldest(&self) -> bool {
        match lock(&self.queue).pop_front() {
            Some((_, stop)) => {
                stop.evict();
                true
            }
            None => false,
        }
    }
}

/// How long a new connection waits for the slot of a pending one it evicted.
const EVICTION_WAIT: Duration = Duration::from_secs(2);

/// Admission to the AMQP connection slots, shared by every way a connection arrives (AMQPS on
/// `listen.amqps`, AMQP over WebSockets on `listen.https`): one `maxConnections` semaphore and
/// one queue of pending connections, so both transports count against the same limits.
pub struct Gate {
    core: Arc<HubCore>,
    permits: Arc<Semaphore>,
    pending: Arc<Pending>,
    shutdown: CancellationToken,
    /// The devices that authenticate with a client certificate.
    x509: Arc<crate::ops::x509::Matcher>,
}

/// A connection let in by [`Gate::admit`]: pending until it authenticates. Its slot is
/// taken, or freed by the eviction of a pending connection and waited for in [`Gate::run`].
pub(crate) struct Admitted {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    conn: Arc<ConnState>,
}

impl Gate {
    pub fn new(
        core: Arc<HubCore>,
        shutdown: CancellationToken,
        x509: Arc<crate::ops::x509::Matcher>,
    ) -> Arc<Self> {
        Arc::new(Self {
            x509,
            permits: Arc::new(Semaphore::new(core.settings.limits.max_connections)),
            pending: Pending::new(core.settings.limits.max_pending_connections),
            core,
            shutdown,
        })
    }

    pub(crate) fn core(&self) -> &Arc<HubCore> {
        &self.core
    }

    /// What the client of a TLS connection proved with its certificate (`None`: it sent none).
    pub(crate) fn identify(
        &self,
        tls: &rustls::ServerConnection,
    ) -> Option<crate::ops::x509::Presented> {
        // The registry's certificate devices too, read only when a certificate came.
        crate::ops::x509::presented(&self.x509, tls, || self.core.auth.live_x509())
    }

    /// Lets a new connection in, or `None` when every slot is held by an authenticated one.
    pub(crate) fn admit(&self, peer: SocketAddr) -> Option<Admitted> {
        // Every slot taken: a connection that has not authenticated makes room, since slots
        // are for clients that authenticate.
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) if self.pending.evict_oldest() => None,
            Err(_) => {
                warn!(%peer, limit = self.core.settings.limits.max_connections, "connection limit reached; closing");
                return None;
            }
        };
        // Pending from now on, until it authenticates.
        let conn = Arc::new(ConnState::new(
            self.shutdown.child_token(),
            self.core.registry.revocations.epoch(),
        ));
        *lock(&conn.pending) = Some(self.pending.admit(Stop {
            token: conn.root.clone(),
            reason: conn.close_reason.clone(),
        }));
        Some(Admitted { permit, conn })
    }

    /// Serves an admitted connection to its end: `handshake` (TLS for AMQPS; nothing for a
    /// WebSocket, whose TLS and upgrade are done) gives the byte stream and what the client's
    /// certificate proved, then the AMQP header, open, sessions and links follow. The
    /// handshake and the AMQP open share one deadline (`limits.handshakeTimeoutSecs`).
    /// `protocol` labels the connection in `edgehub_open_connections`.
    pub(crate) async fn run<S>(
        &self,
        admitted: Admitted,
        protocol: &'static str,
        handshake: crate::servers::Handshake<S>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug + 'static,
    {
        let Admitted { permit, conn } = admitted;
        let permit = match permit {
            Some(p) => p,
            None => match tokio::time::timeout(EVICTION_WAIT, self.permits.clone().acquire_owned())
                .await
            {
                Ok(Ok(p)) => p,
                _ => return,
            },
        };
        m::open_connections(protocol, 1.0);
        handle_stream(handshake, self.core.clone(), conn).await;
        m::open_connections(protocol, -1.0);
        drop(permit);
    }
}

/// Accepts connections until `shutdown`, then waits for every connection task.
pub async fn serve(listener: TcpListener, tls: TlsAcceptor, gate: Arc<Gate>) {
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = gate.shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(admitted) = gate.admit(peer) else {
            drop(tcp);
            continue;
        };
        let (tls, gate) = (tls.clone(), gate.clone());
        tracker.spawn(
            async move {
                let _ = tcp.set_nodelay(true);
                let identify = gate.clone();
                let handshake: crate::servers::Handshake<_> = Box::pin(async move {
                    let stream = tls.accept(tcp).await?;
                    let presented = identify.identify(stream.get_ref().1);
                    Ok((stream, presented))
                });
                gate.run(admitted, m::PROTOCOL_AMQP, handshake).await;
            }
            .instrument(info_span!("conn", %peer)),
        );
    }
    tracker.close();
    tracker.wait().await;
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("reading the protocol header: {0}")]
    Header(std::io::Error),
    #[error("unsupported protocol header {0:?}")]
    BadHeader([u8; 8]),
    #[error("AMQP open: {0}")]
    Open(#[from] fe2o3_amqp::connection::OpenError),
    #[error("handshake timed out")]
    Timeout,
}

async fn handle_stream<S>(
    handshake: crate::servers::Handshake<S>,
    core: Arc<HubCore>,
    conn: Arc<ConnState>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + std::fmt::Debug + 'static,
{
    let limits = &core.settings.limits;
    let deadline = Duration::from_secs(limits.handshake_timeout_secs);
    let channel_max = channel_max(limits.max_sessions_per_connection);
    let guard = tags::Limits {
        max_frame_size: MAX_FRAME_SIZE,
        channel_max,
        max_handles_per_session: limits.max_links_per_session.saturating_mul(2),
        incomplete_budget: limits
            .max_incomplete_bytes_per_connection
            .max(limits.max_message_size),
        max_message_size: limits.max_message_size,
        authenticated: conn.authenticated.clone(),
        faults: conn.faults.clone(),
    };
    let idle_ms = u32::try_from(limits.idle_timeout_secs.saturating_mul(1000)).unwrap_or(u32::MAX);
    // Boxed: the TLS, SASL and open futures are large and live only until the open, while
    // this task lives as long as the connection.
    let handshake = Box::pin(async {
        let (mut stream, presented) = handshake.await.map_err(HandshakeError::Tls)?;
        conn.presented(&core, presented);
        let mut header = [0u8; 8];
        stream
            .read_exact(&mut header)
            .await
            .map_err(HandshakeError::Header)?;
        if &header[..4] != b"AMQP"
            || header[5..] != [1, 0, 0]
            || !(header[4] == 0 || header[4] == 3)
        {
            // Tell the peer what we speak, then close (AMQP 1.0 §2.2).
            let _ = stream.write_all(b"AMQP\x00\x01\x00\x00").await;
            return Err(HandshakeError::BadHeader(header));
        }
        let stream = tags::WideTags::new(Replay::new(header, stream), guard);
        let builder = ConnectionAcceptor::builder()
            .container_id("edgehub")
            .max_frame_size(MAX_FRAME_SIZE)
            .channel_max(channel_max);
        // fe2o3 closes a connection that sends nothing for the idle-time-out it announced.
        let builder = match idle_ms {
            0 => builder,
            ms => builder.idle_time_out(ms),
        };
        let handle = if header[4] == 3 {
            let sasl = HubSasl {
                core: core.clone(),
                conn: conn.clone(),
            };
            builder.sasl_acceptor(sasl).build().accept(stream).await?
        } else {
            builder.build().accept(stream).await?
        };
        Ok::<_, HandshakeError>(handle)
    });
    let handshake = tokio::select! {
        // Shutdown (or an eviction) does not wait for handshakes in progress.
        _ = conn.root.cancelled() => None,
        h = tokio::time::timeout(deadline, handshake) => Some(h),
    };
    let handle = match handshake {
        Some(Ok(Ok(h))) => Some(h),
        Some(Ok(Err(e))) => {
            debug!(error = %e, "handshake failed");
            None
        }
        Some(Err(_)) => {
            debug!(error = %HandshakeError::Timeout, "handshake failed");
            None
        }
        None => None,
    };
    let Some(handle) = handle else {
        // An identity proven inside the handshake (SASL PLAIN) leaves with it.
        conn.release_all(&core);
        return;
    };
    debug!("connection open");
    run_connection(handle, conn.clone(), core.clone()).await;
    drop(lock(&conn.pending).take());
    conn.release_all(&core);
    debug!("connection closed");
}

/// The max-frame-size the hub announces.
const MAX_FRAME_SIZE: u32 = 256 * 1024;

/// The channel-max announced for a cap on sessions per connection.
fn channel_max(sessions: usize) -> u16 {
    u16::try_from(sessions.saturating_sub(1)).unwrap_or(u16::MAX)
}

async fn run_connection(
    mut handle: ListenerConnectionHandle,
    conn: Arc<ConnState>,
    core: Arc<HubCore>,
) {
    let cancel = conn.root.clone();
    let tracker = TaskTracker::new();
    tracker.spawn(watch_grants(
        conn.clone(),
        core.clone(),
        Duration::from_secs(core.settings.limits.auth_timeout_secs),
    ));
    let handle_max = u32::try_from(core.settings.limits.max_links_per_session.saturating_sub(1))
        .unwrap_or(u32::MAX);
    let session_acceptor = SessionAcceptor::builder()
        .incoming_window(4096)
        .outgoing_window(4096)
        .handle_max(handle_max)
        .build();
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            s = handle.next_incoming_session() => s,
        };
        let Some(incoming) = incoming else { break };
        let fault = conn.faults.signal(incoming.channel);
        // Boxed, as the attach below: a transient future kept out of the long-lived task.
        match Box::pin(session_acceptor.accept_incoming_session(incoming, &mut handle)).await {
            Ok(session) => {
                let (conn, core, cancel) = (conn.clone(), core.clone(), cancel.clone());
                tracker.spawn(run_session(session, conn, core, cancel, fault).in_current_span());
            }
            Err(e) => {
                debug!(error = %e, "session begin failed");
                break;
            }
        }
    }
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    let reason = lock(&conn.close_reason).take();
    // The peer's close is awaited only so long: a silent peer does not hold the task.
    let _ = match reason {
        Some(e) => tokio::time::timeout(CLOSE_WAIT, handle.close_with_error(e)).await,
        None => tokio::time::timeout(CLOSE_WAIT, handle.close()).await,
    };
}

/// The longest the grant watcher sleeps between two looks at the wall clock: token expiries
/// are wall-clock times, and a clock that steps forward is caught up with within this.
const GRANT_CHECK_MAX: Duration = Duration::from_secs(60);

/// One task per connection for its grants, woken only when something can change:
/// closes a connection that holds no valid token `auth_after` its open; closes the links of
/// identities whose token expired and was not renewed (idle links too, not only those that
/// send), as edgeHub disconnects expired clients, at the earliest expiry rather than on a
/// periodic tick; and ends, at once, the grants of identities the registry revokes.
async fn watch_grants(conn: Arc<ConnState>, core: Arc<HubCore>, auth_after: Duration) {
    let cancel = conn.root.clone();
    let auth_deadline = tokio::time::sleep(auth_after);
    tokio::pin!(auth_deadline);
    let mut auth_pending = true;
    let mut revoked = core.registry.revocations.watch();
    loop {
        // Revocations since the connection was admitted are looked at before the first wait.
        let seen = conn.revocations_seen.load(Ordering::Relaxed);
        let (now, which) = core.registry.revocations.since(seen);
        if now != seen {
            conn.revocations_seen.store(now, Ordering::Relaxed);
            for id in conn.revoke(&which, &core.auth) {
                info!(identity = %id, "identity revoked (registry or device scope); its links are closed");
                core.client_disconnected(&id);
            }
        }
        let next = conn.next_expiry_check(now_secs());
        let expiry = tokio::time::sleep(next.unwrap_or(GRANT_CHECK_MAX));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = &mut auth_deadline, if auth_pending => {
                auth_pending = false;
                if !conn.is_authenticated() {
                    debug!(secs = auth_after.as_secs(), "no valid token in time; closing the connection");
                    conn.close_with(amqp_error(
                        AmqpError::UnauthorizedAccess,
                        format!("no valid token was put within {} s of the open", auth_after.as_secs()),
                    ));
                }
            }
            _ = expiry, if next.is_some() => {}
            // A new grant may expire before the one slept for.
            _ = conn.granted.notified() => {}
            // The sender lives in the core, which this task holds: `changed` cannot fail.
            _ = revoked.changed() => {}
        }
        conn.services.expire(now_secs());
        for (id, generation) in conn.expire(now_secs()) {
            debug!(identity = %id, "token expired; links of this identity closed");
            core.client_disconnected(&id);
            core.release_connection(&id, generation);
        }
    }
}

fn attach_address(
    attach: &fe2o3_amqp::types::performatives::Attach,
) -> (ClientRole, Option<String>) {
    match attach.role {
        // The client sends: the address is its target.
        Role::Sender => (
            ClientRole::Sender,
            attach.target.as_ref().and_then(|t| match t.as_ref() {
                TargetArchetype::Target(t) => t.address.clone(),
                #[allow(unreachable_patterns)]
                _ => None,
            }),
        ),
        Role::Receiver => (
            ClientRole::Receiver,
            attach.source.as_ref().and_then(|s| s.address.clone()),
        ),
    }
}

async fn run_session(
    mut session: ListenerSessionHandle,
    conn: Arc<ConnState>,
    core: Arc<HubCore>,
    cancel: CancellationToken,
    fault: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let acceptors = LinkAcceptors::new(core.settings.limits.max_message_size);
    let max_links = core.settings.limits.max_links_per_session;
    let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let eh_nodes = Arc::new(eventhubs::SessionNodes::default());
    loop {
        let attach = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = fault.cancelled() => {
                debug!("a transfer or flow on a handle never attached; ending the session");
                let error = amqp_error(
                    fe2o3_amqp::types::definitions::SessionError::UnattachedHandle,
                    "a transfer or flow on a handle that is not attached",
                );
                let _ = tokio::time::timeout(CLOSE_WAIT, session.end_with_error(error)).await;
                break;
            }
            a = session.next_incoming_attach() => a,
        };
        let Some(attach) = attach else { break };
        let (role, address) = attach_address(&attach);
        let name = attach.name.clone();
        // A child edge hub names the chain of the identity it acts for; the grant on the
        // connection (checked against this hub's own scope) decides, the chain is logged.
        if let Some(chain) = attach
            .properties
            .as_ref()
            .and_then(|p| p.get(&Symbol::from("com.microsoft:auth-chain")))
            .and_then(|v| match v {
                fe2o3_amqp::types::primitives::Value::String(s) => Some(s.as_str()),
                _ => None,
            })
        {
            debug!(link = %clip(&name), auth_chain = %clip(chain), "link attach with an auth chain");
        }
        let eh = core.settings.built_in_endpoint.as_ref();
        if let Some(node) = eventhubs::classify(address.as_deref(), role, eh) {
            // The Event Hubs-compatible endpoint: `$management` and partition readers.
            let opening = eventhubs::Opening::of(&attach, node);
            let acceptor = match role {
                ClientRole::Sender => &acceptors.cbs_requests,
                ClientRole::Receiver => &acceptors.settled,
            };
            // Boxed, as below: the attach's future would otherwise size every idle session.
            let link = match Box::pin(acceptor.accept_incoming_attach(attach, &mut session)).await {
                Ok(l) => l,
                Err(e) => {
                    debug!(link = %clip(&name), error = ?e, "link attach failed");
                    continue;
                }
            };
            if live.load(Ordering::Relaxed) >= max_links {
                let why = format!("this session holds its maximum of {max_links} links");
                tracker.spawn(refuse(
                    link,
                    amqp_error(AmqpError::ResourceLimitExceeded, why),
                ));
                continue;
            }
            match eventhubs::admit(opening, &conn, &core, &eh_nodes) {
                Ok((task, stop)) => {
                    let span = info_span!("link", kind = "eventhubs", name = %clip(&name));
                    let (core, live) = (core.clone(), live.clone());
                    live.fetch_add(1, Ordering::Relaxed);
                    tracker.spawn(
                        async move {
                            task.run(link, core, stop).await;
                            live.fetch_sub(1, Ordering::Relaxed);
                        }
                        .instrument(span),
                    );
                }
                Err(error) => {
                    debug!(link = %clip(&name), error = ?error, "event hubs link refused");
                    tracker.spawn(refuse(link, error).in_current_span());
                }
            }
            continue;
        }
        let kind = classify(address.as_deref(), role);
        // A twin response link is registered before its attach is answered: a client sends its
        // first twin request as soon as it sees both attaches, and the reply must find the link.
        let twin_slot = match &kind {
            Ok(LinkKind::TwinResponses(id))
                if core
                    .auth
                    .known(id)
                    .is_some_and(|k| conn.is_authorized(&k, now_secs())) =>
            {
                Some((id.clone(), core.twins.attach_link(id)))
            }
            _ => None,
        };
        let acceptor = acceptors.for_link(kind.as_ref().ok(), role);
        let link = match Box::pin(acceptor.accept_incoming_attach(attach, &mut session)).await {
            Ok(l) => l,
            Err(e) => {
                debug!(link = %clip(&name), error = ?e, "link attach failed");
                if let Some((id, (generation, _))) = twin_slot {
                    core.twins.detach_link(&id, generation);
                }
                continue;
            }
        };
        // A refusal waits for the peer's detach in a task of its own (bounded): a peer that
        // never answers does not stop this session from serving later attaches.
        let refuse_later = |link, error| {
            tracker.spawn(refuse(link, error).in_current_span());
        };
        if live.load(Ordering::Relaxed) >= max_links {
            let why = format!("this session holds its maximum of {max_links} links");
            debug!(link = %clip(&name), "{why}");
            refuse_later(link, amqp_error(AmqpError::ResourceLimitExceeded, why));
            continue;
        }
        let kind = match kind {
            Ok(k) => k,
            Err(e) => {
                let cond = match e {
                    AddressError::Missing | AddressError::NotFound(_) => AmqpError::NotFound,
                };
                refuse_later(link, amqp_error(cond, clip(&e.to_string())));
                continue;
            }
        };
        let cbs_guard = match (&kind, &link) {
            (LinkKind::Cbs, LinkEndpoint::Receiver(_)) => Some(conn.cbs_link(true)),
            (LinkKind::Cbs, LinkEndpoint::Sender(_)) => Some(conn.cbs_link(false)),
            _ => None,
        };
        if let Some(None) = cbs_guard {
            let why = format!(
                "at most {MAX_CBS_LINKS_PER_ROLE} $cbs links each way before a token is accepted"
            );
            debug!(link = %clip(&name), "{why}");
            refuse_later(link, amqp_error(AmqpError::UnauthorizedAccess, why));
            continue;
        }
        if let Some(id) = kind.identity() {
            // A module of a child edge device is known by its shape; only an on-behalf grant
            // on this connection lets its links attach.
            let known = core.auth.known(id);
            let authorized = known
                .as_ref()
                .is_some_and(|k| conn.is_authorized(k, now_secs()));
            if !authorized {
                let why = format!(
                    "{} link for {}: this connection holds no valid token for that identity",
                    kind.name(),
                    clip(&id.to_string())
                );
                debug!(link = %clip(&name), "{why}");
                refuse_later(link, amqp_error(AmqpError::UnauthorizedAccess, why));
                continue;
            }
        }
        if kind.is_service() && !conn.is_service(now_secs()) {
            let why = format!(
                "{} link: this connection holds no valid service token",
                kind.name()
            );
            debug!(link = %clip(&name), "{why}");
            refuse_later(link, amqp_error(AmqpError::UnauthorizedAccess, why));
            continue;
        }
        if let LinkKind::ModuleC2d(id) = &kind {
            let why = format!("{id} is a module: modules cannot receive cloud-to-device messages");
            refuse_later(link, amqp_error(AmqpError::NotAllowed, why));
            continue;
        }
        let span = info_span!("link", kind = kind.name(), name = %clip(&name));
        // Links of an identity stop with its grant; the others ($cbs) with the connection.
        let stop = kind
            .identity()
            .and_then(|id| core.auth.known(id))
            .and_then(|id| conn.link_stop(&id))
            .unwrap_or_else(|| conn.others.child());
        let twin_slot = twin_slot.map(|(_, slot)| slot);
        let task = links::run(link, kind, conn.clone(), core.clone(), stop, twin_slot);
        let live = live.clone();
        live.fetch_add(1, Ordering::Relaxed);
        tracker.spawn(
            async move {
                task.await;
                drop(cbs_guard);
                live.fetch_sub(1, Ordering::Relaxed);
            }
            .instrument(span),
        );
    }
    tracker.close();
    tracker.wait().await;
    let _ = tokio::time::timeout(CLOSE_WAIT, session.end()).await;
}

/// Link acceptors by the settle mode the hub uses where it sends, as edgeHub sets them
/// whatever the client asks: pre-settled where a lost message is answered by the protocol
/// itself (twin responses, method requests, `$cbs` replies: edgeHub's at-most-once links),
/// unsettled where the client's outcome completes a stored message (module inputs, C2D: a
/// client asking for pre-settled deliveries there would make them leave the store unread).
/// Where the client sends, its own mode stands.
struct LinkAcceptors {
    settled: PlainLinkAcceptor,
    unsettled: PlainLinkAcceptor,
    client_sends: PlainLinkAcceptor,
    /// `$cbs` messages are small whoever sends them; before a token they are all there is.
    cbs_replies: PlainLinkAcceptor,
    cbs_requests: PlainLinkAcceptor,
}

type PlainLinkAcceptor = LinkAcceptor<
    fn(fe2o3_amqp::types::messaging::Source) -> Option<fe2o3_amqp::types::messaging::Source>,
    fn(fe2o3_amqp::types::messaging::Target) -> Option<fe2o3_amqp::types::messaging::Target>,
>;

impl LinkAcceptors {
    fn new(max_message_size: u64) -> Self {
        use fe2o3_amqp::{
            acceptor::SupportedSenderSettleModes, types::definitions::SenderSettleMode,
        };
        let only = |size: u64, supported, fallback| {
            LinkAcceptor::builder()
                .max_message_size(size)
                .supported_sender_settle_modes(supported)
                .fallback_sender_settle_mode(fallback)
                .build()
        };
        let settled = |size| {
            only(
                size,
                SupportedSenderSettleModes::Settled,
                SenderSettleMode::Settled,
            )
        };
        let any = |size: u64| LinkAcceptor::builder().max_message_size(size).build();
        Self {
            settled: settled(max_message_size),
            unsettled: only(
                max_message_size,
                SupportedSenderSettleModes::Unsettled,
                SenderSettleMode::Unsettled,
            ),
            client_sends: any(max_message_size),
            cbs_replies: settled(tags::CBS_MAX_MESSAGE),
            cbs_requests: any(tags::CBS_MAX_MESSAGE),
        }
    }

    fn for_link(&self, kind: Option<&LinkKind>, role: ClientRole) -> &PlainLinkAcceptor {
        match (kind, role) {
            (Some(LinkKind::Cbs), ClientRole::Sender) => &self.cbs_requests,
            (Some(LinkKind::Cbs), ClientRole::Receiver) => &self.cbs_replies,
            (_, ClientRole::Sender) => &self.client_sends,
            (Some(LinkKind::ModuleInputs(_) | LinkKind::C2d(_) | LinkKind::ServiceFeedback), _) => {
                &self.unsettled
            }
            (
                Some(
                    LinkKind::TwinResponses(_)
                    | LinkKind::MethodRequests(_)
                    | LinkKind::ModuleC2d(_),
                ),
                _,
            ) => &self.settled,
            _ => &self.client_sends,
        }
    }
}

/// Refuses a link: attach, then detach-close with the condition (fe2o3 cannot refuse inline).
/// The peer's detach is awaited at most [`CLOSE_WAIT`].
pub(crate) async fn refuse(link: LinkEndpoint, error: AmqpErrorBody) {
    let r = match link {
        LinkEndpoint::Sender(s) => tokio::time::timeout(CLOSE_WAIT, s.close_with_error(error))
            .await
            .map(|r| r.map_err(|e| format!("{e:?}"))),
        LinkEndpoint::Receiver(r) => tokio::time::timeout(CLOSE_WAIT, r.close_with_error(error))
            .await
            .map(|r| r.map_err(|e| format!("{e:?}"))),
    };
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "closing a refused link"),
        Err(_) => debug!("the peer did not answer the detach of a refused link"),
    }
}

/// SASL for the hub: ANONYMOUS and MSSBCBS (the token follows on `$cbs`) and PLAIN (the SAS
/// token is the password). The outcome of PLAIN is written into the connection's state, since
/// fe2o3 does not hand back what SASL negotiated.
#[derive(Clone)]
struct HubSasl {
    core: Arc<HubCore>,
    conn: Arc<ConnState>,
}

fn outcome(code: SaslCode) -> SaslServerFrame {
    SaslServerFrame::Outcome(SaslOutcome {
        code,
        additional_data: None,
    })
}

impl SaslAcceptor for HubSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        let mut m = vec![
            Symbol::from("MSSBCBS"),
            Symbol::from("ANONYMOUS"),
            Symbol::from("PLAIN"),
        ];
        // EXTERNAL (the TLS client certificate) is offered to clients that sent one.
        if lock(&self.conn.x509).is_some() {
            m.insert(0, Symbol::from("EXTERNAL"));
        }
        Array::from(m)
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        match init.mechanism.0.as_str() {
            "ANONYMOUS" | "MSSBCBS" => outcome(SaslCode::Ok),
            // RFC 4422 appendix A: an authorization identity, when the client gives one, must
            // be the identity the certificate proves.
            "EXTERNAL" => match &*lock(&self.conn.x509) {
                Some(crate::ops::x509::Presented::Identity { id, .. })
                    if external_authzid_ok(
                        init.initial_response.as_ref().map(|b| b.as_slice()),
                        id,
                    ) =>
                {
                    outcome(SaslCode::Ok)
                }
                // An unaccepted certificate was counted (and logged) when it was presented.
                Some(crate::ops::x509::Presented::Unmatched(_)) => outcome(SaslCode::Auth),
                _ => {
                    m::connect_failed("unknown", "not_authenticated");
                    outcome(SaslCode::Auth)
                }
            },
            "PLAIN" => {
                let data = init
                    .initial_response
                    .map(|b| b.into_vec())
                    .unwrap_or_default();
                learn_plain(&data, &self.core);
                match plain_identity(&data, &self.core) {
                    Some((id, expiry)) => {
                        self.conn.grant(&self.core, &id, expiry);
                        outcome(SaslCode::Ok)
                    }
                    None => {
                        m::connect_failed("unknown", "not_authenticated");
                        outcome(SaslCode::Auth)
                    }
                }
            }
            _ => outcome(SaslCode::Auth),
        }
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        outcome(SaslCode::Auth)
    }
}

/// EXTERNAL's initial response is the authorization identity: none, empty, or the identity
/// the certificate proved (ids compared ignoring case, as IoT Hub does).
fn external_authzid_ok(authzid: Option<&[u8]>, proved: &Identity) -> bool {
    match authzid {
        None | Some([]) => true,
        Some(bytes) => {
            std::str::from_utf8(bytes).is_ok_and(|a| a.eq_ignore_ascii_case(&proved.to_string()))
        }
    }
}

/// Runtime mode: an identity the device scope does not know yet (or whose keys changed) is
/// looked up at the parent before SASL PLAIN's token is checked, as for `$cbs` and MQTT.
/// fe2o3 asks for the outcome synchronously, so the lookup (bounded by the core's lookup
/// timeout) runs with this worker's other tasks handed to another thread; a current-thread
/// runtime (tests, tools) has no other worker and skips it.
fn learn_plain(data: &[u8], core: &Arc<HubCore>) {
    if core.auth.scope().is_none() {
        return;
    }
    let Some(pass) = std::str::from_utf8(data)
        .ok()
        .and_then(|t| t.split('\0').nth(2))
    else {
        return;
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| h.block_on(core.learn(pass)));
        }
        _ => {}
    }
}

/// `[authzid] NUL authcid NUL passwd`; authcid is `{d}[/modules/{m}]@sas.{hub}` or `{id}@{hub}`
/// and must name the identity of the token in passwd.
fn plain_identity(data: &[u8], core: &HubCore) -> Option<(Identity, u64)> {
    let text = std::str::from_utf8(data).ok()?;
    let mut parts = text.split('\0');
    let (_authz, user, pass) = (parts.next()?, parts.next()?, parts.next()?);
    let (id_part, hub_part) = user.rsplit_once('@')?;
    let hub_name = hub_part.strip_prefix("sas.").unwrap_or(hub_part);
    let first_label = core
        .settings
        .iothub_hostname
        .split('.')
        .next()
        .unwrap_or_default();
    if !hub_name.eq_ignore_ascii_case(first_label) {
        return None;
    }
    let (id, expiry) = core.auth.verify(pass, now_secs()).ok()?;
    let named = percent_encoding::percent_decode_str(id_part)
        .decode_utf8()
        .ok()?;
    let wanted = match id.module() {
        Some(mid) => format!("{}/modules/{}", id.device(), mid),
        None => id.device().to_string(),
    };
    named.eq_ignore_ascii_case(&wanted).then_some((id, expiry))
}

/// A stream that first replays the protocol header already read for sniffing.
#[derive(Debug)]
struct Replay<S> {
    header: [u8; 8],
    pos: usize,
    inner: S,
}

impl<S> Replay<S> {
    fn new(header: [u8; 8], inner: S) -> Self {
        Self {
            header,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.header.len() {
            let n = (self.header.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.header[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

pub(crate) fn log_ready(addr: SocketAddr) {
    info!(%addr, "amqps listener ready");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_in_log_lines_is_clipped() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(1000);
        let c = clip(&long);
        assert!(c.starts_with(&"é".repeat(crate::model::LOG_CLIP)));
        assert!(c.ends_with("(2000 bytes)"), "{c}");
        assert!(c.len() < 2 * crate::model::LOG_CLIP + 32);
    }

    #[test]
    fn a_full_pending_queue_evicts_its_oldest() {
        let pending = Pending::new(2);
        let stops: Vec<Stop> = (0..3).map(|_| Stop::default()).collect();
        let tickets: Vec<PendingTicket> = stops.iter().map(|s| pending.admit(s.clone())).collect();
        assert!(stops[0].token.is_cancelled());
        assert!(lock(&stops[0].reason).is_some(), "closed with a reason");
        assert!(!stops[1].token.is_cancelled() && !stops[2].token.is_cancelled());
        // An authenticated connection leaves the queue; the oldest left is evicted next.
        drop(tickets);
        assert!(!pending.evict_oldest());
    }
}
