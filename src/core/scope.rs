//! Identities from the device scope (runtime mode): the modules and leaf devices this hub
//! serves, with their keys, as the parent (IoT Hub or a parent edge hub) hands them out, kept
//! encrypted at rest so that a restart with the parent offline still authenticates everyone.
//!
//! Rules, as edgeHub's `DeviceScopeIdentitiesCache`:
//! * At open, the persisted identities are loaded **before** any network call; a value that does
//!   not decrypt (the `$edgeHub` identity was re-created, so its generation id changed) or does
//!   not parse is taken as absent. A non-empty store makes the cache *initialised*.
//! * A full refresh at start and every `rate` (1 h). While the cache is not initialised, a failed
//!   full refresh is retried every `retry` (60 s) and single-identity lookups are refused; once
//!   initialised, a failure waits for the next period and the cache is kept.
//! * After a full refresh, identities it did not return are removed (memory and store).
//! * An identity removed, disabled or given other keys by a refresh or a lookup is published
//!   in the registry's [`Revocations`]: its connections end at once, as a registry deletion
//!   ends them on a standalone hub.
//! * On demand: a full refresh (`request_refresh`, when the upstream connection comes back) and a
//!   single-identity lookup (an unknown identity, or a token that does not verify, at connect
//!   time); both are throttled by `delay` (120 s), per identity for lookups. A lookup answered
//!   "not found" or "not in scope" removes the identity; a transient failure keeps it.
//! * Bounds: at most `max_identities` identities (the rest of a refresh is dropped with a
//!   warning); the per-identity throttle map forgets entries older than `delay` and refuses
//!   lookups when it is full.
//!
//! Store format: partition `device_scope`, key = the identity's lower-cased id (`edge1/filter`),
//! value = the workload API's ciphertext of the JSON [`ScopeEntry`] (the registry's device or
//! module document and its auth chain). Time comes from `tokio::time`, so the tests run on a
//! paused clock.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock, RwLock,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    core::registry::Revocations,
    model::identity::{DeviceId, Identity, IdentityKey, Key, KeyPair, ModuleId},
};

/// The answer of an encrypt or decrypt call.
pub type SealFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send + 'a>>;

/// Encryption at rest (the workload API's `encrypt`/`decrypt`).
pub trait Sealer: Send + Sync {
    fn seal<'a>(&'a self, plaintext: &'a [u8], iv: &'a [u8]) -> SealFuture<'a>;
    fn open<'a>(&'a self, ciphertext: &'a [u8], iv: &'a [u8]) -> SealFuture<'a>;
}

/// Why a fetch from the device scope failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// 400/401/403/404: the identity is not (or no longer) in this hub's scope.
    #[error("not in scope: {0}")]
    Gone(String),
    /// Anything else: the parent is unreachable or failed; what is cached stays.
    #[error("{0}")]
    Transient(String),
}

pub type FetchFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, FetchError>> + Send + 'a>>;

/// Where identities come from (the device-scope API of the parent).
pub trait ScopeSource: Send + Sync {
    /// Every identity in this hub's scope, the scopes of nested edge devices included.
    fn full(&self) -> FetchFuture<'_, Vec<ScopeEntry>>;
    /// One identity (for a module, the parent may add its device).
    fn one<'a>(&'a self, id: &'a Identity) -> FetchFuture<'a, Vec<ScopeEntry>>;
    /// One identity under the nested edge device whose auth chain is `edge_chain` (a leaf
    /// device or module of a child hub's scope).
    fn one_under<'a>(
        &'a self,
        id: &'a Identity,
        edge_chain: &'a str,
    ) -> FetchFuture<'a, Vec<ScopeEntry>> {
        let _ = edge_chain;
        self.one(id)
    }
}

/// One identity as the device-scope API returns it, with its auth chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScopeEntry {
    /// The device or module document (`deviceId`, `moduleId`, `authentication`, `status`, …).
    pub identity: Value,
    /// `;`-separated, the target first, ending at the device that owns the scope.
    #[serde(rename = "authChain")]
    pub auth_chain: String,
}

impl ScopeEntry {
    /// The identity the document names.
    pub fn id(&self) -> Option<Identity> {
        let d = DeviceId::parse(self.identity.get("deviceId")?.as_str()?).ok()?;
        match self.identity.get("moduleId").and_then(Value::as_str) {
            Some(m) => Some(Identity::Module(d, ModuleId::parse(m).ok()?)),
            None => Some(Identity::Device(d)),
        }
    }

