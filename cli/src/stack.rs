//! A local stack: a coordinator and sled participants as child processes of `ratify`
//! itself (hidden `coordinator` and `participant` subcommands), on loopback ports, with
//! their data and logs under one directory. Used by `ratify dev` and `ratify demo`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ratify_proto::v1;

use crate::client;
use crate::proc::Proc;

#[derive(Debug, Clone)]
pub struct StackConfig {
    /// The `ratify` binary to spawn (default: this executable).
    pub exe: Option<PathBuf>,
    pub dir: PathBuf,
    pub participants: usize,
    /// Ports to try first (a rerun of `ratify dev` keeps its addresses); 0 = any free port.
    pub coordinator_port: u16,
    pub participant_ports: Vec<u16>,
    pub prepare_timeout_ms: u64,
    pub termination_deadline_ms: u64,
    /// Per participant (index): `--store` (None: sled in the stack's directory).
    pub stores: Vec<Option<String>>,
    /// Extra environment per participant (index), e.g. FAILPOINTS in tests.
    pub participant_env: Vec<(usize, String, String)>,
    /// `--worker-threads` of every process (None: [`shared_machine_worker_threads`]).
    pub worker_threads: Option<usize>,
}

#[derive(Debug)]
pub struct LocalStack {
    pub dir: PathBuf,
    pub coordinator: Proc,
    pub participants: Vec<Proc>,
    pub names: Vec<String>,
}

fn free(port: u16) -> bool {
    port != 0 && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn listen_on(port: u16) -> String {
    format!("127.0.0.1:{}", if free(port) { port } else { 0 })
}

/// Async worker threads for each of `processes` server processes sharing this machine:
/// its cores divided among them, at least one each.
///
/// A daemon alone on its machine takes one worker per core (its default). A local stack
/// puts the coordinator and every participant on the same cores, where that default
/// would run several times more workers than cores: each process's workers then wake one
/// another for every message (a parked worker is woken whenever a second task becomes
/// ready) and take turns on the same cores. Measured with `ratify bench` on 2 cores and
/// 3 processes, alternating run by run: one worker each against two each gave a 1-client
/// p50 of 0.66 against 0.72 ms, and 14,500 against 13,400 committed/s at 64 clients.
pub fn shared_machine_worker_threads(processes: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (cores / processes.max(1)).max(1)
}

/// The daemons' `--worker-threads` flag for `worker_threads` (none for the default).
pub fn worker_threads_args(worker_threads: Option<usize>) -> Vec<String> {
    match worker_threads {
        Some(n) => vec!["--worker-threads".into(), n.to_string()],
        None => Vec::new(),
    }
}

pub fn participant_name(index: usize) -> String {
    format!("p{}", index + 1)
}

impl LocalStack {
    pub fn start(config: &StackConfig) -> Result<Self, String> {
        let exe = match &config.exe {
            Some(exe) => exe.clone(),
            None => {
                std::env::current_exe().map_err(|e| format!("locating the ratify binary: {e}"))?
            }
        };
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| format!("creating {}: {e}", config.dir.display()))?;
        let worker_threads = Some(
            config
                .worker_threads
                .unwrap_or_else(|| shared_machine_worker_threads(config.participants + 1)),
        );
        let coordinator = Proc::try_start(
            "coordinator",
            exe.clone(),
            vec![
                "coordinator".into(),
                "--data-dir".into(),
                config.dir.join("coordinator").display().to_string(),
                "--prepare-timeout-ms".into(),
                config.prepare_timeout_ms.to_string(),
                "--retry-initial-ms".into(),
                "50".into(),
                "--retry-max-ms".into(),
                "1000".into(),
            ]
            .into_iter()
            .chain(worker_threads_args(worker_threads))
            .collect(),
            &listen_on(config.coordinator_port),
            &[],
            config.dir.join("coordinator.log"),
        )?;
        let mut participants = Vec::new();
        let mut names = Vec::new();
        for i in 0..config.participants {
            let name = participant_name(i);
            let env: Vec<(&str, &str)> = config
                .participant_env
                .iter()
                .filter(|(index, _, _)| *index == i)
                .map(|(_, k, v)| (k.as_str(), v.as_str()))
                .collect();
            let store: Vec<String> = match config.stores.get(i) {
                Some(Some(store)) => vec!["--store".into(), store.clone()],
                _ => Vec::new(),
            };
            participants.push(Proc::try_start(
                &name,
                exe.clone(),
                [
                    "participant".into(),
                    "--data-dir".into(),
                    config.dir.join(&name).display().to_string(),
                    "--name".into(),
                    name.clone(),
                    "--coordinator".into(),
                    coordinator.endpoint(),
                    "--termination-deadline-ms".into(),
                    config.termination_deadline_ms.to_string(),
                    "--termination-backoff-max-ms".into(),
                    "2000".into(),
                ]
                .into_iter()
                .chain(store)
                .chain(worker_threads_args(worker_threads))
                .collect(),
                &listen_on(config.participant_ports.get(i).copied().unwrap_or(0)),
                &env,
                config.dir.join(format!("{name}.log")),
            )?);
            names.push(name);
        }
        Ok(Self {
            dir: config.dir.clone(),
            coordinator,
            participants,
            names,
        })
    }

    /// Waits until the coordinator's registry lists every participant.
    pub async fn wait_registered(&self, bound: Duration) -> Result<(), String> {
        let deadline = Instant::now() + bound;
        loop {
            if let Ok(mut admin) = client::admin(&self.coordinator.endpoint()).await
                && let Ok(r) = admin
                    .list_participants(v1::ListParticipantsRequest {})
                    .await
            {
                let listed = r.into_inner().participants;
                if self
                    .names
                    .iter()
                    .all(|n| listed.iter().any(|p| &p.name == n))
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err("the participants did not register with the coordinator".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.participants.iter().map(Proc::endpoint).collect()
    }

    /// Stops every process with SIGTERM (participants first).
    pub fn stop(&mut self) -> bool {
        let mut clean = true;
        for p in &mut self.participants {
            clean &= p.terminate().is_some_and(|s| s.success());
        }
        clean &= self.coordinator.terminate().is_some_and(|s| s.success());
        clean
    }

    pub fn log_paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.dir.join("coordinator.log")];
        paths.extend(self.names.iter().map(|n| self.dir.join(format!("{n}.log"))));
        paths
    }
}

/// Ports from an earlier `ratify dev` run in `dir`.
pub fn remembered_ports(dir: &Path) -> (u16, Vec<u16>) {
    let text = std::fs::read_to_string(dir.join("ports")).unwrap_or_default();
    let ports: Vec<u16> = text
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    match ports.split_first() {
        Some((c, rest)) => (*c, rest.to_vec()),
        None => (7400, (7401..7420).collect()),
    }
}

pub fn remember_ports(dir: &Path, stack: &LocalStack) {
    let mut text = stack.coordinator.addr.port().to_string();
    for p in &stack.participants {
        text.push(' ');
        text.push_str(&p.addr.port().to_string());
    }
    let _ = std::fs::write(dir.join("ports"), text + "\n");
}
