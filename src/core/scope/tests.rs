//! The cache's rules on a paused clock: when full refreshes happen, how on-demand refreshes and
//! lookups are throttled, what a refresh or lookup removes, the order of keys, and the
//! encrypted store across a restart with the parent offline.

use std::collections::VecDeque;

use serde_json::json;
use tokio::sync::mpsc;

use super::*;

fn key(byte: u8) -> Key {
    use base64::Engine;
    Key::from_base64(&base64::engine::general_purpose::STANDARD.encode([byte; 32])).unwrap()
}

fn device(id: &str, k: u8, status: &str) -> ScopeEntry {
    ScopeEntry {
        identity: json!({"deviceId": id, "status": status, "authentication": {"type": "sas",
            "symmetricKey": {"primaryKey": key(k).to_base64(), "secondaryKey": key(k + 100).to_base64()}}}),
        auth_chain: format!("{id};edge1"),
    }
}

fn module(d: &str, m: &str, k: u8) -> ScopeEntry {
    ScopeEntry {
        identity: json!({"deviceId": d, "moduleId": m, "authentication": {"type": "sas",
            "symmetricKey": {"primaryKey": key(k).to_base64(), "secondaryKey": key(k + 100).to_base64()}}}),
        auth_chain: format!("{d}/{m};{d}"),
    }
}

fn id(s: &str) -> Identity {
    match s.split_once('/') {
        Some((d, m)) => Identity::Module(DeviceId::parse(d).unwrap(), ModuleId::parse(m).unwrap()),
        None => Identity::Device(DeviceId::parse(s).unwrap()),
    }
}

/// A parent whose answers the test scripts; it reports the time of every call.
struct Scripted {
    full: Mutex<VecDeque<Result<Vec<ScopeEntry>, FetchError>>>,
    one: Mutex<VecDeque<Result<Vec<ScopeEntry>, FetchError>>>,
    calls: mpsc::UnboundedSender<(&'static str, Instant)>,
}

impl Scripted {
    fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<(&'static str, Instant)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let s = Self {
            full: Mutex::new(VecDeque::new()),
            one: Mutex::new(VecDeque::new()),
            calls: tx,
        };
        (Arc::new(s), rx)
    }

    fn then_full(&self, r: Result<Vec<ScopeEntry>, FetchError>) {
        self.full.lock().unwrap().push_back(r);
    }

    fn then_one(&self, r: Result<Vec<ScopeEntry>, FetchError>) {
        self.one.lock().unwrap().push_back(r);
    }
}

fn offline() -> FetchError {
    FetchError::Transient("offline".into())
}

impl ScopeSource for Scripted {
    fn full(&self) -> FetchFuture<'_, Vec<ScopeEntry>> {
        let _ = self.calls.send(("full", Instant::now()));
        let r = self
            .full
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Err(offline()));
        Box::pin(async move { r })
    }

    fn one<'a>(&'a self, _id: &'a Identity) -> FetchFuture<'a, Vec<ScopeEntry>> {
        let _ = self.calls.send(("one", Instant::now()));
        let r = self
            .one
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Err(offline()));
        Box::pin(async move { r })
    }
}

fn cache(source: Arc<Scripted>) -> Arc<ScopeCache> {
    let c = ScopeCache::new(
        DeviceId::parse("edge1").unwrap(),
        RefreshSettings::default(),
    );
    c.set_source(source);
    Arc::new(c)
}

fn scope() -> Vec<ScopeEntry> {
    vec![
        device("edge1", 1, "enabled"),
        module("edge1", "filter", 2),
        device("leaf1", 3, "enabled"),
    ]
}

