//! The HTTPS API's request handling: parsing, authentication, validation and the mapping of
//! outcomes to HTTP statuses, all in one place.
//!
//! Direct methods (`POST /twins/{d}/modules/{m}/methods`, `POST /twins/{d}/methods`), as the
//! SDKs' `invokeMethod` calls them on edgeHub: the caller authenticates with its own SAS token
//! (`Authorization`) and names itself in `x-ms-edge-moduleId: {device}/{module}`; only modules
//! of this edge device may call. Success is `200 {"status", "payload"}`; every error is
//! `{"message"}` with 400, 401, 404, 405, 413 or 504.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};

use crate::{
    hub::HubCore,
    identity::{DeviceId, Identity, ModuleId},
    methods::MethodError,
    sas::now_secs,
};

const EDGE_MODULE_HEADER: &str = "x-ms-edge-moduleid";

/// A request that cannot be served, with its status.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self(status, message.into())
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
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
    match direct_method(req, core).await {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(ApiError(status, message)) => json_response(status, &json!({ "message": message })),
    }
}

/// `/twins/{d}/methods` or `/twins/{d}/modules/{m}/methods`, ids URL-decoded.
fn target_of(path: &str) -> Option<Identity> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let id = |s: &str| {
        percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
    };
    match segs.as_slice() {
        ["twins", d, "methods"] => Some(Identity::Device(DeviceId::parse(&id(d)?).ok()?)),
        ["twins", d, "modules", m, "methods"] => Some(Identity::Module(
            DeviceId::parse(&id(d)?).ok()?,
            ModuleId::parse(&id(m)?).ok()?,
        )),
        _ => None,
    }
}

/// Checks `Authorization` and `x-ms-edge-moduleId`; returns the calling module.
fn caller(req: &Request<Incoming>, core: &HubCore) -> Result<Identity, ApiError> {
    let header_text = |name: &str| {
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
    };
    let claimed = header_text(EDGE_MODULE_HEADER)?.ok_or_else(|| {
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
    let token = header_text(header::AUTHORIZATION.as_str())?.ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "an Authorization header with a SAS token is required",
        )
    })?;
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

async fn direct_method(req: Request<Incoming>, core: &HubCore) -> Result<Value, ApiError> {
    let target = target_of(req.uri().path()).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no such resource: {}", req.uri().path()),
        )
    })?;
    if req.method() != Method::POST {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "direct methods are invoked with POST",
        ));
    }
    let from = caller(&req, core)?;
    let limits = &core.settings.limits;
    // The payload limit plus room for the other fields.
    let max_body = limits.method_payload_max_bytes + limits.method_name_max_len * 4 + 1024;
    let body = Limited::new(req.into_body(), max_body)
        .collect()
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body exceeds {max_body} bytes"),
            )
        })?
        .to_bytes();
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(body) = body else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ));
    };
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
    crate::metrics::direct_method(
        &from.to_string(),
        &target.to_string(),
        started.elapsed().as_secs_f64(),
    );
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
        Err(e @ MethodError::NotConnected(_)) => {
            Err(ApiError::new(StatusCode::NOT_FOUND, e.to_string()))
        }
        Err(e @ MethodError::Timeout(..)) => {
            Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_paths() {
        assert_eq!(
            target_of("/twins/d1/modules/m1/methods").map(|i| i.to_string()),
            Some("d1/m1".into())
        );
        assert_eq!(
            target_of("/twins/d1/methods").map(|i| i.to_string()),
            Some("d1".into())
        );
        assert_eq!(
            target_of("/twins/d%2D1/modules/%24edgeHub/methods").map(|i| i.to_string()),
            Some("d-1/$edgeHub".into())
        );
        for bad in [
            "/",
            "/twins",
            "/twins/d1",
            "/twins/d1/modules/m1",
            "/twins/d1/modules/m1/methods/x",
            "/devices/d1/methods",
        ] {
            assert!(target_of(bad).is_none(), "{bad}");
        }
    }
}
