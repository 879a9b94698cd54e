//! The event log: telemetry routed to `$upstream` in standalone mode, kept for a retention
//! period in partitions that Event Hubs consumers read (`builtInEndpoint`).
//!
//! Unlike a queue, nothing is removed when it is read: every consumer group reads the whole log
//! from wherever it starts, and events leave only by age (`retentionHours`) or to make room
//! under the store's cap (`storeLimits.maxSizeBytes`, shared with the queues).
//!
//! # Layout (partition `eventlog` of the store's fjall keyspace)
//!
//! * key = partition (u8), sequence number (u64 BE) → value = enqueued time (i64 BE, ms since
//!   the epoch), then the message record of the durable store (`store::durable::format`).
//! * key = `0xFE`, partition (u8) → the first sequence number still kept (u64 BE), written when
//!   events are removed, so that sequence numbers never go back, even when every event of a
//!   partition has been removed and the hub restarts.
//! * key = `0xFF` → the log's creation time (i64 BE ms), the event hub's `created_at`.
//!
//! # Invariants and recovery
//!
//! * Per partition, sequence numbers start at 0 and grow by one per event, with no gap between
//!   the first kept and the last; enqueued times never decrease (an append takes the later of
//!   the clock and the last time), so a time filter is a binary search. The offset of an event
//!   is its sequence number written in decimal: opaque to the SDKs, monotonic, and resolvable
//!   for as long as the event is kept.
//! * An append takes its sequence number and writes its entry under the partition's lock, so a
//!   reader that has seen sequence `n` finds every event before it.
//! * Appends go to fjall's journal buffer like the queues' writes: the sender is acknowledged
//!   after the store's group commit (`DurableStore::sync`), which covers them. Readers see an
//!   event only once a commit covered it (`Head::visible`): each append takes a ticket of the
//!   store's write counter under its partition's lock, and a completed sync publishes the
//!   appends whose tickets it covered. A crash before the commit loses the event and gives its
//!   sequence number to the next event after the restart, but no consumer has seen it. Without
//!   a durable store (queues in memory) an append is visible at once.
//! * At open the log is read once to count its bytes against the cap and to find each
//!   partition's first and last sequence numbers and last enqueued time.
//! * The cap: bytes of keys and values count against the store's limit (the durable store's
//!   counter when there is one). An append that would pass it removes the oldest events of the
//!   log (the partition whose first event is oldest first) until it fits; with nothing left to
//!   remove it is refused as full. Removals (by age or for room) are written in one batch and
//!   do not wait for a sync: lost in a crash, the events come back until the next removal.

