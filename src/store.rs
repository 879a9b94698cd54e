//! The durable message store: endpoint queues that survive a crash, on fjall.
//!
//! # Layout (one fjall keyspace under `dataDir/store`, shared with the twins)
//!
//! * partition `messages`: key = message id (u64, big-endian) → the message record (the message, once,
//!   however many queues hold it);
//! * partition `queue`: key = endpoint id, `0x00`, priority (u32 BE), sequence (u64 BE) →
//!   message id (u64 BE) + expiry (i64 BE ms since the epoch, `i64::MAX` = never).
//!
//! # Invariants and recovery
//!
//! * A message record is written (in the same batch) before the first queue entry that points
//!   at it, and removed when the last entry pointing at it is acknowledged or expires. Reference
//!   counts live in memory and are rebuilt at open by counting queue entries.
//! * "Durable" means: with `sync = "commit"` (the default), [`DurableStore::sync`] has fsynced
//!   the journal after the write; the hub acknowledges a sender only after that (one fsync
//!   covers every write made before it started: group commit). With `sync = "os"` writes go to
//!   the OS only: they survive a crash of the hub but not a power loss.
//! * Removals (acks, expiries) are not fsynced: a removal lost in a crash redelivers a message
//!   that was in flight, never loses one.
//! * At open every queue entry is loaded into its queue's in-memory index (priority, sequence,
//!   message id, expiry), so FIFO per (endpoint, priority) and the exact queue lengths survive a
//!   restart; message bodies stay on disk until delivered. fjall's journal recovery discards a
//!   torn last write.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use fe2o3_amqp::types::{
    messaging::{annotations::OwnedKey, Properties},
    primitives::{Binary, SimpleValue, Value},
};
use serde::{Deserialize, Serialize};
use serde_amqp::primitives::OrderedMap;

use crate::{
    identity::{DeviceId, Identity, ModuleId},
    message::Message,
    queue::{take_next, Popped, QueueError, QueueStore, Queued},
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Fjall(String),
    #[error("store record {0}: {1}")]
    Corrupt(u64, String),
    #[error("the store holds {stored} of its {limit} bytes (storeLimits.maxSizeBytes)")]
    Full { stored: u64, limit: u64 },
}

/// What to do when a new message would take the store past its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Refuse the new message (the sender gets `amqp:resource-limit-exceeded`).
    RejectNew,
    /// Drop the oldest messages of the same queue to make room (counted as `overflow`).
    DropOldest,
}

fn fj(e: impl std::fmt::Display) -> StoreError {
    StoreError::Fjall(e.to_string())
}

/// How writes become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// fsync (group commit) before a sender is acknowledged.
    Commit,
    /// Leave it to the OS: survives a crash of the hub, not a power loss.
    Os,
}

/// A message as stored.
#[derive(Serialize, Deserialize)]
struct Record {
    body: Binary,
    properties: Option<Properties>,
    application_properties: OrderedMap<String, SimpleValue>,
    annotations: OrderedMap<OwnedKey, Value>,
    device: String,
    module: Option<String>,
    output: Option<String>,
    enqueued_ms: i64,
    twin_change: bool,
}

fn encode(m: &Message) -> Result<Vec<u8>, StoreError> {
    let r = Record {
        body: Binary::from(m.body.clone()),
        properties: m.properties.clone(),
        application_properties: m.application_properties.clone(),
        annotations: m.annotations.clone(),
        device: m.from.device().to_string(),
        module: m.from.module().map(|x| x.to_string()),
        output: m.output.clone(),
        enqueued_ms: m.enqueued_ms,
        twin_change: m.twin_change,
    };
    serde_amqp::to_vec(&r).map_err(fj)
}

