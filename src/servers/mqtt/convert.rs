//! MQTT ⇄ the hub's [`Message`], pure. A PUBLISH's property bag carries what AMQP carries in
//! its properties and annotations; this module maps the bag onto the same fields the AMQP path
//! fills (so routes, the store and AMQP receivers see no difference) and back onto a bag for a
//! module input.
//!
//! | bag key | in the hub's message |
//! |---|---|
//! | `$.mid`, `$.cid` | message id, correlation id (strings) |
//! | `$.uid`, `$.to` | user id, to |
//! | `$.ct`, `$.ce` | content type, content encoding |
//! | `$.exp` | absolute expiry time (ISO 8601; ignored when it does not parse) |
//! | `$.on` | the output name (modules only) |
//! | `$.ifid`, `$.sub` | annotations `iothub-interface-id`, `dt-subject` |
//! | `$.schema`, `$.ctime` | application properties `iothub-message-schema`, `iothub-creation-time-utc` (as the AMQP SDKs send them) |
//! | `$.cdid`, `$.cmid` | ignored: the hub stamps the authenticated sender |
//! | anything else | an application property (a key without value: the empty string) |
//!
//! RETAIN and DUP become the application properties `mqtt-retain` / `mqtt-dup` = `true`, as on
//! edgeHub. Outbound bags list the string application properties, then the system properties,
//! then `$.cdid`/`$.cmid` of the sender, as edgeHub writes them.

use fe2o3_amqp::types::{
    messaging::{annotations::OwnedKey, MessageId, Properties},
    primitives::{Binary, SimpleValue, Symbol, Timestamp, Value},
};
use serde_amqp::primitives::OrderedMap;

use super::topic::{encode_bag, BagEntry};
use crate::model::{
    identity::Identity,
    message::{next_id, now_ms, Message},
};

const SCHEMA_PROPERTY: &str = "iothub-message-schema";
const CREATION_TIME_PROPERTY: &str = "iothub-creation-time-utc";
const INTERFACE_ID: &str = "iothub-interface-id";
const SUBJECT: &str = "dt-subject";

/// A client's PUBLISH (telemetry or output) as the hub's message, from `from`.
pub fn message_from_publish(
    from: Identity,
    bag: Vec<BagEntry>,
    payload: Vec<u8>,
    retain: bool,
    dup: bool,
) -> Message {
    let mut p = Properties::default();
    let mut app = OrderedMap::new();
    let mut annotations = OrderedMap::new();
    let mut output = None;
    let sym = |s: &str| OwnedKey::Symbol(Symbol::from(s));
    for (k, v) in bag {
        let Some(v) = v else {
            if !k.starts_with("$.") {
                app.insert(k, SimpleValue::String(String::new()));
            }
            continue;
        };
        match k.as_str() {
            "$.mid" => p.message_id = Some(MessageId::String(v)),
            "$.cid" => p.correlation_id = Some(MessageId::String(v)),
            "$.uid" => p.user_id = Some(Binary::from(v.into_bytes())),
            "$.to" => p.to = Some(v),
            "$.ct" => p.content_type = Some(Symbol::from(v)),
            "$.ce" => p.content_encoding = Some(Symbol::from(v)),
            "$.exp" => {
                p.absolute_expiry_time = parse_iso8601_ms(&v).map(Timestamp::from_milliseconds)
            }
            "$.on" => output = Some(v),
            "$.ifid" => {
                annotations.insert(sym(INTERFACE_ID), Value::String(v));
            }
            "$.sub" => {
                annotations.insert(sym(SUBJECT), Value::String(v));
            }
            "$.schema" => {
                app.insert(SCHEMA_PROPERTY.to_owned(), SimpleValue::String(v));
            }
            "$.ctime" => {
                app.insert(CREATION_TIME_PROPERTY.to_owned(), SimpleValue::String(v));
            }
            "$.cdid" | "$.cmid" => {}
            _ => {
                app.insert(k, SimpleValue::String(v));
            }
        }
    }
    if retain {
        app.insert("mqtt-retain".to_owned(), SimpleValue::String("true".into()));
    }
    if dup {
        app.insert("mqtt-dup".to_owned(), SimpleValue::String("true".into()));
    }
    let output = output.filter(|_| from.module().is_some());
    let has_properties = p != Properties::default();
    Message {
        body: payload,
        properties: has_properties.then_some(p),
        application_properties: app,
        annotations,
        from,
        output,
        enqueued_ms: now_ms(),
        twin_change: false,
        id: next_id(),
    }
}

