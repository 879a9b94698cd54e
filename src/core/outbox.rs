//! The outbox: reported-property patches waiting to go to the parent, merged per identity while
//! the parent is away, at most [`PENDING_MAX_BYTES`] each (past that, a resync). The twin
//! service fills it; the upstream transport drains it.

use std::{collections::HashMap, sync::Mutex};

use serde_json::Map;
use tokio::sync::Notify;

use crate::model::identity::{Identity, IdentityKey};

fn key(id: &Identity) -> IdentityKey {
    id.key()
}

pub type Patch = Map<String, serde_json::Value>;
/// Pending changes by identity.
type PendingMap = HashMap<IdentityKey, (Identity, Pending)>;

/// The most a pending patch may hold, as JSON: twice a whole reported document (IoT Hub's
/// 32 KB), room for a document's worth of changes and of deletions.
pub const PENDING_MAX_BYTES: usize = 2 * crate::core::twins::MAX_DOCUMENT_BYTES;

/// What one identity has waiting for upstream.
#[derive(Debug, Clone, PartialEq)]
pub enum Pending {
    /// The changes reported since the last patch sent, merged (deletions kept as `null`).
    Patch(Patch),
    /// More changes piled up than [`PENDING_MAX_BYTES`] (a client that adds and deletes new
    /// names while the parent is away leaves a `null` for each): instead of them, the parent's
    /// reported properties are read and the difference to this hub's is sent.
    Resync,
}

impl Pending {
    /// Merges `newer` over `self`, becoming `Resync` past the bound.
    fn merge(self, newer: Pending) -> Pending {
        match (self, newer) {
            (Pending::Patch(mut older), Pending::Patch(newer)) => {
                merge_pending(&mut older, &newer);
                let size = serde_json::to_vec(&older)
                    .map(|v| v.len())
                    .unwrap_or(usize::MAX);
                if size > PENDING_MAX_BYTES {
                    Pending::Resync
                } else {
                    Pending::Patch(older)
                }
            }
            _ => Pending::Resync,
        }
    }
}

/// What the rest of the hub hands the upstream transport: reported patches not yet sent, at most
/// [`PENDING_MAX_BYTES`] per identity.
pub struct Outbox {
    enabled: bool,
    reported: Mutex<PendingMap>,
    /// Woken when a patch is queued.
    pub ready: Notify,
}

/// Merges a patch into pending changes, keeping `null`s so that deletions travel too.
fn merge_pending(
    target: &mut Map<String, serde_json::Value>,
    patch: &Map<String, serde_json::Value>,
) {
    for (k, v) in patch {
        match (target.get_mut(k), v) {
            (Some(serde_json::Value::Object(t)), serde_json::Value::Object(p)) => {
                merge_pending(t, p)
            }
            _ => {
                target.insert(k.clone(), v.clone());
            }
        }
    }
}

