//! Module twins: desired and reported properties per identity, each with its own `$version`,
//! kept in memory (a `DashMap`) and written through to the embedded store before an update is
//! acknowledged.
//!
//! Invariants:
//! * an identity reaches only its own twin: callers pass the identity the link was authorised
//!   for, never one taken from a message;
//! * every change of the desired properties bumps `$version` by one and is pushed, as a patch
//!   carrying that `$version`, to the identity's twin link when it is subscribed; patches are
//!   pushed in version order on one channel, so a subscribed client sees no gap;
//! * a client that read its twin (GET) and subscribes later (PUT) gets the difference between
//!   what it read and the current desired properties at once: nothing changed in between is lost;
//! * persisted state is the JSON of [`Twin`] under the lower-cased identity in the `twins`
//!   partition; a write is fsynced before the client is answered, on the blocking pool, with no
//!   map guard held: writes are ordered by an async lock and become visible once durable;
//! * a twin link holds at most [`RESPONSE_QUEUE`] unsent answers: a request is served only
//!   when its answer has a place ([`TwinStore::reserve`]); desired changes take no place, they
//!   coalesce into one patch that goes out after the answers queued before it;
//! * the whole reported document, not only each patch, is held to IoT Hub's 32 KB.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Notify};

use crate::model::identity::{Identity, IdentityKey};

/// IoT Hub's limits on reported properties.
pub const MAX_DEPTH: usize = 10;
pub const MAX_NAME_BYTES: usize = 1024;
pub const MAX_VALUE_BYTES: usize = 4096;
pub const MAX_DOCUMENT_BYTES: usize = 32 * 1024;
const MAX_SAFE_INTEGER: i64 = 1 << 53;

#[derive(Debug, thiserror::Error)]
pub enum TwinError {
    #[error("invalid reported properties: {0}")]
    Invalid(String),
    #[error("twin store: {0}")]
    Store(String),
    #[error("the twin's etag is {0}, not the one given")]
    Precondition(String),
}

/// One twin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Twin {
    pub desired: Map<String, Value>,
    pub desired_version: i64,
    pub reported: Map<String, Value>,
    pub reported_version: i64,
    /// The desired properties the config (deployment manifest) gave last, so that a new config
    /// changes only what it changes and leaves patches made through the service API alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_desired: Option<Map<String, Value>>,
}

impl Default for Twin {
    fn default() -> Self {
        Self {
            desired: Map::new(),
            desired_version: 1,
            reported: Map::new(),
            reported_version: 1,
            config_desired: None,
        }
    }
}

fn with_version(props: &Map<String, Value>, version: i64) -> Value {
    let mut m = props.clone();
    m.insert("$version".into(), Value::from(version));
    Value::Object(m)
}

impl Twin {
    /// The body of a GET response: `{"desired":{…,"$version":n},"reported":{…,"$version":m}}`.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "desired": with_version(&self.desired, self.desired_version),
            "reported": with_version(&self.reported, self.reported_version),
        })
    }

    /// The twin's version as IoT Hub counts it: 1 for a new twin, one more for every change of
    /// the desired or the reported properties.
    pub fn version(&self) -> i64 {
        self.desired_version + self.reported_version - 1
    }

    /// An opaque tag of this state of the twin, shaped like IoT Hub's (base64 of the version as
    /// 8 big-endian bytes, e.g. `AAAAAAAAAAE=`); it changes with every change of the twin.
    pub fn etag(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.version().to_be_bytes())
    }
}

