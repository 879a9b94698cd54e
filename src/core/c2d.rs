//! Cloud-to-device (C2D) messages: one queue per device, the rules IoT Hub applies to them, and
//! the feedback records the service reads.
//!
//! Where a C2D message comes from (the service API's `/messages/devicebound` link, or the
//! parent's `…/messages/devicebound` link held on a leaf device's behalf) and how it reaches the
//! device (its AMQP C2D link, or its MQTT `devices/{d}/messages/devicebound/#` subscription) is
//! the transports' business; what happens in between lives here once:
//!
//! * **Queue.** One queue per device (endpoint id `$c2d/{device}`, lower-cased), in the durable
//!   store when `storage.persistent` (same records, same group commit as the endpoint queues)
//!   or in memory. At most [`MAX_QUEUED`] messages per device, counting those delivered and not
//!   yet settled, as IoT Hub; the next is refused ([`SendError::QueueFull`]) at once.
//!   A message is at most [`MAX_MESSAGE_BYTES`]. So a device holds at most 50 × 64 KiB.
//! * **Expiry.** A message's `absolute-expiry-time`, else enqueue time + [`DEFAULT_TTL_MS`]
//!   (IoT Hub's default `defaultTtlAsIso8601`, 1 h). An expired message is never delivered:
//!   dropped when met at the head of the queue or by the once-a-second sweep, with feedback
//!   `Expired` when its `iothub-ack` asks for negative feedback.
//! * **Outcomes.** The device's accepted = complete (feedback `Success` for `positive`/`full`),
//!   rejected = reject (dead-lettered: dropped, feedback `Rejected` for `negative`/`full`),
//!   released or modified = abandon (back to its place, delivery count + 1). A message abandoned
//!   [`MAX_DELIVERY_COUNT`] times is dead-lettered with feedback `DeliveryCountExceeded`
//!   when it next comes up. Only explicit abandons count (IoT Hub's rule): a message whose link
//!   ended before it was settled goes back without counting. Abandon counts are kept in memory
//!   (at most `MAX_QUEUED` per device); after a restart they start again from 0.
//! * **One link per device.** A newer C2D link (AMQP or MQTT) of a device replaces the older.
//! * **Feedback.** Records collect in memory (at most [`FEEDBACK_BATCH`]) and are written out
//!   as one feedback message (a JSON array, IoT Hub's record format) when 64 wait or
//!   [`FEEDBACK_DELAY`] after the first of them, into the `$feedback` queue (durable like the
//!   rest, [`FEEDBACK_QUEUE`] messages, each kept 1 h), from which the service's
//!   `/messages/servicebound/feedback` link delivers them. Records not yet written out when
//!   the hub stops are written at shutdown; a crash loses them (at most one batch).
//! * **From the parent.** A message the upstream receives on a leaf device's behalf is queued
//!   like the service's, marked (a private annotation, never sent to the device) so that the
//!   device's outcome goes back to the parent instead of into feedback here (the parent
//!   writes its own): complete = accepted, reject or too many abandons = rejected, abandon =
//!   released. The parent's delivery stays unsettled until then. A message the parent sends
//!   again (after a reconnect, or after an abandon) is recognised by its message id while it
//!   is queued here and not queued twice; an outcome that finds no upstream link is kept (at
//!   most [`MAX_QUEUED`] per device) and applied when the parent sends the message again. A
//!   message stays recognised until the upstream link has applied the device's outcome, so a
//!   redelivery that crosses the outcome on its way waits for it instead of being queued
//!   again (the device would get a message it had settled). An
//!   expired message is left to the parent, which expires it too. These maps live in memory:
//!   after a restart of this hub the parent's redeliveries are queued again (at least once).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use dashmap::DashMap;
use fe2o3_amqp::types::{
    messaging::annotations::OwnedKey,
    messaging::{MessageId, Properties},
    primitives::{Binary, SimpleValue, Symbol, Timestamp, Value},
};
use serde_amqp::primitives::OrderedMap;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    core::delivery::{Feed, Outcome},
    metrics as m,
    model::identity::{DeviceId, Identity},
    model::message::{message_id_text, now_ms, Message},
    routing::router::QueueFactory,
    store::queue::{Endpoint, QueueError, Queued},
};

