//! The identity registry of the service API: devices and modules created, changed and deleted
//! with `azure-iothub`'s `Registry` while the hub runs, beside the identities of the config
//! file. Transport-free: the HTTPS API parses requests into calls here and writes the results
//! (IoT Hub's JSON shapes, [`RegistryError`]) back.
//!
//! Rules, as IoT Hub applies them:
//! * `PUT` without `If-Match` creates; an id that exists, in the registry or in the config file
//!   (ids compared ignoring case, as tokens and addresses compare them), is 409. With `If-Match`
//!   it replaces: `*` or the current etag, else 412; an id that does not exist is 404.
//! * Symmetric keys left empty are generated (32 random bytes each) on create, and kept on an
//!   update that leaves them empty (the SDK sends empty keys when the caller gave none).
//! * Identities of the config file are listed and read like the others, and never changed or
//!   deleted here (409, naming the config file).
//! * A change that takes away an identity's right to its connections (delete, `disabled`, new
//!   credentials, a device's delete with its modules) is published in [`Revocations`]: every
//!   connection holding that identity closes its links with `amqp:unauthorized-access` (MQTT:
//!   the connection) at once, and its tokens are refused from then on.
//! * A delete also drops what the hub keeps for the identity: its twin, a device's C2D queue,
//!   and what the transports keep (an MQTT client's stored subscriptions, through
//!   [`Registry::on_delete`]), before the service is answered.
//! * Writes are serialised by one async lock; each is durable (`store::registry`) before the
//!   in-memory maps (the records here, the authenticator's live identities) change and the
//!   service is answered. At most `limits.maxRegistryIdentities` records.
//! * With an upstream, the parent (IoT Hub) owns the registry: writes are refused.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use dashmap::DashMap;
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::{
    core::{
        auth::{Authenticator, LiveIdentity},
        HubCore,
    },
    model::identity::{DeviceId, Identity, IdentityKey, Key, KeyPair, ModuleId},
    model::x509::{Thumbprint, X509Auth},
    store::registry::{Record, RecordAuth, RegistryStore},
};

/// What IoT Hub shows for a time that never happened (no activity yet).
const NEVER: &str = "0001-01-01T00:00:00Z";

/// Why a registry call is refused; the HTTPS API maps each to IoT Hub's status and code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("device {0} not found")]
    DeviceNotFound(String),
    #[error("module {0} not found")]
    ModuleNotFound(String),
    #[error("device {0} already exists")]
    DeviceExists(String),
    #[error("module {0} already exists on its device")]
    ModuleExists(String),
    #[error("{0} is defined in this hub's config file and cannot be changed or deleted through the registry; change the config file instead")]
    Configured(String),
    #[error("If-Match does not match the etag \"{0}\"")]
    Precondition(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the registry holds its maximum of {0} identities (limits.maxRegistryIdentities)")]
    Quota(usize),
    #[error("this hub forwards to a parent ({0}), which owns the identity registry; create and change identities there")]
    Upstream(String),
    #[error("identity registry: {0}")]
    Store(String),
}

fn invalid(why: impl Into<String>) -> RegistryError {
    RegistryError::Invalid(why.into())
}

/// Identities whose connections must end, published with increasing epochs.
///
/// A connection remembers the epoch it has seen (taken before it authenticates anything) and,
/// when the epoch moves, asks [`since`](Self::since) what was revoked after it. The log keeps
/// the last [`REVOCATION_LOG`] entries; a connection that fell further behind re-checks every
/// identity it holds ([`Revoked::Unknown`]).
pub struct Revocations {
    log: Mutex<VecDeque<(u64, IdentityKey)>>,
    epoch: watch::Sender<u64>,
}

const REVOCATION_LOG: usize = 1024;

/// What was revoked after an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    Keys(Vec<IdentityKey>),
    /// More than the log holds: check every identity against the authenticator.
    Unknown,
}

impl Default for Revocations {
    fn default() -> Self {
        Self {
            log: Mutex::new(VecDeque::new()),
            epoch: watch::Sender::new(0),
        }
    }
}

impl Revocations {
    /// Ends the connections of `keys` (each gets an epoch of its own).
    pub fn publish(&self, keys: &[IdentityKey]) {
        if keys.is_empty() {
            return;
        }
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let mut e = *self.epoch.borrow();
        for k in keys {
            e += 1;
            log.push_back((e, k.clone()));
        }
        while log.len() > REVOCATION_LOG {
            log.pop_front();
        }
        // Under the log lock, so the epoch never runs ahead of the log.
        self.epoch.send_replace(e);
    }

    /// The current epoch: what a new connection has seen.
    pub fn epoch(&self) -> u64 {
        *self.epoch.borrow()
    }

    /// Wakes when the epoch moves.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// What was revoked after epoch `seen`, and the epoch now seen.
    pub fn since(&self, seen: u64) -> (u64, Revoked) {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let now = *self.epoch.borrow();
        if now <= seen {
            return (now, Revoked::Keys(Vec::new()));
        }
        match log.front() {
            Some((first, _)) if *first <= seen + 1 => (
                now,
                Revoked::Keys(
                    log.iter()
                        .filter(|(e, _)| *e > seen)
                        .map(|(_, k)| k.clone())
                        .collect(),
                ),
            ),
            _ => (now, Revoked::Unknown),
        }
    }
}

/// Told of the identities a registry delete removed, once the delete is durable: what a
/// transport keeps for an identity beyond its connections (an MQTT client's stored
/// subscriptions) goes with it, so an identity created again under the same id starts afresh.
pub type OnDelete =
    Box<dyn Fn(Vec<Identity>) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// The registry's records and their store.
pub struct Registry {
    records: DashMap<IdentityKey, Record>,
    store: Option<RegistryStore>,
    /// Held by every write from its checks until the change is durable and applied.
    write: tokio::sync::Mutex<()>,
    /// The last revision given; etags are made of revisions, which never repeat (they follow
    /// the clock in milliseconds, and the last one given), so a deleted and re-created identity
    /// never matches an old etag.
    last_revision: AtomicU64,
    /// Shared with the device scope (runtime mode), whose refreshes revoke as well.
    pub revocations: std::sync::Arc<Revocations>,
    /// Registered by the transports at start (see [`OnDelete`]).
    on_delete: Mutex<Vec<std::sync::Arc<OnDelete>>>,
}

