//! The built-in endpoint's event log: what writing to it costs next to the durable queue path,
//! and how fast an Event Hubs reader reads it back from the store.
//!
//! One hub process (`sync = "commit"`), module A sending 256-byte messages with a window of
//! unsettled sends: on output `log` (routed to `$upstream`, the log) and on output `queue`
//! (routed to module B's input, the durable queue; B does not read, so only the write path is
//! measured), alternated, three runs each. Then the hub is restarted and a reader attaches to
//! the partition of device `bench` with the filter `x-opt-offset > '-1'` and reads every event,
//! pre-settled, with a credit window of 1000 that the reader tops up every 500 events, as the
//! Event Hubs SDKs do (fe2o3's automatic credit counts only deliveries the receiver settles, and
//! the hub's events come settled, so a reader left on it stops after its first window).
//!
//! `cargo bench --bench eventlog` (env `BENCH_MESSAGES` per run, default 100000;
//! `BENCH_WINDOW`, default 1000). Without `--bench` (as `cargo test --all-targets` runs it) it
//! sends 1000 messages per run as a smoke test.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use edgehub::{
    client::Client,
    config,
    core::auth::module_keys,
    model::identity::{DeviceId, Identity, Key, ModuleId},
};
use fe2o3_amqp::{
    link::receiver::CreditMode,
    types::{
        messaging::{ApplicationProperties, Body, Data, Message, Outcome, Source},
        primitives::{Binary, Symbol, Value},
    },
    Receiver, Sendable,
};
use futures_util::{stream::FuturesUnordered, StreamExt};
use serde_amqp::{described::Described, descriptor::Descriptor};

const IOTHUB: &str = "bench-hub.azure-devices.net";
const SERVICE_KEY: &str = "c2VydmljZS1rZXktZm9yLXRoZS1iZW5jaG1hcmstMzI=";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn message(output: &str, seq: u64) -> Message<Body<Value>> {
    let mut body = vec![0u8; 256];
    body[..8].copy_from_slice(&seq.to_le_bytes());
    Message::builder()
        .application_properties(
            ApplicationProperties::builder()
                .insert("iothub-outputname", output)
                .build(),
        )
        .body(Body::Data(vec![Data(Binary::from(body))].into()))
        .build()
}

/// The hub process, killed if the run fails before it is stopped.
struct Hub(Child);

