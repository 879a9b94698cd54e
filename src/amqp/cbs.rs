//! The `$cbs` node: put-token requests in, status responses out. Pure functions; the link
//! tasks move the messages.

use fe2o3_amqp::types::{
    messaging::{ApplicationProperties, Body, Message, Properties},
    primitives::{SimpleValue, Value},
};
use serde_amqp::primitives::OrderedMap;

use crate::{auth::Authenticator, identity::Identity, sas::SasError};

/// Token types the SDKs send: Node and C use the Service Bus name, C# the IoT Hub one.
const TOKEN_TYPES: &[&str] = &[
    "servicebus.windows.net:sastoken",
    "azure-devices.net:sastoken",
];

/// The answer to one put-token request.
#[derive(Debug, Clone, PartialEq)]
pub struct CbsReply {
    pub status: i32,
    pub description: String,
    /// The request's message-id, echoed as correlation-id with the same AMQP type.
    pub correlation_id: Option<fe2o3_amqp::types::messaging::MessageId>,
    /// Set when the token was good: the identity and the token's expiry (Unix seconds).
    pub granted: Option<(Identity, u64)>,
    /// Set when the token named an identity but failed, for metrics.
    pub refused_id: Option<String>,
}

fn app_string(m: &Message<Body<Value>>, key: &str) -> Option<String> {
    match m.application_properties.as_ref()?.0.get(key)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

/// Handles one request message.
pub fn handle(m: &Message<Body<Value>>, auth: &Authenticator, now_secs: u64) -> CbsReply {
    let correlation_id = m.properties.as_ref().and_then(|p| p.message_id.clone());
    let reply = |status: i32, description: String| CbsReply {
        status,
        description,
        correlation_id: correlation_id.clone(),
        granted: None,
        refused_id: None,
    };
    match app_string(m, "operation").as_deref() {
        Some("put-token") => {}
        Some(op) => return reply(400, format!("unsupported operation {op:?}")),
        None => return reply(400, "missing application property 'operation'".into()),
    }
    match app_string(m, "type") {
        Some(t) if TOKEN_TYPES.iter().any(|k| k.eq_ignore_ascii_case(&t)) => {}
        Some(t) => return reply(400, format!("unsupported token type {t:?}")),
        None => return reply(400, "missing application property 'type'".into()),
    }
    if app_string(m, "name").is_none_or(|n| n.is_empty()) {
        return reply(400, "missing application property 'name'".into());
    }
    let token = match &m.body {
        Body::Value(v) => match &v.0 {
            Value::String(s) => s.clone(),
            _ => return reply(400, "the token must be an amqp-value string".into()),
        },
        _ => return reply(400, "the token must be an amqp-value string".into()),
    };
    match auth.verify(&token, now_secs) {
        Ok((id, expiry)) => CbsReply {
            granted: Some((id, expiry)),
            ..reply(200, "OK".into())
        },
        Err(e) => {
            let status = if matches!(e, SasError::Malformed(_)) {
                400
            } else {
                401
            };
            let refused_id = crate::sas::SasToken::parse(&token)
                .ok()
                .and_then(|t| t.audience().ok())
                .map(|(_, id)| id.to_string());
            CbsReply {
                refused_id,
                ..reply(status, e.to_string())
            }
        }
    }
}

/// The response message: `status-code` as an AMQP int, `status-description` as a string.
pub fn response(reply: &CbsReply) -> Message<Body<Value>> {
    let mut app = OrderedMap::new();
    app.insert("status-code".to_owned(), SimpleValue::Int(reply.status));
    app.insert(
        "status-description".to_owned(),
        SimpleValue::String(reply.description.clone()),
    );
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            correlation_id: reply.correlation_id.clone(),
            ..Default::default()
        }),
        application_properties: Some(ApplicationProperties(app)),
        body: Body::Empty,
        footer: None,
    }
}
