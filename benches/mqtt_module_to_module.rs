//! MQTT QoS 1 module → module through the hub (durable store, PUBACK after the group commit),
//! against Mosquitto with the same load client, runs alternated in one process: hub, Mosquitto,
//! hub, Mosquitto, …
//!
//! The load client is this file's: `rumqttc`'s v4 packet codec over TLS (rustls), one
//! publisher connection keeping up to `BENCH_WINDOW` QoS 1 PUBLISHes without their PUBACK, one
//! subscriber connection that PUBACKs every message, 256-byte payloads carrying their send
//! time. On the hub the publisher is module A sending on output `out1`
//! (`devices/bench/modules/A/messages/events/%24.on=out1`), routed to module B's input `in1`,
//! which B receives on `devices/bench/modules/B/inputs/in1/…` after subscribing to
//! `devices/bench/modules/B/inputs/#`; on Mosquitto the two clients use the topic `bench/m2m`.
//! Both servers speak MQTT over TLS on loopback with the hub's server certificate.
//!
//! `cargo bench --bench mqtt_module_to_module` (env `BENCH_MESSAGES`, default 100000;
//! `BENCH_WINDOW`, the publisher's, default 1000; `BENCH_SERVER_WINDOW`, the servers' delivery
//! window to the subscriber, default 256; `BENCH_RUNS`, pairs of runs, default 3; `BENCH_MOSQUITTO`,
//! the broker binary, default `/usr/sbin/mosquitto`; `BENCH_HUB`, another hub binary). Without
//! `--bench` (as `cargo test --all-targets` runs it) it sends 1000 messages through the hub
//! only, as a smoke test. Each run prints the server's CPU per message and the load client's
//! (this process's).

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use edgehub::{
    core::auth::module_keys,
    model::{
        identity::{DeviceId, Identity, ModuleId},
        sas::{make_token, now_secs, resource_for},
    },
};
use futures_util::{SinkExt, StreamExt};
use rumqttc::mqttbytes::{
    v4::{Codec, Connect, ConnectReturnCode, Login, Packet, PubAck, Publish, Subscribe},
    QoS,
};
use tokio_util::codec::{FramedRead, FramedWrite};

const IOTHUB: &str = "bench-hub.azure-devices.net";
const SIZE: usize = 256;
const WAIT: Duration = Duration::from_secs(60);

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;
type Rx = FramedRead<tokio::io::ReadHalf<Tls>, Codec>;
type Tx = FramedWrite<tokio::io::WriteHalf<Tls>, Codec>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User + system CPU seconds of a process, from /proc/<pid>/stat (clock ticks of 1/100 s).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Where the two clients go, and as whom.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    publisher: Connect,
    subscriber: Connect,
    publish_topic: String,
    filter: String,
    pid: u32,
}

async fn tls(addr: SocketAddr, ca: &Path) -> Tls {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(c.expect("CA certificate")).expect("CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS")
}

async fn connect(addr: SocketAddr, ca: &Path, c: Connect) -> (Rx, Tx) {
    let (r, w) = tokio::io::split(tls(addr, ca).await);
    let codec = Codec {
        max_incoming_size: 1 << 20,
        max_outgoing_size: 1 << 20,
    };
    let (mut rx, mut tx) = (
        FramedRead::new(r, codec.clone()),
        FramedWrite::new(w, codec),
    );
    tx.send(Packet::Connect(c)).await.expect("CONNECT");
    match tokio::time::timeout(WAIT, rx.next()).await {
        Ok(Some(Ok(Packet::ConnAck(a)))) if a.code == ConnectReturnCode::Success => {}
        other => panic!("no CONNACK 0: {other:?}"),
    }
    (rx, tx)
}

