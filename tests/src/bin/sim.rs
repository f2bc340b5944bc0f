//! The deterministic simulation runner (see `ratify_tests::sim`): runs seeds, prints
//! every failing seed with its violations and the command that replays it, and ends
//! with one JSON line of totals.
//!
//! ```text
//! cargo run --release -p ratify-tests --bin sim -- --seeds 2000      # seeds 0..2000
//! cargo run --release -p ratify-tests --bin sim -- --seed 1234       # replay one
//! ```

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use ratify_tests::sim::{FaultCounts, SimPlan, run_seed};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "sim",
    about = "Deterministic simulation of a coordinator and participants under partitions, delays and crashes."
)]
struct Opts {
    /// Run this one seed (and print its plan).
    #[arg(long, conflicts_with_all = ["seeds", "first_seed"])]
    seed: Option<u64>,
    /// How many seeds to run.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed of the range.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Transactions per seed.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    transactions: u32,
    /// Run with deliberately broken participant stores (prepared branches not durable):
    /// the checker must report violations.
    #[arg(long, hide = true)]
    broken_store: bool,
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    // The nodes' logs, when RUST_LOG asks for them (useful with --seed).
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let seeds: Vec<u64> = match opts.seed {
        Some(seed) => vec![seed],
        None => (opts.first_seed..opts.first_seed.saturating_add(opts.seeds)).collect(),
    };
    let started = Instant::now();
    let mut failed = Vec::new();
    let (mut transactions, mut committed, mut aborted, mut unknown) = (0, 0, 0, 0);
    let mut faults = FaultCounts::default();
    for &seed in &seeds {
        let mut plan = SimPlan::draw(seed, opts.transactions as usize);
        plan.broken_store = opts.broken_store;
        if opts.seed.is_some() {
            eprintln!("{plan:#?}");
        }
        let outcome = run_seed(&plan);
        transactions += outcome.transactions;
        committed += outcome.committed;
        aborted += outcome.aborted;
        unknown += outcome.unknown;
        faults.add(&outcome.faults);
        if opts.seed.is_some() {
            eprintln!(
                "{}",
                serde_json::to_string_pretty(&outcome).unwrap_or_default()
            );
        }
        if !outcome.violations.is_empty() {
            eprintln!("seed {seed} FAILED:");
            for v in &outcome.violations {
                eprintln!("  {v}");
            }
            eprintln!(
                "  replay: cargo run --release -p ratify-tests --bin sim -- --seed {seed} --transactions {}",
                opts.transactions
            );
            failed.push(seed);
        }
    }
    println!(
        "{}",
        json!({
            "seeds": seeds.len(),
            "failed_seeds": failed,
            "transactions": transactions,
            "committed": committed,
            "aborted": aborted,
            "unknown": unknown,
            "faults": faults,
            "elapsed_s": started.elapsed().as_secs_f64(),
        })
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