/// The property bag of a message delivered to a module input (never empty: `$.cdid` is always
/// there).
pub fn input_bag(msg: &Message) -> String {
    bag(msg, true)
}

/// The property bag of a C2D message on `devices/{d}/messages/devicebound/{bag}`: the same
/// properties as a module input's, without a sender (the service has no connection ids).
pub fn c2d_bag(msg: &Message) -> String {
    bag(msg, false)
}

fn bag(msg: &Message, sender: bool) -> String {
    let mut entries: Vec<(&str, String)> = Vec::new();
    let mut schema = None;
    let mut ctime = None;
    for (k, v) in msg.application_properties.iter() {
        let v = match v {
            SimpleValue::String(s) => s.as_str(),
            SimpleValue::Symbol(s) => s.0.as_str(),
            // edgeHub keeps only string properties; so do the AMQP deliveries.
            _ => continue,
        };
        match k.as_str() {
            SCHEMA_PROPERTY => schema = Some(v.to_owned()),
            CREATION_TIME_PROPERTY => ctime = Some(v.to_owned()),
            _ => entries.push((k.as_str(), v.to_owned())),
        }
    }
    if let Some(p) = &msg.properties {
        let text = |id: &MessageId| crate::model::message::message_id_text(id);
        if let Some(id) = &p.message_id {
            entries.push(("$.mid", text(id)));
        }
        if let Some(id) = &p.correlation_id {
            entries.push(("$.cid", text(id)));
        }
        if let Some(u) = &p.user_id {
            entries.push(("$.uid", String::from_utf8_lossy(u.as_slice()).into_owned()));
        }
        if let Some(to) = &p.to {
            entries.push(("$.to", to.clone()));
        }
        if let Some(ct) = &p.content_type {
            entries.push(("$.ct", ct.0.clone()));
        }
        if let Some(ce) = &p.content_encoding {
            entries.push(("$.ce", ce.0.clone()));
        }
        if let Some(exp) = &p.absolute_expiry_time {
            entries.push(("$.exp", format_iso8601_ms(exp.milliseconds())));
        }
    }
    if let Some(s) = schema {
        entries.push(("$.schema", s));
    }
    if let Some(c) = ctime {
        entries.push(("$.ctime", c));
    }
    if let Some(Value::String(s)) = msg
        .annotations
        .get(&OwnedKey::Symbol(Symbol::from(SUBJECT)))
    {
        entries.push(("$.sub", s.clone()));
    }
    if sender {
        entries.push(("$.cdid", msg.from.device().to_string()));
        if let Some(m) = msg.from.module() {
            entries.push(("$.cmid", m.to_string()));
        }
    }
    encode_bag(entries.iter().map(|(k, v)| (*k, Some(v.as_str()))))
}

/// Milliseconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.f…][Z|±HH:MM]` (no zone: UTC).
pub fn parse_iso8601_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let t = s.get(from..from + len)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (h, mi, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &s[start..i.min(start + 3)];
        ms = frac.parse::<i64>().ok()? * 10i64.pow(3 - frac.len() as u32);
    }
    let offset_min = match &s[i..] {
        "" | "Z" | "z" => 0,
        zone if zone.len() == 6 && matches!(&zone[..1], "+" | "-") && &zone[3..4] == ":" => {
            let hh: i64 = zone[1..3].parse().ok()?;
            let mm: i64 = zone[4..6].parse().ok()?;
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            sign * (hh * 60 + mm)
        }
        _ => return None,
    };
    let days = crate::model::time::days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    Some(secs * 1000 + ms)
}