use std::{
    ops::Bound,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use tokio::sync::watch;

use crate::{
    model::message::Message,
    store::{
        durable::{format, DurableStore, StoreError},
        queue::{Popped, QueueError, QueueStore, Queued},
    },
};

/// Events removed by age in one pass per partition; the rest wait for the next tick.
const EXPIRE_BATCH: usize = 10_000;
const BEGIN_KEY: u8 = 0xFE;
const CREATED_KEY: u8 = 0xFF;
/// Bytes of an entry's value before the record: the enqueued time.
const TIME_LEN: usize = 8;

fn key(partition: u8, seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = partition;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn split_key(k: &[u8]) -> Option<(u8, u64)> {
    let (&p, seq) = k.split_first()?;
    Some((p, u64::from_be_bytes(seq.try_into().ok()?)))
}

fn fj(e: impl std::fmt::Display) -> StoreError {
    StoreError::other(e.to_string())
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked between plain counter updates.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One event as read from the log.
#[derive(Debug, Clone)]
pub struct Event {
    pub sequence: u64,
    /// When it entered the log (ms since the epoch).
    pub enqueued_ms: i64,
    pub msg: Message,
}

impl Event {
    /// The offset the consumers see.
    pub fn offset(&self) -> String {
        self.sequence.to_string()
    }
}

/// What `$management` answers about a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The first event kept (the next one to come when the partition is empty).
    pub begin: u64,
    /// The last event appended, `None` when none ever was.
    pub last: Option<u64>,
    pub last_enqueued_ms: i64,
    /// Nothing kept.
    pub empty: bool,
}

struct Head {
    /// First sequence kept.
    begin: u64,
    /// Next sequence to give out.
    next: u64,
    last_enqueued_ms: i64,
    /// Sequences below this are durable and shown to readers.
    visible: u64,
    /// The enqueued time of the last visible event.
    visible_enqueued_ms: i64,
    /// Appends not yet covered by a sync: (store write ticket, sequence, enqueued time), in
    /// order.
    pending: std::collections::VecDeque<(u64, u64, i64)>,
}

struct Partition {
    head: Mutex<Head>,
    /// The first sequence not yet visible, for readers waiting for new events.
    tail: watch::Sender<u64>,
}

/// Where the log's bytes are counted against the store's cap.
enum Budget {
    /// The durable store's own counter, so that queues and log share the one cap.
    Store(Arc<DurableStore>),
    /// Without a durable store (queues in memory): a counter of the log's own.
    Own {
        stored: AtomicU64,
        limit: Option<u64>,
    },
}

impl Budget {
    fn reserve(&self, bytes: u64) -> Result<(), StoreError> {
        match self {
            Budget::Store(s) => s.reserve(bytes),
            Budget::Own { stored, limit } => {
                let limit = limit.unwrap_or(u64::MAX);
                stored
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                        (s.saturating_add(bytes) <= limit).then_some(s + bytes)
                    })
                    .map(|_| ())
                    .map_err(|stored| StoreError::Full { stored, limit })
            }
        }
    }

    fn unreserve(&self, bytes: u64) {
        match self {
            Budget::Store(s) => s.unreserve(bytes),
            Budget::Own { stored, .. } => {
                let _ = stored.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                    Some(s.saturating_sub(bytes))
                });
            }
        }
    }
}

/// The retained, partitioned log.
pub struct EventLog {
    keyspace: fjall::Keyspace,
    part: fjall::PartitionHandle,
    budget: Budget,
    partitions: Vec<Partition>,
    retention_ms: i64,
    created_ms: i64,
    /// Bytes of keys and values the log holds.
    bytes: AtomicU64,
    /// Serialises removals (by age, for room) so that two never remove the same events.
    removing: Mutex<()>,
}

