//! The durable message store: endpoint queues that survive a crash, on fjall.
//!
//! # Layout (one fjall keyspace under `dataDir/store`, shared with the twins)
//!
//! * partition `queue`: key = `0x01`, the queue's number (u32 BE), priority (u32 BE), sequence
//!   (u64 BE) → a queue entry: kind (u8), message id (u64 BE), expiry (i64 BE ms since the
//!   epoch, `i64::MAX` = never), and then
//!   * kind 1, *inline*: the message record itself (the rest of the value);
//!   * kind 2, *pointer*: nothing; the record is in `messages`.
//!
//!   A queue's number stands for its endpoint id, which a *name record* holds: key = `0x02`,
//!   the number (u32 BE) → the endpoint id (UTF-8). A new queue's name record is written before
//!   its first entry (the journal keeps their order); numbers are never reused. A 17-byte key
//!   instead of one that starts with the endpoint id (22 bytes and more) makes every write,
//!   delete and comparison in fjall's memtable cheaper (`BENCHMARKS.md`). Entries of a store
//!   written before queues were numbered (keyed by endpoint id, `0x00`, priority, sequence) are
//!   moved to numbered keys at open, a batch at a time (200 000 entries of 300 bytes took 0.8 s
//!   more than an open without them; their old tables stay on disk until compacted).
//! * partition `messages`: key = message id (u64 BE) → the message record, for a message that
//!   several queues hold (*shared*).
//! * a message record: format (u8, `1`), flags (u8: twin change, has module, has output, has
//!   properties, has application properties, has annotations), enqueued time (i64 BE ms), the
//!   sender's device id, then its module id and the output name when flagged (each a u32 BE
//!   length and UTF-8), then the properties, application properties and annotations when flagged
//!   (each a u32 BE length and the section's AMQP encoding), and the body as the rest.
//!
//! A message routed to one endpoint, the usual case, costs one write when it is queued and one
//! delete when it is acknowledged; routing says so (`QueueStore::try_push_sole`), and the store
//! then keeps no record of where its copy is. A message routed to several endpoints is still
//! stored once: the first queue's entry holds it inline; when a second queue takes it, one
//! atomic batch moves the record to `messages` and turns that first entry into a pointer, and
//! later queues write pointers only.
//!
//! # Invariants and recovery
//!
//! * Every stored message has exactly one record: inline in its only queue entry, or in
//!   `messages` with one pointer entry per queue holding it. (A message pushed as going to one
//!   queue alone that another queue then takes after all has an inline record in the first:
//!   more room, the same messages.) A shared record is written in the same batch as the
//!   pointers that first refer to it and deleted with the last of them.
//!   Reference counts of shared records live in memory and are rebuilt at open by counting
//!   pointer entries; a record no pointer refers to any more (its last delete was lost in a
//!   crash) is deleted at open.
//! * "Durable" means: with `sync = "commit"` (the default), [`DurableStore::sync`] has fsynced
//!   the journal after the write; the hub acknowledges a sender only after that (one fsync
//!   covers every write made before it started: group commit; the fsync is made on a handle
//!   of the store's own, see `ActiveJournal`, so writes go on meanwhile; while writes come as a
//!   stream, fsyncs start at least `storage.commitIntervalMs` apart, see
//!   [`DurableStore::set_commit_interval`]). With `sync = "os"`,
//!   [`DurableStore::sync`] hands the journal to the OS without an fsync: the write survives a
//!   crash of the hub but not a power loss. Writes wait in fjall's journal buffer until then
//!   (batches and the store's partitions use manual journal persistence; a twin write, which
//!   fsyncs, writes the buffer out too), so a burst costs one write to the journal file, not one
//!   per message.
//! * Removals (acks, expiries, overflow drops) are not fsynced and are written in batches: they
//!   collect in memory and are committed to fjall when a delivery pump writes its
//!   acknowledgements out, every [`REMOVAL_BATCH`] removals or [`REMOVAL_BATCH_BYTES`] of
//!   entries removed (on the store's own thread), on the housekeeping tick (every second),
//!   before a shared record is written again, and when the store closes. A removal lost in a
//!   crash redelivers a message, never loses one. Queue keys are never reused while a removal
//!   may be pending (sequences only grow while the hub runs, and after a restart continue past
//!   the highest entry on disk), so a late delete never hits a newer entry.
//! * **What a crash brings back.** A removal survives a crash of the hub (kill -9) once it is
//!   written out to the OS: by [`DurableStore::write_removals`] or by the next
//!   [`DurableStore::sync`] of a sender's write, whichever comes first. Each removal has a mark
//!   ([`DurableStore::removal_written`] tells when it is out), and a delivery pump (module inputs,
//!   upstream telemetry) counts every acknowledgement not yet out against its window, with its
//!   transfers in flight, writing them out once a quarter of the window waits, when its link
//!   ends, and the housekeeping tick and shutdown write out the rest. So after a kill -9 at most
//!   `limits.deliveryWindow` messages per delivering link come again: those in flight and those
//!   acknowledged but not yet out, together never more than the window. A power loss may also
//!   undo removals written to the OS but not yet fsynced: with `sync = "commit"` every sender's
//!   group commit fsyncs the removals out before it, so that extra is what was acknowledged
//!   since the last write was stored; with `sync = "os"` it is unbounded, like the writes.
//! * At open every queue entry is loaded into its queue's in-memory index (priority, sequence,
//!   message id, expiry, kind, bytes), so FIFO per (endpoint, priority) and the exact queue
//!   lengths survive a restart; message bodies stay on disk until delivered (messages queued
//!   while the hub runs are also kept in memory, up to 4 MiB of them per queue). fjall's
//!   journal recovery discards a torn last write. Entries that do not parse are skipped and
//!   logged. Pending entries that expire are also in a TTL index by (expiry, priority,
//!   sequence), so the once-a-second expiry costs O(expired), and `dropOldest` finds a queue's
//!   oldest entry in O(priorities).
//! * No async worker waits on the disk for the store beyond the write of the message itself:
//!   full batches of removals and the measures of the files (a directory listing) are done on
//!   the store's thread, expiry and the tick's chores on a blocking thread, and a write that
//!   fjall would stall with a sleep for a full write buffer (the store's thread then seals the
//!   largest memtable) or too many tables waiting in level 0 is refused as busy instead, so the
//!   sender waits asynchronously as it does for a compaction. fjall's 500 ms stall for journals
//!   near `max_journaling_size` (checked when a memtable is sealed; fjall counts every journal
//!   at its preallocated 32 MiB, so the 256 MiB bound means seven journals waiting for their
//!   flush, and the 64 MiB of a store capped below 1 GiB two) cannot be refused (that would
//!   keep the journals from being freed): from one rotation before it, writes are made with the worker's other tasks handed to another thread
//!   (`block_in_place`), so a stall holds only the sender that met it.
//! * `storeLimits.maxSizeBytes` caps the bytes of keys and values held (entries and records),
//!   counted in memory and rebuilt at open; a write that would pass it is refused before it is
//!   made (or makes room by dropping the oldest of its queue with `dropOldest`). The files
//!   are kept in proportion to it: a write buffer of an eighth of it ([`open_keyspace`]), full
//!   compactions past a slack, and writers held back past twice that
//!   ([`DurableStore::reclaim`]).
//! * A journal that cannot be written (a full disk) poisons the keyspace, whether that shows at
//!   a write (which then has fjall write its buffer out at once) or at the next
//!   [`DurableStore::sync`]: every later write fails instead of landing after a torn one, so
//!   senders are refused; what was stored before stays readable and is delivered.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use crate::{
    model::message::Message,
    store::queue::{dec, take_next, Popped, QueueError, QueueStore, Queued},
};

mod error;
pub(crate) mod format;

use error::fj;
pub use error::StoreError;
use format::*;

/// What to do when a new message would take the store past its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Refuse the new message (the sender gets `amqp:resource-limit-exceeded`).
    RejectNew,
    /// Drop the oldest messages of the same queue to make room (counted as `overflow`).
    DropOldest,
}

/// Bytes written between two measures of the store's files against its limit (see
/// [`DurableStore::reclaim`]); a write counts its entry and [`WRITE_OVERHEAD`]. Far below the
/// [`slack`] a limit allows (at least 4 MiB), and below the removed bytes that start a full
/// compaction (see [`REMOVED_BEFORE_COMPACTION`]), so neither is overshot for want of a measure.
/// A measure wakes the store's thread and lists the journals' directory: at a stream of small
/// messages a count of writes (it was one every 32) cost that thread an eighth of the hub's
/// CPU.
const MEASURE_EVERY_BYTES: u64 = 256 * 1024;
/// What one write counts for [`MEASURE_EVERY_BYTES`] beyond its entry (the journal's framing,
/// the tables' index and filters).
const WRITE_OVERHEAD: u64 = 64;

/// Bytes the files in `dir` take on disk: fjall's journals are created at 32 MiB and filled
/// in place, so their length says nothing about what they use.
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// The size of the tables a full compaction writes (fjall's default target for its levels).
const FULL_COMPACTION_TABLE: u64 = 64 * 1024 * 1024;

/// The key of an empty value each partition gets after a full compaction (see
/// [`DurableStore::compact_in_full`]). No entry or name key starts with 0xFF, nor did entry keys
/// before queues were numbered (endpoint ids are UTF-8), and no record key has one byte; the
/// scans at open skip it.
const FLUSH_MARKER: [u8; 1] = [0xFF];

/// Sealed journals from which the store flushes the partitions that hold them back (see
/// [`DurableStore::flush_idle_partitions`]).
const SEALED_BEFORE_FLUSHING_IDLE: usize = 2;

/// Bytes removed since the last full compaction before the next one, at the least (see
/// [`DurableStore::reclaim`]).
const REMOVED_BEFORE_COMPACTION: u64 = 1024 * 1024;

