//! A real PostgreSQL server as a participant, next to a sled one: atomic transfers, NO
//! votes with PostgreSQL's reason, crashes between PREPARE TRANSACTION and the vote, and
//! a server restart with a branch prepared. These tests start their own PostgreSQL; they
//! fail (never skip) when it cannot be started.

use std::time::Duration;

use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_tests::{
    PgServer, Stack, StackOptions, add, coordinator, coordinator_in_doubt, eventually, get,
    in_doubt, one_branch_batch, participant, payload, put, stage,
};

fn options(pg: &PgServer) -> StackOptions {
    StackOptions {
        stores: vec![None, Some(pg.url())],
        ..StackOptions::default()
    }
}

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
        assert_eq!(
            r.outcome(),
            v1::Outcome::Committed,
            "{r:?}\n{}",
            stack.logs()
        );
    }
}

/// Moves `amount` from a (sled p1) to b (PostgreSQL p2); the client's answer, if any.
async fn transfer(stack: &Stack, amount: i64) -> Option<v1::CommitTxnResponse> {
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
        vec![add("a", -amount, Some(0))],
    )
    .await
    .unwrap();
    stage(
        &stack.participants[1].endpoint(),
        &txn,
        vec![add("b", amount, Some(0))],
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
        .map(|r| r.into_inner())
}

async fn balances(stack: &Stack) -> (Option<String>, Option<String>) {
    (
        get(&stack.participants[0].endpoint(), "a").await.0,
        get(&stack.participants[1].endpoint(), "b").await.0,
    )
}

