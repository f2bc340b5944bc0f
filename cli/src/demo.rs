//! `ratify demo`: a self-contained bank. It starts a fresh stack in a temporary
//! directory, opens accounts spread over the participants, runs concurrent random
//! transfers (debit with `Add(-x, min 0)`, credit with `Add(+x)`, and a ledger row keyed
//! by the transaction id on both sides), SIGKILLs the coordinator partway and restarts
//! it, waits for the in-doubt lists to drain, and then checks what must hold:
//! money conserved, no negative balance, every transfer applied on both sides or
//! neither, every answer the clients heard matching what happened, nothing left in doubt.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::bank::{Bank, Workload};
use crate::client::{CliError, CliResult, exit};
use crate::output::table;
use crate::stack::{LocalStack, StackConfig};

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

fn say(pb: &ProgressBar, message: String) {
    if pb.is_hidden() {
        eprintln!("{message}");
    } else {
        pb.println(message);
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
        worker_threads: None,
    })
    .map_err(|e| CliError::new(exit::ERROR, e))?;
    stack
        .wait_registered(Duration::from_secs(30))
        .await
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e))?;

    let bank = Arc::new(Bank::new(
        stack.coordinator.endpoint(),
        stack.endpoints(),
        usize::from(args.accounts_per_participant),
    ));
    bank.open()
        .await
        .map_err(|e| CliError::new(exit::ERROR, e))?;

    // The transfers, with the coordinator killed partway.
    let pb = ProgressBar::new(u64::from(args.transfers));
    pb.set_style(
        ProgressStyle::with_template("{bar:40.cyan/blue} {pos}/{len} transfers  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let workload = Workload::spawn(
        bank.clone(),
        args.concurrency as usize,
        seed,
        Some(u64::from(args.transfers)),
    );
    let crash_at = (u64::from(args.transfers) * 2 / 5).max(1);
    let mut crashed = false;
    loop {
        let finished = workload.done.load(Ordering::Relaxed);
        pb.set_position(finished);
        pb.set_message(format!(
            "{} committed",
            workload.committed.load(Ordering::Relaxed)
        ));
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
                workload.stop.store(true, Ordering::Relaxed);
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
    let transfers = workload.join().await;
    pb.finish_and_clear();
    let elapsed = started.elapsed();
    eprintln!(
        "{} transfers in {:.1}s",
        transfers.len(),
        elapsed.as_secs_f64()
    );

    // Let the in-doubt lists drain, then check.
    let left = bank
        .drain(Duration::from_secs(90), |n| eprintln!("in doubt: {n}"))
        .await;
    let locks = bank.locks_released(Duration::from_secs(30)).await;
    let report = bank.check(&transfers, left, locks).await;
    let checks = &report.checks;
    let passed = report.passed();
    let (heard_committed, heard_aborted, abandoned) = (
        report.heard_committed,
        report.heard_aborted,
        report.abandoned,
    );
    let (recovered_committed, recovered_aborted) =
        (report.unknown_committed, report.unknown_aborted);
    let drained = left == 0;
    let last = left;

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
        for c in checks {
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
