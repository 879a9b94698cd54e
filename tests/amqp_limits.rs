//! What a hostile or broken AMQP peer cannot do: frames and buffers beyond the limits before
//! the open, growth before authentication, holding slots without authenticating, stalling
//! sessions or shutdown by going silent. A raw client writes frames byte by byte over TLS.

#![allow(clippy::unwrap_used, reason = "tests fail on any error")]

mod common;

use std::{sync::Arc, time::Duration};

use common::{start_hub, TestHub, IOTHUB, WAIT};
use edgehub::{app::device_key, core::auth::module_keys, model::identity::ModuleId};
use fe2o3_amqp::types::{
    definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode},
    messaging::{
        message::__private::{Deserializable, Serializable},
        AmqpValue, ApplicationProperties, Body, Message, Properties, Source, Target,
    },
    performatives::{
        Attach, Begin, ChannelMax, Close, Detach, End, Flow, MaxFrameSize, Open, Performative,
        Transfer,
    },
    primitives::{SimpleValue, Value},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};
use tokio_rustls::client::TlsStream;

/// How long a test waits for something the hub must do at once (well under the handshake and
/// authentication deadlines the tests configure, so waiting for those cannot pass it).
const PROMPT: Duration = Duration::from_secs(10);

/// One frame from the hub.
#[derive(Debug)]
struct Frame {
    #[allow(dead_code, reason = "shown when a test fails")]
    channel: u16,
    performative: Option<Performative>,
    payload: Vec<u8>,
}

/// A raw AMQP client over TLS.
struct Raw {
    tls: TlsStream<TcpStream>,
}

/// The length of the described list at the start of a frame body.
fn performative_len(body: &[u8]) -> usize {
    let d = match body[1] {
        0x53 => 3,
        _ => 10,
    };
    let list = &body[d..];
    d + match list[0] {
        0x45 => 1,
        0xc0 => 2 + list[1] as usize,
        _ => 5 + u32::from_be_bytes(list[1..5].try_into().unwrap()) as usize,
    }
}

fn frame_bytes(channel: u16, frame_type: u8, body: &[u8]) -> Vec<u8> {
    let mut f = ((8 + body.len()) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&[2, frame_type]);
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(body);
    f
}

impl Raw {
    async fn connect(hub: &TestHub) -> Self {
        let addr = hub.hub.as_ref().unwrap().amqps_addr;
        Self::connect_to(
            addr,
            &hub.settings.data_dir.join("certs").join("edge-ca.pem"),
        )
        .await
    }

    async fn connect_to(addr: std::net::SocketAddr, ca: &std::path::Path) -> Self {
        let ca = std::fs::read(ca).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        for c in CertificateDer::pem_slice_iter(&ca) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = timeout(
            WAIT,
            tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .unwrap()
        .unwrap();
        Self { tls }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).await.unwrap();
        self.tls.flush().await.unwrap();
    }

    async fn send(&mut self, channel: u16, p: Performative, payload: &[u8]) {
        let mut body = serde_amqp::to_vec(&p).unwrap();
        body.extend_from_slice(payload);
        self.write(&frame_bytes(channel, 0, &body)).await;
    }

    /// The next frame; `None` once the hub closed the stream.
    async fn read(&mut self) -> Option<Frame> {
        let mut head = [0u8; 8];
        self.tls.read_exact(&mut head).await.ok()?;
        if &head[..4] == b"AMQP" {
            return Some(Frame {
                channel: 0,
                performative: None,
                payload: head.to_vec(),
            });
        }
        let size = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
        let mut rest = vec![0u8; size - 8];
        self.tls.read_exact(&mut rest).await.ok()?;
        let body = &rest[(head[4] as usize * 4 - 8)..];
        if body.is_empty() || head[5] != 0 {
            return Some(Frame {
                channel: 0,
                performative: None,
                payload: body.to_vec(),
            });
        }
        let plen = performative_len(body);
        Some(Frame {
            channel: u16::from_be_bytes([head[6], head[7]]),
            performative: Some(serde_amqp::from_slice(&body[..plen]).unwrap()),
            payload: body[plen..].to_vec(),
        })
    }

