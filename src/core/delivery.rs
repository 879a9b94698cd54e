//! Delivery: the one pump that moves messages from endpoint queues to a peer, for every
//! transport (a module's input link, the upstream telemetry links).
//!
//! The pump keeps up to a [`Window`] of unsettled transfers in flight (a number of messages, and
//! of bytes: a module's input link holds at most `limits.maxUnsettledBytesPerLink` plus one
//! message). Accepted and rejected messages
//! leave their queue; released (or modified) ones go back to their place with a higher delivery
//! count; when the pump ends, every message still in flight goes back. An acknowledgement whose
//! removal is not yet written out counts against the window too (see [`Unwritten`]): after a
//! crash of the hub at most `window` messages of one pump come again. When the pump ends,
//! outcomes that arrive before its link is closed (up to [`DRAIN_WAIT`]) still count, so a peer
//! that settles and closes at once does not get those messages again, and the removals are
//! written out.
//!
//! Where the messages come from is a [`Feed`] (here: a module's inputs, or the `$upstream`
//! queue); how one is sent and what its outcome means for metrics and logs is the transport's
//! [`Link`]. A link either returns a future per transfer (AMQP: fe2o3's settlement) or hands
//! its transfers over in bursts ([`Link::flush`]) and passes their outcomes back in bursts
//! through an [`outcomes`] channel ([`Link::outcomes`]): a transport whose connection task
//! owns the writer and the acknowledgements (MQTT) then costs one handoff per burst each way,
//! not a channel and a future per message.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{future::BoxFuture, stream::FuturesUnordered, StreamExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    core::HubCore,
    model::identity::ModuleId,
    store::queue::{Endpoint, Queued, Unwritten},
};

/// Bound on one transfer waiting for link credit.
pub const SEND_WAIT: Duration = Duration::from_secs(60);
/// How long a pump that ends waits for the outcomes of its deliveries in flight (they come
/// before the end of the link or of its session, which a silent peer may hold back).
pub const DRAIN_WAIT: Duration = Duration::from_secs(5);
/// How often a feed without a queue (no route feeds it yet) looks again.
const NO_QUEUE_POLL: Duration = Duration::from_secs(1);

/// The peer's outcome for one transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Taken: the message leaves its queue.
    Accepted,
    /// Refused as invalid, with the peer's reason: the message leaves its queue (dropped).
    Rejected(String),
    /// Not taken this time (released, modified): the message goes back to its place.
    Released,
}

/// The outcome of one transfer, or why the transfer failed (the link is gone).
pub type Delivery = BoxFuture<'static, Result<Outcome, String>>;

/// What a link did with one message.
pub enum Sent {
    /// The transfer is on its way; its outcome follows.
    InFlight(Delivery),
    /// The transfer is handed over (at the latest by the next [`Link::flush`]); its outcome
    /// comes through [`Link::outcomes`] under the key `send` was given.
    Handed,
    /// The link cannot carry this message (counted and logged by the link): it leaves its
    /// queue.
    Dropped,
}

/// Why a pump ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Stopped by its token, or the peer ended the link with nothing in flight.
    Stopped,
    /// The peer granted no credit for [`SEND_WAIT`].
    Stalled,
    /// A transfer failed: the link is gone.
    Failed(String),
}

/// A transport's side of the pump: one outgoing link (or a set of them).
pub trait Link: Send {
    /// Starts an unsettled transfer of `q`, taken from `ep`; `key` names it in
    /// [`Link::outcomes`] when the link answers [`Sent::Handed`]. An error ends the pump.
    fn send(
        &mut self,
        ep: &Endpoint,
        q: &Queued,
        key: u64,
    ) -> impl Future<Output = Result<Sent, String>> + Send;

    /// Hands over the transfers `send` kept back; called once a refill of the window ends. An
    /// error ends the pump.
    fn flush(&mut self) -> impl Future<Output = Result<(), String>> + Send {
        std::future::ready(Ok(()))
    }

    /// Appends the outcomes of [`Sent::Handed`] transfers that have come in to `into`, waiting
    /// until there is at least one; `false` once none can come any more (the link is gone).
    fn outcomes(&mut self, _into: &mut Vec<Settled>) -> impl Future<Output = bool> + Send {
        std::future::pending()
    }

