//! The `ratify-participant` daemon: the sled key-value store behind the Participant and
//! Kv gRPC services. Settings come from flags, then `RATIFY_PARTICIPANT_*` environment
//! variables, then a TOML file (`--config`), then defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ratify_proto::v1;
use ratify_proto::v1::coordinator_client::CoordinatorClient;
use ratify_proto::v1::kv_server::KvServer;
use ratify_proto::v1::participant_server::ParticipantServer;
use serde::Deserialize;
use tracing::{error, info};

use crate::kv::service::{Enlistment, KvService, KvStore};
use crate::kv::{KvLimits, SledStore};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::service::ParticipantService;

/// Command-line flags. Every setting can also come from the environment or the TOML file.
#[derive(Debug, Parser)]
#[command(
    name = "ratify-participant",
    version,
    about = "A Ratify participant: a transactional key-value store over sled, served over gRPC."
)]
pub struct Args {
    /// TOML file with any of the settings below (keys as the long flag names, with `_`).
    #[arg(long, env = "RATIFY_PARTICIPANT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "RATIFY_PARTICIPANT_LISTEN")]
    pub listen: Option<String>,
    /// The store: "sled" (default, in --data-dir) or a PostgreSQL URL
    /// (postgres://user@host:port/db; the server needs max_prepared_transactions > 0).
    #[arg(long, env = "RATIFY_PARTICIPANT_STORE")]
    pub store: Option<String>,
    /// Directory for the sled database.
    #[arg(long, env = "RATIFY_PARTICIPANT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// This participant's name, as the coordinator's registry knows it.
    #[arg(long, env = "RATIFY_PARTICIPANT_NAME")]
    pub name: Option<String>,
    /// The coordinator's endpoint, e.g. http://127.0.0.1:7400.
    #[arg(long, env = "RATIFY_PARTICIPANT_COORDINATOR")]
    pub coordinator: Option<String>,
    /// The endpoint the coordinator should dial for this participant (default: the bound
    /// listen address).
    #[arg(long, env = "RATIFY_PARTICIPANT_ADVERTISE")]
    pub advertise: Option<String>,
    /// A branch prepared this long asks the coordinator for its outcome (milliseconds).
    #[arg(long, env = "RATIFY_PARTICIPANT_TERMINATION_DEADLINE_MS")]
    pub termination_deadline_ms: Option<u64>,
    /// Cap of the termination protocol's backoff (milliseconds).
    #[arg(long, env = "RATIFY_PARTICIPANT_TERMINATION_BACKOFF_MAX_MS")]
    pub termination_backoff_max_ms: Option<u64>,
    /// Largest prepare payload (bytes).
    #[arg(long, env = "RATIFY_PARTICIPANT_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// Most branches prepared at once.
    #[arg(long, env = "RATIFY_PARTICIPANT_MAX_PREPARED")]
    pub max_prepared: Option<usize>,
    /// Largest key (bytes).
    #[arg(long, env = "RATIFY_PARTICIPANT_MAX_KEY_BYTES")]
    pub max_key_bytes: Option<usize>,
    /// Largest value (bytes).
    #[arg(long, env = "RATIFY_PARTICIPANT_MAX_VALUE_BYTES")]
    pub max_value_bytes: Option<usize>,
    /// Most operations in one branch.
    #[arg(long, env = "RATIFY_PARTICIPANT_MAX_OPS_PER_BRANCH")]
    pub max_ops_per_branch: Option<usize>,
    /// Most branches with staged, unprepared operations.
    #[arg(long, env = "RATIFY_PARTICIPANT_MAX_ACTIVE_BRANCHES")]
    pub max_active_branches: Option<usize>,
    /// Staged branches idle this long are dropped (seconds).
    #[arg(long, env = "RATIFY_PARTICIPANT_ACTIVE_BRANCH_TIMEOUT_S")]
    pub active_branch_timeout_s: Option<u64>,
    /// Finished branches are remembered (to refuse a late Prepare and answer a repeated
    /// Commit or Abort) this long (seconds) ...
    #[arg(long, env = "RATIFY_PARTICIPANT_TOMBSTONE_RETENTION_S")]
    pub tombstone_retention_s: Option<u64>,
    /// ... and at most this many.
    #[arg(long, env = "RATIFY_PARTICIPANT_MAX_TOMBSTONES")]
    pub max_tombstones: Option<usize>,
    /// Async worker threads (default: one per core).
    #[arg(long, env = "RATIFY_PARTICIPANT_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    store: Option<String>,
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    name: Option<String>,
    coordinator: Option<String>,
    advertise: Option<String>,
    termination_deadline_ms: Option<u64>,
    termination_backoff_max_ms: Option<u64>,
    max_payload_bytes: Option<usize>,
    max_prepared: Option<usize>,
    max_key_bytes: Option<usize>,
    max_value_bytes: Option<usize>,
    max_ops_per_branch: Option<usize>,
    max_active_branches: Option<usize>,
    active_branch_timeout_s: Option<u64>,
    tombstone_retention_s: Option<u64>,
    max_tombstones: Option<usize>,
    worker_threads: Option<usize>,
}

