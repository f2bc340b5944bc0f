//! The real `ratify-participant` process: a prepared branch survives SIGKILL with its
//! locks, and its decision then applies exactly once.

use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_tests::{Proc, add, binary, get, in_doubt, one_branch_batch, participant, payload, put};

fn start(dir: &std::path::Path) -> Proc {
    Proc::start(
        "participant",
        binary("ratify-participant"),
        vec![
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--name".into(),
            "solo".into(),
        ],
        "127.0.0.1:0",
        &[],
        dir.join("participant.log"),
    )
}

/// Opens a PrepareStream, as a coordinator does: requests go in through the sender.
async fn open_prepare_stream(
    endpoint: &str,
) -> (
    tokio::sync::mpsc::UnboundedSender<v1::PrepareStreamRequest>,
    tonic::Streaming<v1::PrepareStreamResponse>,
) {
    let mut client = participant(endpoint).await.unwrap();
    let (requests, mut outgoing) = tokio::sync::mpsc::unbounded_channel();
    let answers = client
        .prepare_stream(futures::stream::poll_fn(move |cx| outgoing.poll_recv(cx)))
        .await
        .unwrap()
        .into_inner();
    (requests, answers)
}

async fn prepare(endpoint: &str, txn: TxnId, ops: Vec<v1::KvOp>) -> v1::PrepareResult {
    let mut client = participant(endpoint).await.unwrap();
    let mut response = client
        .prepare(one_branch_batch(txn, ops))
        .await
        .unwrap()
        .into_inner();
    response.results.remove(0)
}