fn decode(id: u64, bytes: &[u8]) -> Result<Message, StoreError> {
    let r: Record =
        serde_amqp::from_slice(bytes).map_err(|e| StoreError::Corrupt(id, e.to_string()))?;
    let bad = |e: crate::identity::IdError| StoreError::Corrupt(id, e.to_string());
    let device = DeviceId::parse(&r.device).map_err(bad)?;
    let from = match r.module {
        Some(m) => Identity::Module(device, ModuleId::parse(&m).map_err(bad)?),
        None => Identity::Device(device),
    };
    Ok(Message {
        body: r.body.into_vec(),
        properties: r.properties,
        application_properties: r.application_properties,
        annotations: r.annotations,
        from,
        output: r.output,
        enqueued_ms: r.enqueued_ms,
        twin_change: r.twin_change,
        id,
    })
}

fn queue_key(endpoint: &str, priority: u32, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(endpoint.len() + 13);
    k.extend_from_slice(endpoint.as_bytes());
    k.push(0);
    k.extend_from_slice(&priority.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn split_queue_key(k: &[u8]) -> Option<(String, u32, u64)> {
    let zero = k.iter().position(|b| *b == 0)?;
    let (ep, rest) = (&k[..zero], k.get(zero + 1..)?);
    if rest.len() != 12 {
        return None;
    }
    let p = u32::from_be_bytes(rest[..4].try_into().ok()?);
    let s = u64::from_be_bytes(rest[4..].try_into().ok()?);
    Some((String::from_utf8(ep.to_vec()).ok()?, p, s))
}

/// A queue entry as recovered at open.
#[derive(Debug, Clone)]
struct Recovered {
    priority: u32,
    seq: u64,
    msg_id: u64,
    expires_ms: Option<i64>,
}

/// The shared store: the keyspace, the two partitions, reference counts, group commit.
pub struct DurableStore {
    keyspace: fjall::Keyspace,
    messages: fjall::PartitionHandle,
    queue: fjall::PartitionHandle,
    policy: SyncPolicy,
    /// Message id → (queue entries pointing at it, bytes of its record).
    refcounts: Mutex<HashMap<u64, (u32, u64)>>,
    /// Bytes of message records and queue entries held: what `limit` caps.
    stored: AtomicU64,
    limit: Option<u64>,
    pub overflow: Overflow,
    recovered: Mutex<HashMap<String, Vec<Recovered>>>,
    /// Writes made / writes covered by a completed fsync.
    written: AtomicU64,
    synced: AtomicU64,
    sync_lock: tokio::sync::Mutex<()>,
}

impl DurableStore {
    /// Opens the store in `keyspace` and loads the index of every queue.
    pub fn open(
        keyspace: fjall::Keyspace,
        policy: SyncPolicy,
        limit: Option<u64>,
        overflow: Overflow,
    ) -> Result<Arc<Self>, StoreError> {
        let messages = keyspace
            .open_partition("messages", fjall::PartitionCreateOptions::default())
            .map_err(fj)?;
        let queue = keyspace
            .open_partition("queue", fjall::PartitionCreateOptions::default())
            .map_err(fj)?;
        let mut refcounts: HashMap<u64, (u32, u64)> = HashMap::new();
        let mut stored = 0u64;
        let mut recovered: HashMap<String, Vec<Recovered>> = HashMap::new();
        for kv in queue.iter() {
            let (k, v) = kv.map_err(fj)?;
            let (Some((endpoint, priority, seq)), Ok(v)) =
                (split_queue_key(&k), <[u8; 16]>::try_from(&v[..]))
            else {
                tracing::error!("skipping a malformed queue entry in the store");
                continue;
            };
            let msg_id = u64::from_be_bytes(v[..8].try_into().unwrap_or_default());
            let exp = i64::from_be_bytes(v[8..].try_into().unwrap_or_default());
            refcounts.entry(msg_id).or_default().0 += 1;
            stored += (k.len() + v.len()) as u64;
            recovered.entry(endpoint).or_default().push(Recovered {
                priority,
                seq,
                msg_id,
                expires_ms: (exp != i64::MAX).then_some(exp),
            });
        }
        // Message records no queue points at any more (their last ack was not yet applied).
        let mut max_id = 0;
        let mut orphans = Vec::new();
        for kv in messages.iter() {
            let (k, v) = kv.map_err(fj)?;
            let id = u64::from_be_bytes(k[..].try_into().unwrap_or_default());
            max_id = max_id.max(id);
            match refcounts.get_mut(&id) {
                Some(r) => {
                    r.1 = (k.len() + v.len()) as u64;
                    stored += r.1;
                }
                None => orphans.push(id),
            }
        }
        for id in orphans {
            messages.remove(id.to_be_bytes()).map_err(fj)?;
        }
        crate::message::seed_ids(max_id + 1);
        Ok(Arc::new(Self {
            keyspace,
            messages,
            queue,
            policy,
            refcounts: Mutex::new(refcounts),
            stored: AtomicU64::new(stored),
            limit,
            overflow,
            recovered: Mutex::new(recovered),
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            sync_lock: tokio::sync::Mutex::new(()),
        }))
    }

    /// Endpoint ids that have messages on disk (their queues must exist even without a route).
    pub fn recovered_endpoints(&self) -> Vec<String> {
        self.recovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The queue for `endpoint`, seeded with what the store holds for it.
    pub fn queue(
        self: &Arc<Self>,
        endpoint: &str,
        capacity: usize,
        live_first: bool,
    ) -> DurableQueue {
        let entries = self
            .recovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(endpoint)
            .unwrap_or_default();
        let mut inner = DqInner {
            live_first,
            ..Default::default()
        };
        for e in entries {
            inner.next_seq = inner.next_seq.max(e.seq);
            *inner.per_priority.entry(e.priority).or_default() += 1;
            inner.pending.insert(
                (e.priority, e.seq),
                Entry {
                    msg_id: e.msg_id,
                    expires_ms: e.expires_ms,
                    delivery_count: 0,
                    cached: None,
                },
            );
        }
        DurableQueue {
            store: self.clone(),
            endpoint: endpoint.to_owned(),
            capacity,
            inner: Mutex::new(inner),
        }
    }

    /// Makes every write made so far durable (one fsync for all writers waiting together).
    pub async fn sync(&self) -> Result<(), StoreError> {
        if self.policy == SyncPolicy::Os {
            return Ok(());
        }
        let target = self.written.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let _leader = self.sync_lock.lock().await;
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let covered = self.written.load(Ordering::Acquire);
        let ks = self.keyspace.clone();
        tokio::task::spawn_blocking(move || ks.persist(fjall::PersistMode::SyncAll))
            .await
            .map_err(fj)?
            .map_err(fj)?;
        self.synced.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }

    /// Bytes the store takes on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.keyspace.disk_space()
    }

    /// Bytes held (message records and queue entries) and the limit, if any.
    pub fn usage(&self) -> (u64, Option<u64>) {
        (self.stored.load(Ordering::Relaxed), self.limit)
    }

    fn put(
        &self,
        endpoint: &str,
        priority: u32,
        seq: u64,
        msg: &Message,
        expires_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let key = queue_key(endpoint, priority, seq);
        let entry_bytes = (key.len() + 16) as u64;
        let mut batch = self.keyspace.batch();
        let added = {
            let mut rc = self.refcounts.lock().unwrap_or_else(|p| p.into_inner());
            let record = match rc.get(&msg.id) {
                Some((n, _)) if *n > 0 => None,
                _ => Some(encode(msg)?),
            };
            let record_bytes = record.as_ref().map_or(0, |r| (r.len() + 8) as u64);
            let added = record_bytes + entry_bytes;
            let stored = self.stored.load(Ordering::Relaxed);
            if let Some(limit) = self.limit {
                if stored + added > limit {
                    return Err(StoreError::Full { stored, limit });
                }
            }
            if let Some(r) = record {
                batch.insert(&self.messages, msg.id.to_be_bytes(), r);
            }
            let e = rc.entry(msg.id).or_default();
            e.0 += 1;
            e.1 += record_bytes;
            self.stored.fetch_add(added, Ordering::Relaxed);
            added
        };
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&msg.id.to_be_bytes());
        v[8..].copy_from_slice(&expires_ms.unwrap_or(i64::MAX).to_be_bytes());
        batch.insert(&self.queue, key, v);
        let r = batch.commit().map_err(fj);
        if r.is_err() {
            self.unref(msg.id);
            self.stored.fetch_sub(
                added.min(self.stored.load(Ordering::Relaxed)),
                Ordering::Relaxed,
            );
        }
        r?;
        self.written.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Drops one reference; returns the record's bytes when it was the last.
    fn unref(&self, msg_id: u64) -> Option<u64> {
        let mut rc = self.refcounts.lock().unwrap_or_else(|p| p.into_inner());
        match rc.get_mut(&msg_id) {
            Some((n, _)) if *n > 1 => {
                *n -= 1;
                None
            }
            Some(_) => rc.remove(&msg_id).map(|(_, bytes)| bytes),
            None => None,
        }
    }

    fn remove(&self, endpoint: &str, priority: u32, seq: u64, msg_id: u64) {
        let last = self.unref(msg_id);
        let key = queue_key(endpoint, priority, seq);
        let freed = (key.len() + 16) as u64 + last.unwrap_or(0);
        let _ = self
            .stored
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_sub(freed))
            });
        let mut batch = self.keyspace.batch();
        batch.remove(&self.queue, key);
        if last.is_some() {
            batch.remove(&self.messages, msg_id.to_be_bytes());
        }
        if let Err(e) = batch.commit() {
            // The entry stays on disk and is delivered again after a restart: a duplicate,
            // never a loss.
            tracing::warn!(error = %e, "removing a delivered message from the store failed");
        }
    }

    fn load(&self, msg_id: u64) -> Result<Message, StoreError> {
        let bytes = self
            .messages
            .get(msg_id.to_be_bytes())
            .map_err(fj)?
            .ok_or_else(|| StoreError::Corrupt(msg_id, "message record missing".into()))?;
        decode(msg_id, &bytes)
    }
}