impl Registry {
    /// Not persisted (tests).
    pub fn in_memory() -> Self {
        Self::with(None, Vec::new())
    }

    /// The registry of `store`, with the records it holds.
    pub fn open(store: RegistryStore, records: Vec<Record>) -> Self {
        Self::with(Some(store), records)
    }

    fn with(store: Option<RegistryStore>, records: Vec<Record>) -> Self {
        let last = records.iter().map(|r| r.revision).max().unwrap_or(0);
        let map = DashMap::new();
        for r in records {
            if let Some(id) = identity_of(&r) {
                map.insert(id.key(), r);
            }
        }
        Self {
            records: map,
            store,
            write: tokio::sync::Mutex::new(()),
            last_revision: AtomicU64::new(last),
            revocations: std::sync::Arc::new(Revocations::default()),
            on_delete: Mutex::new(Vec::new()),
        }
    }

    /// Has `hook` told of every identity a registry delete removes from now on.
    pub fn on_delete(&self, hook: OnDelete) {
        self.on_delete
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(std::sync::Arc::new(hook));
    }

    /// Tells every [`OnDelete`] hook that `ids` are gone.
    async fn deleted(&self, ids: &[Identity]) {
        let hooks = self
            .on_delete
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for hook in hooks {
            hook(ids.to_vec()).await;
        }
    }

    /// Makes every record an identity of `auth` (at start). A record that names an identity
    /// of the config file (the config gained it since) stays hidden behind the config's.
    pub fn install(&self, auth: &Authenticator) {
        for r in self.records.iter() {
            if let Some(l) = live_identity(r.value()) {
                if auth.is_configured(&l.id) {
                    tracing::warn!(identity = %l.id, "a registry identity is also in the config file; the config's applies");
                    continue;
                }
                auth.set_live(l);
            }
        }
    }

    /// Records held (devices and modules).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn next_revision(&self) -> u64 {
        let clock = u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
        )
        .unwrap_or(u64::MAX);
        let mut last = self.last_revision.load(Ordering::Relaxed);
        loop {
            let next = clock.max(last + 1);
            match self.last_revision.compare_exchange(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(now) => last = now,
            }
        }
    }

    fn get(&self, id: &Identity) -> Option<Record> {
        self.records.get(&id.key()).map(|r| r.clone())
    }

    async fn put(&self, auth: &Authenticator, record: Record) -> Result<(), RegistryError> {
        let id = identity_of(&record).ok_or_else(|| invalid("the record names no valid id"))?;
        let key = id.key();
        if let Some(store) = &self.store {
            store
                .put(&key, &record)
                .await
                .map_err(|e| RegistryError::Store(e.to_string()))?;
        }
        if let Some(l) = live_identity(&record) {
            auth.set_live(l);
        }
        self.records.insert(key, record);
        Ok(())
    }

    async fn remove(
        &self,
        auth: &Authenticator,
        keys: Vec<IdentityKey>,
    ) -> Result<(), RegistryError> {
        if let Some(store) = &self.store {
            store
                .remove(keys.clone())
                .await
                .map_err(|e| RegistryError::Store(e.to_string()))?;
        }
        for k in &keys {
            self.records.remove(k);
            auth.remove_live(k);
        }
        self.revocations.publish(&keys);
        Ok(())
    }

    /// The registry modules of device `d`, sorted by id.
    fn modules_of(&self, d: &DeviceId) -> Vec<Record> {
        let mut out: Vec<Record> = self
            .records
            .iter()
            .filter(|r| r.module_id.is_some() && r.device_id.eq_ignore_ascii_case(d.as_str()))
            .map(|r| r.clone())
            .collect();
        out.sort_by(|a, b| a.module_id.cmp(&b.module_id));
        out
    }
}

fn identity_of(r: &Record) -> Option<Identity> {
    let d = DeviceId::parse(&r.device_id).ok()?;
    match &r.module_id {
        None => Some(Identity::Device(d)),
        Some(m) => Some(Identity::Module(d, ModuleId::parse(m).ok()?)),
    }
}

fn live_identity(r: &Record) -> Option<LiveIdentity> {
    let id = identity_of(r)?;
    let keys = match &r.auth {
        RecordAuth::Sas {
            primary_key,
            secondary_key,
        } => match (
            Key::from_base64(primary_key),
            Key::from_base64(secondary_key),
        ) {
            (Ok(primary), Ok(secondary)) => vec![KeyPair { primary, secondary }],
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let x509 = match (&r.auth, &r.module_id) {
        (
            RecordAuth::SelfSigned {
                primary_thumbprint,
                secondary_thumbprint,
            },
            None,
        ) => Some(X509Auth::Thumbprints(
            [primary_thumbprint, secondary_thumbprint]
                .into_iter()
                .flatten()
                .filter_map(|t| Thumbprint::parse(t).ok())
                .collect(),
        )),
        (RecordAuth::CertificateAuthority, None) => Some(X509Auth::Ca),
        _ => None,
    };
    Some(LiveIdentity {
        id,
        keys,
        enabled: r.enabled,
        x509,
        parent_scope: parent_scope(r).map(str::to_owned),
        edge_scope: (r.iot_edge && r.module_id.is_none())
            .then(|| edge_scope(&r.device_id, &r.generation_id)),
    })
}

/// How a PUT body asks an identity to authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthSpec {
    /// Keys given (base64, checked) or `None` (to be generated, or kept on update).
    Sas {
        primary: Option<String>,
        secondary: Option<String>,
    },
    SelfSigned {
        primary: String,
        secondary: Option<String>,
    },
    CertificateAuthority,
    None,
}

/// A device PUT body, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// `status`; `None` when absent (enabled on create, unchanged on update).
    pub enabled: Option<bool>,
    pub status_reason: Option<String>,
    pub auth: AuthSpec,
    pub iot_edge: bool,
    /// `deviceScope` of a leaf device: the scope of the edge device it connects through.
    pub device_scope: Option<String>,
    /// `parentScopes` (at most one).
    pub parent_scopes: Vec<String>,
}

/// A module PUT body, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSpec {
    pub auth: AuthSpec,
    pub managed_by: Option<String>,
}

fn text_field<'a>(
    body: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a str>, RegistryError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(invalid(format!("{path}{key} must be a string"))),
    }
}

