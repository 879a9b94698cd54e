//! Completed means completed: a message a module accepted (settled) never comes back to it,
//! whichever way its connection ends.

#![allow(clippy::unwrap_used, reason = "tests fail on any error")]

mod common;

use common::{start_hub, WAIT};
use fe2o3_amqp::{
    types::{
        messaging::{ApplicationProperties, Body, Data, Message, MessageId, Outcome, Properties},
        primitives::{Binary, Value},
    },
    Sendable,
};
use futures_util::{stream::FuturesUnordered, StreamExt};
use tokio::time::timeout;

const ROUTES: &str = r#"{
    "aToB": "FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint(\"/modules/B/inputs/in1\")"
}"#;
const A_EVENTS: &str = "/devices/edge1/modules/A/messages/events";
const B_INPUTS: &str = "/devices/edge1/modules/B/messages/events";

fn output(i: u64) -> Message<Body<Value>> {
    Message::builder()
        .properties(Properties {
            message_id: Some(format!("m{i}").into()),
            ..Default::default()
        })
        .application_properties(
            ApplicationProperties::builder()
                .insert("iothub-outputname", "out1")
                .build(),
        )
        .body(Body::Data(vec![Data(Binary::from(vec![1u8; 64]))].into()))
        .build()
}

fn number(m: &Message<Body<Value>>) -> u64 {
    match m.properties.as_ref().and_then(|p| p.message_id.clone()) {
        Some(MessageId::String(s)) => s.trim_start_matches('m').parse().expect("m<number>"),
        other => panic!("message id {other:?}"),
    }
}

/// Sends messages `range` from A, up to 200 unsettled at a time; every one must be accepted.
async fn send(tx: &mut fe2o3_amqp::Sender, range: std::ops::Range<u64>) {
    let mut in_flight = FuturesUnordered::new();
    for i in range {
        if in_flight.len() >= 200 {
            let o = timeout(WAIT, in_flight.next()).await.unwrap().unwrap();
            assert!(matches!(o, Ok(Outcome::Accepted(_))), "{o:?}");
        }
        let fut = timeout(WAIT, tx.send_batchable(Sendable::from(output(i))))
            .await
            .unwrap()
            .unwrap();
        in_flight.push(fut);
    }
    while let Some(o) = timeout(WAIT, in_flight.next()).await.unwrap() {
        assert!(matches!(o, Ok(Outcome::Accepted(_))), "{o:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_settled_before_a_clean_close_never_come_back() {
    const PER_ROUND: u64 = 600;
    const ROUNDS: u64 = 6;
    let hub = start_hub(ROUTES, r#"{"deliveryWindow": 256}"#).await;
    let mut a = hub.connect("A").await;
    let mut tx = a.sender(A_EVENTS).await.unwrap();
    let mut next = 0u64;
    for round in 0..=ROUNDS {
        // The last round sends one message: a marker that nothing older is queued before it.
        let count = if round == ROUNDS { 1 } else { PER_ROUND };
        send(&mut tx, next..next + count).await;
        let mut b = hub.connect("B").await;
        let mut rx = b.receiver(B_INPUTS).await.unwrap();
        // Settle in batches, as a client that accepts what it has processed and closes at
        // once does: the last batch and the close leave together.
        let mut held = Vec::new();
        for want in next..next + count {
            let d = timeout(WAIT, rx.recv::<Body<Value>>())
                .await
                .expect("a message in time")
                .unwrap();
            let got = number(d.message());
            assert_eq!(
                got, want,
                "round {round}: message m{got} came again after it was accepted"
            );
            held.push(d);
            if held.len() == 100 {
                rx.accept_all(&held).await.unwrap();
                held.clear();
            }
        }
        rx.accept_all(&held).await.unwrap();
        // Close as clients do: some detach their links first, some end the session at once.
        if round % 2 == 0 {
            let _ = timeout(WAIT, rx.close()).await.unwrap();
        } else {
            drop(rx);
        }
        timeout(WAIT, b.close()).await.unwrap();
        next += count;
    }
    a.close().await;
    hub.stop().await;
}
