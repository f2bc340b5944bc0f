//! The local WAL on real files: replay, group commit, torn tails, corruption, checkpoints.

use std::path::{Path, PathBuf};

use futures::executor::block_on;
use ratify_coordinator::log::frame::{self, HEADER_LEN};
use ratify_coordinator::log::wal::{OpenError, Wal, WalOptions};
use ratify_coordinator::log::{Decision, DecisionLog, LogParticipant, LogRecord};
use ratify_proto::TxnId;

fn decision(n: u64) -> LogRecord {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&n.to_be_bytes());
    bytes[8] = 0xA5;
    LogRecord::Decision {
        txn: TxnId::from_bytes(bytes),
        decision: if n.is_multiple_of(2) {
            Decision::Commit
        } else {
            Decision::Abort
        },
        participants: vec![
            LogParticipant {
                name: "a".into(),
                incarnation: n,
                endpoint: "http://127.0.0.1:1".into(),
            },
            LogParticipant {
                name: "b".into(),
                incarnation: n,
                endpoint: "http://127.0.0.1:2".into(),
            },
        ],
        at_unix_ms: n,
        actor: String::new(),
        reason: String::new(),
        epoch: 1,
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut list: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    list.sort();
    list
}

/// Where the frames of a segment end (the file goes on with zero-filled space).
fn written_len(path: &Path) -> u64 {
    let scan = frame::scan_segment(&std::fs::read(path).unwrap()).unwrap();
    assert_eq!(scan.damage, None);
    scan.valid_len as u64
}

/// Writes `n` records, one forced append each (one frame each); returns each frame's end.
fn write_log(dir: &Path, n: u64) -> Vec<u64> {
    let wal = Wal::open(dir, WalOptions::default()).unwrap();
    let path = segments(dir).pop().unwrap();
    let mut ends = Vec::new();
    for i in 0..n {
        block_on(wal.append(vec![decision(i)])).unwrap();
        ends.push(written_len(&path));
    }
    ends
}

fn replay(dir: &Path) -> Result<Vec<LogRecord>, OpenError> {
    Wal::open(dir, WalOptions::default()).map(|w| w.take_recovered())
}

#[test]
fn records_replay_in_order_and_the_epoch_rises_on_every_open() {
    let dir = tempfile::tempdir().unwrap();
    let first = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(first.epoch(), 1);
    block_on(first.append(vec![decision(1), decision(2)])).unwrap();
    first
        .append_unforced(vec![LogRecord::End {
            txn: decision(1).txn(),
        }])
        .unwrap();
    drop(first);
    let second = Wal::open(dir.path(), WalOptions::default()).unwrap();
    assert_eq!(second.epoch(), 2);
    assert_eq!(
        second.take_recovered(),
        vec![
            decision(1),
            decision(2),
            LogRecord::End {
                txn: decision(1).txn()
            }
        ]
    );
}

#[test]
fn a_second_coordinator_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let error = Wal::open(dir.path(), WalOptions::default()).unwrap_err();
    assert!(error.to_string().contains("in use"), "{error}");
}

#[test]
fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let wal = std::sync::Arc::new(Wal::open(dir.path(), WalOptions::default()).unwrap());
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let wal = wal.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    block_on(wal.append(vec![decision(t * 1000 + i)])).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = wal.stats();
    assert_eq!(stats.records, 800);
    assert!(
        stats.fsyncs <= stats.batches && stats.batches <= 800,
        "{stats:?}"
    );
    drop(wal);
    assert_eq!(replay(dir.path()).unwrap().len(), 800);
}

fn end(n: u64) -> LogRecord {
    LogRecord::End {
        txn: decision(n).txn(),
    }
}

#[test]
fn unforced_records_ride_with_the_next_forced_write() {
    let dir = tempfile::tempdir().unwrap();
    // A linger no test run reaches: only a forced append can carry the END out.
    let wal = Wal::open(
        dir.path(),
        WalOptions {
            unforced_linger: std::time::Duration::from_secs(3600),
            ..WalOptions::default()
        },
    )
    .unwrap();
    block_on(wal.append(vec![decision(1)])).unwrap();
    wal.append_unforced(vec![end(1)]).unwrap();
    block_on(wal.append(vec![decision(2)])).unwrap();
    let stats = wal.stats();
    assert_eq!(
        (stats.records, stats.batches, stats.fsyncs),
        (3, 2, 2),
        "the END shares the second decision's write and fdatasync: {stats:?}"
    );
    wal.append_unforced(vec![end(2)]).unwrap();
    // Closing writes what is still held.
    drop(wal);
    assert_eq!(
        replay(dir.path()).unwrap(),
        vec![decision(1), end(1), decision(2), end(2)]
    );
}

