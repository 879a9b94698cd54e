//! What route conditions see of a message: [`RoutingView`], the hub's [`Message`] as a
//! [`MessageView`] (properties by name, ignoring case as edgeHub does, and the body as JSON).

use std::borrow::Cow;

use fe2o3_amqp::types::primitives::SimpleValue;

use crate::{
    model::message::{message_id_text, Message},
    routing::condition::MessageView,
};

/// What route conditions see of a message: properties by name (ignoring case, as edgeHub does)
/// and the JSON body, parsed at most once and only when a condition asks for it.
pub struct RoutingView<'a> {
    msg: &'a Message,
    /// The body as JSON text (see [`RoutingView::text`]).
    text: std::cell::OnceCell<Option<Cow<'a, str>>>,
    /// The body parsed, for twin change notifications and `$body` paths with wildcards.
    value: std::cell::OnceCell<Option<serde_json::Value>>,
}

impl<'a> RoutingView<'a> {
    pub fn new(msg: &'a Message) -> Self {
        Self {
            msg,
            text: std::cell::OnceCell::new(),
            value: std::cell::OnceCell::new(),
        }
    }

    /// The body as text when edgeHub's gate lets conditions query it: content type
    /// `application/json` and encoding `utf-8`, `utf-16` or `utf-32` (little-endian), both
    /// ignoring case; leading byte order marks removed. UTF-8, the usual case, is borrowed.
    fn text(&self) -> Option<&str> {
        let text = self.text.get_or_init(|| {
            let p = self.msg.properties.as_ref()?;
            let ct = &p.content_type.as_ref()?.0;
            let ce = &p.content_encoding.as_ref()?.0;
            if !ct.eq_ignore_ascii_case("application/json") {
                return None;
            }
            if ce.eq_ignore_ascii_case("utf-8") {
                std::str::from_utf8(&self.msg.body).ok().map(Cow::Borrowed)
            } else if ce.eq_ignore_ascii_case("utf-16") {
                utf16le(&self.msg.body).map(Cow::Owned)
            } else if ce.eq_ignore_ascii_case("utf-32") {
                utf32le(&self.msg.body).map(Cow::Owned)
            } else {
                None
            }
        });
        text.as_deref().map(|t| t.trim_start_matches('\u{feff}'))
    }

    fn parsed_body(&self) -> Option<&serde_json::Value> {
        self.value
            .get_or_init(|| serde_json::from_str(self.text()?).ok())
            .as_ref()
    }
}

fn utf16le(b: &[u8]) -> Option<String> {
    if b.len() % 2 != 0 {
        return None;
    }
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).ok()
}

