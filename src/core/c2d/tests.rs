//! The C2D rules on in-memory queues: the limit, feedback by `iothub-ack`, expiry, ten abandons,
//! and the parent's messages (recognised again, outcomes kept for a redelivery).

use super::*;
use crate::store::queue::MemoryQueue;

fn c2d() -> Arc<C2d> {
    let make: Box<QueueFactory> = Box::new(|id: &str| {
        let cap = if id.starts_with(QUEUE_PREFIX) {
            MAX_QUEUED
        } else {
            FEEDBACK_QUEUE
        };
        Arc::new(MemoryQueue::new(cap)) as Arc<dyn crate::store::queue::QueueStore>
    });
    Arc::new(C2d::new(DeviceId::parse("edge").unwrap(), make, &[]))
}

fn dev() -> DeviceId {
    DeviceId::parse("Leaf").unwrap()
}

fn msg(id: &str, ack: Option<&str>, expires_ms: Option<i64>) -> Message {
    let mut app = OrderedMap::new();
    if let Some(a) = ack {
        app.insert(ACK_PROPERTY.to_owned(), SimpleValue::String(a.into()));
    }
    Message {
        body: id.as_bytes().to_vec(),
        properties: Some(Properties {
            message_id: Some(MessageId::String(id.into())),
            absolute_expiry_time: expires_ms.map(Timestamp::from_milliseconds),
            ..Default::default()
        }),
        application_properties: app,
        annotations: OrderedMap::new(),
        from: Identity::Device(dev()),
        output: None,
        enqueued_ms: now_ms(),
        twin_change: false,
        id: crate::model::message::next_id(),
    }
}

