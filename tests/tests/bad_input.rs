//! Bad input (RELIABILITY.md §6 C, D and E) that the other process tests do not already
//! send: every request answered with its status, no panic, no state change, and the
//! node healthy afterwards. (coordinator_e2e.rs covers malformed and unknown ids,
//! commit after abort, lifetimes over the maximum, unregistered, duplicated and too many
//! participants, oversized payloads, re-pointing a configured name, the in-flight cap and
//! the operator's reason checks; phase_messages.rs covers §6 D at a participant.)

use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_tests::{
    Stack, StackOptions, add, admin, coordinator, coordinator_in_doubt, get, in_doubt, kv, payload,
    put,
};

fn branch(participant: &str, ops: Vec<v1::KvOp>) -> v1::ExecuteBranch {
    v1::ExecuteBranch {
        participant: participant.into(),
        payload: payload(ops),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_client_and_operator_misuse() {
    let stack = Stack::start(StackOptions::default());
    stack.wait_registered().await;
    let c = stack.coordinator.endpoint();
    let mut client = coordinator(&c).await.unwrap();

    // C1: no participants at all.
    let status = client
        .execute(v1::ExecuteRequest {
            branches: vec![],
            timeout_ms: 0,
            wait_for_phase2: true,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    // ... a participant name that is empty, too long, or full of path characters.
    for name in ["", &"p".repeat(300), "../p1", "p1\0"] {
        let status = client
            .execute(v1::ExecuteRequest {
                branches: vec![branch(name, vec![put("k", "v")])],
                timeout_ms: 0,
                wait_for_phase2: true,
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                status.code(),
                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
            ),
            "{name:?}: {status:?}"
        );
    }

    // C4: transaction ids that are empty, 10 KB long, or the nil id.
    for id in [vec![], vec![7u8; 10_000], vec![0u8; 16]] {
        let status = client
            .commit(v1::CommitTxnRequest {
                txn_id: id.clone().into(),
                wait_for_phase2: false,
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{} bytes",
            id.len()
        );
        let status = client
            .get_outcome(v1::GetOutcomeRequest {
                txn_id: id.clone().into(),
                participant: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{} bytes",
            id.len()
        );
    }

    // C6: a committed transaction: Commit again answers the same; Abort after it never
    // flips it.
    let r = client
        .execute(v1::ExecuteRequest {
            branches: vec![
                branch("p1", vec![put("x", "1")]),
                branch("p2", vec![put("y", "1")]),
            ],
            timeout_ms: 0,
            wait_for_phase2: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), v1::Outcome::Committed);
    let txn = r.txn_id.clone();
    for _ in 0..2 {
        let again = client
            .commit(v1::CommitTxnRequest {
                txn_id: txn.clone(),
                wait_for_phase2: false,
            })
            .await;
        assert_eq!(
            again.unwrap().into_inner().outcome(),
            v1::Outcome::Committed
        );
    }
    let abort = client
        .abort(v1::AbortTxnRequest {
            txn_id: txn.clone(),
            reason: "too late".into(),
        })
        .await;
    if let Ok(r) = abort {
        assert_eq!(
            r.into_inner().outcome(),
            v1::Outcome::Committed,
            "an Abort after the decision answers the real outcome"
        );
    } else {
        assert_eq!(abort.unwrap_err().code(), tonic::Code::FailedPrecondition);
    }
    let outcome = client
        .get_outcome(v1::GetOutcomeRequest {
            txn_id: txn.clone(),
            participant: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome.outcome(), v1::Outcome::Committed);

    // E2/E3: resolving a transaction already decided: refused, twice, and nothing flips.
    let mut operator = admin(&c).await.unwrap();
    for _ in 0..2 {
        let status = operator
            .resolve(v1::ResolveRequest {
                txn_id: txn.clone(),
                decision: v1::Outcome::Aborted as i32,
                reason: "force it".into(),
                actor: "test".into(),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(
                status.code(),
                tonic::Code::FailedPrecondition | tonic::Code::NotFound
            ),
            "{status:?}"
        );
    }
    // E4: a reason over 4 KB.
    let status = operator
        .resolve(v1::ResolveRequest {
            txn_id: TxnId::generate().to_vec().into(),
            decision: v1::Outcome::Aborted as i32,
            reason: "r".repeat(5000),
            actor: "test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // A decision that is not one: refused.
    let status = operator
        .resolve(v1::ResolveRequest {
            txn_id: txn.clone(),
            decision: 99,
            reason: "why".into(),
            actor: "test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // E5: listing with limits of 0 and 10⁹: answered, capped.
    for limit in [0, 1_000_000_000] {
        let list = operator
            .list_transactions(v1::ListTransactionsRequest {
                limit,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(list.transactions.len() <= 10_000);
    }

    // Nothing changed: the committed values stand, nothing is in doubt, health answers.
    let channel = tonic::transport::Endpoint::from_shared(c.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    assert_eq!(
        get(&stack.participants[0].endpoint(), "x")
            .await
            .0
            .as_deref(),
        Some("1")
    );
    assert_eq!(
        get(&stack.participants[1].endpoint(), "y")
            .await
            .0
            .as_deref(),
        Some("1")
    );
    assert!(coordinator_in_doubt(&c).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn participant_staging_misuse() {
    let stack = Stack::start(StackOptions::default());
    stack.wait_registered().await;
    let p1 = stack.participants[0].endpoint();
    let mut c = coordinator(&stack.coordinator.endpoint()).await.unwrap();
    let txn = c
        .begin(v1::BeginRequest { timeout_ms: 0 })
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    let mut store = kv(&p1).await.unwrap();
    let stage = |ops: Vec<v1::KvOp>| v1::StageRequest {
        txn_id: txn.clone(),
        ops,
    };
    // C3: an empty key; an empty operation; more operations than a branch may hold.
    let cases: Vec<(&str, Vec<v1::KvOp>)> = vec![
        ("empty key", vec![put("", "v")]),
        ("empty operation", vec![v1::KvOp { op: None }]),
        (
            "10,001 operations",
            (0..10_001).map(|i| put(&format!("k{i}"), "v")).collect(),
        ),
        ("no operations", vec![]),
    ];
    for (what, ops) in cases {
        let status = store.stage(stage(ops)).await.unwrap_err();
        assert!(
            matches!(
                status.code(),
                tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
            ),
            "{what}: {status:?}"
        );
    }
    // Staging under a transaction the coordinator does not know: refused.
    let status = store
        .stage(v1::StageRequest {
            txn_id: TxnId::generate().to_vec().into(),
            ops: vec![put("k", "v")],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::FailedPrecondition | tonic::Code::NotFound
        ),
        "{status:?}"
    );
    // After all that the transaction still commits what was validly staged, alone.
    store.stage(stage(vec![add("n", 5, None)])).await.unwrap();
    let r = c
        .commit(v1::CommitTxnRequest {
            txn_id: txn.clone(),
            wait_for_phase2: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), v1::Outcome::Committed);
    assert_eq!(get(&p1, "n").await.0.as_deref(), Some("5"));
    assert_eq!(get(&p1, "k").await.0, None);
    assert!(in_doubt(&p1).await.unwrap().is_empty());
}
