//! The hub's message: what a client sent, plus what the hub knows about where it came from.
//!
//! AMQP sections are kept as the client sent them (message id types, application property
//! types), so a message reaches its target as it left its source; the hub only adds the
//! annotations edgeHub adds (`x-opt-input-name`, the sender's connection ids, enqueued time,
//! delivery count, sequence number) and drops `iothub-outputname`, which is routing metadata.

use std::time::{SystemTime, UNIX_EPOCH};

use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::{
    messaging::{
        ApplicationProperties, Body, Data, Message as AmqpMessage, MessageAnnotations, MessageId,
        Properties,
    },
    primitives::{Binary, SimpleValue, Symbol, Timestamp, Value},
};
use serde_amqp::primitives::OrderedMap;

use crate::model::identity::Identity;

/// Application property that carries a module's output name.
pub const OUTPUT_NAME_PROPERTY: &str = "iothub-outputname";
/// Message annotation that tells a module which input a message arrived on.
pub const INPUT_NAME_ANNOTATION: &str = "x-opt-input-name";
pub const CONNECTION_DEVICE_ID: &str = "iothub-connection-device-id";
pub const CONNECTION_MODULE_ID: &str = "iothub-connection-module-id";
pub const ENQUEUED_TIME: &str = "iothub-enqueuedtime";
pub const DELIVERY_COUNT: &str = "iothub-deliverycount";
pub const SEQUENCE_NUMBER: &str = "x-opt-sequence-number";

/// Incoming annotations that travel on with a message (the rest are the sender's business).
const KEPT_ANNOTATIONS: &[&str] = &[
    "iothub-interface-id",
    "dt-subject",
    "Diagnostic-Id",
    "Correlation-Context",
];

/// Why a client's message could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("the message body must be data sections or a binary/string amqp-value")]
    UnsupportedBody,
    #[error("application property {0:?} must be a string")]
    BadOutputName(String),
}