/// One run: `warmup + n` messages; returns msg/s over the measured ones, p50 and p99 latency
/// (ms), and the server's and this process's (the load client's) CPU µs per message.
async fn run(
    t: &Target,
    ca: &Path,
    n: u64,
    warmup: u64,
    window: usize,
) -> (f64, f64, f64, f64, f64) {
    let (mut sub_rx, mut sub_tx) = connect(t.addr, ca, t.subscriber.clone()).await;
    let mut s = Subscribe::new(&t.filter, QoS::AtLeastOnce);
    s.pkid = 1;
    sub_tx.send(Packet::Subscribe(s)).await.expect("SUBSCRIBE");
    loop {
        match tokio::time::timeout(WAIT, sub_rx.next()).await {
            Ok(Some(Ok(Packet::SubAck(_)))) => break,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no SUBACK: {other:?}"),
        }
    }
    let (mut pub_rx, mut pub_tx) = connect(t.addr, ca, t.publisher.clone()).await;
    let total = warmup + n;
    let t0 = Instant::now();
    let cpu0 = cpu_secs(t.pid);
    let client_cpu0 = cpu_secs(std::process::id());
    let subscriber = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n as usize);
        let mut started = None;
        let mut got = 0u64;
        while got < total {
            let p = match tokio::time::timeout(WAIT, sub_rx.next()).await {
                Ok(Some(Ok(Packet::Publish(p)))) => p,
                Ok(Some(Ok(_))) => continue,
                other => panic!("subscriber: {other:?} after {got}"),
            };
            if p.qos == QoS::AtLeastOnce {
                sub_tx
                    .feed(Packet::PubAck(PubAck::new(p.pkid)))
                    .await
                    .expect("PUBACK");
            }
            if got == warmup {
                started = Some(Instant::now());
            }
            if got >= warmup && p.payload.len() >= 8 {
                let sent = u64::from_le_bytes(p.payload[..8].try_into().unwrap_or([0; 8]));
                lat.push(t0.elapsed().as_nanos() as u64 - sent);
            }
            got += 1;
            // Write the PUBACKs out whenever nothing more is waiting to be read.
            if sub_rx.read_buffer().is_empty() {
                sub_tx.flush().await.expect("flush");
            }
        }
        sub_tx.flush().await.expect("flush");
        (started.unwrap_or_else(Instant::now).elapsed(), lat, sub_tx)
    });
    // Publisher: ids cycle through 1..=window*2; at most `window` without their PUBACK.
    let mut in_flight = 0usize;
    let mut next_id = 0u16;
    let span = u16::try_from(window * 2).unwrap_or(u16::MAX - 1);
    let mut acked = 0u64;
    for seq in 0..total {
        while in_flight >= window {
            match tokio::time::timeout(WAIT, pub_rx.next()).await {
                Ok(Some(Ok(Packet::PubAck(_)))) => {
                    in_flight -= 1;
                    acked += 1;
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("publisher: {other:?}"),
            }
        }
        let mut payload = vec![0u8; SIZE];
        payload[..8].copy_from_slice(&(t0.elapsed().as_nanos() as u64).to_le_bytes());
        payload[8..16].copy_from_slice(&seq.to_le_bytes());
        let mut p = Publish::from_bytes(&t.publish_topic, QoS::AtLeastOnce, Bytes::from(payload));
        next_id = next_id % span + 1;
        p.pkid = next_id;
        pub_tx.feed(Packet::Publish(p)).await.expect("PUBLISH");
        in_flight += 1;
        if in_flight >= window || seq + 1 == total || seq % 32 == 31 {
            pub_tx.flush().await.expect("flush");
        }
    }
    while acked < total {
        match tokio::time::timeout(WAIT, pub_rx.next()).await {
            Ok(Some(Ok(Packet::PubAck(_)))) => acked += 1,
            Ok(Some(Ok(_))) => {}
            other => panic!("publisher: {other:?}"),
        }
    }
    let (elapsed, mut lat, mut sub_tx) = subscriber.await.expect("subscriber");
    let cpu = cpu_secs(t.pid) - cpu0;
    let client_cpu = cpu_secs(std::process::id()) - client_cpu0;
    let _ = pub_tx.send(Packet::Disconnect).await;
    let _ = sub_tx.send(Packet::Disconnect).await;
    lat.sort_unstable();
    let pct = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)] as f64 / 1e6;
    (
        n as f64 / elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        cpu * 1e6 / total as f64,
        client_cpu * 1e6 / total as f64,
    )
}

