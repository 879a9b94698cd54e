//! Link tasks: each moves messages between one AMQP link and the hub core.

use std::{sync::Arc, time::Duration};

use fe2o3_amqp::{
    acceptor::LinkEndpoint,
    link::{
        delivery::{Delivery, DeliveryInfo},
        Receiver, RecvError, Sender,
    },
    types::{definitions::AmqpError, messaging::Body, primitives::Value},
    Sendable,
};
use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{amqp_error, cbs, clip, convert, custom_condition, refuse, ConnState, CLOSE_WAIT};
use crate::{
    core::delivery,
    core::HubCore,
    metrics as m,
    model::address::LinkKind,
    model::identity::{Identity, ModuleId},
    model::message::Message,
    model::sas::now_secs,
    store::durable::StoreError,
    store::queue::{Endpoint, Queued},
};

/// Bound on one hub-to-client transfer waiting for link credit.
const SEND_WAIT: Duration = Duration::from_secs(60);
/// Deliveries that start a group commit without waiting for the end of their burst.
const ACCEPT_BATCH: usize = 64;

/// A twin response link's registration with the twin store: its generation and its queue.
pub(super) type TwinSlot = (u64, crate::core::twins::TwinLinkRx);

/// The future of one link's task, boxed by kind: an idle `$cbs` or module-inputs link holds only
/// its own kind's state, not room for the largest kind (an events link and its group commit).
pub(super) type LinkTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The task that serves `link` as a link of `kind`. The match runs here, before the task is
/// spawned, so that the task holds only the chosen kind's future and not this function's
/// arguments next to it.
pub(super) fn run(
    link: LinkEndpoint,
    kind: LinkKind,
    conn: Arc<ConnState>,
    core: Arc<HubCore>,
    cancel: LinkStop,
    twin_slot: Option<TwinSlot>,
) -> LinkTask {
    match (link, kind) {
        (LinkEndpoint::Receiver(rx), LinkKind::Cbs) => {
            Box::pin(cbs_requests(rx, conn, core, cancel))
        }
        (LinkEndpoint::Sender(tx), LinkKind::Cbs) => Box::pin(cbs_responses(tx, conn, cancel)),
        (LinkEndpoint::Receiver(rx), LinkKind::Events(id)) => {
            Box::pin(events(rx, id, conn, core, cancel))
        }
        (LinkEndpoint::Sender(tx), LinkKind::ModuleInputs(id)) => {
            Box::pin(module_inputs(tx, id, core, cancel))
        }
        (LinkEndpoint::Sender(tx), LinkKind::C2d(id)) => {
            Box::pin(super::c2d::device_link(tx, id, core, cancel))
        }
        (LinkEndpoint::Receiver(rx), LinkKind::ServiceC2d) => {
            Box::pin(super::service::c2d_sends(rx, conn, core, cancel))
        }
        (LinkEndpoint::Sender(tx), LinkKind::ServiceFeedback) => {
            Box::pin(super::service::feedback(tx, core, cancel))
        }
        (LinkEndpoint::Sender(tx), LinkKind::TwinResponses(id)) => {
            let slot = twin_slot.unwrap_or_else(|| core.twins.attach_link(&id));
            Box::pin(twin_responses(tx, id, core, cancel, slot))
        }
        (LinkEndpoint::Receiver(rx), LinkKind::TwinRequests(id)) => {
            Box::pin(twin_requests(rx, id, core, cancel))
        }
        (LinkEndpoint::Sender(tx), LinkKind::MethodRequests(id)) => {
            Box::pin(method_requests(tx, id, core, cancel))
        }
        (LinkEndpoint::Receiver(rx), LinkKind::MethodResponses(id)) => {
            Box::pin(method_responses(rx, id, core, cancel))
        }
        (link, kind) => {
            let why = format!("{} links are not served by this hub yet", kind.name());
            Box::pin(refuse(link, amqp_error(AmqpError::NotImplemented, why)))
        }
    }
}

/// A link task's stop signal and, when the hub stops it for a reason of its own (an expired
/// token), the error it detaches with; otherwise `detach-forced`.
#[derive(Clone)]
pub(crate) struct LinkStop {
    pub(crate) token: CancellationToken,
    reason: Arc<std::sync::OnceLock<fe2o3_amqp::types::definitions::Error>>,
}

