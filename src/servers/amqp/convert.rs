//! AMQP value conversions shared by the hub's links and the upstream client: integers as the
//! SDKs and IoT Hub encode them, message annotations, bodies, and transfer outcomes.

use fe2o3_amqp::types::{
    messaging::{annotations::OwnedKey, Body, Message, Outcome},
    primitives::{SimpleValue, Symbol, Value},
};

use crate::core::delivery;

/// An integer of any AMQP integer type, or a decimal string (a status the peer sent as text).
pub(crate) fn int_of(v: &SimpleValue) -> Option<i64> {
    match v {
        SimpleValue::Int(i) => Some(i64::from(*i)),
        SimpleValue::Long(i) => Some(*i),
        SimpleValue::Uint(i) => Some(i64::from(*i)),
        SimpleValue::Ulong(i) => i64::try_from(*i).ok(),
        SimpleValue::Short(i) => Some(i64::from(*i)),
        SimpleValue::Ushort(i) => Some(i64::from(*i)),
        SimpleValue::Byte(i) => Some(i64::from(*i)),
        SimpleValue::Ubyte(i) => Some(i64::from(*i)),
        SimpleValue::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// An integer annotation value (`status`, `version`): int, long, uint or ulong.
pub(crate) fn value_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(i64::from(*i)),
        Value::Long(i) => Some(*i),
        Value::Uint(i) => Some(i64::from(*i)),
        Value::Ulong(i) => i64::try_from(*i).ok(),
        _ => None,
    }
}

/// A message annotation by its symbol key.
pub(crate) fn annotation<'a>(m: &'a Message<Body<Value>>, key: &str) -> Option<&'a Value> {
    m.message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::Symbol(Symbol::from(key)))
}

/// A string or symbol message annotation.
pub(crate) fn annotation_string(m: &Message<Body<Value>>, key: &str) -> Option<String> {
    match annotation(m, key)? {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

/// The bytes of a body: its data sections joined, or an `amqp-value` string or binary.
pub(crate) fn body_bytes(body: &Body<Value>) -> Vec<u8> {
    match body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Value(v) => match &v.0 {
            Value::String(s) => s.clone().into_bytes(),
            Value::Binary(b) => b.to_vec(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// A peer's outcome for a transfer, as the delivery pump reads it: rejected with the peer's
/// error condition and description, released and modified alike.
pub(crate) fn outcome(o: Outcome) -> delivery::Outcome {
    match o {
        Outcome::Accepted(_) => delivery::Outcome::Accepted,
        Outcome::Rejected(r) => delivery::Outcome::Rejected(
            r.error
                .map(|e| {
                    let text = e.description.unwrap_or_default();
                    format!("{:?}: {text}", e.condition)
                })
                .unwrap_or_default(),
        ),
        _ => delivery::Outcome::Released,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_of_every_width_and_as_text() {
        assert_eq!(int_of(&SimpleValue::Ubyte(200)), Some(200));
        assert_eq!(int_of(&SimpleValue::Ulong(u64::MAX)), None);
        assert_eq!(int_of(&SimpleValue::String("404".into())), Some(404));
        assert_eq!(int_of(&SimpleValue::Bool(true)), None);
        assert_eq!(value_int(&Value::Long(-3)), Some(-3));
    }

    #[test]
    fn bodies_as_bytes() {
        let data = Body::<Value>::Data(
            vec![
                fe2o3_amqp::types::messaging::Data(b"ab".to_vec().into()),
                fe2o3_amqp::types::messaging::Data(b"c".to_vec().into()),
            ]
            .into(),
        );
        assert_eq!(body_bytes(&data), b"abc");
        let value = Body::Value(fe2o3_amqp::types::messaging::AmqpValue(Value::String(
            "x".into(),
        )));
        assert_eq!(body_bytes(&value), b"x");
    }
}
