//! The identity registry on the HTTPS API, as `azure-iothub`'s `Registry` calls IoT Hub:
//!
//! | request | call |
//! |---|---|
//! | `GET /devices` or `/devices/` | `list` (config identities first, then the registry's) |
//! | `GET`, `PUT`, `DELETE /devices/{d}` | `get`; `create` (no `If-Match`) / `update` (`If-Match`); `delete` |
//! | `GET /devices/{d}/modules` | `getModulesOnDevice` |
//! | `GET`, `PUT`, `DELETE /devices/{d}/modules/{m}` | `getModule`; `addModule` / `updateModule`; `removeModule` |
//!
//! Service callers (a `servicePolicies` token); and for `/devices/{d}/modules…`, an edge
//! device `d` (a child hub of this hub) with its own token, as the IoT Edge runtime of a child
//! manages its module identities. The same module calls made on behalf of a child's device
//! (`putModuleOnBehalfOf` and the others, `scope.rs`) end in [`on_behalf`]. Bodies are JSON objects of at most
//! [`BODY_MAX`] bytes (413 beyond, 400 when they do not parse). Ids are URL-decoded and must
//! follow IoT Hub's rules (400). The rules themselves are `core::registry`'s; this module maps
//! its [`RegistryError`]s to IoT Hub's statuses and codes, in one place.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use serde_json::Value;

use super::api::{header_text, json_response, read_object, service_caller, ApiError};
use crate::{
    core::registry::{self, RegistryError},
    core::HubCore,
    model::identity::{DeviceId, Identity, ModuleId},
    model::sas::{now_secs, SasToken},
};

/// Largest registry PUT body: a device or module with keys, thumbprints and room to spare.
pub const BODY_MAX: usize = 16 * 1024;

/// A path under `/devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryPath {
    Devices,
    Device(DeviceId),
    Modules(DeviceId),
    Module(DeviceId, ModuleId),
    /// A path of the registry's shape whose id IoT Hub would not accept.
    BadId(String),
}

/// Parses the segments after `devices` (`decode` URL-decodes one).
pub fn path_of(segs: &[&str], decode: impl Fn(&str) -> Option<String>) -> Option<RegistryPath> {
    let device = |s: &str| match decode(s) {
        Some(t) => DeviceId::parse(&t).map_err(|e| format!("device id {t:?}: {e}")),
        None => Err("the device id is not valid UTF-8 once decoded".into()),
    };
    let module = |s: &str| match decode(s) {
        Some(t) => ModuleId::parse(&t).map_err(|e| format!("module id {t:?}: {e}")),
        None => Err("the module id is not valid UTF-8 once decoded".into()),
    };
    let path = match segs {
        [] | [""] => Ok(RegistryPath::Devices),
        [d] => device(d).map(RegistryPath::Device),
        [d, "modules"] => device(d).map(RegistryPath::Modules),
        [d, "modules", m] => device(d).and_then(|d| module(m).map(|m| RegistryPath::Module(d, m))),
        _ => return None,
    };
    Some(path.unwrap_or_else(RegistryPath::BadId))
}

fn to_api(e: RegistryError) -> ApiError {
    let text = e.to_string();
    let (status, code) = match e {
        RegistryError::DeviceNotFound(_) => (StatusCode::NOT_FOUND, "DeviceNotFound"),
        RegistryError::ModuleNotFound(_) => (StatusCode::NOT_FOUND, "ModuleNotFound"),
        RegistryError::DeviceExists(_) => (StatusCode::CONFLICT, "DeviceAlreadyExists"),
        RegistryError::ModuleExists(_) => (StatusCode::CONFLICT, "ModuleAlreadyExistsOnDevice"),
        RegistryError::Configured(_) => (StatusCode::CONFLICT, "IdentityDefinedInConfigFile"),
        RegistryError::Precondition(_) => (StatusCode::PRECONDITION_FAILED, "PreconditionFailed"),
        RegistryError::Invalid(_) | RegistryError::Upstream(_) => {
            (StatusCode::BAD_REQUEST, "ArgumentInvalid")
        }
        RegistryError::Quota(_) => (StatusCode::FORBIDDEN, "IotHubQuotaExceeded"),
        RegistryError::Store(_) => {
            tracing::error!("registry change not stored: {text}");
            (StatusCode::INTERNAL_SERVER_ERROR, "ServerError")
        }
    };
    ApiError::coded(status, code, text)
}