impl LinkStop {
    pub(crate) fn new(token: CancellationToken) -> Self {
        Self {
            token,
            reason: Arc::default(),
        }
    }

    /// A stop signal for one more link: stopped with this one, with the same reason.
    pub(crate) fn child(&self) -> Self {
        Self {
            token: self.token.child_token(),
            reason: self.reason.clone(),
        }
    }

    /// Stops every link under this signal, which detach with `error`.
    pub(crate) fn stop_with(&self, error: fe2o3_amqp::types::definitions::Error) {
        let _ = self.reason.set(error);
        self.token.cancel();
    }

    pub(crate) fn error(&self) -> fe2o3_amqp::types::definitions::Error {
        self.reason.get().cloned().unwrap_or_else(forced_detach)
    }
}

impl std::ops::Deref for LinkStop {
    type Target = CancellationToken;
    fn deref(&self) -> &CancellationToken {
        &self.token
    }
}

/// Why the hub ends a link it was told to end (shutdown, connection end, a newer link).
fn forced_detach() -> fe2o3_amqp::types::definitions::Error {
    // The SDKs treat detach-forced as retryable (Node maps it to ServiceUnavailable).
    amqp_error(
        fe2o3_amqp::types::definitions::LinkError::DetachForced,
        "the hub ended this link (shutting down or replaced); reattach",
    )
}

/// Ends a receiver: a plain close after the peer's end, `detach-forced` (or the stop's own
/// reason) when the hub ends it.
/// The peer's detach is awaited at most [`CLOSE_WAIT`].
pub(super) async fn close_receiver(rx: Receiver, cancel: &LinkStop) {
    if cancel.is_cancelled() {
        let _ = tokio::time::timeout(CLOSE_WAIT, rx.close_with_error(cancel.error())).await;
    } else {
        let _ = tokio::time::timeout(CLOSE_WAIT, rx.close()).await;
    }
}

pub(super) async fn close_sender(tx: Sender, cancel: &LinkStop) {
    if cancel.is_cancelled() {
        let _ = tokio::time::timeout(CLOSE_WAIT, tx.close_with_error(cancel.error())).await;
    } else {
        let _ = tokio::time::timeout(CLOSE_WAIT, tx.close()).await;
    }
}

/// Awaits a detach the hub sent for at most [`CLOSE_WAIT`]: a peer that never answers does
/// not hold the link task (nor shutdown).
pub(super) async fn bounded<F: std::future::Future>(close: F) {
    let _ = tokio::time::timeout(CLOSE_WAIT, close).await;
}

pub(super) fn is_normal_end(e: &RecvError) -> bool {
    matches!(e, RecvError::LinkStateError(_))
}

/// The next delivery on a receiver the hub serves; `Err(None)` when the hub stops the link,
/// `Err(Some(_))` when the peer ended it or sent what does not decode. Either way the link is
/// over: hand the error to [`end_receiver`].
pub(super) async fn next_delivery(
    rx: &mut Receiver,
    cancel: &LinkStop,
) -> Result<Delivery<Body<Value>>, Option<RecvError>> {
    tokio::select! {
        _ = cancel.cancelled() => Err(None),
        d = rx.recv::<Body<Value>>() => d.map_err(Some),
    }
}

/// Ends a receiver after [`next_delivery`]: closed as [`close_receiver`] does when the hub
/// stops it, left alone when the peer ended it, closed with `amqp:decode-error` when a transfer
/// did not decode.
pub(super) async fn end_receiver(rx: Receiver, cancel: &LinkStop, end: Option<RecvError>) {
    match end {
        None => close_receiver(rx, cancel).await,
        Some(e) => end_after_error(rx, e).await,
    }
}

/// Ends a receiver whose `recv` failed (see [`end_receiver`]).
async fn end_after_error(rx: Receiver, e: RecvError) {
    if !is_normal_end(&e) {
        bounded(rx.close_with_error(amqp_error(AmqpError::DecodeError, e.to_string()))).await;
    }
}

