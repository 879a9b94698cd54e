//! Hub memory per idle authenticated MQTT connection: N leaf devices (`devices.leaf{i}`, each
//! with its key) connect over MQTTS with a SAS token (TLS, CONNECT, CONNACK 0, then one
//! SUBSCRIBE to their C2D topic as the SDKs do), stay connected and silent; the hub's RSS is
//! read before and after, and the difference divided by N. The hub runs as its own process
//! (release build), with its default allocator and settings except `limits.maxConnections`.
//!
//! `cargo bench --bench mqtt_idle` (env `BENCH_CONNECTIONS`, default 10000;
//! `BENCH_CONCURRENCY`, handshakes at a time, default 64; `BENCH_HUB`, another hub binary;
//! `BENCH_SUBSCRIBE=0`, CONNECT only, without the C2D SUBSCRIBE).
//! The shell's open-file limit must allow N descriptors in each process (`ulimit -n`).
//! Without `--bench` (as `cargo test --all-targets` runs it) it holds 50 connections.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use edgehub::model::{
    identity::{DeviceId, Identity, Key},
    sas::{make_token, now_secs, resource_for},
};
use futures_util::{stream, SinkExt, StreamExt};
use rumqttc::mqttbytes::{
    v4::{Codec, Connect, ConnectReturnCode, Login, Packet, Subscribe},
    QoS,
};
use tokio_util::codec::{FramedRead, FramedWrite};

const IOTHUB: &str = "bench-hub.azure-devices.net";
const KEY: &str = "YmVuY2gtbGVhZi1rZXktMzItYnl0ZXMtbG9uZyEhISE=";
const WAIT: Duration = Duration::from_secs(60);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// One idle device: TLS, CONNECT, CONNACK 0, SUBSCRIBE, SUBACK (unless `subscribe` is off); the
/// stream is kept open.
async fn hold(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    i: usize,
    subscribe: bool,
) -> Tls {
    let device = format!("leaf{i}");
    let id = Identity::Device(DeviceId::parse(&device).expect("device id"));
    let key = Key::from_base64(KEY).expect("key");
    let token = make_token(&resource_for(IOTHUB, &id), &key, now_secs() + 7200, None);
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS");
    let codec = Codec {
        max_incoming_size: 1 << 16,
        max_outgoing_size: 1 << 16,
    };
    {
        let mut rx = FramedRead::new(&mut tls, codec.clone());
        let mut c = Connect::new(device.as_str());
        c.keep_alive = 0;
        c.login = Some(Login::new(
            format!("{IOTHUB}/{device}/?api-version=2021-04-12"),
            token,
        ));
        let mut s = Subscribe::new(
            format!("devices/{device}/messages/devicebound/#"),
            QoS::AtLeastOnce,
        );
        s.pkid = 1;
        let mut out = bytes::BytesMut::new();
        let packets = if subscribe {
            vec![Packet::Connect(c), Packet::Subscribe(s)]
        } else {
            vec![Packet::Connect(c)]
        };
        for p in packets {
            let mut w = FramedWrite::new(Vec::new(), codec.clone());
            w.send(p).await.expect("encode");
            out.extend_from_slice(w.get_ref());
        }
        use tokio::io::AsyncWriteExt;
        rx.get_mut().write_all(&out).await.expect("write");
        rx.get_mut().flush().await.expect("flush");
        match tokio::time::timeout(WAIT, rx.next()).await {
            Ok(Some(Ok(Packet::ConnAck(a)))) if a.code == ConnectReturnCode::Success => {}
            other => panic!("{device}: no CONNACK 0: {other:?}"),
        }
        if subscribe {
            match tokio::time::timeout(WAIT, rx.next()).await {
                Ok(Some(Ok(Packet::SubAck(_)))) => {}
                other => panic!("{device}: no SUBACK: {other:?}"),
            }
        }
    }
    tls
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full {
        env_usize("BENCH_CONNECTIONS", 10_000)
    } else {
        50
    };
    let concurrency = env_usize("BENCH_CONCURRENCY", 64);
    let subscribe = env_usize("BENCH_SUBSCRIBE", 1) != 0;
    let dir = std::env::temp_dir().join(format!("edgehub-idle-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let devices: Vec<String> = (0..n)
        .map(|i| format!(r#""leaf{i}": {{"primaryKey": "{KEY}"}}"#))
        .collect();
    let config_text = format!(
        r#"{{
        "deviceId": "bench", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
        "listen": {{"amqps": "127.0.0.1:0", "mqtts": "127.0.0.1:0", "https": null, "metrics": null}},
        "dataDir": "{}", "deviceKey": "YmVuY2gtZGV2aWNlLWtleS0zMi1ieXRlcy1sb25nISE=",
        "log": {{"level": "{}"}},
        "limits": {{"maxConnections": {}}},
        "devices": {{{}}},
        "$edgeHub": {{"schemaVersion": "1.1", "routes": {{}},
            "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}
    }}"#,
        dir.join("data").display(),
        std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn,edgehub=info".into()),
        n + 100,
        devices.join(",")
    );
    let config_path = dir.join("edgehub.json");
    std::fs::write(&config_path, &config_text).expect("write config");
    let hub = std::env::var("BENCH_HUB").unwrap_or_else(|_| env!("CARGO_BIN_EXE_edgehub").into());
    let mut child = Command::new(hub)
        .args(["run", "--config"])
        .arg(&config_path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the hub");
    let pid = child.id();
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr: SocketAddr = loop {
        let line = lines.next().expect("hub exited").expect("stderr");
        if line.contains("edgehub ready") {
            if let Some(rest) = line.split("mqtts=Some(").nth(1) {
                break rest
                    .split(')')
                    .next()
                    .expect("address")
                    .parse()
                    .expect("address");
            }
        }
    };
    // The hub's warnings and errors (what it logs above `info`) are shown.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if !line.contains(" INFO ") {
                eprintln!("hub: {line}");
            }
        }
    });
    let hub = Stop(child);

    let ca = dir.join("data/certs/edge-ca.pem");
    let config = client_config(&ca);
    // A first connection warms up what every connection shares (TLS session machinery, the
    // session store's first write, the metrics series).
    let warm = hold(addr, config.clone(), 0, subscribe).await;
    drop(warm);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = status_kib(pid, "VmRSS:");
    let started = Instant::now();
    let held: Vec<Tls> = stream::iter(0..n)
        .map(|i| hold(addr, config.clone(), i, subscribe))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let took = started.elapsed();
    // Let the hub settle (tasks parked, buffers of the handshakes returned).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after = status_kib(pid, "VmRSS:");
    let per = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / n as f64;
    println!(
        "mqtt_idle: {n} idle authenticated MQTTS connections (held {}, {})",
        held.len(),
        if subscribe {
            "each subscribed to its C2D topic"
        } else {
            "CONNECT only"
        }
    );
    println!("  connected in {:.1} s", took.as_secs_f64());
    println!(
        "  hub RSS     before {rss_before} KiB, after {rss_after} KiB, peak {} KiB",
        status_kib(pid, "VmHWM:")
    );
    println!("  per connection {:.1} KB ({per:.0} bytes)", per / 1000.0);
    drop(held);
    drop(hub);
    let _ = std::fs::remove_dir_all(&dir);
}

fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(c.expect("CA certificate")).expect("CA");
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
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
