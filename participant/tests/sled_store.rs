//! The sled store under the participant runtime, on a real sled database in a temp dir.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use ratify_participant::branch::Vote;
use ratify_participant::kv::{KvLimits, SledStore};
use ratify_participant::runtime::{Runtime, RuntimeConfig};
use ratify_participant::store::{BranchMeta, OnePhaseOutcome, PayloadDigest};
use ratify_proto::TxnId;
use ratify_proto::v1::{self, kv_op::Op};

fn put(key: &str, value: &str) -> v1::KvOp {
    v1::KvOp {
        op: Some(Op::Put(v1::Put {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
        })),
    }
}

fn add(key: &str, delta: i64, min: Option<i64>) -> v1::KvOp {
    v1::KvOp {
        op: Some(Op::Add(v1::Add {
            key: key.as_bytes().to_vec().into(),
            delta,
            min,
        })),
    }
}

fn check(key: &str, version: u64) -> v1::KvOp {
    v1::KvOp {
        op: Some(Op::Check(v1::Check {
            key: key.as_bytes().to_vec().into(),
            version,
        })),
    }
}

fn payload(ops: Vec<v1::KvOp>) -> Bytes {
    v1::KvOps { ops }.encode_to_vec().into()
}

fn meta(txn_id: TxnId, payload: &Bytes) -> BranchMeta {
    BranchMeta {
        txn_id,
        epoch: 1,
        digest: PayloadDigest::of(payload),
        incarnation: 0,
    }
}

async fn open(dir: &std::path::Path) -> Arc<Runtime<SledStore>> {
    let store = Arc::new(SledStore::open(dir, KvLimits::default()).unwrap());
    Runtime::recover(store, RuntimeConfig::default())
        .await
        .unwrap()
}

async fn prepare(rt: &Arc<Runtime<SledStore>>, ops: Vec<v1::KvOp>) -> (TxnId, Vote) {
    let txn = TxnId::generate();
    let p = payload(ops);
    let answer = rt.prepare(meta(txn, &p), p).await;
    (txn, answer.vote)
}

async fn commit_now(rt: &Arc<Runtime<SledStore>>, ops: Vec<v1::KvOp>) {
    let txn = TxnId::generate();
    let p = payload(ops);
    let outcome = rt.commit_one_phase(meta(txn, &p), p).await.unwrap();
    assert_eq!(outcome, OnePhaseOutcome::Committed);
}

fn value(rt: &Runtime<SledStore>, key: &str) -> (u64, Option<String>) {
    let v = rt.store().get(key.as_bytes()).unwrap();
    (v.version, v.value.map(|b| String::from_utf8(b).unwrap()))
}

#[tokio::test]
async fn a_reader_never_sees_a_prepared_value_and_versions_advance_on_commit() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    commit_now(&rt, vec![put("k", "old")]).await;
    assert_eq!(value(&rt, "k"), (1, Some("old".into())));

    let (txn, vote) = prepare(&rt, vec![put("k", "new")]).await;
    assert_eq!(vote, Vote::Yes);
    assert_eq!(
        value(&rt, "k"),
        (1, Some("old".into())),
        "prepared value leaked"
    );

    rt.commit(txn, 1).await.unwrap();
    assert_eq!(value(&rt, "k"), (2, Some("new".into())));
    assert!(rt.store().locked_keys(&txn).is_empty());
}

#[tokio::test]
async fn a_lock_conflict_votes_no_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    let (first, vote) = prepare(&rt, vec![put("k", "1")]).await;
    assert_eq!(vote, Vote::Yes);
    let (_, vote) = prepare(&rt, vec![add("k", 1, None)]).await;
    match vote {
        Vote::No { reason } => assert!(reason.contains("lock conflict"), "{reason}"),
        other => panic!("expected NO, got {other:?}"),
    }
    rt.abort(first, 1).await.unwrap();
    let (_, vote) = prepare(&rt, vec![add("k", 1, None)]).await;
    assert_eq!(vote, Vote::Yes, "the abort must release the lock");
}

#[tokio::test]
async fn add_below_its_bound_and_a_stale_check_vote_no() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    commit_now(&rt, vec![put("acct", "10")]).await;
    let (_, vote) = prepare(&rt, vec![add("acct", -11, Some(0))]).await;
    assert!(matches!(vote, Vote::No { ref reason } if reason.contains("below its bound")));
    let (_, vote) = prepare(&rt, vec![check("acct", 0), put("acct", "5")]).await;
    assert!(matches!(vote, Vote::No { ref reason } if reason.contains("check failed")));
    // Nothing of either branch is applied or locked.
    assert_eq!(value(&rt, "acct"), (1, Some("10".into())));
    let (txn, vote) = prepare(&rt, vec![check("acct", 1), add("acct", -10, Some(0))]).await;
    assert_eq!(vote, Vote::Yes);
    rt.commit(txn, 1).await.unwrap();
    assert_eq!(value(&rt, "acct"), (2, Some("0".into())));
}

