//! Routing cost per message: 100 routes with conditions (a third of them on `$body`), one
//! message evaluated against all of them, repeated. Prints ns per message.
//!
//! `cargo bench --bench routing` (without `--bench`, as `cargo test --all-targets` runs it, it
//! does a short smoke run).

use std::{hint::black_box, sync::Arc, time::Instant};

use edgehub::{
    model::identity::{DeviceId, Identity, ModuleId},
    model::message::Message,
    routing::route::{parse_statement, Route},
    routing::router::{memory_queues, Router},
};
use fe2o3_amqp::types::{
    messaging::Properties,
    primitives::{SimpleValue, Symbol},
};

fn routes() -> Vec<Route> {
    (0..100)
        .map(|i| {
            let sink = format!("BrokeredEndpoint(\"/modules/m{}/inputs/in{}\")", i % 10, i % 3);
            let text = match i % 3 {
                0 => format!("FROM /messages/modules/sensor/* WHERE alert = 'level{i}' OR site = 'plant{}' INTO {sink}", i % 7),
                1 => format!(
                    "FROM /messages/* WHERE $body.temperature.value > {} AND $body.tags[0] = 'hot' INTO {sink}",
                    20 + i % 15
                ),
                _ => format!("FROM /messages/modules/sensor/outputs/out1 WHERE $connectionModuleId = 'sensor' AND as_number(seq) % {} = 0 INTO {sink}", 2 + i % 5),
            };
            Route {
                name: format!("r{i}"),
                statement: parse_statement(&text).expect("route"),
                priority: (i % 10) as u32,
                time_to_live_secs: 0,
            }
        })
        .collect()
}

fn message() -> Message {
    let mut app = serde_amqp::primitives::OrderedMap::new();
    app.insert("alert".to_owned(), SimpleValue::String("level42".into()));
    app.insert("site".to_owned(), SimpleValue::String("plant3".into()));
    app.insert("seq".to_owned(), SimpleValue::String("12".into()));
    Message {
        body: br#"{"temperature":{"value":27.5,"unit":"C"},"tags":["hot","line-3"],"machine":"press-7"}"#.to_vec(),
        properties: Some(Properties {
            content_type: Some(Symbol::from("application/json")),
            content_encoding: Some(Symbol::from("utf-8")),
            ..Default::default()
        }),
        application_properties: app,
        annotations: Default::default(),
        from: Identity::Module(DeviceId::parse("edge").expect("id"), ModuleId::parse("sensor").expect("id")),
        output: Some("out1".into()),
        enqueued_ms: 0,
        twin_change: false,
        id: 1,
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: u32 = if full { 1_000_000 } else { 1_000 };
    let router = Router::new(
        &DeviceId::parse("edge").expect("id"),
        routes(),
        Some(7200),
        &memory_queues(10),
        &[],
    );
    let msg = Arc::new(message());
    let targets = router.route(&msg).len();
    for _ in 0..n / 10 {
        black_box(router.route(black_box(&msg)));
    }
    let t = Instant::now();
    for _ in 0..n {
        black_box(router.route(black_box(&msg)));
    }
    let per = t.elapsed().as_nanos() as f64 / f64::from(n);
    println!("routing: 100 routes with conditions (34 on $body), {targets} targets matched");
    println!("  {per:.0} ns per message ({n} messages)");
}
