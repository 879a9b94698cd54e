//! AMQP and MQTT over WebSockets on the HTTPS listener, as IoT Hub and edgeHub serve them on
//! 443: a WebSocket upgrade on `/$iothub/websocket` with the subprotocol `AMQPWSB10` or `mqtt`,
//! then the protocol's bytes in binary WebSocket messages. The subprotocol alone chooses the
//! protocol (as edgeHub chooses its WebSocket listener); of several offered, the first the hub
//! speaks wins.
//!
//! This module only checks the upgrade request and turns the WebSocket into a byte stream
//! ([`WsIo`]); the connection that runs on it is the AMQPS one (`amqp::Gate`: the same slots,
//! pending queue, frame guard, SASL, `$cbs`, links and metrics) or the MQTTS one
//! (`mqtt::Mqtt`: its slots, CONNECT checks and sessions). The WebSocket framing itself is
//! tungstenite's; the upgrade is hyper's.
//!
//! Refusals (before any slot is taken): another path → 404; neither `AMQPWSB10` nor `mqtt`
//! among the offered subprotocols → 400 (as edgeHub answers a WebSocket request no listener
//! takes); not a `GET` → 405; no `Sec-WebSocket-Key` → 400; a WebSocket version other than 13
//! → 426 with `Sec-WebSocket-Version: 13` (RFC 6455 §4.4); every slot of the chosen protocol
//! held by an authenticated connection → 503.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use http_body_util::Full;
use hyper::{body::Incoming, header, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::{
    tungstenite::{self, protocol::WebSocketConfig, Message},
    WebSocketStream,
};
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, Instrument};

use crate::servers::{amqp::Gate, mqtt::Mqtt};

/// The path the SDKs open (`wss://{host}:443/$iothub/websocket`).
pub const PATH: &str = "/$iothub/websocket";
/// The path the Event Hubs SDKs open for the built-in endpoint (`/$servicebus/websocket`): the
/// same AMQP server behind it.
pub const EVENT_HUBS_PATH: &str = "/$servicebus/websocket";
/// The WebSocket subprotocol of AMQP 1.0 over WebSockets, as the SDKs name it.
pub const SUBPROTOCOL: &str = "AMQPWSB10";
/// The WebSocket subprotocol of MQTT 3.1.1 over WebSockets.
pub const MQTT_SUBPROTOCOL: &str = "mqtt";

/// The protocol a WebSocket carries, chosen by its subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    Amqp,
    Mqtt,
}

impl Carried {
    fn subprotocol(self) -> &'static str {
        match self {
            Carried::Amqp => SUBPROTOCOL,
            Carried::Mqtt => MQTT_SUBPROTOCOL,
        }
    }
}

/// Where the connections of an upgraded WebSocket go: AMQP's slots or MQTT's.
#[derive(Clone)]
pub struct Upgrades {
    pub amqp: Arc<Gate>,
    pub mqtt: Arc<Mqtt>,
}

/// Is this request a WebSocket upgrade (`Upgrade: websocket`)? Such requests go to [`accept`],
/// whatever their path, so a wrong path gets a WebSocket answer rather than an API one.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
}

/// Why an upgrade request is refused, and with which status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no WebSocket endpoint at this path; AMQP over WebSockets is at /$iothub/websocket")]
    Path,
    #[error("a WebSocket upgrade is a GET request")]
    Method,
    #[error("neither of the WebSocket subprotocols AMQPWSB10 and mqtt was offered (Sec-WebSocket-Protocol)")]
    Subprotocol,
    #[error("Sec-WebSocket-Key is missing")]
    Key,
    #[error("only WebSocket version 13 is supported")]
    Version,
    #[error("the hub holds its maximum of connections")]
    Full,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Path => StatusCode::NOT_FOUND,
            Refusal::Method => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::Subprotocol | Refusal::Key => StatusCode::BAD_REQUEST,
            Refusal::Version => StatusCode::UPGRADE_REQUIRED,
            Refusal::Full => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Checks an upgrade request (pure); returns the `Sec-WebSocket-Accept` value to answer with
/// and the protocol chosen. The Event Hubs path carries AMQP only.
pub fn check<B>(req: &Request<B>) -> Result<(String, Carried), Refusal> {
    let event_hubs = req.uri().path() == EVENT_HUBS_PATH;
    if req.uri().path() != PATH && !event_hubs {
        return Err(Refusal::Path);
    }
    if req.method() != hyper::Method::GET {
        return Err(Refusal::Method);
    }
    let headers = req.headers();
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == "13");
    if !version_ok {
        return Err(Refusal::Version);
    }
    let carried = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| {
            let p = p.trim();
            [Carried::Amqp, Carried::Mqtt]
                .into_iter()
                .filter(|c| !event_hubs || *c == Carried::Amqp)
                .find(|c| p.eq_ignore_ascii_case(c.subprotocol()))
        })
        .ok_or(Refusal::Subprotocol)?;
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| !k.as_bytes().is_empty())
        .ok_or(Refusal::Key)?;
    Ok((
        tungstenite::handshake::derive_accept_key(key.as_bytes()),
        carried,
    ))
}

