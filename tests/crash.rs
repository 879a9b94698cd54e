//! Crash test: a real client sends under load, the hub is killed with SIGKILL, restarted on the
//! same data, and every message it had acknowledged must arrive, in order, exactly once; the only
//! extras allowed are messages that were in flight (stored but not yet acknowledged).

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use edgehub::{
    auth::module_keys,
    client::Client,
    config,
    identity::{DeviceId, Identity, ModuleId},
};
use fe2o3_amqp::{
    types::{
        messaging::{ApplicationProperties, Body, Data, Message, MessageId, Outcome, Properties},
        primitives::{Binary, Value},
    },
    Sendable,
};
use futures_util::{stream::FuturesUnordered, StreamExt};
use tokio::time::timeout;

const IOTHUB: &str = "crash-hub.azure-devices.net";
const WINDOW: usize = 200;
const WAIT: Duration = Duration::from_secs(30);

/// The hub process, killed when the test ends however it ends (a failed assertion must not
/// leave it running).
struct HubProcess(Child);

impl std::ops::Deref for HubProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for HubProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(config: &Path) -> (HubProcess, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgehub"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn,edgehub::hub=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the hub");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("amqps=").nth(1) {
                let _ = tx.send(
                    rest.split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
        }
    });
    let addr = rx
        .recv_timeout(WAIT)
        .expect("the hub is ready")
        .parse()
        .expect("address");
    (HubProcess(child), addr)
}

fn output(i: u64) -> Message<Body<Value>> {
    Message::builder()
        .properties(Properties {
            message_id: Some(format!("m{i}").into()),
            ..Default::default()
        })
        .application_properties(
            ApplicationProperties::builder()
                .insert("iothub-outputname", "out1")
                .build(),
        )
        .body(Body::Data(vec![Data(Binary::from(vec![7u8; 256]))].into()))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    let dir = std::env::temp_dir().join(format!("edgehub-crash-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!(
        r#"{{"deviceId": "edge1", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
            "listen": {{"amqps": "127.0.0.1:0", "https": null, "metrics": null}},
            "dataDir": "{}", "deviceKey": "Y3Jhc2gtdGVzdC1kZXZpY2Uta2V5LTMyLWJ5dGVzISE=",
            "modules": {{"A": {{}}, "B": {{}}}},
            "$edgeHub": {{"schemaVersion": "1.1", "routes": {{
                "r": "FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint(\"/modules/B/inputs/in1\")"}},
                "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}}}"#,
        dir.join("data").display()
    );
    let cfg = dir.join("edgehub.json");
    std::fs::write(&cfg, &text).unwrap();
    let settings = config::from_str(&text, &HashMap::new()).unwrap();
    let key = edgehub::hub::device_key(&settings).unwrap();
    let ca = dir.join("data/certs/edge-ca.pem");
    let id = |m: &str| {
        Identity::Module(
            DeviceId::parse("edge1").unwrap(),
            ModuleId::parse(m).unwrap(),
        )
    };
    let keys = |m: &str| module_keys(&settings, &key, &ModuleId::parse(m).unwrap()).primary;

    // Send under load; kill the hub once 3000 messages are acknowledged.
    let (mut hub, addr) = start(&cfg);
    let mut a = timeout(
        WAIT,
        Client::connect(addr, "localhost", &ca, IOTHUB, &id("A"), &keys("A")),
    )
    .await
    .unwrap()
    .unwrap();
    let mut tx = a
        .sender("/devices/edge1/modules/A/messages/events")
        .await
        .unwrap();
    let mut accepted: Vec<u64> = Vec::new();
    let mut in_flight = FuturesUnordered::new();
    let mut killed = false;
    let mut i = 0u64;
    // After the kill the transfers still in flight were never acknowledged: stop there.
    while !killed {
        if !killed && in_flight.len() < WINDOW {
            match timeout(WAIT, tx.send_batchable(Sendable::from(output(i))))
                .await
                .unwrap()
            {
                Ok(fut) => {
                    let n = i;
                    in_flight.push(async move { (n, fut.await) });
                    i += 1;
                    continue;
                }
                Err(e) => panic!("send failed before the kill: {e:?}"),
            }
        }
        let next = timeout(WAIT, in_flight.next()).await;
        let next = next.unwrap_or_else(|_| {
            panic!(
                "stalled: {} accepted, killed {killed}, {} in flight",
                accepted.len(),
                in_flight.len()
            )
        });
        match next {
            Some((n, Ok(Outcome::Accepted(_)))) => {
                accepted.push(n);
                if accepted.len() == 3000 && !killed {
                    hub.kill().unwrap(); // SIGKILL
                    let _ = hub.wait();
                    killed = true;
                }
            }
            Some(_) => {}
            None => break,
        }
    }
    drop(tx);
    drop(a);
    let sent = i;
    assert!(accepted.len() >= 3000);

    // Restart on the same data; B receives everything.
    let (mut hub, addr) = start(&cfg);
    let mut b = timeout(
        WAIT,
        Client::connect(addr, "localhost", &ca, IOTHUB, &id("B"), &keys("B")),
    )
    .await
    .unwrap()
    .unwrap();
    let mut rx = b
        .receiver("/devices/edge1/modules/B/messages/events")
        .await
        .expect("B attaches its inputs after the restart");
    let want: HashSet<u64> = accepted.iter().copied().collect();
    let mut got: Vec<u64> = Vec::new();
    let mut seen = HashSet::new();
    while !want.iter().all(|n| seen.contains(n)) {
        let d = timeout(WAIT, rx.recv::<Body<Value>>())
            .await
            .expect("every acknowledged message arrives")
            .unwrap();
        let n = match d
            .message()
            .properties
            .as_ref()
            .and_then(|p| p.message_id.clone())
        {
            Some(MessageId::String(s)) => s.trim_start_matches('m').parse::<u64>().unwrap(),
            other => panic!("message id {other:?}"),
        };
        rx.accept(&d).await.unwrap();
        assert!(seen.insert(n), "message {n} delivered twice");
        got.push(n);
    }
    // FIFO kept: the order of arrival is the order of sending.
    assert!(got.windows(2).all(|w| w[0] < w[1]), "order kept per queue");
    let extras = got.len() - want.len();
    assert!(extras <= WINDOW, "{extras} messages beyond the acknowledged ones (in flight at the crash: at most {WINDOW}); sent {sent}");
    hub.kill().unwrap();
    let _ = hub.wait();
    let _ = std::fs::remove_dir_all(dir);
}
