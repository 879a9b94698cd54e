//! Twin requests from a client, whatever transport carried them: a GET of the twin, or a patch
//! of its reported properties. A transport decodes its frames into a [`TwinRequest`], calls
//! [`twin_request`], and writes the [`TwinAnswer`] back in its own form (the AMQP twin link as
//! a response message, MQTT on `$iothub/twin/res/{status}`). Reserving a place for the answer
//! (`TwinStore::reserve`) is the transport's, before it calls this.

use std::{sync::Arc, time::Instant};

use serde_json::Value;
use tracing::warn;

use crate::{
    core::{ingest, twins::TwinError, HubCore},
    metrics as m,
    model::{identity::Identity, message::Message},
};

/// A twin request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinRequest<'a> {
    Get,
    /// A reported-properties patch: the request body as sent.
    PatchReported(&'a [u8]),
}

/// The answer to a twin request: a status, the body of a success (the twin's properties for a
/// GET), the twin version a patch made, or the text of a failure (each transport writes errors
/// in its own form).
#[derive(Debug, Clone, PartialEq)]
pub struct TwinAnswer {
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
/// the parent (`Outbox`) and routes the twin change notification.
pub async fn twin_request(core: &HubCore, id: &Identity, request: TwinRequest<'_>) -> TwinAnswer {
    let started = Instant::now();
    match request {
        TwinRequest::Get => {
            let twin = core.twins.get(id);
            core.twins.mark_read(id, &twin);
            m::twin_get(&id.to_string(), started.elapsed().as_secs_f64());
            TwinAnswer {
                status: 200,
                body: twin.to_json().to_string().into_bytes(),
                version: None,
                error: None,
            }
        }
        TwinRequest::PatchReported(body) => {
            let patch = match serde_json::from_slice::<Value>(body) {
                Ok(Value::Object(patch)) => patch,
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
                    m::twin_reported(&id.to_string(), started.elapsed().as_secs_f64());
                    core.outbox.report(id, &patch);
                    let note = Arc::new(Message::twin_change_notification(
                        id.clone(),
                        version,
                        &patch,
                    ));
                    if let Err(why) = ingest::enqueue(core, &note).await {
                        warn!(identity = %id, "twin change notification not routed: {why}");
                    }
                    TwinAnswer {
                        status: 204,
                        body: Vec::new(),
                        version: Some(version),
                        error: None,
                    }
                }
                Err(e @ TwinError::Invalid(_)) => TwinAnswer::failed(400, e.to_string()),
                Err(e) => {
                    tracing::error!(identity = %id, "reported properties not stored: {e}");
                    TwinAnswer::failed(500, e.to_string())
                }
            }
        }
    }
}