impl Outbox {
    /// `enabled` is false in standalone mode, where nothing is kept.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            reported: Mutex::new(HashMap::new()),
            ready: Notify::new(),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, PendingMap> {
        self.reported.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a reported-properties patch for upstream, merged with any not sent yet (so an
    /// identity that reports while the upstream is away sends one patch when it is back).
    pub fn report(&self, id: &Identity, patch: &Map<String, serde_json::Value>) {
        if !self.enabled {
            return;
        }
        {
            let mut map = self.map();
            let next = match map.remove(&key(id)) {
                Some((_, older)) => older.merge(Pending::Patch(patch.clone())),
                None => Pending::Patch(Patch::new()).merge(Pending::Patch(patch.clone())),
            };
            map.insert(key(id), (id.clone(), next));
        }
        self.ready.notify_waiters();
    }

    /// Takes what `id` has waiting.
    pub fn take(&self, id: &Identity) -> Option<Pending> {
        self.map().remove(&key(id)).map(|(_, p)| p)
    }

    /// Puts back what could not be sent, under whatever arrived since.
    pub fn put_back(&self, id: &Identity, older: Pending) {
        let mut map = self.map();
        let next = match map.remove(&key(id)) {
            Some((_, newer)) => older.merge(newer),
            None => older,
        };
        map.insert(key(id), (id.clone(), next));
    }

    /// Identities with a patch waiting.
    pub fn pending(&self) -> usize {
        self.map().len()
    }
}

/// The patch that makes the parent's reported properties (as read, `$` members ignored) this
/// hub's: changed and new members, and `null` for members the parent has and this hub does
/// not.
pub fn resync_patch(parent: &Patch, here: &Patch) -> Patch {
    crate::core::twins::diff(&crate::core::twins::strip_meta(parent.clone()), here)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::identity::ModuleId;
    use serde_json::json;

    fn obj(v: serde_json::Value) -> Patch {
        v.as_object().cloned().unwrap()
    }

    fn module(m: &str) -> Identity {
        Identity::Module(
            crate::model::identity::DeviceId::parse("d").unwrap(),
            ModuleId::parse(m).unwrap(),
        )
    }

    #[test]
    fn pending_patches_merge_and_keep_deletions() {
        let o = Outbox::new(true);
        let a = module("a");
        o.report(&a, &obj(json!({"x": 1, "n": {"p": 1, "q": 2}})));
        o.report(&a, &obj(json!({"x": null, "n": {"q": 3}})));
        assert_eq!(o.pending(), 1);
        let p = o.take(&a).unwrap();
        assert_eq!(
            p,
            Pending::Patch(obj(json!({"x": null, "n": {"p": 1, "q": 3}})))
        );
        assert!(o.take(&a).is_none());
    }

    #[test]
    fn a_failed_patch_goes_back_under_newer_changes() {
        let o = Outbox::new(true);
        let a = module("a");
        o.report(&a, &obj(json!({"x": 1, "y": 1})));
        let sent = o.take(&a).unwrap();
        o.report(&a, &obj(json!({"y": 2})));
        o.put_back(&a, sent);
        assert_eq!(
            o.take(&a).unwrap(),
            Pending::Patch(obj(json!({"x": 1, "y": 2})))
        );
    }

    #[test]
    fn pending_changes_stay_bounded_and_fall_back_to_a_resync() {
        let o = Outbox::new(true);
        let a = module("a");
        // A client adds and deletes a new name each time while the parent is away: each
        // deletion leaves a `null` to send.
        let long = "n".repeat(100);
        for i in 0..1000 {
            let name = format!("{long}{i}");
            o.report(&a, &obj(json!({ name.clone(): 1 })));
            o.report(&a, &obj(json!({ name: null })));
            let held = match o.map().get(&key(&a)) {
                Some((_, Pending::Patch(p))) => serde_json::to_vec(p).unwrap().len(),
                Some((_, Pending::Resync)) => 0,
                None => panic!("nothing pending"),
            };
            assert!(held <= PENDING_MAX_BYTES, "{held} bytes after {i}");
        }
        assert!(matches!(o.take(&a), Some(Pending::Resync)));
        // A resync that fails goes back, and stays a resync under newer changes.
        o.report(&a, &obj(json!({"x": 1})));
        o.put_back(&a, Pending::Resync);
        assert_eq!(o.take(&a), Some(Pending::Resync));
        // What a resync sends: this hub's document over the parent's, `null` for the rest.
        let parent = obj(
            json!({"$version": 7, "keep": 1, "old": {"a": 1}, "gone": 2, "n": {"p": 1, "q": 1}}),
        );
        let here = obj(json!({"keep": 1, "new": 3, "n": {"p": 2, "q": 1}}));
        assert_eq!(
            resync_patch(&parent, &here),
            obj(json!({"old": null, "gone": null, "new": 3, "n": {"p": 2}}))
        );
    }

    #[test]
    fn standalone_keeps_nothing() {
        let o = Outbox::new(false);
        o.report(&module("a"), &obj(json!({"x": 1})));
        assert_eq!(o.pending(), 0);
    }
}
