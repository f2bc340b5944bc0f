//! The `ratify-coordinator` daemon. Settings come from flags, then `RATIFY_COORDINATOR_*`
//! environment variables, then a TOML file (`--config`), then defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ratify_proto::v1::admin_server::AdminServer;
use ratify_proto::v1::coordinator_server::CoordinatorServer;
use serde::Deserialize;
use tracing::info;

use crate::engine::EngineConfig;
use crate::log::wal::{Wal, WalOptions};
use crate::registry::Registry;
use crate::runtime::{self, RuntimeConfig};
use crate::service::{AdminService, CoordinatorService, Limits};

/// Command-line flags. Every setting can also come from the environment or the TOML file.
#[derive(Debug, Parser)]
#[command(
    name = "ratify-coordinator",
    version,
    about = "The Ratify two-phase-commit coordinator: a write-ahead decision log, presumed-abort 2PC, recovery, gRPC."
)]
pub struct Args {
    /// TOML file with any of the settings below (keys as the long flag names, with `_`).
    #[arg(long, env = "RATIFY_COORDINATOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "RATIFY_COORDINATOR_LISTEN")]
    pub listen: Option<String>,
    /// Directory of the decision log.
    #[arg(long, env = "RATIFY_COORDINATOR_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, env = "RATIFY_COORDINATOR_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// A participant of the registry, NAME=URL (repeatable; in TOML: [participants] NAME = "URL").
    #[arg(
        long = "participant",
        value_name = "NAME=URL",
        env = "RATIFY_COORDINATOR_PARTICIPANTS",
        value_delimiter = ','
    )]
    pub participants: Vec<String>,
    /// Votes not in by then abort the transaction (milliseconds).
    #[arg(long, env = "RATIFY_COORDINATOR_PREPARE_TIMEOUT_MS")]
    pub prepare_timeout_ms: Option<u64>,
    /// Default lifetime of a transaction (milliseconds).
    #[arg(long, env = "RATIFY_COORDINATOR_TXN_TIMEOUT_MS")]
    pub txn_timeout_ms: Option<u64>,
    /// Largest lifetime a client may ask for (milliseconds).
    #[arg(long, env = "RATIFY_COORDINATOR_MAX_TXN_TIMEOUT_MS")]
    pub max_txn_timeout_ms: Option<u64>,
    /// Most participants in one transaction.
    #[arg(long, env = "RATIFY_COORDINATOR_MAX_PARTICIPANTS")]
    pub max_participants: Option<usize>,
    /// Most transactions in flight.
    #[arg(long, env = "RATIFY_COORDINATOR_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Largest payload per participant (bytes).
    #[arg(long, env = "RATIFY_COORDINATOR_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// First phase-2 retry delay (milliseconds); doubles up to --retry-max-ms.
    #[arg(long, env = "RATIFY_COORDINATOR_RETRY_INITIAL_MS")]
    pub retry_initial_ms: Option<u64>,
    #[arg(long, env = "RATIFY_COORDINATOR_RETRY_MAX_MS")]
    pub retry_max_ms: Option<u64>,
    /// How long a decision waits for a Prepare to the same participant to ride on
    /// before it goes out in a Commit or Abort of its own (milliseconds, 0 to 100;
    /// default 1; 0: at once).
    #[arg(long, env = "RATIFY_COORDINATOR_DECISION_LINGER_MS")]
    pub decision_linger_ms: Option<u64>,
    /// Start a new WAL segment past this size (bytes).
    #[arg(long, env = "RATIFY_COORDINATOR_SEGMENT_BYTES")]
    pub segment_bytes: Option<u64>,
    /// Async worker threads (default: one per core).
    #[arg(long, env = "RATIFY_COORDINATOR_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    metrics_listen: Option<String>,
    #[serde(default)]
    participants: std::collections::BTreeMap<String, String>,
    prepare_timeout_ms: Option<u64>,
    txn_timeout_ms: Option<u64>,
    max_txn_timeout_ms: Option<u64>,
    max_participants: Option<usize>,
    max_in_flight: Option<usize>,
    max_payload_bytes: Option<usize>,
    retry_initial_ms: Option<u64>,
    retry_max_ms: Option<u64>,
    decision_linger_ms: Option<u64>,
    segment_bytes: Option<u64>,
    worker_threads: Option<usize>,
}

