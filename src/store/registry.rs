//! The identity registry's records: devices and modules created through the service API
//! (`Registry.create`, `addModule`), as opposed to those of the config file.
//!
//! Format: one JSON [`Record`] per identity in the partition `registry` of the store's keyspace,
//! under the identity's lower-cased key (`device` or `device/module`, as [`IdentityKey`]
//! writes it). Invariants and recovery:
//! * a write (one record, or a device and all its modules on delete) is one fjall batch,
//!   fsynced before [`RegistryStore::put`] / [`RegistryStore::remove`] returns, so the service
//!   is answered only once the change is durable, and a crash leaves either the old or the new
//!   state of an identity, never half of a delete;
//! * every record is read at start ([`RegistryStore::open`]); a record that does not parse
//!   stops the start with its key, as an unreadable twin does (an identity must not silently
//!   vanish, nor come back with other keys).

use serde::{Deserialize, Serialize};

use crate::model::identity::IdentityKey;

const PARTITION: &str = "registry";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("identity registry: {0}")]
pub struct RegistryStoreError(pub String);

fn err(e: impl std::fmt::Display) -> RegistryStoreError {
    RegistryStoreError(e.to_string())
}

/// How an identity of the registry authenticates (IoT Hub's `authentication.type`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum RecordAuth {
    /// Symmetric keys (base64), either of which signs a valid token.
    #[serde(rename_all = "camelCase")]
    Sas {
        primary_key: String,
        secondary_key: String,
    },
    /// Client certificates by thumbprint (hex SHA-1 or SHA-256).
    #[serde(rename_all = "camelCase")]
    SelfSigned {
        primary_thumbprint: Option<String>,
        secondary_thumbprint: Option<String>,
    },
    /// A client certificate chaining to the hub's client CAs, CN = device id.
    CertificateAuthority,
    /// No credentials of its own (a module authenticated by its device's hub).
    None,
}

/// One identity of the registry, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The device id as created (ids keep their case; lookups ignore it).
    pub device_id: String,
    /// The module id, for a module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    /// Made at creation, unique per (re)creation of an id.
    pub generation_id: String,
    /// Bumped by every change; the etag is made of it.
    pub revision: u64,
    /// `status`: `enabled` (true) or `disabled` (false). Modules are always enabled.
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// RFC 3339, when `status` last changed (or the creation).
    pub status_updated_time: String,
    pub auth: RecordAuth,
    /// `capabilities.iotEdge` as the service set it.
    #[serde(default)]
    pub iot_edge: bool,
    /// A module's `managedBy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
    /// A leaf device's `deviceScope` as the service set it: the scope of the edge device it
    /// connects through (`ms-azure-iot-edge://{edge}-{generationId}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_scope: Option<String>,
    /// `parentScopes` as the service set them (a device has at most one parent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_scopes: Vec<String>,
}

/// The `registry` partition.
pub struct RegistryStore {
    ks: fjall::Keyspace,
    part: fjall::PartitionHandle,
}

impl RegistryStore {
    /// Opens the partition and reads every record.
    pub fn open(ks: fjall::Keyspace) -> Result<(Self, Vec<Record>), RegistryStoreError> {
        let part = ks
            .open_partition(PARTITION, fjall::PartitionCreateOptions::default())
            .map_err(err)?;
        let mut records = Vec::new();
        for kv in part.iter() {
            let (k, v) = kv.map_err(err)?;
            let record: Record = serde_json::from_slice(&v).map_err(|e| {
                RegistryStoreError(format!(
                    "record {} does not parse: {e}",
                    String::from_utf8_lossy(&k)
                ))
            })?;
            records.push(record);
        }
        Ok((Self { ks, part }, records))
    }

    /// Writes `record` under `key`, durable when this returns.
    pub async fn put(&self, key: &IdentityKey, record: &Record) -> Result<(), RegistryStoreError> {
        let bytes = serde_json::to_vec(record).map_err(err)?;
        let (ks, part, key) = (self.ks.clone(), self.part.clone(), key.as_str().to_owned());
        tokio::task::spawn_blocking(move || {
            let mut batch = ks.batch();
            batch.insert(&part, key, bytes);
            batch.commit().map_err(err)?;
            ks.persist(fjall::PersistMode::SyncAll).map_err(err)
        })
        .await
        .map_err(err)?
    }

