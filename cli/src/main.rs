//! `ratify`: the Ratify command-line tool. See `ratify --help` and README.md.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ratify_cli::client::exit;
use ratify_cli::commands::{self, Ctx, KvCmd, TxnCmd};
use ratify_cli::output::Format;
use ratify_cli::{bench, demo, dev};

#[derive(Debug, Parser)]
#[command(name = "ratify", version, about = "Ratify: two-phase commit across services.", long_about = None)]
struct Cli {
    /// The coordinator to talk to.
    #[arg(
        long,
        global = true,
        env = "RATIFY_COORDINATOR",
        default_value = "http://127.0.0.1:7400"
    )]
    coordinator: String,
    /// Output format of every command.
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Transactions: begin, commit, abort, status, show, resolve.
    #[command(subcommand)]
    Txn(TxnCmd),
    /// The sled participants' key-value data.
    #[command(subcommand)]
    Kv(KvCmd),
    /// What is in doubt: on the coordinator (preparing, or decided and not acknowledged by
    /// everyone), or with --participant, the branches a participant holds prepared.
    InDoubt {
        /// A participant name (from the coordinator's registry) or URL.
        #[arg(long)]
        participant: Option<String>,
        /// Exit with code 6 when anything is listed.
        #[arg(long)]
        fail_if_any: bool,
    },
    /// The participant registry and each participant's health.
    Participants,
    /// Run a coordinator and sled participants locally in the foreground.
    Dev(dev::DevArgs),
    /// A self-contained bank-transfer run that crashes and recovers the coordinator and
    /// checks that money is conserved.
    Demo(demo::DemoArgs),
    /// Measure throughput and latency beside the machine's own ceilings.
    Bench(bench::BenchArgs),
    /// Serve the gRPC echo used as the bench's ceiling.
    #[command(hide = true)]
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Async worker threads (default: one per core), as the coordinator is given.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=ratify_coordinator::daemon::MAX_WORKER_THREADS as i64))]
        worker_threads: Option<u16>,
    },
    /// Run the coordinator daemon (as `ratify-coordinator`).
    #[command(hide = true)]
    Coordinator(ratify_coordinator::daemon::Args),
    /// Run the sled participant daemon (as `ratify-participant`).
    #[command(hide = true)]
    Participant(ratify_participant::daemon::Args),
}

// glibc's malloc showed up at about a tenth of the daemons' CPU under load (`ratify
// bench`); mimalloc is cheaper for the many small, short-lived buffers of gRPC and sled.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ctx = Ctx {
        coordinator: cli.coordinator,
        output: cli.output,
    };
    match cli.command {
        Command::Coordinator(args) => return ratify_coordinator::daemon::main_with(args),
        Command::Participant(args) => return ratify_participant::daemon::main_with(args),
        _ => {}
    }
    // The bench drives load on one thread: it shares the machine with the stack it
    // measures, so its own footprint stays small, and its echo ceiling and its workload
    // are measured through the same single-threaded client.
    let mut builder = match cli.command {
        Command::Bench(_) => tokio::runtime::Builder::new_current_thread(),
        Command::EchoServer {
            worker_threads: Some(n),
            ..
        } => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n.into());
            builder
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ratify: starting the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Txn(cmd) => commands::txn(&ctx, cmd).await,
            Command::Kv(cmd) => commands::kv(&ctx, cmd).await,
            Command::InDoubt {
                participant,
                fail_if_any,
            } => commands::in_doubt(&ctx, participant, fail_if_any).await,
            Command::Participants => commands::participants(&ctx).await,
            Command::Dev(args) => dev::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::EchoServer { listen, .. } => bench::serve_echo(&listen).await,
            Command::Coordinator(_) | Command::Participant(_) => unreachable!("handled above"),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("ratify: {error}");
            ExitCode::from(error.code)
        }
    }
}
