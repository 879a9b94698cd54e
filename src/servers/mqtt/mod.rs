//! The MQTT 3.1.1 adapter: the listener on `listen.mqtts` (TLS with the hub's server
//! certificate) and one task per connection that turns IoT Hub's MQTT topics into calls on the
//! same core the AMQP adapter uses (`crate::ops` for ingest, the input pump's choice of
//! messages and twin requests; [`crate::core::methods::Dispatcher`]; [`crate::core::twins::TwinStore`];
//! [`crate::core::auth::Authenticator`] for SAS tokens).
//!
//! * Packets are read and written by `rumqttc`'s v4 codec; the session logic is ours
//!   (`session`). A connection runs over any `AsyncRead + AsyncWrite` stream
//!   ([`serve_stream`]), so MQTT over WebSockets only has to hand its stream over.
//! * Limits: `limits.maxConnections` open connections, at most `limits.maxPendingConnections`
//!   that have not yet sent a valid CONNECT (a new one evicts the oldest of them), TLS within
//!   `limits.handshakeTimeoutSecs`, CONNECT within `limits.authTimeoutSecs` after it; these are
//!   the AMQP listener's limits, counted for this listener on its own.
//! * One live session per client id: a newer CONNECT of the same identity ends the older
//!   connection (edgeHub's rule), whose teardown touches nothing of the newer one (every
//!   registration it undoes carries its generation).

pub mod convert;
mod session;
pub mod sessions;
pub mod topic;

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use dashmap::DashMap;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::Semaphore,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info_span, warn, Instrument};

use crate::{
    core::HubCore,
    metrics as m,
    model::identity::{Identity, IdentityKey},
};

/// What every MQTT connection of the hub shares.
pub struct Mqtt {
    pub core: Arc<HubCore>,
    /// Subscriptions kept for clean-session `false` clients.
    pub sessions: sessions::SessionStore,
    /// Identity → (generation, stop) of its live connection.
    live: DashMap<IdentityKey, (u64, CancellationToken)>,
    generation: AtomicU64,
}

impl Mqtt {
    pub fn new(core: Arc<HubCore>, sessions: sessions::SessionStore) -> Arc<Self> {
        Arc::new(Self {
            core,
            sessions,
            live: DashMap::new(),
            generation: AtomicU64::new(0),
        })
    }

    /// Makes `stop` the live connection of `id`, ending the one it replaces; returns its
    /// generation.
    fn take_over(&self, id: &Identity, stop: CancellationToken) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let old = self.live.insert(id.key(), (generation, stop));
        if let Some((_, old)) = old {
            debug!(identity = %id, "a newer connection of this client replaces the older");
            old.cancel();
        }
        generation
    }

    /// Forgets the live connection of `id` unless a newer one took over.
    fn release(&self, id: &Identity, generation: u64) {
        self.live.remove_if(&id.key(), |_, (g, _)| *g == generation);
    }

    /// Identities with a live MQTT connection.
    pub fn live_len(&self) -> usize {
        self.live.len()
    }
}

/// Connections that have not sent a valid CONNECT yet, oldest first; when full, a new one ends
/// the oldest, so peers that never authenticate cannot hold the listener.
struct Pending {
    cap: usize,
    queue: Mutex<VecDeque<(u64, CancellationToken)>>,
    next: AtomicU64,
}

/// A connection's place in [`Pending`]; dropped when it authenticates or ends.
pub(crate) struct PendingTicket {
    pending: Option<Arc<Pending>>,
    id: u64,
}

impl PendingTicket {
    /// A ticket that holds no place (a stream admitted by another listener).
    pub(crate) fn none() -> Self {
        Self {
            pending: None,
            id: 0,
        }
    }
}

impl Drop for PendingTicket {
    fn drop(&mut self) {
        if let Some(p) = &self.pending {
            lock(&p.queue).retain(|(id, _)| *id != self.id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pending {
    fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            queue: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(0),
        })
    }

    fn admit(self: &Arc<Self>, stop: CancellationToken) -> PendingTicket {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut q = lock(&self.queue);
        while q.len() >= self.cap {
            if let Some((_, oldest)) = q.pop_front() {
                debug!("pending MQTT connections at their limit; closing the oldest");
                oldest.cancel();
            }
        }
        q.push_back((id, stop));
        PendingTicket {
            pending: Some(self.clone()),
            id,
        }
    }

    fn evict_oldest(&self) -> bool {
        match lock(&self.queue).pop_front() {
            Some((_, stop)) => {
                stop.cancel();
                true
            }
            None => false,
        }
    }
}

/// How long a new connection waits for the slot of a pending one it evicted.
const EVICTION_WAIT: Duration = Duration::from_secs(2);

/// Accepts MQTT-over-TLS connections until `shutdown`, then waits for every connection task.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    mqtt: Arc<Mqtt>,
    shutdown: CancellationToken,
) {
    let limits = mqtt.core.settings.limits.clone();
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let pending = Pending::new(limits.max_pending_connections);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "MQTT accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) if pending.evict_oldest() => None,
            Err(_) => {
                warn!(%peer, limit = limits.max_connections, "MQTT connection limit reached; closing");
                continue;
            }
        };
        let stop = shutdown.child_token();
        let ticket = pending.admit(stop.clone());
        let (tls, mqtt, permits) = (tls.clone(), mqtt.clone(), permits.clone());
        let handshake = Duration::from_secs(limits.handshake_timeout_secs);
        tracker.spawn(
            async move {
                let _permit = match permit {
                    Some(p) => p,
                    None => {
                        match tokio::time::timeout(EVICTION_WAIT, permits.acquire_owned()).await {
                            Ok(Ok(p)) => p,
                            _ => return,
                        }
                    }
                };
                let _ = tcp.set_nodelay(true);
                m::open_connections(m::PROTOCOL_MQTT, 1.0);
                let accepted = tokio::select! {
                    _ = stop.cancelled() => None,
                    s = tokio::time::timeout(handshake, tls.accept(tcp)) => match s {
                        Ok(Ok(s)) => Some(s),
                        Ok(Err(e)) => {
                            debug!(error = %e, "MQTT TLS handshake failed");
                            None
                        }
                        Err(_) => {
                            debug!("MQTT TLS handshake timed out");
                            None
                        }
                    },
                };
                if let Some(stream) = accepted {
                    session::run(stream, mqtt, stop, ticket).await;
                }
                m::open_connections(m::PROTOCOL_MQTT, -1.0);
            }
            .instrument(info_span!("mqtt", %peer)),
        );
    }
    tracker.close();
    tracker.wait().await;
}

/// Serves one MQTT connection over an already accepted stream (TLS, or a WebSocket's binary
/// frames); it ends when the client leaves, is replaced, or `stop` is cancelled. The caller
/// counts the connection against its own limits.
pub async fn serve_stream<S>(stream: S, mqtt: Arc<Mqtt>, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    session::run(stream, mqtt, stop, PendingTicket::none()).await
}

/// Logs the listener address once it is bound.
pub fn log_ready(addr: std::net::SocketAddr) {
    tracing::info!(%addr, "MQTT listener ready");
}
