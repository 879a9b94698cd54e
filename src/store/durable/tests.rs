use crate::model::identity::{DeviceId, Identity, ModuleId};
use fe2o3_amqp::types::messaging::Properties;

use super::*;
use crate::store::queue::tests::conformance;
use fe2o3_amqp::types::{
    messaging::annotations::OwnedKey,
    primitives::{SimpleValue, Symbol, Value},
};
use serde_amqp::primitives::OrderedMap;

/// A fresh directory under the system temp dir, removed when the guard drops (also when the test
/// fails).
struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp() -> TempDir {
    TempDir(std::env::temp_dir().join(format!("edgehub-store-{}", uuid::Uuid::new_v4())))
}

fn open(dir: &Path, policy: SyncPolicy) -> Arc<DurableStore> {
    DurableStore::open(
        dir,
        open_keyspace(dir, None).unwrap(),
        policy,
        None,
        Overflow::RejectNew,
    )
    .unwrap()
}

/// A store limited to `limit` bytes, with its keyspace sized for that limit.
fn open_capped(
    dir: &Path,
    policy: SyncPolicy,
    limit: u64,
    overflow: Overflow,
) -> Arc<DurableStore> {
    DurableStore::open(
        dir,
        open_keyspace(dir, Some(limit)).unwrap(),
        policy,
        Some(limit),
        overflow,
    )
    .unwrap()
}

fn msg(body: &str) -> Arc<Message> {
    let mut app = OrderedMap::new();
    app.insert("k".to_owned(), SimpleValue::String("v".into()));
    Arc::new(Message {
        body: body.as_bytes().to_vec(),
        properties: Some(Properties {
            message_id: Some(format!("id-{body}").into()),
            ..Default::default()
        }),
        application_properties: app,
        annotations: OrderedMap::new(),
        from: Identity::Module(DeviceId::parse("d").unwrap(), ModuleId::parse("m").unwrap()),
        output: Some("o".into()),
        enqueued_ms: 5,
        twin_change: false,
        id: crate::model::message::next_id(),
    })
}

/// The kinds of the queue entries on disk, in key order.
fn kinds(store: &DurableStore) -> Vec<u8> {
    store
        .queue
        .prefix([ENTRY_KEY])
        .map(|kv| kv.unwrap().1[0])
        .collect::<Vec<_>>()
}

/// How many queue entries are on disk (name records aside).
fn entry_count(store: &DurableStore) -> usize {
    store.queue.prefix([ENTRY_KEY]).count()
}

