//! The HTTPS API's request handling: parsing, authentication, validation and the mapping of
//! outcomes to HTTP statuses, all in one place.
//!
//! Two kinds of caller share the listener:
//! * modules of this edge device, as the SDKs' `ModuleClient.invokeMethod` calls edgeHub: their
//!   own SAS token (`Authorization`) and `x-ms-edge-moduleId: {device}/{module}`. They may invoke
//!   direct methods only. Errors are `{"message"}`, as edgeHub writes them.
//! * the service, as the `azure-iothub` SDKs call IoT Hub: a shared access policy token
//!   (`skn` = a `servicePolicies` name, `sr` = this hub's host name). It may invoke direct
//!   methods and read and patch twins of every identity this hub knows, modules of child edge
//!   devices included. Errors are IoT Hub's `{"Message": "ErrorCode:{code};{text}"}`, which the
//!   SDKs parse into typed errors.
//!
//! Resources (`?api-version=…` is accepted and ignored):
//! * `POST /twins/{d}/methods`, `POST /twins/{d}/modules/{m}/methods`: direct methods;
//!   `200 {"status", "payload"}`, 404 when the target has no method link, 504 on timeout;
//! * `GET /twins/{d}[/modules/{m}]`: the twin in IoT Hub's shape, with an etag;
//! * `PATCH /twins/{d}[/modules/{m}]` with `{"properties": {"desired": …}}` and `If-Match`
//!   (`*` or the etag; another etag is 412): a merge patch of the desired properties, pushed to
//!   the identity's twin link as a versioned patch; `tags` are accepted and not kept.
//!
//! * `/devices[/]`, `/devices/{d}`, `/devices/{d}/modules[/{m}]`: the identity registry
//!   (`servers/http/registry.rs`).
//!
//! Unknown paths are 404, other HTTP methods 405, bad JSON 400, large bodies 413, bodies that
//! do not arrive within `limits.httpBodyTimeoutSecs` 408.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::{json, Map, Value};

use crate::{
    core::methods::MethodError,
    core::registry::etag_matches,
    core::twins::{Twin, TwinError},
    core::HubCore,
    model::identity::{DeviceId, Identity, ModuleId},
    model::sas::{now_secs, SasToken},
};

const EDGE_MODULE_HEADER: &str = "x-ms-edge-moduleid";
/// Largest twin PATCH body: the desired document's limit, twice, for tags and layout.
const TWIN_BODY_MAX: usize = 2 * crate::core::twins::MAX_DOCUMENT_BYTES;

/// How an error body is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ErrorStyle {
    /// edgeHub's module API: `{"message": text}`.
    Module,
    /// IoT Hub's service API: `{"Message": "ErrorCode:{code};{text}", "ExceptionMessage": text}`.
    Service,
}

/// Module callers of the method API name themselves in `x-ms-edge-moduleId` or hold a
/// device/module token; every other request is answered as IoT Hub answers the service.
fn error_style(req: &Request<Incoming>) -> ErrorStyle {
    if matches!(
        resource_of(req.uri().path()),
        Some(Resource::Twin(_) | Resource::Registry(_))
    ) {
        return ErrorStyle::Service;
    }
    if req.headers().contains_key(EDGE_MODULE_HEADER) {
        return ErrorStyle::Module;
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| SasToken::parse(t).ok());
    match token {
        Some(t) if t.skn.is_none() => ErrorStyle::Module,
        _ => ErrorStyle::Service,
    }
}

