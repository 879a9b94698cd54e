use super::*;

fn endpoint() -> BuiltInEndpoint {
    BuiltInEndpoint {
        name: "myhub".into(),
        partition_count: 4,
        retention_ms: 24 * 3_600_000,
        consumer_groups: vec!["$Default".into(), "dashboards".into()],
    }
}

#[test]
fn selector_filters_as_the_sdks_write_them() {
    let ok = [
        ("amqp.annotation.x-opt-offset > '-1'", Start::Earliest),
        ("amqp.annotation.x-opt-offset >= '-1'", Start::Earliest),
        ("amqp.annotation.x-opt-offset > '@latest'", Start::Latest),
        ("amqp.annotation.x-opt-offset > '41'", Start::Sequence(42)),
        ("amqp.annotation.x-opt-offset >= '41'", Start::Sequence(41)),
        (
            "amqp.annotation.x-opt-sequence-number > '7'",
            Start::Sequence(8),
        ),
        (
            "amqp.annotation.x-opt-sequence-number >= '7'",
            Start::Sequence(7),
        ),
        (
            "amqp.annotation.x-opt-sequence-number > '-1'",
            Start::Sequence(0),
        ),
        (
            "amqp.annotation.x-opt-enqueued-time > '1700000000000'",
            Start::Time(1_700_000_000_001),
        ),
        (
            "amqp.annotation.x-opt-enqueued-time >= '1700000000000'",
            Start::Time(1_700_000_000_000),
        ),
        ("  amqp.annotation.x-opt-offset>'3'  ", Start::Sequence(4)),
    ];
    for (f, want) in ok {
        assert_eq!(parse_filter(f), Ok(want), "{f}");
    }
    for bad in [
        "",
        "amqp.annotation.x-opt-offset < '3'",
        "amqp.annotation.x-opt-offset = '3'",
        "amqp.annotation.x-opt-offset > 3",
        "amqp.annotation.x-opt-offset > 'abc'",
        "amqp.annotation.x-opt-other > '3'",
        "x-opt-offset > '3'",
        "amqp.annotation.x-opt-sequence-number > '99999999999999999999999'",
    ] {
        assert!(parse_filter(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn filters_in_both_descriptor_forms_and_bounded() {
    use serde_amqp::{described::Described, descriptor::Descriptor};
    let set = |descriptor, text: String| {
        let mut f = fe2o3_amqp::types::messaging::FilterSet::new();
        f.insert(
            Symbol::from(SELECTOR_FILTER),
            Value::Described(Box::new(Described {
                descriptor,
                value: Value::String(text),
            })),
        );
        f
    };
    let text = "amqp.annotation.x-opt-offset > '-1'".to_owned();
    let js = set(Descriptor::Code(SELECTOR_FILTER_CODE), text.clone());
    let py = set(
        Descriptor::Name(Symbol::from(SELECTOR_FILTER)),
        text.clone(),
    );
    assert_eq!(selector_filter(&js), Ok(Some(text.clone())));
    assert_eq!(selector_filter(&py), Ok(Some(text)));
    assert!(selector_filter(&set(Descriptor::Code(7), "x".into())).is_err());
    let long = "amqp.annotation.x-opt-offset > '".to_owned() + &"1".repeat(600) + "'";
    assert!(selector_filter(&set(Descriptor::Code(SELECTOR_FILTER_CODE), long)).is_err());
    assert_eq!(
        selector_filter(&fe2o3_amqp::types::messaging::FilterSet::new()),
        Ok(None)
    );
}

#[test]
fn addresses_of_the_endpoint() {
    let eh = endpoint();
    let c = |a: &str, role| classify(Some(a), role, Some(&eh));
    use ClientRole::{Receiver, Sender};
    assert_eq!(c("$management", Sender), Some(Node::Requests));
    assert_eq!(c("$management", Receiver), Some(Node::Replies));
    let p = |group: &str, partition, path: &str| {
        Some(Node::Partition {
            group: group.into(),
            partition,
            path: path.into(),
        })
    };
    assert_eq!(
        c("myhub/ConsumerGroups/$default/Partitions/0", Receiver),
        p("$Default", 0, "myhub/ConsumerGroups/$default/Partitions/0")
    );
    assert_eq!(
        c(
            "amqps://127.0.0.1:5671/MYHUB/consumergroups/Dashboards/partitions/3",
            Receiver
        ),
        p(
            "dashboards",
            3,
            "MYHUB/consumergroups/Dashboards/partitions/3"
        )
    );
    assert!(matches!(
        c("myhub/ConsumerGroups/other/Partitions/0", Receiver),
        Some(Node::Unknown(_))
    ));
    assert!(matches!(
        c("myhub/ConsumerGroups/$Default/Partitions/4", Receiver),
        Some(Node::Unknown(_))
    ));
    assert!(matches!(
        c("myhub/ConsumerGroups/$Default/Partitions/0", Sender),
        Some(Node::Unknown(_))
    ));
    // Device-side addresses, and a hub without the endpoint, are left alone.
    assert_eq!(c("/devices/d/messages/events", Sender), None);
    assert_eq!(c("$cbs", Sender), None);
    assert_eq!(classify(Some("$management"), Sender, None), None);
}

#[test]
fn a_grant_covers_its_path_and_what_is_below_it() {
    assert!(covers("", "myhub/consumergroups/$default/partitions/0"));
    assert!(covers(
        "myhub",
        "MyHub/ConsumerGroups/$Default/Partitions/0"
    ));
    assert!(covers(
        "myhub/consumergroups/$default",
        "myhub/ConsumerGroups/$Default/Partitions/1"
    ));
    assert!(covers(
        "myhub/consumergroups/$default/partitions/1",
        "myhub/ConsumerGroups/$Default/Partitions/1"
    ));
    assert!(!covers(
        "myhub/consumergroups/$default/partitions/1",
        "myhub/ConsumerGroups/$Default/Partitions/10"
    ));
    assert!(!covers(
        "myhu",
        "myhub/ConsumerGroups/$Default/Partitions/1"
    ));
    assert!(!covers("other", "myhub"));
    let grants = ServiceGrants::default();
    let root = CancellationToken::new();
    assert!(grants.grant(&root, "myhub/consumergroups/dashboards".into(), 2000));
    assert!(grants
        .link_stop("myhub/ConsumerGroups/dashboards/Partitions/0", 1000)
        .is_some());
    assert!(grants
        .link_stop("myhub/ConsumerGroups/$Default/Partitions/0", 1000)
        .is_none());
    let stop = grants
        .link_stop("myhub/ConsumerGroups/dashboards/Partitions/0", 1000)
        .unwrap();
    grants.expire(2000 + crate::model::sas::MAX_CLOCK_SKEW_SECS + 1);
    assert!(stop.is_cancelled(), "an expired grant stops its links");
    for i in 0..MAX_GRANTS {
        assert!(grants.grant(&root, format!("myhub/{i}"), 5000));
    }
    assert!(!grants.grant(&root, "myhub/one-more".into(), 5000));
    assert!(
        grants.grant(&root, "myhub/0".into(), 6000),
        "a renewal always fits"
    );
}

#[test]
fn an_event_carries_iot_hubs_annotations_and_what_the_device_sent() {
    use crate::model::identity::{DeviceId, Identity, ModuleId};
    let mut app = OrderedMap::new();
    app.insert("temperature".to_owned(), SimpleValue::Double(21.5.into()));
    app.insert("level".to_owned(), SimpleValue::String("high".into()));
    let msg = crate::model::message::Message {
        body: br#"{"n":1}"#.to_vec(),
        properties: Some(Properties {
            message_id: Some("m-1".to_owned().into()),
            content_type: Some(Symbol::from("application/json")),
            ..Default::default()
        }),
        application_properties: app.clone(),
        annotations: OrderedMap::new(),
        from: Identity::Module(
            DeviceId::parse("edge1").unwrap(),
            ModuleId::parse("sensor").unwrap(),
        ),
        output: Some("out".into()),
        enqueued_ms: 1_700_000_000_000,
        twin_change: false,
        id: 1,
    };
    let e = Event {
        sequence: 12,
        enqueued_ms: 1_700_000_000_005,
        msg,
    };
    let m = event_message(&e);
    let ann = m.message_annotations.unwrap().0;
    let get = |k: &str| ann.get(&OwnedKey::Symbol(Symbol::from(k))).cloned();
    assert_eq!(get("x-opt-sequence-number"), Some(Value::Long(12)));
    assert_eq!(get("x-opt-offset"), Some(Value::String("12".into())));
    assert_eq!(
        get("x-opt-enqueued-time"),
        Some(Value::Timestamp(Timestamp::from_milliseconds(
            1_700_000_000_005
        )))
    );
    assert_eq!(
        get("x-opt-partition-key"),
        Some(Value::String("edge1".into()))
    );
    assert_eq!(
        get("iothub-connection-device-id"),
        Some(Value::String("edge1".into()))
    );
    assert_eq!(
        get("iothub-connection-module-id"),
        Some(Value::String("sensor".into()))
    );
    assert_eq!(
        get("iothub-enqueuedtime"),
        Some(Value::Timestamp(Timestamp::from_milliseconds(
            1_700_000_000_000
        )))
    );
    assert_eq!(
        get("iothub-message-source"),
        Some(Value::String("Telemetry".into()))
    );
    assert_eq!(
        m.application_properties.unwrap().0,
        app,
        "unchanged, every type"
    );
    assert_eq!(
        m.properties.unwrap().message_id,
        Some("m-1".to_owned().into())
    );
    match m.body {
        Body::Data(d) => assert_eq!(d.into_iter().next().unwrap().0.into_vec(), br#"{"n":1}"#),
        other => panic!("{other:?}"),
    }
}

#[test]
fn management_answers_are_maps_with_string_keys() {
    let v = partition_properties(
        "myhub",
        2,
        &crate::store::log::PartitionInfo {
            begin: 0,
            last: None,
            last_enqueued_ms: 0,
            empty: true,
        },
    );
    let Value::Map(m) = v else { panic!() };
    let get = |k: &str| m.get(&Value::String(k.into())).cloned();
    assert_eq!(get("partition"), Some(Value::String("2".into())));
    assert_eq!(get("last_enqueued_sequence_number"), Some(Value::Long(-1)));
    assert_eq!(
        get("last_enqueued_offset"),
        Some(Value::String("-1".into()))
    );
    assert_eq!(get("is_partition_empty"), Some(Value::Bool(true)));
    let Value::Map(m) = eventhub_properties(&endpoint(), 5) else {
        panic!()
    };
    assert_eq!(
        m.get(&Value::String("partition_count".into())),
        Some(&Value::Int(4))
    );
    let reply = management_reply(
        Some(MessageId::Uuid(uuid::Uuid::nil().into_bytes().into())),
        200,
        "OK",
        None,
        Some(Value::Null),
    );
    assert!(matches!(
        reply.properties.unwrap().correlation_id,
        Some(MessageId::Uuid(_))
    ));
    assert!(!reply
        .application_properties
        .unwrap()
        .0
        .contains_key("error-condition"));
}
