//! The participant runtime every store gets for free: per-branch ordering, tombstones,
//! epoch fencing, limits, recovery and the termination protocol, around a
//! [`ResourceManager`]. The protocol rules themselves live in [`crate::branch`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock: the same as std's, except under a simulation's paused clock.
use tokio::time::Instant;

use bytes::Bytes;
use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_proto::v1::coordinator_client::CoordinatorClient;
use tonic::Code;
use tracing::{Instrument, debug, debug_span, info, warn};

use crate::branch::{self, BranchState, DecisionStep, OnePhaseStep, PrepareStep, Vote};
use crate::store::{
    BranchMeta, FinishedAs, OnePhaseOutcome, PayloadDigest, ResourceManager, StoreError, StoreVote,
};

/// Settings of the runtime; every limit is configurable.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// This participant's registered name (sent with GetOutcome).
    pub name: String,
    /// The coordinator's endpoint for the termination protocol; `None` disables it.
    pub coordinator: Option<String>,
    /// Largest prepare payload accepted.
    pub max_payload_bytes: usize,
    /// Most branches held prepared at once; a prepare beyond it votes NO.
    pub max_prepared: usize,
    /// Most entries in one Prepare/Commit/Abort batch.
    pub max_batch: usize,
    /// A branch prepared longer than this asks the coordinator for the outcome.
    pub termination_deadline: Duration,
    pub termination_backoff_initial: Duration,
    pub termination_backoff_max: Duration,
    /// How long tombstones of finished branches are kept, and how many at most.
    pub tombstone_retention: Duration,
    pub max_tombstones: usize,
    /// Opens the channel to the coordinator.
    pub dialer: ratify_proto::dial::Dialer,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            name: "participant".into(),
            coordinator: None,
            max_payload_bytes: 1 << 20,
            max_prepared: 10_000,
            max_batch: 1024,
            termination_deadline: Duration::from_secs(10),
            termination_backoff_initial: Duration::from_millis(500),
            termination_backoff_max: Duration::from_secs(30),
            tombstone_retention: Duration::from_secs(24 * 3600),
            max_tombstones: 200_000,
            dialer: ratify_proto::dial::Dialer::tcp(),
        }
    }
}

/// The coordinator's decision that a Commit or Abort message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Commit,
    Abort,
}

/// The answer to one prepare entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareAnswer {
    pub vote: Vote,
    /// Set when the entry was refused (the vote is then NO).
    pub error: Option<(Code, String)>,
}

impl PrepareAnswer {
    fn vote(vote: Vote) -> Self {
        Self { vote, error: None }
    }

    fn refused(code: Code, message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            vote: Vote::No {
                reason: message.clone(),
            },
            error: Some((code, message)),
        }
    }
}

/// A refused phase-2 or one-phase message.
pub type Refused = (Code, String);

/// What the runtime knows of one branch: a prepared one, or the tombstone of a finished
/// one (up to `max_tombstones` of them, so this stays small).
#[derive(Debug)]
struct Entry {
    state: BranchState,
    since_unix_ms: u64,
    /// The termination protocol's state, for a prepared branch only.
    inquiry: Option<Box<Inquiry>>,
}

#[derive(Debug, Default)]
struct Inquiry {
    next_at: Option<Instant>,
    backoff: Duration,
    last: String,
    count: u32,
}

/// A prepared branch as ListInDoubt shows it.
#[derive(Debug, Clone)]
pub struct InDoubt {
    pub txn_id: TxnId,
    pub epoch: u64,
    pub prepared_at_unix_ms: u64,
    pub last_inquiry: String,
    pub inquiries: u32,
}

/// Per-transaction lock stripes. A stripe is held through a prepare's fsync, so two
/// entries of one Prepare batch on the same stripe run one after the other, the second
/// needing a flush of its own: 65,536 stripes (2.5 MiB) make that rare (under 1 in 100
/// batches of 25 entries, 7 in 100 batches of 100).
const STRIPES: usize = 1 << 16;