/// A request that cannot be served: its status, IoT Hub's error code and a text.
#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    message: String,
    /// For 405: the methods the resource takes.
    allow: Option<&'static str>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let code = match status {
            StatusCode::BAD_REQUEST => "ArgumentInvalid",
            StatusCode::UNAUTHORIZED => "IotHubUnauthorizedAccess",
            StatusCode::NOT_FOUND => "NotFound",
            StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
            StatusCode::PRECONDITION_FAILED => "PreconditionFailed",
            StatusCode::PAYLOAD_TOO_LARGE => "MessageTooLarge",
            StatusCode::REQUEST_TIMEOUT => "RequestTimeout",
            StatusCode::GATEWAY_TIMEOUT => "GatewayTimeout",
            _ => "ServerError",
        };
        Self::coded(status, code, message)
    }

    pub(super) fn coded(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }

    pub(super) fn not_allowed(allow: &'static str) -> Self {
        Self {
            allow: Some(allow),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("this resource takes {allow}"),
            )
        }
    }

    fn body(&self, style: ErrorStyle) -> Value {
        match style {
            ErrorStyle::Module => json!({ "message": self.message }),
            // The SDKs split `Message` at `;` into code and text.
            ErrorStyle::Service => json!({
                "Message": format!("ErrorCode:{};{}", self.code, self.message.replace(';', ",")),
                "ExceptionMessage": self.message,
            }),
        }
    }

    pub(super) fn response(self, style: ErrorStyle) -> Response<Full<Bytes>> {
        let mut r = json_response(self.status, &self.body(style));
        if let Some(allow) = self.allow {
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(allow));
        }
        r
    }
}

pub(super) fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// Serves one request.
pub async fn handle(req: Request<Incoming>, core: &HubCore) -> Response<Full<Bytes>> {
    // Runtime mode: an identity new to this hub is looked up at the parent first.
    if let Some(token) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        core.learn(token).await;
    }
    if let Some((actor, op)) = super::scope::route(req.uri().path()) {
        return super::scope::handle(req, actor, op, core).await;
    }
    let style = error_style(&req);
    match serve(req, core).await {
        Ok(r) => r,
        Err(e) => e.response(style),
    }
}

async fn serve(req: Request<Incoming>, core: &HubCore) -> Result<Response<Full<Bytes>>, ApiError> {
    let resource = resource_of(req.uri().path()).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no such resource: {}", req.uri().path()),
        )
    })?;
    match resource {
        Resource::Methods(target) if req.method() == Method::POST => {
            let body = direct_method(req, target, core).await?;
            Ok(json_response(StatusCode::OK, &body))
        }
        Resource::Methods(_) => Err(ApiError::not_allowed("POST")),
        Resource::Twin(id) if req.method() == Method::GET => get_twin(&req, &id, core),
        Resource::Twin(id) if req.method() == Method::PATCH => patch_twin(req, &id, core).await,
        Resource::Twin(_) => Err(ApiError::not_allowed("GET, PATCH")),
        Resource::Registry(r) => super::registry::serve(req, r, core).await,
    }
}

/// What a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resource {
    /// `/twins/{d}/methods`, `/twins/{d}/modules/{m}/methods`.
    Methods(Identity),
    /// `/twins/{d}`, `/twins/{d}/modules/{m}`.
    Twin(Identity),
    /// `/devices…`: the identity registry.
    Registry(super::registry::RegistryPath),
}

/// Parses a path; ids are URL-decoded.
fn resource_of(path: &str) -> Option<Resource> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let id = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
    };
    let device = |d: &str| DeviceId::parse(&id(d)?).ok();
    let module =
        |d: &str, m: &str| Some(Identity::Module(device(d)?, ModuleId::parse(&id(m)?).ok()?));
    if segs.first() == Some(&"devices") {
        return super::registry::path_of(&segs[1..], |s| id(s)).map(Resource::Registry);
    }
    match segs.as_slice() {
        ["twins", d, "methods"] => Some(Resource::Methods(Identity::Device(device(d)?))),
        ["twins", d, "modules", m, "methods"] => Some(Resource::Methods(module(d, m)?)),
        ["twins", d] => Some(Resource::Twin(Identity::Device(device(d)?))),
        ["twins", d, "modules", m] => Some(Resource::Twin(module(d, m)?)),
        _ => None,
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Caller {
    /// A module of this edge device (edgeHub's module API).
    Module(Identity),
    /// A holder of a service policy key (IoT Hub's service API), by policy name.
    Service(String),
}

pub(super) fn header_text<'a>(
    req: &'a Request<Incoming>,
    name: &str,
) -> Result<Option<&'a str>, ApiError> {
    req.headers()
        .get(name)
        .map(|v| {
            v.to_str().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("header {name} is not text"),
                )
            })
        })
        .transpose()
}

fn missing_token() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "an Authorization header with a SAS token is required",
    )
}

