//! `ratify demo`: a self-contained bank. It starts a fresh stack in a temporary
//! directory, opens accounts spread over the participants, runs concurrent random
//! transfers (debit with `Add(-x, min 0)`, credit with `Add(+x)`, and a ledger row keyed
//! by the transaction id on both sides), SIGKILLs the coordinator partway and restarts
//! it, waits for the in-doubt lists to drain, and then checks what must hold:
//! money conserved, no negative balance, every transfer applied on both sides or
//! neither, every answer the clients heard matching what happened, nothing left in doubt.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use prost::Message;
use ratify_proto::TxnId;
use ratify_proto::v1;
use serde_json::json;
use tonic::transport::Channel;

use crate::client::{self, CliError, CliResult, exit};
use crate::output::table;
use crate::stack::{LocalStack, StackConfig, participant_name};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Transfers to run.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub transfers: u32,
    /// Clients running transfers at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=512))]
    pub concurrency: u32,
    /// Seed of the random transfers (default: random, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Sled participants (accounts are spread over them).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=8))]
    pub participants: u16,
    /// Accounts on each participant.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub accounts_per_participant: u16,
    /// Keep the temporary directory (data and logs) afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Make participant p2 a PostgreSQL participant on this server (a URL such as
    /// postgres://postgres@127.0.0.1:5432/postgres; max_prepared_transactions > 0).
    /// Its `ratify_kv` table must hold no accounts of an earlier demo.
    #[arg(long)]
    pub postgres: Option<String>,
    /// Crash points for participant p2 (tests of the checks themselves).
    #[arg(long, hide = true)]
    pub p2_failpoints: Option<String>,
    /// The `ratify` binary to run the stack with (default: this one).
    #[arg(long, hide = true)]
    pub exe: Option<std::path::PathBuf>,
}

const OPENING_BALANCE: i64 = 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// The client heard COMMITTED.
    Committed,
    /// The client heard ABORTED.
    Aborted,
    /// The client gave up before asking to commit (its transaction cannot commit).
    Abandoned,
    /// The client asked to commit and heard nothing (the coordinator died).
    Unknown,
}

#[derive(Debug, Clone)]
struct Transfer {
    txn: Option<TxnId>,
    from: usize,
    to: usize,
    amount: i64,
    answer: Answer,
}

struct Bank {
    coordinator: String,
    participants: Vec<String>,
    accounts: Vec<(usize, String)>,
}

fn account_key(participant: usize, i: usize) -> String {
    format!("acct-{}-{i}", participant_name(participant))
}

