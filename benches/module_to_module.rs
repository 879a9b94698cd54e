//! Module → module through the hub: one sender, one receiver, 256-byte bodies, at-least-once
//! (unsettled transfers, every delivery accepted), loopback TLS. The hub runs as its own
//! process so its RSS is its own. Prints msg/s, p50/p99 latency (send → receive) and hub RSS.
//!
//! `cargo bench --bench module_to_module` (env `BENCH_MESSAGES`, default 200000;
//! `BENCH_WINDOW`, unsettled sends in flight, default 1000; `BENCH_HUB`, another hub binary to
//! measure, e.g. one built from an earlier commit, so two versions run alternately on the same
//! machine; `BENCH_TRANSPORT=amqpws`, both modules over AMQP over WebSockets on the HTTPS
//! listener instead of AMQPS). Without `--bench` (as `cargo test --all-targets` runs it) it sends 2000 messages as
//! a smoke test.

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

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// User + system CPU seconds of a process, from /proc/<pid>/stat (clock ticks of 1/100 s).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn message(t0: Instant, seq: u64) -> Message<Body<Value>> {
    let mut body = vec![0u8; 256];
    body[..8].copy_from_slice(&(t0.elapsed().as_nanos() as u64).to_le_bytes());
    body[8..16].copy_from_slice(&seq.to_le_bytes());
    Message::builder()
        .application_properties(
            ApplicationProperties::builder()
                .insert("iothub-outputname", "out1")
                .build(),
        )
        .body(Body::Data(vec![Data(Binary::from(body))].into()))
        .build()
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a quick smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full {
        env_usize("BENCH_MESSAGES", 200_000)
    } else {
        2_000
    } as u64;
    let window = env_usize("BENCH_WINDOW", 1000);
    let warmup = if full { 10_000u64 } else { 100 };
    // BENCH_STORAGE: "commit" (durable, fsync before ack; the default), "os", or "memory".
    let storage_mode = std::env::var("BENCH_STORAGE").unwrap_or_else(|_| "commit".into());
    let storage = match storage_mode.as_str() {
        "memory" => r#"{"persistent": false}"#.to_owned(),
        mode => format!(r#"{{"persistent": true, "sync": "{mode}"}}"#),
    };
    let ws = std::env::var("BENCH_TRANSPORT").is_ok_and(|t| t == "amqpws");
    let https = if ws { r#""127.0.0.1:0""# } else { "null" };
    let dir = std::env::temp_dir().join(format!("edgehub-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config_text = format!(
        r#"{{
        "deviceId": "bench", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
        "listen": {{"amqps": "127.0.0.1:0", "mqtts": null, "https": {https}, "metrics": null}},
        "dataDir": "{}", "deviceKey": "YmVuY2gtZGV2aWNlLWtleS0zMi1ieXRlcy1sb25nISE=",
        "log": {{"level": "warn,edgehub=info"}}, "storage": {storage},
        "modules": {{"A": {{}}, "B": {{}}}},
        "$edgeHub": {{"schemaVersion": "1.1", "routes": {{
            "r": "FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint(\"/modules/B/inputs/in1\")"}},
            "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}
    }}"#,
        dir.join("data").display()
    );
    let config_path = dir.join("edgehub.json");
    std::fs::write(&config_path, &config_text).expect("write config");
    let settings = config::from_str(&config_text, &HashMap::new()).expect("config");

    let hub = std::env::var("BENCH_HUB").unwrap_or_else(|_| env!("CARGO_BIN_EXE_edgehub").into());
    let mut child = Command::new(hub)
        .args(["run", "--config"])
        .arg(&config_path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the hub");
    let pid = child.id();
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("hub exited before it was ready")
            .expect("read stderr");
        let key = if ws { "https=Some(" } else { "amqps=" };
        if line.contains("edgehub ready") {
            if let Some(rest) = line.split(key).nth(1) {
                break rest
                    .split(|c: char| c.is_whitespace() || c == ')')
                    .next()
                    .expect("address")
                    .to_owned();
            }
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let addr = addr.parse().expect("socket address");
    let rss_idle = rss_kib(pid, "VmRSS:");

    let key = edgehub::app::device_key(&settings).expect("device key");
    let ca = dir.join("data/certs/edge-ca.pem");
    let id = |m: &str| {
        Identity::Module(
            DeviceId::parse("bench").expect("device id"),
            ModuleId::parse(m).expect("module id"),
        )
    };
    let keys =
        |m: &str| module_keys(&settings, &key, &ModuleId::parse(m).expect("module id")).primary;
    let connect = |m: &'static str| {
        let (ca, id, key) = (ca.clone(), id(m), keys(m));
        async move {
            match ws {
                true => Client::connect_ws(addr, "localhost", &ca, IOTHUB, &id, &key).await,
                false => Client::connect(addr, "localhost", &ca, IOTHUB, &id, &key).await,
            }
        }
    };
    let mut a = connect("A").await.expect("A connects");
    let mut b = connect("B").await.expect("B connects");
    let mut rx = Receiver::builder()
        .name("bench-in")
        .source("/devices/bench/modules/B/messages/events")
        .credit_mode(CreditMode::Auto(2000))
        .attach(&mut b.session)
        .await
        .expect("attach inputs");
    let mut tx = a
        .sender("/devices/bench/modules/A/messages/events")
        .await
        .expect("attach events");

    let cpu_before = cpu_secs(pid);
    let t0 = Instant::now();
    let total = warmup + n;
    let receiver = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(n as usize);
        let mut started = None;
        let mut pending = Vec::with_capacity(64);
        for i in 0..total {
            let d = tokio::time::timeout(Duration::from_secs(60), rx.recv::<Body<Value>>())
                .await
                .expect("a message within 60 s")
                .expect("receive");
            if i == warmup {
                started = Some(Instant::now());
            }
            if i >= warmup {
                if let Body::Data(batch) = &d.message().body {
                    if let Some(data) = batch.iter().next() {
                        let sent =
                            u64::from_le_bytes(data.0.as_slice()[..8].try_into().unwrap_or([0; 8]));
                        latencies.push(t0.elapsed().as_nanos() as u64 - sent);
                    }
                }
            }
            pending.push(fe2o3_amqp::link::delivery::DeliveryInfo::from(d));
            if pending.len() >= 64 || i + 1 == total {
                rx.accept_all(pending.drain(..)).await.expect("accept");
            }
        }
        (started.unwrap_or_else(Instant::now).elapsed(), latencies)
    });

    let mut in_flight = FuturesUnordered::new();
    for seq in 0..total {
        while in_flight.len() >= window {
            let r: Result<Outcome, _> = in_flight.next().await.expect("an outcome");
            assert!(matches!(r, Ok(Outcome::Accepted(_))), "{r:?}");
        }
        let fut = tx
            .send_batchable(
                Sendable::builder()
                    .message(message(t0, seq))
                    .settled(false)
                    .build(),
            )
            .await
            .expect("send");
        in_flight.push(fut);
    }
    while let Some(r) = in_flight.next().await {
        assert!(matches!(r, Ok(Outcome::Accepted(_))), "{r:?}");
    }
    let (elapsed, mut lat) = receiver.await.expect("receiver");
    let hub_cpu = cpu_secs(pid) - cpu_before;
    let rss_peak = rss_kib(pid, "VmHWM:");
    let rss_after = rss_kib(pid, "VmRSS:");
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1e6;
    let rate = n as f64 / elapsed.as_secs_f64();
    println!("module_to_module: {n} messages of 256 B, window {window}, storage {storage_mode}");
    println!("  throughput  {rate:.0} msg/s");
    println!(
        "  latency     p50 {:.2} ms, p99 {:.2} ms",
        pct(0.50),
        pct(0.99)
    );
    println!(
        "  hub CPU     {:.1} µs per message (all {total} messages)",
        hub_cpu * 1e6 / total as f64
    );
    println!("  hub RSS     idle {rss_idle} KiB, after {rss_after} KiB, peak {rss_peak} KiB");

    tx.close().await.ok();
    a.close().await;
    b.close().await;
    unsafe_free_kill(&mut child);
    let _ = std::fs::remove_dir_all(&dir);
}

fn unsafe_free_kill(child: &mut std::process::Child) {
    // SIGTERM via the kill command keeps this file free of unsafe/libc.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}