/// The most async worker threads a daemon accepts.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Settings after merging flags, environment, file and defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub store: Option<String>,
    pub listen: String,
    pub data_dir: PathBuf,
    pub advertise: Option<String>,
    pub runtime: RuntimeConfig,
    pub limits: KvLimits,
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
        let runtime_defaults = RuntimeConfig::default();
        let limit_defaults = KvLimits::default();
        let runtime = RuntimeConfig {
            name: self.name.or(file.name).unwrap_or_else(|| "p1".into()),
            coordinator: self.coordinator.or(file.coordinator),
            max_payload_bytes: self
                .max_payload_bytes
                .or(file.max_payload_bytes)
                .unwrap_or(runtime_defaults.max_payload_bytes),
            max_prepared: self
                .max_prepared
                .or(file.max_prepared)
                .unwrap_or(runtime_defaults.max_prepared),
            termination_deadline: self
                .termination_deadline_ms
                .or(file.termination_deadline_ms)
                .map(Duration::from_millis)
                .unwrap_or(runtime_defaults.termination_deadline),
            termination_backoff_max: self
                .termination_backoff_max_ms
                .or(file.termination_backoff_max_ms)
                .map(Duration::from_millis)
                .unwrap_or(runtime_defaults.termination_backoff_max),
            tombstone_retention: self
                .tombstone_retention_s
                .or(file.tombstone_retention_s)
                .map(Duration::from_secs)
                .unwrap_or(runtime_defaults.tombstone_retention),
            max_tombstones: self
                .max_tombstones
                .or(file.max_tombstones)
                .unwrap_or(runtime_defaults.max_tombstones),
            ..runtime_defaults
        };
        validate_name(&runtime.name)?;
        let limits = KvLimits {
            max_key_bytes: self
                .max_key_bytes
                .or(file.max_key_bytes)
                .unwrap_or(limit_defaults.max_key_bytes),
            max_value_bytes: self
                .max_value_bytes
                .or(file.max_value_bytes)
                .unwrap_or(limit_defaults.max_value_bytes),
            max_ops_per_branch: self
                .max_ops_per_branch
                .or(file.max_ops_per_branch)
                .unwrap_or(limit_defaults.max_ops_per_branch),
            max_active_branches: self
                .max_active_branches
                .or(file.max_active_branches)
                .unwrap_or(limit_defaults.max_active_branches),
            active_branch_timeout: self
                .active_branch_timeout_s
                .or(file.active_branch_timeout_s)
                .map(Duration::from_secs)
                .unwrap_or(limit_defaults.active_branch_timeout),
        };
        let worker_threads = self.worker_threads.or(file.worker_threads);
        if let Some(n) = worker_threads {
            anyhow::ensure!(
                (1..=MAX_WORKER_THREADS).contains(&n),
                "worker threads must be between 1 and {MAX_WORKER_THREADS} (got {n})"
            );
        }
        Ok(Settings {
            store: self.store.or(file.store),
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:7401".into()),
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("ratify-participant-data")),
            advertise: self.advertise.or(file.advertise),
            runtime,
            limits,
            worker_threads,
        })
    }
}

/// Participant names: 1 to 64 characters of `[A-Za-z0-9._-]`.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    anyhow::ensure!(
        ok,
        "participant name {name:?} must be 1 to 64 characters of A-Z a-z 0-9 . _ -"
    );
    Ok(())
}

/// The largest gRPC message accepted: the payload limit plus room for framing.
fn max_message_bytes(settings: &Settings) -> usize {
    settings.runtime.max_payload_bytes.saturating_mul(2) + 64 * 1024
}

