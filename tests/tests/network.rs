//! Network faults between the coordinator and a participant, made by the harness's
//! fault proxies (this kernel has no netem; see tests/src/proxy.rs): a participant cut
//! off before its vote, one cut off after it voted YES (it must stay prepared with its
//! locks, never abort on its own, and commit after the heal), and phase-2 traffic
//! delayed while transfers go on.

use std::time::Duration;

use ratify_cli::bank::Workload;
use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_tests::proxy::LinkFault;
use ratify_tests::{
    Stack, StackOptions, add, coordinator, eventually, get, in_doubt, participant, payload, stage,
};

async fn begin(stack: &Stack) -> TxnId {
    let mut c = coordinator(&stack.coordinator.endpoint()).await.unwrap();
    let r = c
        .begin(v1::BeginRequest { timeout_ms: 0 })
        .await
        .unwrap()
        .into_inner();
    TxnId::try_from(&r.txn_id).unwrap()
}

async fn commit(stack: &Stack, txn: TxnId) -> Result<v1::Outcome, tonic::Status> {
    let mut c = coordinator(&stack.coordinator.endpoint()).await.unwrap();
    c.commit(v1::CommitTxnRequest {
        txn_id: txn.to_vec().into(),
        wait_for_phase2: false,
    })
    .await
    .map(|r| r.into_inner().outcome())
}

/// Stages `delta` on key "k" of both participants under a fresh transaction.
async fn staged_pair(stack: &Stack, delta: i64) -> TxnId {
    let txn = begin(stack).await;
    for p in &stack.participants {
        stage(&p.endpoint(), &txn.to_vec(), vec![add("k", delta, None)])
            .await
            .unwrap();
    }
    txn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_participant_cut_off_before_its_vote_makes_the_transaction_abort() {
    let stack = Stack::start(StackOptions {
        network_faults: true,
        prepare_timeout_ms: 1_000,
        ..StackOptions::default()
    });
    stack.wait_registered().await;
    let txn = staged_pair(&stack, 1).await;
    stack.links[1].cut();
    assert_eq!(
        commit(&stack, txn).await.unwrap(),
        v1::Outcome::Aborted,
        "no vote from p2 within the prepare timeout: ABORT\n{}",
        stack.logs()
    );
    stack.links[1].heal();
    stack.settle().await;
    for p in &stack.participants {
        assert_eq!(get(&p.endpoint(), "k").await.0, None);
    }
    // Nothing is left locked: the same keys commit now.
    let txn = staged_pair(&stack, 2).await;
    assert_eq!(commit(&stack, txn).await.unwrap(), v1::Outcome::Committed);
    stack.settle().await;
    for p in &stack.participants {
        assert_eq!(get(&p.endpoint(), "k").await.0.as_deref(), Some("2"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_participant_cut_off_after_voting_yes_stays_prepared_then_commits() {
    let dir = tempfile::tempdir().unwrap();
    let resume = dir.path().join("resume");
    let stack = Stack::start(StackOptions {
        network_faults: true,
        prepare_timeout_ms: 1_000,
        termination_deadline_ms: 200,
        // Every vote is in and the COMMIT decision durable: stand still right there.
        coordinator_env: vec![
            (
                "FAILPOINTS".into(),
                "coordinator::decision_durable=1*return(pause)".into(),
            ),
            (
                "RATIFY_CRASH_POINT_RESUME".into(),
                resume.display().to_string(),
            ),
        ],
        ..StackOptions::default()
    });
    stack.wait_registered().await;
    let txn = staged_pair(&stack, 7).await;
    let client = tokio::spawn({
        let endpoint = stack.coordinator.endpoint();
        async move {
            let mut c = coordinator(&endpoint).await.unwrap();
            c.commit(v1::CommitTxnRequest {
                txn_id: txn.to_vec().into(),
                wait_for_phase2: false,
            })
            .await
            .map(|r| r.into_inner().outcome())
        }
    });
    let paused = eventually(Duration::from_secs(20), || async {
        stack
            .coordinator
            .logs()
            .contains("crash point coordinator::decision_durable: paused")
    })
    .await;
    assert!(paused, "the decision was not reached\n{}", stack.logs());
    // p2 voted YES; now cut it off and let the coordinator go on.
    stack.links[1].cut();
    std::fs::write(&resume, b"").unwrap();
    assert_eq!(
        client.await.unwrap().unwrap(),
        v1::Outcome::Committed,
        "\n{}",
        stack.logs()
    );
    let p1 = stack.participants[0].endpoint();
    let p2 = stack.participants[1].endpoint();
    assert!(
        eventually(Duration::from_secs(20), || async {
            get(&p1, "k").await.0.as_deref() == Some("7")
        })
        .await,
        "p1 did not commit\n{}",
        stack.logs()
    );
    // Cut off for many times its termination deadline (200 ms), p2 keeps the branch
    // prepared and its lock held: it asks, gets no answer, and never decides alone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        in_doubt(&p2).await.unwrap(),
        vec![txn],
        "\n{}",
        stack.logs()
    );
    assert_eq!(get(&p2, "k").await.0, None);
    // (A client cannot enlist p2 now, so the lock is probed with a direct Prepare.)
    let mut direct = participant(&p2).await.unwrap();
    let probe = TxnId::generate();
    let vote = direct
        .prepare(v1::PrepareRequest {
            branches: vec![v1::PrepareBranch {
                txn_id: probe.to_vec().into(),
                epoch: u64::MAX,
                payload: payload(vec![add("k", 1, None)]),
                incarnation: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    assert_eq!(
        vote.vote(),
        v1::Vote::No,
        "the prepared branch's lock still holds"
    );
    stack.links[1].heal();
    stack.settle().await;
    assert_eq!(get(&p2, "k").await.0.as_deref(), Some("7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delayed_phase_two_traffic_keeps_every_invariant() {
    let stack = Stack::start(StackOptions {
        participants: 3,
        network_faults: true,
        prepare_timeout_ms: 2_000,
        ..StackOptions::default()
    });
    stack.wait_registered().await;
    let bank = stack.open_bank(2).await;
    // Everything the coordinator sends p1 arrives 400 ms late, p3's 150 ms late.
    stack.links[0]
        .to_participant
        .set_fault(LinkFault::Delay(Duration::from_millis(400)));
    stack.links[2]
        .to_participant
        .set_fault(LinkFault::Delay(Duration::from_millis(150)));
    let transfers = Workload::spawn(bank.clone(), 6, 11, Some(60)).join().await;
    stack.heal_all();
    let report = stack.check_bank(&bank, &transfers, "delayed phase 2").await;
    assert!(report.heard_committed > 0, "nothing committed: {report:?}");
}