/// Pushes, waiting (bounded) while the store is busy (a full write buffer being flushed).
fn push_when_not_busy(q: &DurableQueue, m: Arc<Message>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match q.try_push(m.clone(), 0, None) {
            Ok(_) => return,
            Err(QueueError::StoreBusy) if std::time::Instant::now() < deadline => {
                std::thread::yield_now();
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn drain(q: &DurableQueue) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| {
        q.pop(0).item.map(|i| {
            q.ack(i.seq);
            i.msg.body.clone()
        })
    })
    .collect()
}

#[test]
fn records_round_trip_with_and_without_optional_parts() {
    let mut annotations = OrderedMap::new();
    annotations.insert(OwnedKey::Symbol(Symbol::from("x-opt-a")), Value::Long(-7));
    let full = Message {
        annotations,
        twin_change: true,
        ..(*msg("full")).clone()
    };
    let bare = Message {
        body: Vec::new(),
        properties: None,
        application_properties: OrderedMap::new(),
        annotations: OrderedMap::new(),
        from: Identity::Device(DeviceId::parse("leaf").unwrap()),
        output: None,
        enqueued_ms: -1,
        twin_change: false,
        id: 9,
    };
    for m in [full, bare] {
        let mut bytes = Vec::new();
        encode_record(&m, &mut bytes).unwrap();
        let back = decode_record(m.id, &bytes).unwrap();
        assert_eq!(back.body, m.body);
        assert_eq!(back.properties, m.properties);
        assert_eq!(back.application_properties, m.application_properties);
        assert_eq!(back.annotations, m.annotations);
        assert_eq!(back.from, m.from);
        assert_eq!(back.output, m.output);
        assert_eq!(back.enqueued_ms, m.enqueued_ms);
        assert_eq!(back.twin_change, m.twin_change);
        // Every cut of a record is refused, never misread or a panic.
        for cut in 0..bytes.len() - m.body.len() {
            assert!(decode_record(m.id, &bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}

#[test]
fn durable_queue_conforms() {
    let dir = temp();
    let store = open(&dir, SyncPolicy::Commit);
    let n = std::sync::atomic::AtomicUsize::new(0);
    conformance(|cap| {
        let i = n.fetch_add(1, Ordering::Relaxed);
        Arc::new(store.queue(&format!("ep{i}"), cap, false))
    });
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

/// Pushes one message (with `try_push_sole` when `sole`), checks that it is one inline entry
/// counted at its size (and, with `sole`, that `copies` has no record of it), then drains it.
fn one_inline_entry(sole: bool) {
    let dir = temp();
    let store = open(&dir, SyncPolicy::Os);
    let q = store.queue("one", 10, false);
    if sole {
        q.try_push_sole(msg("solo"), 1, Some(1 << 50)).unwrap();
        assert!(locked(&store.copies).is_empty());
    } else {
        q.try_push(msg("solo"), 1, Some(1 << 50)).unwrap();
    }
    assert_eq!(kinds(&store), vec![INLINE]);
    assert_eq!(store.messages.len().unwrap(), 0);
    let (k, v) = store.queue.prefix([ENTRY_KEY]).next().unwrap().unwrap();
    assert_eq!(store.usage().0, (k.len() + v.len()) as u64);
    let e = parse_entry(&v).unwrap();
    assert_eq!(e.expires_ms, Some(1 << 50));
    assert_eq!(drain(&q), vec![b"solo".to_vec()]);
    assert_eq!(store.usage().0, 0);
    store.flush_removals();
    assert_eq!(entry_count(&store), 0);
    drop(q);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_message_for_one_queue_is_one_inline_entry() {
    one_inline_entry(false);
}

#[test]
fn a_message_for_one_queue_alone_is_inline_and_not_tracked_as_a_copy() {
    one_inline_entry(true);
}

#[test]
fn a_message_said_to_go_to_one_queue_that_goes_to_another_is_held_by_both() {
    // The hint wrong: each queue then holds the message inline, and each removal deletes
    // only its own entry.
    let dir = temp();
    {
        let store = open(&dir, SyncPolicy::Os);
        let (q1, q2, q3) = (
            store.queue("x", 10, false),
            store.queue("y", 10, false),
            store.queue("z", 10, false),
        );
        let m = msg("both");
        q1.try_push_sole(m.clone(), 1, None).unwrap();
        q2.try_push(m.clone(), 1, None).unwrap();
        q3.try_push(m, 1, None).unwrap();
        // y and z share one record; x kept its inline entry.
        assert_eq!(store.messages.len().unwrap(), 1);
        assert_eq!(kinds(&store), vec![INLINE, POINTER, POINTER]);
        assert_eq!(drain(&q1), vec![b"both".to_vec()]);
        store.flush_removals();
        assert_eq!(kinds(&store), vec![POINTER, POINTER]);
        assert_eq!(store.messages.len().unwrap(), 1);
        assert_eq!(drain(&q2), vec![b"both".to_vec()]);
    }
    // After a reopen, z still has the message, and its removal takes the record with it.
    let store = open(&dir, SyncPolicy::Os);
    let q3 = store.queue("z", 10, false);
    assert!(store.queue("x", 10, false).pop(0).item.is_none());
    assert!(store.queue("y", 10, false).pop(0).item.is_none());
    assert_eq!(drain(&q3), vec![b"both".to_vec()]);
    store.flush_removals();
    assert_eq!(store.messages.len().unwrap(), 0);
    assert_eq!(entry_count(&store), 0);
    assert_eq!(store.usage().0, 0);
    drop((q3, store));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_message_for_several_queues_is_stored_once() {
    let dir = temp();
    let store = open(&dir, SyncPolicy::Os);
    let qs: Vec<DurableQueue> = ["a", "b", "c"]
        .iter()
        .map(|e| store.queue(e, 10, false))
        .collect();
    let m = msg("fan");
    qs[0].try_push(m.clone(), 1, None).unwrap();
    assert_eq!(kinds(&store), vec![INLINE]);
    for q in &qs[1..] {
        q.try_push(m.clone(), 1, None).unwrap();
    }
    // One record, three pointers (the first entry was turned into one).
    assert_eq!(kinds(&store), vec![POINTER; 3]);
    assert_eq!(store.messages.len().unwrap(), 1);
    let on_disk: u64 = store
        .queue
        .prefix([ENTRY_KEY])
        .chain(store.messages.iter())
        .map(|kv| kv.map(|(k, v)| (k.len() + v.len()) as u64).unwrap())
        .sum();
    assert_eq!(store.usage().0, on_disk);
    // The record stays until the last queue acknowledges.
    assert_eq!(drain(&qs[0]), vec![b"fan".to_vec()]);
    assert_eq!(drain(&qs[2]), vec![b"fan".to_vec()]);
    store.flush_removals();
    assert_eq!(store.messages.len().unwrap(), 1);
    assert_eq!(drain(&qs[1]), vec![b"fan".to_vec()]);
    store.flush_removals();
    assert_eq!(store.messages.len().unwrap(), 0);
    assert_eq!(entry_count(&store), 0);
    assert_eq!(store.usage().0, 0);
    drop(qs);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_entry_in_flight_can_be_turned_into_a_pointer() {
    let dir = temp();
    let store = open(&dir, SyncPolicy::Os);
    let (q1, q2) = (store.queue("p", 10, false), store.queue("q", 10, false));
    let m = msg("moving");
    q1.try_push(m.clone(), 3, Some(1 << 50)).unwrap();
    let first = q1.pop(0).item.unwrap();
    q2.try_push(m, 1, None).unwrap();
    // The converted entry keeps its expiry.
    let expiries: Vec<Option<i64>> = store
        .queue
        .prefix([ENTRY_KEY])
        .map(|kv| parse_entry(&kv.unwrap().1).unwrap().expires_ms)
        .collect();
    assert_eq!(expiries, vec![Some(1 << 50), None]);
    q1.ack(first.seq);
    store.flush_removals();
    assert_eq!(store.messages.len().unwrap(), 1);
    assert_eq!(kinds(&store), vec![POINTER]);
    assert_eq!(drain(&q2), vec![b"moving".to_vec()]);
    store.flush_removals();
    assert_eq!(store.messages.len().unwrap(), 0);
    assert_eq!(entry_count(&store), 0);
    assert_eq!(store.usage().0, 0);
    drop((q1, q2, store));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_record_written_again_after_its_delete_is_kept() {
    // A message acknowledged everywhere, then queued to two more endpoints (a sender that
    // waited for room): its shared record is deleted and written again, in that order.
    let dir = temp();
    let m = msg("again");
    {
        let store = open(&dir, SyncPolicy::Os);
        let qs: Vec<DurableQueue> = ["a", "b", "c", "d"]
            .iter()
            .map(|e| store.queue(e, 10, false))
            .collect();
        qs[0].try_push(m.clone(), 1, None).unwrap();
        qs[1].try_push(m.clone(), 1, None).unwrap();
        drain(&qs[0]);
        drain(&qs[1]);
        qs[2].try_push(m.clone(), 1, None).unwrap();
        qs[3].try_push(m.clone(), 1, None).unwrap();
    }
    let store = open(&dir, SyncPolicy::Os);
    assert_eq!(store.messages.len().unwrap(), 1);
    for e in ["c", "d"] {
        assert_eq!(drain(&store.queue(e, 10, false)), vec![b"again".to_vec()]);
    }
    store.flush_removals();
    assert_eq!(store.messages.len().unwrap(), 0);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_message_queued_again_after_its_ack_is_inline_again() {
    let dir = temp();
    let store = open(&dir, SyncPolicy::Os);
    let (q1, q2) = (store.queue("x", 10, false), store.queue("y", 10, false));
    let m = msg("late");
    q1.try_push(m.clone(), 1, None).unwrap();
    drain(&q1);
    q2.try_push(m, 1, None).unwrap();
    store.flush_removals();
    assert_eq!(kinds(&store), vec![INLINE]);
    assert_eq!(store.messages.len().unwrap(), 0);
    drop((q1, q2, store));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_journal_is_fsynced_through_a_handle_on_the_newest_journal() {
    let dir = temp();
    let newest = || {
        std::fs::read_dir(dir.join("journals"))
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap()
    };
    let handle = |store: &DurableStore| locked(&store.journal).open.as_ref().map(|o| o.0);
    let body = "x".repeat(64 * 1024);
    let written = {
        let store = open(&dir, SyncPolicy::Commit);
        let q = store.queue("big", 10_000, false);
        store.sync().await.unwrap();
        q.try_push(msg("first"), 0, None).unwrap();
        store.sync().await.unwrap();
        // fjall's own layout, as the handle expects it (else it falls back to fjall's fsync).
        assert_eq!(handle(&store), Some(newest()));
        // Past the 16 MiB write buffer: fjall seals the journal and starts the next one.
        let mut n = 1;
        while newest() == 0 {
            for _ in 0..16 {
                push_when_not_busy(&q, msg(&body));
                n += 1;
            }
            store.sync().await.unwrap();
            assert!(n < 1000, "the journal was never rotated");
        }
        q.try_push(msg("last"), 0, None).unwrap();
        store.sync().await.unwrap();
        assert_eq!(handle(&store), Some(newest()));
        n + 1
    };
    let store = open(&dir, SyncPolicy::Commit);
    assert_eq!(
        store.queue("big", 10_000, false).lengths().get(&0),
        Some(&written)
    );
}

#[tokio::test]
async fn the_journal_handle_follows_journals_started_and_deleted_between_syncs() {
    let dir = temp();
    let limit = 8 << 20; // a 1 MiB write buffer: journals rotate often
    let store = open_capped(&dir, SyncPolicy::Commit, limit, Overflow::RejectNew);
    let q = store.queue("q", 100, false);
    q.try_push(msg("a"), 0, None).unwrap();
    store.sync().await.unwrap();
    let first = locked(&store.journal).open.as_ref().unwrap().0;
    let journal = |id: u64| dir.join("journals").join(id.to_string());
    // Writes the store does not count (as removals and twin writes) start new journals
    // until fjall has deleted the one the handle holds and the one after it.
    let big = vec![7u8; 256 * 1024];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut i = 0u64;
    while journal(first).exists() || journal(first + 1).exists() {
        store.messages.insert(i.to_be_bytes(), &big).unwrap();
        store.messages.remove(i.to_be_bytes()).unwrap();
        i += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "journals never deleted"
        );
        tokio::task::yield_now().await;
    }
    q.try_push(msg("b"), 0, None).unwrap();
    store.sync().await.unwrap();
    let newest = std::fs::read_dir(dir.join("journals"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    assert!(newest > first + 1);
    assert_eq!(locked(&store.journal).open.as_ref().unwrap().0, newest);
}

#[tokio::test]
async fn queues_survive_a_reopen_with_one_copy_per_message() {
    let dir = temp();
    let (a, b, c) = (msg("a"), msg("b"), msg("c"));
    let held = {
        let store = open(&dir, SyncPolicy::Commit);
        let q1 = store.queue("d/x/in", 100, false);
        let q2 = store.queue("iothub", 100, false);
        q1.try_push(a.clone(), 5, None).unwrap();
        q1.try_push(b.clone(), 5, Some(i64::MAX - 1)).unwrap();
        q1.try_push(c.clone(), 0, None).unwrap();
        q2.try_push(a.clone(), 1, None).unwrap();
        // c is delivered and acknowledged before the "crash".
        let first = q1.pop(0).item.unwrap();
        assert_eq!(first.msg.body, b"c");
        q1.ack(first.seq);
        store.sync().await.unwrap();
        assert_eq!(
            store.messages.len().unwrap(),
            1,
            "a is stored once for two queues, b inline"
        );
        store.usage().0
    };
    let store = open(&dir, SyncPolicy::Commit);
    assert_eq!(store.usage().0, held, "the bytes held are counted again");
    let mut eps = store.recovered_endpoints();
    eps.sort();
    assert_eq!(eps, vec!["d/x/in".to_owned(), "iothub".to_owned()]);
    let q1 = store.queue("d/x/in", 100, false);
    let q2 = store.queue("iothub", 100, false);
    assert_eq!(q1.lengths().get(&5), Some(&2));
    let items: Vec<Queued> = (0..2).map(|_| q1.pop(0).item.unwrap()).collect();
    let got: Vec<Arc<Message>> = items.iter().map(|i| i.msg.clone()).collect();
    assert_eq!(got[0].body, b"a");
    assert_eq!(got[1].body, b"b");
    assert_eq!(got[0].properties, a.properties);
    assert_eq!(got[0].application_properties, a.application_properties);
    assert_eq!(
        (got[0].from.to_string(), got[0].output.clone()),
        ("d/m".into(), Some("o".into()))
    );
    assert!(q1.pop(0).item.is_none());
    // New ids never collide with stored ones.
    assert!(crate::model::message::next_id() > a.id.max(b.id).max(c.id));
    // The recovered shared record goes with its last pointer, the inline one with its entry.
    for i in &items {
        q1.ack(i.seq);
    }
    store.flush_removals();
    assert_eq!(store.messages.len().unwrap(), 1);
    assert_eq!(drain(&q2), vec![b"a".to_vec()]);
    store.flush_removals();
    assert_eq!(store.messages.len().unwrap(), 0);
    assert_eq!(entry_count(&store), 0);
    assert_eq!(store.usage().0, 0);
    drop((q1, q2, store));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn removals_are_written_in_batches_and_at_close() {
    let dir = temp();
    let n = REMOVAL_BATCH + 10;
    {
        let store = open(&dir, SyncPolicy::Os);
        let q = store.queue("r", n + 1, false);
        for i in 0..n {
            q.try_push(msg(&format!("r{i}")), 1, None).unwrap();
        }
        let seqs: Vec<u64> = (0..n).map(|_| q.pop(0).item.unwrap().seq).collect();
        let marks: Vec<u64> = seqs[..REMOVAL_BATCH - 1]
            .iter()
            .map(|s| q.ack(*s))
            .collect();
        assert!(marks.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(entry_count(&store), n, "deletes wait for a batch");
        assert!(!q.removal_written(marks[0]));
        // A full batch goes to fjall on the store's thread.
        let last = q.ack(seqs[REMOVAL_BATCH - 1]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while entry_count(&store) != n - REMOVAL_BATCH {
            assert!(
                std::time::Instant::now() < deadline,
                "the batch was not written"
            );
            std::thread::yield_now();
        }
        // In fjall is not yet out of the process: a pump counts it until it is written.
        assert!(!q.removal_written(last));
        let more = q.ack(seqs[REMOVAL_BATCH]);
        assert_eq!(entry_count(&store), n - REMOVAL_BATCH);
        // A healthy store writes them out on the caller's thread (fjall cannot stall it).
        assert!(q.write_removals_now());
        assert!(q.removal_written(last) && q.removal_written(more));
        assert_eq!(entry_count(&store), n - REMOVAL_BATCH - 1);
        // The housekeeping tick writes what is pending.
        let pending = q.ack(seqs[REMOVAL_BATCH + 1]);
        assert!(q.expire(0).is_empty());
        assert_eq!(entry_count(&store), n - REMOVAL_BATCH - 2);
        assert!(!q.removal_written(pending));
        q.ack(seqs[REMOVAL_BATCH + 2]);
    }
    // Closing the store writes the rest: nothing acknowledged comes back.
    let store = open(&dir, SyncPolicy::Os);
    let q = store.queue("r", n + 1, false);
    assert_eq!(q.len(), n - REMOVAL_BATCH - 3);
    drop((q, store));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_sync_writes_out_the_removals_committed_before_it() {
    let dir = temp();
    let store = open(&dir, SyncPolicy::Commit);
    let q = store.queue("s", 10, false);
    q.try_push(msg("a"), 1, None).unwrap();
    let a = q.pop(0).item.unwrap();
    let mark = q.ack(a.seq);
    store.flush_removals();
    assert!(!q.removal_written(mark));
    q.try_push(msg("b"), 1, None).unwrap();
    store.sync().await.unwrap();
    assert!(q.removal_written(mark));
    drop((q, store));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn commits_of_a_stream_start_the_interval_apart_and_cover_what_is_written_meanwhile() {
    let dir = temp();
    let store = open(&dir, SyncPolicy::Commit);
    let interval = std::time::Duration::from_secs(2);
    store.set_commit_interval(interval);
    let q = store.queue("s", 10, false);
    let deadline = std::time::Duration::from_secs(30);

    // Two messages in one commit: a stream, not a sender waiting for each acknowledgement.
    for body in ["a1", "a2"] {
        q.try_push(msg(body), 1, None).unwrap();
        store.count_message();
    }
    let first = std::time::Instant::now();
    tokio::time::timeout(deadline, store.sync())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.fsyncs.load(Ordering::Relaxed), 1);

    // So the next commit waits out the interval, and a write made while it waits rides on it
    // (made well inside the interval: 0.2 of its 2 s).
    q.try_push(msg("b"), 1, None).unwrap();
    store.count_message();
    let b = tokio::spawn({
        let store = store.clone();
        async move { store.sync().await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!b.is_finished(), "the second commit did not wait");
    q.try_push(msg("c"), 1, None).unwrap();
    store.count_message();
    let c = tokio::spawn({
        let store = store.clone();
        async move { store.sync().await }
    });
    for t in [b, c] {
        tokio::time::timeout(deadline, t)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    assert!(
        first.elapsed() >= interval,
        "the second commit started {:?} after the first",
        first.elapsed()
    );
    assert_eq!(
        store.fsyncs.load(Ordering::Relaxed),
        2,
        "b and c share one fsync: c was written while it waited"
    );
    assert_eq!(store.synced.load(Ordering::Relaxed), 4);

    // Without an interval, each commit starts at once.
    store.set_commit_interval(std::time::Duration::ZERO);
    q.try_push(msg("d"), 1, None).unwrap();
    tokio::time::timeout(deadline, store.sync())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(store.fsyncs.load(Ordering::Relaxed), 3);
    drop((q, store));
}

#[tokio::test]
async fn a_sender_waiting_for_each_commit_is_not_held_back_by_the_interval() {
    let dir = temp();
    let store = open(&dir, SyncPolicy::Commit);
    // Far past the deadline below: a commit that waited it out would fail the test.
    store.set_commit_interval(std::time::Duration::from_secs(100));
    // Each message goes to two queues: two writes, one message, one sender waiting.
    let (q, r) = (store.queue("s", 10, false), store.queue("t", 10, false));
    for (i, body) in ["a", "b", "c"].into_iter().enumerate() {
        let m = msg(body);
        q.try_push(m.clone(), 1, None).unwrap();
        r.try_push(m, 1, None).unwrap();
        store.count_message();
        tokio::time::timeout(std::time::Duration::from_secs(20), store.sync())
            .await
            .expect("a lone sender's commit waited for the interval")
            .unwrap();
        assert_eq!(store.fsyncs.load(Ordering::Relaxed), i as u64 + 1);
    }
    drop((q, r, store));
}

#[test]
fn drop_oldest_drops_the_oldest_of_any_priority() {
    let dir = temp();
    let limit = 3 * 400;
    let store = open_capped(&dir, SyncPolicy::Os, limit, Overflow::DropOldest);
    let q = store.queue("cap", 1000, false);
    let body = |i: usize| format!("{i:0>200}");
    // The oldest is of a lower priority (a higher number) than the next ones.
    q.try_push(msg(&body(0)), 5, None).unwrap();
    q.try_push(msg(&body(1)), 0, None).unwrap();
    let mut i = 2;
    while q.len() == i {
        q.try_push(msg(&body(i)), 0, None).unwrap();
        i += 1;
    }
    let left: Vec<Vec<u8>> =
        std::iter::from_fn(|| q.pop(0).item.map(|m| m.msg.body.clone())).collect();
    assert!(
        !left.contains(&body(0).into_bytes()),
        "the oldest went first"
    );
    assert!(left.contains(&body(i - 1).into_bytes()));
    drop((q, store));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn expire_reads_what_is_not_in_memory_and_leaves_the_rest() {
    // Recovered entries have no message in memory: `expire` reads those it drops, and only
    // those.
    let dir = temp();
    {
        let store = open(&dir, SyncPolicy::Os);
        let q = store.queue("x", 10, false);
        q.try_push(msg("old"), 1, Some(100)).unwrap();
        q.try_push(msg("kept"), 1, Some(10_000)).unwrap();
        q.try_push(msg("forever"), 1, None).unwrap();
    }
    let store = open(&dir, SyncPolicy::Os);
    let q = store.queue("x", 10, false);
    let gone = q.expire(500);
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].msg.body, b"old");
    assert_eq!(q.len(), 2);
    assert_eq!(q.expire(10_000).len(), 1);
    assert_eq!(q.pop(i64::MAX).item.unwrap().msg.body, b"forever");
    drop((q, store));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_write_fjall_would_stall_is_refused_as_busy_until_the_buffer_is_flushed() {
    // A 1 MiB write buffer: fjall would put the writer's thread to sleep once it is full.
    let dir = temp();
    let limit = 8 << 20;
    let store = open_capped(&dir, SyncPolicy::Os, limit, Overflow::RejectNew);
    let q = store.queue("w", 1000, false);
    let body = "w".repeat(64 * 1024);
    let mut busy = false;
    for _ in 0..64 {
        match q.try_push(msg(&body), 1, None) {
            Ok(_) => {}
            Err(QueueError::StoreBusy) => {
                busy = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(busy, "the full write buffer was never reported");
    // fjall flushes the buffer in the background; then writes go in again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while q.try_push(msg("after"), 1, None).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the store stayed busy"
        );
        std::thread::yield_now();
    }
    drop((q, store));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_journal_bound_follows_the_cap_and_writes_leave_the_worker_before_it_stalls() {
    const MIB: u64 = 1024 * 1024;
    // fjall stalls a rotation that leaves more sealed journals (32 MiB each to it) than 90 %
    // of the bound holds.
    let stalls_at = |cap| (journal_max(cap) * 9 / 10) / JOURNAL_FILE;
    for cap in [None, Some(4 * MIB), Some(2048 * MIB)] {
        assert!(journals_near(cap) >= 1, "{cap:?}");
        assert!(journals_near(cap) <= stalls_at(cap), "{cap:?}");
    }
    assert_eq!((journals_near(None), stalls_at(None)), (6, 7));
    assert_eq!(journal_max(Some(4 * MIB)), 64 * MIB);
}

#[test]
fn a_write_near_the_journal_bound_leaves_the_async_worker_to_other_tasks() {
    // A write that fjall may stall must not hold the only worker: here the "write" waits
    // for a task spawned just before it on the same worker, which can run only if the
    // worker was handed over.
    let dir = temp();
    let store = open(&dir, SyncPolicy::Commit);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let write_waiting_for_a_task = |store: Arc<DurableStore>, secs: u64| async move {
        let wait = std::time::Duration::from_millis(secs);
        let (tx, rx) = std::sync::mpsc::channel();
        tokio::spawn(async move { tx.send(()) });
        store.off_worker(|| rx.recv_timeout(wait))
    };
    // Far from the bound the write is made in place (the spawned task runs only after it),
    // also with a journal sealed and waiting for its flush: fjall counts each at its
    // preallocated 32 MiB, which must not be taken for a journal near the bound.
    store.queue.insert("k", "v").unwrap();
    assert!(store.queue.rotate_memtable().unwrap());
    assert_eq!(store.keyspace.journal_count(), 2);
    let far = rt.block_on(async {
        tokio::spawn(write_waiting_for_a_task(store.clone(), 300))
            .await
            .unwrap()
    });
    assert!(far.is_err());
    assert_eq!(store.offloaded.load(Ordering::Relaxed), 0);
    // Near it, the worker's other tasks go on while the write waits.
    store.journals_near.store(0, Ordering::Relaxed);
    let near = rt.block_on(async {
        tokio::spawn(write_waiting_for_a_task(store.clone(), 10_000))
            .await
            .unwrap()
    });
    assert_eq!(near, Ok(()));
    assert_eq!(store.offloaded.load(Ordering::Relaxed), 1);
    // Real writes go through the same way, on any runtime.
    let q = store.queue("ep", 10, false);
    rt.block_on(async {
        tokio::spawn(async move { push_when_not_busy(&q, msg("near")) })
            .await
            .unwrap()
    });
    assert!(store.offloaded.load(Ordering::Relaxed) >= 2);
    drop(rt);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_orphaned_shared_record_is_deleted_at_open() {
    let dir = temp();
    {
        let store = open(&dir, SyncPolicy::Os);
        let mut bytes = Vec::new();
        encode_record(&msg("orphan"), &mut bytes).unwrap();
        store.messages.insert(77u64.to_be_bytes(), bytes).unwrap();
    }
    let store = open(&dir, SyncPolicy::Os);
    assert_eq!(store.messages.len().unwrap(), 0);
    assert_eq!(store.usage().0, 0);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_size_limit_holds_with_either_policy() {
    for overflow in [Overflow::RejectNew, Overflow::DropOldest] {
        let dir = temp();
        // Room for about three messages.
        let limit = 3 * 400;
        let store = open_capped(&dir, SyncPolicy::Os, limit, overflow);
        let q = store.queue("cap", 1000, false);
        let mut accepted = Vec::new();
        for i in 0..10 {
            let m = msg(&format!("{i:0>200}"));
            match q.try_push(m.clone(), 1, None) {
                Ok(_) => accepted.push(i),
                Err(e) => {
                    assert_eq!(overflow, Overflow::RejectNew);
                    assert_eq!(e, QueueError::StoreFull);
                }
            }
            assert!(
                store.usage().0 <= limit,
                "{:?} over the limit",
                store.usage()
            );
        }
        match overflow {
            Overflow::RejectNew => {
                // The first ones stay, later ones are refused.
                assert!(accepted.len() >= 2 && accepted.len() < 10, "{accepted:?}");
                assert_eq!(
                    q.pop(0).item.unwrap().msg.body,
                    format!("{:0>200}", 0).as_bytes()
                );
            }
            Overflow::DropOldest => {
                // Everything was accepted; the newest are kept.
                assert_eq!(accepted.len(), 10);
                let kept = q.lengths().values().sum::<usize>();
                assert!((2..10).contains(&kept), "{kept}");
                let mut last = None;
                while let Some(item) = q.pop(0).item {
                    last = Some(item.msg.body.clone());
                }
                assert_eq!(last.unwrap(), format!("{:0>200}", 9).as_bytes());
            }
        }
        drop(q);
        drop(store);
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[tokio::test]
async fn a_torn_last_write_is_discarded_and_everything_before_it_recovers() {
    let dir = temp();
    let bodies: Vec<String> = (0..50).map(|i| format!("torn-{i}")).collect();
    {
        let store = open(&dir, SyncPolicy::Commit);
        let q = store.queue("t", 100, false);
        for b in &bodies {
            q.try_push(msg(b), 1, None).unwrap();
        }
        store.sync().await.unwrap();
    }
    // A write cut short by a crash: half a record of garbage at the end of each journal.
    let mut files = Vec::new();
    files_under(&dir.join("journals"), &mut files);
    assert!(
        !files.is_empty(),
        "the store keeps a journal under journals/"
    );
    for f in &files {
        use std::io::Write;
        let mut h = std::fs::OpenOptions::new().append(true).open(f).unwrap();
        h.write_all(&[0x5a, 0x01, 0xff, 0x00, 0x13, 0x37, 0xde])
            .unwrap();
    }
    let store = open(&dir, SyncPolicy::Commit);
    let q = store.queue("t", 100, false);
    let got: Vec<Vec<u8>> =
        std::iter::from_fn(|| q.pop(0).item.map(|i| i.msg.body.clone())).collect();
    let want: Vec<Vec<u8>> = bodies.iter().map(|b| b.as_bytes().to_vec()).collect();
    assert_eq!(got, want);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn expired_messages_leave_the_store() {
    let dir = temp();
    let store = open(&dir, SyncPolicy::Os);
    let q = store.queue("e", 10, false);
    q.try_push(msg("long"), 1, Some(10_000)).unwrap();
    q.try_push(msg("short"), 1, Some(100)).unwrap();
    let gone = q.expire(500);
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].msg.body, b"short");
    assert_eq!(q.lengths().get(&1), Some(&1));
    assert_eq!(entry_count(&store), 1);
    let _ = std::fs::remove_dir_all(dir);
}

/// Waits (bounded) for `cond`.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "still waiting: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Waits (bounded) until the `queue` partition has `n` tables.
fn wait_for_tables(store: &DurableStore, n: usize) {
    wait_until(&format!("{n} tables"), || store.queue.segment_count() == n);
}

#[test]
fn removed_entries_leave_the_files_without_a_size_limit() {
    // Entries written to a table, removed, and the removals written to another: fjall keeps
    // both until a compaction reaches the tree's last level, which its own compactions do not
    // for a small tree. The store compacts in full once enough was removed.
    let dir = temp();
    let store = open(&dir, SyncPolicy::Os);
    let q = store.queue("ep", 10_000, false);
    let body = "x".repeat(4096);
    for _ in 0..300 {
        push_when_not_busy(&q, msg(&body));
    }
    assert!(store.queue.rotate_memtable().unwrap());
    wait_for_tables(&store, 1);
    assert_eq!(drain(&q).len(), 300);
    store.flush_removals();
    assert!(store.queue.rotate_memtable().unwrap());
    wait_for_tables(&store, 2);
    assert!(store.queue.disk_space() > 0);
    store.reclaim();
    // The compaction ran on its own thread: wait (bounded) for it to end. It leaves one table:
    // the queue's name record.
    wait_until("the compaction to leave one table", || {
        !store.compacting.load(Ordering::Acquire) && store.queue.segment_count() == 1
    });
    assert!(store.queue.disk_space() < 16 * 1024);
    let left: Vec<_> = store.queue.iter().map(|kv| kv.unwrap().0).collect();
    assert_eq!(left.len(), 2, "removed entries came back");
    assert_eq!(*left[0], name_key(0));
    assert_eq!(*left[1], FLUSH_MARKER);
    assert!(store.queue.rotate_memtable().unwrap());
    wait_for_tables(&store, 2);
    // Below the threshold nothing is compacted: a few removals leave their tables alone.
    for _ in 0..3 {
        push_when_not_busy(&q, msg("small"));
    }
    assert!(store.queue.rotate_memtable().unwrap());
    wait_for_tables(&store, 3);
    drain(&q);
    store.flush_removals();
    assert!(store.queue.rotate_memtable().unwrap());
    wait_for_tables(&store, 4);
    store.reclaim();
    assert!(!store.compacting.load(Ordering::Acquire));
    assert_eq!(store.queue.segment_count(), 4);
    drop(q);
    drop(store);
    // Nothing removed comes back after a restart.
    let store = open(&dir, SyncPolicy::Os);
    let q = store.queue("ep", 10_000, false);
    assert_eq!(q.lengths().values().sum::<usize>(), 0);
    drop(q);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_partition_compacted_to_nothing_still_lets_its_journals_go() {
    // A journal goes once every partition it fed has a table as new as its writes there. A full
    // compaction leaves the queue only its name record, in a table older than the journals
    // written since; the journals it fed must still be freed once fjall flushes the queue
    // again (its monitor picks a partition with something in its memtable: the store's marker).
    let dir = temp();
    let store = open(&dir, SyncPolicy::Os);
    let q = store.queue("ep", 10_000, false);
    // The first journal also feeds `messages`, which is flushed only later.
    store.messages.insert([0xFE], "other").unwrap();
    let body = "y".repeat(4096);
    for _ in 0..300 {
        push_when_not_busy(&q, msg(&body));
    }
    assert!(store.queue.rotate_memtable().unwrap());
    wait_for_tables(&store, 1);
    drain(&q);
    store.flush_removals();
    assert!(store.queue.rotate_memtable().unwrap());
    wait_for_tables(&store, 2);
    store.reclaim();
    // Left: one table with the queue's name record, older than the journals after the first.
    wait_until("the compaction", || {
        !store.compacting.load(Ordering::Acquire) && store.queue.segment_count() == 1
    });
    assert_eq!(entry_count(&store), 0);
    // `messages` flushed: only the queue, with no table, can hold the journals now.
    assert!(store.messages.rotate_memtable().unwrap());
    wait_until("the flush of messages", || {
        store.messages.segment_count() >= 1
    });
    assert!(store.keyspace.journal_count() > 1);
    // What fjall's monitor does as the journals grow: flush the queue, which has the marker.
    assert!(
        store.queue.rotate_memtable().unwrap(),
        "nothing to flush in the queue: its journals would stay"
    );
    wait_until("the journals to go", || store.keyspace.journal_count() == 1);
    drop(q);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn with_drop_oldest_a_flood_of_large_messages_is_never_held_back_by_its_own_drops() {
    // The drops' deletes wait in memory for a batch; until fjall has them, the dropped entries
    // still take room in its files. Pending deletes of many large messages outgrew the files'
    // bound (the cap and twice the slack), and every later write was refused as busy until
    // something else wrote them: with no consumer, nothing did.
    let dir = temp();
    let limit = 8 << 20;
    let store = open_capped(&dir, SyncPolicy::Os, limit, Overflow::DropOldest);
    let q = store.queue("flood", 100_000, false);
    // Bodies that do not compress: the files hold what they take.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut body = || {
        (0..(64 << 10) / 16)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                format!("{seed:016x}")
            })
            .collect::<String>()
    };
    let n = 5 * limit as usize / (64 << 10);
    for _ in 0..n {
        push_when_not_busy(&q, msg(&body()));
    }
    assert!(store.usage().0 <= limit);
    drop(q);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_partition_written_once_does_not_hold_the_journals() {
    // fjall deletes a journal once every partition it fed has flushed its writes there. A
    // partition written once (a twin, the event log's marker) held every journal sealed after
    // it until fjall's monitor flushed it at half the journals' bound; the store's thread
    // flushes it once two journals are sealed and it has not been written since its last look.
    let dir = temp();
    let store = open(&dir, SyncPolicy::Os);
    let other = store
        .keyspace
        .open_partition("other", fjall::PartitionCreateOptions::default())
        .unwrap();
    other.insert("k", "v").unwrap();
    let q = store.queue("ep", 10_000, false);
    let body = "z".repeat(1024);
    for _ in 0..SEALED_BEFORE_FLUSHING_IDLE {
        for _ in 0..50 {
            push_when_not_busy(&q, msg(&body));
        }
        assert!(store.queue.rotate_memtable().unwrap());
    }
    assert!(store.keyspace.journal_count() > SEALED_BEFORE_FLUSHING_IDLE);
    // The first look finds something in `other`'s memtable, the second finds it unchanged.
    store.reclaim();
    store.reclaim();
    wait_until("the journals to go", || store.keyspace.journal_count() == 1);
    assert!(other.segment_count() >= 1);
    // A partition with nothing in its memtable is left alone.
    store.reclaim();
    assert_eq!(other.segment_count(), 1);
    drop((q, other, store));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_full_compaction_writes_its_marker_only_where_it_lowered_the_newest_table() {
    // The marker lets the journals go after a compaction that left a partition with no table as
    // new as before; written after every compaction, it gave `messages` (empty in most hubs)
    // something to flush each time, and so a hold on the journals.
    let dir = temp();
    let store = open(&dir, SyncPolicy::Os);
    let q = store.queue("ep", 10_000, false);
    for i in 0..20 {
        push_when_not_busy(&q, msg(&format!("m{i}")));
    }
    assert!(store.queue.rotate_memtable().unwrap());
    wait_for_tables(&store, 1);
    assert!(store.compact_in_full(&[&store.queue, &store.messages]));
    wait_until("the compaction", || {
        !store.compacting.load(Ordering::Acquire)
    });
    let has_marker = |p: &fjall::PartitionHandle| p.get(FLUSH_MARKER).unwrap().is_some();
    // The queue kept its newest entry, `messages` had no table: neither needs the marker.
    assert!(!has_marker(&store.queue));
    assert!(!has_marker(&store.messages));
    assert_eq!(q.len(), 20);
    drop((q, store));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn idle_partitions_are_flushed_one_per_look() {
    // Each flush seals the active journal as well, which fjall counts at its full length: a
    // look that flushed every idle partition at once could take the journals to their bound.
    let dir = temp();
    let store = open(&dir, SyncPolicy::Os);
    let parts: Vec<_> = ["one", "two"]
        .iter()
        .map(|n| {
            let p = store
                .keyspace
                .open_partition(n, fjall::PartitionCreateOptions::default())
                .unwrap();
            p.insert("k", "v").unwrap();
            p
        })
        .collect();
    for _ in 0..SEALED_BEFORE_FLUSHING_IDLE {
        store.queue.insert("x", "y").unwrap();
        assert!(store.queue.rotate_memtable().unwrap());
    }
    let flushed = || {
        parts
            .iter()
            .filter(|p| {
                use fjall::AbstractTree;
                p.tree.active_memtable_size() == 0
            })
            .count()
    };
    store.reclaim();
    assert_eq!(flushed(), 0, "the first look only notes the sizes");
    store.reclaim();
    assert_eq!(flushed(), 1);
    store.reclaim();
    assert_eq!(flushed(), 2);
    wait_until("the journals to go", || store.keyspace.journal_count() == 1);
    drop((parts, store));
    let _ = std::fs::remove_dir_all(dir);
}

/// An entry as a store written before queues were numbered keyed it: endpoint id, `0x00`,
/// priority, sequence.
fn unnumbered_key(endpoint: &str, priority: u32, seq: u64) -> Vec<u8> {
    let mut k = endpoint.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&priority.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn inline_value(m: &Message) -> Vec<u8> {
    let mut v = entry_head(INLINE, m.id, None).to_vec();
    encode_record(m, &mut v).unwrap();
    v
}

/// Writes straight into the store's `queue` partition under `dir` (as an older hub, or a crash
/// part way, would have left it), then makes it durable.
fn write_raw(dir: &Path, fill: impl FnOnce(&fjall::Keyspace, &fjall::PartitionHandle)) {
    let ks = open_keyspace(dir, None).unwrap();
    let queue = ks
        .open_partition("queue", fjall::PartitionCreateOptions::default())
        .unwrap();
    fill(&ks, &queue);
    ks.persist(fjall::PersistMode::SyncAll).unwrap();
}

#[test]
fn entries_keyed_by_endpoint_id_are_moved_to_numbered_keys_at_open() {
    let dir = temp();
    write_raw(&dir, |ks, queue| {
        let messages = ks
            .open_partition("messages", fjall::PartitionCreateOptions::default())
            .unwrap();
        // Queue "/modules/a/inputs/in1": three inline entries, two priorities; queue "$upstream"
        // and "/modules/a/inputs/in1" share one message through pointers.
        for (p, s, body) in [(0, 1, "a1"), (0, 2, "a2"), (1, 3, "a3")] {
            let m = msg(body);
            queue
                .insert(
                    unnumbered_key("/modules/a/inputs/in1", p, s),
                    inline_value(&m),
                )
                .unwrap();
        }
        let shared = msg("shared");
        let mut record = Vec::new();
        encode_record(&shared, &mut record).unwrap();
        messages.insert(shared.id.to_be_bytes(), record).unwrap();
        for (ep, s) in [("/modules/a/inputs/in1", 4), ("$upstream", 1)] {
            queue
                .insert(
                    unnumbered_key(ep, 0, s),
                    entry_head(POINTER, shared.id, None),
                )
                .unwrap();
        }
    });
    let store = open(&dir, SyncPolicy::Os);
    // Nothing is left under an old key; each queue has a name record.
    let keys: Vec<_> = store.queue.iter().map(|kv| kv.unwrap().0).collect();
    assert_eq!(keys.len(), 5 + 2, "{keys:?}");
    assert!(keys.iter().all(|k| k[0] == ENTRY_KEY || k[0] == NAME_KEY));
    assert!(store.usage().0 > 0);
    let q = store.queue("/modules/a/inputs/in1", 100, false);
    let up = store.queue("$upstream", 100, false);
    // A queue made after the move gets a number of its own.
    let other = store.queue("/modules/b/inputs/in1", 100, false);
    assert_eq!(
        [q.index, up.index, other.index]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3
    );
    // Priority first, then order of arrival, as before the move.
    assert_eq!(
        drain(&q),
        vec![
            b"a1".to_vec(),
            b"a2".to_vec(),
            b"shared".to_vec(),
            b"a3".to_vec()
        ]
    );
    assert_eq!(drain(&up), vec![b"shared".to_vec()]);
    store.flush_removals();
    assert_eq!(entry_count(&store), 0);
    assert_eq!(store.messages.len().unwrap(), 0);
    assert_eq!(store.usage().0, 0);
    drop((q, up, other));
    drop(store);
}

#[test]
fn a_move_to_numbered_keys_cut_short_goes_on_at_the_next_open() {
    // A crash between two of the move's batches leaves some entries moved and some not: the
    // next open moves the rest, and the queue keeps every message once, in order.
    let dir = temp();
    let ep = "/modules/a/inputs/in1";
    write_raw(&dir, |_, queue| {
        queue.insert(name_key(0), ep).unwrap();
        queue
            .insert(queue_key(0, 0, 1), inline_value(&msg("m1")))
            .unwrap();
        queue
            .insert(queue_key(0, 0, 2), inline_value(&msg("m2")))
            .unwrap();
        for (s, body) in [(3, "m3"), (4, "m4")] {
            queue
                .insert(unnumbered_key(ep, 0, s), inline_value(&msg(body)))
                .unwrap();
        }
        queue
            .insert(unnumbered_key("$upstream", 0, 1), inline_value(&msg("u1")))
            .unwrap();
    });
    let store = open(&dir, SyncPolicy::Os);
    assert_eq!(entry_count(&store), 5);
    let q = store.queue(ep, 100, false);
    assert_eq!(q.index, 0);
    let up = store.queue("$upstream", 100, false);
    assert_eq!(up.index, 1);
    assert_eq!(
        drain(&q),
        vec![
            b"m1".to_vec(),
            b"m2".to_vec(),
            b"m3".to_vec(),
            b"m4".to_vec()
        ]
    );
    assert_eq!(drain(&up), vec![b"u1".to_vec()]);
    drop((q, up));
    drop(store);
}

#[test]
fn queue_numbers_come_from_the_store_not_from_the_order_queues_are_made() {
    let dir = temp();
    {
        let store = open(&dir, SyncPolicy::Os);
        let a = store.queue("a", 100, false);
        let b = store.queue("b", 100, false);
        assert_eq!((a.index, b.index), (0, 1));
        // The same endpoint's queue made again keeps its number.
        assert_eq!(store.queue("a", 100, false).index, 0);
        b.try_push(msg("for b"), 0, None).unwrap();
        a.try_push(msg("for a"), 0, None).unwrap();
        drop((a, b));
    }
    let store = open(&dir, SyncPolicy::Os);
    let mut recovered = store.recovered_endpoints();
    recovered.sort();
    assert_eq!(recovered, ["a", "b"]);
    // Made in the other order this time.
    let b = store.queue("b", 100, false);
    let a = store.queue("a", 100, false);
    let c = store.queue("c", 100, false);
    assert_eq!((a.index, b.index, c.index), (0, 1, 2));
    assert_eq!(drain(&b), vec![b"for b".to_vec()]);
    assert_eq!(drain(&a), vec![b"for a".to_vec()]);
    drop((a, b, c));
    drop(store);
}

#[test]
fn entries_written_by_an_older_hub_after_a_newer_one_go_after_its_entries() {
    // A newer hub numbered the queue; an older one then ran on the store, skipped the numbered
    // entries and queued its own under endpoint-id keys, its sequences from 1 again. Opened by a
    // newer hub once more, the queue has every message once: the numbered ones first.
    let dir = temp();
    let ep = "/modules/a/inputs/in1";
    write_raw(&dir, |_, queue| {
        queue.insert(name_key(0), ep).unwrap();
        for (s, body) in [(1, "new1"), (2, "new2"), (3, "new3")] {
            queue
                .insert(queue_key(0, 0, s), inline_value(&msg(body)))
                .unwrap();
        }
        for (s, body) in [(1, "old1"), (2, "old2")] {
            queue
                .insert(unnumbered_key(ep, 0, s), inline_value(&msg(body)))
                .unwrap();
        }
    });
    let store = open(&dir, SyncPolicy::Os);
    assert_eq!(entry_count(&store), 5);
    let q = store.queue(ep, 100, false);
    assert_eq!(
        drain(&q),
        ["new1", "new2", "new3", "old1", "old2"]
            .map(|b| b.as_bytes().to_vec())
            .to_vec()
    );
    // New messages go after all of them.
    q.try_push(msg("next"), 0, None).unwrap();
    assert_eq!(drain(&q), vec![b"next".to_vec()]);
    drop(q);
    drop(store);
}

#[test]
fn a_move_of_many_entries_goes_batch_by_batch_and_is_not_made_again() {
    // More entries than one batch takes, in two queues, and a key that does not parse: every
    // entry is moved once, the bad key is left where it is, and a second open moves nothing.
    let dir = temp();
    let n = RENUMBER_BATCH as u64 * 2 + 300;
    write_raw(&dir, |_, queue| {
        for s in 1..=n {
            let ep = if s % 3 == 0 {
                "$upstream"
            } else {
                "/modules/a/inputs/in1"
            };
            queue
                .insert(unnumbered_key(ep, 0, s), inline_value(&msg(&s.to_string())))
                .unwrap();
        }
        queue
            .insert(b"/no-separator".to_vec(), b"x".to_vec())
            .unwrap();
    });
    let store = open(&dir, SyncPolicy::Os);
    assert_eq!(entry_count(&store), n as usize);
    drop(store);
    let store = open(&dir, SyncPolicy::Os);
    assert_eq!(entry_count(&store), n as usize);
    let left: Vec<_> = store
        .queue
        .iter()
        .map(|kv| kv.unwrap().0)
        .filter(|k| k[0] != ENTRY_KEY && k[0] != NAME_KEY)
        .collect();
    assert_eq!(left.len(), 1);
    assert_eq!(&*left[0], b"/no-separator");
    let body = |s: u64| s.to_string().into_bytes();
    let q = store.queue("/modules/a/inputs/in1", n as usize, false);
    let up = store.queue("$upstream", n as usize, false);
    assert_eq!(
        drain(&q),
        (1..=n).filter(|s| s % 3 != 0).map(body).collect::<Vec<_>>()
    );
    assert_eq!(
        drain(&up),
        (1..=n).filter(|s| s % 3 == 0).map(body).collect::<Vec<_>>()
    );
    drop((q, up));
    drop(store);
}

#[test]
fn a_name_record_that_could_not_be_written_is_written_before_the_queues_first_entry() {
    let dir = temp();
    {
        let store = open(&dir, SyncPolicy::Os);
        let q = store.queue("/modules/a/inputs/in1", 10, false);
        // As `number` leaves it when the record's write fails.
        store.queue.remove(name_key(q.index)).unwrap();
        locked(&store.numbers)
            .unnamed
            .insert(q.index, Arc::from("/modules/a/inputs/in1"));
        store.unnamed.store(true, Ordering::Release);
        q.try_push(msg("named"), 0, None).unwrap();
        assert!(!store.unnamed.load(Ordering::Acquire));
        assert!(store.queue.get(name_key(q.index)).unwrap().is_some());
        drop(q);
    }
    let store = open(&dir, SyncPolicy::Os);
    let q = store.queue("/modules/a/inputs/in1", 10, false);
    assert_eq!(drain(&q), vec![b"named".to_vec()]);
    drop(q);
    drop(store);
}
