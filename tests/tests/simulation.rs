//! The deterministic simulation in CI: a bounded number of seeds (each a full bank
//! workload over 3–5 participants with partitions, delays and crashes), checked for
//! every invariant, plus coverage: each fault kind fired, transactions both committed
//! and aborted, some recovered after a crash. And a run with deliberately broken stores
//! must fail, so a clean result means something. Thousands of seeds: see README.md.

use ratify_tests::sim::{FaultCounts, SimPlan, run_seed};

/// Seeds per CI run; `RATIFY_SIM_SEEDS` overrides.
fn seeds() -> u64 {
    std::env::var("RATIFY_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

#[test]
fn seeded_simulations_keep_every_invariant() {
    let mut faults = FaultCounts::default();
    let (mut committed, mut aborted, mut recovered, mut transactions) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for seed in 0..seeds() {
        let outcome = run_seed(&SimPlan::draw(seed, 120));
        if !outcome.violations.is_empty() {
            failures.push(format!(
                "seed {seed} (replay: cargo run --release -p ratify-tests --bin sim -- --seed {seed} --transactions 120):\n  {}",
                outcome.violations.join("\n  ")
            ));
        }
        faults.add(&outcome.faults);
        committed += outcome.committed;
        aborted += outcome.aborted;
        recovered += outcome.unknown_then_committed;
        transactions += outcome.transactions;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Coverage: the run exercised what it claims to.
    assert!(faults.partitions > 0 && faults.client_partitions > 0 && faults.delays > 0);
    assert!(faults.silent_drops > 0);
    assert!(faults.coordinator_crashes > 0 && faults.participant_crashes > 0);
    assert!(
        committed * 10 >= transactions,
        "{committed} of {transactions} committed"
    );
    assert!(
        aborted * 10 >= transactions,
        "{aborted} of {transactions} aborted"
    );
    assert!(
        recovered > 0,
        "no transaction committed after its client lost the answer"
    );
}

#[test]
fn the_simulation_catches_a_store_that_votes_yes_before_its_prepare_is_durable() {
    // (About one seed in eight catches a participant crash between its YES and the
    // Commit of a transaction decided COMMIT.)
    let found = (0..40).any(|seed| {
        let mut plan = SimPlan::draw(seed, 200);
        plan.broken_store = true;
        !run_seed(&plan).violations.is_empty()
    });
    assert!(found, "40 seeds with non-durable prepares found nothing");
}

#[test]
fn decisions_reached_in_one_driver_pass_share_one_forced_append() {
    // Many clients and no faults: a batched Prepare's votes decide several transactions
    // in one pass of the coordinator's driver, whose COMMIT records go to the log as one
    // forced append (one group commit), not one append each.
    let mut plan = SimPlan::draw(3, 400);
    plan.clients = 16;
    plan.transfers_per_client = 25;
    plan.fault_gap_ms = 1 << 40;
    let outcome = run_seed(&plan);
    assert!(
        outcome.violations.is_empty(),
        "{}",
        outcome.violations.join("\n")
    );
    assert_eq!(outcome.faults.total(), 0);
    assert!(outcome.committed > 100, "{outcome:?}");
    assert!(
        outcome.forced_records > outcome.forced_appends,
        "every forced append carried one record: {} appends, {} records",
        outcome.forced_appends,
        outcome.forced_records
    );
}

#[test]
fn a_seed_replays_exactly() {
    let plan = SimPlan::draw(7, 80);
    let first = run_seed(&plan);
    let second = run_seed(&plan);
    assert_eq!(first.digest, second.digest);
    assert_eq!(first.faults, second.faults);
    assert_eq!(
        (first.committed, first.aborted, first.unknown),
        (second.committed, second.aborted, second.unknown)
    );
}

/// Regression seed: without HTTP/2 keepalives on the runtimes' channels, a one-way
/// silent drop in this seed left a connection dead without either end noticing, and a
/// branch on p5 stayed prepared after the heal (found by the simulation).
#[test]
fn seed_59_a_silently_dead_connection_is_noticed_and_redialed() {
    let outcome = run_seed(&SimPlan::draw(59, 200));
    assert!(
        outcome.violations.is_empty(),
        "{}",
        outcome.violations.join("\n")
    );
}