/// Messages pushed while the queue holds fewer than this stay in memory too, so the live path
/// does not read back what it just wrote; beyond it (a backlog) bodies are read from disk.
const CACHE_LIMIT: usize = 4096;

struct Entry {
    msg_id: u64,
    expires_ms: Option<i64>,
    delivery_count: u8,
    cached: Option<Arc<Message>>,
}

#[derive(Default)]
struct DqInner {
    live_first: bool,
    newest_next: bool,
    next_seq: u64,
    pending: BTreeMap<(u32, u64), Entry>,
    in_flight: HashMap<u64, (u32, Entry)>,
    per_priority: BTreeMap<u32, usize>,
}

/// One endpoint's queue in the durable store.
pub struct DurableQueue {
    store: Arc<DurableStore>,
    endpoint: String,
    capacity: usize,
    inner: Mutex<DqInner>,
}

impl DurableQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, DqInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn dec(map: &mut BTreeMap<u32, usize>, p: u32) {
    if let Some(n) = map.get_mut(&p) {
        *n = n.saturating_sub(1);
    }
}

impl QueueStore for DurableQueue {
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
        let seq = g.next_seq + 1;
        loop {
            match self
                .store
                .put(&self.endpoint, priority, seq, &msg, expires_ms)
            {
                Ok(()) => break,
                Err(StoreError::Full { .. }) if self.store.overflow == Overflow::DropOldest => {
                    // Make room with this queue's oldest pending message, if it has one.
                    let oldest = g
                        .pending
                        .iter()
                        .min_by_key(|((_, s), _)| *s)
                        .map(|(k, _)| *k);
                    let Some((p, s)) = oldest else {
                        return Err(QueueError::StoreFull);
                    };
                    if let Some(e) = g.pending.remove(&(p, s)) {
                        dec(&mut g.per_priority, p);
                        self.store.remove(&self.endpoint, p, s, e.msg_id);
                        let dropped = e
                            .cached
                            .or_else(|| self.store.load(e.msg_id).ok().map(Arc::new));
                        if let Some(m) = dropped {
                            crate::metrics::dropped(crate::metrics::DROP_OVERFLOW, &m);
                        }
                    }
                }
                Err(StoreError::Full { .. }) => return Err(QueueError::StoreFull),
                Err(e) => {
                    tracing::error!(endpoint = %self.endpoint, "message not stored: {e}");
                    return Err(QueueError::Storage);
                }
            }
        }
        g.next_seq = seq;
        let msg_id = msg.id;
        let cached = (g.pending.len() < CACHE_LIMIT).then_some(msg);
        g.pending.insert(
            (priority, seq),
            Entry {
                msg_id,
                expires_ms,
                delivery_count: 0,
                cached,
            },
        );
        *g.per_priority.entry(priority).or_default() += 1;
        Ok(seq)
    }

    fn pop(&self, now_ms: i64) -> Popped {
        let mut g = self.lock();
        let mut expired = Vec::new();
        loop {
            let inner = &mut *g;
            let Some(((priority, seq), entry)) =
                take_next(&mut inner.pending, inner.live_first, &mut inner.newest_next)
            else {
                break;
            };
            let msg = match &entry.cached {
                Some(m) => Ok(m.clone()),
                None => self.store.load(entry.msg_id).map(Arc::new),
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(endpoint = %self.endpoint, "dropping an unreadable stored message: {e}");
                    dec(&mut g.per_priority, priority);
                    self.store
                        .remove(&self.endpoint, priority, seq, entry.msg_id);
                    continue;
                }
            };
            let q = Queued {
                seq,
                priority,
                msg,
                expires_ms: entry.expires_ms,
                delivery_count: entry.delivery_count,
            };
            if entry.expires_ms.is_some_and(|e| e <= now_ms) {
                dec(&mut g.per_priority, priority);
                self.store
                    .remove(&self.endpoint, priority, seq, entry.msg_id);
                expired.push(q);
                continue;
            }
            let kept = Entry {
                cached: Some(q.msg.clone()),
                ..entry
            };
            g.in_flight.insert(seq, (priority, kept));
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

    fn ack(&self, seq: u64) {
        let mut g = self.lock();
        if let Some((priority, e)) = g.in_flight.remove(&seq) {
            dec(&mut g.per_priority, priority);
            drop(g);
            self.store.remove(&self.endpoint, priority, seq, e.msg_id);
        }
    }

    fn release(&self, seq: u64) {
        let mut g = self.lock();
        if let Some((priority, mut e)) = g.in_flight.remove(&seq) {
            e.delivery_count = e.delivery_count.saturating_add(1);
            g.pending.insert((priority, seq), e);
        }
    }

    fn head_priority(&self) -> Option<u32> {
        self.lock().pending.first_key_value().map(|((p, _), _)| *p)
    }

    fn expire(&self, now_ms: i64) -> Vec<Queued> {
        let mut g = self.lock();
        let dead: Vec<(u32, u64)> = g
            .pending
            .iter()
            .filter(|(_, e)| e.expires_ms.is_some_and(|x| x <= now_ms))
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::new();
        for (priority, seq) in dead {
            if let Some(e) = g.pending.remove(&(priority, seq)) {
                dec(&mut g.per_priority, priority);
                self.store.remove(&self.endpoint, priority, seq, e.msg_id);
                let msg = match e.cached {
                    Some(m) => m,
                    None => match self.store.load(e.msg_id) {
                        Ok(m) => Arc::new(m),
                        Err(_) => continue,
                    },
                };
                out.push(Queued {
                    seq,
                    priority,
                    msg,
                    expires_ms: e.expires_ms,
                    delivery_count: e.delivery_count,
                });
            }
        }
        out
    }

    fn lengths(&self) -> BTreeMap<u32, usize> {
        self.lock().per_priority.clone()
    }
}

