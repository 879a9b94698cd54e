//! Why the upstream connection could not be made, or why it ended. The connect loop decides on
//! the kind: a refusal of this hub's credentials or of a link is logged as such (retrying does
//! not help until the parent is set up), everything else is transient.

use std::time::Duration;

use fe2o3_amqp::types::definitions::{self, AmqpError, ErrorCondition};

use super::transport::TransportError;
use crate::servers::amqp::cbs_client::CbsError;

/// One upstream failure; its text is what the log says.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The byte stream: TCP, the proxy, TLS or the WebSocket.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The parent did not finish the AMQP handshake, authentication and attaches in time.
    #[error("no answer within {} s", .0.as_secs())]
    ConnectTimeout(Duration),
    /// The AMQP open failed (a SASL refusal among them).
    #[error("AMQP open: {0}")]
    Open(#[source] Box<fe2o3_amqp::connection::OpenError>),
    /// A session could not begin.
    #[error("{what}: {source}")]
    Session {
        what: String,
        source: fe2o3_amqp::session::BeginError,
    },
    /// The `$cbs` link pair could not attach, or a put-token failed or was refused.
    #[error("{what}: {source}")]
    Cbs { what: String, source: CbsError },
    /// The parent refused or failed to attach one of an identity's links; `condition` is the
    /// AMQP error it closed the link with, when it gave one.
    #[error("{link} link for {identity}: {reason}")]
    Attach {
        link: &'static str,
        identity: String,
        condition: Option<ErrorCondition>,
        reason: String,
    },
    /// A token could not be signed (runtime mode: the workload API failed).
    #[error("signing the token of {identity}: {reason}")]
    Sign { identity: String, reason: String },
    /// The parent answered a twin request with a status that is not a success.
    #[error("{what} for {identity} answered {status}")]
    Status {
        what: &'static str,
        identity: String,
        status: i64,
    },
    /// A response that could not be read.
    #[error("{what} for {identity}: not JSON: {source}")]
    Decode {
        what: &'static str,
        identity: String,
        source: serde_json::Error,
    },
    /// A request got no response, or a response no credit, in time.
    #[error("{0}")]
    NoResponse(String),
    /// A link, or the connection under it, ended or failed while in use.
    #[error("{what}: {reason}")]
    Link { what: String, reason: String },
    /// The parent granted no credit on an events link for too long.
    #[error("the parent granted no credit")]
    Stalled,
}

impl UpstreamError {
    /// A link that did not attach, from fe2o3's sender or receiver attach error.
    pub(super) fn attach(
        link: &'static str,
        identity: &impl std::fmt::Display,
        e: &(impl std::fmt::Display + RemoteError),
    ) -> Self {
        Self::Attach {
            link,
            identity: identity.to_string(),
            condition: e.remote_error().map(|r| r.condition.clone()),
            reason: e.to_string(),
        }
    }

    /// The parent refused this hub's credentials (SASL, a put-token, or a link as
    /// unauthorized): retrying helps only once the parent knows this hub's keys.
    pub fn is_unauthorized(&self) -> bool {
        match self {
            Self::Open(e) => matches!(**e, fe2o3_amqp::connection::OpenError::SaslError { .. }),
            Self::Cbs {
                source: CbsError::Refused(status, _),
                ..
            } => *status == 401 || *status == 403,
            Self::Attach {
                condition: Some(ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess)),
                ..
            } => true,
            _ => false,
        }
    }
}

/// The AMQP error a peer closed a link with, in fe2o3's attach errors.
pub(super) trait RemoteError {
    fn remote_error(&self) -> Option<&definitions::Error>;
}

impl RemoteError for fe2o3_amqp::link::SenderAttachError {
    fn remote_error(&self) -> Option<&definitions::Error> {
        match self {
            Self::RemoteClosedWithError(e) => Some(e),
            _ => None,
        }
    }
}

impl RemoteError for fe2o3_amqp::link::ReceiverAttachError {
    fn remote_error(&self) -> Option<&definitions::Error> {
        match self {
            Self::RemoteClosedWithError(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_from_transient_failures() {
        let refused = UpstreamError::Cbs {
            what: "put-token for d1".into(),
            source: CbsError::Refused(401, "bad key".into()),
        };
        assert!(refused.is_unauthorized());
        assert_eq!(
            refused.to_string(),
            "put-token for d1: put-token refused (401): bad key"
        );
        let failed = UpstreamError::Cbs {
            what: "put-token for d1".into(),
            source: CbsError::Failed("no put-token reply".into()),
        };
        assert!(!failed.is_unauthorized());
        let attach =
            UpstreamError::attach(
                "events",
                &"d1",
                &fe2o3_amqp::link::SenderAttachError::RemoteClosedWithError(
                    definitions::Error::new(AmqpError::UnauthorizedAccess, None, None),
                ),
            );
        assert!(attach.is_unauthorized());
        assert!(attach.to_string().starts_with("events link for d1: "));
        let timeout = UpstreamError::ConnectTimeout(Duration::from_secs(30));
        assert!(!timeout.is_unauthorized());
        assert_eq!(timeout.to_string(), "no answer within 30 s");
        assert!(!UpstreamError::Stalled.is_unauthorized());
    }
}
