//! Who may connect: the identities this hub serves, their keys, and token verification.

use std::collections::HashMap;

use crate::{
    config::Settings,
    identity::{Identity, Key, KeyPair, KeySlot, ModuleId},
    sas::{SasError, SasToken},
};

/// The known identities (the edge device, its modules and `$edgeHub`) and their keys.
pub struct Authenticator {
    iothub_host: String,
    gateway_host: String,
    /// Keyed by the lower-cased identity string, as IoT Hub compares ids case-insensitively.
    identities: HashMap<String, (Identity, KeyPair)>,
}

fn lower(id: &Identity) -> String {
    id.to_string().to_ascii_lowercase()
}

/// The keys of a module: explicit ones from the config, else derived from the device key.
pub fn module_keys(settings: &Settings, device_key: &Key, module: &ModuleId) -> KeyPair {
    settings
        .modules
        .get(module)
        .and_then(|m| m.keys.clone())
        .unwrap_or_else(|| KeyPair {
            primary: device_key.derive_module_key(&settings.device_id, module, KeySlot::Primary),
            secondary: device_key.derive_module_key(
                &settings.device_id,
                module,
                KeySlot::Secondary,
            ),
        })
}

impl Authenticator {
    pub fn new(settings: &Settings, device_key: &Key) -> Self {
        let mut identities = HashMap::new();
        let device = Identity::Device(settings.device_id.clone());
        identities.insert(
            lower(&device),
            (
                device,
                KeyPair {
                    primary: device_key.clone(),
                    secondary: device_key.clone(),
                },
            ),
        );
        let edge_hub = ModuleId::parse("$edgeHub").ok();
        for module in settings.modules.keys().chain(edge_hub.iter()) {
            let id = Identity::Module(settings.device_id.clone(), module.clone());
            identities.insert(lower(&id), (id, module_keys(settings, device_key, module)));
        }
        Self {
            iothub_host: settings.iothub_hostname.clone(),
            gateway_host: settings.gateway_hostname.clone(),
            identities,
        }
    }

    /// The canonical identity (as configured) for an identity named in a token or address.
    pub fn known(&self, id: &Identity) -> Option<&Identity> {
        self.identities.get(&lower(id)).map(|(i, _)| i)
    }

    /// Verifies a SAS token as IoT Hub does; returns the identity and the token's expiry.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<(Identity, u64), SasError> {
        let t = SasToken::parse(token)?;
        let (host, id) = t.audience()?;
        if !host.eq_ignore_ascii_case(&self.iothub_host)
            && !host.eq_ignore_ascii_case(&self.gateway_host)
        {
            return Err(SasError::WrongHost(host));
        }
        let (canonical, keys) = self
            .identities
            .get(&lower(&id))
            .ok_or_else(|| SasError::UnknownIdentity(id.to_string()))?;
        if !t.signed_by(keys) {
            return Err(SasError::BadSignature(id.to_string()));
        }
        if t.expired_at(now_secs) {
            return Err(SasError::Expired(t.expiry));
        }
        Ok((canonical.clone(), t.expiry))
    }
}