/// The longest `decision_linger_ms` accepted: a lingering decision keeps its branches
/// prepared, their locks held, so a long linger only makes data wait.
pub const MAX_DECISION_LINGER_MS: u64 = 100;

/// The most async worker threads a daemon accepts.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Settings after merging flags, environment, file and defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    pub data_dir: PathBuf,
    pub metrics_listen: Option<String>,
    pub participants: Vec<(String, String)>,
    pub runtime: RuntimeConfig,
    pub limits: Limits,
    pub wal: WalOptions,
    /// Async worker threads; `None`: one per core.
    pub worker_threads: Option<usize>,
}

impl Args {
    pub fn settings(self) -> anyhow::Result<Settings> {
        let file: FileConfig = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let mut participants: std::collections::BTreeMap<String, String> = file.participants;
        for entry in self.participants.iter().filter(|e| !e.is_empty()) {
            let (name, url) = entry
                .split_once('=')
                .with_context(|| format!("--participant {entry:?} must be NAME=URL"))?;
            participants.insert(name.trim().to_string(), url.trim().to_string());
        }
        let e = EngineConfig::default();
        let engine = EngineConfig {
            prepare_timeout_ms: self
                .prepare_timeout_ms
                .or(file.prepare_timeout_ms)
                .unwrap_or(e.prepare_timeout_ms),
            default_txn_timeout_ms: self
                .txn_timeout_ms
                .or(file.txn_timeout_ms)
                .unwrap_or(e.default_txn_timeout_ms),
            max_txn_timeout_ms: self
                .max_txn_timeout_ms
                .or(file.max_txn_timeout_ms)
                .unwrap_or(e.max_txn_timeout_ms),
            max_participants: self
                .max_participants
                .or(file.max_participants)
                .unwrap_or(e.max_participants),
            max_in_flight: self
                .max_in_flight
                .or(file.max_in_flight)
                .unwrap_or(e.max_in_flight),
            retry_initial_ms: self
                .retry_initial_ms
                .or(file.retry_initial_ms)
                .unwrap_or(e.retry_initial_ms),
            retry_max_ms: self
                .retry_max_ms
                .or(file.retry_max_ms)
                .unwrap_or(e.retry_max_ms),
            seed: fastrand::u64(..),
            ..e
        };
        anyhow::ensure!(
            engine.prepare_timeout_ms > 0,
            "prepare timeout must be positive"
        );
        anyhow::ensure!(
            engine.max_participants > 0,
            "max participants must be positive"
        );
        let worker_threads = self.worker_threads.or(file.worker_threads);
        if let Some(n) = worker_threads {
            anyhow::ensure!(
                (1..=MAX_WORKER_THREADS).contains(&n),
                "worker threads must be between 1 and {MAX_WORKER_THREADS} (got {n})"
            );
        }
        let prepare_rpc_timeout = Duration::from_millis(engine.prepare_timeout_ms);
        let decision_linger = match self.decision_linger_ms.or(file.decision_linger_ms) {
            Some(ms) => {
                anyhow::ensure!(
                    ms <= MAX_DECISION_LINGER_MS,
                    "decision linger must be at most {MAX_DECISION_LINGER_MS} ms (got {ms})"
                );
                Duration::from_millis(ms)
            }
            None => RuntimeConfig::default().decision_linger,
        };
        let limits = Limits {
            max_payload_bytes: self
                .max_payload_bytes
                .or(file.max_payload_bytes)
                .unwrap_or(Limits::default().max_payload_bytes),
            ..Limits::default()
        };
        Ok(Settings {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:7400".into()),
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("ratify-coordinator-data")),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            participants: participants.into_iter().collect(),
            runtime: RuntimeConfig {
                engine,
                prepare_rpc_timeout,
                decision_linger,
                ..RuntimeConfig::default()
            },
            limits,
            wal: WalOptions {
                segment_bytes: self
                    .segment_bytes
                    .or(file.segment_bytes)
                    .unwrap_or(WalOptions::default().segment_bytes),
                ..WalOptions::default()
            },
            worker_threads,
        })
    }
}

