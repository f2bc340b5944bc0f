//! The coordinator's transaction engine: presumed-abort two-phase commit as a plain
//! state machine. Inputs (client commands, votes, acknowledgements, timer firings,
//! "record durable" notices) go in through [`Engine::handle`]; [`Action`]s (send, append,
//! reply, arm a timer) come out. No tokio, no tonic, no file I/O, no clock: the caller
//! passes the time in, so every run is reproducible.
//!
//! The rules that make it safe, checked on every transition:
//! - a decision never changes once taken;
//! - Commit is sent (and COMMITTED answered) only when every participant voted YES or
//!   READ_ONLY and the COMMIT decision record is durable.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use ratify_proto::TxnId;

use crate::log::{Decision, LogParticipant, LogRecord};

#[cfg(test)]
mod tests;

/// Milliseconds on the caller's clock (monotonic, Unix-aligned at start).
pub type Millis = u64;

/// A client request awaiting its reply, chosen by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReqId(pub u64);

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Votes not in by then abort the transaction.
    pub prepare_timeout_ms: u64,
    pub default_txn_timeout_ms: u64,
    pub max_txn_timeout_ms: u64,
    pub max_participants: usize,
    /// Transactions held at once (begun and not yet forgotten).
    pub max_in_flight: usize,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// Outcomes remembered after a transaction is forgotten, for client status queries.
    pub outcome_cache: usize,
    pub timeline_cap: usize,
    /// Seed of the jitter of retry backoff (deterministic in tests).
    pub seed: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            prepare_timeout_ms: 5_000,
            default_txn_timeout_ms: 60_000,
            max_txn_timeout_ms: 3_600_000,
            max_participants: 32,
            max_in_flight: 100_000,
            retry_initial_ms: 100,
            retry_max_ms: 10_000,
            outcome_cache: 100_000,
            timeline_cap: 64,
            seed: 0x5eed,
        }
    }
}

/// A participant's answer to Prepare, as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoteResult {
    Yes,
    No {
        reason: String,
    },
    ReadOnly,
    /// The RPC failed or the entry was refused: counts as NO.
    Failed {
        error: String,
    },
}

/// The outcome of a one-phase commit, as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnePhaseResult {
    Committed,
    Aborted {
        reason: String,
    },
    /// Transport failure: the outcome is unknown; retried.
    Failed {
        error: String,
    },
}

/// Timers the engine arms.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Timer {
    /// The transaction's lifetime: still undecided then, it aborts.
    Lifetime,
    /// Votes still missing then abort the transaction.
    PrepareDeadline,
    /// Resend phase 2 (or the one-phase commit) to this participant.
    Retry { participant: String },
    /// Answer waiting clients of a one-phase commit whose outcome is still unknown.
    OnePhaseDeadline,
}

/// Which forced record became durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durable {
    /// The COMMIT decision.
    CommitDecision,
    /// An operator's resolution (req replied once durable).
    Resolution { req: ReqId },
}

/// Everything that can happen to the engine.
#[derive(Debug, Clone)]
pub enum Input {
    Begin {
        txn: TxnId,
        timeout_ms: u64,
        req: ReqId,
    },
    Enlist {
        txn: TxnId,
        participant: String,
        incarnation: u64,
        endpoint: String,
        req: ReqId,
    },
    Commit {
        txn: TxnId,
        wait_for_phase2: bool,
        req: ReqId,
    },
    Abort {
        txn: TxnId,
        reason: String,
        req: ReqId,
    },
    /// A one-shot transaction: every branch's payload rides on its Prepare.
    Execute {
        txn: TxnId,
        branches: Vec<ExecuteBranch>,
        timeout_ms: u64,
        wait_for_phase2: bool,
        req: ReqId,
    },
    Vote {
        txn: TxnId,
        participant: String,
        vote: VoteResult,
    },
    OnePhase {
        txn: TxnId,
        participant: String,
        result: OnePhaseResult,
    },
    /// A phase-2 message was acknowledged (Ok) or failed (Err, retried).
    Ack {
        txn: TxnId,
        participant: String,
        result: Result<(), String>,
    },
    Durable {
        txn: TxnId,
        what: Durable,
    },
    Timer {
        txn: TxnId,
        timer: Timer,
    },
    /// An operator forces the outcome of an in-doubt transaction.
    Resolve {
        txn: TxnId,
        decision: Decision,
        actor: String,
        reason: String,
        req: ReqId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecuteBranch {
    pub participant: String,
    pub endpoint: String,
    pub payload: Bytes,
}

/// A transaction's outcome as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    Aborted,
    InProgress,
    Unknown,
}

/// Why a request is refused; each maps to a gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotFound(String),
    FailedPrecondition(String),
    ResourceExhausted(String),
    InvalidArgument(String),
    /// The outcome is not known within the deadline (one-phase commit to an unreachable
    /// participant); the engine keeps retrying.
    DeadlineExceeded(String),
}

/// What a client hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Begun {
        txn: TxnId,
    },
    Enlisted {
        epoch: u64,
    },
    Outcome {
        txn: TxnId,
        outcome: Outcome,
        reason: String,
    },
    Resolved {
        outcome: Outcome,
        message: String,
    },
    Refused(Refusal),
}

/// What the engine asks its driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    SendPrepare {
        txn: TxnId,
        participant: String,
        endpoint: String,
        epoch: u64,
        incarnation: u64,
        payload: Bytes,
    },
    /// A decision for one participant. Unless `urgent`, the driver may hold it briefly
    /// for a Prepare to the same participant to carry.
    SendCommit {
        txn: TxnId,
        participant: String,
        endpoint: String,
        epoch: u64,
        /// Send at once and alone: a retry (the last attempt failed or went unanswered,
        /// perhaps with the Prepare that carried it), or a client waits for phase two.
        urgent: bool,
    },
    SendAbort {
        txn: TxnId,
        participant: String,
        endpoint: String,
        epoch: u64,
        /// As for `SendCommit`.
        urgent: bool,
    },
    SendCommitOnePhase {
        txn: TxnId,
        participant: String,
        endpoint: String,
        epoch: u64,
        incarnation: u64,
        payload: Bytes,
    },
    /// Write a record. `force`: the driver must report [`Input::Durable`] with `then`
    /// once it is durable; nothing that depends on it happens before.
    Append {
        record: LogRecord,
        force: Option<Durable>,
    },
    Reply {
        req: ReqId,
        reply: Reply,
    },
    ArmTimer {
        txn: TxnId,
        timer: Timer,
        at: Millis,
    },
    /// The transaction reached its end (outcome reported for metrics).
    Finished {
        txn: TxnId,
        outcome: Outcome,
        started_at: Millis,
    },
}