/// What the store's files may hold beyond the messages before a full compaction: a quarter of
/// the limit, at least 4 MiB.
fn slack(limit: u64) -> u64 {
    (limit / 4).max(4 * 1024 * 1024)
}

fn poisoned() -> StoreError {
    StoreError::other("an earlier fsync of the journal failed; the store takes no more writes")
}

/// How writes become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// fsync (group commit) before a sender is acknowledged.
    Commit,
    /// Leave it to the OS: survives a crash of the hub, not a power loss.
    Os,
}

// ---------------------------------------------------------------------------------------------
/// Removals wait in memory until this many are pending, then go to fjall in one batch (on the
/// store's own thread). A delivery pump writes its own out every quarter of its window, on its
/// thread (see [`DurableStore::write_removals_now`]); this bound is for the rest (expiries,
/// overflow drops) and for several pumps at once. At 128 a pump's burst of acknowledgements
/// passed it and woke the store's thread, whose commit then held fjall's journal (and the
/// senders' writes waiting on it) beside the pump's own.
pub const REMOVAL_BATCH: usize = 1024;

/// Pending removals are given to fjall as well once the entries they delete take this many bytes:
/// until fjall has its delete, a removed entry still takes room in the files, and with a size
/// limit writers wait while the files are past it (see [`DurableStore::check_files`]). A batch of
/// [`REMOVAL_BATCH`] large messages dropped to make room could hold more than that bound allows
/// beyond the limit, and then nothing freed it while writers waited.
pub const REMOVAL_BATCH_BYTES: u64 = 1024 * 1024;

/// Removals not yet given to fjall, and the mark of the latest: a delivery pump keeps the mark of
/// each acknowledgement it made and counts it against its window until the mark is written out
/// (see [`DurableStore::removal_written`]).
struct Removals {
    batch: fjall::Batch,
    /// Marks count removals from 1 (0 means "nothing to write").
    last: u64,
    /// Bytes the entries deleted by `batch` take (see [`REMOVAL_BATCH_BYTES`]).
    bytes: u64,
}

/// Work the store hands to a thread of its own, so that no async worker waits for it:
/// committing a full batch of removals (a fjall write, which may stall) and measuring the
/// store's files (a directory listing), which may start a compaction.
#[derive(Default)]
struct Chores {
    flush: AtomicBool,
    measure: AtomicBool,
    rotate: AtomicBool,
    closing: AtomicBool,
    thread: std::sync::OnceLock<std::thread::Thread>,
}

impl Chores {
    /// Asks the thread for `chore`; `false` if there is no thread (the caller does it).
    fn ask(&self, chore: &AtomicBool) -> bool {
        chore.store(true, Ordering::Release);
        match self.thread.get() {
            Some(t) => {
                t.unpark();
                true
            }
            None => false,
        }
    }

    fn run(self: Arc<Self>, store: std::sync::Weak<DurableStore>) {
        loop {
            std::thread::park_timeout(std::time::Duration::from_secs(1));
            if self.closing.load(Ordering::Acquire) {
                return;
            }
            let Some(store) = store.upgrade() else {
                return;
            };
            if self.flush.swap(false, Ordering::AcqRel) {
                store.flush_removals();
            }
            if self.measure.swap(false, Ordering::AcqRel) {
                store.reclaim();
            }
            if self.rotate.swap(false, Ordering::AcqRel) {
                store.rotate_largest();
            }
        }
    }
}

/// fjall stalls a write with `std::thread::sleep` while its level 0 holds this many runs or more
/// (16 µs at 24, doubling up to 512 µs; writes halt at 32): the store refuses it as busy first.
const L0_STALL: usize = 24;

/// The keyspace's write buffer for a store limit of `cap` (see [`open_keyspace`]).
fn write_buffer_bytes(cap: Option<u64>) -> u64 {
    const MIB: u64 = 1024 * 1024;
    cap.map_or(16 * MIB, |cap| (cap / 8).clamp(MIB, 16 * MIB))
}

/// A queue entry's place: its queue's number (see [`DurableStore::numbers`]), priority and
/// sequence. Small, since the store keeps one per message queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    queue: u32,
    priority: u32,
    seq: u64,
}

/// The number each endpoint's queue goes by in the store's keys, as its name records have it.
#[derive(Debug, Default)]
struct Numbers {
    of: HashMap<Arc<str>, u32>,
    next: u32,
    /// Queues whose name record could not be written: written again before their next entry
    /// (see [`DurableStore::name_again`]).
    unnamed: HashMap<u32, Arc<str>>,
}

/// Entries moved to numbered keys per batch at open (see [`DurableStore::number_old_entries`]),
/// and the most bytes of entries a batch holds (a message may take up to 1 MiB).
const RENUMBER_BATCH: usize = 1024;
const RENUMBER_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Where the one stored copy of a message lives.
#[derive(Debug)]
enum Copies {
    /// Inside its only queue entry.
    Inline(Slot),
    /// In `messages`, with `refs` pointer entries.
    Shared {
        refs: u32,
        /// Bytes of the record (key and value).
        record_bytes: u64,
        /// The entry that held the message inline until a second queue took it: a pointer on
        /// disk now, though its queue's index still knows it as written (inline).
        converted: Option<Slot>,
    },
}

/// A queue entry as recovered at open.
#[derive(Debug, Clone)]
struct Recovered {
    priority: u32,
    seq: u64,
    msg_id: u64,
    expires_ms: Option<i64>,
    inline: bool,
    bytes: u64,
}

/// How a queue entry was written.
struct Written {
    inline: bool,
    bytes: u64,
}

/// The shared store: the keyspace, the two partitions, where each message's copy is, the
/// pending removals, group commit.
pub struct DurableStore {
    pub(crate) keyspace: fjall::Keyspace,
    messages: fjall::PartitionHandle,
    queue: fjall::PartitionHandle,
    policy: SyncPolicy,
    /// Messages queued in this run (inline ones until acknowledged) and every shared record.
    /// Messages recovered inline at open, and those that went to one queue alone
    /// ([`QueueStore::try_push_sole`]), are not here: their entry is all there is to know.
    /// Lock order: a queue's lock, then this, then `removals`.
    copies: Mutex<HashMap<u64, Copies>>,
    /// Each queue's number in the keys of its entries (see [`Slot`]); kept in name records.
    numbers: Mutex<Numbers>,
    /// Whether `numbers` has queues whose name record is still to be written.
    unnamed: AtomicBool,
    /// Deletes not yet given to fjall (see the module doc).
    removals: Mutex<Removals>,
    /// Removals up to this mark are in fjall / written to the OS (they survive a crash of the
    /// hub, not a power loss).
    removals_committed: Arc<AtomicU64>,
    removals_out: AtomicU64,
    chores: Arc<Chores>,
    /// The keyspace's write buffer: fjall stalls writes that take it past this.
    write_buffer: u64,

    /// Bytes of entries and records held: what `limit` caps.
    pub(crate) stored: AtomicU64,
    /// `storeLimits.maxSizeBytes`; `u64::MAX` for none. Changes with a config reload.
    limit: AtomicU64,
    pub overflow: Overflow,
    recovered: Mutex<HashMap<String, Vec<Recovered>>>,
    /// Writes made / writes covered by a completed sync.
    pub(crate) written: Arc<AtomicU64>,
    synced: AtomicU64,
    /// Told, after each completed sync, the count of writes it covered (the event log shows
    /// its appends to readers only then).
    pub(crate) on_synced: std::sync::OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
    sync_lock: tokio::sync::Mutex<()>,
    /// `storage.commitIntervalMs` in microseconds (see [`DurableStore::set_commit_interval`]).
    commit_interval_us: AtomicU64,
    /// fsyncs of the journal made by [`DurableStore::sync`].
    pub(crate) fsyncs: AtomicU64,
    /// Messages stored ([`DurableStore::count_message`]), each once whatever the queues it
    /// went to: how the group commit tells a stream from a lone sender.
    messages_in: Arc<AtomicU64>,
    journal: Arc<Mutex<ActiveJournal>>,
    /// Set when an fsync of the journal failed: what it should have covered may be lost, so
    /// every later write is refused (as fjall does when it cannot write its journal).
    pub(crate) poisoned: Arc<std::sync::atomic::AtomicBool>,
    /// A compaction started by [`DurableStore::reclaim`] is running.
    compacting: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes of queue entries (and shared records) removed since the store opened, and that
    /// figure when the last full compaction started (see [`DurableStore::reclaim`]).
    removed: AtomicU64,
    removed_at_compaction: AtomicU64,
    /// Bytes of the store's files when last measured (journals and both partitions).
    files: AtomicU64,
    /// Bytes written so far as [`MEASURE_EVERY_BYTES`] counts them.
    written_bytes: AtomicU64,
    /// fjall's journal directory.
    journals: std::path::PathBuf,
    /// Sealed journals from which a write may stall (see [`DurableStore::off_worker`]):
    /// [`journals_near`], lower in tests.
    journals_near: AtomicU64,
    /// Writes made off the async worker because the journals were near their bound.
    offloaded: AtomicU64,
    /// The size of each partition's active memtable at the last look (see
    /// [`DurableStore::flush_idle_partitions`]).
    memtables_seen: Mutex<HashMap<String, u32>>,
}

