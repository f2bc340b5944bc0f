//! A harness for multi-process tests: it starts the real `ratify-coordinator` and
//! `ratify-participant` binaries on port-0 loopback listeners in temporary directories,
//! can SIGKILL, SIGTERM and restart them, and always kills what it started (also when a
//! test panics).
//!
//! The binaries are the ones `cargo test --workspace` builds next to the test executables
//! (`target/<profile>/`); set `RATIFY_BIN_DIR` to use others.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use ratify_cli::proc::Proc;
use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_proto::v1::admin_client::AdminClient;
use ratify_proto::v1::coordinator_client::CoordinatorClient;
use ratify_proto::v1::kv_client::KvClient;
use ratify_proto::v1::participant_client::ParticipantClient;
use tonic::transport::Channel;

/// The directory holding the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RATIFY_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test> -> target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps")
        .to_path_buf()
}

pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (which builds every \
         binary), or point RATIFY_BIN_DIR at a directory holding it",
        path.display()
    );
    path
}

/// Settings for a test stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub participants: usize,
    /// Environment of the first coordinator start (e.g. FAILPOINTS).
    pub coordinator_env: Vec<(String, String)>,
    /// Extra coordinator flags (limits, timeouts).
    pub coordinator_args: Vec<String>,
    pub termination_deadline_ms: u64,
    pub prepare_timeout_ms: u64,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            participants: 2,
            coordinator_env: Vec::new(),
            coordinator_args: Vec::new(),
            termination_deadline_ms: 500,
            prepare_timeout_ms: 3_000,
        }
    }
}

/// A coordinator and its participants, each a real process, in one temporary directory.
#[derive(Debug)]
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub coordinator: Proc,
    pub participants: Vec<Proc>,
}

impl Stack {
    pub fn start(options: StackOptions) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let env: Vec<(&str, &str)> = options
            .coordinator_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let coordinator = Proc::start(
            "coordinator",
            binary("ratify-coordinator"),
            vec![
                "--data-dir".into(),
                dir.path().join("coordinator").display().to_string(),
                "--prepare-timeout-ms".into(),
                options.prepare_timeout_ms.to_string(),
                "--retry-initial-ms".into(),
                "50".into(),
                "--retry-max-ms".into(),
                "500".into(),
            ]
            .into_iter()
            .chain(options.coordinator_args.iter().cloned())
            .collect(),
            "127.0.0.1:0",
            &env,
            dir.path().join("coordinator.log"),
        );
        let participants = (0..options.participants)
            .map(|i| {
                let name = format!("p{}", i + 1);
                Proc::start(
                    &name,
                    binary("ratify-participant"),
                    vec![
                        "--data-dir".into(),
                        dir.path().join(&name).display().to_string(),
                        "--name".into(),
                        name.clone(),
                        "--coordinator".into(),
                        coordinator.endpoint(),
                        "--termination-deadline-ms".into(),
                        options.termination_deadline_ms.to_string(),
                        "--termination-backoff-max-ms".into(),
                        "1000".into(),
                    ],
                    "127.0.0.1:0",
                    &[],
                    dir.path().join(format!("{name}.log")),
                )
            })
            .collect();
        Self {
            dir,
            coordinator,
            participants,
        }
    }

    /// Every process's log, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut out = format!("--- coordinator ---\n{}", self.coordinator.logs());
        for (i, p) in self.participants.iter().enumerate() {
            out.push_str(&format!("\n--- p{} ---\n{}", i + 1, p.logs()));
        }
        out
    }

    /// Waits until the coordinator's registry knows every participant.
    pub async fn wait_registered(&self) {
        let want = self.participants.len();
        let ok = eventually(Duration::from_secs(20), || async {
            let Ok(mut admin) = admin(&self.coordinator.endpoint()).await else {
                return false;
            };
            admin
                .list_participants(v1::ListParticipantsRequest {})
                .await
                .is_ok_and(|r| r.into_inner().participants.len() >= want)
        })
        .await;
        assert!(ok, "participants did not register\n{}", self.logs());
    }
}

async fn channel(endpoint: &str) -> Result<Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .expect("a valid endpoint")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15))
        .connect()
        .await
}

pub async fn coordinator(
    endpoint: &str,
) -> Result<CoordinatorClient<Channel>, tonic::transport::Error> {
    Ok(CoordinatorClient::new(channel(endpoint).await?))
}

pub async fn admin(endpoint: &str) -> Result<AdminClient<Channel>, tonic::transport::Error> {
    Ok(AdminClient::new(channel(endpoint).await?))
}

pub async fn participant(
    endpoint: &str,
) -> Result<ParticipantClient<Channel>, tonic::transport::Error> {
    Ok(ParticipantClient::new(channel(endpoint).await?))
}

pub async fn kv(endpoint: &str) -> Result<KvClient<Channel>, tonic::transport::Error> {
    Ok(KvClient::new(channel(endpoint).await?))
}

/// Polls `check` every 50 ms until it holds or `bound` passes. For liveness bounds only:
/// tests never assert on timing.
pub async fn eventually<F, Fut>(bound: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn put(key: &str, value: &str) -> v1::KvOp {
    v1::KvOp {
        op: Some(v1::kv_op::Op::Put(v1::Put {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
        })),
    }
}

pub fn add(key: &str, delta: i64, min: Option<i64>) -> v1::KvOp {
    v1::KvOp {
        op: Some(v1::kv_op::Op::Add(v1::Add {
            key: key.as_bytes().to_vec().into(),
            delta,
            min,
        })),
    }
}

pub fn payload(ops: Vec<v1::KvOp>) -> bytes::Bytes {
    use prost::Message;
    v1::KvOps { ops }.encode_to_vec().into()
}

/// A key's committed value as text, and its version.
pub async fn get(endpoint: &str, key: &str) -> (Option<String>, u64) {
    let mut client = kv(endpoint).await.expect("connecting to the participant");
    let r = client
        .get(v1::GetRequest {
            key: key.as_bytes().to_vec().into(),
        })
        .await
        .expect("Get")
        .into_inner();
    (
        r.found
            .then(|| String::from_utf8_lossy(&r.value).into_owned()),
        r.version,
    )
}

/// Prepared branches on a participant.
pub async fn in_doubt(endpoint: &str) -> Option<Vec<TxnId>> {
    let mut client = participant(endpoint).await.ok()?;
    let r = client
        .list_in_doubt(v1::ListInDoubtRequest { limit: 0 })
        .await
        .ok()?
        .into_inner();
    Some(
        r.branches
            .iter()
            .filter_map(|b| TxnId::try_from(&b.txn_id).ok())
            .collect(),
    )
}

/// Transactions the coordinator holds as in doubt.
pub async fn coordinator_in_doubt(endpoint: &str) -> Option<Vec<v1::TxnSummary>> {
    let mut client = admin(endpoint).await.ok()?;
    let r = client
        .list_transactions(v1::ListTransactionsRequest {
            in_doubt_only: true,
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    Some(r.transactions)
}

/// Stages operations under a transaction id on a participant (which enlists it).
pub async fn stage(endpoint: &str, txn: &[u8], ops: Vec<v1::KvOp>) -> Result<u32, tonic::Status> {
    let mut client = kv(endpoint)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    client
        .stage(v1::StageRequest {
            txn_id: txn.to_vec().into(),
            ops,
        })
        .await
        .map(|r| r.into_inner().staged)
}
