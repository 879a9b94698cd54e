use std::path::PathBuf;

use super::*;
use crate::model::identity::{DeviceId, Identity, ModuleId};
use crate::store::durable::{open_keyspace, Overflow, SyncPolicy};
use fe2o3_amqp::types::{messaging::Properties, primitives::SimpleValue};
use serde_amqp::primitives::OrderedMap;

/// A directory removed when the test ends, however it ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        Self(std::env::temp_dir().join(format!("edgehub-log-{}", uuid::Uuid::new_v4())))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const HOUR: i64 = 3_600_000;
const T0: i64 = 1_800_000_000_000;

fn msg(device: &str, module: Option<&str>, body: &str) -> Message {
    let mut app = OrderedMap::new();
    app.insert("k".to_owned(), SimpleValue::String(body.into()));
    let d = DeviceId::parse(device).unwrap();
    Message {
        body: body.as_bytes().to_vec(),
        properties: Some(Properties {
            message_id: Some(format!("id-{body}").into()),
            ..Default::default()
        }),
        application_properties: app,
        annotations: OrderedMap::new(),
        from: match module {
            Some(m) => Identity::Module(d, ModuleId::parse(m).unwrap()),
            None => Identity::Device(d),
        },
        output: None,
        enqueued_ms: 5,
        twin_change: false,
        id: crate::model::message::next_id(),
    }
}

fn open_with_store(dir: &TempDir, cap: Option<u64>) -> (Arc<EventLog>, Arc<DurableStore>) {
    let ks = open_keyspace(&dir.0, cap).unwrap();
    let store =
        DurableStore::open(&dir.0, ks.clone(), SyncPolicy::Os, cap, Overflow::RejectNew).unwrap();
    let log = EventLog::open(ks, Some(store.clone()), cap, 4, 3_600_000, T0).unwrap();
    (log, store)
}

/// Appends, waiting (bounded) while the store is busy (a full write buffer being flushed).
fn append_when_not_busy(log: &EventLog, m: &Message, now: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match log.append(m, now) {
            Ok(_) => return,
            Err(StoreError::Stalled(_) | StoreError::Compacting { .. })
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(e) => panic!("append: {e}"),
        }
    }
}

fn bodies(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| String::from_utf8(e.msg.body.clone()).unwrap())
        .collect()
}

#[test]
fn events_keep_their_order_sequence_and_sender_across_a_restart() {
    let dir = TempDir::new();
    let p;
    {
        let (log, store) = open_with_store(&dir, None);
        p = log.partition_of("leaf");
        for i in 0..5 {
            let (q, seq) = log
                .append(&msg("leaf", None, &format!("m{i}")), T0 + i)
                .unwrap();
            assert_eq!((q, seq), (p, i as u64));
        }
        let (q, _) = log
            .append(&msg("leaf", Some("filter"), "mod"), T0 + 5)
            .unwrap();
        assert_eq!(q, p, "a module's events go with its device's");
        assert!(store.usage().0 >= log.bytes() && log.bytes() > 0);
        futures_util::FutureExt::now_or_never(store.sync())
            .unwrap()
            .unwrap();
    }
    let (log, store) = open_with_store(&dir, None);
    assert_eq!(
        store.usage().0,
        log.bytes(),
        "the log's bytes count against the cap again"
    );
    let events = log.read(p, 0, 100, usize::MAX).unwrap();
    assert_eq!(bodies(&events)[..5], ["m0", "m1", "m2", "m3", "m4"]);
    assert_eq!(events[2].sequence, 2);
    assert_eq!(events[2].offset(), "2");
    assert_eq!(events[2].enqueued_ms, T0 + 2);
    assert_eq!(events[2].msg.from.to_string(), "leaf");
    assert_eq!(
        events[2].msg.application_properties.get("k"),
        Some(&SimpleValue::String("m2".into()))
    );
    let info = log.info(p).unwrap();
    assert_eq!(info.begin, 0);
    assert!(!info.empty);
    // Reading from the middle, a bounded count.
    assert_eq!(bodies(&log.read(p, 3, 1, usize::MAX).unwrap()), ["m3"]);
    let (_, seq) = log.append(&msg("leaf", None, "after"), T0 + 10).unwrap();
    assert_eq!(
        seq,
        info.last.unwrap() + 1,
        "numbering goes on after a restart"
    );
}