fn object_field<'a>(
    body: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a Map<String, Value>>, RegistryError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(invalid(format!("{path}{key} must be an object"))),
    }
}

/// A key as given: empty means "generate one"; anything else must be base64 of 16–64 bytes.
fn key_field(o: &Map<String, Value>, key: &str) -> Result<Option<String>, RegistryError> {
    match text_field(o, key, "authentication.symmetricKey.")? {
        None | Some("") => Ok(None),
        Some(k) => Key::from_base64(k)
            .map(|k| Some(k.to_base64()))
            .map_err(|e| invalid(format!("authentication.symmetricKey.{key}: {e}"))),
    }
}

fn thumbprint_field(o: &Map<String, Value>, key: &str) -> Result<Option<String>, RegistryError> {
    match text_field(o, key, "authentication.x509Thumbprint.")? {
        None | Some("") => Ok(None),
        Some(t) => Thumbprint::parse(t)
            .map(|_| Some(t.trim().to_ascii_uppercase()))
            .map_err(|e| invalid(format!("authentication.x509Thumbprint.{key}: {e}"))),
    }
}

/// `authentication` as the SDK normalises it: absent means SAS with generated keys; without
/// `type`, `selfSigned` when a thumbprint is given, else `sas`.
fn parse_auth(body: &Map<String, Value>) -> Result<AuthSpec, RegistryError> {
    let Some(a) = object_field(body, "authentication", "")? else {
        return Ok(AuthSpec::Sas {
            primary: None,
            secondary: None,
        });
    };
    let empty = Map::new();
    let keys = object_field(a, "symmetricKey", "authentication.")?.unwrap_or(&empty);
    let prints = object_field(a, "x509Thumbprint", "authentication.")?.unwrap_or(&empty);
    let primary_print = thumbprint_field(prints, "primaryThumbprint")?;
    let secondary_print = thumbprint_field(prints, "secondaryThumbprint")?;
    let kind = match text_field(a, "type", "authentication.")? {
        Some(t) => t.to_ascii_lowercase(),
        None if primary_print.is_some() => "selfsigned".into(),
        None => "sas".into(),
    };
    match kind.as_str() {
        "sas" => Ok(AuthSpec::Sas {
            primary: key_field(keys, "primaryKey")?,
            secondary: key_field(keys, "secondaryKey")?,
        }),
        "selfsigned" => match primary_print {
            Some(primary) => Ok(AuthSpec::SelfSigned {
                primary,
                secondary: secondary_print,
            }),
            None => Err(invalid(
                "authentication type selfSigned needs x509Thumbprint.primaryThumbprint",
            )),
        },
        "certificateauthority" => Ok(AuthSpec::CertificateAuthority),
        "none" => Ok(AuthSpec::None),
        other => Err(invalid(format!(
            "authentication.type {other:?} is not sas, selfSigned, certificateAuthority or none"
        ))),
    }
}

/// The id a body names must be the path's, exactly.
fn check_body_id(
    body: &Map<String, Value>,
    key: &str,
    expected: &str,
) -> Result<(), RegistryError> {
    match text_field(body, key, "")? {
        Some(given) if given == expected => Ok(()),
        Some(given) => Err(invalid(format!(
            "{key} {given:?} in the body is not {expected:?} of the path"
        ))),
        None => Err(invalid(format!("{key} is required"))),
    }
}

/// Checks a device PUT body for the device `d` of the path.
pub fn parse_device(body: &Map<String, Value>, d: &DeviceId) -> Result<DeviceSpec, RegistryError> {
    check_body_id(body, "deviceId", d.as_str())?;
    let enabled = match text_field(body, "status", "")? {
        None => None,
        Some(s) if s.eq_ignore_ascii_case("enabled") => Some(true),
        Some(s) if s.eq_ignore_ascii_case("disabled") => Some(false),
        Some(s) => return Err(invalid(format!("status {s:?} is not enabled or disabled"))),
    };
    let status_reason =
        text_field(body, "statusReason", "")?.map(|s| s.chars().take(128).collect());
    let iot_edge = match object_field(body, "capabilities", "")?.and_then(|c| c.get("iotEdge")) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("capabilities.iotEdge must be true or false")),
    };
    let scope_text = |s: &str, what: &str| {
        if s.len() > MAX_SCOPE_LEN {
            Err(invalid(format!(
                "{what} is longer than {MAX_SCOPE_LEN} characters"
            )))
        } else {
            Ok(s.to_owned())
        }
    };
    let device_scope = match text_field(body, "deviceScope", "")? {
        None | Some("") => None,
        Some(s) => Some(scope_text(s, "deviceScope")?),
    };
    let parent_scopes = match body.get("parentScopes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) if a.len() <= 1 => a
            .iter()
            .map(|v| match v {
                Value::String(s) => scope_text(s, "parentScopes[0]"),
                _ => Err(invalid("parentScopes must hold strings")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::Array(_)) => return Err(invalid("a device has at most one parent scope")),
        Some(_) => return Err(invalid("parentScopes must be an array")),
    };
    Ok(DeviceSpec {
        enabled,
        status_reason,
        auth: parse_auth(body)?,
        iot_edge,
        device_scope,
        parent_scopes,
    })
}

/// Checks a module PUT body for the module `d/m` of the path.
pub fn parse_module(
    body: &Map<String, Value>,
    d: &DeviceId,
    m: &ModuleId,
) -> Result<ModuleSpec, RegistryError> {
    check_body_id(body, "deviceId", d.as_str())?;
    check_body_id(body, "moduleId", m.as_str())?;
    let managed_by = text_field(body, "managedBy", "")?.map(|s| s.chars().take(128).collect());
    Ok(ModuleSpec {
        auth: parse_auth(body)?,
        managed_by,
    })
}

/// 32 random bytes, base64: a generated symmetric key.
fn generate_key() -> Result<String, RegistryError> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| RegistryError::Store("no randomness available".into()))?;
    Ok(base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        bytes,
    ))
}

/// A generation id in IoT Hub's form (18 digits), new for every creation.
fn generation_id() -> Result<String, RegistryError> {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| RegistryError::Store("no randomness available".into()))?;
    Ok(format!(
        "638{:015}",
        u64::from_le_bytes(bytes) % 1_000_000_000_000_000
    ))
}

