//! Module inputs and C2D messages for an MQTT session: the core's delivery pump
//! ([`delivery::pump`]) runs with an [`InputLink`] (or a [`C2dLink`]) that hands each message to
//! the session task, which owns the connection's writer and packet ids and publishes it; the
//! module's PUBACK (at QoS 0, the write) is the message's outcome.

use std::{collections::HashMap, sync::Arc};

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{
    convert::{c2d_bag, input_bag},
    topic,
};
use crate::{
    core::{delivery, HubCore},
    metrics as m,
    model::identity::{DeviceId, ModuleId},
    store::queue::{Endpoint, Queued},
};

/// Room for input PUBLISHes between the delivery pump and the session (the pump's window bounds
/// what is in flight).
pub(super) const INPUT_QUEUE: usize = 64;

/// One message of the module's inputs for the session to publish.
pub(super) struct InputPublish {
    pub(super) topic: String,
    pub(super) payload: Bytes,
    /// Delivered before: the PUBLISH's DUP flag at QoS 1.
    pub(super) dup: bool,
    /// The outcome: accepted on the module's PUBACK (QoS 1), or once written (QoS 0). Dropped
    /// when the session ends or the module unsubscribes: the message goes back to its queue.
    pub(super) done: oneshot::Sender<delivery::Outcome>,
}

/// A module's inputs as the core's delivery pump sees them ([`delivery::Link`]): each message
/// goes to the session task, which owns the connection's writer and packet ids.
pub(super) struct InputLink {
    pub(super) out: mpsc::Sender<InputPublish>,
    pub(super) device: DeviceId,
    pub(super) module: ModuleId,
    pub(super) sent: m::SentCache,
}

impl delivery::Link for InputLink {
    async fn send(&mut self, ep: &Endpoint, q: &Queued) -> Result<delivery::Sent, String> {
        let input = ep.input.as_deref().unwrap_or_default();
        let topic = topic::input_topic(
            self.device.as_str(),
            self.module.as_str(),
            input,
            &input_bag(&q.msg),
        );
        publish(&self.out, topic, q, "module").await
    }

    async fn detached(&mut self) {
        self.out.closed().await;
    }

    fn settled(
        &mut self,
        ep: &Endpoint,
        q: &Queued,
        outcome: &Result<delivery::Outcome, String>,
        sent: std::time::Instant,
    ) {
        match outcome {
            Ok(delivery::Outcome::Accepted) => {
                let input = ep.input.as_deref().unwrap_or_default();
                let secs = sent.elapsed().as_secs_f64();
                self.sent
                    .record(&q.msg, self.module.as_str(), input, q.priority, secs);
            }
            Ok(_) => {}
            Err(e) => debug!(error = %e, "MQTT input delivery not acknowledged"),
        }
    }

    async fn close(&mut self, _why: &delivery::Ended) {}
}

/// Hands `q` to the session as a PUBLISH on `topic`; in flight until `who` (the module or the
/// device) sends its PUBACK.
async fn publish(
    out: &mpsc::Sender<InputPublish>,
    topic: String,
    q: &Queued,
    who: &'static str,
) -> Result<delivery::Sent, String> {
    let (done, outcome) = oneshot::channel();
    let publish = InputPublish {
        topic,
        payload: Bytes::from(q.msg.body.clone()),
        dup: q.delivery_count > 0,
        done,
    };
    out.send(publish)
        .await
        .map_err(|_| "the MQTT session ended".to_owned())?;
    Ok(delivery::Sent::InFlight(Box::pin(async move {
        outcome
            .await
            .map_err(|_| format!("the MQTT session ended before the {who} acknowledged"))
    })))
}

/// A device's C2D queue as the delivery pump sees it: like [`InputLink`], on
/// `devices/{d}/messages/devicebound/{bag}`; the PUBACK completes the message (MQTT has no
/// abandon or reject).
pub(super) struct C2dLink {
    pub(super) out: mpsc::Sender<InputPublish>,
    pub(super) core: Arc<HubCore>,
    pub(super) queue: Arc<crate::core::c2d::DeviceQueue>,
}

impl delivery::Link for C2dLink {
    async fn send(&mut self, _ep: &Endpoint, q: &Queued) -> Result<delivery::Sent, String> {
        let topic = topic::c2d_topic(self.queue.device.as_str(), &c2d_bag(&q.msg));
        publish(&self.out, topic, q, "device").await
    }

    async fn detached(&mut self) {
        self.out.closed().await;
    }

    fn settled(
        &mut self,
        _ep: &Endpoint,
        q: &Queued,
        outcome: &Result<delivery::Outcome, String>,
        _sent: std::time::Instant,
    ) {
        self.core.c2d.settled(&self.queue, q, outcome);
    }

    async fn close(&mut self, _why: &delivery::Ended) {}
}

/// The delivery pump of a subscribed module's inputs (or a device's C2D messages), as the
/// session holds it.
pub(super) struct Inputs {
    pub(super) qos: QoS,
    /// Stops the pump: unsubscribed, the session ended, or a newer input link or session of
    /// this module took over ([`HubCore::replace_input_link`]).
    pub(super) stop: CancellationToken,
    pub(super) rx: mpsc::Receiver<InputPublish>,
    /// QoS 1 PUBLISHes awaiting the module's PUBACK, by packet id.
    pub(super) awaiting: HashMap<u16, oneshot::Sender<delivery::Outcome>>,
    pub(super) pump: JoinHandle<delivery::Ended>,
}

impl Inputs {
    /// Stops the pump: what is unacknowledged goes back to its queue and the acknowledgements
    /// are written out before this returns.
    pub(super) async fn finish(self) {
        self.stop.cancel();
        let Inputs {
            rx, awaiting, pump, ..
        } = self;
        drop((rx, awaiting));
        let _ = pump.await;
    }
}

/// What the input pump asks of the session.
pub(super) enum InputEvent {
    Publish(InputPublish),
    Ended(Result<delivery::Ended, tokio::task::JoinError>),
}

/// The input pump's next message, or its end; pending while there is no pump.
pub(super) async fn input_event(inputs: &mut Option<Inputs>) -> InputEvent {
    match inputs.as_mut() {
        Some(i) => tokio::select! {
            biased;
            Some(p) = i.rx.recv() => InputEvent::Publish(p),
            ended = &mut i.pump => InputEvent::Ended(ended),
        },
        None => std::future::pending().await,
    }
}
