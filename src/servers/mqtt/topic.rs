//! IoT Hub's MQTT conventions, pure: the CONNECT username and client id, the topics a client
//! publishes to, the filters it subscribes to, the URL-encoded property bag, and the topics the
//! hub publishes on. No IO; each parser has a table of valid and invalid cases below.
//!
//! The rules follow edgeHub (its username parser, its inbound topic templates, the C# SDK's
//! `UrlEncodedDictionarySerializer` for bags), with one deliberate difference: the ids in a
//! topic or filter must be the connected identity's (edgeHub does not check them).

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// What `Uri.EscapeDataString` leaves alone: the unreserved characters of RFC 3986. So `$` goes
/// out as `%24`, which the C SDK needs to recognise system properties.
const BAG_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The parts of a CONNECT username the hub uses:
/// `{host}/{deviceId}[/{moduleId}]/?api-version=…[&DeviceClientType=…][&model-id=…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username {
    pub device: String,
    pub module: Option<String>,
    pub api_version: String,
    pub client_type: Option<String>,
    pub model_id: Option<String>,
    /// `auth-chain`: a child edge hub connecting a client of its own on that client's behalf
    /// (`{target};…;{child}`, the password its `$edgeHub` token), as the C# SDK's
    /// `ClientAuthenticationForEdgeHubOnBehalfOf` sends it.
    pub auth_chain: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    #[error("the username is not {{host}}/{{deviceId}}[/{{moduleId}}]/?api-version=…")]
    Shape,
    #[error("the username has no api-version")]
    NoApiVersion,
    #[error("the username names no device")]
    NoDevice,
}

/// Parses a username as edgeHub's `MqttUsernameParser` does: segments split on `/`; with a last
/// segment starting with `?`, 3 segments are `host/d/?q` and 4 are `host/d/m/?q`; without, the
/// last of 3 or 4 segments must hold `api-version=`. The host is not checked (the SAS token's
/// audience is). Query values are percent-decoded, ids are not; the first occurrence of a key
/// wins; unknown keys are ignored.
pub fn parse_username(s: &str) -> Result<Username, UsernameError> {
    let segs: Vec<&str> = s.split('/').collect();
    let last = *segs.last().ok_or(UsernameError::Shape)?;
    let query = match last.strip_prefix('?') {
        Some(q) => q,
        None if last.contains("api-version=") => last,
        None => return Err(UsernameError::Shape),
    };
    let (device, module) = match segs.len() {
        3 => (segs[1], None),
        4 => (segs[1], Some(segs[2])),
        _ => return Err(UsernameError::Shape),
    };
    if device.trim().is_empty() {
        return Err(UsernameError::NoDevice);
    }
    if module.is_some_and(|m| m.trim().is_empty()) {
        return Err(UsernameError::Shape);
    }
    let mut api_version = None;
    let mut client_type = None;
    let mut model_id = None;
    let mut auth_chain = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode_str(v).decode_utf8_lossy().into_owned();
        let slot = match k {
            "api-version" => &mut api_version,
            "DeviceClientType" => &mut client_type,
            "model-id" => &mut model_id,
            "auth-chain" => &mut auth_chain,
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(v);
        }
    }
    let api_version = api_version
        .filter(|v| !v.trim().is_empty())
        .ok_or(UsernameError::NoApiVersion)?;
    Ok(Username {
        device: device.to_owned(),
        module: module.map(str::to_owned),
        api_version,
        client_type,
        model_id,
        auth_chain: auth_chain.filter(|c| !c.is_empty()),
    })
}

