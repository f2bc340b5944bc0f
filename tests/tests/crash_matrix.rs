//! The crash-point matrix: every crash point of the coordinator and of a sled
//! participant, each run three ways while the bank workload runs over three participants:
//!
//! - **owner**: the process that owns the point aborts there;
//! - **peer**: the owner stands still at the point while the test SIGKILLs a peer (the
//!   coordinator for a participant's point, participant p1 for the coordinator's) and
//!   restarts it, then the owner goes on;
//! - **both**: the owner aborts at the point and the peer is SIGKILLed with it.
//!
//! Then every fault heals and the bank checker runs: money conserved, each transfer on
//! both sides or neither, every answer the clients heard true, nothing left in doubt,
//! every lock released. Each scenario also asserts that its point was reached, so a
//! renamed or unreachable point fails instead of passing vacuously.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ratify_cli::bank::Workload;
use ratify_tests::{Proc, Stack, StackOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Coordinator,
    /// Participant p2 (index 1); its peer is the coordinator.
    Participant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Owner,
    Peer,
    Both,
}

fn owner_proc(stack: &mut Stack, owner: Owner) -> &mut Proc {
    match owner {
        Owner::Coordinator => &mut stack.coordinator,
        Owner::Participant => &mut stack.participants[1],
    }
}

fn peer_proc(stack: &mut Stack, owner: Owner) -> &mut Proc {
    match owner {
        Owner::Coordinator => &mut stack.participants[0],
        Owner::Participant => &mut stack.coordinator,
    }
}

async fn wait_until(bound: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

async fn scenario(point: &'static str, owner: Owner, way: Way) {
    let mut stack = Stack::start(StackOptions {
        participants: 3,
        prepare_timeout_ms: 2_000,
        // Small WAL segments, so checkpoints (and their crash point) come often.
        coordinator_args: vec!["--segment-bytes".into(), "4096".into()],
        ..StackOptions::default()
    });
    stack.wait_registered().await;
    // One account per participant: every transfer spans two participants.
    let bank = stack.open_bank(1).await;

    let resume = stack.dir.path().join("resume");
    let resume_path = resume.display().to_string();
    let action = match way {
        Way::Peer => "1*return(pause)",
        Way::Owner | Way::Both => "return",
    };
    let failpoints = format!("{point}={action}");
    let mut env: Vec<(&str, &str)> = vec![
        ("FAILPOINTS", &failpoints),
        ("RATIFY_CRASH_POINT_RESUME", &resume_path),
    ];
    if point == "participant::tombstone_gc" {
        // Keep only two tombstones, so the collector drops some every second.
        env.push(("RATIFY_PARTICIPANT_MAX_TOMBSTONES", "2"));
    }

    let workload = Workload::spawn(bank.clone(), 4, 7, None);
    // Arm the point by restarting its owner with it set, mid-workload (so a recovery
    // point has transactions in flight to recover).
    let done = workload.done.clone();
    assert!(
        wait_until(Duration::from_secs(60), || done.load(Ordering::Relaxed)
            >= 10)
        .await,
        "the workload did not start\n{}",
        stack.logs()
    );
    // The restart does not wait for the owner to listen: besides the recovery points,
    // writes and phase-2 traffic of recovered transactions can reach a point before it
    // serves.
    let log_len_before = owner_proc(&mut stack, owner).logs().len();
    owner_proc(&mut stack, owner)
        .restart_no_wait(&env)
        .expect("restarting the owner");

    // Wait for the point: its marker in the owner's log (and, for a crash, the exit).
    let marker = match way {
        Way::Peer => format!("crash point {point}: paused"),
        Way::Owner | Way::Both => format!("crash point {point}: abort"),
    };
    let reached = wait_until(Duration::from_secs(60), || {
        let proc = owner_proc(&mut stack, owner);
        proc.logs()[log_len_before..].contains(&marker) && (way == Way::Peer || !proc.is_running())
    })
    .await;
    assert!(
        reached,
        "crash point {point} was not reached ({way:?})\n{}",
        stack.logs()
    );

    // Crash the peer too, then bring every crashed process back.
    if way != Way::Owner {
        peer_proc(&mut stack, owner).kill9();
        tokio::time::sleep(Duration::from_millis(200)).await;
        tokio::task::block_in_place(|| peer_proc(&mut stack, owner).restart(&[]));
    }
    match way {
        Way::Peer => std::fs::write(&resume, b"").expect("writing the resume file"),
        Way::Owner | Way::Both => {
            tokio::task::block_in_place(|| owner_proc(&mut stack, owner).restart(&[]))
        }
    }

    // A few more transfers after the recovery, then heal and check.
    let after = done.load(Ordering::Relaxed) + 10;
    let progressed = wait_until(Duration::from_secs(60), || {
        done.load(Ordering::Relaxed) >= after
    })
    .await;
    let transfers = workload.finish().await;
    assert!(
        progressed,
        "no transfer completed after the recovery\n{}",
        stack.logs()
    );
    stack
        .check_bank(&bank, &transfers, &format!("{point} ({way:?})"))
        .await;
    assert!(
        stack.coordinator.is_running() && stack.participants.iter_mut().all(|p| p.is_running()),
        "a process stopped by itself\n{}",
        stack.logs()
    );
}

macro_rules! matrix {
    ($($test:ident: $point:literal, $owner:ident;)*) => {
        mod owner_crashes {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    scenario($point, Owner::$owner, Way::Owner).await;
                }
            )*
        }
        mod peer_crashes {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    scenario($point, Owner::$owner, Way::Peer).await;
                }
            )*
        }
        mod both_crash {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    scenario($point, Owner::$owner, Way::Both).await;
                }
            )*
        }
    };
}

matrix! {
    c2_vote_received: "coordinator::vote_received", Coordinator;
    c3_decision_reached: "coordinator::decision_reached", Coordinator;
    c4_torn_decision_record: "coordinator::wal::torn_write", Coordinator;
    c5_decision_durable: "coordinator::decision_durable", Coordinator;
    c6_phase2_acknowledged: "coordinator::phase2_acknowledged", Coordinator;
    c7_before_end: "coordinator::before_end", Coordinator;
    c8_checkpoint: "coordinator::wal::checkpoint", Coordinator;
    c11_recovery: "coordinator::recovery", Coordinator;
    p1_prepare_received: "participant::prepare::received", Participant;
    p2_prepare_written: "participant::prepare::written", Participant;
    p3_prepare_flushed: "participant::prepare::flushed", Participant;
    p5_commit_received: "participant::commit::received", Participant;
    p6_commit_installed: "participant::commit::installed", Participant;
    p6_commit_applied: "participant::commit::applied", Participant;
    p7_abort_received: "participant::abort::received", Participant;
    p8_recovery: "participant::recovery", Participant;
    p9_tombstone_gc: "participant::tombstone_gc", Participant;
}