async fn cbs_requests(
    mut rx: Receiver,
    conn: Arc<ConnState>,
    core: Arc<HubCore>,
    cancel: LinkStop,
) {
    loop {
        let delivery = match next_delivery(&mut rx, &cancel).await {
            Ok(d) => d,
            Err(end) => return end_receiver(rx, &cancel, end).await,
        };
        let info = DeliveryInfo::from(&delivery);
        if let Some(token) = cbs::token_of(delivery.message()) {
            // Runtime mode: an identity new to this hub is looked up at the parent first.
            core.learn(&token).await;
        }
        let reply = cbs::handle(delivery.message(), &core.auth, now_secs());
        match (&reply.granted, &reply.service) {
            (_, Some(g)) => {
                if conn.grant_service(g) {
                    debug!(policy = %g.policy, scope = %clip(&g.scope), "service put-token accepted");
                } else {
                    debug!("service put-token beyond the connection's grants; not recorded");
                }
            }
            (Some((id, expiry)), None) => {
                conn.grant(&core, id, *expiry);
                debug!(identity = %id, "put-token accepted");
            }
            (None, None) => {
                let id = reply.refused_id.clone().unwrap_or_else(|| "unknown".into());
                m::connect_failed(&id, "not_authenticated");
                warn!(identity = %clip(&id), status = reply.status, reason = %clip(&reply.description), "put-token refused");
            }
        }
        let _ = rx.accept(info).await;
        // Queued for the response link, even one that has not attached yet (an SDK may put
        // its token as soon as the request link has credit).
        if !conn.send_cbs_reply(reply).await {
            debug!("no $cbs response link took the reply in time; reply dropped");
        }
    }
}

async fn cbs_responses(mut tx: Sender, conn: Arc<ConnState>, cancel: LinkStop) {
    // A later response link (a client that re-attaches) takes over, and this one ends.
    let mut replies = conn.take_cbs_replies();
    loop {
        let reply = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tx.on_detach() => return,
            r = replies.recv() => r,
        };
        let Some((deadline, reply)) = reply else {
            break;
        };
        if tokio::time::Instant::now() > deadline {
            debug!("a put-token reply waited too long for the response link; dropped");
            continue;
        }
        let msg = Sendable::builder()
            .message(cbs::response(&reply))
            .settled(true)
            .build();
        match tokio::time::timeout(SEND_WAIT, tx.send(msg)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(error = ?e, "sending a put-token response");
                return;
            }
            Err(_) => {
                bounded(tx.close_with_error(amqp_error(
                    custom_condition("com.microsoft:timeout"),
                    "no link credit for the put-token response",
                )))
                .await;
                return;
            }
        }
    }
    close_sender(tx, &cancel).await;
}

async fn events(
    mut rx: Receiver,
    id: Identity,
    conn: Arc<ConnState>,
    core: Arc<HubCore>,
    cancel: LinkStop,
) {
    let max = core.settings.limits.max_message_size as usize;
    let mut commits = GroupCommit::new(core.clone());
    let mut received_metrics = m::ReceivedCache::default();
    loop {
        // A group commit starts once no further transfer is ready (or enough are waiting) and
        // none is in flight; while one is in flight the link reads on, and what it reads
        // meanwhile waits for the next.
        let mut ready = None;
        if commits.can_start() {
            if commits.queued.len() < ACCEPT_BATCH {
                // recv is cancel-safe: polling it once loses nothing.
                ready = rx.recv::<Body<Value>>().now_or_never();
            }
            if ready.is_none() {
                commits.start();
            }
        }
        let delivery = match ready {
            Some(d) => d,
            None => tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                result = commits.in_flight() => {
                    commits.settle(&rx, result).await;
                    continue;
                }
                d = rx.recv::<Body<Value>>(), if commits.queued.len() < MAX_QUEUED => d,
            },
        };
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                if !is_normal_end(&e) {
                    debug!(error = %e, "closing events link");
                    commits.finish(&rx).await;
                }
                return end_after_error(rx, e).await;
            }
        };
        if !conn.is_authorized(&id, now_secs()) {
            commits.finish(&rx).await;
            let why = format!("the token for {id} has expired");
            bounded(rx.close_with_error(amqp_error(AmqpError::UnauthorizedAccess, why))).await;
            return;
        }
        let format = delivery.message_format().unwrap_or(0);
        if format != 0 && format != BATCHED_FORMAT {
            let why = format!("message format {format:#x} is not supported");
            let _ = rx
                .reject(&delivery, amqp_error(AmqpError::NotImplemented, why))
                .await;
            continue;
        }
        let info = DeliveryInfo::from(&delivery);
        let parts = match format {
            BATCHED_FORMAT => unbatch(delivery.into_message()),
            _ => Ok(vec![delivery.into_message()]),
        };
        // Every message of a batch is taken, or the whole delivery is refused (the sender
        // resends it; messages of it queued before the refusal then arrive twice, never lost).
        let mut refused = None;
        match parts {
            Err(why) => refused = Some(amqp_error(AmqpError::DecodeError, why)),
            Ok(parts) => {
                for part in parts {
                    if let Err(e) = take(&core, part, &id, max, &mut received_metrics).await {
                        refused = Some(e);
                        break;
                    }
                }
            }
        }
        match refused {
            None => commits.queued.push(info),
            Some(e) => {
                let _ = rx.reject(info, e).await;
            }
        }
    }
    commits.finish(&rx).await;
    close_receiver(rx, &cancel).await;
}

