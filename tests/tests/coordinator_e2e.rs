//! A real coordinator and real participants over gRPC on loopback: transactions commit
//! atomically, NO votes abort, and bad input gets its status with no state change.

use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_tests::{
    Stack, StackOptions, add, admin, coordinator, coordinator_in_doubt, get, in_doubt, payload,
    put, stage,
};

fn execute_branch(participant: &str, ops: Vec<v1::KvOp>) -> v1::ExecuteBranch {
    v1::ExecuteBranch {
        participant: participant.into(),
        payload: payload(ops),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn transfers_commit_on_both_sides_or_neither() {
    let stack = Stack::start(StackOptions::default());
    stack.wait_registered().await;
    let (p1, p2) = (
        stack.participants[0].endpoint(),
        stack.participants[1].endpoint(),
    );
    let mut client = coordinator(&stack.coordinator.endpoint()).await.unwrap();

    // One-shot: payloads ride on the prepares.
    let opened = client
        .execute(v1::ExecuteRequest {
            branches: vec![
                execute_branch("p1", vec![put("alice", "100")]),
                execute_branch("p2", vec![put("bob", "0")]),
            ],
            timeout_ms: 0,
            wait_for_phase2: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.outcome(), v1::Outcome::Committed, "{opened:?}");
    assert_eq!(get(&p1, "alice").await.0.as_deref(), Some("100"));
    assert_eq!(get(&p2, "bob").await.0.as_deref(), Some("0"));

    // Interactive: the participants enlist themselves on the first staged write.
    let txn = client
        .begin(v1::BeginRequest { timeout_ms: 0 })
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    stage(&p1, &txn, vec![add("alice", -30, Some(0))])
        .await
        .unwrap();
    stage(&p2, &txn, vec![add("bob", 30, None)]).await.unwrap();
    let committed = client
        .commit(v1::CommitTxnRequest {
            txn_id: txn.clone(),
            wait_for_phase2: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(committed.outcome(), v1::Outcome::Committed, "{committed:?}");
    stack.settle().await;
    assert_eq!(get(&p1, "alice").await, (Some("70".into()), 2));
    assert_eq!(get(&p2, "bob").await, (Some("30".into()), 2));
    let outcome = client
        .get_outcome(v1::GetOutcomeRequest {
            txn_id: txn.clone(),
            participant: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome.outcome(), v1::Outcome::Committed);
    // A duplicate Commit answers the real outcome.
    let again = client
        .commit(v1::CommitTxnRequest {
            txn_id: txn,
            wait_for_phase2: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.outcome(), v1::Outcome::Committed);

    // An overdraft: p1 votes NO, so p2's credit must not apply either.
    let txn = client
        .begin(v1::BeginRequest { timeout_ms: 0 })
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    stage(&p1, &txn, vec![add("alice", -1000, Some(0))])
        .await
        .unwrap();
    stage(&p2, &txn, vec![add("bob", 1000, None)])
        .await
        .unwrap();
    let aborted = client
        .commit(v1::CommitTxnRequest {
            txn_id: txn.clone(),
            wait_for_phase2: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(aborted.outcome(), v1::Outcome::Aborted);
    assert!(
        aborted.reason.contains("below its bound"),
        "{}",
        aborted.reason
    );
    stack.settle().await;
    assert_eq!(get(&p1, "alice").await, (Some("70".into()), 2));
    assert_eq!(get(&p2, "bob").await, (Some("30".into()), 2));
    // A commit of an aborted transaction answers ABORTED (the commit was asked for).
    let again = client
        .commit(v1::CommitTxnRequest {
            txn_id: txn,
            wait_for_phase2: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.outcome(), v1::Outcome::Aborted);

    // One participant: one-phase commit.
    let solo = client
        .execute(v1::ExecuteRequest {
            branches: vec![execute_branch("p2", vec![add("bob", 1, None)])],
            timeout_ms: 0,
            wait_for_phase2: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(solo.outcome(), v1::Outcome::Committed);
    assert_eq!(get(&p2, "bob").await, (Some("31".into()), 3));
}

#[tokio::test(flavor = "multi_thread")]
async fn get_outcome_presumes_abort_only_for_participants() {
    let stack = Stack::start(StackOptions::default());
    let mut client = coordinator(&stack.coordinator.endpoint()).await.unwrap();
    let unknown = TxnId::generate().to_vec();
    let for_participant = client
        .get_outcome(v1::GetOutcomeRequest {
            txn_id: unknown.clone().into(),
            participant: "p1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(for_participant.outcome(), v1::Outcome::Aborted);
    let for_client = client
        .get_outcome(v1::GetOutcomeRequest {
            txn_id: unknown.into(),
            participant: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(for_client.outcome(), v1::Outcome::Unknown);
    // A transaction the coordinator holds is IN_PROGRESS, never ABORTED.
    let txn = client
        .begin(v1::BeginRequest { timeout_ms: 0 })
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    let held = client
        .get_outcome(v1::GetOutcomeRequest {
            txn_id: txn,
            participant: "p1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(held.outcome(), v1::Outcome::InProgress);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_its_status_and_changes_nothing() {
    let stack = Stack::start(StackOptions {
        coordinator_args: vec![
            "--max-in-flight".into(),
            "3".into(),
            "--max-participants".into(),
            "4".into(),
        ],
        ..StackOptions::default()
    });
    stack.wait_registered().await;
    let c = stack.coordinator.endpoint();
    let mut client = coordinator(&c).await.unwrap();
    let code =
        |r: Result<tonic::Response<v1::CommitTxnResponse>, tonic::Status>| r.unwrap_err().code();

    // Malformed and unknown ids.
    assert_eq!(
        code(
            client
                .commit(v1::CommitTxnRequest {
                    txn_id: vec![1, 2, 3].into(),
                    wait_for_phase2: false
                })
                .await
        ),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(
            client
                .commit(v1::CommitTxnRequest {
                    txn_id: TxnId::generate().to_vec().into(),
                    wait_for_phase2: false
                })
                .await
        ),
        tonic::Code::NotFound
    );
    // Commit after a client Abort.
    let txn = client
        .begin(v1::BeginRequest { timeout_ms: 0 })
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    client
        .abort(v1::AbortTxnRequest {
            txn_id: txn.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        code(
            client
                .commit(v1::CommitTxnRequest {
                    txn_id: txn.clone(),
                    wait_for_phase2: false
                })
                .await
        ),
        tonic::Code::FailedPrecondition
    );
    // A lifetime over the maximum.
    let status = client
        .begin(v1::BeginRequest {
            timeout_ms: u64::MAX,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // Participants: unregistered, duplicated, too many, oversized payloads, and a client
    // trying to point a configured name elsewhere.
    let exec = |branches: Vec<v1::ExecuteBranch>| v1::ExecuteRequest {
        branches,
        timeout_ms: 0,
        wait_for_phase2: false,
    };
    let status = client
        .execute(exec(vec![execute_branch("nobody", vec![put("a", "b")])]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let status = client
        .execute(exec(vec![
            execute_branch("p1", vec![put("a", "b")]),
            execute_branch("p1", vec![put("c", "d")]),
        ]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = client
        .execute(exec(vec![v1::ExecuteBranch {
            participant: "p1".into(),
            payload: vec![0u8; 2 << 20].into(),
        }]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = client
        .execute(exec(vec![execute_branch("../etc", vec![])]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let txn = client
        .begin(v1::BeginRequest { timeout_ms: 0 })
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    for i in 0..4 {
        client
            .enlist(v1::EnlistRequest {
                txn_id: txn.clone(),
                participant: format!("extra{i}"),
                endpoint: "http://127.0.0.1:9".into(),
                incarnation: 1,
            })
            .await
            .unwrap();
    }
    let status = client
        .enlist(v1::EnlistRequest {
            txn_id: txn.clone(),
            participant: "extra9".into(),
            endpoint: "http://127.0.0.1:9".into(),
            incarnation: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let status = client
        .enlist(v1::EnlistRequest {
            txn_id: txn.clone(),
            participant: "x".into(),
            endpoint: "file:///etc/passwd".into(),
            incarnation: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // Transactions in flight: 1 held above; 2 more fill the limit of 3.
    for _ in 0..2 {
        client
            .begin(v1::BeginRequest { timeout_ms: 0 })
            .await
            .unwrap();
    }
    let status = client
        .begin(v1::BeginRequest { timeout_ms: 0 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);

    // Admin: resolve needs a reason, refuses unknown transactions and control characters.
    let mut admin = admin(&c).await.unwrap();
    let resolve = |txn_id: Vec<u8>, reason: &str| v1::ResolveRequest {
        txn_id: txn_id.into(),
        decision: v1::Outcome::Aborted as i32,
        reason: reason.into(),
        actor: "test".into(),
    };
    assert_eq!(
        admin
            .resolve(resolve(txn.to_vec(), ""))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        admin
            .resolve(resolve(txn.to_vec(), "\u{1b}[31mred"))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        admin
            .resolve(resolve(TxnId::generate().to_vec(), "why"))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    // Nothing above prepared anything anywhere.
    for p in &stack.participants {
        assert!(in_doubt(&p.endpoint()).await.unwrap().is_empty());
    }
    assert!(coordinator_in_doubt(&c).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_can_abort_a_stuck_transaction_and_health_answers() {
    let stack = Stack::start(StackOptions::default());
    stack.wait_registered().await;
    let c = stack.coordinator.endpoint();
    let mut client = coordinator(&c).await.unwrap();
    let txn = client
        .begin(v1::BeginRequest { timeout_ms: 0 })
        .await
        .unwrap()
        .into_inner()
        .txn_id;
    stage(
        &stack.participants[0].endpoint(),
        &txn,
        vec![put("held", "1")],
    )
    .await
    .unwrap();
    let mut admin = admin(&c).await.unwrap();
    let resolved = admin
        .resolve(v1::ResolveRequest {
            txn_id: txn.clone(),
            decision: v1::Outcome::Aborted as i32,
            reason: "client vanished".into(),
            actor: "ops".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.outcome(), v1::Outcome::Aborted);
    let status = client
        .commit(v1::CommitTxnRequest {
            txn_id: txn.clone(),
            wait_for_phase2: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    // The staged write was discarded: a new transaction on the key commits.
    let again = client
        .execute(v1::ExecuteRequest {
            branches: vec![execute_branch("p1", vec![put("held", "2")])],
            timeout_ms: 0,
            wait_for_phase2: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.outcome(), v1::Outcome::Committed);

    let channel = tonic::transport::Endpoint::from_shared(c)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ratify.v1.Coordinator".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_served_for_prometheus() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let stack = Stack::start(StackOptions {
        coordinator_args: vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")],
        ..StackOptions::default()
    });
    stack.wait_registered().await;
    let mut client = coordinator(&stack.coordinator.endpoint()).await.unwrap();
    let r = client
        .execute(v1::ExecuteRequest {
            branches: vec![
                execute_branch("p1", vec![put("m", "1")]),
                execute_branch("p2", vec![put("m", "1")]),
            ],
            timeout_ms: 0,
            wait_for_phase2: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outcome(), v1::Outcome::Committed);
    let body = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        body
    })
    .await
    .unwrap();
    for metric in [
        "ratify_decisions_total",
        "ratify_commit_latency_seconds",
        "ratify_wal_fsync_seconds",
        "ratify_wal_batch_records",
    ] {
        assert!(
            body.contains(metric),
            "{metric} missing from /metrics:\n{body}"
        );
    }
    assert!(
        body.contains("ratify_decisions_total{outcome=\"committed\"} 1"),
        "{body}"
    );
}