fn refused(why: Refusal) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{why}\n"))));
    *r.status_mut() = why.status();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    if why == Refusal::Version {
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            header::HeaderValue::from_static("13"),
        );
    }
    r
}

/// Answers a WebSocket upgrade request: a refusal, or `101 Switching Protocols` and, in a task
/// of `tracker`, the AMQP or MQTT connection on the upgraded stream. The connection takes its
/// slot before the 101 is sent, so a full hub answers 503 instead of a WebSocket it would
/// close at once.
pub fn accept(
    mut req: Request<Incoming>,
    to: &Upgrades,
    tracker: &TaskTracker,
    peer: SocketAddr,
    presented: Option<crate::ops::x509::Presented>,
) -> Response<Full<Bytes>> {
    let (accept_key, carried) = match check(&req) {
        Ok(k) => k,
        Err(why) => {
            debug!(%peer, path = %crate::model::clip(req.uri().path()), "WebSocket upgrade refused: {why}");
            return refused(why);
        }
    };
    let limits = &to.amqp.core().settings.limits;
    let upgraded = hyper::upgrade::on(&mut req);
    // Part of the handshake, under its deadline: the upgrade completes once hyper has written
    // the 101.
    let websocket = |max_message: u64| {
        let config = ws_config(usize::try_from(max_message).unwrap_or(usize::MAX));
        async move {
            let upgraded = upgraded.await.map_err(std::io::Error::other)?;
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                tungstenite::protocol::Role::Server,
                Some(config),
            )
            .await;
            Ok((WsIo::new(ws), presented))
        }
    };
    match carried {
        Carried::Amqp => {
            let Some(admitted) = to.amqp.admit(peer) else {
                return refused(Refusal::Full);
            };
            let handshake: crate::servers::Handshake<_> = Box::pin(websocket(
                limits
                    .max_incomplete_bytes_per_connection
                    .max(limits.max_message_size),
            ));
            let gate = to.amqp.clone();
            tracker.spawn(
                async move {
                    gate.run(admitted, crate::metrics::PROTOCOL_AMQP_WS, handshake)
                        .await
                }
                .instrument(info_span!("conn", %peer, transport = "amqpws")),
            );
        }
        Carried::Mqtt => {
            let Some(admitted) = to.mqtt.admit(peer) else {
                return refused(Refusal::Full);
            };
            // A whole MQTT packet: the message and room for its topic.
            let handshake: crate::servers::Handshake<_> =
                Box::pin(websocket(limits.max_message_size.saturating_add(64 * 1024)));
            let mqtt = to.mqtt.clone();
            tracker.spawn(
                async move {
                    mqtt.run(admitted, crate::metrics::PROTOCOL_MQTT_WS, handshake)
                        .await
                }
                .instrument(info_span!("mqtt", %peer, transport = "mqttws")),
            );
        }
    }
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&accept_key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        header::HeaderValue::from_static(carried.subprotocol()),
    );
    r
}

/// The client side: upgrades `stream` to the WebSocket at `wss://{authority}/$iothub/websocket`
/// with the subprotocol `AMQPWSB10`, as the SDKs and edgeHub open it towards IoT Hub.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    authority: &str,
) -> Result<WsIo<S>, tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut request = format!("wss://{authority}{PATH}").into_client_request()?;
    request.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        header::HeaderValue::from_static(SUBPROTOCOL),
    );
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        request,
        stream,
        Some(ws_config(16 * 1024 * 1024)),
    )
    .await?;
    Ok(WsIo::new(ws))
}

/// The WebSocket settings of a hub connection. A WebSocket message is held whole before the
/// AMQP frames in it are checked, so it is capped (`max_message` bytes, the connection's budget
/// for unfinished deliveries); the hub sends no pings (edgeHub does not either: SDK WebSocket
/// stacks mishandle them), AMQP's own keep-alives do that work.
pub fn ws_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
        .read_buffer_size(64 * 1024)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
}

/// A WebSocket as a byte stream: what is written goes out as one binary message per write;
/// what is read is the payload of the binary messages received, in order. Pings are answered
/// by tungstenite; a close (or the peer's end of the TCP stream) reads as end of stream, a text
/// message as an error.
#[derive(Debug)]
pub struct WsIo<S> {
    inner: WebSocketStream<S>,
    /// What is left of the last binary message received.
    read: Bytes,
}

impl<S> WsIo<S> {
    pub fn new(inner: WebSocketStream<S>) -> Self {
        Self {
            inner,
            read: Bytes::new(),
        }
    }
}

