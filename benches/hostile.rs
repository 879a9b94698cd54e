//! What an anonymous client can make the hub hold: the hub runs as its own process (so its RSS
//! is its own) and one client without credentials tries, one after the other,
//!
//! 1. a frame header declaring ~4 GiB right after the protocol header, then 256 MiB of bytes;
//! 2. 4000 `$cbs` links on one connection;
//! 3. 200 multi-frame `$cbs` deliveries of 1 MiB each, never finished;
//! 4. 1000 silent sockets (20 × `maxConnections`) at once, then a module that authenticates.
//!
//! For each it prints how the hub ended the connection and the hub's RSS and peak RSS
//! (VmHWM) before and after. `cargo bench --bench hostile` (`BENCH_HUB`: another hub binary).
//! Without `--bench` (as `cargo test --all-targets` runs it) the attacks are a tenth the size.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use edgehub::{
    client::Client,
    config,
    core::auth::module_keys,
    model::identity::{DeviceId, Identity, ModuleId},
};
use fe2o3_amqp::types::{
    definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode},
    messaging::{Source, Target},
    performatives::{Attach, Begin, ChannelMax, MaxFrameSize, Open, Performative, Transfer},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

const IOTHUB: &str = "bench-hub.azure-devices.net";
const MAX_CONNECTIONS: usize = 50;

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

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn frame(channel: u16, p: Performative, payload: &[u8]) -> Vec<u8> {
    let mut body = serde_amqp::to_vec(&p).expect("encode");
    body.extend_from_slice(payload);
    let mut f = ((8 + body.len()) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&[2, 0]);
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&body);
    f
}

async fn tls(addr: SocketAddr, ca: &Path) -> TlsStream<TcpStream> {
    let pem = std::fs::read(ca).expect("CA");
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    for c in CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.expect("cert")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS")
}