fn utf32le(b: &[u8]) -> Option<String> {
    if b.len() % 4 != 0 {
        return None;
    }
    b.chunks_exact(4)
        .map(|c| char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect()
}

impl MessageView for RoutingView<'_> {
    fn app_property(&self, name: &str) -> Option<crate::routing::condition::Value> {
        use crate::routing::condition::Value as V;
        self.msg
            .application_properties
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| match v {
                SimpleValue::String(s) => V::String(s.clone()),
                SimpleValue::Symbol(s) => V::String(s.0.clone()),
                // edgeHub keeps only string application properties; others read as null.
                _ => V::Null,
            })
    }

    fn system_property(&self, name: &str) -> Option<crate::routing::condition::Value> {
        use crate::routing::condition::Value as V;
        let p = self.msg.properties.as_ref();
        let s = |v: Option<String>| v.map(V::String);
        const NAMES: &[&str] = &[
            "messageid",
            "correlationid",
            "cid",
            "userid",
            "to",
            "contenttype",
            "contentencoding",
            "connectiondeviceid",
            "connectionmoduleid",
            "outputname",
            "enqueuedtime",
            "messageschema",
            "creationtime",
        ];
        let canonical = NAMES.iter().find(|n| n.eq_ignore_ascii_case(name))?;
        match *canonical {
            "messageid" => s(p.and_then(|p| p.message_id.as_ref()).map(message_id_text)),
            "correlationid" | "cid" => s(p
                .and_then(|p| p.correlation_id.as_ref())
                .map(message_id_text)),
            "userid" => s(p
                .and_then(|p| p.user_id.as_ref())
                .map(|u| String::from_utf8_lossy(u.as_slice()).into_owned())),
            "to" => s(p.and_then(|p| p.to.clone())),
            "contenttype" => s(p.and_then(|p| p.content_type.as_ref()).map(|c| c.0.clone())),
            "contentencoding" => s(p
                .and_then(|p| p.content_encoding.as_ref())
                .map(|c| c.0.clone())),
            "connectiondeviceid" => s(Some(self.msg.from.device().to_string())),
            "connectionmoduleid" => s(self.msg.from.module().map(|m| m.to_string())),
            "outputname" => s(self.msg.output.clone()),
            "enqueuedtime" => {
                let ms = self.msg.enqueued_ms;
                let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
                s(Some(crate::model::time::rfc3339(t)))
            }
            "messageschema" => self.app_property("iothub-message-schema"),
            "creationtime" => self.app_property("iothub-creation-time-utc"),
            _ => None,
        }
    }

    fn body_json(&self) -> Option<&serde_json::Value> {
        self.parsed_body()
    }

    fn body_text(&self) -> Option<&str> {
        self.text()
    }

    fn system_property_ref(&self, name: &str) -> Option<crate::routing::condition::Prop<'_>> {
        use crate::routing::condition::Prop;
        use std::borrow::Cow::Borrowed;
        // The common ones without a copy; the rest through `system_property`.
        let p = self.msg.properties.as_ref();
        fn lent(s: Option<&str>) -> Option<Prop<'_>> {
            s.map(|s| Prop::Str(Borrowed(s)))
        }
        if name.eq_ignore_ascii_case("connectionModuleId") {
            return lent(self.msg.from.module().map(|m| m.as_str()));
        }
        if name.eq_ignore_ascii_case("connectionDeviceId") {
            return lent(Some(self.msg.from.device().as_str()));
        }
        if name.eq_ignore_ascii_case("outputName") {
            return lent(self.msg.output.as_deref());
        }
        if name.eq_ignore_ascii_case("contentType") {
            return lent(
                p.and_then(|p| p.content_type.as_ref())
                    .map(|c| c.0.as_str()),
            );
        }
        if name.eq_ignore_ascii_case("contentEncoding") {
            return lent(
                p.and_then(|p| p.content_encoding.as_ref())
                    .map(|c| c.0.as_str()),
            );
        }
        self.system_property(name).map(Prop::from)
    }

    fn app_property_ref(&self, name: &str) -> Option<crate::routing::condition::Prop<'_>> {
        use crate::routing::condition::Prop;
        self.msg
            .application_properties
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| match v {
                SimpleValue::String(s) => Prop::Str(std::borrow::Cow::Borrowed(s.as_str())),
                SimpleValue::Symbol(s) => Prop::Str(std::borrow::Cow::Borrowed(s.0.as_str())),
                _ => Prop::NotString,
            })
    }

    fn twin_change(&self) -> Option<&serde_json::Value> {
        if self.msg.twin_change {
            self.parsed_body()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::identity::{DeviceId, Identity, ModuleId};
    use fe2o3_amqp::types::{messaging::Properties, primitives::Symbol};
    use serde_amqp::primitives::OrderedMap;

    fn module(m: &str) -> Identity {
        Identity::Module(DeviceId::parse("d1").unwrap(), ModuleId::parse(m).unwrap())
    }

    #[test]
    fn routing_view_offers_the_body_text_its_json_comes_from() {
        use crate::routing::condition::{ConditionSet, MessageView, Value as C};
        let with = |content_type: &str, encoding: &str, body: Vec<u8>| Message {
            body,
            properties: Some(Properties {
                content_type: Some(Symbol::from(content_type)),
                content_encoding: Some(Symbol::from(encoding)),
                ..Default::default()
            }),
            application_properties: OrderedMap::new(),
            annotations: OrderedMap::new(),
            from: module("a"),
            output: None,
            enqueued_ms: 0,
            twin_change: false,
            id: 1,
        };
        let text = "\u{feff}{\"t\": 5, \"s\": \"é\", \"o\": {\"k\": 5}}";
        let utf16: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let conditions = [
            crate::routing::condition::Condition::parse("$body.t = 5 AND $body.s = 'é'").unwrap(),
            crate::routing::condition::Condition::parse("$body.o.* = 5").unwrap(),
        ];
        let set = ConditionSet::new(&conditions.iter().collect::<Vec<_>>());
        for (m, readable) in [
            (
                with("application/json", "utf-8", text.as_bytes().to_vec()),
                true,
            ),
            (with("Application/JSON", "UTF-16", utf16), true),
            (with("text/plain", "utf-8", text.as_bytes().to_vec()), false),
            (
                with("application/json", "latin-1", text.as_bytes().to_vec()),
                false,
            ),
        ] {
            let view = RoutingView::new(&m);
            assert_eq!(view.body_text(), readable.then_some(&text[3..]));
            let parsed = view.body_text().map(|t| serde_json::from_str(t).unwrap());
            assert_eq!(view.body_json(), parsed.as_ref());
            let want = if readable {
                C::Bool(true)
            } else {
                C::Undefined
            };
            let slots = set.slots(&view);
            for (i, c) in conditions.iter().enumerate() {
                assert_eq!(set.evaluate(i, &slots), want, "{c:?}");
                assert_eq!(c.evaluate(&RoutingView::new(&m)), want, "{c:?}");
            }
        }
    }
}