    /// Resolves when the peer ends the link; awaited only while nothing is in flight.
    fn detached(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    /// Told of every outcome (after the queue has been told), for metrics and logs;
    /// `Err` when the transfer failed.
    fn settled(
        &mut self,
        ep: &Endpoint,
        q: &Queued,
        outcome: &Result<Outcome, String>,
        sent: Instant,
    );

    /// Ends the link; runs while the outcomes still in flight are drained.
    fn close(&mut self, why: &Ended) -> impl Future<Output = ()> + Send;
}

/// Where a pump takes its messages from.
pub trait Feed: Send {
    /// Looks at the routes again; the notification that says a message is ready, or `None`
    /// when there is no queue to take from yet.
    fn refresh(&mut self) -> Option<Arc<Notify>>;
    /// The next message to send, with its endpoint.
    fn next(&mut self) -> Option<(Arc<Endpoint>, Queued)>;
}

/// How much a pump keeps in flight.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Unsettled transfers (acknowledgements not yet written out count too).
    pub messages: usize,
    /// Bytes of the unsettled transfers (`limits.maxUnsettledBytesPerLink`); one message
    /// always goes, so a pump holds at most this plus one message.
    pub bytes: u64,
}

/// Moves messages from `feed` to `link`, up to `window` in flight, until `stop`, the peer's
/// end or a failure; then returns every message in flight and says why it ended.
pub async fn pump<F: Feed, L: Link>(
    mut feed: F,
    mut link: L,
    window: Window,
    stop: &CancellationToken,
) -> Ended {
    // Acknowledgements are written out once a quarter of the window waits for it.
    let write_at = (window.messages / 4).max(1);
    let mut state = InFlight::default();
    let mut in_flight = FuturesUnordered::new();
    // The outcomes a link passes back in bursts; the buffer is reused.
    let mut settled: Vec<Settled> = Vec::new();
    let mut ended = Ended::Stopped;
    // One waiter for the whole pump, not one registration per turn of the loop.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    'outer: loop {
        let Some(ready) = feed.refresh() else {
            tokio::select! {
                _ = &mut stopped => break,
                _ = tokio::time::sleep(NO_QUEUE_POLL) => continue,
            }
        };
        let mut unwritten = state.unwritten.count();
        if unwritten >= window.messages && state.outstanding.is_empty() {
            // Nothing in flight to wait for: make room now.
            state.unwritten.write().await;
            unwritten = state.unwritten.count();
        }
        let room = window.messages.saturating_sub(unwritten);
        let has_room = |s: &InFlight| {
            s.outstanding.len() < room && (s.outstanding.is_empty() || s.bytes < window.bytes)
        };
        // Waited on only when the window has room and the feed ran dry: a full window waits for
        // outcomes alone, so messages queued meanwhile do not wake the pump for nothing.
        let notified = ready.notified();
        tokio::pin!(notified);
        let mut dry = false;
        if has_room(&state) {
            // Registered before the feed is looked at, so a message queued after that look
            // still wakes the pump.
            notified.as_mut().enable();
        }
        let mut handed = false;
        while has_room(&state) {
            let Some((ep, q)) = feed.next() else {
                dry = true;
                break;
            };
            let key = state.next_key();
            match tokio::time::timeout(SEND_WAIT, link.send(&ep, &q, key)).await {
                Ok(Ok(Sent::InFlight(delivery))) => {
                    state.start(key, ep, q);
                    in_flight.push(async move { (key, delivery.await) });
                }
                Ok(Ok(Sent::Handed)) => {
                    state.start(key, ep, q);
                    handed = true;
                }
                Ok(Ok(Sent::Dropped)) => {
                    ep.ack(q.seq);
                }
                Ok(Err(e)) => {
                    ep.release(q.seq);
                    ended = Ended::Failed(e);
                    break 'outer;
                }
                Err(_) => {
                    ep.release(q.seq);
                    ended = Ended::Stalled;
                    break 'outer;
                }
            }
        }
        if handed {
            match tokio::time::timeout(SEND_WAIT, link.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    ended = Ended::Failed(e);
                    break 'outer;
                }
                Err(_) => {
                    ended = Ended::Stalled;
                    break 'outer;
                }
            }
        }
        let idle = state.outstanding.is_empty();
        tokio::select! {
            _ = &mut stopped => break,
            ev = link_event(&mut link, idle, &mut settled) => {
                match ev {
                    LinkEvent::Detached => break,
                    LinkEvent::Gone => {
                        ended = Ended::Failed("the link ended before its transfers were settled".into());
                        break;
                    }
                    LinkEvent::Outcomes => {
                        for (key, result) in settled.drain(..) {
                            if let Err(e) = state.settle(key, result, &mut link) {
                                ended = Ended::Failed(e);
                                break 'outer;
                            }
                        }
                        if state.unwritten.count() >= write_at {
                            state.unwritten.write().await;
                        }
                    }
                }
            }
            _ = &mut notified, if dry => {}
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                // Every outcome that is in already, before the feed and the window are looked
                // at again: a peer settles in bursts, and this refills the window in one.
                let mut next = Some(done);
                while let Some((key, result)) = next {
                    if let Err(e) = state.settle(key, result, &mut link) {
                        ended = Ended::Failed(e);
                        break 'outer;
                    }
                    next = std::future::poll_fn(|cx| {
                        std::task::Poll::Ready(match in_flight.poll_next_unpin(cx) {
                            std::task::Poll::Ready(Some(d)) => Some(d),
                            _ => None,
                        })
                    })
                    .await;
                }
                if state.unwritten.count() >= write_at {
                    state.unwritten.write().await;
                }
            }
        }
    }
    // Every delivery still in flight ends once the session has handled what the peer sent
    // before the link (or its session) ended: with the peer's outcome, or with an error when
    // the link is gone. So outcomes sent just before a close are applied, not lost.
    let deadline = tokio::time::Instant::now() + DRAIN_WAIT;
    let mut drained = Vec::new();
    {
        let closing = link.close(&ended);
        let draining = async {
            while let Some(done) = in_flight.next().await {
                drained.push(done);
            }
        };
        let both = futures_util::future::join(closing, draining);
        if tokio::time::timeout_at(deadline, both).await.is_err() {
            debug!("the peer did not settle its deliveries in flight in time");
        }
    }
    for (key, result) in drained {
        let _ = state.settle(key, result, &mut link);
    }
    // Handed transfers: their outcomes until none is in flight, the link is gone, or time is up.
    while !state.outstanding.is_empty() {
        match tokio::time::timeout_at(deadline, link.outcomes(&mut settled)).await {
            Ok(more) => {
                for (key, result) in settled.drain(..) {
                    let _ = state.settle(key, result, &mut link);
                }
                if !more {
                    break;
                }
            }
            Err(_) => {
                debug!("the peer did not settle its deliveries in flight in time");
                break;
            }
        }
    }
    for (_, p) in state.outstanding.drain() {
        p.ep.release(p.q.seq);
    }
    state.unwritten.write().await;
    ended
}

