//! Endpoint queues: where a routed message waits until its endpoint takes it.
//!
//! The [`QueueStore`] trait is the interface the durable store implements; [`MemoryQueue`] is
//! the in-memory implementation. Invariants every implementation keeps:
//!
//! * a message is counted from `push` until `ack` (pending + in flight ≤ capacity), so a slow
//!   consumer fills its queue and then holds back senders, never the hub's memory;
//! * `pop` hands out the best priority first (0 highest), FIFO within a priority, and moves the
//!   message to "in flight"; `release` puts it back where it was (same priority, same sequence),
//!   so a redelivery keeps its place;
//! * an expired message is never handed out: `pop` drops it and reports it.
//!
//! [`Endpoint`] wraps a store with the wake-ups: consumers wait on `ready`, producers on `space`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::Notify;

use crate::{metrics as m, model::message::Message};

/// A queued message as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Queued {
    pub seq: u64,
    pub priority: u32,
    pub msg: Arc<Message>,
    /// Milliseconds since the epoch after which it must not be delivered.
    pub expires_ms: Option<i64>,
    /// How many times it was handed out before.
    pub delivery_count: u8,
}

/// How often a push waiting for a compacting store looks again.
const STORE_BUSY_POLL: std::time::Duration = std::time::Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("the queue is full")]
    Full,
    #[error("the queue is closed")]
    Closed,
    #[error("the message could not be stored")]
    Storage,
    #[error("the store is full (storeLimits.maxSizeBytes)")]
    StoreFull,
    /// The store's files are past their bound until a compaction ends: worth waiting for.
    #[error("the store is compacting to keep its files within storeLimits.maxSizeBytes")]
    StoreBusy,
}

/// What a `pop` found.
#[derive(Debug)]
pub struct Popped {
    pub item: Option<Queued>,
    /// Messages that expired on the way, by priority.
    pub expired: Vec<Queued>,
}