/// The identity a client id names: `{deviceId}` or `{deviceId}/{moduleId}`.
pub fn parse_client_id(s: &str) -> Option<(String, Option<String>)> {
    let mut parts = s.split('/');
    let device = parts.next().filter(|d| !d.is_empty())?;
    let module = match parts.next() {
        None => None,
        Some(m) if !m.is_empty() => Some(m.to_owned()),
        Some(_) => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((device.to_owned(), module))
}

/// A property bag that does not decode; edgeHub drops the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed property bag: {0}")]
pub struct BagError(pub &'static str);

/// One property of a bag; `None` for `k` and `k=` (indistinguishable once decoded).
pub type BagEntry = (String, Option<String>);

/// Decodes a property bag `k1=v1&k2=v2…` as edgeHub does: tokens split on `&` and the first `=`,
/// keys and values percent-decoded (`+` stays `+`). An empty token (a leading, doubled or
/// trailing `&`), a key starting with `=` or a raw `=` inside a value is a format error.
pub fn decode_bag(bag: &str) -> Result<Vec<BagEntry>, BagError> {
    if bag.is_empty() {
        return Ok(Vec::new());
    }
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    bag.split('&')
        .map(|token| {
            if token.is_empty() {
                return Err(BagError("an empty property (stray '&')"));
            }
            match token.split_once('=') {
                None => Ok((decode(token), None)),
                Some(("", _)) => Err(BagError("a property without a name")),
                Some((_, v)) if v.contains('=') => Err(BagError("a raw '=' inside a value")),
                Some((k, "")) => Ok((decode(k), None)),
                Some((k, v)) => Ok((decode(k), Some(decode(v)))),
            }
        })
        .collect()
}

/// Encodes a property bag as edgeHub does: every key and value escaped like
/// `Uri.EscapeDataString`; `k` alone for no value, `k=` for an empty one.
pub fn encode_bag<'a>(entries: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> String {
    let mut out = String::with_capacity(64);
    for (k, v) in entries {
        if !out.is_empty() {
            out.push('&');
        }
        out.extend(utf8_percent_encode(k, BAG_ESCAPE));
        if let Some(v) = v {
            out.push('=');
            out.extend(utf8_percent_encode(v, BAG_ESCAPE));
        }
    }
    out
}

/// What a client's PUBLISH topic asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientTopic<'a> {
    /// `devices/{d}/messages/events[/[{bag}[/]]]` or the module form
    /// `devices/{d}/modules/{m}/messages/events[/[{bag}[/]]]`; the bag still encoded.
    Telemetry {
        device: &'a str,
        module: Option<&'a str>,
        bag: &'a str,
    },
    /// `$iothub/twin/GET/?$rid={rid}`.
    TwinGet { rid: &'a str },
    /// `$iothub/twin/PATCH/properties/reported/?$rid={rid}`; applied but unanswered without rid.
    TwinPatchReported { rid: Option<&'a str> },
    /// `$iothub/methods/res/{status}/?$rid={rid}`; `None` for a status that is not a number.
    MethodResponse { status: Option<i32>, rid: &'a str },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Not a topic IoT Hub serves: the connection is closed, as IoT Hub does.
    #[error("topic not served")]
    Unknown,
    /// A telemetry topic with more segments than a bag: edgeHub drops the message (a raw `/`
    /// in a property value, as the C SDK sends without URL encoding).
    #[error("a telemetry topic with a '/' inside its property bag")]
    BadBag,
    /// A twin GET without `$rid`: edgeHub closes the connection.
    #[error("a twin request without $rid")]
    NoRid,
}

/// `$rid` (and anything else) from a `?k=v&…` query, as sent (not decoded).
fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// Classifies a client's PUBLISH topic.
pub fn parse_client_topic(topic: &str) -> Result<ClientTopic<'_>, TopicError> {
    if let Some(rest) = topic.strip_prefix("$iothub/twin/") {
        if let Some(q) = rest.strip_prefix("GET/") {
            let q = q.strip_prefix('?').ok_or(TopicError::Unknown)?;
            let rid = query_value(q, "$rid").ok_or(TopicError::NoRid)?;
            return Ok(ClientTopic::TwinGet { rid });
        }
        if let Some(q) = rest.strip_prefix("PATCH/properties/reported/") {
            let q = match q {
                "" => "",
                q => q.strip_prefix('?').ok_or(TopicError::Unknown)?,
            };
            return Ok(ClientTopic::TwinPatchReported {
                rid: query_value(q, "$rid"),
            });
        }
        return Err(TopicError::Unknown);
    }
    if let Some(rest) = topic.strip_prefix("$iothub/methods/res/") {
        let (status, q) = rest.split_once("/?").ok_or(TopicError::Unknown)?;
        let rid = query_value(q, "$rid").ok_or(TopicError::NoRid)?;
        return Ok(ClientTopic::MethodResponse {
            status: status.parse().ok(),
            rid,
        });
    }
    // Once per PUBLISH: read in place, segment by segment, without collecting them.
    let rest = topic.strip_prefix("devices/").ok_or(TopicError::Unknown)?;
    let (device, rest) = rest.split_once('/').ok_or(TopicError::Unknown)?;
    let (module, rest) = match rest.strip_prefix("modules/") {
        Some(r) => {
            let (m, r) = r.split_once('/').ok_or(TopicError::Unknown)?;
            (Some(m), r)
        }
        None => (None, rest),
    };
    let tail = rest
        .strip_prefix("messages/events")
        .ok_or(TopicError::Unknown)?;
    if device.is_empty() || module.is_some_and(str::is_empty) {
        return Err(TopicError::Unknown);
    }
    // Nothing, `/`, `/{bag}` or `/{bag}/`; more segments are a bag with a '/' in it.
    let bag = match tail {
        "" => "",
        t => {
            let t = t.strip_prefix('/').ok_or(TopicError::Unknown)?;
            let bag = t.strip_suffix('/').unwrap_or(t);
            if bag.contains('/') {
                return Err(TopicError::BadBag);
            }
            bag
        }
    };
    Ok(ClientTopic::Telemetry {
        device,
        module,
        bag,
    })
}

/// What a SUBSCRIBE filter turns on, as edgeHub's `SessionStateParser` reads filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterKind<'a> {
    /// `devices/{d}/modules/{m}/#` or `devices/{d}/modules/{m}/inputs/#`.
    ModuleMessages { device: &'a str, module: &'a str },
    /// `devices/{d}/messages/devicebound/#`.
    C2d { device: &'a str },
    /// `$iothub/twin/res/#`.
    TwinResponses,
    /// `$iothub/twin/PATCH/properties/desired/…`.
    Desired,
    /// `$iothub/methods/POST/…`.
    Methods,
    /// Anything else: granted, and nothing is ever published on it (as on edgeHub).
    Unknown,
}

pub fn classify_filter(filter: &str) -> FilterKind<'_> {
    if filter.starts_with("$iothub/methods/POST/") {
        return FilterKind::Methods;
    }
    if filter.starts_with("$iothub/twin/PATCH/properties/desired/") {
        return FilterKind::Desired;
    }
    if filter == "$iothub/twin/res/#" {
        return FilterKind::TwinResponses;
    }
    let segs: Vec<&str> = filter.split('/').collect();
    match segs.as_slice() {
        ["devices", d, "messages", "devicebound", "#"] if !d.is_empty() => {
            FilterKind::C2d { device: d }
        }
        ["devices", d, "modules", m, "#"] | ["devices", d, "modules", m, "inputs", "#"]
            if !d.is_empty() && !m.is_empty() =>
        {
            FilterKind::ModuleMessages {
                device: d,
                module: m,
            }
        }
        _ => FilterKind::Unknown,
    }
}

/// `devices/{d}/modules/{m}/inputs/{input}/{bag}`; the bag is never empty (it always holds the
/// sender's `$.cdid`), which the Node SDK's topic match and the C# SDK's parser need.
pub fn input_topic(device: &str, module: &str, input: &str, bag: &str) -> String {
    // Once per delivered message: assembled without the formatting machinery.
    let parts = [
        "devices/",
        device,
        "/modules/",
        module,
        "/inputs/",
        input,
        "/",
        bag,
    ];
    let mut t = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        t.push_str(p);
    }
    t
}