/// Where a transaction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TxnState {
    Active,
    Preparing,
    /// All voted YES: the COMMIT record is being forced.
    Deciding,
    Committed,
    Aborted,
}

/// Where one participant's branch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchState {
    Enlisted,
    Preparing,
    Yes,
    No,
    ReadOnly,
    /// Phase 2 (or a one-phase commit) sent, not yet acknowledged.
    Pending,
    /// A failed phase-2 attempt; a retry timer is armed.
    Retrying,
    Acknowledged,
}

impl BranchState {
    pub fn as_str(&self) -> &'static str {
        match self {
            BranchState::Enlisted => "enlisted",
            BranchState::Preparing => "preparing",
            BranchState::Yes => "yes",
            BranchState::No => "no",
            BranchState::ReadOnly => "read-only",
            BranchState::Pending => "pending",
            BranchState::Retrying => "retrying",
            BranchState::Acknowledged => "acknowledged",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Branch {
    pub participant: String,
    pub endpoint: String,
    pub incarnation: u64,
    pub payload: Bytes,
    pub state: BranchState,
    /// Whether this participant may hold a prepared branch (so it needs phase 2).
    voted_yes: bool,
    pub attempts: u32,
    pub last_error: String,
}

/// One line of a transaction's timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at: Millis,
    pub what: String,
}

#[derive(Debug, Clone)]
pub struct Txn {
    pub id: TxnId,
    pub state: TxnState,
    pub started_at: Millis,
    pub deadline: Millis,
    pub branches: Vec<Branch>,
    decision: Option<Decision>,
    decision_durable: bool,
    /// Whether the client asked to commit (so an abort answers ABORTED, not a refusal).
    commit_requested: bool,
    one_phase: bool,
    pub abort_reason: String,
    /// Whether any record of it was written (so an END is owed).
    logged: bool,
    /// An operator's resolution record is being forced: END must wait for it, so the log
    /// never holds a decision record after the END of its transaction.
    resolution_pending: bool,
    waiting_decision: Vec<ReqId>,
    waiting_phase2: Vec<ReqId>,
    pub timeline: Vec<Event>,
    pub last_error: String,
}

impl Txn {
    pub fn decision(&self) -> Option<Decision> {
        self.decision
    }

    /// Participants that still owe a vote or an acknowledgement.
    pub fn pending(&self) -> Vec<&str> {
        self.branches
            .iter()
            .filter(|b| {
                matches!(
                    b.state,
                    BranchState::Preparing | BranchState::Pending | BranchState::Retrying
                )
            })
            .map(|b| b.participant.as_str())
            .collect()
    }

    /// Preparing, deciding, or decided and not acknowledged by everyone.
    pub fn in_doubt(&self) -> bool {
        self.state != TxnState::Active
    }
}

/// The engine: every transaction the coordinator holds.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    epoch: u64,
    txns: HashMap<TxnId, Txn>,
    recent: VecDeque<TxnId>,
    /// Outcomes of forgotten transactions, and whether a commit was asked for (so a late
    /// Commit of a transaction the client aborted is refused rather than answered).
    recent_outcomes: HashMap<TxnId, (Outcome, bool)>,
    rng: fastrand::Rng,
}

fn refused(req: ReqId, refusal: Refusal) -> Action {
    Action::Reply {
        req,
        reply: Reply::Refused(refusal),
    }
}

fn participants_of(branches: &[Branch], filter: impl Fn(&Branch) -> bool) -> Vec<LogParticipant> {
    branches
        .iter()
        .filter(|b| filter(b))
        .map(|b| LogParticipant {
            name: b.participant.clone(),
            incarnation: b.incarnation,
            endpoint: b.endpoint.clone(),
        })
        .collect()
}