/// Runs the daemon until SIGTERM or Ctrl-C.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let registry = Arc::new(
        Registry::with_config(settings.participants.clone())
            .map_err(|e| anyhow::anyhow!("participant registry: {e}"))?,
    );
    let wal =
        Wal::open(&settings.data_dir, settings.wal.clone()).context("opening the decision log")?;
    let log = Arc::new(wal);

    if let Some(addr) = &settings.metrics_listen {
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("--metrics-listen {addr:?}"))?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets(&[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
            ])
            .context("metrics buckets")?
            .install()
            .context("starting the metrics listener")?;
        info!(%addr, "serving metrics");
    }

    let handle = runtime::start(log.clone(), registry, settings.runtime.clone()).await;

    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("binding {}", settings.listen))?;
    let local = listener.local_addr()?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<AdminService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ratify_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;

    let max_message = settings.limits.max_total_payload_bytes + (1 << 20);
    let coordinator = CoordinatorServer::new(CoordinatorService::new(
        handle.clone(),
        settings.limits.clone(),
    ))
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    let admin = AdminServer::new(AdminService::new(handle.clone(), settings.limits.clone()))
        .max_decoding_message_size(1 << 20)
        .max_encoding_message_size(64 << 20);

    println!(
        "ratify-coordinator listening on {local} (epoch {})",
        handle.epoch()
    );
    info!(%local, epoch = handle.epoch(), data_dir = %settings.data_dir.display(), "coordinator serving");
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(1024))
        .concurrency_limit_per_connection(1024)
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(coordinator)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown_signal(),
        )
        .await
        .context("serving gRPC")?;
    info!("coordinator stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("shutting down");
}

/// The binary's entry point.
pub fn main() -> std::process::ExitCode {
    main_with(Args::parse())
}

/// The entry point with parsed arguments (the `ratify` CLI hosts the daemon this way).
pub fn main_with(args: Args) -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let scenario = fail::FailScenario::setup();
    let result = (|| {
        let settings = args.settings()?;
        ratify_proto::runtime::daemon_runtime(settings.worker_threads)
            .context("starting the tokio runtime")?
            .block_on(run(settings))
    })();
    scenario.teardown();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ratify-coordinator: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> anyhow::Result<Settings> {
        Args::try_parse_from(std::iter::once("ratify-coordinator").chain(args.iter().copied()))?
            .settings()
    }

    #[test]
    fn worker_threads_come_from_the_flag_or_the_file_and_default_to_one_per_core() {
        assert_eq!(settings(&[]).unwrap().worker_threads, None);
        assert_eq!(
            settings(&["--worker-threads", "3"]).unwrap().worker_threads,
            Some(3)
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coordinator.toml");
        std::fs::write(&file, "worker_threads = 2\n").unwrap();
        let file = file.to_str().unwrap();
        assert_eq!(
            settings(&["--config", file]).unwrap().worker_threads,
            Some(2)
        );
        assert_eq!(
            settings(&["--config", file, "--worker-threads", "1"])
                .unwrap()
                .worker_threads,
            Some(1),
            "the flag overrides the file"
        );
    }

    #[test]
    fn decision_linger_comes_from_the_flag_or_the_file_within_its_limit() {
        assert_eq!(
            settings(&[]).unwrap().runtime.decision_linger,
            Duration::from_millis(1)
        );
        assert_eq!(
            settings(&["--decision-linger-ms", "0"])
                .unwrap()
                .runtime
                .decision_linger,
            Duration::ZERO
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coordinator.toml");
        std::fs::write(&file, "decision_linger_ms = 5\n").unwrap();
        let file = file.to_str().unwrap();
        assert_eq!(
            settings(&["--config", file])
                .unwrap()
                .runtime
                .decision_linger,
            Duration::from_millis(5)
        );
        let error = settings(&["--decision-linger-ms", "101"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("decision linger must be at most 100 ms (got 101)"),
            "{error}"
        );
    }

    #[test]
    fn zero_or_too_many_worker_threads_are_refused_with_the_range() {
        for bad in ["0", "1025"] {
            let error = settings(&["--worker-threads", bad])
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("worker threads must be between 1 and 1024"),
                "{bad}: {error}"
            );
        }
    }
}
