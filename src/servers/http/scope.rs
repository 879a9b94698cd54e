//! The parent side of the device-scope API: a child edge hub fetches the identities of its
//! scope (its own device, its modules, with their keys) from this hub, as edgeHub's
//! `DeviceScopeController` serves them.
//!
//! * `POST /devices/{actor}/modules/$edgeHub/devicesAndModulesInTargetDeviceScope` with
//!   `{"authChain", "pageSize"?, "continuationLink"?}`: the target (the first id of
//!   `authChain`), its modules and the leaf devices under it, `pageSize` (default 100, at most
//!   1000) at a time in the order of their ids; `continuationLink` names the last id served
//!   (`…?after={id}`) while more follow, else null;
//! * `POST /devices/{actor}/modules/$edgeHub/getDeviceAndModuleOnBehalfOf` with
//!   `{"targetDeviceId", "targetModuleId"?, "authChain"}`: that identity (and, for a module,
//!   its device).
//!
//! Only the actor's `$edgeHub` may call (its SAS token in `Authorization`, in any of the
//! encodings edgeHub and the SDKs use), the actor must be a child edge device of this hub, and
//! `authChain` must pass through it: a child sees its own scope and nothing of another's.
//! What is served: the config's `devices.<child>` (`edge: true`) and `devices.<child>.modules`
//! as last reloaded, with their keys (explicit, else derived as the child derives them); a
//! registry device created with `capabilities.iotEdge` (enabled) with its registry modules and
//! `$edgeAgent`/`$edgeHub` (the registry's, else derived from its primary key), served to
//! itself and to the child hub whose scope it was created under (`parentScopes`); the
//! registry's leaf devices whose `parentScopes` (or `deviceScope`) is the child's scope, with
//! their registry modules, and in runtime mode the identities this hub's own device scope
//! holds below the actor.
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

/// The operations: the two device-scope reads, and the four registry calls a child's IoT Edge
/// runtime makes through its hub for the modules of a device in its scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Scope,
    OnBehalfOf,
    PutModule,
    GetModule,
    ListModules,
    DeleteModule,
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
                "putModuleOnBehalfOf" => Op::PutModule,
                "getModuleOnBehalfOf" => Op::GetModule,
                "getModulesOnTargetDevice" => Op::ListModules,
                "deleteModuleOnBehalfOf" => Op::DeleteModule,
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

/// Serves one device-scope or on-behalf-of registry call.
pub async fn handle(
    req: Request<Incoming>,
    actor: String,
    op: Op,
    core: &HubCore,
) -> Response<Full<Bytes>> {
    let refused = |Refusal(status, why): Refusal| {
        tracing::debug!(actor = %crate::model::clip(&actor), %status, "device-scope call refused: {why}");
        respond(status, &json!({ "ErrorMessage": why }))
    };
    let call = match prelude(req, &actor, op, core).await {
        Ok(call) => call,
        Err(r) => return refused(r),
    };
    let registry_op = match op {
        Op::Scope | Op::OnBehalfOf => None,
        Op::PutModule => Some(super::registry::RegistryOp::Put),
        Op::GetModule => Some(super::registry::RegistryOp::Get),
        Op::ListModules => Some(super::registry::RegistryOp::List),
        Op::DeleteModule => Some(super::registry::RegistryOp::Delete),
    };
    if let Some(rop) = registry_op {
        return match module_of(&call, op) {
            Ok(module) => {
                super::registry::on_behalf(
                    core,
                    rop,
                    &call.target,
                    module,
                    call.if_match.as_deref(),
                )
                .await
            }
            Err(r) => refused(r),
        };
    }
    let mut call = call;
    if op == Op::OnBehalfOf {
        learn_target(core, &mut call).await;
    }
    match scope_call(call, op) {
        Ok(body) => respond(StatusCode::OK, &body),
        Err(r) => refused(r),
    }
}