/// Runs the daemon until SIGTERM or Ctrl-C (or a fatal storage failure).
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    match settings.store.as_deref() {
        None | Some("sled") => {
            std::fs::create_dir_all(&settings.data_dir)
                .with_context(|| format!("creating data dir {}", settings.data_dir.display()))?;
            let store = Arc::new(SledStore::open(
                &settings.data_dir,
                settings.limits.clone(),
            )?);
            serve(settings, store, |_| {}).await
        }
        #[cfg(feature = "postgres")]
        Some(conninfo)
            if conninfo.starts_with("postgres://")
                || conninfo.starts_with("postgresql://")
                || conninfo.contains("host=") =>
        {
            let mut options = crate::pg::PgOptions::new(conninfo, settings.runtime.name.clone());
            options.limits = settings.limits.clone();
            let store = Arc::new(
                crate::pg::PgStore::open(options)
                    .await
                    .context("opening the PostgreSQL store")?,
            );
            serve(
                settings,
                store,
                |runtime: Arc<Runtime<crate::pg::PgStore>>| {
                    // PostgreSQL never times out a prepared transaction: look for ones of
                    // this participant that the runtime does not know, and resolve them.
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(Duration::from_secs(10)).await;
                            match runtime.store().scan_prepared().await {
                                Ok(found) => {
                                    runtime.adopt_prepared(found);
                                }
                                Err(error) => {
                                    tracing::warn!(%error, "scanning pg_prepared_xacts failed")
                                }
                            }
                        }
                    });
                },
            )
            .await
        }
        Some(other) => anyhow::bail!(
            "--store {other:?}: expected \"sled\" or a PostgreSQL URL (postgres://user@host:port/db)"
        ),
    }
}

/// Serves a store: recovers it, then the Participant and Kv services until shutdown.
async fn serve<S: KvStore>(
    settings: Settings,
    store: Arc<S>,
    extra: impl FnOnce(Arc<Runtime<S>>),
) -> anyhow::Result<()> {
    let runtime = Runtime::recover(store.clone(), settings.runtime.clone())
        .await
        .context("recovering prepared branches")?;
    extra(runtime.clone());

    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("binding {}", settings.listen))?;
    let local: SocketAddr = listener.local_addr()?;
    let advertised = settings
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{local}"));

    let enlistment = match &settings.runtime.coordinator {
        Some(endpoint) => Some(Enlistment {
            name: settings.runtime.name.clone(),
            advertised_endpoint: advertised.clone(),
            coordinator: CoordinatorClient::new(
                settings
                    .runtime
                    .dialer
                    .dial(endpoint)
                    .with_context(|| format!("invalid coordinator endpoint {endpoint:?}"))?,
            ),
        }),
        None => None,
    };

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let background = tokio::spawn(runtime.clone().run_background(shutdown_rx.clone()));
    let expiry_store = store.clone();
    let mut expiry_shutdown = shutdown_rx.clone();
    let expiry = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => { expiry_store.staging().expire_idle(); }
                _ = expiry_shutdown.changed() => return,
            }
        }
    });

    let register = enlistment.clone().map(|e| {
        let mut shutdown = shutdown_rx.clone();
        tokio::spawn(async move {
            // Announce this endpoint at start and every few seconds, so a coordinator that
            // restarted (or a participant that moved) is known before the next transaction.
            let mut client = e.coordinator.clone();
            loop {
                let request = v1::RegisterRequest {
                    participant: e.name.clone(),
                    endpoint: e.advertised_endpoint.clone(),
                };
                if let Err(status) = client.register(request).await {
                    tracing::debug!(%status, "registering with the coordinator failed; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        })
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ParticipantServer<ParticipantService<S>>>()
        .await;

    let max_message = max_message_bytes(&settings);
    let participant_service = ParticipantService::new(runtime.clone());
    let streams = participant_service.clone();
    let participant = ParticipantServer::new(participant_service)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let kv = KvServer::new(KvService::new(runtime.clone(), enlistment))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);

    // The line tests and `ratify dev` read to learn the bound address.
    println!(
        "ratify-participant {} listening on {local}",
        settings.runtime.name
    );
    info!(name = %settings.runtime.name, %local, %advertised, data_dir = %settings.data_dir.display(), "participant serving");

    let mut fatal = runtime.fatal();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown_signal() => info!("shutting down"),
            _ = fatal.wait_for(|f| f.is_some()) => {
                error!("stopping after a fatal storage failure");
            }
        }
        // The coordinator's PrepareStream would keep the graceful shutdown waiting.
        streams.close_streams();
    };
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(1024))
        .concurrency_limit_per_connection(1024)
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(participant)
        .add_service(kv)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .context("serving gRPC")?;
    let _ = shutdown_tx.send(true);
    let _ = background.await;
    if let Some(register) = register {
        let _ = register.await;
    }
    let _ = expiry.await;
    if let Some(message) = runtime.fatal().borrow().clone() {
        anyhow::bail!("fatal storage failure: {message}");
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The binary's entry point.
pub fn main() -> std::process::ExitCode {
    main_with(Args::parse())
}

/// The entry point with parsed arguments (the `ratify` CLI hosts the daemon this way).
pub fn main_with(args: Args) -> std::process::ExitCode {
    init_tracing();
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
            eprintln!("ratify-participant: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> anyhow::Result<Settings> {
        Args::try_parse_from(std::iter::once("ratify-participant").chain(args.iter().copied()))?
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
        let file = dir.path().join("participant.toml");
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
