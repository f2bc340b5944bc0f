//! The bank workload and its checker, shared by `ratify demo` and the fault-injection
//! suite (`ratify-tests`, the `chaos` runner).
//!
//! Accounts are spread over the participants. Each transfer debits one account with
//! `Add(-x, min 0)`, credits another with `Add(+x)`, and writes a ledger row keyed by the
//! transaction id on both sides. Every client records what it heard (a history). After
//! the faults stop and the in-doubt lists drain, [`Bank::check`] verifies: money
//! conserved and no balance negative; for every transaction both ledger rows or neither
//! (every participant agrees on every outcome); every COMMITTED the clients heard is
//! applied and every ABORTED is not; the balances equal the opening balances plus the
//! applied ledger; nothing left in doubt; and no lock left held (a transaction touching
//! every account commits).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use ratify_proto::TxnId;
use ratify_proto::v1;
use tonic::transport::Channel;

use crate::stack::participant_name;

pub const OPENING_BALANCE: i64 = 1000;

/// What a client heard about its transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The client heard COMMITTED.
    Committed,
    /// The client heard ABORTED.
    Aborted,
    /// The client gave up before asking to commit (its transaction cannot commit).
    Abandoned,
    /// The client asked to commit and heard nothing (a crash, a pause, a cut).
    Unknown,
}

/// One entry of the history.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub txn: Option<TxnId>,
    pub from: usize,
    pub to: usize,
    pub amount: i64,
    pub answer: Answer,
}

/// One invariant and the transactions that break it.
#[derive(Debug, Default, Clone)]
pub struct Check {
    pub name: &'static str,
    pub failures: Vec<String>,
}

impl Check {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            failures: Vec::new(),
        }
    }
}

/// The result of [`Bank::check`].
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub checks: Vec<Check>,
    pub heard_committed: u64,
    pub heard_aborted: u64,
    pub abandoned: u64,
    /// Transfers whose client heard nothing, by what happened to them.
    pub unknown_committed: u64,
    pub unknown_aborted: u64,
    /// What was still in doubt when the check gave up waiting (0 when drained).
    pub in_doubt_left: u64,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.failures.is_empty())
    }

    pub fn violations(&self) -> usize {
        self.checks.iter().map(|c| c.failures.len()).sum()
    }

    /// Every failure, one per line, prefixed with its check.
    pub fn failures(&self) -> Vec<String> {
        self.checks
            .iter()
            .flat_map(|c| c.failures.iter().map(move |f| format!("{}: {f}", c.name)))
            .collect()
    }
}

/// The bank's accounts and the endpoints the clients use.
#[derive(Debug, Clone)]
pub struct Bank {
    pub coordinator: String,
    pub participants: Vec<String>,
    /// (participant index, key)
    pub accounts: Vec<(usize, String)>,
    /// One lazily connected channel per endpoint, shared by every client (a restarted
    /// node is reconnected on the next call).
    channels: std::collections::HashMap<String, Channel>,
}

fn account_key(participant: usize, i: usize) -> String {
    format!("acct-{}-{i}", participant_name(participant))
}

pub fn ledger_keys(txn: &TxnId) -> (String, String) {
    (
        format!("ledger/{txn}/debit"),
        format!("ledger/{txn}/credit"),
    )
}

fn add(key: &str, delta: i64, min: Option<i64>) -> v1::KvOp {
    v1::KvOp {
        op: Some(v1::kv_op::Op::Add(v1::Add {
            key: key.as_bytes().to_vec().into(),
            delta,
            min,
        })),
    }
}