/// The queue interface. Implementations are synchronous and quick; waiting is [`Endpoint`]'s job.
pub trait QueueStore: Send + Sync + 'static {
    fn try_push(
        &self,
        msg: Arc<Message>,
        priority: u32,
        expires_ms: Option<i64>,
    ) -> Result<u64, QueueError>;
    /// [`QueueStore::try_push`] of a message that goes to this queue alone: a store that keeps
    /// one record for the copies of a message in several queues need not look for the others.
    /// Wrong, it costs room (each copy then holds the message), never a message.
    fn try_push_sole(
        &self,
        msg: Arc<Message>,
        priority: u32,
        expires_ms: Option<i64>,
    ) -> Result<u64, QueueError> {
        self.try_push(msg, priority, expires_ms)
    }
    fn pop(&self, now_ms: i64) -> Popped;
    /// Removes an in-flight message for good. Returns the mark of its removal if a crash of the
    /// hub could still undo it (see [`QueueStore::removal_written`]), else 0.
    fn ack(&self, seq: u64) -> u64;
    /// Whether the removal of `mark` is written out, so that a crash of the hub cannot bring
    /// its message back.
    fn removal_written(&self, _mark: u64) -> bool {
        true
    }
    /// Writes every removal made so far out. Blocking: call it off the async workers.
    fn write_removals(&self) {}
    /// Writes them out on this thread if that cannot stall it (the write then is short);
    /// `false`, with nothing written, if it could.
    fn write_removals_now(&self) -> bool {
        false
    }
    fn release(&self, seq: u64);
    /// Removes every pending message that has expired by `now_ms` and returns them, in
    /// O(expired). May read from disk: call it off the async workers.
    fn expire(&self, now_ms: i64) -> Vec<Queued>;
    /// The priority of the next message `pop` would consider, if any is pending.
    fn head_priority(&self) -> Option<u32>;
    /// Messages held (pending and in flight) per priority.
    fn lengths(&self) -> BTreeMap<u32, usize>;
    fn len(&self) -> usize {
        self.lengths().values().sum()
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Takes the next pending entry: the oldest of the best priority, or, with `live_first`,
/// alternately the oldest and the newest, so fresh messages are not stuck behind a backlog.
pub(crate) fn take_next<V>(
    pending: &mut BTreeMap<(u32, u64), V>,
    live_first: bool,
    newest_next: &mut bool,
) -> Option<((u32, u64), V)> {
    if !live_first {
        return pending.pop_first();
    }
    let (&(p, _), _) = pending.first_key_value()?;
    let take_newest = std::mem::replace(newest_next, !*newest_next);
    let key = if take_newest {
        pending
            .range((p, 0)..=(p, u64::MAX))
            .next_back()
            .map(|(k, _)| *k)?
    } else {
        pending.first_key_value().map(|(k, _)| *k)?
    };
    pending.remove(&key).map(|v| (key, v))
}

#[derive(Default)]
struct MemInner {
    live_first: bool,
    newest_next: bool,
    next_seq: u64,
    pending: BTreeMap<(u32, u64), Queued>,
    /// The pending messages that expire, by (expiry, priority, sequence).
    ttl: BTreeSet<(i64, u32, u64)>,
    in_flight: HashMap<u64, Queued>,
    per_priority: BTreeMap<u32, usize>,
}

impl MemInner {
    fn insert_pending(&mut self, q: Queued) {
        if let Some(x) = q.expires_ms {
            self.ttl.insert((x, q.priority, q.seq));
        }
        self.pending.insert((q.priority, q.seq), q);
    }

    fn untrack(&mut self, q: &Queued) {
        if let Some(x) = q.expires_ms {
            self.ttl.remove(&(x, q.priority, q.seq));
        }
    }
}

/// The in-memory queue: bounded, ordered by (priority, sequence).
pub struct MemoryQueue {
    capacity: usize,
    inner: Mutex<MemInner>,
}

impl MemoryQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(MemInner::default()),
        }
    }

    /// Serves the newest messages interleaved with the oldest (see [`take_next`]).
    pub fn live_first(self) -> Self {
        self.lock().live_first = true;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        // A poisoned lock only means another thread panicked mid-update of plain counters and
        // maps; the data stays usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One less message counted at priority `p` (never below zero).
pub(crate) fn dec(map: &mut BTreeMap<u32, usize>, p: u32) {
    if let Some(n) = map.get_mut(&p) {
        *n = n.saturating_sub(1);
    }
}

impl QueueStore for MemoryQueue {
    fn try_push(
        &self,
        msg: Arc<Message>,
        priority: u32,
        expires_ms: Option<i64>,
    ) -> Result<u64, QueueError> {
        let mut g = self.lock();
        if g.pending.len() + g.in_flight.len() >= self.capacity {
            return Err(QueueError::Full);
        }
        g.next_seq += 1;
        let seq = g.next_seq;
        g.insert_pending(Queued {
            seq,
            priority,
            msg,
            expires_ms,
            delivery_count: 0,
        });
        *g.per_priority.entry(priority).or_default() += 1;
        Ok(seq)
    }

    fn pop(&self, now_ms: i64) -> Popped {
        let mut g = self.lock();
        let mut expired = Vec::new();
        loop {
            let g = &mut *g;
            let Some((_, q)) = take_next(&mut g.pending, g.live_first, &mut g.newest_next) else {
                break;
            };
            g.untrack(&q);
            if q.expires_ms.is_some_and(|e| e <= now_ms) {
                dec(&mut g.per_priority, q.priority);
                expired.push(q);
                continue;
            }
            g.in_flight.insert(q.seq, q.clone());
            return Popped {
                item: Some(q),
                expired,
            };
        }
        Popped {
            item: None,
            expired,
        }
    }

    fn ack(&self, seq: u64) -> u64 {
        let mut g = self.lock();
        if let Some(q) = g.in_flight.remove(&seq) {
            dec(&mut g.per_priority, q.priority);
        }
        0
    }

    fn release(&self, seq: u64) {
        let mut g = self.lock();
        if let Some(mut q) = g.in_flight.remove(&seq) {
            q.delivery_count = q.delivery_count.saturating_add(1);
            g.insert_pending(q);
        }
    }

    fn head_priority(&self) -> Option<u32> {
        self.lock().pending.first_key_value().map(|((p, _), _)| *p)
    }

    fn expire(&self, now_ms: i64) -> Vec<Queued> {
        let mut g = self.lock();
        let mut out = Vec::new();
        while let Some(&(x, priority, seq)) = g.ttl.first() {
            if x > now_ms {
                break;
            }
            g.ttl.pop_first();
            if let Some(q) = g.pending.remove(&(priority, seq)) {
                dec(&mut g.per_priority, q.priority);
                out.push(q);
            }
        }
        out
    }

    fn lengths(&self) -> BTreeMap<u32, usize> {
        self.lock().per_priority.clone()
    }
}

/// A routing target with its queue and wake-ups.
pub struct Endpoint {
    /// `iothub` for `$upstream`, `{device}/{module}/{input}` for a module input (edgeHub's ids).
    pub id: String,
    /// For module inputs: the input name.
    pub input: Option<String>,
    pub store: Arc<dyn QueueStore>,
    /// Signalled when a message is pushed or released; shared by all inputs of one module so
    /// that one consumer can wait on all of them.
    pub ready: Arc<Notify>,
    /// Signalled when room is freed, to the senders waiting for it.
    pub space: Notify,
    /// Senders waiting for room: a removal signals `space` only when there are some.
    space_waiters: AtomicUsize,
    /// `edgehub_queue_length` handles per priority, so updates skip the registry lookup.
    gauges: Mutex<HashMap<u32, metrics::Gauge>>,
}

impl Endpoint {
    pub fn new(
        id: String,
        input: Option<String>,
        store: Arc<dyn QueueStore>,
        ready: Arc<Notify>,
    ) -> Self {
        Self {
            id,
            input,
            store,
            ready,
            space: Notify::new(),
            space_waiters: AtomicUsize::new(0),
            gauges: Mutex::new(HashMap::new()),
        }
    }

    /// Puts a message in the queue, waiting up to `wait` for room (a full queue, or a store
    /// compacting to stay within its limit). `sole`: the message goes to no other queue (see
    /// [`QueueStore::try_push_sole`]).
    pub async fn push(
        &self,
        msg: Arc<Message>,
        priority: u32,
        expires_ms: Option<i64>,
        wait: Duration,
        sole: bool,
    ) -> Result<u64, QueueError> {
        let try_push = |msg: Arc<Message>| match sole {
            true => self.store.try_push_sole(msg, priority, expires_ms),
            false => self.store.try_push(msg, priority, expires_ms),
        };
        // The usual case, a queue with room: no waiter registered, no clock read.
        match try_push(msg.clone()) {
            Ok(seq) => {
                self.ready.notify_one();
                return Ok(seq);
            }
            Err(QueueError::Full | QueueError::StoreBusy) => {}
            Err(e) => return Err(e),
        }
        // Counted before the store is looked at again, so a removal after that look signals.
        self.space_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.space_waiters);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match try_push(msg.clone()) {
                Ok(seq) => {
                    self.ready.notify_one();
                    return Ok(seq);
                }
                Err(QueueError::Full) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(QueueError::Full);
                    }
                }
                Err(QueueError::StoreBusy) => {
                    // Nothing signals the end of a compaction: look again shortly.
                    if tokio::time::Instant::now() >= deadline {
                        return Err(QueueError::StoreBusy);
                    }
                    let next = tokio::time::Instant::now() + STORE_BUSY_POLL;
                    tokio::time::sleep_until(next.min(deadline)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes the next deliverable message, counting the expired ones it skipped.
    pub fn pop(&self) -> Option<Queued> {
        let popped = self.store.pop(crate::model::message::now_ms());
        if !popped.expired.is_empty() {
            for q in &popped.expired {
                m::dropped(m::DROP_TTL, &q.msg);
            }
            self.after_removal();
        }
        popped.item
    }

    /// Drops what has expired (counted as `ttl_expiry`), so expired messages leave the queue
    /// promptly even behind messages that live longer. Blocking (see [`QueueStore::expire`]).
    pub fn expire_now(&self) {
        let expired = self.store.expire(crate::model::message::now_ms());
        if !expired.is_empty() {
            for q in &expired {
                m::dropped(m::DROP_TTL, &q.msg);
            }
            self.after_removal();
        }
    }

    /// Removes a delivered message; returns the mark of its removal (see [`QueueStore::ack`]).
    pub fn ack(&self, seq: u64) -> u64 {
        let mark = self.store.ack(seq);
        self.after_removal();
        mark
    }

    pub fn release(&self, seq: u64) {
        self.store.release(seq);
        self.ready.notify_one();
    }

    fn after_removal(&self) {
        // A sender that counts itself after this look finds the room when it looks at the
        // store (it counts itself before looking).
        if self.space_waiters.load(Ordering::SeqCst) > 0 {
            self.space.notify_waiters();
        }
    }

    /// Sets `edgehub_queue_length` from the queue itself; called just before every scrape, so
    /// the gauge is exact when read and costs nothing per message.
    pub fn publish_lengths(&self) {
        let mut gauges = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        for (p, n) in self.store.lengths() {
            gauges
                .entry(p)
                .or_insert_with(|| m::queue_length_gauge(&self.id, p))
                .set(n as f64);
        }
    }
}

/// One sender waiting for room in an [`Endpoint`], for as long as it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Acknowledgements a delivery pump made whose removals a crash of the hub could still undo.
/// The pump counts them against its window with its transfers in flight, so that after a crash
/// at most a window of messages per link comes again (see the store's module doc).
#[derive(Default)]
pub struct Unwritten {
    acks: Vec<(Arc<Endpoint>, u64)>,
}

impl Unwritten {
    /// Acknowledges `seq` of `ep` and keeps its mark until the removal is written out.
    pub fn ack(&mut self, ep: &Arc<Endpoint>, seq: u64) {
        let mark = ep.ack(seq);
        if mark != 0 {
            self.acks.push((ep.clone(), mark));
        }
    }

    /// How many acknowledgements are not written out yet.
    pub fn count(&mut self) -> usize {
        self.acks
            .retain(|(ep, mark)| !ep.store.removal_written(*mark));
        self.acks.len()
    }

    /// Writes them out: on this thread when the store says that cannot stall it, else off the
    /// async workers.
    pub async fn write(&mut self) {
        while let Some((ep, _)) = self.acks.first() {
            let before = self.acks.len();
            let store = ep.store.clone();
            if !store.write_removals_now() {
                let _ = tokio::task::spawn_blocking(move || store.write_removals()).await;
            }
            if self.count() >= before {
                break;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::identity::{DeviceId, Identity};

    fn msg() -> Arc<Message> {
        Arc::new(Message {
            body: vec![1],
            properties: None,
            application_properties: Default::default(),
            annotations: Default::default(),
            from: Identity::Device(DeviceId::parse("d").unwrap()),
            output: None,
            enqueued_ms: 0,
            twin_change: false,
            id: crate::model::message::next_id(),
        })
    }

    /// The conformance suite every [`QueueStore`] passes.
    pub fn conformance(make: impl Fn(usize) -> Arc<dyn QueueStore>) {
        // FIFO within a priority, best priority first.
        let q = make(10);
        let a = q.try_push(msg(), 5, None).unwrap();
        let b = q.try_push(msg(), 5, None).unwrap();
        let c = q.try_push(msg(), 0, None).unwrap();
        assert_eq!(q.head_priority(), Some(0));
        let order: Vec<u64> = (0..3).map(|_| q.pop(0).item.unwrap().seq).collect();
        assert_eq!(order, vec![c, a, b]);
        assert!(q.pop(0).item.is_none());
        assert_eq!(q.head_priority(), None);
        assert_eq!(q.len(), 3, "in-flight messages still count");

        // Release puts a message back in its place, ack removes it.
        q.release(a);
        q.ack(b);
        q.ack(c);
        let again = q.pop(0).item.unwrap();
        assert_eq!((again.seq, again.delivery_count), (a, 1));
        q.ack(a);
        assert!(q.is_empty());

        // Capacity counts in-flight messages.
        let q = make(2);
        q.try_push(msg(), 1, None).unwrap();
        let s = q.try_push(msg(), 1, None).unwrap();
        assert_eq!(q.try_push(msg(), 1, None), Err(QueueError::Full));
        let first = q.pop(0).item.unwrap().seq;
        assert_eq!(q.try_push(msg(), 1, None), Err(QueueError::Full));
        q.ack(first);
        q.try_push(msg(), 1, None).unwrap();
        assert_ne!(first, s);

        // Expired messages are skipped and reported, never handed out.
        let q = make(10);
        q.try_push(msg(), 1, Some(100)).unwrap();
        let live = q.try_push(msg(), 1, Some(1000)).unwrap();
        let p = q.pop(500);
        assert_eq!(p.expired.len(), 1);
        assert_eq!(p.item.unwrap().seq, live);
        assert_eq!(q.lengths().get(&1), Some(&1));

        // `expire` takes what has expired, whatever its priority or place, and leaves the rest;
        // a message in flight is not its business until it is released.
        let q = make(10);
        let a = q.try_push(msg(), 2, Some(300)).unwrap();
        let b = q.try_push(msg(), 1, Some(100)).unwrap();
        let c = q.try_push(msg(), 2, None).unwrap();
        let d = q.try_push(msg(), 0, Some(200)).unwrap();
        assert_eq!(q.pop(0).item.unwrap().seq, d);
        let seqs = |v: Vec<Queued>| {
            let mut s: Vec<u64> = v.iter().map(|x| x.seq).collect();
            s.sort_unstable();
            s
        };
        assert_eq!(seqs(q.expire(99)), Vec::<u64>::new());
        assert_eq!(seqs(q.expire(250)), vec![b]);
        q.release(d);
        assert_eq!(seqs(q.expire(1000)), vec![a, d]);
        assert_eq!(q.lengths().values().sum::<usize>(), 1);
        assert_eq!(q.pop(1000).item.unwrap().seq, c);
        assert!(q.expire(i64::MAX).is_empty());
        // A message popped and acknowledged never expires afterwards.
        let e = q.try_push(msg(), 0, Some(10)).unwrap();
        assert_eq!(q.pop(0).item.unwrap().seq, e);
        q.ack(e);
        q.ack(c);
        assert!(q.expire(i64::MAX).is_empty());
        assert!(q.is_empty());
    }

    #[test]
    fn live_first_interleaves_the_newest_with_the_oldest() {
        let q = MemoryQueue::new(100).live_first();
        let seqs: Vec<u64> = (0..6)
            .map(|_| q.try_push(msg(), 3, None).unwrap())
            .collect();
        let order: Vec<u64> = (0..6).map(|_| q.pop(0).item.unwrap().seq).collect();
        assert_eq!(
            order,
            vec![seqs[0], seqs[5], seqs[1], seqs[4], seqs[2], seqs[3]]
        );
        // A better priority still goes first.
        q.try_push(msg(), 9, None).unwrap();
        let urgent = q.try_push(msg(), 0, None).unwrap();
        assert_eq!(q.pop(0).item.unwrap().seq, urgent);
    }

    #[test]
    fn memory_queue_conforms() {
        conformance(|cap| Arc::new(MemoryQueue::new(cap)));
    }

    #[tokio::test]
    async fn a_full_endpoint_holds_senders_back_until_room_is_freed() {
        let e = Arc::new(Endpoint::new(
            "t".into(),
            None,
            Arc::new(MemoryQueue::new(1)),
            Arc::new(Notify::new()),
        ));
        e.push(msg(), 0, None, Duration::from_secs(1), false)
            .await
            .unwrap();
        assert_eq!(
            e.push(msg(), 0, None, Duration::from_millis(20), false)
                .await,
            Err(QueueError::Full)
        );
        let e2 = e.clone();
        let waiter = tokio::spawn(async move {
            e2.push(msg(), 0, None, Duration::from_secs(10), false)
                .await
        });
        let got = e.pop().unwrap();
        e.ack(got.seq);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
