//! One MQTT connection: the CONNECT and its checks, then the session loop that moves values
//! between the packets and the core.
//!
//! * CONNECT must come first and within `limits.authTimeoutSecs`. Client id `{d}` or `{d}/{m}`
//!   of an identity this hub serves, else CONNACK 2; username
//!   `{host}/{clientId}/?api-version=…` for the same identity, password a SAS token verified as
//!   `$cbs` verifies it (key, host, expiry), or no password and a TLS client certificate that
//!   proves the identity ([`crate::ops::x509`]), else CONNACK 5 (4 for a username that does not
//!   parse, 1 for a protocol level other than 4); a password is checked even when a certificate
//!   came too (edgeHub's order). The connection ends when the token (or certificate) expires
//!   (beyond the clock skew): MQTT has no renewal in band, the SDKs reconnect with a new token.
//! * Will: a CONNECT's will must be a telemetry topic of the client's own identity (else
//!   CONNACK 5). It is sent, as IoT Hub sends it, as a telemetry message from the client with
//!   the application property `iothub-MessageType: Will`, when the connection ends without a
//!   DISCONNECT (the client vanished, broke a rule, timed out, was replaced, or the hub stopped),
//!   routed and made durable like any message.
//! * Keep-alive: nothing received for 1.5 × the client's keep-alive (10 min when that is 0 or
//!   longer) ends the connection.
//! * A QoS 1 telemetry PUBLISH is answered once the message is durable: it is queued by
//!   the core's [`ingest`], then one group commit of the store covers every message queued meanwhile
//!   (at most one commit in flight per connection), then the PUBACKs go out in the order the
//!   PUBLISHes came, as MQTT requires. A message the queues refuse gets no PUBACK: the
//!   connection is closed and the client sends it again (the core counts it in
//!   `edgehub_messages_unack_total` with the refusal's reason, as for AMQP).
//! * A PUBLISH to another identity's topic, to a topic the hub does not serve, or at QoS 2
//!   closes the connection and is counted (`edgehub_mqtt_refused_total`). A bag that does not
//!   decode, or a message over `limits.maxMessageSize`, is dropped, counted and acknowledged, as
//!   edgeHub does (the client would send it again forever).
//! * Module inputs: the core's delivery pump ([`delivery::pump`] over [`ModuleInputs`], the
//!   AMQP input link's pump) runs with an [`InputLink`] that hands each refill of the window to
//!   the session task in one batch, which publishes it at the subscription's QoS: at most
//!   `limits.deliveryWindow` unacknowledged (and at most half of the connection's packet ids;
//!   acknowledgements not yet written out count too) and `limits.maxUnsettledBytesPerLink`
//!   bytes; a PUBACK (at QoS 0, the write) accepts a message (the outcomes of a step go back to
//!   the pump in one burst, also when the step ends the connection), and whatever is
//!   unacknowledged when the pump stops goes back to its queue.
//! * Writes: a step of the session loop writes its packets into the write buffer; the buffer is
//!   flushed when no other step is ready, after [`MAX_STEPS_UNFLUSHED`] steps, or when it passes
//!   the codec's backpressure boundary, so a burst (input messages, the PUBACKs of a commit)
//!   leaves in few TLS records and writes.

use std::{collections::HashSet, sync::Arc, time::Duration};

use bytes::Bytes;
use fe2o3_amqp::types::messaging::MessageId;
use futures_util::{FutureExt, Sink, SinkExt, StreamExt};
use rumqttc::mqttbytes::{
    v4::{
        Codec, ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, Subscribe,
        SubscribeReasonCode, UnsubAck, Unsubscribe,
    },
    Error as CodecError, Protocol, QoS,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf},
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::{
    codec::{FramedRead, FramedWrite},
    sync::CancellationToken,
};
use tracing::{debug, info, warn};

use super::{
    convert::message_from_publish,
    inputs::{c2d_first, input_event, C2dLink, Handoff, InputEvent, InputLink, Inputs},
    sessions::Filters,
    topic::{self, ClientTopic, FilterKind, TopicError},
    will::Will,
    Mqtt, PendingTicket,
};
use crate::{
    core::{
        c2d::Watch,
        delivery::{self, ModuleInputs},
        ingest::ingest,
        methods::{MethodCall, MethodResponse},
        twin_requests::{twin_request, TwinRequest},
        twins::{TwinLinkRx, TwinOut},
        HubCore,
    },
    metrics as m,
    model::{
        clip,
        identity::{DeviceId, Identity, IdentityKey, ModuleId},
        sas::{now_secs, resource_for, MAX_CLOCK_SKEW_SECS},
    },
    ops::x509::Presented,
    store::durable::StoreError,
};

/// Room for the topic and headers of a PUBLISH beyond its payload.
const TOPIC_ROOM: usize = 64 * 1024;
/// Bound on writing one packet to a client that does not read.
const SEND_WAIT: Duration = Duration::from_secs(60);
/// The longest keep-alive timeout, and the one for keep-alive 0 (edgeHub's
/// `MaxKeepAliveTimeout`).
const MAX_KEEP_ALIVE: Duration = Duration::from_secs(600);
/// edgeHub's status for a method response whose status is not a number.
const GENERIC_BAD_REQUEST: i32 = 400_000;
/// Packet ids awaiting a PUBACK from the client at most (a client that acknowledges nothing).
const MAX_AWAITED: usize = 4096;
/// The read buffer a connection starts with: a CONNECT with a SAS token fits.
const READ_BUFFER: usize = 512;

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// DISCONNECT: the client leaves on purpose (its will is dropped).
    Disconnected,
    /// The client closed the socket without a DISCONNECT.
    ClientLeft,
    /// Shutdown, or a newer connection of the same client.
    Stopped,
    KeepAlive,
    TokenExpired,
    /// The registry disabled or deleted the identity, or changed its credentials.
    Revoked,
    /// The client broke a rule; the reason is logged and counted where it happened.
    Refused,
    /// Writing or reading failed.
    Io(String),
}

/// The server's keep-alive timeout for a client's keep-alive.
pub(crate) fn keep_alive_timeout(keep_alive_secs: u16) -> Duration {
    let t = Duration::from_millis(u64::from(keep_alive_secs) * 1500);
    if t.is_zero() || t > MAX_KEEP_ALIVE {
        MAX_KEEP_ALIVE
    } else {
        t
    }
}

/// Why a CONNECT is refused: the CONNACK code, and the reason counted and logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub code: ConnectReturnCode,
    pub reason: &'static str,
    pub detail: String,
}

pub(super) fn refuse(
    code: ConnectReturnCode,
    reason: &'static str,
    detail: impl Into<String>,
) -> Refusal {
    Refusal {
        code,
        reason,
        detail: detail.into(),
    }
}

