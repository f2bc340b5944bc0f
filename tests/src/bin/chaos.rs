//! The chaos runner: the bank workload against a real stack (a coordinator and sled
//! participants, each its own process, every coordinator ↔ participant link through a
//! fault proxy) while a seeded nemesis SIGKILLs and restarts nodes, pauses them with
//! SIGSTOP for longer than the prepare timeout, cuts participants off from the
//! coordinator (both ways or one way) and delays phase-2 traffic. Then it heals
//! everything, waits for the in-doubt lists to drain, and checks the bank's invariants.
//!
//! ```text
//! cargo run --release -p ratify-tests --bin chaos -- --duration 60s --seed 7
//! ```
//!
//! The last line of output is one JSON object (seed, transactions, committed, aborted,
//! faults, violations, in_doubt_after_heal). It exits 1 on any violation, after printing
//! the offending transactions and keeping the data directory.
//!
//! The same executable hosts the daemons (`chaos coordinator …`, `chaos participant …`),
//! so `cargo run -p ratify-tests --bin chaos` needs no other binary.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use ratify_cli::bank::{Answer, Bank, Workload};
use ratify_tests::proxy::LinkFault;
use ratify_tests::{Stack, StackOptions};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "chaos",
    about = "Bank workload under random crashes, pauses, partitions and delays; then heal and check."
)]
struct Opts {
    /// How long faults are injected (e.g. 60s, 10m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Seed of the workload and of the fault schedule (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Sled participants (accounts are spread over them).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=8))]
    participants: u16,
    /// Accounts on each participant (few accounts, many conflicts).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1000))]
    accounts_per_participant: u16,
    /// Concurrent bank clients.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    concurrency: u16,
    /// Mean time between faults.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    fault_interval: Duration,
    /// The coordinator's prepare timeout (pauses are drawn longer than this).
    #[arg(long, default_value_t = 1000)]
    prepare_timeout_ms: u64,
    /// Keep the data directory and logs even when every check passes.
    #[arg(long)]
    keep: bool,
    /// Crash points for participant p2 (to test that the checker catches a broken
    /// participant).
    #[arg(long, hide = true)]
    p2_failpoints: Option<String>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("bad duration {text:?}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("bad duration unit in {text:?} (use ms, s, m or h)")),
    };
    if !(0.0..=7.0 * 86_400.0).contains(&seconds) {
        return Err("a duration must be between 0 and 7 days".into());
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// One fault of the nemesis, described for the log.
#[derive(Debug)]
enum Fault {
    KillCoordinator {
        down: Duration,
    },
    KillParticipant {
        index: usize,
        down: Duration,
    },
    PauseCoordinator {
        pause: Duration,
    },
    PauseParticipant {
        index: usize,
        pause: Duration,
    },
    Cut {
        index: usize,
        hold: Duration,
    },
    CutToParticipant {
        index: usize,
        hold: Duration,
    },
    CutToCoordinator {
        index: usize,
        hold: Duration,
    },
    DelayPhase2 {
        index: usize,
        delay: Duration,
        hold: Duration,
    },
}

fn draw_fault(rng: &mut fastrand::Rng, participants: usize, prepare_timeout: Duration) -> Fault {
    let index = rng.usize(0..participants);
    let ms = |rng: &mut fastrand::Rng, lo: u64, hi: u64| Duration::from_millis(rng.u64(lo..=hi));
    match rng.u8(0..8) {
        0 => Fault::KillCoordinator {
            down: ms(rng, 0, 1500),
        },
        1 => Fault::KillParticipant {
            index,
            down: ms(rng, 0, 1500),
        },
        2 => Fault::PauseCoordinator {
            pause: prepare_timeout + ms(rng, 200, 2000),
        },
        3 => Fault::PauseParticipant {
            index,
            pause: prepare_timeout + ms(rng, 200, 2000),
        },
        4 => Fault::Cut {
            index,
            hold: ms(rng, 500, 4000),
        },
        5 => Fault::CutToParticipant {
            index,
            hold: ms(rng, 500, 3000),
        },
        6 => Fault::CutToCoordinator {
            index,
            hold: ms(rng, 500, 3000),
        },
        _ => Fault::DelayPhase2 {
            index,
            delay: ms(rng, 50, 800),
            hold: ms(rng, 1000, 3000),
        },
    }
}

/// Restarts a process, blocking this worker thread (the workload runs on the others).
fn restart(proc: &mut ratify_tests::Proc) -> Result<(), String> {
    tokio::task::block_in_place(|| proc.try_restart(&[]))
}

async fn inject(stack: &mut Stack, fault: &Fault) -> Result<(), String> {
    match *fault {
        Fault::KillCoordinator { down } => {
            stack.coordinator.kill9();
            tokio::time::sleep(down).await;
            restart(&mut stack.coordinator)?;
        }
        Fault::KillParticipant { index, down } => {
            stack.participants[index].kill9();
            tokio::time::sleep(down).await;
            restart(&mut stack.participants[index])?;
        }
        Fault::PauseCoordinator { pause } => {
            stack.coordinator.pause();
            tokio::time::sleep(pause).await;
            stack.coordinator.resume();
        }
        Fault::PauseParticipant { index, pause } => {
            stack.participants[index].pause();
            tokio::time::sleep(pause).await;
            stack.participants[index].resume();
        }
        Fault::Cut { index, hold } => {
            stack.links[index].cut();
            tokio::time::sleep(hold).await;
            stack.links[index].heal();
        }
        Fault::CutToParticipant { index, hold } => {
            stack.links[index].to_participant.set_fault(LinkFault::Cut);
            tokio::time::sleep(hold).await;
            stack.links[index].heal();
        }
        Fault::CutToCoordinator { index, hold } => {
            stack.links[index].to_coordinator.set_fault(LinkFault::Cut);
            tokio::time::sleep(hold).await;
            stack.links[index].heal();
        }
        Fault::DelayPhase2 { index, delay, hold } => {
            stack.links[index]
                .to_participant
                .set_fault(LinkFault::Delay(delay));
            tokio::time::sleep(hold).await;
            stack.links[index].heal();
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // The daemons, when this executable is started as one of them.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("coordinator") => {
            use clap::Parser as _;
            return ratify_coordinator::daemon::main_with(
                ratify_coordinator::daemon::Args::parse_from(
                    std::iter::once("chaos coordinator".into()).chain(args[2..].iter().cloned()),
                ),
            );
        }
        Some("participant") => {
            return ratify_participant::daemon::main_with(
                ratify_participant::daemon::Args::parse_from(
                    std::iter::once("chaos participant".into()).chain(args[2..].iter().cloned()),
                ),
            );
        }
        _ => {}
    }
    let opts = Opts::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaos: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(opts)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chaos: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(opts: Opts) -> Result<bool, String> {
    let seed = opts.seed.unwrap_or_else(|| fastrand::u64(..));
    let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
    let participants = usize::from(opts.participants);
    let prepare_timeout = Duration::from_millis(opts.prepare_timeout_ms);
    let mut stack = Stack::start(StackOptions {
        participants,
        prepare_timeout_ms: opts.prepare_timeout_ms,
        termination_deadline_ms: 500,
        network_faults: true,
        self_exe: Some(exe),
        participant_env: opts
            .p2_failpoints
            .iter()
            .map(|f| (1, "FAILPOINTS".to_string(), f.clone()))
            .collect(),
        ..StackOptions::default()
    });
    eprintln!(
        "chaos: seed {seed}, {} of faults every ~{:?}, {participants} participants, {} clients, data in {}",
        humanize(opts.duration),
        opts.fault_interval,
        opts.concurrency,
        stack.dir.path().display()
    );
    stack.wait_registered().await;
    let bank = Bank::new(
        stack.coordinator.endpoint(),
        stack.participants.iter().map(|p| p.endpoint()).collect(),
        usize::from(opts.accounts_per_participant),
    )
    .with_rpc_timeout(Duration::from_secs(5));
    let bank = Arc::new(bank);
    bank.open().await?;

    let workload = Workload::spawn(bank.clone(), usize::from(opts.concurrency), seed, None);
    let mut rng = fastrand::Rng::with_seed(seed.rotate_left(17) ^ 0xC4A0_5EED);
    let started = Instant::now();
    let mut faults = 0u64;
    let interval_ms = opts.fault_interval.as_millis().max(1) as u64;
    while started.elapsed() < opts.duration {
        let wait = Duration::from_millis(rng.u64(interval_ms / 2..=interval_ms * 3 / 2));
        tokio::time::sleep(wait.min(opts.duration.saturating_sub(started.elapsed()))).await;
        if started.elapsed() >= opts.duration {
            break;
        }
        let fault = draw_fault(&mut rng, participants, prepare_timeout);
        eprintln!(
            "chaos: {:>6.1}s  {fault:?}  ({} transfers, {} committed)",
            started.elapsed().as_secs_f64(),
            workload.done.load(Ordering::Relaxed),
            workload.committed.load(Ordering::Relaxed)
        );
        inject(&mut stack, &fault).await?;
        faults += 1;
    }

    // Heal: every link, every paused process; a node that stopped by itself is a finding.
    stack.heal_all();
    let mut exited = Vec::new();
    if !stack.coordinator.is_running() {
        exited.push("coordinator".to_string());
        restart(&mut stack.coordinator)?;
    }
    for (i, p) in stack.participants.iter_mut().enumerate() {
        if !p.is_running() {
            exited.push(format!("p{}", i + 1));
            restart(p)?;
        }
    }
    eprintln!("chaos: healed after {faults} faults; finishing the clients");
    let transfers = workload.finish().await;
    let heal_started = Instant::now();
    let left = bank
        .drain(Duration::from_secs(60), |n| {
            eprintln!("chaos: in doubt {n}")
        })
        .await;
    let locks = bank.locks_released(Duration::from_secs(30)).await;
    let resolved_in = heal_started.elapsed();
    let mut report = bank.check(&transfers, left, locks).await;
    if !exited.is_empty() {
        report.checks.push(ratify_cli::bank::Check {
            name: "no node stopped by itself",
            failures: exited
                .iter()
                .map(|n| format!("{n} exited without being killed"))
                .collect(),
        });
    }
    let violations = report.violations();
    for failure in report.failures() {
        println!("VIOLATION {failure}");
    }
    let unknown = transfers
        .iter()
        .filter(|t| t.answer == Answer::Unknown)
        .count();
    eprintln!(
        "chaos: {} transactions ({} committed, {} aborted, {} abandoned, {} unknown to the client: {} of them committed), resolved {:.1}s after the heal",
        transfers.iter().filter(|t| t.txn.is_some()).count(),
        report.heard_committed,
        report.heard_aborted,
        report.abandoned,
        unknown,
        report.unknown_committed,
        resolved_in.as_secs_f64()
    );
    if violations > 0 || opts.keep {
        let dir = std::mem::replace(
            &mut stack.dir,
            tempfile::tempdir().map_err(|e| e.to_string())?,
        );
        eprintln!("chaos: data and logs kept in {}", dir.keep().display());
    }
    println!(
        "{}",
        json!({
            "seed": seed,
            "duration_s": opts.duration.as_secs_f64(),
            "transactions": transfers.iter().filter(|t| t.txn.is_some()).count(),
            "committed": report.heard_committed,
            "aborted": report.heard_aborted,
            "abandoned": report.abandoned,
            "unknown_then_committed": report.unknown_committed,
            "unknown_then_aborted": report.unknown_aborted,
            "faults": faults,
            "violations": violations,
            "in_doubt_after_heal": left,
        })
    );
    Ok(violations == 0)
}

fn humanize(d: Duration) -> String {
    format!("{:.0}s", d.as_secs_f64())
}
