//! The client side of `$cbs`: put-token requests on a link pair of their own, each matched to
//! its reply by correlation id. The upstream connection puts every identity's token with it,
//! and so does the load and test client (`client`, behind the `client` feature).

use fe2o3_amqp::{
    link::{Receiver, Sender},
    session::SessionHandle,
    types::{
        messaging::{ApplicationProperties, Body, Message, MessageId, Properties},
        primitives::{SimpleValue, Value},
    },
    Sendable,
};

use super::convert;

/// The token type IoT Hub names in its put-token requests (the C# SDK's).
pub const IOTHUB_TOKEN: &str = "azure-devices.net:sastoken";

/// Why a put-token did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CbsError {
    /// The peer answered with this status and description.
    #[error("put-token refused ({0}): {1}")]
    Refused(i64, String),
    /// The link or the connection failed, or the reply made no sense.
    #[error("{0}")]
    Failed(String),
}

/// A `$cbs` link pair: put-token requests and their replies.
pub struct CbsClient {
    tx: Sender,
    rx: Receiver,
    /// The receiver's address, named in each request's `reply-to`.
    reply_to: String,
}

impl CbsClient {
    /// Attaches the pair on `session`: a sender named `sender` and a receiver named and
    /// addressed `receiver`.
    pub async fn attach<R>(
        session: &mut SessionHandle<R>,
        sender: &str,
        receiver: &str,
    ) -> Result<Self, CbsError> {
        let tx = Sender::builder()
            .name(sender)
            .target("$cbs")
            .attach(session)
            .await
            .map_err(|e| CbsError::Failed(format!("$cbs sender: {e}")))?;
        let rx = Receiver::builder()
            .name(receiver)
            .source("$cbs")
            .target(receiver)
            .attach(session)
            .await
            .map_err(|e| CbsError::Failed(format!("$cbs receiver: {e}")))?;
        Ok(Self {
            tx,
            rx,
            reply_to: receiver.to_owned(),
        })
    }

    /// Puts `token` (of `token_type`) for `audience` and waits for the reply (the caller
    /// bounds the wait).
    pub async fn put_token(
        &mut self,
        token_type: &str,
        audience: &str,
        token: &str,
    ) -> Result<(), CbsError> {
        let id = uuid::Uuid::new_v4().to_string();
        let app = ApplicationProperties::builder()
            .insert("operation", "put-token")
            .insert("type", token_type)
            .insert("name", audience)
            .build();
        let msg = Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::String(id.clone())),
                reply_to: Some(self.reply_to.clone()),
                to: Some("$cbs".into()),
                ..Default::default()
            })
            .application_properties(app)
            .value(token.to_owned())
            .build();
        self.tx
            .send(Sendable::builder().message(msg).settled(true).build())
            .await
            .map_err(|e| CbsError::Failed(format!("sending put-token: {e}")))?;
        loop {
            let reply = self
                .rx
                .recv::<Body<Value>>()
                .await
                .map_err(|e| CbsError::Failed(format!("reading put-token reply: {e}")))?;
            let _ = self.rx.accept(&reply).await;
            let m = reply.message();
            let cid = m.properties.as_ref().and_then(|p| p.correlation_id.clone());
            if cid.is_some_and(|c| c != MessageId::String(id.clone())) {
                continue;
            }
            let props = m.application_properties.as_ref().map(|a| &a.0);
            let status = props
                .and_then(|p| p.get("status-code"))
                .and_then(convert::int_of);
            let desc = match props.and_then(|p| p.get("status-description")) {
                Some(SimpleValue::String(s)) => s.clone(),
                _ => String::new(),
            };
            return match status {
                Some(200) => Ok(()),
                Some(s) => Err(CbsError::Refused(s, desc)),
                None => Err(CbsError::Failed(
                    "put-token reply has no status-code".into(),
                )),
            };
        }
    }

    /// Detaches both links.
    pub async fn close(self) {
        let _ = self.tx.close().await;
        let _ = self.rx.close().await;
    }
}
