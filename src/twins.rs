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
//!   partition; a write is fsynced before the client is answered.

use std::{path::Path, sync::Mutex};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::identity::Identity;

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
    let ms = crate::message::now_ms().max(0);
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
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

struct LinkState {
    generation: u64,
    tx: mpsc::UnboundedSender<TwinOut>,
    subscribed: bool,
    /// The desired properties as the client last saw them (from a GET or a push).
    seen: Option<(i64, Map<String, Value>)>,
}

/// The twins of every identity, their store, and the twin response links.
pub struct TwinStore {
    twins: DashMap<String, Twin>,
    links: DashMap<String, LinkState>,
    generation: std::sync::atomic::AtomicU64,
    store: Option<(fjall::Keyspace, fjall::PartitionHandle)>,
    /// Serialises writes to the store so they are fsynced in the order they were made.
    write: Mutex<()>,
}

fn key(id: &Identity) -> String {
    id.to_string().to_ascii_lowercase()
}

fn store_err(e: impl std::fmt::Display) -> TwinError {
    TwinError::Store(e.to_string())
}

impl TwinStore {
    /// In memory only (tests).
    pub fn in_memory() -> Self {
        Self {
            twins: DashMap::new(),
            links: DashMap::new(),
            generation: Default::default(),
            store: None,
            write: Mutex::new(()),
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
            twins.insert(k, twin);
        }
        Ok(Self {
            twins,
            links: DashMap::new(),
            generation: Default::default(),
            store: Some((ks, part)),
            write: Mutex::new(()),
        })
    }

    fn persist(&self, k: &str, twin: &Twin) -> Result<(), TwinError> {
        let Some((ks, part)) = &self.store else {
            return Ok(());
        };
        let _order = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = serde_json::to_vec(twin).map_err(store_err)?;
        part.insert(k, bytes).map_err(store_err)?;
        ks.persist(fjall::PersistMode::SyncAll).map_err(store_err)
    }

    pub fn get(&self, id: &Identity) -> Twin {
        self.twins
            .get(&key(id))
            .map(|t| t.clone())
            .unwrap_or_default()
    }

    /// Validates and applies a reported patch; returns the new reported `$version`.
    pub fn update_reported(
        &self,
        id: &Identity,
        patch: &Map<String, Value>,
    ) -> Result<i64, TwinError> {
        validate_reported(patch)?;
        let k = key(id);
        let mut entry = self.twins.entry(k.clone()).or_default();
        let mut next = entry.clone();
        merge(&mut next.reported, patch);
        next.reported_version += 1;
        self.persist(&k, &next)?;
        *entry = next;
        Ok(entry.reported_version)
    }

    /// Makes `desired` the identity's desired properties. When they change, the version goes up
    /// by one and the patch is pushed to a subscribed link. Returns the new version, if any.
    pub fn set_desired(
        &self,
        id: &Identity,
        desired: &Map<String, Value>,
    ) -> Result<Option<i64>, TwinError> {
        let k = key(id);
        let version = {
            let mut entry = self.twins.entry(k.clone()).or_default();
            if &entry.desired == desired {
                return Ok(None);
            }
            let mut next = entry.clone();
            next.desired = desired.clone();
            next.desired_version += 1;
            self.persist(&k, &next)?;
            *entry = next;
            entry.desired_version
        };
        self.push_desired(&k);
        Ok(Some(version))
    }

    /// Merges a desired-properties patch (JSON merge patch: `null` deletes) into the identity's
    /// twin, if `precondition` holds for the twin as it is. A change bumps the desired
    /// `$version` and is pushed to a subscribed link, as with [`set_desired`](Self::set_desired);
    /// a patch that changes nothing keeps the version. Returns the twin after the patch.
    pub fn patch_desired(
        &self,
        id: &Identity,
        patch: &Map<String, Value>,
        precondition: impl FnOnce(&Twin) -> bool,
    ) -> Result<Twin, TwinError> {
        validate_reported(patch)?;
        let k = key(id);
        let (twin, changed) = {
            let mut entry = self.twins.entry(k.clone()).or_default();
            if !precondition(&entry) {
                return Err(TwinError::Precondition(entry.etag()));
            }
            let mut next = entry.clone();
            merge(&mut next.desired, patch);
            if next.desired == entry.desired {
                (next, false)
            } else {
                let size = serde_json::to_vec(&next.desired)
                    .map(|v| v.len())
                    .unwrap_or(usize::MAX);
                if size > MAX_DOCUMENT_BYTES {
                    return Err(TwinError::Invalid(format!(
                        "the desired properties would be {size} bytes; at most {MAX_DOCUMENT_BYTES}"
                    )));
                }
                next.desired_version += 1;
                self.persist(&k, &next)?;
                *entry = next.clone();
                (next, true)
            }
        };
        if changed {
            self.push_desired(&k);
        }
        Ok(twin)
    }

