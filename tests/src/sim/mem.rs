//! In-memory durable storage for the simulation: a decision log and a key-value
//! resource manager whose "disk" lives outside the simulated host, so it survives the
//! host's crash and restart exactly as fsynced data would, while whatever the host held
//! only in memory (unforced log records, in-flight appends) is lost with it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use ratify_coordinator::log::{DecisionLog, LogError, LogRecord, LogStats};
use ratify_participant::kv::eval::{Rejection, Versioned, Writes, evaluate, key_of};
use ratify_participant::store::{
    BranchMeta, FinishedAs, OnePhaseOutcome, PreparedBranch, Recovered, ResourceManager,
    StoreError, StoreVote, Tombstone,
};
use ratify_proto::TxnId;
use ratify_proto::v1;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The coordinator's disk: the records made durable, and the epoch file.
#[derive(Debug, Default)]
pub struct LogDisk {
    records: Mutex<Vec<LogRecord>>,
    epoch: AtomicU64,
}

impl LogDisk {
    pub fn records(&self) -> Vec<LogRecord> {
        lock(&self.records).clone()
    }
}

/// A [`DecisionLog`] on a [`LogDisk`]. An append becomes durable after a simulated
/// fsync delay; records appended unforced stay in memory until the next forced append
/// takes them along, so a crash can lose them (as it can lose a real WAL's unsynced
/// tail).
#[derive(Debug)]
pub struct MemLog {
    disk: Arc<LogDisk>,
    epoch: u64,
    fsync: Duration,
    pending: Mutex<Vec<LogRecord>>,
    recovered: Mutex<Option<Vec<LogRecord>>>,
    appended: AtomicU64,
}

impl MemLog {
    /// Opens the log: raises the epoch durably and reads back every record.
    pub fn open(disk: Arc<LogDisk>, fsync: Duration) -> Self {
        let epoch = disk.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let recovered = disk.records();
        Self {
            disk,
            epoch,
            fsync,
            pending: Mutex::new(Vec::new()),
            recovered: Mutex::new(Some(recovered)),
            appended: AtomicU64::new(0),
        }
    }
}

impl DecisionLog for MemLog {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    async fn append(&self, records: Vec<LogRecord>) -> Result<(), LogError> {
        tokio::time::sleep(self.fsync).await;
        let mut batch = std::mem::take(&mut *lock(&self.pending));
        self.appended
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        batch.extend(records);
        lock(&self.disk.records).extend(batch);
        Ok(())
    }

    fn append_unforced(&self, records: Vec<LogRecord>) -> Result<(), LogError> {
        lock(&self.pending).extend(records);
        Ok(())
    }

    fn take_recovered(&self) -> Vec<LogRecord> {
        lock(&self.recovered).take().unwrap_or_default()
    }

    fn stats(&self) -> LogStats {
        LogStats {
            records: self.appended.load(Ordering::Relaxed),
            ..LogStats::default()
        }
    }
}

#[derive(Debug, Clone)]
struct PreparedEntry {
    meta: BranchMeta,
    prepared_at_unix_ms: u64,
    writes: Writes,
}

/// A participant's disk: committed values with versions, prepared branches with their
/// writes (whose keys are the branch's locks), and tombstones.
#[derive(Debug, Default)]
pub struct StoreDisk {
    state: Mutex<StoreState>,
    /// A deliberately broken store, to show the checker catches it: prepared branches
    /// are not durable (lost when the host restarts), like a store that votes YES
    /// before flushing.
    pub volatile_prepare: bool,
}

#[derive(Debug, Default)]
struct StoreState {
    data: BTreeMap<Vec<u8>, (u64, Vec<u8>)>,
    prepared: BTreeMap<TxnId, PreparedEntry>,
    tombstones: BTreeMap<TxnId, Tombstone>,
}

impl StoreDisk {
    /// A disk whose prepared branches are lost at every restart (see `volatile_prepare`).
    pub fn broken() -> Self {
        Self {
            volatile_prepare: true,
            ..Self::default()
        }
    }

