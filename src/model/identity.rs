//! Identifiers and keys: the typed names of devices, modules and endpoints, the rule that
//! derives a module's keys from the device key, and the connection string a module receives.
//!
//! Ids are parsed once at the edge (config, link address, token resource) and passed inward as
//! these types; nothing further in may assume a string is a valid id.

use std::fmt;

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use ring::hmac;

/// Characters IoT Hub allows in device and module ids (besides ASCII alphanumerics).
const ID_PUNCTUATION: &str = "-.%_*?!(),:=@$'";

/// Error for an id that IoT Hub would not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("an id must not be empty")]
    Empty,
    #[error("an id must be at most 128 characters")]
    TooLong,
    #[error("character {0:?} is not allowed in an id")]
    BadChar(char),
}

fn check_id(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.chars().count() > 128 {
        return Err(IdError::TooLong);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ID_PUNCTUATION.contains(*c)))
    {
        return Err(IdError::BadChar(c));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Parses an id, checking IoT Hub's character rules.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check_id(s)?;
                Ok(Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A device id, as registered in IoT Hub.
    DeviceId
);
id_type!(
    /// A module id within a device. `$edgeHub` and `$edgeAgent` are valid module ids.
    ModuleId
);

/// Who is speaking: a device (leaf device or the edge device itself) or one of its modules.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Device(DeviceId),
    Module(DeviceId, ModuleId),
}

impl Identity {
    pub fn device(&self) -> &DeviceId {
        match self {
            Identity::Device(d) | Identity::Module(d, _) => d,
        }
    }

    pub fn module(&self) -> Option<&ModuleId> {
        match self {
            Identity::Device(_) => None,
            Identity::Module(_, m) => Some(m),
        }
    }

    /// Case-insensitive comparison, as IoT Hub compares ids in tokens and addresses.
    pub fn same_as(&self, other: &Identity) -> bool {
        let ids = |i: &Identity| {
            (
                i.device().0.to_ascii_lowercase(),
                i.module().map(|m| m.0.to_ascii_lowercase()),
            )
        };
        ids(self) == ids(other)
    }
}

impl fmt::Display for Identity {
    /// `device` or `device/module`: the identity string edgeHub uses in metrics and logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Device(d) => write!(f, "{d}"),
            Identity::Module(d, m) => write!(f, "{d}/{m}"),
        }
    }
}

/// The key of every map held per identity: `device` or `device/module`, lower-cased, since IoT
/// Hub compares ids ignoring case in tokens and addresses (see [`Identity::same_as`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityKey(String);

impl IdentityKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A key as written by [`IdentityKey::as_str`] (a store's record key), lower-cased again.
    pub fn from_stored(s: &str) -> Self {
        IdentityKey(s.to_ascii_lowercase())
    }
}

impl From<&Identity> for IdentityKey {
    fn from(id: &Identity) -> Self {
        IdentityKey(id.to_string().to_ascii_lowercase())
    }
}

impl From<&DeviceId> for IdentityKey {
    /// The key of the device itself (not of its modules).
    fn from(d: &DeviceId) -> Self {
        IdentityKey(d.as_str().to_ascii_lowercase())
    }
}

impl Identity {
    /// This identity's map key (see [`IdentityKey`]).
    pub fn key(&self) -> IdentityKey {
        IdentityKey::from(self)
    }
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A symmetric key (decoded from base64).
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// Decodes a base64 key; at least 16 bytes, as IoT Hub requires.
    pub fn from_base64(s: &str) -> Result<Self, String> {
        let bytes = B64
            .decode(s.trim())
            .map_err(|e| format!("not valid base64: {e}"))?;
        if bytes.len() < 16 || bytes.len() > 64 {
            return Err(format!(
                "a key must decode to 16–64 bytes, this one has {}",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        B64.encode(&self.0)
    }

    /// HMAC-SHA256 of `msg` with this key, base64-encoded: the signature primitive of SAS tokens.
    pub fn sign(&self, msg: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        B64.encode(hmac::sign(&key, msg).as_ref())
    }

    /// Derives a module key from the device key.
    ///
    /// The rule (documented in the README): `base64(HMAC-SHA256(deviceKey,
    /// "{deviceId}/{moduleId}/{slot}"))` with `slot` = `primary` or `secondary`. The result is a
    /// 32-byte key that can be handed to any SDK as a `SharedAccessKey`.
    pub fn derive_module_key(&self, device: &DeviceId, module: &ModuleId, slot: KeySlot) -> Key {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let msg = format!("{device}/{module}/{}", slot.as_str());
        Key(hmac::sign(&key, msg.as_bytes()).as_ref().to_vec())
    }

    /// Derives the key of a downstream device (a leaf device or a child edge device) from this
    /// hub's device key.
    ///
    /// The rule (documented in the README): `base64(HMAC-SHA256(deviceKey,
    /// "{childDeviceId}/{slot}"))` with `slot` = `primary` or `secondary`. Ids cannot contain
    /// `/`, so no device key equals a module key.
    pub fn derive_device_key(&self, device: &DeviceId, slot: KeySlot) -> Key {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        let msg = format!("{device}/{}", slot.as_str());
        Key(hmac::sign(&key, msg.as_bytes()).as_ref().to_vec())
    }
}

/// Which of an identity's two keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlot {
    Primary,
    Secondary,
}

impl KeySlot {
    pub fn as_str(self) -> &'static str {
        match self {
            KeySlot::Primary => "primary",
            KeySlot::Secondary => "secondary",
        }
    }
}

/// The two keys of an identity; a token signed with either is valid.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub primary: Key,
    pub secondary: Key,
}