/// Most deliveries an events link holds waiting for a group commit before it stops reading.
const MAX_QUEUED: usize = 1024;

/// The deliveries of an events link whose messages are queued, on their way to being accepted
/// once the store has made them durable: `queued` wait for the next group commit, `syncing`
/// for the one in flight (at most one per link; the store joins links' commits together).
struct GroupCommit {
    core: Arc<HubCore>,
    queued: Vec<DeliveryInfo>,
    syncing: Vec<DeliveryInfo>,
    /// The commit in flight, a task of its own: it holds the store's sync lock while it runs,
    /// which must not wait on this link (a push waiting for room, a disposition).
    sync: Option<tokio::task::JoinHandle<Result<(), StoreError>>>,
}

impl GroupCommit {
    fn new(core: Arc<HubCore>) -> Self {
        Self {
            core,
            queued: Vec::new(),
            syncing: Vec::new(),
            sync: None,
        }
    }

    /// Whether a commit could start now: deliveries wait and none is in flight.
    fn can_start(&self) -> bool {
        self.sync.is_none() && !self.queued.is_empty()
    }

    /// Starts a commit covering every queued delivery.
    fn start(&mut self) {
        self.syncing.append(&mut self.queued);
        let core = self.core.clone();
        self.sync = Some(tokio::spawn(async move { core.sync().await }));
    }

    /// The outcome of the commit in flight; pending while there is none.
    async fn in_flight(&mut self) -> Result<(), StoreError> {
        match self.sync.as_mut() {
            Some(sync) => sync
                .await
                .unwrap_or_else(|e| Err(StoreError::other(format!("the commit task failed: {e}")))),
            None => std::future::pending().await,
        }
    }

    /// Settles the deliveries of the commit that ended with `result`: accepted once durable;
    /// if the store could not make them so, rejected so the sender sends them again (a
    /// duplicate, never a loss).
    async fn settle(&mut self, rx: &Receiver, result: Result<(), StoreError>) {
        self.sync = None;
        match result {
            Ok(()) => {
                let _ = rx.accept_all(self.syncing.drain(..)).await;
            }
            Err(e) => {
                tracing::error!(
                    "queued messages could not be made durable; senders must resend: {e}"
                );
                for info in self.syncing.drain(..) {
                    let why = format!("the hub could not store the message: {e}");
                    let _ = rx
                        .reject(info, amqp_error(AmqpError::ResourceLimitExceeded, why))
                        .await;
                }
            }
        }
    }

    /// Settles everything: the commit in flight, then one for what is still queued.
    async fn finish(&mut self, rx: &Receiver) {
        if self.sync.is_some() {
            let result = self.in_flight().await;
            self.settle(rx, result).await;
        }
        if !self.queued.is_empty() {
            self.start();
            let result = self.in_flight().await;
            self.settle(rx, result).await;
        }
    }
}

