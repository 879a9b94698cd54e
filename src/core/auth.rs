//! Who may connect: the identities this hub serves, their keys, and token verification.
//!
//! Identities with keys: the edge device, its modules and `$edgeHub`, every downstream device
//! (`devices`), and the `$edgeHub` of each child edge device, whose keys derive from the child's
//! device key by the module-key rule (exactly what the child derives from its own `deviceKey`).
//!
//! On-behalf tokens: a child edge hub authenticates its own modules with its `$edgeHub` token.
//! A put-token whose token is for `{child}/$edgeHub` and whose audience (`name`) names
//! `{child}` or `{child}/{module}` grants the audience identity. The modules of a child are
//! listed nowhere on this hub: every `{child}/{module}` is known by its shape, and only a grant
//! on the connection makes a link for it attach. A child's token never grants another device's
//! identities, nor this hub's own.
//!
//! Service tokens (`skn` = a `servicePolicies` name, `sr` = the hub's host name) authenticate
//! callers of the service API.
//!
//! In runtime mode the identities of the device scope ([`crate::core::scope`]) come first: an
//! identity found there is verified with its keys from the scope (primary, secondary, then its
//! device's), whatever the config says.
//!
//! Registry identities: devices and modules created through the service API (`core::registry`)
//! are held in a second map, `live`, which the registry changes while the hub runs. The config
//! identities are looked up first and never change; `live` is a `DashMap`, so a lookup on the
//! connect path takes one shard's read lock and no guard outlives the call.

use std::collections::HashMap;

use dashmap::DashMap;

use crate::{
    config::Settings,
    model::identity::{DeviceId, Identity, IdentityKey, Key, KeyPair, KeySlot, ModuleId},
    model::sas::{SasError, SasToken},
};

/// The known identities and their keys, and the service policies.
pub struct Authenticator {
    iothub_host: String,
    gateway_host: String,
    /// Keyed by identity (lower-cased, as IoT Hub compares ids case-insensitively).
    /// A child's `$edgeHub` may carry two pairs: derived from the child's primary and from its
    /// secondary device key.
    identities: HashMap<IdentityKey, (Identity, Vec<KeyPair>)>,
    /// Child edge devices: key → the id as configured.
    edge_children: HashMap<IdentityKey, DeviceId>,
    /// Service policies: lower-cased name → (name as configured, keys).
    policies: HashMap<String, (String, KeyPair)>,
    /// The device scope's identities (runtime mode), attached once at start.
    scope: std::sync::OnceLock<std::sync::Arc<crate::core::scope::ScopeCache>>,
    /// Identities of the registry (created through the service API), by lower-cased key.
    live: DashMap<IdentityKey, LiveIdentity>,
}

/// A registry identity as authentication sees it.
#[derive(Debug, Clone)]
pub struct LiveIdentity {
    /// As created.
    pub id: Identity,
    /// Its symmetric keys; empty when it authenticates otherwise (certificates).
    pub keys: Vec<KeyPair>,
    /// `status: disabled` refuses its tokens.
    pub enabled: bool,
    /// A device that authenticates with a client certificate (`selfSigned` thumbprints or
    /// `certificateAuthority`).
    pub x509: Option<crate::model::x509::X509Auth>,
    /// A leaf device's parent scope (the edge device it connects through): a child edge hub
    /// may act for the devices under its scope.
    pub parent_scope: Option<String>,
    /// An edge device's own scope (`capabilities.iotEdge`): it is a child edge hub of this
    /// hub, its `$edgeHub` acts for its modules and for the leaf devices under this scope.
    pub edge_scope: Option<String>,
}