#[test]
fn retention_removes_old_events_and_sequence_numbers_never_go_back() {
    let dir = TempDir::new();
    let p;
    {
        let (log, store) = open_with_store(&dir, None);
        p = log.partition_of("d1");
        log.append(&msg("d1", None, "old"), T0).unwrap();
        log.append(&msg("d1", None, "newer"), T0 + HOUR / 2)
            .unwrap();
        sync(&store);
        // Within the hour of retention: both stay.
        assert_eq!(log.expire(T0 + HOUR - 1).unwrap(), 0);
        assert_eq!(log.expire(T0 + HOUR + 1).unwrap(), 1);
        assert_eq!(bodies(&log.read(p, 0, 10, usize::MAX).unwrap()), ["newer"]);
        let info = log.info(p).unwrap();
        assert_eq!((info.begin, info.last, info.empty), (1, Some(1), false));
        assert_eq!(log.expire(T0 + 2 * HOUR).unwrap(), 1);
        let info = log.info(p).unwrap();
        assert_eq!((info.begin, info.last, info.empty), (2, Some(1), true));
        assert_eq!(log.bytes(), 0);
    }
    let (log, store) = open_with_store(&dir, None);
    assert_eq!(store.usage().0, 0);
    let info = log.info(p).unwrap();
    assert_eq!((info.begin, info.empty), (2, true));
    assert_eq!(
        log.append(&msg("d1", None, "x"), T0 + 3 * HOUR).unwrap().1,
        2
    );
}

#[test]
fn enqueued_times_never_go_back_and_a_time_filter_finds_its_event() {
    let dir = TempDir::new();
    let (log, store) = open_with_store(&dir, None);
    let p = log.partition_of("d");
    for (i, t) in [T0, T0 + 10, T0 + 5, T0 + 20].into_iter().enumerate() {
        log.append(&msg("d", None, &i.to_string()), t).unwrap();
    }
    sync(&store);
    let times: Vec<i64> = log
        .read(p, 0, 10, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| e.enqueued_ms)
        .collect();
    assert_eq!(times, [T0, T0 + 10, T0 + 10, T0 + 20]);
    assert_eq!(log.first_at_or_after(p, T0 - 1).unwrap(), 0);
    assert_eq!(log.first_at_or_after(p, T0 + 1).unwrap(), 1);
    assert_eq!(log.first_at_or_after(p, T0 + 10).unwrap(), 1);
    assert_eq!(log.first_at_or_after(p, T0 + 11).unwrap(), 3);
    assert_eq!(log.first_at_or_after(p, T0 + 21).unwrap(), 4);
}

#[test]
fn a_full_store_makes_room_by_removing_the_oldest_events() {
    let dir = TempDir::new();
    let cap = 256 * 1024;
    let (log, store) = open_with_store(&dir, Some(cap));
    let body = "x".repeat(1000);
    for i in 0..1000 {
        let m = msg(&format!("dev{}", i % 7), None, &body);
        append_when_not_busy(&log, &m, T0 + i);
    }
    sync(&store);
    let (held, limit) = store.usage();
    assert!(held <= cap, "{held} within {limit:?}");
    assert_eq!(held, log.bytes());
    // The oldest events are gone, from whichever partition held them; the newest are kept.
    let kept: Vec<i64> = (0..4)
        .flat_map(|p| log.read(p, 0, 1000, usize::MAX).unwrap())
        .map(|e| e.enqueued_ms)
        .collect();
    assert!(
        kept.len() < 1000 && kept.len() > 50,
        "{} kept, {held} bytes",
        kept.len()
    );
    assert!(kept.contains(&(T0 + 999)));
    let oldest_kept = kept.iter().min().copied().unwrap();
    assert!(oldest_kept > T0 + 500, "{}", oldest_kept - T0);
}

