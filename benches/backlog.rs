//! Draining a backlog: module B is offline while A queues `BENCH_BACKLOG` messages (durable
//! store, fsync before ack); then B connects and drains while A keeps sending live messages at
//! about 1000/s. Prints the drain rate, bytes on disk per queued message, and the latency of the
//! live messages during the drain, with `BENCH_LIVE_FIRST=1` (the endpoint serves the newest
//! messages interleaved with the backlog) or without (strict FIFO).
//!
//! `cargo bench --bench backlog` (without `--bench` it is a short smoke run).

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use edgehub::{
    client::Client,
    config,
    core::auth::module_keys,
    model::identity::{DeviceId, Identity, ModuleId},
};
use fe2o3_amqp::{
    link::receiver::CreditMode,
    types::{
        messaging::{ApplicationProperties, Body, Data, Message, Outcome},
        primitives::{Binary, Value},
    },
    Receiver, Sendable,
};
use futures_util::{stream::FuturesUnordered, StreamExt};

const IOTHUB: &str = "bench-hub.azure-devices.net";

fn message(t0: Instant, live: bool) -> Message<Body<Value>> {
    let mut body = vec![0u8; 256];
    body[..8].copy_from_slice(&(t0.elapsed().as_nanos() as u64).to_le_bytes());
    body[8] = u8::from(live);
    Message::builder()
        .application_properties(
            ApplicationProperties::builder()
                .insert("iothub-outputname", "out1")
                .build(),
        )
        .body(Body::Data(vec![Data(Binary::from(body))].into()))
        .build()
}

fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        dir_size(&e.path())
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let backlog: u64 = if full {
        std::env::var("BENCH_BACKLOG")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000)
    } else {
        2_000
    };
    let live_first = std::env::var("BENCH_LIVE_FIRST").is_ok_and(|v| v == "1");
    let dir = std::env::temp_dir().join(format!("edgehub-backlog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let live_cfg = if live_first {
        r#", "liveFirst": ["/modules/B/inputs/in1"]"#
    } else {
        ""
    };
    let text = format!(
        r#"{{"deviceId": "bench", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
        "listen": {{"amqps": "127.0.0.1:0", "mqtts": null, "https": null, "metrics": null}},
        "dataDir": "{}", "deviceKey": "YmVuY2gtZGV2aWNlLWtleS0zMi1ieXRlcy1sb25nISE=",
        "limits": {{"queueCapacity": 10000000}}, "log": {{"level": "warn,edgehub=info"}},
        "storage": {{"persistent": true, "sync": "commit"{live_cfg}}},
        "modules": {{"A": {{}}, "B": {{}}}},
        "$edgeHub": {{"schemaVersion": "1.1", "routes": {{
            "r": "FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint(\"/modules/B/inputs/in1\")"}},
            "storeAndForwardConfiguration": {{"timeToLiveSecs": 86400}}}}}}"#,
        dir.join("data").display()
    );
    let cfg = dir.join("edgehub.json");
    std::fs::write(&cfg, &text).expect("config");
    let settings = config::from_str(&text, &HashMap::new()).expect("config");
    // BENCH_HUB: another hub binary to measure (e.g. built from an earlier commit).
    let hub = std::env::var("BENCH_HUB").unwrap_or_else(|_| env!("CARGO_BIN_EXE_edgehub").into());
    let mut child = Command::new(hub)
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .expect("hub");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = loop {
        let line = lines.next().expect("ready").expect("stderr");
        if let Some(rest) = line.split("amqps=").nth(1) {
            break rest.split_whitespace().next().expect("addr").to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let addr = addr.parse().expect("addr");
    let key = edgehub::app::device_key(&settings).expect("key");
    let ca = dir.join("data/certs/edge-ca.pem");
    let id = |m: &str| {
        Identity::Module(
            DeviceId::parse("bench").expect("id"),
            ModuleId::parse(m).expect("id"),
        )
    };
    let keys = |m: &str| module_keys(&settings, &key, &ModuleId::parse(m).expect("id")).primary;
    let mut a = Client::connect(addr, "localhost", &ca, IOTHUB, &id("A"), &keys("A"))
        .await
        .expect("A");
    let mut tx = a
        .sender("/devices/bench/modules/A/messages/events")
        .await
        .expect("events");

    // 1. The backlog, while B is offline.
    let t0 = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for _ in 0..backlog {
        while in_flight.len() >= 1000 {
            let r: Result<Outcome, _> = in_flight.next().await.expect("outcome");
            assert!(matches!(r, Ok(Outcome::Accepted(_))), "{r:?}");
        }
        in_flight.push(
            tx.send_batchable(Sendable::from(message(t0, false)))
                .await
                .expect("send"),
        );
    }
    while let Some(r) = in_flight.next().await {
        assert!(matches!(r, Ok(Outcome::Accepted(_))), "{r:?}");
    }
    let fill = t0.elapsed();
    let disk = dir_size(&dir.join("data/store"));

    // 2. B drains while A sends live messages at ~1000/s.
    let mut b = Client::connect(addr, "localhost", &ca, IOTHUB, &id("B"), &keys("B"))
        .await
        .expect("B");
    let mut rx = Receiver::builder()
        .name("in")
        .source("/devices/bench/modules/B/messages/events")
        .credit_mode(CreditMode::Auto(1000))
        .attach(&mut b.session)
        .await
        .expect("inputs");
    let live_total = 2_000u64.min(backlog);
    let drain = tokio::spawn(async move {
        let started = Instant::now();
        let (mut old, mut live) = (0u64, Vec::new());
        while old < backlog || (live.len() as u64) < live_total {
            let d = rx.recv::<Body<Value>>().await.expect("recv");
            if let Body::Data(batch) = &d.message().body {
                if let Some(data) = batch.iter().next() {
                    let bytes = data.0.as_slice();
                    if bytes[8] == 1 {
                        let sent = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
                        live.push(t0.elapsed().as_nanos() as u64 - sent);
                    } else {
                        old += 1;
                    }
                }
            }
            rx.accept(&d).await.expect("accept");
        }
        (started.elapsed(), live)
    });
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for _ in 0..live_total {
        tick.tick().await;
        let r = tx.send(message(t0, true)).await.expect("live send");
        assert!(matches!(r, Outcome::Accepted(_)));
    }
    let (elapsed, mut live) = drain.await.expect("drain");
    live.sort_unstable();
    let pct = |p: f64| live[((live.len() as f64 * p) as usize).min(live.len() - 1)] as f64 / 1e6;
    println!(
        "backlog: {backlog} messages of 256 B queued in {:.1} s ({:.0} msg/s), {:.0} bytes on disk per message",
        fill.as_secs_f64(),
        backlog as f64 / fill.as_secs_f64(),
        disk as f64 / backlog as f64
    );
    println!(
        "  live-first {live_first}: drained in {:.1} s ({:.0} msg/s)",
        elapsed.as_secs_f64(),
        backlog as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  live messages during the drain: p50 {:.1} ms, p99 {:.1} ms",
        pct(0.5),
        pct(0.99)
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