/// The longest `deviceScope` or parent scope taken.
const MAX_SCOPE_LEN: usize = 256;

/// The scope of an edge device, as IoT Hub writes it.
pub fn edge_scope(device: &str, generation_id: &str) -> String {
    format!("ms-azure-iot-edge://{device}-{generation_id}")
}

/// A stable generation id for an identity of the config file.
pub fn config_generation_id(id: &Identity) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, id.key().as_str().as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    format!("637{:015}", u64::from_le_bytes(b) % 1_000_000_000_000_000)
}

/// The record's credentials from a PUT's: empty keys are generated on create and kept on
/// update (when the identity had keys).
fn resolve_auth(spec: &AuthSpec, old: Option<&RecordAuth>) -> Result<RecordAuth, RegistryError> {
    Ok(match spec {
        AuthSpec::Sas { primary, secondary } => {
            let (old_p, old_s) = match old {
                Some(RecordAuth::Sas {
                    primary_key,
                    secondary_key,
                }) => (Some(primary_key.clone()), Some(secondary_key.clone())),
                _ => (None, None),
            };
            let pick = |given: &Option<String>, old: Option<String>| match (given, old) {
                (Some(k), _) => Ok(k.clone()),
                (None, Some(k)) => Ok(k),
                (None, None) => generate_key(),
            };
            RecordAuth::Sas {
                primary_key: pick(primary, old_p)?,
                secondary_key: pick(secondary, old_s)?,
            }
        }
        AuthSpec::SelfSigned { primary, secondary } => RecordAuth::SelfSigned {
            primary_thumbprint: Some(primary.clone()),
            secondary_thumbprint: secondary.clone(),
        },
        AuthSpec::CertificateAuthority => RecordAuth::CertificateAuthority,
        AuthSpec::None => RecordAuth::None,
    })
}

fn etag_of(revision: u64) -> String {
    base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        revision.to_string(),
    )
}

/// Does an `If-Match` value (`*`, or etags, quoted or not, weak or strong) match `etag`?
pub fn etag_matches(if_match: &str, etag: &str) -> bool {
    if_match.split(',').map(str::trim).any(|t| {
        // The service SDKs quote every etag they send, `*` included (`If-Match: "*"`).
        let t = t.strip_prefix("W/").unwrap_or(t).trim_matches('"');
        t == "*" || t == etag
    })
}

fn check_if_match(if_match: Option<&str>, etag: &str) -> Result<(), RegistryError> {
    match if_match {
        Some(m) if !etag_matches(m, etag) => Err(RegistryError::Precondition(etag.to_owned())),
        _ => Ok(()),
    }
}

fn writable(core: &HubCore) -> Result<(), RegistryError> {
    match &core.settings.upstream {
        Some(up) => Err(RegistryError::Upstream(up.hostname.clone())),
        None => Ok(()),
    }
}

fn auth_json(auth: &RecordAuth) -> Value {
    let (kind, keys, prints) = match auth {
        RecordAuth::Sas {
            primary_key,
            secondary_key,
        } => (
            "sas",
            (Some(primary_key.as_str()), Some(secondary_key.as_str())),
            (None, None),
        ),
        RecordAuth::SelfSigned {
            primary_thumbprint,
            secondary_thumbprint,
        } => (
            "selfSigned",
            (None, None),
            (
                primary_thumbprint.as_deref(),
                secondary_thumbprint.as_deref(),
            ),
        ),
        RecordAuth::CertificateAuthority => ("certificateAuthority", (None, None), (None, None)),
        RecordAuth::None => ("none", (None, None), (None, None)),
    };
    json!({
        "symmetricKey": {"primaryKey": keys.0, "secondaryKey": keys.1},
        "x509Thumbprint": {"primaryThumbprint": prints.0, "secondaryThumbprint": prints.1},
        "type": kind,
    })
}

fn connection_state(core: &HubCore, id: &Identity) -> &'static str {
    if core.is_connected(id) {
        "Connected"
    } else {
        "Disconnected"
    }
}

/// A registry record in IoT Hub's device or module JSON.
fn record_json(core: &HubCore, r: &Record) -> Value {
    let id = identity_of(r);
    let state = id
        .as_ref()
        .map_or("Disconnected", |id| connection_state(core, id));
    match &r.module_id {
        None => json!({
            "deviceId": r.device_id,
            "generationId": r.generation_id,
            "etag": etag_of(r.revision),
            "connectionState": state,
            "status": if r.enabled { "enabled" } else { "disabled" },
            "statusReason": r.status_reason,
            "connectionStateUpdatedTime": NEVER,
            "statusUpdatedTime": r.status_updated_time,
            "lastActivityTime": NEVER,
            "cloudToDeviceMessageCount": 0,
            "authentication": auth_json(&r.auth),
            "capabilities": {"iotEdge": r.iot_edge},
            "deviceScope": scope_of_record(core, r),
            "parentScopes": parent_scopes_of(core, r),
        }),
        Some(m) => json!({
            "moduleId": m,
            "deviceId": r.device_id,
            "managedBy": r.managed_by,
            "generationId": r.generation_id,
            "etag": etag_of(r.revision),
            "connectionState": state,
            "connectionStateUpdatedTime": NEVER,
            "lastActivityTime": NEVER,
            "cloudToDeviceMessageCount": 0,
            "authentication": auth_json(&r.auth),
        }),
    }
}

/// A device's `deviceScope`: an edge device's own scope, else the one it was given.
fn scope_of_record(core: &HubCore, r: &Record) -> Option<String> {
    if r.iot_edge {
        return Some(edge_scope(&r.device_id, &r.generation_id));
    }
    r.device_scope
        .clone()
        .or_else(|| parent_scopes_of(core, r).into_iter().next())
}

/// A device's `parentScopes`: as given; for child edge devices (the config's, and registry
/// devices created with `capabilities.iotEdge` and no parent scope), this hub's scope.
fn parent_scopes_of(core: &HubCore, r: &Record) -> Vec<String> {
    if !r.parent_scopes.is_empty() {
        return r.parent_scopes.clone();
    }
    let is_child = DeviceId::parse(&r.device_id).is_ok_and(|d| {
        core.settings.devices.get(&d).is_some_and(|s| s.edge)
            || (r.iot_edge && r.module_id.is_none() && d != core.settings.device_id)
    });
    if is_child {
        let own = Identity::Device(core.settings.device_id.clone());
        return vec![edge_scope(
            own.device().as_str(),
            &config_generation_id(&own),
        )];
    }
    Vec::new()
}