#[test]
fn unforced_records_past_the_holding_limit_are_written_without_a_forced_one() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(
        dir.path(),
        WalOptions {
            unforced_linger: std::time::Duration::from_secs(3600),
            ..WalOptions::default()
        },
    )
    .unwrap();
    for i in 0..5000 {
        wal.append_unforced(vec![end(i)]).unwrap();
    }
    let mut waited = 0;
    while wal.stats().records < 4096 {
        assert!(waited < 30_000, "nothing written: {:?}", wal.stats());
        std::thread::sleep(std::time::Duration::from_millis(1));
        waited += 1;
    }
    let stats = wal.stats();
    assert_eq!((stats.records, stats.batches), (4096, 1), "{stats:?}");
    // The rest go at close, in order.
    drop(wal);
    assert_eq!(
        replay(dir.path()).unwrap(),
        (0..5000).map(end).collect::<Vec<_>>()
    );
}

#[test]
fn an_unforced_record_alone_is_written_and_synced_once_its_linger_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(
        dir.path(),
        WalOptions {
            unforced_linger: std::time::Duration::from_millis(5),
            ..WalOptions::default()
        },
    )
    .unwrap();
    block_on(wal.append(vec![decision(1)])).unwrap();
    wal.append_unforced(vec![end(1)]).unwrap();
    // No forced append follows; the writer must still get the END out on its own.
    let mut waited = 0;
    while wal.stats().records < 2 {
        assert!(
            waited < 30_000,
            "the END was never written: {:?}",
            wal.stats()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
        waited += 1;
    }
    let stats = wal.stats();
    assert_eq!((stats.batches, stats.fsyncs), (2, 2), "{stats:?}");
}

#[test]
fn truncating_the_last_record_at_every_offset_recovers_the_exact_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let ends = write_log(dir.path(), 5);
    let path = segments(dir.path()).pop().unwrap();
    // A smaller chunk than the default keeps the hundreds of reopens below quick.
    let options = WalOptions {
        preallocate_bytes: 16 << 10,
        ..WalOptions::default()
    };
    let preallocated = std::fs::read(&path).unwrap();
    assert!(
        preallocated.len() as u64 > ends[4],
        "the segment is zero-filled ahead of its last frame"
    );
    let original = &preallocated[..ends[4] as usize];
    let last_start = ends[3] as usize;
    // Cut at every offset of the last frame, as a torn append leaves it, and as a torn
    // write into zero-filled space does (the rest of the frame still zeros).
    let cuts = (last_start..original.len()).flat_map(|cut| [(cut, false), (cut, true)]);
    for (cut, zero_filled) in cuts {
        let mut bytes = original[..cut].to_vec();
        if zero_filled {
            bytes.resize(original.len() + (16 << 10), 0);
        }
        std::fs::write(&path, &bytes).unwrap();
        let wal = Wal::open(dir.path(), options.clone()).unwrap();
        let records = wal.take_recovered();
        assert_eq!(
            records,
            (0..4).map(decision).collect::<Vec<_>>(),
            "cut at {cut}"
        );
        // Later appends work and land after the repaired tail.
        block_on(wal.append(vec![decision(99)])).unwrap();
        drop(wal);
        let records = replay(dir.path()).unwrap();
        assert_eq!(records.len(), 5, "cut at {cut}");
        assert_eq!(records[4], decision(99));
    }
}

#[test]
fn frames_overwrite_zero_filled_space_and_only_the_last_segment_may_end_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions {
        segment_bytes: 4096,
        preallocate_bytes: 1024,
        ..WalOptions::default()
    };
    let wal = Wal::open(dir.path(), options.clone()).unwrap();
    block_on(wal.append(vec![decision(0)])).unwrap();
    let path = segments(dir.path()).pop().unwrap();
    let first_end = written_len(&path);
    // The writer zero-fills after answering a batch, so only the next answer says the
    // chunk after the first frame is there.
    block_on(wal.append(vec![decision(1)])).unwrap();
    assert!(written_len(&path) > first_end);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        first_end + 1024,
        "a chunk was zero-filled after the first frame, and the second frame went into it"
    );
    drop(wal);

    // Reopened, it goes on after the last frame, not after the zeros.
    let wal = Wal::open(dir.path(), options.clone()).unwrap();
    assert_eq!(wal.take_recovered(), vec![decision(0), decision(1)]);
    block_on(wal.append(vec![decision(2)])).unwrap();
    // Enough to start more segments; each earlier one is cut to its last frame.
    for i in 3..200 {
        block_on(wal.append(vec![decision(i)])).unwrap();
    }
    drop(wal);
    let all = segments(dir.path());
    assert!(all.len() >= 3, "{all:?}");
    for path in &all[..all.len() - 1] {
        let bytes = std::fs::read(path).unwrap();
        let scan = frame::scan_segment(&bytes).unwrap();
        assert_eq!(
            (scan.valid_len, scan.zero_tail, scan.damage),
            (bytes.len(), 0, None),
            "{}",
            path.display()
        );
    }
    assert_eq!(
        replay(dir.path()).unwrap(),
        (0..200).map(decision).collect::<Vec<_>>()
    );

    // Zeros at the end of an earlier segment are lost frames, not preallocated space.
    let first = &all[0];
    let mut bytes = std::fs::read(first).unwrap();
    let last_frame = (HEADER_LEN..bytes.len() - 1)
        .rev()
        .find(|&end| frame::scan_segment(&bytes[..end]).unwrap().damage.is_none())
        .unwrap();
    bytes[last_frame..].fill(0);
    std::fs::write(first, &bytes).unwrap();
    let error = replay(dir.path()).unwrap_err();
    assert!(
        matches!(error, OpenError::Corrupt { .. })
            && error.to_string().contains(&first.display().to_string())
            && error.to_string().contains("not the last"),
        "{error}"
    );
}

