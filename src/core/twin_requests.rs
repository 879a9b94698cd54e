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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::identity::{DeviceId, ModuleId};

    fn core() -> HubCore {
        let text = r#"{"deviceId": "edge1", "iothubHostname": "hub.azure-devices.net",
            "gatewayHostname": "gw.local", "listen": {"amqps": "127.0.0.1:0"}, "dataDir": "/nonexistent",
            "modules": {"filter": {}, "watcher": {}},
            "$edgeHub": {"schemaVersion": "1.0", "routes": {
                "notes": "FROM /twinChangeNotifications INTO BrokeredEndpoint(\"/modules/watcher/inputs/twins\")"}}}"#;
        HubCore::for_tests(text)
    }

    fn module(m: &str) -> Identity {
        Identity::Module(
            DeviceId::parse("edge1").unwrap(),
            ModuleId::parse(m).unwrap(),
        )
    }

    #[tokio::test]
    async fn a_reported_patch_is_stored_answered_and_routed_and_bad_ones_are_400() {
        let core = core();
        let id = module("filter");
        let watcher = ModuleId::parse("watcher").unwrap();
        let patch = twin_request(&core, &id, TwinRequest::PatchReported(br#"{"temp": 21}"#)).await;
        assert_eq!(patch.status, 204, "{patch:?}");
        assert!(patch.error.is_none() && patch.body.is_empty());
        let version = patch.version.expect("the version the patch made");
        let (inputs, _) = core.router().module_inputs(&watcher);
        let note = inputs
            .iter()
            .find_map(|e| e.pop())
            .expect("a change notification");
        let note: Value = serde_json::from_slice(&note.msg.body).unwrap();
        assert_eq!(note["properties"]["reported"]["temp"], 21, "{note}");
        assert_eq!(note["version"], version);

        let get = twin_request(&core, &id, TwinRequest::Get).await;
        assert_eq!(
            (get.status, get.version, get.error.as_deref()),
            (200, None, None)
        );
        let twin: Value = serde_json::from_slice(&get.body).unwrap();
        assert_eq!(twin["reported"]["temp"], 21);
        assert_eq!(twin["reported"]["$version"], version);

        for (body, why) in [
            (&b"[1]"[..], "must be a JSON object"),
            (b"{nope", "not valid JSON"),
        ] {
            let bad = twin_request(&core, &id, TwinRequest::PatchReported(body)).await;
            assert_eq!(bad.status, 400);
            assert!(bad.error.as_deref().unwrap().contains(why), "{bad:?}");
            assert_eq!(bad.version, None);
        }
        // Nothing more was stored or routed.
        let again = twin_request(&core, &id, TwinRequest::Get).await;
        assert_eq!(again.body, get.body);
        assert!(inputs.iter().all(|e| e.pop().is_none()));
    }
}