/// A message in the hub.
#[derive(Debug, Clone)]
pub struct Message {
    pub body: Vec<u8>,
    pub properties: Option<Properties>,
    pub application_properties: OrderedMap<String, SimpleValue>,
    pub annotations: OrderedMap<OwnedKey, Value>,
    /// The authenticated identity that sent it (never what the message claims).
    pub from: Identity,
    /// The output it was sent on, for module messages.
    pub output: Option<String>,
    /// Milliseconds since the Unix epoch when the hub accepted it.
    pub enqueued_ms: i64,
    /// A twin change notification (source `/twinChangeNotifications`), not telemetry.
    pub twin_change: bool,
    /// Unique in this hub's store (process-wide counter, seeded past the store's highest id).
    pub id: u64,
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A fresh message id.
pub fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Makes every later id at least `first` (called when the store opens).
pub fn seed_ids(first: u64) {
    NEXT_ID.fetch_max(first, std::sync::atomic::Ordering::Relaxed);
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Message {
    /// Takes a client's AMQP message, stamping the sender's identity over whatever it claimed.
    pub fn from_amqp(m: AmqpMessage<Body<Value>>, from: Identity) -> Result<Self, MessageError> {
        let body = match m.body {
            Body::Data(batch) => {
                let mut out = Vec::new();
                for Data(b) in batch.into_iter() {
                    out.extend_from_slice(b.as_slice());
                }
                out
            }
            Body::Value(v) => match v.0 {
                Value::Binary(b) => b.into_vec(),
                Value::String(s) => s.into_bytes(),
                _ => return Err(MessageError::UnsupportedBody),
            },
            Body::Empty => Vec::new(),
            Body::Sequence(_) => return Err(MessageError::UnsupportedBody),
        };
        let mut application_properties = m.application_properties.map(|a| a.0).unwrap_or_default();
        let output = match application_properties.swap_remove(OUTPUT_NAME_PROPERTY) {
            None => None,
            Some(SimpleValue::String(s)) => Some(s),
            Some(SimpleValue::Symbol(s)) => Some(s.0),
            Some(_) => return Err(MessageError::BadOutputName(OUTPUT_NAME_PROPERTY.into())),
        };
        let mut annotations = OrderedMap::new();
        if let Some(MessageAnnotations(a)) = m.message_annotations {
            for (k, v) in a.into_iter() {
                if let OwnedKey::Symbol(s) = &k {
                    if KEPT_ANNOTATIONS.contains(&s.0.as_str()) {
                        annotations.insert(k, v);
                    }
                }
            }
        }
        // Outputs only mean something for modules.
        let output = if from.module().is_some() {
            output
        } else {
            None
        };
        Ok(Self {
            body,
            properties: m.properties,
            application_properties,
            annotations,
            from,
            output,
            enqueued_ms: now_ms(),
            twin_change: false,
            id: next_id(),
        })
    }

    /// The source path routes match against.
    pub fn source_path(&self) -> String {
        if self.twin_change {
            return "/twinChangeNotifications".to_owned();
        }
        // Once per routed message: assembled without the formatting machinery.
        match (self.from.module(), &self.output) {
            (Some(m), output) => {
                let (m, o) = (m.as_str(), output.as_deref());
                let len = 18 + m.len() + o.map_or(0, |o| 9 + o.len());
                let mut path = String::with_capacity(len);
                path.push_str("/messages/modules/");
                path.push_str(m);
                if let Some(o) = o {
                    path.push_str("/outputs/");
                    path.push_str(o);
                }
                path
            }
            (None, _) => "/messages".to_owned(),
        }
    }

    /// The notification edgeHub routes for a reported-properties patch: a JSON body
    /// `{"version": n, "properties": {"reported": patch}}` from the patching identity.
    pub fn twin_change_notification(
        from: Identity,
        version: i64,
        patch: &serde_json::Map<String, serde_json::Value>,
    ) -> Self {
        let body = serde_json::json!({ "version": version, "properties": { "reported": patch } });
        let mut application_properties = OrderedMap::new();
        application_properties.insert(
            "iothub-message-schema".to_owned(),
            SimpleValue::String("twinChangeNotification".into()),
        );
        Self {
            body: body.to_string().into_bytes(),
            properties: Some(Properties {
                content_type: Some(Symbol::from("application/json")),
                content_encoding: Some(Symbol::from("utf-8")),
                ..Default::default()
            }),
            application_properties,
            annotations: OrderedMap::new(),
            from,
            output: None,
            enqueued_ms: now_ms(),
            twin_change: true,
            id: next_id(),
        }
    }

    /// Approximate size in bytes, for limits and metrics.
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .application_properties
                .iter()
                .map(|(k, v)| k.len() + simple_len(v))
                .sum::<usize>()
            + 64
    }

    /// The AMQP message delivered to a module input.
    pub fn to_input_message(
        &self,
        input: &str,
        sequence: u64,
        delivery_count: u8,
    ) -> AmqpMessage<Body<Value>> {
        let mut ann = self.annotations.clone();
        let sym = |s: &str| OwnedKey::Symbol(Symbol::from(s));
        ann.insert(sym(INPUT_NAME_ANNOTATION), Value::String(input.to_owned()));
        ann.insert(
            sym(CONNECTION_DEVICE_ID),
            Value::String(self.from.device().to_string()),
        );
        if let Some(m) = self.from.module() {
            ann.insert(sym(CONNECTION_MODULE_ID), Value::String(m.to_string()));
        }
        ann.insert(
            sym(ENQUEUED_TIME),
            Value::Timestamp(Timestamp::from_milliseconds(self.enqueued_ms)),
        );
        ann.insert(sym(DELIVERY_COUNT), Value::Ubyte(delivery_count));
        ann.insert(sym(SEQUENCE_NUMBER), Value::Ulong(sequence));
        let app = string_properties(&self.application_properties);
        // Ids as strings, as edgeHub delivers them (its messages hold string ids).
        let properties = self.properties.clone().map(|mut p| {
            p.message_id = p
                .message_id
                .map(|id| MessageId::String(message_id_text(&id)));
            p.correlation_id = p
                .correlation_id
                .map(|id| MessageId::String(message_id_text(&id)));
            p
        });
        AmqpMessage {
            header: None,
            delivery_annotations: None,
            message_annotations: Some(MessageAnnotations(ann)),
            properties,
            application_properties: (!app.is_empty()).then_some(ApplicationProperties(app)),
            body: Body::Data(vec![Data(Binary::from(self.body.clone()))].into()),
            footer: None,
        }
    }
}

impl Message {
    /// The AMQP message delivered on a device's C2D link: the service's properties with the
    /// ids as strings (as edgeHub delivers them), its string application properties (the C
    /// SDK refuses a message with any other), the annotations IoT Hub adds (sequence number,
    /// enqueued time, delivery count), one data section.
    pub fn to_c2d_message(&self, sequence: u64, delivery_count: u8) -> AmqpMessage<Body<Value>> {
        let sym = |s: &str| OwnedKey::Symbol(Symbol::from(s));
        let mut ann = OrderedMap::new();
        ann.insert(sym(SEQUENCE_NUMBER), Value::Ulong(sequence));
        ann.insert(
            sym(ENQUEUED_TIME),
            Value::Timestamp(Timestamp::from_milliseconds(self.enqueued_ms)),
        );
        ann.insert(sym(DELIVERY_COUNT), Value::Ubyte(delivery_count));
        let app = string_properties(&self.application_properties);
        let properties = self.properties.clone().map(|mut p| {
            p.message_id = p
                .message_id
                .map(|id| MessageId::String(message_id_text(&id)));
            p.correlation_id = p
                .correlation_id
                .map(|id| MessageId::String(message_id_text(&id)));
            p
        });
        AmqpMessage {
            header: None,
            delivery_annotations: None,
            message_annotations: Some(MessageAnnotations(ann)),
            properties,
            application_properties: (!app.is_empty()).then_some(ApplicationProperties(app)),
            body: Body::Data(vec![Data(Binary::from(self.body.clone()))].into()),
            footer: None,
        }
    }