/// IoT Hub's per-device limit on queued C2D messages.
pub const MAX_QUEUED: usize = 50;
/// IoT Hub's default `maxDeliveryCount` for C2D messages.
pub const MAX_DELIVERY_COUNT: u8 = 10;
/// IoT Hub's default C2D time to live (`defaultTtlAsIso8601`, 1 h).
pub const DEFAULT_TTL_MS: i64 = 3_600_000;
/// IoT Hub's maximum C2D message size.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Feedback records per feedback message (IoT Hub's batch).
pub const FEEDBACK_BATCH: usize = 64;
/// How long the first record of a batch waits for more (IoT Hub waits up to 15 s).
pub const FEEDBACK_DELAY: Duration = Duration::from_secs(1);
/// Feedback messages held for the service; past that the newest batch is dropped and counted.
pub const FEEDBACK_QUEUE: usize = 1000;
/// How long a feedback message waits for the service (IoT Hub's feedback TTL, 1 h).
pub const FEEDBACK_TTL_MS: i64 = 3_600_000;
/// The content type of a feedback message (the C# service SDK checks it).
pub const FEEDBACK_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.feedback.json";
/// The application property that asks for feedback.
pub const ACK_PROPERTY: &str = "iothub-ack";
const FEEDBACK_ENDPOINT: &str = "$feedback";
/// The annotation that marks a message from the parent (kept in the store, never delivered).
const FROM_PARENT: &str = "x-opt-edgehub-from-parent";
const QUEUE_PREFIX: &str = "$c2d/";

/// The feedback a message asked for with `iothub-ack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    None,
    Positive,
    Negative,
    Full,
}

impl Ack {
    pub fn of(msg: &Message) -> Self {
        let v = match msg.application_properties.get(ACK_PROPERTY) {
            Some(SimpleValue::String(s)) => s.as_str(),
            Some(SimpleValue::Symbol(s)) => s.0.as_str(),
            _ => return Ack::None,
        };
        match v.to_ascii_lowercase().as_str() {
            "positive" => Ack::Positive,
            "negative" => Ack::Negative,
            "full" => Ack::Full,
            _ => Ack::None,
        }
    }

    fn wants(self, status: Status) -> bool {
        match (self, status) {
            (Ack::Full, _) => true,
            (Ack::Positive, Status::Success) => true,
            (Ack::Negative, s) => s != Status::Success,
            _ => false,
        }
    }
}

/// A feedback record's `statusCode` (IoT Hub's `FeedbackStatusCode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Success,
    Expired,
    DeliveryCountExceeded,
    Rejected,
}

impl Status {
    pub fn code(self) -> &'static str {
        match self {
            Status::Success => "Success",
            Status::Expired => "Expired",
            Status::DeliveryCountExceeded => "DeliveryCountExceeded",
            Status::Rejected => "Rejected",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Status::Success => "Success",
            Status::Expired => "Message expired",
            Status::DeliveryCountExceeded => "Message delivery count exceeded",
            Status::Rejected => "Message rejected",
        }
    }

    /// The `outcome` label of `edgehub_c2d_messages_settled_total`.
    fn label(self) -> &'static str {
        match self {
            Status::Success => "completed",
            Status::Expired => "expired",
            Status::DeliveryCountExceeded => "delivery_count_exceeded",
            Status::Rejected => "rejected",
        }
    }
}

/// Why a C2D message was not queued; the transports map each to their error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("Device {0} not found")]
    DeviceNotFound(String),
    #[error("the queue of device {0} holds its maximum of {MAX_QUEUED} messages")]
    QueueFull(String),
    #[error("the message of {0} bytes exceeds the C2D limit of {MAX_MESSAGE_BYTES} bytes")]
    TooLarge(usize),
    #[error("the message could not be stored: {0}")]
    Store(QueueError),
}