/// The message format of a batch (the C# SDK's `SendEventBatchAsync`): each data section of
/// the body holds one encoded AMQP message.
const BATCHED_FORMAT: u32 = 0x8001_3700;

/// The messages of a batched delivery.
fn unbatch(
    batch: fe2o3_amqp::types::messaging::Message<Body<Value>>,
) -> Result<Vec<fe2o3_amqp::types::messaging::Message<Body<Value>>>, String> {
    use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
    let Body::Data(sections) = batch.body else {
        return Err("a batched message must carry its messages in data sections".into());
    };
    sections
        .into_iter()
        .enumerate()
        .map(|(i, data)| {
            let reader = serde_amqp::read::SliceReader::new(data.0.as_slice());
            <Body<Value> as DecodeIntoMessage>::decode_message_from_reader(reader)
                .map_err(|e| format!("message {i} of the batch does not decode: {e}"))
        })
        .collect()
}

/// Takes one message from `id`: decoded, checked against the size limit, routed and queued.
/// The error is what the delivery is rejected with.
async fn take(
    core: &HubCore,
    amqp: fe2o3_amqp::types::messaging::Message<Body<Value>>,
    id: &Identity,
    max: usize,
    received_metrics: &mut m::ReceivedCache,
) -> Result<(), fe2o3_amqp::types::definitions::Error> {
    let msg = Message::from_amqp(amqp, id.clone())
        .map_err(|e| amqp_error(AmqpError::DecodeError, e.to_string()))?;
    if msg.size() > max {
        let why = format!("message of {} bytes exceeds the limit of {max}", msg.size());
        return Err(amqp_error(
            custom_condition("amqp:link:message-size-exceeded"),
            why,
        ));
    }
    received_metrics.record(&msg);
    let msg = Arc::new(msg);
    crate::core::ingest::ingest(core, &msg)
        .await
        .map_err(|e| amqp_error(AmqpError::ResourceLimitExceeded, e.to_string()))
}

/// Delivers a module's inputs through the core's delivery pump (see [`delivery`]): up to
/// `limits.deliveryWindow` unsettled transfers in flight, a newer input link of the module
/// replacing this one.
async fn module_inputs(tx: Sender, id: Identity, core: Arc<HubCore>, cancel: LinkStop) {
    let Some(module) = id.module().cloned() else {
        return;
    };
    core.replace_input_link(&id, cancel.token.clone());
    let feed = delivery::ModuleInputs::new(core.clone(), module.clone());
    let link = InputLink {
        tx: Some(tx),
        module,
        cancel: cancel.clone(),
        sent_metrics: m::SentCache::default(),
    };
    let limits = &core.settings.limits;
    let window = delivery::Window {
        messages: limits.delivery_window,
        bytes: limits.max_unsettled_bytes_per_link,
    };
    delivery::pump(feed, link, window, &cancel).await;
}

/// A module's input link as the delivery pump's [`delivery::Link`].
struct InputLink {
    /// Taken when the link is closed.
    tx: Option<Sender>,
    module: ModuleId,
    cancel: LinkStop,
    sent_metrics: m::SentCache,
}

impl delivery::Link for InputLink {
    async fn send(
        &mut self,
        ep: &Endpoint,
        q: &Queued,
        _key: u64,
    ) -> Result<delivery::Sent, String> {
        let tx = self.tx.as_mut().ok_or("the input link is closed")?;
        let input = ep.input.as_deref().unwrap_or_default();
        let amqp = q.msg.to_input_message(input, q.seq, q.delivery_count);
        let sendable = Sendable::builder().message(amqp).settled(false).build();
        match tx.send_batchable(sendable).await {
            Ok(fut) => Ok(delivery::Sent::InFlight(Box::pin(async move {
                fut.await
                    .map(convert::outcome)
                    .map_err(|e| format!("{e:?}"))
            }))),
            Err(e) => {
                debug!(error = ?e, "input link send failed");
                Err(format!("{e:?}"))
            }
        }
    }

    async fn detached(&mut self) {
        match self.tx.as_mut() {
            Some(tx) => {
                tx.on_detach().await;
            }
            None => std::future::pending().await,
        }
    }

