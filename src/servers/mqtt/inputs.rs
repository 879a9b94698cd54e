//! Module inputs and C2D messages for an MQTT session: the core's delivery pump
//! ([`delivery::pump`]) runs with an [`InputLink`] (or a [`C2dLink`]) that hands the messages of
//! each refill of its window to the session task in one batch; the session owns the
//! connection's writer and packet ids and publishes them. The module's PUBACK (at QoS 0, the
//! write) is a message's outcome; the session passes the outcomes of a step back to the pump in
//! one burst ([`delivery::outcome_channel`]).

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
    model::{
        identity::{DeviceId, ModuleId},
        message::Message,
    },
    store::queue::{Endpoint, Queued},
};

/// Room for batches of input PUBLISHes between the delivery pump and the session (the pump's
/// window bounds the messages in them).
pub(super) const INPUT_QUEUE: usize = 16;

/// One message of the module's inputs for the session to publish.
pub(super) struct InputPublish {
    pub(super) topic: String,
    pub(super) payload: Bytes,
    /// Delivered before: the PUBLISH's DUP flag at QoS 1.
    pub(super) dup: bool,
    /// The pump's key of this transfer: its outcome goes back under it, accepted on the
    /// module's PUBACK (QoS 1) or once written (QoS 0). Without one (the session ended, or the
    /// module unsubscribed), the message goes back to its queue.
    pub(super) key: u64,
}

/// The sending half of a session's input pump: batches to the session, outcomes back.
pub(super) struct Handoff {
    out: mpsc::Sender<Vec<InputPublish>>,
    /// What `send` kept for the next `flush`.
    batch: Vec<InputPublish>,
    outcomes: delivery::OutcomeReceiver,
}

impl Handoff {
    /// The pump's half and the session's halves (the batches, the outcomes).
    pub(super) fn new() -> (
        Self,
        mpsc::Receiver<Vec<InputPublish>>,
        delivery::OutcomeSender,
    ) {
        let (out, rx) = mpsc::channel(INPUT_QUEUE);
        let (done, outcomes) = delivery::outcome_channel();
        let handoff = Self {
            out,
            batch: Vec::new(),
            outcomes,
        };
        (handoff, rx, done)
    }

    fn keep(&mut self, topic: String, q: &Queued, key: u64) -> delivery::Sent {
        self.batch.push(InputPublish {
            topic,
            payload: body(&q.msg),
            dup: q.delivery_count > 0,
            key,
        });
        delivery::Sent::Handed
    }

    async fn flush(&mut self) -> Result<(), String> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.out
            .send(batch)
            .await
            .map_err(|_| "the MQTT session ended".to_owned())
    }
}

/// The message's body as a PUBLISH payload, sharing the message's memory (no copy).
fn body(msg: &Arc<Message>) -> Bytes {
    Bytes::from_owner(SharedBody(msg.clone()))
}

struct SharedBody(Arc<Message>);

impl AsRef<[u8]> for SharedBody {
    fn as_ref(&self) -> &[u8] {
        &self.0.body
    }
}

/// A module's inputs as the core's delivery pump sees it ([`delivery::Link`]): each refill goes
/// to the session task, which owns the connection's writer and packet ids.
pub(super) struct InputLink {
    pub(super) handoff: Handoff,
    pub(super) device: DeviceId,
    pub(super) module: ModuleId,
    pub(super) sent: m::SentCache,
}

impl delivery::Link for InputLink {
    async fn send(
        &mut self,
        ep: &Endpoint,
        q: &Queued,
        key: u64,
    ) -> Result<delivery::Sent, String> {
        let input = ep.input.as_deref().unwrap_or_default();
        let topic = topic::input_topic(
            self.device.as_str(),
            self.module.as_str(),
            input,
            &input_bag(&q.msg),
        );
        Ok(self.handoff.keep(topic, q, key))
    }

    async fn flush(&mut self) -> Result<(), String> {
        self.handoff.flush().await
    }

    async fn outcomes(&mut self, into: &mut Vec<delivery::Settled>) -> bool {
        self.handoff.outcomes.recv(into).await
    }

    async fn detached(&mut self) {
        self.handoff.out.closed().await;
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

/// A device's C2D queue as the delivery pump sees it: like [`InputLink`], on
/// `devices/{d}/messages/devicebound/{bag}`; the PUBACK completes the message (MQTT has no
/// abandon or reject).
pub(super) struct C2dLink {
    pub(super) handoff: Handoff,
    pub(super) core: Arc<HubCore>,
    pub(super) queue: Arc<crate::core::c2d::DeviceQueue>,
}

impl delivery::Link for C2dLink {
    async fn send(
        &mut self,
        _ep: &Endpoint,
        q: &Queued,
        key: u64,
    ) -> Result<delivery::Sent, String> {
        let topic = topic::c2d_topic(self.queue.device.as_str(), &c2d_bag(&q.msg));
        Ok(self.handoff.keep(topic, q, key))
    }

    async fn flush(&mut self) -> Result<(), String> {
        self.handoff.flush().await
    }

    async fn outcomes(&mut self, into: &mut Vec<delivery::Settled>) -> bool {
        self.handoff.outcomes.recv(into).await
    }

    async fn detached(&mut self) {
        self.handoff.out.closed().await;
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
    pub(super) rx: mpsc::Receiver<Vec<InputPublish>>,
    /// QoS 1 PUBLISHes awaiting the module's PUBACK: packet id → the pump's key.
    pub(super) awaiting: HashMap<u16, u64>,
    /// Outcomes of this step, passed to the pump at its end ([`Inputs::hand_back`]).
    pub(super) settled: Vec<delivery::Settled>,
    pub(super) outcomes: delivery::OutcomeSender,
    pub(super) pump: JoinHandle<delivery::Ended>,
}

impl Inputs {
    pub(super) fn new(
        qos: QoS,
        stop: CancellationToken,
        rx: mpsc::Receiver<Vec<InputPublish>>,
        outcomes: delivery::OutcomeSender,
        pump: JoinHandle<delivery::Ended>,
    ) -> Self {
        Self {
            qos,
            stop,
            rx,
            awaiting: HashMap::new(),
            settled: Vec::new(),
            outcomes,
            pump,
        }
    }

    /// The message of `key` is taken (PUBACK, or written at QoS 0).
    pub(super) fn accepted(&mut self, key: u64) {
        self.settled.push((key, Ok(delivery::Outcome::Accepted)));
    }

    /// Passes the outcomes gathered so far to the pump, in one burst.
    pub(super) fn hand_back(&mut self) {
        self.outcomes.send(&mut self.settled);
    }

    /// Stops the pump: what is acknowledged leaves its queue, what is unacknowledged goes
    /// back, and the acknowledgements are written out before this returns.
    pub(super) async fn finish(mut self) {
        self.hand_back();
        self.stop.cancel();
        let Inputs {
            rx,
            awaiting,
            outcomes,
            pump,
            ..
        } = self;
        drop((rx, awaiting, outcomes));
        let _ = pump.await;
    }
}

/// What the input pump asks of the session.
pub(super) enum InputEvent {
    Publish(Vec<InputPublish>),
    Ended(Result<delivery::Ended, tokio::task::JoinError>),
}

/// The signal of a waiting C2D subscription's first message; pending while none waits.
pub(super) async fn c2d_first(
    wait: &mut Option<(QoS, oneshot::Receiver<()>)>,
) -> Result<(), oneshot::error::RecvError> {
    match wait.as_mut() {
        Some((_, first)) => first.await,
        None => std::future::pending().await,
    }
}

/// The input pump's next batch of messages, or its end; pending while there is no pump.
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
