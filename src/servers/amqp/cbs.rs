//! The `$cbs` node: put-token requests in, status responses out. Pure functions; the link
//! tasks move the messages.
//!
//! The identity granted is the token's (`sr`), whatever the audience (`name`) says, except for
//! the token of a child edge device's `$edgeHub`: that one is put on behalf of the identity
//! the audience names, which must be the child or one of its modules (see `auth`).

use fe2o3_amqp::types::{
    messaging::{ApplicationProperties, Body, Message, Properties},
    primitives::{SimpleValue, Value},
};
use serde_amqp::primitives::OrderedMap;

use crate::{core::auth::Authenticator, model::identity::Identity, model::sas::SasError};

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
    /// Set when a service-policy token was good (see [`service_audience`]): IoT Hub's service
    /// token or an Event Hubs one.
    pub service: Option<ServiceGrant>,
}

/// What a service-policy token grants on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceGrant {
    pub policy: String,
    /// The entity path it covers, lower-cased (`{eventHub}/consumergroups/…`); empty for the
    /// whole hub.
    pub scope: String,
    /// Unix seconds.
    pub expiry: u64,
}

/// Whether a put-token is a service policy's rather than a device's or module's: an Event
/// Hubs audience (`sb://{host}/{eventHub}…`), or IoT Hub's service token (`skn` names a
/// policy and `sr` is the bare host name).
pub fn service_audience(audience: &str, token: &str) -> bool {
    let sb = |s: &str| s.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("sb://"));
    if sb(audience) {
        return true;
    }
    crate::model::sas::SasToken::parse(token).is_ok_and(|t| {
        t.skn.is_some()
            && t.resource()
                .is_ok_and(|r| sb(&r) || !r.trim_end_matches('/').contains('/'))
    })
}

fn app_string(m: &Message<Body<Value>>, key: &str) -> Option<String> {
    match m.application_properties.as_ref()?.0.get(key)? {
        SimpleValue::String(s) => Some(s.clone()),
        SimpleValue::Symbol(s) => Some(s.0.clone()),
        _ => None,
    }
}