/// fjall's bound on the journals (`max_journaling_size`) for a store limited to `cap`: a
/// memtable sealed with the sealed journals past 90 % of it sleeps the writing thread. fjall
/// counts each journal at least at its preallocated length ([`JOURNAL_FILE`]), whatever it
/// holds, so this bounds the journals waiting for their memtables' flush: 256 MiB stalls at
/// the eighth, the 64 MiB of a store capped below 1 GiB at the third (there the journals'
/// blocks count against the cap, and the stall keeps them few).
fn journal_max(cap: Option<u64>) -> u64 {
    const MIB: u64 = 1024 * 1024;
    match cap {
        Some(cap) if cap < 1024 * MIB => 64 * MIB,
        _ => 256 * MIB,
    }
}
/// The length fjall preallocates each journal file to (sparse: only what is written takes
/// blocks), and counts it at.
const JOURNAL_FILE: u64 = 32 * 1024 * 1024;
/// Sealed journals from which a write is made off the async worker
/// ([`DurableStore::off_worker`]): a rotation with this many sealed stalls at
/// `(90 % of the bound) / JOURNAL_FILE`; one before that where the bound allows.
fn journals_near(cap: Option<u64>) -> u64 {
    ((journal_max(cap) * 9 / 10) / JOURNAL_FILE)
        .saturating_sub(1)
        .max(1)
}

