//! Socket tests of cloud-to-device messages: the service's `/messages/devicebound` link and the
//! rules IoT Hub applies (50 per device, expiry, delivery count, outcomes), the device's C2D
//! link, and the feedback records on `/messages/servicebound/feedback`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail on any error"
)]

mod common;

use common::{start_hub_extra, TestHub, IOTHUB, WAIT};
use edgehub::{
    app::device_key,
    client::Client,
    core::auth::device_keys,
    model::identity::{DeviceId, Identity, Key},
};
use fe2o3_amqp::{
    link::Receiver,
    types::{
        definitions::AmqpError,
        messaging::{annotations::OwnedKey, Body, Message, Outcome, Properties},
        primitives::{Symbol, Timestamp, Value},
    },
};
use tokio::time::timeout;

const SERVICE_KEY: &str = "c2VydmljZS1rZXktZm9yLWMyZC10ZXN0cy0zMi1ieXRlcyE=";
const EXTRA: &str = r#""devices": {"leaf": {}, "other": {}},
    "servicePolicies": {"service": {"primaryKey": "c2VydmljZS1rZXktZm9yLWMyZC10ZXN0cy0zMi1ieXRlcyE="}},"#;

async fn hub() -> TestHub {
    start_hub_extra("{}", r#"{"timeToLiveSecs": 7200}"#, EXTRA).await
}

fn ca(hub: &TestHub) -> std::path::PathBuf {
    hub.settings.data_dir.join("certs").join("edge-ca.pem")
}

async fn service(hub: &TestHub) -> Client {
    let key = Key::from_base64(SERVICE_KEY).unwrap();
    let addr = hub.hub.as_ref().unwrap().amqps_addr;
    timeout(
        WAIT,
        Client::connect_service(addr, "localhost", &ca(hub), "localhost", "service", &key),
    )
    .await
    .expect("connect in time")
    .expect("service token accepted")
}

async fn device(hub: &TestHub, id: &str) -> Client {
    let d = DeviceId::parse(id).unwrap();
    let keys = device_keys(&hub.settings, &device_key(&hub.settings).unwrap(), &d);
    let addr = hub.hub.as_ref().unwrap().amqps_addr;
    timeout(
        WAIT,
        Client::connect(
            addr,
            "localhost",
            &ca(hub),
            IOTHUB,
            &Identity::Device(d),
            &keys.primary,
        ),
    )
    .await
    .expect("connect in time")
    .expect("device connects")
}

fn c2d(to: Option<&str>, id: &str, expiry_ms: Option<i64>) -> Message<Body<Value>> {
    Message::builder()
        .properties(Properties {
            message_id: Some(id.to_owned().into()),
            correlation_id: Some(format!("c-{id}").into()),
            to: to.map(str::to_owned),
            absolute_expiry_time: expiry_ms.map(Timestamp::from_milliseconds),
            ..Default::default()
        })
        .application_properties(
            fe2o3_amqp::types::messaging::ApplicationProperties::builder()
                .insert("iothub-ack", "full")
                .insert("k", "v")
                .insert("n", 7i32)
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

async fn send(tx: &mut fe2o3_amqp::link::Sender, m: Message<Body<Value>>) -> Outcome {
    timeout(WAIT, tx.send(m)).await.unwrap().unwrap()
}

fn to(device: &str) -> String {
    format!("/devices/{device}/messages/devicebound")
}

fn annotation(m: &Message<Body<Value>>, key: &str) -> Option<Value> {
    m.message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::Symbol(Symbol::from(key)))
        .cloned()
}

fn mid(m: &Message<Body<Value>>) -> String {
    match m.properties.as_ref().and_then(|p| p.message_id.clone()) {
        Some(fe2o3_amqp::types::messaging::MessageId::String(s)) => s,
        other => panic!("message id as a string expected, got {other:?}"),
    }
}

fn rejected_with(outcome: Outcome, condition: AmqpError) {
    match outcome {
        Outcome::Rejected(r) => assert_eq!(r.error.unwrap().condition, condition.into()),
        other => panic!("rejected with {condition:?} expected, got {other:?}"),
    }
}

/// Reads feedback messages (accepting each) until `n` records arrived in all; returns
/// (original message id, status) of each.
async fn feedback(rx: &mut Receiver, got: &mut Vec<(String, String)>, n: usize) {
    while got.len() < n {
        let d = timeout(WAIT, rx.recv::<Body<Value>>())
            .await
            .expect("feedback in time")
            .unwrap();
        assert_eq!(d.delivery_tag().len(), 16);
        let m = d.message();
        let p = m.properties.as_ref().unwrap();
        assert_eq!(
            p.content_type.as_ref().map(|c| c.0.as_str()),
            Some("application/vnd.microsoft.iothub.feedback.json")
        );
        assert_eq!(
            p.user_id.as_ref().map(|u| u.to_vec()),
            Some(b"test-hub".to_vec())
        );
        assert!(matches!(
            annotation(m, "iothub-enqueuedtime"),
            Some(Value::Timestamp(_))
        ));
        let body: serde_json::Value = match &m.body {
            Body::Data(d) => serde_json::from_slice(d.iter().next().unwrap().0.as_slice()).unwrap(),
            other => panic!("{other:?}"),
        };
        for r in body.as_array().unwrap() {
            assert!(
                r["deviceId"].is_string() && r["enqueuedTimeUtc"].is_string(),
                "{r}"
            );
            got.push((
                r["originalMessageId"].as_str().unwrap().to_owned(),
                r["statusCode"].as_str().unwrap().to_owned(),
            ));
        }
        rx.accept(&d).await.unwrap();
    }
}

#[tokio::test]
async fn c2d_limits_outcomes_and_delivery_count() {
    let hub = hub().await;
    let mut svc = service(&hub).await;
    let mut tx = svc.sender("/messages/devicebound").await.unwrap();
    let mut fb = svc
        .receiver("/messages/serviceBound/feedback")
        .await
        .unwrap();

    // IoT Hub's refusals: no `to`, a module, a device this hub does not serve.
    rejected_with(
        send(&mut tx, c2d(None, "x", None)).await,
        AmqpError::InvalidField,
    );
    rejected_with(
        send(
            &mut tx,
            c2d(
                Some("/devices/leaf/modules/m/messages/devicebound"),
                "x",
                None,
            ),
        )
        .await,
        AmqpError::InvalidField,
    );
    rejected_with(
        send(&mut tx, c2d(Some(&to("nobody")), "x", None)).await,
        AmqpError::NotFound,
    );

    // 50 per device, the 51st refused.
    for i in 0..50 {
        let o = send(&mut tx, c2d(Some(&to("leaf")), &format!("m{i}"), None)).await;
        assert!(matches!(o, Outcome::Accepted(_)), "{i}: {o:?}");
    }
    rejected_with(
        send(&mut tx, c2d(Some(&to("leaf")), "m50", None)).await,
        AmqpError::ResourceLimitExceeded,
    );

    let mut leaf = device(&hub, "leaf").await;
    let mut rx = leaf
        .receiver("/devices/leaf/messages/deviceBound")
        .await
        .unwrap();
    let d0 = timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d0.delivery_tag().len(), 16);
    let m0 = d0.message();
    assert_eq!(mid(m0), "m0");
    let p = m0.properties.as_ref().unwrap();
    assert_eq!(p.to.as_deref(), Some("/devices/leaf/messages/devicebound"));
    assert!(matches!(
        annotation(m0, "x-opt-sequence-number"),
        Some(Value::Ulong(_))
    ));
    assert_eq!(
        annotation(m0, "iothub-deliverycount"),
        Some(Value::Ubyte(0))
    );
    let app = &m0.application_properties.as_ref().unwrap().0;
    assert_eq!(app.get("k"), Some(&"v".to_owned().into()));
    assert_eq!(app.get("n"), None, "only string properties travel on");
    // The queue counts what is delivered and not settled: still full.
    rejected_with(
        send(&mut tx, c2d(Some(&to("leaf")), "m50", None)).await,
        AmqpError::ResourceLimitExceeded,
    );
    rx.accept(&d0).await.unwrap();
    let mut records = Vec::new();
    feedback(&mut fb, &mut records, 1).await;
    assert_eq!(records, vec![("m0".into(), "Success".into())]);
    let o = send(&mut tx, c2d(Some(&to("leaf")), "m50", None)).await;
    assert!(matches!(o, Outcome::Accepted(_)), "room again: {o:?}");

    // m1 abandoned ten times: each redelivery counts one more; then it is dead-lettered.
    let mut held = Vec::new();
    let mut abandons = 0u8;
    while abandons < 10 {
        let d = timeout(WAIT, rx.recv::<Body<Value>>())
            .await
            .unwrap()
            .unwrap();
        if mid(d.message()) == "m1" {
            assert_eq!(
                annotation(d.message(), "iothub-deliverycount"),
                Some(Value::Ubyte(abandons))
            );
            rx.release(&d).await.unwrap();
            abandons += 1;
        } else {
            held.push(d);
        }
    }
    feedback(&mut fb, &mut records, 2).await;
    assert_eq!(records[1], ("m1".into(), "DeliveryCountExceeded".into()));

    // Reject = dead-letter with feedback; the rest (m2..=m50, 49 in all) are completed.
    let mut settled = 0;
    loop {
        for d in held.drain(..) {
            assert_ne!(
                mid(d.message()),
                "m1",
                "a dead-lettered message never comes back"
            );
            if mid(d.message()) == "m2" {
                rx.reject(&d, None).await.unwrap();
            } else {
                rx.accept(&d).await.unwrap();
            }
            settled += 1;
        }
        if settled == 49 {
            break;
        }
        held.push(
            timeout(WAIT, rx.recv::<Body<Value>>())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    feedback(&mut fb, &mut records, 51).await;
    assert!(records.contains(&("m2".into(), "Rejected".into())));
    assert_eq!(
        records.iter().filter(|(_, s)| s == "Success").count(),
        49,
        "{records:?}"
    );
    leaf.close().await;
    svc.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn expired_messages_are_never_delivered_and_give_feedback() {
    let hub = hub().await;
    let mut svc = service(&hub).await;
    let mut tx = svc.sender("/messages/devicebound").await.unwrap();
    let mut fb = svc
        .receiver("/messages/servicebound/feedback")
        .await
        .unwrap();
    let now = edgehub::model::message::now_ms();
    // Already expired when it arrives: taken (IoT Hub takes it too), never delivered.
    for m in [
        c2d(Some(&to("other")), "old", Some(now - 1000)),
        c2d(Some(&to("other")), "live", Some(now + 3_600_000)),
    ] {
        let o = timeout(WAIT, tx.send(m)).await.unwrap().unwrap();
        assert!(matches!(o, Outcome::Accepted(_)), "{o:?}");
    }
    let mut records = Vec::new();
    feedback(&mut fb, &mut records, 1).await;
    assert_eq!(records, vec![("old".into(), "Expired".into())]);

    let mut other = device(&hub, "other").await;
    let mut rx = other
        .receiver("/devices/other/messages/devicebound")
        .await
        .unwrap();
    let d = timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(mid(d.message()), "live");
    let exp = d
        .message()
        .properties
        .as_ref()
        .and_then(|p| p.absolute_expiry_time.clone())
        .map(|t| t.milliseconds());
    assert_eq!(
        exp,
        Some(now + 3_600_000),
        "the expiry travels with the message"
    );
    rx.accept(&d).await.unwrap();
    feedback(&mut fb, &mut records, 2).await;
    assert_eq!(records[1], ("live".into(), "Success".into()));
    let metrics = hub.scrape().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("edgehub_c2d_messages_settled_total")
                && l.contains("outcome=\"expired\"")),
        "{metrics}"
    );
    other.close().await;
    svc.close().await;
    hub.stop().await;
}

#[tokio::test]
async fn service_links_need_a_service_token() {
    let hub = hub().await;
    // A device's token does not open the service's nodes.
    let mut leaf = device(&hub, "leaf").await;
    let mut tx = leaf.sender("/messages/devicebound").await.unwrap();
    let o = timeout(WAIT, tx.send(c2d(Some(&to("leaf")), "x", None)))
        .await
        .unwrap();
    assert!(o.is_err(), "the link was refused: {o:?}");
    leaf.close().await;
    // A wrong service key is refused at put-token.
    let addr = hub.hub.as_ref().unwrap().amqps_addr;
    let wrong = Key::from_base64("d3Jvbmcta2V5LWZvci1jMmQtdGVzdHMtMzItYnl0ZXMhISE=").unwrap();
    let refused =
        Client::connect_service(addr, "localhost", &ca(&hub), "localhost", "service", &wrong).await;
    assert!(
        matches!(refused, Err(edgehub::client::ClientError::Refused(401, _))),
        "{:?}",
        refused.err()
    );
    hub.stop().await;
}

#[tokio::test]
async fn queued_messages_survive_a_restart_in_order() {
    let mut hub = hub().await;
    let mut svc = service(&hub).await;
    let mut tx = svc.sender("/messages/devicebound").await.unwrap();
    for id in ["r0", "r1", "r2"] {
        let o = send(&mut tx, c2d(Some(&to("leaf")), id, None)).await;
        assert!(matches!(o, Outcome::Accepted(_)), "{o:?}");
    }
    svc.close().await;
    let settings = hub.settings.clone();
    let running = hub.hub.take().unwrap();
    timeout(WAIT, running.shutdown()).await.unwrap();
    hub.hub = Some(
        timeout(WAIT, edgehub::app::Hub::start(settings))
            .await
            .unwrap()
            .unwrap(),
    );
    let mut leaf = device(&hub, "leaf").await;
    let mut rx = leaf
        .receiver("/devices/leaf/messages/devicebound")
        .await
        .unwrap();
    for id in ["r0", "r1", "r2"] {
        let d = timeout(WAIT, rx.recv::<Body<Value>>())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(mid(d.message()), id);
        rx.accept(&d).await.unwrap();
    }
    // Accepted ones are gone: the queue has room for 50 again.
    let mut svc = service(&hub).await;
    let mut tx = svc.sender("/messages/devicebound").await.unwrap();
    for i in 0..50 {
        let o = send(&mut tx, c2d(Some(&to("leaf")), &format!("n{i}"), None)).await;
        assert!(matches!(o, Outcome::Accepted(_)), "{i}: {o:?}");
    }
    leaf.close().await;
    svc.close().await;
    hub.stop().await;
}
