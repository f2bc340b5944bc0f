//! WAL appends: one fsync per record (a single writer waiting on each append) against
//! group commit (16 and 64 writers sharing fsyncs). `cargo bench -p ratify-coordinator`.
//! Compare with the raw fdatasync rate of the same disk (`--example wal_bench`).

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::executor::block_on;
use ratify_coordinator::log::wal::{Wal, WalOptions};
use ratify_coordinator::log::{Decision, DecisionLog, LogParticipant, LogRecord};
use ratify_proto::TxnId;

fn decision() -> LogRecord {
    LogRecord::Decision {
        txn: TxnId::generate(),
        decision: Decision::Commit,
        participants: vec![LogParticipant {
            name: "p1".into(),
            incarnation: 1,
            endpoint: "http://127.0.0.1:1".into(),
        }],
        at_unix_ms: 0,
        actor: String::new(),
        reason: String::new(),
        epoch: 1,
    }
}

fn appends(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_append");
    group.sample_size(10);
    for writers in [1usize, 16, 64] {
        let dir = tempfile::tempdir_in(".").expect("a temp dir on the data disk");
        let wal = Arc::new(Wal::open(dir.path(), WalOptions::default()).expect("opening the WAL"));
        let per_writer = 64usize;
        group.throughput(Throughput::Elements((writers * per_writer) as u64));
        group.bench_function(format!("{writers}_writers"), |b| {
            b.iter(|| {
                let threads: Vec<_> = (0..writers)
                    .map(|_| {
                        let wal = wal.clone();
                        std::thread::spawn(move || {
                            for _ in 0..per_writer {
                                block_on(wal.append(vec![decision()])).expect("append");
                            }
                        })
                    })
                    .collect();
                for t in threads {
                    t.join().expect("writer");
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, appends);
criterion_main!(benches);