impl Drop for Hub {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts the hub; returns the process and its AMQPS address.
fn start(config_path: &std::path::Path) -> (Hub, std::net::SocketAddr) {
    let hub = std::env::var("BENCH_HUB").unwrap_or_else(|_| env!("CARGO_BIN_EXE_edgehub").into());
    let mut child = Command::new(hub)
        .args(["run", "--config"])
        .arg(config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the hub");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("hub exited before it was ready")
            .expect("read stderr");
        if line.contains("edgehub ready") {
            if let Some(rest) = line.split("amqps=").nth(1) {
                break rest
                    .split(|c: char| c.is_whitespace() || c == ')')
                    .next()
                    .expect("address")
                    .to_owned();
            }
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (Hub(child), addr.parse().expect("socket address"))
}

fn stop(Hub(child): &mut Hub) {
    // SIGTERM via the kill command keeps this file free of unsafe/libc.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

/// Sends `n` messages on `output` with `window` in flight; returns messages per second.
async fn send_run(tx: &mut fe2o3_amqp::Sender, output: &str, n: u64, window: usize) -> f64 {
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for seq in 0..n {
        while in_flight.len() >= window {
            let r: Result<Outcome, _> = in_flight.next().await.expect("an outcome");
            assert!(matches!(r, Ok(Outcome::Accepted(_))), "{r:?}");
        }
        let sendable = Sendable::builder()
            .message(message(output, seq))
            .settled(false)
            .build();
        in_flight.push(tx.send_batchable(sendable).await.expect("send"));
    }
    while let Some(r) = in_flight.next().await {
        assert!(matches!(r, Ok(Outcome::Accepted(_))), "{r:?}");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full {
        env_usize("BENCH_MESSAGES", 100_000)
    } else {
        1_000
    } as u64;
    let window = env_usize("BENCH_WINDOW", 1000);
    let dir = std::env::temp_dir().join(format!("edgehub-bench-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config_text = format!(
        r#"{{
        "deviceId": "bench", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
        "listen": {{"amqps": "127.0.0.1:0", "mqtts": null, "https": null, "metrics": null}},
        "dataDir": "{}", "deviceKey": "YmVuY2gtZGV2aWNlLWtleS0zMi1ieXRlcy1sb25nISE=",
        "log": {{"level": "warn,edgehub=info"}}, "storage": {{"persistent": true, "sync": "commit"}},
        "limits": {{"queueCapacity": 10000000}},
        "modules": {{"A": {{}}, "B": {{}}}},
        "servicePolicies": {{"service": {{"primaryKey": "{SERVICE_KEY}"}}}},
        "builtInEndpoint": {{"partitionCount": 4}},
        "$edgeHub": {{"schemaVersion": "1.1", "routes": {{
            "log": "FROM /messages/modules/A/outputs/log INTO $upstream",
            "queue": "FROM /messages/modules/A/outputs/queue INTO BrokeredEndpoint(\"/modules/B/inputs/in1\")"}},
            "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}
    }}"#,
        dir.join("data").display()
    );
    let config_path = dir.join("edgehub.json");
    std::fs::write(&config_path, &config_text).expect("write config");
    let settings = config::from_str(&config_text, &HashMap::new()).expect("config");
    let ca = dir.join("data/certs/edge-ca.pem");

    let (mut child, addr) = start(&config_path);
    let key = edgehub::app::device_key(&settings).expect("device key");
    let a_id = Identity::Module(
        DeviceId::parse("bench").expect("device id"),
        ModuleId::parse("A").expect("module id"),
    );
    let a_key = module_keys(&settings, &key, &ModuleId::parse("A").expect("module id")).primary;
    let mut a = Client::connect(addr, "localhost", &ca, IOTHUB, &a_id, &a_key)
        .await
        .expect("A connects");
    let mut tx = a
        .sender("/devices/bench/modules/A/messages/events")
        .await
        .expect("attach events");
    // Warm-up on both paths.
    send_run(&mut tx, "log", n / 10, window).await;
    send_run(&mut tx, "queue", n / 10, window).await;
    let (mut log_rates, mut queue_rates) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        log_rates.push(send_run(&mut tx, "log", n, window).await);
        queue_rates.push(send_run(&mut tx, "queue", n, window).await);
    }
    tx.close().await.ok();
    a.close().await;
    stop(&mut child);
    let total = 3 * n + n / 10;
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let show = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("eventlog: {n} messages of 256 B per run, window {window}, sync commit");
    println!("  write to the log        {} msg/s", show(&log_rates));
    println!("  write to a durable queue {} msg/s", show(&queue_rates));
    println!(
        "  log / queue             {:.2} (sums)",
        sum(&log_rates) / sum(&queue_rates)
    );

    // Read it all back after a restart.
    let (mut child, addr) = start(&config_path);
    let partition = edgehub::store::log::partition_for_key("bench", 4);
    let token = edgehub::model::sas::make_token(
        IOTHUB,
        &Key::from_base64(SERVICE_KEY).expect("key"),
        edgehub::model::sas::now_secs() + 3600,
        Some("service"),
    );
    let mut reader =
        Client::connect_service_token(addr, "localhost", &ca, "sb://localhost/bench-hub", &token)
            .await
            .expect("reader connects");
    let mut filter = fe2o3_amqp::types::messaging::FilterSet::new();
    filter.insert(
        Symbol::from("apache.org:selector-filter:string"),
        Value::Described(Box::new(Described {
            descriptor: Descriptor::Code(0x0000_468C_0000_0004),
            value: Value::String("amqp.annotation.x-opt-offset > '-1'".into()),
        })),
    );
    let mut rx = Receiver::builder()
        .name("bench-reader")
        .source(
            Source::builder()
                .address(format!(
                    "bench-hub/ConsumerGroups/$Default/Partitions/{partition}"
                ))
                .filter(filter)
                .build(),
        )
        .credit_mode(CreditMode::Manual)
        .attach(&mut reader.session)
        .await
        .expect("attach the reader");
    const CREDIT: u32 = 1000;
    rx.set_credit(CREDIT).await.expect("credit");
    let started = Instant::now();
    for i in 0..total {
        let d = tokio::time::timeout(Duration::from_secs(60), rx.recv::<Body<Value>>())
            .await
            .unwrap_or_else(|_| panic!("event {i} of {total} within 60 s"))
            .expect("receive");
        if (i + 1) % u64::from(CREDIT / 2) == 0 {
            rx.set_credit(CREDIT).await.expect("credit");
        }
        if i == 0 {
            assert!(d.message().message_annotations.is_some());
        }
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    println!("  read back after a restart {rate:.0} events/s ({total} events, one partition)");
    rx.close().await.ok();
    reader.close().await;
    stop(&mut child);
    let _ = std::fs::remove_dir_all(&dir);
}