/// The participant runtime around a store.
#[derive(Debug)]
pub struct Runtime<R> {
    store: Arc<R>,
    config: RuntimeConfig,
    branches: Mutex<HashMap<TxnId, Entry>>,
    /// Messages for one transaction are handled one at a time; striping bounds memory.
    stripes: Vec<tokio::sync::Mutex<()>>,
    fatal: tokio::sync::watch::Sender<Option<String>>,
    /// How many entries of `branches` are prepared (kept so a prepare need not count).
    prepared_now: std::sync::atomic::AtomicUsize,
    /// Finished branches in the order they finished, for tombstone collection.
    finished_order: Mutex<std::collections::VecDeque<(u64, TxnId)>>,
    /// Branches this process prepared (voted YES for).
    pub prepared_total: std::sync::atomic::AtomicU64,
}

impl<R: ResourceManager> Runtime<R> {
    /// Recovers the store's prepared branches and tombstones and returns a runtime ready to
    /// serve. Prepared branches re-took their locks inside `store.recover`.
    pub async fn recover(store: Arc<R>, config: RuntimeConfig) -> Result<Arc<Self>, StoreError> {
        let recovered = store.recover().await?;
        let mut branches = HashMap::new();
        for tombstone in recovered.tombstones {
            let state = match tombstone.finished_as {
                FinishedAs::Committed => BranchState::Committed {
                    digest: tombstone.digest.unwrap_or(PayloadDigest(0)),
                },
                FinishedAs::Aborted => BranchState::Aborted {
                    digest: tombstone.digest,
                },
                FinishedAs::ReadOnly => BranchState::ReadOnly {
                    digest: tombstone.digest.unwrap_or(PayloadDigest(0)),
                },
            };
            branches.insert(
                tombstone.txn_id,
                Entry {
                    state,
                    since_unix_ms: tombstone.finished_at_unix_ms,
                    inquiry: None,
                },
            );
        }
        let prepared = recovered.prepared.len();
        let mut finished: Vec<(u64, TxnId)> = branches
            .iter()
            .map(|(t, e): (&TxnId, &Entry)| (e.since_unix_ms, *t))
            .collect();
        finished.sort_unstable();
        let finished_order: std::collections::VecDeque<(u64, TxnId)> = finished.into();
        for branch in recovered.prepared {
            branches.insert(
                branch.meta.txn_id,
                Entry {
                    state: BranchState::Prepared {
                        epoch: branch.meta.epoch,
                        digest: branch.meta.digest,
                    },
                    since_unix_ms: branch.prepared_at_unix_ms,
                    // Recovered branches ask for their outcome right away: the coordinator
                    // may have decided while this node was down.
                    inquiry: Some(Box::new(Inquiry {
                        next_at: Some(Instant::now()),
                        ..Inquiry::default()
                    })),
                },
            );
        }
        info!(
            prepared,
            tombstones = branches.len() - prepared,
            "participant recovered"
        );
        Ok(Arc::new(Self {
            store,
            config,
            branches: Mutex::new(branches),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            fatal: tokio::sync::watch::channel(None).0,
            prepared_now: std::sync::atomic::AtomicUsize::new(prepared),
            finished_order: Mutex::new(finished_order),
            prepared_total: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    pub fn store(&self) -> &Arc<R> {
        &self.store
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// Resolves with a message once the store failed in a way that forbids going on.
    pub fn fatal(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.fatal.subscribe()
    }

    /// The known state of a branch (prepared or tombstoned), if any.
    pub fn state_of(&self, txn_id: &TxnId) -> Option<BranchState> {
        self.lock_branches().get(txn_id).map(|e| e.state)
    }

    /// Serialises every message of one transaction.
    pub async fn lock_txn(&self, txn_id: &TxnId) -> tokio::sync::MutexGuard<'_, ()> {
        let bytes = txn_id.as_bytes();
        // The low bytes of a UUIDv7 are random, so they spread over the stripes.
        let index = usize::from(u16::from_le_bytes([bytes[15], bytes[14]]));
        self.stripes[index % STRIPES].lock().await
    }

    fn lock_branches(&self) -> std::sync::MutexGuard<'_, HashMap<TxnId, Entry>> {
        self.branches.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, txn_id: TxnId, state: BranchState) {
        use std::sync::atomic::Ordering::Relaxed;
        let prepared = matches!(state, BranchState::Prepared { .. });
        let inquiry = prepared.then(|| {
            Box::new(Inquiry {
                next_at: Some(Instant::now() + self.config.termination_deadline),
                ..Inquiry::default()
            })
        });
        let now = unix_ms();
        let previous = self.lock_branches().insert(
            txn_id,
            Entry {
                state,
                since_unix_ms: now,
                inquiry,
            },
        );
        if previous.is_some_and(|e| matches!(e.state, BranchState::Prepared { .. })) {
            self.prepared_now.fetch_sub(1, Relaxed);
        }
        if prepared {
            self.prepared_now.fetch_add(1, Relaxed);
        } else {
            lock(&self.finished_order).push_back((now, txn_id));
        }
    }

    fn prepared_count(&self) -> usize {
        self.prepared_now.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn store_failed(&self, error: &StoreError) -> (Code, String) {
        if let StoreError::Fatal(message) = error {
            self.fatal.send_replace(Some(message.clone()));
            return (Code::Unavailable, error.to_string());
        }
        match error {
            StoreError::Refused(m) => (Code::FailedPrecondition, m.clone()),
            _ => (Code::Unavailable, error.to_string()),
        }
    }

    async fn prepare_inner(&self, meta: BranchMeta, payload: Bytes) -> PrepareAnswer {
        let span = debug_span!("prepare", txn = %meta.txn_id, epoch = meta.epoch);
        async {
            let _serial = self.lock_txn(&meta.txn_id).await;
            match branch::on_prepare(self.state_of(&meta.txn_id).as_ref(), &meta) {
                PrepareStep::Answer(vote) => PrepareAnswer::vote(vote),
                PrepareStep::Refuse(refusal) => {
                    PrepareAnswer::refused(Code::FailedPrecondition, refusal.message())
                }
                PrepareStep::Execute => {
                    if payload.len() > self.config.max_payload_bytes {
                        return PrepareAnswer::refused(
                            Code::InvalidArgument,
                            format!(
                                "payload of {} bytes exceeds the limit of {} bytes",
                                payload.len(),
                                self.config.max_payload_bytes
                            ),
                        );
                    }
                    if self.prepared_count() >= self.config.max_prepared {
                        return PrepareAnswer::refused(
                            Code::ResourceExhausted,
                            format!(
                                "{} branches already prepared (the limit)",
                                self.config.max_prepared
                            ),
                        );
                    }
                    match self.store.prepare(meta, payload).await {
                        Ok(store_vote) => {
                            let vote = match store_vote {
                                StoreVote::Yes => {
                                    self.prepared_total
                                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    Vote::Yes
                                }
                                StoreVote::No { reason } => Vote::No { reason },
                                StoreVote::ReadOnly => Vote::ReadOnly,
                            };
                            self.set_state(meta.txn_id, branch::after_prepare(&meta, &vote));
                            debug!(?vote, "voted");
                            PrepareAnswer::vote(vote)
                        }
                        Err(error) => {
                            let (code, message) = self.store_failed(&error);
                            warn!(txn = %meta.txn_id, %message, "prepare failed");
                            PrepareAnswer::refused(code, message)
                        }
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn commit_inner(&self, txn_id: TxnId, epoch: u64) -> Result<(), Refused> {
        let span = debug_span!("commit", txn = %txn_id, epoch);
        async {
            let _serial = self.lock_txn(&txn_id).await;
            let state = self.state_of(&txn_id);
            match branch::on_commit(state.as_ref(), epoch) {
                DecisionStep::Acknowledge => Ok(()),
                DecisionStep::Refuse(refusal) => {
                    Err((Code::FailedPrecondition, refusal.message().to_string()))
                }
                DecisionStep::Execute => {
                    self.store
                        .commit(txn_id)
                        .await
                        .map_err(|e| self.store_failed(&e))?;
                    self.set_state(txn_id, branch::after_commit(state.as_ref()));
                    debug!("committed");
                    Ok(())
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn abort_inner(&self, txn_id: TxnId, epoch: u64) -> Result<(), Refused> {
        let span = debug_span!("abort", txn = %txn_id, epoch);
        async {
            let _serial = self.lock_txn(&txn_id).await;
            let state = self.state_of(&txn_id);
            match branch::on_abort(state.as_ref(), epoch) {
                DecisionStep::Acknowledge => Ok(()),
                DecisionStep::Refuse(refusal) => {
                    Err((Code::FailedPrecondition, refusal.message().to_string()))
                }
                DecisionStep::Execute => {
                    self.store
                        .abort(txn_id)
                        .await
                        .map_err(|e| self.store_failed(&e))?;
                    self.set_state(txn_id, branch::after_abort(state.as_ref()));
                    debug!("aborted");
                    Ok(())
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn commit_one_phase_inner(
        &self,
        meta: BranchMeta,
        payload: Bytes,
    ) -> Result<OnePhaseOutcome, Refused> {
        let span = debug_span!("commit_one_phase", txn = %meta.txn_id);
        async {
            let _serial = self.lock_txn(&meta.txn_id).await;
            match branch::on_commit_one_phase(self.state_of(&meta.txn_id).as_ref(), &meta) {
                OnePhaseStep::Answer { committed: true } => Ok(OnePhaseOutcome::Committed),
                OnePhaseStep::Answer { committed: false } => Ok(OnePhaseOutcome::Aborted {
                    reason: "branch was already aborted".into(),
                }),
                OnePhaseStep::Refuse(refusal) => {
                    Err((Code::FailedPrecondition, refusal.message().to_string()))
                }
                OnePhaseStep::Execute => {
                    if payload.len() > self.config.max_payload_bytes {
                        return Err((
                            Code::InvalidArgument,
                            format!(
                                "payload of {} bytes exceeds the limit of {} bytes",
                                payload.len(),
                                self.config.max_payload_bytes
                            ),
                        ));
                    }
                    let outcome = self
                        .store
                        .commit_one_phase(meta, payload)
                        .await
                        .map_err(|e| self.store_failed(&e))?;
                    let committed = outcome == OnePhaseOutcome::Committed;
                    self.set_state(
                        meta.txn_id,
                        branch::after_commit_one_phase(&meta, committed),
                    );
                    Ok(outcome)
                }
            }
        }
        .instrument(span)
        .await
    }

    // The entry points below run their work on a task of its own: a caller that goes
    // away (an RPC cancelled because the coordinator died) must not stop a store operation
    // halfway, between the store applying a change and the branch table recording it.

    /// Handles one prepare entry.
    pub async fn prepare(self: &Arc<Self>, meta: BranchMeta, payload: Bytes) -> PrepareAnswer {
        let mut answers = self.prepare_batch(vec![(meta, payload)]).await;
        answers.pop().expect("one answer per entry")
    }

    /// Handles one commit entry.
    pub async fn commit(self: &Arc<Self>, txn_id: TxnId, epoch: u64) -> Result<(), Refused> {
        let mut results = self
            .decide_batch(vec![(txn_id, epoch)], Decision::Commit)
            .await;
        results.pop().expect("one result per entry")
    }

    /// Handles one abort entry.
    pub async fn abort(self: &Arc<Self>, txn_id: TxnId, epoch: u64) -> Result<(), Refused> {
        let mut results = self
            .decide_batch(vec![(txn_id, epoch)], Decision::Abort)
            .await;
        results.pop().expect("one result per entry")
    }

    /// Handles the prepare entries of one RPC, concurrently, on one task of their own:
    /// one spawn per batch rather than per entry.
    pub async fn prepare_batch(
        self: &Arc<Self>,
        entries: Vec<(BranchMeta, Bytes)>,
    ) -> Vec<PrepareAnswer> {
        self.decide_then_prepare(Vec::new(), entries).await.1
    }

    /// Handles the Commit (or Abort) entries of one RPC, concurrently, on one task of
    /// their own.
    pub async fn decide_batch(
        self: &Arc<Self>,
        entries: Vec<(TxnId, u64)>,
        decision: Decision,
    ) -> Vec<Result<(), Refused>> {
        let decisions = entries
            .into_iter()
            .map(|(txn_id, epoch)| (txn_id, epoch, decision))
            .collect();
        self.decide_then_prepare(decisions, Vec::new()).await.0
    }

    /// Handles one Prepare RPC that also carries decisions for earlier transactions: the
    /// decisions first, then the prepares, on one task, answered together.
    ///
    /// Every entry runs concurrently, but the decisions are polled first in the pass that
    /// holds the store's next flush: a commit releases its locks before it waits for its
    /// record, so a new branch on the same keys (the next transaction of the same client,
    /// typically) finds them free, and the Committed records share the prepares' fsync.
    /// A decision that must wait for its transaction's lock stripe does not hold the
    /// prepares back; a prepare that then meets its locks votes NO, as it would have
    /// had the decision come in an RPC of its own a moment later.
    pub async fn decide_then_prepare(
        self: &Arc<Self>,
        decisions: Vec<(TxnId, u64, Decision)>,
        prepares: Vec<(BranchMeta, Bytes)>,
    ) -> (Vec<Result<(), Refused>>, Vec<PrepareAnswer>) {
        let this = self.clone();
        let (decision_count, prepare_count) = (decisions.len(), prepares.len());
        tokio::spawn(async move {
            let decided = futures::future::join_all(decisions.into_iter().map(
                |(txn_id, epoch, decision)| {
                    let this = &this;
                    async move {
                        match decision {
                            Decision::Commit => this.commit_inner(txn_id, epoch).await,
                            Decision::Abort => this.abort_inner(txn_id, epoch).await,
                        }
                    }
                },
            ));
            let prepared = futures::future::join_all(
                prepares
                    .into_iter()
                    .map(|(meta, payload)| this.prepare_inner(meta, payload)),
            );
            // `join` polls in argument order: the decisions go first in every pass.
            let both = async { futures::join!(decided, prepared) };
            if prepare_count > 0 && decision_count + prepare_count > 1 {
                with_flush_held(this.store.as_ref(), both).await
            } else {
                both.await
            }
        })
        .await
        .unwrap_or_else(|e| {
            (
                vec![Err((Code::Internal, format!("decision failed: {e}"))); decision_count],
                vec![
                    PrepareAnswer::refused(Code::Internal, format!("prepare failed: {e}"));
                    prepare_count
                ],
            )
        })
    }

    /// Handles a one-phase commit.
    pub async fn commit_one_phase(
        self: &Arc<Self>,
        meta: BranchMeta,
        payload: Bytes,
    ) -> Result<OnePhaseOutcome, Refused> {
        let this = self.clone();
        tokio::spawn(async move { this.commit_one_phase_inner(meta, payload).await })
            .await
            .unwrap_or_else(|e| Err((Code::Internal, format!("one-phase commit failed: {e}"))))
    }

    /// Takes in prepared branches the store found that the runtime does not know (e.g.
    /// PostgreSQL prepared transactions left by an earlier process); they ask the
    /// coordinator for their outcome at once. Known branches are left as they are.
    pub fn adopt_prepared(&self, branches: Vec<crate::store::PreparedBranch>) -> usize {
        let mut table = self.lock_branches();
        let mut adopted = 0;
        for branch in branches {
            table.entry(branch.meta.txn_id).or_insert_with(|| {
                adopted += 1;
                self.prepared_now
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(txn = %branch.meta.txn_id, "adopting a prepared branch the runtime did not know");
                Entry {
                    state: BranchState::Prepared {
                        epoch: branch.meta.epoch,
                        digest: branch.meta.digest,
                    },
                    since_unix_ms: branch.prepared_at_unix_ms,
                    inquiry: Some(Box::new(Inquiry {
                        next_at: Some(Instant::now()),
                        ..Inquiry::default()
                    })),
                }
            });
        }
        adopted
    }

    /// Prepared branches, oldest first, cut at `limit`; and how many there are in all.
    pub fn in_doubt(&self, limit: usize) -> (Vec<InDoubt>, usize) {
        let branches = self.lock_branches();
        let mut list: Vec<InDoubt> = branches
            .iter()
            .filter_map(|(txn_id, e)| match e.state {
                BranchState::Prepared { epoch, .. } => Some(InDoubt {
                    txn_id: *txn_id,
                    epoch,
                    prepared_at_unix_ms: e.since_unix_ms,
                    last_inquiry: e
                        .inquiry
                        .as_ref()
                        .map_or_else(String::new, |i| i.last.clone()),
                    inquiries: e.inquiry.as_ref().map_or(0, |i| i.count),
                }),
                _ => None,
            })
            .collect();
        let total = list.len();
        list.sort_by_key(|b| (b.prepared_at_unix_ms, b.txn_id));
        list.truncate(limit);
        (list, total)
    }

    /// The termination protocol: asks the coordinator about branches prepared past the
    /// deadline (or recovered on restart) and applies its answer, with capped, jittered
    /// exponential backoff per branch. Also drops tombstones past retention. Runs until
    /// `shutdown` fires.
    pub async fn run_background(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let tick = (self.config.termination_deadline / 4)
            .clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut client = None;
        let mut last_gc = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
            if let Some(endpoint) = &self.config.coordinator {
                if client.is_none() {
                    client = self
                        .config
                        .dialer
                        .dial(endpoint)
                        .map(CoordinatorClient::new);
                }
                if let Some(client) = &client {
                    self.inquire_due(client.clone()).await;
                }
            }
            if last_gc.elapsed() >= Duration::from_secs(1) {
                last_gc = Instant::now();
                self.collect_tombstones().await;
            }
        }
    }

    async fn inquire_due(&self, client: CoordinatorClient<tonic::transport::Channel>) {
        let now = Instant::now();
        // The 256 most overdue first (and in a fixed order, which keeps simulation runs
        // reproducible).
        let mut due: Vec<(Instant, TxnId, u64)> = self
            .lock_branches()
            .iter()
            .filter_map(|(txn_id, e)| match (e.state, e.inquiry.as_ref()?.next_at) {
                (BranchState::Prepared { epoch, .. }, Some(at)) if at <= now => {
                    Some((at, *txn_id, epoch))
                }
                _ => None,
            })
            .collect();
        due.sort_unstable();
        let due = due
            .into_iter()
            .take(256)
            .map(|(_, txn_id, epoch)| (txn_id, epoch));
        let asks = due.map(|(txn_id, epoch)| {
            let mut client = client.clone();
            async move {
                let request = v1::GetOutcomeRequest {
                    txn_id: txn_id.to_vec().into(),
                    participant: self.config.name.clone(),
                };
                let answer =
                    tokio::time::timeout(Duration::from_secs(5), client.get_outcome(request)).await;
                let outcome = match answer {
                    Ok(Ok(response)) => Ok(response.into_inner().outcome()),
                    Ok(Err(status)) => Err(format!("{}: {}", status.code(), status.message())),
                    Err(_) => Err("GetOutcome timed out".to_string()),
                };
                self.apply_inquiry(txn_id, epoch, outcome).await;
            }
        });
        futures::future::join_all(asks).await;
    }

    async fn apply_inquiry(&self, txn_id: TxnId, epoch: u64, outcome: Result<v1::Outcome, String>) {
        let applied = match &outcome {
            Ok(v1::Outcome::Committed) => Some(self.commit_inner(txn_id, epoch).await),
            // A coordinator with no record answers ABORTED to a participant: presumed abort.
            Ok(v1::Outcome::Aborted) => Some(self.abort_inner(txn_id, epoch).await),
            _ => None,
        };
        let note = match (&outcome, &applied) {
            (Ok(o), Some(Ok(()))) => {
                info!(txn = %txn_id, outcome = o.as_str_name(), "in-doubt branch resolved by the coordinator's answer");
                return;
            }
            (Ok(o), Some(Err((_, e)))) => format!("{}; applying it failed: {e}", o.as_str_name()),
            (Ok(o), None) => o.as_str_name().to_string(),
            (Err(e), _) => e.clone(),
        };
        let mut branches = self.lock_branches();
        if let Some(inquiry) = branches
            .get_mut(&txn_id)
            .and_then(|e| e.inquiry.as_deref_mut())
        {
            inquiry.count += 1;
            inquiry.last = note;
            inquiry.backoff = if inquiry.backoff.is_zero() {
                self.config.termination_backoff_initial
            } else {
                (inquiry.backoff * 2).min(self.config.termination_backoff_max)
            };
            // Full jitter on the upper half keeps many in-doubt branches from asking in step.
            let half = inquiry.backoff / 2;
            let jitter = half.mul_f64(fastrand::f64());
            inquiry.next_at = Some(Instant::now() + half + jitter);
        }
    }

    async fn collect_tombstones(&self) {
        let retention_ms =
            u64::try_from(self.config.tombstone_retention.as_millis()).unwrap_or(u64::MAX);
        let now = unix_ms();
        let expired: Vec<TxnId> = {
            // Oldest first: pop while over the count or past retention.
            let mut order = lock(&self.finished_order);
            let mut expired = Vec::new();
            while let Some(&(since, txn_id)) = order.front() {
                if order.len() <= self.config.max_tombstones
                    && now.saturating_sub(since) <= retention_ms
                {
                    break;
                }
                order.pop_front();
                expired.push(txn_id);
            }
            drop(order);
            let mut branches = self.lock_branches();
            expired.retain(|txn_id| {
                let finished = branches
                    .get(txn_id)
                    .is_some_and(|e| !matches!(e.state, BranchState::Prepared { .. }));
                if finished {
                    branches.remove(txn_id);
                }
                finished
            });
            expired
        };
        if !expired.is_empty() {
            // Crash point: tombstones dropped from memory, not yet from the store (P9).
            crash_point!("participant::tombstone_gc");
            debug!(count = expired.len(), "tombstones dropped");
            if let Err(error) = self.store.forget(expired).await {
                warn!(%error, "dropping tombstones from the store failed");
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Runs `batch` (one RPC's entries) with the store's next flush held during its first
/// pass: each entry runs until it waits for its record to be durable, so by the end of
/// the pass the records are queued and the batch shares one fsync. Then the hold ends
/// and the batch waits as usual. Entries the pass cannot reach miss that flush and take
/// the next: one waiting for its transaction's lock stripe, and those beyond tokio's
/// cooperative budget (each stripe lock spends one unit of 128 per poll), so batches
/// over about 128 entries take two flushes rather than block a worker thread longer.
async fn with_flush_held<R: ResourceManager, F: std::future::Future>(
    store: &R,
    batch: F,
) -> F::Output {
    let mut batch = std::pin::pin!(batch);
    let hold = store.hold_flushes();
    let first_pass = futures::poll!(batch.as_mut());
    drop(hold);
    match first_pass {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => batch.await,
    }
}