    /// The AMQP message sent upstream on the origin identity's events link: ids, properties
    /// and kept annotations as the client sent them, the output name back in
    /// `iothub-outputname` so that the parent's routes see the same source.
    pub fn to_upstream_message(&self) -> AmqpMessage<Body<Value>> {
        let mut app = string_properties(&self.application_properties);
        if let Some(o) = &self.output {
            app.insert(
                OUTPUT_NAME_PROPERTY.to_owned(),
                SimpleValue::String(o.clone()),
            );
        }
        AmqpMessage {
            header: None,
            delivery_annotations: None,
            message_annotations: (!self.annotations.is_empty())
                .then(|| MessageAnnotations(self.annotations.clone())),
            properties: self.properties.clone(),
            application_properties: (!app.is_empty()).then_some(ApplicationProperties(app)),
            body: Body::Data(vec![Data(Binary::from(self.body.clone()))].into()),
            footer: None,
        }
    }
}

/// The application properties the hub sends on: the string ones (symbols as strings). edgeHub
/// keeps only string properties, the C# SDK drops others, and the C SDK refuses a whole message
/// that has one that is not a string.
fn string_properties(app: &OrderedMap<String, SimpleValue>) -> OrderedMap<String, SimpleValue> {
    app.iter()
        .filter_map(|(k, v)| match v {
            SimpleValue::String(_) => Some((k.clone(), v.clone())),
            SimpleValue::Symbol(s) => Some((k.clone(), SimpleValue::String(s.0.clone()))),
            _ => None,
        })
        .collect()
}

fn simple_len(v: &SimpleValue) -> usize {
    match v {
        SimpleValue::String(s) => s.len(),
        SimpleValue::Symbol(s) => s.0.len(),
        SimpleValue::Binary(b) => b.len(),
        _ => 8,
    }
}

pub fn message_id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Uuid(u) => uuid::Uuid::from(u.clone()).to_string(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Binary(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::identity::{DeviceId, ModuleId};

    fn module(m: &str) -> Identity {
        Identity::Module(DeviceId::parse("d1").unwrap(), ModuleId::parse(m).unwrap())
    }

    fn amqp(output: Option<&str>) -> AmqpMessage<Body<Value>> {
        let mut app = OrderedMap::new();
        app.insert("k".to_owned(), SimpleValue::String("v".into()));
        if let Some(o) = output {
            app.insert(
                OUTPUT_NAME_PROPERTY.to_owned(),
                SimpleValue::String(o.into()),
            );
        }
        let mut ann = OrderedMap::new();
        ann.insert(
            OwnedKey::Symbol(Symbol::from(CONNECTION_DEVICE_ID)),
            Value::String("spoofed".into()),
        );
        AmqpMessage {
            header: None,
            delivery_annotations: None,
            message_annotations: Some(MessageAnnotations(ann)),
            properties: Some(Properties {
                message_id: Some("id-1".to_owned().into()),
                content_type: Some(Symbol::from("application/json")),
                ..Default::default()
            }),
            application_properties: Some(ApplicationProperties(app)),
            body: Body::Data(vec![Data(Binary::from(b"{\"t\":1}".to_vec()))].into()),
            footer: None,
        }
    }

    #[test]
    fn sources_follow_edgehub() {
        let m = Message::from_amqp(amqp(Some("out1")), module("a")).unwrap();
        assert_eq!(m.source_path(), "/messages/modules/a/outputs/out1");
        let m = Message::from_amqp(amqp(None), module("a")).unwrap();
        assert_eq!(m.source_path(), "/messages/modules/a");
        let m = Message::from_amqp(
            amqp(Some("x")),
            Identity::Device(DeviceId::parse("leaf").unwrap()),
        )
        .unwrap();
        assert_eq!(m.source_path(), "/messages");
    }

    #[test]
    fn input_messages_carry_the_real_sender_and_the_input() {
        let m = Message::from_amqp(amqp(Some("out1")), module("a")).unwrap();
        let out = m.to_input_message("in1", 7, 0);
        let ann = out.message_annotations.unwrap().0;
        let get = |k: &str| ann.get(&OwnedKey::Symbol(Symbol::from(k))).cloned();
        assert_eq!(
            get(INPUT_NAME_ANNOTATION),
            Some(Value::String("in1".into()))
        );
        assert_eq!(get(CONNECTION_DEVICE_ID), Some(Value::String("d1".into())));
        assert_eq!(get(CONNECTION_MODULE_ID), Some(Value::String("a".into())));
        assert_eq!(get(SEQUENCE_NUMBER), Some(Value::Ulong(7)));
        let app = out.application_properties.unwrap().0;
        assert!(app.get(OUTPUT_NAME_PROPERTY).is_none());
        assert_eq!(app.get("k"), Some(&SimpleValue::String("v".into())));
        assert_eq!(
            out.properties.unwrap().content_type,
            Some(Symbol::from("application/json"))
        );
    }

    #[test]
    fn only_string_properties_and_string_ids_go_on_as_on_edgehub() {
        let mut a = amqp(Some("out1"));
        let u = uuid::Uuid::new_v4();
        if let Some(p) = a.properties.as_mut() {
            p.message_id = Some(MessageId::Uuid(u.into()));
            p.correlation_id = Some(MessageId::Ulong(42));
        }
        if let Some(app) = a.application_properties.as_mut() {
            app.0.insert("n".to_owned(), SimpleValue::Int(3));
            app.0.insert("b".to_owned(), SimpleValue::Bool(true));
            app.0
                .insert("s".to_owned(), SimpleValue::Symbol(Symbol::from("sym")));
        }
        let m = Message::from_amqp(a, module("a")).unwrap();
        let out = m.to_input_message("in1", 7, 0);
        let props = out.properties.unwrap();
        assert_eq!(props.message_id, Some(MessageId::String(u.to_string())));
        assert_eq!(props.correlation_id, Some(MessageId::String("42".into())));
        let app = out.application_properties.unwrap().0;
        assert_eq!(app.get("k"), Some(&SimpleValue::String("v".into())));
        assert_eq!(app.get("s"), Some(&SimpleValue::String("sym".into())));
        assert!(app.get("n").is_none() && app.get("b").is_none());
        let up = m.to_upstream_message().application_properties.unwrap().0;
        assert!(up.get("n").is_none() && up.get("b").is_none());
        assert_eq!(up.get("s"), Some(&SimpleValue::String("sym".into())));
        assert_eq!(
            up.get(OUTPUT_NAME_PROPERTY),
            Some(&SimpleValue::String("out1".into()))
        );
    }

    #[test]
    fn unsupported_bodies_are_refused() {
        let mut a = amqp(None);
        a.body = Body::Value(fe2o3_amqp::types::messaging::AmqpValue(Value::Int(3)));
        assert_eq!(
            Message::from_amqp(a, module("a")).unwrap_err(),
            MessageError::UnsupportedBody
        );
    }
}