impl Engine {
    pub fn new(config: EngineConfig, epoch: u64) -> Self {
        let rng = fastrand::Rng::with_seed(config.seed);
        Self {
            config,
            epoch,
            txns: HashMap::new(),
            recent: VecDeque::new(),
            recent_outcomes: HashMap::new(),
            rng,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn txn(&self, txn: &TxnId) -> Option<&Txn> {
        self.txns.get(txn)
    }

    pub fn txns(&self) -> impl Iterator<Item = &Txn> {
        self.txns.values()
    }

    pub fn in_flight(&self) -> usize {
        self.txns.len()
    }

    /// The outcome as GetOutcome answers it. `for_participant`: a participant asking about
    /// a branch it prepared, for which "no record" means ABORTED (presumed abort).
    pub fn outcome(&self, txn: &TxnId, for_participant: bool) -> Outcome {
        if let Some(t) = self.txns.get(txn) {
            return match (t.state, t.decision_durable) {
                (TxnState::Committed, true) => Outcome::Committed,
                (TxnState::Aborted, _) => Outcome::Aborted,
                _ => Outcome::InProgress,
            };
        }
        if let Some((outcome, _)) = self.recent_outcomes.get(txn) {
            return *outcome;
        }
        if for_participant {
            Outcome::Aborted
        } else {
            Outcome::Unknown
        }
    }

    /// Rebuilds the transactions a replayed log leaves unfinished and returns the actions
    /// that finish them: every COMMIT without END is re-driven; every transaction that
    /// started preparing without a decision is aborted by presumption.
    pub fn recover(&mut self, now: Millis, records: Vec<LogRecord>) -> Vec<Action> {
        struct Seen {
            decision: Option<(Decision, Vec<LogParticipant>, Millis)>,
            ended: bool,
        }
        let mut seen: BTreeMap<TxnId, Seen> = BTreeMap::new();
        for record in records {
            fn entry(seen: &mut BTreeMap<TxnId, Seen>, txn: TxnId) -> &mut Seen {
                seen.entry(txn).or_insert(Seen {
                    decision: None,
                    ended: false,
                })
            }
            match record {
                LogRecord::Decision {
                    txn,
                    decision,
                    participants,
                    at_unix_ms,
                    ..
                } => {
                    let e = entry(&mut seen, txn);
                    // A later record for the same transaction (an operator's resolution)
                    // repeats the decision; the first one stands.
                    if e.decision.is_none() {
                        e.decision = Some((decision, participants, at_unix_ms));
                    }
                }
                LogRecord::End { txn } => entry(&mut seen, txn).ended = true,
            }
        }
        let mut actions = Vec::new();
        for (txn, s) in seen {
            if s.ended {
                if let Some((decision, _, _)) = s.decision {
                    self.remember(txn, outcome_of(decision), true);
                }
                continue;
            }
            // A transaction with no decision logged needs nothing here: presumed abort. Its
            // participants hear ABORTED when they ask (GetOutcome), and a client hears that
            // the coordinator has no record of it.
            let Some((decision, participants, at)) = s.decision else {
                continue;
            };
            let reason = "recovered after restart".to_string();
            let branches = participants
                .into_iter()
                .map(|p| Branch {
                    participant: p.name,
                    endpoint: p.endpoint,
                    incarnation: p.incarnation,
                    payload: Bytes::new(),
                    state: BranchState::Yes,
                    voted_yes: true,
                    attempts: 0,
                    last_error: String::new(),
                })
                .collect();
            let mut t = Txn {
                id: txn,
                state: TxnState::Active,
                started_at: at,
                deadline: Millis::MAX,
                branches,
                decision: None,
                decision_durable: false,
                commit_requested: true,
                one_phase: false,
                abort_reason: String::new(),
                logged: true,
                resolution_pending: false,
                waiting_decision: Vec::new(),
                waiting_phase2: Vec::new(),
                timeline: Vec::new(),
                last_error: String::new(),
            };
            self.note(&mut t, now, format!("recovered from the log: {reason}"));
            match decision {
                Decision::Commit => {
                    t.decision = Some(Decision::Commit);
                    t.decision_durable = true;
                    t.state = TxnState::Committed;
                    self.txns.insert(txn, t);
                    self.start_phase2(now, txn, &mut actions);
                }
                Decision::Abort => {
                    self.txns.insert(txn, t);
                    self.decide_abort(now, txn, reason, None, &mut actions);
                }
            }
        }
        actions
    }

    /// Feeds one input; returns what to do.
    pub fn handle(&mut self, now: Millis, input: Input) -> Vec<Action> {
        let mut actions = Vec::new();
        match input {
            Input::Begin {
                txn,
                timeout_ms,
                req,
            } => self.begin(now, txn, timeout_ms, req, &mut actions),
            Input::Enlist {
                txn,
                participant,
                incarnation,
                endpoint,
                req,
            } => self.enlist(
                now,
                txn,
                participant,
                incarnation,
                endpoint,
                req,
                &mut actions,
            ),
            Input::Commit {
                txn,
                wait_for_phase2,
                req,
            } => self.commit(now, txn, wait_for_phase2, req, &mut actions),
            Input::Abort { txn, reason, req } => {
                self.client_abort(now, txn, reason, req, &mut actions)
            }
            Input::Execute {
                txn,
                branches,
                timeout_ms,
                wait_for_phase2,
                req,
            } => self.execute(
                now,
                txn,
                branches,
                timeout_ms,
                wait_for_phase2,
                req,
                &mut actions,
            ),
            Input::Vote {
                txn,
                participant,
                vote,
            } => self.vote(now, txn, participant, vote, &mut actions),
            Input::OnePhase {
                txn,
                participant,
                result,
            } => self.one_phase_result(now, txn, participant, result, &mut actions),
            Input::Ack {
                txn,
                participant,
                result,
            } => self.ack(now, txn, participant, result, &mut actions),
            Input::Durable { txn, what } => self.durable(now, txn, what, &mut actions),
            Input::Timer { txn, timer } => self.timer(now, txn, timer, &mut actions),
            Input::Resolve {
                txn,
                decision,
                actor,
                reason,
                req,
            } => self.resolve(now, txn, decision, actor, reason, req, &mut actions),
        }
        actions
    }

    fn note(&self, t: &mut Txn, now: Millis, what: String) {
        if t.timeline.len() >= self.config.timeline_cap {
            // Keep the first events (how it started) and the latest.
            t.timeline.remove(self.config.timeline_cap / 2);
        }
        t.timeline.push(Event { at: now, what });
    }

    fn remember(&mut self, txn: TxnId, outcome: Outcome, commit_requested: bool) {
        if self.config.outcome_cache == 0 {
            return;
        }
        if self
            .recent_outcomes
            .insert(txn, (outcome, commit_requested))
            .is_none()
        {
            self.recent.push_back(txn);
        }
        while self.recent.len() > self.config.outcome_cache {
            if let Some(old) = self.recent.pop_front() {
                self.recent_outcomes.remove(&old);
            }
        }
    }

    fn lifetime(&self, timeout_ms: u64) -> Result<u64, Refusal> {
        match timeout_ms {
            0 => Ok(self.config.default_txn_timeout_ms),
            t if t > self.config.max_txn_timeout_ms => Err(Refusal::InvalidArgument(format!(
                "timeout of {t} ms exceeds the maximum of {} ms",
                self.config.max_txn_timeout_ms
            ))),
            t => Ok(t),
        }
    }

    fn admit(&self, txn: &TxnId) -> Result<(), Refusal> {
        if self.txns.len() >= self.config.max_in_flight {
            return Err(Refusal::ResourceExhausted(format!(
                "{} transactions in flight (the limit)",
                self.config.max_in_flight
            )));
        }
        if self.txns.contains_key(txn) || self.recent_outcomes.contains_key(txn) {
            return Err(Refusal::FailedPrecondition(format!(
                "transaction id {txn} is already in use"
            )));
        }
        Ok(())
    }

    fn new_txn(&self, txn: TxnId, now: Millis, lifetime: u64) -> Txn {
        Txn {
            id: txn,
            state: TxnState::Active,
            started_at: now,
            deadline: now.saturating_add(lifetime),
            branches: Vec::new(),
            decision: None,
            decision_durable: false,
            commit_requested: false,
            one_phase: false,
            abort_reason: String::new(),
            logged: false,
            resolution_pending: false,
            waiting_decision: Vec::new(),
            waiting_phase2: Vec::new(),
            timeline: Vec::new(),
            last_error: String::new(),
        }
    }

    fn begin(
        &mut self,
        now: Millis,
        txn: TxnId,
        timeout_ms: u64,
        req: ReqId,
        actions: &mut Vec<Action>,
    ) {
        let lifetime = match self
            .lifetime(timeout_ms)
            .and_then(|l| self.admit(&txn).map(|()| l))
        {
            Ok(l) => l,
            Err(refusal) => return actions.push(refused(req, refusal)),
        };
        // Not logged: under presumed abort a transaction that never reaches prepare
        // needs no record.
        let mut t = self.new_txn(txn, now, lifetime);
        self.note(&mut t, now, "begun".into());
        actions.push(Action::ArmTimer {
            txn,
            timer: Timer::Lifetime,
            at: t.deadline,
        });
        self.txns.insert(txn, t);
        actions.push(Action::Reply {
            req,
            reply: Reply::Begun { txn },
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn enlist(
        &mut self,
        now: Millis,
        txn: TxnId,
        participant: String,
        incarnation: u64,
        endpoint: String,
        req: ReqId,
        actions: &mut Vec<Action>,
    ) {
        let max = self.config.max_participants;
        let epoch = self.epoch;
        let Some(mut t) = self.txns.remove(&txn) else {
            return actions.push(refused(
                req,
                Refusal::NotFound(format!("no transaction {txn}")),
            ));
        };
        let result = if t.state != TxnState::Active {
            Err(Refusal::FailedPrecondition(format!(
                "transaction {txn} is past enlistment ({:?})",
                t.state
            )))
        } else if let Some(branch) = t.branches.iter_mut().find(|b| b.participant == participant) {
            // Enlisting twice is idempotent. The first incarnation is kept: if the
            // participant restarted in between, its prepare then votes NO rather than
            // commit half of the branch.
            branch.endpoint = endpoint;
            Ok(())
        } else if t.branches.len() >= max {
            Err(Refusal::ResourceExhausted(format!(
                "a transaction has at most {max} participants"
            )))
        } else {
            t.branches.push(Branch {
                participant: participant.clone(),
                endpoint,
                incarnation,
                payload: Bytes::new(),
                state: BranchState::Enlisted,
                voted_yes: false,
                attempts: 0,
                last_error: String::new(),
            });
            self.note(&mut t, now, format!("{participant} enlisted"));
            Ok(())
        };
        self.txns.insert(txn, t);
        actions.push(match result {
            Ok(()) => Action::Reply {
                req,
                reply: Reply::Enlisted { epoch },
            },
            Err(refusal) => refused(req, refusal),
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn execute(
        &mut self,
        now: Millis,
        txn: TxnId,
        branches: Vec<ExecuteBranch>,
        timeout_ms: u64,
        wait_for_phase2: bool,
        req: ReqId,
        actions: &mut Vec<Action>,
    ) {
        let checked = self.lifetime(timeout_ms).and_then(|l| {
            self.admit(&txn)?;
            if branches.is_empty() {
                return Err(Refusal::InvalidArgument("no branches".into()));
            }
            if branches.len() > self.config.max_participants {
                return Err(Refusal::ResourceExhausted(format!(
                    "a transaction has at most {} participants",
                    self.config.max_participants
                )));
            }
            let mut names: Vec<&str> = branches.iter().map(|b| b.participant.as_str()).collect();
            names.sort_unstable();
            if names.windows(2).any(|w| w[0] == w[1]) {
                return Err(Refusal::InvalidArgument(
                    "a participant appears twice; give it one branch".into(),
                ));
            }
            Ok(l)
        });
        let lifetime = match checked {
            Ok(l) => l,
            Err(refusal) => return actions.push(refused(req, refusal)),
        };
        let mut t = self.new_txn(txn, now, lifetime);
        t.branches = branches
            .into_iter()
            .map(|b| Branch {
                participant: b.participant,
                endpoint: b.endpoint,
                incarnation: 0,
                payload: b.payload,
                state: BranchState::Enlisted,
                voted_yes: false,
                attempts: 0,
                last_error: String::new(),
            })
            .collect();
        self.note(&mut t, now, "executed (one-shot)".into());
        actions.push(Action::ArmTimer {
            txn,
            timer: Timer::Lifetime,
            at: t.deadline,
        });
        self.txns.insert(txn, t);
        self.commit(now, txn, wait_for_phase2, req, actions);
    }

    fn reply_outcome(&self, t: &Txn, req: ReqId, actions: &mut Vec<Action>) {
        let (outcome, reason) = match t.decision {
            Some(Decision::Commit) if t.decision_durable => (Outcome::Committed, String::new()),
            Some(Decision::Abort) => (Outcome::Aborted, t.abort_reason.clone()),
            _ => (Outcome::InProgress, String::new()),
        };
        actions.push(Action::Reply {
            req,
            reply: Reply::Outcome {
                txn: t.id,
                outcome,
                reason,
            },
        });
    }

    fn commit(
        &mut self,
        now: Millis,
        txn: TxnId,
        wait_for_phase2: bool,
        req: ReqId,
        actions: &mut Vec<Action>,
    ) {
        let epoch = self.epoch;
        let Some(t) = self.txns.get_mut(&txn) else {
            // Forgotten after END (or committed in one phase): answer what is remembered; a
            // commit of a transaction the client aborted is refused.
            let refuse = |outcome: Outcome, commit_requested: bool| {
                (outcome == Outcome::Aborted && !commit_requested)
                    .then(|| format!("transaction {txn} was aborted"))
            };
            return self.answer_forgotten(txn, req, refuse, actions);
        };
        match t.state {
            TxnState::Active => {}
            TxnState::Preparing | TxnState::Deciding => {
                // A duplicate Commit joins the first.
                if wait_for_phase2 {
                    t.waiting_phase2.push(req);
                } else {
                    t.waiting_decision.push(req);
                }
                return;
            }
            TxnState::Committed => {
                if wait_for_phase2 && !t.pending().is_empty() {
                    t.waiting_phase2.push(req);
                } else {
                    let t = t.clone();
                    self.reply_outcome(&t, req, actions);
                }
                return;
            }
            TxnState::Aborted => {
                if t.commit_requested {
                    let t = t.clone();
                    self.reply_outcome(&t, req, actions);
                } else {
                    actions.push(refused(
                        req,
                        Refusal::FailedPrecondition(format!(
                            "transaction {txn} was aborted ({})",
                            t.abort_reason
                        )),
                    ));
                }
                return;
            }
        }
        t.commit_requested = true;
        if wait_for_phase2 {
            t.waiting_phase2.push(req);
        } else {
            t.waiting_decision.push(req);
        }
        match t.branches.len() {
            0 => {
                // Nothing to commit anywhere: trivially committed, nothing to log.
                t.decision = Some(Decision::Commit);
                t.decision_durable = true;
                t.state = TxnState::Committed;
                self.finish(now, txn, actions);
            }
            1 => {
                // One participant: it decides alone (one-phase commit, no decision record).
                t.one_phase = true;
                t.state = TxnState::Preparing;
                let b = &mut t.branches[0];
                b.state = BranchState::Pending;
                actions.push(Action::SendCommitOnePhase {
                    txn,
                    participant: b.participant.clone(),
                    endpoint: b.endpoint.clone(),
                    epoch,
                    incarnation: b.incarnation,
                    payload: b.payload.clone(),
                });
                let what = format!("one-phase commit sent to {}", b.participant);
                let mut t = self.txns.remove(&txn).expect("present");
                self.note(&mut t, now, what);
                self.txns.insert(txn, t);
                actions.push(Action::ArmTimer {
                    txn,
                    timer: Timer::OnePhaseDeadline,
                    at: now.saturating_add(self.config.prepare_timeout_ms),
                });
            }
            _ => {
                // Nothing is logged before the decision (presumed abort): a restart that
                // finds no decision aborts, whatever was prepared.
                t.state = TxnState::Preparing;
                for b in &mut t.branches {
                    b.state = BranchState::Preparing;
                    actions.push(Action::SendPrepare {
                        txn,
                        participant: b.participant.clone(),
                        endpoint: b.endpoint.clone(),
                        epoch,
                        incarnation: b.incarnation,
                        payload: b.payload.clone(),
                    });
                }
                let mut t = self.txns.remove(&txn).expect("present");
                let what = format!("prepare sent to {} participants", t.branches.len());
                self.note(&mut t, now, what);
                self.txns.insert(txn, t);
                actions.push(Action::ArmTimer {
                    txn,
                    timer: Timer::PrepareDeadline,
                    at: now.saturating_add(self.config.prepare_timeout_ms),
                });
            }
        }
    }

    /// Answers a client command about a transaction no longer held: its remembered outcome,
    /// a refusal when `refuse` says the command contradicts it, or NOT_FOUND.
    fn answer_forgotten(
        &self,
        txn: TxnId,
        req: ReqId,
        refuse: impl Fn(Outcome, bool) -> Option<String>,
        actions: &mut Vec<Action>,
    ) {
        actions.push(match self.recent_outcomes.get(&txn) {
            Some(&(outcome, commit_requested)) => match refuse(outcome, commit_requested) {
                Some(message) => refused(req, Refusal::FailedPrecondition(message)),
                None => Action::Reply {
                    req,
                    reply: Reply::Outcome {
                        txn,
                        outcome,
                        reason: String::new(),
                    },
                },
            },
            None => refused(req, Refusal::NotFound(format!("no transaction {txn}"))),
        });
    }

    fn client_abort(
        &mut self,
        now: Millis,
        txn: TxnId,
        reason: String,
        req: ReqId,
        actions: &mut Vec<Action>,
    ) {
        let Some(t) = self.txns.get(&txn) else {
            // An abort never flips a remembered commit.
            let refuse = |outcome: Outcome, _| {
                (outcome == Outcome::Committed).then(|| format!("transaction {txn} is committed"))
            };
            return self.answer_forgotten(txn, req, refuse, actions);
        };
        match (t.state, t.one_phase) {
            (TxnState::Active, _) | (TxnState::Preparing, false) => {
                let reason = if reason.is_empty() {
                    "aborted by the client".to_string()
                } else {
                    format!("aborted by the client: {reason}")
                };
                self.decide_abort(now, txn, reason, None, actions);
                let t = self.txns.get(&txn).cloned();
                match t {
                    Some(t) => self.reply_outcome(&t, req, actions),
                    None => actions.push(Action::Reply {
                        req,
                        reply: Reply::Outcome {
                            txn,
                            outcome: Outcome::Aborted,
                            reason: String::new(),
                        },
                    }),
                }
            }
            (TxnState::Aborted, _) => {
                let t = t.clone();
                self.reply_outcome(&t, req, actions);
            }
            (TxnState::Committed, _) | (TxnState::Deciding, _) => actions.push(refused(
                req,
                Refusal::FailedPrecondition(format!("transaction {txn} is committed")),
            )),
            (TxnState::Preparing, true) => actions.push(refused(
                req,
                Refusal::FailedPrecondition(format!(
                    "transaction {txn} is committing in one phase; its participant decides"
                )),
            )),
        }
    }

    fn vote(
        &mut self,
        now: Millis,
        txn: TxnId,
        participant: String,
        vote: VoteResult,
        actions: &mut Vec<Action>,
    ) {
        let epoch = self.epoch;
        let Some(mut t) = self.txns.remove(&txn) else {
            return;
        };
        let Some(index) = t.branches.iter().position(|b| b.participant == participant) else {
            self.txns.insert(txn, t);
            return;
        };
        if t.branches[index].state != BranchState::Preparing {
            // Late or duplicate vote. A YES arriving after an abort still needs its Abort:
            // the participant holds a prepared branch.
            if vote == VoteResult::Yes
                && t.state == TxnState::Aborted
                && !t.branches[index].voted_yes
            {
                let b = &mut t.branches[index];
                b.voted_yes = true;
                b.state = BranchState::Pending;
                actions.push(Action::SendAbort {
                    txn,
                    participant: b.participant.clone(),
                    endpoint: b.endpoint.clone(),
                    epoch,
                    urgent: false,
                });
            }
            self.txns.insert(txn, t);
            return;
        }
        let what = match &vote {
            VoteResult::Yes => format!("{participant} voted YES"),
            VoteResult::ReadOnly => format!("{participant} voted READ_ONLY"),
            VoteResult::No { reason } => format!("{participant} voted NO: {reason}"),
            VoteResult::Failed { error } => format!("prepare to {participant} failed: {error}"),
        };
        self.note(&mut t, now, what);
        let b = &mut t.branches[index];
        let abort_reason = match vote {
            VoteResult::Yes => {
                b.state = BranchState::Yes;
                b.voted_yes = true;
                None
            }
            VoteResult::ReadOnly => {
                b.state = BranchState::ReadOnly;
                None
            }
            VoteResult::No { reason } => {
                b.state = BranchState::No;
                Some(format!("{participant} voted NO: {reason}"))
            }
            VoteResult::Failed { error } => {
                // It may still have prepared (the answer was lost): it gets an Abort.
                b.state = BranchState::No;
                b.voted_yes = true;
                b.last_error = error.clone();
                Some(format!("prepare to {participant} failed: {error}"))
            }
        };
        let state = t.state;
        let all_voted = t
            .branches
            .iter()
            .all(|b| matches!(b.state, BranchState::Yes | BranchState::ReadOnly));
        self.txns.insert(txn, t);
        if state != TxnState::Preparing {
            return;
        }
        if let Some(reason) = abort_reason {
            self.decide_abort(now, txn, reason, None, actions);
        } else if all_voted {
            self.decide_commit(now, txn, actions);
        }
    }

    fn decide_commit(&mut self, now: Millis, txn: TxnId, actions: &mut Vec<Action>) {
        let t = self.txns.get_mut(&txn).expect("present");
        assert!(
            t.branches
                .iter()
                .all(|b| matches!(b.state, BranchState::Yes | BranchState::ReadOnly)),
            "invariant violated: commit decided for {txn} without every vote YES"
        );
        set_decision(t, Decision::Commit);
        let yes_voters = participants_of(&t.branches, |b| b.state == BranchState::Yes);
        if yes_voters.is_empty() {
            // Everyone read-only: nothing to commit, nothing to log.
            t.decision_durable = true;
            t.state = TxnState::Committed;
            self.note_txn(
                txn,
                now,
                "all voted READ_ONLY: committed, no phase 2".into(),
            );
            self.finish(now, txn, actions);
            return;
        }
        t.state = TxnState::Deciding;
        t.logged = true;
        // Forced: no Commit leaves and no client hears COMMITTED before this is durable
        // (see durable()). A crash before then leaves no decision: presumed abort.
        actions.push(Action::Append {
            record: LogRecord::Decision {
                txn,
                decision: Decision::Commit,
                participants: yes_voters,
                at_unix_ms: now,
                actor: String::new(),
                reason: String::new(),
                epoch: self.epoch,
            },
            force: Some(Durable::CommitDecision),
        });
        self.note_txn(
            txn,
            now,
            "all voted YES: forcing the COMMIT decision".into(),
        );
    }

    fn note_txn(&mut self, txn: TxnId, now: Millis, what: String) {
        if let Some(mut t) = self.txns.remove(&txn) {
            self.note(&mut t, now, what);
            self.txns.insert(txn, t);
        }
    }

    /// Decides abort. `forced_by`: an operator's resolution (then the record is forced and
    /// the caller acts once it is durable).
    fn decide_abort(
        &mut self,
        now: Millis,
        txn: TxnId,
        reason: String,
        forced_by: Option<(String, ReqId)>,
        actions: &mut Vec<Action>,
    ) {
        let epoch = self.epoch;
        let t = self.txns.get_mut(&txn).expect("present");
        set_decision(t, Decision::Abort);
        t.state = TxnState::Aborted;
        t.abort_reason = reason.clone();
        // Every participant that may hold a prepared branch, or staged work, gets Abort.
        for b in &mut t.branches {
            if matches!(
                b.state,
                BranchState::Enlisted | BranchState::Preparing | BranchState::Yes
            ) {
                b.voted_yes = true;
            }
        }
        let targets = participants_of(&t.branches, |b| b.voted_yes);
        let record = LogRecord::Decision {
            txn,
            decision: Decision::Abort,
            participants: targets,
            at_unix_ms: now,
            actor: forced_by
                .as_ref()
                .map(|(a, _)| a.clone())
                .unwrap_or_default(),
            reason: reason.clone(),
            epoch,
        };
        if !t.branches.is_empty() || forced_by.is_some() {
            t.logged = true;
            t.resolution_pending = forced_by.is_some();
            actions.push(Action::Append {
                record,
                // Not forced (presumed abort: a lost abort record reads as abort anyway),
                // except for an operator's resolution, which is audited before it acts.
                force: forced_by
                    .as_ref()
                    .map(|(_, req)| Durable::Resolution { req: *req }),
            });
        }
        let waiting: Vec<ReqId> = t.waiting_decision.drain(..).collect();
        self.note_txn(txn, now, format!("decided ABORT: {reason}"));
        let t = self.txns.get(&txn).cloned().expect("present");
        for req in waiting {
            self.reply_outcome(&t, req, actions);
        }
        if forced_by.is_none() {
            self.start_phase2(now, txn, actions);
        }
    }

    fn durable(&mut self, now: Millis, txn: TxnId, what: Durable, actions: &mut Vec<Action>) {
        let Some(t) = self.txns.get_mut(&txn) else {
            if let Durable::Resolution { req } = what {
                let outcome = self.outcome(&txn, false);
                actions.push(Action::Reply {
                    req,
                    reply: Reply::Resolved {
                        outcome,
                        message: "resolution logged; the transaction has finished".into(),
                    },
                });
            }
            return;
        };
        match what {
            Durable::CommitDecision => {
                if t.state != TxnState::Deciding {
                    return;
                }
                t.decision_durable = true;
                t.state = TxnState::Committed;
                let waiting: Vec<ReqId> = t.waiting_decision.drain(..).collect();
                self.note_txn(txn, now, "COMMIT decision durable".into());
                let t = self.txns.get(&txn).cloned().expect("present");
                for req in waiting {
                    self.reply_outcome(&t, req, actions);
                }
                self.start_phase2(now, txn, actions);
            }
            Durable::Resolution { req } => {
                t.resolution_pending = false;
                let outcome = outcome_of(t.decision.expect("resolved transactions are decided"));
                self.note_txn(
                    txn,
                    now,
                    "operator resolution durable; driving phase 2".into(),
                );
                // Drive phase 2 now, without waiting for backoff.
                if let Some(t) = self.txns.get_mut(&txn) {
                    for b in &mut t.branches {
                        if b.state == BranchState::Retrying {
                            b.state = BranchState::Yes;
                        }
                    }
                }
                self.start_phase2(now, txn, actions);
                actions.push(Action::Reply {
                    req,
                    reply: Reply::Resolved {
                        outcome,
                        message: "resolution logged; phase 2 is running".into(),
                    },
                });
            }
        }
    }

    /// Sends phase 2 to every participant that needs it and has no message in flight; or
    /// finishes the transaction when none is left.
    fn start_phase2(&mut self, now: Millis, txn: TxnId, actions: &mut Vec<Action>) {
        let epoch = self.epoch;
        let t = self.txns.get_mut(&txn).expect("present");
        let decision = t.decision.expect("phase 2 needs a decision");
        if decision == Decision::Commit {
            assert!(
                t.decision_durable,
                "invariant violated: Commit sent for {txn} before its decision is durable"
            );
            assert!(
                t.branches.iter().all(|b| b.state != BranchState::No
                    && (b.voted_yes || b.state == BranchState::ReadOnly)),
                "invariant violated: Commit sent for {txn} without every vote YES"
            );
        }
        // A client waiting for phase two has no next transaction for the decision to
        // ride with.
        let urgent = !t.waiting_phase2.is_empty();
        for b in &mut t.branches {
            if !b.voted_yes
                || !matches!(
                    b.state,
                    BranchState::Yes
                        | BranchState::No
                        | BranchState::Enlisted
                        | BranchState::Preparing
                )
            {
                continue;
            }
            b.state = BranchState::Pending;
            actions.push(match decision {
                Decision::Commit => Action::SendCommit {
                    txn,
                    participant: b.participant.clone(),
                    endpoint: b.endpoint.clone(),
                    epoch,
                    urgent,
                },
                Decision::Abort => Action::SendAbort {
                    txn,
                    participant: b.participant.clone(),
                    endpoint: b.endpoint.clone(),
                    epoch,
                    urgent,
                },
            });
        }
        self.maybe_finish(now, txn, actions);
    }

    fn ack(
        &mut self,
        now: Millis,
        txn: TxnId,
        participant: String,
        result: Result<(), String>,
        actions: &mut Vec<Action>,
    ) {
        let Some(mut t) = self.txns.remove(&txn) else {
            return;
        };
        let Some(b) = t.branches.iter_mut().find(|b| b.participant == participant) else {
            self.txns.insert(txn, t);
            return;
        };
        if b.state != BranchState::Pending {
            self.txns.insert(txn, t);
            return;
        }
        let what = match result {
            Ok(()) => {
                b.state = BranchState::Acknowledged;
                b.last_error.clear();
                format!("{participant} acknowledged")
            }
            Err(error) => {
                // Never dropped: retried with capped exponential backoff and jitter; the
                // branch stays visible as in-doubt with its last error meanwhile.
                b.attempts += 1;
                b.state = BranchState::Retrying;
                b.last_error = error.clone();
                let exp = self
                    .config
                    .retry_initial_ms
                    .saturating_mul(1u64 << b.attempts.min(20))
                    .min(self.config.retry_max_ms);
                let delay = exp / 2 + self.rng.u64(0..=exp / 2);
                actions.push(Action::ArmTimer {
                    txn,
                    timer: Timer::Retry {
                        participant: participant.clone(),
                    },
                    at: now.saturating_add(delay),
                });
                t.last_error = format!("{participant}: {error}");
                format!(
                    "phase 2 to {participant} failed (attempt {}): {error}",
                    b.attempts
                )
            }
        };
        self.note(&mut t, now, what);
        self.txns.insert(txn, t);
        self.maybe_finish(now, txn, actions);
    }

    fn one_phase_result(
        &mut self,
        now: Millis,
        txn: TxnId,
        participant: String,
        result: OnePhaseResult,
        actions: &mut Vec<Action>,
    ) {
        let Some(mut t) = self.txns.remove(&txn) else {
            return;
        };
        if !t.one_phase
            || t.branches[0].participant != participant
            || t.state != TxnState::Preparing
        {
            self.txns.insert(txn, t);
            return;
        }
        match result {
            OnePhaseResult::Committed => {
                // The participant's own durable commit is the decision; no record here.
                set_decision(&mut t, Decision::Commit);
                t.decision_durable = true;
                t.state = TxnState::Committed;
                t.branches[0].state = BranchState::Acknowledged;
                self.note(&mut t, now, format!("{participant} committed in one phase"));
            }
            OnePhaseResult::Aborted { reason } => {
                set_decision(&mut t, Decision::Abort);
                t.state = TxnState::Aborted;
                t.abort_reason = format!("{participant} aborted: {reason}");
                t.branches[0].state = BranchState::Acknowledged;
                self.note(
                    &mut t,
                    now,
                    format!("{participant} aborted in one phase: {reason}"),
                );
            }
            OnePhaseResult::Failed { error } => {
                // Unknown outcome: the participant decides, so ask again (its tombstone
                // makes the retry answer what the first attempt did).
                let b = &mut t.branches[0];
                b.attempts += 1;
                b.state = BranchState::Retrying;
                b.last_error = error.clone();
                t.last_error = format!("{participant}: {error}");
                let exp = self
                    .config
                    .retry_initial_ms
                    .saturating_mul(1u64 << b.attempts.min(20))
                    .min(self.config.retry_max_ms);
                let delay = exp / 2 + self.rng.u64(0..=exp / 2);
                actions.push(Action::ArmTimer {
                    txn,
                    timer: Timer::Retry { participant },
                    at: now.saturating_add(delay),
                });
                self.txns.insert(txn, t);
                return;
            }
        }
        let waiting: Vec<ReqId> = t
            .waiting_decision
            .drain(..)
            .chain(t.waiting_phase2.drain(..))
            .collect();
        for req in waiting {
            self.reply_outcome(&t, req, actions);
        }
        self.txns.insert(txn, t);
        self.finish(now, txn, actions);
    }

    /// Ends the transaction once no participant owes an acknowledgement.
    fn maybe_finish(&mut self, now: Millis, txn: TxnId, actions: &mut Vec<Action>) {
        let Some(t) = self.txns.get(&txn) else { return };
        if t.decision.is_none() || (t.decision == Some(Decision::Commit) && !t.decision_durable) {
            return;
        }
        if !t.pending().is_empty() || t.resolution_pending {
            return;
        }
        if t.logged {
            // Not forced: if lost, recovery re-drives phase 2 and participants answer
            // duplicates from their tombstones.
            actions.push(Action::Append {
                record: LogRecord::End { txn },
                force: None,
            });
        }
        self.finish(now, txn, actions);
    }

    fn finish(&mut self, _now: Millis, txn: TxnId, actions: &mut Vec<Action>) {
        let Some(mut t) = self.txns.remove(&txn) else {
            return;
        };
        let outcome = outcome_of(t.decision.expect("finished transactions are decided"));
        let waiting: Vec<ReqId> = t
            .waiting_decision
            .drain(..)
            .chain(t.waiting_phase2.drain(..))
            .collect();
        for req in waiting {
            self.reply_outcome(&t, req, actions);
        }
        self.remember(txn, outcome, t.commit_requested);
        actions.push(Action::Finished {
            txn,
            outcome,
            started_at: t.started_at,
        });
    }

    fn timer(&mut self, now: Millis, txn: TxnId, timer: Timer, actions: &mut Vec<Action>) {
        let epoch = self.epoch;
        let Some(t) = self.txns.get_mut(&txn) else {
            return;
        };
        match timer {
            Timer::Lifetime => {
                if t.state == TxnState::Active || (t.state == TxnState::Preparing && !t.one_phase) {
                    self.decide_abort(
                        now,
                        txn,
                        "the transaction's lifetime expired".into(),
                        None,
                        actions,
                    );
                }
            }
            Timer::PrepareDeadline => {
                if t.state == TxnState::Preparing && !t.one_phase {
                    let missing: Vec<String> = t
                        .branches
                        .iter()
                        .filter(|b| b.state == BranchState::Preparing)
                        .map(|b| b.participant.clone())
                        .collect();
                    let reason = format!("prepare timed out waiting for {}", missing.join(", "));
                    self.decide_abort(now, txn, reason, None, actions);
                }
            }
            Timer::OnePhaseDeadline => {
                if t.one_phase && t.state == TxnState::Preparing {
                    let message = format!(
                        "the outcome is not known yet: {} has not answered ({}); the coordinator keeps asking",
                        t.branches[0].participant, t.branches[0].last_error
                    );
                    for req in t
                        .waiting_decision
                        .drain(..)
                        .chain(t.waiting_phase2.drain(..))
                    {
                        actions.push(refused(req, Refusal::DeadlineExceeded(message.clone())));
                    }
                }
            }
            Timer::Retry { participant } => {
                let one_phase = t.one_phase && t.state == TxnState::Preparing;
                let decision = t.decision;
                let Some(b) = t.branches.iter_mut().find(|b| b.participant == participant) else {
                    return;
                };
                if b.state != BranchState::Retrying {
                    return;
                }
                b.state = BranchState::Pending;
                let action = if one_phase {
                    Action::SendCommitOnePhase {
                        txn,
                        participant: b.participant.clone(),
                        endpoint: b.endpoint.clone(),
                        epoch,
                        incarnation: b.incarnation,
                        payload: b.payload.clone(),
                    }
                } else {
                    match decision {
                        Some(Decision::Commit) => Action::SendCommit {
                            txn,
                            participant: b.participant.clone(),
                            endpoint: b.endpoint.clone(),
                            epoch,
                            urgent: true,
                        },
                        Some(Decision::Abort) => Action::SendAbort {
                            txn,
                            participant: b.participant.clone(),
                            endpoint: b.endpoint.clone(),
                            epoch,
                            urgent: true,
                        },
                        None => return,
                    }
                };
                actions.push(action);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn resolve(
        &mut self,
        now: Millis,
        txn: TxnId,
        decision: Decision,
        actor: String,
        reason: String,
        req: ReqId,
        actions: &mut Vec<Action>,
    ) {
        let epoch = self.epoch;
        let Some(t) = self.txns.get(&txn) else {
            let known = self.recent_outcomes.get(&txn).map(|(o, _)| *o);
            let message = match known {
                Some(o) => {
                    format!("transaction {txn} already finished ({o:?}); nothing to resolve")
                }
                None => format!("no record of transaction {txn} (presumed aborted)"),
            };
            return actions.push(refused(
                req,
                if known.is_some() {
                    Refusal::FailedPrecondition(message)
                } else {
                    Refusal::NotFound(message)
                },
            ));
        };
        let logged = t.decision;
        let contradicts = match (logged, t.state, decision) {
            (Some(d), _, wanted) if t.decision_durable || d == Decision::Abort => d != wanted,
            (_, TxnState::Deciding, Decision::Abort) => true,
            _ => false,
        };
        if contradicts {
            return actions.push(refused(
                req,
                Refusal::FailedPrecondition(format!(
                    "refused: transaction {txn} has a logged {:?} decision; forcing {decision:?} would contradict it",
                    logged.unwrap_or(Decision::Commit)
                )),
            ));
        }
        if t.state == TxnState::Deciding {
            return actions.push(refused(
                req,
                Refusal::FailedPrecondition(format!(
                    "the COMMIT decision of {txn} is being made durable; ask again in a moment"
                )),
            ));
        }
        if t.one_phase {
            return actions.push(refused(
                req,
                Refusal::FailedPrecondition(format!(
                    "transaction {txn} commits in one phase: its only participant decides"
                )),
            ));
        }
        let who = if actor.is_empty() {
            "operator".to_string()
        } else {
            actor.clone()
        };
        match (logged, decision) {
            (None, Decision::Commit) => actions.push(refused(
                req,
                Refusal::FailedPrecondition(format!(
                    "refused: transaction {txn} is undecided and not every participant voted YES; only abort can be forced"
                )),
            )),
            (None, Decision::Abort) => {
                let reason = format!("forced by {who}: {reason}");
                self.decide_abort(now, txn, reason, Some((who, req)), actions);
            }
            (Some(d), _) => {
                // The same decision again: audit it (forced), then re-drive phase 2 at once.
                let t = self.txns.get_mut(&txn).expect("present");
                t.resolution_pending = true;
                actions.push(Action::Append {
                    record: LogRecord::Decision {
                        txn,
                        decision: d,
                        participants: participants_of(&t.branches, |b| b.voted_yes),
                        at_unix_ms: now,
                        actor: who.clone(),
                        reason: reason.clone(),
                        epoch,
                    },
                    force: Some(Durable::Resolution { req }),
                });
                self.note_txn(txn, now, format!("{who} resolved {d:?}: {reason}"));
            }
        }
    }
}

fn set_decision(t: &mut Txn, decision: Decision) {
    if let Some(existing) = t.decision {
        assert_eq!(
            existing, decision,
            "invariant violated: the decision of {} changed from {existing:?} to {decision:?}",
            t.id
        );
    }
    t.decision = Some(decision);
}

pub fn outcome_of(decision: Decision) -> Outcome {
    match decision {
        Decision::Commit => Outcome::Committed,
        Decision::Abort => Outcome::Aborted,
    }
}