    fn settled(
        &mut self,
        ep: &Endpoint,
        q: &Queued,
        outcome: &Result<delivery::Outcome, String>,
        sent: std::time::Instant,
    ) {
        match outcome {
            Ok(delivery::Outcome::Accepted) => {
                let input = ep.input.as_deref().unwrap_or_default();
                let elapsed = sent.elapsed().as_secs_f64();
                let module = self.module.as_str();
                self.sent_metrics
                    .record(&q.msg, module, input, q.priority, elapsed);
            }
            Ok(delivery::Outcome::Rejected(_)) => m::dropped(m::DROP_REJECTED, &q.msg),
            Ok(delivery::Outcome::Released) => {}
            Err(e) => debug!(error = %e, "input delivery failed"),
        }
    }

    async fn close(&mut self, why: &delivery::Ended) {
        let Some(tx) = self.tx.take() else { return };
        if *why == delivery::Ended::Stalled {
            let why = "the module granted no credit";
            let _ = tx
                .close_with_error(amqp_error(custom_condition("com.microsoft:timeout"), why))
                .await;
        } else {
            close_sender(tx, &self.cancel).await;
        }
    }
}

/// Sends method calls to a client, pre-settled (as edgeHub does), with a uuid correlation id.
async fn method_requests(mut tx: Sender, id: Identity, core: Arc<HubCore>, cancel: LinkStop) {
    let (generation, mut calls) = core.methods.register(&id);
    let replaced = loop {
        let call = tokio::select! {
            _ = cancel.cancelled() => break false,
            _ = tx.on_detach() => {
                core.methods.unregister(&id, generation);
                return;
            }
            c = calls.recv() => c,
        };
        // The channel closes when a newer method link for this identity took over.
        let Some(call) = call else { break true };
        let msg = method_request_message(&call);
        let sendable = Sendable::builder().message(msg).settled(true).build();
        match tokio::time::timeout(SEND_WAIT, tx.send(sendable)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(error = ?e, "method request send failed");
                break false;
            }
            Err(_) => break false,
        }
    };
    core.methods.unregister(&id, generation);
    if replaced {
        let why = "a newer method link for this identity replaced this one";
        bounded(tx.close_with_error(amqp_error(custom_condition("amqp:link:stolen"), why))).await;
    } else {
        close_sender(tx, &cancel).await;
    }
}

fn method_request_message(
    call: &crate::core::methods::MethodCall,
) -> fe2o3_amqp::types::messaging::Message<Body<Value>> {
    use fe2o3_amqp::types::messaging::{
        ApplicationProperties, Data, Message as AmqpMessage, MessageId, Properties,
    };
    let uuid = serde_amqp::primitives::Uuid::from(call.correlation_id);
    AmqpMessage::builder()
        .properties(Properties {
            correlation_id: Some(MessageId::Uuid(uuid)),
            ..Default::default()
        })
        .application_properties(
            ApplicationProperties::builder()
                .insert("IoThub-methodname", call.method.clone())
                .build(),
        )
        .body(Body::Data(
            vec![Data(fe2o3_amqp::types::primitives::Binary::from(
                call.payload.clone(),
            ))]
            .into(),
        ))
        .build()
}