/// Where a C2D message came from (the `source` label of the received counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The service API (`azure-iothub` `Client.send`).
    Service,
    /// The parent (IoT Hub or a parent edge hub), on a leaf device's behalf.
    Upstream,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Service => "service",
            Source::Upstream => "upstream",
        }
    }
}

/// What [`C2d::watch`] finds.
pub enum Watch {
    /// The device's queue: start delivering from it.
    Ready(Arc<DeviceQueue>),
    /// No queue yet: fires with the first message queued for the device, or ends without
    /// firing when a newer subscriber or link of the device replaces this one.
    Waiting(oneshot::Receiver<()>),
}

/// One device's queue.
pub struct DeviceQueue {
    pub device: DeviceId,
    pub endpoint: Arc<Endpoint>,
    /// Explicit abandons per queued message (by sequence); entries leave with their message.
    abandons: Mutex<HashMap<u64, u8>>,
    /// The current C2D link's stop signal: a newer link cancels it.
    link: Mutex<Option<CancellationToken>>,
    /// The parent's messages queued here, by message id (about [`MAX_QUEUED`]: those queued,
    /// and those whose outcome is on its way). A message
    /// the device has settled stays until the upstream link has applied its outcome
    /// ([`C2d::parent_settled`], [`C2d::keep_outcome`]): a redelivery that crosses the outcome
    /// on its way is then recognised, not queued again.
    from_parent: Mutex<HashMap<String, u64>>,
    /// Where the device's outcomes of the parent's messages go: the upstream's C2D link.
    upstream: Mutex<Option<mpsc::Sender<ParentOutcome>>>,
    /// Outcomes no upstream link took, by message id, oldest first (at most [`MAX_QUEUED`]).
    settled_offline: Mutex<VecDeque<ParentOutcome>>,
}

/// The device's outcome of a message from the parent, for the parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentOutcome {
    pub message_id: String,
    pub outcome: Outcome,
}

