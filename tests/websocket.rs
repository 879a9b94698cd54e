//! AMQP over WebSockets on the HTTPS listener: the same connections as AMQPS (routes, limits,
//! metrics), the upgrade refusals, and the HTTPS API still served on the same port.

#![allow(clippy::unwrap_used, reason = "tests fail on any error")]

mod common;

use common::{start_hub_https, start_hub_https_limits, WAIT};
use fe2o3_amqp::types::{
    messaging::{Body, Message, Outcome, Properties},
    primitives::Value,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    time::timeout,
};

const ROUTES: &str = r#"{
    "aToB": "FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint(\"/modules/B/inputs/in1\")",
    "bToA": "FROM /messages/modules/B/outputs/out1 INTO BrokeredEndpoint(\"/modules/A/inputs/in1\")"
}"#;

fn output(id: &str) -> Message<Body<Value>> {
    Message::builder()
        .properties(Properties {
            message_id: Some(id.to_owned().into()),
            ..Default::default()
        })
        .application_properties(
            fe2o3_amqp::types::messaging::ApplicationProperties::builder()
                .insert("iothub-outputname", "out1")
                .build(),
        )
        .body(Body::Data(
            vec![fe2o3_amqp::types::messaging::Data(
                fe2o3_amqp::types::primitives::Binary::from(id.as_bytes().to_vec()),
            )]
            .into(),
        ))
        .build()
}

#[tokio::test]
async fn modules_over_websockets_and_amqps_exchange_messages() {
    let hub = start_hub_https(ROUTES, "").await;
    let mut a = hub.connect_ws("A").await;
    let mut b = hub.connect("B").await;
    let mut a_tx = a
        .sender("/devices/edge1/modules/A/messages/events")
        .await
        .unwrap();
    let mut a_rx = a
        .receiver("/devices/edge1/modules/A/messages/events")
        .await
        .unwrap();
    let mut b_tx = b
        .sender("/devices/edge1/modules/B/messages/events")
        .await
        .unwrap();
    let mut b_rx = b
        .receiver("/devices/edge1/modules/B/messages/events")
        .await
        .unwrap();
    // A (WebSocket) → B (AMQPS), and back; a batch each way, larger than one frame for the last.
    for i in 0..20 {
        let o = timeout(WAIT, a_tx.send(output(&format!("a{i}"))))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(o, Outcome::Accepted(_)), "{o:?}");
    }
    for i in 0..20 {
        let d = timeout(WAIT, b_rx.recv::<Body<Value>>())
            .await
            .unwrap()
            .unwrap();
        b_rx.accept(&d).await.unwrap();
        let id = d.message().properties.as_ref().unwrap().message_id.clone();
        assert_eq!(id, Some(format!("a{i}").into()));
    }
    let mut big = output("big");
    big.body = Body::Data(
        vec![fe2o3_amqp::types::messaging::Data(
            fe2o3_amqp::types::primitives::Binary::from(vec![7u8; 600 * 1024]),
        )]
        .into(),
    );
    let o = timeout(WAIT, b_tx.send(big)).await.unwrap().unwrap();
    assert!(matches!(o, Outcome::Accepted(_)), "{o:?}");
    let d = timeout(WAIT, a_rx.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    a_rx.accept(&d).await.unwrap();
    match &d.message().body {
        Body::Data(batch) => assert_eq!(batch.iter().map(|x| x.0.len()).sum::<usize>(), 600 * 1024),
        other => panic!("{other:?}"),
    }
    // Counted as any connection is.
    let metrics = hub.scrape().await;
    assert!(
        metrics.contains("edgehub_client_connect_success_total{") && metrics.contains("edge1/A"),
        "{metrics}"
    );
    a.close().await;
    b.close().await;
    hub.stop().await;
}

/// Sends `request` on a fresh TLS connection to the HTTPS listener and returns the status and
/// the whole head.
async fn raw(hub: &common::TestHub, request: &str) -> (u16, String) {
    let mut tls = hub.https_stream().await;
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = timeout(WAIT, tls.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, head)
}

fn upgrade(path: &str, protocol: Option<&str>) -> String {
    let protocol = protocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{protocol}\r\n"
    )
}

#[tokio::test]
async fn wrong_paths_and_subprotocols_are_refused_and_the_api_still_answers() {
    let hub = start_hub_https("{}", "").await;
    let (status, _) = raw(&hub, &upgrade("/$iothub/other", Some("AMQPWSB10"))).await;
    assert_eq!(status, 404);
    let (status, _) = raw(&hub, &upgrade("/", Some("AMQPWSB10"))).await;
    assert_eq!(status, 404);
    let (status, _) = raw(&hub, &upgrade("/$iothub/websocket", None)).await;
    assert_eq!(status, 400);
    let (status, _) = raw(&hub, &upgrade("/$iothub/websocket", Some("mqttv3.1"))).await;
    assert_eq!(status, 400);
    let (status, head) = raw(
        &hub,
        &upgrade("/$iothub/websocket", Some("mqttv3.1, AMQPWSB10")),
    )
    .await;
    assert_eq!(status, 101, "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("sec-websocket-protocol: amqpwsb10"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    // The API on the same port: an unauthenticated method call is refused as before.
    let r = hub
        .https("POST", "/twins/edge1/modules/B/methods", &[], "{}")
        .await;
    assert_eq!(r.status, 401, "{r:?}");
    hub.stop().await;
}

#[tokio::test]
async fn websocket_connections_count_against_the_same_connection_slots() {
    let hub = start_hub_https_limits(
        "{}",
        "",
        r#"{"maxConnections": 1, "handshakeTimeoutSecs": 30}"#,
    )
    .await;
    // An authenticated AMQPS module holds the only slot: the upgrade is refused with 503.
    let first = hub.connect("A").await;
    let (status, _) = raw(&hub, &upgrade("/$iothub/websocket", Some("AMQPWSB10"))).await;
    assert_eq!(status, 503);
    first.close().await;
    // Once it is gone a module connects over the WebSocket and holds the slot in turn.
    let ws = timeout(WAIT, async {
        loop {
            let key = edgehub::app::device_key(&hub.settings).unwrap();
            let keys = edgehub::core::auth::module_keys(
                &hub.settings,
                &key,
                &edgehub::model::identity::ModuleId::parse("B").unwrap(),
            );
            let ca = hub.settings.data_dir.join("certs").join("edge-ca.pem");
            let c = edgehub::client::Client::connect_ws(
                hub.hub.as_ref().unwrap().https_addr.unwrap(),
                "localhost",
                &ca,
                common::IOTHUB,
                &hub.module("B"),
                &keys.primary,
            )
            .await;
            match c {
                Ok(c) => break c,
                // The slot is freed when the hub has seen the close: try again.
                Err(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await
    .expect("a WebSocket connection once the slot is free");
    let mut second = tokio::net::TcpStream::connect(hub.hub.as_ref().unwrap().amqps_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let r = timeout(WAIT, second.read(&mut buf))
        .await
        .expect("the AMQPS connection is closed");
    assert!(matches!(r, Ok(0) | Err(_)));
    ws.close().await;
    hub.stop().await;
}
