//! A child hub forwarding to a parent hub, both in this process on 127.0.0.1 port 0, through
//! the fe2o3 client: telemetry with its origin ids, and `edgehub check` on the upstream.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail on any error"
)]

use std::{collections::HashMap, path::Path, time::Duration};

use edgehub::{
    app::Hub,
    client::Client,
    config,
    core::auth::module_keys,
    model::identity::{DeviceId, Identity, ModuleId},
};
use fe2o3_amqp::types::{
    messaging::{annotations::OwnedKey, ApplicationProperties, Body, Message, Outcome},
    primitives::Value,
};

const IOTHUB: &str = "test-hub.azure-devices.net";
const CHILD_KEY: &str = "Y2hpbGQtZGV2aWNlLWtleS0zMi1ieXRlcy1sb25nISE=";
const LEAF_KEY: &str = "bGVhZi1kZXZpY2Uta2V5LTMyLWJ5dGVzLWxvbmchISE=";
const WAIT: Duration = Duration::from_secs(20);

struct Pair {
    parent: Hub,
    child: Hub,
    parent_settings: config::Settings,
    child_settings: config::Settings,
    dir: std::path::PathBuf,
}

fn parent_text(dir: &Path, routes: &str) -> String {
    format!(
        r#"{{
        "deviceId": "parent", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
        "listen": {{"amqps": "127.0.0.1:0", "mqtts": null, "https": null, "metrics": null}},
        "dataDir": "{}",
        "modules": {{"sink": {{}}}},
        "devices": {{"child": {{"primaryKey": "{CHILD_KEY}", "edge": true}},
                     "leaf": {{"primaryKey": "{LEAF_KEY}"}}}},
        "$edgeHub": {{"schemaVersion": "1.1", "routes": {routes},
            "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}
    }}"#,
        dir.join("parent").display()
    )
}

/// The child also serves `stranger`, a leaf the parent does not know: the parent refuses its
/// token, and everything else must still go upstream.
fn child_text(dir: &Path, port: u16, ca: &Path) -> String {
    child_text_with(dir, port, ca, "")
}

/// [`child_text`] with `extra` appended to the `upstream` object (`, "key": value`).
fn child_text_with(dir: &Path, port: u16, ca: &Path, extra: &str) -> String {
    format!(
        r#"{{
        "deviceId": "child", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
        "listen": {{"amqps": "127.0.0.1:0", "mqtts": null, "https": null, "metrics": null}},
        "dataDir": "{}", "deviceKey": "{CHILD_KEY}",
        "modules": {{"A": {{}}}},
        "devices": {{"leaf": {{"primaryKey": "{LEAF_KEY}"}},
                     "stranger": {{"primaryKey": "{LEAF_KEY}"}}}},
        "upstream": {{"hostname": "localhost", "port": {port}, "caCert": "{}",
            "minBackoffMs": 20, "maxBackoffMs": 200{extra}}},
        "$edgeHub": {{"schemaVersion": "1.1",
            "routes": {{"up": "FROM /messages/modules/A/outputs/* INTO $upstream",
                        "leafUp": "FROM /messages/* WHERE $connectionDeviceId = 'leaf' INTO $upstream"}},
            "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}
    }}"#,
        dir.join("child").display(),
        ca.display()
    )
}

async fn start_pair(parent_routes: &str) -> Pair {
    start_pair_with(parent_routes, "").await
}

/// [`start_pair`] with `upstream_extra` appended to the child's `upstream` object.
async fn start_pair_with(parent_routes: &str, upstream_extra: &str) -> Pair {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let dir = std::env::temp_dir().join(format!("edgehub-up-{}", uuid::Uuid::new_v4()));
    let ptext = parent_text(&dir, parent_routes);
    let parent_settings = config::from_str(&ptext, &HashMap::new()).expect("parent config");
    let parent = tokio::time::timeout(WAIT, Hub::start(parent_settings.clone()))
        .await
        .expect("parent starts in time")
        .expect("parent starts");
    let ca = dir.join("parent/certs/edge-ca.pem");
    let ctext = child_text_with(&dir, parent.amqps_addr.port(), &ca, upstream_extra);
    let child_settings = config::from_str(&ctext, &HashMap::new()).expect("child config");
    let child = tokio::time::timeout(WAIT, Hub::start(child_settings.clone()))
        .await
        .expect("child starts in time")
        .expect("child starts");
    Pair {
        parent,
        child,
        parent_settings,
        child_settings,
        dir,
    }
}

