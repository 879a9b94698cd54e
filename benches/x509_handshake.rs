//! The cost of a connection authenticated by a client certificate against one authenticated by a
//! SAS token. Each connection does everything a device does before its first message, then
//! closes:
//!
//! * **SAS**: TCP, TLS (server certificate only), AMQP open, session begin, `$cbs` put-token
//!   (the hub checks the HMAC), attach `/devices/sasDevice/messages/events`, close;
//! * **X.509 thumbprint**: TCP, TLS with a self-signed client certificate (the hub checks the
//!   handshake signature and the SHA-1 thumbprint), AMQP open (authenticated from then on),
//!   session begin, attach `/devices/thumbDevice/messages/events`, close;
//! * **X.509 CA**: the same with a certificate issued by a CA in `tls.clientCaCerts` (the hub
//!   verifies the chain with webpki and the CN).
//!
//! The three kinds alternate within each round against one hub process, with `BENCH_CLIENTS`
//! connections in flight at once. Each kind has one identity, and a newer connection of an
//! identity replaces the older one (edgeHub's rule), so more than one in flight needs as many
//! identities: the default is one at a time. Per kind it prints connections per second and the hub's CPU
//! per connection (from /proc), per round and the median over rounds, and the ratios X.509/SAS.
//!
//! `cargo bench --bench x509_handshake` (env `BENCH_ROUNDS`, default 5; `BENCH_CONNECTIONS`
//! per kind and round, default 1000; `BENCH_CLIENTS`, default 1; `BENCH_HUB`, another hub
//! binary). Without `--bench` (as `cargo test --all-targets` runs it) one round of 20.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use edgehub::{
    client::{Client, ClientCert},
    config,
    model::{
        identity::{DeviceId, Identity, Key},
        x509::Thumbprint,
    },
};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

const IOTHUB: &str = "bench-hub.azure-devices.net";
const SAS_KEY: &str = "YmVuY2gtc2FzLWRldmljZS1rZXktMzItYnl0ZXMtbG9uZyE=";

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

fn params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2049, 1, 1);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p
}

fn client_cert(c: &rcgen::Certificate, k: &KeyPair) -> (Vec<u8>, Vec<u8>) {
    (c.der().to_vec(), k.serialize_der())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Sas,
    Thumbprint,
    Ca,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Sas, Kind::Thumbprint, Kind::Ca];

    fn name(self) -> &'static str {
        match self {
            Kind::Sas => "SAS ($cbs put-token)",
            Kind::Thumbprint => "X.509 thumbprint",
            Kind::Ca => "X.509 CA-signed",
        }
    }

    fn device(self) -> &'static str {
        match self {
            Kind::Sas => "sasDevice",
            Kind::Thumbprint => "thumbDevice",
            Kind::Ca => "caDevice",
        }
    }
}

struct Setup {
    addr: SocketAddr,
    ca: PathBuf,
    /// (certificate DER, PKCS#8 key DER) of the thumbprint and the CA-signed device.
    thumb: (Vec<u8>, Vec<u8>),
    signed: (Vec<u8>, Vec<u8>),
    sas_key: Key,
}

impl Setup {
    fn cert(&self, kind: Kind) -> ClientCert {
        let (der, key) = match kind {
            Kind::Ca => &self.signed,
            _ => &self.thumb,
        };
        ClientCert {
            chain: vec![der.clone().into()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.clone())),
        }
    }

    /// One whole connection of `kind`: connect, authenticate, attach one link, close.
    async fn one(&self, kind: Kind) {
        let address = format!("/devices/{}/messages/events", kind.device());
        let mut client = match kind {
            Kind::Sas => {
                let id = Identity::Device(DeviceId::parse("sasDevice").expect("id"));
                Client::connect(self.addr, "localhost", &self.ca, IOTHUB, &id, &self.sas_key).await
            }
            _ => {
                Client::connect_x509(self.addr, "localhost", &self.ca, self.cert(kind), false).await
            }
        }
        .expect("connect");
        let tx = client.sender(&address).await.expect("attach");
        tx.close().await.expect("detach");
        client.close().await;
    }
}