/// `devices/{d}/messages/devicebound/{bag}` (the Node SDK needs the `/` after `devicebound`,
/// even with an empty bag).
pub fn c2d_topic(device: &str, bag: &str) -> String {
    format!("devices/{device}/messages/devicebound/{bag}")
}

/// `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`.
pub fn twin_response_topic(status: i32, rid: &str, version: Option<i64>) -> String {
    match version {
        Some(v) => format!("$iothub/twin/res/{status}/?$rid={rid}&$version={v}"),
        None => format!("$iothub/twin/res/{status}/?$rid={rid}"),
    }
}

/// `$iothub/twin/PATCH/properties/desired/?$version={v}`.
pub fn desired_topic(version: i64) -> String {
    format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
}

/// `$iothub/methods/POST/{method}/?$rid={rid}`.
pub fn method_request_topic(method: &str, rid: &str) -> String {
    format!("$iothub/methods/POST/{method}/?$rid={rid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_as_the_sdks_send_them() {
        let node = "hub.azure-devices.net/edge1/filter/?api-version=2021-04-12&model-id=dtmi:x:y;1&DeviceClientType=azure-iot-device%2F1.18.4%20(node%20v20)";
        let u = parse_username(node).unwrap();
        assert_eq!(
            u,
            Username {
                device: "edge1".into(),
                module: Some("filter".into()),
                api_version: "2021-04-12".into(),
                client_type: Some("azure-iot-device/1.18.4 (node v20)".into()),
                model_id: Some("dtmi:x:y;1".into()),
                auth_chain: None,
            }
        );
        // A child hub on behalf of its module (the C# SDK escapes the chain).
        let u = parse_username(
            "hub/child1/filter/?api-version=2020-09-30&auth-chain=child1%2Ffilter%3Bchild1",
        )
        .unwrap();
        assert_eq!(u.auth_chain.as_deref(), Some("child1/filter;child1"));
        let py = "hub/leaf1/?api-version=2019-10-01&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0%28x%3By%29";
        let u = parse_username(py).unwrap();
        assert_eq!((u.device.as_str(), u.module), ("leaf1", None));
        assert_eq!(
            u.client_type.as_deref(),
            Some("azure-iot-device-iothub-py/2.14.0(x;y)")
        );
        // Without '?': the last segment holds the query.
        let u = parse_username("hub/d/m/api-version=2018-06-30").unwrap();
        assert_eq!(u.module.as_deref(), Some("m"));
        // First occurrence wins; unknown keys ignored.
        let u = parse_username("h/d/?x=1&api-version=a&api-version=b").unwrap();
        assert_eq!(u.api_version, "a");
    }

    #[test]
    fn usernames_refused() {
        for (s, e) in [
            ("", UsernameError::Shape),
            ("hub/d", UsernameError::Shape),
            ("hub/d/m/x/?api-version=1", UsernameError::Shape),
            ("hub/d/m", UsernameError::Shape),
            ("hub//?api-version=1", UsernameError::NoDevice),
            ("hub/d//?api-version=1", UsernameError::Shape),
            ("hub/d/?DeviceClientType=x", UsernameError::NoApiVersion),
            ("hub/d/?api-version=", UsernameError::NoApiVersion),
        ] {
            assert_eq!(parse_username(s), Err(e), "{s:?}");
        }
    }

    #[test]
    fn client_ids() {
        assert_eq!(parse_client_id("d"), Some(("d".into(), None)));
        assert_eq!(parse_client_id("d/m"), Some(("d".into(), Some("m".into()))));
        for bad in ["", "/m", "d/", "d/m/x"] {
            assert_eq!(parse_client_id(bad), None, "{bad:?}");
        }
    }

    fn e(k: &str, v: Option<&str>) -> BagEntry {
        (k.into(), v.map(Into::into))
    }

    #[test]
    fn bags_decode_as_on_edgehub() {
        assert_eq!(decode_bag(""), Ok(vec![]));
        assert_eq!(
            decode_bag("%24.on=out1&%24.mid=m1&%24.ct=application%2Fjson&temp=21"),
            Ok(vec![
                e("$.on", Some("out1")),
                e("$.mid", Some("m1")),
                e("$.ct", Some("application/json")),
                e("temp", Some("21")),
            ])
        );
        assert_eq!(
            decode_bag("$.ct=application%2Fjson%3Bcharset%3Dutf-8"),
            Ok(vec![e("$.ct", Some("application/json;charset=utf-8"))])
        );
        assert_eq!(decode_bag("a&b="), Ok(vec![e("a", None), e("b", None)]));
        assert_eq!(decode_bag("a=1+2"), Ok(vec![e("a", Some("1+2"))]));
        assert_eq!(decode_bag("a=%2B"), Ok(vec![e("a", Some("+"))]));
        for bad in ["a=1&", "&a=1", "a=1&&b=2", "=1", "a=b=c"] {
            assert!(decode_bag(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bags_encode_as_on_edgehub_and_round_trip() {
        let out = encode_bag([
            ("temp", Some("21 °C")),
            ("$.mid", Some("m/1")),
            ("flag", None),
            ("empty", Some("")),
        ]);
        assert_eq!(out, "temp=21%20%C2%B0C&%24.mid=m%2F1&flag&empty=");
        let back = decode_bag(&out).unwrap();
        assert_eq!(
            back,
            vec![
                e("temp", Some("21 °C")),
                e("$.mid", Some("m/1")),
                e("flag", None),
                e("empty", None),
            ]
        );
        // Round trip over awkward characters.
        let nasty = "a&b=c/d?e#f+g%h$i é";
        let out = encode_bag([(nasty, Some(nasty))]);
        assert!(!out.contains('/') && !out.contains('#') && !out.contains('+'));
        assert_eq!(decode_bag(&out).unwrap(), vec![e(nasty, Some(nasty))]);
    }

    #[test]
    fn client_topics() {
        use ClientTopic::*;
        let t = |device, module, bag| Telemetry {
            device,
            module,
            bag,
        };
        for (topic, want) in [
            ("devices/leaf1/messages/events/", t("leaf1", None, "")),
            ("devices/leaf1/messages/events", t("leaf1", None, "")),
            ("devices/leaf1/messages/events/k=v", t("leaf1", None, "k=v")),
            (
                "devices/edge1/modules/filter/messages/events/%24.on=out1&temp=21/",
                t("edge1", Some("filter"), "%24.on=out1&temp=21"),
            ),
            (
                "devices/edge1/modules/filter/messages/events/%24.on=out1",
                t("edge1", Some("filter"), "%24.on=out1"),
            ),
            (
                "devices/edge1/modules/filter/messages/events",
                t("edge1", Some("filter"), ""),
            ),
            ("$iothub/twin/GET/?$rid=42", TwinGet { rid: "42" }),
            (
                "$iothub/twin/PATCH/properties/reported/?$rid=7&$version=3",
                TwinPatchReported { rid: Some("7") },
            ),
            (
                "$iothub/twin/PATCH/properties/reported/",
                TwinPatchReported { rid: None },
            ),
            (
                "$iothub/methods/res/200/?$rid=0b7e",
                MethodResponse {
                    status: Some(200),
                    rid: "0b7e",
                },
            ),
            (
                "$iothub/methods/res/abc/?$rid=1",
                MethodResponse {
                    status: None,
                    rid: "1",
                },
            ),
        ] {
            assert_eq!(parse_client_topic(topic), Ok(want), "{topic}");
        }
        for (topic, err) in [
            (
                "devices/leaf1/messages/events/%24.ct=application/json",
                TopicError::BadBag,
            ),
            ("$iothub/twin/GET/", TopicError::Unknown),
            ("$iothub/twin/GET/?x=1", TopicError::NoRid),
            ("$iothub/twin/DELETE/?$rid=1", TopicError::Unknown),
            ("$iothub/methods/res/200/", TopicError::Unknown),
            ("$iothub/methods/res/200/?$rid=", TopicError::NoRid),
            ("devices//messages/events", TopicError::Unknown),
            ("devices/d/modules//messages/events", TopicError::Unknown),
            ("devices/d/messages/devicebound/x", TopicError::Unknown),
            ("devices/d/modules/m/inputs/in1/", TopicError::Unknown),
            ("hello", TopicError::Unknown),
        ] {
            assert_eq!(parse_client_topic(topic), Err(err), "{topic}");
        }
    }

    #[test]
    fn filters() {
        use FilterKind::*;
        for (f, want) in [
            (
                "devices/d/modules/m/#",
                ModuleMessages {
                    device: "d",
                    module: "m",
                },
            ),
            (
                "devices/d/modules/m/inputs/#",
                ModuleMessages {
                    device: "d",
                    module: "m",
                },
            ),
            ("devices/d/messages/devicebound/#", C2d { device: "d" }),
            ("$iothub/twin/res/#", TwinResponses),
            ("$iothub/twin/PATCH/properties/desired/#", Desired),
            ("$iothub/methods/POST/#", Methods),
            ("$iothub/twin/res/+", Unknown),
            ("devices/d/modules/m/outputs/#", Unknown),
            ("#", Unknown),
        ] {
            assert_eq!(classify_filter(f), want, "{f}");
        }
    }

    #[test]
    fn hub_topics() {
        assert_eq!(
            input_topic("edge1", "filter", "in1", "%24.cdid=edge1"),
            "devices/edge1/modules/filter/inputs/in1/%24.cdid=edge1"
        );
        assert_eq!(
            twin_response_topic(200, "42", None),
            "$iothub/twin/res/200/?$rid=42"
        );
        assert_eq!(
            twin_response_topic(204, "7", Some(4)),
            "$iothub/twin/res/204/?$rid=7&$version=4"
        );
        assert_eq!(
            desired_topic(5),
            "$iothub/twin/PATCH/properties/desired/?$version=5"
        );
        assert_eq!(
            method_request_topic("reset", "3f1d"),
            "$iothub/methods/POST/reset/?$rid=3f1d"
        );
        // What the hub emits parses back with the SDKs' rules (status segment, $rid).
        let t = twin_response_topic(204, "7", Some(4));
        assert_eq!(t.split('/').nth(3), Some("204"));
    }
}
