//! Crash tests: a real client sends under load, the hub is killed with SIGKILL, restarted on the
//! same data, and every message it had acknowledged must arrive, in order, exactly once; the only
//! extras allowed are messages that were in flight (stored but not yet acknowledged). And with a
//! receiver live as well, kill after kill: nothing acknowledged is lost, and of the messages the
//! receiver had completed at most `limits.deliveryWindow` come again per kill.

#![allow(clippy::unwrap_used, reason = "tests fail on any error")]

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use edgehub::{
    client::Client,
    config,
    core::auth::module_keys,
    model::identity::{DeviceId, Identity, ModuleId},
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
        .env("RUST_LOG", "warn,edgehub::app=info")
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

/// A hub's config and data in a fresh directory: module A's `out1` routed to B's `in1`.
struct Setup {
    dir: PathBuf,
    cfg: PathBuf,
    ca: PathBuf,
    settings: config::Settings,
    key: edgehub::model::identity::Key,
}

impl Setup {
    fn new(limits: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("edgehub-crash-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!(
            r#"{{"deviceId": "edge1", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
                "listen": {{"amqps": "127.0.0.1:0", "mqtts": null, "https": null, "metrics": null}},
                "dataDir": "{}", "deviceKey": "Y3Jhc2gtdGVzdC1kZXZpY2Uta2V5LTMyLWJ5dGVzISE=",
                "limits": {limits},
                "modules": {{"A": {{}}, "B": {{}}}},
                "$edgeHub": {{"schemaVersion": "1.1", "routes": {{
                    "r": "FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint(\"/modules/B/inputs/in1\")"}},
                    "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}}}"#,
            dir.join("data").display()
        );
        let cfg = dir.join("edgehub.json");
        std::fs::write(&cfg, &text).unwrap();
        let settings = config::from_str(&text, &HashMap::new()).unwrap();
        let key = edgehub::app::device_key(&settings).unwrap();
        let ca = dir.join("data/certs/edge-ca.pem");
        Self {
            dir,
            cfg,
            ca,
            settings,
            key,
        }
    }

    fn id(&self, m: &str) -> Identity {
        Identity::Module(
            DeviceId::parse("edge1").unwrap(),
            ModuleId::parse(m).unwrap(),
        )
    }

    /// Connects `m`, trying again if the put-token's reply never comes (a `$cbs` reply can be
    /// lost when it races the response link's attach: a known defect of its own).
    async fn connect(&self, addr: SocketAddr, m: &str) -> Client {
        let key = module_keys(&self.settings, &self.key, &ModuleId::parse(m).unwrap()).primary;
        let id = self.id(m);
        for _ in 0..3 {
            let connect = Client::connect(addr, "localhost", &self.ca, IOTHUB, &id, &key);
            if let Ok(client) = timeout(WAIT / 3, connect).await {
                return client.unwrap();
            }
        }
        panic!("{m} could not connect");
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    let setup = Setup::new("{}");
    let (cfg, ca, settings, key) = (&setup.cfg, &setup.ca, &setup.settings, &setup.key);
    let id = |m: &str| setup.id(m);
    let keys = |m: &str| module_keys(settings, key, &ModuleId::parse(m).unwrap()).primary;

    // Send under load; kill the hub once 3000 messages are acknowledged.
    let (mut hub, addr) = start(cfg);
    let mut a = timeout(
        WAIT,
        Client::connect(addr, "localhost", ca, IOTHUB, &id("A"), &keys("A")),
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
    let (mut hub, addr) = start(cfg);
    let mut b = timeout(
        WAIT,
        Client::connect(addr, "localhost", ca, IOTHUB, &id("B"), &keys("B")),
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
}

fn number(m: &Message<Body<Value>>) -> u64 {
    match m.properties.as_ref().and_then(|p| p.message_id.clone()) {
        Some(MessageId::String(s)) => s.trim_start_matches('m').parse::<u64>().unwrap(),
        other => panic!("message id {other:?}"),
    }
}

/// What the two modules saw, across every run of the hub.
#[derive(Default)]
struct Seen {
    /// Messages the hub accepted from A.
    stored: HashSet<u64>,
    /// Messages B accepted (its disposition sent).
    completed: HashSet<u64>,
    /// Per run of the hub: messages B had completed before and got again.
    again: Vec<usize>,
    /// Messages B completed in the current run.
    run_completed: usize,
    /// Signalled at every message B completes.
    progress: Arc<tokio::sync::Notify>,
}

/// Waits (bounded) until `done` holds of what the modules saw; `what` says what was awaited.
async fn until(seen: &Mutex<Seen>, what: &str, mut done: impl FnMut(&Seen) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let progress = {
            let s = seen.lock().unwrap();
            if done(&s) {
                return;
            }
            s.progress.clone()
        };
        if tokio::time::timeout_at(deadline, progress.notified())
            .await
            .is_err()
        {
            let s = seen.lock().unwrap();
            panic!(
                "{what}: B completed {} in this run; {} acknowledged messages never reached B",
                s.run_completed,
                s.stored.difference(&s.completed).count()
            );
        }
    }
}

/// A sends without pause, up to 200 unsettled transfers, until its connection breaks (the
/// kill) or `stop`.
async fn send_until_broken(
    mut a: Client,
    next: Arc<std::sync::atomic::AtomicU64>,
    seen: Arc<Mutex<Seen>>,
    stop: tokio_util::sync::CancellationToken,
) {
    use std::sync::atomic::Ordering;
    let Ok(mut tx) = a.sender("/devices/edge1/modules/A/messages/events").await else {
        return;
    };
    let mut in_flight = FuturesUnordered::new();
    loop {
        if in_flight.len() < WINDOW && !stop.is_cancelled() {
            let n = next.fetch_add(1, Ordering::Relaxed);
            match timeout(WAIT, tx.send_batchable(Sendable::from(output(n)))).await {
                Ok(Ok(fut)) => {
                    in_flight.push(async move { (n, fut.await) });
                    continue;
                }
                _ => break,
            }
        }
        match timeout(WAIT, in_flight.next()).await {
            Ok(Some((n, Ok(Outcome::Accepted(_))))) => {
                seen.lock().unwrap().stored.insert(n);
            }
            Ok(Some(_)) => break,
            Ok(None) | Err(_) => break,
        }
    }
    // Outcomes that came before the break still count.
    while let Some(Some((n, outcome))) = futures_util::FutureExt::now_or_never(in_flight.next()) {
        if matches!(outcome, Ok(Outcome::Accepted(_))) {
            seen.lock().unwrap().stored.insert(n);
        }
    }
}

/// B accepts every message as it comes, until its connection breaks.
async fn complete_until_broken(mut b: Client, seen: Arc<Mutex<Seen>>) {
    let Ok(mut rx) = b.receiver("/devices/edge1/modules/B/messages/events").await else {
        return;
    };
    while let Ok(Ok(d)) = timeout(WAIT, rx.recv::<Body<Value>>()).await {
        let n = number(d.message());
        {
            let mut s = seen.lock().unwrap();
            if s.completed.contains(&n) {
                *s.again.last_mut().unwrap() += 1;
            }
        }
        if !matches!(timeout(WAIT, rx.accept(&d)).await, Ok(Ok(_))) {
            break;
        }
        let mut s = seen.lock().unwrap();
        s.completed.insert(n);
        s.run_completed += 1;
        s.progress.notify_one();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_messages_come_back_at_most_a_delivery_window_per_sigkill() {
    // `EDGEHUB_CRASH_KILLS=20` for the full figure (BENCHMARKS.md).
    let kills: usize = std::env::var("EDGEHUB_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    const DELIVERY_WINDOW: usize = 64;
    const PER_RUN: usize = 400;
    let setup = Setup::new(&format!(r#"{{"deliveryWindow": {DELIVERY_WINDOW}}}"#));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for run in 0..=kills {
        let last = run == kills;
        seen.lock().unwrap().again.push(0);
        seen.lock().unwrap().run_completed = 0;
        let (mut hub, addr) = start(&setup.cfg);
        let a = setup.connect(addr, "A").await;
        let b = setup.connect(addr, "B").await;
        let stop = tokio_util::sync::CancellationToken::new();
        let sender = tokio::spawn(send_until_broken(
            a,
            next.clone(),
            seen.clone(),
            stop.clone(),
        ));
        let receiver = tokio::spawn(complete_until_broken(b, seen.clone()));
        // Under live load in both directions, until B has completed enough in this run.
        until(&seen, "live load", |s| s.run_completed >= PER_RUN).await;
        if last {
            // No more load: B drains every message the hub acknowledged to A.
            stop.cancel();
            timeout(WAIT, sender).await.unwrap().unwrap();
            until(&seen, "draining", |s| s.stored.is_subset(&s.completed)).await;
            hub.kill().unwrap();
            let _ = hub.wait();
        } else {
            hub.kill().unwrap(); // SIGKILL
            let _ = hub.wait();
            // Like the receiver below, the sender may notice the killed hub only when one of
            // its waits (WAIT each) times out, and that wait may start after this one: an
            // outcome read before the kill lets it send again (the client buffers the transfers)
            // and then wait for their outcomes.
            timeout(2 * WAIT, sender).await.unwrap().unwrap();
        }
        // The client may notice the killed hub only when its receive times out (WAIT).
        timeout(2 * WAIT, receiver).await.unwrap().unwrap();
    }
    let s = seen.lock().unwrap();
    let again = &s.again[1..];
    eprintln!(
        "{kills} kills, {} messages acknowledged, completed messages delivered again per kill: {again:?} (bound {DELIVERY_WINDOW})",
        s.stored.len()
    );
    assert!(
        again.iter().all(|n| *n <= DELIVERY_WINDOW),
        "completed messages came back beyond the delivery window: {again:?}"
    );
    assert!(s.again[0] == 0, "duplicates without a kill: {}", s.again[0]);
}