/// A twin property name for an arbitrary string, as edgeHub encodes client ids: the characters
/// IoT Hub does not allow in names (`.`, `$`, `#`, space) are percent-encoded.
pub fn encode_key(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '.' => out.push_str("%2E"),
            '$' => out.push_str("%24"),
            '#' => out.push_str("%23"),
            ' ' => out.push_str("%20"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    out
}

/// The current UTC time as RFC 3339 (`2026-11-26T07:12:03.123Z`).
pub fn utc_now() -> String {
    crate::model::time::utc_now()
}

/// A twin section without the document's `$version`/`$metadata`.
pub fn strip_meta(mut m: Map<String, Value>) -> Map<String, Value> {
    m.retain(|k, _| !k.starts_with('$'));
    m
}

/// JSON merge patch (RFC 7386): objects merge, `null` deletes, anything else replaces.
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(p) => {
                let slot = target
                    .entry(k.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(t) = slot {
                    merge(t, p);
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

/// The merge patch that turns `old` into `new` (`null` for removed keys).
pub fn diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut patch = Map::new();
    for (k, v) in new {
        match (old.get(k), v) {
            (Some(Value::Object(o)), Value::Object(n)) => {
                let d = diff(o, n);
                if !d.is_empty() {
                    patch.insert(k.clone(), Value::Object(d));
                }
            }
            (Some(o), n) if o == n => {}
            (_, n) => {
                patch.insert(k.clone(), n.clone());
            }
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            patch.insert(k.clone(), Value::Null);
        }
    }
    patch
}

/// Checks a reported-properties patch the way IoT Hub does.
pub fn validate_reported(patch: &Map<String, Value>) -> Result<(), TwinError> {
    let bad = |m: String| Err(TwinError::Invalid(m));
    let size = serde_json::to_vec(patch)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_DOCUMENT_BYTES {
        return bad(format!(
            "the patch is {size} bytes; at most {MAX_DOCUMENT_BYTES}"
        ));
    }
    fn walk(v: &Value, depth: usize, path: &str) -> Result<(), TwinError> {
        let bad = |m: String| Err(TwinError::Invalid(m));
        match v {
            Value::Object(o) => {
                if depth > MAX_DEPTH {
                    return bad(format!("{path}: nested deeper than {MAX_DEPTH} levels"));
                }
                for (k, child) in o {
                    if k.len() > MAX_NAME_BYTES {
                        return bad(format!(
                            "{path}: a property name is longer than {MAX_NAME_BYTES} bytes"
                        ));
                    }
                    if k.is_empty() || k.starts_with('$') || k.contains(['.', ' ']) {
                        return bad(format!(
                            "{path}: property name {k:?} is empty, starts with '$' or contains '.' or ' '"
                        ));
                    }
                    walk(child, depth + 1, &format!("{path}.{k}"))?;
                }
                Ok(())
            }
            Value::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    if item.is_null() {
                        return bad(format!("{path}[{i}]: arrays cannot contain null"));
                    }
                    walk(item, depth + 1, &format!("{path}[{i}]"))?;
                }
                Ok(())
            }
            Value::String(s) if s.len() > MAX_VALUE_BYTES => bad(format!(
                "{path}: a value is longer than {MAX_VALUE_BYTES} bytes"
            )),
            Value::Number(n) => {
                let in_range = match (n.as_i64(), n.as_u64()) {
                    (Some(i), _) => (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&i),
                    (None, Some(u)) => u <= MAX_SAFE_INTEGER as u64,
                    (None, None) => true,
                };
                if in_range {
                    Ok(())
                } else {
                    bad(format!("{path}: integers must be within ±2^53"))
                }
            }
            _ => Ok(()),
        }
    }
    walk(&Value::Object(patch.clone()), 1, "$")
}

/// What goes out on a twin response link.
#[derive(Debug, Clone, PartialEq)]
pub enum TwinOut {
    /// The answer to a request, with the request's correlation id.
    Response {
        correlation_id: Option<fe2o3_amqp::types::messaging::MessageId>,
        status: i32,
        body: Vec<u8>,
        /// The twin version the answer reflects (the reported version after a PATCH).
        version: Option<i64>,
    },
    /// A desired-properties patch (`$version` included), sent without a correlation id.
    Desired { patch: Value, version: i64 },
}

/// Answers a twin link may hold unsent. A client that sends requests and withholds credit on
/// its response link fills them; its next requests are refused (see [`TwinStore::reserve`])
/// instead of growing the hub's memory.
pub const RESPONSE_QUEUE: usize = 16;

/// The desired-property state of one twin link, shared by the store (which records changes)
/// and the link's receiver (which turns them into patches when it sends).
#[derive(Default)]
struct DesiredState {
    subscribed: bool,
    /// The desired properties as the client last saw them (from a GET or a push).
    seen: Option<(i64, Map<String, Value>)>,
    /// The newest desired properties not pushed yet: changes made while the client is slow
    /// coalesce here into one patch, so they take one slot however many there are.
    pending: Option<(i64, Map<String, Value>)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct LinkState {
    generation: u64,
    tx: mpsc::Sender<TwinOut>,
    desired: Arc<Mutex<DesiredState>>,
    wake: Arc<Notify>,
}

/// The receiving end of a twin link: request answers in order, and desired-property patches.
pub struct TwinLinkRx {
    rx: mpsc::Receiver<TwinOut>,
    desired: Arc<Mutex<DesiredState>>,
    wake: Arc<Notify>,
}

impl TwinLinkRx {
    /// The next thing to send; `None` once the link was replaced or detached. Answers queued
    /// before a desired change go out first.
    pub async fn recv(&mut self) -> Option<TwinOut> {
        loop {
            tokio::select! {
                biased;
                o = self.rx.recv() => return o,
                _ = self.wake.notified() => {
                    if let Some(d) = self.take_desired() {
                        return Some(d);
                    }
                }
            }
        }
    }

    /// What `recv` would give now, without waiting.
    pub fn try_recv(&mut self) -> Option<TwinOut> {
        self.rx.try_recv().ok().or_else(|| self.take_desired())
    }

    /// The patch from what the client saw to the newest desired properties, if it is subscribed
    /// and has not seen them.
    fn take_desired(&self) -> Option<TwinOut> {
        let mut s = lock(&self.desired);
        let (version, doc) = s.pending.take()?;
        if !s.subscribed {
            return None;
        }
        let patch = match &s.seen {
            Some((v, _)) if *v >= version => return None,
            Some((_, seen)) => diff(seen, &doc),
            // Never read: the whole desired document is the patch.
            None => doc.clone(),
        };
        s.seen = Some((version, doc));
        Some(TwinOut::Desired {
            patch: with_version(&patch, version),
            version,
        })
    }
}

/// A request may be served: its answer has a place on the identity's twin link (or there is no
/// link, and the answer will be dropped as before).
pub struct ResponseSlot(Option<mpsc::OwnedPermit<TwinOut>>);

impl ResponseSlot {
    /// Queues the answer; false when the identity had no twin link.
    pub fn send(self, out: TwinOut) -> bool {
        match self.0 {
            Some(permit) => {
                permit.send(out);
                true
            }
            None => false,
        }
    }
}

/// The identity's twin link already holds [`RESPONSE_QUEUE`] unsent answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{RESPONSE_QUEUE} twin answers are waiting for link credit; request refused")]
pub struct ResponsesFull;

/// The twins of every identity, their store, and the twin response links.
pub struct TwinStore {
    twins: DashMap<IdentityKey, Twin>,
    links: DashMap<IdentityKey, LinkState>,
    generation: std::sync::atomic::AtomicU64,
    store: Option<(fjall::Keyspace, fjall::PartitionHandle)>,
    /// Held by every write from reading the twin until it is durable and in `twins`, so writes
    /// are fsynced in the order they were made and none is lost to a concurrent one. An async
    /// lock: the fsync runs on the blocking pool and no worker thread waits for it.
    write: tokio::sync::Mutex<()>,
    /// Woken whenever a twin response link registers: a request that arrived first (a client
    /// may send it before the hub has processed the response link's attach) waits for it.
    link_attached: Notify,
}

fn key(id: &Identity) -> IdentityKey {
    id.key()
}

fn store_err(e: impl std::fmt::Display) -> TwinError {
    TwinError::Store(e.to_string())
}

fn json_len(m: &Map<String, Value>) -> usize {
    serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX)
}

impl TwinStore {
    /// In memory only (tests).
    pub fn in_memory() -> Self {
        Self {
            twins: DashMap::new(),
            links: DashMap::new(),
            generation: Default::default(),
            link_attached: Notify::new(),
            store: None,
            write: tokio::sync::Mutex::new(()),
        }
    }

    /// Opens (or creates) the store under `dir` and loads every twin.
    pub fn open(dir: &Path) -> Result<Self, TwinError> {
        let ks = fjall::Config::new(dir).open().map_err(store_err)?;
        Self::with_keyspace(ks)
    }

    /// Opens the twins partition of an open keyspace and loads every twin.
    pub fn with_keyspace(ks: fjall::Keyspace) -> Result<Self, TwinError> {
        let part = ks
            .open_partition("twins", fjall::PartitionCreateOptions::default())
            .map_err(store_err)?;
        let twins = DashMap::new();
        for kv in part.iter() {
            let (k, v) = kv.map_err(store_err)?;
            let k = String::from_utf8_lossy(&k).into_owned();
            let twin: Twin = serde_json::from_slice(&v)
                .map_err(|e| TwinError::Store(format!("twin {k}: {e}")))?;
            twins.insert(IdentityKey::from_stored(&k), twin);
        }
        Ok(Self {
            twins,
            links: DashMap::new(),
            generation: Default::default(),
            store: Some((ks, part)),
            write: tokio::sync::Mutex::new(()),
            link_attached: Notify::new(),
        })
    }

    /// The twin under `k` as it is now (a copy; no guard is kept).
    fn current(&self, k: &IdentityKey) -> Twin {
        self.twins.get(k).map(|t| t.clone()).unwrap_or_default()
    }

    /// Writes `next` through to the store and fsyncs it on the blocking pool, then makes it the
    /// twin in memory. The caller holds `write`. If the caller goes away during the fsync, the
    /// write may be on disk and not in memory: it was never acknowledged, and the next write
    /// of that twin replaces it.
    async fn commit(&self, k: &IdentityKey, next: Twin) -> Result<(), TwinError> {
        if let Some((ks, part)) = &self.store {
            let bytes = serde_json::to_vec(&next).map_err(store_err)?;
            let (ks, part, key) = (ks.clone(), part.clone(), k.as_str().to_owned());
            tokio::task::spawn_blocking(move || {
                part.insert(key, bytes).map_err(store_err)?;
                ks.persist(fjall::PersistMode::SyncAll).map_err(store_err)
            })
            .await
            .map_err(store_err)??;
        }
        self.twins.insert(k.clone(), next);
        Ok(())
    }

    pub fn get(&self, id: &Identity) -> Twin {
        self.current(&key(id))
    }

    /// Validates and applies a reported patch; returns the new reported `$version` once the
    /// change is durable. The whole reported document is held to IoT Hub's 32 KB, as each
    /// patch is.
    pub async fn update_reported(
        &self,
        id: &Identity,
        patch: &Map<String, Value>,
    ) -> Result<i64, TwinError> {
        validate_reported(patch)?;
        let k = key(id);
        let _order = self.write.lock().await;
        let mut next = self.current(&k);
        merge(&mut next.reported, patch);
        let size = json_len(&next.reported);
        if size > MAX_DOCUMENT_BYTES {
            return Err(TwinError::Invalid(format!(
                "the reported properties would be {size} bytes; at most {MAX_DOCUMENT_BYTES}"
            )));
        }
        next.reported_version += 1;
        let version = next.reported_version;
        self.commit(&k, next).await?;
        Ok(version)
    }

    /// Makes `desired` the identity's desired properties. When they change, the version goes up
    /// by one and the patch is pushed to a subscribed link. Returns the new version, if any.
    pub async fn set_desired(
        &self,
        id: &Identity,
        desired: &Map<String, Value>,
    ) -> Result<Option<i64>, TwinError> {
        let k = key(id);
        let _order = self.write.lock().await;
        let mut next = self.current(&k);
        if &next.desired == desired {
            return Ok(None);
        }
        next.desired = desired.clone();
        next.desired_version += 1;
        let version = next.desired_version;
        self.commit(&k, next).await?;
        self.push_desired(&k);
        Ok(Some(version))
    }

    /// Merges a desired-properties patch (JSON merge patch: `null` deletes) into the identity's
    /// twin, if `precondition` holds for the twin as it is. A change bumps the desired
    /// `$version` and is pushed to a subscribed link, as with [`set_desired`](Self::set_desired);
    /// a patch that changes nothing keeps the version. Returns the twin after the patch.
    pub async fn patch_desired(
        &self,
        id: &Identity,
        patch: &Map<String, Value>,
        precondition: impl FnOnce(&Twin) -> bool,
    ) -> Result<Twin, TwinError> {
        validate_reported(patch)?;
        let k = key(id);
        let _order = self.write.lock().await;
        let current = self.current(&k);
        if !precondition(&current) {
            return Err(TwinError::Precondition(current.etag()));
        }
        let mut next = current.clone();
        merge(&mut next.desired, patch);
        if next.desired == current.desired {
            return Ok(next);
        }
        let size = json_len(&next.desired);
        if size > MAX_DOCUMENT_BYTES {
            return Err(TwinError::Invalid(format!(
                "the desired properties would be {size} bytes; at most {MAX_DOCUMENT_BYTES}"
            )));
        }
        next.desired_version += 1;
        self.commit(&k, next.clone()).await?;
        self.push_desired(&k);
        Ok(next)
    }

    /// Deletes the twin of an identity that no longer exists (a registry delete), so one
    /// created later under the same id starts with an empty twin, as in IoT Hub.
    pub async fn remove(&self, id: &Identity) -> Result<(), TwinError> {
        let k = key(id);
        let _order = self.write.lock().await;
        if let Some((ks, part)) = &self.store {
            let (ks, part, stored) = (ks.clone(), part.clone(), k.as_str().to_owned());
            tokio::task::spawn_blocking(move || {
                part.remove(stored).map_err(store_err)?;
                ks.persist(fjall::PersistMode::SyncAll).map_err(store_err)
            })
            .await
            .map_err(store_err)??;
        }
        self.twins.remove(&k);
        Ok(())
    }

    /// Whether the identity has a twin response link attached.
    pub fn has_link(&self, id: &Identity) -> bool {
        self.links.contains_key(&key(id))
    }

    /// Applies the desired properties a config (deployment manifest) gives a module: the first
    /// time they become the desired properties; afterwards only the difference from the previous
    /// config is applied, so changes made since through the service API stay unless the config
    /// changes the same keys. Returns the new version when the desired properties changed.
    pub async fn apply_config_desired(
        &self,
        id: &Identity,
        config: &Map<String, Value>,
    ) -> Result<Option<i64>, TwinError> {
        let k = key(id);
        let _order = self.write.lock().await;
        let current = self.current(&k);
        if current.config_desired.as_ref() == Some(config) {
            return Ok(None);
        }
        let mut next = current.clone();
        match &current.config_desired {
            Some(previous) => merge(&mut next.desired, &diff(previous, config)),
            None => next.desired = config.clone(),
        }
        next.config_desired = Some(config.clone());
        let changed = next.desired != current.desired;
        if changed {
            next.desired_version += 1;
        }
        let version = next.desired_version;
        self.commit(&k, next).await?;
        if changed {
            self.push_desired(&k);
        }
        Ok(changed.then_some(version))
    }

    /// Tells the subscribed link that the desired properties changed; it sends the client what
    /// it has not seen when it next has credit. Called under `write`, so versions go out in
    /// order.
    fn push_desired(&self, k: &IdentityKey) {
        let Some((version, doc)) = self
            .twins
            .get(k)
            .map(|t| (t.desired_version, t.desired.clone()))
        else {
            return;
        };
        let Some((state, wake)) = self
            .links
            .get(k)
            .map(|l| (l.desired.clone(), l.wake.clone()))
        else {
            return;
        };
        {
            let mut s = lock(&state);
            if !s.subscribed || s.seen.as_ref().is_some_and(|(v, _)| *v >= version) {
                return;
            }
            if s.pending.as_ref().is_some_and(|(v, _)| *v >= version) {
                return;
            }
            s.pending = Some((version, doc));
        }
        wake.notify_one();
    }

    /// A new twin response link for `id`; it replaces any older one.
    pub fn attach_link(&self, id: &Identity) -> (u64, TwinLinkRx) {
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let desired = Arc::new(Mutex::new(DesiredState::default()));
        let wake = Arc::new(Notify::new());
        self.links.insert(
            key(id),
            LinkState {
                generation,
                tx,
                desired: desired.clone(),
                wake: wake.clone(),
            },
        );
        self.link_attached.notify_waiters();
        (generation, TwinLinkRx { rx, desired, wake })
    }

    pub fn detach_link(&self, id: &Identity, generation: u64) {
        self.links
            .remove_if(&key(id), |_, l| l.generation == generation);
    }

    /// A place for the answer to a request of `id`, taken before the request is served; when
    /// the link already holds [`RESPONSE_QUEUE`] answers the request is to be refused.
    pub fn reserve(&self, id: &Identity) -> Result<ResponseSlot, ResponsesFull> {
        let Some(tx) = self.links.get(&key(id)).map(|l| l.tx.clone()) else {
            return Ok(ResponseSlot(None));
        };
        match tx.try_reserve_owned() {
            Ok(permit) => Ok(ResponseSlot(Some(permit))),
            Err(mpsc::error::TrySendError::Full(_)) => Err(ResponsesFull),
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(ResponseSlot(None)),
        }
    }

    /// [`reserve`](Self::reserve), waiting up to `wait` for the identity's twin response link
    /// when it has none yet: a client may send its first request as soon as the request link is
    /// attached, before the hub has processed the response link's attach.
    pub async fn reserve_within(
        &self,
        id: &Identity,
        wait: std::time::Duration,
    ) -> Result<ResponseSlot, ResponsesFull> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let attached = self.link_attached.notified();
            tokio::pin!(attached);
            attached.as_mut().enable();
            let slot = self.reserve(id)?;
            if slot.0.is_some() || tokio::time::Instant::now() >= deadline {
                return Ok(slot);
            }
            if tokio::time::timeout_at(deadline, attached).await.is_err() {
                return self.reserve(id);
            }
        }
    }

    /// Sends a response to the identity's twin link; false when it has none or it is full.
    pub fn respond(&self, id: &Identity, out: TwinOut) -> bool {
        self.reserve(id).is_ok_and(|slot| slot.send(out))
    }

    /// Records that the client just read `twin` (a GET answer).
    pub fn mark_read(&self, id: &Identity, twin: &Twin) {
        if let Some(state) = self.links.get(&key(id)).map(|l| l.desired.clone()) {
            lock(&state).seen = Some((twin.desired_version, twin.desired.clone()));
        }
    }

    /// PUT / DELETE of `/notifications/twin/properties/desired`.
    pub fn subscribe(&self, id: &Identity, on: bool) {
        let k = key(id);
        let Some(state) = self.links.get(&k).map(|l| l.desired.clone()) else {
            return;
        };
        let read = {
            let mut s = lock(&state);
            s.subscribed = on;
            if !on {
                s.pending = None;
            }
            s.seen.is_some()
        };
        // Whatever changed between the client's GET and now goes out at once.
        if on && read {
            self.push_desired(&k);
        }
    }
}