/// Runtime mode: an on-behalf-of request for an identity this hub's scope does not hold yet
/// is looked up at this hub's own parent first (throttled per identity, as every lookup), under
/// the target's auth chain, then answered from the scope as it is then.
async fn learn_target(core: &HubCore, call: &mut Call) {
    let Some(scope) = core.auth.scope() else {
        return;
    };
    let text = |k: &str| {
        call.body
            .get(k)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
    };
    let Some(Ok(device)) = text("targetDeviceId").map(DeviceId::parse) else {
        return;
    };
    let id = match text("targetModuleId").map(ModuleId::parse) {
        None => Identity::Device(device),
        Some(Ok(m)) => Identity::Module(device, m),
        Some(Err(_)) => return,
    };
    let held = call
        .scope
        .iter()
        .any(|e| e.id().is_some_and(|have| have.same_as(&id)));
    if held || scope.known(&id).is_some() {
        return;
    }
    let found = tokio::time::timeout(
        crate::core::LOOKUP_TIMEOUT,
        scope.lookup_under(&id, &call.target),
    )
    .await
    .unwrap_or(false);
    if found {
        if let Some(now) = scope_of(core, &call.actor, &call.target) {
            call.scope = now;
        }
    }
}

/// A call that passed the checks every operation shares.
struct Call {
    body: Map<String, Value>,
    /// The first id of the auth chain.
    target: DeviceId,
    /// What the actor may see of the target's scope.
    scope: Vec<ScopeEntry>,
    actor: DeviceId,
    if_match: Option<String>,
}

/// The module a registry operation names: `module` (with `deviceId` = the target and
/// `moduleId`) to put, `targetModuleId` to get, `moduleId` to delete, none to list.
fn module_of(call: &Call, op: Op) -> Result<Option<super::registry::NamedModule>, Refusal> {
    let id = |v: Option<&Value>, what: &str| {
        let text = v
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| refuse(StatusCode::BAD_REQUEST, format!("{what} is required")))?;
        ModuleId::parse(text).map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("{what}: {e}")))
    };
    match op {
        Op::PutModule => {
            let module = call
                .body
                .get("module")
                .and_then(Value::as_object)
                .ok_or_else(|| refuse(StatusCode::BAD_REQUEST, "module is required"))?;
            let device = module.get("deviceId").and_then(Value::as_str);
            if device != Some(call.target.as_str()) {
                return Err(refuse(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the target device of the auth chain ({}) is not the module's deviceId ({})",
                        call.target,
                        device.unwrap_or_default()
                    ),
                ));
            }
            Ok(Some((
                id(module.get("moduleId"), "module.moduleId")?,
                module.clone(),
            )))
        }
        Op::GetModule => Ok(Some((
            id(call.body.get("targetModuleId"), "targetModuleId")?,
            Map::new(),
        ))),
        Op::DeleteModule => Ok(Some((
            id(call.body.get("moduleId"), "moduleId")?,
            Map::new(),
        ))),
        _ => Ok(None),
    }
}

/// Checks the method, the actor's `$edgeHub` token, the body and the auth chain, and finds
/// what of the target's scope the actor may see.
async fn prelude(
    req: Request<Incoming>,
    actor: &str,
    op: Op,
    core: &HubCore,
) -> Result<Call, Refusal> {
    // edgeHub's controller takes PUT for putModuleOnBehalfOf, IoT Hub (and edgeHub's client of
    // it) POST: both are served.
    let method_ok =
        req.method() == Method::POST || (op == Op::PutModule && req.method() == Method::PUT);
    if !method_ok {
        return Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "this resource takes POST",
        ));
    }
    let if_match = req
        .headers()
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
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
    Ok(Call {
        body,
        target,
        scope,
        actor,
        if_match,
    })
}

/// The two device-scope reads.
fn scope_call(call: Call, op: Op) -> Result<Value, Refusal> {
    let Call {
        body,
        target,
        scope,
        actor,
        ..
    } = call;
    match op {
        Op::Scope => {
            let size = match body.get("pageSize") {
                None | Some(Value::Null) => DEFAULT_PAGE,
                Some(v) => v
                    .as_u64()
                    .filter(|n| (1..=MAX_PAGE as u64).contains(n))
                    .map(|n| n as usize)
                    .ok_or_else(|| {
                        refuse(
                            StatusCode::BAD_REQUEST,
                            format!("pageSize must be an integer from 1 to {MAX_PAGE}"),
                        )
                    })?,
            };
            let after = match body.get("continuationLink") {
                None | Some(Value::Null) => None,
                Some(Value::String(l)) if l.is_empty() => None,
                Some(Value::String(l)) => Some(continuation_key(l).ok_or_else(|| {
                    refuse(
                        StatusCode::BAD_REQUEST,
                        "continuationLink is not one this hub gave",
                    )
                })?),
                Some(_) => {
                    return Err(refuse(
                        StatusCode::BAD_REQUEST,
                        "continuationLink must be a string",
                    ))
                }
            };
            Ok(paged(scope, size, after.as_deref(), &actor))
        }
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
        _ => Err(refuse(StatusCode::NOT_FOUND, "not a device-scope read")),
    }
}

