//! Socket tests: a real hub on loopback, driven by the fe2o3 client.

mod common;

use common::{start_hub, start_hub_with, WAIT};
use edgehub::message::{CONNECTION_DEVICE_ID, CONNECTION_MODULE_ID, INPUT_NAME_ANNOTATION};
use fe2o3_amqp::types::{
    messaging::{annotations::OwnedKey, Body, Message, Outcome, Properties},
    primitives::{Symbol, Value},
};
use fe2o3_amqp::Sendable;
use tokio::time::timeout;

const ROUTES: &str = r#"{
    "aToB": "FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint(\"/modules/B/inputs/in1\")"
}"#;
const A_EVENTS: &str = "/devices/edge1/modules/A/messages/events";
const B_INPUTS: &str = "/devices/edge1/modules/B/messages/events";

fn output(body: &str, id: &str) -> Message<Body<Value>> {
    Message::builder()
        .properties(Properties {
            message_id: Some(id.to_owned().into()),
            ..Default::default()
        })
        .application_properties(
            fe2o3_amqp::types::messaging::ApplicationProperties::builder()
                .insert("iothub-outputname", "out1")
                .insert("k", "v")
                .build(),
        )
        .body(Body::Data(
            vec![fe2o3_amqp::types::messaging::Data(
                fe2o3_amqp::types::primitives::Binary::from(body.as_bytes().to_vec()),
            )]
            .into(),
        ))
        .build()
}

fn annotation(m: &Message<Body<Value>>, key: &str) -> Option<Value> {
    m.message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::Symbol(Symbol::from(key)))
        .cloned()
}

