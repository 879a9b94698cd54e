//! fjall 2 against fjall 3 on the write pattern of a durable queue in a stream: each message's
//! entry inserted on its own (a 34-byte key like the hub's queue keys, a 300-byte value), its
//! delete `LAG` messages later (delivered and acknowledged), the deletes committed `DELETES`
//! to a batch, and the journal written out to the OS every `COMMIT_EVERY` messages (the group
//! commit, without its fsync: the CPU is what is compared). fjall 3 runs twice: with ordinary
//! deletes and with weak (single) deletes, which vanish with their entry when the two meet.
//!
//! The hub's allocator (mimalloc). Each run is a child process, so that its CPU (user + system,
//! every thread of fjall's included) is its own; the variants alternate, `RUNS` rounds (env `RUNS`, default 3;
//! `MESSAGES`, default 1 000 000; `SHORT_KEYS` set: 16-byte keys, the queue named by a number).

use std::{process::Command, time::Instant};

/// The hub's allocator, so that the stores allocate as they do in the hub.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const QUEUE: &[u8] = b"/modules/B/inputs/in1\0";
const LAG: u64 = 600;
const DELETES: usize = 64;
const COMMIT_EVERY: u64 = 340;
const MEMTABLE: u64 = 16 << 20;
const VARIANTS: [&str; 3] = ["fjall 2", "fjall 3", "fjall 3, weak deletes"];

fn key(seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(QUEUE.len() + 12);
    static SHORT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *SHORT.get_or_init(|| std::env::var_os("SHORT_KEYS").is_some()) {
        // The queue named by a number instead of its endpoint id: a 16-byte key.
        k.extend_from_slice(&1u32.to_be_bytes());
    } else {
        k.extend_from_slice(QUEUE);
    }
    k.extend_from_slice(&0u32.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A payload that does not compress (fjall 3 can compress its journal).
fn payload() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..300)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// User + system CPU seconds of this process, all its threads, from /proc/self/stat.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn run_v2(dir: &std::path::Path, n: u64, value: &[u8]) {
    let ks = fjall2::Config::new(dir)
        .max_write_buffer_size(MEMTABLE)
        .flush_workers(1)
        .compaction_workers(1)
        .manual_journal_persist(true)
        .open()
        .expect("open");
    let options = fjall2::PartitionCreateOptions::default()
        .manual_journal_persist(true)
        .max_memtable_size(MEMTABLE as u32);
    let q = ks.open_partition("queue", options).expect("partition");
    let mut deletes = ks.batch();
    for seq in 1..=n {
        q.insert(key(seq), value).expect("insert");
        if seq > LAG {
            deletes.remove(&q, key(seq - LAG));
            if deletes.len() >= DELETES {
                std::mem::replace(&mut deletes, ks.batch())
                    .commit()
                    .expect("deletes");
            }
        }
        if seq % COMMIT_EVERY == 0 {
            ks.persist(fjall2::PersistMode::Buffer).expect("persist");
        }
    }
}

fn run_v3(dir: &std::path::Path, n: u64, value: &[u8], weak: bool) {
    let db = fjall3::Database::builder(dir)
        .manual_journal_persist(true)
        .open()
        .expect("open");
    let q = db
        .keyspace("queue", || {
            fjall3::KeyspaceCreateOptions::default()
                .manual_journal_persist(true)
                .max_memtable_size(MEMTABLE)
        })
        .expect("keyspace");
    let mut deletes = db.batch();
    for seq in 1..=n {
        q.insert(key(seq), value).expect("insert");
        if seq > LAG {
            if weak {
                deletes.remove_weak(&q, key(seq - LAG));
            } else {
                deletes.remove(&q, key(seq - LAG));
            }
            if deletes.len() >= DELETES {
                std::mem::replace(&mut deletes, db.batch())
                    .commit()
                    .expect("deletes");
            }
        }
        if seq % COMMIT_EVERY == 0 {
            db.persist(fjall3::PersistMode::Buffer).expect("persist");
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let n = env_u64("MESSAGES", 1_000_000);
    if let Some(variant) = std::env::args().nth(1) {
        // A child: one run of one variant; prints "rate cpu_us_per_msg".
        let dir = std::env::temp_dir().join(format!("store-versions-{}", std::process::id()));
        let value = payload();
        let (cpu0, t0) = (cpu_secs(), Instant::now());
        match variant.as_str() {
            "0" => run_v2(&dir, n, &value),
            "1" => run_v3(&dir, n, &value, false),
            _ => run_v3(&dir, n, &value, true),
        }
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_secs() - cpu0);
        let _ = std::fs::remove_dir_all(&dir);
        println!("{} {}", n as f64 / wall, cpu * 1e6 / n as f64);
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    println!("{n} messages per run, 300-byte values, deletes {LAG} messages behind");
    println!("| round | store | msg/s | CPU µs/msg |");
    println!("|---|---|---|---|");
    for round in 1..=env_u64("RUNS", 3) {
        for (i, name) in VARIANTS.iter().enumerate() {
            let out = Command::new(&exe).arg(i.to_string()).output().expect("run");
            let text = String::from_utf8_lossy(&out.stdout);
            let mut f = text
                .split_whitespace()
                .map(|v| v.parse::<f64>().unwrap_or(0.0));
            let (rate, cpu) = (f.next().unwrap_or(0.0), f.next().unwrap_or(0.0));
            println!("| {round} | {name} | {rate:.0} | {cpu:.2} |");
        }
    }
}