fn io_error(e: tungstenite::Error) -> std::io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            std::io::ErrorKind::BrokenPipe.into()
        }
        e => std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.read.is_empty() {
                let n = this.read.len().min(buf.remaining());
                buf.put_slice(&this.read[..n]);
                this.read.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => this.read = b,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "a text WebSocket message; AMQP and MQTT travel in binary messages",
                    )))
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                )) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.inner).poll_ready(cx)).map_err(io_error)?;
        Pin::new(&mut this.inner)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io_error)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_flush(cx)
            .map_err(io_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match ready!(Pin::new(&mut self.get_mut().inner).poll_close(cx)) {
            Ok(())
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(io_error(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, protocol: Option<&str>, version: &str) -> Request<()> {
        let mut b = Request::get(path)
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "Upgrade")
            .header(header::SEC_WEBSOCKET_VERSION, version)
            .header(header::SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==");
        if let Some(p) = protocol {
            b = b.header(header::SEC_WEBSOCKET_PROTOCOL, p);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn upgrade_requests_are_checked_as_iot_hub_expects_them() {
        // RFC 6455's example key and answer.
        let ok = check(&request(PATH, Some("AMQPWSB10"), "13"));
        assert_eq!(
            ok,
            Ok(("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_owned(), Carried::Amqp))
        );
        // The first offered that the hub speaks wins.
        let carried = |offer| check(&request(PATH, Some(offer), "13")).map(|(_, c)| c);
        assert_eq!(carried("mqtt"), Ok(Carried::Mqtt));
        assert_eq!(carried("MQTT"), Ok(Carried::Mqtt));
        assert_eq!(carried("mqtt, AMQPWSB10"), Ok(Carried::Mqtt));
        assert_eq!(carried("mqttv3.1, AMQPWSB10"), Ok(Carried::Amqp));
        assert_eq!(carried("chat, mqtt"), Ok(Carried::Mqtt));
        // The Event Hubs path carries AMQP alone.
        let event_hubs =
            |offer| check(&request(EVENT_HUBS_PATH, Some(offer), "13")).map(|(_, c)| c);
        assert_eq!(event_hubs("AMQPWSB10"), Ok(Carried::Amqp));
        assert_eq!(event_hubs("mqtt, AMQPWSB10"), Ok(Carried::Amqp));
        assert_eq!(event_hubs("mqtt"), Err(Refusal::Subprotocol));
        let cases = [
            (request("/", Some("AMQPWSB10"), "13"), Refusal::Path),
            (
                request("/$iothub/websocket/x", Some("AMQPWSB10"), "13"),
                Refusal::Path,
            ),
            (request(PATH, None, "13"), Refusal::Subprotocol),
            (request(PATH, Some("mqttv3.1"), "13"), Refusal::Subprotocol),
            (request(PATH, Some("chat"), "13"), Refusal::Subprotocol),
            (request(PATH, Some("AMQPWSB10"), "8"), Refusal::Version),
        ];
        for (req, want) in cases {
            assert_eq!(check(&req), Err(want), "{} {:?}", req.uri(), req.headers());
        }
        assert_eq!(Refusal::Path.status(), 404);
        assert_eq!(Refusal::Subprotocol.status(), 400);
        assert!(is_upgrade(&request(PATH, None, "13")));
        assert!(!is_upgrade(&Request::get(PATH).body(()).unwrap()));
    }

    #[tokio::test]
    async fn a_websocket_carries_bytes_both_ways_and_a_close_ends_the_stream() {
        use futures_util::SinkExt;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = WebSocketStream::from_raw_socket(
            a,
            tungstenite::protocol::Role::Server,
            Some(ws_config(1024 * 1024)),
        )
        .await;
        let mut client =
            WebSocketStream::from_raw_socket(b, tungstenite::protocol::Role::Client, None).await;
        let mut io = WsIo::new(server);
        client
            .send(Message::Binary(Bytes::from_static(b"AMQP")))
            .await
            .unwrap();
        client.send(Message::Ping(Bytes::new())).await.unwrap();
        client
            .send(Message::Binary(Bytes::from_static(b"\x00\x01\x00\x00")))
            .await
            .unwrap();
        let mut header = [0u8; 8];
        io.read_exact(&mut header).await.unwrap();
        assert_eq!(&header, b"AMQP\x00\x01\x00\x00");
        io.write_all(b"hello").await.unwrap();
        io.flush().await.unwrap();
        use futures_util::StreamExt;
        // The ping was answered before the data written after it.
        let mut got = Vec::new();
        while let Some(m) = client.next().await {
            match m.unwrap() {
                Message::Binary(b) => {
                    got.extend_from_slice(&b);
                    break;
                }
                Message::Pong(_) => got.extend_from_slice(b"pong;"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, b"pong;hello");
        client.close(None).await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(io.read_to_end(&mut rest).await.unwrap(), 0);
    }
}
