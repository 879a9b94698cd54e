//! The byte stream to the parent: TCP (directly, or through an HTTP proxy's `CONNECT`), TLS,
//! and for `amqpws` a WebSocket carrying AMQP (`/$iothub/websocket`, subprotocol `AMQPWSB10`),
//! as the IoT SDKs and edgeHub reach IoT Hub on port 443.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use crate::config::{UpstreamProtocol, UpstreamSettings};

/// A stream the AMQP connection runs on.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The stream to the parent, whichever way it was made.
pub struct Stream(Box<dyn Io>);

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream stream")
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// Why the stream to the parent could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("the CA roots for the parent: {0}")]
    Roots(#[from] crate::ops::tls::RootsError),
    #[error("TLS settings: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("{0:?} is not a TLS server name")]
    ServerName(String),
    #[error("connecting to {target}: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Proxy(crate::ops::proxy::ProxyError),
    #[error("TLS with {host}: {source}")]
    Tls {
        host: String,
        source: std::io::Error,
    },
    #[error("WebSocket upgrade with {host}: {why}")]
    WebSocket { host: String, why: String },
}

/// Opens the stream to the parent named in `up`.
pub async fn open(up: &UpstreamSettings) -> Result<Stream, TransportError> {
    let roots = crate::ops::tls::upstream_roots(up)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp: Box<dyn Io> = match (&up.proxy, up.protocol) {
        (Some(proxy), UpstreamProtocol::AmqpWs) => Box::new(
            crate::ops::proxy::tunnel(proxy, &up.hostname, up.port)
                .await
                .map_err(TransportError::Proxy)?,
        ),
        _ => {
            let target = format!("{}:{}", up.hostname, up.port);
            let tcp = TcpStream::connect((up.hostname.as_str(), up.port))
                .await
                .map_err(|source| TransportError::Connect { target, source })?;
            let _ = tcp.set_nodelay(true);
            Box::new(tcp)
        }
    };
    let name = rustls::pki_types::ServerName::try_from(up.hostname.clone())
        .map_err(|_| TransportError::ServerName(up.hostname.clone()))?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|source| TransportError::Tls {
            host: up.hostname.clone(),
            source,
        })?;
    match up.protocol {
        UpstreamProtocol::Amqp => Ok(Stream(Box::new(tls))),
        UpstreamProtocol::AmqpWs => Ok(Stream(Box::new(
            websocket(tls, &up.hostname, up.port).await?,
        ))),
    }
}

/// The WebSocket to the parent's `/$iothub/websocket`, as a byte stream.
async fn websocket<S: AsyncRead + AsyncWrite + Unpin>(
    tls: S,
    host: &str,
    port: u16,
) -> Result<crate::servers::ws::WsIo<S>, TransportError> {
    let authority = match port {
        443 => host.to_owned(),
        _ => format!("{host}:{port}"),
    };
    crate::servers::ws::connect(tls, &authority)
        .await
        .map_err(|e| TransportError::WebSocket {
            host: host.to_owned(),
            why: e.to_string(),
        })
}
