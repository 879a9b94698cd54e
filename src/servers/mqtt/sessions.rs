//! The subscriptions of MQTT clients that connect with clean-session `false`, kept across
//! reconnects and restarts, as edgeHub keeps them: the Python SDK never subscribes again after
//! a reconnect and relies on the hub to restore what it had.
//!
//! One JSON document per identity (`{"filter": qos, …}`) in the partition `mqtt_sessions` of
//! the store's keyspace (beside the twins), held in memory too. A write is fsynced before the
//! SUBACK that it belongs to goes out; a CONNECT with clean-session `true` deletes the document.

use std::collections::BTreeMap;

use dashmap::DashMap;

use crate::model::identity::{Identity, IdentityKey};

/// Topic filter → granted QoS.
pub type Filters = BTreeMap<String, u8>;

const PARTITION: &str = "mqtt_sessions";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MQTT sessions: {0}")]
pub struct SessionStoreError(String);

fn err(e: impl std::fmt::Display) -> SessionStoreError {
    SessionStoreError(e.to_string())
}

pub struct SessionStore {
    /// Keyed as every identity map; the stored record key is [`IdentityKey::as_str`].
    sessions: DashMap<IdentityKey, Filters>,
    store: Option<(fjall::Keyspace, fjall::PartitionHandle)>,
    /// Writes of one identity's session go out in the order they were made.
    write: tokio::sync::Mutex<()>,
}

impl SessionStore {
    /// Not persisted (tests).
    pub fn in_memory() -> Self {
        Self {
            sessions: DashMap::new(),
            store: None,
            write: tokio::sync::Mutex::new(()),
        }
    }

    /// Opens the sessions partition of the store's keyspace and loads every session.
    pub fn open(ks: fjall::Keyspace) -> Result<Self, SessionStoreError> {
        let part = ks
            .open_partition(PARTITION, fjall::PartitionCreateOptions::default())
            .map_err(err)?;
        let sessions = DashMap::new();
        for kv in part.iter() {
            let (k, v) = kv.map_err(err)?;
            let k = IdentityKey::from_stored(&String::from_utf8_lossy(&k));
            match serde_json::from_slice::<Filters>(&v) {
                Ok(f) => {
                    sessions.insert(k, f);
                }
                // One unreadable session must not stop the hub: that client subscribes again.
                Err(e) => tracing::warn!(identity = %k, "stored MQTT session unreadable: {e}"),
            }
        }
        Ok(Self {
            sessions,
            store: Some((ks, part)),
            write: tokio::sync::Mutex::new(()),
        })
    }

    /// The stored subscriptions of `id`, if it has a session.
    pub fn load(&self, id: &Identity) -> Option<Filters> {
        self.sessions.get(&id.key()).map(|f| f.clone())
    }

    /// Stores `filters` as `id`'s session (durable when this returns).
    pub async fn save(&self, id: &Identity, filters: &Filters) -> Result<(), SessionStoreError> {
        let k = id.key();
        let _order = self.write.lock().await;
        if let Some((ks, part)) = &self.store {
            let bytes = serde_json::to_vec(filters).map_err(err)?;
            let (ks, part, record) = (ks.clone(), part.clone(), k.as_str().to_owned());
            tokio::task::spawn_blocking(move || {
                part.insert(record, bytes).map_err(err)?;
                ks.persist(fjall::PersistMode::SyncAll).map_err(err)
            })
            .await
            .map_err(err)??;
        }
        self.sessions.insert(k, filters.clone());
        Ok(())
    }

    /// Forgets `id`'s session (clean-session `true`).
    pub async fn remove(&self, id: &Identity) -> Result<(), SessionStoreError> {
        let k = id.key();
        let _order = self.write.lock().await;
        if self.sessions.remove(&k).is_none() {
            return Ok(());
        }
        if let Some((ks, part)) = &self.store {
            let (ks, part) = (ks.clone(), part.clone());
            tokio::task::spawn_blocking(move || {
                part.remove(k.as_str()).map_err(err)?;
                ks.persist(fjall::PersistMode::SyncAll).map_err(err)
            })
            .await
            .map_err(err)??;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::identity::{DeviceId, ModuleId};

    #[tokio::test]
    async fn sessions_survive_a_reopen_and_clean_removes_them() {
        let dir =
            std::env::temp_dir().join(format!("edgehub-mqtt-sessions-{}", uuid::Uuid::new_v4()));
        let id = Identity::Module(DeviceId::parse("d").unwrap(), ModuleId::parse("M").unwrap());
        let mut f = Filters::new();
        f.insert("$iothub/methods/POST/#".into(), 1);
        f.insert("devices/d/modules/M/inputs/#".into(), 1);
        {
            let s = SessionStore::open(fjall::Config::new(&dir).open().unwrap()).unwrap();
            assert_eq!(s.load(&id), None);
            s.save(&id, &f).await.unwrap();
        }
        {
            let s = SessionStore::open(fjall::Config::new(&dir).open().unwrap()).unwrap();
            let upper =
                Identity::Module(DeviceId::parse("d").unwrap(), ModuleId::parse("m").unwrap());
            assert_eq!(s.load(&upper), Some(f.clone()));
            s.remove(&id).await.unwrap();
            assert_eq!(s.load(&id), None);
        }
        {
            let s = SessionStore::open(fjall::Config::new(&dir).open().unwrap()).unwrap();
            assert_eq!(s.load(&id), None);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