/// A service token, or 401.
pub(super) fn service_caller(req: &Request<Incoming>, core: &HubCore) -> Result<String, ApiError> {
    let token = header_text(req, header::AUTHORIZATION.as_str())?.ok_or_else(missing_token)?;
    if SasToken::parse(token).is_ok_and(|t| t.skn.is_none()) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this needs a shared access policy token (with skn), not a device or module token",
        ));
    }
    core.auth
        .verify_service(token, now_secs())
        .map(|(policy, _)| policy)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()))
}

/// A token with `skn` is the service's; anything else goes through the module checks.
fn caller(req: &Request<Incoming>, core: &HubCore) -> Result<Caller, ApiError> {
    let token = header_text(req, header::AUTHORIZATION.as_str())?;
    let names_module = req.headers().contains_key(EDGE_MODULE_HEADER);
    match token {
        Some(t) if SasToken::parse(t).is_ok_and(|t| t.skn.is_some()) => {
            service_caller(req, core).map(Caller::Service)
        }
        None if !names_module => Err(missing_token()),
        _ => module_caller(req, core).map(Caller::Module),
    }
}

/// The identity as this hub knows it, or 404.
fn known_target(core: &HubCore, id: &Identity) -> Result<Identity, ApiError> {
    core.auth.known(id).ok_or_else(|| match id {
        Identity::Module(..) => ApiError::coded(
            StatusCode::NOT_FOUND,
            "ModuleNotFound",
            format!("module {id} is not known to this hub"),
        ),
        Identity::Device(..) => ApiError::coded(
            StatusCode::NOT_FOUND,
            "DeviceNotFound",
            format!("device {id} is not known to this hub"),
        ),
    })
}

/// Reads a JSON object body of at most `max` bytes, which must arrive whole within
/// `limits.httpBodyTimeoutSecs` (a body trickled in a byte at a time is cut off, 408).
pub(super) async fn read_object(
    req: Request<Incoming>,
    max: usize,
    core: &HubCore,
) -> Result<Map<String, Value>, ApiError> {
    let deadline = Duration::from_secs(core.settings.limits.http_body_timeout_secs);
    let body = tokio::time::timeout(deadline, Limited::new(req.into_body(), max).collect())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    deadline.as_secs()
                ),
            )
        })?
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body exceeds {max} bytes"),
            )
        })?
        .to_bytes();
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    match body {
        Value::Object(o) => Ok(o),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        )),
    }
}

/// Checks `Authorization` and `x-ms-edge-moduleId`; returns the calling module.
fn module_caller(req: &Request<Incoming>, core: &HubCore) -> Result<Identity, ApiError> {
    let claimed = header_text(req, EDGE_MODULE_HEADER)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "header x-ms-edge-moduleId is required",
        )
    })?;
    let Some((claimed_device, claimed_module)) = claimed.split_once('/') else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "header x-ms-edge-moduleId must be {deviceId}/{moduleId}",
        ));
    };
    let token = header_text(req, header::AUTHORIZATION.as_str())?.ok_or_else(missing_token)?;
    let (id, _expiry) = core
        .auth
        .verify(token, now_secs())
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()))?;
    let Some(module) = id.module() else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "only modules can invoke direct methods",
        ));
    };
    if !id.device().as_str().eq_ignore_ascii_case(claimed_device)
        || !module.as_str().eq_ignore_ascii_case(claimed_module)
    {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("the token is for {id}, not for {claimed}"),
        ));
    }
    if !id
        .device()
        .as_str()
        .eq_ignore_ascii_case(core.settings.device_id.as_str())
    {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Only modules on the same device can invoke DirectMethods",
        ));
    }
    Ok(id)
}

fn seconds(
    body: &serde_json::Map<String, Value>,
    key: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("{key} must be an integer from {min} to {max}"),
            )),
        },
    }
}

