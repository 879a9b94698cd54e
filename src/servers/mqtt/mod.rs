//! The MQTT 3.1.1 adapter: the listener on `listen.mqtts` (TLS with the hub's server
//! certificate), MQTT over WebSockets on the HTTPS listener (`ws`), and one task per connection
//! that turns IoT Hub's MQTT topics into calls on the same core the AMQP adapter uses
//! ([`crate::core::ingest`], the delivery pump and twin requests;
//! [`crate::core::methods::Dispatcher`]; [`crate::core::twins::TwinStore`];
//! [`crate::core::auth::Authenticator`] for SAS tokens; [`crate::ops::x509::Matcher`] for
//! client certificates).
//!
//! * Packets are read and written by `rumqttc`'s v4 codec; the session logic is ours
//!   (`session`). A connection runs over any `AsyncRead + AsyncWrite` stream ([`Mqtt::run`]): a
//!   TLS stream, or a WebSocket's binary messages.
//! * Limits: `limits.maxConnections` open connections, at most `limits.maxPendingConnections`
//!   that have not yet sent a valid CONNECT (a new one evicts the oldest of them), TLS within
//!   `limits.handshakeTimeoutSecs`, CONNECT within `limits.authTimeoutSecs` after it; these are
//!   the AMQP listener's limits, counted for MQTT on its own, MQTTS and MQTT over WebSockets
//!   together.
//! * One live connection per identity, whatever the transport: a newer CONNECT (or AMQP
//!   authentication) of the same identity ends the older connection (edgeHub's rule, kept by
//!   [`HubCore::claim_connection`]), whose teardown touches nothing of the newer one (every
//!   registration it undoes carries its generation).

pub mod convert;
mod inputs;
mod session;
pub mod sessions;
pub mod topic;
mod will;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info_span, warn, Instrument};

use crate::{core::HubCore, metrics as m, ops::x509, servers::Handshake};

/// What every MQTT connection of the hub shares: the core, the kept sessions, the client
/// certificate matcher and the connection slots of MQTTS and MQTT over WebSockets.
pub struct Mqtt {
    pub core: Arc<HubCore>,
    /// Subscriptions kept for clean-session `false` clients.
    pub sessions: sessions::SessionStore,
    /// The devices that authenticate with a client certificate.
    x509: Arc<x509::Matcher>,
    permits: Arc<Semaphore>,
    pending: Arc<Pending>,
    shutdown: CancellationToken,
}

/// A connection let in by [`Mqtt::admit`]: pending until its CONNECT is accepted. Its slot is
/// taken, or freed by the eviction of a pending connection and waited for in [`Mqtt::run`].
pub(crate) struct Admitted {
    permit: Option<OwnedSemaphorePermit>,
    stop: CancellationToken,
    ticket: PendingTicket,
}

impl Mqtt {
    pub fn new(
        core: Arc<HubCore>,
        sessions: sessions::SessionStore,
        x509: Arc<x509::Matcher>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let limits = &core.settings.limits;
        let mqtt = Arc::new(Self {
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            pending: Pending::new(limits.max_pending_connections),
            core,
            sessions,
            x509,
            shutdown,
        });
        // An identity deleted from the registry loses its stored subscriptions: one created
        // again under the same id must not inherit them.
        let weak = Arc::downgrade(&mqtt);
        mqtt.core.registry.on_delete(Box::new(move |ids| {
            let weak = weak.clone();
            Box::pin(async move {
                let Some(mqtt) = weak.upgrade() else { return };
                for id in ids {
                    if let Err(e) = mqtt.sessions.remove(&id).await {
                        warn!(identity = %id, "stored MQTT session of a deleted identity not removed: {e}");
                    }
                }
            })
        }));
        mqtt
    }

    /// What the client of a TLS connection proved with its certificate (`None`: it sent none).
    pub(crate) fn identify(&self, tls: &rustls::ServerConnection) -> Option<x509::Presented> {
        // The registry's certificate devices too, read only when a certificate came.
        x509::presented(&self.x509, tls, || self.core.auth.live_x509())
    }