#[tokio::test]
async fn a_module_output_reaches_the_routed_input_with_the_sender_stamped() {
    let hub = start_hub(ROUTES, "{}").await;
    let mut a = hub.connect("A").await;
    let mut b = hub.connect("B").await;
    let mut rx = b.receiver(B_INPUTS).await.unwrap();
    let mut tx = a.sender(A_EVENTS).await.unwrap();
    let mut m = output("hello", "m1");
    // A sender cannot pretend to be someone else.
    m.message_annotations = Some(
        fe2o3_amqp::types::messaging::MessageAnnotations::builder()
            .insert(
                OwnedKey::Symbol(Symbol::from(CONNECTION_MODULE_ID)),
                Value::String("forged".into()),
            )
            .build(),
    );
    let outcome = timeout(WAIT, tx.send(m)).await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)));
    let d = timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    rx.accept(&d).await.unwrap();
    let msg = d.message();
    assert_eq!(
        annotation(msg, INPUT_NAME_ANNOTATION),
        Some(Value::String("in1".into()))
    );
    assert_eq!(
        annotation(msg, CONNECTION_DEVICE_ID),
        Some(Value::String("edge1".into()))
    );
    assert_eq!(
        annotation(msg, CONNECTION_MODULE_ID),
        Some(Value::String("A".into()))
    );
    let props = msg.application_properties.as_ref().unwrap();
    assert!(props.0.get("iothub-outputname").is_none());
    match &msg.body {
        Body::Data(b) => assert_eq!(b.iter().next().unwrap().0.as_slice(), b"hello"),
        other => panic!("body {other:?}"),
    }
    a.close().await;
    b.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn many_messages_are_in_flight_to_a_module_and_abandoned_ones_come_back() {
    let hub = start_hub(ROUTES, r#"{"deliveryWindow": 64}"#).await;
    let mut a = hub.connect("A").await;
    let mut b = hub.connect("B").await;
    let mut rx = b.receiver(B_INPUTS).await.unwrap();
    let mut tx = a.sender(A_EVENTS).await.unwrap();
    for i in 0..100 {
        let o = timeout(WAIT, tx.send(output("x", &format!("m{i}"))))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(o, Outcome::Accepted(_)));
    }
    // Receive 64 without settling any: the hub keeps a window of unsettled deliveries open.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(
            timeout(WAIT, rx.recv::<Body<Value>>())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // Abandon the first: it comes back (after the rest of the window is used) with a higher count.
    let first_id = held[0]
        .message()
        .properties
        .as_ref()
        .unwrap()
        .message_id
        .clone();
    rx.release(&held[0]).await.unwrap();
    for d in &held[1..] {
        rx.accept(d).await.unwrap();
    }
    let mut seen_again = false;
    for _ in 0..37 {
        let d = timeout(WAIT, rx.recv::<Body<Value>>())
            .await
            .unwrap()
            .unwrap();
        if d.message().properties.as_ref().unwrap().message_id == first_id {
            assert_eq!(
                annotation(d.message(), "iothub-deliverycount"),
                Some(Value::Ubyte(1))
            );
            seen_again = true;
        }
        rx.accept(&d).await.unwrap();
    }
    assert!(seen_again, "the abandoned message was redelivered");
    let metrics = hub.scrape().await;
    assert!(
        metrics.contains("edgehub_messages_sent_total{"),
        "{metrics}"
    );
    a.close().await;
    b.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn unrouted_messages_are_accepted_and_counted_as_dropped() {
    let hub = start_hub("{}", "{}").await;
    let mut a = hub.connect("A").await;
    let mut tx = a.sender(A_EVENTS).await.unwrap();
    let o = timeout(WAIT, tx.send(Sendable::from(output("x", "lost"))))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(o, Outcome::Accepted(_)));
    let metrics = hub.scrape().await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("edgehub_messages_dropped_total{")
                && l.contains("reason=\"no_route\"")
                && l.contains("from=\"edge1/A\"")
        })
        .unwrap_or_else(|| panic!("no drop line in {metrics}"));
    assert!(
        line.ends_with(" 1") || line.split(' ').next_back().unwrap().parse::<f64>().unwrap() >= 1.0
    );
    a.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn messages_queued_for_an_offline_module_wait_for_it() {
    let hub = start_hub(ROUTES, "{}").await;
    let mut a = hub.connect("A").await;
    let mut tx = a.sender(A_EVENTS).await.unwrap();
    for i in 0..5 {
        let o = timeout(WAIT, tx.send(output("x", &format!("q{i}"))))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(o, Outcome::Accepted(_)));
    }
    // The queue holds them (read from the hub itself: the metrics registry is shared by every
    // hub in this test process, which run in parallel with the same endpoint names).
    let core = hub.hub.as_ref().unwrap().core.clone();
    let router = core.router();
    let queue = router.endpoints().find(|e| e.id == "edge1/B/in1").unwrap();
    assert_eq!(queue.store.len(), 5);
    let metrics = hub.scrape().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("edgehub_queue_length{")
                && l.contains("endpoint=\"edge1/B/in1\"")),
        "{metrics}"
    );
    let mut b = hub.connect("B").await;
    let mut rx = b.receiver(B_INPUTS).await.unwrap();
    for i in 0..5 {
        let d = timeout(WAIT, rx.recv::<Body<Value>>())
            .await
            .unwrap()
            .unwrap();
        let id = d.message().properties.as_ref().unwrap().message_id.clone();
        assert_eq!(id, Some(format!("q{i}").into()), "FIFO order");
        rx.accept(&d).await.unwrap();
    }
    a.close().await;
    b.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn a_wrong_key_is_refused_with_401() {
    let hub = start_hub("{}", "{}").await;
    let other = edgehub::identity::Key::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        .unwrap();
    let ca = hub.settings.data_dir.join("certs").join("edge-ca.pem");
    let addr = hub.hub.as_ref().unwrap().amqps_addr;
    let r = timeout(
        WAIT,
        edgehub::client::Client::connect(
            addr,
            "localhost",
            &ca,
            common::IOTHUB,
            &hub.module("A"),
            &other,
        ),
    )
    .await
    .unwrap();
    match r {
        Err(edgehub::client::ClientError::Refused(401, _)) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a wrong key was accepted"),
    }
    hub.stop().await;
}