async fn direct_method(
    req: Request<Incoming>,
    target: Identity,
    core: &HubCore,
) -> Result<Value, ApiError> {
    let (from, target) = match caller(&req, core)? {
        Caller::Module(id) => (id.to_string(), target),
        // The service may call any identity this hub knows, and only those.
        Caller::Service(_) => ("service".to_owned(), known_target(core, &target)?),
    };
    let limits = &core.settings.limits;
    // The payload limit plus room for the other fields.
    let max_body = limits.method_payload_max_bytes + limits.method_name_max_len * 4 + 1024;
    let body = read_object(req, max_body, core).await?;
    let method = match body.get("methodName") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "methodName is required",
            ))
        }
    };
    if method.chars().count() > limits.method_name_max_len {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "methodName is longer than {} characters",
                limits.method_name_max_len
            ),
        ));
    }
    let payload = body
        .get("payload")
        .cloned()
        .unwrap_or(Value::Null)
        .to_string()
        .into_bytes();
    if payload.len() > limits.method_payload_max_bytes {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the payload is larger than {} bytes",
                limits.method_payload_max_bytes
            ),
        ));
    }
    let response_timeout = seconds(&body, "responseTimeoutInSeconds", 30, 5, 300)?;
    let connect_timeout = seconds(&body, "connectTimeoutInSeconds", 0, 0, 300)?;

    let started = Instant::now();
    let result = core
        .methods
        .invoke(
            &target,
            &method,
            payload,
            Duration::from_secs(response_timeout),
            Duration::from_secs(connect_timeout),
        )
        .await;
    crate::metrics::direct_method(&from, &target.to_string(), started.elapsed().as_secs_f64());
    match result {
        Ok(r) => {
            let payload = if r.payload.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&r.payload).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&r.payload).into_owned())
                })
            };
            Ok(json!({ "status": r.status, "payload": payload }))
        }
        Err(e @ MethodError::NotConnected(_)) => Err(ApiError::coded(
            StatusCode::NOT_FOUND,
            "DeviceNotOnline",
            e.to_string(),
        )),
        Err(e @ MethodError::Timeout(..)) => {
            Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string()))
        }
    }
}

/// The twin in IoT Hub's REST shape, with its etag also in `ETag`.
fn twin_response(core: &HubCore, id: &Identity, twin: &Twin) -> Response<Full<Bytes>> {
    // Connected, as far as this hub can tell: the identity holds a twin or a method link.
    let connected = core.is_connected(id);
    let (status, authentication) = crate::core::registry::twin_status(core, id);
    let mut body = json!({
        "deviceId": id.device().as_str(),
        "etag": twin.etag(),
        "version": twin.version(),
        "status": status,
        "connectionState": if connected { "Connected" } else { "Disconnected" },
        "authenticationType": authentication,
        "properties": twin.to_json(),
    });
    if let (Some(m), Value::Object(o)) = (id.module(), &mut body) {
        o.insert("moduleId".into(), m.as_str().into());
    }
    let mut r = json_response(StatusCode::OK, &body);
    if let Ok(v) = header::HeaderValue::from_str(&format!("\"{}\"", twin.etag())) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

fn get_twin(
    req: &Request<Incoming>,
    id: &Identity,
    core: &HubCore,
) -> Result<Response<Full<Bytes>>, ApiError> {
    service_caller(req, core)?;
    let id = known_target(core, id)?;
    Ok(twin_response(core, &id, &core.twins.get(&id)))
}

/// The desired-properties merge patch in a twin PATCH body. `$version` and `$metadata`, which
/// a client may send back as it read them, are dropped; tags are not kept.
fn desired_patch(body: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    let bad = |m: &str| Err(ApiError::new(StatusCode::BAD_REQUEST, m));
    let props = match body.get("properties") {
        None | Some(Value::Null) => return Ok(Map::new()),
        Some(Value::Object(p)) => p,
        Some(_) => return bad("properties must be an object"),
    };
    if props.contains_key("reported") {
        return bad("reported properties are written by the device or module, not the service");
    }
    if let Some(k) = props.keys().find(|k| k.as_str() != "desired") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("properties.{k} is not a twin section; only desired can be patched"),
        ));
    }
    match props.get("desired") {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(d)) => {
            let mut d = d.clone();
            d.remove("$version");
            d.remove("$metadata");
            Ok(d)
        }
        Some(_) => bad("properties.desired must be an object"),
    }
}