/// Reads a correlation id as canonical text: uuids lower-case and hyphenated, strings as sent.
fn correlation_text(id: &fe2o3_amqp::types::messaging::MessageId) -> String {
    use fe2o3_amqp::types::messaging::MessageId;
    match id {
        MessageId::Uuid(u) => uuid::Uuid::from(u.clone()).to_string(),
        MessageId::String(s) => s.to_ascii_lowercase(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Binary(b) => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

/// edgeHub's status for a response without a valid `IoThub-status`.
const GENERIC_BAD_REQUEST: i32 = 400_000;

/// Receives method responses from a client and hands them to the waiting callers.
async fn method_responses(mut rx: Receiver, id: Identity, core: Arc<HubCore>, cancel: LinkStop) {
    loop {
        let delivery = match next_delivery(&mut rx, &cancel).await {
            Ok(d) => d,
            Err(end) => return end_receiver(rx, &cancel, end).await,
        };
        let info = DeliveryInfo::from(&delivery);
        let msg = delivery.into_message();
        let cid = msg
            .properties
            .as_ref()
            .and_then(|p| p.correlation_id.as_ref())
            .map(correlation_text);
        let status = msg
            .application_properties
            .as_ref()
            .and_then(|a| a.0.get("IoThub-status"))
            .and_then(convert::int_of)
            .and_then(|s| i32::try_from(s).ok())
            .unwrap_or(GENERIC_BAD_REQUEST);
        let payload = convert::body_bytes(&msg.body);
        let _ = rx.accept(info).await;
        match cid {
            Some(cid) => {
                let answered = core.methods.respond(
                    &id,
                    &cid,
                    crate::core::methods::MethodResponse { status, payload },
                );
                if !answered {
                    debug!(correlation_id = %clip(&cid), "method response for no waiting call (late or unknown)");
                }
            }
            None => debug!("method response without a correlation id ignored"),
        }
    }
}

/// Sends twin responses and desired-property pushes to a client, pre-settled.
async fn twin_responses(
    mut tx: Sender,
    id: Identity,
    core: Arc<HubCore>,
    cancel: LinkStop,
    (generation, mut out): TwinSlot,
) {
    use crate::core::twins::TwinOut;
    use fe2o3_amqp::types::messaging::{
        Data, Message as AmqpMessage, MessageAnnotations, Properties,
    };
    let replaced = loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => break false,
            _ = tx.on_detach() => {
                core.twins.detach_link(&id, generation);
                return;
            }
            o = out.recv() => o,
        };
        let Some(next) = next else { break true };
        let (correlation_id, status, body, version) = match next {
            TwinOut::Response {
                correlation_id,
                status,
                body,
                version,
            } => (correlation_id, Some(status), body, version),
            TwinOut::Desired { patch, version } => {
                (None, None, patch.to_string().into_bytes(), Some(version))
            }
        };
        // `status` as an AMQP int and `version` as an AMQP long, as the SDKs parse them.
        let annotations = (status.is_some() || version.is_some()).then(|| {
            let key =
                |k: &str| fe2o3_amqp::types::messaging::annotations::OwnedKey::Symbol(k.into());
            let mut a = MessageAnnotations::builder();
            if let Some(s) = status {
                a = a.insert(key("status"), Value::Int(s));
            }
            if let Some(v) = version {
                a = a.insert(key("version"), Value::Long(v));
            }
            a.build()
        });
        // Always exactly one `data` section, empty or not, as edgeHub sends: the C SDK's twin
        // messenger drops a reply whose body is anything else (an `amqp-value` null, say).
        let body = Body::<Value>::Data(
            vec![Data(fe2o3_amqp::types::primitives::Binary::from(body))].into(),
        );
        let msg = AmqpMessage {
            header: None,
            delivery_annotations: None,
            message_annotations: annotations,
            properties: correlation_id.map(|c| Properties {
                correlation_id: Some(c),
                ..Default::default()
            }),
            application_properties: None,
            body,
            footer: None,
        };
        let sendable = Sendable::builder().message(msg).settled(true).build();
        match tokio::time::timeout(SEND_WAIT, tx.send(sendable)).await {
            Ok(Ok(_)) => {}
            _ => break false,
        }
    };
    core.twins.detach_link(&id, generation);
    if replaced {
        let why = "a newer twin link for this identity replaced this one";
        bounded(tx.close_with_error(amqp_error(custom_condition("amqp:link:stolen"), why))).await;
    } else {
        close_sender(tx, &cancel).await;
    }
}

const DESIRED_NOTIFICATIONS: &str = "/notifications/twin/properties/desired";
/// How long a twin request waits for its identity's response link to attach.
const TWIN_LINK_WAIT: Duration = Duration::from_secs(5);

/// Serves twin requests: GET, PATCH of reported properties, PUT/DELETE of the desired-property
/// subscription. Answers go to the identity's twin response link.
async fn twin_requests(mut rx: Receiver, id: Identity, core: Arc<HubCore>, cancel: LinkStop) {
    use crate::core::{
        twin_requests::{twin_request, TwinAnswer, TwinRequest},
        twins::TwinOut,
    };
    let error_body = |m: String| serde_json::json!({ "message": m }).to_string().into_bytes();
    loop {
        let delivery = match next_delivery(&mut rx, &cancel).await {
            Ok(d) => d,
            Err(end) => return end_receiver(rx, &cancel, end).await,
        };
        let info = DeliveryInfo::from(&delivery);
        // A client that does not take its answers gets its requests refused, not queued.
        let slot = match core.twins.reserve_within(&id, TWIN_LINK_WAIT).await {
            Ok(slot) => slot,
            Err(full) => {
                debug!(identity = %id, "twin request refused: {full}");
                let condition = custom_condition("com.microsoft:device-container-throttled");
                let _ = rx
                    .reject(info, amqp_error(condition, full.to_string()))
                    .await;
                continue;
            }
        };
        let _ = rx.accept(info).await;
        let msg = delivery.into_message();
        let operation = convert::annotation_string(&msg, "operation").unwrap_or_default();
        let resource = convert::annotation_string(&msg, "resource").unwrap_or_default();
        let correlation_id = msg
            .properties
            .as_ref()
            .and_then(|p| p.correlation_id.clone());
        let operation = operation.to_ascii_uppercase();
        // A reply without a correlation-id reads as a desired-properties push to every SDK, so
        // a request without one gets no reply, as on edgeHub; only a reported patch still
        // applies.
        if correlation_id.is_none() && operation != "PATCH" {
            debug!(identity = %id, "twin request without a correlation-id ignored");
            continue;
        }
        let answer = |a: TwinAnswer| match a.error {
            None => (a.status, a.body, a.version),
            Some(why) => (a.status, error_body(why), a.version),
        };
        let (status, body, version) = match (operation.as_str(), resource.as_str()) {
            ("GET", _) => answer(twin_request(&core, &id, TwinRequest::Get).await),
            ("PATCH", "/properties/reported") => {
                let body = convert::body_bytes(&msg.body);
                answer(twin_request(&core, &id, TwinRequest::PatchReported(&body)).await)
            }
            ("PUT", DESIRED_NOTIFICATIONS) => {
                core.twins.subscribe(&id, true);
                (200, Vec::new(), None)
            }
            ("DELETE", DESIRED_NOTIFICATIONS) => {
                core.twins.subscribe(&id, false);
                (200, Vec::new(), None)
            }
            (op, res) => (
                400,
                error_body(format!("unsupported twin operation {op:?} on {res:?}")),
                None,
            ),
        };
        if correlation_id.is_none() {
            debug!(identity = %id, status, "twin patch without a correlation-id applied, not answered");
            continue;
        }
        if !slot.send(TwinOut::Response {
            correlation_id,
            status,
            body,
            version,
        }) {
            debug!(identity = %id, "twin response dropped: no twin response link");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the value `f` returns (for an async fn: its future), without calling it.
    fn returned3<A, B, C, R>(_: impl FnOnce(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }
    fn returned4<A, B, C, D, R>(_: impl FnOnce(A, B, C, D) -> R) -> usize {
        std::mem::size_of::<R>()
    }
    fn returned5<A, B, C, D, E, R>(_: impl FnOnce(A, B, C, D, E) -> R) -> usize {
        std::mem::size_of::<R>()
    }
    fn returned6<A, B, C, D, E, G, R>(_: impl FnOnce(A, B, C, D, E, G) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn an_idle_link_holds_only_its_own_kinds_future() {
        // What the session spawns for a link is `run`'s value. As one future over every kind it
        // was as large as the largest kind (an events link) plus its own arguments, for every
        // link: about 12 KB in a debug build. Boxed by kind it is a pointer.
        let task = returned6(run);
        assert!(
            task <= 2 * std::mem::size_of::<usize>(),
            "a link task is {task} B"
        );
        // So a `$cbs` or module-inputs link, the most common after events, holds its own state
        // and not room for an events link's.
        let events = returned5(events);
        let small = [
            ("$cbs responses", returned3(cbs_responses)),
            ("$cbs requests", returned4(cbs_requests)),
            ("module inputs", returned4(module_inputs)),
            ("method requests", returned4(method_requests)),
        ];
        for (kind, size) in small {
            assert!(size < events, "{kind}: {size} B, events: {events} B");
        }
    }
}