#[tokio::test]
async fn a_client_that_never_speaks_is_dropped_after_the_handshake_deadline() {
    let hub = start_hub("{}", r#"{"handshakeTimeoutSecs": 1}"#).await;
    let addr = hub.hub.as_ref().unwrap().amqps_addr;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16];
    // The hub closes the socket: read returns 0 (or an error) well within the wait.
    let r = timeout(WAIT, s.read(&mut buf))
        .await
        .expect("hub closed the idle socket");
    assert!(matches!(r, Ok(0) | Err(_)));
    hub.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once() {
    let hub = start_hub("{}", r#"{"maxConnections": 1, "handshakeTimeoutSecs": 30}"#).await;
    let addr = hub.hub.as_ref().unwrap().amqps_addr;
    // The first connection holds the only slot while it sits in its handshake.
    let _first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16];
    let r = timeout(WAIT, second.read(&mut buf))
        .await
        .expect("the second connection is closed");
    assert!(matches!(r, Ok(0) | Err(_)));
    hub.stop().await;
}

#[tokio::test]
async fn method_timeouts_and_disconnects_leave_no_entries_behind() {
    let hub = start_hub("{}", "{}").await;
    let core = hub.hub.as_ref().unwrap().core.clone();
    let mut b = hub.connect("B").await;
    let mut requests = b
        .receiver("/devices/edge1/modules/B/methods/devicebound")
        .await
        .unwrap();
    // The link is registered once the attach is answered; wait for it without sleeping.
    timeout(WAIT, async {
        while core.methods.links_len() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    for _ in 0..20 {
        let r = core
            .methods
            .invoke(
                &hub.module("B"),
                "silent",
                b"{}".to_vec(),
                std::time::Duration::from_millis(20),
                std::time::Duration::ZERO,
            )
            .await;
        assert!(
            matches!(r, Err(edgehub::methods::MethodError::Timeout(..))),
            "{r:?}"
        );
    }
    assert_eq!(core.methods.pending_len(), 0);
    // The requests arrived at B with the method name and a uuid correlation id.
    let d = timeout(WAIT, requests.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    let props = d.message().application_properties.as_ref().unwrap();
    assert_eq!(
        props.0.get("IoThub-methodname"),
        Some(&fe2o3_amqp::types::primitives::SimpleValue::String(
            "silent".into()
        ))
    );
    assert!(matches!(
        d.message().properties.as_ref().unwrap().correlation_id,
        Some(fe2o3_amqp::types::messaging::MessageId::Uuid(_))
    ));
    requests.close().await.unwrap();
    timeout(WAIT, async {
        while core.methods.links_len() != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the method link is unregistered when it closes");
    let r = core
        .methods
        .invoke(
            &hub.module("B"),
            "m",
            vec![],
            std::time::Duration::from_secs(1),
            std::time::Duration::ZERO,
        )
        .await;
    assert!(matches!(
        r,
        Err(edgehub::methods::MethodError::NotConnected(_))
    ));
    b.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn shutdown_detaches_links_with_a_retryable_condition() {
    let hub = start_hub(ROUTES, "{}").await;
    let mut b = hub.connect("B").await;
    let mut rx = b.receiver(B_INPUTS).await.unwrap();
    hub.stop().await;
    // The link ends with detach-forced, which the SDKs retry.
    let err = timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap_err();
    let text = format!("{err:?}");
    assert!(text.contains("DetachForced"), "{text}");
}

#[tokio::test]
async fn a_full_store_refuses_new_messages_and_keeps_the_accepted_ones() {
    let hub = start_hub_with(
        ROUTES,
        "{}",
        r#"{"timeToLiveSecs": 7200, "storeLimits": {"maxSizeBytes": 2000}}"#,
    )
    .await;
    let mut a = hub.connect("A").await;
    let mut tx = a.sender(A_EVENTS).await.unwrap();
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..50 {
        match timeout(WAIT, tx.send(output(&"x".repeat(200), &format!("m{i}"))))
            .await
            .unwrap()
        {
            Ok(Outcome::Accepted(_)) => accepted.push(i),
            Ok(Outcome::Rejected(r)) => {
                refused = r.error;
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let error = refused.expect("the store filled up");
    assert_eq!(
        error.condition,
        fe2o3_amqp::types::definitions::AmqpError::ResourceLimitExceeded.into()
    );
    assert!(error
        .description
        .unwrap_or_default()
        .contains("maxSizeBytes"));
    assert!(!accepted.is_empty());
    // Everything accepted is delivered.
    let mut b = hub.connect("B").await;
    let mut rx = b.receiver(B_INPUTS).await.unwrap();
    for i in &accepted {
        let d = timeout(WAIT, rx.recv::<Body<Value>>())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            d.message().properties.as_ref().unwrap().message_id,
            Some(format!("m{i}").into())
        );
        rx.accept(&d).await.unwrap();
    }
    a.close().await;
    b.close().await;
    hub.stop().await;
}
