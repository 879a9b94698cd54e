//! Socket tests: a real hub on loopback, driven by the fe2o3 client.

mod common;

use common::{start_hub, start_hub_with, WAIT};
use edgehub::model::message::{CONNECTION_DEVICE_ID, CONNECTION_MODULE_ID, INPUT_NAME_ANNOTATION};
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
    // 16-byte tags: the C# SDK makes its lock token a GUID from the tag.
    assert_eq!(d.delivery_tag().len(), 16);
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
async fn unsettled_bytes_to_one_input_link_are_capped() {
    // 30 000-byte bodies against a 65 536-byte cap: three go out (the third passes the cap),
    // then nothing until the module settles one.
    let hub = start_hub(
        ROUTES,
        r#"{"deliveryWindow": 256, "maxUnsettledBytesPerLink": 65536}"#,
    )
    .await;
    let mut a = hub.connect("A").await;
    let mut b = hub.connect("B").await;
    let mut rx = b.receiver(B_INPUTS).await.unwrap();
    let mut tx = a.sender(A_EVENTS).await.unwrap();
    let body = "x".repeat(30_000);
    for i in 0..10 {
        let o = timeout(WAIT, tx.send(output(&body, &format!("m{i}"))))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(o, Outcome::Accepted(_)));
    }
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            timeout(WAIT, rx.recv::<Body<Value>>())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // Without the cap the other seven are on the wire at once; with it none comes.
    let more = timeout(
        std::time::Duration::from_millis(500),
        rx.recv::<Body<Value>>(),
    )
    .await;
    assert!(more.is_err(), "a fourth delivery passed the byte cap");
    rx.accept(&held.remove(0)).await.unwrap();
    let next = timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    held.push(next);
    for d in &held {
        rx.accept(d).await.unwrap();
    }
    for _ in 0..6 {
        let d = timeout(WAIT, rx.recv::<Body<Value>>())
            .await
            .unwrap()
            .unwrap();
        rx.accept(&d).await.unwrap();
    }
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
    let other =
        edgehub::model::identity::Key::from_base64("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
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
    // An authenticated module holds the only slot (a connection still in its handshake would
    // make room instead; see amqp_limits.rs).
    let _first = hub.connect("A").await;
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
            matches!(r, Err(edgehub::core::methods::MethodError::Timeout(..))),
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
        Err(edgehub::core::methods::MethodError::NotConnected(_))
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

// ---- The service API and child edge hubs ----------------------------------------------------

/// A service policy key (any 32 bytes, base64).
const SERVICE_KEY: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
const SERVICE_EXTRA: &str = r#""servicePolicies": {"service": {"primaryKey": "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="}},
    "devices": {"child": {"edge": true}, "leaf": {}},"#;

fn service_token(key: &str, expiry: u64) -> String {
    edgehub::model::sas::make_token(
        common::IOTHUB,
        &edgehub::model::identity::Key::from_base64(key).expect("a test key"),
        expiry,
        Some("service"),
    )
}

fn in_an_hour() -> u64 {
    edgehub::model::sas::now_secs() + 3600
}

fn data_body(m: &Message<Body<Value>>) -> serde_json::Value {
    match &m.body {
        Body::Data(b) => {
            let bytes: Vec<u8> = b.iter().flat_map(|d| d.0.to_vec()).collect();
            serde_json::from_slice(&bytes).expect("a JSON body")
        }
        other => panic!("body {other:?}"),
    }
}

fn twin_request(op: &str, resource: &str, cid: &str, body: Option<&str>) -> Message<Body<Value>> {
    let annotations = fe2o3_amqp::types::messaging::MessageAnnotations::builder()
        .insert(
            OwnedKey::Symbol(Symbol::from("operation")),
            Value::String(op.into()),
        )
        .insert(
            OwnedKey::Symbol(Symbol::from("resource")),
            Value::String(resource.into()),
        )
        .build();
    let body = match body {
        Some(b) => Body::Data(
            vec![fe2o3_amqp::types::messaging::Data(
                fe2o3_amqp::types::primitives::Binary::from(b.as_bytes().to_vec()),
            )]
            .into(),
        ),
        None => Body::Empty,
    };
    Message::builder()
        .properties(Properties {
            correlation_id: Some(cid.to_owned().into()),
            ..Default::default()
        })
        .message_annotations(annotations)
        .body(body)
        .build()
}

async fn recv_message(rx: &mut fe2o3_amqp::link::Receiver) -> Message<Body<Value>> {
    let d = timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .expect("a message in time")
        .expect("a message");
    d.into_message()
}

/// Waits (bounded) until `ready` holds; for state the hub sets just after answering an attach.
async fn until(mut ready: impl FnMut() -> bool) {
    timeout(WAIT, async {
        while !ready() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("condition in time");
}

#[tokio::test]
async fn the_service_api_invokes_direct_methods() {
    let hub = common::start_hub_https("{}", SERVICE_EXTRA).await;
    let core = hub.hub.as_ref().unwrap().core.clone();
    let mut b = hub.connect("B").await;
    let address = "/devices/edge1/modules/B/methods/devicebound";
    let mut requests = b.receiver(address).await.unwrap();
    let mut responses = b.sender(address).await.unwrap();
    until(|| core.methods.is_registered(&hub.module("B"))).await;
    let token = service_token(SERVICE_KEY, in_an_hour());
    let auth = [
        ("authorization", token.as_str()),
        ("content-type", "application/json; charset=utf-8"),
    ];
    let call = hub.https(
        "POST",
        "/twins/edge1/modules/B/methods?api-version=2021-04-12",
        &auth,
        r#"{"methodName": "echo", "payload": {"n": 7}, "responseTimeoutInSeconds": 10, "connectTimeoutInSeconds": 0}"#,
    );
    let answer = async {
        let d = timeout(WAIT, requests.recv::<Body<Value>>())
            .await
            .unwrap()
            .unwrap();
        requests.accept(&d).await.unwrap();
        let request = d.message();
        let cid = request.properties.as_ref().unwrap().correlation_id.clone();
        let got = data_body(request);
        let reply = Message::builder()
            .properties(Properties {
                correlation_id: cid,
                ..Default::default()
            })
            .application_properties(
                fe2o3_amqp::types::messaging::ApplicationProperties::builder()
                    .insert("IoThub-status", 201)
                    .build(),
            )
            .body(Body::<Value>::Data(
                vec![fe2o3_amqp::types::messaging::Data(
                    fe2o3_amqp::types::primitives::Binary::from(
                        serde_json::json!({ "got": got }).to_string().into_bytes(),
                    ),
                )]
                .into(),
            ))
            .build();
        timeout(WAIT, responses.send(reply)).await.unwrap().unwrap();
    };
    let (reply, ()) = tokio::join!(call, answer);
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(
        reply.body,
        serde_json::json!({"status": 201, "payload": {"got": {"n": 7}}})
    );

    // Not connected, and not known: both 404, with IoT Hub's error codes.
    let body = r#"{"methodName": "m", "payload": null, "responseTimeoutInSeconds": 5}"#;
    for (path, code) in [
        ("/twins/edge1/modules/A/methods", "DeviceNotOnline"),
        ("/twins/child/modules/anything/methods", "DeviceNotOnline"),
        ("/twins/leaf/methods", "DeviceNotOnline"),
        ("/twins/edge1/modules/Z/methods", "ModuleNotFound"),
        ("/twins/nobody/methods", "DeviceNotFound"),
    ] {
        let r = hub.https("POST", path, &auth, body).await;
        assert_eq!(r.status, 404, "{path}");
        let message = r.body["Message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("ErrorCode:{code};")),
            "{path}: {message}"
        );
    }
    requests.close().await.unwrap();
    responses.close().await.unwrap();
    b.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn the_service_api_reads_and_patches_module_twins() {
    let hub = common::start_hub_https("{}", SERVICE_EXTRA).await;
    let core = hub.hub.as_ref().unwrap().core.clone();
    let mut b = hub.connect("B").await;
    let address = "/devices/edge1/modules/B/twin";
    let mut twin_out = b.receiver(address).await.unwrap();
    let mut twin_in = b.sender(address).await.unwrap();
    until(|| core.twins.has_link(&hub.module("B"))).await;
    // B subscribes to desired patches.
    timeout(
        WAIT,
        twin_in.send(twin_request(
            "PUT",
            "/notifications/twin/properties/desired",
            "sub",
            None,
        )),
    )
    .await
    .unwrap()
    .unwrap();
    let sub = recv_message(&mut twin_out).await;
    assert_eq!(
        sub.properties.unwrap().correlation_id,
        Some("sub".to_owned().into())
    );

    let token = service_token(SERVICE_KEY, in_an_hour());
    let auth = [("authorization", token.as_str())];
    let path = "/twins/edge1/modules/B?api-version=2021-04-12";
    let got = hub.https("GET", path, &auth, "").await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let twin = &got.body;
    assert_eq!(twin["deviceId"], "edge1");
    assert_eq!(twin["moduleId"], "B");
    assert_eq!(twin["status"], "enabled");
    assert_eq!(twin["connectionState"], "Connected");
    let etag = twin["etag"].as_str().unwrap().to_owned();
    assert_eq!(got.header("etag"), Some(format!("\"{etag}\"").as_str()));
    let version = twin["version"].as_i64().unwrap();
    let desired_version = twin["properties"]["desired"]["$version"].as_i64().unwrap();
    assert!(twin["properties"]["reported"]["$version"].is_i64());

    // A patch with the etag (quoted, as the SDKs send it): merged, versioned, pushed to B.
    let if_match = format!("\"{etag}\"");
    let patch = r#"{"tags": {"site": "north"}, "properties": {"desired": {"threshold": 9, "mode": {"eco": true}}}}"#;
    let mut headers = auth.to_vec();
    headers.push(("if-match", if_match.as_str()));
    headers.push(("content-type", "application/json; charset=utf-8"));
    let patched = hub.https("PATCH", path, &headers, patch).await;
    assert_eq!(patched.status, 200, "{:?}", patched.body);
    assert_eq!(patched.body["properties"]["desired"]["threshold"], 9);
    assert_eq!(
        patched.body["properties"]["desired"]["$version"],
        desired_version + 1
    );
    assert_eq!(patched.body["version"], version + 1);
    assert_ne!(patched.body["etag"], etag.as_str());
    let push = recv_message(&mut twin_out).await;
    assert!(push
        .properties
        .as_ref()
        .is_none_or(|p| p.correlation_id.is_none()));
    let pushed = data_body(&push);
    assert_eq!(pushed["threshold"], 9);
    assert_eq!(pushed["mode"], serde_json::json!({"eco": true}));
    assert_eq!(pushed["$version"], desired_version + 1);

    // The old etag no longer matches; `*` always does; null deletes.
    let stale = hub.https("PATCH", path, &headers, patch).await;
    assert_eq!(stale.status, 412, "{:?}", stale.body);
    assert!(stale.body["Message"]
        .as_str()
        .unwrap()
        .starts_with("ErrorCode:PreconditionFailed;"));
    let star = [auth[0], ("if-match", "*")];
    let deleted = hub
        .https(
            "PATCH",
            path,
            &star,
            r#"{"properties": {"desired": {"threshold": null}}}"#,
        )
        .await;
    assert_eq!(deleted.status, 200);
    assert!(deleted.body["properties"]["desired"]
        .get("threshold")
        .is_none());
    let push = data_body(&recv_message(&mut twin_out).await);
    assert_eq!(push["threshold"], serde_json::Value::Null);

    // B reports; the service reads it.
    timeout(
        WAIT,
        twin_in.send(twin_request(
            "PATCH",
            "/properties/reported",
            "rep",
            Some(r#"{"temp": 21}"#),
        )),
    )
    .await
    .unwrap()
    .unwrap();
    let _ = recv_message(&mut twin_out).await;
    let again = hub.https("GET", path, &auth, "").await;
    assert_eq!(again.body["properties"]["reported"]["temp"], 21);
    assert_eq!(again.body["version"], version + 3);

    // A leaf device's twin has no moduleId and nobody connected.
    let leaf = hub.https("GET", "/twins/leaf", &auth, "").await;
    assert_eq!(leaf.status, 200);
    assert_eq!(leaf.body["deviceId"], "leaf");
    assert!(leaf.body.get("moduleId").is_none());
    assert_eq!(leaf.body["connectionState"], "Disconnected");

    twin_in.close().await.unwrap();
    twin_out.close().await.unwrap();
    b.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn the_service_api_refuses_bad_requests_with_json_errors() {
    let hub = common::start_hub_https("{}", SERVICE_EXTRA).await;
    let token = service_token(SERVICE_KEY, in_an_hour());
    let ok = [("authorization", token.as_str())];
    let path = "/twins/edge1/modules/A";
    let wrong_key = service_token("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", in_an_hour());
    let expired = service_token(SERVICE_KEY, edgehub::model::sas::now_secs() - 600);
    let key = edgehub::app::device_key(&hub.settings).unwrap();
    let a_key = edgehub::core::auth::module_keys(
        &hub.settings,
        &key,
        &edgehub::model::identity::ModuleId::parse("A").unwrap(),
    )
    .primary;
    let module_token = edgehub::model::sas::make_token(
        &format!("{}/devices/edge1/modules/A", common::IOTHUB),
        &a_key,
        in_an_hour(),
        None,
    );
    for (name, headers) in [
        ("no token", vec![]),
        ("wrong key", vec![("authorization", wrong_key.as_str())]),
        ("expired", vec![("authorization", expired.as_str())]),
        (
            "module token",
            vec![("authorization", module_token.as_str())],
        ),
        ("not a token", vec![("authorization", "Bearer x")]),
    ] {
        let r = hub.https("GET", path, &headers, "").await;
        assert_eq!(r.status, 401, "{name}: {:?}", r.body);
        assert!(r
            .header("content-type")
            .unwrap()
            .starts_with("application/json"));
        assert!(
            r.body["Message"]
                .as_str()
                .is_some_and(|m| m.starts_with("ErrorCode:IotHubUnauthorizedAccess;")),
            "{name}: {:?}",
            r.body
        );
    }
    let cases: [(&str, &str, &str, u16); 7] = [
        ("GET", "/twins/edge1/modules/A/reported", "", 404),
        ("GET", "/devices/edge1/things", "", 404),
        ("DELETE", path, "", 405),
        ("GET", "/twins/edge1/modules/A/methods", "", 405),
        ("PATCH", path, "{not json", 400),
        (
            "PATCH",
            path,
            r#"{"properties": {"reported": {"a": 1}}}"#,
            400,
        ),
        (
            "PATCH",
            path,
            r#"{"properties": {"desired": {"a.b": 1}}}"#,
            400,
        ),
    ];
    for (method, p, body, status) in cases {
        let r = hub.https(method, p, &ok, body).await;
        assert_eq!(r.status, status, "{method} {p} {body}: {:?}", r.body);
        assert!(r.body["Message"].is_string(), "{:?}", r.body);
    }
    let r = hub.https("DELETE", path, &ok, "").await;
    assert_eq!(r.header("allow"), Some("GET, PATCH"));
    let big = format!(
        r#"{{"properties": {{"desired": {{"a": "{}"}}}}}}"#,
        "x".repeat(70 * 1024)
    );
    let r = hub.https("PATCH", path, &ok, &big).await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    let r = hub.https("GET", "/twins/edge1/modules/Z", &ok, "").await;
    assert_eq!(r.status, 404);
    assert!(r.body["Message"]
        .as_str()
        .unwrap()
        .starts_with("ErrorCode:ModuleNotFound;"));

    // The module API keeps edgeHub's `message` errors.
    let r = hub
        .https(
            "POST",
            "/twins/edge1/modules/B/methods",
            &[
                ("authorization", module_token.as_str()),
                ("x-ms-edge-moduleId", "edge1/A"),
            ],
            r#"{"methodName": "m", "responseTimeoutInSeconds": 5}"#,
        )
        .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert!(r.body["message"].is_string());
    hub.stop().await;
}

#[tokio::test]
async fn a_child_edge_hub_authenticates_its_modules_on_their_behalf() {
    use edgehub::model::identity::{DeviceId, Identity, KeySlot, ModuleId};
    let hub = common::start_hub_https("{}", SERVICE_EXTRA).await;
    let key = edgehub::app::device_key(&hub.settings).unwrap();
    let child = DeviceId::parse("child").unwrap();
    let edge_hub = ModuleId::parse("$edgeHub").unwrap();
    // The child's deviceKey is the parent's key for it; the child derives its $edgeHub key from
    // that by the module-key rule.
    let child_key = edgehub::core::auth::device_keys(&hub.settings, &key, &child).primary;
    let edge_hub_key = child_key.derive_module_key(&child, &edge_hub, KeySlot::Primary);
    let ca = hub.settings.data_dir.join("certs").join("edge-ca.pem");
    let addr = hub.hub.as_ref().unwrap().amqps_addr;
    let mut c = timeout(
        WAIT,
        edgehub::client::Client::connect(
            addr,
            "localhost",
            &ca,
            common::IOTHUB,
            &Identity::Module(child.clone(), edge_hub.clone()),
            &edge_hub_key,
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let token = edgehub::model::sas::make_token(
        &format!("{}/devices/child/modules/$edgeHub", common::IOTHUB),
        &edge_hub_key,
        in_an_hour(),
        None,
    );
    // On behalf of the child's module `filter`, which the parent has never heard of.
    timeout(
        WAIT,
        edgehub::client::put_token(
            &mut c.session,
            &format!("{}/devices/child/modules/filter", common::IOTHUB),
            &token,
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let mut tx = c
        .sender("/devices/child/modules/filter/messages/events")
        .await
        .unwrap();
    let o = timeout(WAIT, tx.send(output("up", "c1")))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(o, Outcome::Accepted(_)), "{o:?}");
    // Its twin works, and the service sees it.
    let core = hub.hub.as_ref().unwrap().core.clone();
    let filter = Identity::Module(child.clone(), ModuleId::parse("filter").unwrap());
    let mut twin_out = c
        .receiver("/devices/child/modules/filter/twin")
        .await
        .unwrap();
    let mut twin_in = c
        .sender("/devices/child/modules/filter/twin")
        .await
        .unwrap();
    until(|| core.twins.has_link(&filter)).await;
    timeout(
        WAIT,
        twin_in.send(twin_request(
            "PATCH",
            "/properties/reported",
            "r1",
            Some(r#"{"seen": true}"#),
        )),
    )
    .await
    .unwrap()
    .unwrap();
    timeout(WAIT, twin_out.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    let service = service_token(SERVICE_KEY, in_an_hour());
    let r = hub
        .https(
            "GET",
            "/twins/child/modules/filter",
            &[("authorization", service.as_str())],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["properties"]["reported"]["seen"], true);
    assert_eq!(r.body["connectionState"], "Connected");

    // Not on behalf of this hub's own modules: refused, and A's links do not attach.
    let refused = timeout(
        WAIT,
        edgehub::client::put_token(
            &mut c.session,
            &format!("{}/devices/edge1/modules/A", common::IOTHUB),
            &token,
        ),
    )
    .await
    .unwrap();
    assert!(
        matches!(refused, Err(edgehub::client::ClientError::Refused(401, _))),
        "{refused:?}"
    );
    let attached = match timeout(WAIT, c.sender(A_EVENTS)).await.unwrap() {
        Err(_) => false,
        Ok(mut tx) => matches!(
            timeout(WAIT, tx.send(output("x", "forged"))).await.unwrap(),
            Ok(Outcome::Accepted(_))
        ),
    };
    assert!(!attached, "a child's token reached this hub's own module");
    c.close().await;
    hub.stop().await;
}

/// A token that expires without a renewal closes the identity's links, idle ones included,
/// with `amqp:unauthorized-access`.
#[tokio::test]
async fn an_expired_token_closes_idle_links() {
    use fe2o3_amqp::link::{LinkStateError, RecvError};
    let hub = start_hub(ROUTES, "{}").await;
    let key = edgehub::app::device_key(&hub.settings).unwrap();
    let b = edgehub::model::identity::ModuleId::parse("B").unwrap();
    let keys = edgehub::core::auth::module_keys(&hub.settings, &key, &b);
    let ca = hub.settings.data_dir.join("certs/edge-ca.pem");
    // Still within the 5-minute clock skew for about two seconds.
    let expiry = edgehub::model::sas::now_secs() - edgehub::model::sas::MAX_CLOCK_SKEW_SECS + 2;
    let mut client = timeout(
        WAIT,
        edgehub::client::Client::connect_until(
            hub.hub.as_ref().unwrap().amqps_addr,
            "localhost",
            &ca,
            common::IOTHUB,
            &hub.module("B"),
            &keys.primary,
            expiry,
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let mut rx = client.receiver(B_INPUTS).await.unwrap();
    // Nothing is sent to B: the input link is idle until the hub closes it.
    let err = timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .expect("the hub closes the link in time")
        .expect_err("no message, an error");
    match err {
        RecvError::LinkStateError(LinkStateError::RemoteDetachedWithError(e))
        | RecvError::LinkStateError(LinkStateError::RemoteClosedWithError(e)) => {
            assert_eq!(
                e.condition,
                fe2o3_amqp::types::definitions::AmqpError::UnauthorizedAccess.into()
            );
        }
        other => panic!("unexpected: {other:?}"),
    }
    hub.stop().await;
}

/// The batched format (the C# SDK's `SendEventBatchAsync`): every message of the batch is
/// routed; a batch that does not decode, or another format, is rejected.
#[tokio::test]
async fn a_batched_delivery_is_routed_message_by_message() {
    use fe2o3_amqp::types::messaging::{message::__private::Serializable, Data};
    use fe2o3_amqp::types::primitives::Binary;
    let hub = start_hub(ROUTES, "{}").await;
    let mut a = hub.connect("A").await;
    let mut b = hub.connect("B").await;
    let mut rx = b.receiver(B_INPUTS).await.unwrap();
    let mut tx = a.sender(A_EVENTS).await.unwrap();
    let encode =
        |m: Message<Body<Value>>| Data(Binary::from(serde_amqp::to_vec(&Serializable(m)).unwrap()));
    let batch = |sections: Vec<Data>| {
        Message::builder()
            .body(Body::<Value>::Data(sections.into()))
            .build()
    };
    let send = |m: Message<Body<Value>>, format: u32| {
        Sendable::builder()
            .message(m)
            .message_format(format)
            .settled(false)
            .build()
    };
    let ok = batch(vec![
        encode(output("one", "b1")),
        encode(output("two", "b2")),
    ]);
    let outcome = timeout(WAIT, tx.send(send(ok, 0x8001_3700)))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    for want in ["b1", "b2"] {
        let d = timeout(WAIT, rx.recv::<Body<Value>>())
            .await
            .unwrap()
            .unwrap();
        rx.accept(&d).await.unwrap();
        let id = d
            .message()
            .properties
            .as_ref()
            .and_then(|p| p.message_id.clone());
        assert_eq!(id, Some(want.to_owned().into()));
        assert_eq!(
            annotation(d.message(), CONNECTION_MODULE_ID),
            Some(Value::String("A".into()))
        );
    }
    let garbage = batch(vec![Data(Binary::from(vec![0xff, 0x00, 0x13]))]);
    let outcome = timeout(WAIT, tx.send(send(garbage, 0x8001_3700)))
        .await
        .unwrap()
        .unwrap();
    match outcome {
        Outcome::Rejected(r) => assert_eq!(
            r.error.unwrap().condition,
            fe2o3_amqp::types::definitions::AmqpError::DecodeError.into()
        ),
        other => panic!("{other:?}"),
    }
    let outcome = timeout(WAIT, tx.send(send(output("x", "x1"), 0x1234)))
        .await
        .unwrap()
        .unwrap();
    match outcome {
        Outcome::Rejected(r) => assert_eq!(
            r.error.unwrap().condition,
            fe2o3_amqp::types::definitions::AmqpError::NotImplemented.into()
        ),
        other => panic!("{other:?}"),
    }
    hub.stop().await;
}

/// A message larger than the receiver's max frame size travels in several transfer frames;
/// the first, whose tag grows to 16 bytes, still fits the receiver's limit.
#[tokio::test]
async fn a_message_spanning_frames_arrives_whole() {
    let hub = start_hub(ROUTES, "{}").await;
    let mut a = hub.connect("A").await;
    let mut b = hub.connect("B").await;
    let mut rx = b.receiver(B_INPUTS).await.unwrap();
    let mut tx = a.sender(A_EVENTS).await.unwrap();
    // The test client announces a 256 KiB max frame size.
    let body: String = (0..600_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let outcome = timeout(WAIT, tx.send(output(&body, "big")))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    let d = timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    rx.accept(&d).await.unwrap();
    assert_eq!(d.delivery_tag().len(), 16);
    match &d.message().body {
        Body::Data(batch) => {
            let got: Vec<u8> = batch.iter().flat_map(|x| x.0.iter().copied()).collect();
            assert_eq!(got, body.as_bytes());
        }
        other => panic!("{other:?}"),
    }
    hub.stop().await;
}

#[tokio::test]
async fn a_twin_client_that_withholds_credit_gets_refusals_and_reported_twins_stay_bounded() {
    use fe2o3_amqp::link::receiver::CreditMode;
    let hub = common::start_hub("{}", "{}").await;
    let core = hub.hub.as_ref().unwrap().core.clone();
    let mut b = hub.connect("B").await;
    let address = "/devices/edge1/modules/B/twin";
    // A response link with no credit: the hub can send B nothing.
    let mut twin_out = timeout(
        WAIT,
        fe2o3_amqp::link::Receiver::builder()
            .name("twin-out")
            .source(address)
            .credit_mode(CreditMode::Manual)
            .attach(&mut b.session),
    )
    .await
    .unwrap()
    .unwrap();
    let mut twin_in = b.sender(address).await.unwrap();
    until(|| core.twins.has_link(&hub.module("B"))).await;
    let queue = edgehub::core::twins::RESPONSE_QUEUE;
    let get = |i: usize| twin_request("GET", "", &format!("get{i}"), None);
    // Answers wait for credit: the queue's worth, and one in the link's hands. Requests
    // beyond that are refused, not queued.
    let mut accepted = 0;
    for i in 0..queue + 4 {
        match timeout(WAIT, twin_in.send(get(i))).await.unwrap() {
            Ok(Outcome::Accepted(_)) => {
                assert_eq!(accepted, i, "a request accepted after a refusal");
                accepted += 1;
            }
            Ok(Outcome::Rejected(r)) => {
                let condition = format!("{:?}", r.error.expect("an error").condition);
                assert!(
                    condition.contains("device-container-throttled"),
                    "{condition}"
                );
            }
            other => panic!("request {i}: {other:?}"),
        }
    }
    assert!((queue..=queue + 1).contains(&accepted), "{accepted}");
    // With credit, the held answers arrive in order, and requests are served again.
    twin_out.set_credit(4 * queue as u32).await.unwrap();
    for i in 0..accepted {
        let m = recv_message(&mut twin_out).await;
        assert_eq!(
            m.properties.unwrap().correlation_id,
            Some(format!("get{i}").into())
        );
    }
    // Reported properties: patches of 4 KB each until the whole document would pass 32 KB.
    let chunk = "x".repeat(4000);
    let mut statuses = Vec::new();
    for i in 0..9 {
        let body = serde_json::json!({ format!("k{i}"): chunk }).to_string();
        let cid = format!("rep{i}");
        timeout(
            WAIT,
            twin_in.send(twin_request(
                "PATCH",
                "/properties/reported",
                &cid,
                Some(&body),
            )),
        )
        .await
        .unwrap()
        .unwrap();
        let m = recv_message(&mut twin_out).await;
        statuses.push(annotation(&m, "status"));
        if i == 8 {
            let error = data_body(&m);
            assert!(
                error["message"].as_str().unwrap().contains("at most 32768"),
                "{error}"
            );
        }
    }
    let mut want = vec![Some(Value::Int(204)); 8];
    want.push(Some(Value::Int(400)));
    assert_eq!(statuses, want);
    assert_eq!(core.twins.get(&hub.module("B")).reported.len(), 8);
    twin_in.close().await.unwrap();
    twin_out.close().await.unwrap();
    b.close().await;
    hub.stop().await;
}

/// Reads until the peer closes (or errs); what it sent before that.
async fn read_to_close(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Writes `bytes` one at a time, 300 ms apart, as a slow client does; ends at the first error.
fn trickle(
    mut w: impl tokio::io::AsyncWrite + Unpin + Send + 'static,
    bytes: Vec<u8>,
) -> tokio::task::JoinHandle<()> {
    use tokio::io::AsyncWriteExt;
    tokio::spawn(async move {
        let mut pace = tokio::time::interval(std::time::Duration::from_millis(300));
        for b in bytes {
            pace.tick().await;
            if w.write_all(&[b]).await.is_err() || w.flush().await.is_err() {
                return;
            }
        }
    })
}

#[tokio::test]
async fn slow_request_heads_and_bodies_are_cut_off_at_their_deadlines() {
    use tokio::io::AsyncWriteExt;
    let limits = r#"{"httpHeaderTimeoutSecs": 1, "httpBodyTimeoutSecs": 1}"#;
    let hub = common::start_hub_https_limits("{}", SERVICE_EXTRA, limits).await;
    let bound = std::time::Duration::from_secs(6);

    // A head sent a byte at a time to the metrics listener: the connection is closed.
    let metrics = hub.hub.as_ref().unwrap().metrics_addr.unwrap();
    let s = tokio::net::TcpStream::connect(metrics).await.unwrap();
    let (mut r, w) = tokio::io::split(s);
    let started = std::time::Instant::now();
    let writer = trickle(
        w,
        b"GET /metrics HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n"
            .to_vec(),
    );
    let got = timeout(WAIT, read_to_close(&mut r))
        .await
        .expect("closed in time");
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    assert!(
        !got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    writer.abort();

    // A body sent a byte at a time to the API: 408 at the body deadline, whoever sends it.
    let token = service_token(SERVICE_KEY, in_an_hour());
    let mut tls = hub.https_stream().await;
    let head = format!(
        "PATCH /twins/edge1/modules/B HTTP/1.1\r\nHost: localhost\r\nAuthorization: {token}\r\nIf-Match: *\r\nContent-Length: 100\r\n\r\n{{"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let (mut r, w) = tokio::io::split(tls);
    let started = std::time::Instant::now();
    let writer = trickle(w, vec![b' '; 99]);
    let got = timeout(WAIT, read_to_close(&mut r))
        .await
        .expect("answered in time");
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("RequestTimeout"), "{text}");
    writer.abort();
    hub.stop().await;
}

#[tokio::test]
async fn the_metrics_listener_serves_at_most_its_connection_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = common::start_hub_https_limits("{}", "", r#"{"metricsMaxConnections": 2}"#).await;
    let metrics = hub.hub.as_ref().unwrap().metrics_addr.unwrap();
    const GET: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    // Two kept-alive connections, each served once, hold both slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(metrics).await.unwrap();
        s.write_all(GET).await.unwrap();
        let mut head = [0u8; 12];
        timeout(WAIT, s.read_exact(&mut head))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        held.push(s);
    }
    // A third is closed without an answer.
    let mut third = tokio::net::TcpStream::connect(metrics).await.unwrap();
    let _ = third.write_all(GET).await;
    let got = timeout(WAIT, read_to_close(&mut third))
        .await
        .expect("closed in time");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    // Once one goes, a new connection is served again.
    drop(held.pop());
    timeout(WAIT, async {
        loop {
            let mut s = tokio::net::TcpStream::connect(metrics).await.unwrap();
            let _ = s
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            if read_to_close(&mut s).await.starts_with(b"HTTP/1.1 200") {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a slot frees when a connection ends");
    hub.stop().await;
}