    /// The SAS keys, when the identity authenticates with them.
    pub fn keys(&self) -> Option<KeyPair> {
        let auth = self.identity.get("authentication")?;
        if !auth.get("type")?.as_str()?.eq_ignore_ascii_case("sas") {
            return None;
        }
        let sk = auth.get("symmetricKey")?;
        let primary = Key::from_base64(sk.get("primaryKey")?.as_str()?).ok()?;
        let secondary = sk
            .get("secondaryKey")
            .and_then(Value::as_str)
            .and_then(|s| Key::from_base64(s).ok())
            .unwrap_or_else(|| primary.clone());
        Some(KeyPair { primary, secondary })
    }

    /// How a device authenticates with a client certificate (`selfSigned`: its thumbprints;
    /// `certificateAuthority`: a chain to the trust bundle with its id as CN); `None` for
    /// modules and key or `none` authentication.
    pub fn x509(&self) -> Option<crate::model::x509::X509Auth> {
        use crate::model::x509::{Thumbprint, X509Auth};
        if self.identity.get("moduleId").is_some() {
            return None;
        }
        let auth = self.identity.get("authentication")?;
        let kind = auth.get("type")?.as_str()?;
        if kind.eq_ignore_ascii_case("certificateAuthority") {
            return Some(X509Auth::Ca);
        }
        if !kind.eq_ignore_ascii_case("selfSigned") {
            return None;
        }
        let prints: Vec<Thumbprint> = ["primaryThumbprint", "secondaryThumbprint"]
            .iter()
            .filter_map(|k| auth.pointer(&format!("/x509Thumbprint/{k}"))?.as_str())
            .filter_map(|t| Thumbprint::parse(t).ok())
            .collect();
        (!prints.is_empty()).then_some(X509Auth::Thumbprints(prints))
    }

    /// Devices may be disabled; modules are always enabled (as edgeHub treats them).
    pub fn enabled(&self) -> bool {
        self.identity.get("moduleId").is_some()
            || !self
                .identity
                .get("status")
                .and_then(Value::as_str)
                .is_some_and(|s| s.eq_ignore_ascii_case("disabled"))
    }

    /// An edge device (`capabilities.iotEdge`).
    pub fn is_edge(&self) -> bool {
        self.identity.get("moduleId").is_none()
            && self
                .identity
                .pointer("/capabilities/iotEdge")
                .and_then(Value::as_bool)
                .unwrap_or(false)
    }
}

/// The refresh policy (edgeHub's defaults in [`Default`]).
#[derive(Debug, Clone)]
pub struct RefreshSettings {
    /// Between full refreshes (`DeviceScopeCacheRefreshRateSecs`, 3600).
    pub rate: Duration,
    /// Throttle of on-demand refreshes (`DeviceScopeCacheRefreshDelaySecs`, 120).
    pub delay: Duration,
    /// Retry of a failed full refresh while nothing is known (60 s).
    pub retry: Duration,
    /// The most identities kept.
    pub max_identities: usize,
}

impl Default for RefreshSettings {
    fn default() -> Self {
        Self {
            rate: Duration::from_secs(3600),
            delay: Duration::from_secs(120),
            retry: Duration::from_secs(60),
            max_identities: 100_000,
        }
    }
}

/// Ids one `RefreshDeviceScopeIdentityCache` call may name at most.
pub const MAX_REFRESH_IDS: usize = 100;

/// The ids of a `RefreshDeviceScopeIdentityCache` payload: `deviceIds`, each `device` or
/// `device/module`.
pub fn parse_refresh_request(payload: &[u8]) -> Result<Vec<Identity>, String> {
    let v: Value =
        serde_json::from_slice(payload).map_err(|e| format!("the payload is not JSON: {e}"))?;
    let list = v
        .get("deviceIds")
        .and_then(Value::as_array)
        .ok_or("the payload needs deviceIds, an array of ids")?;
    if list.len() > MAX_REFRESH_IDS {
        return Err(format!("at most {MAX_REFRESH_IDS} deviceIds at once"));
    }
    list.iter()
        .map(|v| {
            let s = v.as_str().ok_or("deviceIds holds strings")?;
            let bad = |e: crate::model::identity::IdError| format!("{s:?}: {e}");
            Ok(match s.split_once('/') {
                Some((d, m)) => Identity::Module(
                    DeviceId::parse(d).map_err(bad)?,
                    ModuleId::parse(m).map_err(bad)?,
                ),
                None => Identity::Device(DeviceId::parse(s).map_err(bad)?),
            })
        })
        .collect()
}