impl EventLog {
    /// Opens (or creates) the log in `keyspace` with `partitions` partitions. With a durable
    /// store, its cap and group commit cover the log; otherwise `limit` caps the log alone.
    pub fn open(
        keyspace: fjall::Keyspace,
        store: Option<Arc<DurableStore>>,
        limit: Option<u64>,
        partitions: u32,
        retention_ms: u64,
        now_ms: i64,
    ) -> Result<Arc<Self>, StoreError> {
        let partitions = partitions.clamp(1, 200) as u8;
        let options =
            fjall::PartitionCreateOptions::default().manual_journal_persist(store.is_some());
        let part = keyspace.open_partition("eventlog", options).map_err(fj)?;
        let created_ms = match part.get([CREATED_KEY]).map_err(fj)? {
            Some(v) => <[u8; 8]>::try_from(&v[..]).map_or(now_ms, i64::from_be_bytes),
            None => {
                part.insert([CREATED_KEY], now_ms.to_be_bytes())
                    .map_err(fj)?;
                now_ms
            }
        };
        let mut heads: Vec<Head> = (0..partitions)
            .map(|_| Head {
                begin: 0,
                next: 0,
                last_enqueued_ms: 0,
                visible: 0,
                visible_enqueued_ms: 0,
                pending: Default::default(),
            })
            .collect();
        let mut first_seen = vec![false; partitions as usize];
        let mut bytes = 0u64;
        for kv in part.range(key(0, 0)..key(partitions, 0)) {
            let (k, v) = kv.map_err(fj)?;
            let Some((p, seq)) = split_key(&k) else {
                continue;
            };
            bytes += (k.len() + v.len()) as u64;
            let h = &mut heads[p as usize];
            if !first_seen[p as usize] {
                first_seen[p as usize] = true;
                h.begin = seq;
            }
            h.next = seq + 1;
            if let Some(t) = v.get(..TIME_LEN) {
                h.last_enqueued_ms = i64::from_be_bytes(t.try_into().unwrap_or_default());
            }
        }
        for (p, h) in heads.iter_mut().enumerate() {
            if let Some(v) = part.get([BEGIN_KEY, p as u8]).map_err(fj)? {
                let kept = <[u8; 8]>::try_from(&v[..]).map_or(0, u64::from_be_bytes);
                if !first_seen[p] {
                    h.begin = kept;
                }
                h.next = h.next.max(kept);
            }
            // What a restart finds on disk is what readers may see.
            h.visible = h.next;
            h.visible_enqueued_ms = h.last_enqueued_ms;
        }
        let budget = match &store {
            Some(s) => {
                // The durable store counts only its own partitions at open.
                s.stored.fetch_add(bytes, Ordering::Relaxed);
                Budget::Store(s.clone())
            }
            None => Budget::Own {
                stored: AtomicU64::new(bytes),
                limit,
            },
        };
        let log = Arc::new(Self {
            keyspace,
            part,
            budget,
            partitions: heads
                .into_iter()
                .map(|h| Partition {
                    tail: watch::Sender::new(h.next),
                    head: Mutex::new(h),
                })
                .collect(),
            retention_ms: i64::try_from(retention_ms).unwrap_or(i64::MAX),
            created_ms,
            bytes: AtomicU64::new(bytes),
            removing: Mutex::new(()),
        });
        if let Some(s) = &store {
            let weak = Arc::downgrade(&log);
            let listener: Box<dyn Fn(u64) + Send + Sync> = Box::new(move |covered| {
                if let Some(log) = weak.upgrade() {
                    log.publish(covered);
                }
            });
            if s.on_synced.set(listener).is_err() {
                return Err(StoreError::other("the store already has an event log"));
            }
        }
        Ok(log)
    }

    /// Shows readers the appends whose store write ticket is at most `covered` (a completed
    /// sync covered them).
    fn publish(&self, covered: u64) {
        for partition in &self.partitions {
            let mut h = locked(&partition.head);
            let mut moved = false;
            while let Some(&(ticket, seq, at)) = h.pending.front() {
                if ticket > covered {
                    break;
                }
                h.pending.pop_front();
                h.visible = h.visible.max(seq + 1);
                h.visible_enqueued_ms = at;
                moved = true;
            }
            if moved {
                partition.tail.send_replace(h.visible);
            }
        }
    }