async fn connect(hub: &Hub, settings: &config::Settings, device: &str, module: &str) -> Client {
    let key = edgehub::app::device_key(settings).unwrap();
    let m = ModuleId::parse(module).unwrap();
    let keys = module_keys(settings, &key, &m);
    let id = Identity::Module(DeviceId::parse(device).unwrap(), m);
    let ca = settings.data_dir.join("certs/edge-ca.pem");
    tokio::time::timeout(
        WAIT,
        Client::connect(hub.amqps_addr, "localhost", &ca, IOTHUB, &id, &keys.primary),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

fn annotation(m: &Message<Body<Value>>, k: &str) -> Option<String> {
    match m
        .message_annotations
        .as_ref()?
        .0
        .get(&OwnedKey::Symbol(k.into()))?
    {
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn child_telemetry_reaches_a_parent_module_with_its_origin_ids() {
    let pair = start_pair(
        r#"{"fromChild": "FROM /messages/modules/A/outputs/out1 WHERE $connectionDeviceId = 'child' INTO BrokeredEndpoint(\"/modules/sink/inputs/in1\")"}"#,
    )
    .await;
    let mut a = connect(&pair.child, &pair.child_settings, "child", "A").await;
    let mut sink = connect(&pair.parent, &pair.parent_settings, "parent", "sink").await;
    let mut rx = sink
        .receiver("/devices/parent/modules/sink/messages/events")
        .await
        .unwrap();
    let mut tx = a
        .sender("/devices/child/modules/A/messages/events")
        .await
        .unwrap();
    let n = 100;
    for i in 0..n {
        let msg = Message::builder()
            .properties(fe2o3_amqp::types::messaging::Properties {
                message_id: Some(format!("m{i}").into()),
                ..Default::default()
            })
            .application_properties(
                ApplicationProperties::builder()
                    .insert("iothub-outputname", "out1")
                    .insert("seq", i.to_string())
                    .insert("typed", i as i64)
                    .build(),
            )
            .value(format!("body {i}"))
            .build();
        let outcome = tokio::time::timeout(WAIT, tx.send(msg))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    }
    for i in 0..n {
        let d = tokio::time::timeout(WAIT, rx.recv::<Body<Value>>())
            .await
            .expect("message at the parent in time")
            .unwrap();
        rx.accept(&d).await.unwrap();
        let m = d.message();
        assert_eq!(
            m.properties.as_ref().and_then(|p| p.message_id.clone()),
            Some(format!("m{i}").into())
        );
        assert_eq!(
            annotation(m, "iothub-connection-device-id").as_deref(),
            Some("child")
        );
        assert_eq!(
            annotation(m, "iothub-connection-module-id").as_deref(),
            Some("A")
        );
        assert_eq!(annotation(m, "x-opt-input-name").as_deref(), Some("in1"));
        let prop = |k: &str| {
            m.application_properties
                .as_ref()
                .and_then(|a| a.0.get(k).cloned())
        };
        assert_eq!(prop("seq"), Some(i.to_string().into()));
        // Only string application properties travel on, as on edgeHub.
        assert_eq!(prop("typed"), None);
    }
    a.close().await;
    sink.close().await;
    tokio::time::timeout(WAIT, pair.child.shutdown())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, pair.parent.shutdown())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&pair.dir);
}

/// The log lines of this test's thread, and a signal for each new one.
#[derive(Clone, Default)]
struct Captured {
    text: std::sync::Arc<std::sync::Mutex<String>>,
    more: std::sync::Arc<tokio::sync::Notify>,
}

impl Captured {
    fn count(&self, needle: &str) -> usize {
        self.text.lock().unwrap().matches(needle).count()
    }

    /// Waits until `needle` appears `n` times.
    async fn wait_for(&self, needle: &str, n: usize) {
        loop {
            let more = self.more.notified();
            if self.count(needle) >= n {
                return;
            }
            more.await;
        }
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.text
            .lock()
            .unwrap()
            .push_str(&String::from_utf8_lossy(buf));
        self.more.notify_waiters();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn upstream_tokens_are_renewed_on_the_live_connection() {
    // This test's runtime runs on its own thread: a thread-local subscriber sees both hubs.
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("edgehub::servers::upstream=debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _scope = tracing::subscriber::set_default(subscriber);
    // Tokens of 4 s, renewed every 3 s.
    let pair = start_pair_with(
        r#"{"fromChild": "FROM /messages/modules/A/outputs/out1 INTO BrokeredEndpoint(\"/modules/sink/inputs/in1\")"}"#,
        r#", "tokenLifetimeSecs": 4"#,
    )
    .await;
    let mut a = connect(&pair.child, &pair.child_settings, "child", "A").await;
    let mut sink = connect(&pair.parent, &pair.parent_settings, "parent", "sink").await;
    let mut rx = sink
        .receiver("/devices/parent/modules/sink/messages/events")
        .await
        .unwrap();
    let mut tx = a
        .sender("/devices/child/modules/A/messages/events")
        .await
        .unwrap();
    // A message between each renewal reaches the parent over the same connection.
    for i in 0..4 {
        tokio::time::timeout(WAIT, log.wait_for("upstream tokens renewed", i))
            .await
            .expect("tokens renewed in time");
        let msg = Message::builder()
            .application_properties(
                ApplicationProperties::builder()
                    .insert("iothub-outputname", "out1")
                    .build(),
            )
            .value(format!("after {i} renewals"))
            .build();
        let outcome = tokio::time::timeout(WAIT, tx.send(msg))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
        let d = tokio::time::timeout(WAIT, rx.recv::<Body<Value>>())
            .await
            .expect("message at the parent in time")
            .unwrap();
        rx.accept(&d).await.unwrap();
    }
    assert!(log.count("upstream tokens renewed") >= 3);
    assert_eq!(
        log.count("upstream connected"),
        1,
        "renewals never reconnect:\n{}",
        log.text.lock().unwrap()
    );
    a.close().await;
    sink.close().await;
    tokio::time::timeout(WAIT, pair.child.shutdown())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, pair.parent.shutdown())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&pair.dir);
}

/// Runs `edgehub check` on a config and returns its upstream line.
async fn check_upstream_line(path: &Path) -> String {
    let path = path.to_owned();
    let lines =
        tokio::task::spawn_blocking(move || edgehub::ops::check::run(&path, &HashMap::new()))
            .await
            .unwrap();
    lines
        .iter()
        .map(|o| o.to_string())
        .find(|l| l.contains("upstream"))
        .unwrap()
}

#[tokio::test]
async fn check_reaches_the_upstream_or_says_why_not() {
    let dir = std::env::temp_dir().join(format!("edgehub-up-check-{}", uuid::Uuid::new_v4()));
    let ptext = parent_text(&dir, "{}");
    let parent_settings = config::from_str(&ptext, &HashMap::new()).unwrap();
    let parent = Hub::start(parent_settings).await.unwrap();
    let ca = dir.join("parent/certs/edge-ca.pem");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("child.json");

    std::fs::write(&path, child_text(&dir, parent.amqps_addr.port(), &ca)).unwrap();
    let up = check_upstream_line(&path).await;
    assert!(
        up.starts_with("OK") && up.contains("TLS certificate trusted"),
        "{up}"
    );

    // A CA that did not sign the parent's certificate: the handshake fails, with a hint.
    let other = dir.join("other-ca.pem");
    let (other_ca, _) = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (params.self_signed(&key).unwrap().pem(), key)
    };
    std::fs::write(&other, other_ca).unwrap();
    std::fs::write(&path, child_text(&dir, parent.amqps_addr.port(), &other)).unwrap();
    let up = check_upstream_line(&path).await;
    assert!(
        up.starts_with("ERROR") && up.contains("TLS handshake failed"),
        "{up}"
    );

    tokio::time::timeout(WAIT, parent.shutdown()).await.unwrap();
    // Nothing listens on the port any more.
    let up = check_upstream_line(&path).await;
    assert!(
        up.starts_with("ERROR") && up.contains("no TCP connection"),
        "{up}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Standalone (no `upstream`) with the built-in endpoint off: `$upstream` messages stay queued
/// until their TTL, then leave.
#[tokio::test]
async fn standalone_upstream_messages_wait_under_their_ttl() {
    let dir = std::env::temp_dir().join(format!("edgehub-standalone-{}", uuid::Uuid::new_v4()));
    let text = format!(
        r#"{{
        "deviceId": "edge1", "iothubHostname": "{IOTHUB}", "gatewayHostname": "localhost",
        "listen": {{"amqps": "127.0.0.1:0", "mqtts": null, "https": null, "metrics": null}},
        "dataDir": "{}", "modules": {{"A": {{}}}}, "builtInEndpoint": null,
        "$edgeHub": {{"schemaVersion": "1.1",
            "routes": {{"up": "FROM /messages/* INTO $upstream",
                        "short": {{"route": "FROM /messages/modules/A/outputs/short INTO $upstream", "priority": 1, "timeToLiveSecs": 1}}}},
            "storeAndForwardConfiguration": {{"timeToLiveSecs": 7200}}}}
    }}"#,
        dir.join("data").display()
    );
    let settings = config::from_str(&text, &HashMap::new()).unwrap();
    let hub = Hub::start(settings.clone()).await.unwrap();
    let mut a = connect(&hub, &settings, "edge1", "A").await;
    let mut tx = a
        .sender("/devices/edge1/modules/A/messages/events")
        .await
        .unwrap();
    for output in ["long", "long", "short"] {
        let msg = Message::builder()
            .application_properties(
                ApplicationProperties::builder()
                    .insert("iothub-outputname", output)
                    .build(),
            )
            .value("x")
            .build();
        let outcome = tokio::time::timeout(WAIT, tx.send(msg))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    }
    let queue = hub
        .core
        .router()
        .endpoints()
        .find(|e| e.id == "iothub")
        .cloned()
        .expect("the $upstream endpoint");
    let lengths = queue.store.lengths();
    assert_eq!(lengths.values().sum::<usize>(), 3, "{lengths:?}");
    // The priority-1 message with a 1 s TTL leaves; the others stay, with nobody to send them to.
    tokio::time::timeout(WAIT, async {
        while queue.store.lengths().get(&1).copied().unwrap_or(0) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the short-lived message expires");
    assert_eq!(queue.store.len(), 2);
    a.close().await;
    tokio::time::timeout(WAIT, hub.shutdown()).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A leaf device of the child: its telemetry goes upstream on its own identity, with its own
/// token (the parent knows the leaf too), and parent routes see it as the leaf's.
#[tokio::test]
async fn a_leaf_device_behind_the_child_reaches_the_parent() {
    let pair = start_pair(
        r#"{"fromLeaf": "FROM /messages/* WHERE $connectionDeviceId = 'leaf' INTO BrokeredEndpoint(\"/modules/sink/inputs/leaf\")"}"#,
    )
    .await;
    let leaf_id = Identity::Device(DeviceId::parse("leaf").unwrap());
    let ca = pair.child_settings.data_dir.join("certs/edge-ca.pem");
    let mut leaf = tokio::time::timeout(
        WAIT,
        Client::connect(
            pair.child.amqps_addr,
            "localhost",
            &ca,
            IOTHUB,
            &leaf_id,
            &edgehub::model::identity::Key::from_base64(LEAF_KEY).unwrap(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let mut sink = connect(&pair.parent, &pair.parent_settings, "parent", "sink").await;
    let mut rx = sink
        .receiver("/devices/parent/modules/sink/messages/events")
        .await
        .unwrap();
    let mut tx = leaf.sender("/devices/leaf/messages/events").await.unwrap();
    let outcome = tokio::time::timeout(WAIT, tx.send(Message::builder().value("t=21").build()))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    let d = tokio::time::timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .expect("the leaf's message at the parent in time")
        .unwrap();
    rx.accept(&d).await.unwrap();
    assert_eq!(
        annotation(d.message(), "iothub-connection-device-id").as_deref(),
        Some("leaf")
    );
    assert_eq!(annotation(d.message(), "iothub-connection-module-id"), None);
    assert_eq!(
        annotation(d.message(), "x-opt-input-name").as_deref(),
        Some("leaf")
    );
    leaf.close().await;
    sink.close().await;
    tokio::time::timeout(WAIT, pair.child.shutdown())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, pair.parent.shutdown())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&pair.dir);
}

#[tokio::test]
async fn reported_changes_that_pile_up_are_resynchronised_not_dropped() {
    let pair = start_pair("{}").await;
    let a = Identity::Module(
        DeviceId::parse("child").unwrap(),
        ModuleId::parse("A").unwrap(),
    );
    let obj = |v: serde_json::Value| v.as_object().cloned().unwrap();
    let (child, parent) = (pair.child.core.clone(), pair.parent.core.clone());
    let report = |patch: serde_json::Map<String, serde_json::Value>| {
        let child = child.clone();
        let a = a.clone();
        async move {
            child.twins.update_reported(&a, &patch).await.unwrap();
            child.outbox.report(&a, &patch);
        }
    };
    let parent_has = |want: serde_json::Value| {
        let (parent, a) = (parent.clone(), a.clone());
        async move {
            let want = want.as_object().cloned().unwrap();
            tokio::time::timeout(WAIT, async {
                loop {
                    let mut got = parent.twins.get(&a).reported;
                    got.retain(|k, _| !k.starts_with('$'));
                    if got == want {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            })
            .await
            .expect("the parent's reported properties in time");
        }
    };
    report(obj(serde_json::json!({"keep": 1, "stale": 1}))).await;
    parent_has(serde_json::json!({"keep": 1, "stale": 1})).await;
    // A change, then many more pending changes than one patch may carry (names added and
    // deleted), all queued before the upstream task runs again (one thread: no await between).
    let change = obj(serde_json::json!({"stale": null, "fresh": 2}));
    child.twins.update_reported(&a, &change).await.unwrap();
    child.outbox.report(&a, &change);
    let long = "n".repeat(100);
    for i in 0..1000 {
        child
            .outbox
            .report(&a, &obj(serde_json::json!({ format!("{long}{i}"): null })));
    }
    // The parent ends up with exactly this hub's reported properties.
    parent_has(serde_json::json!({"keep": 1, "fresh": 2})).await;
    tokio::time::timeout(WAIT, pair.child.shutdown())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, pair.parent.shutdown())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&pair.dir);
}

/// Debian's tinyproxy on a port of its own, with `extra` lines of configuration; killed on drop.
struct Tinyproxy {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Tinyproxy {
    async fn start(dir: &Path, extra: &str) -> Self {
        let bin = ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("tinyproxy is installed (tests/run-all.sh installs it)");
        std::fs::create_dir_all(dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join("tinyproxy.log");
        let conf = dir.join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 50\nAllow 127.0.0.1\n{extra}\n",
                log.display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new(bin)
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Ready once it accepts connections.
        tokio::time::timeout(WAIT, async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("tinyproxy listens in time");
        Self { child, port, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A parent with its HTTPS listener (where AMQP over WebSockets is served).
fn parent_text_https(dir: &Path, routes: &str, https: &str) -> String {
    parent_text(dir, routes).replace(r#""https": null"#, &format!(r#""https": "{https}""#))
}

const SINK_ROUTE: &str = r#"{"fromChild": "FROM /messages/modules/A/outputs/out1 WHERE $connectionDeviceId = 'child' INTO BrokeredEndpoint(\"/modules/sink/inputs/in1\")"}"#;

async fn send_outputs(a: &mut Client, from: usize, to: usize) {
    let mut tx = a
        .sender("/devices/child/modules/A/messages/events")
        .await
        .unwrap();
    for i in from..to {
        let msg = Message::builder()
            .properties(fe2o3_amqp::types::messaging::Properties {
                message_id: Some(format!("m{i}").into()),
                ..Default::default()
            })
            .application_properties(
                ApplicationProperties::builder()
                    .insert("iothub-outputname", "out1")
                    .build(),
            )
            .value(format!("body {i}"))
            .build();
        let outcome = tokio::time::timeout(WAIT, tx.send(msg))
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(outcome, Outcome::Accepted(_)), "{outcome:?}");
    }
    tx.close().await.unwrap();
}

async fn receive_ids(sink: &mut Client, n: usize) -> Vec<String> {
    let mut rx = sink
        .receiver("/devices/parent/modules/sink/messages/events")
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..n {
        let d = tokio::time::timeout(WAIT, rx.recv::<Body<Value>>())
            .await
            .expect("message at the parent in time")
            .unwrap();
        rx.accept(&d).await.unwrap();
        assert_eq!(
            annotation(d.message(), "iothub-connection-device-id").as_deref(),
            Some("child")
        );
        if let Some(fe2o3_amqp::types::messaging::MessageId::String(id)) = d
            .message()
            .properties
            .as_ref()
            .and_then(|p| p.message_id.clone())
        {
            ids.push(id);
        }
    }
    rx.close().await.unwrap();
    ids
}

#[tokio::test]
async fn a_child_reaches_its_parent_over_websockets_through_a_proxy_and_resumes_after_an_outage() {
    let dir = std::env::temp_dir().join(format!("edgehub-up-ws-{}", uuid::Uuid::new_v4()));
    let proxy = Tinyproxy::start(&dir, "BasicAuth edge s3cret").await;
    let ptext = parent_text_https(&dir, SINK_ROUTE, "127.0.0.1:0");
    let parent_settings = config::from_str(&ptext, &HashMap::new()).unwrap();
    let parent = Hub::start(parent_settings).await.unwrap();
    let https = parent.https_addr.unwrap();
    let ca = dir.join("parent/certs/edge-ca.pem");
    // The password percent-encoded in the URL (`%73` is `s`), as in https_proxy.
    let extra = format!(
        r#", "protocol": "amqpws", "proxy": "http://edge:%733cret@127.0.0.1:{}""#,
        proxy.port
    );
    let ctext = child_text_with(&dir, https.port(), &ca, &extra);
    let child_settings = config::from_str(&ctext, &HashMap::new()).unwrap();
    let child = Hub::start(child_settings.clone()).await.unwrap();

    let mut a = connect(&child, &child_settings, "child", "A").await;
    let parent_settings = config::from_str(&ptext, &HashMap::new()).unwrap();
    let mut sink = connect(&parent, &parent_settings, "parent", "sink").await;
    send_outputs(&mut a, 0, 20).await;
    let ids = receive_ids(&mut sink, 20).await;
    assert_eq!(ids, (0..20).map(|i| format!("m{i}")).collect::<Vec<_>>());
    // The connection went through the proxy, as a CONNECT to the parent's HTTPS port.
    let log = proxy.log();
    assert!(
        log.contains(&format!("CONNECT 127.0.0.1:{}", https.port()))
            || log.contains(&format!("CONNECT localhost:{}", https.port())),
        "{log}"
    );
    // `edgehub check` goes the same way.
    let path = dir.join("child.json");
    std::fs::write(&path, &ctext).unwrap();
    let up = check_upstream_line(&path).await;
    assert!(
        up.starts_with("OK") && up.contains("through the proxy"),
        "{up}"
    );

    // The parent goes away; the child keeps what its module sends, and forwards it once the
    // parent is back on the same address.
    sink.close().await;
    tokio::time::timeout(WAIT, parent.shutdown()).await.unwrap();
    send_outputs(&mut a, 20, 40).await;
    let ptext = parent_text_https(&dir, SINK_ROUTE, &https.to_string());
    let parent_settings = config::from_str(&ptext, &HashMap::new()).unwrap();
    let parent = Hub::start(parent_settings.clone()).await.unwrap();
    let mut sink = connect(&parent, &parent_settings, "parent", "sink").await;
    let ids = receive_ids(&mut sink, 20).await;
    assert_eq!(ids, (20..40).map(|i| format!("m{i}")).collect::<Vec<_>>());

    a.close().await;
    sink.close().await;
    tokio::time::timeout(WAIT, child.shutdown()).await.unwrap();
    tokio::time::timeout(WAIT, parent.shutdown()).await.unwrap();
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_proxy_that_refuses_connect_is_named_in_the_log_and_by_check() {
    let dir = std::env::temp_dir().join(format!("edgehub-up-ws-{}", uuid::Uuid::new_v4()));
    // CONNECT only to port 443: the parent's test port is refused with 403.
    let proxy = Tinyproxy::start(&dir, "ConnectPort 443").await;
    let ptext = parent_text_https(&dir, "{}", "127.0.0.1:0");
    let parent_settings = config::from_str(&ptext, &HashMap::new()).unwrap();
    let parent = Hub::start(parent_settings).await.unwrap();
    let https = parent.https_addr.unwrap();
    let ca = dir.join("parent/certs/edge-ca.pem");
    let ctext = child_text_with(&dir, https.port(), &ca, r#", "protocol": "amqpws""#);
    // The proxy from the environment, as edgeHub takes it.
    let env = HashMap::from([(
        "https_proxy".to_owned(),
        format!("http://127.0.0.1:{}", proxy.port),
    )]);
    let child_settings = config::from_str(&ctext, &env).unwrap();
    let up = child_settings.upstream.as_ref().unwrap();
    assert_eq!(up.proxy.as_ref().map(|p| p.port), Some(proxy.port));

    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("edgehub=info")
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let child = Hub::start(child_settings.clone()).await.unwrap();
    tokio::time::timeout(WAIT, captured.wait_for("refused CONNECT", 1))
        .await
        .expect("the refusal is logged");
    assert!(captured.count("HTTP 403") >= 1);

    let path = dir.join("child.json");
    std::fs::write(
        &path,
        ctext.replace(
            r#""protocol": "amqpws""#,
            &format!(
                r#""protocol": "amqpws", "proxy": "http://127.0.0.1:{}""#,
                proxy.port
            ),
        ),
    )
    .unwrap();
    let line = check_upstream_line(&path).await;
    assert!(
        line.starts_with("ERROR") && line.contains("refused CONNECT"),
        "{line}"
    );
    tokio::time::timeout(WAIT, child.shutdown()).await.unwrap();
    tokio::time::timeout(WAIT, parent.shutdown()).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A leaf device's twin behind the child follows the parent's, as a module's does: desired
/// patches made at the parent (the service API's twin PATCH) reach the child's twin of the
/// leaf, and the leaf's reported patches on the child reach the parent.
#[tokio::test]
async fn a_leaf_devices_twin_syncs_with_the_parent() {
    use edgehub::core::twin_requests::{twin_request, TwinRequest};
    let pair = start_pair("{}").await;
    let leaf = Identity::Device(DeviceId::parse("leaf").unwrap());
    let (child, parent) = (pair.child.core.clone(), pair.parent.core.clone());
    let obj = |v: serde_json::Value| v.as_object().cloned().unwrap();
    let strip = |mut m: serde_json::Map<String, serde_json::Value>| {
        m.retain(|k, _| !k.starts_with('$'));
        m
    };

    // Reported: the leaf's patch on the child (as its twin link or MQTT topic makes it).
    let answer = twin_request(
        &child,
        &leaf,
        TwinRequest::PatchReported(br#"{"firmware": "1.2.3", "battery": 80}"#),
    )
    .await;
    assert_eq!(answer.status, 204, "{:?}", answer.error);
    tokio::time::timeout(WAIT, async {
        while strip(parent.twins.get(&leaf).reported)
            != obj(serde_json::json!({"firmware": "1.2.3", "battery": 80}))
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the leaf's reported properties at the parent in time");

    // Desired: a patch at the parent (what `Registry.updateTwin` does there).
    parent
        .twins
        .patch_desired(&leaf, &obj(serde_json::json!({"interval": 30})), |_| true)
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        while strip(child.twins.get(&leaf).desired) != obj(serde_json::json!({"interval": 30})) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the parent's desired patch at the child's twin of the leaf in time");
    assert_eq!(
        child.twins.get(&leaf).desired_version,
        parent.twins.get(&leaf).desired_version
    );
    tokio::time::timeout(WAIT, pair.child.shutdown())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, pair.parent.shutdown())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&pair.dir);
}