#[cfg(test)]
mod config_desired_tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[tokio::test]
    async fn a_new_config_changes_only_what_it_changes() {
        let store = TwinStore::in_memory();
        let id = Identity::Module(
            crate::model::identity::DeviceId::parse("d").expect("id"),
            crate::model::identity::ModuleId::parse("m").expect("id"),
        );
        let v1 = store
            .apply_config_desired(&id, &obj(json!({"a": 1, "b": 1})))
            .await
            .expect("apply");
        assert_eq!(v1, Some(2));
        // A service patch on another key and on a config key.
        store
            .patch_desired(&id, &obj(json!({"s": 5, "a": 9})), |_| true)
            .await
            .expect("patch");
        // The same config again (a restart or a reload that changed nothing else): no change.
        assert_eq!(
            store
                .apply_config_desired(&id, &obj(json!({"a": 1, "b": 1})))
                .await
                .expect("apply"),
            None
        );
        assert_eq!(store.get(&id).desired, obj(json!({"a": 9, "b": 1, "s": 5})));
        // The config changes b and drops a: only those keys move.
        store
            .apply_config_desired(&id, &obj(json!({"b": 2})))
            .await
            .expect("apply");
        assert_eq!(store.get(&id).desired, obj(json!({"b": 2, "s": 5})));
    }
}

