//! The AMQP 1.0 listener: TLS, protocol-header sniffing, SASL, connections, sessions and the
//! dispatch of each link attach to its task.
//!
//! One task per connection accepts sessions; one task per session accepts links; one task per
//! link moves messages. Every link is authorised at attach from its address (the identity) and
//! the tokens this connection has put on `$cbs` (or its SASL PLAIN identity).

pub mod cbs;
mod links;
pub(crate) mod tags;

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
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
    net::{TcpListener, TcpStream},
    sync::{mpsc, Semaphore},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::{
    address::{classify, AddressError, ClientRole, LinkKind},
    hub::HubCore,
    identity::Identity,
    metrics as m,
    sas::now_secs,
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

/// An identity proven on a connection: the token's expiry, and what stops that identity's links.
struct Grant {
    id: Identity,
    expiry: u64,
    links: links::LinkStop,
}

/// What one connection has proven: identities with a valid token, and their expiry.
pub(crate) struct ConnState {
    authorized: Mutex<HashMap<String, Grant>>,
    /// Cancelled when the connection ends; every link's stop signal descends from it.
    root: CancellationToken,
    /// Where put-token replies go: the newest `$cbs` response link of this connection.
    cbs_replies: Mutex<Option<mpsc::Sender<cbs::CbsReply>>>,
}

impl ConnState {
    fn new(root: CancellationToken) -> Self {
        Self {
            authorized: Mutex::new(HashMap::new()),
            root,
            cbs_replies: Mutex::new(None),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Grant>> {
        self.authorized.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a verified identity (a renewal moves its expiry); returns true when it is new on
    /// this connection.
    pub fn authorize(&self, id: Identity, expiry: u64) -> bool {
        let key = id.to_string().to_ascii_lowercase();
        let mut map = self.map();
        match map.get_mut(&key) {
            Some(g) => {
                g.expiry = g.expiry.max(expiry);
                false
            }
            None => {
                let links = links::LinkStop::new(self.root.child_token());
                map.insert(key, Grant { id, expiry, links });
                true
            }
        }
    }

    /// Does this connection hold an unexpired token for `id`?
    pub fn is_authorized(&self, id: &Identity, now: u64) -> bool {
        let key = id.to_string().to_ascii_lowercase();
        self.map()
            .get(&key)
            .is_some_and(|g| g.expiry.saturating_add(crate::sas::MAX_CLOCK_SKEW_SECS) >= now)
    }

    /// The stop signal of a new link of `id` (ends with the identity's grant).
    fn link_stop(&self, id: &Identity) -> Option<links::LinkStop> {
        let key = id.to_string().to_ascii_lowercase();
        self.map().get(&key).map(|g| g.links.child())
    }

    /// Ends the grants whose token expired (beyond the clock skew) without a renewal: their
    /// links are closed with `amqp:unauthorized-access`. Returns the identities that expired.
    fn expire(&self, now: u64) -> Vec<Identity> {
        let mut map = self.map();
        let gone: Vec<String> = map
            .iter()
            .filter(|(_, g)| g.expiry.saturating_add(crate::sas::MAX_CLOCK_SKEW_SECS) < now)
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
                g.id
            })
            .collect()
    }

    /// Makes a new `$cbs` response link the one replies go to; the older one then ends.
    pub fn take_cbs_replies(&self) -> mpsc::Receiver<cbs::CbsReply> {
        let (tx, rx) = mpsc::channel(64);
        *self.cbs_replies.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    pub fn cbs_reply_sender(&self) -> Option<mpsc::Sender<cbs::CbsReply>> {
        self.cbs_replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn identities(&self) -> Vec<Identity> {
        self.map().values().map(|g| g.id.clone()).collect()
    }
}

/// Accepts connections until `shutdown`, then waits for every connection task.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    core: Arc<HubCore>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(core.settings.limits.max_connections));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn!(%peer, limit = core.settings.limits.max_connections, "connection limit reached; closing");
            drop(tcp);
            continue;
        };
        let (tls, core, shutdown) = (tls.clone(), core.clone(), shutdown.clone());
        tracker.spawn(
            async move {
                m::open_connections(1.0);
                handle_socket(tcp, peer, tls, core, shutdown).await;
                m::open_connections(-1.0);
                drop(permit);
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

async fn handle_socket(
    tcp: TcpStream,
    _peer: SocketAddr,
    tls: TlsAcceptor,
    core: Arc<HubCore>,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let conn = Arc::new(ConnState::new(shutdown.child_token()));
    let deadline = Duration::from_secs(core.settings.limits.handshake_timeout_secs);
    let handshake = async {
        let mut stream = tls.accept(tcp).await.map_err(HandshakeError::Tls)?;
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
        let stream = tags::WideTags::new(Replay::new(header, stream));
        let handle = if header[4] == 3 {
            let sasl = HubSasl {
                core: core.clone(),
                conn: conn.clone(),
            };
            ConnectionAcceptor::builder()
                .container_id("edgehub")
                .max_frame_size(tags::MAX_FRAME_SIZE)
                .sasl_acceptor(sasl)
                .build()
                .accept(stream)
                .await?
        } else {
            ConnectionAcceptor::builder()
                .container_id("edgehub")
                .max_frame_size(tags::MAX_FRAME_SIZE)
                .build()
                .accept(stream)
                .await?
        };
        Ok::<_, HandshakeError>(handle)
    };
    let handshake = tokio::select! {
        // Shutdown does not wait for handshakes in progress.
        _ = shutdown.cancelled() => return,
        h = tokio::time::timeout(deadline, handshake) => h,
    };
    let handle = match handshake {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            debug!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            debug!(error = %HandshakeError::Timeout, "handshake failed");
            return;
        }
    };
    debug!("connection open");
    run_connection(handle, conn.clone(), core.clone()).await;
    for id in conn.identities() {
        core.client_disconnected(&id);
    }
    debug!("connection closed");
}

async fn run_connection(
    mut handle: ListenerConnectionHandle,
    conn: Arc<ConnState>,
    core: Arc<HubCore>,
) {
    let cancel = conn.root.clone();
    let tracker = TaskTracker::new();
    tracker.spawn(expire_tokens(conn.clone(), core.clone(), cancel.clone()));
    let session_acceptor = SessionAcceptor::builder()
        .incoming_window(4096)
        .outgoing_window(4096)
        .build();
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            s = handle.next_incoming_session() => s,
        };
        let Some(incoming) = incoming else { break };
        match session_acceptor
            .accept_incoming_session(incoming, &mut handle)
            .await
        {
            Ok(session) => {
                let (conn, core, cancel) = (conn.clone(), core.clone(), cancel.clone());
                tracker.spawn(run_session(session, conn, core, cancel).in_current_span());
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
    let _ = handle.close().await;
}

/// Once a second: closes the links of identities whose token expired and was not renewed
/// (idle links too, not only those that send), as edgeHub disconnects expired clients.
async fn expire_tokens(conn: Arc<ConnState>, core: Arc<HubCore>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        for id in conn.expire(now_secs()) {
            debug!(identity = %id, "token expired; links of this identity closed");
            core.client_disconnected(&id);
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
) {
    let tracker = TaskTracker::new();
    let acceptors = LinkAcceptors::new(core.settings.limits.max_message_size);
    loop {
        let attach = tokio::select! {
            _ = cancel.cancelled() => break,
            a = session.next_incoming_attach() => a,
        };
        let Some(attach) = attach else { break };
        let (role, address) = attach_address(&attach);
        let name = attach.name.clone();
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
        let link = match acceptor.accept_incoming_attach(attach, &mut session).await {
            Ok(l) => l,
            Err(e) => {
                debug!(link = %name, error = ?e, "link attach failed");
                if let Some((id, (generation, _))) = twin_slot {
                    core.twins.detach_link(&id, generation);
                }
                continue;
            }
        };
        let kind = match kind {
            Ok(k) => k,
            Err(e) => {
                let cond = match e {
                    AddressError::Missing | AddressError::NotFound(_) => AmqpError::NotFound,
                };
                refuse(link, amqp_error(cond, e.to_string())).await;
                continue;
            }
        };
        if let Some(id) = kind.identity() {
            // A module of a child edge device is known by its shape; only an on-behalf grant
            // on this connection lets its links attach.
            let known = core.auth.known(id);
            let authorized = known
                .as_ref()
                .is_some_and(|k| conn.is_authorized(k, now_secs()));
            if !authorized {
                let why = format!(
                    "{} link for {id}: this connection holds no valid token for that identity",
                    kind.name()
                );
                debug!(link = %name, "{why}");
                refuse(link, amqp_error(AmqpError::UnauthorizedAccess, why)).await;
                continue;
            }
        }
        if let LinkKind::ModuleC2d(id) = &kind {
            let why = format!("{id} is a module: modules cannot receive cloud-to-device messages");
            refuse(link, amqp_error(AmqpError::NotAllowed, why)).await;
            continue;
        }
        let span = info_span!("link", kind = kind.name(), name = %name);
        // Links of an identity stop with its grant; the others ($cbs) with the connection.
        let stop = kind
            .identity()
            .and_then(|id| core.auth.known(id))
            .and_then(|id| conn.link_stop(&id))
            .unwrap_or_else(|| links::LinkStop::new(cancel.child_token()));
        let (conn, core) = (conn.clone(), core.clone());
        let twin_slot = twin_slot.map(|(_, slot)| slot);
        tracker.spawn(links::run(link, kind, conn, core, stop, twin_slot).instrument(span));
    }
    tracker.close();
    tracker.wait().await;
    let _ = session.end().await;
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
        let only = |supported, fallback| {
            LinkAcceptor::builder()
                .max_message_size(max_message_size)
                .supported_sender_settle_modes(supported)
                .fallback_sender_settle_mode(fallback)
                .build()
        };
        Self {
            settled: only(
                SupportedSenderSettleModes::Settled,
                SenderSettleMode::Settled,
            ),
            unsettled: only(
                SupportedSenderSettleModes::Unsettled,
                SenderSettleMode::Unsettled,
            ),
            client_sends: LinkAcceptor::builder()
                .max_message_size(max_message_size)
                .build(),
        }
    }

    fn for_link(&self, kind: Option<&LinkKind>, role: ClientRole) -> &PlainLinkAcceptor {
        if role == ClientRole::Sender {
            return &self.client_sends;
        }
        match kind {
            Some(LinkKind::ModuleInputs(_) | LinkKind::C2d(_)) => &self.unsettled,
            Some(
                LinkKind::Cbs
                | LinkKind::TwinResponses(_)
                | LinkKind::MethodRequests(_)
                | LinkKind::ModuleC2d(_),
            ) => &self.settled,
            _ => &self.client_sends,
        }
    }
}

/// Refuses a link: attach, then detach-close with the condition (fe2o3 cannot refuse inline).
pub(crate) async fn refuse(link: LinkEndpoint, error: AmqpErrorBody) {
    let r = match link {
        LinkEndpoint::Sender(s) => s.close_with_error(error).await,
        LinkEndpoint::Receiver(r) => r.close_with_error(error).await,
    };
    if let Err(e) = r {
        debug!(error = ?e, "closing a refused link");
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
        Array::from(vec![
            Symbol::from("MSSBCBS"),
            Symbol::from("ANONYMOUS"),
            Symbol::from("PLAIN"),
        ])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        match init.mechanism.0.as_str() {
            "ANONYMOUS" | "MSSBCBS" => outcome(SaslCode::Ok),
            "PLAIN" => {
                let data = init
                    .initial_response
                    .map(|b| b.into_vec())
                    .unwrap_or_default();
                match plain_identity(&data, &self.core) {
                    Some((id, expiry)) => {
                        if self.conn.authorize(id.clone(), expiry) {
                            self.core.client_connected(&id);
                        }
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
