//! A hub that nobody scrapes does not keep its metrics' samples.
//!
//! Alone in its test binary: it measures the process's resident memory.

mod common;

use std::time::Duration;

/// The process's resident memory, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// Waits (at most 30 s) until the hub's metrics upkeep has run twice more: whatever was
/// recorded before is drained by then.
async fn two_upkeeps() {
    let start = edgehub::metrics::upkeeps();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while edgehub::metrics::upkeeps() < start + 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the metrics upkeep did not run"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_recorded_while_nobody_scrapes_are_drained() {
    let _hub = common::start_hub("{}", "{}").await;
    const ROUNDS: u64 = 6;
    const PER_ROUND: u64 = 1_000_000;
    let summary = metrics::histogram!("edgehub_test_samples_seconds");
    // One round first: what a drained round took stays allocated for the next ones.
    for _ in 0..PER_ROUND {
        summary.record(0.001);
    }
    two_upkeeps().await;
    let before = rss();
    for _ in 0..ROUNDS {
        for _ in 0..PER_ROUND {
            summary.record(0.001);
        }
        two_upkeeps().await;
    }
    let grown = rss().saturating_sub(before);
    eprintln!("resident memory grew by {grown} bytes over {ROUNDS} rounds");
    // Kept, the samples take at least 16 bytes each: 96 MB over the six rounds.
    assert!(
        grown < 3 * PER_ROUND * 16,
        "resident memory grew by {grown} bytes over {ROUNDS} rounds of {PER_ROUND} samples"
    );
}
