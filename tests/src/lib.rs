//! A harness for multi-process tests: it starts the real `ratify-coordinator` and
//! `ratify-participant` binaries on port-0 loopback listeners in temporary directories,
//! can SIGKILL, SIGTERM and restart them, and always kills what it started (also when a
//! test panics).
//!
//! The binaries are the ones `cargo test --workspace` builds next to the test executables
//! (`target/<profile>/`); set `RATIFY_BIN_DIR` to use others. A program that hosts the
//! daemons itself (the `chaos` runner) passes its own executable instead.
//!
//! With [`StackOptions::network_faults`], every link between the coordinator and a
//! participant runs through a [`proxy::FaultProxy`] in each direction, which the test can
//! cut or delay ([`Link`]).

pub mod proxy;
pub mod sim;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ratify_cli::bank::{Bank, Report, Transfer};
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
    /// Per participant: `--store` (None: sled).
    pub stores: Vec<Option<String>>,
    /// Per participant index: extra environment (e.g. FAILPOINTS).
    pub participant_env: Vec<(usize, String, String)>,
    /// Route coordinator ↔ participant traffic through fault proxies. Needs a tokio
    /// runtime (the proxies run on it).
    pub network_faults: bool,
    /// Run the daemons as `<exe> coordinator …` / `<exe> participant …` instead of the
    /// separate binaries.
    pub self_exe: Option<PathBuf>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            participants: 2,
            coordinator_env: Vec::new(),
            coordinator_args: Vec::new(),
            termination_deadline_ms: 500,
            prepare_timeout_ms: 3_000,
            stores: Vec::new(),
            participant_env: Vec::new(),
            network_faults: false,
            self_exe: None,
        }
    }
}

/// The two directions of traffic between the coordinator and one participant.
#[derive(Debug)]
pub struct Link {
    /// Coordinator → participant (Prepare, Commit, Abort): the participant advertises
    /// this proxy's address.
    pub to_participant: proxy::FaultProxy,
    /// Participant → coordinator (Enlist, GetOutcome, Register).
    pub to_coordinator: proxy::FaultProxy,
}

impl Link {
    /// Cuts both directions: the participant and the coordinator cannot reach each other
    /// (clients still reach both).
    pub fn cut(&self) {
        self.to_participant.set_fault(proxy::LinkFault::Cut);
        self.to_coordinator.set_fault(proxy::LinkFault::Cut);
    }

    pub fn heal(&self) {
        self.to_participant.heal();
        self.to_coordinator.heal();
    }
}

/// A coordinator and its participants, each a real process, in one temporary directory.
#[derive(Debug)]
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub coordinator: Proc,
    pub participants: Vec<Proc>,
    /// Per participant, with [`StackOptions::network_faults`].
    pub links: Vec<Link>,
}

/// The program and leading arguments that run one daemon.
fn daemon_command(options: &StackOptions, daemon: &str) -> (PathBuf, Vec<String>) {
    match &options.self_exe {
        Some(exe) => (exe.clone(), vec![daemon.to_string()]),
        None => (binary(&format!("ratify-{daemon}")), Vec::new()),
    }
}