    /// Lets a new connection in, or `None` when every slot is held by an authenticated one.
    pub(crate) fn admit(&self, peer: SocketAddr) -> Option<Admitted> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) if self.pending.evict_oldest() => None,
            Err(_) => {
                let limit = self.core.settings.limits.max_connections;
                warn!(%peer, limit, "MQTT connection limit reached; closing");
                return None;
            }
        };
        let stop = self.shutdown.child_token();
        let ticket = self.pending.admit(stop.clone());
        Some(Admitted {
            permit,
            stop,
            ticket,
        })
    }

    /// Serves an admitted connection to its end: `handshake` (TLS for MQTTS; the upgrade for a
    /// WebSocket) gives the byte stream and what the client's certificate proved, within
    /// `limits.handshakeTimeoutSecs`; then the session runs. `protocol` labels the connection
    /// in `edgehub_open_connections`.
    ///
    /// The handshake comes boxed, and the stream goes into the session as soon as it is there:
    /// an idle connection's task then holds neither the finished handshake's state nor a
    /// second copy of the stream (each about 1.2 KB with TLS).
    pub(crate) async fn run<S>(
        self: &Arc<Self>,
        admitted: Admitted,
        protocol: &'static str,
        handshake: Handshake<S>,
    ) where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Admitted {
            permit,
            stop,
            ticket,
        } = admitted;
        let _permit = match permit {
            Some(p) => p,
            None => {
                match tokio::time::timeout(EVICTION_WAIT, self.permits.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(p)) => p,
                    _ => return,
                }
            }
        };
        m::open_connections(protocol, 1.0);
        let deadline = Duration::from_secs(self.core.settings.limits.handshake_timeout_secs);
        let accepted = tokio::select! {
            _ = stop.cancelled() => None,
            s = tokio::time::timeout(deadline, handshake) => match s {
                Ok(Ok(s)) => Some(s),
                Ok(Err(e)) => {
                    debug!(error = %e, "MQTT handshake failed");
                    None
                }
                Err(_) => {
                    debug!("MQTT handshake timed out");
                    None
                }
            },
        };
        // Awaited where it lies (pinned), not moved into a second slot of this future.
        let session =
            std::pin::pin!(accepted
                .map(|(stream, presented)| session::run(stream, self, stop, ticket, presented)));
        if let Some(session) = session.as_pin_mut() {
            session.await;
        }
        m::open_connections(protocol, -1.0);
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
    pending: Arc<Pending>,
    id: u64,
}

impl Drop for PendingTicket {
    fn drop(&mut self) {
        lock(&self.pending.queue).retain(|(id, _)| *id != self.id);
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
            pending: self.clone(),
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

/// Accepts MQTT-over-TLS connections until shutdown, then waits for every connection task.
pub async fn serve(listener: TcpListener, tls: TlsAcceptor, mqtt: Arc<Mqtt>) {
    let tracker = TaskTracker::new();
    while let Some((tcp, peer)) =
        crate::servers::http::accept_with_backoff("mqtts", &mqtt.shutdown, || listener.accept())
            .await
    {
        let Some(admitted) = mqtt.admit(peer) else {
            continue;
        };
        let (tls, mqtt) = (tls.clone(), mqtt.clone());
        tracker.spawn(
            async move {
                let _ = tcp.set_nodelay(true);
                let identify = mqtt.clone();
                let handshake: Handshake<_> = Box::pin(async move {
                    let stream = tls.accept(tcp).await?;
                    let presented = identify.identify(stream.get_ref().1);
                    Ok((stream, presented))
                });
                mqtt.run(admitted, m::PROTOCOL_MQTT, handshake).await;
            }
            .instrument(info_span!("mqtt", %peer)),
        );
    }
    tracker.close();
    tracker.wait().await;
}

/// Logs the listener address once it is bound.
pub fn log_ready(addr: std::net::SocketAddr) {
    tracing::info!(%addr, "MQTT listener ready");
}