/// A transfer's key and its outcome, or why the transfer failed (the link is gone).
pub type Settled = (u64, Result<Outcome, String>);

/// What the pump's link said while the pump waited.
enum LinkEvent {
    /// The peer ended the link with nothing in flight.
    Detached,
    /// Outcomes of handed transfers came in.
    Outcomes,
    /// No more outcomes can come, with transfers in flight.
    Gone,
}

/// The link's end while nothing is in flight, else its next outcomes (one borrow of the link
/// for both).
async fn link_event<L: Link>(link: &mut L, idle: bool, into: &mut Vec<Settled>) -> LinkEvent {
    if idle {
        link.detached().await;
        LinkEvent::Detached
    } else if link.outcomes(into).await {
        LinkEvent::Outcomes
    } else {
        LinkEvent::Gone
    }
}

/// One transfer in flight.
struct Pending {
    ep: Arc<Endpoint>,
    q: Queued,
    /// Its bytes, counted against the window.
    size: u64,
    sent: Instant,
}

/// The pump's transfers in flight and the acknowledgements not yet written out.
#[derive(Default)]
struct InFlight {
    outstanding: HashMap<u64, Pending>,
    /// Bytes of the messages in flight.
    bytes: u64,
    unwritten: Unwritten,
    last_key: u64,
}

impl InFlight {
    fn next_key(&mut self) -> u64 {
        self.last_key += 1;
        self.last_key
    }

    fn start(&mut self, key: u64, ep: Arc<Endpoint>, q: Queued) {
        let size = q.msg.size() as u64;
        self.bytes += size;
        let sent = Instant::now();
        self.outstanding.insert(key, Pending { ep, q, size, sent });
    }

    /// Applies the outcome of one transfer to its queue and tells the link. An error when the
    /// transfer failed (the message went back). An unknown key (settled already) is ignored.
    fn settle<L: Link>(
        &mut self,
        key: u64,
        result: Result<Outcome, String>,
        link: &mut L,
    ) -> Result<(), String> {
        let Some(p) = self.outstanding.remove(&key) else {
            return Ok(());
        };
        self.bytes = self.bytes.saturating_sub(p.size);
        match &result {
            Ok(Outcome::Accepted | Outcome::Rejected(_)) => self.unwritten.ack(&p.ep, p.q.seq),
            Ok(Outcome::Released) | Err(_) => p.ep.release(p.q.seq),
        }
        link.settled(&p.ep, &p.q, &result, p.sent);
        result.map(|_| ())
    }
}

/// Outcomes passed from the task that learns them (a connection's task, from the peer's
/// acknowledgements) to a pump whose link answers [`Sent::Handed`]: appended in bursts, taken
/// by the pump in one swap of buffers, at most one wake-up per burst. Its content is bounded by
/// the pump's window (one outcome per transfer in flight).
pub fn outcome_channel() -> (OutcomeSender, OutcomeReceiver) {
    let shared = Arc::new(OutcomeShared {
        batch: Mutex::new(OutcomeBatch::default()),
        ready: Notify::new(),
    });
    (
        OutcomeSender {
            shared: shared.clone(),
        },
        OutcomeReceiver { shared },
    )
}