/// `YYYY-MM-DDTHH:MM:SS.fffffffZ`, the .NET round-trip form the C# SDK parses.
pub fn format_iso8601_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, mo, d) = crate::model::time::civil_from_days(days);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}0000Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::identity::{DeviceId, ModuleId};
    use crate::servers::mqtt::topic::decode_bag;

    fn module(d: &str, m: &str) -> Identity {
        Identity::Module(DeviceId::parse(d).unwrap(), ModuleId::parse(m).unwrap())
    }

    #[test]
    fn a_publish_fills_the_fields_the_amqp_path_fills() {
        let bag = decode_bag(
            "%24.on=out1&%24.mid=m1&%24.cid=c1&%24.ct=application%2Fjson&%24.ce=utf-8&temp=21&%24.cdid=spoof&%24.schema=s1&%24.ifid=i1&flag",
        )
        .unwrap();
        let m = message_from_publish(module("edge1", "filter"), bag, b"{}".to_vec(), false, true);
        assert_eq!(m.output.as_deref(), Some("out1"));
        assert_eq!(m.source_path(), "/messages/modules/filter/outputs/out1");
        let p = m.properties.clone().unwrap();
        assert_eq!(p.message_id, Some(MessageId::String("m1".into())));
        assert_eq!(p.correlation_id, Some(MessageId::String("c1".into())));
        assert_eq!(p.content_type, Some(Symbol::from("application/json")));
        assert_eq!(p.content_encoding, Some(Symbol::from("utf-8")));
        let app = &m.application_properties;
        assert_eq!(app.get("temp"), Some(&SimpleValue::String("21".into())));
        assert_eq!(app.get("flag"), Some(&SimpleValue::String(String::new())));
        assert_eq!(
            app.get(SCHEMA_PROPERTY),
            Some(&SimpleValue::String("s1".into()))
        );
        assert_eq!(
            app.get("mqtt-dup"),
            Some(&SimpleValue::String("true".into()))
        );
        assert!(app.get("$.cdid").is_none() && app.get("$.on").is_none());
        assert_eq!(
            m.annotations
                .get(&OwnedKey::Symbol(Symbol::from(INTERFACE_ID))),
            Some(&Value::String("i1".into()))
        );
        // The AMQP delivery of it carries the same properties.
        let amqp = m.to_input_message("in1", 1, 0);
        assert_eq!(
            amqp.properties.unwrap().message_id,
            Some(MessageId::String("m1".into()))
        );
    }

    #[test]
    fn outputs_mean_nothing_for_devices() {
        let leaf = Identity::Device(DeviceId::parse("leaf").unwrap());
        let bag = decode_bag("%24.on=x").unwrap();
        let m = message_from_publish(leaf, bag, vec![], false, false);
        assert_eq!(m.output, None);
        assert_eq!(m.source_path(), "/messages");
        assert!(m.properties.is_none());
    }

    #[test]
    fn input_bags_carry_properties_and_the_sender() {
        let bag = decode_bag(
            "%24.mid=m1&%24.ct=application%2Fjson&%24.ce=utf-8&temp=21&%24.ctime=2024-01-02T03%3A04%3A05.0000000Z&%24.exp=2030-01-01T00%3A00%3A00Z",
        )
        .unwrap();
        let m = message_from_publish(module("edge1", "sensor"), bag, vec![], false, false);
        let out = input_bag(&m);
        let back = decode_bag(&out).unwrap();
        let get = |k: &str| {
            back.iter()
                .find(|(key, _)| key == k)
                .and_then(|(_, v)| v.clone())
        };
        assert_eq!(get("temp").as_deref(), Some("21"));
        assert_eq!(get("$.mid").as_deref(), Some("m1"));
        assert_eq!(get("$.ct").as_deref(), Some("application/json"));
        assert_eq!(get("$.ce").as_deref(), Some("utf-8"));
        assert_eq!(
            get("$.ctime").as_deref(),
            Some("2024-01-02T03:04:05.0000000Z")
        );
        assert_eq!(
            get("$.exp").as_deref(),
            Some("2030-01-01T00:00:00.0000000Z")
        );
        assert_eq!(get("$.cdid").as_deref(), Some("edge1"));
        assert_eq!(get("$.cmid").as_deref(), Some("sensor"));
        assert!(out.contains("%24.cdid=edge1"), "{out}");
        // Properties first, sender last, as edgeHub writes them.
        assert!(out.starts_with("temp=21&"), "{out}");
    }

    #[test]
    fn iso8601() {
        for (s, ms) in [
            ("1970-01-01T00:00:00Z", Some(0)),
            ("1970-01-01T00:00:01.5Z", Some(1500)),
            ("2024-02-29T12:00:00.1234567Z", Some(1_709_208_000_123)),
            ("2024-02-29T13:00:00+01:00", Some(1_709_208_000_000)),
            ("2024-02-29T12:00:00", Some(1_709_208_000_000)),
            ("2024-13-01T00:00:00Z", None),
            ("2024-01-01", None),
            ("2024-01-01T00:00:00.Z", None),
            ("2024-01-01T00:00:00+0100", None),
        ] {
            assert_eq!(parse_iso8601_ms(s), ms, "{s}");
        }
        for ms in [0, 1_709_208_000_123, 4_102_444_800_000] {
            assert_eq!(parse_iso8601_ms(&format_iso8601_ms(ms)), Some(ms));
        }
    }
}
