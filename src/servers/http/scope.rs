//! The parent side of the device-scope API: a child edge hub fetches the identities of its
//! scope (its own device, its modules, with their keys) from this hub, as edgeHub's
//! `DeviceScopeController` serves them.
//!
//! * `POST /devices/{actor}/modules/$edgeHub/devicesAndModulesInTargetDeviceScope` with
//!   `{"authChain", "pageSize"?, "continuationLink"?}`: the target (the first id of
//!   `authChain`) and its modules, in one page (`continuationLink` null);
//! * `POST /devices/{actor}/modules/$edgeHub/getDeviceAndModuleOnBehalfOf` with
//!   `{"targetDeviceId", "targetModuleId"?, "authChain"}`: that identity (and, for a module,
//!   its device).
//!
//! Only the actor's `$edgeHub` may call (its SAS token in `Authorization`, in any of the
//! encodings edgeHub and the SDKs use), the actor must be a child edge device of this hub, and
//! `authChain` must pass through it: a child sees its own scope and nothing of another's.
//! What is served: the config's `devices.<child>` (`edge: true`) and `devices.<child>.modules`
//! as last reloaded, with their keys (explicit, else derived as the child derives them), and in
//! runtime mode the identities this hub's own device scope holds below the actor.
//! Errors are `{"ErrorMessage": …}` with 400, 401, 404, 405 or 413.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::{json, Map, Value};

use crate::{
    core::{scope::ScopeEntry, HubCore},
    model::identity::{DeviceId, Identity, Key, KeyPair, KeySlot, ModuleId},
    model::sas::now_secs,
};

/// Largest request body.
const MAX_BODY: usize = 64 * 1024;
/// edgeHub's limit on the depth of a nested hierarchy.
const MAX_CHAIN: usize = 5;

/// The two operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Scope,
    OnBehalfOf,
}

/// `Some((actor, op))` when `path` is a device-scope call.
pub fn route(path: &str) -> Option<(String, Op)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let decode = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
    };
    match segs.as_slice() {
        ["devices", actor, "modules", m, op] => {
            let op = match *op {
                "devicesAndModulesInTargetDeviceScope" => Op::Scope,
                "getDeviceAndModuleOnBehalfOf" => Op::OnBehalfOf,
                _ => return None,
            };
            let m = decode(m)?;
            m.eq_ignore_ascii_case("$edgeHub")
                .then(|| decode(actor))
                .flatten()
                .map(|a| (a, op))
        }
        _ => None,
    }
}

struct Refusal(StatusCode, String);

fn refuse(status: StatusCode, why: impl Into<String>) -> Refusal {
    Refusal(status, why.into())
}

fn respond(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// Serves one device-scope call.
pub async fn handle(
    req: Request<Incoming>,
    actor: String,
    op: Op,
    core: &HubCore,
) -> Response<Full<Bytes>> {
    match serve(req, &actor, op, core).await {
        Ok(body) => respond(StatusCode::OK, &body),
        Err(Refusal(status, why)) => {
            tracing::debug!(actor = %crate::model::clip(&actor), %status, "device-scope call refused: {why}");
            respond(status, &json!({ "ErrorMessage": why }))
        }
    }
}

async fn serve(
    req: Request<Incoming>,
    actor: &str,
    op: Op,
    core: &HubCore,
) -> Result<Value, Refusal> {
    if req.method() != Method::POST {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "this resource takes POST",
        ));
    }
    let actor = DeviceId::parse(actor)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("actor device id: {e}")))?;
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            refuse(
                StatusCode::UNAUTHORIZED,
                "an Authorization SAS token is required",
            )
        })?
        .to_owned();
    let (caller, _) = core
        .auth
        .verify(&token, now_secs())
        .map_err(|e| refuse(StatusCode::UNAUTHORIZED, e.to_string()))?;
    let edge_hub = ModuleId::parse("$edgeHub")
        .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if !caller.same_as(&Identity::Module(actor.clone(), edge_hub)) {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            format!("the token is for {caller}, not for {actor}/$edgeHub"),
        ));
    }
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body exceeds {MAX_BODY} bytes"),
            )
        })?
        .to_bytes();
    let body: Map<String, Value> = serde_json::from_slice(&body).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            format!("the body is not a JSON object: {e}"),
        )
    })?;
    let chain: Vec<&str> = body
        .get("authChain")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| refuse(StatusCode::BAD_REQUEST, "authChain is required"))?
        .split(';')
        .collect();
    if chain.len() > MAX_CHAIN {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "authChain is deeper than 5",
        ));
    }
    if !chain.iter().any(|d| d.eq_ignore_ascii_case(actor.as_str())) {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            format!("{actor} is not on the auth chain"),
        ));
    }
    let target = DeviceId::parse(chain[0])
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("authChain: {e}")))?;
    let scope = scope_of(core, &actor, &target).ok_or_else(|| {
        refuse(
            StatusCode::UNAUTHORIZED,
            format!("{target} is not in the scope of {actor}"),
        )
    })?;
    match op {
        Op::Scope => Ok(page(scope)),
        Op::OnBehalfOf => {
            let device = body
                .get("targetDeviceId")
                .and_then(Value::as_str)
                .ok_or_else(|| refuse(StatusCode::BAD_REQUEST, "targetDeviceId is required"))?;
            let module = body
                .get("targetModuleId")
                .and_then(Value::as_str)
                .filter(|m| !m.is_empty());
            let matches = |e: &ScopeEntry, m: Option<&str>| {
                let field = |k: &str| e.identity.get(k).and_then(Value::as_str);
                field("deviceId").is_some_and(|d| d.eq_ignore_ascii_case(device))
                    && match (m, field("moduleId")) {
                        (None, None) => true,
                        (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                        _ => false,
                    }
            };
            let found: Vec<ScopeEntry> = scope
                .iter()
                .filter(|e| matches(e, module) || (module.is_some() && matches(e, None)))
                .cloned()
                .collect();
            if !found.iter().any(|e| matches(e, module)) {
                return Err(refuse(
                    StatusCode::NOT_FOUND,
                    format!(
                        "{device}{} is not in the scope of {target}",
                        module.map(|m| format!("/{m}")).unwrap_or_default()
                    ),
                ));
            }
            Ok(page(found))
        }
    }
}

