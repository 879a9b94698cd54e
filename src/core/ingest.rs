//! Ingest: a message that arrived on any transport is routed and put in the queue of every
//! endpoint it goes to. A transport decodes and checks its frames, calls [`ingest`], and
//! acknowledges the sender only on `Ok` (after the store's group commit when it is durable).

use std::{sync::Arc, time::Duration};

use crate::{core::HubCore, metrics as m, model::message::Message, store::queue::QueueError};

/// How long a sender waits for room in a full queue before its message is refused.
pub const PUSH_WAIT: Duration = Duration::from_secs(30);

/// Why a message was not taken; each names the endpoint whose queue refused it. The sender may
/// send it again (a message queued for other endpoints before the refusal then arrives there
/// twice, never lost).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// Still full after waiting [`PUSH_WAIT`].
    #[error("the queue of endpoint {0} is full; retry later")]
    QueueFull(String),
    #[error("the store is full (storeLimits.maxSizeBytes); endpoint {0} cannot take more")]
    StoreFull(String),
    /// The store is past its bound until a compaction ends, still after [`PUSH_WAIT`].
    #[error(
        "the store is compacting to keep its files within storeLimits.maxSizeBytes; endpoint {0} cannot take more yet, retry later"
    )]
    StoreBusy(String),
    #[error("endpoint {0} is closed")]
    Closed(String),
    #[error("the message could not be stored for endpoint {0}; retry later")]
    Storage(String),
}

impl IngestError {
    fn new(e: QueueError, endpoint: &str) -> Self {
        let endpoint = endpoint.to_owned();
        match e {
            QueueError::Full => IngestError::QueueFull(endpoint),
            QueueError::StoreFull => IngestError::StoreFull(endpoint),
            QueueError::StoreBusy => IngestError::StoreBusy(endpoint),
            QueueError::Closed => IngestError::Closed(endpoint),
            QueueError::Storage => IngestError::Storage(endpoint),
        }
    }

    /// The `reason` label of `edgehub_messages_unack_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            IngestError::QueueFull(_) => m::UNACK_QUEUE_FULL,
            IngestError::StoreFull(_) => m::UNACK_STORE_FULL,
            IngestError::StoreBusy(_) => m::UNACK_STORE_BUSY,
            IngestError::Closed(_) => m::UNACK_CLOSED,
            IngestError::Storage(_) => m::UNACK_STORAGE,
        }
    }
}

/// Routes a message and puts it in the queue of every target; returns how many there were.
pub async fn enqueue(core: &HubCore, msg: &Arc<Message>) -> Result<usize, IngestError> {
    let targets = core.router().route(msg);
    let sole = targets.len() == 1;
    for t in &targets {
        t.endpoint
            .push(msg.clone(), t.priority, t.expires_ms, PUSH_WAIT, sole)
            .await
            .map_err(|e| IngestError::new(e, &t.endpoint.id))?;
    }
    if let (Some(store), false) = (&core.store, targets.is_empty()) {
        store.count_message();
    }
    Ok(targets.len())
}

/// [`enqueue`] for a message a client sent, counted: one that matches no route as dropped
/// (`no_route`), one refused as not acknowledged, with the refusal's reason.
pub async fn ingest(core: &HubCore, msg: &Arc<Message>) -> Result<(), IngestError> {
    match enqueue(core, msg).await {
        Ok(0) => {
            m::dropped(m::DROP_NO_ROUTE, msg);
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => {
            m::unacked(e.reason(), msg);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_own_reason() {
        let all = [
            QueueError::Full,
            QueueError::StoreFull,
            QueueError::StoreBusy,
            QueueError::Closed,
            QueueError::Storage,
        ];
        let reasons: std::collections::BTreeSet<_> = all
            .into_iter()
            .map(|e| IngestError::new(e, "e").reason())
            .collect();
        assert_eq!(reasons.len(), 5);
        assert!(reasons.contains("queue_full"));
        assert!(reasons.contains("store_full"));
        assert_eq!(
            IngestError::new(QueueError::StoreFull, "iothub").to_string(),
            "the store is full (storeLimits.maxSizeBytes); endpoint iothub cannot take more"
        );
    }
}
