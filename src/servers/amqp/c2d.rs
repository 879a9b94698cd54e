//! A device's C2D link (`/devices/{d}/messages/devicebound`, the hub sends): the core's
//! delivery pump over the device's C2D queue (`core::c2d`). Each message goes unsettled with a
//! 16-byte tag (`tags::WideTags`); the device's accepted, rejected and released outcomes are
//! complete, reject and abandon. A newer C2D link of the device (AMQP or MQTT) replaces this
//! one.

use std::sync::Arc;

use fe2o3_amqp::{link::Sender, Sendable};
use tracing::debug;

use super::{amqp_error, convert, custom_condition, links::LinkStop};
use crate::{
    core::{
        c2d::{DeviceFeed, DeviceQueue, MAX_QUEUED},
        delivery, HubCore,
    },
    model::identity::Identity,
    store::queue::{Endpoint, Queued},
};

pub(super) async fn device_link(tx: Sender, id: Identity, core: Arc<HubCore>, cancel: LinkStop) {
    let queue = core.c2d.queue(id.device());
    core.c2d.replace_link(&queue, cancel.token.clone());
    let feed = DeviceFeed::new(core.c2d.clone(), queue.clone());
    let link = C2dLink {
        tx: Some(tx),
        queue,
        core: core.clone(),
        cancel: cancel.clone(),
    };
    let limits = &core.settings.limits;
    let window = delivery::Window {
        messages: limits.delivery_window.min(MAX_QUEUED),
        bytes: limits.max_unsettled_bytes_per_link,
    };
    delivery::pump(feed, link, window, &cancel).await;
}

/// A device's C2D link as the delivery pump's [`delivery::Link`].
struct C2dLink {
    /// Taken when the link is closed.
    tx: Option<Sender>,
    queue: Arc<DeviceQueue>,
    core: Arc<HubCore>,
    cancel: LinkStop,
}

impl delivery::Link for C2dLink {
    async fn send(
        &mut self,
        _ep: &Endpoint,
        q: &Queued,
        _key: u64,
    ) -> Result<delivery::Sent, String> {
        let tx = self.tx.as_mut().ok_or("the C2D link is closed")?;
        let amqp = q.msg.to_c2d_message(q.seq, q.delivery_count);
        let sendable = Sendable::builder().message(amqp).settled(false).build();
        match tx.send_batchable(sendable).await {
            Ok(fut) => Ok(delivery::Sent::InFlight(Box::pin(async move {
                fut.await
                    .map(convert::outcome)
                    .map_err(|e| format!("{e:?}"))
            }))),
            Err(e) => {
                debug!(error = ?e, "C2D link send failed");
                Err(format!("{e:?}"))
            }
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
        q: &Queued,
        outcome: &Result<delivery::Outcome, String>,
        _sent: std::time::Instant,
    ) {
        if let Err(e) = outcome {
            debug!(error = %e, "C2D delivery failed");
        }
        self.core.c2d.settled(&self.queue, q, outcome);
    }

    async fn close(&mut self, why: &delivery::Ended) {
        let Some(tx) = self.tx.take() else { return };
        if *why == delivery::Ended::Stalled {
            let why = "the device granted no credit";
            let _ = tx
                .close_with_error(amqp_error(custom_condition("com.microsoft:timeout"), why))
                .await;
        } else {
            super::links::close_sender(tx, &self.cancel).await;
        }
    }
}