/// The parent scope a leaf device connects through (its first parent scope, else its device
/// scope); `None` for edge devices and devices given neither.
pub fn parent_scope(r: &Record) -> Option<&str> {
    if r.iot_edge || r.module_id.is_some() {
        return None;
    }
    r.parent_scopes
        .first()
        .or(r.device_scope.as_ref())
        .map(String::as_str)
}

/// The registry's leaf devices whose parent scope is `scope` (ignoring case), and their
/// modules, enabled or not, as IoT Hub's device JSON, sorted by id.
pub fn leaves_under(core: &HubCore, scope: &str) -> Vec<(Identity, Value)> {
    let devices: Vec<Record> = core
        .registry
        .records
        .iter()
        .filter(|r| parent_scope(r).is_some_and(|p| p.eq_ignore_ascii_case(scope)))
        .filter(|r| shadowed(core, r).is_none())
        .map(|r| r.clone())
        .collect();
    let mut out = Vec::new();
    for d in devices {
        let Some(id) = identity_of(&d) else { continue };
        let modules = core.registry.modules_of(id.device());
        out.push((id, record_json(core, &d)));
        for m in modules {
            if let Some(mid) = identity_of(&m) {
                out.push((mid, record_json(core, &m)));
            }
        }
    }
    out.sort_by(|a, b| a.0.key().as_str().cmp(b.0.key().as_str()));
    out
}