struct OutcomeShared {
    batch: Mutex<OutcomeBatch>,
    ready: Notify,
}

impl OutcomeShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutcomeBatch> {
        // Only vectors and a flag behind it: usable after a panic elsewhere.
        self.batch.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct OutcomeBatch {
    settled: Vec<Settled>,
    /// The sender is gone: nothing more will come.
    closed: bool,
}

/// The side that learns outcomes. Dropping it tells the pump that no more will come.
pub struct OutcomeSender {
    shared: Arc<OutcomeShared>,
}

impl OutcomeSender {
    /// Passes every outcome in `done` on, leaving it empty.
    pub fn send(&self, done: &mut Vec<Settled>) {
        if done.is_empty() {
            return;
        }
        let wake = {
            let mut b = self.shared.lock();
            let wake = b.settled.is_empty();
            b.settled.append(done);
            wake
        };
        // Otherwise the pump has been woken for the outcomes still waiting.
        if wake {
            self.shared.ready.notify_one();
        }
    }
}

impl Drop for OutcomeSender {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_one();
    }
}

/// The pump's side of an outcome channel (what [`Link::outcomes`] reads).
pub struct OutcomeReceiver {
    shared: Arc<OutcomeShared>,
}

impl OutcomeReceiver {
    /// Appends what has come in to `into`, waiting for at least one outcome; `false` once the
    /// sender is gone and everything it sent was taken.
    pub async fn recv(&mut self, into: &mut Vec<Settled>) -> bool {
        loop {
            {
                let mut b = self.shared.lock();
                if !b.settled.is_empty() {
                    if into.is_empty() {
                        // The pump's empty buffer goes back for the next burst.
                        std::mem::swap(&mut b.settled, into);
                    } else {
                        into.append(&mut b.settled);
                    }
                    return true;
                }
                if b.closed {
                    return false;
                }
            }
            // A notification sent since the look above is kept as a permit: none is lost.
            self.shared.ready.notified().await;
        }
    }
}

/// A module's input endpoints: the best priority first, round-robin among endpoints whose heads
/// have the same priority; after a route reload the module may be fed by more endpoints.
pub struct ModuleInputs {
    core: Arc<HubCore>,
    module: ModuleId,
    generation: u64,
    endpoints: Vec<Arc<Endpoint>>,
    ready: Arc<Notify>,
    cursor: usize,
}

impl ModuleInputs {
    pub fn new(core: Arc<HubCore>, module: ModuleId) -> Self {
        let router = core.router();
        let generation = router.generation;
        let (endpoints, ready) = router.module_inputs(&module);
        drop(router);
        Self {
            core,
            module,
            generation,
            endpoints,
            ready,
            cursor: 0,
        }
    }
}

impl Feed for ModuleInputs {
    fn refresh(&mut self) -> Option<Arc<Notify>> {
        let router = self.core.router();
        if router.generation != self.generation {
            self.generation = router.generation;
            self.endpoints = router.module_inputs(&self.module).0;
        }
        Some(self.ready.clone())
    }

    fn next(&mut self) -> Option<(Arc<Endpoint>, Queued)> {
        let endpoints = &self.endpoints;
        if let [e] = endpoints.as_slice() {
            // One input endpoint, the usual case: its queue orders its priorities itself.
            return e.pop().map(|q| (e.clone(), q));
        }
        let n = endpoints.len();
        let best = endpoints
            .iter()
            .filter_map(|e| e.store.head_priority())
            .min()?;
        for i in 0..n {
            let e = &endpoints[(self.cursor + i) % n];
            if e.store.head_priority() != Some(best) {
                continue;
            }
            if let Some(q) = e.pop() {
                self.cursor = (self.cursor + i + 1) % n;
                return Some((e.clone(), q));
            }
        }
        // Only expired messages were at the heads (pop dropped them): look again.
        endpoints
            .iter()
            .find_map(|e| e.pop().map(|q| (e.clone(), q)))
    }
}

/// The `$upstream` queue (endpoint `iothub`), once a route feeds it.
pub struct Upstream {
    core: Arc<HubCore>,
    endpoint: Option<Arc<Endpoint>>,
}

impl Upstream {
    pub fn new(core: Arc<HubCore>) -> Self {
        Self {
            core,
            endpoint: None,
        }
    }
}

impl Feed for Upstream {
    fn refresh(&mut self) -> Option<Arc<Notify>> {
        self.endpoint = self
            .core
            .router()
            .endpoints()
            .find(|e| e.id == "iothub")
            .cloned();
        self.endpoint.as_ref().map(|e| e.ready.clone())
    }

    fn next(&mut self) -> Option<(Arc<Endpoint>, Queued)> {
        let ep = self.endpoint.as_ref()?;
        ep.pop().map(|q| (ep.clone(), q))
    }
}