    /// Whether the identity has a twin response link attached.
    pub fn has_link(&self, id: &Identity) -> bool {
        self.links.contains_key(&key(id))
    }

    /// Applies the desired properties a config (deployment manifest) gives a module: the first
    /// time they become the desired properties; afterwards only the difference from the previous
    /// config is applied, so changes made since through the service API stay unless the config
    /// changes the same keys. Returns the new version when the desired properties changed.
    pub fn apply_config_desired(
        &self,
        id: &Identity,
        config: &Map<String, Value>,
    ) -> Result<Option<i64>, TwinError> {
        let k = key(id);
        let changed = {
            let mut entry = self.twins.entry(k.clone()).or_default();
            if entry.config_desired.as_ref() == Some(config) {
                return Ok(None);
            }
            let mut next = entry.clone();
            match &entry.config_desired {
                Some(previous) => merge(&mut next.desired, &diff(previous, config)),
                None => next.desired = config.clone(),
            }
            next.config_desired = Some(config.clone());
            let changed = next.desired != entry.desired;
            if changed {
                next.desired_version += 1;
            }
            self.persist(&k, &next)?;
            *entry = next;
            changed.then_some(entry.desired_version)
        };
        if changed.is_some() {
            self.push_desired(&k);
        }
        Ok(changed)
    }

    /// Sends the subscribed link whatever it has not seen of the desired properties.
    fn push_desired(&self, k: &str) {
        let Some(twin) = self.twins.get(k).map(|t| t.clone()) else {
            return;
        };
        if let Some(mut link) = self.links.get_mut(k) {
            if !link.subscribed {
                return;
            }
            let patch = match &link.seen {
                Some((v, _)) if *v == twin.desired_version => return,
                Some((_, seen)) => diff(seen, &twin.desired),
                // Never read: the whole desired document is the patch.
                None => twin.desired.clone(),
            };
            let out = TwinOut::Desired {
                patch: with_version(&patch, twin.desired_version),
                version: twin.desired_version,
            };
            if link.tx.send(out).is_ok() {
                link.seen = Some((twin.desired_version, twin.desired.clone()));
            }
        }
    }

    /// A new twin response link for `id`; it replaces any older one.
    pub fn attach_link(&self, id: &Identity) -> (u64, mpsc::UnboundedReceiver<TwinOut>) {
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let (tx, rx) = mpsc::unbounded_channel();
        self.links.insert(
            key(id),
            LinkState {
                generation,
                tx,
                subscribed: false,
                seen: None,
            },
        );
        (generation, rx)
    }

    pub fn detach_link(&self, id: &Identity, generation: u64) {
        self.links
            .remove_if(&key(id), |_, l| l.generation == generation);
    }

    /// Sends a response to the identity's twin link; false when it has none.
    pub fn respond(&self, id: &Identity, out: TwinOut) -> bool {
        self.links
            .get(&key(id))
            .is_some_and(|l| l.tx.send(out).is_ok())
    }

    /// Records that the client just read `twin` (a GET answer).
    pub fn mark_read(&self, id: &Identity, twin: &Twin) {
        if let Some(mut l) = self.links.get_mut(&key(id)) {
            l.seen = Some((twin.desired_version, twin.desired.clone()));
        }
    }