/// The token a put-token request carries, if it is one.
pub fn token_of(m: &Message<Body<Value>>) -> Option<String> {
    match &m.body {
        Body::Value(v) => match &v.0 {
            Value::String(s) => Some(s.clone()),
            _ => None,
        },
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
        service: None,
    };
    match app_string(m, "operation").as_deref() {
        Some("put-token") => {}
        Some(op) => {
            return reply(
                400,
                format!("unsupported operation {:?}", super::clip(op).as_ref()),
            )
        }
        None => return reply(400, "missing application property 'operation'".into()),
    }
    match app_string(m, "type") {
        Some(t) if TOKEN_TYPES.iter().any(|k| k.eq_ignore_ascii_case(&t)) => {}
        Some(t) => {
            return reply(
                400,
                format!("unsupported token type {:?}", super::clip(&t).as_ref()),
            )
        }
        None => return reply(400, "missing application property 'type'".into()),
    }
    let audience = match app_string(m, "name") {
        Some(n) if !n.is_empty() => n,
        _ => return reply(400, "missing application property 'name'".into()),
    };
    let token = match &m.body {
        Body::Value(v) => match &v.0 {
            Value::String(s) => s.clone(),
            _ => return reply(400, "the token must be an amqp-value string".into()),
        },
        _ => return reply(400, "the token must be an amqp-value string".into()),
    };
    if service_audience(&audience, &token) {
        return match auth.verify_event_hubs(&token, now_secs) {
            Ok((policy, scope, expiry)) => CbsReply {
                service: Some(ServiceGrant {
                    policy,
                    scope,
                    expiry,
                }),
                ..reply(200, "OK".into())
            },
            Err(e) => CbsReply {
                refused_id: Some("service".into()),
                ..reply(
                    if matches!(e, SasError::Malformed(_)) {
                        400
                    } else {
                        401
                    },
                    e.to_string(),
                )
            },
        };
    }
    match auth.verify_put_token(&token, &audience, now_secs) {
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
            let refused_id = crate::model::sas::SasToken::parse(&token)
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
        // edgeHub and IoT Hub send no body; fe2o3 would encode `Body::Empty` as an `amqp-value`
        // null, so the nearest thing, an empty `data` section, goes instead.
        body: Body::Data(
            vec![fe2o3_amqp::types::messaging::Data(
                fe2o3_amqp::types::primitives::Binary::from(Vec::new()),
            )]
            .into(),
        ),
        footer: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::identity::{DeviceId, KeySlot, ModuleId};

    fn request(name: &str, token: &str) -> Message<Body<Value>> {
        let mut app = OrderedMap::new();
        for (k, v) in [
            ("operation", "put-token"),
            ("type", "servicebus.windows.net:sastoken"),
            ("name", name),
        ] {
            app.insert(k.to_owned(), SimpleValue::String(v.to_owned()));
        }
        Message::builder()
            .properties(Properties {
                message_id: Some("req-1".to_owned().into()),
                ..Default::default()
            })
            .application_properties(ApplicationProperties(app))
            .body(Body::Value(fe2o3_amqp::types::messaging::AmqpValue(
                Value::String(token.to_owned()),
            )))
            .build()
    }

    /// An Event Hubs token as the SDKs make it: HMAC with the UTF-8 bytes of the key text.
    fn event_hubs_token(audience: &str, key_text: &str, policy: &str, expiry: u64) -> String {
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, crate::model::sas::URI_COMPONENT).to_string()
        };
        let sr = enc(audience);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key_text.as_bytes());
        let sig = ring::hmac::sign(&key, format!("{sr}\n{expiry}").as_bytes());
        let sig = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, sig);
        format!(
            "SharedAccessSignature sr={sr}&sig={}&se={expiry}&skn={policy}",
            enc(&sig)
        )
    }

    #[test]
    fn a_service_policy_token_grants_its_event_hubs_path() {
        let key_text = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode([9u8; 32])
        };
        let text = format!(
            r#"{{"deviceId": "edge", "iothubHostname": "hub.example.net", "gatewayHostname": "gw.local",
            "listen": {{"amqps": "127.0.0.1:0"}}, "dataDir": "d",
            "servicePolicies": {{"service": {{"primaryKey": "{key_text}"}}}},
            "$edgeHub": {{"schemaVersion": "1.1", "routes": {{}}, "storeAndForwardConfiguration": {{}}}}}}"#
        );
        let settings = crate::config::from_str(&text, &Default::default()).unwrap();
        let auth = Authenticator::new(
            &settings,
            &crate::model::identity::Key::from_base64(&key_text).unwrap(),
        );
        let audience = "sb://gw.local:5671/hub/ConsumerGroups/$Default/Partitions/0";
        let token = event_hubs_token(audience, &key_text, "service", 4_000_000_000);
        assert!(service_audience(audience, &token));
        let reply = handle(&request(audience, &token), &auth, 1_700_000_000);
        assert_eq!(reply.status, 200, "{}", reply.description);
        assert_eq!(
            reply.service,
            Some(ServiceGrant {
                policy: "service".into(),
                scope: "hub/consumergroups/$default/partitions/0".into(),
                expiry: 4_000_000_000,
            })
        );
        assert!(reply.granted.is_none());
        // Signed with the decoded key, as IoT Hub signs: not an Event Hubs token.
        let wrong = crate::model::sas::make_token(
            audience,
            &crate::model::identity::Key::from_base64(&key_text).unwrap(),
            4_000_000_000,
            Some("service"),
        );
        assert_eq!(
            handle(&request(audience, &wrong), &auth, 1_700_000_000).status,
            401
        );
        // Another host, an unknown policy.
        let other = event_hubs_token("sb://elsewhere/hub", &key_text, "service", 4_000_000_000);
        assert_eq!(
            handle(&request("sb://elsewhere/hub", &other), &auth, 1_700_000_000).status,
            401
        );
        let unknown = event_hubs_token(audience, &key_text, "owner", 4_000_000_000);
        assert_eq!(
            handle(&request(audience, &unknown), &auth, 1_700_000_000).status,
            401
        );
        // IoT Hub's service token (bare host, decoded key) covers the whole hub.
        let hub_token = crate::model::sas::make_token(
            "hub.example.net",
            &crate::model::identity::Key::from_base64(&key_text).unwrap(),
            4_000_000_000,
            Some("service"),
        );
        let reply = handle(
            &request("sb://gw.local/hub", &hub_token),
            &auth,
            1_700_000_000,
        );
        assert_eq!(reply.service.map(|g| g.scope), Some(String::new()));
        // A device's token is no service token.
        assert!(!service_audience(
            "hub.example.net/devices/d",
            "SharedAccessSignature sr=hub.example.net%2Fdevices%2Fd&sig=x&se=1"
        ));
    }

    #[test]
    fn a_child_edge_hub_token_is_put_on_behalf_of_its_module() {
        let text = r#"{"deviceId": "parent", "iothubHostname": "hub.example.net", "gatewayHostname": "parent.local",
            "listen": {"amqps": "127.0.0.1:0"}, "dataDir": "d", "devices": {"child": {"edge": true}},
            "$edgeHub": {"schemaVersion": "1.1", "routes": {}, "storeAndForwardConfiguration": {}}}"#;
        let settings = crate::config::from_str(text, &Default::default()).unwrap();
        let parent_key = crate::model::identity::Key::from_base64(&{
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode([3u8; 32])
        })
        .unwrap();
        let auth = Authenticator::new(&settings, &parent_key);
        let child = DeviceId::parse("child").unwrap();
        let edge_hub_key = parent_key
            .derive_device_key(&child, KeySlot::Primary)
            .derive_module_key(
                &child,
                &ModuleId::parse("$edgeHub").unwrap(),
                KeySlot::Primary,
            );
        let token = crate::model::sas::make_token(
            "hub.example.net/devices/child/modules/$edgeHub",
            &edge_hub_key,
            4_000_000_000,
            None,
        );
        let reply = handle(
            &request("hub.example.net/devices/child/modules/filter", &token),
            &auth,
            1_700_000_000,
        );
        assert_eq!(reply.status, 200, "{}", reply.description);
        assert_eq!(
            reply.granted.map(|(id, _)| id.to_string()),
            Some("child/filter".to_owned())
        );
        assert_eq!(reply.correlation_id, Some("req-1".to_owned().into()));

        let reply = handle(
            &request("hub.example.net/devices/parent/modules/$edgeHub", &token),
            &auth,
            1_700_000_000,
        );
        assert_eq!(reply.status, 401);
        assert!(reply.granted.is_none());
        assert_eq!(reply.refused_id.as_deref(), Some("child/$edgeHub"));
    }
}
