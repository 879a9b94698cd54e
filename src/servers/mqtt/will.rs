//! A CONNECT's will, as IoT Hub handles it: it must be a telemetry topic of the client's own
//! identity (else CONNACK 5), and when the connection ends without a DISCONNECT it is routed as a
//! telemetry message of the client with the application property `iothub-MessageType: Will`, made
//! durable like any message.

use std::sync::Arc;

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, LastWill};
use tracing::{debug, warn};

use super::{
    convert::message_from_publish,
    session::{owns, refuse, Refusal},
    topic::{self, ClientTopic},
};
use crate::{
    core::{ingest::ingest, HubCore},
    metrics as m,
    model::{clip, identity::Identity},
};

/// A CONNECT's will, checked: sent as telemetry of the client when its connection ends without
/// a DISCONNECT.
pub(super) struct Will {
    bag: Vec<topic::BagEntry>,
    payload: Bytes,
    retain: bool,
}

/// The application property that marks a will message, as IoT Hub names it.
pub(crate) const WILL_PROPERTY: &str = "iothub-MessageType";

impl Will {
    /// The will of `id`'s CONNECT, if its topic is a telemetry topic of `id` with a property
    /// bag that decodes.
    pub(super) fn check(id: &Identity, will: &LastWill) -> Result<Self, Refusal> {
        let bad = |why: String| refuse(ConnectReturnCode::NotAuthorized, "bad_will", why);
        let bag = match topic::parse_client_topic(&will.topic) {
            Ok(ClientTopic::Telemetry {
                device,
                module,
                bag,
            }) if owns(id, device, module) => topic::decode_bag(bag)
                .map_err(|e| bad(format!("the will topic's property bag: {e}")))?,
            _ => {
                return Err(bad(format!(
                    "the will topic {} is not a telemetry topic of {id}",
                    clip(&will.topic)
                )))
            }
        };
        Ok(Self {
            bag,
            payload: will.message.clone(),
            retain: will.retain,
        })
    }

    /// Routes the will as the client's telemetry and makes it durable; a will that cannot be
    /// queued is logged (nobody is left to tell).
    pub(super) async fn send(self, core: &Arc<HubCore>, id: &Identity, max_message: usize) {
        let mut msg = message_from_publish(
            id.clone(),
            self.bag,
            self.payload.to_vec(),
            self.retain,
            false,
        );
        msg.application_properties.insert(
            WILL_PROPERTY.to_owned(),
            fe2o3_amqp::types::primitives::SimpleValue::String("Will".into()),
        );
        if msg.size() > max_message {
            warn!(identity = %id, size = msg.size(), "will message over the size limit; dropped");
            m::mqtt_refused(&id.to_string(), "too_large");
            return;
        }
        m::ReceivedCache::default().record(&msg);
        let queued = match ingest(core, &Arc::new(msg)).await {
            Ok(()) => core.sync().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match queued {
            Ok(()) => debug!(identity = %id, "will message sent"),
            Err(e) => warn!(identity = %id, "will message not queued: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::identity::DeviceId;
    use rumqttc::mqttbytes::QoS;

    #[test]
    fn a_will_must_be_telemetry_of_the_clients_own_identity() {
        let leaf = Identity::Device(DeviceId::parse("leaf1").unwrap());
        let will = |topic: &str| LastWill::new(topic, b"gone".to_vec(), QoS::AtLeastOnce, false);
        let ok = Will::check(&leaf, &will("devices/leaf1/messages/events/state=lost")).unwrap();
        assert_eq!(ok.bag, vec![("state".to_owned(), Some("lost".to_owned()))]);
        assert!(Will::check(&leaf, &will("devices/LEAF1/messages/events/")).is_ok());
        for topic in [
            "devices/leaf2/messages/events/",
            "devices/leaf1/modules/m/messages/events/",
            "$iothub/twin/GET/?$rid=1",
            "devices/leaf1/messages/devicebound/",
            "devices/leaf1/messages/events/a=1&",
        ] {
            let r = Will::check(&leaf, &will(topic)).err().unwrap();
            assert_eq!(
                (r.code, r.reason),
                (ConnectReturnCode::NotAuthorized, "bad_will"),
                "{topic}"
            );
        }
    }
}
