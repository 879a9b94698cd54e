//! A leaf device's C2D link to the parent, held on the device's behalf: each message the
//! parent sends is stored in the device's C2D queue (`core::c2d`) and left unsettled upstream
//! until the device settles it here; its outcome then goes back as the parent expects
//! (complete = accepted, reject = rejected, abandon = released). A message that cannot be
//! queued (the device's queue is full) is released, so the parent keeps it.

use std::{collections::HashMap, sync::Arc};

use fe2o3_amqp::{
    link::{delivery::DeliveryInfo, receiver::CreditMode, Receiver},
    session::SessionHandle,
    types::{definitions::AmqpError, messaging::Body, primitives::Value},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    core::{
        c2d::{FromParent, ParentOutcome, SendError, MAX_QUEUED},
        delivery::Outcome,
        HubCore,
    },
    model::identity::{DeviceId, Identity},
    model::message::Message,
    servers::amqp::amqp_error,
};

use super::UpstreamError;

/// Attaches the C2D receiver of the identity at `path` (`/devices/{d}`), with the C# SDK's
/// casing, as edgeHub does; credit for one device queue's worth.
pub(super) async fn attach(
    session: &mut SessionHandle<()>,
    base: &str,
    path: &str,
    chain: &str,
) -> Result<Receiver, fe2o3_amqp::link::ReceiverAttachError> {
    let name = format!("c2d-receiver-{}", uuid::Uuid::new_v4());
    Receiver::builder()
        .name(name.clone())
        .source(format!("{base}{path}/messages/deviceBound"))
        .target(name)
        .properties(super::link_properties_for(None, chain))
        .credit_mode(CreditMode::Auto(MAX_QUEUED as u32))
        .attach(session)
        .await
}

/// Receives the parent's C2D messages for `device` until `dead` or a link error.
pub(super) async fn receive(
    core: Arc<HubCore>,
    device: DeviceId,
    rx: Receiver,
    dead: CancellationToken,
) -> Result<(), UpstreamError> {
    let mut outcomes = Outcomes {
        rx: core.c2d.attach_upstream(&device),
        applying: None,
        core: &core,
        device: &device,
    };
    serve(&core, &device, rx, &dead, &mut outcomes).await
}

/// The device's outcomes for this link. Whatever it has not applied when the task ends
/// (returned, or dropped: aborted at shutdown, panicked) is kept for the parent's redelivery,
/// so no message stays known here with its outcome lost.
struct Outcomes<'a> {
    rx: mpsc::Receiver<ParentOutcome>,
    /// Taken off the channel, its delivery upstream being settled.
    applying: Option<ParentOutcome>,
    core: &'a HubCore,
    device: &'a DeviceId,
}

impl Drop for Outcomes<'_> {
    fn drop(&mut self) {
        if let Some(o) = self.applying.take() {
            self.core.c2d.keep_outcome(self.device, o);
        }
        self.core.c2d.detach_upstream(self.device, &mut self.rx);
    }
}

async fn serve(
    core: &Arc<HubCore>,
    device: &DeviceId,
    mut rx: Receiver,
    dead: &CancellationToken,
    outcomes: &mut Outcomes<'_>,
) -> Result<(), UpstreamError> {
    let what = || format!("the C2D link of {device}");
    let failed = |e: &dyn std::fmt::Display| UpstreamError::Link {
        what: what(),
        reason: e.to_string(),
    };
    // The parent's deliveries waiting for the device's outcome, by message id.
    let mut unsettled: HashMap<String, DeliveryInfo> = HashMap::new();
    loop {
        tokio::select! {
            _ = dead.cancelled() => return Ok(()),
            Some(o) = outcomes.rx.recv() => {
                match unsettled.remove(&o.message_id) {
                    Some(info) => {
                        let o = &*outcomes.applying.insert(o);
                        let settled = settle(&rx, info, o).await;
                        // Applied: the guard has nothing left to keep of it.
                        if let Some(o) = outcomes.applying.take() {
                            match settled {
                                Ok(()) => core.c2d.parent_settled(device, &o),
                                Err(e) => {
                                    core.c2d.keep_outcome(device, o);
                                    return Err(failed(&e));
                                }
                            }
                        }
                    }
                    // Its delivery was settled by an abandon; the redelivery takes the outcome.
                    None => core.c2d.keep_outcome(device, o),
                }
            }
            d = rx.recv::<Body<Value>>() => {
                let d = d.map_err(|e| failed(&e))?;
                let info = DeliveryInfo::from(&d);
                let msg = match Message::from_amqp(d.into_message(), Identity::Device(device.clone())) {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(%device, "a C2D message from the parent does not decode; rejected: {e}");
                        let error = amqp_error(AmqpError::DecodeError, e.to_string());
                        rx.reject(info, error).await.map_err(|e| failed(&e))?;
                        continue;
                    }
                };
                match core.c2d.enqueue_from_parent(device, msg) {
                    Ok(FromParent::Queued(mid)) => {
                        if let Err(e) = core.sync().await {
                            warn!(%device, "a C2D message from the parent could not be stored; released: {e}");
                            rx.release(info).await.map_err(|e| failed(&e))?;
                            continue;
                        }
                        match mid {
                            Some(mid) => {
                                unsettled.insert(mid, info);
                            }
                            // Without a message id its outcome cannot come back: taken now.
                            None => rx.accept(info).await.map_err(|e| failed(&e))?,
                        }
                    }
                    Ok(FromParent::Known(mid)) => {
                        unsettled.insert(mid, info);
                    }
                    Ok(FromParent::Settled(outcome)) => {
                        let o = ParentOutcome { message_id: String::new(), outcome };
                        settle(&rx, info, &o).await.map_err(|e| failed(&e))?;
                    }
                    Err(SendError::TooLarge(n)) => {
                        let why = format!("a C2D message of {n} bytes is over the limit");
                        let error = amqp_error(
                            crate::servers::amqp::custom_condition("amqp:link:message-size-exceeded"),
                            why,
                        );
                        rx.reject(info, error).await.map_err(|e| failed(&e))?;
                    }
                    Err(e) => {
                        debug!(%device, "a C2D message from the parent not queued ({e}); released");
                        rx.release(info).await.map_err(|e| failed(&e))?;
                    }
                }
            }
        }
    }
}