fn ledger_keys(txn: &TxnId) -> (String, String) {
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

async fn connect(endpoint: &str) -> Option<Channel> {
    client::channel(endpoint).await.ok()
}

impl Bank {
    async fn begin(&self, stop: &AtomicBool) -> Option<TxnId> {
        // Nothing exists before Begin answers, so retrying it while the coordinator is
        // restarting is always safe.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            if let Some(channel) = connect(&self.coordinator).await {
                let mut c = v1::coordinator_client::CoordinatorClient::new(channel);
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
        let Some(channel) = connect(&self.participants[participant]).await else {
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

    async fn transfer(&self, from: usize, to: usize, amount: i64, stop: &AtomicBool) -> Transfer {
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
        let Some(channel) = connect(&self.coordinator).await else {
            return t;
        };
        let mut c = v1::coordinator_client::CoordinatorClient::new(channel);
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

    async fn get(&self, participant: usize, key: &str) -> Result<Option<String>, String> {
        let channel = connect(&self.participants[participant])
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

    async fn in_doubt(&self) -> u64 {
        let mut total = 0;
        if let Ok(mut admin) = client::admin(&self.coordinator).await {
            match admin
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
        } else {
            total += 1_000_000;
        }
        for endpoint in &self.participants {
            match client::participant(endpoint).await {
                Ok(mut p) => match p.list_in_doubt(v1::ListInDoubtRequest { limit: 1 }).await {
                    Ok(r) => total += r.into_inner().total,
                    Err(_) => total += 1_000_000,
                },
                Err(_) => total += 1_000_000,
            }
        }
        total
    }
}

fn say(pb: &ProgressBar, message: String) {
    if pb.is_hidden() {
        eprintln!("{message}");
    } else {
        pb.println(message);
    }
}

#[derive(Debug, Default)]
struct Check {
    name: &'static str,
    failures: Vec<String>,
}

impl Check {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            failures: Vec::new(),
        }
    }
}

pub async fn run(args: DemoArgs) -> CliResult<u8> {
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let dir = tempfile::Builder::new()
        .prefix("ratify-demo-")
        .tempdir()
        .map_err(|e| CliError::new(exit::ERROR, e.to_string()))?;
    eprintln!(
        "ratify demo: seed {seed}, {} transfers, {} clients, data in {}",
        args.transfers,
        args.concurrency,
        dir.path().display()
    );
    let participant_env = args
        .p2_failpoints
        .iter()
        .map(|f| (1usize, "FAILPOINTS".to_string(), f.clone()))
        .collect();
    let mut stack = LocalStack::start(&StackConfig {
        exe: args.exe.clone(),
        dir: dir.path().to_path_buf(),
        participants: usize::from(args.participants),
        coordinator_port: 0,
        participant_ports: Vec::new(),
        prepare_timeout_ms: 2_000,
        termination_deadline_ms: 1_000,
        participant_env,
        stores: vec![None, args.postgres.clone()],
    })
    .map_err(|e| CliError::new(exit::ERROR, e))?;
    stack
        .wait_registered(Duration::from_secs(30))
        .await
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e))?;

    let accounts: Vec<(usize, String)> = (0..usize::from(args.participants))
        .flat_map(|p| {
            (0..usize::from(args.accounts_per_participant)).map(move |i| (p, account_key(p, i)))
        })
        .collect();
    let bank = Arc::new(Bank {
        coordinator: stack.coordinator.endpoint(),
        participants: stack.endpoints(),
        accounts: accounts.clone(),
    });

    // Open the accounts: one one-shot transaction per participant.
    let mut c = client::coordinator(&bank.coordinator).await?;
    for p in 0..usize::from(args.participants) {
        let ops = accounts
            .iter()
            .filter(|(ap, _)| *ap == p)
            .map(|(_, k)| put(k, &OPENING_BALANCE.to_string()))
            .collect();
        let r = c
            .execute(v1::ExecuteRequest {
                branches: vec![v1::ExecuteBranch {
                    participant: participant_name(p),
                    payload: v1::KvOps { ops }.encode_to_vec().into(),
                }],
                timeout_ms: 0,
                wait_for_phase2: true,
            })
            .await?
            .into_inner();
        if r.outcome() != v1::Outcome::Committed {
            return Err(CliError::new(
                exit::ERROR,
                format!(
                    "opening the accounts on {} failed: {}",
                    participant_name(p),
                    r.reason
                ),
            ));
        }
    }
    let total_money = OPENING_BALANCE * accounts.len() as i64;

    // The transfers, with the coordinator killed partway.
    let pb = ProgressBar::new(u64::from(args.transfers));
    pb.set_style(
        ProgressStyle::with_template("{bar:40.cyan/blue} {pos}/{len} transfers  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let committed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (bank, next, done, committed, stop) = (
            bank.clone(),
            next.clone(),
            done.clone(),
            committed.clone(),
            stop.clone(),
        );
        let transfers = u64::from(args.transfers);
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= transfers {
                    return results;
                }
                let mut rng =
                    fastrand::Rng::with_seed(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let n = bank.accounts.len();
                let from = rng.usize(0..n);
                let to = (from + 1 + rng.usize(0..n - 1)) % n;
                let amount = rng.i64(1..=300);
                let t = bank.transfer(from, to, amount, &stop).await;
                if t.answer == Answer::Committed {
                    committed.fetch_add(1, Ordering::Relaxed);
                }
                results.push(t);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let crash_at = (u64::from(args.transfers) * 2 / 5).max(1);
    let mut crashed = false;
    loop {
        let finished = done.load(Ordering::Relaxed);
        pb.set_position(finished);
        pb.set_message(format!("{} committed", committed.load(Ordering::Relaxed)));
        if finished >= u64::from(args.transfers) {
            break;
        }
        if !crashed && finished >= crash_at {
            crashed = true;
            say(
                &pb,
                format!("SIGKILL the coordinator after {finished} transfers"),
            );
            stack.coordinator.kill9();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let restart = tokio::task::block_in_place(|| stack.coordinator.try_restart(&[]));
            if let Err(e) = restart {
                stop.store(true, Ordering::Relaxed);
                return Err(CliError::new(
                    exit::ERROR,
                    format!("restarting the coordinator: {e}"),
                ));
            }
            say(
                &pb,
                format!(
                    "coordinator restarted on {}; it recovers from its log",
                    stack.coordinator.endpoint()
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut transfers = Vec::new();
    for w in workers {
        transfers.extend(
            w.await
                .map_err(|e| CliError::new(exit::ERROR, e.to_string()))?,
        );
    }
    pb.finish_and_clear();
    let elapsed = started.elapsed();
    eprintln!(
        "{} transfers in {:.1}s",
        transfers.len(),
        elapsed.as_secs_f64()
    );

    // Let the in-doubt lists drain.
    let mut last = u64::MAX;
    let mut drained = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        let now = bank.in_doubt().await;
        if now != last {
            eprintln!("in doubt: {now}");
            last = now;
        }
        if now == 0 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The checks.
    let mut balances = BTreeMap::new();
    let mut read_errors = Vec::new();
    for (p, key) in &accounts {
        match bank.get(*p, key).await {
            Ok(v) => {
                balances.insert(key.clone(), v.and_then(|s| s.parse::<i64>().ok()));
            }
            Err(e) => read_errors.push(format!("{key}: {e}")),
        }
    }
    let mut conservation = Check::new("money conserved");
    let sum: i64 = balances.values().flatten().sum();
    if sum != total_money || balances.values().any(Option::is_none) {
        conservation
            .failures
            .push(format!("the accounts hold {sum}, expected {total_money}"));
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
    let mut expected: BTreeMap<String, i64> = accounts
        .iter()
        .map(|(_, k)| (k.clone(), OPENING_BALANCE))
        .collect();
    let (mut recovered_committed, mut recovered_aborted) = (0, 0);
    let (mut heard_committed, mut heard_aborted, mut abandoned) = (0, 0, 0);
    for t in &transfers {
        match t.answer {
            Answer::Committed => heard_committed += 1,
            Answer::Aborted => heard_aborted += 1,
            Answer::Abandoned => abandoned += 1,
            Answer::Unknown => {}
        }
        let Some(txn) = t.txn else { continue };
        let (debit_key, credit_key) = ledger_keys(&txn);
        let (fp, fkey) = &accounts[t.from];
        let (tp, tkey) = &accounts[t.to];
        let (debit, credit) = match (
            bank.get(*fp, &debit_key).await,
            bank.get(*tp, &credit_key).await,
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
        match (&t.answer, applied) {
            (Answer::Committed, false) => answers.failures.push(format!(
                "{txn}: the client heard COMMITTED but it is not applied"
            )),
            (Answer::Aborted | Answer::Abandoned, true) => answers.failures.push(format!(
                "{txn}: the client heard it did not commit, but it is applied"
            )),
            (Answer::Unknown, true) => recovered_committed += 1,
            (Answer::Unknown, false) => recovered_aborted += 1,
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
    let mut in_doubt_check = Check::new("nothing left in doubt");
    if !drained {
        in_doubt_check
            .failures
            .push(format!("{last} still in doubt after 90 s"));
    }
    let mut reads = Check::new("every read answered");
    reads.failures = read_errors;
    let checks = [
        conservation,
        non_negative,
        atomic,
        answers,
        ledger_matches,
        in_doubt_check,
        reads,
    ];
    let passed = checks.iter().all(|c| c.failures.is_empty());

    let summary = json!({
        "seed": seed,
        "transfers": transfers.len(),
        "committed": heard_committed,
        "aborted": heard_aborted,
        "abandoned": abandoned,
        "recovered_after_crash": { "committed": recovered_committed, "aborted": recovered_aborted },
        "in_doubt_left": if drained { 0 } else { last },
        "coordinator_crashes": u32::from(crashed),
        "elapsed_s": elapsed.as_secs_f64(),
        "checks": checks.iter().map(|c| json!({ "name": c.name, "passed": c.failures.is_empty(), "failures": c.failures.iter().take(20).collect::<Vec<_>>() })).collect::<Vec<_>>(),
        "passed": passed,
    });
    if args.json {
        println!("{}", serde_json::to_string(&summary).unwrap_or_default());
    } else {
        let mut rows = vec![
            vec!["transfers".to_string(), transfers.len().to_string()],
            vec![
                "committed (client heard COMMITTED)".into(),
                heard_committed.to_string(),
            ],
            vec![
                "aborted (client heard ABORTED: conflict or funds)".into(),
                heard_aborted.to_string(),
            ],
            vec![
                "abandoned before commit (coordinator down)".into(),
                abandoned.to_string(),
            ],
            vec![
                "recovered after the crash: committed".into(),
                recovered_committed.to_string(),
            ],
            vec![
                "recovered after the crash: aborted".into(),
                recovered_aborted.to_string(),
            ],
            vec![
                "in doubt left".into(),
                (if drained { 0 } else { last }).to_string(),
            ],
        ];
        for c in &checks {
            rows.push(vec![
                format!("check: {}", c.name),
                if c.failures.is_empty() {
                    "passed".into()
                } else {
                    format!("FAILED ({})", c.failures.len())
                },
            ]);
        }
        println!("{}", table(&["ratify demo", &format!("seed {seed}")], rows));
        for c in checks.iter().filter(|c| !c.failures.is_empty()) {
            for f in c.failures.iter().take(10) {
                println!("  {}: {f}", c.name);
            }
        }
    }
    stack.stop();
    if args.keep || !passed {
        let kept = dir.keep();
        eprintln!("data and logs kept in {}", kept.display());
    }
    Ok(if passed { exit::OK } else { exit::CHECK_FAILED })
}
