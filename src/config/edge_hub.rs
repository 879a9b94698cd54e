//! The `$edgeHub` section, the `properties.desired` of edgeHub in a deployment manifest: its
//! schema version, routes and store-and-forward settings.

use serde_json::Value;

use super::{
    walk::{child, Walk},
    ConfigError,
};
use crate::routing::route::{parse_statement, Route, DEFAULT_PRIORITY};

/// The JSON path of the section.
const PATH: &str = "$[\"$edgeHub\"]";

/// What `$edgeHub` sets.
pub(super) struct EdgeHub {
    pub routes: Vec<Route>,
    /// Routes set aside; the hub runs without them.
    pub route_errors: Vec<ConfigError>,
    pub time_to_live_secs: Option<u64>,
    pub max_store_bytes: Option<u64>,
}

/// `$edgeHub` (required): `{schemaVersion, routes?, storeAndForwardConfiguration?, …}`. A
/// route that does not parse is set aside in `route_errors` rather than reported in the walk.
pub(super) fn edge_hub(w: &mut Walk, v: Option<&Value>) -> EdgeHub {
    let mut out = EdgeHub {
        routes: Vec::new(),
        route_errors: Vec::new(),
        time_to_live_secs: Some(7200),
        max_store_bytes: None,
    };
    match v {
        None => w.err(
            PATH,
            "is required (the $edgeHub properties.desired of a deployment manifest)",
        ),
        Some(eh) => {
            let p = PATH;
            if let Some(eh) = w.object(
                eh,
                p,
                &[
                    "schemaVersion",
                    "routes",
                    "storeAndForwardConfiguration",
                    "mqttBroker",
                    "integrity",
                ],
            ) {
                let schema = w.string(eh, p, "schemaVersion", true);
                let minor = match schema {
                    Some("1.0") => Some(0),
                    Some("1.1") => Some(1),
                    Some("1.2") => Some(2),
                    Some("1.3") => Some(3),
                    Some(other) => {
                        w.err(
                            &child(p, "schemaVersion"),
                            format!("{other:?} is not supported (1.0 to 1.3)"),
                        );
                        None
                    }
                    None => None,
                };
                if let Some(r) = eh.get("routes") {
                    routes(w, r, minor.unwrap_or(1), &mut out);
                }
                store_and_forward(w, eh.get("storeAndForwardConfiguration"), minor, &mut out);
            }
        }
    }
    // A route into a module that is not in $.modules stays: the module may be added to the
    // identity registry through the service API while the hub runs (the hub logs such routes
    // at start, see `app`).
    let bad: Vec<String> = out.route_errors.iter().map(|e| e.path.clone()).collect();
    out.routes
        .retain(|r| !bad.contains(&child(&child(PATH, "routes"), &r.name)));
    out
}

/// `$edgeHub.routes`: name → route.
fn routes(w: &mut Walk, r: &Value, minor: u32, out: &mut EdgeHub) {
    let p = child(PATH, "routes");
    let Some(r) = r.as_object() else {
        w.err(&p, "must be an object of name → route");
        return;
    };
    for (name, spec) in r {
        match compile_route(name, spec, minor) {
            Ok(route) => out.routes.push(route),
            Err(message) => out.route_errors.push(ConfigError {
                path: child(&p, name),
                message,
            }),
        }
    }
}

/// `$edgeHub.storeAndForwardConfiguration`: `{timeToLiveSecs?, storeLimits?: {maxSizeBytes?}}`,
/// required from schema 1.1.
fn store_and_forward(w: &mut Walk, v: Option<&Value>, minor: Option<u32>, out: &mut EdgeHub) {
    let sp = child(PATH, "storeAndForwardConfiguration");
    let Some(sf) = v else {
        if minor.unwrap_or(0) >= 1 {
            w.err(&sp, "is required from schema 1.1");
        }
        return;
    };
    let Some(sf) = w.object(sf, &sp, &["timeToLiveSecs", "storeLimits"]) else {
        return;
    };
    match sf.get("timeToLiveSecs") {
        None => {}
        Some(v) => match v.as_i64() {
            Some(n) if n < 0 => out.time_to_live_secs = None,
            Some(n) => out.time_to_live_secs = Some(n as u64),
            None => w.err(
                &child(&sp, "timeToLiveSecs"),
                "must be an integer (negative = keep forever)",
            ),
        },
    }
    if let Some(sl) = sf.get("storeLimits") {
        let slp = child(&sp, "storeLimits");
        if let Some(sl) = w.object(sl, &slp, &["maxSizeBytes"]) {
            out.max_store_bytes = w.uint(sl, &slp, "maxSizeBytes", u64::MAX);
        }
    }
}

/// One route: a string, or from schema 1.1 `{route, priority?, timeToLiveSecs?}`.
fn compile_route(name: &str, spec: &Value, minor: u32) -> Result<Route, String> {
    let (text, priority, ttl) = match spec {
        Value::String(s) => (s.as_str(), DEFAULT_PRIORITY, 0),
        Value::Object(o) if minor >= 1 => {
            for k in o.keys() {
                if !["route", "priority", "timeToLiveSecs"].contains(&k.as_str()) {
                    return Err(format!(
                        "unknown key {k:?} (expected route, priority, timeToLiveSecs)"
                    ));
                }
            }
            let text = o
                .get("route")
                .and_then(Value::as_str)
                .ok_or("`route` must be a string")?;
            let priority = match o.get("priority") {
                None => DEFAULT_PRIORITY,
                Some(v) => match v.as_u64() {
                    Some(p) if p <= 9 => p as u32,
                    _ => return Err("`priority` must be an integer from 0 to 9".into()),
                },
            };
            let ttl = match o.get("timeToLiveSecs") {
                None => 0,
                Some(v) => match v.as_u64() {
                    Some(t) if t <= u32::MAX as u64 => t as u32,
                    _ => return Err("`timeToLiveSecs` must be a non-negative integer".into()),
                },
            };
            (text, priority, ttl)
        }
        Value::Object(_) => {
            return Err("schema 1.0 routes are strings; use schemaVersion 1.1 for objects".into())
        }
        _ => return Err("a route must be a string or {route, priority, timeToLiveSecs}".into()),
    };
    let statement = parse_statement(text).map_err(|e| format!("invalid route {text:?}: {e}"))?;
    Ok(Route {
        name: name.to_owned(),
        statement,
        priority,
        time_to_live_secs: ttl,
    })
}