/// A service token; or, for the modules of an edge device, that device's own token (as the
/// IoT Edge runtime on a child device manages its module identities through its parent).
fn caller(req: &Request<Incoming>, path: &RegistryPath, core: &HubCore) -> Result<(), ApiError> {
    let token = header_text(req, header::AUTHORIZATION.as_str())?;
    let device_token = token
        .and_then(|t| SasToken::parse(t).ok())
        .is_some_and(|t| t.skn.is_none());
    let (RegistryPath::Modules(d) | RegistryPath::Module(d, _), true, Some(token)) =
        (path, device_token, token)
    else {
        return service_caller(req, core).map(|_| ());
    };
    let (who, _) = core
        .auth
        .verify(token, now_secs())
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()))?;
    if who.same_as(&Identity::Device(d.clone())) && core.auth.child_hub(d).is_some() {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        format!("a device token manages the modules of its own edge device only, not those of {d}"),
    ))
}

/// A module named by an on-behalf call, with its body (a put's; empty otherwise).
pub type NamedModule = (ModuleId, serde_json::Map<String, Value>);

/// A registry call made on behalf of a device in a child hub's scope (`scope.rs` checked the
/// actor and the auth chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryOp {
    Put,
    Get,
    List,
    Delete,
}

/// Serves `putModuleOnBehalfOf`, `getModuleOnBehalfOf`, `getModulesOnTargetDevice` and
/// `deleteModuleOnBehalfOf` for the modules of `device`, with the registry's rules and
/// answers (the module's JSON, a list, 204, or IoT Hub's error).
pub(super) async fn on_behalf(
    core: &HubCore,
    op: RegistryOp,
    device: &DeviceId,
    module: Option<NamedModule>,
    if_match: Option<&str>,
) -> Response<Full<Bytes>> {
    let result = match (op, module) {
        (RegistryOp::Put, Some((m, body))) => match registry::parse_module(&body, device, &m) {
            Ok(spec) => registry::put_module(core, device, &m, spec, if_match)
                .await
                .map(|v| ok(&v)),
            Err(e) => Err(e),
        },
        (RegistryOp::Get, Some((m, _))) => registry::get_module(core, device, &m).map(|v| ok(&v)),
        (RegistryOp::Delete, Some((m, _))) => registry::delete_module(core, device, &m, if_match)
            .await
            .map(|()| no_content()),
        (RegistryOp::List, _) => registry::list_modules(core, device).map(|v| ok(&Value::Array(v))),
        (_, None) => Err(RegistryError::Invalid("a module id is required".into())),
    };
    result.unwrap_or_else(|e| to_api(e).response(super::api::ErrorStyle::Service))
}

fn no_content() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

fn ok(body: &Value) -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, body)
}

