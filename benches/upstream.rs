//! Child → parent forwarding (nested edge): module A on a child hub sends to `$upstream`; the
//! child forwards over its upstream connection to a parent hub, whose route delivers to module
//! `sink`. 256-byte bodies, at-least-once end to end (the child acknowledges A after its store
//! commit, the parent acknowledges the child after its own, `sink` accepts each delivery). Both
//! hubs run as their own processes. Prints msg/s, p50/p99 latency (A's send → sink's receive)
//! and each hub's CPU per message and RSS.
//!
//! `cargo bench --bench upstream` (env `BENCH_MESSAGES`, default 200000; `BENCH_WINDOW`,
//! default 1000; `BENCH_STORAGE` = `commit` (default), `os` or `memory`, for both hubs). Without
//! `--bench` (as `cargo test --all-targets` runs it) it sends 2000 messages as a smoke test.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::Path,
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
        messaging::{ApplicationProperties, Body, Data, Message, Outcome},
        primitives::{Binary, Value},
    },
    Receiver, Sendable,
};
use futures_util::{stream::FuturesUnordered, StreamExt};

const IOTHUB: &str = "bench-hub.azure-devices.net";
const CHILD_KEY: &str = "Y2hpbGQtZGV2aWNlLWtleS0zMi1ieXRlcy1sb25nISE=";
const PARENT_KEY: &str = "cGFyZW50LWRldmljZS1rZXktMzItYnl0ZXMtbG9uZyE=";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

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