async fn next_call(
    rx: &mut mpsc::UnboundedReceiver<(&'static str, Instant)>,
) -> (&'static str, Instant) {
    tokio::time::timeout(Duration::from_secs(100_000), rx.recv())
        .await
        .expect("a call")
        .expect("the source lives")
}

#[tokio::test(start_paused = true)]
async fn a_full_refresh_at_start_then_every_hour() {
    let (src, mut calls) = Scripted::new();
    src.then_full(Ok(scope()));
    src.then_full(Ok(scope()));
    let c = cache(src.clone());
    let stop = CancellationToken::new();
    let task = tokio::spawn(c.clone().run(stop.clone()));
    let t0 = Instant::now();
    let (what, at) = next_call(&mut calls).await;
    assert_eq!((what, at), ("full", t0));
    let (_, at) = next_call(&mut calls).await;
    assert_eq!(at - t0, Duration::from_secs(3600));
    assert_eq!(c.len(), 3);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn with_nothing_known_a_failed_refresh_is_retried_every_minute() {
    let (src, mut calls) = Scripted::new();
    src.then_full(Err(offline()));
    src.then_full(Err(offline()));
    src.then_full(Ok(scope()));
    let c = cache(src.clone());
    let stop = CancellationToken::new();
    let task = tokio::spawn(c.clone().run(stop.clone()));
    let t0 = Instant::now();
    let mut at = Vec::new();
    for _ in 0..4 {
        at.push(next_call(&mut calls).await.1 - t0);
    }
    assert_eq!(at, [0, 60, 120, 3720].map(Duration::from_secs));
    assert!(c.initialised());
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn once_known_a_failed_refresh_waits_for_the_next_period_and_keeps_the_cache() {
    let (src, mut calls) = Scripted::new();
    src.then_full(Ok(scope()));
    src.then_full(Err(offline()));
    let c = cache(src.clone());
    let stop = CancellationToken::new();
    let task = tokio::spawn(c.clone().run(stop.clone()));
    let t0 = next_call(&mut calls).await.1;
    assert_eq!(
        next_call(&mut calls).await.1 - t0,
        Duration::from_secs(3600)
    );
    assert_eq!(
        next_call(&mut calls).await.1 - t0,
        Duration::from_secs(7200)
    );
    assert_eq!(c.len(), 3, "a failure keeps what is known");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_on_demand_refresh_waits_out_the_throttle() {
    let (src, mut calls) = Scripted::new();
    for _ in 0..3 {
        src.then_full(Ok(scope()));
    }
    let c = cache(src.clone());
    let stop = CancellationToken::new();
    let task = tokio::spawn(c.clone().run(stop.clone()));
    let t0 = next_call(&mut calls).await.1;
    tokio::time::sleep(Duration::from_secs(10)).await;
    c.request_refresh();
    c.request_refresh();
    assert_eq!(
        next_call(&mut calls).await.1 - t0,
        Duration::from_secs(120),
        "not before the throttle, and once"
    );
    tokio::time::sleep(Duration::from_secs(500)).await;
    let asked = Instant::now();
    c.request_refresh();
    assert_eq!(
        next_call(&mut calls).await.1,
        asked,
        "past the throttle: at once"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_full_refresh_removes_what_it_does_not_return() {
    let (src, _calls) = Scripted::new();
    src.then_full(Ok(scope()));
    src.then_full(Ok(vec![device("edge1", 1, "enabled")]));
    let c = cache(src);
    assert_eq!(c.refresh_full().await.unwrap(), 3);
    assert!(c.known(&id("leaf1")).is_some());
    assert_eq!(c.refresh_full().await.unwrap(), 1);
    assert!(c.known(&id("leaf1")).is_none());
    assert!(c.known(&id("edge1/filter")).is_none());
}

#[tokio::test(start_paused = true)]
async fn lookups_wait_for_a_first_refresh_and_are_throttled_per_identity() {
    let (src, mut calls) = Scripted::new();
    let c = cache(src.clone());
    assert!(
        !c.lookup(&id("leaf2")).await,
        "refused before the first refresh"
    );
    assert!(calls.try_recv().is_err(), "and nothing was asked");

    src.then_full(Ok(scope()));
    c.refresh_full().await.unwrap();
    let _ = next_call(&mut calls).await;
    src.then_one(Ok(vec![device("leaf2", 4, "enabled")]));
    assert!(c.lookup(&id("LEAF2")).await);
    assert_eq!(next_call(&mut calls).await.0, "one");
    // Within the throttle: answered from the cache, not asked again.
    assert!(c.lookup(&id("leaf2")).await);
    assert!(calls.try_recv().is_err());
    // Another identity has its own throttle.
    assert!(!c.lookup(&id("leaf3")).await);
    assert_eq!(next_call(&mut calls).await.0, "one");
    // Past it: "not in scope" removes the identity.
    tokio::time::sleep(Duration::from_secs(120)).await;
    src.then_one(Err(FetchError::Gone("deleted".into())));
    assert!(!c.lookup(&id("leaf2")).await);
    assert!(c.known(&id("leaf2")).is_none());
    // A transient failure keeps what is known.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(c.lookup(&id("leaf1")).await, "offline: kept");
}

#[test]
fn keys_in_edge_hubs_order_and_disabled_devices() {
    let c = ScopeCache::new(
        DeviceId::parse("edge1").unwrap(),
        RefreshSettings::default(),
    );
    *c.known.write().unwrap() = [
        device("edge1", 1, "enabled"),
        module("edge1", "filter", 2),
        device("off", 3, "disabled"),
        module("off", "m", 4),
        ScopeEntry {
            identity: json!({"deviceId": "x509dev", "authentication": {"type": "selfSigned"}}),
            auth_chain: "x509dev;edge1".into(),
        },
    ]
    .into_iter()
    .map(|e| (e.id().unwrap().key(), e))
    .collect();
    let (canonical, keys) = c.keys(&id("EDGE1/Filter")).unwrap();
    assert_eq!(canonical, id("edge1/filter"));
    let order: Vec<String> = keys
        .iter()
        .flat_map(|p| [p.primary.to_base64(), p.secondary.to_base64()])
        .collect();
    assert_eq!(
        order,
        [key(2), key(102), key(1), key(101)].map(|k| k.to_base64()),
        "the module's primary and secondary, then its device's"
    );
    assert!(c.keys(&id("off")).is_none(), "a disabled device");
    assert_eq!(
        c.keys(&id("off/m")).unwrap().1.len(),
        1,
        "its module, without its keys"
    );
    assert!(c.keys(&id("x509dev")).is_none(), "not a key identity");
    assert_eq!(c.own_modules(), [ModuleId::parse("filter").unwrap()]);
}

/// AES-256-GCM with a fixed key, as the runtime's encrypt/decrypt; the IV is the nonce's seed.
struct Gcm([u8; 32]);

impl Gcm {
    fn key(&self) -> ring::aead::LessSafeKey {
        ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &self.0).unwrap(),
        )
    }
    fn nonce(iv: &[u8]) -> ring::aead::Nonce {
        let mut n = [0u8; 12];
        for (i, b) in iv.iter().enumerate() {
            n[i % 12] ^= b;
        }
        ring::aead::Nonce::assume_unique_for_key(n)
    }
}

impl Sealer for Gcm {
    fn seal<'a>(&'a self, plaintext: &'a [u8], iv: &'a [u8]) -> SealFuture<'a> {
        let mut buf = plaintext.to_vec();
        let r = self
            .key()
            .seal_in_place_append_tag(Self::nonce(iv), ring::aead::Aad::empty(), &mut buf)
            .map(|()| buf)
            .map_err(|_| "seal".to_owned());
        Box::pin(async move { r })
    }
    fn open<'a>(&'a self, ciphertext: &'a [u8], iv: &'a [u8]) -> SealFuture<'a> {
        let mut buf = ciphertext.to_vec();
        let r = self
            .key()
            .open_in_place(Self::nonce(iv), ring::aead::Aad::empty(), &mut buf)
            .map(|p| p.to_vec())
            .map_err(|_| "open".to_owned());
        Box::pin(async move { r })
    }
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn reopen(dir: &std::path::Path, sealer: Gcm) -> ScopeCache {
    let ks = fjall::Config::new(dir).open().unwrap();
    ScopeCache::open(
        DeviceId::parse("edge1").unwrap(),
        RefreshSettings::default(),
        ks,
        Arc::new(sealer),
        b"0123456789abcdef0123456789abcdef".to_vec(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn kept_identities_authenticate_after_a_restart_with_the_parent_offline() {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "edgehub-scope-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )));
    {
        let c = reopen(&dir.0, Gcm([7; 32])).await;
        assert!(!c.initialised());
        let (src, _calls) = Scripted::new();
        src.then_full(Ok(scope()));
        c.set_source(src);
        c.refresh_full().await.unwrap();
        // What is at rest is not the keys in clear.
        let ks = c.persist.as_ref().unwrap();
        let raw = ks.part.get("edge1/filter").unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains(&key(2).to_base64()));
    }
    // Restart, the parent offline: the kept identities are known at once.
    let c = reopen(&dir.0, Gcm([7; 32])).await;
    assert!(c.initialised());
    let (src, _calls) = Scripted::new();
    c.set_source(src);
    assert!(c.refresh_full().await.is_err());
    let (_, keys) = c.keys(&id("edge1/filter")).unwrap();
    assert_eq!(keys[0].primary.to_base64(), key(2).to_base64());
    assert_eq!(c.len(), 3);
    drop(c);
    // Another runtime key (a re-created $edgeHub identity): nothing readable, not fatal.
    let c = reopen(&dir.0, Gcm([8; 32])).await;
    assert!(!c.initialised());
    assert!(c.is_empty());
}

#[tokio::test(start_paused = true)]
async fn removed_disabled_and_rekeyed_identities_are_revoked_unchanged_ones_are_not() {
    let (source, _calls) = Scripted::new();
    let c = cache(source.clone());
    let revocations = Arc::new(Revocations::default());
    c.set_revocations(revocations.clone());
    let extra = || module("edge1", "other", 4);
    let mut first = scope();
    first.push(extra());
    first.push(device("leaf2", 5, "enabled"));
    source.then_full(Ok(first));
    c.refresh_full().await.unwrap();
    assert_eq!(revocations.epoch(), 0, "a first fetch revokes nothing");

    // filter re-keyed, leaf1 disabled, edge1/other gone, leaf2 only with a new etag.
    let mut leaf2 = device("leaf2", 5, "enabled");
    leaf2.identity["etag"] = json!("AAAB");
    source.then_full(Ok(vec![
        device("edge1", 1, "enabled"),
        module("edge1", "filter", 9),
        device("leaf1", 3, "disabled"),
        leaf2,
    ]));
    c.refresh_full().await.unwrap();
    let (_, revoked) = revocations.since(0);
    let crate::core::registry::Revoked::Keys(mut keys) = revoked else {
        panic!("the log holds them")
    };
    keys.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let names: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    assert_eq!(names, ["edge1/filter", "edge1/other", "leaf1"]);

    // A lookup that finds an identity gone revokes it too.
    let seen = revocations.epoch();
    source.then_one(Err(FetchError::Gone("404".into())));
    assert!(!c.lookup(&id("leaf2")).await);
    let (_, revoked) = revocations.since(seen);
    assert_eq!(
        revoked,
        crate::core::registry::Revoked::Keys(vec![IdentityKey::from_stored("leaf2")])
    );
}

#[test]
fn refresh_requests_name_devices_and_modules() {
    let ids = parse_refresh_request(br#"{"deviceIds": ["leaf1", "edge1/filter"]}"#).unwrap();
    assert_eq!(ids, vec![id("leaf1"), id("edge1/filter")]);
    for bad in [
        &b"not json"[..],
        br#"{"ids": []}"#,
        br#"{"deviceIds": [1]}"#,
        br#"{"deviceIds": ["a/b/c"]}"#,
    ] {
        assert!(
            parse_refresh_request(bad).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    let many: Vec<String> = (0..=MAX_REFRESH_IDS).map(|i| format!("d{i}")).collect();
    let body = json!({ "deviceIds": many }).to_string();
    assert!(parse_refresh_request(body.as_bytes()).is_err());
}

#[tokio::test(start_paused = true)]
async fn the_refresh_method_looks_identities_up_even_when_just_looked_up() {
    let (source, mut calls) = Scripted::new();
    let c = cache(source.clone());
    source.then_full(Ok(scope()));
    c.refresh_full().await.unwrap();
    next_call(&mut calls).await;
    source.then_one(Ok(vec![device("leaf9", 9, "enabled")]));
    assert!(c.lookup(&id("leaf9")).await);
    next_call(&mut calls).await;
    // Throttled for a plain lookup, not for the method.
    source.then_one(Err(FetchError::Gone("deleted".into())));
    assert!(c.lookup(&id("leaf9")).await, "throttled: still known");
    let ids = parse_refresh_request(br#"{"deviceIds": ["leaf9"]}"#).unwrap();
    c.refresh_ids(&ids).await;
    assert!(
        c.known(&id("leaf9")).is_none(),
        "the method looked it up again"
    );
}

#[test]
fn leaf_devices_with_certificates_are_served_by_thumbprint_or_ca() {
    use crate::model::x509::{Thumbprint, X509Auth};
    let c = ScopeCache::new(
        DeviceId::parse("edge1").unwrap(),
        RefreshSettings::default(),
    );
    let sha1 = "A1B2C3D4E5F60718293A4B5C6D7E8F9012345678";
    let entry = |id: &str, auth: serde_json::Value, status: &str, chain: &str| ScopeEntry {
        identity: json!({"deviceId": id, "status": status, "authentication": auth}),
        auth_chain: chain.into(),
    };
    *c.known.write().unwrap() = [
        entry(
            "thumb",
            json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": sha1, "secondaryThumbprint": null}}),
            "enabled",
            "thumb;edge1",
        ),
        entry(
            "byca",
            json!({"type": "certificateAuthority"}),
            "enabled",
            "byca;edge1",
        ),
        entry(
            "off",
            json!({"type": "certificateAuthority"}),
            "disabled",
            "off;edge1",
        ),
        // A leaf of a nested child connects to that child, not here.
        entry(
            "far",
            json!({"type": "certificateAuthority"}),
            "enabled",
            "far;child1;edge1",
        ),
        device("keyed", 5, "enabled"),
        entry(
            "none",
            json!({"type": "selfSigned", "x509Thumbprint": {}}),
            "enabled",
            "none;edge1",
        ),
    ]
    .into_iter()
    .map(|e| (e.id().unwrap().key(), e))
    .collect();
    let mut got = c.own_x509_leaves();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            (DeviceId::parse("byca").unwrap(), X509Auth::Ca),
            (
                DeviceId::parse("thumb").unwrap(),
                X509Auth::Thumbprints(vec![Thumbprint::parse(sha1).unwrap()])
            ),
        ]
    );
    assert_eq!(device("keyed", 5, "enabled").x509(), None);
    assert_eq!(module("edge1", "m", 5).x509(), None);
}

#[tokio::test(start_paused = true)]
async fn not_found_under_a_child_hubs_chain_keeps_the_identity() {
    let (src, mut calls) = Scripted::new();
    let c = cache(src.clone());
    let mut edge2 = device("edge2", 6, "enabled");
    edge2.identity["capabilities"] = json!({"iotEdge": true});
    let mut known = scope();
    known.push(edge2);
    src.then_full(Ok(known));
    c.refresh_full().await.unwrap();
    let _ = next_call(&mut calls).await;
    // leaf1 is not under edge2: that answer says nothing of leaf1 elsewhere in the scope.
    src.then_one(Err(FetchError::Gone("not under edge2".into())));
    let edge2 = DeviceId::parse("edge2").unwrap();
    assert!(c.lookup_under(&id("leaf1"), &edge2).await);
    assert_eq!(next_call(&mut calls).await.0, "one");
    assert!(c.known(&id("leaf1")).is_some());
}