/// Checks a CONNECT's client id, username and SAS password (or, without a password, the TLS
/// client certificate); returns the identity (as this hub knows it) and when its credential
/// expires.
pub(crate) fn authenticate(
    core: &HubCore,
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
    certificate: Option<&Presented>,
    now: u64,
) -> Result<(Identity, u64), Refusal> {
    use ConnectReturnCode::*;
    let (d, mo) = topic::parse_client_id(client_id)
        .ok_or_else(|| refuse(BadClientId, "bad_client_id", "not {deviceId}[/{moduleId}]"))?;
    let bad_id =
        |e: crate::model::identity::IdError| refuse(BadClientId, "bad_client_id", e.to_string());
    let named = match &mo {
        None => Identity::Device(DeviceId::parse(&d).map_err(bad_id)?),
        Some(mo) => Identity::Module(
            DeviceId::parse(&d).map_err(bad_id)?,
            ModuleId::parse(mo).map_err(bad_id)?,
        ),
    };
    let id = core.auth.known(&named).ok_or_else(|| {
        refuse(
            BadClientId,
            "unknown_identity",
            "not an identity of this hub",
        )
    })?;
    let username =
        username.ok_or_else(|| refuse(NotAuthorized, "not_authenticated", "no username"))?;
    let user = topic::parse_username(username)
        .map_err(|e| refuse(BadUserNamePassword, "bad_username", e.to_string()))?;
    if user.device != d || user.module != mo {
        return Err(refuse(
            NotAuthorized,
            "not_authenticated",
            "the username names another identity than the client id",
        ));
    }
    let Some(password) = password.filter(|p| !p.is_empty()) else {
        return match certificate {
            Some(Presented::Identity {
                id: cert,
                not_after,
            }) if cert.same_as(&id) => Ok((id, *not_after)),
            Some(Presented::Identity { id: cert, .. }) => Err(refuse(
                NotAuthorized,
                "not_authenticated",
                format!("the client certificate is for {cert}"),
            )),
            Some(Presented::Unmatched(why)) => Err(refuse(
                NotAuthorized,
                "certificate_not_accepted",
                why.clone(),
            )),
            None => Err(refuse(
                NotAuthorized,
                "not_authenticated",
                "no password (a SAS token) and no client certificate",
            )),
        };
    };
    if let Some(chain) = user.auth_chain.as_deref().filter(|c| c.contains(';')) {
        return on_behalf(core, &id, chain, password, now);
    }
    let (token_id, expiry) = core
        .auth
        .verify(password, now)
        .map_err(|e| refuse(NotAuthorized, "not_authenticated", e.to_string()))?;
    if !token_id.same_as(&id) {
        return Err(refuse(
            NotAuthorized,
            "not_authenticated",
            format!("the token is for {token_id}"),
        ));
    }
    Ok((id, expiry))
}

/// A CONNECT of a child edge hub on behalf of `id` (one of its modules, itself, or a leaf
/// device under its scope): `chain` starts at `id` and ends at the child, whose `$edgeHub`
/// signed the `password`; the grant is the one a `$cbs` put-token of that token would give.
fn on_behalf(
    core: &HubCore,
    id: &Identity,
    chain: &str,
    password: &str,
    now: u64,
) -> Result<(Identity, u64), Refusal> {
    use ConnectReturnCode::NotAuthorized;
    let refused = |why: String| refuse(NotAuthorized, "not_authenticated", why);
    let ids: Vec<&str> = chain.split(';').collect();
    let (first, actor) = (ids[0], ids[ids.len() - 1]);
    let named = |text: &str| match id {
        Identity::Device(d) => text.eq_ignore_ascii_case(d.as_str()),
        Identity::Module(d, m) => text.eq_ignore_ascii_case(&format!("{d}/{m}")),
    };
    if ids.len() > 5 || !named(first) {
        return Err(refused(format!(
            "the auth chain {chain:?} does not start at the client {id}"
        )));
    }
    let (granted, expiry) = core
        .auth
        .verify_put_token(
            password,
            &resource_for(&core.settings.iothub_hostname, id),
            now,
        )
        .map_err(|e| refused(e.to_string()))?;
    // The token is the actor's `$edgeHub`, which ends the chain.
    let actor_token = crate::model::sas::SasToken::parse(password)
        .ok()
        .and_then(|t| t.audience().ok())
        .is_some_and(|(_, who)| {
            matches!(&who, Identity::Module(d, m)
                if d.as_str().eq_ignore_ascii_case(actor) && m.as_str().eq_ignore_ascii_case("$edgeHub"))
        });
    if !actor_token || !granted.same_as(id) {
        return Err(refused(format!(
            "the token does not let {actor}/$edgeHub act for {id}"
        )));
    }
    Ok((granted, expiry))
}

/// The child edge hub a CONNECT acts through: the last id of the username's auth chain when
/// [`authenticate`] took the password as that hub's `$edgeHub` token on the client's behalf.
/// Such a client lives only as long as that hub's standing here.
fn acting_hub(username: Option<&str>, password: Option<&str>) -> Option<DeviceId> {
    password.filter(|p| !p.is_empty())?;
    let chain = topic::parse_username(username?).ok()?.auth_chain?;
    let (_, actor) = chain.rsplit_once(';')?;
    DeviceId::parse(actor).ok()
}

/// Serves a connection from its first byte to its end. The stream is split at once, so the
/// connection's task holds it once (in the halves) and not a moved-from copy as well.
pub(super) fn run<S>(
    stream: S,
    mqtt: &Arc<Mqtt>,
    stop: CancellationToken,
    ticket: PendingTicket,
    certificate: Option<Presented>,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    serve_connection(rd, wr, mqtt.clone(), stop, ticket, certificate)
}

async fn serve_connection<S>(
    rd: ReadHalf<S>,
    wr: WriteHalf<S>,
    mqtt: Arc<Mqtt>,
    stop: CancellationToken,
    ticket: PendingTicket,
    certificate: Option<Presented>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let max_message = mqtt.core.settings.limits.max_message_size as usize;
    let codec = Codec {
        max_incoming_size: max_message + TOPIC_ROOM,
        max_outgoing_size: max_message + TOPIC_ROOM,
    };
    // Most connections are idle most of the time: the codec's buffers start small (tokio-util
    // gives each 8 KiB) and grow with the packets that need more.
    let mut reader = FramedRead::with_capacity(rd, codec.clone(), READ_BUFFER);
    let mut writer = FramedWrite::new(wr, codec);
    *writer.write_buffer_mut() = bytes::BytesMut::new();
    // The CONNECT's work runs in its own future, whose state is gone once the session runs.
    // Used in place, not taken apart: its parts would take a second slot in this future.
    let Some(mut opened) = open(&mut reader, writer, &mqtt, &stop, ticket, certificate).await
    else {
        return;
    };
    let core = &mqtt.core;
    let keep_alive = opened.keep_alive;
    let end = opened
        .session
        .serve(
            &mut reader,
            &stop,
            keep_alive,
            opened.expires_at,
            opened.revocations_seen,
        )
        .await;
    let id = &opened.session.id;
    match &end {
        End::Disconnected | End::ClientLeft | End::Stopped => {
            debug!(identity = %id, ?end, "MQTT session ended")
        }
        End::TokenExpired => {
            info!(identity = %id, "MQTT token expired; the client must connect with a new one")
        }
        End::Revoked => {
            info!(identity = %id, "identity revoked in the registry; MQTT connection closed")
        }
        End::KeepAlive => {
            info!(identity = %id, secs = keep_alive.as_secs(), "MQTT keep-alive expired")
        }
        End::Refused => {}
        End::Io(e) => debug!(identity = %id, error = %e, "MQTT connection failed"),
    }
    opened.session.teardown().await;
    let id = &opened.session.id;
    if let (Some(will), false) = (opened.will.take(), matches!(end, End::Disconnected)) {
        will.send(core, id, max_message).await;
    }
    core.client_disconnected(id);
    core.release_connection(id, opened.generation);
}

