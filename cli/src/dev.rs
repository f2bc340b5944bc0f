//! `ratify dev`: a coordinator and N sled participants in the foreground, on loopback
//! ports, with data under one directory; Ctrl-C stops them all; a rerun resumes the same
//! data (and, when they are free, the same ports).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::client::{CliError, CliResult, exit};
use crate::stack::{LocalStack, StackConfig, remember_ports, remembered_ports};

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Number of sled participants (named p1, p2, ...).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub participants: u16,
    /// Where the data and logs live.
    #[arg(long, default_value = "./ratify-dev")]
    pub dir: PathBuf,
    /// Take any free ports instead of 7400, 7401, ... (or those of the last run).
    #[arg(long)]
    pub any_port: bool,
}

pub async fn run(args: DevArgs) -> CliResult<u8> {
    let (coordinator_port, participant_ports) = if args.any_port {
        (0, Vec::new())
    } else {
        remembered_ports(&args.dir)
    };
    let mut stack = LocalStack::start(&StackConfig {
        exe: None,
        dir: args.dir.clone(),
        participants: usize::from(args.participants),
        coordinator_port,
        participant_ports,
        prepare_timeout_ms: 5_000,
        termination_deadline_ms: 5_000,
        participant_env: Vec::new(),
        stores: Vec::new(),
        worker_threads: None,
    })
    .map_err(|e| CliError::new(exit::ERROR, e))?;
    remember_ports(&args.dir, &stack);
    stack
        .wait_registered(Duration::from_secs(20))
        .await
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e))?;

    let coordinator = stack.coordinator.endpoint();
    println!("Ratify dev stack; data and logs in {}", args.dir.display());
    println!("  {:<12} {coordinator}", "coordinator");
    for (name, endpoint) in stack.names.iter().zip(stack.endpoints()) {
        println!("  {name:<12} {endpoint}");
    }
    println!();
    println!("Try, in another terminal:");
    println!("  export RATIFY_COORDINATOR={coordinator}");
    println!("  ratify kv put alice 100 --participant p1");
    println!("  ratify participants");
    println!();
    println!("Ctrl-C stops everything.");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::new(exit::ERROR, e.to_string()))?;
    let mut watch = tokio::time::interval(Duration::from_millis(500));
    let died = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break None,
            _ = term.recv() => break None,
            _ = watch.tick() => {
                if !stack.coordinator.is_running() {
                    break Some("the coordinator".to_string());
                }
                if let Some(i) = stack.participants.iter_mut().position(|p| !p.is_running()) {
                    break Some(stack.names[i].clone());
                }
            }
        }
    };
    println!("stopping...");
    let clean = stack.stop();
    match died {
        Some(which) => Err(CliError::new(
            exit::ERROR,
            format!(
                "{which} exited unexpectedly; see the logs in {}",
                args.dir.display()
            ),
        )),
        None if clean => {
            println!("stopped.");
            Ok(exit::OK)
        }
        None => Err(CliError::new(exit::ERROR, "a process did not stop cleanly")),
    }
}