#[test]
fn damage_before_the_tail_refuses_to_start_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let ends = write_log(dir.path(), 50);
    let path = segments(dir.path()).pop().unwrap();
    let original = std::fs::read(&path).unwrap();
    let tail_start = ends[48] as usize;

    // Zero each 512-byte sector that lies wholly before the last record.
    let mut sector = 0;
    while (sector + 1) * 512 <= tail_start {
        let mut bytes = original.clone();
        bytes[sector * 512..(sector + 1) * 512].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        let error = replay(dir.path()).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, OpenError::Corrupt { .. }),
            "sector {sector}: {message}"
        );
        assert!(
            message.contains(&path.display().to_string()) && message.contains("offset"),
            "{message}"
        );
        sector += 1;
    }
    assert!(sector > 2);

    // Flip each bit of the second-to-last record.
    for byte in ends[47] as usize..tail_start {
        for bit in 0..8 {
            let mut bytes = original.clone();
            bytes[byte] ^= 1 << bit;
            std::fs::write(&path, &bytes).unwrap();
            assert!(
                matches!(replay(dir.path()), Err(OpenError::Corrupt { .. })),
                "flipped bit {bit} of byte {byte} was not detected"
            );
        }
    }

    // A huge length field in the middle.
    let mut bytes = original.clone();
    bytes[ends[10] as usize..ends[10] as usize + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(replay(dir.path()), Err(OpenError::Corrupt { .. })));

    // Garbage written after the last record, into the zero-filled space or past it, is
    // a torn tail: cut off, nothing lost.
    let mut bytes = original.clone();
    let at = ends[49] as usize;
    bytes[at..at + 10].copy_from_slice(b"not frames");
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(replay(dir.path()).unwrap().len(), 50);
    let mut bytes = original.clone();
    bytes.extend_from_slice(b"garbage that is not a frame at all");
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(replay(dir.path()).unwrap().len(), 50);
}

#[test]
fn a_missing_segment_refuses_to_start_and_checkpoints_keep_unfinished_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let options = WalOptions {
        segment_bytes: 1024,
        ..WalOptions::default()
    };
    let wal = Wal::open(dir.path(), options.clone()).unwrap();
    // Record 0 never ends: its segment must survive every checkpoint.
    for i in 0..60 {
        block_on(wal.append(vec![decision(i)])).unwrap();
        if i > 0 {
            block_on(wal.append(vec![LogRecord::End {
                txn: decision(i).txn(),
            }]))
            .unwrap();
        }
    }
    assert_eq!(
        wal.stats().segments_removed,
        0,
        "the first segment is pinned by record 0"
    );
    block_on(wal.append(vec![LogRecord::End {
        txn: decision(0).txn(),
    }]))
    .unwrap();
    for i in 100..140 {
        block_on(wal.append(vec![
            decision(i),
            LogRecord::End {
                txn: decision(i).txn(),
            },
        ]))
        .unwrap();
    }
    assert!(wal.stats().segments_removed > 0, "{:?}", wal.stats());
    drop(wal);
    let records = replay(dir.path()).unwrap();
    assert!(
        !records.contains(&decision(0)),
        "ended transactions' segments are removed"
    );

    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path(), options).unwrap();
    for i in 0..40 {
        block_on(wal.append(vec![decision(i)])).unwrap();
    }
    drop(wal);
    let all = segments(dir.path());
    assert!(all.len() >= 3);
    std::fs::remove_file(&all[1]).unwrap();
    let error = replay(dir.path()).unwrap_err();
    assert!(error.to_string().contains("missing"), "{error}");
}
