//! Which embedded store for edgehub: redb or fjall? The same workloads against both, in one run:
//!
//! 1. single durable writes (a twin update: one small record, committed and fsynced);
//! 2. group commits: 256-byte messages appended to a queue, 100 per durable commit;
//! 3. draining that queue in order (read + delete, 100 per commit);
//! 4. bytes on disk after the appends.

use std::{path::Path, time::Instant};

const SINGLE: usize = 2_000;
const MESSAGES: usize = 200_000;
const BATCH: usize = 100;

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let m = e.metadata().map(|m| m.len()).unwrap_or(0);
                    if e.path().is_dir() {
                        dir_size(&e.path())
                    } else {
                        m
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn report(name: &str, single: f64, append: f64, drain: f64, bytes: u64) {
    println!(
        "| {name} | {single:.0} | {append:.0} | {drain:.0} | {:.0} |",
        bytes as f64 / MESSAGES as f64
    );
}

fn run_redb(dir: &Path) {
    use redb::{Database, Durability, ReadableTable, TableDefinition};
    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("q");
    const W: TableDefinition<&str, &[u8]> = TableDefinition::new("twins");
    let db = Database::create(dir.join("redb.db")).expect("open");
    let body = [7u8; 256];
    let t = Instant::now();
    for i in 0..SINGLE {
        let mut tx = db.begin_write().expect("tx");
        tx.set_durability(Durability::Immediate);
        {
            let mut tbl = tx.open_table(W).expect("table");
            let key = format!("d/m{}", i % 50);
            tbl.insert(key.as_str(), &body[..]).expect("insert");
        }
        tx.commit().expect("commit");
    }
    let single = SINGLE as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for b in 0..MESSAGES / BATCH {
        let mut tx = db.begin_write().expect("tx");
        tx.set_durability(Durability::Immediate);
        {
            let mut tbl = tx.open_table(T).expect("table");
            for i in 0..BATCH {
                tbl.insert((b * BATCH + i) as u64, &body[..]).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    let append = MESSAGES as f64 / t.elapsed().as_secs_f64();
    let bytes = dir_size(dir);
    let t = Instant::now();
    let mut next = 0u64;
    while next < MESSAGES as u64 {
        let mut tx = db.begin_write().expect("tx");
        tx.set_durability(Durability::Immediate);
        {
            let mut tbl = tx.open_table(T).expect("table");
            let keys: Vec<u64> = tbl
                .range(next..)
                .expect("range")
                .take(BATCH)
                .map(|r| r.expect("row").0.value())
                .collect();
            for k in &keys {
                tbl.remove(*k).expect("remove");
            }
            next += keys.len() as u64;
        }
        tx.commit().expect("commit");
    }
    let drain = MESSAGES as f64 / t.elapsed().as_secs_f64();
    report("redb 2", single, append, drain, bytes);
}

fn run_fjall(dir: &Path) {
    use fjall::{Config, PartitionCreateOptions, PersistMode};
    let ks = Config::new(dir.join("fjall")).open().expect("open");
    let q = ks.open_partition("q", PartitionCreateOptions::default()).expect("q");
    let tw = ks.open_partition("twins", PartitionCreateOptions::default()).expect("twins");
    let body = [7u8; 256];
    let t = Instant::now();
    for i in 0..SINGLE {
        tw.insert(format!("d/m{}", i % 50), body).expect("insert");
        ks.persist(PersistMode::SyncAll).expect("persist");
    }
    let single = SINGLE as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for b in 0..MESSAGES / BATCH {
        let mut batch = ks.batch();
        for i in 0..BATCH {
            batch.insert(&q, ((b * BATCH + i) as u64).to_be_bytes(), body);
        }
        batch.commit().expect("commit");
        ks.persist(PersistMode::SyncAll).expect("persist");
    }
    let append = MESSAGES as f64 / t.elapsed().as_secs_f64();
    let bytes = dir_size(dir);
    let t = Instant::now();
    let mut next = 0u64;
    while next < MESSAGES as u64 {
        let keys: Vec<_> = q
            .range(next.to_be_bytes()..)
            .take(BATCH)
            .map(|r| r.expect("row").0)
            .collect();
        let mut batch = ks.batch();
        for k in &keys {
            batch.remove(&q, k.clone());
        }
        batch.commit().expect("commit");
        ks.persist(PersistMode::SyncAll).expect("persist");
        next += keys.len() as u64;
    }
    let drain = MESSAGES as f64 / t.elapsed().as_secs_f64();
    report("fjall 2", single, append, drain, bytes);
}

fn main() {
    let base = std::env::temp_dir().join(format!("store-choice-{}", std::process::id()));
    println!("| store | durable single writes/s | appends/s (100 per fsync) | drain/s (100 per fsync) | bytes on disk per 256 B message |");
    println!("|---|---|---|---|---|");
    for (name, f) in [("redb", run_redb as fn(&Path)), ("fjall", run_fjall as fn(&Path))] {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        f(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
