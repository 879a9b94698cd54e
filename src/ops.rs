//! Operations of the core that every transport adapter performs the same way: taking a client's
//! message (size check, metrics, routing, queueing), choosing the next message for a module's
//! inputs, and serving a twin request. The AMQP link tasks and the MQTT sessions call these;
//! neither re-implements them, so a message, a delivery or a twin answer means the same thing
//! whichever protocol carried it.

use std::{sync::Arc, time::Duration};

use crate::{
    hub::HubCore,
    identity::Identity,
    message::Message,
    metrics as m,
    queue::{Endpoint, QueueError, Queued},
};

/// How long a sender waits for room in a full queue before its message is refused.
pub(crate) const PUSH_WAIT: Duration = Duration::from_secs(30);

/// Why a client's message was not taken; the transport answers with its own refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum IngestError {
    /// Larger than `limits.maxMessageSize`.
    #[error("message of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    /// A queue refused it (full after waiting, store full or busy, closed).
    #[error("{0}")]
    Refused(String),
}

/// Takes one message from a client: checked against the size limit, counted, routed and put in
/// the queue of every target. A message that no route takes is counted as dropped and is still
/// taken (edgeHub acknowledges it too). Durable only after the next [`HubCore::sync`].
pub(crate) async fn ingest(
    core: &HubCore,
    msg: Message,
    max: usize,
    received_metrics: &mut m::ReceivedCache,
) -> Result<(), IngestError> {
    if msg.size() > max {
        return Err(IngestError::TooLarge {
            size: msg.size(),
            max,
        });
    }
    received_metrics.record(&msg);
    let msg = Arc::new(msg);
    match enqueue(core, &msg).await {
        Ok(0) => {
            m::dropped(m::DROP_NO_ROUTE, &msg);
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(why) => {
            m::unacked("queue_full", &msg);
            Err(IngestError::Refused(why))
        }
    }
}

/// Routes a message and puts it in the queue of every target; returns how many there were.
/// The error says which queue refused it (still full after waiting `PUSH_WAIT`).
pub(crate) async fn enqueue(core: &HubCore, msg: &Arc<Message>) -> Result<usize, String> {
    let targets = core.router().route(msg);
    for t in &targets {
        if let Err(e) = t
            .endpoint
            .push(msg.clone(), t.priority, t.expires_ms, PUSH_WAIT)
            .await
        {
            let endpoint = &t.endpoint.id;
            return Err(match e {
                QueueError::Full => {
                    format!("the queue of endpoint {endpoint} is full; retry later")
                }
                QueueError::Closed => format!("endpoint {endpoint} is closed"),
                QueueError::StoreFull => format!(
                    "the store is full (storeLimits.maxSizeBytes); endpoint {endpoint} cannot take more"
                ),
                QueueError::StoreBusy => format!(
                    "the store is compacting to keep its files within storeLimits.maxSizeBytes; endpoint {endpoint} cannot take more yet, retry later"
                ),
                QueueError::Storage => {
                    format!("the message could not be stored for endpoint {endpoint}; retry later")
                }
            });
        }
    }
    Ok(targets.len())
}

/// Picks the next message across a module's input endpoints: the best priority first, and
/// round-robin among endpoints whose heads have the same priority.
pub(crate) fn next_message(
    endpoints: &[Arc<Endpoint>],
    cursor: &mut usize,
) -> Option<(Arc<Endpoint>, Queued)> {
    let n = endpoints.len();
    let best = endpoints
        .iter()
        .filter_map(|e| e.store.head_priority())
        .min()?;
    for i in 0..n {
        let e = &endpoints[(*cursor + i) % n];
        if e.store.head_priority() != Some(best) {
            continue;
        }
        if let Some(q) = e.pop() {
            *cursor = (*cursor + i + 1) % n;
            return Some((e.clone(), q));
        }
    }
    // Only expired messages were at the heads (pop dropped them): look again.
    endpoints
        .iter()
        .find_map(|e| e.pop().map(|q| (e.clone(), q)))
}

/// A twin request, whatever protocol carried it.
pub(crate) enum TwinRequest<'a> {
    Get,
    /// A reported-properties patch: the request body as sent.
    PatchReported(&'a [u8]),
}

/// The answer to a twin request: a status, the body of a success (the twin's properties for a
/// GET), the twin version it reflects, or the error text of a failure. Each transport writes
/// errors in its own form.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TwinAnswer {
    pub status: i32,
    pub body: Vec<u8>,
    pub version: Option<i64>,
    pub error: Option<String>,
}

impl TwinAnswer {
    fn failed(status: i32, why: String) -> Self {
        Self {
            status,
            body: Vec::new(),
            version: None,
            error: Some(why),
        }
    }
}

/// Serves a twin GET or reported PATCH for `id`: reads the twin (and records what the client
/// saw, for later desired pushes), or validates, merges and stores the patch, queues it for
/// upstream and routes the twin change notification.
pub(crate) async fn twin_request(
    core: &HubCore,
    id: &Identity,
    request: TwinRequest<'_>,
) -> TwinAnswer {
    let label = id.to_string();
    let started = std::time::Instant::now();
    match request {
        TwinRequest::Get => {
            let twin = core.twins.get(id);
            core.twins.mark_read(id, &twin);
            m::twin_get(&label, started.elapsed().as_secs_f64());
            TwinAnswer {
                status: 200,
                body: twin.to_json().to_string().into_bytes(),
                version: None,
                error: None,
            }
        }
        TwinRequest::PatchReported(body) => {
            let patch = match serde_json::from_slice::<serde_json::Value>(body) {
                Ok(serde_json::Value::Object(patch)) => patch,
                Ok(_) => {
                    return TwinAnswer::failed(
                        400,
                        "the reported patch must be a JSON object".into(),
                    )
                }
                Err(e) => {
                    return TwinAnswer::failed(
                        400,
                        format!("the reported patch is not valid JSON: {e}"),
                    )
                }
            };
            match core.twins.update_reported(id, &patch).await {
                Ok(version) => {
                    m::twin_reported(&label, started.elapsed().as_secs_f64());
                    core.upstream.report(id, &patch);
                    let note = Arc::new(Message::twin_change_notification(
                        id.clone(),
                        version,
                        &patch,
                    ));
                    if let Err(why) = enqueue(core, &note).await {
                        tracing::warn!(identity = %id, "twin change notification not routed: {why}");
                    }
                    TwinAnswer {
                        status: 204,
                        body: Vec::new(),
                        version: Some(version),
                        error: None,
                    }
                }
                Err(e @ crate::twins::TwinError::Invalid(_)) => {
                    TwinAnswer::failed(400, e.to_string())
                }
                Err(e) => {
                    tracing::error!(identity = %id, "reported properties not stored: {e}");
                    TwinAnswer::failed(500, e.to_string())
                }
            }
        }
    }
}