/// A session the CONNECT opened, and what its serving needs.
struct Opened<W> {
    session: Session<W>,
    will: Option<Will>,
    keep_alive: Duration,
    expires_at: Instant,
    revocations_seen: u64,
    generation: u64,
}

/// Reads the CONNECT (within `limits.authTimeoutSecs`), checks it, answers it, and opens the
/// session; `None` when the connection ends here.
async fn open<S>(
    reader: &mut FramedRead<ReadHalf<S>, Codec>,
    mut writer: FramedWrite<WriteHalf<S>, Codec>,
    mqtt: &Arc<Mqtt>,
    stop: &CancellationToken,
    ticket: PendingTicket,
    certificate: Option<Presented>,
) -> Option<Opened<WriteHalf<S>>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let core = &mqtt.core;
    let limits = &core.settings.limits;
    let max_message = limits.max_message_size as usize;
    let deadline = Duration::from_secs(limits.auth_timeout_secs);
    let first = tokio::select! {
        _ = stop.cancelled() => return None,
        f = tokio::time::timeout(deadline, reader.next()) => f,
    };
    let connect = match first {
        Ok(Some(Ok(Packet::Connect(c)))) => c,
        Ok(Some(Err(CodecError::InvalidProtocolLevel(level)))) => {
            debug!(level, "CONNECT with an unsupported protocol level");
            let _ = send(
                &mut writer,
                connack(ConnectReturnCode::RefusedProtocolVersion),
            )
            .await;
            return None;
        }
        Ok(Some(Ok(other))) => {
            debug!(packet = ?packet_name(&other), "the first packet is not CONNECT; closing");
            return None;
        }
        Ok(Some(Err(e))) => {
            debug!(error = %e, "malformed first packet; closing");
            return None;
        }
        Ok(None) => return None,
        Err(_) => {
            debug!(secs = deadline.as_secs(), "no CONNECT in time; closing");
            return None;
        }
    };
    if connect.protocol != Protocol::V4 {
        let _ = send(
            &mut writer,
            connack(ConnectReturnCode::RefusedProtocolVersion),
        )
        .await;
        return None;
    }
    let login = connect.login.as_ref();
    if let Some(l) = login {
        // Runtime mode: an identity new to this hub is looked up at the parent first.
        core.learn(&l.password).await;
    }
    // Taken before the token is checked, so a revocation in between is still seen.
    let revocations_seen = core.registry.revocations.epoch();
    let checked = authenticate(
        core,
        &connect.client_id,
        login.map(|l| l.username.as_str()),
        login.map(|l| l.password.as_str()),
        certificate.as_ref(),
        now_secs(),
    )
    .and_then(|(id, expiry)| {
        let will = connect
            .last_will
            .as_ref()
            .map(|w| Will::check(&id, w))
            .transpose()?;
        Ok((id, expiry, will))
    });
    let acting = acting_hub(
        login.map(|l| l.username.as_str()),
        login.map(|l| l.password.as_str()),
    );
    let (id, expiry, will) = match checked {
        Ok(ok) => ok,
        Err(r) => {
            m::connect_failed(&clip(&connect.client_id), r.reason);
            warn!(client_id = %clip(&connect.client_id), code = ?r.code, reason = %clip(&r.detail), "MQTT CONNECT refused");
            let _ = send(&mut writer, connack(r.code)).await;
            return None;
        }
    };
    drop(ticket);
    let evict = stop.clone();
    let generation = core.claim_connection(&id, Box::new(move |_| evict.cancel()));
    let restored = if connect.clean_session {
        if let Err(e) = mqtt.sessions.remove(&id).await {
            warn!(identity = %id, "stored MQTT session not removed: {e}");
        }
        None
    } else {
        mqtt.sessions.load(&id)
    };
    let session_present = restored.is_some();
    if send(
        &mut writer,
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, session_present)),
    )
    .await
    .is_err()
    {
        core.release_connection(&id, generation);
        return None;
    }
    core.client_connected(&id);
    debug!(identity = %id, keep_alive = connect.keep_alive, clean = connect.clean_session, session_present, "MQTT client connected");
    let mut session = Session {
        mqtt: mqtt.clone(),
        core: core.clone(),
        id: id.clone(),
        acting,
        clean: connect.clean_session,
        writer,
        filters: Filters::new(),
        kinds: Kinds::default(),
        twin: None,
        methods: None,
        inputs: None,
        c2d_wait: None,
        ids: PacketIds::default(),
        acks: Acks::default(),
        received: m::ReceivedCache::default(),
        max_message,
    };
    if let Some(filters) = restored {
        session.filters = filters;
        session.reconcile();
    }
    let keep_alive = keep_alive_timeout(connect.keep_alive);
    let token_left = expiry
        .saturating_add(MAX_CLOCK_SKEW_SECS)
        .saturating_sub(now_secs());
    let expires_at = Instant::now() + Duration::from_secs(token_left);
    Some(Opened {
        session,
        will,
        keep_alive,
        expires_at,
        revocations_seen,
        generation,
    })
}

fn connack(code: ConnectReturnCode) -> Packet {
    Packet::ConnAck(ConnAck::new(code, false))
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut FramedWrite<W, Codec>, p: Packet) -> Result<(), End> {
    match tokio::time::timeout(SEND_WAIT, w.send(p)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::Io(e.to_string())),
        Err(_) => Err(End::Io("the client reads nothing".into())),
    }
}

/// What the client's subscriptions turn on, with the QoS granted for each.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Kinds {
    inputs: Option<QoS>,
    c2d: Option<QoS>,
    twin_responses: Option<QoS>,
    desired: Option<QoS>,
    methods: Option<QoS>,
}