#[test]
fn an_empty_log_does_not_make_room_for_itself_from_queued_messages() {
    let dir = TempDir::new();
    let (log, store) = open_with_store(&dir, Some(1));
    assert!(matches!(
        log.append(&msg("d", None, "big"), T0),
        Err(StoreError::Full { .. })
    ));
    assert_eq!(store.usage().0, 0);
}

#[test]
fn partitions_follow_the_partition_key_mapping() {
    // The 16-bit hashes as @azure/event-hubs 6.0.4 computes them (`hashPartitionKey`).
    for (key, want) in HASHES {
        assert_eq!(hash16(key.as_bytes()), *want, "{key:?}");
    }
    // The logical ranges: 32 767 logical partitions, the first `32 767 % count` ranges one
    // wider.
    assert_eq!(partition_for_key("A", 1), 0);
    assert_eq!(partition_for_key("a", 4), 9517 / 8192);
    assert_eq!(partition_for_key("leaf1", 4), 30102 / 8192);
    assert_eq!(partition_for_key("exactly12chr", 3), 27839 / 10923);
    assert_eq!(partition_for_key("device0", 32), 28642 / 1024);
    // Case does not matter.
    assert_eq!(
        partition_for_key("Leaf-1", 4),
        partition_for_key("LEAF-1", 4)
    );
    // Several devices spread over the partitions.
    let used: std::collections::BTreeSet<u32> = (0..64)
        .map(|i| partition_for_key(&format!("device{i}"), 4))
        .collect();
    assert_eq!(used.len(), 4);
}

const HASHES: &[(&str, i16)] = &[
    ("", 0),
    ("A", 9517),
    ("LEAF1", -30102),
    ("EDGE1", 4310),
    ("EXACTLY12CHR", 27839),
    ("THIRTEEN-CHAR", 1823),
    ("A-MUCH-LONGER-DEVICE-ID-42", 29929),
    ("FOUR SCORE AND SEVEN YEARS AGO", 13486),
    ("DEVICE0", -28642),
];

fn sync(store: &DurableStore) {
    futures_util::FutureExt::now_or_never(store.sync())
        .expect("a sync with the Os policy does not wait")
        .unwrap();
}

#[test]
fn an_event_is_read_only_once_a_sync_covered_it() {
    let dir = TempDir::new();
    let (log, store) = open_with_store(&dir, None);
    let p = log.partition_of("leaf");
    let mut tail = log.watch(p).unwrap();
    let (_, first) = log.append(&msg("leaf", None, "a"), T0).unwrap();
    assert_eq!(first, 0);
    // Written to the store but not yet committed: a crash now would give sequence 0 to the
    // next event, so no reader may have it yet.
    assert!(log.read(p, 0, 10, usize::MAX).unwrap().is_empty());
    let info = log.info(p).unwrap();
    assert!(info.empty && info.last.is_none(), "{info:?}");
    assert_eq!(log.first_at_or_after(p, T0).unwrap(), 0);
    assert!(!tail.has_changed().unwrap());
    sync(&store);
    assert!(tail.has_changed().unwrap());
    assert_eq!(*tail.borrow_and_update(), 1);
    assert_eq!(bodies(&log.read(p, 0, 10, usize::MAX).unwrap()), ["a"]);
    let info = log.info(p).unwrap();
    assert_eq!(
        (info.last, info.last_enqueued_ms, info.empty),
        (Some(0), T0, false)
    );
    // The next append waits for the next commit, the first stays readable.
    log.append(&msg("leaf", None, "b"), T0 + 1).unwrap();
    assert_eq!(bodies(&log.read(p, 0, 10, usize::MAX).unwrap()), ["a"]);
    assert_eq!(log.info(p).unwrap().last, Some(0));
    sync(&store);
    assert_eq!(bodies(&log.read(p, 0, 10, usize::MAX).unwrap()), ["a", "b"]);
}
