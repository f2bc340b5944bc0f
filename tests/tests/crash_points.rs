//! Crash points of the coordinator (the `fail` crate, compiled into the test build's
//! binaries): the coordinator aborts itself at the point, is restarted on its data, and
//! every participant ends in the logged outcome with its locks released.

use std::time::Duration;

use ratify_proto::v1;
use ratify_tests::{Stack, StackOptions, add, coordinator, get, payload, put, stage};

/// Opens balances with one-phase commits (these pass none of the crash points).
async fn open_accounts(stack: &Stack) {
    stack.wait_registered().await;
    let mut client = coordinator(&stack.coordinator.endpoint()).await.unwrap();
    for (p, key) in [("p1", "a"), ("p2", "b")] {
        let r = client
            .execute(v1::ExecuteRequest {
                branches: vec![v1::ExecuteBranch {
                    participant: p.into(),
                    payload: payload(vec![put(key, "100")]),
                }],
                timeout_ms: 0,
                wait_for_phase2: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.outcome(), v1::Outcome::Committed);
    }
}

/// Moves 10 from a (on p1) to b (on p2); returns the client's answer, if it got one.
async fn transfer(stack: &Stack) -> Option<v1::Outcome> {
    let mut client = coordinator(&stack.coordinator.endpoint()).await.unwrap();
    let txn = client
        .begin(v1::BeginRequest { timeout_ms: 0 })
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    stage(
        &stack.participants[0].endpoint(),
        &txn,
        vec![add("a", -10, Some(0))],
    )
    .await
    .unwrap();
    stage(
        &stack.participants[1].endpoint(),
        &txn,
        vec![add("b", 10, None)],
    )
    .await
    .unwrap();
    client
        .commit(v1::CommitTxnRequest {
            txn_id: txn,
            wait_for_phase2: false,
        })
        .await
        .ok()
        .map(|r| r.into_inner().outcome())
}

async fn balances(stack: &Stack) -> (String, String) {
    (
        get(&stack.participants[0].endpoint(), "a")
            .await
            .0
            .unwrap_or_default(),
        get(&stack.participants[1].endpoint(), "b")
            .await
            .0
            .unwrap_or_default(),
    )
}

/// Runs a transfer into the crash point, restarts the coordinator (optionally into a
/// second crash point during recovery), and checks that the committed transfer is applied
/// on both sides and nothing stays locked.
async fn crash_then_recover(point: &str, during_recovery: bool) {
    let failpoint = format!("{point}=return");
    let mut stack = Stack::start(StackOptions {
        coordinator_env: vec![("FAILPOINTS".into(), failpoint)],
        ..StackOptions::default()
    });
    open_accounts(&stack).await;
    let answer = transfer(&stack).await;
    let status = stack.coordinator.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the coordinator did not stop at {point}\n{}",
        stack.logs()
    );
    if during_recovery {
        let status = stack.coordinator.restart_into_crash(
            &[("FAILPOINTS", "coordinator::recovery=return")],
            Duration::from_secs(30),
        );
        assert!(
            status.is_some_and(|s| !s.success()),
            "no crash inside recovery\n{}",
            stack.logs()
        );
    }
    stack.coordinator.restart(&[]);
    stack.settle().await;

    // Every crash point here lies after the COMMIT decision was durable: the transfer
    // must be applied on both sides, exactly once.
    assert_eq!(
        balances(&stack).await,
        ("90".to_string(), "110".to_string()),
        "\n{}",
        stack.logs()
    );
    if let Some(answer) = answer {
        assert_eq!(
            answer,
            v1::Outcome::Committed,
            "the client heard something else than the outcome"
        );
    }
    // The locks are free: the next transfer commits.
    assert_eq!(
        transfer(&stack).await,
        Some(v1::Outcome::Committed),
        "\n{}",
        stack.logs()
    );
    stack.settle().await;
    assert_eq!(
        balances(&stack).await,
        ("80".to_string(), "120".to_string())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_the_decision_is_durable_before_any_commit_is_sent() {
    crash_then_recover("coordinator::decision_durable", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_commit_reached_one_of_two_participants() {
    crash_then_recover("coordinator::phase2_acknowledged", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_all_acknowledgements_before_end() {
    crash_then_recover("coordinator::before_end", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_inside_recovery() {
    crash_then_recover("coordinator::decision_durable", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_while_the_decision_record_is_half_written_aborts_by_presumption() {
    let mut stack = Stack::start(StackOptions {
        coordinator_env: vec![(
            "FAILPOINTS".into(),
            "coordinator::wal::torn_write=return".into(),
        )],
        ..StackOptions::default()
    });
    open_accounts(&stack).await;
    let answer = transfer(&stack).await;
    assert_eq!(
        answer, None,
        "no answer can leave before the decision is durable"
    );
    assert!(
        stack
            .coordinator
            .wait_exit(Duration::from_secs(30))
            .is_some_and(|s| !s.success())
    );
    stack.coordinator.restart(&[]);
    // The torn record is cut off on open: no decision, so the prepared branches hear
    // ABORTED through the termination protocol and release their locks.
    stack.settle().await;
    assert_eq!(
        balances(&stack).await,
        ("100".to_string(), "100".to_string()),
        "\n{}",
        stack.logs()
    );
    assert!(
        stack.coordinator.logs().contains("truncating a torn tail"),
        "{}",
        stack.coordinator.logs()
    );
    assert_eq!(transfer(&stack).await, Some(v1::Outcome::Committed));
}