/// Serves one registry request.
pub(super) async fn serve(
    req: Request<Incoming>,
    path: RegistryPath,
    core: &HubCore,
) -> Result<Response<Full<Bytes>>, ApiError> {
    caller(&req, &path, core)?;
    let if_match = header_text(&req, header::IF_MATCH.as_str())?.map(str::to_owned);
    let if_match = if_match.as_deref();
    let method = req.method().clone();
    match (path, method) {
        (RegistryPath::BadId(why), _) => Err(ApiError::new(StatusCode::BAD_REQUEST, why)),
        (RegistryPath::Devices, Method::GET) => Ok(ok(&Value::Array(registry::list_devices(core)))),
        (RegistryPath::Devices, _) => Err(ApiError::not_allowed("GET")),
        (RegistryPath::Device(d), Method::GET) => registry::get_device(core, &d)
            .map(|v| ok(&v))
            .map_err(to_api),
        (RegistryPath::Device(d), Method::PUT) => {
            let body = read_object(req, BODY_MAX, core).await?;
            let spec = registry::parse_device(&body, &d).map_err(to_api)?;
            registry::put_device(core, &d, spec, if_match)
                .await
                .map(|v| ok(&v))
                .map_err(to_api)
        }
        (RegistryPath::Device(d), Method::DELETE) => registry::delete_device(core, &d, if_match)
            .await
            .map(|()| no_content())
            .map_err(to_api),
        (RegistryPath::Device(_), _) => Err(ApiError::not_allowed("GET, PUT, DELETE")),
        (RegistryPath::Modules(d), Method::GET) => registry::list_modules(core, &d)
            .map(|v| ok(&Value::Array(v)))
            .map_err(to_api),
        (RegistryPath::Modules(_), _) => Err(ApiError::not_allowed("GET")),
        (RegistryPath::Module(d, m), Method::GET) => registry::get_module(core, &d, &m)
            .map(|v| ok(&v))
            .map_err(to_api),
        (RegistryPath::Module(d, m), Method::PUT) => {
            let body = read_object(req, BODY_MAX, core).await?;
            let spec = registry::parse_module(&body, &d, &m).map_err(to_api)?;
            registry::put_module(core, &d, &m, spec, if_match)
                .await
                .map(|v| ok(&v))
                .map_err(to_api)
        }
        (RegistryPath::Module(d, m), Method::DELETE) => {
            registry::delete_module(core, &d, &m, if_match)
                .await
                .map(|()| no_content())
                .map_err(to_api)
        }
        (RegistryPath::Module(..), _) => Err(ApiError::not_allowed("GET, PUT, DELETE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(p: &str) -> Option<RegistryPath> {
        let segs: Vec<&str> = p.trim_matches('/').split('/').collect();
        assert_eq!(segs[0], "devices");
        path_of(&segs[1..], |s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .ok()
                .map(|c| c.into_owned())
        })
    }

    #[test]
    fn registry_paths() {
        let d = |s: &str| DeviceId::parse(s).unwrap();
        let m = |s: &str| ModuleId::parse(s).unwrap();
        assert_eq!(parse("/devices"), Some(RegistryPath::Devices));
        assert_eq!(parse("/devices/"), Some(RegistryPath::Devices));
        assert_eq!(parse("/devices/d1"), Some(RegistryPath::Device(d("d1"))));
        assert_eq!(
            parse("/devices/d%2D1"),
            Some(RegistryPath::Device(d("d-1")))
        );
        assert_eq!(
            parse("/devices/d1/modules"),
            Some(RegistryPath::Modules(d("d1")))
        );
        assert_eq!(
            parse("/devices/d1/modules/"),
            Some(RegistryPath::Modules(d("d1")))
        );
        assert_eq!(
            parse("/devices/d1/modules/m%241"),
            Some(RegistryPath::Module(d("d1"), m("m$1")))
        );
        for bad in [
            "/devices/a%2Fb",
            "/devices/a%20b",
            "/devices/d1/modules/%FF",
        ] {
            assert!(matches!(parse(bad), Some(RegistryPath::BadId(_))), "{bad}");
        }
        for none in [
            "/devices/d1/methods",
            "/devices/d1/modules/m1/x",
            "/devices/d1/things",
        ] {
            assert_eq!(parse(none), None, "{none}");
        }
    }

    #[test]
    fn errors_take_iot_hub_statuses_and_codes() {
        let cases = [
            (
                RegistryError::DeviceNotFound("d".into()),
                404,
                "DeviceNotFound",
            ),
            (
                RegistryError::ModuleNotFound("d/m".into()),
                404,
                "ModuleNotFound",
            ),
            (
                RegistryError::DeviceExists("d".into()),
                409,
                "DeviceAlreadyExists",
            ),
            (
                RegistryError::ModuleExists("d/m".into()),
                409,
                "ModuleAlreadyExistsOnDevice",
            ),
            (
                RegistryError::Configured("device d".into()),
                409,
                "IdentityDefinedInConfigFile",
            ),
            (
                RegistryError::Precondition("MQ==".into()),
                412,
                "PreconditionFailed",
            ),
            (RegistryError::Invalid("x".into()), 400, "ArgumentInvalid"),
            (RegistryError::Quota(5), 403, "IotHubQuotaExceeded"),
            (RegistryError::Store("disk".into()), 500, "ServerError"),
        ];
        for (e, status, code) in cases {
            let a = to_api(e.clone());
            assert_eq!((a.status.as_u16(), a.code), (status, code), "{e:?}");
        }
    }
}