async fn decide(endpoint: &str, txn: TxnId, commit: bool) -> Option<v1::BranchError> {
    let mut client = participant(endpoint).await.unwrap();
    let branches = vec![v1::DecisionBranch {
        txn_id: txn.to_vec().into(),
        epoch: 1,
    }];
    let mut results = if commit {
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
    results.remove(0).error
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prepared_branch_survives_sigkill_keeps_its_locks_and_commits_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(dir.path());
    let txn = TxnId::generate();
    let vote = prepare(&p.endpoint(), txn, vec![add("x", 5, None), put("y", "a")]).await;
    assert_eq!(vote.vote(), v1::Vote::Yes, "{vote:?}");

    p.kill9();
    p.restart(&[]);
    let endpoint = p.endpoint();
    assert_eq!(
        in_doubt(&endpoint).await.unwrap(),
        vec![txn],
        "{}",
        p.logs()
    );
    assert_eq!(
        get(&endpoint, "x").await,
        (None, 0),
        "a prepared value must not be visible"
    );

    let conflicting = prepare(&endpoint, TxnId::generate(), vec![add("x", 1, None)]).await;
    assert_eq!(
        conflicting.vote(),
        v1::Vote::No,
        "the recovered lock must hold: {conflicting:?}"
    );
    assert!(
        conflicting.reason.contains("lock conflict"),
        "{}",
        conflicting.reason
    );

    assert!(decide(&endpoint, txn, true).await.is_none());
    assert!(
        decide(&endpoint, txn, true).await.is_none(),
        "a duplicate commit acknowledges"
    );
    assert_eq!(
        get(&endpoint, "x").await,
        (Some("5".into()), 1),
        "applied exactly once"
    );
    assert_eq!(get(&endpoint, "y").await, (Some("a".into()), 1));
    assert!(in_doubt(&endpoint).await.unwrap().is_empty());

    // The commit survives another SIGKILL, and a late abort is refused.
    p.kill9();
    p.restart(&[]);
    let endpoint = p.endpoint();
    assert_eq!(get(&endpoint, "x").await, (Some("5".into()), 1));
    let refused = decide(&endpoint, txn, false)
        .await
        .expect("abort after commit is refused");
    assert_eq!(refused.code, tonic::Code::FailedPrecondition as i32);
    let next = prepare(&endpoint, TxnId::generate(), vec![add("x", 1, None)]).await;
    assert_eq!(
        next.vote(),
        v1::Vote::Yes,
        "the lock was released by the commit"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prepared_branch_survives_sigkill_and_aborts_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(dir.path());
    let txn = TxnId::generate();
    assert_eq!(
        prepare(&p.endpoint(), txn, vec![put("k", "v")])
            .await
            .vote(),
        v1::Vote::Yes
    );

    p.kill9();
    p.restart(&[]);
    let endpoint = p.endpoint();
    assert_eq!(in_doubt(&endpoint).await.unwrap(), vec![txn]);
    assert_eq!(
        prepare(&endpoint, TxnId::generate(), vec![put("k", "w")])
            .await
            .vote(),
        v1::Vote::No
    );
    assert!(decide(&endpoint, txn, false).await.is_none());
    assert!(
        decide(&endpoint, txn, false).await.is_none(),
        "a duplicate abort acknowledges"
    );
    assert_eq!(
        get(&endpoint, "k").await,
        (None, 0),
        "nothing of the aborted branch applied"
    );
    assert!(in_doubt(&endpoint).await.unwrap().is_empty());
    let refused = decide(&endpoint, txn, true)
        .await
        .expect("commit after abort is refused");
    assert_eq!(refused.code, tonic::Code::FailedPrecondition as i32);
    // A late prepare of the aborted branch is refused (its tombstone).
    let late = prepare(&endpoint, txn, vec![put("k", "v")]).await;
    assert_eq!(late.vote(), v1::Vote::No);
    assert!(late.error.is_some());
    assert_eq!(
        prepare(&endpoint, TxnId::generate(), vec![put("k", "w")])
            .await
            .vote(),
        v1::Vote::Yes,
        "the abort released the lock"
    );
    assert_eq!(
        p.terminate().map(|s| s.success()),
        Some(true),
        "SIGTERM stops it cleanly"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_invalid_argument_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path());
    let mut client = participant(&p.endpoint()).await.unwrap();
    let status = client
        .prepare(v1::PrepareRequest {
            branches: vec![v1::PrepareBranch {
                txn_id: vec![1, 2, 3].into(),
                epoch: 1,
                payload: payload(vec![put("a", "b")]),
                incarnation: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = client
        .prepare(v1::PrepareRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = client
        .commit(v1::CommitRequest {
            branches: vec![v1::DecisionBranch {
                txn_id: vec![0; 16].into(),
                epoch: 1,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "the nil id is refused"
    );
    // A payload that is not KvOps votes NO with a reason and leaves nothing behind.
    let txn = TxnId::generate();
    let result = client
        .prepare(v1::PrepareRequest {
            branches: vec![v1::PrepareBranch {
                txn_id: txn.to_vec().into(),
                epoch: 1,
                payload: vec![0xff, 0xff, 0xff].into(),
                incarnation: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    assert_eq!(result.vote(), v1::Vote::No);
    assert!(
        result.reason.contains("malformed payload"),
        "{}",
        result.reason
    );
    assert!(in_doubt(&p.endpoint()).await.unwrap().is_empty());
    // Keys over the limit are refused at staging with no state change.
    let mut kv = ratify_tests::kv(&p.endpoint()).await.unwrap();
    let status = kv
        .stage(v1::StageRequest {
            txn_id: TxnId::generate().to_vec().into(),
            ops: vec![put(&"k".repeat(5000), "v")],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_prepare_stream_answers_each_request_by_its_id_and_refuses_a_malformed_one_alone() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path());
    let (requests, mut answers) = open_prepare_stream(&p.endpoint()).await;
    let txn = TxnId::generate();
    let streamed = |txn| one_branch_batch(txn, vec![put("streamed", "yes")]);
    let sent = [
        (7, None),
        (8, Some(v1::PrepareRequest::default())),
        (9, Some(streamed(txn))),
    ];
    for (id, request) in sent {
        requests
            .send(v1::PrepareStreamRequest { id, request })
            .unwrap();
    }
    let mut by_id = std::collections::HashMap::new();
    for _ in 0..3 {
        let answer = answers
            .message()
            .await
            .unwrap()
            .expect("an answer per request");
        by_id.insert(answer.id, answer);
    }
    let refused = |id: u64| {
        let answer = &by_id[&id];
        assert!(answer.response.is_none(), "{answer:?}");
        let error = answer.error.as_ref().expect("refused");
        assert_eq!(error.code, tonic::Code::InvalidArgument as i32, "{error:?}");
        error.message.clone()
    };
    assert!(refused(7).contains("without a request"));
    assert!(refused(8).contains("empty batch"));
    let prepared = by_id[&9].response.as_ref().expect("answered");
    assert_eq!(prepared.results.len(), 1);
    assert_eq!(prepared.results[0].vote(), v1::Vote::Yes);
    // The refusals changed nothing; the good request prepared its branch alone.
    let in_doubt = in_doubt(&p.endpoint()).await.unwrap();
    assert_eq!(in_doubt.len(), 1, "{in_doubt:?}");
    // The stream stays usable after a refusal, and ends once the coordinator's side does.
    requests
        .send(v1::PrepareStreamRequest {
            id: 10,
            request: Some(streamed(TxnId::generate())),
        })
        .unwrap();
    let answer = answers.message().await.unwrap().unwrap();
    assert_eq!(answer.id, 10);
    let conflicting = answer.response.unwrap().results.remove(0);
    assert_eq!(conflicting.vote(), v1::Vote::No);
    assert!(
        conflicting.reason.contains("lock conflict"),
        "the first branch holds the key: {}",
        conflicting.reason
    );
    drop(requests);
    assert!(answers.message().await.unwrap().is_none());
    assert!(decide(&p.endpoint(), txn, true).await.is_none());
    assert_eq!(
        get(&p.endpoint(), "streamed").await,
        (Some("yes".into()), 1)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_participant_shutting_down_ends_the_prepare_stream_a_coordinator_keeps_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(dir.path());
    let (requests, mut answers) = open_prepare_stream(&p.endpoint()).await;
    requests
        .send(v1::PrepareStreamRequest {
            id: 1,
            request: Some(one_branch_batch(TxnId::generate(), vec![put("k", "v")])),
        })
        .unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().id, 1);
    // Our side stays open, as a coordinator's does: the graceful shutdown must still end.
    let status = tokio::task::block_in_place(|| p.terminate()).expect("it was running");
    assert!(
        status.success(),
        "{status:?} (killed after waiting for the stream?)\n{}",
        p.logs()
    );
    assert!(
        !matches!(answers.message().await, Ok(Some(_))),
        "the answers ended"
    );
    drop(requests);
}