/// The registry's edge devices (`capabilities.iotEdge`) whose parent scope is `scope`: the
/// child hubs of the edge device that owns `scope` (this hub's grandchildren), as IoT Hub's
/// device JSON, sorted by id.
pub fn edge_devices_under(core: &HubCore, scope: &str) -> Vec<(DeviceId, Value)> {
    let mut out: Vec<(DeviceId, Value)> = core
        .registry
        .records
        .iter()
        .filter(|r| r.iot_edge && r.module_id.is_none())
        .filter(|r| {
            r.parent_scopes
                .first()
                .is_some_and(|p| p.eq_ignore_ascii_case(scope))
        })
        .filter_map(|r| Some((DeviceId::parse(&r.device_id).ok()?, record_json(core, &r))))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The parent scope a registry edge device was created with (none: a child of this hub).
pub fn edge_parent_scope(core: &HubCore, d: &DeviceId) -> Option<String> {
    core.registry
        .get(&Identity::Device(d.clone()))
        .filter(|r| r.iot_edge)
        .and_then(|r| r.parent_scopes.first().cloned())
}

/// An identity of the config file as a (read-only) record: always enabled, revision 1.
fn config_record(core: &HubCore, id: &Identity, keys: Option<&KeyPair>) -> Record {
    let x509 = match id {
        Identity::Device(d) => core.settings.devices.get(d).and_then(|s| s.x509.clone()),
        Identity::Module(..) => None,
    };
    let auth = match (x509, keys) {
        (Some(X509Auth::Thumbprints(t)), _) => RecordAuth::SelfSigned {
            primary_thumbprint: t.first().map(|t| format!("{t:?}")),
            secondary_thumbprint: t.get(1).map(|t| format!("{t:?}")),
        },
        (Some(X509Auth::Ca), _) => RecordAuth::CertificateAuthority,
        (None, Some(k)) => RecordAuth::Sas {
            primary_key: k.primary.to_base64(),
            secondary_key: k.secondary.to_base64(),
        },
        (None, None) => RecordAuth::None,
    };
    let iot_edge = match id {
        Identity::Device(d) => {
            *d == core.settings.device_id || core.settings.devices.get(d).is_some_and(|s| s.edge)
        }
        Identity::Module(..) => false,
    };
    Record {
        device_id: id.device().to_string(),
        module_id: id.module().map(|m| m.to_string()),
        generation_id: config_generation_id(id),
        revision: 1,
        enabled: true,
        status_reason: None,
        status_updated_time: NEVER.into(),
        auth,
        iot_edge,
        managed_by: id.module().map(|_| "IotEdge".to_owned()),
        device_scope: None,
        parent_scopes: Vec::new(),
    }
}

/// The config file's identity `id` (its canonical form) with its keys, if it is one.
fn configured(core: &HubCore, id: &Identity) -> Option<(Identity, Option<KeyPair>)> {
    if !core.auth.is_configured(id) {
        return None;
    }
    let canonical = core.auth.known(id)?;
    let keys = core
        .auth
        .configured()
        .into_iter()
        .find(|(c, _)| c.same_as(&canonical))
        .map(|(_, k)| k);
    Some((canonical, keys))
}

/// The config identity that hides a registry record of the same id (the config file gained
/// the identity after the registry had it), if any.
fn shadowed(core: &HubCore, r: &Record) -> Option<Identity> {
    identity_of(r).filter(|id| core.auth.is_configured(id))
}

/// `GET /devices/{d}`.
pub fn get_device(core: &HubCore, d: &DeviceId) -> Result<Value, RegistryError> {
    let id = Identity::Device(d.clone());
    if let Some((canonical, keys)) = configured(core, &id) {
        return Ok(record_json(
            core,
            &config_record(core, &canonical, keys.as_ref()),
        ));
    }
    core.registry
        .get(&id)
        .map(|r| record_json(core, &r))
        .ok_or_else(|| RegistryError::DeviceNotFound(d.to_string()))
}

/// `GET /devices`: the config file's devices, then the registry's, each sorted by id.
pub fn list_devices(core: &HubCore) -> Vec<Value> {
    let mut config: Vec<(Identity, KeyPair)> = core
        .auth
        .configured()
        .into_iter()
        .filter(|(id, _)| id.module().is_none())
        .collect();
    config.sort_by(|a, b| a.0.device().cmp(b.0.device()));
    let mut registry: Vec<Record> = core
        .registry
        .records
        .iter()
        .filter(|r| r.module_id.is_none())
        .filter(|r| shadowed(core, r).is_none())
        .map(|r| r.clone())
        .collect();
    registry.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    config
        .iter()
        .map(|(id, k)| record_json(core, &config_record(core, id, Some(k))))
        .chain(registry.iter().map(|r| record_json(core, r)))
        .collect()
}

/// `PUT /devices/{d}`: create (no `If-Match`) or replace.
pub async fn put_device(
    core: &HubCore,
    d: &DeviceId,
    spec: DeviceSpec,
    if_match: Option<&str>,
) -> Result<Value, RegistryError> {
    writable(core)?;
    let id = Identity::Device(d.clone());
    let _order = core.registry.write.lock().await;
    if core.auth.is_configured(&id) {
        return Err(match if_match {
            None => RegistryError::DeviceExists(format!("{d} (defined in this hub's config file)")),
            Some(_) => RegistryError::Configured(format!("device {d}")),
        });
    }
    let old = core.registry.get(&id);
    let record = match (&old, if_match) {
        (Some(_), None) => return Err(RegistryError::DeviceExists(d.to_string())),
        (None, Some(_)) => return Err(RegistryError::DeviceNotFound(d.to_string())),
        (None, None) => {
            let limit = core.settings.limits.max_registry_identities;
            if core.registry.len() >= limit {
                return Err(RegistryError::Quota(limit));
            }
            Record {
                device_id: d.to_string(),
                module_id: None,
                generation_id: generation_id()?,
                revision: core.registry.next_revision(),
                enabled: spec.enabled.unwrap_or(true),
                status_reason: spec.status_reason.clone(),
                status_updated_time: crate::model::time::utc_now(),
                auth: resolve_auth(&spec.auth, None)?,
                iot_edge: spec.iot_edge,
                managed_by: None,
                device_scope: spec.device_scope.clone(),
                parent_scopes: spec.parent_scopes.clone(),
            }
        }
        (Some(old), Some(m)) => {
            check_if_match(Some(m), &etag_of(old.revision))?;
            let enabled = spec.enabled.unwrap_or(old.enabled);
            Record {
                // The id keeps the case it was created with.
                device_id: old.device_id.clone(),
                module_id: None,
                generation_id: old.generation_id.clone(),
                revision: core.registry.next_revision(),
                enabled,
                status_reason: spec.status_reason.clone(),
                status_updated_time: if enabled == old.enabled {
                    old.status_updated_time.clone()
                } else {
                    crate::model::time::utc_now()
                },
                auth: resolve_auth(&spec.auth, Some(&old.auth))?,
                iot_edge: spec.iot_edge,
                managed_by: None,
                device_scope: spec.device_scope.clone(),
                parent_scopes: spec.parent_scopes.clone(),
            }
        }
    };
    core.registry.put(&core.auth, record.clone()).await?;
    if let Some(old) = &old {
        if (old.enabled && !record.enabled)
            || old.auth != record.auth
            || parent_scope(old) != parent_scope(&record)
            || old.iot_edge != record.iot_edge
        {
            let mut keys = vec![id.key()];
            if old.iot_edge {
                keys.extend(runtime_modules(d));
            }
            core.registry.revocations.publish(&keys);
        }
    }
    crate::metrics::registry_identities(core.registry.len());
    tracing::info!(device = %d, status = if record.enabled { "enabled" } else { "disabled" },
        created = old.is_none(), "registry device written");
    Ok(record_json(core, &record))
}

/// `DELETE /devices/{d}`: the device and its registry modules, with their twins.
pub async fn delete_device(
    core: &HubCore,
    d: &DeviceId,
    if_match: Option<&str>,
) -> Result<(), RegistryError> {
    writable(core)?;
    let id = Identity::Device(d.clone());
    let _order = core.registry.write.lock().await;
    if core.auth.is_configured(&id) {
        return Err(RegistryError::Configured(format!("device {d}")));
    }
    let old = core
        .registry
        .get(&id)
        .ok_or_else(|| RegistryError::DeviceNotFound(d.to_string()))?;
    check_if_match(if_match, &etag_of(old.revision))?;
    let mut gone: Vec<Identity> = core
        .registry
        .modules_of(d)
        .iter()
        .filter_map(identity_of)
        .collect();
    gone.push(id);
    core.registry
        .remove(&core.auth, gone.iter().map(Identity::key).collect())
        .await?;
    if old.iot_edge {
        // A child hub's `$edgeHub` may hold connections with keys derived from the device's.
        core.registry.revocations.publish(&runtime_modules(d));
    }
    forget_twins(core, &gone).await;
    core.registry.deleted(&gone).await;
    let (c2d, device) = (core.c2d.clone(), d.clone());
    let purged = tokio::task::spawn_blocking(move || c2d.purge(&device))
        .await
        .unwrap_or_default();
    crate::metrics::registry_identities(core.registry.len());
    tracing::info!(device = %d, modules = gone.len() - 1, c2d_purged = purged, "registry device deleted");
    Ok(())
}

/// The keys of an edge device's `$edgeHub` and `$edgeAgent`: revoked with the device, whose
/// keys theirs derive from (until the registry holds them as modules of their own).
fn runtime_modules(d: &DeviceId) -> Vec<IdentityKey> {
    RUNTIME_MODULES
        .iter()
        .filter_map(|m| ModuleId::parse(m).ok())
        .map(|m| Identity::Module(d.clone(), m).key())
        .collect()
}

/// The modules IoT Hub creates with an edge device, which its IoT Edge runtime keeps.
const RUNTIME_MODULES: [&str; 2] = ["$edgeAgent", "$edgeHub"];

async fn forget_twins(core: &HubCore, ids: &[Identity]) {
    for id in ids {
        if let Err(e) = core.twins.remove(id).await {
            tracing::warn!(identity = %id, "twin of a deleted identity not removed: {e}");
        }
    }
}

/// The device `d` must exist (config or registry) and may hold registry modules.
fn module_parent(core: &HubCore, d: &DeviceId) -> Result<(), RegistryError> {
    if core.auth.is_edge_child(d) {
        return Err(invalid(format!(
            "device {d} is a child edge device: its modules are its own hub's"
        )));
    }
    match core.auth.known(&Identity::Device(d.clone())) {
        Some(_) => Ok(()),
        None => Err(RegistryError::DeviceNotFound(d.to_string())),
    }
}

/// `GET /devices/{d}/modules/{m}`.
pub fn get_module(core: &HubCore, d: &DeviceId, m: &ModuleId) -> Result<Value, RegistryError> {
    let id = Identity::Module(d.clone(), m.clone());
    if core.auth.known(&Identity::Device(d.clone())).is_none() {
        return Err(RegistryError::DeviceNotFound(d.to_string()));
    }
    if let Some((canonical, keys)) = configured(core, &id) {
        if !core.auth.is_edge_child(d) {
            return Ok(record_json(
                core,
                &config_record(core, &canonical, keys.as_ref()),
            ));
        }
    }
    core.registry
        .get(&id)
        .map(|r| record_json(core, &r))
        .ok_or_else(|| RegistryError::ModuleNotFound(id.to_string()))
}

/// `GET /devices/{d}/modules`: the config file's modules of `d`, then the registry's.
pub fn list_modules(core: &HubCore, d: &DeviceId) -> Result<Vec<Value>, RegistryError> {
    let device = core
        .auth
        .known(&Identity::Device(d.clone()))
        .ok_or_else(|| RegistryError::DeviceNotFound(d.to_string()))?;
    let mut config: Vec<(Identity, KeyPair)> = core
        .auth
        .configured()
        .into_iter()
        .filter(|(id, _)| id.module().is_some() && id.device() == device.device())
        .collect();
    config.sort_by(|a, b| a.0.module().cmp(&b.0.module()));
    Ok(config
        .iter()
        .map(|(id, k)| record_json(core, &config_record(core, id, Some(k))))
        .chain(
            core.registry
                .modules_of(d)
                .iter()
                .filter(|r| shadowed(core, r).is_none())
                .map(|r| record_json(core, r)),
        )
        .collect())
}

/// `PUT /devices/{d}/modules/{m}`: create (no `If-Match`) or replace.
pub async fn put_module(
    core: &HubCore,
    d: &DeviceId,
    m: &ModuleId,
    spec: ModuleSpec,
    if_match: Option<&str>,
) -> Result<Value, RegistryError> {
    writable(core)?;
    let id = Identity::Module(d.clone(), m.clone());
    let runtime_module = RUNTIME_MODULES
        .iter()
        .any(|r| r.eq_ignore_ascii_case(m.as_str()))
        && core.auth.registry_edge_child(d).is_some();
    if m.as_str().starts_with('$') && !runtime_module {
        return Err(invalid(format!(
            "module ids starting with '$' are reserved for the IoT Edge runtime ($edgeAgent and $edgeHub of an edge device): {m}"
        )));
    }
    let _order = core.registry.write.lock().await;
    module_parent(core, d)?;
    if core.auth.is_configured(&id) {
        return Err(match if_match {
            None => {
                RegistryError::ModuleExists(format!("{id} (defined in this hub's config file)"))
            }
            Some(_) => RegistryError::Configured(format!("module {id}")),
        });
    }
    let old = core.registry.get(&id);
    let record = match (&old, if_match) {
        (Some(_), None) => return Err(RegistryError::ModuleExists(id.to_string())),
        (None, Some(_)) => return Err(RegistryError::ModuleNotFound(id.to_string())),
        (None, None) => {
            let limit = core.settings.limits.max_registry_identities;
            if core.registry.len() >= limit {
                return Err(RegistryError::Quota(limit));
            }
            // The device as it is known: its modules are found under its id as written there.
            let device = core
                .auth
                .known(&Identity::Device(d.clone()))
                .map_or_else(|| d.to_string(), |c| c.device().to_string());
            Record {
                device_id: device,
                module_id: Some(m.to_string()),
                generation_id: generation_id()?,
                revision: core.registry.next_revision(),
                enabled: true,
                status_reason: None,
                status_updated_time: crate::model::time::utc_now(),
                auth: resolve_auth(&spec.auth, None)?,
                iot_edge: false,
                managed_by: spec.managed_by.clone(),
                device_scope: None,
                parent_scopes: Vec::new(),
            }
        }
        (Some(old), Some(etag)) => {
            check_if_match(Some(etag), &etag_of(old.revision))?;
            Record {
                revision: core.registry.next_revision(),
                auth: resolve_auth(&spec.auth, Some(&old.auth))?,
                managed_by: spec.managed_by.clone(),
                ..old.clone()
            }
        }
    };
    core.registry.put(&core.auth, record.clone()).await?;
    // A runtime module created here replaces the keys derived for it from its device's.
    if old
        .as_ref()
        .map_or(runtime_module, |old| old.auth != record.auth)
    {
        core.registry.revocations.publish(&[id.key()]);
    }
    crate::metrics::registry_identities(core.registry.len());
    tracing::info!(module = %id, created = old.is_none(), "registry module written");
    Ok(record_json(core, &record))
}

/// `DELETE /devices/{d}/modules/{m}`, with its twin.
pub async fn delete_module(
    core: &HubCore,
    d: &DeviceId,
    m: &ModuleId,
    if_match: Option<&str>,
) -> Result<(), RegistryError> {
    writable(core)?;
    let id = Identity::Module(d.clone(), m.clone());
    let _order = core.registry.write.lock().await;
    if core.auth.known(&Identity::Device(d.clone())).is_none() {
        return Err(RegistryError::DeviceNotFound(d.to_string()));
    }
    if core.auth.is_configured(&id) {
        return Err(RegistryError::Configured(format!("module {id}")));
    }
    let old = core
        .registry
        .get(&id)
        .ok_or_else(|| RegistryError::ModuleNotFound(id.to_string()))?;
    check_if_match(if_match, &etag_of(old.revision))?;
    let gone = identity_of(&old).unwrap_or(id);
    core.registry.remove(&core.auth, vec![gone.key()]).await?;
    forget_twins(core, std::slice::from_ref(&gone)).await;
    core.registry.deleted(std::slice::from_ref(&gone)).await;
    crate::metrics::registry_identities(core.registry.len());
    tracing::info!(module = %gone, "registry module deleted");
    Ok(())
}

/// The `status` and `authenticationType` a twin shows for `id`.
pub fn twin_status(core: &HubCore, id: &Identity) -> (&'static str, &'static str) {
    match core.registry.get(id) {
        Some(r) => (
            if r.enabled { "enabled" } else { "disabled" },
            match r.auth {
                RecordAuth::Sas { .. } => "sas",
                RecordAuth::SelfSigned { .. } => "selfSigned",
                RecordAuth::CertificateAuthority => "certificateAuthority",
                RecordAuth::None => "none",
            },
        ),
        None => ("enabled", "sas"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => Map::new(),
        }
    }

    fn dev(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn device_bodies_as_the_sdk_sends_them() {
        let d = dev("d1");
        // Registry.create({deviceId}) after the SDK's normalisation: empty keys.
        let spec = parse_device(
            &obj(json!({"deviceId": "d1", "authentication": {"type": "sas",
                "symmetricKey": {"primaryKey": "", "secondaryKey": ""}}})),
            &d,
        )
        .unwrap();
        assert_eq!(spec.enabled, None);
        assert_eq!(
            spec.auth,
            AuthSpec::Sas {
                primary: None,
                secondary: None
            }
        );
        let k = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [3u8; 32]);
        let spec = parse_device(
            &obj(json!({"deviceId": "d1", "status": "disabled", "etag": "x", "connectionState": "Connected",
                "authentication": {"symmetricKey": {"primaryKey": k, "secondaryKey": null}},
                "capabilities": {"iotEdge": true}})),
            &d,
        )
        .unwrap();
        assert_eq!(spec.enabled, Some(false));
        assert!(spec.iot_edge);
        assert_eq!(
            spec.auth,
            AuthSpec::Sas {
                primary: Some(k.clone()),
                secondary: None
            }
        );
        // No type and a thumbprint: selfSigned.
        let spec = parse_device(
            &obj(json!({"deviceId": "d1", "authentication": {"x509Thumbprint": {"primaryThumbprint": "ab".repeat(20)}}})),
            &d,
        )
        .unwrap();
        assert_eq!(
            spec.auth,
            AuthSpec::SelfSigned {
                primary: "AB".repeat(20),
                secondary: None
            }
        );
        for bad in [
            json!({}),
            json!({"deviceId": "D1"}),
            json!({"deviceId": "other"}),
            json!({"deviceId": 5}),
            json!({"deviceId": "d1", "status": "paused"}),
            json!({"deviceId": "d1", "status": 1}),
            json!({"deviceId": "d1", "authentication": "sas"}),
            json!({"deviceId": "d1", "authentication": {"type": "magic"}}),
            json!({"deviceId": "d1", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "short"}}}),
            json!({"deviceId": "d1", "authentication": {"type": "selfSigned"}}),
            json!({"deviceId": "d1", "authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "xyz"}}}),
            json!({"deviceId": "d1", "capabilities": {"iotEdge": "yes"}}),
        ] {
            assert!(
                matches!(
                    parse_device(&obj(bad.clone()), &d),
                    Err(RegistryError::Invalid(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn module_bodies_name_device_and_module() {
        let (d, m) = (dev("d1"), ModuleId::parse("m1").unwrap());
        let spec = parse_module(
            &obj(json!({"deviceId": "d1", "moduleId": "m1", "managedBy": "me"})),
            &d,
            &m,
        )
        .unwrap();
        assert_eq!(spec.managed_by.as_deref(), Some("me"));
        for bad in [
            json!({"deviceId": "d1"}),
            json!({"deviceId": "d1", "moduleId": "m2"}),
            json!({"moduleId": "m1"}),
        ] {
            assert!(parse_module(&obj(bad.clone()), &d, &m).is_err(), "{bad}");
        }
    }

    #[test]
    fn empty_keys_are_generated_on_create_and_kept_on_update() {
        let none = AuthSpec::Sas {
            primary: None,
            secondary: None,
        };
        let RecordAuth::Sas {
            primary_key: p,
            secondary_key: s,
        } = resolve_auth(&none, None).unwrap()
        else {
            panic!("sas expected")
        };
        assert_ne!(p, s);
        assert_eq!(Key::from_base64(&p).unwrap().as_bytes().len(), 32);
        let old = RecordAuth::Sas {
            primary_key: p.clone(),
            secondary_key: s.clone(),
        };
        assert_eq!(resolve_auth(&none, Some(&old)).unwrap(), old);
        let k = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [9u8; 32]);
        let given = AuthSpec::Sas {
            primary: Some(k.clone()),
            secondary: None,
        };
        assert_eq!(
            resolve_auth(&given, Some(&old)).unwrap(),
            RecordAuth::Sas {
                primary_key: k,
                secondary_key: s
            }
        );
    }

    #[test]
    fn etags_and_if_match() {
        assert_eq!(etag_of(1), "MQ==");
        for ok in [
            "*",
            "\"*\"",
            "\"MQ==\"",
            "MQ==",
            "W/\"MQ==\"",
            "\"x\", \"MQ==\"",
        ] {
            assert!(check_if_match(Some(ok), "MQ==").is_ok(), "{ok}");
        }
        assert!(check_if_match(None, "MQ==").is_ok());
        for bad in ["\"Mg==\"", "", "\"\""] {
            assert_eq!(
                check_if_match(Some(bad), "MQ=="),
                Err(RegistryError::Precondition("MQ==".into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn revocations_are_read_after_an_epoch_and_a_lost_log_says_so() {
        let r = Revocations::default();
        let k = |s: &str| IdentityKey::from_stored(s);
        let start = r.epoch();
        assert_eq!(r.since(start), (start, Revoked::Keys(vec![])));
        r.publish(&[k("a"), k("b/m")]);
        let (now, which) = r.since(start);
        assert_eq!(now, start + 2);
        assert_eq!(which, Revoked::Keys(vec![k("a"), k("b/m")]));
        assert_eq!(r.since(start + 1).1, Revoked::Keys(vec![k("b/m")]));
        assert_eq!(r.since(now).1, Revoked::Keys(vec![]));
        let many: Vec<IdentityKey> = (0..REVOCATION_LOG).map(|i| k(&format!("x{i}"))).collect();
        r.publish(&many);
        assert_eq!(r.since(start).1, Revoked::Unknown);
        assert_eq!(r.since(now).1, Revoked::Keys(many));
    }

    #[test]
    fn revisions_never_repeat() {
        let r = Registry::in_memory();
        let a = r.next_revision();
        let b = r.next_revision();
        assert!(b > a);
        assert_ne!(etag_of(a), etag_of(b));
    }
}