/// The one-shot transaction that opens participant `p`'s accounts (`accounts` as
/// (participant index, key)) at [`OPENING_BALANCE`]; it waits for phase two, so the
/// accounts are readable once it answers COMMITTED.
pub fn opening_request(accounts: &[(usize, String)], p: usize) -> v1::ExecuteRequest {
    let ops = accounts
        .iter()
        .filter(|(ap, _)| *ap == p)
        .map(|(_, k)| put(k, &OPENING_BALANCE.to_string()))
        .collect();
    v1::ExecuteRequest {
        branches: vec![v1::ExecuteBranch {
            participant: participant_name(p),
            payload: v1::KvOps { ops }.encode_to_vec().into(),
        }],
        timeout_ms: 0,
        wait_for_phase2: true,
    }
}

fn put(key: &str, value: &str) -> v1::KvOp {
    v1::KvOp {
        op: Some(v1::kv_op::Op::Put(v1::Put {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
        })),
    }
}

fn is_unavailable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

impl Bank {
    pub fn new(
        coordinator: String,
        participants: Vec<String>,
        accounts_per_participant: usize,
    ) -> Self {
        let accounts = (0..participants.len())
            .flat_map(|p| (0..accounts_per_participant).map(move |i| (p, account_key(p, i))))
            .collect();
        Self {
            coordinator,
            participants,
            accounts,
            channels: Default::default(),
        }
        .with_rpc_timeout(Duration::from_secs(30))
    }

    /// Bounds each client RPC: a paused or cut-off node makes an RPC wait this long.
    /// Call inside a tokio runtime.
    pub fn with_rpc_timeout(mut self, timeout: Duration) -> Self {
        self.channels = std::iter::once(&self.coordinator)
            .chain(&self.participants)
            .filter_map(|endpoint| {
                let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
                    .ok()?
                    .connect_timeout(Duration::from_secs(3).min(timeout))
                    .timeout(timeout)
                    .tcp_nodelay(true)
                    .connect_lazy();
                Some((endpoint.clone(), channel))
            })
            .collect();
        self
    }

    pub fn total_money(&self) -> i64 {
        OPENING_BALANCE * self.accounts.len() as i64
    }

    async fn connect(&self, endpoint: &str) -> Option<Channel> {
        self.channels.get(endpoint).cloned()
    }

    async fn coordinator_client(
        &self,
    ) -> Option<v1::coordinator_client::CoordinatorClient<Channel>> {
        Some(v1::coordinator_client::CoordinatorClient::new(
            self.connect(&self.coordinator).await?,
        ))
    }

    /// Opens every account with its opening balance: one one-phase transaction per
    /// participant.
    pub async fn open(&self) -> Result<(), String> {
        let mut c = self
            .coordinator_client()
            .await
            .ok_or_else(|| format!("cannot reach the coordinator at {}", self.coordinator))?;
        for p in 0..self.participants.len() {
            let r = c
                .execute(opening_request(&self.accounts, p))
                .await
                .map_err(|s| format!("opening the accounts on {}: {s}", participant_name(p)))?
                .into_inner();
            if r.outcome() != v1::Outcome::Committed {
                return Err(format!(
                    "opening the accounts on {} failed: {}",
                    participant_name(p),
                    r.reason
                ));
            }
        }
        Ok(())
    }

