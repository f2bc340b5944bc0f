//! fsync failing with EIO, through an LD_PRELOAD shim (tests/shim/fsync_eio.c, built here
//! with the system C compiler): mid-workload, every fsync/fdatasync of one process starts
//! failing. That process must stop (never retry the fsync and go on, since the page cache
//! can no longer be trusted), and after a restart on healthy storage nothing it
//! acknowledged is lost: the bank checker holds.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ratify_cli::bank::Workload;
use ratify_tests::{Proc, Stack, StackOptions};

fn build_shim(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("shim/fsync_eio.c");
    let library = dir.join("libfsync_eio.so");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .status()
        .expect("these tests need a C compiler (`cc`) to build the fsync shim");
    assert!(status.success(), "building {} failed", source.display());
    library
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Coordinator,
    /// Participant p2.
    Participant,
}

fn target(stack: &mut Stack, target: Target) -> &mut Proc {
    match target {
        Target::Coordinator => &mut stack.coordinator,
        Target::Participant => &mut stack.participants[1],
    }
}

async fn fsync_fails_mid_workload(which: Target) {
    let shim_dir = tempfile::tempdir().unwrap();
    let shim = build_shim(shim_dir.path()).display().to_string();
    let trigger = shim_dir.path().join("eio");
    let preload = vec![
        ("LD_PRELOAD".to_string(), shim.clone()),
        (
            "RATIFY_EIO_TRIGGER".to_string(),
            trigger.display().to_string(),
        ),
    ];
    let mut options = StackOptions {
        participants: 3,
        ..StackOptions::default()
    };
    match which {
        Target::Coordinator => options.coordinator_env = preload,
        Target::Participant => {
            options.participant_env = preload.into_iter().map(|(k, v)| (1, k, v)).collect();
        }
    }
    let mut stack = Stack::start(options);
    stack.wait_registered().await;
    let bank = stack.open_bank(2).await;
    let workload = Workload::spawn(bank.clone(), 4, 3, None);
    let done = workload.done.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::Relaxed) < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The disk starts failing every fsync.
    std::fs::write(&trigger, b"").unwrap();
    let status = tokio::task::block_in_place(|| {
        target(&mut stack, which).wait_exit(Duration::from_secs(30))
    });
    assert!(
        status.is_some_and(|s| !s.success()),
        "{which:?} kept running after fsync failed: {status:?}\n{}",
        stack.logs()
    );
    let logs = target(&mut stack, which).logs();
    assert!(
        logs.contains("Input/output error") || logs.contains("os error 5"),
        "the stop does not name the I/O error\n{logs}"
    );

    // Healthy storage again: restart without the shim, go on, then check.
    tokio::task::block_in_place(|| target(&mut stack, which).restart(&[]));
    let committed = workload.committed.clone();
    let committed_before = committed.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while committed.load(Ordering::Relaxed) < committed_before + 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let transfers = workload.finish().await;
    assert!(
        committed.load(Ordering::Relaxed) >= committed_before + 5,
        "nothing committed after the restart\n{}",
        stack.logs()
    );
    stack
        .check_bank(&bank, &transfers, &format!("fsync EIO in the {which:?}"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_coordinator_stops_when_fsync_fails_and_loses_nothing_acknowledged() {
    fsync_fails_mid_workload(Target::Coordinator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_participant_stops_when_fsync_fails_and_loses_nothing_acknowledged() {
    fsync_fails_mid_workload(Target::Participant).await;
}

/// A decision log damaged before its tail: the coordinator process refuses to start and
/// says which file and offset, instead of serving with a decision silently dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_with_a_damaged_log_refuses_to_start_naming_the_damage() {
    let mut stack = Stack::start(StackOptions {
        participants: 3,
        ..StackOptions::default()
    });
    stack.wait_registered().await;
    let bank = stack.open_bank(2).await;
    let transfers = Workload::spawn(bank.clone(), 2, 5, Some(30)).join().await;
    assert!(transfers.iter().any(|t| t.txn.is_some()));
    stack.coordinator.kill9();
    let wal_dir = stack.dir.path().join("coordinator");
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    let segment = segments.pop().expect("a WAL segment");
    let mut bytes = std::fs::read(&segment).unwrap();
    // The frames end before the file does (zero-filled space follows them).
    let written = ratify_coordinator::log::frame::scan_segment(&bytes)
        .unwrap()
        .valid_len;
    assert!(written > 200, "the segment holds records");
    // Zero a run of bytes a third of the way into the frames: well before the tail.
    let at = written / 3;
    bytes[at..at + 16].fill(0);
    std::fs::write(&segment, &bytes).unwrap();
    let error = tokio::task::block_in_place(|| stack.coordinator.try_restart(&[]))
        .expect_err("the coordinator started on a damaged log");
    assert!(
        error.contains(&segment.display().to_string()) && error.contains("offset"),
        "the refusal does not name the file and offset:\n{error}"
    );
}

/// The journal segment of a participant's data directory with the most frames (each the
/// records of one write), and how many it has.
fn largest_journal_segment(data_dir: &Path) -> Option<(PathBuf, usize)> {
    std::fs::read_dir(data_dir.join("journal"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_default();
            let mut frames = 0;
            ratify_proto::frame::scan_frames(&bytes, |_| {
                frames += 1;
                Ok(())
            });
            (p, frames)
        })
        .max_by_key(|(_, frames)| *frames)
}

/// A participant journal damaged before its tail: the participant process refuses to
/// start and says which file and offset, instead of serving with a YES vote or a carried
/// out commit silently dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_participant_with_a_damaged_journal_refuses_to_start_naming_the_damage() {
    let mut stack = Stack::start(StackOptions {
        participants: 3,
        ..StackOptions::default()
    });
    stack.wait_registered().await;
    let bank = stack.open_bank(2).await;
    let data_dir = stack.dir.path().join("p2");
    // A checkpoint (once a second) starts a fresh segment: kill the participant while the
    // workload runs, and again until a segment holds a few frames.
    let mut segment = None;
    for _ in 0..10 {
        let workload = Workload::spawn(bank.clone(), 4, 3, None);
        let done = workload.done.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        while done.load(Ordering::Relaxed) < 30 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stack.participants[1].kill9();
        workload.finish().await;
        if let Some((path, frames)) = largest_journal_segment(&data_dir)
            && frames >= 3
        {
            segment = Some(path);
            break;
        }
        tokio::task::block_in_place(|| stack.participants[1].restart(&[]));
    }
    let segment = segment.expect("a journal segment holding records");
    let mut bytes = std::fs::read(&segment).unwrap();
    // Zero a run of bytes in the first frame (the records of the first write), well
    // before the tail: frames follow it.
    let at = ratify_proto::frame::HEADER_LEN + 4;
    bytes[at..at + 16].fill(0);
    std::fs::write(&segment, &bytes).unwrap();
    let error = tokio::task::block_in_place(|| stack.participants[1].try_restart(&[]))
        .expect_err("the participant started on a damaged journal");
    assert!(
        error.contains(&segment.display().to_string()) && error.contains("offset"),
        "the refusal does not name the file and offset:\n{error}"
    );
}
