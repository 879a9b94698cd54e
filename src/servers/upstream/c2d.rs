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
    let mut outcomes = core.c2d.attach_upstream(&device);
    let served = serve(&core, &device, rx, &dead, &mut outcomes).await;
    // Outcomes this link will not apply now: kept for the parent's redelivery.
    core.c2d.detach_upstream(&device, outcomes);
    served
}

async fn serve(
    core: &Arc<HubCore>,
    device: &DeviceId,
    mut rx: Receiver,
    dead: &CancellationToken,
    outcomes: &mut mpsc::Receiver<ParentOutcome>,
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
            Some(o) = outcomes.recv() => {
                match unsettled.remove(&o.message_id) {
                    Some(info) => match settle(&rx, info, &o).await {
                        Ok(()) => core.c2d.parent_settled(device, &o),
                        Err(e) => {
                            core.c2d.keep_outcome(device, o);
                            return Err(failed(&e));
                        }
                    },
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