/// Clears the store's `compacting` flag when the compaction ends, however it ends.
struct Compacting(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Compacting {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// fjall's active journal, fsynced through a file handle of the store's own.
///
/// fjall's own fsync (`persist(SyncAll)`) holds the journal's lock for the whole fsync, and
/// every write in the meantime (a sender's message, a batch of deletes) waits for it on its
/// thread, which here is one of the runtime's workers. The store instead has fjall write its
/// buffer to the file (`persist(Buffer)`, the lock held only for that) and fsyncs the file
/// itself, while writes go on.
///
/// Why that covers every write made before it: once `persist(Buffer)` returns, those writes
/// are in the file of the journal that was active at that moment, or of an older one. fjall
/// fsyncs a journal before it creates the next (`rotate`), and journal files are numbered in
/// the order they are created; so whichever journal is newest when the handle is chosen,
/// fsyncing it leaves every earlier write on disk. If the directory does not look as expected
/// (no numbered journal, or it cannot be opened), fjall's own fsync is used instead.
struct ActiveJournal {
    /// `journals` under the keyspace's directory.
    dir: std::path::PathBuf,
    open: Option<(u64, std::fs::File)>,
    /// When the last fsync started.
    last_start: Option<std::time::Instant>,
    /// Whether the last fsync covered several messages or a write came in while it ran:
    /// senders are not each waiting for their own acknowledgement, so the next fsync waits
    /// out the interval.
    streaming: bool,
    /// The count of messages ([`DurableStore::count_message`]) the last fsync covered up to.
    messages: u64,
}

impl ActiveJournal {
    /// When writes come as a stream (see `streaming`), waits on the calling (blocking) thread
    /// until the commit interval has passed since the last fsync started; marks the next as
    /// starting now. Writes made meanwhile are covered by the next fsync.
    fn wait_interval(&mut self, interval: std::time::Duration) {
        if let (true, Some(last)) = (self.streaming, self.last_start) {
            let since = last.elapsed();
            if since < interval {
                std::thread::sleep(interval - since);
            }
        }
        self.last_start = Some(std::time::Instant::now());
    }

    /// Makes every write given to fjall so far durable.
    fn sync(&mut self, keyspace: &fjall::Keyspace) -> Result<(), StoreError> {
        keyspace.persist(fjall::PersistMode::Buffer).map_err(fj)?;
        match self.newest() {
            Some(file) => file.sync_data().map_err(|e| StoreError::Fjall {
                kind: Some(e.kind()),
                message: format!("fsync of the journal failed: {e}"),
            }),
            None => keyspace.persist(fjall::PersistMode::SyncAll).map_err(fj),
        }
    }

    /// A handle on the newest journal file.
    ///
    /// The directory is listed at every sync (it holds a few files): between two syncs fjall may
    /// have started several journals and deleted the older ones, the one held open included.
    fn newest(&mut self) -> Option<&std::fs::File> {
        let id = std::fs::read_dir(&self.dir)
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()?;
        if self.open.as_ref().map(|(open, _)| *open) != Some(id) {
            self.open = std::fs::File::open(self.dir.join(id.to_string()))
                .ok()
                .map(|f| (id, f));
        }
        self.open.as_ref().map(|(_, f)| f)
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked mid-update of plain maps and counters;
    // the data stays usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DurableStore {
    /// Opens the store in `keyspace` (opened by [`open_keyspace`] in `dir`) and loads the index
    /// of every queue.
    pub fn open(
        dir: &Path,
        keyspace: fjall::Keyspace,
        policy: SyncPolicy,
        limit: Option<u64>,
        overflow: Overflow,
    ) -> Result<Arc<Self>, StoreError> {
        // Single writes, like batches, stay in the journal buffer until `sync`.
        let options = || fjall::PartitionCreateOptions::default().manual_journal_persist(true);
        let messages = keyspace.open_partition("messages", options()).map_err(fj)?;
        let queue = keyspace.open_partition("queue", options()).map_err(fj)?;
        let mut copies: HashMap<u64, Copies> = HashMap::new();
        let mut stored = 0u64;
        let mut max_id = 0;
        let mut malformed = 0usize;
        let mut recovered: HashMap<String, Vec<Recovered>> = HashMap::new();
        let mut numbers = Numbers::default();
        for kv in queue.prefix([NAME_KEY]) {
            let (k, v) = kv.map_err(fj)?;
            let (Some(n), Ok(name)) = (split_name_key(&k), std::str::from_utf8(&v)) else {
                malformed += 1;
                continue;
            };
            numbers.of.insert(Arc::from(name), n);
            numbers.next = numbers.next.max(n.saturating_add(1));
        }
        Self::number_old_entries(&keyspace, &queue, &mut numbers)?;
        let names: HashMap<u32, Arc<str>> = numbers
            .of
            .iter()
            .map(|(name, n)| (*n, name.clone()))
            .collect();
        for kv in queue.prefix([ENTRY_KEY]) {
            let (k, v) = kv.map_err(fj)?;
            let (Some((number, priority, seq)), Some(e)) = (split_queue_key(&k), parse_entry(&v))
            else {
                malformed += 1;
                continue;
            };
            let Some(endpoint) = names.get(&number) else {
                malformed += 1;
                continue;
            };
            let bytes = (k.len() + v.len()) as u64;
            if e.kind == POINTER {
                match copies.entry(e.msg_id).or_insert(Copies::Shared {
                    refs: 0,
                    record_bytes: 0,
                    converted: None,
                }) {
                    Copies::Shared { refs, .. } => *refs += 1,
                    Copies::Inline(_) => {}
                }
            }
            stored += bytes;
            max_id = max_id.max(e.msg_id);
            recovered
                .entry(endpoint.to_string())
                .or_default()
                .push(Recovered {
                    priority,
                    seq,
                    msg_id: e.msg_id,
                    expires_ms: e.expires_ms,
                    inline: e.kind == INLINE,
                    bytes,
                });
        }
        if malformed > 0 {
            tracing::error!(malformed, "skipping malformed queue entries in the store");
        }
        // Shared records no pointer refers to any more (their last delete was lost).
        let mut orphans = Vec::new();
        for kv in messages.iter() {
            let (k, v) = kv.map_err(fj)?;
            let Ok(id) = <[u8; 8]>::try_from(&k[..]).map(u64::from_be_bytes) else {
                continue;
            };
            max_id = max_id.max(id);
            match copies.get_mut(&id) {
                Some(Copies::Shared { record_bytes, .. }) => {
                    *record_bytes = (k.len() + v.len()) as u64;
                    stored += *record_bytes;
                }
                _ => orphans.push(id),
            }
        }
        if !orphans.is_empty() {
            let mut batch = keyspace.batch();
            for id in orphans {
                batch.remove(&messages, id.to_be_bytes());
            }
            batch.commit().map_err(fj)?;
        }
        crate::model::message::seed_ids(max_id + 1);
        let removals = Removals {
            batch: fjall::Batch::with_capacity(keyspace.clone(), REMOVAL_BATCH + 1),
            last: 0,
            bytes: 0,
        };
        let store = Arc::new(Self {
            keyspace,
            messages,
            queue,
            policy,
            copies: Mutex::new(copies),
            numbers: Mutex::new(numbers),
            unnamed: AtomicBool::new(false),
            removals: Mutex::new(removals),
            removals_committed: Arc::new(AtomicU64::new(0)),
            removals_out: AtomicU64::new(0),
            chores: Arc::default(),
            write_buffer: write_buffer_bytes(limit),
            stored: AtomicU64::new(stored),
            limit: AtomicU64::new(limit.unwrap_or(u64::MAX)),
            overflow,
            recovered: Mutex::new(recovered),
            written: Arc::new(AtomicU64::new(0)),
            synced: AtomicU64::new(0),
            on_synced: std::sync::OnceLock::new(),
            sync_lock: tokio::sync::Mutex::new(()),
            commit_interval_us: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            messages_in: Arc::new(AtomicU64::new(0)),
            journal: Arc::new(Mutex::new(ActiveJournal {
                last_start: None,
                streaming: false,
                messages: 0,
                dir: dir.join("journals"),
                open: None,
            })),
            poisoned: Arc::default(),
            compacting: Arc::default(),
            removed: AtomicU64::new(0),
            removed_at_compaction: AtomicU64::new(0),
            files: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            journals: dir.join("journals"),
            journals_near: AtomicU64::new(journals_near(limit)),
            offloaded: AtomicU64::new(0),
            memtables_seen: Mutex::default(),
        });
        let (chores, weak) = (store.chores.clone(), Arc::downgrade(&store));
        match std::thread::Builder::new()
            .name("store-chores".into())
            .spawn(move || chores.run(weak))
        {
            Ok(t) => {
                let _ = store.chores.thread.set(t.thread().clone());
            }
            // Without the thread its chores are done inline.
            Err(e) => tracing::warn!(error = %e, "starting the store's thread failed"),
        }
        Ok(store)
    }

    /// Endpoint ids that have messages on disk (their queues must exist even without a route).
    pub fn recovered_endpoints(&self) -> Vec<String> {
        locked(&self.recovered).keys().cloned().collect()
    }

    /// The queue for `endpoint`, seeded with what the store holds for it.
    pub fn queue(
        self: &Arc<Self>,
        endpoint: &str,
        capacity: usize,
        live_first: bool,
    ) -> DurableQueue {
        let entries = locked(&self.recovered).remove(endpoint).unwrap_or_default();
        let mut inner = DqInner {
            live_first,
            ..Default::default()
        };
        for e in entries {
            inner.next_seq = inner.next_seq.max(e.seq);
            *inner.per_priority.entry(e.priority).or_default() += 1;
            inner.insert_pending(
                e.priority,
                e.seq,
                Entry {
                    msg_id: e.msg_id,
                    expires_ms: e.expires_ms,
                    delivery_count: 0,
                    inline: e.inline,
                    sole: false,
                    bytes: e.bytes,
                    cached: None,
                },
            );
        }
        let endpoint: Arc<str> = Arc::from(endpoint);
        let index = self.number(&endpoint);
        DurableQueue {
            store: self.clone(),
            endpoint,
            index,
            capacity,
            inner: Mutex::new(inner),
        }
    }

    /// Makes every write made so far durable (one journal write, and with `commit` one fsync,
    /// for all writers waiting together).
    pub async fn sync(&self) -> Result<(), StoreError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(poisoned());
        }
        let target = self.written.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let _leader = self.sync_lock.lock().await;
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        // Checked again under the lock: an fsync that failed while this caller waited may have
        // lost writes, and the next fsync of the same file would not report it again.
        if self.poisoned.load(Ordering::Acquire) {
            return Err(poisoned());
        }
        // What a commit covers is read before fjall's buffer is written out: every write
        // counted by then is in it.
        let (covered, removals) = match self.policy {
            // One write of the journal buffer to the OS; no disk wait.
            SyncPolicy::Os => {
                let covered = self.written.load(Ordering::Acquire);
                let removals = self.removals_committed.load(Ordering::Acquire);
                self.keyspace
                    .persist(fjall::PersistMode::Buffer)
                    .map_err(fj)?;
                (covered, removals)
            }
            SyncPolicy::Commit => {
                let ks = self.keyspace.clone();
                let journal = self.journal.clone();
                let poisoned = self.poisoned.clone();
                let (written, committed, messages_in) = (
                    self.written.clone(),
                    self.removals_committed.clone(),
                    self.messages_in.clone(),
                );
                let interval = std::time::Duration::from_micros(
                    self.commit_interval_us.load(Ordering::Relaxed),
                );
                let synced = tokio::task::spawn_blocking(move || {
                    let mut journal = locked(&journal);
                    if poisoned.load(Ordering::Acquire) {
                        return Err(self::poisoned());
                    }
                    // Past the wait, so that the writes made during it are covered too.
                    journal.wait_interval(interval);
                    let covered = written.load(Ordering::Acquire);
                    let removals = committed.load(Ordering::Acquire);
                    let messages = messages_in.load(Ordering::Acquire);
                    journal.sync(&ks).inspect_err(|_| {
                        poisoned.store(true, Ordering::Release);
                    })?;
                    // A lone sender that waits for its acknowledgement before it sends again
                    // has one message per fsync (however many queues it went to) and writes
                    // nothing during one: it is never held back.
                    journal.streaming = messages.saturating_sub(journal.messages) > 1
                        || written.load(Ordering::Acquire) > covered;
                    journal.messages = messages;
                    Ok((covered, removals))
                })
                .await
                .map_err(fj)??;
                self.fsyncs.fetch_add(1, Ordering::Relaxed);
                synced
            }
        };
        self.synced.fetch_max(covered, Ordering::AcqRel);
        self.removals_out.fetch_max(removals, Ordering::AcqRel);
        if let Some(f) = self.on_synced.get() {
            f(covered);
        }
        Ok(())
    }

    /// Compacts both partitions in full once the entries removed since the last full
    /// compaction come to half of what is stored (at least [`REMOVED_BEFORE_COMPACTION`]) and
    /// they have more than one table. A removal leaves a delete in fjall, which drops it only when
    /// a compaction writes into the tree's last level; below that, fjall's compactions of level
    /// 0 merge the new tables with every delete gathered there, again and again, until level 0
    /// reaches its size target (64 MiB, millions of deletes): a steady stream of messages made
    /// each merge longer (0.07 s after 130 000 messages, 0.56 s after 1 000 000) and the hub's
    /// CPU per message grew with the time it ran. A full compaction writes into the last level:
    /// the deletes go, with the entries they hide. It rewrites what is stored besides, so it waits
    /// until the removed part is half of that; its cost stays within a few times the bytes
    /// removed.
    ///
    /// With a size limit, also keeps what the store's files hold beyond the messages themselves
    /// (entries deleted or replaced but not yet compacted away, journals) under `slack`: past
    /// that, both partitions are compacted in full. fjall's own compactions leave deleted
    /// entries in its upper levels for as long as those stay under their size targets, which
    /// are fixed and may be far larger than a small limit; under a flood with `dropOldest` the
    /// files would grow to several times the limit.
    ///
    /// Full compactions run on a thread of their own, one at a time. Called every second and
    /// every [`MEASURE_EVERY_BYTES`] written; returns the files' bytes.
    pub fn reclaim(&self) -> u64 {
        self.flush_idle_partitions();
        let journals = allocated(&self.journals);
        let queue = self.queue.disk_space();
        let files = queue + self.messages.disk_space() + journals;
        self.files.store(files, Ordering::Relaxed);
        let stored = self.stored.load(Ordering::Relaxed);
        let removed = self.removed.load(Ordering::Relaxed);
        let since = removed.saturating_sub(self.removed_at_compaction.load(Ordering::Relaxed));
        if self.queue.segment_count() + self.messages.segment_count() >= 2
            && since >= (stored / 2).max(REMOVED_BEFORE_COMPACTION)
            && self.compact_in_full(&[&self.queue, &self.messages])
        {
            self.removed_at_compaction.store(removed, Ordering::Relaxed);
            return files;
        }
        let Some(limit) = self.limit() else {
            return files;
        };
        if files > stored + slack(limit) && self.compact_in_full(&[&self.queue, &self.messages]) {
            self.removed_at_compaction.store(removed, Ordering::Relaxed);
        }
        files
    }

    /// Flushes the memtable of an idle partition (something in its memtable, nothing written
    /// since the last look) once [`SEALED_BEFORE_FLUSHING_IDLE`] journals are sealed (or
    /// [`journals_near`], when lower: a store capped below 1 GiB). fjall deletes a journal only
    /// once every partition it fed has flushed what it wrote there: a partition written now and
    /// then (a twin, the event log, the store's flush marker) holds every journal sealed after
    /// its write. fjall's monitor flushes such a partition only past half the journals' bound,
    /// one per round, and by then writes are near the point from which they leave the async
    /// worker (see [`DurableStore::off_worker`]): in a steady stream of messages that took a
    /// fifth more CPU per message. A busy partition grows between two looks and is left to
    /// fjall. One partition per look, the one holding the oldest journal: each flush seals the
    /// active journal too, and fjall counts every journal at its full length.
    fn flush_idle_partitions(&self) {
        use fjall::AbstractTree;
        let mut seen = locked(&self.memtables_seen);
        let from =
            (SEALED_BEFORE_FLUSHING_IDLE as u64).min(self.journals_near.load(Ordering::Relaxed));
        if (self.keyspace.journal_count().saturating_sub(1) as u64) < from {
            seen.clear();
            return;
        }
        let mut oldest: Option<fjall::PartitionHandle> = None;
        for name in self.keyspace.list_partitions() {
            // Every partition of the keyspace is open (none is ever deleted): this only looks
            // it up.
            let Ok(part) = self
                .keyspace
                .open_partition(&name, fjall::PartitionCreateOptions::default())
            else {
                continue;
            };
            let size = part.tree.active_memtable_size();
            let before = seen.insert(name.to_string(), size);
            let idle = size > 0 && before == Some(size);
            if idle
                && oldest.as_ref().is_none_or(|o| {
                    part.tree.get_highest_persisted_seqno() < o.tree.get_highest_persisted_seqno()
                })
            {
                oldest = Some(part);
            }
        }
        if let Some(part) = oldest {
            seen.remove(&*part.name);
            if let Err(e) = part.rotate_memtable() {
                tracing::warn!(error = %e, partition = %part.name, "sealing a memtable of the store failed");
            }
        }
    }

    /// Compacts `parts` in full on a thread of its own, unless a compaction started here is
    /// still running; tells whether it started one.
    fn compact_in_full(&self, parts: &[&fjall::PartitionHandle]) -> bool {
        if self.compacting.swap(true, Ordering::AcqRel) {
            return false;
        }
        let parts: Vec<fjall::PartitionHandle> = parts.iter().map(|p| (*p).clone()).collect();
        let running = Compacting(self.compacting.clone());
        let spawned = std::thread::Builder::new()
            .name("store-compaction".into())
            .spawn(move || {
                use fjall::AbstractTree;
                let _running = running;
                for part in parts {
                    // Every version but the newest of a key is garbage here (the store keeps
                    // no snapshot that reads an older one), so the threshold under which
                    // versions may go is "all of them". fjall's own `major_compact` takes its
                    // snapshot tracker's, which lags behind the writes: the compaction then drops
                    // the deletes, as it writes into the last level, but keeps the entries they
                    // hid when those are newer than it, and removed messages came back.
                    let before = part.tree.get_highest_persisted_seqno();
                    if before.is_none() {
                        // No table: nothing to compact.
                        continue;
                    }
                    if let Err(e) = part.tree.major_compact(FULL_COMPACTION_TABLE, u64::MAX) {
                        tracing::warn!(error = %e, "compacting the store failed");
                    }
                    // fjall deletes a journal once every partition it fed has a table at least
                    // as new as its writes there; a compaction that left this partition no
                    // table, or none as new as before, would hold the journals back until the
                    // partition is written and flushed again, and fjall flushes only partitions
                    // with something in their memtable: an idle queue would keep them for good
                    // (and then stall every write at the journals' bound). A marker written
                    // now goes out with the partition's next flush, which fjall's monitor
                    // makes as the journals grow. Only then: a marker written after every
                    // compaction kept a partition with nothing else to flush holding the
                    // journals, until fjall's monitor flushed it at half their bound.
                    if part.tree.get_highest_persisted_seqno() < before {
                        if let Err(e) = part.insert(FLUSH_MARKER, []) {
                            tracing::warn!(error = %e, "writing the store's flush marker failed");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            // The closure, and with it the guard, is dropped: the flag is clear again.
            tracing::warn!(error = %e, "compacting the store failed");
            return false;
        }
        true
    }

    /// Refuses a write while the store's files are past the limit and twice [`slack`]: writers
    /// then wait for the compaction to catch up (back-pressure), so a flood cannot outrun it.
    /// The files are measured on the store's thread (every [`MEASURE_EVERY_BYTES`] written,
    /// and at every refusal), never here: a measure lists a directory.
    ///
    /// Refuses it as well, as busy, when fjall would stall it with a sleep on this thread (see
    /// [`L0_STALL`], and a write buffer that the write would take past its size): the sender
    /// waits asynchronously instead, as for a compaction. fjall's stall for journals near their
    /// bound (checked when a memtable is sealed) is not refused here: refusing writes then
    /// would keep the memtables from filling, and so the journals from being freed (see
    /// [`DurableStore::off_worker`]).
    pub(crate) fn check_files(
        &self,
        bytes: u64,
        partition: &fjall::PartitionHandle,
    ) -> Result<(), StoreError> {
        use fjall::AbstractTree;
        let measure = || {
            if !self.chores.ask(&self.chores.measure) {
                self.reclaim();
            }
        };
        let counted = bytes + WRITE_OVERHEAD;
        let before = self.written_bytes.fetch_add(counted, Ordering::Relaxed);
        if before / MEASURE_EVERY_BYTES != (before + counted) / MEASURE_EVERY_BYTES {
            measure();
        }
        let buffered = self.keyspace.write_buffer_size();
        // A write larger than the whole buffer still goes in once the buffer is empty.
        let stall = if buffered > 0 && buffered + bytes > self.write_buffer {
            // fjall's own monitor acts only once the buffer is past its size, which a refused
            // write never makes it: the store's thread seals the largest memtable, whose flush
            // makes room.
            if !self.chores.ask(&self.chores.rotate) {
                self.rotate_largest();
            }
            Some("its write buffer is full")
        } else if partition.tree.l0_run_count() >= L0_STALL {
            Some("too many tables wait for compaction")
        } else {
            None
        };
        if let Some(why) = stall {
            measure();
            return Err(StoreError::Stalled(why));
        }
        let Some(limit) = self.limit() else {
            return Ok(());
        };
        let bound = limit + 2 * slack(limit);
        let files = self.files.load(Ordering::Relaxed);
        if files > bound {
            measure();
            return Err(StoreError::Compacting { files, bound });
        }
        Ok(())
    }

    /// Seals the larger of the two partitions' active memtables, so that fjall flushes it and
    /// its write buffer has room again. Blocking.
    fn rotate_largest(&self) {
        use fjall::AbstractTree;
        let part =
            if self.messages.tree.active_memtable_size() > self.queue.tree.active_memtable_size() {
                &self.messages
            } else {
                &self.queue
            };
        if let Err(e) = part.rotate_memtable() {
            tracing::warn!(error = %e, "sealing a memtable of the store failed");
        }
    }

    /// Bytes the store (and the twins beside it) takes on disk. fjall counts its active
    /// journal at its preallocated length; the blocks it uses are counted instead.
    pub fn disk_bytes(&self) -> u64 {
        // Read at different moments: a rotation in between may make the second the larger.
        self.keyspace
            .disk_space()
            .saturating_sub(self.keyspace.journal_disk_space())
            + allocated(&self.journals)
    }

    /// `storeLimits.maxSizeBytes`, if any.
    fn limit(&self) -> Option<u64> {
        Some(self.limit.load(Ordering::Relaxed)).filter(|l| *l != u64::MAX)
    }

    /// Changes the limit (a config reload). Messages already held stay, even past a lower
    /// limit; new ones are refused (or make room) until the store is back under it. The write
    /// buffer sized from the limit at open changes at the next start.
    pub fn set_limit(&self, limit: Option<u64>) {
        self.limit
            .store(limit.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Sets `storage.commitIntervalMs`: with `sync = "commit"`, while writes come as a stream
    /// (the last fsync covered several messages, or a write came in while it ran), an fsync
    /// starts at least this long after the one before it started, and covers every write made
    /// until it starts.
    /// At a steady stream of messages a few hundred microseconds apart each would otherwise
    /// have its own fsync; waiting lets one cover several, for a longer wait for the senders'
    /// acknowledgements (at most the interval). A lone sender that waits for each
    /// acknowledgement has one message per fsync, however many queues it goes to, and writes
    /// nothing during one, so it is never held back. One-at-a-time writers such as a C2D
    /// message from the service wait up to the interval while a stream runs beside them.
    /// Zero: every commit starts at once.
    pub fn set_commit_interval(&self, interval: std::time::Duration) {
        let us = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
        self.commit_interval_us.store(us, Ordering::Relaxed);
    }

    /// Counts a message stored, once after its writes to every queue it goes to (see
    /// [`DurableStore::set_commit_interval`]).
    pub fn count_message(&self) {
        self.messages_in.fetch_add(1, Ordering::AcqRel);
    }

    /// Bytes held (entries and records) and the limit, if any.
    pub fn usage(&self) -> (u64, Option<u64>) {
        (self.stored.load(Ordering::Relaxed), self.limit())
    }

    /// Counts `bytes` as held, unless that would pass the limit.
    pub(crate) fn reserve(&self, bytes: u64) -> Result<(), StoreError> {
        let Some(limit) = self.limit() else {
            self.stored.fetch_add(bytes, Ordering::Relaxed);
            return Ok(());
        };
        self.stored
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                (s + bytes <= limit).then_some(s + bytes)
            })
            .map(|_| ())
            .map_err(|stored| StoreError::Full { stored, limit })
    }

    pub(crate) fn unreserve(&self, bytes: u64) {
        let _ = self
            .stored
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_sub(bytes))
            });
    }

    /// A failed write may leave part of an entry in the journal buffer: have fjall write the
    /// buffer out now, so that a journal which cannot be written poisons the keyspace (every
    /// later write fails) rather than taking later entries after a torn one.
    pub(crate) fn failed(&self, e: fjall::Error) -> StoreError {
        let _ = self.keyspace.persist(fjall::PersistMode::Buffer);
        fj(e)
    }

    /// Writes the queue entry of message `msg_id` at `at`. `entry` holds its key followed by its
    /// value as an inline entry; whether it is written that way depends on whether another
    /// queue holds the message already.
    fn put(
        &self,
        at: Slot,
        expires_ms: Option<i64>,
        msg_id: u64,
        entry: &[u8],
        sole: bool,
    ) -> Result<Written, StoreError> {
        let (key, value) = entry.split_at(KEY_LEN.min(entry.len()));
        if self.poisoned.load(Ordering::Acquire) {
            return Err(poisoned());
        }
        if self.unnamed.load(Ordering::Acquire) {
            self.name_again(at.queue)?;
        }
        self.check_files(entry.len() as u64, &self.queue)?;
        if sole {
            return self.off_worker(|| self.write_sole(key, value));
        }
        self.off_worker(|| self.write_entry(at, expires_ms, msg_id, key, value))
    }

    /// [`DurableStore::put`] of the entry of a message that goes to no other queue: inline, and
    /// not recorded in `copies` (no further queue will look for it there).
    fn write_sole(&self, key: &[u8], value: &[u8]) -> Result<Written, StoreError> {
        let bytes = (key.len() + value.len()) as u64;
        self.reserve(bytes)?;
        if let Err(e) = self.queue.insert(key, value) {
            self.unreserve(bytes);
            return Err(self.failed(e));
        }
        self.written.fetch_add(1, Ordering::AcqRel);
        Ok(Written {
            inline: true,
            bytes,
        })
    }

    /// [`DurableStore::put`] once the write is allowed.
    fn write_entry(
        &self,
        at: Slot,
        expires_ms: Option<i64>,
        msg_id: u64,
        key: &[u8],
        value: &[u8],
    ) -> Result<Written, StoreError> {
        let pointer_bytes = (KEY_LEN + ENTRY_HEAD) as u64;
        let entry_len = (key.len() + value.len()) as u64;
        let mut copies = locked(&self.copies);
        let written = match copies.get_mut(&msg_id) {
            None => {
                // The first (and usually only) queue: the record goes inline.
                let bytes = entry_len;
                self.reserve(bytes)?;
                copies.insert(msg_id, Copies::Inline(at));
                drop(copies);
                if let Err(e) = self.queue.insert(key, value) {
                    locked(&self.copies).remove(&msg_id);
                    self.unreserve(bytes);
                    return Err(self.failed(e));
                }
                Written {
                    inline: true,
                    bytes,
                }
            }
            Some(copy) => {
                // A further queue: the record is (or becomes) shared. Written under the lock,
                // so an acknowledgement of the entry being converted cannot come in between.
                let mut batch = self.keyspace.batch();
                let (added, converting) = match copy {
                    Copies::Inline(home) => {
                        let home = *home;
                        let home_key = queue_key(home.queue, home.priority, home.seq);
                        let old = self.queue.get(&home_key).map_err(fj)?.ok_or_else(|| {
                            StoreError::Corrupt(msg_id, "queue entry missing".into())
                        })?;
                        let expires = parse_entry(&old)
                            .ok_or_else(|| {
                                StoreError::Corrupt(msg_id, "malformed queue entry".into())
                            })?
                            .expires_ms;
                        let record = value.get(ENTRY_HEAD..).unwrap_or_default();
                        let record_bytes = (8 + record.len()) as u64;
                        let home_pointer = (home_key.len() + ENTRY_HEAD) as u64;
                        let added = (record_bytes + home_pointer + pointer_bytes)
                            .saturating_sub((home_key.len() + old.len()) as u64);
                        self.reserve(added)?;
                        // The message's id may have had a shared record before, acknowledged
                        // everywhere since: its delete must reach the journal first.
                        self.flush_removals();
                        batch.insert(&self.messages, msg_id.to_be_bytes(), record);
                        batch.insert(&self.queue, home_key, entry_head(POINTER, msg_id, expires));
                        *copy = Copies::Shared {
                            refs: 1,
                            record_bytes,
                            converted: Some(home),
                        };
                        (added, true)
                    }
                    Copies::Shared { .. } => {
                        self.reserve(pointer_bytes)?;
                        (pointer_bytes, false)
                    }
                };
                batch.insert(&self.queue, key, entry_head(POINTER, msg_id, expires_ms));
                if let Err(e) = batch.commit() {
                    // The batch is all or nothing: a message being converted is still inline.
                    if converting {
                        if let Some(Copies::Shared {
                            converted: Some(home),
                            ..
                        }) = copies.remove(&msg_id)
                        {
                            copies.insert(msg_id, Copies::Inline(home));
                        }
                    }
                    self.unreserve(added);
                    return Err(self.failed(e));
                }
                if let Some(Copies::Shared { refs, .. }) = copies.get_mut(&msg_id) {
                    *refs += 1;
                }
                Written {
                    inline: false,
                    bytes: pointer_bytes,
                }
            }
        };
        self.written.fetch_add(1, Ordering::AcqRel);
        Ok(written)
    }

    /// Runs a write that fjall may stall with a sleep of the calling thread: when a memtable
    /// is sealed while the sealed journals are near [`journal_max`], fjall sleeps 500 ms (and
    /// then 100 ms at a time until flushes free journals). Refusing writes then would keep the
    /// memtables from filling and the journals from being freed, so the write goes on, but
    /// off the async worker: from [`journals_near`] sealed journals on, the worker hands its
    /// other tasks to another thread for the time of the write (`block_in_place`). The count
    /// is read under fjall's journal-manager lock, without a system call.
    pub(crate) fn off_worker<R>(&self, write: impl FnOnce() -> R) -> R {
        let sealed = self.keyspace.journal_count().saturating_sub(1) as u64;
        if sealed < self.journals_near.load(Ordering::Relaxed) {
            return write();
        }
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                self.offloaded.fetch_add(1, Ordering::Relaxed);
                tokio::task::block_in_place(write)
            }
            // A thread of no runtime may sleep; a current-thread runtime (tests, tools) has no
            // other worker to hand its tasks to.
            _ => write(),
        }
    }

    /// The number of `endpoint`'s queue; a new queue's is given a name record. That record
    /// reaches the journal before any entry of the queue, so it is durable whenever one of them
    /// is.
    fn number(&self, endpoint: &Arc<str>) -> u32 {
        let mut numbers = locked(&self.numbers);
        if let Some(n) = numbers.of.get(endpoint) {
            return *n;
        }
        let n = numbers.next;
        numbers.next = n.saturating_add(1);
        numbers.of.insert(endpoint.clone(), n);
        // Like an entry's write, it may meet fjall's stall for journals near their bound.
        if let Err(e) = self.off_worker(|| self.queue.insert(name_key(n), endpoint.as_bytes())) {
            // A journal that cannot be written poisons the store (see `failed`); otherwise the
            // record is written again before the queue's first entry, or that entry is refused.
            let e = self.failed(e);
            tracing::error!(%endpoint, error = %e, "naming a queue in the store failed");
            numbers.unnamed.insert(n, endpoint.clone());
            self.unnamed.store(true, Ordering::Release);
        }
        n
    }

    /// Writes the name record of queue `queue` if [`DurableStore::number`] could not; an entry
    /// of the queue is written only once it is.
    fn name_again(&self, queue: u32) -> Result<(), StoreError> {
        let mut numbers = locked(&self.numbers);
        let Some(endpoint) = numbers.unnamed.get(&queue).cloned() else {
            return Ok(());
        };
        self.off_worker(|| self.queue.insert(name_key(queue), endpoint.as_bytes()))
            .map_err(|e| self.failed(e))?;
        numbers.unnamed.remove(&queue);
        if numbers.unnamed.is_empty() {
            self.unnamed.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// The highest sequence of each queue's numbered entries.
    fn highest_numbered(queue: &fjall::PartitionHandle) -> Result<HashMap<u32, u64>, StoreError> {
        let mut highest: HashMap<u32, u64> = HashMap::new();
        for kv in queue.prefix([ENTRY_KEY]) {
            let (k, _) = kv.map_err(fj)?;
            if let Some((n, _, seq)) = split_queue_key(&k) {
                let h = highest.entry(n).or_default();
                *h = (*h).max(seq);
            }
        }
        Ok(highest)
    }

    /// Moves the entries of a store written before queues were numbered (keyed by their endpoint
    /// id) to numbered keys, giving their queues numbers and name records. Each batch writes
    /// the new keys and deletes the old ones together, so a crash part way leaves every entry
    /// under one key or the other, and the next open goes on from there.
    ///
    /// A queue may already have numbered entries: those moved before a crash, or (after a hub
    /// of the older format ran on this store, skipping the numbered entries and counting its
    /// sequences from 1 again) entries older than every unnumbered one. The moved entries then
    /// go after them, their sequences raised by the queue's highest numbered one, so none
    /// takes another's key and each queue's order holds.
    fn number_old_entries(
        keyspace: &fjall::Keyspace,
        queue: &fjall::PartitionHandle,
        numbers: &mut Numbers,
    ) -> Result<(), StoreError> {
        use std::ops::Bound;
        // Old keys start with their endpoint id's first byte: not 0x00 (ids are not empty),
        // ENTRY_KEY or NAME_KEY, and never 0xFF (UTF-8), the flush marker's.
        let mut from = Bound::Included(vec![NAME_KEY + 1]);
        // Read once there is an entry to move.
        let mut after: Option<HashMap<u32, u64>> = None;
        let mut moved = 0usize;
        loop {
            let mut chunk = Vec::new();
            let mut bytes = 0;
            for kv in
                queue.range::<Vec<u8>, _>((from.clone(), Bound::Excluded(FLUSH_MARKER.to_vec())))
            {
                let (k, v) = kv.map_err(fj)?;
                bytes += k.len() + v.len();
                chunk.push((k, v));
                if chunk.len() >= RENUMBER_BATCH || bytes >= RENUMBER_BATCH_BYTES {
                    break;
                }
            }
            let Some((last, _)) = chunk.last() else {
                break;
            };
            from = Bound::Excluded(last.to_vec());
            let mut batch = keyspace.batch();
            for (k, v) in &chunk {
                // A key that does not parse is left where it is, out of every queue, as it
                // was before.
                let Some((endpoint, priority, seq)) = split_unnumbered_key(k) else {
                    tracing::error!("skipping a malformed queue entry in the store");
                    continue;
                };
                let n = match numbers.of.get(endpoint.as_str()) {
                    Some(n) => *n,
                    None => {
                        let n = numbers.next;
                        numbers.next = n.saturating_add(1);
                        batch.insert(queue, name_key(n), endpoint.as_bytes());
                        numbers.of.insert(Arc::from(endpoint), n);
                        n
                    }
                };
                if after.is_none() {
                    after = Some(Self::highest_numbered(queue)?);
                }
                let raise = after.as_ref().and_then(|a| a.get(&n)).copied().unwrap_or(0);
                let seq = seq.saturating_add(raise);
                batch.insert(queue, queue_key(n, priority, seq), v.clone());
                batch.remove(queue, k.clone());
                moved += 1;
            }
            batch.commit().map_err(fj)?;
        }
        if moved > 0 {
            keyspace.persist(fjall::PersistMode::SyncAll).map_err(fj)?;
            tracing::info!(entries = moved, "queue entries moved to numbered keys");
        }
        Ok(())
    }

    /// Removes the entry `e` at `at`, and the shared record with its last pointer. The deletes
    /// join the pending removals; returns their mark (see [`DurableStore::removal_written`]).
    fn remove(&self, at: Slot, e: &Entry) -> u64 {
        let key = queue_key(at.queue, at.priority, at.seq);
        let flush = {
            // An entry of a message that went to this queue alone was never in `copies`.
            let mut copies = (!e.sole).then(|| locked(&self.copies));
            let (freed, shared) = match copies.as_deref_mut() {
                None => (e.bytes, false),
                Some(copies) => Self::forget_copy(copies, at, &key, e),
            };
            self.unreserve(freed);
            self.removed.fetch_add(freed, Ordering::Relaxed);
            // Still under `copies`: a conversion that writes this id's record again flushes
            // the removals first, and must find this delete among them.
            let mut removals = locked(&self.removals);
            removals.batch.remove(&self.queue, key);
            if shared {
                removals
                    .batch
                    .remove(&self.messages, e.msg_id.to_be_bytes());
            }
            removals.last += 1;
            removals.bytes += freed;
            let flush = (
                removals.last,
                removals.batch.len() >= REMOVAL_BATCH || removals.bytes >= REMOVAL_BATCH_BYTES,
            );
            drop(removals);
            drop(copies);
            flush
        };
        if flush.1 && !self.chores.ask(&self.chores.flush) {
            self.flush_removals();
        }
        flush.0
    }

    /// The part of [`DurableStore::remove`] done under `copies`: updates the message's record
    /// there for the entry `e` at `at` (key `key`) leaving; returns the bytes freed and whether
    /// the message's shared record goes too.
    fn forget_copy(
        copies: &mut HashMap<u64, Copies>,
        at: Slot,
        key: &[u8],
        e: &Entry,
    ) -> (u64, bool) {
        let mut freed = e.bytes;
        let mut last = false;
        match copies.get_mut(&e.msg_id) {
            Some(Copies::Inline(home)) if e.inline && *home == at => last = true,
            Some(Copies::Shared {
                refs,
                record_bytes,
                converted,
            }) if !e.inline || *converted == Some(at) => {
                if e.inline {
                    *converted = None;
                }
                freed = (key.len() + ENTRY_HEAD) as u64;
                *refs = refs.saturating_sub(1);
                if *refs == 0 {
                    freed += *record_bytes;
                    last = true;
                }
            }
            // Recovered inline: the entry is all there is.
            _ => {}
        }
        let shared = last && matches!(copies.get(&e.msg_id), Some(Copies::Shared { .. }));
        if last {
            copies.remove(&e.msg_id);
        }
        (freed, shared)
    }

    /// Gives the pending removals to fjall in one batch. A fjall write: call it off the async
    /// workers (fjall may stall it).
    pub fn flush_removals(&self) {
        let mut pending = locked(&self.removals);
        let last = pending.last;
        pending.bytes = 0;
        if !pending.batch.is_empty() {
            let batch = std::mem::replace(
                &mut pending.batch,
                fjall::Batch::with_capacity(self.keyspace.clone(), REMOVAL_BATCH + 1),
            );
            // Committed under the lock, so a flush that finds nothing pending knows every
            // earlier delete is in fjall.
            if let Err(e) = batch.commit() {
                // The entries stay on disk and are delivered again after a restart:
                // duplicates, never a loss.
                tracing::warn!(error = %e, "removing delivered messages from the store failed");
            }
        }
        self.removals_committed.fetch_max(last, Ordering::AcqRel);
    }

    /// Writes every removal made so far out to the OS (and fjall's journal buffer with it): after
    /// this they survive a crash of the hub. Blocking: call it off the async workers.
    pub fn write_removals(&self) {
        self.flush_removals();
        let committed = self.removals_committed.load(Ordering::Acquire);
        if self.removals_out.load(Ordering::Acquire) >= committed {
            return;
        }
        if let Err(e) = self.keyspace.persist(fjall::PersistMode::Buffer) {
            // As for a failed commit: the entries come again after a restart. Counted as
            // written all the same, so that no delivery pump waits for them forever.
            tracing::warn!(error = %e, "writing removals of delivered messages failed");
        }
        self.removals_out.fetch_max(committed, Ordering::AcqRel);
    }

    /// [`DurableStore::write_removals`] on the calling thread, when fjall cannot stall that
    /// write with a sleep: its journals are not near their bound (see
    /// [`DurableStore::off_worker`]), neither partition's level 0 is near fjall's stall (see
    /// [`L0_STALL`]) and the write buffer is under 80 % of its size (fjall sleeps past 90 %).
    /// `false`, with nothing written, otherwise: the caller writes them off the async workers.
    /// A delivery pump writes its acknowledgements out every quarter of its window; a handoff
    /// to the blocking pool for each (two thread wake-ups) cost more than the write.
    pub fn write_removals_now(&self) -> bool {
        use fjall::AbstractTree;
        let sealed = self.keyspace.journal_count().saturating_sub(1) as u64;
        let buffered = self.keyspace.write_buffer_size();
        let quick = sealed < self.journals_near.load(Ordering::Relaxed)
            && self.queue.tree.l0_run_count() < L0_STALL
            && self.messages.tree.l0_run_count() < L0_STALL
            && buffered.saturating_mul(10) < self.write_buffer.saturating_mul(8);
        if quick {
            self.write_removals();
        }
        quick
    }

    /// Whether the removal of `mark` (from an acknowledgement) is written out to the OS, so
    /// that a crash of the hub cannot bring its message back.
    pub fn removal_written(&self, mark: u64) -> bool {
        self.removals_out.load(Ordering::Acquire) >= mark
    }

    /// Reads the message of the entry at (`queue`, `priority`, `seq`).
    fn load(
        &self,
        queue: u32,
        priority: u32,
        seq: u64,
        msg_id: u64,
    ) -> Result<Message, StoreError> {
        let corrupt = |why: &str| StoreError::Corrupt(msg_id, why.into());
        let v = self
            .queue
            .get(queue_key(queue, priority, seq))
            .map_err(fj)?
            .ok_or_else(|| corrupt("queue entry missing"))?;
        let e = parse_entry(&v).ok_or_else(|| corrupt("malformed queue entry"))?;
        if e.msg_id != msg_id {
            return Err(corrupt("the queue entry holds another message"));
        }
        if e.kind == INLINE {
            return decode_record(msg_id, e.record);
        }
        let record = self
            .messages
            .get(msg_id.to_be_bytes())
            .map_err(fj)?
            .ok_or_else(|| corrupt("message record missing"))?;
        decode_record(msg_id, &record)
    }
}

impl Drop for DurableStore {
    fn drop(&mut self) {
        self.chores.closing.store(true, Ordering::Release);
        if let Some(t) = self.chores.thread.get() {
            t.unpark();
        }
        self.flush_removals();
        if let Err(e) = self.keyspace.persist(fjall::PersistMode::Buffer) {
            tracing::warn!(error = %e, "writing the store's journal at close failed");
        }
    }
}

/// Bytes of messages (as [`Message::size`] counts them) a queue also keeps in memory, so that
/// the live path does not read back what it just wrote; beyond it (a backlog) bodies are read
/// from disk when delivered. Messages in flight are always kept.
const CACHE_BYTES: usize = 4 << 20;

struct Entry {
    msg_id: u64,
    expires_ms: Option<i64>,
    delivery_count: u8,
    /// Written with the record inside (the store may have turned it into a pointer since).
    inline: bool,
    /// Written inline for a message that went to this queue alone, with no record of it in
    /// the store's `copies`: its removal does not look there.
    sole: bool,
    /// Bytes of the entry as written (key and value).
    bytes: u64,
    cached: Option<Arc<Message>>,
}

#[derive(Default)]
struct DqInner {
    live_first: bool,
    newest_next: bool,
    next_seq: u64,
    /// New entries being written (outside the lock): they count against the capacity.
    writing: usize,
    pending: BTreeMap<(u32, u64), Entry>,
    /// The pending entries that expire, by (expiry, priority, sequence): `expire` takes what has
    /// expired from its front, O(expired), without looking at the rest of the queue.
    ttl: BTreeSet<(i64, u32, u64)>,
    in_flight: HashMap<u64, (u32, Entry)>,
    per_priority: BTreeMap<u32, usize>,
    /// Bytes of the messages held in `cached`.
    cached_bytes: usize,
}

impl DqInner {
    /// The message to keep in memory with a new entry, if the cache has room for it.
    fn cache(&mut self, msg: Arc<Message>) -> Option<Arc<Message>> {
        let size = msg.size();
        if self.cached_bytes + size > CACHE_BYTES {
            return None;
        }
        self.cached_bytes += size;
        Some(msg)
    }

    /// Accounts for an entry leaving the queue.
    fn forget(&mut self, e: &Entry) {
        if let Some(m) = &e.cached {
            self.cached_bytes = self.cached_bytes.saturating_sub(m.size());
        }
    }

    /// Puts an entry among the pending ones (and in the TTL index).
    fn insert_pending(&mut self, priority: u32, seq: u64, e: Entry) {
        if let Some(x) = e.expires_ms {
            self.ttl.insert((x, priority, seq));
        }
        self.pending.insert((priority, seq), e);
    }

    /// Takes an entry out of the pending ones.
    fn take_pending(&mut self, priority: u32, seq: u64) -> Option<Entry> {
        let e = self.pending.remove(&(priority, seq))?;
        self.untrack(priority, seq, &e);
        Some(e)
    }

    /// Drops the TTL index's record of an entry taken out of `pending`.
    fn untrack(&mut self, priority: u32, seq: u64, e: &Entry) {
        if let Some(x) = e.expires_ms {
            self.ttl.remove(&(x, priority, seq));
        }
    }

    /// The oldest pending entry of any priority: the first of each priority, O(priorities).
    fn oldest(&self) -> Option<(u32, u64)> {
        self.per_priority
            .keys()
            .filter_map(|&p| {
                self.pending
                    .range((p, 0)..=(p, u64::MAX))
                    .next()
                    .map(|(k, _)| *k)
            })
            .min_by_key(|(_, s)| *s)
    }
}

/// One endpoint's queue in the durable store.
pub struct DurableQueue {
    store: Arc<DurableStore>,
    endpoint: Arc<str>,
    /// This queue's number in the store (see [`Slot`]).
    index: u32,
    capacity: usize,
    inner: Mutex<DqInner>,
}

impl DurableQueue {
    fn lock(&self) -> MutexGuard<'_, DqInner> {
        locked(&self.inner)
    }

    fn slot(&self, priority: u32, seq: u64) -> Slot {
        Slot {
            queue: self.index,
            priority,
            seq,
        }
    }

    fn remove(&self, priority: u32, seq: u64, e: &Entry) -> u64 {
        self.store.remove(self.slot(priority, seq), e)
    }

    /// Writes the entry `entry` (key and inline value) of a new message at `seq`, making room
    /// with this queue's oldest pending messages when the store is full and its policy drops
    /// the oldest.
    fn write_entry(
        &self,
        seq: u64,
        priority: u32,
        expires_ms: Option<i64>,
        msg_id: u64,
        entry: &[u8],
        sole: bool,
    ) -> Result<Written, QueueError> {
        loop {
            match self
                .store
                .put(self.slot(priority, seq), expires_ms, msg_id, entry, sole)
            {
                Ok(w) => return Ok(w),
                Err(StoreError::Full { .. }) if self.store.overflow == Overflow::DropOldest => {
                    // Make room with this queue's oldest pending message, if it has one.
                    let taken = {
                        let mut g = self.lock();
                        let Some((p, s)) = g.oldest() else {
                            return Err(QueueError::StoreFull);
                        };
                        g.take_pending(p, s).map(|e| {
                            dec(&mut g.per_priority, p);
                            g.forget(&e);
                            (p, s, e)
                        })
                    };
                    if let Some((p, s, e)) = taken {
                        let dropped = self.message(p, s, &e).ok();
                        self.remove(p, s, &e);
                        if let Some(m) = dropped {
                            crate::metrics::dropped(crate::metrics::DROP_OVERFLOW, &m);
                        }
                    }
                }
                Err(StoreError::Full { .. }) => return Err(QueueError::StoreFull),
                Err(StoreError::Compacting { .. } | StoreError::Stalled(_)) => {
                    return Err(QueueError::StoreBusy)
                }
                Err(e) => {
                    tracing::error!(endpoint = %self.endpoint, "message not stored: {e}");
                    return Err(QueueError::Storage);
                }
            }
        }
    }

    /// [`QueueStore::try_push`]; `sole`: see [`QueueStore::try_push_sole`].
    fn push(
        &self,
        msg: Arc<Message>,
        priority: u32,
        expires_ms: Option<i64>,
        sole: bool,
    ) -> Result<u64, QueueError> {
        with_scratch(|entry| {
            // Key (its sequence filled in below) and inline value, assembled outside the lock.
            push_key(entry, self.index, priority, 0);
            let key_len = entry.len();
            entry.extend_from_slice(&entry_head(INLINE, msg.id, expires_ms));
            if let Err(e) = encode_record(&msg, entry) {
                tracing::error!(endpoint = %self.endpoint, "message not stored: {e}");
                return Err(QueueError::Storage);
            }
            // The sequence and a place are taken under the lock, the write is made outside it:
            // the delivery pump's takes and acknowledgements of this queue do not wait for
            // fjall. An entry goes among the pending ones once written, so nothing reads it
            // before. Concurrent senders to one queue may then be delivered in either order, as
            // they could be queued in either order before.
            let seq = {
                let mut g = self.lock();
                if g.pending.len() + g.in_flight.len() + g.writing >= self.capacity {
                    return Err(QueueError::Full);
                }
                g.next_seq += 1;
                g.writing += 1;
                g.next_seq
            };
            entry[key_len - 8..key_len].copy_from_slice(&seq.to_be_bytes());
            let written = self.write_entry(seq, priority, expires_ms, msg.id, entry, sole);
            let mut g = self.lock();
            g.writing -= 1;
            let written = written?;
            let msg_id = msg.id;
            let cached = g.cache(msg);
            g.insert_pending(
                priority,
                seq,
                Entry {
                    msg_id,
                    expires_ms,
                    delivery_count: 0,
                    inline: written.inline,
                    sole,
                    bytes: written.bytes,
                    cached,
                },
            );
            *g.per_priority.entry(priority).or_default() += 1;
            Ok(seq)
        })
    }

    /// The message of an entry: from memory, else from disk.
    fn message(&self, priority: u32, seq: u64, e: &Entry) -> Result<Arc<Message>, StoreError> {
        match &e.cached {
            Some(m) => Ok(m.clone()),
            None => self
                .store
                .load(self.index, priority, seq, e.msg_id)
                .map(Arc::new),
        }
    }
}

impl QueueStore for DurableQueue {
    fn try_push(
        &self,
        msg: Arc<Message>,
        priority: u32,
        expires_ms: Option<i64>,
    ) -> Result<u64, QueueError> {
        self.push(msg, priority, expires_ms, false)
    }

    fn try_push_sole(
        &self,
        msg: Arc<Message>,
        priority: u32,
        expires_ms: Option<i64>,
    ) -> Result<u64, QueueError> {
        self.push(msg, priority, expires_ms, true)
    }

    fn pop(&self, now_ms: i64) -> Popped {
        let mut g = self.lock();
        let mut expired = Vec::new();
        loop {
            let inner = &mut *g;
            let Some(((priority, seq), mut entry)) =
                take_next(&mut inner.pending, inner.live_first, &mut inner.newest_next)
            else {
                break;
            };
            inner.untrack(priority, seq, &entry);
            let msg = match self.message(priority, seq, &entry) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(endpoint = %self.endpoint, "dropping an unreadable stored message: {e}");
                    dec(&mut g.per_priority, priority);
                    g.forget(&entry);
                    self.remove(priority, seq, &entry);
                    continue;
                }
            };
            let q = Queued {
                seq,
                priority,
                msg,
                expires_ms: entry.expires_ms,
                delivery_count: entry.delivery_count,
            };
            if entry.expires_ms.is_some_and(|e| e <= now_ms) {
                dec(&mut g.per_priority, priority);
                g.forget(&entry);
                self.remove(priority, seq, &entry);
                expired.push(q);
                continue;
            }
            if entry.cached.is_none() {
                // Kept while in flight, so a release does not read it again.
                g.cached_bytes += q.msg.size();
                entry.cached = Some(q.msg.clone());
            }
            g.in_flight.insert(seq, (priority, entry));
            return Popped {
                item: Some(q),
                expired,
            };
        }
        Popped {
            item: None,
            expired,
        }
    }

    fn ack(&self, seq: u64) -> u64 {
        let mut g = self.lock();
        let Some((priority, e)) = g.in_flight.remove(&seq) else {
            return 0;
        };
        dec(&mut g.per_priority, priority);
        g.forget(&e);
        drop(g);
        self.remove(priority, seq, &e)
    }

    fn removal_written(&self, mark: u64) -> bool {
        self.store.removal_written(mark)
    }

    fn write_removals(&self) {
        self.store.write_removals();
    }

    fn write_removals_now(&self) -> bool {
        self.store.write_removals_now()
    }

    fn release(&self, seq: u64) {
        let mut g = self.lock();
        if let Some((priority, mut e)) = g.in_flight.remove(&seq) {
            e.delivery_count = e.delivery_count.saturating_add(1);
            g.insert_pending(priority, seq, e);
        }
    }

    fn head_priority(&self) -> Option<u32> {
        self.lock().pending.first_key_value().map(|((p, _), _)| *p)
    }

    /// O(expired): the TTL index gives what has expired. Messages not kept in memory are read
    /// from disk for their metric labels after the queue's lock is let go; the housekeeping
    /// task calls this off the async workers.
    fn expire(&self, now_ms: i64) -> Vec<Queued> {
        let dead: Vec<(u32, u64, Entry)> = {
            let mut g = self.lock();
            let mut dead = Vec::new();
            while let Some(&(x, priority, seq)) = g.ttl.first() {
                if x > now_ms {
                    break;
                }
                g.ttl.pop_first();
                if let Some(e) = g.pending.remove(&(priority, seq)) {
                    dec(&mut g.per_priority, priority);
                    g.forget(&e);
                    dead.push((priority, seq, e));
                }
            }
            dead
        };
        let mut out = Vec::with_capacity(dead.len());
        for (priority, seq, e) in dead {
            let msg = self.message(priority, seq, &e);
            self.remove(priority, seq, &e);
            if let Ok(msg) = msg {
                out.push(Queued {
                    seq,
                    priority,
                    msg,
                    expires_ms: e.expires_ms,
                    delivery_count: e.delivery_count,
                });
            }
        }
        // Called every second by the housekeeping task: removals wait no longer than that.
        self.store.flush_removals();
        out
    }

    fn lengths(&self) -> BTreeMap<u32, usize> {
        self.lock().per_priority.clone()
    }
}