/// Identities tracked by the per-identity throttle at most.
const MAX_THROTTLED: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("device-scope store: {0}")]
    Store(String),
}

struct Persist {
    ks: fjall::Keyspace,
    part: fjall::PartitionHandle,
    sealer: Arc<dyn Sealer>,
    iv: Vec<u8>,
}

#[derive(Default)]
struct Throttle {
    last_full: Option<Instant>,
    last_one: HashMap<IdentityKey, Instant>,
}

/// The identities of this hub's device scope.
pub struct ScopeCache {
    own: DeviceId,
    known: RwLock<HashMap<IdentityKey, ScopeEntry>>,
    settings: RefreshSettings,
    persist: Option<Persist>,
    source: OnceLock<Arc<dyn ScopeSource>>,
    throttle: Mutex<Throttle>,
    initialised: AtomicBool,
    wake: tokio::sync::Notify,
    /// Store writes in order (a refresh's writes never interleave with a lookup's).
    writes: tokio::sync::Mutex<()>,
    /// Counts changes to the set of identities (added, removed), for whoever carries them
    /// (the upstream connection).
    changes: tokio::sync::watch::Sender<u64>,
    /// Where identities that lose their right to connect are published.
    revocations: OnceLock<Arc<Revocations>>,
}

/// Does going from `old` to `new` take away the right of `old`'s connections? Other keys, or
/// a device disabled.
fn revokes(old: &ScopeEntry, new: &ScopeEntry) -> bool {
    let pair = |e: &ScopeEntry| e.keys().map(|k| (k.primary, k.secondary));
    pair(old) != pair(new) || (old.enabled() && !new.enabled())
}

fn key_of(id: &Identity) -> IdentityKey {
    id.key()
}

impl ScopeCache {
    /// A cache kept in memory only.
    pub fn new(own: DeviceId, settings: RefreshSettings) -> Self {
        Self {
            own,
            known: RwLock::new(HashMap::new()),
            settings,
            persist: None,
            source: OnceLock::new(),
            throttle: Mutex::new(Throttle::default()),
            initialised: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            writes: tokio::sync::Mutex::new(()),
            changes: tokio::sync::watch::Sender::new(0),
            revocations: OnceLock::new(),
        }
    }

    /// Where removed, disabled and re-keyed identities are published; set once.
    pub fn set_revocations(&self, revocations: Arc<Revocations>) {
        let _ = self.revocations.set(revocations);
    }

    fn revoke(&self, keys: &[IdentityKey]) {
        if keys.is_empty() {
            return;
        }
        info!(
            identities = keys.len(),
            "device-scope identities removed, disabled or re-keyed; their connections end"
        );
        if let Some(r) = self.revocations.get() {
            r.publish(keys);
        }
    }