async fn settle(stack: &Stack, pg: &PgServer) {
    let c = stack.coordinator.endpoint();
    let ok = eventually(Duration::from_secs(40), || async {
        coordinator_in_doubt(&c).await.is_some_and(|l| l.is_empty())
            && in_doubt(&stack.participants[0].endpoint())
                .await
                .is_some_and(|l| l.is_empty())
            && in_doubt(&stack.participants[1].endpoint())
                .await
                .is_some_and(|l| l.is_empty())
            && pg.prepared().await.is_empty()
    })
    .await;
    assert!(
        ok,
        "in-doubt work did not drain (pg_prepared_xacts: {:?})\n{}",
        pg.prepared().await,
        stack.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transfer_between_sled_and_postgres_is_atomic_and_a_postgres_no_aborts_both() {
    let pg = PgServer::start();
    let stack = Stack::start(options(&pg));
    open_accounts(&stack).await;

    let r = transfer(&stack, 30).await.unwrap();
    assert_eq!(
        r.outcome(),
        v1::Outcome::Committed,
        "{r:?}\n{}",
        stack.logs()
    );
    settle(&stack, &pg).await;
    assert_eq!(
        balances(&stack).await,
        (Some("70".into()), Some("130".into()))
    );

    // PostgreSQL votes NO (the bound on b): the sled debit must not apply either.
    let r = transfer(&stack, -500).await.unwrap();
    assert_eq!(r.outcome(), v1::Outcome::Aborted, "{r:?}");
    assert!(
        r.reason.contains("p1") || r.reason.contains("p2"),
        "{}",
        r.reason
    );
    settle(&stack, &pg).await;
    assert_eq!(
        balances(&stack).await,
        (Some("70".into()), Some("130".into()))
    );

    // A branch blocked by another's row lock votes NO with PostgreSQL's own message.
    let mut p2 = participant(&stack.participants[1].endpoint())
        .await
        .unwrap();
    let holder = TxnId::generate();
    let first = p2
        .prepare(one_branch_batch(holder, vec![put("b", "1")]))
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    assert_eq!(first.vote(), v1::Vote::Yes, "{first:?}");
    assert_eq!(pg.prepared().await.len(), 1);
    let second = p2
        .prepare(one_branch_batch(TxnId::generate(), vec![add("b", 1, None)]))
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    assert_eq!(second.vote(), v1::Vote::No);
    assert!(
        second.reason.contains("lock timeout") && second.reason.contains("55P03"),
        "{}",
        second.reason
    );
    // The coordinator never heard of `holder`: the termination protocol hears ABORTED
    // (presumed abort) and rolls the prepared transaction back.
    settle(&stack, &pg).await;
    assert_eq!(
        balances(&stack).await,
        (Some("70".into()), Some("130".into()))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_between_prepare_transaction_and_the_vote_resolves_to_the_coordinators_outcome() {
    let pg = PgServer::start();
    let mut options = options(&pg);
    options.participant_env = vec![(
        1,
        "FAILPOINTS".into(),
        "participant::pg::prepared=return".into(),
    )];
    let mut stack = Stack::start(options);
    // Opening the account on p2 is a one-phase commit: it does not reach the crash point.
    open_accounts(&stack).await;

    let r = transfer(&stack, 10).await.unwrap();
    assert_eq!(
        r.outcome(),
        v1::Outcome::Aborted,
        "the vote never arrived: {r:?}"
    );
    assert!(
        stack.participants[1]
            .wait_exit(Duration::from_secs(10))
            .is_some(),
        "p2 did not stop at the crash point"
    );
    assert_eq!(
        pg.prepared().await.len(),
        1,
        "PREPARE TRANSACTION happened before the crash"
    );

    stack.participants[1].restart(&[]);
    settle(&stack, &pg).await;
    assert_eq!(
        balances(&stack).await,
        (Some("100".into()), Some("100".into()))
    );
    let r = transfer(&stack, 10).await.unwrap();
    assert_eq!(
        r.outcome(),
        v1::Outcome::Committed,
        "the locks were released: {r:?}"
    );
    settle(&stack, &pg).await;
    assert_eq!(
        balances(&stack).await,
        (Some("90".into()), Some("110".into()))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prepared_branch_survives_a_postgres_restart_and_commits() {
    let pg = PgServer::start();
    let mut options = options(&pg);
    options.coordinator_env = vec![(
        "FAILPOINTS".into(),
        "coordinator::decision_durable=return".into(),
    )];
    let mut stack = Stack::start(options);
    open_accounts(&stack).await;

    // The coordinator stops right after the COMMIT decision is durable: p2's branch is
    // prepared in PostgreSQL and nobody has told it the outcome.
    assert!(transfer(&stack, 25).await.is_none());
    assert!(
        stack
            .coordinator
            .wait_exit(Duration::from_secs(20))
            .is_some()
    );
    assert_eq!(pg.prepared().await.len(), 1);

    pg.restart();
    assert_eq!(
        pg.prepared().await.len(),
        1,
        "a prepared transaction survives a server restart"
    );

    stack.coordinator.restart(&[]);
    settle(&stack, &pg).await;
    assert_eq!(
        balances(&stack).await,
        (Some("75".into()), Some("125".into())),
        "\n{}",
        stack.logs()
    );
}

fn meta_for(txn: TxnId, payload: &bytes::Bytes) -> ratify_participant::store::BranchMeta {
    ratify_participant::store::BranchMeta {
        txn_id: txn,
        epoch: 1,
        digest: ratify_participant::store::PayloadDigest::of(payload),
        incarnation: 0,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_store_never_deadlocks_on_its_pool_and_one_phase_retries_answer_the_first_outcome() {
    use ratify_participant::pg::{PgOptions, PgStore};
    use ratify_participant::store::{OnePhaseOutcome, ResourceManager, StoreVote};

    let pg = PgServer::start();
    let mut options = PgOptions::new(pg.url(), "store-test");
    options.max_connections = 2;
    let store = std::sync::Arc::new(PgStore::open(options).await.unwrap());

    // Failed checks record a tombstone; with a pool of two, eight at once must not wait
    // for a second connection while holding one.
    let check = payload(vec![v1::KvOp {
        op: Some(v1::kv_op::Op::Check(v1::Check {
            key: b"nope".to_vec().into(),
            version: 9,
        })),
    }]);
    let prepares = (0..8).map(|_| {
        let (store, check) = (store.clone(), check.clone());
        tokio::spawn(async move {
            store
                .prepare(meta_for(TxnId::generate(), &check), check)
                .await
        })
    });
    let votes = tokio::time::timeout(Duration::from_secs(20), futures_join(prepares.collect()))
        .await
        .expect("concurrent prepares deadlocked on the connection pool");
    for vote in votes {
        assert!(matches!(vote, StoreVote::No { .. }), "{vote:?}");
    }

    // A one-phase commit whose answer was lost is retried: the retry answers COMMITTED
    // from the outcome row and applies nothing twice.
    let txn = TxnId::generate();
    let ops = payload(vec![add("counter", 5, None)]);
    let first = store
        .commit_one_phase(meta_for(txn, &ops), ops.clone())
        .await
        .unwrap();
    let again = store
        .commit_one_phase(meta_for(txn, &ops), ops.clone())
        .await
        .unwrap();
    assert_eq!(
        (first, again),
        (OnePhaseOutcome::Committed, OnePhaseOutcome::Committed)
    );
    let row = pg
        .client()
        .await
        .query_one(
            "SELECT value, version FROM ratify_kv WHERE key = 'counter'::bytea",
            &[],
        )
        .await
        .unwrap();
    let (value, version): (Vec<u8>, i64) = (row.get(0), row.get(1));
    assert_eq!((value.as_slice(), version), (b"5".as_slice(), 1));
}

async fn futures_join<T>(
    handles: Vec<tokio::task::JoinHandle<Result<T, ratify_participant::store::StoreError>>>,
) -> Vec<T>
where
    T: Send + 'static,
{
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task").expect("store call"));
    }
    out
}