#[cfg(test)]
mod key_tests {
    #[test]
    fn client_ids_become_valid_property_names() {
        assert_eq!(super::encode_key("d/$edgeHub.x"), "d/%24edgeHub%2Ex");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::identity::{DeviceId, ModuleId};
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn module(m: &str) -> Identity {
        Identity::Module(DeviceId::parse("d").unwrap(), ModuleId::parse(m).unwrap())
    }

    #[test]
    fn merge_patch_semantics() {
        let mut t = obj(json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]}));
        merge(
            &mut t,
            &obj(json!({"a": null, "b": {"c": 5, "d": null, "f": {"g": 1}}, "e": [3], "h": "x"})),
        );
        assert_eq!(
            Value::Object(t),
            json!({"b": {"c": 5, "f": {"g": 1}}, "e": [3], "h": "x"})
        );
    }

    #[test]
    fn diff_then_merge_gives_the_new_document() {
        let old = obj(json!({"a": 1, "b": {"c": 2, "d": 3}, "gone": true}));
        let new = obj(json!({"a": 1, "b": {"c": 4, "d": 3}, "n": [1]}));
        let d = diff(&old, &new);
        assert_eq!(
            Value::Object(d.clone()),
            json!({"b": {"c": 4}, "gone": null, "n": [1]})
        );
        let mut applied = old.clone();
        merge(&mut applied, &d);
        assert_eq!(applied, new);
    }

    #[test]
    fn reported_validation_follows_iot_hub() {
        let ok = obj(
            json!({"temp": 21.5, "nested": {"a": [1, "x", {"b": true}]}, "big": 9007199254740992i64}),
        );
        assert!(validate_reported(&ok).is_ok());
        let mut deep = json!(1);
        for _ in 0..11 {
            deep = json!({ "x": deep });
        }
        let bad = [
            json!({"a": [1, null]}),
            json!({"a": 9007199254740993i64}),
            json!({"a": -9007199254740993i64}),
            json!({"$version": 3}),
            json!({"a.b": 1}),
            json!({"k": "v".repeat(4097)}),
            json!({ "n".repeat(1025): 1 }),
            json!({"x": "y".repeat(4000), "z": "y".repeat(4000), "q": "y".repeat(4000), "r": "y".repeat(4000),
                   "s": "y".repeat(4000), "t": "y".repeat(4000), "u": "y".repeat(4000), "v": "y".repeat(4000), "w": "y".repeat(1000)}),
            deep,
        ];
        for b in bad {
            let s = b.to_string();
            assert!(
                validate_reported(&obj(b)).is_err(),
                "{}",
                &s[..s.len().min(80)]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_before_the_response_link_waits_for_it_within_a_bound() {
        let s = std::sync::Arc::new(TwinStore::in_memory());
        let id = module("a");
        // No response link ever: the slot comes back empty at the deadline.
        let started = tokio::time::Instant::now();
        let slot = s
            .reserve_within(&id, std::time::Duration::from_secs(5))
            .await
            .unwrap();
        assert!(slot.0.is_none());
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(5));
        // The response link attaches while the request waits: the slot is its.
        let waiting = {
            let (s, id) = (s.clone(), id.clone());
            tokio::spawn(async move {
                s.reserve_within(&id, std::time::Duration::from_secs(5))
                    .await
                    .unwrap()
            })
        };
        tokio::task::yield_now().await;
        let (_generation, _rx) = s.attach_link(&id);
        let slot = tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("woken by the attach")
            .unwrap();
        assert!(slot.0.is_some());
    }

    #[tokio::test]
    async fn reported_updates_bump_the_version_and_twins_are_isolated() {
        let s = TwinStore::in_memory();
        assert_eq!(
            s.update_reported(&module("a"), &obj(json!({"x": 1})))
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            s.update_reported(&module("a"), &obj(json!({"x": null, "y": 2})))
                .await
                .unwrap(),
            3
        );
        assert_eq!(Value::Object(s.get(&module("a")).reported), json!({"y": 2}));
        assert!(s.get(&module("b")).reported.is_empty());
        assert_eq!(
            s.get(&module("A")).reported_version,
            3,
            "ids compare case-insensitively"
        );
    }

    #[tokio::test]
    async fn desired_patches_reach_a_subscribed_link_with_nothing_missed() {
        let s = TwinStore::in_memory();
        let a = module("a");
        s.set_desired(&a, &obj(json!({"v": 1}))).await.unwrap();
        let (_, mut rx) = s.attach_link(&a);
        // Not subscribed yet: nothing is pushed.
        s.set_desired(&a, &obj(json!({"v": 2}))).await.unwrap();
        assert!(rx.try_recv().is_none());
        // The client reads, then the desired state changes before it subscribes.
        let read = s.get(&a);
        s.mark_read(&a, &read);
        let v4 = s
            .set_desired(&a, &obj(json!({"v": 3, "w": 1})))
            .await
            .unwrap()
            .unwrap();
        s.subscribe(&a, true);
        assert_eq!(
            rx.try_recv().unwrap(),
            TwinOut::Desired {
                patch: json!({"v": 3, "w": 1, "$version": v4}),
                version: v4
            }
        );
        // Later changes are pushed as patches in order.
        s.set_desired(&a, &obj(json!({"v": 3}))).await.unwrap();
        assert_eq!(
            rx.try_recv().unwrap(),
            TwinOut::Desired {
                patch: json!({"w": null, "$version": v4 + 1}),
                version: v4 + 1
            }
        );
        assert_eq!(
            s.set_desired(&a, &obj(json!({"v": 3}))).await.unwrap(),
            None,
            "no change, no version"
        );
        s.subscribe(&a, false);
        s.set_desired(&a, &obj(json!({"v": 4}))).await.unwrap();
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn desired_patches_merge_check_the_etag_and_reach_the_link() {
        let s = TwinStore::in_memory();
        let a = module("a");
        let fresh = s.get(&a);
        assert_eq!(
            (fresh.version(), fresh.etag().as_str()),
            (1, "AAAAAAAAAAE=")
        );
        s.set_desired(&a, &obj(json!({"keep": 1, "drop": 2})))
            .await
            .unwrap();
        let (_, mut rx) = s.attach_link(&a);
        s.subscribe(&a, true);
        let before = s.get(&a);
        let after = s
            .patch_desired(&a, &obj(json!({"drop": null, "new": {"x": 1}})), |t| {
                t.etag() == before.etag()
            })
            .await
            .unwrap();
        assert_eq!(
            Value::Object(after.desired.clone()),
            json!({"keep": 1, "new": {"x": 1}})
        );
        assert_eq!(after.desired_version, before.desired_version + 1);
        assert_eq!(after.version(), before.version() + 1);
        assert_ne!(after.etag(), before.etag());
        assert_eq!(s.get(&a), after);
        // Never read, so the first push is the whole document.
        assert_eq!(
            rx.try_recv().unwrap(),
            TwinOut::Desired {
                patch: json!({"keep": 1, "new": {"x": 1}, "$version": after.desired_version}),
                version: after.desired_version
            }
        );
        // A stale etag changes nothing.
        let stale = s
            .patch_desired(&a, &obj(json!({"keep": 2})), |t| t.etag() == before.etag())
            .await;
        assert!(matches!(stale, Err(TwinError::Precondition(e)) if e == after.etag()));
        assert_eq!(s.get(&a), after);
        // A patch that changes nothing keeps the version; an invalid one is refused.
        let same = s
            .patch_desired(&a, &obj(json!({"keep": 1})), |_| true)
            .await
            .unwrap();
        assert_eq!(same.version(), after.version());
        assert!(rx.try_recv().is_none());
        assert!(matches!(
            s.patch_desired(&a, &obj(json!({"a.b": 1})), |_| true).await,
            Err(TwinError::Invalid(_))
        ));
        // Reported changes move the etag too.
        s.update_reported(&a, &obj(json!({"r": 1}))).await.unwrap();
        assert_ne!(s.get(&a).etag(), after.etag());
        assert!(s.has_link(&a) && !s.has_link(&module("b")));
    }

    #[tokio::test]
    async fn twins_survive_a_reopen() {
        let dir = std::env::temp_dir().join(format!("edgehub-twins-{}", uuid::Uuid::new_v4()));
        {
            let s = TwinStore::open(&dir).unwrap();
            s.update_reported(&module("a"), &obj(json!({"x": 1})))
                .await
                .unwrap();
            s.set_desired(&module("a"), &obj(json!({"d": true})))
                .await
                .unwrap();
        }
        let s = TwinStore::open(&dir).unwrap();
        let t = s.get(&module("a"));
        assert_eq!((t.reported_version, t.desired_version), (2, 2));
        assert_eq!(Value::Object(t.desired), json!({"d": true}));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_whole_reported_document_is_held_to_32_kb() {
        let s = TwinStore::in_memory();
        let a = module("a");
        // Each patch is well under the limit; together they are not.
        let chunk = "x".repeat(4000);
        let mut stored = 0;
        let refused = loop {
            let patch = obj(json!({ format!("k{stored}"): chunk }));
            match s.update_reported(&a, &patch).await {
                Ok(_) => stored += 1,
                Err(e) => break e,
            }
            assert!(stored < 20, "the document grew past the limit");
        };
        assert_eq!(
            stored, 8,
            "eight 4 KB values fit in 32 KB, a ninth does not"
        );
        assert!(
            matches!(&refused, TwinError::Invalid(m) if m.contains("32768")),
            "{refused}"
        );
        // Nothing of the refused patch was kept; removing something makes room again.
        assert_eq!(s.get(&a).reported.len(), 8);
        assert_eq!(s.get(&a).reported_version, 9);
        s.update_reported(&a, &obj(json!({"k0": null})))
            .await
            .unwrap();
        s.update_reported(&a, &obj(json!({"k8": chunk})))
            .await
            .unwrap();
    }

    fn response(n: i32) -> TwinOut {
        TwinOut::Response {
            correlation_id: None,
            status: n,
            body: Vec::new(),
            version: None,
        }
    }

    #[tokio::test]
    async fn a_link_that_takes_no_answers_gets_its_requests_refused() {
        let s = TwinStore::in_memory();
        let a = module("a");
        // No link: requests are served and their answers dropped, as before.
        assert!(!s.reserve(&a).unwrap().send(response(0)));
        let (_, mut rx) = s.attach_link(&a);
        for n in 0..RESPONSE_QUEUE {
            assert!(s.reserve(&a).unwrap().send(response(n as i32)));
        }
        assert_eq!(s.reserve(&a).err(), Some(ResponsesFull));
        assert!(!s.respond(&a, response(99)), "nothing beyond the bound");
        // Desired changes meanwhile take no slot and are not lost.
        let read = s.get(&a);
        s.mark_read(&a, &read);
        s.subscribe(&a, true);
        for v in 0..50 {
            s.set_desired(&a, &obj(json!({ "v": v }))).await.unwrap();
        }
        // The client takes one answer: one request may be served again.
        assert_eq!(rx.recv().await, Some(response(0)));
        assert!(s.reserve(&a).unwrap().send(response(100)));
        assert_eq!(s.reserve(&a).err(), Some(ResponsesFull));
        // Answers come in order, then the fifty changes as one patch with the last version.
        for n in (1..RESPONSE_QUEUE as i32).chain([100]) {
            assert_eq!(rx.recv().await, Some(response(n)));
        }
        let v = s.get(&a).desired_version;
        assert_eq!(
            rx.recv().await,
            Some(TwinOut::Desired {
                patch: json!({"v": 49, "$version": v}),
                version: v
            })
        );
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_twin_write_waits_without_holding_the_thread() {
        let s = std::sync::Arc::new(TwinStore::in_memory());
        let a = module("a");
        // Another write is in progress (holding the write order).
        let order = s.write.lock().await;
        let writer = tokio::spawn({
            let (s, a) = (s.clone(), a.clone());
            async move { s.update_reported(&a, &obj(json!({"x": 1}))).await }
        });
        // On a one-thread runtime, this task still runs and reads while the write waits.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!writer.is_finished());
        assert_eq!(s.get(&a).reported_version, 1);
        drop(order);
        assert_eq!(writer.await.unwrap().unwrap(), 2);
        assert_eq!(s.get(&a).reported_version, 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_persistent_twin_write_is_durable_when_it_returns() {
        let dir = std::env::temp_dir().join(format!("edgehub-twins-{}", uuid::Uuid::new_v4()));
        let s = TwinStore::open(&dir).unwrap();
        let a = module("a");
        assert_eq!(
            s.update_reported(&a, &obj(json!({"x": 1}))).await.unwrap(),
            2
        );
        drop(s);
        let reopened = TwinStore::open(&dir).unwrap();
        assert_eq!(reopened.get(&a).reported_version, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
