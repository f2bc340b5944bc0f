//! Late, duplicated and out-of-order phase messages against a real participant process
//! (RELIABILITY.md §6 D, invariant I7). The test plays the coordinator: it sends
//! Prepare, Commit and Abort itself, in the orders a network with retries, delays and a
//! restarted coordinator can produce. Every anomaly must be answered with its status and
//! leave no extra effect; above all a late Commit of T must never touch T′, a later
//! transaction prepared on the same keys (the Kafka transaction bug).

use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_tests::{Proc, add, binary, get, in_doubt, participant, payload, put};

fn start(dir: &std::path::Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--data-dir".to_string(),
        dir.join("data").display().to_string(),
        "--name".into(),
        "solo".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::start(
        "participant",
        binary("ratify-participant"),
        args,
        "127.0.0.1:0",
        &[],
        dir.join("participant.log"),
    )
}

async fn prepare_at(
    endpoint: &str,
    txn: TxnId,
    epoch: u64,
    ops: Vec<v1::KvOp>,
) -> Result<v1::PrepareResult, tonic::Status> {
    let mut client = participant(endpoint).await.unwrap();
    let mut response = client
        .prepare(v1::PrepareRequest {
            branches: vec![v1::PrepareBranch {
                txn_id: txn.to_vec().into(),
                epoch,
                payload: payload(ops),
                incarnation: 0,
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(response.results.remove(0))
}

/// Sends a decision; returns the branch's error code (Ok when applied or already so).
async fn decide_at(endpoint: &str, txn: TxnId, epoch: u64, commit: bool) -> tonic::Code {
    let mut client = participant(endpoint).await.unwrap();
    let branches = vec![v1::DecisionBranch {
        txn_id: txn.to_vec().into(),
        epoch,
    }];
    let results = if commit {
        client
            .commit(v1::CommitRequest { branches })
            .await
            .unwrap()
            .into_inner()
            .results
    } else {
        client
            .abort(v1::AbortRequest { branches })
            .await
            .unwrap()
            .into_inner()
            .results
    };
    results[0]
        .error
        .as_ref()
        .map_or(tonic::Code::Ok, |e| tonic::Code::from_i32(e.code))
}

/// A NO vote or a refusal by the participant (never a transport failure).
fn is_no(result: &Result<v1::PrepareResult, tonic::Status>) -> bool {
    let refusal = |code: tonic::Code| {
        matches!(
            code,
            tonic::Code::FailedPrecondition
                | tonic::Code::ResourceExhausted
                | tonic::Code::AlreadyExists
                | tonic::Code::Aborted
        )
    };
    match result {
        Ok(r) => match &r.error {
            Some(e) => refusal(tonic::Code::from_i32(e.code)),
            None => r.vote() == v1::Vote::No,
        },
        Err(status) => refusal(status.code()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_commit_of_t_never_touches_a_later_transaction_on_the_same_keys() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let e = p.endpoint();
    let (t, t2) = (TxnId::generate(), TxnId::generate());
    // T prepares x := "T", then the coordinator decides ABORT (e.g. another branch voted
    // NO) and the Abort arrives; its Commit was never sent... but a confused or replayed
    // Commit of T arrives late, after T′ prepared x := "T2".
    let r = prepare_at(&e, t, 1, vec![put("x", "T")]).await.unwrap();
    assert_eq!(r.vote(), v1::Vote::Yes);
    assert_eq!(decide_at(&e, t, 1, false).await, tonic::Code::Ok);
    let r = prepare_at(&e, t2, 2, vec![put("x", "T2")]).await.unwrap();
    assert_eq!(
        r.vote(),
        v1::Vote::Yes,
        "T's locks were released by its abort"
    );
    let late = decide_at(&e, t, 1, true).await;
    assert_eq!(
        late,
        tonic::Code::FailedPrecondition,
        "a Commit of an aborted branch is refused"
    );
    assert_eq!(get(&e, "x").await.0, None, "T′ is still only prepared");
    assert_eq!(in_doubt(&e).await.unwrap(), vec![t2]);
    // A delayed Abort of T (a duplicate) must not abort T′ either.
    assert_eq!(decide_at(&e, t, 1, false).await, tonic::Code::Ok);
    assert_eq!(in_doubt(&e).await.unwrap(), vec![t2]);
    assert_eq!(decide_at(&e, t2, 2, true).await, tonic::Code::Ok);
    assert_eq!(get(&e, "x").await.0.as_deref(), Some("T2"));
    // Replayed Commits of T′ (duplicates) are answered Ok and change nothing.
    for _ in 0..3 {
        assert_eq!(decide_at(&e, t2, 2, true).await, tonic::Code::Ok);
    }
    assert_eq!(get(&e, "x").await.0.as_deref(), Some("T2"));
    // An Abort arriving after the Commit cannot undo it.
    assert_ne!(decide_at(&e, t2, 2, false).await, tonic::Code::Ok);
    assert_eq!(get(&e, "x").await.0.as_deref(), Some("T2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicated_and_out_of_order_prepares_and_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &["--max-prepared", "2"]);
    let e = p.endpoint();

    // D1: Prepare twice with the same payload: the same vote, one prepared branch.
    let t = TxnId::generate();
    let ops = vec![add("acct", 5, None)];
    assert_eq!(
        prepare_at(&e, t, 1, ops.clone()).await.unwrap().vote(),
        v1::Vote::Yes
    );
    assert_eq!(
        prepare_at(&e, t, 1, ops.clone()).await.unwrap().vote(),
        v1::Vote::Yes
    );
    assert_eq!(in_doubt(&e).await.unwrap(), vec![t]);
    // ... with a different payload under the same id: refused, the first one stands.
    assert!(is_no(
        &prepare_at(&e, t, 1, vec![add("acct", 500, None)]).await
    ));
    assert_eq!(in_doubt(&e).await.unwrap(), vec![t]);
    // D4: a decision from an older epoch than the one that prepared: refused.
    let t_new_epoch = TxnId::generate();
    assert_eq!(
        prepare_at(&e, t_new_epoch, 5, vec![put("e", "1")])
            .await
            .unwrap()
            .vote(),
        v1::Vote::Yes
    );
    assert_ne!(decide_at(&e, t_new_epoch, 4, true).await, tonic::Code::Ok);
    assert_ne!(decide_at(&e, t_new_epoch, 4, false).await, tonic::Code::Ok);
    assert_eq!(get(&e, "e").await.0, None);
    assert!(in_doubt(&e).await.unwrap().contains(&t_new_epoch));
    // D6: over --max-prepared 2: refused, nothing prepared.
    let t_over = TxnId::generate();
    assert!(is_no(&prepare_at(&e, t_over, 1, vec![put("o", "1")]).await));
    assert!(!in_doubt(&e).await.unwrap().contains(&t_over));
    // D7: a conflicting Prepare on a key a prepared branch holds: NO, never an overwrite.
    assert_eq!(decide_at(&e, t_new_epoch, 5, true).await, tonic::Code::Ok);
    let t_conflict = TxnId::generate();
    assert!(is_no(
        &prepare_at(&e, t_conflict, 1, vec![put("acct", "7")]).await
    ));
    // The first branch commits exactly once, however often its Commit is repeated.
    for _ in 0..3 {
        assert_eq!(decide_at(&e, t, 1, true).await, tonic::Code::Ok);
    }
    assert_eq!(get(&e, "acct").await.0.as_deref(), Some("5"));

    // D2: Abort of an unknown transaction records it (null compensation) ...
    let t_hanging = TxnId::generate();
    assert_eq!(decide_at(&e, t_hanging, 1, false).await, tonic::Code::Ok);
    // ... so its Prepare arriving late (the "hanging" case) is refused.
    assert!(is_no(
        &prepare_at(&e, t_hanging, 1, vec![put("h", "1")]).await
    ));
    assert_eq!(get(&e, "h").await.0, None);
    // D3: Commit without a Prepare: refused, and no state created (a Prepare after it
    // still works).
    let t_unprepared = TxnId::generate();
    assert_eq!(
        decide_at(&e, t_unprepared, 1, true).await,
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        prepare_at(&e, t_unprepared, 1, vec![put("u", "1")])
            .await
            .unwrap()
            .vote(),
        v1::Vote::Yes
    );
    assert_eq!(decide_at(&e, t_unprepared, 1, true).await, tonic::Code::Ok);
    assert_eq!(get(&e, "u").await.0.as_deref(), Some("1"));
    // Prepare after the branch committed: refused, the committed value stays.
    assert!(is_no(
        &prepare_at(&e, t_unprepared, 1, vec![put("u", "2")]).await
    ));
    assert_eq!(get(&e, "u").await.0.as_deref(), Some("1"));
    assert!(in_doubt(&e).await.unwrap().is_empty());
}

/// A Prepare that carries decisions (how the coordinator sends phase two when a Prepare
/// to the same participant is leaving anyway): each carried decision is answered as a
/// Commit or Abort of its own would be, and a malformed or duplicated one refuses the
/// whole call before anything changes.
#[tokio::test(flavor = "multi_thread")]
async fn decisions_carried_by_a_prepare_are_answered_like_commit_and_abort() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let e = p.endpoint();
    let (t1, t2, t3, t4, t5) = (
        TxnId::generate(),
        TxnId::generate(),
        TxnId::generate(),
        TxnId::generate(),
        TxnId::generate(),
    );
    assert_eq!(
        prepare_at(&e, t1, 1, vec![put("x", "1")])
            .await
            .unwrap()
            .vote(),
        v1::Vote::Yes
    );
    assert_eq!(
        prepare_at(&e, t2, 1, vec![put("y", "2")])
            .await
            .unwrap()
            .vote(),
        v1::Vote::Yes
    );
    let decision = |txn: TxnId| v1::DecisionBranch {
        txn_id: txn.to_vec().into(),
        epoch: 1,
    };
    let branch = |txn: TxnId, ops| v1::PrepareBranch {
        txn_id: txn.to_vec().into(),
        epoch: 1,
        payload: payload(ops),
        incarnation: 0,
    };
    let mut client = participant(&e).await.unwrap();
    let ack_code = |r: &v1::AckResult| {
        r.error
            .as_ref()
            .map_or(tonic::Code::Ok, |e| tonic::Code::from_i32(e.code))
    };

    // T3 writes the key T1 holds: the carried Commit of T1 goes first and frees it.
    let response = client
        .prepare(v1::PrepareRequest {
            branches: vec![branch(t3, vec![put("x", "3")])],
            commits: vec![decision(t1)],
            aborts: vec![decision(t2)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results.len(), 1);
    assert_eq!(response.results[0].vote(), v1::Vote::Yes, "{response:?}");
    assert_eq!(response.commit_results.len(), 1);
    assert_eq!(response.commit_results[0].txn_id, t1.to_vec());
    assert_eq!(ack_code(&response.commit_results[0]), tonic::Code::Ok);
    assert_eq!(response.abort_results.len(), 1);
    assert_eq!(response.abort_results[0].txn_id, t2.to_vec());
    assert_eq!(ack_code(&response.abort_results[0]), tonic::Code::Ok);
    assert_eq!(get(&e, "x").await.0.as_deref(), Some("1"));
    assert_eq!(get(&e, "y").await.0, None);
    assert_eq!(in_doubt(&e).await.unwrap(), vec![t3]);

    // A carried Commit of the aborted T2 is refused on its own; the Prepare beside it
    // is not affected.
    let response = client
        .prepare(v1::PrepareRequest {
            branches: vec![branch(t4, vec![put("z", "4")])],
            commits: vec![decision(t2)],
            aborts: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.results[0].vote(), v1::Vote::Yes, "{response:?}");
    assert_eq!(
        ack_code(&response.commit_results[0]),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(get(&e, "y").await.0, None);

    // A malformed carried decision: the whole call is refused, T5 is not prepared and
    // T3's carried Commit is not applied.
    let status = client
        .prepare(v1::PrepareRequest {
            branches: vec![branch(t5, vec![put("w", "5")])],
            commits: vec![
                decision(t3),
                v1::DecisionBranch {
                    txn_id: vec![1, 2, 3].into(),
                    epoch: 1,
                },
            ],
            aborts: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // Two decisions for one transaction: refused the same way.
    let status = client
        .prepare(v1::PrepareRequest {
            branches: vec![branch(t5, vec![put("w", "5")])],
            commits: vec![decision(t3)],
            aborts: vec![decision(t3)],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("more than one"), "{status:?}");
    let mut pending = in_doubt(&e).await.unwrap();
    pending.sort();
    let mut expected = vec![t3, t4];
    expected.sort();
    assert_eq!(pending, expected);
    assert_eq!(get(&e, "x").await.0.as_deref(), Some("1"));
}