/// Identities per page when the caller names no `pageSize`, and the most it may ask for.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// The query parameter of a continuation link that names the last identity served.
const AFTER: &str = "after=";

/// The identity key an entry is ordered by.
fn order_key(e: &ScopeEntry) -> String {
    e.id()
        .map(|id| id.key().as_str().to_owned())
        .unwrap_or_default()
}

/// One page of `entries`: those ordered after `after` (the last key a previous page served),
/// at most `size`, and a continuation link when more follow. Keys rather than offsets, so an
/// identity added or removed between two pages moves no other one across the page boundary.
fn paged(
    mut entries: Vec<ScopeEntry>,
    size: usize,
    after: Option<&str>,
    actor: &DeviceId,
) -> Value {
    entries.sort_by_key(order_key);
    let rest: Vec<ScopeEntry> = entries
        .into_iter()
        .filter(|e| after.is_none_or(|a| order_key(e).as_str() > a))
        .collect();
    let more = rest.len() > size;
    let served: Vec<ScopeEntry> = rest.into_iter().take(size).collect();
    let link = served.last().filter(|_| more).map(|last| {
        let key = percent_encoding::utf8_percent_encode(
            &order_key(last),
            percent_encoding::NON_ALPHANUMERIC,
        )
        .to_string();
        format!(
            "/devices/{}/modules/%24edgeHub/devicesAndModulesInTargetDeviceScope?{AFTER}{key}",
            percent_encoding::utf8_percent_encode(
                actor.as_str(),
                percent_encoding::NON_ALPHANUMERIC
            )
        )
    });
    let mut out = page(served);
    out["continuationLink"] = link.map_or(Value::Null, Value::String);
    out
}

