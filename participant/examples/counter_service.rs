//! Embedding the participant crate in your own data service: a counter kept in a file,
//! whose prepare payload is a decimal delta. It implements `ResourceManager` (with the
//! durability each method promises) and serves the Participant service with the
//! runtime that every store gets: tombstones, epochs, recovery, termination.
//!
//! `cargo run -p ratify-participant --example counter_service -- DIR [COORDINATOR_URL]`

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ratify_participant::runtime::{Runtime, RuntimeConfig};
use ratify_participant::service::ParticipantService;
use ratify_participant::store::{
    BranchMeta, FinishedAs, OnePhaseOutcome, PayloadDigest, PreparedBranch, Recovered,
    ResourceManager, StoreError, StoreVote, Tombstone,
};
use ratify_proto::TxnId;
use ratify_proto::v1::participant_server::ParticipantServer;

/// A counter that never goes below zero. One branch may be prepared at a time (it locks
/// the whole counter).
#[derive(Debug)]
struct Counter {
    dir: PathBuf,
    /// The prepared branch holding the lock, if any.
    lock: Mutex<Option<TxnId>>,
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

/// Writes a file so that it is either wholly there or not at all, and durable on return.
fn write_durably(path: &Path, text: &str) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    fs::File::open(path.parent().expect("a directory"))
        .and_then(|d| d.sync_all())
        .map_err(io)
}