    /// Reads until a frame `want` picks, within [`PROMPT`].
    async fn until<T>(&mut self, mut want: impl FnMut(&Frame) -> Option<T>) -> T {
        timeout(PROMPT, async {
            loop {
                let f = self.read().await.expect("the hub closed the connection");
                if let Some(t) = want(&f) {
                    return t;
                }
            }
        })
        .await
        .expect("the awaited frame came in time")
    }

    /// Reads until the hub's close; returns its error condition, and checks the stream ends.
    async fn closed_with(&mut self) -> String {
        let condition = timeout(PROMPT, async {
            loop {
                match self.read().await {
                    None => return None,
                    Some(Frame {
                        performative: Some(Performative::Close(Close { error })),
                        ..
                    }) => return Some(condition(error)),
                    Some(_) => {}
                }
            }
        })
        .await
        .expect("the hub closed the connection at once")
        .expect("the hub sent a close before ending the stream");
        // Answer as a peer should; the hub may have ended the stream already.
        let mut bye = serde_amqp::to_vec(&Performative::Close(Close { error: None })).unwrap();
        bye = frame_bytes(0, 0, &bye);
        let _ = self.tls.write_all(&bye).await;
        let _ = self.tls.flush().await;
        let end = timeout(PROMPT, self.read())
            .await
            .expect("the stream ends at once");
        assert!(end.is_none(), "nothing follows the close: {end:?}");
        condition
    }

    /// Expects the stream to end within [`PROMPT`], whatever frames come first.
    async fn ends(&mut self) {
        timeout(PROMPT, async { while self.read().await.is_some() {} })
            .await
            .expect("the hub dropped the connection at once");
    }

    /// Protocol header and open; returns the hub's open.
    async fn open(&mut self, open: Open) -> Open {
        self.write(b"AMQP\x00\x01\x00\x00").await;
        self.send(0, Performative::Open(open), &[]).await;
        self.until(|f| match &f.performative {
            Some(Performative::Open(o)) => Some(o.clone()),
            _ => None,
        })
        .await
    }

    async fn begin(&mut self, channel: u16) {
        self.send(channel, Performative::Begin(begin()), &[]).await;
        self.until(|f| match &f.performative {
            Some(Performative::Begin(b)) if b.remote_channel == Some(channel) => Some(()),
            _ => None,
        })
        .await;
    }