/// Opens the keyspace under `dir`, sized for an edge device: small caches and write buffers
/// (fjall's defaults suit servers and would make the hub's resident memory grow past 100 MiB
/// under load), one flush and one compaction worker.
pub fn open_keyspace(dir: &Path) -> Result<fjall::Keyspace, StoreError> {
    fjall::Config::new(dir)
        .cache_size(8 * 1024 * 1024)
        .max_write_buffer_size(16 * 1024 * 1024)
        .max_journaling_size(64 * 1024 * 1024)
        .flush_workers(1)
        .compaction_workers(1)
        .open()
        .map_err(fj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{identity::DeviceId, queue::tests::conformance};

    fn temp() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("edgehub-store-{}", uuid::Uuid::new_v4()))
    }

    fn msg(body: &str) -> Arc<Message> {
        let mut app = OrderedMap::new();
        app.insert("k".to_owned(), SimpleValue::String("v".into()));
        Arc::new(Message {
            body: body.as_bytes().to_vec(),
            properties: Some(Properties {
                message_id: Some(format!("id-{body}").into()),
                ..Default::default()
            }),
            application_properties: app,
            annotations: OrderedMap::new(),
            from: Identity::Module(DeviceId::parse("d").unwrap(), ModuleId::parse("m").unwrap()),
            output: Some("o".into()),
            enqueued_ms: 5,
            twin_change: false,
            id: crate::message::next_id(),
        })
    }

    #[test]
    fn durable_queue_conforms() {
        let dir = temp();
        let store = DurableStore::open(
            open_keyspace(&dir).unwrap(),
            SyncPolicy::Commit,
            None,
            Overflow::RejectNew,
        )
        .unwrap();
        let n = std::sync::atomic::AtomicUsize::new(0);
        conformance(|cap| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            Arc::new(store.queue(&format!("ep{i}"), cap, false))
        });
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn queues_survive_a_reopen_with_one_copy_per_message() {
        let dir = temp();
        let (a, b, c) = (msg("a"), msg("b"), msg("c"));
        {
            let store = DurableStore::open(
                open_keyspace(&dir).unwrap(),
                SyncPolicy::Commit,
                None,
                Overflow::RejectNew,
            )
            .unwrap();
            let q1 = store.queue("d/x/in", 100, false);
            let q2 = store.queue("iothub", 100, false);
            q1.try_push(a.clone(), 5, None).unwrap();
            q1.try_push(b.clone(), 5, Some(i64::MAX - 1)).unwrap();
            q1.try_push(c.clone(), 0, None).unwrap();
            q2.try_push(a.clone(), 1, None).unwrap();
            // c is delivered and acknowledged before the "crash".
            let first = q1.pop(0).item.unwrap();
            assert_eq!(first.msg.body, b"c");
            q1.ack(first.seq);
            store.sync().await.unwrap();
            assert_eq!(
                store.messages.len().unwrap(),
                2,
                "a is stored once for two queues"
            );
        }
        let store = DurableStore::open(
            open_keyspace(&dir).unwrap(),
            SyncPolicy::Commit,
            None,
            Overflow::RejectNew,
        )
        .unwrap();
        let mut eps = store.recovered_endpoints();
        eps.sort();
        assert_eq!(eps, vec!["d/x/in".to_owned(), "iothub".to_owned()]);
        let q1 = store.queue("d/x/in", 100, false);
        assert_eq!(q1.lengths().get(&5), Some(&2));
        let got: Vec<Arc<Message>> = (0..2).map(|_| q1.pop(0).item.unwrap().msg).collect();
        assert_eq!(got[0].body, b"a");
        assert_eq!(got[1].body, b"b");
        assert_eq!(got[0].properties, a.properties);
        assert_eq!(got[0].application_properties, a.application_properties);
        assert_eq!(
            (got[0].from.to_string(), got[0].output.clone()),
            ("d/m".into(), Some("o".into()))
        );
        assert!(q1.pop(0).item.is_none());
        // New ids never collide with stored ones.
        assert!(crate::message::next_id() > a.id.max(b.id).max(c.id));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_size_limit_holds_with_either_policy() {
        for overflow in [Overflow::RejectNew, Overflow::DropOldest] {
            let dir = temp();
            // Room for about three messages.
            let limit = 3 * 400;
            let store = DurableStore::open(
                open_keyspace(&dir).unwrap(),
                SyncPolicy::Os,
                Some(limit),
                overflow,
            )
            .unwrap();
            let q = store.queue("cap", 1000, false);
            let mut accepted = Vec::new();
            for i in 0..10 {
                let m = msg(&format!("{i:0>200}"));
                match q.try_push(m.clone(), 1, None) {
                    Ok(_) => accepted.push(i),
                    Err(e) => {
                        assert_eq!(overflow, Overflow::RejectNew);
                        assert_eq!(e, QueueError::StoreFull);
                    }
                }
                assert!(
                    store.usage().0 <= limit,
                    "{:?} over the limit",
                    store.usage()
                );
            }
            match overflow {
                Overflow::RejectNew => {
                    // The first ones stay, later ones are refused.
                    assert!(accepted.len() >= 2 && accepted.len() < 10, "{accepted:?}");
                    assert_eq!(
                        q.pop(0).item.unwrap().msg.body,
                        format!("{:0>200}", 0).as_bytes()
                    );
                }
                Overflow::DropOldest => {
                    // Everything was accepted; the newest are kept.
                    assert_eq!(accepted.len(), 10);
                    let kept = q.lengths().values().sum::<usize>();
                    assert!((2..10).contains(&kept), "{kept}");
                    let mut last = None;
                    while let Some(item) = q.pop(0).item {
                        last = Some(item.msg.body.clone());
                    }
                    assert_eq!(last.unwrap(), format!("{:0>200}", 9).as_bytes());
                }
            }
            drop(q);
            drop(store);
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                files_under(&p, out);
            } else {
                out.push(p);
            }
        }
    }

    #[tokio::test]
    async fn a_torn_last_write_is_discarded_and_everything_before_it_recovers() {
        let dir = temp();
        let bodies: Vec<String> = (0..50).map(|i| format!("torn-{i}")).collect();
        {
            let store = DurableStore::open(
                open_keyspace(&dir).unwrap(),
                SyncPolicy::Commit,
                None,
                Overflow::RejectNew,
            )
            .unwrap();
            let q = store.queue("t", 100, false);
            for b in &bodies {
                q.try_push(msg(b), 1, None).unwrap();
            }
            store.sync().await.unwrap();
        }
        // A write cut short by a crash: half a record of garbage at the end of each journal.
        let mut files = Vec::new();
        files_under(&dir.join("journals"), &mut files);
        assert!(
            !files.is_empty(),
            "the store keeps a journal under journals/"
        );
        for f in &files {
            use std::io::Write;
            let mut h = std::fs::OpenOptions::new().append(true).open(f).unwrap();
            h.write_all(&[0x5a, 0x01, 0xff, 0x00, 0x13, 0x37, 0xde])
                .unwrap();
        }
        let store = DurableStore::open(
            open_keyspace(&dir).unwrap(),
            SyncPolicy::Commit,
            None,
            Overflow::RejectNew,
        )
        .unwrap();
        let q = store.queue("t", 100, false);
        let got: Vec<Vec<u8>> =
            std::iter::from_fn(|| q.pop(0).item.map(|i| i.msg.body.clone())).collect();
        let want: Vec<Vec<u8>> = bodies.iter().map(|b| b.as_bytes().to_vec()).collect();
        assert_eq!(got, want);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn expired_messages_leave_the_store() {
        let dir = temp();
        let store = DurableStore::open(
            open_keyspace(&dir).unwrap(),
            SyncPolicy::Os,
            None,
            Overflow::RejectNew,
        )
        .unwrap();
        let q = store.queue("e", 10, false);
        q.try_push(msg("long"), 1, Some(10_000)).unwrap();
        q.try_push(msg("short"), 1, Some(100)).unwrap();
        let gone = q.expire(500);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].msg.body, b"short");
        assert_eq!(q.lengths().get(&1), Some(&1));
        assert_eq!(store.queue.len().unwrap(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