/// Starts `edgehub run` on `config` and waits for the stderr line matching `ready`; returns the
/// process and the text after `amqps=` on the ready line.
fn spawn_hub(config: &Path, wait_for: &[&str]) -> (Child, String) {
    // BENCH_HUB: another hub binary to measure (e.g. built from an earlier commit).
    let hub = std::env::var("BENCH_HUB").unwrap_or_else(|_| env!("CARGO_BIN_EXE_edgehub").into());
    let mut child = Command::new(hub)
        .args(["run", "--config"])
        .arg(config)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a hub");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut addr = String::new();
    let mut waiting: Vec<&str> = wait_for.to_vec();
    while !waiting.is_empty() {
        let line = lines
            .next()
            .expect("hub exited before it was ready")
            .expect("read stderr");
        if let Some(rest) = line.split("amqps=").nth(1) {
            addr = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
        }
        waiting.retain(|w| !line.contains(w));
    }
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

fn id(device: &str, module: &str) -> Identity {
    Identity::Module(
        DeviceId::parse(device).expect("device id"),
        ModuleId::parse(module).expect("module id"),
    )
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full {
        env_usize("BENCH_MESSAGES", 200_000)
    } else {
        2_000
    } as u64;
    let window = env_usize("BENCH_WINDOW", 1000);
    let warmup = if full { 10_000u64 } else { 100 };
    let storage_mode = std::env::var("BENCH_STORAGE").unwrap_or_else(|_| "commit".into());
    let storage = match storage_mode.as_str() {
        "memory" => r#"{"persistent": false}"#.to_owned(),
        mode => format!(r#"{{"persistent": true, "sync": "{mode}"}}"#),
    };
    let dir = std::env::temp_dir().join(format!("edgehub-bench-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    let parent_text = format!(
        r#"{{
        "deviceId": "parent", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
        "listen": {{"amqps": "127.0.0.1:0", "mqtts": null, "https": null, "metrics": null}},
        "dataDir": "{}", "deviceKey": "{PARENT_KEY}",
        "log": {{"level": "warn,edgehub=info"}}, "storage": {storage},
        "modules": {{"sink": {{}}}},
        "devices": {{"child": {{"primaryKey": "{CHILD_KEY}", "edge": true}}}},
        "$edgeHub": {{"schemaVersion": "1.1", "routes": {{
            "r": "FROM /messages/modules/A/* INTO BrokeredEndpoint(\"/modules/sink/inputs/in1\")"}},
            "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}
    }}"#,
        dir.join("parent").display()
    );
    let parent_path = dir.join("parent.json");
    std::fs::write(&parent_path, &parent_text).expect("write parent config");
    let (mut parent, parent_addr) = spawn_hub(&parent_path, &["edgehub ready"]);
    let parent_port: u16 = parent_addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("parent port");

    let child_text = format!(
        r#"{{
        "deviceId": "child", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
        "listen": {{"amqps": "127.0.0.1:0", "mqtts": null, "https": null, "metrics": null}},
        "dataDir": "{}", "deviceKey": "{CHILD_KEY}",
        "log": {{"level": "warn,edgehub=info"}}, "storage": {storage},
        "modules": {{"A": {{}}}},
        "upstream": {{"hostname": "localhost", "port": {parent_port}, "caCert": "{}", "window": {window}}},
        "$edgeHub": {{"schemaVersion": "1.1", "routes": {{
            "r": "FROM /messages/modules/A/outputs/out1 INTO $upstream"}},
            "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}
    }}"#,
        dir.join("child").display(),
        dir.join("parent/certs/edge-ca.pem").display()
    );
    let child_path = dir.join("child.json");
    std::fs::write(&child_path, &child_text).expect("write child config");
    let (mut child, child_addr) = spawn_hub(&child_path, &["edgehub ready", "upstream connected"]);

    let parent_settings = config::from_str(&parent_text, &HashMap::new()).expect("parent config");
    let child_settings = config::from_str(&child_text, &HashMap::new()).expect("child config");
    let module_key = |settings: &config::Settings, device_key: &str, m: &str| {
        let k = Key::from_base64(device_key).expect("key");
        module_keys(settings, &k, &ModuleId::parse(m).expect("module id")).primary
    };
    let mut a = Client::connect(
        child_addr.parse().expect("child address"),
        "localhost",
        &dir.join("child/certs/edge-ca.pem"),
        IOTHUB,
        &id("child", "A"),
        &module_key(&child_settings, CHILD_KEY, "A"),
    )
    .await
    .expect("A connects to the child");
    let mut sink = Client::connect(
        parent_addr.parse().expect("parent address"),
        "localhost",
        &dir.join("parent/certs/edge-ca.pem"),
        IOTHUB,
        &id("parent", "sink"),
        &module_key(&parent_settings, PARENT_KEY, "sink"),
    )
    .await
    .expect("sink connects to the parent");
    let mut rx = Receiver::builder()
        .name("bench-in")
        .source("/devices/parent/modules/sink/messages/events")
        .credit_mode(CreditMode::Auto(2000))
        .attach(&mut sink.session)
        .await
        .expect("attach inputs");
    let mut tx = a
        .sender("/devices/child/modules/A/messages/events")
        .await
        .expect("attach events");

    let (cpid, ppid) = (child.id(), parent.id());
    let cpu_before = (cpu_secs(cpid), cpu_secs(ppid));
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
    let cpu = (cpu_secs(cpid) - cpu_before.0, cpu_secs(ppid) - cpu_before.1);
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1e6;
    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "upstream (child → parent): {n} messages of 256 B, window {window}, storage {storage_mode}"
    );
    println!("  throughput  {rate:.0} msg/s");
    println!(
        "  latency     p50 {:.2} ms, p99 {:.2} ms (A's send → sink's receive)",
        pct(0.50),
        pct(0.99)
    );
    println!(
        "  CPU         child {:.1} µs, parent {:.1} µs per message",
        cpu.0 * 1e6 / total as f64,
        cpu.1 * 1e6 / total as f64
    );
    println!(
        "  RSS peak    child {} KiB, parent {} KiB",
        proc_kib(cpid, "VmHWM:"),
        proc_kib(ppid, "VmHWM:")
    );

    tx.close().await.ok();
    a.close().await;
    sink.close().await;
    stop(&mut child);
    stop(&mut parent);
    let _ = std::fs::remove_dir_all(&dir);
}
