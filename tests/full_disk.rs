//! A full file system under `dataDir`: senders get `amqp:resource-limit-exceeded`, nothing the hub
//! acknowledged is lost, and the hub keeps running. Needs root to mount a small tmpfs; without
//! it the test says so and passes vacuously only outside CI.

mod common;

use std::process::Command;

use common::WAIT;
use fe2o3_amqp::types::{
    definitions::AmqpError,
    messaging::{ApplicationProperties, Body, Data, Message, Outcome, Properties},
    primitives::{Binary, Value},
};
use tokio::time::timeout;

fn message(i: usize) -> Message<Body<Value>> {
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
        .body(Body::Data(
            vec![Data(Binary::from(vec![b'x'; 4096]))].into(),
        ))
        .build()
}

#[tokio::test]
async fn a_full_disk_refuses_new_messages_without_losing_accepted_ones() {
    let mount = std::env::temp_dir().join(format!("edgehub-full-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&mount).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&mount)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs as root and must be able to mount a tmpfs"
        );
        eprintln!("skipped: cannot mount a tmpfs here (not root)");
        return;
    }
    let hub = common::start_hub_in(
        &mount,
        r#"{"aToB": "FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint(\"/modules/B/inputs/in1\")"}"#,
    )
    .await;
    let mut a = hub.connect("A").await;
    let mut tx = a
        .sender("/devices/edge1/modules/A/messages/events")
        .await
        .unwrap();
    let mut accepted = Vec::new();
    let mut refusal = None;
    for i in 0..5000 {
        match timeout(WAIT, tx.send(message(i))).await.unwrap() {
            Ok(Outcome::Accepted(_)) => accepted.push(i),
            Ok(Outcome::Rejected(r)) => {
                refusal = r.error;
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let e = refusal.expect("the file system filled up");
    assert_eq!(
        e.condition,
        AmqpError::ResourceLimitExceeded.into(),
        "{e:?}"
    );
    assert!(!accepted.is_empty());
    // The hub still serves: every accepted message reaches B.
    let mut b = hub.connect("B").await;
    let mut rx = b
        .receiver("/devices/edge1/modules/B/messages/events")
        .await
        .unwrap();
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
    let _ = Command::new("umount").arg(&mount).status();
    let _ = std::fs::remove_dir_all(&mount);
}