#[tokio::test]
async fn checks_alone_vote_read_only_and_hold_no_lock() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    let (txn, vote) = prepare(&rt, vec![check("absent", 0)]).await;
    assert_eq!(vote, Vote::ReadOnly);
    assert!(rt.store().locked_keys(&txn).is_empty());
}

#[tokio::test]
async fn prepared_branches_survive_a_reopen_with_their_locks_and_commit_once() {
    let dir = tempfile::tempdir().unwrap();
    let txn = {
        let rt = open(dir.path()).await;
        commit_now(&rt, vec![put("n", "1")]).await;
        let (txn, vote) = prepare(&rt, vec![add("n", 1, None)]).await;
        assert_eq!(vote, Vote::Yes);
        txn
    };
    let rt = open(dir.path()).await;
    let (list, total) = rt.in_doubt(10);
    assert_eq!(total, 1);
    assert_eq!(list[0].txn_id, txn);
    assert_eq!(rt.store().locked_keys(&txn), vec![b"n".to_vec()]);
    let (_, vote) = prepare(&rt, vec![put("n", "9")]).await;
    assert!(
        matches!(vote, Vote::No { .. }),
        "the recovered lock must hold"
    );
    rt.commit(txn, 1).await.unwrap();
    rt.commit(txn, 1).await.unwrap();
    assert_eq!(value(&rt, "n"), (2, Some("2".into())));
    drop(rt);
    // The commit tombstone survives too: a late duplicate still acknowledges.
    let rt = open(dir.path()).await;
    rt.commit(txn, 1).await.unwrap();
    assert_eq!(value(&rt, "n"), (2, Some("2".into())));
}

#[tokio::test]
async fn late_and_duplicate_messages_get_consistent_answers() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    // Abort of an unknown branch succeeds and leaves a tombstone; a later prepare is refused.
    let txn = TxnId::generate();
    rt.abort(txn, 1).await.unwrap();
    let p = payload(vec![put("x", "1")]);
    let answer = rt.prepare(meta(txn, &p), p).await;
    assert!(matches!(answer.vote, Vote::No { .. }));
    assert_eq!(answer.error.unwrap().0, tonic::Code::FailedPrecondition);
    assert_eq!(value(&rt, "x"), (0, None));

    // A different payload for a prepared branch is refused; the same one answers YES.
    let txn = TxnId::generate();
    let p = payload(vec![put("y", "1")]);
    assert_eq!(rt.prepare(meta(txn, &p), p.clone()).await.vote, Vote::Yes);
    assert_eq!(rt.prepare(meta(txn, &p), p.clone()).await.vote, Vote::Yes);
    let other = payload(vec![put("y", "2")]);
    assert!(rt.prepare(meta(txn, &other), other).await.error.is_some());
    // Commit from an older epoch than the prepare's is refused; the right one applies.
    assert_eq!(
        rt.commit(txn, 0).await.unwrap_err().0,
        tonic::Code::FailedPrecondition
    );
    rt.commit(txn, 1).await.unwrap();
    assert_eq!(
        rt.abort(txn, 1).await.unwrap_err().0,
        tonic::Code::FailedPrecondition
    );
    // Commit without a prepare is refused and creates nothing.
    let stray = TxnId::generate();
    assert!(rt.commit(stray, 1).await.is_err());
    assert!(rt.state_of(&stray).is_none());
}

#[tokio::test]
async fn limits_refuse_without_changing_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(dir.path(), KvLimits::default()).unwrap());
    let config = RuntimeConfig {
        max_payload_bytes: 64,
        max_prepared: 1,
        ..RuntimeConfig::default()
    };
    let rt = Runtime::recover(store, config).await.unwrap();
    let big = payload(vec![put("k", &"v".repeat(100))]);
    let txn = TxnId::generate();
    let answer = rt.prepare(meta(txn, &big), big).await;
    assert_eq!(answer.error.unwrap().0, tonic::Code::InvalidArgument);
    assert!(rt.state_of(&txn).is_none());
    let (_, vote) = prepare(&rt, vec![put("a", "1")]).await;
    assert_eq!(vote, Vote::Yes);
    let p = payload(vec![put("b", "1")]);
    let txn = TxnId::generate();
    let answer = rt.prepare(meta(txn, &p), p).await;
    assert_eq!(answer.error.unwrap().0, tonic::Code::ResourceExhausted);
    assert!(rt.state_of(&txn).is_none());
    assert!(rt.store().locked_keys(&txn).is_empty());
}

#[tokio::test]
async fn staged_operations_of_another_incarnation_vote_no() {
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    let txn = TxnId::generate();
    rt.store()
        .staging()
        .stage(txn, vec![put("s", "1")])
        .unwrap();
    let empty = Bytes::new();
    let mut m = meta(txn, &empty);
    m.incarnation = rt.store().staging().incarnation().wrapping_add(1);
    assert!(matches!(
        rt.prepare(m, empty.clone()).await.vote,
        Vote::No { .. }
    ));

    let txn = TxnId::generate();
    rt.store()
        .staging()
        .stage(txn, vec![put("s", "1")])
        .unwrap();
    let mut m = meta(txn, &empty);
    m.incarnation = rt.store().staging().incarnation();
    assert_eq!(rt.prepare(m, empty).await.vote, Vote::Yes);
    rt.commit(txn, 1).await.unwrap();
    assert_eq!(value(&rt, "s"), (1, Some("1".into())));
}

