//! Measures the decision log on this machine, each figure beside the raw fdatasync rate of
//! the same directory measured in the same run:
//! - forced appends/s with one writer (one fsync per record) and with 16 and 64
//!   concurrent writers (group commit), with the mean records per fsync;
//! - recovery time of a log of 100,000 transactions (open + replay + engine recovery),
//!   once with every transaction ended and once with none ended (all re-driven).
//!
//! `cargo run --release -p ratify-coordinator --example wal_bench -- [DIR] [SECONDS]`
//! (DIR defaults to a temporary directory under the current one, so it measures the same
//! disk as a data directory would).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::executor::block_on;
use ratify_coordinator::engine::{Engine, EngineConfig};
use ratify_coordinator::log::wal::{Wal, WalOptions};
use ratify_coordinator::log::{Decision, DecisionLog, LogParticipant, LogRecord};
use ratify_proto::TxnId;

fn decision(txn: TxnId) -> LogRecord {
    LogRecord::Decision {
        txn,
        decision: Decision::Commit,
        participants: ["p1", "p2"]
            .iter()
            .map(|n| LogParticipant {
                name: n.to_string(),
                incarnation: 42,
                endpoint: "http://127.0.0.1:7401".into(),
            })
            .collect(),
        at_unix_ms: 1,
        actor: String::new(),
        reason: String::new(),
        epoch: 1,
    }
}

fn raw_fdatasync_per_s(dir: &std::path::Path, seconds: f64) -> f64 {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).unwrap();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        file.write_all(&[0u8; 128]).unwrap();
        file.sync_data().unwrap();
        n += 1;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    std::fs::remove_file(path).unwrap();
    rate
}

fn appends_per_s(dir: &std::path::Path, writers: usize, seconds: f64) -> (f64, f64) {
    let wal = Arc::new(Wal::open(dir, WalOptions::default()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let before = wal.stats();
    let started = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|_| {
            let (wal, stop, count) = (wal.clone(), stop.clone(), count.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    block_on(wal.append(vec![decision(TxnId::generate())])).unwrap();
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = wal.stats();
    let fsyncs = (after.fsyncs - before.fsyncs).max(1);
    let records = count.load(Ordering::Relaxed);
    (records as f64 / elapsed, records as f64 / fsyncs as f64)
}

fn recovery(
    dir: &std::path::Path,
    transactions: usize,
    ended: bool,
) -> (Duration, Duration, usize) {
    {
        let wal = Wal::open(dir, WalOptions::default()).unwrap();
        let mut batch = Vec::new();
        for _ in 0..transactions {
            let txn = TxnId::generate();
            batch.push(decision(txn));
            if ended {
                batch.push(LogRecord::End { txn });
            }
            if batch.len() >= 1000 {
                block_on(wal.append(std::mem::take(&mut batch))).unwrap();
            }
        }
        block_on(wal.append(batch)).unwrap();
    }
    let started = Instant::now();
    let wal = Wal::open(dir, WalOptions::default()).unwrap();
    let records = wal.take_recovered();
    let replay = started.elapsed();
    let started = Instant::now();
    let mut engine = Engine::new(EngineConfig::default(), wal.epoch());
    let actions = engine.recover(0, records);
    (replay, started.elapsed(), actions.len())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base = match args.get(1) {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::env::current_dir().unwrap(),
    };
    let seconds: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let scratch = tempfile::Builder::new()
        .prefix("wal-bench-")
        .tempdir_in(&base)
        .unwrap();
    let fresh = |name: &str| {
        let d = scratch.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };

    let ceiling = raw_fdatasync_per_s(scratch.path(), seconds);
    println!("raw fdatasync of {}: {ceiling:.0}/s", base.display());
    println!(
        "{:<36} {:>12} {:>16} {:>14}",
        "forced appends", "records/s", "records/fsync", "x raw fsync"
    );
    for writers in [1usize, 16, 64] {
        let (rate, per_fsync) = appends_per_s(&fresh(&format!("w{writers}")), writers, seconds);
        let label = if writers == 1 {
            "1 writer (one fsync per record)".to_string()
        } else {
            format!("{writers} writers (group commit)")
        };
        println!(
            "{label:<36} {rate:>12.0} {per_fsync:>16.1} {:>14.2}",
            rate / ceiling
        );
    }
    for ended in [true, false] {
        let (replay, engine, actions) = recovery(
            &fresh(if ended { "rec-ended" } else { "rec-open" }),
            100_000,
            ended,
        );
        println!(
            "recovery of 100000 transactions ({}): open+replay {:.0} ms, engine {:.0} ms, {actions} actions",
            if ended {
                "all ended"
            } else {
                "none ended, all re-driven"
            },
            replay.as_secs_f64() * 1000.0,
            engine.as_secs_f64() * 1000.0,
        );
    }
}
