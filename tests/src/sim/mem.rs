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
    /// Forced appends made, and the records they carried (over every incarnation).
    forced_appends: AtomicU64,
    forced_records: AtomicU64,
}

impl LogDisk {
    pub fn records(&self) -> Vec<LogRecord> {
        lock(&self.records).clone()
    }

    /// (forced appends, records they carried).
    pub fn forced(&self) -> (u64, u64) {
        (
            self.forced_appends.load(Ordering::SeqCst),
            self.forced_records.load(Ordering::SeqCst),
        )
    }
}

/// A [`DecisionLog`] on a [`LogDisk`], shaped like the WAL: every append, forced or
/// not, goes into one ordered queue; a group commit (after a simulated fsync delay)
/// moves everything queued so far to the disk in order. A forced append returns once its
/// records are on the disk; unforced ones are taken along by the next group commit or
/// by the background writer. A crash loses the queue, as it loses a WAL's unsynced tail.
#[derive(Debug)]
pub struct MemLog {
    inner: Arc<LogInner>,
    epoch: u64,
    recovered: Mutex<Option<Vec<LogRecord>>>,
}

#[derive(Debug)]
struct LogInner {
    disk: Arc<LogDisk>,
    fsync: Duration,
    /// (records queued so far, the queue)
    queue: Mutex<(u64, Vec<LogRecord>)>,
    durable: AtomicU64,
    /// Wakes the background writer when unforced records wait.
    unforced: tokio::sync::Notify,
}

impl LogInner {
    /// One group commit: everything queued so far reaches the disk, in order.
    fn sync(&self) {
        let mut queue = lock(&self.queue);
        let batch = std::mem::take(&mut queue.1);
        lock(&self.disk.records).extend(batch);
        self.durable.store(queue.0, Ordering::SeqCst);
    }

    fn enqueue(&self, records: Vec<LogRecord>) -> u64 {
        let mut queue = lock(&self.queue);
        queue.0 += records.len() as u64;
        queue.1.extend(records);
        queue.0
    }
}

impl MemLog {
    /// Opens the log: raises the epoch durably and reads back every record. Call inside
    /// the host's runtime (it starts the background writer).
    pub fn open(disk: Arc<LogDisk>, fsync: Duration) -> Self {
        let epoch = disk.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let recovered = disk.records();
        let inner = Arc::new(LogInner {
            disk,
            fsync,
            queue: Mutex::new((0, Vec::new())),
            durable: AtomicU64::new(0),
            unforced: tokio::sync::Notify::new(),
        });
        let writer = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = writer.upgrade() else {
                    return;
                };
                inner.unforced.notified().await;
                tokio::time::sleep(inner.fsync).await;
                inner.sync();
            }
        });
        Self {
            inner,
            epoch,
            recovered: Mutex::new(Some(recovered)),
        }
    }
}

impl DecisionLog for MemLog {
    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn append(
        &self,
        records: Vec<LogRecord>,
    ) -> impl std::future::Future<Output = Result<(), LogError>> + Send + use<> {
        let disk = &self.inner.disk;
        disk.forced_appends.fetch_add(1, Ordering::SeqCst);
        disk.forced_records
            .fetch_add(records.len() as u64, Ordering::SeqCst);
        // Queued at the call, as the trait asks.
        let upto = self.inner.enqueue(records);
        let inner = self.inner.clone();
        async move {
            while inner.durable.load(Ordering::SeqCst) < upto {
                tokio::time::sleep(inner.fsync).await;
                inner.sync();
            }
            Ok(())
        }
    }

    fn append_unforced(&self, records: Vec<LogRecord>) -> Result<(), LogError> {
        self.inner.enqueue(records);
        self.inner.unforced.notify_one();
        Ok(())
    }

    fn take_recovered(&self) -> Vec<LogRecord> {
        lock(&self.recovered).take().unwrap_or_default()
    }

    fn stats(&self) -> LogStats {
        LogStats {
            records: lock(&self.inner.queue).0,
            ..LogStats::default()
        }
    }
}

#[derive(Debug, Clone)]
struct PreparedEntry {
    meta: BranchMeta,
    prepared_at_unix_ms: u64,
    writes: Writes,
    /// Every key the branch's operations touch (Checks too), as the sled store locks.
    locks: Vec<Vec<u8>>,
}

/// A participant's disk: committed values with versions, prepared branches with their
/// writes (whose keys are the branch's locks), and tombstones.
#[derive(Debug, Default)]
pub struct StoreDisk {
    /// What a flush made durable.
    state: Mutex<StoreState>,
    /// A deliberately broken store, to show the checker catches it: prepared branches
    /// are not durable (lost when the host restarts), like a store that votes YES
    /// before flushing.
    pub volatile_prepare: bool,
}