    /// Removes the records under `keys` in one batch, durable when this returns.
    pub async fn remove(&self, keys: Vec<IdentityKey>) -> Result<(), RegistryStoreError> {
        let (ks, part) = (self.ks.clone(), self.part.clone());
        tokio::task::spawn_blocking(move || {
            let mut batch = ks.batch();
            for k in keys {
                batch.remove(&part, k.as_str().to_owned());
            }
            batch.commit().map_err(err)?;
            ks.persist(fjall::PersistMode::SyncAll).map_err(err)
        })
        .await
        .map_err(err)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed when the guard drops (also when the
    /// test fails).
    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp() -> TempDir {
        TempDir(std::env::temp_dir().join(format!("edgehub-registry-{}", uuid::Uuid::new_v4())))
    }

    fn record(device: &str, module: Option<&str>) -> Record {
        Record {
            device_id: device.into(),
            module_id: module.map(Into::into),
            generation_id: "638000000000000001".into(),
            revision: 1,
            enabled: true,
            status_reason: None,
            status_updated_time: "2026-01-01T00:00:00Z".into(),
            auth: RecordAuth::Sas {
                primary_key: "AAAAAAAAAAAAAAAAAAAAAA==".into(),
                secondary_key: "AQEBAQEBAQEBAQEBAQEBAQ==".into(),
            },
            iot_edge: false,
            managed_by: None,
            device_scope: None,
            parent_scopes: Vec::new(),
        }
    }

    #[tokio::test]
    async fn records_survive_a_reopen_and_a_delete_removes_them_together() {
        let tmp = temp();
        let dir = &tmp.0;
        let key = |s: &str| IdentityKey::from_stored(s);
        {
            let (s, loaded) = RegistryStore::open(fjall::Config::new(dir).open().unwrap()).unwrap();
            assert!(loaded.is_empty());
            s.put(&key("Dev"), &record("Dev", None)).await.unwrap();
            s.put(&key("Dev/m"), &record("Dev", Some("m")))
                .await
                .unwrap();
            let mut other = record("other", None);
            other.auth = RecordAuth::SelfSigned {
                primary_thumbprint: Some("AB".repeat(20)),
                secondary_thumbprint: None,
            };
            s.put(&key("other"), &other).await.unwrap();
        }
        {
            let (s, mut loaded) =
                RegistryStore::open(fjall::Config::new(dir).open().unwrap()).unwrap();
            loaded.sort_by(|a, b| (&a.device_id, &a.module_id).cmp(&(&b.device_id, &b.module_id)));
            assert_eq!(loaded.len(), 3);
            assert_eq!(loaded[0], record("Dev", None));
            assert_eq!(loaded[1], record("Dev", Some("m")));
            assert!(matches!(loaded[2].auth, RecordAuth::SelfSigned { .. }));
            s.remove(vec![key("dev"), key("dev/m")]).await.unwrap();
        }
        {
            let (_, loaded) = RegistryStore::open(fjall::Config::new(dir).open().unwrap()).unwrap();
            assert_eq!(loaded.len(), 1);
            assert_eq!(loaded[0].device_id, "other");
        }
    }

    #[tokio::test]
    async fn an_unreadable_record_stops_the_open_with_its_key() {
        let tmp = temp();
        let dir = &tmp.0;
        {
            let ks = fjall::Config::new(dir).open().unwrap();
            let part = ks
                .open_partition(PARTITION, fjall::PartitionCreateOptions::default())
                .unwrap();
            part.insert("broken", b"{not json").unwrap();
            ks.persist(fjall::PersistMode::SyncAll).unwrap();
        }
        let e = RegistryStore::open(fjall::Config::new(dir).open().unwrap())
            .err()
            .unwrap();
        assert!(e.0.contains("broken"), "{e}");
    }
}