/// The key a continuation link of [`paged`] names.
fn continuation_key(link: &str) -> Option<String> {
    let (_, query) = link.split_once('?')?;
    let encoded = query.split('&').find_map(|p| p.strip_prefix(AFTER))?;
    percent_decode_str(encoded)
        .decode_utf8()
        .ok()
        .map(|k| k.into_owned())
        .filter(|k| !k.is_empty())
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
        let scope = crate::core::auth::Authenticator::config_child_scope(id);
        out.extend(leaves(core, id, &scope));
        return Some(out);
    }
    // A registry device created with `capabilities.iotEdge`: the same, from the registry.
    if let Some(child) = core.auth.registry_edge_child(target).filter(|c| c.enabled) {
        let id = child.id.device();
        // The actor itself, or a child hub of the actor's (created with the actor's scope as
        // its parent scope): the actor walks its own scope breadth first.
        let below_actor = || {
            let parent = crate::core::registry::edge_parent_scope(core, id)?;
            let (_, actor_scope) = core.auth.child_hub(actor)?;
            parent.eq_ignore_ascii_case(&actor_scope).then_some(())
        };
        if !id.as_str().eq_ignore_ascii_case(actor.as_str()) && below_actor().is_none() {
            return None;
        }
        let scope = child.edge_scope.as_deref()?;
        let own = &core.settings.device_id;
        let mut out = vec![ScopeEntry {
            identity: crate::core::registry::get_device(core, id).ok()?,
            auth_chain: format!("{id};{own}"),
        }];
        let modules = crate::core::registry::list_modules(core, id).unwrap_or_default();
        for system in ["$edgeAgent", "$edgeHub"] {
            let recorded = modules.iter().any(|m| {
                m.get("moduleId")
                    .and_then(Value::as_str)
                    .is_some_and(|m| m.eq_ignore_ascii_case(system))
            });
            if let (false, Ok(m), Some(keys)) =
                (recorded, ModuleId::parse(system), child.keys.first())
            {
                out.push(module_entry(
                    id,
                    &m,
                    &derived_module_keys(&keys.primary, id, &m),
                ));
            }
        }
        for doc in modules {
            let m = doc
                .get("moduleId")
                .and_then(Value::as_str)
                .unwrap_or_default();
            out.push(ScopeEntry {
                auth_chain: format!("{id}/{m};{id}"),
                identity: doc,
            });
        }
        out.extend(leaves(core, id, scope));
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

/// The registry's leaf devices under the scope of child edge device `child`, and their modules.
/// Also the registry's edge devices created under that scope (the child's own child hubs),
/// whose scopes the child then asks for with their auth chains.
fn leaves(core: &HubCore, child: &DeviceId, scope: &str) -> Vec<ScopeEntry> {
    let own = &core.settings.device_id;
    let edges = crate::core::registry::edge_devices_under(core, scope)
        .into_iter()
        .map(|(d, doc)| ScopeEntry {
            auth_chain: format!("{d};{child};{own}"),
            identity: doc,
        });
    crate::core::registry::leaves_under(core, scope)
        .into_iter()
        .map(|(leaf, doc)| ScopeEntry {
            auth_chain: match &leaf {
                Identity::Device(d) => format!("{d};{child};{own}"),
                Identity::Module(d, m) => format!("{d}/{m};{d};{child};{own}"),
            },
            identity: doc,
        })
        .chain(edges)
        .collect()
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
    use crate::core::registry::{config_generation_id, edge_scope};
    let own = &core.settings.device_id;
    let generation = config_generation_id(&Identity::Device(id.clone()));
    let own_generation = config_generation_id(&Identity::Device(own.clone()));
    ScopeEntry {
        identity: json!({
            "deviceId": id.as_str(),
            "generationId": generation,
            "etag": "",
            "status": "enabled",
            "authentication": sas(keys),
            "capabilities": {"iotEdge": true},
            "deviceScope": edge_scope(id.as_str(), &generation),
            "parentScopes": [edge_scope(own.as_str(), &own_generation)],
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

    fn entry(device: &str, module: Option<&str>) -> ScopeEntry {
        let mut doc = json!({"deviceId": device});
        if let Some(m) = module {
            doc["moduleId"] = json!(m);
        }
        ScopeEntry {
            identity: doc,
            auth_chain: String::new(),
        }
    }

    fn ids(page: &Value) -> Vec<String> {
        let mut out = Vec::new();
        for (list, field) in [("devices", "deviceId"), ("modules", "moduleId")] {
            for d in page[list].as_array().unwrap() {
                out.push(d[field].as_str().unwrap().to_owned());
            }
        }
        out
    }

    #[test]
    fn pages_follow_each_other_by_key_until_the_last() {
        let actor = DeviceId::parse("child1").unwrap();
        let all = || {
            vec![
                entry("leaf2", None),
                entry("child1", Some("$edgeHub")),
                entry("child1", None),
                entry("leaf1", None),
                entry("leaf-3", None),
            ]
        };
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = paged(all(), 2, after.as_deref(), &actor);
            pages += 1;
            seen.extend(ids(&page));
            match page["continuationLink"].as_str() {
                Some(link) => {
                    assert!(
                        link.starts_with("/devices/child1/modules/%24edgeHub/"),
                        "{link}"
                    );
                    after = Some(continuation_key(link).unwrap());
                }
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, ["child1", "$edgeHub", "leaf-3", "leaf1", "leaf2"]);
        // One page when everything fits; an identity removed between pages shifts nothing.
        assert!(paged(all(), 5, None, &actor)["continuationLink"].is_null());
        let first = paged(all(), 2, None, &actor);
        let link = first["continuationLink"].as_str().unwrap();
        let mut fewer = all();
        fewer.retain(|e| e.identity["deviceId"] != "child1");
        let next = paged(fewer, 2, continuation_key(link).as_deref(), &actor);
        assert_eq!(ids(&next), ["leaf-3", "leaf1"]);
        assert_eq!(continuation_key("/x?other=1"), None);
        assert_eq!(continuation_key("no query"), None);
    }

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