impl Stack {
    pub fn start(options: StackOptions) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let env: Vec<(&str, &str)> = options
            .coordinator_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (coordinator_exe, coordinator_prefix) = daemon_command(&options, "coordinator");
        let (participant_exe, participant_prefix) = daemon_command(&options, "participant");
        let coordinator = Proc::start(
            "coordinator",
            coordinator_exe,
            coordinator_prefix
                .into_iter()
                .chain([
                    "--data-dir".into(),
                    dir.path().join("coordinator").display().to_string(),
                    "--prepare-timeout-ms".into(),
                    options.prepare_timeout_ms.to_string(),
                    "--retry-initial-ms".into(),
                    "50".into(),
                    "--retry-max-ms".into(),
                    "500".into(),
                ])
                .chain(options.coordinator_args.iter().cloned())
                .collect(),
            "127.0.0.1:0",
            &env,
            dir.path().join("coordinator.log"),
        );
        let links: Vec<Link> = if options.network_faults {
            (0..options.participants)
                .map(|_| Link {
                    to_participant: proxy::FaultProxy::start(None).expect("a proxy"),
                    to_coordinator: proxy::FaultProxy::start(Some(coordinator.addr))
                        .expect("a proxy"),
                })
                .collect()
        } else {
            Vec::new()
        };
        let participants = (0..options.participants)
            .map(|i| {
                let name = format!("p{}", i + 1);
                let mut args: Vec<String> = participant_prefix.clone();
                args.extend([
                    "--data-dir".into(),
                    dir.path().join(&name).display().to_string(),
                    "--name".into(),
                    name.clone(),
                    "--coordinator".into(),
                    links
                        .get(i)
                        .map_or_else(|| coordinator.endpoint(), |l| l.to_coordinator.endpoint()),
                    "--termination-deadline-ms".into(),
                    options.termination_deadline_ms.to_string(),
                    "--termination-backoff-max-ms".into(),
                    "1000".into(),
                ]);
                if let Some(link) = links.get(i) {
                    args.extend(["--advertise".to_string(), link.to_participant.endpoint()]);
                }
                if let Some(Some(store)) = options.stores.get(i) {
                    args.extend(["--store".to_string(), store.clone()]);
                }
                let env: Vec<(&str, &str)> = options
                    .participant_env
                    .iter()
                    .filter(|(index, _, _)| *index == i)
                    .map(|(_, k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let proc = Proc::start(
                    &name,
                    participant_exe.clone(),
                    args,
                    "127.0.0.1:0",
                    &env,
                    dir.path().join(format!("{name}.log")),
                );
                if let Some(link) = links.get(i) {
                    link.to_participant.set_target(proc.addr);
                }
                proc
            })
            .collect();
        Self {
            dir,
            coordinator,
            participants,
            links,
        }
    }

    /// Heals every link and resumes every paused process.
    pub fn heal_all(&self) {
        for link in &self.links {
            link.heal();
        }
        self.coordinator.resume();
        for p in &self.participants {
            p.resume();
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

    /// Waits until nothing is in doubt on the coordinator or any participant (a liveness
    /// bound, not a timing assertion), and fails with every process's log otherwise.
    pub async fn settle(&self) {
        let c = self.coordinator.endpoint();
        let ok = eventually(Duration::from_secs(30), || async {
            if !coordinator_in_doubt(&c).await.is_some_and(|l| l.is_empty()) {
                return false;
            }
            for p in &self.participants {
                if !in_doubt(&p.endpoint()).await.is_some_and(|l| l.is_empty()) {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(ok, "in-doubt transactions did not drain\n{}", self.logs());
    }

    /// A bank over this stack's participants with its accounts opened; each client call
    /// gives up after 5 s (a paused or cut-off node).
    pub async fn open_bank(&self, accounts_per_participant: usize) -> std::sync::Arc<Bank> {
        let bank = Bank::new(
            self.coordinator.endpoint(),
            self.participants.iter().map(|p| p.endpoint()).collect(),
            accounts_per_participant,
        )
        .with_rpc_timeout(Duration::from_secs(5));
        bank.open().await.expect("opening the bank's accounts");
        std::sync::Arc::new(bank)
    }

    /// After the faults: lets the in-doubt lists drain (30 s), probes that every lock is
    /// free (30 s), checks the history, and fails with every violation (prefixed with
    /// `context`) and every process's log. Returns the report for further assertions.
    pub async fn check_bank(&self, bank: &Bank, transfers: &[Transfer], context: &str) -> Report {
        let left = bank.drain(Duration::from_secs(30), |_| {}).await;
        let locks = bank.locks_released(Duration::from_secs(30)).await;
        let report = bank.check(transfers, left, locks).await;
        assert!(
            report.passed(),
            "{context}: invariants broken:\n{}\n{}",
            report.failures().join("\n"),
            self.logs()
        );
        report
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

/// A Prepare batch of one branch of `txn` (epoch 1, incarnation 0) doing `ops`.
pub fn one_branch_batch(txn: TxnId, ops: Vec<v1::KvOp>) -> v1::PrepareRequest {
    v1::PrepareRequest {
        branches: vec![v1::PrepareBranch {
            txn_id: txn.to_vec().into(),
            epoch: 1,
            payload: payload(ops),
            incarnation: 0,
        }],
        ..Default::default()
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

/// A throwaway PostgreSQL server: initdb into a temporary directory, a free port,
/// `max_prepared_transactions` set, stopped on drop. The server refuses to run as root,
/// so as root it runs as the `postgres` system user.
#[derive(Debug)]
pub struct PgServer {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
}

fn pg_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    {
        return dir;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under /usr/lib/postgresql: \
             install them (apt-get install postgresql-15); .ci/run does"
        )
    })
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

impl PgServer {
    pub fn start() -> Self {
        let bin = pg_bin_dir();
        let dir = tempfile::tempdir().expect("a temp dir");
        if is_root() {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("running chown");
            assert!(
                status.success(),
                "chown of the PostgreSQL temp dir failed (is there a postgres user?)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let server = Self { dir, port, bin };
        let data = server.dir.path().join("data");
        server.run(
            "initdb",
            &[
                "-D",
                &data.display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        server.pg_ctl_start();
        server
    }

    fn run(&self, tool: &str, args: &[&str]) -> String {
        let program = self.bin.join(tool);
        let mut command = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            std::process::Command::new(&program)
        };
        let out = command.args(args).output().unwrap_or_else(|e| {
            panic!(
                "PostgreSQL could not be started: running {}: {e}",
                program.display()
            )
        });
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "PostgreSQL could not be started: {tool} failed: {text}\nserver log:\n{}",
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
        text
    }

    fn pg_ctl_start(&self) {
        let data = self.dir.path().join("data").display().to_string();
        let log = self.dir.path().join("log").display().to_string();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_prepared_transactions=64 -c fsync=on",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-w", "-t", "60", "start", "-o", &options,
            ],
        );
    }

    /// Stops the server (fast shutdown) and starts it again on the same data and port.
    pub fn restart(&self) {
        let data = self.dir.path().join("data").display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
        self.pg_ctl_start();
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connecting to the test PostgreSQL server");
        tokio::spawn(connection);
        client
    }

    /// Global ids in `pg_prepared_xacts`.
    pub async fn prepared(&self) -> Vec<String> {
        self.client()
            .await
            .query("SELECT gid FROM pg_prepared_xacts", &[])
            .await
            .expect("reading pg_prepared_xacts")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").display().to_string();
        let program = self.bin.join("pg_ctl");
        let mut command = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            std::process::Command::new(&program)
        };
        let _ = command
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}