impl Counter {
    fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir.join("prepared")).map_err(io)?;
        fs::create_dir_all(dir.join("done")).map_err(io)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            lock: Mutex::new(None),
        })
    }

    /// The value and the last transaction applied to it (which makes commit idempotent).
    fn value(&self) -> Result<(i64, Option<TxnId>), StoreError> {
        match fs::read_to_string(self.dir.join("value")) {
            Ok(text) => {
                let mut parts = text.split_whitespace();
                let value = parts.next().and_then(|v| v.parse().ok());
                let last = parts.next().and_then(|t| t.parse().ok());
                value
                    .map(|v| (v, last))
                    .ok_or_else(|| StoreError::Io("corrupt value file".into()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((0, None)),
            Err(e) => Err(io(e)),
        }
    }

    fn prepared_path(&self, txn: &TxnId) -> PathBuf {
        self.dir.join("prepared").join(txn.to_string())
    }

    fn tombstone(&self, txn: &TxnId, finished: &str, digest: u64) -> Result<(), StoreError> {
        write_durably(
            &self.dir.join("done").join(txn.to_string()),
            &format!("{finished} {digest}"),
        )
    }

    fn delta(payload: &[u8]) -> Option<i64> {
        std::str::from_utf8(payload).ok()?.trim().parse().ok()
    }
}

impl ResourceManager for Counter {
    async fn prepare(&self, meta: BranchMeta, payload: Bytes) -> Result<StoreVote, StoreError> {
        let Some(delta) = Self::delta(&payload) else {
            return Ok(StoreVote::No {
                reason: "payload is not a decimal delta".into(),
            });
        };
        let mut lock = self.lock.lock().expect("lock");
        if lock.is_some() {
            return Ok(StoreVote::No {
                reason: "another branch holds the counter".into(),
            });
        }
        if self.value()?.0 + delta < 0 {
            return Ok(StoreVote::No {
                reason: "the counter would go below zero".into(),
            });
        }
        // Durable before YES: the delta, epoch and digest, so recover() can return it.
        write_durably(
            &self.prepared_path(&meta.txn_id),
            &format!("{delta} {} {}", meta.epoch, meta.digest.0),
        )?;
        *lock = Some(meta.txn_id);
        Ok(StoreVote::Yes)
    }

    async fn commit(&self, txn: TxnId) -> Result<(), StoreError> {
        let text = fs::read_to_string(self.prepared_path(&txn)).map_err(io)?;
        let mut parts = text.split_whitespace();
        let delta: i64 = parts
            .next()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| StoreError::Io("corrupt branch".into()))?;
        let digest: u64 = parts.nth(1).and_then(|d| d.parse().ok()).unwrap_or(0);
        // The value first (marked with this transaction, so a repeat after a crash does
        // not apply it twice), then the tombstone, then drop the prepared file.
        let (value, last) = self.value()?;
        if last != Some(txn) {
            write_durably(&self.dir.join("value"), &format!("{} {txn}", value + delta))?;
        }
        self.tombstone(&txn, "committed", digest)?;
        fs::remove_file(self.prepared_path(&txn)).map_err(io)?;
        *self.lock.lock().expect("lock") = None;
        Ok(())
    }

    async fn abort(&self, txn: TxnId) -> Result<(), StoreError> {
        self.tombstone(&txn, "aborted", 0)?;
        match fs::remove_file(self.prepared_path(&txn)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let mut lock = self.lock.lock().expect("lock");
        if *lock == Some(txn) {
            *lock = None;
        }
        Ok(())
    }

    async fn commit_one_phase(
        &self,
        meta: BranchMeta,
        payload: Bytes,
    ) -> Result<OnePhaseOutcome, StoreError> {
        match self.prepare(meta, payload).await? {
            StoreVote::Yes => self
                .commit(meta.txn_id)
                .await
                .map(|()| OnePhaseOutcome::Committed),
            StoreVote::No { reason } => Ok(OnePhaseOutcome::Aborted { reason }),
            StoreVote::ReadOnly => Ok(OnePhaseOutcome::Committed),
        }
    }

    async fn recover(&self) -> Result<Recovered, StoreError> {
        let mut recovered = Recovered::default();
        for entry in fs::read_dir(self.dir.join("done")).map_err(io)? {
            let entry = entry.map_err(io)?;
            let Ok(txn) = entry.file_name().to_string_lossy().parse::<TxnId>() else {
                continue;
            };
            let text = fs::read_to_string(entry.path()).map_err(io)?;
            let mut parts = text.split_whitespace();
            let finished_as = if parts.next() == Some("committed") {
                FinishedAs::Committed
            } else {
                FinishedAs::Aborted
            };
            let digest = parts.next().and_then(|d| d.parse().ok()).map(PayloadDigest);
            recovered.tombstones.push(Tombstone {
                txn_id: txn,
                finished_as,
                digest,
                finished_at_unix_ms: 0,
            });
        }
        for entry in fs::read_dir(self.dir.join("prepared")).map_err(io)? {
            let entry = entry.map_err(io)?;
            let Ok(txn) = entry.file_name().to_string_lossy().parse::<TxnId>() else {
                continue;
            };
            if self.value()?.1 == Some(txn) {
                // Crashed inside commit after applying: finish it (idempotent).
                *self.lock.lock().expect("lock") = Some(txn);
                self.commit(txn).await?;
                recovered.tombstones.retain(|t| t.txn_id != txn);
                recovered.tombstones.push(Tombstone {
                    txn_id: txn,
                    finished_as: FinishedAs::Committed,
                    digest: None,
                    finished_at_unix_ms: 0,
                });
                continue;
            }
            let text = fs::read_to_string(entry.path()).map_err(io)?;
            let fields: Vec<u64> = text
                .split_whitespace()
                .skip(1)
                .filter_map(|f| f.parse().ok())
                .collect();
            *self.lock.lock().expect("lock") = Some(txn);
            recovered.prepared.push(PreparedBranch {
                meta: BranchMeta {
                    txn_id: txn,
                    epoch: fields.first().copied().unwrap_or(0),
                    digest: PayloadDigest(fields.get(1).copied().unwrap_or(0)),
                    incarnation: 0,
                },
                prepared_at_unix_ms: 0,
            });
        }
        Ok(recovered)
    }

    async fn forget(&self, txns: Vec<TxnId>) -> Result<(), StoreError> {
        for txn in txns {
            let _ = fs::remove_file(self.dir.join("done").join(txn.to_string()));
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "counter-data".into()));
    let config = RuntimeConfig {
        name: "counter".into(),
        coordinator: args.next(),
        ..RuntimeConfig::default()
    };
    let runtime = Runtime::recover(Arc::new(Counter::open(&dir)?), config).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(runtime.clone().run_background(stopped));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!(
        "counter participant listening on {}",
        listener.local_addr()?
    );
    let service = ParticipantService::new(runtime);
    let streams = service.clone();
    tonic::transport::Server::builder()
        .add_service(ParticipantServer::new(service))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = tokio::signal::ctrl_c().await;
                // The coordinator keeps a Prepare stream open; end it, or the graceful
                // shutdown waits for it.
                streams.close_streams();
            },
        )
        .await?;
    let _ = stop.send(true);
    Ok(())
}