/// What became of a message from the parent (see [`C2d::enqueue_from_parent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromParent {
    /// Queued; its outcome will come with this message id (none: settle it now).
    Queued(Option<String>),
    /// Already queued here (a redelivery): its outcome will come with this message id.
    Known(String),
    /// Settled already while the parent was away: settle it so.
    Settled(Outcome),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DeviceQueue {
    /// Messages held (pending and delivered, not settled).
    pub fn len(&self) -> usize {
        self.endpoint.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A feedback record as IoT Hub writes it.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub original_message_id: String,
    pub description: String,
    pub device_generation_id: String,
    pub device_id: String,
    pub enqueued_time_utc: String,
    pub status_code: String,
}

/// The C2D queues and the feedback batch.
pub struct C2d {
    /// This hub's device id: the sender of feedback messages.
    hub_device: DeviceId,
    queues: DashMap<String, Arc<DeviceQueue>>,
    /// Subscribers of devices with no queue yet, by queue key: each is told when its device's
    /// first message is queued ([`C2d::watch`]). At most one per device this hub serves.
    waiting: Mutex<HashMap<String, oneshot::Sender<()>>>,
    make: Box<QueueFactory>,
    feedback: Arc<Endpoint>,
    /// Records not yet written into a feedback message (at most [`FEEDBACK_BATCH`]).
    records: Mutex<Vec<Record>>,
    records_ready: Notify,
}

/// The queue key of a device: its id lower-cased, as the hub compares ids.
fn queue_key(device: &DeviceId) -> String {
    device.as_str().to_ascii_lowercase()
}

impl C2d {
    /// The queues come from `make` (given an endpoint id, a queue holding at most what the
    /// caller allows); `recovered` are the store's endpoint ids with messages on disk, whose
    /// C2D queues are opened at once so that their messages expire on time.
    pub fn new(hub_device: DeviceId, make: Box<QueueFactory>, recovered: &[String]) -> Self {
        let feedback = Arc::new(Endpoint::new(
            FEEDBACK_ENDPOINT.to_owned(),
            None,
            make(FEEDBACK_ENDPOINT),
            Arc::new(Notify::new()),
        ));
        let c2d = Self {
            hub_device,
            queues: DashMap::new(),
            waiting: Mutex::new(HashMap::new()),
            make,
            feedback,
            records: Mutex::new(Vec::new()),
            records_ready: Notify::new(),
        };
        for id in recovered {
            if let Some(d) = id.strip_prefix(QUEUE_PREFIX) {
                if let Ok(device) = DeviceId::parse(d) {
                    c2d.queue(&device);
                }
            }
        }
        c2d
    }

    /// The queue of `device`, made on first use. The caller has checked that the device is one
    /// this hub serves, so the map holds at most one entry per known device.
    pub fn queue(&self, device: &DeviceId) -> Arc<DeviceQueue> {
        let key = queue_key(device);
        if let Some(q) = self.queues.get(&key) {
            return q.clone();
        }
        self.queues
            .entry(key.clone())
            .or_insert_with(|| {
                let id = format!("{QUEUE_PREFIX}{key}");
                let store = (self.make)(&id);
                Arc::new(DeviceQueue {
                    device: device.clone(),
                    endpoint: Arc::new(Endpoint::new(id, None, store, Arc::new(Notify::new()))),
                    abandons: Mutex::new(HashMap::new()),
                    link: Mutex::new(None),
                    from_parent: Mutex::new(HashMap::new()),
                    upstream: Mutex::new(None),
                    settled_offline: Mutex::new(VecDeque::new()),
                })
            })
            .clone()
    }

    /// A subscriber's view of `device`'s queue: the queue if it exists, or else a signal that
    /// fires when the device's first message is queued. A device that never gets a message
    /// then costs its subscriber no queue and no delivery pump. A newer watch of the device
    /// replaces this one, and so does a link of the device ([`C2d::replace_link`]); the
    /// replaced signal ends without firing.
    pub fn watch(&self, device: &DeviceId) -> Watch {
        match self.queues.entry(queue_key(device)) {
            dashmap::mapref::entry::Entry::Occupied(e) => Watch::Ready(e.get().clone()),
            dashmap::mapref::entry::Entry::Vacant(e) => {
                // Registered under the map's lock for this key, which the queue's making takes
                // too: a message queued after this finds the waiter, one queued before it left
                // a queue here.
                let (tx, rx) = oneshot::channel();
                lock(&self.waiting).insert(e.key().clone(), tx);
                Watch::Waiting(rx)
            }
        }
    }

    /// Forgets `device`'s waiting subscriber if it has gone (unsubscribed, disconnected).
    pub fn unwatch(&self, device: &DeviceId) {
        let key = queue_key(device);
        let mut waiting = lock(&self.waiting);
        if waiting.get(&key).is_some_and(|tx| tx.is_closed()) {
            waiting.remove(&key);
        }
    }

    /// Tells `device`'s waiting subscriber, if any, that its queue holds a message.
    fn wake(&self, device: &DeviceId) {
        let mut waiting = lock(&self.waiting);
        if waiting.is_empty() {
            return;
        }
        if let Some(tx) = waiting.remove(&queue_key(device)) {
            let _ = tx.send(());
        }
    }

    /// Queues `msg` for `device` (known to this hub: the caller looked it up through
    /// `core::auth`). Not yet durable: the caller syncs the store before it acknowledges.
    pub fn enqueue(
        &self,
        device: &DeviceId,
        mut msg: Message,
        source: Source,
    ) -> Result<u64, SendError> {
        if msg.body.len() > MAX_MESSAGE_BYTES {
            return Err(SendError::TooLarge(msg.body.len()));
        }
        let expires_ms = msg
            .properties
            .as_ref()
            .and_then(|p| p.absolute_expiry_time.as_ref())
            .map(|t| t.milliseconds())
            .unwrap_or(msg.enqueued_ms.saturating_add(DEFAULT_TTL_MS));
        // The device sees itself as the message's `to`, as IoT Hub addresses it.
        let to = format!("/devices/{device}/messages/devicebound");
        msg.properties.get_or_insert_with(Properties::default).to = Some(to);
        msg.from = Identity::Device(device.clone());
        let q = self.queue(device);
        match q
            .endpoint
            .store
            .try_push(Arc::new(msg), 0, Some(expires_ms))
        {
            Ok(seq) => {
                q.endpoint.ready.notify_one();
                self.wake(device);
                metrics::counter!(m::C2D_RECEIVED, "source" => source.label()).increment(1);
                Ok(seq)
            }
            Err(QueueError::Full) => Err(SendError::QueueFull(device.to_string())),
            Err(e) => Err(SendError::Store(e)),
        }
    }

    /// Queues a message the parent sent on `device`'s behalf, unless it is queued already or
    /// was settled while the parent was away (see the module doc). Not yet durable.
    pub fn enqueue_from_parent(
        &self,
        device: &DeviceId,
        mut msg: Message,
    ) -> Result<FromParent, SendError> {
        let q = self.queue(device);
        let mid = msg
            .properties
            .as_ref()
            .and_then(|p| p.message_id.as_ref())
            .map(message_id_text);
        if let Some(mid) = &mid {
            // Both looked at under their locks (in this order, as `keep_and_forget` takes
            // them): an outcome kept meanwhile is in one or the other.
            let mut known = lock(&q.from_parent);
            let mut offline = lock(&q.settled_offline);
            if let Some(i) = offline.iter().position(|o| &o.message_id == mid) {
                let done = offline.remove(i).map(|o| o.outcome);
                if let Some(outcome) = done {
                    return Ok(FromParent::Settled(outcome));
                }
            }
            if known.contains_key(mid) {
                return Ok(FromParent::Known(mid.clone()));
            }
            // Known before it is queued: a device that settles it before this returns finds
            // it here (its sequence is filled in below).
            known.insert(mid.clone(), u64::MAX);
        }
        msg.annotations.insert(
            OwnedKey::Symbol(Symbol::from(FROM_PARENT)),
            Value::Bool(true),
        );
        let seq = match self.enqueue(device, msg, Source::Upstream) {
            Ok(seq) => seq,
            Err(e) => {
                if let Some(mid) = &mid {
                    lock(&q.from_parent).remove(mid);
                }
                return Err(e);
            }
        };
        if let Some(mid) = &mid {
            if let Some(s) = lock(&q.from_parent).get_mut(mid) {
                *s = seq;
            }
        }
        Ok(FromParent::Queued(mid))
    }

    /// Makes the upstream's C2D link of `device` the one its outcomes go to (a newer link
    /// replaces an older one).
    pub fn attach_upstream(&self, device: &DeviceId) -> mpsc::Receiver<ParentOutcome> {
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        *lock(&self.queue(device).upstream) = Some(tx);
        rx
    }

    /// Tells the parent the device's outcome of one of its messages, or keeps it for the
    /// parent's redelivery when no upstream link takes it now.
    fn to_parent(&self, queue: &DeviceQueue, q: &Queued, outcome: Outcome) {
        let Some(mid) = q
            .msg
            .properties
            .as_ref()
            .and_then(|p| p.message_id.as_ref())
            .map(message_id_text)
        else {
            return;
        };
        let o = ParentOutcome {
            message_id: mid,
            outcome,
        };
        let sent = match lock(&queue.upstream).as_ref() {
            Some(tx) => tx.try_send(o.clone()).is_ok(),
            None => false,
        };
        // Sent: the upstream link forgets the message once it has applied the outcome.
        if !sent {
            keep_and_forget(queue, o);
        }
    }

    /// Keeps an outcome the upstream could not apply now (the parent's delivery was settled
    /// already, by an abandon, and the redelivery is on its way; or the link ended), for the
    /// parent's next delivery of that message.
    pub fn keep_outcome(&self, device: &DeviceId, o: ParentOutcome) {
        keep_and_forget(&self.queue(device), o);
    }

    /// The upstream link settled the parent's delivery with `o`: a final outcome ends the
    /// message here (a later delivery with its id is a new message).
    pub fn parent_settled(&self, device: &DeviceId, o: &ParentOutcome) {
        if o.outcome != Outcome::Released {
            lock(&self.queue(device).from_parent).remove(&o.message_id);
        }
    }

    /// Ends an upstream C2D link's share of `device`'s outcomes: those still on their way to
    /// it are kept for the parent's redelivery.
    pub fn detach_upstream(&self, device: &DeviceId, outcomes: &mut mpsc::Receiver<ParentOutcome>) {
        let queue = self.queue(device);
        let left: Vec<ParentOutcome> = {
            // Under the lock `to_parent` sends under: no outcome is half sent while the
            // channel is closed and emptied.
            let mut slot = lock(&queue.upstream);
            outcomes.close();
            let left = std::iter::from_fn(|| outcomes.try_recv().ok()).collect();
            if slot.as_ref().is_some_and(|tx| tx.is_closed()) {
                *slot = None;
            }
            left
        };
        for o in left {
            keep_and_forget(&queue, o);
        }
    }

    /// Registers a device's new C2D link and stops the one it replaces.
    pub fn replace_link(&self, queue: &DeviceQueue, link: CancellationToken) {
        // A subscriber waiting for the first message is replaced too.
        lock(&self.waiting).remove(&queue_key(&queue.device));
        if let Some(old) = lock(&queue.link).replace(link) {
            old.cancel();
        }
    }

    /// What a delivered message's outcome means: counts, abandons, feedback. Called by the
    /// transport's delivery link after the pump has applied the outcome to the queue.
    pub fn settled(&self, queue: &DeviceQueue, q: &Queued, outcome: &Result<Outcome, String>) {
        match outcome {
            Ok(Outcome::Accepted) => {
                lock(&queue.abandons).remove(&q.seq);
                self.finished(queue, q, Status::Success);
            }
            Ok(Outcome::Rejected(_)) => {
                lock(&queue.abandons).remove(&q.seq);
                self.finished(queue, q, Status::Rejected);
            }
            Ok(Outcome::Released) => {
                *lock(&queue.abandons).entry(q.seq).or_default() += 1;
                metrics::counter!(m::C2D_SETTLED, "outcome" => "abandoned").increment(1);
                if is_from_parent(&q.msg) {
                    self.to_parent(queue, q, Outcome::Released);
                }
            }
            // The link ended first: back to the queue, not an abandon.
            Err(_) => {}
        }
    }

    fn finished(&self, queue: &DeviceQueue, q: &Queued, status: Status) {
        metrics::counter!(m::C2D_SETTLED, "outcome" => status.label()).increment(1);
        if is_from_parent(&q.msg) {
            // The parent writes the feedback; it expires its copy itself.
            match status {
                Status::Success => self.to_parent(queue, q, Outcome::Accepted),
                Status::Rejected | Status::DeliveryCountExceeded => {
                    self.to_parent(queue, q, Outcome::Rejected(status.description().into()))
                }
                Status::Expired => {
                    lock(&queue.from_parent).retain(|_, seq| *seq != q.seq);
                }
            }
            return;
        }
        if Ack::of(&q.msg).wants(status) {
            self.feedback(&queue.device, &q.msg, status);
        }
    }

    /// Adds a feedback record; it is written out with its batch.
    fn feedback(&self, device: &DeviceId, msg: &Message, status: Status) {
        let record = Record {
            original_message_id: msg
                .properties
                .as_ref()
                .and_then(|p| p.message_id.as_ref())
                .map(message_id_text)
                .unwrap_or_default(),
            description: status.description().to_owned(),
            device_generation_id: String::new(),
            device_id: device.to_string(),
            enqueued_time_utc: crate::model::time::rfc3339_ms(now_ms()),
            status_code: status.code().to_owned(),
        };
        let full = {
            let mut records = lock(&self.records);
            records.push(record);
            records.len() >= FEEDBACK_BATCH
        };
        if full {
            self.write_feedback();
        }
        self.records_ready.notify_one();
    }

    /// Writes the waiting records into one feedback message in the `$feedback` queue. Not yet
    /// durable: the next sync of the store makes it so.
    pub fn write_feedback(&self) {
        let records = std::mem::take(&mut *lock(&self.records));
        if records.is_empty() {
            return;
        }
        let n = records.len();
        let body = match serde_json::to_vec(&records) {
            Ok(b) => b,
            Err(e) => {
                warn!("feedback records not encoded: {e}");
                return;
            }
        };
        let msg = feedback_message(body, &self.hub_device);
        let expires = msg.enqueued_ms.saturating_add(FEEDBACK_TTL_MS);
        match self
            .feedback
            .store
            .try_push(Arc::new(msg), 0, Some(expires))
        {
            Ok(_) => {
                self.feedback.ready.notify_one();
                metrics::counter!(m::C2D_FEEDBACK, "result" => "queued").increment(n as u64);
            }
            Err(e) => {
                warn!(records = n, "feedback records dropped: {e}");
                metrics::counter!(m::C2D_FEEDBACK, "result" => "dropped").increment(n as u64);
            }
        }
    }

    /// The feedback queue, which the service's feedback link delivers from.
    pub fn feedback_endpoint(&self) -> &Arc<Endpoint> {
        &self.feedback
    }

    /// Drops the expired messages of every queue (feedback `Expired` where asked). Blocking
    /// (the store may read from disk): call it off the async workers.
    pub fn expire_now(&self) {
        let queues: Vec<Arc<DeviceQueue>> = self.queues.iter().map(|e| e.clone()).collect();
        for q in queues {
            for e in q.endpoint.store.expire(now_ms()) {
                self.expired(&q, &e);
            }
        }
        self.feedback.expire_now();
    }

    fn expired(&self, queue: &DeviceQueue, q: &Queued) {
        lock(&queue.abandons).remove(&q.seq);
        self.finished(queue, q, Status::Expired);
        queue.endpoint.space.notify_waiters();
    }

    /// Drops every message queued for `device`, as IoT Hub drops a deleted device's queue, so
    /// that a device created again with the same id starts empty; returns how many. Messages
    /// in flight on a link still open stay until that link ends. Blocking (the store may read
    /// from disk): call it off the async workers.
    pub fn purge(&self, device: &DeviceId) -> usize {
        let Some(queue) = self.queues.get(&queue_key(device)).map(|q| q.clone()) else {
            return 0;
        };
        let mut purged = 0;
        while let Some(q) = queue.endpoint.pop() {
            queue.endpoint.ack(q.seq);
            purged += 1;
        }
        queue.endpoint.store.write_removals();
        lock(&queue.abandons).clear();
        lock(&queue.from_parent).clear();
        lock(&queue.settled_offline).clear();
        purged
    }

    /// Messages held in every device queue (for `edgehub_c2d_queue_length`).
    pub fn queued(&self) -> usize {
        self.queues.iter().map(|e| e.len()).sum()
    }
}

/// Keeps a final outcome for the parent's redelivery and ends the message here (an abandon
/// needs nothing: the parent has the message back).
fn keep_and_forget(queue: &DeviceQueue, o: ParentOutcome) {
    if o.outcome == Outcome::Released {
        return;
    }
    // Both under their locks (in `enqueue_from_parent`'s order): a redelivery finds the
    // message known or its outcome kept, never neither.
    let mut known = lock(&queue.from_parent);
    let mut offline = lock(&queue.settled_offline);
    known.remove(&o.message_id);
    if offline.len() >= MAX_QUEUED {
        offline.pop_front();
    }
    offline.push_back(o);
}

fn is_from_parent(msg: &Message) -> bool {
    msg.annotations
        .contains_key(&OwnedKey::Symbol(Symbol::from(FROM_PARENT)))
}

/// The feedback message: IoT Hub's content type, the hub's name as `user-id`, a uuid
/// `message-id`, the records as one JSON array.
fn feedback_message(body: Vec<u8>, from: &DeviceId) -> Message {
    let properties = Properties {
        message_id: Some(MessageId::String(uuid::Uuid::new_v4().to_string())),
        content_type: Some(Symbol::from(FEEDBACK_CONTENT_TYPE)),
        content_encoding: Some(Symbol::from("utf-8")),
        ..Default::default()
    };
    Message {
        body,
        properties: Some(properties),
        application_properties: OrderedMap::new(),
        annotations: OrderedMap::new(),
        // Feedback has no sending identity: the hub itself.
        from: Identity::Device(from.clone()),
        output: None,
        enqueued_ms: now_ms(),
        twin_change: false,
        id: crate::model::message::next_id(),
    }
}

/// The feedback message's AMQP extras the service SDKs read: `user-id` = the hub name
/// (binary), `iothub-enqueuedtime` (timestamp).
pub fn feedback_user_id(iothub_hostname: &str) -> Binary {
    let name = iothub_hostname.split('.').next().unwrap_or(iothub_hostname);
    Binary::from(name.as_bytes().to_vec())
}

pub fn enqueued_timestamp(msg: &Message) -> Timestamp {
    Timestamp::from_milliseconds(msg.enqueued_ms)
}

/// Writes feedback batches [`FEEDBACK_DELAY`] after their first record (a full batch is
/// written at once by whoever fills it) and makes them durable; what waits at shutdown is
/// written before the task ends.
pub async fn feedback_writer(core: Arc<super::HubCore>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = core.c2d.records_ready.notified() => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(FEEDBACK_DELAY) => {}
        }
        core.c2d.write_feedback();
        if let Err(e) = core.sync().await {
            warn!("feedback not made durable: {e}");
        }
    }
    core.c2d.write_feedback();
    let _ = core.sync().await;
}