    /// PUT / DELETE of `/notifications/twin/properties/desired`.
    pub fn subscribe(&self, id: &Identity, on: bool) {
        let k = key(id);
        if let Some(mut l) = self.links.get_mut(&k) {
            l.subscribed = on;
        }
        if on {
            // Whatever changed between the client's GET and now goes out at once.
            let read = self.links.get(&k).is_some_and(|l| l.seen.is_some());
            if read {
                self.push_desired(&k);
            }
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

    #[test]
    fn a_new_config_changes_only_what_it_changes() {
        let store = TwinStore::in_memory();
        let id = Identity::Module(
            crate::identity::DeviceId::parse("d").expect("id"),
            crate::identity::ModuleId::parse("m").expect("id"),
        );
        let v1 = store
            .apply_config_desired(&id, &obj(json!({"a": 1, "b": 1})))
            .expect("apply");
        assert_eq!(v1, Some(2));
        // A service patch on another key and on a config key.
        store
            .patch_desired(&id, &obj(json!({"s": 5, "a": 9})), |_| true)
            .expect("patch");
        // The same config again (a restart or a reload that changed nothing else): no change.
        assert_eq!(
            store
                .apply_config_desired(&id, &obj(json!({"a": 1, "b": 1})))
                .expect("apply"),
            None
        );
        assert_eq!(store.get(&id).desired, obj(json!({"a": 9, "b": 1, "s": 5})));
        // The config changes b and drops a: only those keys move.
        store
            .apply_config_desired(&id, &obj(json!({"b": 2})))
            .expect("apply");
        assert_eq!(store.get(&id).desired, obj(json!({"b": 2, "s": 5})));
    }
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn utc_now_is_rfc3339() {
        let t = super::utc_now();
        assert_eq!(t.len(), 24, "{t}");
        assert!(
            t.ends_with('Z') && &t[4..5] == "-" && &t[10..11] == "T",
            "{t}"
        );
        let year: i32 = t[..4].parse().unwrap();
        assert!(year >= 2024, "{t}");
    }

    #[test]
    fn client_ids_become_valid_property_names() {
        assert_eq!(super::encode_key("d/$edgeHub.x"), "d/%24edgeHub%2Ex");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{DeviceId, ModuleId};
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

    #[test]
    fn reported_updates_bump_the_version_and_twins_are_isolated() {
        let s = TwinStore::in_memory();
        assert_eq!(
            s.update_reported(&module("a"), &obj(json!({"x": 1})))
                .unwrap(),
            2
        );
        assert_eq!(
            s.update_reported(&module("a"), &obj(json!({"x": null, "y": 2})))
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

    #[test]
    fn desired_patches_reach_a_subscribed_link_with_nothing_missed() {
        let s = TwinStore::in_memory();
        let a = module("a");
        s.set_desired(&a, &obj(json!({"v": 1}))).unwrap();
        let (_, mut rx) = s.attach_link(&a);
        // Not subscribed yet: nothing is pushed.
        s.set_desired(&a, &obj(json!({"v": 2}))).unwrap();
        assert!(rx.try_recv().is_err());
        // The client reads, then the desired state changes before it subscribes.
        let read = s.get(&a);
        s.mark_read(&a, &read);
        let v4 = s
            .set_desired(&a, &obj(json!({"v": 3, "w": 1})))
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
        s.set_desired(&a, &obj(json!({"v": 3}))).unwrap();
        assert_eq!(
            rx.try_recv().unwrap(),
            TwinOut::Desired {
                patch: json!({"w": null, "$version": v4 + 1}),
                version: v4 + 1
            }
        );
        assert_eq!(
            s.set_desired(&a, &obj(json!({"v": 3}))).unwrap(),
            None,
            "no change, no version"
        );
        s.subscribe(&a, false);
        s.set_desired(&a, &obj(json!({"v": 4}))).unwrap();
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn desired_patches_merge_check_the_etag_and_reach_the_link() {
        let s = TwinStore::in_memory();
        let a = module("a");
        let fresh = s.get(&a);
        assert_eq!(
            (fresh.version(), fresh.etag().as_str()),
            (1, "AAAAAAAAAAE=")
        );
        s.set_desired(&a, &obj(json!({"keep": 1, "drop": 2})))
            .unwrap();
        let (_, mut rx) = s.attach_link(&a);
        s.subscribe(&a, true);
        let before = s.get(&a);
        let after = s
            .patch_desired(&a, &obj(json!({"drop": null, "new": {"x": 1}})), |t| {
                t.etag() == before.etag()
            })
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
        let stale = s.patch_desired(&a, &obj(json!({"keep": 2})), |t| t.etag() == before.etag());
        assert!(matches!(stale, Err(TwinError::Precondition(e)) if e == after.etag()));
        assert_eq!(s.get(&a), after);
        // A patch that changes nothing keeps the version; an invalid one is refused.
        let same = s
            .patch_desired(&a, &obj(json!({"keep": 1})), |_| true)
            .unwrap();
        assert_eq!(same.version(), after.version());
        assert!(rx.try_recv().is_err());
        assert!(matches!(
            s.patch_desired(&a, &obj(json!({"a.b": 1})), |_| true),
            Err(TwinError::Invalid(_))
        ));
        // Reported changes move the etag too.
        s.update_reported(&a, &obj(json!({"r": 1}))).unwrap();
        assert_ne!(s.get(&a).etag(), after.etag());
        assert!(s.has_link(&a) && !s.has_link(&module("b")));
    }

    #[test]
    fn twins_survive_a_reopen() {
        let dir = std::env::temp_dir().join(format!("edgehub-twins-{}", uuid::Uuid::new_v4()));
        {
            let s = TwinStore::open(&dir).unwrap();
            s.update_reported(&module("a"), &obj(json!({"x": 1})))
                .unwrap();
            s.set_desired(&module("a"), &obj(json!({"d": true})))
                .unwrap();
        }
        let s = TwinStore::open(&dir).unwrap();
        let t = s.get(&module("a"));
        assert_eq!((t.reported_version, t.desired_version), (2, 2));
        assert_eq!(Value::Object(t.desired), json!({"d": true}));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