    pub fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// When the log was first created (ms since the epoch).
    pub fn created_ms(&self) -> i64 {
        self.created_ms
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The partition of a device's events: Event Hubs' partition-key mapping with the device id
    /// as key, so that one device's events stay in order in one partition, as in IoT Hub.
    pub fn partition_of(&self, device: &str) -> u8 {
        partition_for_key(device, self.partitions.len() as u32) as u8
    }

    /// Appends `msg` to its device's partition; returns the partition and sequence number.
    pub fn append(&self, msg: &Message, now_ms: i64) -> Result<(u8, u64), StoreError> {
        let p = self.partition_of(msg.from.device().as_str());
        let partition = &self.partitions[p as usize];
        let mut value = Vec::with_capacity(msg.body.len() + 96);
        value.extend_from_slice(&[0; TIME_LEN]);
        format::encode_record(msg, &mut value)?;
        let bytes = (9 + value.len()) as u64;
        if let Budget::Store(s) = &self.budget {
            if s.poisoned.load(Ordering::Acquire) {
                return Err(StoreError::other(
                    "the store's journal could not be written; writes are refused",
                ));
            }
            if let Err(e) = s.check_files(bytes, &self.part) {
                // The store seals the largest of its own memtables when its write buffer is
                // full; the log's must be sealed too, or its writes would wait for ever.
                if matches!(e, StoreError::Stalled(_)) {
                    use fjall::AbstractTree;
                    if self.part.tree.active_memtable_size() > 0 {
                        if let Err(e) = self.part.rotate_memtable() {
                            tracing::warn!(error = %e, "sealing the event log's memtable failed");
                        }
                    }
                }
                return Err(e);
            }
        }
        while let Err(e) = self.budget.reserve(bytes) {
            // Room is made by removing the oldest events; a store full of queued messages
            // with an empty log refuses.
            if self.remove_oldest(bytes)? == 0 {
                return Err(e);
            }
        }
        let mut write = || {
            let mut head = locked(&partition.head);
            let seq = head.next;
            let at = now_ms.max(head.last_enqueued_ms);
            value[..TIME_LEN].copy_from_slice(&at.to_be_bytes());
            self.part
                .insert(key(p, seq), &value)
                .map_err(|e| match &self.budget {
                    Budget::Store(s) => s.failed(e),
                    Budget::Own { .. } => fj(e),
                })?;
            head.next = seq + 1;
            head.last_enqueued_ms = at;
            match &self.budget {
                // The ticket is taken after the insert and under the partition's lock: a sync
                // whose count covers it ran its journal write after the insert.
                Budget::Store(s) => {
                    let ticket = s.written.fetch_add(1, Ordering::AcqRel) + 1;
                    head.pending.push_back((ticket, seq, at));
                }
                Budget::Own { .. } => {
                    head.visible = seq + 1;
                    head.visible_enqueued_ms = at;
                    partition.tail.send_replace(seq + 1);
                }
            }
            Ok(seq)
        };
        let written = match &self.budget {
            Budget::Store(s) => s.off_worker(write),
            Budget::Own { .. } => write(),
        };
        match written {
            Ok(seq) => {
                self.bytes.fetch_add(bytes, Ordering::Relaxed);
                Ok((p, seq))
            }
            Err(e) => {
                self.budget.unreserve(bytes);
                Err(e)
            }
        }
    }

    /// What `$management` tells about partition `p`.
    pub fn info(&self, p: u8) -> Option<PartitionInfo> {
        let h = locked(&self.partitions.get(p as usize)?.head);
        Some(PartitionInfo {
            begin: h.begin,
            last: h.visible.checked_sub(1),
            last_enqueued_ms: h.visible_enqueued_ms,
            empty: h.begin >= h.visible,
        })
    }

    /// A receiver of partition `p`'s first sequence not yet visible, which moves when a sync
    /// covers new appends.
    pub fn watch(&self, p: u8) -> Option<watch::Receiver<u64>> {
        Some(self.partitions.get(p as usize)?.tail.subscribe())
    }

    /// Reads up to `max` events of partition `p` from sequence `from` on, at most about
    /// `max_bytes` of them (always at least one). Blocking: call it off the async workers.
    pub fn read(
        &self,
        p: u8,
        from: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let mut out = Vec::new();
        let mut taken = 0usize;
        let Some(part) = self.partitions.get(p as usize) else {
            return Ok(out);
        };
        let visible = locked(&part.head).visible;
        if from >= visible {
            return Ok(out);
        }
        let range = (
            Bound::Included(key(p, from)),
            Bound::Excluded(key(p, visible)),
        );
        for kv in self.part.range(range).take(max) {
            let (k, v) = kv.map_err(fj)?;
            let Some((_, sequence)) = split_key(&k) else {
                continue;
            };
            let (t, record) = v.split_at(TIME_LEN.min(v.len()));
            let enqueued_ms = i64::from_be_bytes(t.try_into().unwrap_or_default());
            let msg = format::decode_record(sequence, record)?;
            taken += v.len();
            out.push(Event {
                sequence,
                enqueued_ms,
                msg,
            });
            if taken >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The first sequence number of partition `p` whose event was enqueued at or after `ms`
    /// (the next one to come if none was). Blocking: a binary search over the kept events.
    pub fn first_at_or_after(&self, p: u8, ms: i64) -> Result<u64, StoreError> {
        let (mut lo, mut hi) = match self.partitions.get(p as usize) {
            Some(part) => {
                let h = locked(&part.head);
                (h.begin, h.visible)
            }
            None => return Ok(0),
        };
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let before = match self.part.get(key(p, mid)).map_err(fj)? {
                Some(v) => {
                    let t = v.get(..TIME_LEN).unwrap_or(&[0; 8]);
                    i64::from_be_bytes(t.try_into().unwrap_or_default()) < ms
                }
                // Removed meanwhile: older than anything kept.
                None => true,
            };
            if before {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Removes the events enqueued before `now_ms` minus the retention; returns how many.
    /// Blocking: call it off the async workers.
    pub fn expire(&self, now_ms: i64) -> Result<usize, StoreError> {
        let cutoff = now_ms.saturating_sub(self.retention_ms);
        let _removing = locked(&self.removing);
        let mut removed = 0;
        for p in 0..self.partitions.len() as u8 {
            removed += self.remove_front(p, EXPIRE_BATCH, |t, _| t < cutoff)?;
        }
        Ok(removed)
    }

    /// Removes the oldest events of the log to make room for `wanted` bytes: from the
    /// partition whose first event is oldest, a batch at a time. Returns the bytes freed.
    fn remove_oldest(&self, wanted: u64) -> Result<u64, StoreError> {
        let _removing = locked(&self.removing);
        let mut oldest: Option<(i64, u8)> = None;
        for p in 0..self.partitions.len() as u8 {
            let begin = {
                let h = locked(&self.partitions[p as usize].head);
                if h.begin >= h.next {
                    continue;
                }
                h.begin
            };
            if let Some(v) = self.part.get(key(p, begin)).map_err(fj)? {
                let t =
                    i64::from_be_bytes(v[..TIME_LEN.min(v.len())].try_into().unwrap_or_default());
                if oldest.is_none_or(|(o, _)| t < o) {
                    oldest = Some((t, p));
                }
            }
        }
        let Some((_, p)) = oldest else { return Ok(0) };
        let before = self.bytes();
        let mut freed = 0u64;
        self.remove_front(p, 1024, |_, bytes| {
            let more = freed < wanted.max(64 * 1024);
            freed += bytes;
            more
        })?;
        Ok(before.saturating_sub(self.bytes()))
    }

    /// Removes up to `max` events from the front of partition `p` while `take(enqueued time,
    /// bytes)` says so; records the new first sequence. Called under `removing`.
    fn remove_front(
        &self,
        p: u8,
        max: usize,
        mut take: impl FnMut(i64, u64) -> bool,
    ) -> Result<usize, StoreError> {
        let begin = locked(&self.partitions[p as usize].head).begin;
        let mut batch = self.keyspace.batch();
        let (mut n, mut bytes, mut next_begin) = (0usize, 0u64, begin);
        let range = (
            Bound::Included(key(p, begin)),
            Bound::Included(key(p, u64::MAX)),
        );
        for kv in self.part.range(range).take(max) {
            let (k, v) = kv.map_err(fj)?;
            let Some((_, seq)) = split_key(&k) else { break };
            let t = i64::from_be_bytes(v[..TIME_LEN.min(v.len())].try_into().unwrap_or_default());
            let size = (k.len() + v.len()) as u64;
            if !take(t, size) {
                break;
            }
            batch.remove(&self.part, k);
            n += 1;
            bytes += size;
            next_begin = seq + 1;
        }
        if n == 0 {
            return Ok(0);
        }
        batch.insert(&self.part, [BEGIN_KEY, p], next_begin.to_be_bytes());
        batch.commit().map_err(fj)?;
        {
            let mut h = locked(&self.partitions[p as usize].head);
            h.begin = h.begin.max(next_begin);
        }
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(bytes))
            });
        self.budget.unreserve(bytes);
        Ok(n)
    }
}

/// The mapping of a device id to a partition that IoT Hub applies (its
/// `EventHubPartitionKeyResolver`): a 16-bit lookup3 hash of the upper-cased ASCII id, reduced
/// to 32 767 logical partitions which are spread over `count` ranges, the first ones one wider.
pub fn partition_for_key(key: &str, count: u32) -> u32 {
    const LOGICAL: i32 = i16::MAX as i32;
    let count = count.clamp(1, LOGICAL as u32) as i32;
    let bytes: Vec<u8> = key
        .chars()
        .map(|c| {
            if c.is_ascii() {
                c.to_ascii_uppercase() as u8
            } else {
                b'?'
            }
        })
        .collect();
    let short = hash16(&bytes);
    let logical = ((short as i32 % LOGICAL) as i16).unsigned_abs() as i32;
    let short_width = LOGICAL / count;
    let remaining = LOGICAL - count * short_width;
    let large_width = short_width + 1;
    let large_span = large_width * remaining;
    let index = if logical < large_span {
        logical / large_width
    } else {
        remaining + (logical - large_span) / short_width
    };
    index as u32
}

/// The 16-bit hash of a partition key: the two words of lookup3, xored, cut to 16 bits.
fn hash16(bytes: &[u8]) -> i16 {
    let (c, b) = lookup3(bytes);
    (c ^ b) as u16 as i16
}

/// Bob Jenkins' lookup3 `hashlittle2` with both seeds 0: returns (c, b).
fn lookup3(data: &[u8]) -> (u32, u32) {
    let init = 0xdead_beef_u32.wrapping_add(data.len() as u32);
    let (mut a, mut b, mut c) = (init, init, init);
    let word = |chunk: &[u8]| {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        u32::from_le_bytes(w)
    };
    let mut rest = data;
    while rest.len() > 12 {
        a = a.wrapping_add(word(&rest[0..4]));
        b = b.wrapping_add(word(&rest[4..8]));
        c = c.wrapping_add(word(&rest[8..12]));
        // mix
        a = a.wrapping_sub(c) ^ c.rotate_left(4);
        c = c.wrapping_add(b);
        b = b.wrapping_sub(a) ^ a.rotate_left(6);
        a = a.wrapping_add(c);
        c = c.wrapping_sub(b) ^ b.rotate_left(8);
        b = b.wrapping_add(a);
        a = a.wrapping_sub(c) ^ c.rotate_left(16);
        c = c.wrapping_add(b);
        b = b.wrapping_sub(a) ^ a.rotate_left(19);
        a = a.wrapping_add(c);
        c = c.wrapping_sub(b) ^ b.rotate_left(4);
        b = b.wrapping_add(a);
        rest = &rest[12..];
    }
    if rest.is_empty() {
        return (c, b);
    }
    // The last 1–12 bytes, zero-padded, as lookup3 reads them.
    a = a.wrapping_add(word(&rest[..rest.len().min(4)]));
    if rest.len() > 4 {
        b = b.wrapping_add(word(&rest[4..rest.len().min(8)]));
    }
    if rest.len() > 8 {
        c = c.wrapping_add(word(&rest[8..]));
    }
    // final
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    (c, b)
}

/// The `$upstream` endpoint's queue in standalone mode: a push appends to the log; nothing is
/// ever pending, since consumers read the log itself.
pub struct LogQueue(pub Arc<EventLog>);

impl QueueStore for LogQueue {
    fn try_push(
        &self,
        msg: Arc<Message>,
        _priority: u32,
        _expires_ms: Option<i64>,
    ) -> Result<u64, QueueError> {
        match self.0.append(&msg, crate::model::message::now_ms()) {
            Ok((_, seq)) => Ok(seq),
            Err(StoreError::Full { .. }) => Err(QueueError::StoreFull),
            Err(StoreError::Compacting { .. } | StoreError::Stalled(_)) => {
                Err(QueueError::StoreBusy)
            }
            Err(e) => {
                tracing::warn!(error = %e, "appending to the event log failed");
                Err(QueueError::Storage)
            }
        }
    }

    fn pop(&self, _now_ms: i64) -> Popped {
        Popped {
            item: None,
            expired: Vec::new(),
        }
    }

    fn ack(&self, _seq: u64) -> u64 {
        0
    }

    fn release(&self, _seq: u64) {}

    fn expire(&self, _now_ms: i64) -> Vec<Queued> {
        Vec::new()
    }

    fn head_priority(&self) -> Option<u32> {
        None
    }

    fn lengths(&self) -> std::collections::BTreeMap<u32, usize> {
        Default::default()
    }
}

#[cfg(test)]
mod tests;