/// A device's queue as the delivery pump's [`Feed`]: expired messages and those abandoned
/// [`MAX_DELIVERY_COUNT`] times are dead-lettered on the way (with their feedback).
pub struct DeviceFeed {
    c2d: Arc<C2d>,
    queue: Arc<DeviceQueue>,
}

impl DeviceFeed {
    pub fn new(c2d: Arc<C2d>, queue: Arc<DeviceQueue>) -> Self {
        Self { c2d, queue }
    }
}

impl Feed for DeviceFeed {
    fn refresh(&mut self) -> Option<Arc<Notify>> {
        Some(self.queue.endpoint.ready.clone())
    }

    fn next(&mut self) -> Option<(Arc<Endpoint>, Queued)> {
        let c2d = &self.c2d;
        let ep = &self.queue.endpoint;
        loop {
            let popped = ep.store.pop(now_ms());
            for e in &popped.expired {
                c2d.expired(&self.queue, e);
            }
            let q = popped.item?;
            let abandons = lock(&self.queue.abandons).get(&q.seq).copied();
            if abandons.is_some_and(|n| n >= MAX_DELIVERY_COUNT) {
                debug!(device = %self.queue.device, seq = q.seq, "C2D message abandoned too often; dead-lettered");
                lock(&self.queue.abandons).remove(&q.seq);
                let _ = ep.ack(q.seq);
                c2d.finished(&self.queue, &q, Status::DeliveryCountExceeded);
                continue;
            }
            metrics::counter!(m::C2D_DELIVERED).increment(1);
            return Some((ep.clone(), q));
        }
    }
}

#[cfg(test)]
mod tests;