    /// Attaches a link on channel 0; the client's `role`, `address` as source or target.
    async fn attach(&mut self, name: &str, handle: u32, role: Role, address: &str) {
        let mut a = Attach {
            name: name.into(),
            handle: Handle(handle),
            role: role.clone(),
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: None,
            target: None,
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: None,
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        match role {
            Role::Sender => {
                a.source = Some(Box::new(Source::builder().address("client").build()));
                a.target = Some(Box::new(
                    Target::builder().address(address.to_owned()).build().into(),
                ));
                a.initial_delivery_count = Some(0);
            }
            Role::Receiver => {
                a.source = Some(Box::new(
                    Source::builder().address(address.to_owned()).build(),
                ));
                a.target = Some(Box::new(Target::builder().address("client").build().into()));
            }
        }
        self.send(0, Performative::Attach(a), &[]).await;
    }

    /// The hub's attach for link `name`.
    async fn attached(&mut self, name: &str) -> Attach {
        self.until(|f| match &f.performative {
            Some(Performative::Attach(a)) if a.name == name => Some(a.clone()),
            _ => None,
        })
        .await
    }
}

fn condition(error: Option<fe2o3_amqp::types::definitions::Error>) -> String {
    let c = error.map(|e| e.condition).expect("an error condition");
    let bytes = serde_amqp::to_vec(&c).unwrap();
    serde_amqp::from_slice::<fe2o3_amqp::types::primitives::Symbol>(&bytes)
        .unwrap()
        .0
}

fn client_open() -> Open {
    Open {
        container_id: "raw".into(),
        hostname: Some("localhost".into()),
        max_frame_size: MaxFrameSize(65_536),
        channel_max: ChannelMax(65_535),
        idle_time_out: None,
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    }
}

fn begin() -> Begin {
    Begin {
        remote_channel: None,
        next_outgoing_id: 0,
        incoming_window: 1000,
        outgoing_window: 1000,
        handle_max: Handle(u32::MAX),
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    }
}

fn transfer(handle: u32, id: u32, more: bool) -> Transfer {
    Transfer {
        handle: Handle(handle),
        delivery_id: Some(id),
        delivery_tag: Some(vec![id as u8].into()),
        message_format: Some(0),
        settled: Some(false),
        more,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    }
}

fn flow(handle: u32, credit: u32) -> Flow {
    Flow {
        next_incoming_id: Some(0),
        incoming_window: 1000,
        next_outgoing_id: 0,
        outgoing_window: 1000,
        handle: Some(Handle(handle)),
        delivery_count: Some(0),
        link_credit: Some(credit),
        available: None,
        drain: false,
        echo: false,
        properties: None,
    }
}

/// An encoded put-token request for module `m` of the test hub, with message-id `id`.
fn put_token(hub: &TestHub, m: &str, id: &str) -> Vec<u8> {
    let key = device_key(&hub.settings).unwrap();
    let keys = module_keys(&hub.settings, &key, &ModuleId::parse(m).unwrap());
    let audience = format!("{IOTHUB}/devices/edge1/modules/{m}");
    let expiry = edgehub::model::sas::now_secs() + 3600;
    let token = edgehub::model::sas::make_token(&audience, &keys.primary, expiry, None);
    let mut app = serde_amqp::primitives::OrderedMap::new();
    for (k, v) in [
        ("operation", "put-token"),
        ("type", "servicebus.windows.net:sastoken"),
        ("name", audience.as_str()),
    ] {
        app.insert(k.to_owned(), SimpleValue::String(v.to_owned()));
    }
    let msg: Message<Body<Value>> = Message::builder()
        .properties(Properties {
            message_id: Some(id.to_owned().into()),
            ..Default::default()
        })
        .application_properties(ApplicationProperties(app))
        .body(Body::Value(AmqpValue(Value::String(token))))
        .build();
    serde_amqp::to_vec(&Serializable(msg)).unwrap()
}

#[tokio::test]
async fn a_frame_larger_than_the_hub_accepts_closes_the_connection_before_the_open() {
    let hub = start_hub("{}", r#"{"handshakeTimeoutSecs": 120}"#).await;
    let mut raw = Raw::connect(&hub).await;
    raw.write(b"AMQP\x00\x01\x00\x00").await;
    // A frame header declaring almost 4 GiB; its bytes would follow.
    raw.write(&[0xff, 0xff, 0xff, 0x00, 2, 0, 0, 0]).await;
    raw.write(&[0u8; 64 * 1024]).await;
    assert_eq!(raw.closed_with().await, "amqp:connection:framing-error");
    hub.stop().await;
}

#[tokio::test]
async fn an_oversized_sasl_frame_drops_the_connection_at_once() {
    let hub = start_hub("{}", r#"{"handshakeTimeoutSecs": 120}"#).await;
    let mut raw = Raw::connect(&hub).await;
    raw.write(b"AMQP\x03\x01\x00\x00").await;
    // A SASL init declaring 1 MiB.
    raw.write(&[0, 0x10, 0, 0, 2, 1, 0, 0]).await;
    raw.ends().await;
    hub.stop().await;
}

#[tokio::test]
async fn an_open_with_a_max_frame_size_below_512_is_refused() {
    let hub = start_hub("{}", r#"{"handshakeTimeoutSecs": 120}"#).await;
    let mut raw = Raw::connect(&hub).await;
    raw.write(b"AMQP\x00\x01\x00\x00").await;
    let open = Open {
        max_frame_size: MaxFrameSize(100),
        ..client_open()
    };
    raw.send(0, Performative::Open(open), &[]).await;
    assert_eq!(raw.closed_with().await, "amqp:invalid-field");
    hub.stop().await;
}

#[tokio::test]
async fn a_malformed_frame_before_the_open_gets_a_decode_error_and_the_socket_drops() {
    let hub = start_hub("{}", r#"{"handshakeTimeoutSecs": 120}"#).await;
    let mut raw = Raw::connect(&hub).await;
    raw.write(b"AMQP\x00\x01\x00\x00").await;
    // An open descriptor followed by bytes that are no list.
    raw.write(&frame_bytes(0, 0, &[0x00, 0x53, 0x10, 0xff, 0xff, 0xff]))
        .await;
    assert_eq!(raw.closed_with().await, "amqp:decode-error");

    let mut raw = Raw::connect(&hub).await;
    raw.write(b"AMQP\x00\x01\x00\x00").await;
    // A data offset below the frame header.
    raw.write(&[0, 0, 0, 16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .await;
    assert_eq!(raw.closed_with().await, "amqp:connection:framing-error");
    hub.stop().await;
}

#[tokio::test]
async fn a_begin_above_the_channel_max_closes_the_connection() {
    let hub = start_hub(
        "{}",
        r#"{"handshakeTimeoutSecs": 120, "maxSessionsPerConnection": 4}"#,
    )
    .await;
    let mut raw = Raw::connect(&hub).await;
    let theirs = raw.open(client_open()).await;
    assert_eq!(theirs.channel_max.0, 3, "the hub announces its session cap");
    raw.send(9, Performative::Begin(begin()), &[]).await;
    assert_eq!(raw.closed_with().await, "amqp:connection:framing-error");
    hub.stop().await;
}

#[tokio::test]
async fn a_transfer_or_flow_on_a_handle_never_attached_ends_the_session() {
    let hub = start_hub("{}", "{}").await;
    for frame in [
        Performative::Transfer(transfer(7, 0, false)),
        Performative::Flow(flow(7, 10)),
    ] {
        let mut raw = Raw::connect(&hub).await;
        raw.open(client_open()).await;
        raw.begin(0).await;
        raw.send(0, frame, b"\x00\x53\x77\xa1\x01x").await;
        let error = raw
            .until(|f| match &f.performative {
                Some(Performative::End(End { error })) => Some(error.clone()),
                _ => None,
            })
            .await;
        assert_eq!(condition(error), "amqp:session:unattached-handle");
    }
    hub.stop().await;
}

#[tokio::test]
async fn before_a_token_only_two_cbs_links_each_way_and_small_cbs_messages() {
    let hub = start_hub("{}", "{}").await;
    let mut raw = Raw::connect(&hub).await;
    raw.open(client_open()).await;
    raw.begin(0).await;
    for (i, name) in ["cbs-1", "cbs-2", "cbs-3"].into_iter().enumerate() {
        raw.attach(name, i as u32, Role::Sender, "$cbs").await;
        let a = raw.attached(name).await;
        assert_eq!(a.max_message_size, Some(64 * 1024), "{name}");
    }
    let error = raw
        .until(|f| match &f.performative {
            Some(Performative::Detach(Detach {
                handle,
                error: Some(e),
                ..
            })) => Some((handle.0, Some(e.clone()))),
            _ => None,
        })
        .await;
    assert_eq!(error.0, 2, "the third link is the one refused");
    assert_eq!(condition(error.1), "amqp:unauthorized-access");
    // A link to anything else than $cbs is refused too.
    raw.attach("twin", 3, Role::Sender, "/devices/edge1/modules/A/twin")
        .await;
    let error = raw
        .until(|f| match &f.performative {
            Some(Performative::Detach(Detach {
                handle: _,
                error: Some(e),
                ..
            })) => Some(Some(e.clone())),
            _ => None,
        })
        .await;
    assert_eq!(condition(error), "amqp:unauthorized-access");
    hub.stop().await;
}

#[tokio::test]
async fn unfinished_deliveries_before_a_token_are_bounded() {
    let hub = start_hub("{}", "{}").await;
    let mut raw = Raw::connect(&hub).await;
    raw.open(client_open()).await;
    raw.begin(0).await;
    raw.attach("cbs", 0, Role::Sender, "$cbs").await;
    raw.attached("cbs").await;
    raw.until(|f| matches!(f.performative, Some(Performative::Flow(_))).then_some(()))
        .await;
    // One delivery that never ends, 16 KiB a frame; the hub gives up long before 1 MiB.
    let chunk = vec![0x40u8; 16 * 1024];
    let mut closed = None;
    for _ in 0..64 {
        let mut body = serde_amqp::to_vec(&Performative::Transfer(transfer(0, 0, true))).unwrap();
        body.extend_from_slice(&chunk);
        if raw.tls.write_all(&frame_bytes(0, 0, &body)).await.is_err() {
            break;
        }
        let _ = raw.tls.flush().await;
        // See whether the hub has answered yet, without waiting long for it.
        if let Ok(f) = timeout(Duration::from_millis(50), raw.read()).await {
            match f {
                Some(Frame {
                    performative: Some(Performative::Close(Close { error })),
                    ..
                }) => {
                    closed = Some(condition(error));
                    break;
                }
                None => break,
                Some(_) => {}
            }
        }
    }
    let condition = match closed {
        Some(c) => c,
        None => raw.closed_with().await,
    };
    // Past the $cbs links' max-message-size (64 KiB); the connection-wide budget for several
    // such deliveries is covered by the frame guard's unit tests.
    assert_eq!(condition, "amqp:link:message-size-exceeded");
    hub.stop().await;
}

#[tokio::test]
async fn a_connection_that_never_puts_a_token_is_closed_at_the_auth_deadline() {
    let hub = start_hub("{}", r#"{"authTimeoutSecs": 1}"#).await;
    let mut raw = Raw::connect(&hub).await;
    raw.open(client_open()).await;
    raw.begin(0).await;
    assert_eq!(raw.closed_with().await, "amqp:unauthorized-access");
    hub.stop().await;
}

#[tokio::test]
async fn a_silent_peer_is_closed_after_the_idle_time_out() {
    let hub = start_hub(
        "{}",
        r#"{"idleTimeoutSecs": 1, "authTimeoutSecs": 600, "handshakeTimeoutSecs": 600}"#,
    )
    .await;
    let mut raw = Raw::connect(&hub).await;
    let theirs = raw.open(client_open()).await;
    assert_eq!(theirs.idle_time_out, Some(1000));
    raw.ends().await;
    hub.stop().await;
}

#[tokio::test]
async fn silent_sockets_never_lock_an_authenticating_module_out() {
    let hub = start_hub(
        "{}",
        r#"{"maxConnections": 4, "handshakeTimeoutSecs": 600, "authTimeoutSecs": 600}"#,
    )
    .await;
    let addr = hub.hub.as_ref().unwrap().amqps_addr;
    // More silent sockets than the hub has slots, each from a peer that never speaks.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    // Two in the middle of a TLS session and an open, never authenticating.
    let mut opened = Vec::new();
    for _ in 0..2 {
        let mut raw = Raw::connect(&hub).await;
        raw.open(client_open()).await;
        opened.push(raw);
    }
    let key = device_key(&hub.settings).unwrap();
    let keys = module_keys(&hub.settings, &key, &ModuleId::parse("A").unwrap());
    let ca = hub.settings.data_dir.join("certs").join("edge-ca.pem");
    // The target is a connection within 1 s of trying (the benchmark measures ~20 ms).
    let client = timeout(
        Duration::from_secs(1),
        edgehub::client::Client::connect(
            addr,
            "localhost",
            &ca,
            IOTHUB,
            &hub.module("A"),
            &keys.primary,
        ),
    )
    .await
    .expect("the module connects at once")
    .expect("the module connects");
    // The oldest connection that never authenticated made room, and was told why.
    assert_eq!(
        opened[0].closed_with().await,
        "amqp:resource-limit-exceeded"
    );
    drop(client);
    drop(silent);
    drop(opened);
    hub.stop().await;
}

#[tokio::test]
async fn a_refused_link_whose_detach_is_never_answered_does_not_stall_the_session() {
    let hub = start_hub("{}", "{}").await;
    let mut raw = Raw::connect(&hub).await;
    raw.open(client_open()).await;
    raw.begin(0).await;
    raw.attach("nowhere", 0, Role::Receiver, "/no/such/node")
        .await;
    raw.until(|f| match &f.performative {
        Some(Performative::Detach(d)) if d.handle.0 == 0 && d.error.is_some() => Some(()),
        _ => None,
    })
    .await;
    // The detach is never answered; the next attach is still served.
    raw.attach("cbs", 1, Role::Sender, "$cbs").await;
    raw.attached("cbs").await;
    hub.stop().await;
}

#[tokio::test]
async fn shutdown_ends_in_bound_when_peers_stop_answering() {
    let hub = start_hub(
        "{}",
        r#"{"shutdownTimeoutSecs": 2, "authTimeoutSecs": 600}"#,
    )
    .await;
    let mut raw = Raw::connect(&hub).await;
    raw.open(client_open()).await;
    raw.begin(0).await;
    raw.attach("cbs", 0, Role::Sender, "$cbs").await;
    raw.attached("cbs").await;
    raw.attach("cbs-reply", 1, Role::Receiver, "$cbs").await;
    raw.attached("cbs-reply").await;
    // The client now reads nothing and answers nothing.
    let started = std::time::Instant::now();
    let hub_inner = {
        let mut hub = hub;
        let h = hub.hub.take().unwrap();
        (h, hub)
    };
    timeout(Duration::from_secs(8), hub_inner.0.shutdown())
        .await
        .expect("shutdown ends within its bound");
    assert!(started.elapsed() < Duration::from_secs(8));
    drop(raw);
}

#[tokio::test]
async fn a_put_token_sent_before_the_response_link_attaches_gets_its_reply() {
    let hub = start_hub("{}", "{}").await;
    let mut raw = Raw::connect(&hub).await;
    raw.open(client_open()).await;
    raw.begin(0).await;
    raw.attach("cbs", 0, Role::Sender, "$cbs").await;
    raw.attached("cbs").await;
    raw.until(|f| matches!(f.performative, Some(Performative::Flow(_))).then_some(()))
        .await;
    // The put-token goes as soon as the request link has credit; the hub settles it before
    // any response link exists.
    raw.send(
        0,
        Performative::Transfer(transfer(0, 0, false)),
        &put_token(&hub, "A", "req-1"),
    )
    .await;
    raw.until(|f| matches!(f.performative, Some(Performative::Disposition(_))).then_some(()))
        .await;
    raw.attach("cbs-reply", 1, Role::Receiver, "$cbs").await;
    let theirs = raw.attached("cbs-reply").await;
    raw.send(0, Performative::Flow(flow(1, 10)), &[]).await;
    let payload = raw
        .until(|f| match &f.performative {
            Some(Performative::Transfer(t)) if t.handle == theirs.handle => Some(f.payload.clone()),
            _ => None,
        })
        .await;
    let Deserializable(reply): Deserializable<Message<Body<Value>>> =
        serde_amqp::from_slice(&payload).unwrap();
    let status = reply
        .application_properties
        .as_ref()
        .and_then(|a| a.0.get("status-code").cloned());
    assert_eq!(status, Some(SimpleValue::Int(200)));
    assert_eq!(
        reply.properties.and_then(|p| p.correlation_id),
        Some("req-1".to_owned().into())
    );
    hub.stop().await;
}

#[tokio::test]
async fn after_a_token_a_session_holds_at_most_max_links_per_session() {
    let hub = start_hub("{}", r#"{"maxLinksPerSession": 3}"#).await;
    let mut raw = Raw::connect(&hub).await;
    raw.open(client_open()).await;
    raw.begin(0).await;
    raw.attach("cbs", 0, Role::Sender, "$cbs").await;
    raw.attached("cbs").await;
    raw.until(|f| matches!(f.performative, Some(Performative::Flow(_))).then_some(()))
        .await;
    raw.attach("cbs-reply", 1, Role::Receiver, "$cbs").await;
    raw.attached("cbs-reply").await;
    raw.send(0, Performative::Flow(flow(1, 10)), &[]).await;
    raw.send(
        0,
        Performative::Transfer(transfer(0, 0, false)),
        &put_token(&hub, "A", "req-1"),
    )
    .await;
    raw.until(|f| matches!(f.performative, Some(Performative::Transfer(_))).then_some(()))
        .await;
    let twin = "/devices/edge1/modules/A/twin";
    raw.attach("twin-out", 2, Role::Sender, twin).await;
    raw.attached("twin-out").await;
    raw.attach("twin-in", 3, Role::Receiver, twin).await;
    raw.attached("twin-in").await;
    let error = raw
        .until(|f| match &f.performative {
            Some(Performative::Detach(Detach {
                handle,
                error: Some(e),
                ..
            })) => Some((handle.0, Some(e.clone()))),
            _ => None,
        })
        .await;
    assert_eq!(condition(error.1), "amqp:resource-limit-exceeded");
    hub.stop().await;
}

#[tokio::test]
async fn sigterm_ends_the_process_in_bound_while_a_peer_is_silent() {
    use std::io::{BufRead, BufReader};
    let dir = std::env::temp_dir().join(format!("edgehub-sigterm-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data");
    let config = format!(
        r#"{{"deviceId": "edge1", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
            "listen": {{"amqps": "127.0.0.1:0", "mqtts": null, "https": null, "metrics": null}},
            "dataDir": "{}", "modules": {{"A": {{}}}},
            "limits": {{"shutdownTimeoutSecs": 2, "authTimeoutSecs": 600}},
            "$edgeHub": {{"schemaVersion": "1.1", "routes": {{}},
                          "storeAndForwardConfiguration": {{"timeToLiveSecs": 60}}}}}}"#,
        data.display()
    );
    let path = dir.join("edgehub.json");
    std::fs::write(&path, config).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edgehub"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("amqps=").nth(1) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(
                        rest.split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned(),
                    );
                }
            }
        }
    });
    let addr = timeout(WAIT, rx).await.unwrap().unwrap().parse().unwrap();
    let mut raw = Raw::connect_to(addr, &data.join("certs").join("edge-ca.pem")).await;
    raw.open(client_open()).await;
    raw.begin(0).await;
    raw.attach("cbs", 0, Role::Sender, "$cbs").await;
    raw.attached("cbs").await;
    raw.attach("cbs-reply", 1, Role::Receiver, "$cbs").await;
    raw.attached("cbs-reply").await;
    // From here on the client answers nothing.
    let pid = child.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut waiting = tokio::task::spawn_blocking(move || child.wait());
    let status = match timeout(Duration::from_secs(8), &mut waiting).await {
        Ok(done) => done.unwrap().unwrap(),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status();
            panic!("the hub did not exit within its shutdown bound");
        }
    };
    assert!(status.success(), "{status:?}");
    drop(raw);
    let _ = std::fs::remove_dir_all(dir);
}