#[tokio::test]
async fn a_cancelled_commit_still_completes_and_the_branch_table_agrees() {
    // The coordinator dying mid-RPC drops the server's future. The commit must finish
    // anyway, or the store would be committed while the runtime still says prepared.
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    let (txn, vote) = prepare(&rt, vec![add("c", 7, None)]).await;
    assert_eq!(vote, Vote::Yes);
    // Poll the commit exactly once, then drop it: on this single-threaded test runtime
    // the task it spawned cannot run before the test yields, so the first poll is
    // always pending and the drop always cancels a commit in flight.
    {
        let mut commit = std::pin::pin!(rt.commit(txn, 1));
        let first_poll =
            std::future::poll_fn(|cx| std::task::Poll::Ready(commit.as_mut().poll(cx))).await;
        assert!(
            first_poll.is_pending(),
            "the commit should still be pending when cancelled"
        );
    }
    let mut committed = false;
    for _ in 0..200 {
        if matches!(
            rt.state_of(&txn),
            Some(ratify_participant::branch::BranchState::Committed { .. })
        ) {
            committed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(committed, "the cancelled commit did not complete");
    assert_eq!(value(&rt, "c"), (1, Some("7".into())));
    rt.commit(txn, 1).await.unwrap();
    assert_eq!(value(&rt, "c"), (1, Some("7".into())), "applied once");
}

/// The entries of one Prepare batch share one journal fdatasync: the runtime holds the
/// journal's next flush while they queue their records. Without the hold the journal
/// writer wakes on the first record and flushes it alone, before the others are queued.
/// (Judged over five batches, so that a checkpoint's snapshot flush landing inside one
/// of them, or the rare batch whose first pass outlasts the hold's limit, does not fail
/// the test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entries_of_a_prepare_batch_share_one_journal_flush() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    let mut batches_with_one_flush = 0;
    for batch in 0..5u8 {
        let entries: Vec<(BranchMeta, Bytes)> = (0..16u8)
            .map(|i| {
                // Distinct lock stripes (the low two bytes pick the stripe).
                let mut bytes = *TxnId::generate().as_bytes();
                bytes[14] = batch;
                bytes[15] = i;
                let p = payload(vec![put(&format!("batch-{batch}-{i}"), "1")]);
                (meta(TxnId::from_bytes(bytes), &p), p)
            })
            .collect();
        let flushes = || rt.store().flush_stats().flushes.load(Ordering::Relaxed);
        let before = flushes();
        let answers = rt.prepare_batch(entries).await;
        assert!(answers.iter().all(|a| a.vote == Vote::Yes), "{answers:?}");
        if flushes() - before == 1 {
            batches_with_one_flush += 1;
        }
    }
    assert!(
        batches_with_one_flush >= 4,
        "only {batches_with_one_flush} of 5 batches shared one flush"
    );
}

/// A Prepare that carries the Commit of the transaction before it (the coordinator sends
/// phase two inside the next Prepare): the commit is applied first, so the new branch on
/// the same key finds it unlocked and votes YES, and both records share one fdatasync.
/// (Judged over five rounds, as above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_carried_commit_frees_its_keys_for_the_prepare_behind_it_in_one_flush() {
    use ratify_participant::runtime::Decision;
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let rt = open(dir.path()).await;
    let (mut previous, vote) = prepare(&rt, vec![put("k", "0")]).await;
    assert_eq!(vote, Vote::Yes);
    let mut rounds_with_one_flush = 0;
    for round in 1..=5 {
        let p = payload(vec![put("k", &round.to_string())]);
        let next = TxnId::generate();
        let flushes = || rt.store().flush_stats().flushes.load(Ordering::Relaxed);
        let before = flushes();
        let (acks, answers) = rt
            .decide_then_prepare(
                vec![(previous, 1, Decision::Commit)],
                vec![(meta(next, &p), p)],
            )
            .await;
        assert_eq!(acks, vec![Ok(())], "round {round}");
        assert_eq!(answers[0].vote, Vote::Yes, "round {round}: {answers:?}");
        assert_eq!(value(&rt, "k"), (round, Some((round - 1).to_string())));
        if flushes() - before == 1 {
            rounds_with_one_flush += 1;
        }
        previous = next;
    }
    assert!(
        rounds_with_one_flush >= 4,
        "only {rounds_with_one_flush} of 5 rounds shared one flush"
    );
    // An Abort rides the same way: the last branch's lock goes and nothing is applied.
    let p = payload(vec![put("k", "late")]);
    let next = TxnId::generate();
    let (acks, answers) = rt
        .decide_then_prepare(
            vec![(previous, 1, Decision::Abort)],
            vec![(meta(next, &p), p)],
        )
        .await;
    assert_eq!(acks, vec![Ok(())]);
    assert_eq!(answers[0].vote, Vote::Yes, "{answers:?}");
    assert_eq!(value(&rt, "k"), (5, Some("4".into())));
}