fn open_and_begin() -> Vec<u8> {
    let open = Open {
        container_id: "hostile".into(),
        hostname: None,
        max_frame_size: MaxFrameSize(1 << 20),
        channel_max: ChannelMax(65_535),
        idle_time_out: None,
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    let begin = Begin {
        remote_channel: None,
        next_outgoing_id: 0,
        incoming_window: 100_000,
        outgoing_window: 100_000,
        handle_max: Handle(u32::MAX),
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    let mut out = b"AMQP\x00\x01\x00\x00".to_vec();
    out.extend(frame(0, Performative::Open(open), &[]));
    out.extend(frame(0, Performative::Begin(begin), &[]));
    out
}

fn cbs_attach(handle: u32) -> Vec<u8> {
    frame(
        0,
        Performative::Attach(Attach {
            name: format!("cbs-{handle}"),
            handle: Handle(handle),
            role: Role::Sender,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::First,
            source: Some(Box::new(Source::builder().address("x").build())),
            target: Some(Box::new(Target::builder().address("$cbs").build().into())),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }),
        &[],
    )
}

fn partial(handle: u32, id: u32, chunk: &[u8]) -> Vec<u8> {
    frame(
        0,
        Performative::Transfer(Transfer {
            handle: Handle(handle),
            delivery_id: Some(id),
            delivery_tag: Some(id.to_be_bytes().to_vec().into()),
            message_format: Some(0),
            settled: Some(false),
            more: true,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        }),
        chunk,
    )
}

/// Writes `chunks` until the hub stops reading or ends the stream; then reads what it sent
/// until the end. Returns (bytes written, whether the hub ended the connection, the close
/// condition if one came).
async fn attack(
    mut s: TlsStream<TcpStream>,
    chunks: impl Iterator<Item = Vec<u8>>,
) -> (u64, bool, Option<String>) {
    let mut written = 0u64;
    for c in chunks {
        match tokio::time::timeout(Duration::from_secs(5), s.write_all(&c)).await {
            Ok(Ok(())) => written += c.len() as u64,
            _ => break,
        }
    }
    let _ = s.flush().await;
    let mut got = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    let text = String::from_utf8_lossy(&got);
    let condition = [
        "amqp:connection:framing-error",
        "amqp:resource-limit-exceeded",
        "amqp:unauthorized-access",
        "amqp:decode-error",
        "amqp:link:message-size-exceeded",
    ]
    .into_iter()
    .find(|c| text.contains(c))
    .map(str::to_owned);
    (written, ended, condition)
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full { 1 } else { 10 };
    let dir = std::env::temp_dir().join(format!("edgehub-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config_text = format!(
        r#"{{
        "deviceId": "bench", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
        "listen": {{"amqps": "127.0.0.1:0", "mqtts": null, "https": null, "metrics": null}},
        "dataDir": "{}", "deviceKey": "YmVuY2gtZGV2aWNlLWtleS0zMi1ieXRlcy1sb25nISE=",
        "log": {{"level": "warn,edgehub=info"}},
        "limits": {{"maxConnections": {MAX_CONNECTIONS}, "handshakeTimeoutSecs": 600, "authTimeoutSecs": 600}},
        "modules": {{"A": {{}}}},
        "$edgeHub": {{"schemaVersion": "1.1", "routes": {{}},
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
    let addr: SocketAddr = loop {
        let line = lines
            .next()
            .expect("hub exited before it was ready")
            .expect("read stderr");
        if let Some(rest) = line.split("amqps=").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .expect("address")
                .parse()
                .expect("socket address");
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let ca = dir.join("data/certs/edge-ca.pem");
    let report = |what: &str, before: (u64, u64), outcome: (u64, bool, Option<String>)| {
        let after = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
        println!(
            "{what}: sent {:.1} MiB; connection ended by the hub: {} ({}); hub RSS {:.1} → {:.1} MiB, peak {:.1} → {:.1} MiB",
            outcome.0 as f64 / (1 << 20) as f64,
            outcome.1,
            outcome.2.as_deref().unwrap_or("no close"),
            mib(before.0),
            mib(after.0),
            mib(before.1),
            mib(after.1)
        );
    };
    let now = || (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));

    // A well-behaved connection first, so what a first connection costs any process (runtime
    // workers, TLS state, allocator arenas) is not counted against the attacks.
    let key = edgehub::app::device_key(&settings).expect("device key");
    let a = ModuleId::parse("A").expect("module id");
    let id = Identity::Module(DeviceId::parse("bench").expect("device id"), a.clone());
    let keys = module_keys(&settings, &key, &a).primary;
    let warm = Client::connect(addr, "localhost", &ca, IOTHUB, &id, &keys)
        .await
        .expect("warm-up connection");
    drop(warm);

    // 1. A frame header of ~4 GiB, then 256 MiB.
    let before = now();
    let s = tls(addr, &ca).await;
    let mut head = b"AMQP\x00\x01\x00\x00".to_vec();
    head.extend_from_slice(&[0xff, 0xff, 0xff, 0x00, 2, 0, 0, 0]);
    let mib_chunk = vec![0u8; 1 << 20];
    let chunks = std::iter::once(head).chain(std::iter::repeat_n(mib_chunk, 256 / scale));
    report(
        "4 GiB frame header + 256 MiB",
        before,
        attack(s, chunks).await,
    );

    // 2. 4000 $cbs links.
    let before = now();
    let s = tls(addr, &ca).await;
    let chunks = std::iter::once(open_and_begin()).chain((0..4000 / scale as u32).map(cbs_attach));
    report("4000 $cbs links", before, attack(s, chunks).await);

    // 3. 200 unfinished 1 MiB deliveries on two $cbs links.
    let before = now();
    let s = tls(addr, &ca).await;
    let chunk = vec![0x40u8; 64 * 1024];
    let mut first = open_and_begin();
    first.extend(cbs_attach(0));
    first.extend(cbs_attach(1));
    let chunks = std::iter::once(first).chain((0..200 / scale as u32).flat_map(move |id| {
        let chunk = chunk.clone();
        (0..16).map(move |_| partial(id % 2, id, &chunk))
    }));
    report(
        "200 unfinished 1 MiB deliveries",
        before,
        attack(s, chunks).await,
    );

    // 4. Every slot taken by silent sockets, many times over, then a module that authenticates.
    let _ = rlimit::increase_nofile_limit(4096);
    let silent_count = 20 * MAX_CONNECTIONS / scale;
    let mut silent = Vec::new();
    for _ in 0..silent_count {
        silent.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let t = Instant::now();
    let module = tokio::time::timeout(
        Duration::from_secs(10),
        Client::connect(addr, "localhost", &ca, IOTHUB, &id, &keys),
    )
    .await;
    println!(
        "{silent_count} silent sockets on a maxConnections {MAX_CONNECTIONS} hub: a module {} after {:?}",
        match &module {
            Ok(Ok(_)) => "connected",
            Ok(Err(_)) => "was refused",
            Err(_) => "did not connect",
        },
        t.elapsed()
    );
    drop(module);
    drop(silent);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