/// `n` connections of `kind`, `clients` at a time; returns (connections/s, hub CPU µs each).
async fn batch(setup: &Arc<Setup>, pid: u32, kind: Kind, n: usize, clients: usize) -> (f64, f64) {
    let cpu = cpu_secs(pid);
    let t0 = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (setup, next) = (setup.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    tokio::time::timeout(Duration::from_secs(30), setup.one(kind))
                        .await
                        .expect("a connection within 30 s");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    let secs = t0.elapsed().as_secs_f64();
    (n as f64 / secs, (cpu_secs(pid) - cpu) * 1e6 / n as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rounds = if full {
        env_usize("BENCH_ROUNDS", 5)
    } else {
        1
    };
    let n = if full {
        env_usize("BENCH_CONNECTIONS", 1000)
    } else {
        20
    };
    let clients = env_usize("BENCH_CLIENTS", 1).max(1);
    let dir = std::env::temp_dir().join(format!("edgehub-bench-x509-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    // The devices' certificates: one self-signed, one issued by the client CA.
    let thumb_key = KeyPair::generate().expect("key");
    let thumb = params("thumb").self_signed(&thumb_key).expect("cert");
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = params("bench devices CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.extended_key_usages.clear();
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let signed_key = KeyPair::generate().expect("key");
    let signed = params("caDevice")
        .signed_by(&signed_key, &ca, &ca_key)
        .expect("cert");
    let client_cas = dir.join("client-cas.pem");
    std::fs::write(&client_cas, ca.pem()).expect("write CA");

    let config_text = format!(
        r#"{{
        "deviceId": "bench", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
        "listen": {{"amqps": "127.0.0.1:0", "mqtts": null, "https": null, "metrics": null}},
        "dataDir": "{}", "deviceKey": "YmVuY2gtZGV2aWNlLWtleS0zMi1ieXRlcy1sb25nISE=",
        "log": {{"level": "warn,edgehub=info"}},
        "limits": {{"maxConnections": 1000}},
        "modules": {{}},
        "devices": {{"sasDevice": {{"primaryKey": "{SAS_KEY}"}},
                     "thumbDevice": {{"x509": {{"primaryThumbprint": "{}"}}}},
                     "caDevice": {{"x509": {{"ca": true}}}}}},
        "tls": {{"clientCaCerts": "{}"}},
        "$edgeHub": {{"schemaVersion": "1.1", "routes": {{}},
            "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}
    }}"#,
        dir.join("data").display(),
        Thumbprint::sha1_hex(thumb.der()),
        client_cas.display()
    );
    let config_path = dir.join("edgehub.json");
    std::fs::write(&config_path, &config_text).expect("write config");
    config::from_str(&config_text, &HashMap::new()).expect("config");

    let hub = std::env::var("BENCH_HUB").unwrap_or_else(|_| env!("CARGO_BIN_EXE_edgehub").into());
    let mut child = Command::new(hub)
        .args(["run", "--config"])
        .arg(&config_path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the hub");
    let pid = child.id();
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
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

    let setup = Arc::new(Setup {
        addr: addr.parse().expect("socket address"),
        ca: dir.join("data/certs/edge-ca.pem"),
        thumb: client_cert(&thumb, &thumb_key),
        signed: client_cert(&signed, &signed_key),
        sas_key: Key::from_base64(SAS_KEY).expect("key"),
    });
    // Warm-up: every kind once (and the hub's first-connection work).
    for kind in Kind::ALL {
        batch(&setup, pid, kind, clients * 5, clients).await;
    }

    println!(
        "x509_handshake: {rounds} rounds × {n} connections per kind, {clients} in flight; \
         connect, authenticate, attach one link, close"
    );
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut cpus: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        // Alternate the order too, so no kind always runs first in a round.
        let mut order = Kind::ALL;
        order.rotate_left(round % Kind::ALL.len());
        for kind in order {
            let (rate, cpu) = batch(&setup, pid, kind, n, clients).await;
            println!(
                "  round {round}  {:<22} {rate:7.0} conn/s  hub CPU {cpu:6.0} µs/conn",
                kind.name()
            );
            rates.entry(kind.name()).or_default().push(rate);
            cpus.entry(kind.name()).or_default().push(cpu);
        }
    }
    let med = |m: &HashMap<&str, Vec<f64>>, k: Kind| median(m[k.name()].clone());
    println!("  median over rounds:");
    for kind in Kind::ALL {
        println!(
            "    {:<22} {:7.0} conn/s  hub CPU {:6.0} µs/conn",
            kind.name(),
            med(&rates, kind),
            med(&cpus, kind)
        );
    }
    for kind in [Kind::Thumbprint, Kind::Ca] {
        println!(
            "  {} / SAS: cost per connection (1 / rate) ×{:.2}, hub CPU ×{:.2}",
            kind.name(),
            med(&rates, Kind::Sas) / med(&rates, kind),
            med(&cpus, kind) / med(&cpus, Kind::Sas)
        );
    }

    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