#[derive(Debug, Default, Clone)]
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
    fn evaluate(&self, txn_id: TxnId, payload: &[u8]) -> Result<(Writes, Vec<Vec<u8>>), Rejection> {
        let ops = v1::KvOps::decode(payload)
            .map_err(|e| Rejection(format!("malformed payload: {e}")))?
            .ops;
        let keys: Vec<Vec<u8>> = ops
            .iter()
            .filter_map(|o| o.op.as_ref())
            .map(|op| key_of(op).to_vec())
            .collect();
        for key in &keys {
            if let Some((other, _)) = self
                .prepared
                .iter()
                .find(|(t, e)| **t != txn_id && e.locks.contains(key))
            {
                return Err(Rejection(format!("key locked by {other}")));
            }
        }
        let writes = evaluate(&ops, |key| match self.data.get(key) {
            Some((version, value)) => Versioned {
                version: *version,
                value: Some(value.clone()),
            },
            None => Versioned::default(),
        })?;
        Ok((writes, keys))
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

/// A [`ResourceManager`] over a [`StoreDisk`], with the sled store's flush discipline:
/// operations change the live state; a YES vote, a commit and a one-phase commit flush
/// (the live state becomes the disk's) before they return; NO votes, aborts and
/// forgotten tombstones wait for the next flush or the background flush (every 500 ms,
/// like sled's), so a crash can lose them, as it can lose them from sled.
#[derive(Debug)]
pub struct MemStore {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    disk: Arc<StoreDisk>,
    live: Mutex<StoreState>,
}

impl StoreInner {
    fn flush(&self, live: &StoreState) {
        *lock(&self.disk.state) = live.clone();
    }
}

impl MemStore {
    /// Opens the store on its disk (at every start of the host). Call inside the host's
    /// runtime (it starts the background flush).
    pub fn new(disk: Arc<StoreDisk>) -> Self {
        if disk.volatile_prepare {
            lock(&disk.state).prepared.clear();
        }
        let live = lock(&disk.state).clone();
        let inner = Arc::new(StoreInner {
            disk,
            live: Mutex::new(live),
        });
        let flusher = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                match flusher.upgrade() {
                    Some(inner) => {
                        let live = lock(&inner.live).clone();
                        inner.flush(&live);
                    }
                    None => return,
                }
            }
        });
        Self { inner }
    }

    fn live(&self) -> MutexGuard<'_, StoreState> {
        lock(&self.inner.live)
    }
}

impl ResourceManager for MemStore {
    async fn prepare(&self, meta: BranchMeta, payload: Bytes) -> Result<StoreVote, StoreError> {
        let mut state = self.live();
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
            Ok((writes, _)) if writes.is_empty() => {
                state.finish(meta.txn_id, FinishedAs::ReadOnly, Some(&meta));
                Ok(StoreVote::ReadOnly)
            }
            Ok((writes, locks)) => {
                state.prepared.insert(
                    meta.txn_id,
                    PreparedEntry {
                        meta,
                        prepared_at_unix_ms: now_ms(),
                        writes,
                        locks,
                    },
                );
                // Durable before the YES leaves.
                self.inner.flush(&state);
                Ok(StoreVote::Yes)
            }
        }
    }

    async fn commit(&self, txn_id: TxnId) -> Result<(), StoreError> {
        let mut state = self.live();
        match state.prepared.remove(&txn_id) {
            Some(entry) => {
                state.apply(&entry.writes);
                state.finish(txn_id, FinishedAs::Committed, Some(&entry.meta));
                self.inner.flush(&state);
                Ok(())
            }
            None => match state.tombstones.get(&txn_id).map(|t| t.finished_as) {
                Some(FinishedAs::Committed | FinishedAs::ReadOnly) => Ok(()),
                _ => Err(StoreError::Refused(format!("{txn_id} is not prepared"))),
            },
        }
    }

    async fn abort(&self, txn_id: TxnId) -> Result<(), StoreError> {
        let mut state = self.live();
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
        let mut state = self.live();
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
            Ok((writes, _)) => {
                state.apply(&writes);
                state.finish(meta.txn_id, FinishedAs::Committed, Some(&meta));
                self.inner.flush(&state);
                Ok(OnePhaseOutcome::Committed)
            }
        }
    }

    async fn recover(&self) -> Result<Recovered, StoreError> {
        let state = self.live();
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
        let mut state = self.live();
        for txn_id in txn_ids {
            state.tombstones.remove(&txn_id);
        }
        Ok(())
    }
}