    /// A key's committed value.
    pub fn get(&self, key: &str) -> Option<String> {
        lock(&self.state)
            .data
            .get(key.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// Branches still prepared.
    pub fn prepared(&self) -> Vec<TxnId> {
        lock(&self.state).prepared.keys().copied().collect()
    }
}

fn now_ms() -> u64 {
    turmoil::since_epoch()
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl StoreState {
    /// Evaluates a branch against committed values and the locks of prepared branches.
    fn evaluate(&self, txn_id: TxnId, payload: &[u8]) -> Result<Writes, Rejection> {
        let ops = v1::KvOps::decode(payload)
            .map_err(|e| Rejection(format!("malformed payload: {e}")))?
            .ops;
        for op in ops.iter().filter_map(|o| o.op.as_ref()) {
            let key = key_of(op);
            if let Some((other, _)) = self
                .prepared
                .iter()
                .find(|(t, e)| **t != txn_id && e.writes.contains_key(key))
            {
                return Err(Rejection(format!("key locked by {other}")));
            }
        }
        evaluate(&ops, |key| match self.data.get(key) {
            Some((version, value)) => Versioned {
                version: *version,
                value: Some(value.clone()),
            },
            None => Versioned::default(),
        })
    }

    fn apply(&mut self, writes: &Writes) {
        for (key, value) in writes {
            match value {
                Some(value) => {
                    let version = self.data.get(key).map_or(0, |(v, _)| *v) + 1;
                    self.data.insert(key.clone(), (version, value.clone()));
                }
                None => {
                    self.data.remove(key);
                }
            }
        }
    }

    fn finish(&mut self, txn_id: TxnId, finished_as: FinishedAs, meta: Option<&BranchMeta>) {
        self.tombstones.insert(
            txn_id,
            Tombstone {
                txn_id,
                finished_as,
                digest: meta.map(|m| m.digest),
                finished_at_unix_ms: now_ms(),
            },
        );
    }
}

/// A [`ResourceManager`] over a [`StoreDisk`]; every write is durable when it returns
/// (as the sled store's are after its flush).
#[derive(Debug)]
pub struct MemStore {
    disk: Arc<StoreDisk>,
}

impl MemStore {
    /// Opens the store on its disk (at every start of the host).
    pub fn new(disk: Arc<StoreDisk>) -> Self {
        if disk.volatile_prepare {
            lock(&disk.state).prepared.clear();
        }
        Self { disk }
    }
}

impl ResourceManager for MemStore {
    async fn prepare(&self, meta: BranchMeta, payload: Bytes) -> Result<StoreVote, StoreError> {
        let mut state = lock(&self.disk.state);
        if let Some(entry) = state.prepared.get(&meta.txn_id) {
            return Ok(if entry.meta.digest == meta.digest {
                StoreVote::Yes
            } else {
                StoreVote::No {
                    reason: "prepared before with another payload".into(),
                }
            });
        }
        match state.evaluate(meta.txn_id, &payload) {
            Err(Rejection(reason)) => {
                state.finish(meta.txn_id, FinishedAs::Aborted, Some(&meta));
                Ok(StoreVote::No { reason })
            }
            Ok(writes) if writes.is_empty() => {
                state.finish(meta.txn_id, FinishedAs::ReadOnly, Some(&meta));
                Ok(StoreVote::ReadOnly)
            }
            Ok(writes) => {
                state.prepared.insert(
                    meta.txn_id,
                    PreparedEntry {
                        meta,
                        prepared_at_unix_ms: now_ms(),
                        writes,
                    },
                );
                Ok(StoreVote::Yes)
            }
        }
    }

    async fn commit(&self, txn_id: TxnId) -> Result<(), StoreError> {
        let mut state = lock(&self.disk.state);
        match state.prepared.remove(&txn_id) {
            Some(entry) => {
                state.apply(&entry.writes);
                state.finish(txn_id, FinishedAs::Committed, Some(&entry.meta));
                Ok(())
            }
            None => match state.tombstones.get(&txn_id).map(|t| t.finished_as) {
                Some(FinishedAs::Committed | FinishedAs::ReadOnly) => Ok(()),
                _ => Err(StoreError::Refused(format!("{txn_id} is not prepared"))),
            },
        }
    }

    async fn abort(&self, txn_id: TxnId) -> Result<(), StoreError> {
        let mut state = lock(&self.disk.state);
        if state
            .tombstones
            .get(&txn_id)
            .is_some_and(|t| t.finished_as == FinishedAs::Committed)
        {
            return Err(StoreError::Refused(format!("{txn_id} committed")));
        }
        let entry = state.prepared.remove(&txn_id);
        state.finish(txn_id, FinishedAs::Aborted, entry.as_ref().map(|e| &e.meta));
        Ok(())
    }

    async fn commit_one_phase(
        &self,
        meta: BranchMeta,
        payload: Bytes,
    ) -> Result<OnePhaseOutcome, StoreError> {
        let mut state = lock(&self.disk.state);
        if let Some(t) = state.tombstones.get(&meta.txn_id) {
            return Ok(match t.finished_as {
                FinishedAs::Committed | FinishedAs::ReadOnly => OnePhaseOutcome::Committed,
                FinishedAs::Aborted => OnePhaseOutcome::Aborted {
                    reason: "aborted before".into(),
                },
            });
        }
        match state.evaluate(meta.txn_id, &payload) {
            Err(Rejection(reason)) => {
                state.finish(meta.txn_id, FinishedAs::Aborted, Some(&meta));
                Ok(OnePhaseOutcome::Aborted { reason })
            }
            Ok(writes) => {
                state.apply(&writes);
                state.finish(meta.txn_id, FinishedAs::Committed, Some(&meta));
                Ok(OnePhaseOutcome::Committed)
            }
        }
    }

    async fn recover(&self) -> Result<Recovered, StoreError> {
        let state = lock(&self.disk.state);
        Ok(Recovered {
            prepared: state
                .prepared
                .values()
                .map(|e| PreparedBranch {
                    meta: e.meta,
                    prepared_at_unix_ms: e.prepared_at_unix_ms,
                })
                .collect(),
            tombstones: state.tombstones.values().copied().collect(),
        })
    }

    async fn forget(&self, txn_ids: Vec<TxnId>) -> Result<(), StoreError> {
        let mut state = lock(&self.disk.state);
        for txn_id in txn_ids {
            state.tombstones.remove(&txn_id);
        }
        Ok(())
    }
}