    async fn begin(&self, stop: &AtomicBool) -> Option<TxnId> {
        // Nothing exists before Begin answers, so retrying it while the coordinator is
        // down is always safe.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            if let Some(mut c) = self.coordinator_client().await {
                match c.begin(v1::BeginRequest { timeout_ms: 30_000 }).await {
                    Ok(r) => return TxnId::try_from(&r.into_inner().txn_id).ok(),
                    Err(s) if is_unavailable(&s) => {}
                    Err(_) => return None,
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    async fn stage(&self, participant: usize, txn: &TxnId, ops: Vec<v1::KvOp>) -> bool {
        let Some(channel) = self.connect(&self.participants[participant]).await else {
            return false;
        };
        let mut kv = v1::kv_client::KvClient::new(channel);
        kv.stage(v1::StageRequest {
            txn_id: txn.to_vec().into(),
            ops,
        })
        .await
        .is_ok()
    }

    /// The transfer of the history entry `index` under `seed` (the same on every run).
    pub fn planned_transfer(&self, seed: u64, index: u64) -> (usize, usize, i64) {
        let mut rng = fastrand::Rng::with_seed(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let n = self.accounts.len();
        let from = rng.usize(0..n);
        let to = (from + 1 + rng.usize(0..n - 1)) % n;
        (from, to, rng.i64(1..=300))
    }

    /// Runs one transfer as an interactive transaction: Begin, Stage on each side, Commit.
    pub async fn transfer(
        &self,
        from: usize,
        to: usize,
        amount: i64,
        stop: &AtomicBool,
    ) -> Transfer {
        let mut t = Transfer {
            txn: None,
            from,
            to,
            amount,
            answer: Answer::Abandoned,
        };
        let Some(txn) = self.begin(stop).await else {
            return t;
        };
        t.txn = Some(txn);
        let (debit_key, credit_key) = ledger_keys(&txn);
        let (fp, fkey) = &self.accounts[from];
        let (tp, tkey) = &self.accounts[to];
        let debit = vec![
            add(fkey, -amount, Some(0)),
            put(&debit_key, &format!("{amount} {fkey} -> {tkey}")),
        ];
        let credit = vec![
            add(tkey, amount, None),
            put(&credit_key, &format!("{amount} {fkey} -> {tkey}")),
        ];
        let staged = if fp == tp {
            self.stage(*fp, &txn, debit.into_iter().chain(credit).collect())
                .await
        } else {
            self.stage(*fp, &txn, debit).await && self.stage(*tp, &txn, credit).await
        };
        let Some(mut c) = self.coordinator_client().await else {
            return t;
        };
        if !staged {
            // Best effort: the coordinator aborts it anyway when its lifetime ends.
            let _ = c
                .abort(v1::AbortTxnRequest {
                    txn_id: txn.to_vec().into(),
                    reason: "staging failed".into(),
                })
                .await;
            return t;
        }
        t.answer = match c
            .commit(v1::CommitTxnRequest {
                txn_id: txn.to_vec().into(),
                wait_for_phase2: false,
            })
            .await
        {
            Ok(r) => match r.into_inner().outcome() {
                v1::Outcome::Committed => Answer::Committed,
                v1::Outcome::Aborted => Answer::Aborted,
                _ => Answer::Unknown,
            },
            Err(s)
                if s.code() == tonic::Code::NotFound
                    || s.code() == tonic::Code::FailedPrecondition =>
            {
                Answer::Abandoned
            }
            Err(_) => Answer::Unknown,
        };
        t
    }

    pub async fn get(&self, participant: usize, key: &str) -> Result<Option<String>, String> {
        let channel = self
            .connect(&self.participants[participant])
            .await
            .ok_or("participant unreachable")?;
        let mut kv = v1::kv_client::KvClient::new(channel);
        let r = kv
            .get(v1::GetRequest {
                key: key.as_bytes().to_vec().into(),
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        Ok(r.found
            .then(|| String::from_utf8_lossy(&r.value).into_owned()))
    }

    /// Transactions in doubt on the coordinator plus prepared branches on the
    /// participants; an unreachable node counts as a million.
    pub async fn in_doubt(&self) -> u64 {
        let mut total = 0;
        match self.connect(&self.coordinator).await {
            Some(channel) => {
                match v1::admin_client::AdminClient::new(channel)
                    .list_transactions(v1::ListTransactionsRequest {
                        in_doubt_only: true,
                        limit: 1,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(r) => total += r.into_inner().total,
                    Err(_) => total += 1_000_000,
                }
            }
            None => total += 1_000_000,
        }
        for endpoint in &self.participants {
            match self.connect(endpoint).await {
                Some(channel) => match v1::participant_client::ParticipantClient::new(channel)
                    .list_in_doubt(v1::ListInDoubtRequest { limit: 1 })
                    .await
                {
                    Ok(r) => total += r.into_inner().total,
                    Err(_) => total += 1_000_000,
                },
                None => total += 1_000_000,
            }
        }
        total
    }

    /// Waits up to `bound` for nothing to be in doubt; returns what is left (0 when
    /// drained). `progress` hears every change of the count.
    pub async fn drain(&self, bound: Duration, mut progress: impl FnMut(u64)) -> u64 {
        let mut last = u64::MAX;
        let deadline = Instant::now() + bound;
        loop {
            let now = self.in_doubt().await;
            if now != last {
                progress(now);
                last = now;
            }
            if now == 0 || Instant::now() >= deadline {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether every lock is free: a transaction that adds 0 to every account commits
    /// (a key still locked by a prepared or stuck branch makes its participant vote NO).
    /// Retried for up to `bound`, since abandoned branches are released only when their
    /// transaction's lifetime ends.
    pub async fn locks_released(&self, bound: Duration) -> Result<(), String> {
        let deadline = Instant::now() + bound;
        loop {
            let branches = (0..self.participants.len())
                .map(|p| v1::ExecuteBranch {
                    participant: participant_name(p),
                    payload: v1::KvOps {
                        ops: self
                            .accounts
                            .iter()
                            .filter(|(ap, _)| *ap == p)
                            .map(|(_, k)| add(k, 0, None))
                            .collect(),
                    }
                    .encode_to_vec()
                    .into(),
                })
                .collect();
            let last = match self.coordinator_client().await {
                Some(mut c) => match c
                    .execute(v1::ExecuteRequest {
                        branches,
                        timeout_ms: 0,
                        wait_for_phase2: true,
                    })
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        if r.outcome() == v1::Outcome::Committed {
                            return Ok(());
                        }
                        format!("the probe transaction aborted: {}", r.reason)
                    }
                    Err(s) => format!("the probe transaction failed: {s}"),
                },
                None => "the coordinator is unreachable".to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!("after {} s, {last}", bound.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Checks the history against the participants' state. Call it after the faults have
    /// stopped; `in_doubt_left` is what [`Bank::drain`] returned, `locks` what
    /// [`Bank::locks_released`] returned.
    pub async fn check(
        &self,
        transfers: &[Transfer],
        in_doubt_left: u64,
        locks: Result<(), String>,
    ) -> Report {
        let mut report = Report {
            in_doubt_left,
            ..Report::default()
        };
        let mut read_errors = Vec::new();
        let mut balances = BTreeMap::new();
        for (p, key) in &self.accounts {
            match self.get(*p, key).await {
                Ok(v) => {
                    balances.insert(key.clone(), v.and_then(|s| s.parse::<i64>().ok()));
                }
                Err(e) => read_errors.push(format!("{key}: {e}")),
            }
        }
        let mut conservation = Check::new("money conserved");
        let sum: i64 = balances.values().flatten().sum();
        if sum != self.total_money() || balances.values().any(Option::is_none) {
            conservation.failures.push(format!(
                "the accounts hold {sum}, expected {}",
                self.total_money()
            ));
        }
        let mut non_negative = Check::new("no negative balance");
        for (k, v) in &balances {
            if v.is_some_and(|v| v < 0) {
                non_negative.failures.push(format!("{k} = {v:?}"));
            }
        }
        let mut atomic = Check::new("each transfer on both sides or neither");
        let mut answers = Check::new("clients' answers match the outcome");
        let mut ledger_matches = Check::new("ledger matches the balances");
        let mut expected: BTreeMap<String, i64> = self
            .accounts
            .iter()
            .map(|(_, k)| (k.clone(), OPENING_BALANCE))
            .collect();
        for t in transfers {
            match t.answer {
                Answer::Committed => report.heard_committed += 1,
                Answer::Aborted => report.heard_aborted += 1,
                Answer::Abandoned => report.abandoned += 1,
                Answer::Unknown => {}
            }
            let Some(txn) = t.txn else { continue };
            let (debit_key, credit_key) = ledger_keys(&txn);
            let (fp, fkey) = &self.accounts[t.from];
            let (tp, tkey) = &self.accounts[t.to];
            let (debit, credit) = match (
                self.get(*fp, &debit_key).await,
                self.get(*tp, &credit_key).await,
            ) {
                (Ok(d), Ok(c)) => (d.is_some(), c.is_some()),
                (d, c) => {
                    read_errors.push(format!("ledger of {txn}: {d:?} {c:?}"));
                    continue;
                }
            };
            if debit != credit {
                atomic
                    .failures
                    .push(format!("{txn}: debit row {debit}, credit row {credit}"));
            }
            let applied = debit && credit;
            match (t.answer, applied) {
                (Answer::Committed, false) => answers.failures.push(format!(
                    "{txn}: the client heard COMMITTED but it is not applied"
                )),
                (Answer::Aborted | Answer::Abandoned, true) => answers.failures.push(format!(
                    "{txn}: the client heard it did not commit, but it is applied"
                )),
                (Answer::Unknown, true) => report.unknown_committed += 1,
                (Answer::Unknown, false) => report.unknown_aborted += 1,
                _ => {}
            }
            if applied {
                *expected.entry(fkey.clone()).or_default() -= t.amount;
                *expected.entry(tkey.clone()).or_default() += t.amount;
            }
        }
        for (k, want) in &expected {
            let got = balances.get(k).copied().flatten();
            if got != Some(*want) {
                ledger_matches
                    .failures
                    .push(format!("{k}: balance {got:?}, ledger says {want}"));
            }
        }
        let mut in_doubt = Check::new("nothing left in doubt");
        if in_doubt_left > 0 {
            in_doubt
                .failures
                .push(format!("{in_doubt_left} still in doubt"));
        }
        let mut locks_check = Check::new("every lock released");
        if let Err(e) = locks {
            locks_check.failures.push(e);
        }
        let mut reads = Check::new("every read answered");
        reads.failures = read_errors;
        report.checks = vec![
            conservation,
            non_negative,
            atomic,
            answers,
            ledger_matches,
            in_doubt,
            locks_check,
            reads,
        ];
        report
    }
}

/// Clients running transfers concurrently until `limit` transfers were started or
/// `stop` is set.
#[derive(Debug)]
pub struct Workload {
    pub started: Arc<AtomicU64>,
    pub done: Arc<AtomicU64>,
    pub committed: Arc<AtomicU64>,
    pub stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<Vec<Transfer>>>,
}

impl Workload {
    pub fn spawn(bank: Arc<Bank>, concurrency: usize, seed: u64, limit: Option<u64>) -> Self {
        let started = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let committed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..concurrency)
            .map(|_| {
                let (bank, started, done, committed, stop) = (
                    bank.clone(),
                    started.clone(),
                    done.clone(),
                    committed.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    let mut results = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let index = started.fetch_add(1, Ordering::Relaxed);
                        if limit.is_some_and(|l| index >= l) {
                            break;
                        }
                        let (from, to, amount) = bank.planned_transfer(seed, index);
                        let t = bank.transfer(from, to, amount, &stop).await;
                        if t.answer == Answer::Committed {
                            committed.fetch_add(1, Ordering::Relaxed);
                        }
                        results.push(t);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    results
                })
            })
            .collect();
        Self {
            started,
            done,
            committed,
            stop,
            workers,
        }
    }

    /// Stops starting new transfers and waits for the ones under way.
    pub async fn finish(self) -> Vec<Transfer> {
        self.stop.store(true, Ordering::Relaxed);
        self.join().await
    }

    /// Waits for every client to end (after `limit` transfers, or after a stop).
    pub async fn join(self) -> Vec<Transfer> {
        let mut transfers = Vec::new();
        for w in self.workers {
            match w.await {
                Ok(results) => transfers.extend(results),
                // A lost history would hide what the clients heard: never check without it.
                Err(e) => panic!("a bank client failed: {e}"),
            }
        }
        transfers
    }
}