    /// A receiver that sees every change to the set of identities.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// A cache kept in `ks` (partition `device_scope`), sealed by `sealer` with `iv`; loads
    /// what an earlier run kept.
    pub async fn open(
        own: DeviceId,
        settings: RefreshSettings,
        ks: fjall::Keyspace,
        sealer: Arc<dyn Sealer>,
        iv: Vec<u8>,
    ) -> Result<Self, ScopeError> {
        let store_err = |e: fjall::Error| ScopeError::Store(e.to_string());
        let part = ks
            .open_partition("device_scope", fjall::PartitionCreateOptions::default())
            .map_err(store_err)?;
        let mut stored = Vec::new();
        for kv in part.iter() {
            let (k, v) = kv.map_err(store_err)?;
            stored.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        let mut known = HashMap::new();
        let mut unreadable = 0usize;
        for (k, sealed) in stored {
            let entry = match sealer.open(&sealed, &iv).await {
                Ok(plain) => serde_json::from_slice::<ScopeEntry>(&plain).ok(),
                Err(e) => {
                    debug!(identity = %k, "a kept identity does not decrypt: {e}");
                    None
                }
            };
            match entry.filter(|e| e.id().is_some_and(|id| key_of(&id).as_str() == k)) {
                Some(e) if known.len() < settings.max_identities => {
                    known.insert(IdentityKey::from_stored(&k), e);
                }
                _ => unreadable += 1,
            }
        }
        if unreadable > 0 {
            warn!(
                unreadable,
                "kept device-scope identities that cannot be read are ignored (a re-created $edgeHub identity cannot decrypt them)"
            );
        }
        info!(identities = known.len(), "device-scope identities loaded");
        let cache = Self {
            persist: Some(Persist {
                ks,
                part,
                sealer,
                iv,
            }),
            ..Self::new(own, settings)
        };
        cache
            .initialised
            .store(!known.is_empty(), Ordering::Release);
        *cache.known.write().unwrap_or_else(|p| p.into_inner()) = known;
        Ok(cache)
    }

    /// Where refreshes and lookups fetch from; set once.
    pub fn set_source(&self, source: Arc<dyn ScopeSource>) {
        let _ = self.source.set(source);
    }

    /// Has a full refresh succeeded, or did the store hold identities?
    pub fn initialised(&self) -> bool {
        self.initialised.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<IdentityKey, ScopeEntry>> {
        self.known.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The identity as the scope names it.
    pub fn known(&self, id: &Identity) -> Option<Identity> {
        self.read().get(&key_of(id)).and_then(ScopeEntry::id)
    }

    /// The entry of an identity.
    pub fn entry(&self, id: &Identity) -> Option<ScopeEntry> {
        self.read().get(&key_of(id)).cloned()
    }

    /// The keys a token of `id` may be signed with, in edgeHub's order: the identity's primary
    /// and secondary key, then, for a module, its device's. `None` when the identity is
    /// unknown, disabled or authenticates otherwise than with keys.
    pub fn keys(&self, id: &Identity) -> Option<(Identity, Vec<KeyPair>)> {
        let known = self.read();
        let entry = known.get(&key_of(id)).filter(|e| e.enabled())?;
        let canonical = entry.id()?;
        let mut keys: Vec<KeyPair> = entry.keys().into_iter().collect();
        if let Identity::Module(d, _) = &canonical {
            let device = known
                .get(&key_of(&Identity::Device(d.clone())))
                .filter(|e| e.enabled());
            keys.extend(device.and_then(ScopeEntry::keys));
        }
        (!keys.is_empty()).then_some((canonical, keys))
    }

    /// The modules of this hub's own device, `$edgeHub` and `$edgeAgent` left out.
    pub fn own_modules(&self) -> Vec<ModuleId> {
        let mut out: Vec<ModuleId> = self
            .read()
            .values()
            .filter_map(|e| match e.id()? {
                Identity::Module(d, m)
                    if d.as_str().eq_ignore_ascii_case(self.own.as_str())
                        && !m.as_str().starts_with('$') =>
                {
                    Some(m)
                }
                _ => None,
            })
            .collect();
        out.sort();
        out
    }

    /// The enabled leaf devices directly below this hub's device (auth chain `{leaf};{own}`).
    pub fn own_leaves(&self) -> Vec<DeviceId> {
        let mut out: Vec<DeviceId> = self
            .read()
            .values()
            .filter(|e| !e.is_edge() && e.enabled())
            .filter(|e| {
                let mut links = e.auth_chain.split(';');
                links.next();
                links
                    .next()
                    .is_some_and(|p| p.eq_ignore_ascii_case(self.own.as_str()))
                    && links.next().is_none()
            })
            .filter_map(|e| match e.id()? {
                Identity::Device(d) => Some(d),
                Identity::Module(..) => None,
            })
            .collect();
        out.sort();
        out
    }

    /// The enabled leaf devices directly below this hub's device that authenticate with a
    /// client certificate, and how.
    pub fn own_x509_leaves(&self) -> Vec<(DeviceId, crate::model::x509::X509Auth)> {
        let own = self.own_leaves();
        let known = self.read();
        own.into_iter()
            .filter_map(|d| {
                let auth = known.get(&key_of(&Identity::Device(d.clone())))?.x509()?;
                Some((d, auth))
            })
            .collect()
    }

    /// Every entry whose auth chain passes through `device` (its scope as this hub knows it).
    pub fn entries_through(&self, device: &DeviceId) -> Vec<ScopeEntry> {
        self.read()
            .values()
            .filter(|e| {
                e.auth_chain
                    .split(';')
                    .any(|link| link.eq_ignore_ascii_case(device.as_str()))
            })
            .cloned()
            .collect()
    }

    /// Asks the refresh task for a full refresh (throttled by `delay`).
    pub fn request_refresh(&self) {
        self.wake.notify_one();
    }

    /// Fetches the whole scope and makes it the cache: new and changed identities are kept,
    /// missing ones removed. Returns how many identities the scope holds.
    pub async fn refresh_full(&self) -> Result<usize, FetchError> {
        let source = self
            .source
            .get()
            .cloned()
            .ok_or_else(|| FetchError::Transient("no device-scope source".into()))?;
        self.throttle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_full = Some(Instant::now());
        let mut fetched = source.full().await?;
        if fetched.len() > self.settings.max_identities {
            warn!(
                fetched = fetched.len(),
                kept = self.settings.max_identities,
                "the device scope holds more identities than are kept; the rest are dropped"
            );
            fetched.truncate(self.settings.max_identities);
        }
        let mut next = HashMap::new();
        for e in fetched {
            if let Some(id) = e.id() {
                next.insert(key_of(&id), e);
            }
        }
        let _order = self.writes.lock().await;
        let (changed, removed, revoked) = {
            let known = self.read();
            let changed: Vec<(IdentityKey, ScopeEntry)> = next
                .iter()
                .filter(|(k, e)| known.get(*k) != Some(*e))
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect();
            let removed: Vec<IdentityKey> = known
                .keys()
                .filter(|k| !next.contains_key(*k))
                .cloned()
                .collect();
            let revoked: Vec<IdentityKey> = changed
                .iter()
                .filter(|(k, e)| known.get(k).is_some_and(|old| revokes(old, e)))
                .map(|(k, _)| k.clone())
                .chain(removed.iter().cloned())
                .collect();
            (changed, removed, revoked)
        };
        let n = next.len();
        let added = {
            let known = self.read();
            next.keys().any(|k| !known.contains_key(k))
        };
        *self.known.write().unwrap_or_else(|p| p.into_inner()) = next;
        if added || !removed.is_empty() {
            self.changed();
        }
        self.revoke(&revoked);
        self.initialised.store(true, Ordering::Release);
        self.write_through(&changed, &removed).await;
        info!(
            identities = n,
            changed = changed.len(),
            removed = removed.len(),
            "device scope refreshed"
        );
        Ok(n)
    }

    /// Looks each of `ids` up at the parent now, not throttled: what the direct method
    /// `RefreshDeviceScopeIdentityCache` asks for (see [`parse_refresh_request`]), when the
    /// caller changed the scope on purpose.
    pub async fn refresh_ids(&self, ids: &[Identity]) {
        info!(
            identities = ids.len(),
            "device-scope refresh requested by direct method"
        );
        for id in ids {
            self.lookup_with(id, false).await;
        }
    }

    /// Looks one identity up at the parent, unless the cache is not initialised or the
    /// identity was looked up less than `delay` ago. Returns whether it is known afterwards.
    pub async fn lookup(&self, id: &Identity) -> bool {
        self.lookup_with(id, true).await
    }

    /// Like [`lookup`](Self::lookup), for an identity in the scope of the nested edge device
    /// `edge` (known to this cache): asked for with `edge`'s auth chain, as a child hub asks
    /// this hub for an identity of its own scope.
    pub async fn lookup_under(&self, id: &Identity, edge: &DeviceId) -> bool {
        let chain = self
            .entry(&Identity::Device(edge.clone()))
            .filter(ScopeEntry::is_edge)
            .map(|e| e.auth_chain);
        match chain {
            Some(chain) => self.lookup_chain(id, true, Some(chain)).await,
            None => self.known(id).is_some(),
        }
    }

    async fn lookup_with(&self, id: &Identity, throttled: bool) -> bool {
        self.lookup_chain(id, throttled, None).await
    }

    async fn lookup_chain(&self, id: &Identity, throttled: bool, chain: Option<String>) -> bool {
        let Some(source) = self.source.get().cloned() else {
            return self.known(id).is_some();
        };
        if !self.initialised() {
            debug!(identity = %id, "lookup refused: the device scope was never fetched");
            return false;
        }
        let k = key_of(id);
        {
            let mut t = self.throttle.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let delay = self.settings.delay;
            t.last_one.retain(|_, at| now.duration_since(*at) < delay);
            if throttled && t.last_one.contains_key(&k) {
                debug!(identity = %id, "lookup throttled");
                return self.known(id).is_some();
            }
            if t.last_one.len() >= MAX_THROTTLED {
                warn!(identity = %id, "too many identity lookups at once; refused");
                return self.known(id).is_some();
            }
            t.last_one.insert(k.clone(), now);
        }
        let fetched = match &chain {
            Some(c) => source.one_under(id, c).await,
            None => source.one(id).await,
        };
        match fetched {
            Ok(entries) => {
                let _order = self.writes.lock().await;
                let mut changed = Vec::new();
                let mut revoked = Vec::new();
                {
                    let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
                    for e in entries {
                        let Some(eid) = e.id() else { continue };
                        let ek = key_of(&eid);
                        if known.len() >= self.settings.max_identities && !known.contains_key(&ek) {
                            warn!(identity = %eid, "the device-scope cache is full");
                            continue;
                        }
                        if known.get(&ek) != Some(&e) {
                            if known.get(&ek).is_some_and(|old| revokes(old, &e)) {
                                revoked.push(ek.clone());
                            }
                            known.insert(ek.clone(), e.clone());
                            changed.push((ek, e));
                        }
                    }
                }
                if !changed.is_empty() {
                    info!(identity = %id, "identity fetched from the device scope");
                    self.changed();
                }
                self.revoke(&revoked);
                self.write_through(&changed, &[]).await;
            }
            // Not under the edge device the chain names: that says nothing of the identity
            // elsewhere in the scope, so the cache keeps it.
            Err(FetchError::Gone(why)) if chain.is_some() => {
                debug!(identity = %id, "not under the auth chain asked for: {why}")
            }
            Err(FetchError::Gone(why)) => {
                let _order = self.writes.lock().await;
                let was = self
                    .known
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&k);
                if was.is_some() {
                    info!(identity = %id, "identity removed: {why}");
                    self.changed();
                    self.revoke(std::slice::from_ref(&k));
                    self.write_through(&[], std::slice::from_ref(&k)).await;
                }
            }
            Err(FetchError::Transient(why)) => {
                debug!(identity = %id, "identity lookup failed: {why}")
            }
        }
        self.known(id).is_some()
    }

    /// Writes changes through to the store (sealed), on the blocking pool. A failure is logged:
    /// the cache in memory stays right, and the next refresh writes again.
    async fn write_through(&self, changed: &[(IdentityKey, ScopeEntry)], removed: &[IdentityKey]) {
        let Some(p) = &self.persist else { return };
        if changed.is_empty() && removed.is_empty() {
            return;
        }
        let mut sealed = Vec::with_capacity(changed.len());
        for (k, e) in changed {
            let plain = match serde_json::to_vec(e) {
                Ok(p) => p,
                Err(_) => continue,
            };
            match p.sealer.seal(&plain, &p.iv).await {
                Ok(c) => sealed.push((k.as_str().to_owned(), c)),
                Err(e) => {
                    warn!(identity = %k.as_str(), "identity not kept at rest: encryption failed: {e}")
                }
            }
        }
        let removed: Vec<String> = removed.iter().map(|k| k.as_str().to_owned()).collect();
        let (ks, part) = (p.ks.clone(), p.part.clone());
        let written = tokio::task::spawn_blocking(move || -> Result<(), fjall::Error> {
            for (k, v) in sealed {
                part.insert(k, v)?;
            }
            for k in removed {
                part.remove(k)?;
            }
            ks.persist(fjall::PersistMode::SyncAll)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("device-scope identities not written: {e}"),
            Err(e) => warn!("device-scope identities not written: {e}"),
        }
    }

    /// The refresh task: a full refresh at once and every `rate` (every `retry` while nothing
    /// is known), and on request, no sooner than `delay` after the last one.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut next = Instant::now();
        loop {
            let requested = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next) => false,
                _ = self.wake.notified() => true,
            };
            if requested {
                let last = self
                    .throttle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .last_full;
                if let Some(earliest) = last.map(|t| t + self.settings.delay) {
                    if Instant::now() < earliest {
                        next = next.min(earliest);
                        continue;
                    }
                }
            }
            let ok = match self.refresh_full().await {
                Ok(_) => true,
                Err(e) => {
                    warn!(
                        initialised = self.initialised(),
                        "device scope not refreshed: {e}; the cached identities stay"
                    );
                    false
                }
            };
            next = Instant::now()
                + if ok || self.initialised() {
                    self.settings.rate
                } else {
                    self.settings.retry
                };
        }
    }
}

#[cfg(test)]
mod tests;