async fn patch_twin(
    req: Request<Incoming>,
    id: &Identity,
    core: &HubCore,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let policy = service_caller(&req, core)?;
    let id = known_target(core, id)?;
    let if_match = header_text(&req, header::IF_MATCH.as_str())?.map(str::to_owned);
    let body = read_object(req, TWIN_BODY_MAX, core).await?;
    let patch = desired_patch(&body)?;
    let twin = core
        .twins
        .patch_desired(&id, &patch, |t| {
            if_match
                .as_deref()
                .is_none_or(|m| etag_matches(m, &t.etag()))
        })
        .await
        .map_err(|e| match e {
            TwinError::Precondition(current) => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                format!("If-Match does not match the twin's etag \"{current}\""),
            ),
            TwinError::Invalid(why) => ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid desired properties: {why}"),
            ),
            e @ TwinError::Store(_) => {
                tracing::error!(identity = %id, "desired properties not stored: {e}");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        })?;
    tracing::info!(identity = %id, %policy, version = twin.desired_version, "desired properties patched by the service");
    Ok(twin_response(core, &id, &twin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(p: &str) -> Option<(&'static str, String)> {
        resource_of(p).map(|r| match r {
            Resource::Methods(id) => ("methods", id.to_string()),
            Resource::Twin(id) => ("twin", id.to_string()),
            Resource::Registry(r) => ("registry", format!("{r:?}")),
        })
    }

    #[test]
    fn paths() {
        let ok = [
            ("/twins/d1/modules/m1/methods", ("methods", "d1/m1")),
            ("/twins/d1/methods", ("methods", "d1")),
            (
                "/twins/d%2D1/modules/%24edgeHub/methods",
                ("methods", "d-1/$edgeHub"),
            ),
            ("/twins/d1", ("twin", "d1")),
            ("/twins/d1/modules/m1", ("twin", "d1/m1")),
            ("/twins/d1/modules/%24edgeHub/", ("twin", "d1/$edgeHub")),
        ];
        for (p, (kind, id)) in ok {
            assert_eq!(res(p), Some((kind, id.to_owned())), "{p}");
        }
        for bad in [
            "/",
            "/twins",
            "/twins/d1/modules",
            "/twins/d1/modules/m1/methods/x",
            "/devices/d1/methods",
            "/twins/d%2F1",
            "/twins/d1/things/m1",
        ] {
            assert!(resource_of(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn if_match_takes_star_and_quoted_or_bare_etags() {
        let e = "AAAAAAAAAAM=";
        for m in [
            "*",
            "\"*\"",
            "\"AAAAAAAAAAM=\"",
            "AAAAAAAAAAM=",
            "W/\"AAAAAAAAAAM=\"",
            "\"x\", \"AAAAAAAAAAM=\"",
        ] {
            assert!(etag_matches(m, e), "{m}");
        }
        for m in ["\"AAAAAAAAAAI=\"", "", "\"\"", "AAAAAAAAAAM"] {
            assert!(!etag_matches(m, e), "{m}");
        }
    }

    #[test]
    fn desired_patches_are_taken_from_properties() {
        let obj = |v: Value| match v {
            Value::Object(o) => o,
            _ => unreachable!(),
        };
        let p = desired_patch(&obj(json!({
            "tags": {"t": 1},
            "properties": {"desired": {"a": 1, "b": null, "$version": 4, "$metadata": {}}}
        })))
        .unwrap();
        assert_eq!(Value::Object(p), json!({"a": 1, "b": null}));
        assert!(desired_patch(&obj(json!({"tags": {}}))).unwrap().is_empty());
        for bad in [
            json!({"properties": 1}),
            json!({"properties": {"desired": [1]}}),
            json!({"properties": {"reported": {"a": 1}}}),
            json!({"properties": {"other": {}}}),
        ] {
            let e = desired_patch(&obj(bad.clone())).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn service_errors_are_shaped_as_iot_hub_writes_them() {
        let e = ApiError::coded(StatusCode::NOT_FOUND, "DeviceNotFound", "gone; really");
        assert_eq!(
            e.body(ErrorStyle::Service),
            json!({"Message": "ErrorCode:DeviceNotFound;gone, really", "ExceptionMessage": "gone; really"})
        );
        assert_eq!(
            e.body(ErrorStyle::Module),
            json!({"message": "gone; really"})
        );
        assert_eq!(
            ApiError::new(StatusCode::PRECONDITION_FAILED, "x").code,
            "PreconditionFailed"
        );
        let r = ApiError::not_allowed("GET, PATCH").response(ErrorStyle::Module);
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, PATCH");
    }
}
