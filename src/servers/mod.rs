//! The transports: adapters that turn frames into core calls and core events into frames.

pub mod amqp;
pub mod http;
pub mod mqtt;
pub mod upstream;
pub mod ws;

/// A client connection's handshake (TLS, or a WebSocket upgrade over HTTPS): the byte stream
/// and what the client's certificate proved. Boxed, so the connection's task, which lives as
/// long as the connection, does not keep the finished handshake's state (about 1.2 KB with
/// TLS).
pub(crate) type Handshake<S> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = std::io::Result<(S, Option<crate::ops::x509::Presented>)>>
            + Send,
    >,
>;