/// Opens the keyspace under `dir`, sized for an edge device: small caches and write buffers
/// (fjall's defaults suit servers and would make the hub's resident memory grow past 100 MiB
/// under load), one flush and one compaction worker. Writes stay in the journal buffer until
/// [`DurableStore::sync`] (or a twin write) persists it, instead of one write to the journal
/// file per fjall write.
///
/// With a store limit (`cap`, `storeLimits.maxSizeBytes`) the write buffer is an eighth of it
/// (from 1 to 16 MiB): fjall keeps a journal until the memtables it fed are flushed, so a
/// smaller buffer keeps the journals on disk small next to the cap, whatever flows through.
pub fn open_keyspace(dir: &Path, cap: Option<u64>) -> Result<fjall::Keyspace, StoreError> {
    const MIB: u64 = 1024 * 1024;
    let write_buffer = cap.map_or(16 * MIB, |cap| (cap / 8).clamp(MIB, 16 * MIB));
    fjall::Config::new(dir)
        .cache_size(8 * 1024 * 1024)
        .max_write_buffer_size(write_buffer)
        .max_journaling_size(journal_max(cap))
        .flush_workers(1)
        .compaction_workers(1)
        .manual_journal_persist(true)
        .open()
        .map_err(fj)
}

#[cfg(test)]
mod tests;