fn lower(id: &Identity) -> IdentityKey {
    id.key()
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

/// The keys of a downstream device: explicit ones from the config, else derived from this
/// hub's device key.
pub fn device_keys(settings: &Settings, device_key: &Key, device: &DeviceId) -> KeyPair {
    settings
        .devices
        .get(device)
        .and_then(|d| d.keys.clone())
        .unwrap_or_else(|| KeyPair {
            primary: device_key.derive_device_key(device, KeySlot::Primary),
            secondary: device_key.derive_device_key(device, KeySlot::Secondary),
        })
}

/// The keys of a child edge device's `$edgeHub`, as the child derives them from its device key
/// (one pair per distinct device key).
fn child_edge_hub_keys(device: &DeviceId, keys: &KeyPair, edge_hub: &ModuleId) -> Vec<KeyPair> {
    let derive = |k: &Key| KeyPair {
        primary: k.derive_module_key(device, edge_hub, KeySlot::Primary),
        secondary: k.derive_module_key(device, edge_hub, KeySlot::Secondary),
    };
    let mut pairs = vec![derive(&keys.primary)];
    if keys.secondary != keys.primary {
        pairs.push(derive(&keys.secondary));
    }
    pairs
}

fn is_edge_hub(m: &ModuleId) -> bool {
    m.as_str().eq_ignore_ascii_case("$edgeHub")
}

impl Authenticator {
    pub fn new(settings: &Settings, device_key: &Key) -> Self {
        let mut identities = HashMap::new();
        let mut add = |id: Identity, keys: Vec<KeyPair>| {
            identities.insert(lower(&id), (id, keys));
        };
        add(
            Identity::Device(settings.device_id.clone()),
            vec![KeyPair {
                primary: device_key.clone(),
                secondary: device_key.clone(),
            }],
        );
        let edge_hub = ModuleId::parse("$edgeHub").ok();
        for module in settings.modules.keys().chain(edge_hub.iter()) {
            let id = Identity::Module(settings.device_id.clone(), module.clone());
            add(id, vec![module_keys(settings, device_key, module)]);
        }
        let mut edge_children = HashMap::new();
        for (device, spec) in &settings.devices {
            let keys = device_keys(settings, device_key, device);
            if let (true, Some(edge_hub)) = (spec.edge, &edge_hub) {
                let id = Identity::Module(device.clone(), edge_hub.clone());
                add(id, child_edge_hub_keys(device, &keys, edge_hub));
                edge_children.insert(IdentityKey::from(device), device.clone());
            }
            add(Identity::Device(device.clone()), vec![keys]);
        }
        let policies = settings
            .service_policies
            .iter()
            .map(|(name, keys)| (name.to_ascii_lowercase(), (name.clone(), keys.clone())))
            .collect();
        Self {
            iothub_host: settings.iothub_hostname.clone(),
            gateway_host: settings.gateway_hostname.clone(),
            identities,
            edge_children,
            policies,
            scope: std::sync::OnceLock::new(),
            live: DashMap::new(),
        }
    }

    /// Makes the device scope's identities known (runtime mode); once.
    pub fn attach_scope(&self, scope: std::sync::Arc<crate::core::scope::ScopeCache>) {
        let _ = self.scope.set(scope);
    }

    /// The device scope, in runtime mode.
    pub fn scope(&self) -> Option<&std::sync::Arc<crate::core::scope::ScopeCache>> {
        self.scope.get()
    }

    /// Is `id` one of the config file's identities (or a module of a configured child edge
    /// device, known by its shape)? Those cannot be changed through the registry.
    pub fn is_configured(&self, id: &Identity) -> bool {
        self.identities.contains_key(&lower(id))
            || matches!(id, Identity::Module(d, _) if self.edge_child(d).is_some())
    }

    /// The config file's identities with keys, and their (first) key pair, in no order.
    pub fn configured(&self) -> Vec<(Identity, KeyPair)> {
        self.identities
            .values()
            .filter_map(|(id, keys)| keys.first().map(|k| (id.clone(), k.clone())))
            .collect()
    }

    /// Is `d` a child edge device of the config file?
    pub fn is_edge_child(&self, d: &DeviceId) -> bool {
        self.edge_child(d).is_some()
    }

    /// Makes `identity` a registry identity (or replaces it). Called by the registry only,
    /// after the change is durable.
    pub fn set_live(&self, identity: LiveIdentity) {
        self.live.insert(lower(&identity.id), identity);
    }

    /// Forgets a registry identity.
    pub fn remove_live(&self, key: &IdentityKey) {
        self.live.remove(key);
    }

    /// The enabled registry devices that authenticate with a client certificate.
    /// In runtime mode, the device scope's leaf devices of that kind come first.
    pub fn live_x509(&self) -> Vec<(DeviceId, crate::model::x509::X509Auth)> {
        let scope = self
            .scope()
            .map(|s| s.own_x509_leaves())
            .unwrap_or_default();
        let registry = self
            .live
            .iter()
            .filter(|l| l.enabled)
            .filter_map(|l| match (&l.id, &l.x509) {
                (Identity::Device(d), Some(a)) => Some((d.clone(), a.clone())),
                _ => None,
            })
            .collect::<Vec<_>>();
        scope.into_iter().chain(registry).collect()
    }

    /// May `id` hold a connection now? Config identities always; registry identities while
    /// they exist and are enabled.
    pub fn is_active(&self, id: &Identity) -> bool {
        let from_scope = |s: &std::sync::Arc<crate::core::scope::ScopeCache>| {
            s.keys(id).is_some()
                || s.entry(id)
                    .is_some_and(|e| e.enabled() && e.x509().is_some())
        };
        if self.scope().is_some_and(from_scope) {
            return true;
        }
        if self.is_configured(id) {
            return true;
        }
        if let Some(l) = self.live.get(&lower(id)) {
            return l.enabled && !self.child_hub_disabled(id);
        }
        // A module of a registry child edge device, granted on behalf by its `$edgeHub` or
        // holding the key derived for `$edgeHub`/`$edgeAgent`, lives as long as its device.
        matches!(id, Identity::Module(d, _) if self.registry_edge_child(d).is_some_and(|c| c.enabled))
    }

    /// The canonical identity for an identity named in a token, address or request: as
    /// configured for identities with keys; for a module of a child edge device, the child as
    /// configured and the module as named.
    pub fn known(&self, id: &Identity) -> Option<Identity> {
        if let Some(canonical) = self.scope().and_then(|s| s.known(id)) {
            return Some(canonical);
        }
        if let Some((canonical, _)) = self.identities.get(&lower(id)) {
            return Some(canonical.clone());
        }
        if let Some(l) = self.live.get(&lower(id)) {
            return Some(l.id.clone());
        }
        match id {
            Identity::Module(d, m) => self
                .child_hub(d)
                .map(|(child, _)| Identity::Module(child, m.clone())),
            Identity::Device(_) => None,
        }
    }

    /// The scope of a child edge device of the config file (`deviceScope` in the registry).
    pub fn config_child_scope(child: &DeviceId) -> String {
        let id = Identity::Device(child.clone());
        crate::core::registry::edge_scope(
            child.as_str(),
            &crate::core::registry::config_generation_id(&id),
        )
    }

    fn edge_child(&self, d: &DeviceId) -> Option<&DeviceId> {
        self.edge_children.get(&IdentityKey::from(d))
    }

    /// A registry device created as an edge device (`capabilities.iotEdge`), enabled or not:
    /// a child edge hub of this hub, as a config `edge: true` device is.
    pub fn registry_edge_child(&self, d: &DeviceId) -> Option<LiveIdentity> {
        self.live
            .get(&lower(&Identity::Device(d.clone())))
            .filter(|l| l.edge_scope.is_some())
            .map(|l| l.clone())
    }

    /// Is `id` a module of a disabled registry child edge device? Its modules go with it.
    fn child_hub_disabled(&self, id: &Identity) -> bool {
        matches!(id, Identity::Module(d, _) if self.registry_edge_child(d).is_some_and(|c| !c.enabled))
    }

    /// The id (as configured or created) and scope of a child edge device, from the config
    /// or the registry; `None` for any other device and for a disabled registry one.
    pub fn child_hub(&self, d: &DeviceId) -> Option<(DeviceId, String)> {
        if let Some(child) = self.edge_child(d) {
            return Some((child.clone(), Self::config_child_scope(child)));
        }
        let l = self.registry_edge_child(d).filter(|l| l.enabled)?;
        let scope = l.edge_scope?;
        Some((l.id.device().clone(), scope))
    }

    /// Verifies a `$cbs` put-token: the token as [`verify`](Self::verify) does, and when it is
    /// the token of a child edge device's `$edgeHub`, the audience (`name`) decides which
    /// identity it grants: the child itself or any module of it. Any other token grants its own
    /// identity, whatever the audience says.
    pub fn verify_put_token(
        &self,
        token: &str,
        audience: &str,
        now_secs: u64,
    ) -> Result<(Identity, u64), SasError> {
        let (id, expiry) = self.verify(token, now_secs)?;
        let Identity::Module(actor, m) = &id else {
            return Ok((id, expiry));
        };
        let Some((child, scope)) = self.child_hub(actor).filter(|_| is_edge_hub(m)) else {
            return Ok((id, expiry));
        };
        // The SDKs send the audience URL-encoded (Node) or plain (C#); only its ids matter,
        // the signed host is the token's.
        let target = crate::model::sas::url_decode(audience)
            .ok()
            .and_then(|a| crate::model::sas::parse_resource(&a).ok())
            .map(|(_, target)| target);
        let Some(target) = target else {
            return Ok((id, expiry));
        };
        if !target
            .device()
            .as_str()
            .eq_ignore_ascii_case(child.as_str())
        {
            // A registry leaf device (or its module) under the child's scope.
            return match self.live.get(&lower(&target)) {
                Some(l)
                    if l.enabled
                        && l.parent_scope
                            .as_deref()
                            .is_some_and(|p| p.eq_ignore_ascii_case(&scope)) =>
                {
                    Ok((l.id.clone(), expiry))
                }
                _ => Err(SasError::NotOnBehalf(id.to_string(), target.to_string())),
            };
        }
        let granted = match target {
            Identity::Device(_) => Identity::Device(child.clone()),
            Identity::Module(_, m) if is_edge_hub(&m) => id,
            Identity::Module(_, m) => Identity::Module(child.clone(), m),
        };
        Ok((granted, expiry))
    }

    /// Verifies a service token (`skn` names a policy, `sr` is this hub's host name); returns
    /// the policy name as configured and the token's expiry.
    pub fn verify_service(&self, token: &str, now_secs: u64) -> Result<(String, u64), SasError> {
        let t = SasToken::parse(token)?;
        let name = t
            .skn
            .as_deref()
            .ok_or_else(|| SasError::Malformed("a service token names its policy in skn".into()))?;
        let resource = t.resource()?;
        let host = resource.trim_end_matches('/');
        if host.contains('/') {
            return Err(SasError::BadResource(resource.clone()));
        }
        if !host.eq_ignore_ascii_case(&self.iothub_host)
            && !host.eq_ignore_ascii_case(&self.gateway_host)
        {
            return Err(SasError::WrongHost(host.to_owned()));
        }
        let (policy, keys) = self
            .policies
            .get(&name.to_ascii_lowercase())
            .ok_or_else(|| SasError::UnknownIdentity(format!("policy {name}")))?;
        if !t.signed_by(keys) {
            return Err(SasError::BadSignature(format!("policy {policy}")));
        }
        if t.expired_at(now_secs) {
            return Err(SasError::Expired(t.expiry));
        }
        Ok((policy.clone(), t.expiry))
    }

    /// Verifies a service-policy token for the Event Hubs-compatible endpoint; returns the
    /// policy, the entity path the token covers (lower-cased, without slashes at its ends;
    /// empty for the whole hub) and the token's expiry.
    ///
    /// Two forms: the Event Hubs one, `sr = sb://{host}[:port]/{path}`, signed with the UTF-8
    /// bytes of the key text as the Event Hubs SDKs sign; and IoT Hub's service token,
    /// `sr = {host}`, signed with the decoded key ([`Authenticator::verify_service`]).
    pub fn verify_event_hubs(
        &self,
        token: &str,
        now_secs: u64,
    ) -> Result<(String, String, u64), SasError> {
        let t = SasToken::parse(token)?;
        let resource = t.resource()?;
        let Some(rest) = resource
            .get(..5)
            .filter(|s| s.eq_ignore_ascii_case("sb://"))
            .map(|_| &resource[5..])
        else {
            let (policy, expiry) = self.verify_service(token, now_secs)?;
            return Ok((policy, String::new(), expiry));
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        if !host.eq_ignore_ascii_case(&self.iothub_host)
            && !host.eq_ignore_ascii_case(&self.gateway_host)
        {
            return Err(SasError::WrongHost(host.to_owned()));
        }
        let name = t
            .skn
            .as_deref()
            .ok_or_else(|| SasError::Malformed("a service token names its policy in skn".into()))?;
        let (policy, keys) = self
            .policies
            .get(&name.to_ascii_lowercase())
            .ok_or_else(|| SasError::UnknownIdentity(format!("policy {name}")))?;
        if !t.signed_with_key_text(keys) {
            return Err(SasError::BadSignature(format!("policy {policy}")));
        }
        if t.expired_at(now_secs) {
            return Err(SasError::Expired(t.expiry));
        }
        let scope = path.trim_matches('/').to_ascii_lowercase();
        Ok((policy.clone(), scope, t.expiry))
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
        let from_scope = self.scope().and_then(|s| s.keys(&id));
        let (canonical, keys) = match (from_scope, self.identities.get(&lower(&id))) {
            (Some(from_scope), _) => from_scope,
            (None, Some((canonical, keys))) => (canonical.clone(), keys.clone()),
            (None, None) => match self.live.get(&lower(&id)).map(|l| l.clone()) {
                Some(l) if !l.enabled || self.child_hub_disabled(&l.id) => {
                    return Err(SasError::Disabled(l.id.to_string()))
                }
                Some(l) => (l.id, l.keys),
                None => self.child_module(&id)?,
            },
        };
        if !keys.iter().any(|k| t.signed_by(k)) {
            return Err(SasError::BadSignature(id.to_string()));
        }
        if t.expired_at(now_secs) {
            return Err(SasError::Expired(t.expiry));
        }
        Ok((canonical, t.expiry))
    }

    /// A module of a child edge device with the keys the child derives for it from its device
    /// key (the module-key rule), so a child may also authenticate a module with the module's
    /// own token rather than on behalf.
    ///
    /// A registry child edge device (`capabilities.iotEdge`) has `$edgeHub` and `$edgeAgent`
    /// keys derived the same way until the registry holds a module of that id (as the IoT Edge
    /// runtime of the child writes them); its other modules are the registry's.
    fn child_module(&self, id: &Identity) -> Result<(Identity, Vec<KeyPair>), SasError> {
        let unknown = || SasError::UnknownIdentity(id.to_string());
        let Identity::Module(d, m) = id else {
            return Err(unknown());
        };
        let Some(child) = self.edge_child(d) else {
            let l = self.registry_edge_child(d).ok_or_else(unknown)?;
            if !(is_edge_hub(m) || m.as_str().eq_ignore_ascii_case("$edgeAgent")) {
                return Err(unknown());
            }
            if !l.enabled {
                return Err(SasError::Disabled(l.id.to_string()));
            }
            let canonical = Identity::Module(l.id.device().clone(), m.clone());
            let keys = l
                .keys
                .iter()
                .flat_map(|pair| child_edge_hub_keys(l.id.device(), pair, m))
                .collect();
            return Ok((canonical, keys));
        };
        let (_, device_keys) = self
            .identities
            .get(&lower(&Identity::Device(child.clone())))
            .ok_or_else(unknown)?;
        let keys = device_keys
            .iter()
            .flat_map(|pair| child_edge_hub_keys(child, pair, m))
            .collect();
        Ok((Identity::Module(child.clone(), m.clone()), keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sas::make_token;
    use std::collections::HashMap as Env;

    const HUB: &str = "hub.example.net";
    const NOW: u64 = 1_700_000_000;
    const LATER: u64 = NOW + 3600;

    fn key(byte: u8) -> Key {
        use base64::Engine;
        Key::from_base64(&base64::engine::general_purpose::STANDARD.encode([byte; 32])).unwrap()
    }

    fn settings(extra: &str) -> Settings {
        let text = format!(
            r#"{{"deviceId": "edge1", "iothubHostname": "{HUB}", "gatewayHostname": "Gateway.local",
                "listen": {{"amqps": "127.0.0.1:0"}}, "dataDir": "d", "modules": {{"A": {{}}}},
                {extra}
                "$edgeHub": {{"schemaVersion": "1.1", "routes": {{}}, "storeAndForwardConfiguration": {{}}}}}}"#
        );
        crate::config::from_str(&text, &Env::new()).unwrap()
    }

    fn parent() -> (Settings, Key, Authenticator) {
        let s = settings(&format!(
            r#""devices": {{"Child": {{"edge": true}}, "other": {{"edge": true}}, "leaf": {{}},
                          "keyed": {{"primaryKey": "{}", "secondaryKey": "{}"}}}},
               "servicePolicies": {{"service": {{"primaryKey": "{}", "secondaryKey": "{}"}}}},"#,
            key(5).to_base64(),
            key(6).to_base64(),
            key(7).to_base64(),
            key(8).to_base64(),
        ));
        let k = key(1);
        let a = Authenticator::new(&s, &k);
        (s, k, a)
    }

    fn id(s: &str) -> Identity {
        match s.split_once('/') {
            Some((d, m)) => {
                Identity::Module(DeviceId::parse(d).unwrap(), ModuleId::parse(m).unwrap())
            }
            None => Identity::Device(DeviceId::parse(s).unwrap()),
        }
    }

    fn token(identity: &str, k: &Key, expiry: u64) -> String {
        make_token(
            &crate::model::sas::resource_for(HUB, &id(identity)),
            k,
            expiry,
            None,
        )
    }

    /// The `$edgeHub` key a child hub derives from its own `deviceKey`, which is the key the
    /// parent holds for the child device.
    fn child_edge_hub_key(parent_key: &Key, child: &str) -> Key {
        let device_key =
            parent_key.derive_device_key(&DeviceId::parse(child).unwrap(), KeySlot::Primary);
        let child_settings = crate::config::from_str(
            &format!(
                r#"{{"deviceId": "{child}", "iothubHostname": "{HUB}", "gatewayHostname": "c.local",
                    "listen": {{"amqps": "127.0.0.1:0"}}, "dataDir": "d", "deviceKey": "{}",
                    "$edgeHub": {{"schemaVersion": "1.1", "routes": {{}}, "storeAndForwardConfiguration": {{}}}}}}"#,
                device_key.to_base64()
            ),
            &Env::new(),
        )
        .unwrap();
        module_keys(
            &child_settings,
            &device_key,
            &ModuleId::parse("$edgeHub").unwrap(),
        )
        .primary
    }

    #[test]
    fn downstream_devices_authenticate_with_derived_or_explicit_keys() {
        let (_, k, a) = parent();
        let leaf = k.derive_device_key(&DeviceId::parse("leaf").unwrap(), KeySlot::Primary);
        let (got, exp) = a.verify(&token("leaf", &leaf, LATER), NOW).unwrap();
        assert_eq!((got.to_string(), exp), ("leaf".into(), LATER));
        let secondary = k.derive_device_key(&DeviceId::parse("leaf").unwrap(), KeySlot::Secondary);
        assert!(a.verify(&token("leaf", &secondary, LATER), NOW).is_ok());
        for explicit in [key(5), key(6)] {
            assert!(a.verify(&token("keyed", &explicit, LATER), NOW).is_ok());
        }
        assert!(matches!(
            a.verify(&token("keyed", &leaf, LATER), NOW),
            Err(SasError::BadSignature(_))
        ));
        // A leaf device has no $edgeHub, and nothing of an unknown device is known.
        assert!(matches!(
            a.verify(&token("leaf/$edgeHub", &leaf, LATER), NOW),
            Err(SasError::UnknownIdentity(_))
        ));
        assert_eq!(a.known(&id("leaf/m")), None);
        assert_eq!(a.known(&id("stranger/m")), None);
        assert_eq!(a.known(&id("stranger")), None);
    }

    #[test]
    fn a_child_hub_authenticates_as_its_edge_hub_with_the_key_it_derives_itself() {
        let (_, k, a) = parent();
        let ek = child_edge_hub_key(&k, "Child");
        let (got, _) = a.verify(&token("child/$edgeHub", &ek, LATER), NOW).unwrap();
        assert_eq!(
            got.to_string(),
            "Child/$edgeHub",
            "canonical casing from the config"
        );
        // The child's modules are known by shape, with the child as configured.
        assert_eq!(a.known(&id("CHILD/sensor")), Some(id("Child/sensor")));
        assert_eq!(a.known(&id("child")), Some(id("Child")));
    }

    #[test]
    fn a_child_module_may_use_its_own_derived_key() {
        let (_, k, a) = parent();
        let child = DeviceId::parse("Child").unwrap();
        let module = ModuleId::parse("Sensor").unwrap();
        let child_key = k.derive_device_key(&child, KeySlot::Primary);
        let own = child_key.derive_module_key(&child, &module, KeySlot::Secondary);
        let (got, _) = a.verify(&token("child/Sensor", &own, LATER), NOW).unwrap();
        assert_eq!(got, id("Child/Sensor"));
        let other =
            child_key.derive_module_key(&child, &ModuleId::parse("x").unwrap(), KeySlot::Primary);
        assert!(matches!(
            a.verify(&token("Child/Sensor", &other, LATER), NOW),
            Err(SasError::BadSignature(_))
        ));
        // A leaf device's modules have no derived keys here.
        assert!(matches!(
            a.verify(&token("leaf/Sensor", &own, LATER), NOW),
            Err(SasError::UnknownIdentity(_))
        ));
    }

    #[test]
    fn a_child_acts_for_the_registry_leaf_devices_under_its_scope_only() {
        let (_, k, a) = parent();
        let t = token("Child/$edgeHub", &child_edge_hub_key(&k, "Child"), LATER);
        let child_scope = Authenticator::config_child_scope(&DeviceId::parse("Child").unwrap());
        let other_scope = Authenticator::config_child_scope(&DeviceId::parse("other").unwrap());
        let leaf = |name: &str, scope: Option<&str>, enabled: bool| LiveIdentity {
            id: id(name),
            keys: vec![KeyPair {
                primary: key(9),
                secondary: key(9),
            }],
            enabled,
            x509: None,
            parent_scope: scope.map(str::to_owned),
            edge_scope: None,
        };
        a.set_live(leaf("leaf1", Some(&child_scope.to_uppercase()), true));
        a.set_live(leaf("leaf2", Some(&other_scope), true));
        a.set_live(leaf("leaf3", None, true));
        a.set_live(leaf("leaf4", Some(&child_scope), false));
        let (got, exp) = a
            .verify_put_token(&t, "hub.example.net%2Fdevices%2Fleaf1", NOW)
            .unwrap();
        assert_eq!((got, exp), (id("leaf1"), LATER));
        for refused in ["leaf2", "leaf3", "leaf4", "nobody"] {
            assert!(
                matches!(
                    a.verify_put_token(&t, &format!("hub.example.net/devices/{refused}"), NOW),
                    Err(SasError::NotOnBehalf(..))
                ),
                "{refused}"
            );
        }
    }

    #[test]
    fn a_registry_edge_device_is_a_child_hub_while_enabled() {
        let (_, _, a) = parent();
        let keys = KeyPair {
            primary: key(3),
            secondary: key(4),
        };
        let scope = "ms-azure-iot-edge://Hub2-638000000000000001";
        let hub2 = |enabled: bool| LiveIdentity {
            id: id("Hub2"),
            keys: vec![keys.clone()],
            enabled,
            x509: None,
            parent_scope: None,
            edge_scope: Some(scope.into()),
        };
        a.set_live(hub2(true));
        a.set_live(LiveIdentity {
            id: id("leaf9"),
            keys: vec![keys.clone()],
            enabled: true,
            x509: None,
            parent_scope: Some(scope.into()),
            edge_scope: None,
        });
        let hub2_id = DeviceId::parse("Hub2").unwrap();
        let edge_hub = ModuleId::parse("$edgeHub").unwrap();
        // $edgeHub's key is derived from either device key, as a standalone child derives it.
        for k in [&keys.primary, &keys.secondary] {
            let ek = k.derive_module_key(&hub2_id, &edge_hub, KeySlot::Primary);
            let t = token("hub2/$edgeHub", &ek, LATER);
            assert_eq!(a.verify(&t, NOW).unwrap().0, id("Hub2/$edgeHub"));
        }
        let ek = keys
            .primary
            .derive_module_key(&hub2_id, &edge_hub, KeySlot::Primary);
        let t = token("Hub2/$edgeHub", &ek, LATER);
        for (audience, granted) in [
            ("hub.example.net/devices/hub2/modules/filter", "Hub2/filter"),
            ("hub.example.net/devices/Hub2", "Hub2"),
            ("hub.example.net/devices/leaf9", "leaf9"),
        ] {
            let (got, _) = a.verify_put_token(&t, audience, NOW).unwrap();
            assert_eq!(got, id(granted), "{audience}");
        }
        assert!(a.is_active(&id("hub2/filter")));
        assert_eq!(a.known(&id("HUB2/filter")), Some(id("Hub2/filter")));
        // Other modules have no derived key; and nothing of it is "configured".
        let other = keys.primary.derive_module_key(
            &hub2_id,
            &ModuleId::parse("filter").unwrap(),
            KeySlot::Primary,
        );
        assert!(matches!(
            a.verify(&token("Hub2/filter", &other, LATER), NOW),
            Err(SasError::UnknownIdentity(_))
        ));
        assert!(!a.is_configured(&id("Hub2/filter")));
        // Disabled: its $edgeHub is refused and acts for no one; its modules go with it.
        a.set_live(hub2(false));
        assert!(matches!(a.verify(&t, NOW), Err(SasError::Disabled(_))));
        assert!(!a.is_active(&id("hub2/filter")));
        assert_eq!(a.child_hub(&hub2_id), None);
    }

    #[test]
    fn on_behalf_tokens_grant_the_audience_within_the_child_only() {
        let (_, k, a) = parent();
        let ek = child_edge_hub_key(&k, "Child");
        let t = token("Child/$edgeHub", &ek, LATER);
        // Node sends the audience URL-encoded, C# plain; both name the same identity.
        for audience in [
            "hub.example.net%2Fdevices%2FChild%2Fmodules%2FSensor",
            "hub.example.net/devices/Child/modules/Sensor",
            "Gateway.local/devices/child/modules/Sensor",
        ] {
            let (got, exp) = a.verify_put_token(&t, audience, NOW).unwrap();
            assert_eq!(
                (got.to_string(), exp),
                ("Child/Sensor".into(), LATER),
                "{audience}"
            );
        }
        let (got, _) = a
            .verify_put_token(&t, "hub.example.net/devices/child", NOW)
            .unwrap();
        assert_eq!(got, id("Child"));
        let (got, _) = a
            .verify_put_token(&t, "hub.example.net/devices/Child/modules/$edgeHub", NOW)
            .unwrap();
        assert_eq!(got, id("Child/$edgeHub"));
        // An audience that names no identity: the token's own.
        let (got, _) = a.verify_put_token(&t, "hub.example.net", NOW).unwrap();
        assert_eq!(got, id("Child/$edgeHub"));

        // Never another child's identities, nor this hub's own.
        for audience in [
            "hub.example.net/devices/other/modules/m",
            "hub.example.net/devices/other",
            "hub.example.net/devices/other/modules/$edgeHub",
            "hub.example.net/devices/edge1",
            "hub.example.net/devices/edge1/modules/A",
            "hub.example.net/devices/edge1/modules/$edgeHub",
            "hub.example.net/devices/leaf",
        ] {
            assert!(
                matches!(
                    a.verify_put_token(&t, audience, NOW),
                    Err(SasError::NotOnBehalf(..))
                ),
                "{audience}"
            );
        }
        // The other child's $edgeHub token cannot reach into Child either.
        let other = token("other/$edgeHub", &child_edge_hub_key(&k, "other"), LATER);
        assert!(matches!(
            a.verify_put_token(&other, "hub.example.net/devices/Child/modules/m", NOW),
            Err(SasError::NotOnBehalf(..))
        ));
        // The secondary derived key works as well.
        let device_key = k.derive_device_key(&DeviceId::parse("Child").unwrap(), KeySlot::Primary);
        let secondary = device_key.derive_module_key(
            &DeviceId::parse("Child").unwrap(),
            &ModuleId::parse("$edgeHub").unwrap(),
            KeySlot::Secondary,
        );
        let t2 = token("Child/$edgeHub", &secondary, LATER);
        assert!(a
            .verify_put_token(&t2, "hub.example.net/devices/Child/modules/m", NOW)
            .is_ok());
    }

    #[test]
    fn bad_on_behalf_tokens_grant_nothing() {
        let (_, k, a) = parent();
        let audience = "hub.example.net/devices/Child/modules/m";
        // Signed with the child's device key instead of its $edgeHub key.
        let device_key = k.derive_device_key(&DeviceId::parse("Child").unwrap(), KeySlot::Primary);
        assert!(matches!(
            a.verify_put_token(&token("Child/$edgeHub", &device_key, LATER), audience, NOW),
            Err(SasError::BadSignature(_))
        ));
        let ek = child_edge_hub_key(&k, "Child");
        assert!(matches!(
            a.verify_put_token(&token("Child/$edgeHub", &ek, NOW - 301), audience, NOW),
            Err(SasError::Expired(_))
        ));
        // A token for a child's module itself, signed with a key other than the module's.
        assert!(matches!(
            a.verify_put_token(&token("Child/m", &ek, LATER), audience, NOW),
            Err(SasError::BadSignature(_))
        ));
        // The token of a module of this hub is not an on-behalf token: the audience is
        // ignored and it grants only itself.
        let ka = module_keys(&parent().0, &k, &ModuleId::parse("A").unwrap()).primary;
        let (got, _) = a
            .verify_put_token(&token("edge1/A", &ka, LATER), audience, NOW)
            .unwrap();
        assert_eq!(got, id("edge1/A"));
        let kh = module_keys(&parent().0, &k, &ModuleId::parse("$edgeHub").unwrap()).primary;
        let (got, _) = a
            .verify_put_token(&token("edge1/$edgeHub", &kh, LATER), audience, NOW)
            .unwrap();
        assert_eq!(got, id("edge1/$edgeHub"));
    }

    #[test]
    fn service_tokens_name_a_policy_and_the_hub() {
        let (_, _, a) = parent();
        let service = |sr: &str, k: &Key, skn: Option<&str>, exp: u64| {
            a.verify_service(&make_token(sr, k, exp, skn), NOW)
        };
        for (sr, k) in [
            (HUB, key(7)),
            ("gateway.LOCAL", key(8)),
            ("hub.example.net/", key(7)),
        ] {
            assert_eq!(
                service(sr, &k, Some("Service"), LATER).unwrap(),
                ("service".to_owned(), LATER),
                "{sr}"
            );
        }
        assert!(matches!(
            service(HUB, &key(9), Some("service"), LATER),
            Err(SasError::BadSignature(_))
        ));
        assert!(matches!(
            service(HUB, &key(7), Some("owner"), LATER),
            Err(SasError::UnknownIdentity(_))
        ));
        assert!(matches!(
            service(HUB, &key(7), None, LATER),
            Err(SasError::Malformed(_))
        ));
        assert!(matches!(
            service("elsewhere.net", &key(7), Some("service"), LATER),
            Err(SasError::WrongHost(_))
        ));
        assert!(matches!(
            service("hub.example.net/devices/d", &key(7), Some("service"), LATER),
            Err(SasError::BadResource(_))
        ));
        assert!(matches!(
            service(HUB, &key(7), Some("service"), NOW - 301),
            Err(SasError::Expired(_))
        ));
        // A device token is no service token, nor is a service token a device token.
        let leaf = parent()
            .1
            .derive_device_key(&DeviceId::parse("leaf").unwrap(), KeySlot::Primary);
        assert!(a.verify_service(&token("leaf", &leaf, LATER), NOW).is_err());
        assert!(a
            .verify(&make_token(HUB, &key(7), LATER, Some("service")), NOW)
            .is_err());
    }
}