fn page(entries: Vec<ScopeEntry>) -> Value {
    let (mut devices, mut modules) = (Vec::new(), Vec::new());
    for e in entries {
        if e.identity.get("moduleId").is_some() {
            modules.push(e.identity);
        } else {
            devices.push(e.identity);
        }
    }
    json!({"devices": devices, "modules": modules, "continuationLink": null})
}

/// The scope of `target` as `actor` may see it: `None` when the target is neither the actor,
/// a child edge device of this hub, nor an edge device below the actor in this hub's own
/// device scope.
fn scope_of(core: &HubCore, actor: &DeviceId, target: &DeviceId) -> Option<Vec<ScopeEntry>> {
    let served = core.served_devices();
    if let Some((id, spec)) = served
        .iter()
        .find(|(d, s)| s.edge && d.as_str().eq_ignore_ascii_case(target.as_str()))
    {
        if !id.as_str().eq_ignore_ascii_case(actor.as_str()) {
            return None;
        }
        let keys = spec.keys.clone().unwrap_or_else(|| KeyPair {
            primary: core.device_key.derive_device_key(id, KeySlot::Primary),
            secondary: core.device_key.derive_device_key(id, KeySlot::Secondary),
        });
        let mut out = vec![device_entry(id, &keys, core)];
        let mut modules: Vec<(ModuleId, Option<KeyPair>)> = spec
            .modules
            .iter()
            .map(|(m, k)| (m.clone(), k.clone()))
            .collect();
        for system in ["$edgeAgent", "$edgeHub"] {
            if let Ok(m) = ModuleId::parse(system) {
                if !modules.iter().any(|(have, _)| *have == m) {
                    modules.push((m, None));
                }
            }
        }
        for (m, explicit) in modules {
            let keys = explicit.unwrap_or_else(|| derived_module_keys(&keys.primary, id, &m));
            out.push(module_entry(id, &m, &keys));
        }
        return Some(out);
    }
    // Runtime mode: an edge device below the actor in this hub's own scope.
    let scope = core.auth.scope()?;
    let target_entry = scope.entry(&Identity::Device(target.clone()))?;
    let below_actor = target_entry
        .auth_chain
        .split(';')
        .any(|d| d.eq_ignore_ascii_case(actor.as_str()));
    if !target_entry.is_edge() || !below_actor {
        return None;
    }
    let owned_by_target = |e: &ScopeEntry| {
        let mut links = e.auth_chain.split(';');
        let first = links.next().unwrap_or_default();
        first.eq_ignore_ascii_case(target.as_str())
            || links
                .next()
                .is_some_and(|owner| owner.eq_ignore_ascii_case(target.as_str()))
            || first
                .split_once('/')
                .is_some_and(|(d, _)| d.eq_ignore_ascii_case(target.as_str()))
    };
    Some(
        scope
            .entries_through(target)
            .into_iter()
            .filter(owned_by_target)
            .collect(),
    )
}

/// The keys a child derives for its module from its device key (the module-key rule).
fn derived_module_keys(device_key: &Key, device: &DeviceId, module: &ModuleId) -> KeyPair {
    KeyPair {
        primary: device_key.derive_module_key(device, module, KeySlot::Primary),
        secondary: device_key.derive_module_key(device, module, KeySlot::Secondary),
    }
}

fn sas(keys: &KeyPair) -> Value {
    json!({
        "type": "sas",
        "symmetricKey": {"primaryKey": keys.primary.to_base64(), "secondaryKey": keys.secondary.to_base64()},
        "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null}
    })
}

fn device_entry(id: &DeviceId, keys: &KeyPair, core: &HubCore) -> ScopeEntry {
    ScopeEntry {
        identity: json!({
            "deviceId": id.as_str(),
            "generationId": "0",
            "etag": "",
            "status": "enabled",
            "authentication": sas(keys),
            "capabilities": {"iotEdge": true},
            "deviceScope": format!("ms-azure-iot-edge://{id}-0"),
            "parentScopes": [format!("ms-azure-iot-edge://{}-0", core.settings.device_id)],
        }),
        auth_chain: format!("{id};{}", core.settings.device_id),
    }
}

fn module_entry(device: &DeviceId, module: &ModuleId, keys: &KeyPair) -> ScopeEntry {
    ScopeEntry {
        identity: json!({
            "deviceId": device.as_str(),
            "moduleId": module.as_str(),
            "generationId": "0",
            "managedBy": "IotEdge",
            "authentication": sas(keys),
        }),
        auth_chain: format!("{device}/{module};{device}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_name_the_actor_and_the_operation() {
        assert_eq!(
            route("/devices/child1/modules/%24edgeHub/devicesAndModulesInTargetDeviceScope"),
            Some(("child1".into(), Op::Scope))
        );
        assert_eq!(
            route("/devices/child1/modules/$edgeHub/getDeviceAndModuleOnBehalfOf"),
            Some(("child1".into(), Op::OnBehalfOf))
        );
        assert_eq!(
            route("/devices/child1/modules/filter/getDeviceAndModuleOnBehalfOf"),
            None
        );
        assert_eq!(route("/devices/child1/modules/$edgeHub/other"), None);
        assert_eq!(route("/twins/child1"), None);
    }
}