async fn settle(rx: &Receiver, info: DeliveryInfo, o: &ParentOutcome) -> Result<(), String> {
    let r = match &o.outcome {
        Outcome::Accepted => rx.accept(info).await,
        Outcome::Rejected(_) => rx.reject(info, None).await,
        Outcome::Released => rx.release(info).await,
    };
    r.map_err(|e| format!("settling a C2D message with the parent: {e}"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fe2o3_amqp::types::messaging::{MessageId, Properties};
    use serde_amqp::primitives::OrderedMap;
    use tokio::sync::oneshot;

    use super::*;

    fn test_core() -> Arc<HubCore> {
        let text = r#"{"deviceId": "edge1", "iothubHostname": "hub.azure-devices.net",
            "gatewayHostname": "gw.local", "listen": {"amqps": "127.0.0.1:0"},
            "dataDir": "/nonexistent",
            "devices": {"leaf1": {"primaryKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}},
            "$edgeHub": {"schemaVersion": "1.0", "routes": {}}}"#;
        Arc::new(HubCore::for_tests(text))
    }

    fn from_parent(device: &DeviceId, id: &str) -> Message {
        Message {
            body: b"x".to_vec(),
            properties: Some(Properties {
                message_id: Some(MessageId::String(id.into())),
                ..Default::default()
            }),
            application_properties: OrderedMap::new(),
            annotations: OrderedMap::new(),
            from: Identity::Device(device.clone()),
            output: None,
            enqueued_ms: crate::model::message::now_ms(),
            twin_change: false,
            id: crate::model::message::next_id(),
        }
    }

    #[tokio::test]
    async fn an_outcome_being_applied_when_the_link_task_is_dropped_is_kept() {
        let core = test_core();
        let device = DeviceId::parse("leaf1").unwrap();
        let (ready_tx, ready) = oneshot::channel();
        let (applying_tx, applying) = oneshot::channel();
        let (c, d) = (core.clone(), device.clone());
        // A link task that takes the outcome off its channel and is dropped (aborted at
        // shutdown) while it settles it upstream.
        let task = tokio::spawn(async move {
            let mut outcomes = Outcomes {
                rx: c.c2d.attach_upstream(&d),
                applying: None,
                core: &c,
                device: &d,
            };
            let _ = ready_tx.send(());
            let o = outcomes.rx.recv().await;
            outcomes.applying = o;
            let _ = applying_tx.send(());
            std::future::pending::<()>().await;
        });
        let wait = Duration::from_secs(10);
        tokio::time::timeout(wait, ready).await.unwrap().unwrap();
        let queued = core
            .c2d
            .enqueue_from_parent(&device, from_parent(&device, "m1"));
        assert_eq!(queued, Ok(FromParent::Queued(Some("m1".into()))));
        let queue = core.c2d.queue(&device);
        let q = queue.endpoint.pop().unwrap();
        queue.endpoint.ack(q.seq);
        core.c2d.settled(&queue, &q, &Ok(Outcome::Accepted));
        tokio::time::timeout(wait, applying).await.unwrap().unwrap();
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        // The parent's redelivery on the next link is settled with the device's outcome.
        let again = core
            .c2d
            .enqueue_from_parent(&device, from_parent(&device, "m1"));
        assert_eq!(again, Ok(FromParent::Settled(Outcome::Accepted)));
        assert!(queue.endpoint.pop().is_none());
    }
}