/// The records of every feedback message written so far: (message id, status).
fn records(c: &C2d) -> Vec<(String, String)> {
    c.write_feedback();
    let mut out = Vec::new();
    while let Some(q) = c.feedback_endpoint().pop() {
        c.feedback_endpoint().ack(q.seq);
        let rs: Vec<serde_json::Value> = serde_json::from_slice(&q.msg.body).unwrap();
        for r in rs {
            assert_eq!(r["deviceId"], "Leaf");
            out.push((
                r["originalMessageId"].as_str().unwrap().to_owned(),
                r["statusCode"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

fn feed(c: &Arc<C2d>) -> DeviceFeed {
    DeviceFeed::new(c.clone(), c.queue(&dev()))
}

#[test]
fn fifty_per_device_counting_those_delivered() {
    let c = c2d();
    for i in 0..MAX_QUEUED {
        c.enqueue(&dev(), msg(&format!("m{i}"), None, None), Source::Service)
            .unwrap();
    }
    let full = c.enqueue(&dev(), msg("x", None, None), Source::Service);
    assert_eq!(full, Err(SendError::QueueFull("Leaf".into())));
    // Another device has a queue of its own; ids compare without case.
    let other = DeviceId::parse("other").unwrap();
    assert!(c
        .enqueue(&other, msg("o", None, None), Source::Service)
        .is_ok());
    let mut f = feed(&c);
    let (_, q) = f.next().unwrap();
    assert_eq!(c.queue(&DeviceId::parse("LEAF").unwrap()).len(), MAX_QUEUED);
    assert!(c
        .enqueue(&dev(), msg("x", None, None), Source::Service)
        .is_err());
    c.queue(&dev()).endpoint.ack(q.seq);
    assert!(c
        .enqueue(&dev(), msg("x", None, None), Source::Service)
        .is_ok());
    let big = Message {
        body: vec![0; MAX_MESSAGE_BYTES + 1],
        ..msg("big", None, None)
    };
    assert_eq!(
        c.enqueue(&other, big, Source::Service),
        Err(SendError::TooLarge(MAX_MESSAGE_BYTES + 1))
    );
}

#[test]
fn the_device_sees_itself_as_to() {
    let c = c2d();
    c.enqueue(&dev(), msg("m", None, None), Source::Service)
        .unwrap();
    let (_, q) = feed(&c).next().unwrap();
    let p = q.msg.properties.as_ref().unwrap();
    assert_eq!(p.to.as_deref(), Some("/devices/Leaf/messages/devicebound"));
    assert!(
        q.expires_ms.is_some_and(|e| e > now_ms()),
        "the default TTL applies"
    );
}

#[test]
fn feedback_follows_the_ack_asked_for() {
    let cases = [
        (None, Status::Success, false),
        (Some("none"), Status::Success, false),
        (Some("positive"), Status::Success, true),
        (Some("positive"), Status::Rejected, false),
        (Some("negative"), Status::Success, false),
        (Some("negative"), Status::Rejected, true),
        (Some("negative"), Status::Expired, true),
        (Some("Full"), Status::Success, true),
        (Some("full"), Status::DeliveryCountExceeded, true),
    ];
    for (ack, status, wanted) in cases {
        let m = msg("m", ack, None);
        assert_eq!(Ack::of(&m).wants(status), wanted, "{ack:?} {status:?}");
    }
}

#[test]
fn outcomes_complete_reject_and_abandon() {
    let c = c2d();
    for (id, ack) in [("a", "full"), ("r", "full"), ("n", "none")] {
        c.enqueue(&dev(), msg(id, Some(ack), None), Source::Service)
            .unwrap();
    }
    let queue = c.queue(&dev());
    let mut f = feed(&c);
    let (ep, a) = f.next().unwrap();
    ep.ack(a.seq);
    c.settled(&queue, &a, &Ok(Outcome::Accepted));
    let (ep, r) = f.next().unwrap();
    ep.ack(r.seq);
    c.settled(&queue, &r, &Ok(Outcome::Rejected("no".into())));
    let (ep, n) = f.next().unwrap();
    ep.release(n.seq);
    c.settled(&queue, &n, &Ok(Outcome::Released));
    let (_, again) = f.next().unwrap();
    assert_eq!((again.seq, again.delivery_count), (n.seq, 1));
    assert_eq!(
        records(&c),
        vec![
            ("a".into(), "Success".into()),
            ("r".into(), "Rejected".into())
        ]
    );
}

#[test]
fn ten_abandons_dead_letter_a_message_but_a_lost_link_does_not_count() {
    let c = c2d();
    c.enqueue(&dev(), msg("m", Some("negative"), None), Source::Service)
        .unwrap();
    c.enqueue(&dev(), msg("next", None, None), Source::Service)
        .unwrap();
    let queue = c.queue(&dev());
    let mut f = feed(&c);
    // The link ends with the message in flight: back, not counted.
    let (ep, q) = f.next().unwrap();
    ep.release(q.seq);
    c.settled(&queue, &q, &Err("link gone".into()));
    for n in 0..MAX_DELIVERY_COUNT {
        let (ep, q) = f.next().unwrap();
        assert_eq!(q.msg.body, b"m", "abandon {n}");
        ep.release(q.seq);
        c.settled(&queue, &q, &Ok(Outcome::Released));
    }
    let (_, q) = f.next().unwrap();
    assert_eq!(
        q.msg.body, b"next",
        "the abandoned message is dead-lettered"
    );
    assert_eq!(
        records(&c),
        vec![("m".into(), "DeliveryCountExceeded".into())]
    );
    assert_eq!(queue.len(), 1);
}

#[test]
fn expired_messages_are_dropped_with_feedback() {
    let c = c2d();
    let past = now_ms() - 1;
    c.enqueue(
        &dev(),
        msg("old", Some("full"), Some(past)),
        Source::Service,
    )
    .unwrap();
    c.enqueue(&dev(), msg("quiet", None, Some(past)), Source::Service)
        .unwrap();
    c.enqueue(&dev(), msg("live", None, None), Source::Service)
        .unwrap();
    // Met at the head of the queue...
    let (_, q) = feed(&c).next().unwrap();
    assert_eq!(q.msg.body, b"live");
    assert_eq!(records(&c), vec![("old".into(), "Expired".into())]);
    // ... or by the sweep, whatever its place.
    c.enqueue(
        &dev(),
        msg("old2", Some("negative"), Some(past)),
        Source::Service,
    )
    .unwrap();
    c.expire_now();
    assert_eq!(records(&c), vec![("old2".into(), "Expired".into())]);
    assert_eq!(c.queued(), 1);
}

#[test]
fn the_parents_messages_go_back_to_it_not_into_feedback() {
    let c = c2d();
    let queue = c.queue(&dev());
    let mut up = c.attach_upstream(&dev());
    let first = c.enqueue_from_parent(&dev(), msg("p1", Some("full"), None));
    assert_eq!(first, Ok(FromParent::Queued(Some("p1".into()))));
    // The parent sends it again (a reconnect): not queued twice.
    let again = c.enqueue_from_parent(&dev(), msg("p1", Some("full"), None));
    assert_eq!(again, Ok(FromParent::Known("p1".into())));
    assert_eq!(queue.len(), 1);
    let mut f = feed(&c);
    let (ep, q) = f.next().unwrap();
    ep.release(q.seq);
    c.settled(&queue, &q, &Ok(Outcome::Released));
    assert_eq!(up.try_recv().unwrap().outcome, Outcome::Released);
    let (ep, q) = f.next().unwrap();
    ep.ack(q.seq);
    c.settled(&queue, &q, &Ok(Outcome::Accepted));
    assert_eq!(
        up.try_recv().unwrap(),
        ParentOutcome {
            message_id: "p1".into(),
            outcome: Outcome::Accepted
        }
    );
    assert!(records(&c).is_empty(), "the parent writes the feedback");

    // Settled while no upstream link is there: applied to the parent's redelivery.
    drop(up);
    c.enqueue_from_parent(&dev(), msg("p2", None, None))
        .unwrap();
    let (ep, q) = f.next().unwrap();
    ep.ack(q.seq);
    c.settled(&queue, &q, &Ok(Outcome::Rejected("bad".into())));
    let back = c.enqueue_from_parent(&dev(), msg("p2", None, None));
    assert!(
        matches!(back, Ok(FromParent::Settled(Outcome::Rejected(_)))),
        "{back:?}"
    );
    assert!(queue.is_empty());
}

#[test]
fn a_redelivery_that_crosses_the_devices_outcome_is_not_queued_again() {
    let c = c2d();
    let queue = c.queue(&dev());
    let mut up = c.attach_upstream(&dev());
    c.enqueue_from_parent(&dev(), msg("p3", None, None))
        .unwrap();
    let mut f = feed(&c);
    let (ep, q) = f.next().unwrap();
    ep.ack(q.seq);
    c.settled(&queue, &q, &Ok(Outcome::Rejected("bad".into())));
    // The parent's redelivery (sent after an earlier abandon) comes in while the outcome is
    // on its way to the upstream link: it waits for that outcome, and the device does not get
    // the message it has settled again.
    let crossing = c.enqueue_from_parent(&dev(), msg("p3", None, None));
    assert_eq!(crossing, Ok(FromParent::Known("p3".into())));
    assert!(queue.is_empty(), "queued again: {} message(s)", queue.len());
    // The link settles that redelivery with the outcome; the id then names a new message.
    let o = up.try_recv().unwrap();
    assert!(matches!(o.outcome, Outcome::Rejected(_)), "{o:?}");
    c.parent_settled(&dev(), &o);
    let later = c.enqueue_from_parent(&dev(), msg("p3", None, None));
    assert_eq!(later, Ok(FromParent::Queued(Some("p3".into()))));
    assert_eq!(queue.len(), 1);
}

#[test]
fn outcomes_left_on_an_ended_upstream_link_are_kept_for_the_redelivery() {
    let c = c2d();
    let queue = c.queue(&dev());
    let mut up = c.attach_upstream(&dev());
    c.enqueue_from_parent(&dev(), msg("p4", None, None))
        .unwrap();
    let mut f = feed(&c);
    let (ep, q) = f.next().unwrap();
    ep.ack(q.seq);
    c.settled(&queue, &q, &Ok(Outcome::Accepted));
    // The link ends before it took the outcome: the parent's redelivery on the next link is
    // settled with it.
    c.detach_upstream(&dev(), &mut up);
    let back = c.enqueue_from_parent(&dev(), msg("p4", None, None));
    assert_eq!(back, Ok(FromParent::Settled(Outcome::Accepted)));
    assert!(queue.is_empty());
}

#[test]
fn a_subscriber_waits_without_a_queue_until_the_first_message() {
    let c = c2d();
    let Watch::Waiting(mut first) = c.watch(&dev()) else {
        panic!("no queue before any message");
    };
    assert!(c.queues.is_empty(), "watching makes no queue");
    assert_eq!(first.try_recv(), Err(oneshot::error::TryRecvError::Empty));
    // Another device's message is not this one's.
    let other = DeviceId::parse("other").unwrap();
    c.enqueue(&other, msg("o", None, None), Source::Service)
        .unwrap();
    assert_eq!(first.try_recv(), Err(oneshot::error::TryRecvError::Empty));
    // Ids compare case-insensitively.
    let upper = DeviceId::parse("LEAF").unwrap();
    c.enqueue(&upper, msg("m", None, None), Source::Service)
        .unwrap();
    assert_eq!(first.try_recv(), Ok(()));
    assert!(matches!(c.watch(&dev()), Watch::Ready(q) if q.len() == 1));
    assert!(lock(&c.waiting).is_empty());
}

#[test]
fn a_newer_watch_or_link_replaces_a_waiting_subscriber() {
    let c = c2d();
    let Watch::Waiting(mut older) = c.watch(&dev()) else {
        panic!("no queue yet");
    };
    let Watch::Waiting(mut newer) = c.watch(&dev()) else {
        panic!("no queue yet");
    };
    assert_eq!(older.try_recv(), Err(oneshot::error::TryRecvError::Closed));
    // A link of the device (AMQP) makes the queue and takes over from the waiting subscriber.
    let queue = c.queue(&dev());
    c.replace_link(&queue, CancellationToken::new());
    assert_eq!(newer.try_recv(), Err(oneshot::error::TryRecvError::Closed));
    assert!(lock(&c.waiting).is_empty());
}

#[test]
fn a_gone_subscriber_is_forgotten() {
    let c = c2d();
    let Watch::Waiting(first) = c.watch(&dev()) else {
        panic!("no queue yet");
    };
    c.unwatch(&dev());
    assert_eq!(lock(&c.waiting).len(), 1, "still waiting: kept");
    drop(first);
    c.unwatch(&dev());
    assert!(lock(&c.waiting).is_empty());
}