/// Starts the hub; returns it, its MQTTS address and the settings.
fn start_hub(dir: &Path) -> (Child, SocketAddr, edgehub::config::Settings) {
    let config_text = format!(
        r#"{{
        "deviceId": "bench", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
        "listen": {{"amqps": "127.0.0.1:0", "mqtts": "127.0.0.1:0", "https": null, "metrics": null}},
        "dataDir": "{}", "deviceKey": "YmVuY2gtZGV2aWNlLWtleS0zMi1ieXRlcy1sb25nISE=",
        "log": {{"level": "warn,edgehub=info"}}, "storage": {{"persistent": true, "sync": "commit"}}, "limits": {{"deliveryWindow": {window}}},
        "modules": {{"A": {{}}, "B": {{}}}},
        "$edgeHub": {{"schemaVersion": "1.1", "routes": {{
            "r": "FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint(\"/modules/B/inputs/in1\")"}},
            "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}
    }}"#,
        dir.join("data").display(),
        window = server_window(),
    );
    let config_path = dir.join("edgehub.json");
    std::fs::write(&config_path, &config_text).expect("write config");
    let settings = edgehub::config::from_str(&config_text, &HashMap::new()).expect("config");
    let hub = std::env::var("BENCH_HUB").unwrap_or_else(|_| env!("CARGO_BIN_EXE_edgehub").into());
    let mut child = Command::new(hub)
        .args(["run", "--config"])
        .arg(&config_path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the hub");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = loop {
        let line = lines.next().expect("hub exited").expect("stderr");
        if line.contains("edgehub ready") {
            if let Some(rest) = line.split("mqtts=Some(").nth(1) {
                break rest.split(')').next().expect("address").to_owned();
            }
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr.parse().expect("address"), settings)
}

/// Starts Mosquitto with a TLS listener on a free loopback port, the hub's server certificate,
/// QoS 1 windows as the hub's, and no limit on queued messages.
fn start_mosquitto(dir: &Path, certs: &Path) -> Option<(Child, SocketAddr)> {
    let bin = std::env::var("BENCH_MOSQUITTO").unwrap_or_else(|_| "/usr/sbin/mosquitto".into());
    if !Path::new(&bin).exists() {
        println!("  ({bin} not found: no Mosquitto runs; apt-get install mosquitto)");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    // Mosquitto started as root reads its files as the `mosquitto` user: readable copies.
    for f in ["edge-ca.pem", "server.pem", "server.key.pem"] {
        use std::os::unix::fs::PermissionsExt;
        let to = dir.join(f);
        std::fs::copy(certs.join(f), &to).expect("copy a certificate file");
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let certs = dir;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_inflight_messages {window}\nmax_queued_messages 0\n\
             cafile {}\ncertfile {}\nkeyfile {}\nlog_type error\n",
            certs.join("edge-ca.pem").display(),
            certs.join("server.pem").display(),
            certs.join("server.key.pem").display(),
            window = server_window(),
        ),
    )
    .expect("mosquitto.conf");
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((child, addr))
}

fn module_connect(settings: &edgehub::config::Settings, m: &str) -> Connect {
    let key = edgehub::app::device_key(settings).expect("device key");
    let module = ModuleId::parse(m).expect("module id");
    let id = Identity::Module(DeviceId::parse("bench").expect("device"), module.clone());
    let token = make_token(
        &resource_for(IOTHUB, &id),
        &module_keys(settings, &key, &module).primary,
        now_secs() + 3600,
        None,
    );
    let mut c = Connect::new(format!("bench/{m}"));
    c.keep_alive = 60;
    c.login = Some(Login::new(
        format!("{IOTHUB}/bench/{m}/?api-version=2021-04-12"),
        token,
    ));
    c
}

fn anonymous(id: &str) -> Connect {
    let mut c = Connect::new(id);
    c.keep_alive = 60;
    c
}

/// The servers' delivery window: the hub's `limits.deliveryWindow` and Mosquitto's
/// `max_inflight_messages` (`BENCH_SERVER_WINDOW`, default 256, the hub's default).
fn server_window() -> usize {
    env_usize("BENCH_SERVER_WINDOW", 256)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full {
        env_usize("BENCH_MESSAGES", 100_000)
    } else {
        1_000
    } as u64;
    let warmup = if full { 5_000 } else { 100 };
    let window = env_usize("BENCH_WINDOW", 1000);
    let runs = if full { env_usize("BENCH_RUNS", 3) } else { 1 };
    let dir: PathBuf =
        std::env::temp_dir().join(format!("edgehub-mqtt-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (hub, hub_addr, settings) = start_hub(&dir);
    let hub = Stop(hub);
    let certs = dir.join("data/certs");
    let ca = certs.join("edge-ca.pem");
    let hub_target = Target {
        name: "hub",
        addr: hub_addr,
        publisher: module_connect(&settings, "A"),
        subscriber: module_connect(&settings, "B"),
        publish_topic: "devices/bench/modules/A/messages/events/%24.on=out1".into(),
        filter: "devices/bench/modules/B/inputs/#".into(),
        pid: hub.0.id(),
    };
    let mosquitto = if full {
        start_mosquitto(&dir, &certs).map(|(child, addr)| (Stop(child), addr))
    } else {
        None
    };
    let mosquitto_target = mosquitto.as_ref().map(|(Stop(child), addr)| Target {
        name: "mosquitto",
        addr: *addr,
        publisher: anonymous("bench-pub"),
        subscriber: anonymous("bench-sub"),
        publish_topic: "bench/m2m".into(),
        filter: "bench/m2m".into(),
        pid: child.id(),
    });
    println!(
        "mqtt_module_to_module: {n} QoS 1 messages of {SIZE} B (after {warmup} warm-up), window {window}"
    );
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
    for i in 0..runs {
        for t in std::iter::once(&hub_target).chain(mosquitto_target.as_ref()) {
            let (rate, p50, p99, cpu, client) = run(t, &ca, n, warmup, window).await;
            println!(
                "  run {} {:<9} {rate:>8.0} msg/s  p50 {p50:>7.2} ms  p99 {p99:>7.2} ms  server CPU {cpu:>5.1} µs/msg  client CPU {client:>5.1} µs/msg",
                i + 1,
                t.name
            );
            rates.entry(t.name).or_default().push(rate);
        }
    }
    let hub_median = median(rates.remove("hub").unwrap_or_default());
    match rates.remove("mosquitto") {
        Some(m) => {
            let m = median(m);
            println!(
                "  median: hub {hub_median:.0} msg/s, mosquitto {m:.0} msg/s, ratio {:.2}",
                hub_median / m
            );
        }
        None => println!("  median: hub {hub_median:.0} msg/s"),
    }
    drop(mosquitto);
    drop(hub);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stops a server process started by this benchmark when dropped, also when a run panics.
struct Stop(std::process::Child);

impl Drop for Stop {
    fn drop(&mut self) {
        // SIGTERM through the kill command keeps this file free of unsafe/libc.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}
