//! The identities this hub serves besides its modules: downstream devices (with their X.509
//! authentication) and the service API's shared access policies.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{
    walk::{child, Walk},
    DeviceSettings, TlsFiles,
};
use crate::model::identity::{DeviceId, KeyPair, ModuleId};

/// `devices`: device id → `{primaryKey?, secondaryKey?, edge?}`.
pub(super) fn downstream_devices(
    w: &mut Walk,
    v: Option<&Value>,
    own: Option<&DeviceId>,
) -> BTreeMap<DeviceId, DeviceSettings> {
    let mut devices = BTreeMap::new();
    let Some(v) = v else { return devices };
    let Some(m) = v.as_object() else {
        w.err("$.devices", "must be an object of device id → device");
        return devices;
    };
    for (id, spec) in m {
        let p = child("$.devices", id);
        let device = match DeviceId::parse(id) {
            Ok(d) if own.is_some_and(|o| o.as_str().eq_ignore_ascii_case(d.as_str())) => {
                w.err(&p, "is this hub's own deviceId");
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                w.err(&p, format!("invalid device id: {e}"));
                None
            }
        };
        let Some(spec) = w.object(
            spec,
            &p,
            &["primaryKey", "secondaryKey", "edge", "x509", "modules"],
        ) else {
            continue;
        };
        let keys = w.key_pair(spec, &p, false);
        let x509 = spec
            .get("x509")
            .and_then(|x| device_x509(w, x, &child(&p, "x509")));
        let edge = match spec.get("edge") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                w.err(&child(&p, "edge"), "must be true or false");
                false
            }
        };
        let modules = edge_modules(w, spec.get("modules"), &p, edge);
        if let Some(device) = device {
            let duplicate = devices
                .keys()
                .any(|d: &DeviceId| d.as_str().eq_ignore_ascii_case(device.as_str()));
            if duplicate {
                w.err(&p, "appears twice (ids compare case-insensitively)");
            }
            devices.insert(
                device,
                DeviceSettings {
                    keys,
                    edge,
                    x509,
                    modules,
                },
            );
        }
    }
    devices
}

/// `devices.<id>.modules` of an edge device: module id → `{primaryKey?, secondaryKey?}`.
fn edge_modules(
    w: &mut Walk,
    v: Option<&Value>,
    p: &str,
    edge: bool,
) -> BTreeMap<ModuleId, Option<KeyPair>> {
    let mut modules = BTreeMap::new();
    let Some(m) = v else { return modules };
    let mp = child(p, "modules");
    match m.as_object() {
        None => w.err(&mp, "must be an object of module id → keys"),
        Some(_) if !edge => w.err(&mp, "only an edge device (\"edge\": true) has modules here"),
        Some(m) => {
            for (id, keys) in m {
                let kp = child(&mp, id);
                let module = match ModuleId::parse(id) {
                    Ok(m) => Some(m),
                    Err(e) => {
                        w.err(&kp, format!("invalid module id: {e}"));
                        None
                    }
                };
                let Some(keys) = w.object(keys, &kp, &["primaryKey", "secondaryKey"]) else {
                    continue;
                };
                let keys = w.key_pair(keys, &kp, false);
                if let Some(module) = module {
                    modules.insert(module, keys);
                }
            }
        }
    }
    modules
}

/// `devices.<id>.x509`: `{primaryThumbprint?, secondaryThumbprint?}` or `{"ca": true}`.
fn device_x509(w: &mut Walk, v: &Value, p: &str) -> Option<crate::model::x509::X509Auth> {
    use crate::model::x509::{Thumbprint, X509Auth};
    let o = w.object(v, p, &["primaryThumbprint", "secondaryThumbprint", "ca"])?;
    let ca = match o.get("ca") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            w.err(&child(p, "ca"), "must be true or false");
            return None;
        }
    };
    let mut thumbprints = Vec::new();
    for key in ["primaryThumbprint", "secondaryThumbprint"] {
        if let Some(t) = w.string(o, p, key, false) {
            match Thumbprint::parse(t) {
                Ok(t) => thumbprints.push(t),
                Err(e) => w.err(&child(p, key), e),
            }
        }
    }
    match (ca, thumbprints.is_empty()) {
        (true, true) => Some(X509Auth::Ca),
        (false, false) => Some(X509Auth::Thumbprints(thumbprints)),
        (true, false) => {
            w.err(
                p,
                "either thumbprints or \"ca\": true, not both (as IoT Hub's authentication types)",
            );
            None
        }
        (false, true) => {
            if !o.contains_key("primaryThumbprint") && !o.contains_key("secondaryThumbprint") {
                w.err(
                    p,
                    "needs primaryThumbprint (and optionally secondaryThumbprint) or \"ca\": true",
                );
            }
            None
        }
    }
}

/// A device authenticated by a CA-signed certificate needs the CA file to check it against.
pub(super) fn client_ca_needed(
    w: &mut Walk,
    devices: &BTreeMap<DeviceId, DeviceSettings>,
    tls: &TlsFiles,
) {
    if tls.client_ca_certs.is_some() {
        return;
    }
    for (d, spec) in devices {
        if spec.x509 == Some(crate::model::x509::X509Auth::Ca) {
            w.err(
                &child(&child(&child("$.devices", d.as_str()), "x509"), "ca"),
                "needs tls.clientCaCerts, the CAs that sign the devices' certificates",
            );
        }
    }
}

/// `servicePolicies`: policy name → `{primaryKey, secondaryKey?}`.
pub(super) fn service_policies(w: &mut Walk, v: Option<&Value>) -> BTreeMap<String, KeyPair> {
    let mut policies = BTreeMap::new();
    let Some(v) = v else { return policies };
    let Some(m) = v.as_object() else {
        w.err(
            "$.servicePolicies",
            "must be an object of policy name → keys",
        );
        return policies;
    };
    for (name, spec) in m {
        let p = child("$.servicePolicies", name);
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            w.err(
                &p,
                "a policy name is 1–64 characters: letters, digits, '-', '_', '.'",
            );
        }
        let Some(spec) = w.object(spec, &p, &["primaryKey", "secondaryKey"]) else {
            continue;
        };
        if let Some(keys) = w.key_pair(spec, &p, true) {
            if name_ok {
                policies.insert(name.clone(), keys);
            }
        }
    }
    policies
}