fn qos_of(n: u8) -> QoS {
    if n == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// The larger of two grants.
fn widest(a: Option<QoS>, b: QoS) -> Option<QoS> {
    Some(match a {
        Some(QoS::AtLeastOnce) => QoS::AtLeastOnce,
        _ => b,
    })
}

/// Packet ids of the hub's QoS 1 PUBLISHes awaiting their PUBACK.
#[derive(Default)]
struct PacketIds {
    next: u16,
    awaited: HashSet<u16>,
}

impl PacketIds {
    fn take(&mut self) -> Option<u16> {
        if self.awaited.len() >= MAX_AWAITED {
            return None;
        }
        loop {
            self.next = self.next.wrapping_add(1);
            if self.next != 0 && self.awaited.insert(self.next) {
                return Some(self.next);
            }
        }
    }
}

/// PUBACKs owed to the client, in the order of its PUBLISHes: `syncing` wait for the group
/// commit in flight, `queued` for the next one (or for nothing, when none of them is durable).
#[derive(Default)]
struct Acks {
    queued: Vec<u16>,
    /// Some message in `queued` must be made durable before its PUBACK.
    durable: bool,
    syncing: Vec<u16>,
    sync: Option<JoinHandle<Result<(), StoreError>>>,
}

impl Acks {
    fn push(&mut self, pkid: u16, durable: bool) {
        self.queued.push(pkid);
        self.durable |= durable;
    }

    /// PUBACKs that may go out now; starts a group commit when queued ones need one.
    fn ready(&mut self, core: &Arc<HubCore>) -> Vec<u16> {
        if self.sync.is_some() || self.queued.is_empty() {
            return Vec::new();
        }
        if !self.durable {
            return std::mem::take(&mut self.queued);
        }
        self.durable = false;
        self.syncing = std::mem::take(&mut self.queued);
        let core = core.clone();
        self.sync = Some(tokio::spawn(async move { core.sync().await }));
        Vec::new()
    }
}

/// The outcome of the group commit in flight; pending while there is none.
async fn commit_done(
    sync: &mut Option<JoinHandle<Result<(), StoreError>>>,
) -> Result<(), StoreError> {
    match sync.as_mut() {
        Some(s) => s.await.unwrap_or_else(|e| {
            Err(StoreError::Fjall {
                kind: None,
                message: format!("the commit task failed: {e}"),
            })
        }),
        None => std::future::pending().await,
    }
}

async fn twin_next(twin: &mut Option<(u64, TwinLinkRx)>) -> Option<TwinOut> {
    match twin.as_mut() {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn method_next(
    methods: &mut Option<(u64, mpsc::Receiver<MethodCall>)>,
) -> Option<MethodCall> {
    match methods.as_mut() {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

struct Session<W> {
    mqtt: Arc<Mqtt>,
    core: Arc<HubCore>,
    id: Identity,
    /// The child edge hub this client connected through, on its `$edgeHub` token: disabling,
    /// deleting or re-keying that hub ends the connection too.
    acting: Option<DeviceId>,
    clean: bool,
    writer: FramedWrite<W, Codec>,
    filters: Filters,
    kinds: Kinds,
    twin: Option<(u64, TwinLinkRx)>,
    methods: Option<(u64, mpsc::Receiver<MethodCall>)>,
    inputs: Option<Inputs>,
    /// A device subscribed to its C2D messages before any was queued: the QoS granted, and
    /// the signal of its first message; the delivery pump starts then.
    c2d_wait: Option<(QoS, oneshot::Receiver<()>)>,
    ids: PacketIds,
    acks: Acks,
    received: m::ReceivedCache,
    max_message: usize,
}

impl<S> Session<WriteHalf<S>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    async fn serve(
        &mut self,
        reader: &mut FramedRead<ReadHalf<S>, Codec>,
        stop: &CancellationToken,
        keep_alive: Duration,
        expires_at: Instant,
        mut revocations_seen: u64,
    ) -> End {
        // Pinned once: each is a registration (a waiter, a timer) that a fresh future per step
        // would make and undo again.
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        let silence = tokio::time::sleep(keep_alive);
        tokio::pin!(silence);
        // When the last packet came (of the step that read it): the keep-alive timer is moved
        // only when it fires, not on every packet.
        let mut heard = Instant::now();
        let expiry = tokio::time::sleep_until(expires_at);
        tokio::pin!(expiry);
        let mut revoked = self.core.registry.revocations.watch();
        // Checked once for what came since the CONNECT, then on every new revocation.
        let mut check_revoked = true;
        let mut steps_unflushed = 0u32;
        let mut read_grown = false;
        let key = self.id.key();
        loop {
            if std::mem::take(&mut check_revoked) {
                let (now, which) = self.core.registry.revocations.since(revocations_seen);
                revocations_seen = now;
                let cut = match which {
                    crate::core::registry::Revoked::Keys(keys) => {
                        keys.contains(&key)
                            || self.acting.as_ref().is_some_and(|hub| {
                                keys.contains(&IdentityKey::from(hub))
                                    || keys.contains(&IdentityKey::from_stored(&format!(
                                        "{hub}/$edgeHub"
                                    )))
                            })
                    }
                    crate::core::registry::Revoked::Unknown => {
                        !self.core.auth.is_active(&self.id)
                            || self
                                .acting
                                .as_ref()
                                .is_some_and(|hub| self.core.auth.child_hub(hub).is_none())
                    }
                };
                if cut {
                    return End::Revoked;
                }
            }
            // The outcomes of the last step (the module's PUBACKs) go to the pump in one burst.
            if let Some(inputs) = self.inputs.as_mut() {
                inputs.hand_back();
            }
            for pkid in self.acks.ready(&self.core) {
                if let Err(end) = self.feed(Packet::PubAck(PubAck::new(pkid))).await {
                    return end;
                }
            }
            // Written out when nothing else is ready, or after a bounded number of steps, so a
            // client that never pauses still gets its acknowledgements.
            let unflushed = !self.writer.write_buffer().is_empty();
            if unflushed {
                steps_unflushed += 1;
                if steps_unflushed > MAX_STEPS_UNFLUSHED {
                    if let Err(end) = self.flush().await {
                        return end;
                    }
                }
            }
            let unflushed = !self.writer.write_buffer().is_empty();
            if !unflushed {
                steps_unflushed = 0;
            }
            let step = tokio::select! {
                biased;
                _ = &mut stopped => Err(End::Stopped),
                _ = &mut silence => {
                    let due = heard + keep_alive;
                    if due <= Instant::now() {
                        Err(End::KeepAlive)
                    } else {
                        silence.as_mut().reset(due);
                        Ok(())
                    }
                }
                _ = &mut expiry => Err(End::TokenExpired),
                // The sender lives in the core, which this session holds: `changed` cannot fail.
                _ = revoked.changed() => {
                    check_revoked = true;
                    Ok(())
                }
                r = commit_done(&mut self.acks.sync) => self.committed(r).await,
                // The larger handlers run boxed: the idle session's future is then only as
                // large as its waiting state, not as its largest handler.
                out = twin_next(&mut self.twin) => Box::pin(self.on_twin_out(out)).await,
                call = method_next(&mut self.methods) => Box::pin(self.on_method_call(call)).await,
                ev = input_event(&mut self.inputs) => self.on_input(ev).await,
                woken = c2d_first(&mut self.c2d_wait) => {
                    self.on_c2d_first(woken);
                    Ok(())
                }
                p = reader.next() => {
                    heard = Instant::now();
                    match p {
                        None => Err(End::ClientLeft),
                        Some(Err(e)) => {
                            debug!(identity = %self.id, error = %e, "malformed MQTT packet; closing");
                            Err(End::Io(e.to_string()))
                        }
                        Some(Ok(p)) => {
                            if !read_grown && matches!(p, Packet::Publish(_)) {
                                // Once: the codec keeps the capacity from then on.
                                read_grown = true;
                                grow_read_buffer(reader);
                            }
                            Box::pin(self.on_packets(p, reader)).await
                        }
                    }
                }
                // Last, so it runs only when nothing else is ready: the packets written meanwhile
                // (input PUBLISHes, PUBACKs) go out together, in as few TLS records and writes
                // as their number allows.
                _ = std::future::ready(()), if unflushed => self.flush().await,
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Handles `first` and then the packets already read behind it (up to
    /// [`PACKETS_PER_STEP`]), so a burst (the module's PUBACKs, a publisher's window) costs one
    /// turn of the session loop, not one per packet.
    async fn on_packets(
        &mut self,
        first: Packet,
        reader: &mut FramedRead<ReadHalf<S>, Codec>,
    ) -> Result<(), End> {
        self.on_packet(first).await?;
        for _ in 1..PACKETS_PER_STEP {
            match reader.next().now_or_never() {
                Some(Some(Ok(p))) => self.on_packet(p).await?,
                Some(Some(Err(e))) => {
                    debug!(identity = %self.id, error = %e, "malformed MQTT packet; closing");
                    return Err(End::Io(e.to_string()));
                }
                Some(None) => return Err(End::ClientLeft),
                None => break,
            }
        }
        Ok(())
    }
}

/// Packets read in one step of the session loop at most (see `Session::on_packets`).
const PACKETS_PER_STEP: usize = 32;

/// Steps of the session loop (each one packet or one batch of input messages) that may leave
/// packets in the write buffer while more work is ready.
const MAX_STEPS_UNFLUSHED: u32 = 32;

/// The read buffer of a connection that publishes: large enough for a burst of PUBLISHes per
/// read (an idle connection keeps its small one, [`READ_BUFFER`]).
const BUSY_READ_BUFFER: usize = 8 * 1024;

fn grow_read_buffer<R, D>(reader: &mut FramedRead<R, D>) {
    let buf = reader.read_buffer_mut();
    if buf.capacity() < BUSY_READ_BUFFER {
        buf.reserve(BUSY_READ_BUFFER - buf.len());
    }
}

impl<W: AsyncWrite + Unpin + Send> Session<W> {
    async fn send(&mut self, p: Packet) -> Result<(), End> {
        send(&mut self.writer, p).await
    }

    /// Writes `p` into the write buffer; the session loop flushes it once nothing else is
    /// ready (a full buffer is written out at once).
    async fn feed(&mut self, p: Packet) -> Result<(), End> {
        if self.writer.write_buffer().len() >= self.writer.backpressure_boundary() {
            // What the sink's own readiness check would do: write the full buffer out first.
            self.flush().await?;
        }
        // Below the boundary the sink takes the packet at once: no future and no timer per
        // packet.
        std::pin::Pin::new(&mut self.writer)
            .start_send(p)
            .map_err(|e| End::Io(e.to_string()))
    }

    async fn flush(&mut self) -> Result<(), End> {
        match tokio::time::timeout(SEND_WAIT, self.writer.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::Io(e.to_string())),
            Err(_) => Err(End::Io("the client reads nothing".into())),
        }
    }

    /// Publishes on `topic` at `qos` (a QoS 1 packet id is awaited until its PUBACK).
    async fn publish(&mut self, topic: String, qos: QoS, payload: Vec<u8>) -> Result<(), End> {
        let mut p = Publish::from_bytes(topic, qos, Bytes::from(payload));
        if qos != QoS::AtMostOnce {
            p.pkid = self
                .ids
                .take()
                .ok_or_else(|| self.refused("unacknowledged"))?;
        }
        self.send(Packet::Publish(p)).await
    }

    /// Counts and logs a broken rule; the connection ends.
    fn refused(&self, reason: &'static str) -> End {
        m::mqtt_refused(&self.id.to_string(), reason);
        End::Refused
    }

    async fn on_packet(&mut self, p: Packet) -> Result<(), End> {
        match p {
            Packet::Publish(p) => self.on_publish(p).await,
            Packet::PubAck(a) => {
                self.ids.awaited.remove(&a.pkid);
                if let Some(inputs) = self.inputs.as_mut() {
                    if let Some(key) = inputs.awaiting.remove(&a.pkid) {
                        inputs.accepted(key);
                    }
                }
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(s).await,
            Packet::Unsubscribe(u) => self.on_unsubscribe(u).await,
            Packet::PingReq => self.send(Packet::PingResp).await,
            Packet::Disconnect => Err(End::Disconnected),
            other => {
                warn!(identity = %self.id, packet = packet_name(&other), "MQTT packet not allowed here; closing");
                Err(self.refused("protocol"))
            }
        }
    }

    async fn on_publish(&mut self, p: Publish) -> Result<(), End> {
        if p.qos == QoS::ExactlyOnce {
            warn!(identity = %self.id, "QoS 2 PUBLISH; closing (IoT Hub does not support QoS 2)");
            return Err(self.refused("qos2"));
        }
        let ack = (p.qos == QoS::AtLeastOnce).then_some(p.pkid);
        let topic = match topic::parse_client_topic(&p.topic) {
            Ok(t) => t,
            Err(TopicError::BadBag) => {
                warn!(identity = %self.id, topic = %clip(&p.topic), "telemetry topic with a '/' in its property bag; message dropped");
                m::mqtt_refused(&self.id.to_string(), "bad_property_bag");
                self.ack(ack, false);
                return Ok(());
            }
            Err(e) => {
                warn!(identity = %self.id, topic = %clip(&p.topic), "PUBLISH refused ({e}); closing");
                return Err(self.refused("unknown_topic"));
            }
        };
        match topic {
            ClientTopic::Telemetry {
                device,
                module,
                bag,
            } => {
                if !owns(&self.id, device, module) {
                    warn!(identity = %self.id, topic = %clip(&p.topic), "PUBLISH to another identity's topic; closing");
                    return Err(self.refused("foreign_topic"));
                }
                let bag = match topic::decode_bag(bag) {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(identity = %self.id, "{e}; message dropped");
                        m::mqtt_refused(&self.id.to_string(), "bad_property_bag");
                        self.ack(ack, false);
                        return Ok(());
                    }
                };
                let msg =
                    message_from_publish(self.id.clone(), bag, p.payload.to_vec(), p.retain, p.dup);
                if msg.size() > self.max_message {
                    let (size, max) = (msg.size(), self.max_message);
                    warn!(identity = %self.id, "message of {size} bytes exceeds the limit of {max}; message dropped");
                    m::mqtt_refused(&self.id.to_string(), "too_large");
                    self.ack(ack, false);
                    return Ok(());
                }
                self.received.record(&msg);
                // The outcomes read so far in this step go to the pump first: a PUBACK read
                // before this PUBLISH may free the room in a queue that the message waits for.
                if let Some(inputs) = self.inputs.as_mut() {
                    inputs.hand_back();
                }
                match ingest(&self.core, &Arc::new(msg)).await {
                    Ok(()) => {
                        self.ack(ack, true);
                        Ok(())
                    }
                    Err(e) => {
                        // Counted by the core (`edgehub_messages_unack_total`, its reason). No
                        // PUBACK: the client sends it again on its next connection.
                        warn!(identity = %self.id, reason = e.reason(), "message not queued ({e}); closing so the client sends it again");
                        Err(End::Refused)
                    }
                }
            }
            ClientTopic::TwinGet { rid } => {
                let rid = rid.to_owned();
                self.twin_request(Some(rid), TwinRequest::Get).await?;
                self.ack(ack, false);
                Ok(())
            }
            ClientTopic::TwinPatchReported { rid } => {
                let rid = rid.map(str::to_owned);
                self.twin_request(rid, TwinRequest::PatchReported(&p.payload))
                    .await?;
                self.ack(ack, false);
                Ok(())
            }
            ClientTopic::MethodResponse { status, rid } => {
                let response = MethodResponse {
                    status: status.unwrap_or(GENERIC_BAD_REQUEST),
                    payload: p.payload.to_vec(),
                };
                if !self.core.methods.respond(&self.id, rid, response) {
                    debug!(identity = %self.id, rid = %clip(rid), "method response for no waiting call (late or unknown)");
                }
                self.ack(ack, false);
                Ok(())
            }
        }
    }

    fn ack(&mut self, pkid: Option<u16>, durable: bool) {
        if let Some(pkid) = pkid {
            self.acks.push(pkid, durable);
        }
    }

    async fn committed(&mut self, result: Result<(), StoreError>) -> Result<(), End> {
        self.acks.sync = None;
        if let Err(e) = result {
            tracing::error!(identity = %self.id, "queued messages could not be made durable; closing so the client sends them again: {e}");
            return Err(End::Refused);
        }
        for pkid in std::mem::take(&mut self.acks.syncing) {
            self.feed(Packet::PubAck(PubAck::new(pkid))).await?;
        }
        Ok(())
    }

    /// Serves a twin request through the core; the answer goes out on the twin link (when the
    /// client subscribed to `$iothub/twin/res/#`), after the answers queued before it.
    async fn twin_request(
        &mut self,
        rid: Option<String>,
        request: TwinRequest<'_>,
    ) -> Result<(), End> {
        let slot = match self.core.twins.reserve(&self.id) {
            Ok(slot) => slot,
            Err(full) => {
                debug!(identity = %self.id, "twin request throttled: {full}");
                if let (Some(rid), Some(qos)) = (rid, self.kinds.twin_responses) {
                    let body = error_body(429, &full.to_string());
                    return self
                        .publish(topic::twin_response_topic(429, &rid, None), qos, body)
                        .await;
                }
                return Ok(());
            }
        };
        let answer = twin_request(&self.core, &self.id, request).await;
        let Some(rid) = rid else {
            debug!(identity = %self.id, status = answer.status, "twin patch without $rid applied, not answered");
            return Ok(());
        };
        let body = match &answer.error {
            None => answer.body,
            Some(why) => error_body(answer.status, why),
        };
        if !slot.send(TwinOut::Response {
            correlation_id: Some(MessageId::String(rid)),
            status: answer.status,
            body,
            version: answer.version,
        }) {
            debug!(identity = %self.id, "twin answer dropped: not subscribed to $iothub/twin/res/#");
        }
        Ok(())
    }

    async fn on_twin_out(&mut self, out: Option<TwinOut>) -> Result<(), End> {
        let Some(out) = out else {
            // A newer twin link of this identity (another connection) took over.
            self.twin = None;
            return Ok(());
        };
        match out {
            TwinOut::Response {
                correlation_id,
                status,
                body,
                version,
            } => {
                let (Some(qos), Some(cid)) = (self.kinds.twin_responses, correlation_id) else {
                    return Ok(());
                };
                let rid = crate::model::message::message_id_text(&cid);
                self.publish(topic::twin_response_topic(status, &rid, version), qos, body)
                    .await
            }
            TwinOut::Desired { patch, version } => match self.kinds.desired {
                Some(qos) => {
                    let body = patch.to_string().into_bytes();
                    self.publish(topic::desired_topic(version), qos, body).await
                }
                None => Ok(()),
            },
        }
    }

    async fn on_method_call(&mut self, call: Option<MethodCall>) -> Result<(), End> {
        let Some(call) = call else {
            // A newer method registration of this identity took over.
            self.methods = None;
            return Ok(());
        };
        let Some(qos) = self.kinds.methods else {
            return Ok(());
        };
        let rid = call.correlation_id.to_string();
        self.publish(
            topic::method_request_topic(&call.method, &rid),
            qos,
            call.payload,
        )
        .await
    }

    /// Whether `filter` may be subscribed by this identity: filters that name ids name its own.
    fn allowed(&self, filter: &str) -> bool {
        match topic::classify_filter(filter) {
            FilterKind::ModuleMessages { device, module } => owns(&self.id, device, Some(module)),
            FilterKind::C2d { device } => owns(&self.id, device, None),
            _ => true,
        }
    }

    async fn on_subscribe(&mut self, s: Subscribe) -> Result<(), End> {
        let mut codes = Vec::with_capacity(s.filters.len());
        for f in s.filters {
            if !self.allowed(&f.path) {
                debug!(identity = %self.id, filter = %clip(&f.path), "subscription to another identity's topics refused");
                m::mqtt_refused(&self.id.to_string(), "foreign_filter");
                codes.push(SubscribeReasonCode::Failure);
                continue;
            }
            let granted = if f.qos == QoS::AtMostOnce { 0 } else { 1 };
            self.filters.insert(f.path, granted);
            codes.push(SubscribeReasonCode::Success(qos_of(granted)));
        }
        self.reconcile();
        self.persist().await;
        self.send(Packet::SubAck(SubAck::new(s.pkid, codes))).await
    }

    async fn on_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), End> {
        for t in &u.topics {
            self.filters.remove(t);
        }
        self.reconcile();
        self.persist().await;
        self.send(Packet::UnsubAck(UnsubAck::new(u.pkid))).await
    }

    /// Stores the subscriptions of a clean-session `false` client before they are acknowledged.
    async fn persist(&mut self) {
        if self.clean {
            return;
        }
        if let Err(e) = self.mqtt.sessions.save(&self.id, &self.filters).await {
            warn!(identity = %self.id, "MQTT subscriptions not stored; they hold for this connection only: {e}");
        }
        // Deleted from the registry meanwhile: its purge may have come before this save.
        if self.core.auth.known(&self.id).is_none() {
            let _ = self.mqtt.sessions.remove(&self.id).await;
        }
    }

    /// Turns on what the subscriptions ask for and off what they no longer do.
    fn reconcile(&mut self) {
        let mut k = Kinds::default();
        for (f, q) in &self.filters {
            let q = qos_of(*q);
            match topic::classify_filter(f) {
                FilterKind::ModuleMessages { .. } => k.inputs = widest(k.inputs, q),
                FilterKind::C2d { .. } => k.c2d = widest(k.c2d, q),
                FilterKind::TwinResponses => k.twin_responses = widest(k.twin_responses, q),
                FilterKind::Desired => k.desired = widest(k.desired, q),
                FilterKind::Methods => k.methods = widest(k.methods, q),
                FilterKind::Unknown => {}
            }
        }
        let before = std::mem::replace(&mut self.kinds, k);
        let core = self.core.clone();
        let wants_twin = k.twin_responses.is_some() || k.desired.is_some();
        if wants_twin && self.twin.is_none() {
            self.twin = Some(core.twins.attach_link(&self.id));
        }
        if !wants_twin {
            if let Some((g, _)) = self.twin.take() {
                core.twins.detach_link(&self.id, g);
            }
        }
        if wants_twin
            && (k.desired.is_some() != before.desired.is_some() || before == Kinds::default())
        {
            core.twins.subscribe(&self.id, k.desired.is_some());
        }
        match (k.methods.is_some(), self.methods.is_some()) {
            (true, false) => self.methods = Some(core.methods.register(&self.id)),
            (false, true) => {
                if let Some((g, _)) = self.methods.take() {
                    core.methods.unregister(&self.id, g);
                }
            }
            _ => {}
        }
        // A module receives its inputs, a device its C2D messages, through the same pump slot.
        let wanted = match &self.id {
            Identity::Module(..) => k.inputs,
            Identity::Device(_) => k.c2d,
        };
        if wanted.is_none() && self.c2d_wait.take().is_some() {
            self.core.c2d.unwatch(self.id.device());
        }
        match (wanted, self.inputs.as_mut()) {
            (Some(qos), None) => match self.c2d_wait.as_mut() {
                Some((waiting, _)) => *waiting = qos,
                None => self.start_inputs(qos),
            },
            (Some(qos), Some(inputs)) => inputs.qos = qos,
            (None, Some(_)) => {
                if let Some(mut inputs) = self.inputs.take() {
                    // Unsubscribed: the pump stops, and what is in flight goes back at once
                    // (later PUBACKs find nothing awaiting them).
                    inputs.hand_back();
                    inputs.stop.cancel();
                }
            }
            (None, None) => {}
        }
    }

    /// Starts the core's delivery pump for the module's inputs, replacing any other input link
    /// of the module.
    fn start_inputs(&mut self, qos: QoS) {
        // Only modules have inputs; a device's subscription to them was refused already.
        let Identity::Module(device, module) = &self.id else {
            self.start_c2d(qos);
            return;
        };
        let stop = CancellationToken::new();
        self.core.replace_input_link(&self.id, stop.clone());
        let (handoff, rx, outcomes) = Handoff::new();
        let link = InputLink {
            handoff,
            device: device.clone(),
            module: module.clone(),
            sent: m::SentCache::default(),
        };
        let feed = ModuleInputs::new(self.core.clone(), module.clone());
        let limits = &self.core.settings.limits;
        let window = delivery::Window {
            // Packet ids stay for twin answers and method calls.
            messages: limits.delivery_window.min(MAX_AWAITED / 2),
            bytes: limits.max_unsettled_bytes_per_link,
        };
        let pump_stop = stop.clone();
        let pump =
            tokio::spawn(async move { delivery::pump(feed, link, window, &pump_stop).await });
        self.inputs = Some(Inputs::new(qos, stop, rx, outcomes, pump));
    }

    /// Starts the core's delivery pump for a device's C2D queue, replacing any other C2D link
    /// of the device.
    /// A device none of whose messages was queued yet gets no pump until the first one is:
    /// it waits for that ([`crate::core::c2d::C2d::watch`]).
    fn start_c2d(&mut self, qos: QoS) {
        let queue = match self.core.c2d.watch(self.id.device()) {
            Watch::Ready(queue) => queue,
            Watch::Waiting(first) => {
                self.c2d_wait = Some((qos, first));
                return;
            }
        };
        let stop = CancellationToken::new();
        self.core.c2d.replace_link(&queue, stop.clone());
        let (handoff, rx, outcomes) = Handoff::new();
        let link = C2dLink {
            handoff,
            core: self.core.clone(),
            queue: queue.clone(),
        };
        let feed = crate::core::c2d::DeviceFeed::new(self.core.c2d.clone(), queue);
        let limits = &self.core.settings.limits;
        let window = delivery::Window {
            messages: limits
                .delivery_window
                .min(MAX_AWAITED / 2)
                .min(crate::core::c2d::MAX_QUEUED),
            bytes: limits.max_unsettled_bytes_per_link,
        };
        let pump_stop = stop.clone();
        let pump =
            tokio::spawn(async move { delivery::pump(feed, link, window, &pump_stop).await });
        self.inputs = Some(Inputs::new(qos, stop, rx, outcomes, pump));
    }

    /// The device's first C2D message is queued: its pump starts. Or a newer subscriber or
    /// link of the device took over while this one waited: it waits no more.
    fn on_c2d_first(&mut self, woken: Result<(), oneshot::error::RecvError>) {
        let Some((qos, _)) = self.c2d_wait.take() else {
            return;
        };
        match woken {
            Ok(()) => self.start_c2d(qos),
            Err(_) => debug!(identity = %self.id, "a newer C2D link of this device took over"),
        }
    }

    /// Writes what the input pump sends (and whatever more it has queued) into the write
    /// buffer, or handles the pump's end.
    async fn on_input(&mut self, ev: InputEvent) -> Result<(), End> {
        let first = match ev {
            InputEvent::Publish(batch) => batch,
            InputEvent::Ended(ended) => {
                self.inputs = None;
                return match ended {
                    Ok(delivery::Ended::Stopped) => {
                        debug!(identity = %self.id, "a newer input link of this module took over");
                        Ok(())
                    }
                    Ok(other) => Err(End::Io(format!("module inputs ended: {other:?}"))),
                    Err(e) => Err(End::Io(format!("module inputs failed: {e}"))),
                };
            }
        };
        let mut next = Some(first);
        while let Some(batch) = next {
            for p in batch {
                let Some(inputs) = self.inputs.as_mut() else {
                    return Ok(());
                };
                let mut publish = Publish::from_bytes(p.topic, inputs.qos, p.payload);
                let at_least_once = inputs.qos == QoS::AtLeastOnce;
                if at_least_once {
                    let Some(pkid) = self.ids.take() else {
                        return Err(self.refused("unacknowledged"));
                    };
                    publish.pkid = pkid;
                    publish.dup = p.dup;
                    inputs.awaiting.insert(pkid, p.key);
                }
                self.feed(Packet::Publish(publish)).await?;
                if !at_least_once {
                    // QoS 0: complete once written, as edgeHub counts it.
                    if let Some(inputs) = self.inputs.as_mut() {
                        inputs.accepted(p.key);
                    }
                }
            }
            next = self.inputs.as_mut().and_then(|i| i.rx.try_recv().ok());
        }
        Ok(())
    }

    /// Undoes this session's registrations (each checked against its generation, so a newer
    /// session's stay) and puts undelivered messages back.
    async fn teardown(&mut self) {
        if let Some(inputs) = self.inputs.take() {
            inputs.finish().await;
        }
        if self.c2d_wait.take().is_some() {
            self.core.c2d.unwatch(self.id.device());
        }
        if let Some((g, _)) = self.twin.take() {
            self.core.twins.detach_link(&self.id, g);
        }
        if let Some((g, _)) = self.methods.take() {
            self.core.methods.unregister(&self.id, g);
        }
        if let Some(sync) = self.acks.sync.take() {
            // Let the commit finish; its PUBACKs cannot go out any more.
            let _ = sync.await;
        }
    }
}

/// A twin error body the Node SDK recognises (it ignores the status and looks for
/// `errorCode`); the others read the status from the topic.
fn error_body(status: i32, message: &str) -> Vec<u8> {
    let code = i64::from(status) * 1000 + if status == 400 { 4 } else { 1 };
    serde_json::json!({ "errorCode": code, "message": message })
        .to_string()
        .into_bytes()
}

/// Whether the ids of a topic are `id`'s (case-insensitive, as IoT Hub compares ids).
pub(super) fn owns(id: &Identity, device: &str, module: Option<&str>) -> bool {
    id.device().as_str().eq_ignore_ascii_case(device)
        && match (id.module(), module) {
            (Some(a), Some(b)) => a.as_str().eq_ignore_ascii_case(b),
            (None, None) => true,
            _ => false,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn test_core() -> Arc<HubCore> {
        let text = r#"{"deviceId": "edge1", "iothubHostname": "hub.azure-devices.net",
            "gatewayHostname": "gw.local", "listen": {"amqps": "127.0.0.1:0"},
            "dataDir": "/nonexistent", "modules": {"filter": {}},
            "devices": {"leaf1": {"primaryKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}},
            "$edgeHub": {"schemaVersion": "1.0", "routes": {}}}"#;
        Arc::new(HubCore::for_tests(text))
    }

    fn token(core: &HubCore, id: &Identity, host: &str, expiry: u64) -> String {
        let device_key = crate::model::identity::Key::from_base64(KEY).unwrap();
        let key = match id.module() {
            Some(m) => crate::core::auth::module_keys(&core.settings, &device_key, m).primary,
            None => device_key,
        };
        crate::model::sas::make_token(
            &crate::model::sas::resource_for(host, id),
            &key,
            expiry,
            None,
        )
    }

    #[test]
    fn connect_checks_give_the_connack_codes_of_edgehub() {
        use ConnectReturnCode::*;
        let core = test_core();
        let now = 1_700_000_000;
        let module = Identity::Module(
            DeviceId::parse("edge1").unwrap(),
            ModuleId::parse("filter").unwrap(),
        );
        let leaf = Identity::Device(DeviceId::parse("leaf1").unwrap());
        let good = token(&core, &module, "hub.azure-devices.net", now + 3600);
        let via_gateway = token(&core, &module, "gw.local", now + 3600);
        let leaf_token = token(&core, &leaf, "hub.azure-devices.net", now + 3600);
        let expired = token(&core, &module, "hub.azure-devices.net", now - 3600);
        let user = "hub.azure-devices.net/edge1/filter/?api-version=2021-04-12&DeviceClientType=x";
        let ok = authenticate(&core, "edge1/filter", Some(user), Some(&good), None, now).unwrap();
        assert_eq!(ok, (module.clone(), now + 3600));
        assert!(authenticate(
            &core,
            "edge1/filter",
            Some(user),
            Some(&via_gateway),
            None,
            now
        )
        .is_ok());
        let leaf_user = "hub.azure-devices.net/leaf1/?api-version=2019-10-01";
        assert_eq!(
            authenticate(
                &core,
                "leaf1",
                Some(leaf_user),
                Some(&leaf_token),
                None,
                now
            )
            .unwrap()
            .0,
            leaf
        );
        let code = |cid: &str, user: Option<&str>, pw: Option<&str>| {
            authenticate(&core, cid, user, pw, None, now)
                .map(|_| ())
                .map_err(|r| r.code)
        };
        for (cid, user, pw, want) in [
            ("edge1/nosuch", Some(user), Some(good.as_str()), BadClientId),
            ("stranger", Some(user), Some(good.as_str()), BadClientId),
            (
                "edge1/filter/x",
                Some(user),
                Some(good.as_str()),
                BadClientId,
            ),
            ("", Some(user), Some(good.as_str()), BadClientId),
            ("edge1/filter", Some(user), None, NotAuthorized),
            ("edge1/filter", Some(user), Some(""), NotAuthorized),
            ("edge1/filter", None, Some(good.as_str()), NotAuthorized),
            (
                "edge1/filter",
                Some(user),
                Some(expired.as_str()),
                NotAuthorized,
            ),
            (
                "edge1/filter",
                Some(user),
                Some(leaf_token.as_str()),
                NotAuthorized,
            ),
            (
                "edge1/filter",
                Some(user),
                Some("SharedAccessSignature sr=x&sig=y&se=1"),
                NotAuthorized,
            ),
            (
                "edge1/filter",
                Some(leaf_user),
                Some(good.as_str()),
                NotAuthorized,
            ),
            (
                "edge1/filter",
                Some("hub/edge1/filter"),
                Some(good.as_str()),
                BadUserNamePassword,
            ),
            ("leaf1", Some(leaf_user), Some(good.as_str()), NotAuthorized),
        ] {
            assert_eq!(code(cid, user, pw), Err(want), "{cid} {user:?} {pw:?}");
        }
        // Without a password, the client certificate decides; with one, the password does.
        let cert = |id: &Identity| Presented::Identity {
            id: id.clone(),
            not_after: now + 60,
        };
        let by_cert = |cid: &str, user: &str, pw: Option<&str>, c: Option<&Presented>| {
            authenticate(&core, cid, Some(user), pw, c, now)
        };
        assert_eq!(
            by_cert("leaf1", leaf_user, None, Some(&cert(&leaf))),
            Ok((leaf.clone(), now + 60))
        );
        assert_eq!(
            by_cert("leaf1", leaf_user, Some(""), Some(&cert(&leaf))),
            Ok((leaf.clone(), now + 60))
        );
        let other = Identity::Device(DeviceId::parse("other").unwrap());
        for (pw, c, reason) in [
            (None, Some(cert(&other)), "not_authenticated"),
            (
                None,
                Some(Presented::Unmatched("thumbprint".into())),
                "certificate_not_accepted",
            ),
            (None, None, "not_authenticated"),
            (Some(good.as_str()), Some(cert(&leaf)), "not_authenticated"),
        ] {
            let r = by_cert("leaf1", leaf_user, pw, c.as_ref()).unwrap_err();
            assert_eq!((r.code, r.reason), (NotAuthorized, reason), "{pw:?} {c:?}");
        }
    }

    #[test]
    fn keep_alive_is_one_and_a_half_times_the_clients_capped_at_ten_minutes() {
        assert_eq!(keep_alive_timeout(60), Duration::from_secs(90));
        assert_eq!(keep_alive_timeout(1), Duration::from_millis(1500));
        assert_eq!(keep_alive_timeout(0), MAX_KEEP_ALIVE);
        assert_eq!(keep_alive_timeout(401), MAX_KEEP_ALIVE);
        assert_eq!(keep_alive_timeout(400), Duration::from_secs(600));
    }

    #[test]
    fn topics_belong_to_their_identity() {
        let module = Identity::Module(
            DeviceId::parse("Edge1").unwrap(),
            ModuleId::parse("filter").unwrap(),
        );
        assert!(owns(&module, "edge1", Some("Filter")));
        assert!(!owns(&module, "edge1", None));
        assert!(!owns(&module, "edge1", Some("other")));
        assert!(!owns(&module, "edge2", Some("filter")));
        let leaf = Identity::Device(DeviceId::parse("leaf").unwrap());
        assert!(owns(&leaf, "leaf", None));
        assert!(!owns(&leaf, "leaf", Some("m")));
    }

    #[test]
    fn acks_go_out_in_order_and_durable_ones_wait_for_a_commit() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let core = test_core();
            let mut acks = Acks::default();
            acks.push(1, false);
            assert_eq!(acks.ready(&core), vec![1]);
            acks.push(2, true);
            acks.push(3, false);
            assert_eq!(acks.ready(&core), Vec::<u16>::new());
            assert_eq!(acks.syncing, vec![2, 3]);
            acks.push(4, false);
            // A commit is in flight: nothing more goes out until it ends.
            assert_eq!(acks.ready(&core), Vec::<u16>::new());
            assert!(commit_done(&mut acks.sync).await.is_ok());
            acks.sync = None;
            acks.syncing.clear();
            assert_eq!(acks.ready(&core), vec![4]);
        });
    }
}
