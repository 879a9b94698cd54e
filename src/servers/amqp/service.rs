//! The service side of AMQP, as `azure-iothub`'s `Client` uses it: C2D messages sent on
//! `/messages/devicebound` and feedback records read from `/messages/servicebound/feedback`.
//! A connection reaches these links once it has put a service token on `$cbs` (a
//! `servicePolicies` policy, see `ConnState::authorize_service`).
//!
//! A C2D message is accepted once it is durable in its device's queue; refusals are IoT
//! Hub's: `amqp:not-found` for a device this hub does not serve, `amqp:resource-limit-exceeded`
//! for a full queue (`DeviceMaximumQueueDepthExceededError` in the Node SDK),
//! `amqp:link:message-size-exceeded` past 64 KiB, `amqp:invalid-field` without a
//! `to` naming a device.

use std::sync::Arc;

use fe2o3_amqp::{
    link::{delivery::DeliveryInfo, Receiver, Sender},
    types::{
        definitions::{AmqpError, Error as AmqpErrorBody},
        messaging::{
            annotations::OwnedKey, Body, Data, Message as AmqpMessage, MessageAnnotations,
        },
        primitives::{Binary, Symbol, Value},
    },
    Sendable,
};
use serde_amqp::primitives::OrderedMap;
use tracing::debug;

use super::{
    amqp_error, clip, convert, custom_condition,
    links::{bounded, close_sender, end_receiver, next_delivery, LinkStop},
    ConnState,
};
use crate::{
    core::{
        c2d::{self, SendError, Source},
        delivery, HubCore,
    },
    metrics as m,
    model::address::c2d_target,
    model::identity::Identity,
    model::message::{Message, ENQUEUED_TIME},
    model::sas::now_secs,
    store::queue::{Endpoint, Queued},
};

/// Receives the service's C2D messages: each is queued for its device and accepted once the
/// store has made it durable, or rejected with IoT Hub's condition.
pub(super) async fn c2d_sends(
    mut rx: Receiver,
    conn: Arc<ConnState>,
    core: Arc<HubCore>,
    cancel: LinkStop,
) {
    loop {
        let delivery = match next_delivery(&mut rx, &cancel).await {
            Ok(d) => d,
            Err(end) => return end_receiver(rx, &cancel, end).await,
        };
        if !conn.is_service(now_secs()) {
            let why = "the service token has expired";
            bounded(rx.close_with_error(amqp_error(AmqpError::UnauthorizedAccess, why))).await;
            return;
        }
        let info = DeliveryInfo::from(&delivery);
        let queued = match queue(&core, delivery.into_message()) {
            Ok(()) => core
                .sync()
                .await
                .map_err(|e| amqp_error(AmqpError::InternalError, e.to_string())),
            Err(e) => Err(e),
        };
        match queued {
            Ok(()) => {
                let _ = rx.accept(info).await;
            }
            Err(e) => {
                debug!(reason = ?e.description, "C2D message refused");
                let _ = rx.reject(info, e).await;
            }
        }
    }
}

/// Queues one service message for the device its `to` names.
fn queue(core: &HubCore, amqp: AmqpMessage<Body<Value>>) -> Result<(), AmqpErrorBody> {
    let to = amqp.properties.as_ref().and_then(|p| p.to.clone());
    let Some(device) = to.as_deref().and_then(c2d_target) else {
        m::c2d_refused("invalid");
        let why = format!(
            "'to' must be /devices/{{deviceId}}/messages/devicebound, not {:?}",
            clip(to.as_deref().unwrap_or_default())
        );
        return Err(amqp_error(AmqpError::InvalidField, why));
    };
    // Identities are looked up through the authenticator, which knows every device this hub
    // serves; a module (or this hub's own modules' device) is not a C2D target.
    let Some(Identity::Device(device)) = core.auth.known(&Identity::Device(device.clone())) else {
        m::c2d_refused("device_not_found");
        let e = SendError::DeviceNotFound(device.to_string());
        return Err(amqp_error(AmqpError::NotFound, e.to_string()));
    };
    let msg = Message::from_amqp(amqp, Identity::Device(device.clone())).map_err(|e| {
        m::c2d_refused("invalid");
        amqp_error(AmqpError::DecodeError, e.to_string())
    })?;
    core.c2d
        .enqueue(&device, msg, Source::Service)
        .map_err(|e| {
            let (reason, condition): (_, fe2o3_amqp::types::definitions::ErrorCondition) = match &e
            {
                SendError::DeviceNotFound(_) => ("device_not_found", AmqpError::NotFound.into()),
                SendError::QueueFull(_) => ("queue_full", AmqpError::ResourceLimitExceeded.into()),
                SendError::TooLarge(_) => (
                    "too_large",
                    custom_condition("amqp:link:message-size-exceeded"),
                ),
                SendError::Store(_) => ("storage", AmqpError::ResourceLimitExceeded.into()),
            };
            m::c2d_refused(reason);
            amqp_error(condition, e.to_string())
        })
        .map(|_| ())
}