/// A parsed IoT Hub connection string (`HostName=…;DeviceId=…;…`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectionString {
    pub host_name: String,
    pub gateway_host_name: Option<String>,
    pub device_id: String,
    pub module_id: Option<String>,
    pub shared_access_key: Option<String>,
    pub shared_access_key_name: Option<String>,
}

impl ConnectionString {
    /// Parses `;`-separated `Key=Value` pairs, each split at its first `=`; the last duplicate
    /// wins, as in the SDKs. `HostName` and `DeviceId` are required.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut cs = ConnectionString::default();
        let mut have_host = false;
        let mut have_device = false;
        for part in s.split(';').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("segment {part:?} has no '='"))?;
            let v = v.to_owned();
            match k.trim() {
                "HostName" => {
                    cs.host_name = v;
                    have_host = true
                }
                "GatewayHostName" => cs.gateway_host_name = Some(v),
                "DeviceId" => {
                    cs.device_id = v;
                    have_device = true
                }
                "ModuleId" => cs.module_id = Some(v),
                "SharedAccessKey" => cs.shared_access_key = Some(v),
                "SharedAccessKeyName" => cs.shared_access_key_name = Some(v),
                other => return Err(format!("unknown connection string key {other:?}")),
            }
        }
        if !have_host {
            return Err("HostName is missing".into());
        }
        if !have_device {
            return Err("DeviceId is missing".into());
        }
        Ok(cs)
    }
}

impl fmt::Display for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostName={}", self.host_name)?;
        if let Some(g) = &self.gateway_host_name {
            write!(f, ";GatewayHostName={g}")?;
        }
        write!(f, ";DeviceId={}", self.device_id)?;
        if let Some(m) = &self.module_id {
            write!(f, ";ModuleId={m}")?;
        }
        if let Some(n) = &self.shared_access_key_name {
            write!(f, ";SharedAccessKeyName={n}")?;
        }
        if let Some(k) = &self.shared_access_key {
            write!(f, ";SharedAccessKey={k}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_iot_hub_rules() {
        assert!(DeviceId::parse("edge-device_1").is_ok());
        assert!(ModuleId::parse("$edgeHub").is_ok());
        assert_eq!(DeviceId::parse(""), Err(IdError::Empty));
        assert_eq!(DeviceId::parse("a/b"), Err(IdError::BadChar('/')));
        assert_eq!(DeviceId::parse("a b"), Err(IdError::BadChar(' ')));
        assert_eq!(DeviceId::parse(&"x".repeat(129)), Err(IdError::TooLong));
    }

    #[test]
    fn identity_comparison_ignores_case() {
        let a = Identity::Module(
            DeviceId::parse("Dev").unwrap(),
            ModuleId::parse("M1").unwrap(),
        );
        let b = Identity::Module(
            DeviceId::parse("dev").unwrap(),
            ModuleId::parse("m1").unwrap(),
        );
        assert!(a.same_as(&b));
        assert!(!a.same_as(&Identity::Device(DeviceId::parse("dev").unwrap())));
        assert_eq!(a.to_string(), "Dev/M1");
    }

    #[test]
    fn keys_are_checked_and_derivation_is_stable() {
        assert!(Key::from_base64("not base64!").is_err());
        assert!(Key::from_base64("AAAA").is_err(), "too short");
        let k = Key::from_base64(&B64.encode([7u8; 32])).unwrap();
        let d = DeviceId::parse("d").unwrap();
        let m = ModuleId::parse("m").unwrap();
        let p1 = k.derive_module_key(&d, &m, KeySlot::Primary);
        let p2 = k.derive_module_key(&d, &m, KeySlot::Primary);
        let s = k.derive_module_key(&d, &m, KeySlot::Secondary);
        assert_eq!(p1, p2);
        assert_ne!(p1, s);
        assert_eq!(p1.0.len(), 32);
        let dp = k.derive_device_key(&d, KeySlot::Primary);
        assert_eq!(dp, k.derive_device_key(&d, KeySlot::Primary));
        assert_ne!(dp, k.derive_device_key(&d, KeySlot::Secondary));
        assert_ne!(
            dp,
            k.derive_device_key(&DeviceId::parse("e").unwrap(), KeySlot::Primary)
        );
        assert_ne!(dp, p1);
        // The rule, spelled out: HMAC-SHA256(deviceKey, "{childDeviceId}/primary").
        assert_eq!(dp.to_base64(), k.sign(b"d/primary"));
    }

    #[test]
    fn connection_strings_round_trip() {
        let s = "HostName=h.azure-devices.net;GatewayHostName=gw;DeviceId=d;ModuleId=m;SharedAccessKey=a2V5PQ==";
        let cs = ConnectionString::parse(s).unwrap();
        assert_eq!(cs.host_name, "h.azure-devices.net");
        assert_eq!(cs.gateway_host_name.as_deref(), Some("gw"));
        assert_eq!(
            cs.shared_access_key.as_deref(),
            Some("a2V5PQ=="),
            "split at the first '='"
        );
        assert_eq!(cs.to_string(), s);
        assert!(ConnectionString::parse("DeviceId=d").is_err());
        assert!(ConnectionString::parse("HostName=h").is_err());
        assert!(ConnectionString::parse("HostName=h;DeviceId=d;Bogus=1").is_err());
        assert!(ConnectionString::parse("HostName").is_err());
    }
}