/// Sends feedback messages to the service through the core's delivery pump: unsettled, a
/// 16-byte tag; accepted or rejected removes one, released puts it back.
pub(super) async fn feedback(tx: Sender, core: Arc<HubCore>, cancel: LinkStop) {
    let feed = FeedbackFeed(core.c2d.feedback_endpoint().clone());
    let user_id = c2d::feedback_user_id(&core.settings.iothub_hostname);
    let link = FeedbackLink {
        tx: Some(tx),
        cancel: cancel.clone(),
        user_id,
    };
    let window = delivery::Window {
        messages: core.settings.limits.delivery_window.min(100),
        bytes: core.settings.limits.max_unsettled_bytes_per_link,
    };
    delivery::pump(feed, link, window, &cancel).await;
}

/// The feedback queue as the pump's feed.
struct FeedbackFeed(Arc<Endpoint>);

impl delivery::Feed for FeedbackFeed {
    fn refresh(&mut self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.0.ready.clone())
    }

    fn next(&mut self) -> Option<(Arc<Endpoint>, Queued)> {
        self.0.pop().map(|q| (self.0.clone(), q))
    }
}

struct FeedbackLink {
    tx: Option<Sender>,
    cancel: LinkStop,
    user_id: Binary,
}

impl delivery::Link for FeedbackLink {
    async fn send(
        &mut self,
        _ep: &Endpoint,
        q: &Queued,
        _key: u64,
    ) -> Result<delivery::Sent, String> {
        let tx = self.tx.as_mut().ok_or("the feedback link is closed")?;
        let amqp = feedback_message(&q.msg, &self.user_id);
        let sendable = Sendable::builder().message(amqp).settled(false).build();
        match tx.send_batchable(sendable).await {
            Ok(fut) => Ok(delivery::Sent::InFlight(Box::pin(async move {
                fut.await
                    .map(convert::outcome)
                    .map_err(|e| format!("{e:?}"))
            }))),
            Err(e) => Err(format!("{e:?}")),
        }
    }

    async fn detached(&mut self) {
        match self.tx.as_mut() {
            Some(tx) => {
                tx.on_detach().await;
            }
            None => std::future::pending().await,
        }
    }

    fn settled(
        &mut self,
        _ep: &Endpoint,
        _q: &Queued,
        outcome: &Result<delivery::Outcome, String>,
        _sent: std::time::Instant,
    ) {
        if let Err(e) = outcome {
            debug!(error = %e, "feedback delivery failed");
        }
    }

    async fn close(&mut self, _why: &delivery::Ended) {
        if let Some(tx) = self.tx.take() {
            close_sender(tx, &self.cancel).await;
        }
    }
}

/// A feedback message as IoT Hub sends it: its properties (message id, content type), the
/// hub's name as `user-id`, `iothub-enqueuedtime`, the JSON array in one data section.
fn feedback_message(msg: &Message, user_id: &Binary) -> AmqpMessage<Body<Value>> {
    let mut properties = msg.properties.clone().unwrap_or_default();
    properties.user_id = Some(user_id.clone());
    let mut ann = OrderedMap::new();
    ann.insert(
        OwnedKey::Symbol(Symbol::from(ENQUEUED_TIME)),
        Value::Timestamp(c2d::enqueued_timestamp(msg)),
    );
    AmqpMessage {
        header: None,
        delivery_annotations: None,
        message_annotations: Some(MessageAnnotations(ann)),
        properties: Some(properties),
        application_properties: None,
        body: Body::Data(vec![Data(Binary::from(msg.body.clone()))].into()),
        footer: None,
    }
}
