//! The built-in store: a transactional key-value store over sled.
//!
//! Layout: one sled Db with two trees, and a journal beside it.
//! - `data`: key -> [`StoredValue`] (version + value; a delete keeps the version).
//! - `finished`: txn id -> [`TombstoneRecord`].
//! - the journal (`<data-dir>/journal/`, see [`journal`]): each prepared branch
//!   ([`PreparedRecord`]: its evaluated writes, its lock set and its metadata) and each
//!   decision carried out. Prepared branches otherwise live in memory.
//!
//! sled is never flushed on the hot path (a sled flush seals an I/O buffer and hands it
//! to sled's thread pool, which costs more than the fdatasync itself). Durability comes
//! from the journal instead: a YES waits for its Prepared record, a commit acknowledgement
//! for its Committed record, each group-committed with fdatasync. A commit writes each
//! value and the tombstone to sled first and then journals the decision, so everything a
//! journal record stands for is in sled by the time the record is queued. Each write
//! carries the version it installs, fixed at prepare while the branch holds the key's
//! lock, so replaying a commit over a sled that already has it (or newer values) changes
//! nothing. A checkpoint (every [`CHECKPOINT_INTERVAL`] with new writes) starts a new
//! journal segment with a snapshot of the prepared branches, flushes sled, and removes
//! the older segments. Recovery replays the journal over sled and checkpoints.
//!
//! A one-phase commit has no prepared record to fall back on, so it stays one sled
//! transaction followed by a sled flush.
//!
//! Operations are staged in memory under a transaction id (through the Kv service) and
//! evaluated at prepare under key locks against committed values. Readers only ever read
//! `data`, so a prepared-but-undecided value is never visible.

pub mod eval;
mod flusher;
mod journal;
pub mod service;
pub mod staging;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use ratify_proto::TxnId;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

pub use self::eval::Versioned;
use self::eval::{Rejection, show_key};
use self::flusher::Flusher;
pub use self::journal::FlushStats;
use self::journal::{Entry, Force, Journal};
pub use self::staging::{KvLimits, Staging};
use crate::runtime::unix_ms;
use crate::store::{
    BranchMeta, FinishedAs, OnePhaseOutcome, PayloadDigest, PreparedBranch, Recovered,
    ResourceManager, StoreError, StoreVote, Tombstone,
};

#[derive(Clone, PartialEq, prost::Message)]
struct StoredValue {
    #[prost(uint64, tag = "1")]
    version: u64,
    #[prost(bytes = "vec", optional, tag = "2")]
    value: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredWrite {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    /// Unset: delete.
    #[prost(bytes = "vec", optional, tag = "2")]
    value: Option<Vec<u8>>,
    /// The version this write installs: the key's committed version at prepare, plus
    /// one. 0 in records written before versions were recorded (then: current + 1).
    #[prost(uint64, tag = "3")]
    version: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PreparedRecord {
    #[prost(uint32, tag = "1")]
    format: u32,
    #[prost(uint64, tag = "2")]
    epoch: u64,
    #[prost(fixed64, tag = "3")]
    digest: u64,
    #[prost(uint64, tag = "4")]
    incarnation: u64,
    #[prost(uint64, tag = "5")]
    prepared_at_unix_ms: u64,
    #[prost(message, repeated, tag = "6")]
    writes: Vec<StoredWrite>,
    /// Every key the branch locks: its writes and its checks.
    #[prost(bytes = "vec", repeated, tag = "7")]
    lock_keys: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TombstoneRecord {
    /// 1 committed, 2 aborted, 3 read-only.
    #[prost(uint32, tag = "1")]
    finished_as: u32,
    #[prost(fixed64, optional, tag = "2")]
    digest: Option<u64>,
    #[prost(uint64, tag = "3")]
    finished_at_unix_ms: u64,
}

const RECORD_FORMAT: u32 = 1;

impl TombstoneRecord {
    fn new(finished_as: FinishedAs, digest: Option<PayloadDigest>) -> Self {
        Self {
            finished_as: match finished_as {
                FinishedAs::Committed => 1,
                FinishedAs::Aborted => 2,
                FinishedAs::ReadOnly => 3,
            },
            digest: digest.map(|d| d.0),
            finished_at_unix_ms: unix_ms(),
        }
    }
}

/// How often a checkpoint runs while new journal records arrive.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// What the checkpoint thread shares with the store.
#[derive(Debug)]
struct Durability {
    /// The prepared branches. Held while a Prepared or decision record is queued, so a
    /// checkpoint's snapshot and the journal's order agree.
    prepared: Mutex<HashMap<TxnId, PreparedRecord>>,
    journal: Journal,
    flusher: Flusher,
    /// sled was written without a journal record (a NO or read-only tombstone, a
    /// forgotten tombstone) since the last checkpoint: the next one flushes it.
    sled_dirty: AtomicBool,
    checkpointing: Mutex<()>,
}

/// The sled key-value store.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    data: sled::Tree,
    /// Prepared records of stores written before the journal existed: read (and then
    /// emptied) by recovery only.
    legacy_prepared: sled::Tree,
    finished: sled::Tree,
    locks: Mutex<HashMap<Vec<u8>, TxnId>>,
    staging: Staging,
    durability: Arc<Durability>,
    /// Journal records found at open, for `recover` to replay.
    replay: Mutex<Option<Vec<Entry>>>,
    checkpoints: Mutex<Option<Checkpoints>>,
}

/// The checkpoint thread; dropping this stops it.
#[derive(Debug)]
struct Checkpoints {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Durability {
    /// Starts a journal segment holding the prepared branches, flushes sled, waits for
    /// the snapshot and removes the older segments. Safe at any moment: every record in
    /// the older segments was queued after its effect was applied to sled (so the flush
    /// covers it) or is a prepared branch (so the snapshot, taken under the same lock as
    /// the queueing, covers it).
    fn checkpoint(&self) -> Result<(), StoreError> {
        // One at a time (the checkpoint thread, recovery and tests may all call this).
        let _one = lock(&self.checkpointing);
        self.sled_dirty.store(false, Ordering::Relaxed);
        let (seq, snapshot_durable) = {
            let prepared = lock(&self.prepared);
            let branches = prepared.iter().map(|(t, r)| (*t, r.clone())).collect();
            self.journal.start_segment(&Entry::Snapshot(branches))?
        };
        self.flusher.flush_blocking()?;
        snapshot_durable.wait_blocking()?;
        self.journal.remove_segments_before(seq)
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn decode<M: Message + Default>(bytes: &[u8], what: &str) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Io(format!("corrupt {what} record: {e}")))
}

impl SledStore {
    /// Opens (or creates) the store under `dir`.
    pub fn open(dir: &Path, limits: KvLimits) -> Result<Self, StoreError> {
        // sled's file lock is what keeps two stores off one directory. A store dropped in
        // this process releases it only once sled's I/O threads let go of the files, a
        // moment after the drop returns, so a reopen waits that moment out; a lock that
        // another store keeps holding is reported after `LOCK_WAIT`.
        const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
        let started = std::time::Instant::now();
        let db = loop {
            // No background flushes: checkpoints flush sled, and the journal makes
            // promises durable in between.
            let opened = sled::Config::new()
                .path(dir.join("sled"))
                .flush_every_ms(None)
                .open();
            match opened {
                Ok(db) => break db,
                // sled reports the lock as an `Other` error with this text.
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    if started.elapsed() >= LOCK_WAIT {
                        return Err(StoreError::Io(format!(
                            "opening sled at {}: {e} (is another participant using this \
                             directory?)",
                            dir.display()
                        )));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(StoreError::Io(format!(
                        "opening sled at {}: {e}",
                        dir.display()
                    )));
                }
            }
        };
        let (journal, replay) = Journal::open(&dir.join("journal"))?;
        Ok(Self {
            data: db.open_tree("data").map_err(io)?,
            legacy_prepared: db.open_tree("prepared").map_err(io)?,
            finished: db.open_tree("finished").map_err(io)?,
            durability: Arc::new(Durability {
                prepared: Mutex::default(),
                journal,
                flusher: Flusher::start(db.clone()),
                sled_dirty: AtomicBool::new(false),
                checkpointing: Mutex::new(()),
            }),
            db,
            locks: Mutex::default(),
            staging: Staging::new(limits),
            replay: Mutex::new(Some(replay)),
            checkpoints: Mutex::new(None),
        })
    }

    /// The journal's group-commit counters (fdatasyncs, and records that waited for one).
    pub fn flush_stats(&self) -> &FlushStats {
        self.durability.journal.stats()
    }

    /// Queues a journal record under the prepared-branches lock after `update` ran on
    /// the branches, so a checkpoint sees either both or neither.
    fn journal(
        &self,
        entry: &Entry,
        force: Force,
        update: impl FnOnce(&mut HashMap<TxnId, PreparedRecord>),
    ) -> Result<journal::Durable, StoreError> {
        let records = entry.encode();
        let mut prepared = lock(&self.durability.prepared);
        let durable = self.durability.journal.append(&records, force)?;
        update(&mut prepared);
        Ok(durable)
    }

    fn prepared_record(&self, txn_id: &TxnId) -> Option<PreparedRecord> {
        lock(&self.durability.prepared).get(txn_id).cloned()
    }

    fn start_checkpoints(&self) -> Result<(), StoreError> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let durability = self.durability.clone();
        let thread = std::thread::Builder::new()
            .name("checkpoints".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_INTERVAL)
                {
                    if !durability.journal.dirty() && !durability.sled_dirty.load(Ordering::Relaxed)
                    {
                        continue;
                    }
                    if let Err(e) = durability.checkpoint() {
                        tracing::error!("checkpoint failed: {e}");
                        durability.journal.fail(format!("a checkpoint failed: {e}"));
                        return;
                    }
                }
            })
            .map_err(|e| StoreError::Io(format!("spawning the checkpoint thread: {e}")))?;
        *lock(&self.checkpoints) = Some(Checkpoints {
            stop: Some(stop),
            thread: Some(thread),
        });
        Ok(())
    }

    /// Reads a key's committed value.
    pub fn get(&self, key: &[u8]) -> Result<Versioned, StoreError> {
        match self.data.get(key).map_err(io)? {
            None => Ok(Versioned::default()),
            Some(bytes) => {
                let stored: StoredValue = decode(&bytes, "value")?;
                Ok(Versioned {
                    version: stored.version,
                    value: stored.value,
                })
            }
        }
    }

    /// Takes every key's lock for `txn_id`, or none: a key held by another branch is a
    /// conflict (the caller votes NO; nothing waits).
    fn try_lock(&self, txn_id: TxnId, keys: &[Vec<u8>]) -> Result<(), Rejection> {
        let mut locks = lock(&self.locks);
        for key in keys {
            if let Some(holder) = locks.get(key)
                && *holder != txn_id
            {
                return Err(Rejection(format!(
                    "lock conflict on key {} (held by transaction {holder})",
                    show_key(key)
                )));
            }
        }
        for key in keys {
            locks.insert(key.clone(), txn_id);
        }
        Ok(())
    }

    fn unlock(&self, txn_id: TxnId, keys: &[Vec<u8>]) {
        let mut locks = lock(&self.locks);
        for key in keys {
            if locks.get(key) == Some(&txn_id) {
                locks.remove(key);
            }
        }
    }

    /// The keys locked by `txn_id` (for tests and diagnostics).
    pub fn locked_keys(&self, txn_id: &TxnId) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = lock(&self.locks)
            .iter()
            .filter(|(_, t)| *t == txn_id)
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        keys
    }

    fn tombstone(&self, txn_id: TxnId, record: TombstoneRecord) -> Result<(), StoreError> {
        self.finished
            .insert(txn_id.as_bytes(), record.encode_to_vec())
            .map_err(io)?;
        self.durability.sled_dirty.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Gathers a branch's operations (staged + payload), checks its incarnation, locks
    /// its keys and evaluates it. On `Ok`, the keys in the returned lock set are held.
    fn evaluate_branch(
        &self,
        meta: &BranchMeta,
        payload: &Bytes,
    ) -> Result<Result<Evaluated, Rejection>, StoreError> {
        let ops = match self.staging.take(meta, payload) {
            Ok(ops) => ops,
            Err(rejection) => return Ok(Err(rejection)),
        };
        let mut keys: Vec<Vec<u8>> = ops
            .iter()
            .filter_map(|op| op.op.as_ref().map(|o| eval::key_of(o).to_vec()))
            .collect();
        keys.sort();
        keys.dedup();
        if let Err(rejection) = self.try_lock(meta.txn_id, &keys) {
            return Ok(Err(rejection));
        }
        let mut read_error = None;
        let mut versions: HashMap<Vec<u8>, u64> = HashMap::new();
        let evaluated = eval::evaluate(&ops, |key| {
            let read = self.get(key).unwrap_or_else(|e| {
                read_error = Some(e);
                Versioned::default()
            });
            versions.insert(key.to_vec(), read.version);
            read
        });
        if let Some(error) = read_error {
            self.unlock(meta.txn_id, &keys);
            return Err(error);
        }
        let writes = match evaluated {
            Ok(writes) => writes,
            Err(rejection) => {
                self.unlock(meta.txn_id, &keys);
                return Ok(Err(rejection));
            }
        };
        // Fix the version each write installs now, while the lock keeps the key still:
        // this is what makes applying the branch a second time a no-op.
        let mut stored = Vec::with_capacity(writes.len());
        for (key, value) in writes {
            let current = match versions.get(&key) {
                Some(version) => *version,
                None => match self.get(&key) {
                    Ok(read) => read.version,
                    Err(error) => {
                        self.unlock(meta.txn_id, &keys);
                        return Err(error);
                    }
                },
            };
            stored.push(StoredWrite {
                key,
                value,
                version: current + 1,
            });
        }
        Ok(Ok((stored, keys)))
    }

    /// Installs each write unless the key already holds its version (or a newer one):
    /// idempotent, so an apply cut short by a crash can run again. Writes without a
    /// version (older records) install the current version + 1.
    fn install_writes(&self, writes: &[StoredWrite]) -> Result<(), StoreError> {
        for write in writes {
            let current = self.get(&write.key)?.version;
            let version = if write.version == 0 {
                current + 1
            } else if current >= write.version {
                continue;
            } else {
                write.version
            };
            let stored = StoredValue {
                version,
                value: write.value.clone(),
            };
            self.data
                .insert(write.key.as_slice(), stored.encode_to_vec())
                .map_err(io)?;
        }
        Ok(())
    }

    /// Phase two of a committed branch: the writes and the Committed tombstone go to
    /// sled, then the Committed record to the journal; returns the wait for that record.
    /// Safe to run again at any point: until the record is durable the journal's Prepared
    /// record brings the branch back after a crash, and the writes install only where the
    /// key is older than them.
    fn apply_prepared(
        &self,
        txn_id: TxnId,
        record: &PreparedRecord,
    ) -> Result<journal::Durable, StoreError> {
        self.install_writes(&record.writes)?;
        crash_point!("participant::commit::installed");
        self.tombstone(
            txn_id,
            TombstoneRecord::new(FinishedAs::Committed, Some(PayloadDigest(record.digest))),
        )?;
        self.journal(
            &Entry::Decided(txn_id, FinishedAs::Committed),
            Force::Soon,
            |prepared| {
                prepared.remove(&txn_id);
            },
        )
    }

    /// Applies writes to `data` and writes a Committed tombstone, in one sled transaction: a one-phase commit has no durable
    /// prepared record to fall back on, so its writes must land together or not at all.
    fn apply_atomically(
        &self,
        txn_id: TxnId,
        writes: &[StoredWrite],
        digest: u64,
    ) -> Result<(), StoreError> {
        let tombstone = TombstoneRecord::new(FinishedAs::Committed, Some(PayloadDigest(digest)))
            .encode_to_vec();
        let result: Result<(), TransactionError<String>> = (&self.data, &self.finished)
            .transaction(|(data, finished)| {
                for write in writes {
                    let current = match data.get(&write.key)? {
                        None => 0,
                        Some(bytes) => {
                            StoredValue::decode(bytes.as_ref())
                                .map_err(|e| {
                                    ConflictableTransactionError::Abort(format!(
                                        "corrupt value: {e}"
                                    ))
                                })?
                                .version
                        }
                    };
                    let stored = StoredValue {
                        version: current + 1,
                        value: write.value.clone(),
                    };
                    data.insert(write.key.as_slice(), stored.encode_to_vec())?;
                }
                finished.insert(txn_id.as_bytes().as_slice(), tombstone.as_slice())?;
                Ok(())
            });
        result.map_err(|e| StoreError::Io(format!("applying branch {txn_id}: {e}")))
    }
}

/// The crash point `participant::commit::drop_writes` (only with the `failpoints`
/// feature): when set, a commit is acknowledged without applying its writes, so tests can
/// check that the checkers catch a broken participant.
fn drop_writes_for_test() -> bool {
    fail::fail_point!("participant::commit::drop_writes", |_| true);
    false
}

/// A branch's writes (with the versions they install) and the keys it locked.
type Evaluated = (Vec<StoredWrite>, Vec<Vec<u8>>);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl SledStore {
    /// The staged, not yet prepared, operations and the limits.
    pub fn staging(&self) -> &Staging {
        &self.staging
    }
}

impl ResourceManager for SledStore {
    async fn prepare(&self, meta: BranchMeta, payload: Bytes) -> Result<StoreVote, StoreError> {
        crash_point!("participant::prepare::received");
        let (writes, keys) = match self.evaluate_branch(&meta, &payload)? {
            Ok(evaluated) => evaluated,
            Err(Rejection(reason)) => {
                self.tombstone(
                    meta.txn_id,
                    TombstoneRecord::new(FinishedAs::Aborted, Some(meta.digest)),
                )?;
                return Ok(StoreVote::No { reason });
            }
        };
        if writes.is_empty() {
            // Reads and checks only: validated now, nothing to commit, no phase 2.
            self.unlock(meta.txn_id, &keys);
            self.tombstone(
                meta.txn_id,
                TombstoneRecord::new(FinishedAs::ReadOnly, Some(meta.digest)),
            )?;
            return Ok(StoreVote::ReadOnly);
        }
        let record = PreparedRecord {
            format: RECORD_FORMAT,
            epoch: meta.epoch,
            digest: meta.digest.0,
            incarnation: meta.incarnation,
            prepared_at_unix_ms: unix_ms(),
            writes,
            lock_keys: keys.clone(),
        };
        let size = record.encoded_len();
        if size > journal::MAX_RECORD_BYTES {
            self.unlock(meta.txn_id, &keys);
            self.tombstone(
                meta.txn_id,
                TombstoneRecord::new(FinishedAs::Aborted, Some(meta.digest)),
            )?;
            return Ok(StoreVote::No {
                reason: format!(
                    "the branch's writes take {size} bytes; a participant journals at most {} \
                     bytes per branch",
                    journal::MAX_RECORD_BYTES
                ),
            });
        }
        // One record holds the results, the lock set and the metadata: atomic by itself.
        let txn_id = meta.txn_id;
        let durable = match self.journal(
            &Entry::Prepared(txn_id, record.clone()),
            Force::Now,
            |prepared| {
                prepared.insert(txn_id, record);
            },
        ) {
            Ok(durable) => durable,
            Err(e) => {
                self.unlock(txn_id, &keys);
                return Err(e);
            }
        };
        crash_point!("participant::prepare::written");
        // Durable before the YES leaves: after a crash, recover() returns this branch
        // with its locks. The journal shares this fdatasync with concurrent branches.
        durable.wait().await?;
        crash_point!("participant::prepare::flushed");
        Ok(StoreVote::Yes)
    }

    async fn commit(&self, txn_id: TxnId) -> Result<(), StoreError> {
        crash_point!("participant::commit::received");
        let Some(mut record) = self.prepared_record(&txn_id) else {
            // Applied already (the branch table missed it): answer as the commit did,
            // once the Committed record queued by that commit is durable.
            if let Some(tombstone) = self.finished.get(txn_id.as_bytes()).map_err(io)?
                && decode::<TombstoneRecord>(&tombstone, "tombstone")?.finished_as == 1
            {
                return self
                    .durability
                    .journal
                    .append(&[], Force::Soon)?
                    .wait()
                    .await;
            }
            return Err(StoreError::Io(format!(
                "prepared record of {txn_id} is missing"
            )));
        };
        // A deliberate bug for tests of the checkers (compiled in only with the
        // `failpoints` feature): acknowledge the commit but apply nothing.
        if drop_writes_for_test() {
            record.writes.clear();
        }
        let durable = self.apply_prepared(txn_id, &record)?;
        // The locks go before the Committed record is durable: the decision is COMMIT
        // for good, and a branch that prepares on these keys next is journaled after this
        // record, so its YES (which waits for its own record) makes this one durable too.
        // If a crash loses this record, the Prepared one brings this branch back with its
        // locks, and no later branch on these keys had voted.
        self.unlock(txn_id, &record.lock_keys);
        // Durable before the acknowledgement: the coordinator forgets the branch after it.
        durable.wait().await?;
        crash_point!("participant::commit::applied");
        Ok(())
    }

    async fn abort(&self, txn_id: TxnId) -> Result<(), StoreError> {
        crash_point!("participant::abort::received");
        self.staging.discard(&txn_id);
        let record = self.prepared_record(&txn_id);
        // The tombstone first, then the Aborted record: a crash between the two leaves
        // a prepared branch with an Aborted tombstone, and `recover` finishes the abort.
        self.tombstone(
            txn_id,
            TombstoneRecord::new(
                FinishedAs::Aborted,
                record.as_ref().map(|r| PayloadDigest(r.digest)),
            ),
        )?;
        // Not forced: presumed abort. If this is lost in a crash the branch comes back
        // prepared, asks the coordinator, and hears ABORTED again.
        if let Some(record) = record {
            self.journal(
                &Entry::Decided(txn_id, FinishedAs::Aborted),
                Force::No,
                |prepared| {
                    prepared.remove(&txn_id);
                },
            )?;
            self.unlock(txn_id, &record.lock_keys);
        }
        Ok(())
    }

    async fn commit_one_phase(
        &self,
        meta: BranchMeta,
        payload: Bytes,
    ) -> Result<OnePhaseOutcome, StoreError> {
        // A retry of a one-phase commit whose answer was lost: answer from the tombstone.
        if let Some(tombstone) = self.finished.get(meta.txn_id.as_bytes()).map_err(io)? {
            return Ok(
                match decode::<TombstoneRecord>(&tombstone, "tombstone")?.finished_as {
                    1 => OnePhaseOutcome::Committed,
                    _ => OnePhaseOutcome::Aborted {
                        reason: "the branch was aborted".into(),
                    },
                },
            );
        }
        let (writes, keys) = match self.evaluate_branch(&meta, &payload)? {
            Ok(evaluated) => evaluated,
            Err(Rejection(reason)) => {
                self.tombstone(
                    meta.txn_id,
                    TombstoneRecord::new(FinishedAs::Aborted, Some(meta.digest)),
                )?;
                return Ok(OnePhaseOutcome::Aborted { reason });
            }
        };
        let applied = self.apply_atomically(meta.txn_id, &writes, meta.digest.0);
        let flushed = match applied {
            // Durable before COMMITTED is answered.
            Ok(()) => self.durability.flusher.flush().await,
            Err(e) => Err(e),
        };
        self.unlock(meta.txn_id, &keys);
        flushed.map(|()| OnePhaseOutcome::Committed)
    }

    async fn recover(&self) -> Result<Recovered, StoreError> {
        crash_point!("participant::recovery");
        let Some(replay) = lock(&self.replay).take() else {
            return Err(StoreError::Refused(
                "the store was recovered already".into(),
            ));
        };
        // The branches prepared before the journal existed, then the journal in order.
        let mut prepared: HashMap<TxnId, PreparedRecord> = HashMap::new();
        let mut legacy = Vec::new();
        for item in self.legacy_prepared.iter() {
            let (key, bytes) = item.map_err(io)?;
            let txn_id = TxnId::try_from(key.as_ref())
                .map_err(|e| StoreError::Io(format!("corrupt prepared key: {e}")))?;
            let mut record: PreparedRecord = decode(&bytes, "prepared")?;
            if self.finished.get(txn_id.as_bytes()).map_err(io)?.is_none() {
                // Writes from builds that did not record versions: fix the version each
                // installs now, while nothing else can touch the branch's keys (the
                // branch holds them, and nothing is served before recovery ends), so
                // replaying the branch later can never install it twice.
                for write in &mut record.writes {
                    if write.version == 0 {
                        write.version = self.get(&write.key)?.version + 1;
                    }
                }
            }
            prepared.insert(txn_id, record);
            legacy.push(txn_id);
        }
        for entry in replay {
            match entry {
                Entry::Prepared(txn_id, record) => {
                    prepared.insert(txn_id, record);
                }
                Entry::Decided(txn_id, finished_as) => {
                    // The record was queued after sled had the writes and the tombstone;
                    // sled may have lost them since its last flush: apply them again
                    // (a write already there, or overtaken, is skipped).
                    if let Some(record) = prepared.remove(&txn_id) {
                        if finished_as == FinishedAs::Committed {
                            self.install_writes(&record.writes)?;
                        }
                        self.tombstone(
                            txn_id,
                            TombstoneRecord::new(finished_as, Some(PayloadDigest(record.digest))),
                        )?;
                    }
                }
                Entry::Snapshot(branches) => prepared = branches.into_iter().collect(),
            }
        }
        let mut recovered = Recovered::default();
        let mut still_prepared = HashMap::new();
        for (txn_id, record) in prepared {
            // A decision carried out in sled whose journal record the crash cut off: the
            // tombstone says how it ended, so finish it instead of asking again.
            if let Some(tombstone) = self.finished.get(txn_id.as_bytes()).map_err(io)? {
                match decode::<TombstoneRecord>(&tombstone, "tombstone")?.finished_as {
                    1 => self.install_writes(&record.writes)?,
                    2 => {}
                    other => {
                        return Err(StoreError::Io(format!(
                            "branch {txn_id} is prepared but its tombstone says {other}: \
                             the store is inconsistent"
                        )));
                    }
                }
                continue;
            }
            // Re-take the branch's locks before serving anyone: no other branch may touch
            // these keys until the decision arrives.
            self.try_lock(txn_id, &record.lock_keys)
                .map_err(|Rejection(r)| {
                    StoreError::Io(format!(
                        "two prepared branches overlap ({r}): the store is inconsistent"
                    ))
                })?;
            recovered.prepared.push(PreparedBranch {
                meta: BranchMeta {
                    txn_id,
                    epoch: record.epoch,
                    digest: PayloadDigest(record.digest),
                    incarnation: record.incarnation,
                },
                prepared_at_unix_ms: record.prepared_at_unix_ms,
            });
            still_prepared.insert(txn_id, record);
        }
        recovered
            .prepared
            .sort_by_key(|branch| (branch.prepared_at_unix_ms, branch.meta.txn_id));
        *lock(&self.durability.prepared) = still_prepared;
        // A checkpoint before serving: the snapshot holds the branches still prepared, the
        // flush makes what the replay applied durable, and the replayed segments go.
        let durability = self.durability.clone();
        let legacy_tree = self.legacy_prepared.clone();
        tokio::task::spawn_blocking(move || {
            durability.checkpoint()?;
            // Only now, with the snapshot durable, may the old records go.
            if !legacy.is_empty() {
                for txn_id in legacy {
                    legacy_tree.remove(txn_id.as_bytes()).map_err(io)?;
                }
                durability.flusher.flush_blocking()?;
            }
            Ok::<(), StoreError>(())
        })
        .await
        .map_err(|e| StoreError::Fatal(format!("the recovery checkpoint panicked: {e}")))??;
        for item in self.finished.iter() {
            let (key, bytes) = item.map_err(io)?;
            let txn_id = TxnId::try_from(key.as_ref())
                .map_err(|e| StoreError::Io(format!("corrupt tombstone key: {e}")))?;
            let record: TombstoneRecord = decode(&bytes, "tombstone")?;
            let finished_as = match record.finished_as {
                1 => FinishedAs::Committed,
                2 => FinishedAs::Aborted,
                3 => FinishedAs::ReadOnly,
                other => {
                    return Err(StoreError::Io(format!(
                        "tombstone of {txn_id} has unknown outcome {other}"
                    )));
                }
            };
            recovered.tombstones.push(Tombstone {
                txn_id,
                finished_as,
                digest: record.digest.map(PayloadDigest),
                finished_at_unix_ms: record.finished_at_unix_ms,
            });
        }
        self.start_checkpoints()?;
        Ok(recovered)
    }

    fn stats(&self) -> crate::store::StoreStats {
        crate::store::StoreStats {
            flushes: self.flush_stats().flushes.load(Ordering::Relaxed),
            flush_waiters: self.flush_stats().waiters.load(Ordering::Relaxed),
        }
    }

    fn hold_flushes(&self) -> crate::store::FlushHold {
        crate::store::FlushHold::new(self.durability.journal.hold())
    }

    async fn forget(&self, txn_ids: Vec<TxnId>) -> Result<(), StoreError> {
        // Once the tombstones reach their limit, a second's worth of them goes at a time
        // (15,000 at 15,000 transactions a second). As one sled batch on an async worker
        // they held that worker, and sled's batch lock every writer waits on, for tens of
        // milliseconds (`ratify bench` at 64 clients: p999 about 70 ms against 16–23 ms
        // with no tombstone dropped). One by one on a blocking thread, they share the
        // cores with the hot path instead. Nothing here needs to be atomic or durable.
        let finished = self.finished.clone();
        tokio::task::spawn_blocking(move || {
            for txn_id in txn_ids {
                finished.remove(txn_id.as_bytes())?;
            }
            Ok::<(), sled::Error>(())
        })
        .await
        .map_err(|e| StoreError::Io(format!("dropping tombstones: {e}")))?
        .map_err(io)?;
        self.durability.sled_dirty.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        lock(&self.checkpoints).take();
        // Best effort on a clean shutdown; durability never depends on it.
        let _ = self.db.flush();
    }
}

#[cfg(test)]
mod tests {
    //! The states a crash in the middle of a commit or an abort leaves on disk, built
    //! directly, and what `recover` and a repeated Commit make of them. Dropping a store
    //! stands for the crash: what it queued in the journal is written, and sled holds
    //! what the test left in it.

    use super::*;

    fn put(key: &str, value: &str) -> ratify_proto::v1::KvOp {
        use ratify_proto::v1::{Put, kv_op::Op};
        ratify_proto::v1::KvOp {
            op: Some(Op::Put(Put {
                key: key.as_bytes().to_vec().into(),
                value: value.as_bytes().to_vec().into(),
            })),
        }
    }

    fn add(key: &str, delta: i64) -> ratify_proto::v1::KvOp {
        use ratify_proto::v1::{Add, kv_op::Op};
        ratify_proto::v1::KvOp {
            op: Some(Op::Add(Add {
                key: key.as_bytes().to_vec().into(),
                delta,
                min: None,
            })),
        }
    }

    async fn prepared(store: &SledStore, ops: Vec<ratify_proto::v1::KvOp>) -> TxnId {
        let payload: Bytes = ratify_proto::v1::KvOps { ops }.encode_to_vec().into();
        let txn_id = TxnId::generate();
        let meta = BranchMeta {
            txn_id,
            epoch: 1,
            digest: PayloadDigest::of(&payload),
            incarnation: 0,
        };
        assert!(matches!(
            store.prepare(meta, payload).await.unwrap(),
            StoreVote::Yes
        ));
        txn_id
    }

    fn record(store: &SledStore, txn_id: TxnId) -> PreparedRecord {
        store.prepared_record(&txn_id).expect("a prepared branch")
    }

    fn value(store: &SledStore, key: &str) -> (u64, Option<String>) {
        let v = store.get(key.as_bytes()).unwrap();
        (v.version, v.value.map(|b| String::from_utf8(b).unwrap()))
    }

    async fn seed(store: &SledStore) {
        let txn_id = prepared(store, vec![put("a", "1"), put("b", "1")]).await;
        store.commit(txn_id).await.unwrap();
        assert_eq!(value(store, "a"), (1, Some("1".into())));
    }

    #[tokio::test]
    async fn writes_carry_the_version_they_install() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
        seed(&store).await;
        let txn_id = prepared(&store, vec![put("a", "2"), put("new", "x")]).await;
        let versions: Vec<(Vec<u8>, u64)> = record(&store, txn_id)
            .writes
            .into_iter()
            .map(|w| (w.key, w.version))
            .collect();
        assert_eq!(versions, vec![(b"a".to_vec(), 2), (b"new".to_vec(), 1)]);
    }

    #[tokio::test]
    async fn a_commit_cut_short_after_some_writes_applies_each_write_once() {
        let dir = tempfile::tempdir().unwrap();
        let txn_id;
        {
            let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
            seed(&store).await;
            txn_id = prepared(&store, vec![add("a", 5), put("b", "2")]).await;
            // The crash: only the first write got installed.
            let mut first = record(&store, txn_id);
            first.writes.truncate(1);
            store.install_writes(&first.writes).unwrap();
            assert_eq!(value(&store, "a"), (2, Some("6".into())));
        }
        let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
        let recovered = store.recover().await.unwrap();
        assert_eq!(recovered.prepared.len(), 1, "no tombstone: still in doubt");
        assert_eq!(recovered.prepared[0].meta.txn_id, txn_id);
        store.commit(txn_id).await.unwrap();
        assert_eq!(
            value(&store, "a"),
            (2, Some("6".into())),
            "not applied twice"
        );
        assert_eq!(value(&store, "b"), (2, Some("2".into())));
        assert!(store.prepared_record(&txn_id).is_none());
        // A repeated Commit changes nothing.
        store.commit(txn_id).await.unwrap();
        assert_eq!(value(&store, "a"), (2, Some("6".into())));
    }

    #[tokio::test]
    async fn recovery_finishes_a_commit_whose_tombstone_outlived_the_prepared_record_removal() {
        let dir = tempfile::tempdir().unwrap();
        let txn_id;
        {
            let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
            seed(&store).await;
            txn_id = prepared(&store, vec![add("a", 5), put("b", "2")]).await;
            // The crash: the tombstone made it, the writes and the removal did not.
            store
                .tombstone(txn_id, TombstoneRecord::new(FinishedAs::Committed, None))
                .unwrap();
        }
        let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
        let recovered = store.recover().await.unwrap();
        assert!(recovered.prepared.is_empty(), "{:?}", recovered.prepared);
        assert!(
            recovered
                .tombstones
                .iter()
                .any(|t| t.txn_id == txn_id && t.finished_as == FinishedAs::Committed)
        );
        assert_eq!(value(&store, "a"), (2, Some("6".into())));
        assert_eq!(value(&store, "b"), (2, Some("2".into())));
        assert!(store.prepared_record(&txn_id).is_none());
        assert!(store.locked_keys(&txn_id).is_empty());
    }

    #[tokio::test]
    async fn recovery_finishes_an_abort_whose_prepared_record_outlived_it() {
        let dir = tempfile::tempdir().unwrap();
        let txn_id;
        {
            let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
            seed(&store).await;
            txn_id = prepared(&store, vec![add("a", 5)]).await;
            store
                .tombstone(txn_id, TombstoneRecord::new(FinishedAs::Aborted, None))
                .unwrap();
        }
        let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
        let recovered = store.recover().await.unwrap();
        assert!(recovered.prepared.is_empty());
        assert_eq!(value(&store, "a"), (1, Some("1".into())), "nothing applied");
        assert!(store.prepared_record(&txn_id).is_none());
    }

    #[tokio::test]
    async fn a_store_reopens_at_once_after_a_drop_and_a_held_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..20 {
            let store = SledStore::open(dir.path(), KvLimits::default())
                .unwrap_or_else(|e| panic!("reopen {i}: {e}"));
            store.recover().await.unwrap();
            let txn_id = prepared(&store, vec![put(&format!("k{i}"), "v")]).await;
            store.commit(txn_id).await.unwrap();
        }
        let _held = SledStore::open(dir.path(), KvLimits::default()).unwrap();
        let error = SledStore::open(dir.path(), KvLimits::default()).unwrap_err();
        assert!(error.to_string().contains("another participant"), "{error}");
    }

    fn segments(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("journal")).unwrap().count()
    }

    #[tokio::test]
    async fn the_journal_brings_back_a_commit_sled_lost() {
        let dir = tempfile::tempdir().unwrap();
        let txn_id;
        {
            let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
            seed(&store).await;
            txn_id = prepared(&store, vec![add("a", 5), put("b", "2")]).await;
            store.commit(txn_id).await.unwrap();
            // The crash: sled lost the commit (it had not been flushed since), the
            // journal's Committed record is durable.
            let old = StoredValue {
                version: 1,
                value: Some(b"1".to_vec()),
            };
            store.data.insert("a", old.encode_to_vec()).unwrap();
            store.data.insert("b", old.encode_to_vec()).unwrap();
            store.finished.remove(txn_id.as_bytes()).unwrap();
        }
        let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
        let recovered = store.recover().await.unwrap();
        assert!(recovered.prepared.is_empty(), "{:?}", recovered.prepared);
        assert_eq!(value(&store, "a"), (2, Some("6".into())));
        assert_eq!(value(&store, "b"), (2, Some("2".into())));
        assert!(
            recovered
                .tombstones
                .iter()
                .any(|t| t.txn_id == txn_id && t.finished_as == FinishedAs::Committed)
        );
        assert!(store.locked_keys(&txn_id).is_empty());
    }

    #[tokio::test]
    async fn replaying_an_old_commit_never_overwrites_a_newer_value() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
            seed(&store).await;
            let first = prepared(&store, vec![put("a", "first")]).await;
            store.commit(first).await.unwrap();
            let second = prepared(&store, vec![put("a", "second")]).await;
            store.commit(second).await.unwrap();
        }
        let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
        store.recover().await.unwrap();
        assert_eq!(value(&store, "a"), (3, Some("second".into())));
    }

    #[tokio::test]
    async fn a_checkpoint_keeps_what_is_prepared_and_drops_the_replayed_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, committed);
        {
            let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
            store.recover().await.unwrap();
            seed(&store).await;
            kept = prepared(&store, vec![put("kept", "x")]).await;
            committed = prepared(&store, vec![put("c", "y")]).await;
            store.commit(committed).await.unwrap();
            let aborted = prepared(&store, vec![put("d", "z")]).await;
            store.abort(aborted).await.unwrap();
            let durability = store.durability.clone();
            tokio::task::spawn_blocking(move || durability.checkpoint())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(segments(dir.path()), 1, "older segments removed");
        }
        let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
        let recovered = store.recover().await.unwrap();
        let prepared: Vec<TxnId> = recovered.prepared.iter().map(|b| b.meta.txn_id).collect();
        assert_eq!(prepared, vec![kept]);
        assert_eq!(store.locked_keys(&kept), vec![b"kept".to_vec()]);
        assert_eq!(value(&store, "c"), (1, Some("y".into())));
        assert_eq!(value(&store, "d"), (0, None));
        assert_eq!(segments(dir.path()), 1, "recovery checkpointed too");
        store.commit(kept).await.unwrap();
        assert_eq!(value(&store, "kept"), (1, Some("x".into())));
    }

    /// What an older store left: a prepared branch (putting "legacy" at `a`, with no
    /// version recorded) in sled's `prepared` tree.
    fn plant_legacy_branch(store: &SledStore, txn_id: TxnId) {
        let record = PreparedRecord {
            format: RECORD_FORMAT,
            epoch: 1,
            digest: 7,
            incarnation: 0,
            prepared_at_unix_ms: unix_ms(),
            writes: vec![StoredWrite {
                key: b"a".to_vec(),
                value: Some(b"legacy".to_vec()),
                version: 0,
            }],
            lock_keys: vec![b"a".to_vec()],
        };
        store
            .legacy_prepared
            .insert(txn_id.as_bytes(), record.encode_to_vec())
            .unwrap();
    }

    #[tokio::test]
    async fn branches_prepared_before_the_journal_existed_are_recovered_and_moved() {
        let dir = tempfile::tempdir().unwrap();
        let txn_id = TxnId::generate();
        {
            let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
            seed(&store).await;
            plant_legacy_branch(&store, txn_id);
        }
        for _ in 0..2 {
            let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
            let recovered = store.recover().await.unwrap();
            assert_eq!(recovered.prepared.len(), 1);
            assert_eq!(recovered.prepared[0].meta.txn_id, txn_id);
            assert!(store.legacy_prepared.is_empty(), "moved to the journal");
        }
        let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
        store.recover().await.unwrap();
        store.commit(txn_id).await.unwrap();
        assert_eq!(value(&store, "a"), (2, Some("legacy".into())));
    }

    #[tokio::test]
    async fn a_branch_too_large_to_journal_votes_no_and_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
        let value = "v".repeat(60 * 1024);
        let ops: Vec<_> = (0..150).map(|i| put(&format!("k{i}"), &value)).collect();
        let payload: Bytes = ratify_proto::v1::KvOps { ops }.encode_to_vec().into();
        let txn_id = TxnId::generate();
        let meta = BranchMeta {
            txn_id,
            epoch: 1,
            digest: PayloadDigest::of(&payload),
            incarnation: 0,
        };
        match store.prepare(meta, payload).await.unwrap() {
            StoreVote::No { reason } => assert!(reason.contains("journals at most"), "{reason}"),
            other => panic!("expected NO, got {other:?}"),
        }
        assert!(store.locked_keys(&txn_id).is_empty());
        assert!(store.prepared_record(&txn_id).is_none());
    }

    #[tokio::test]
    async fn branches_written_without_versions_get_them_once_at_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let txn_id = TxnId::generate();
        {
            let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
            seed(&store).await;
            plant_legacy_branch(&store, txn_id);
        }
        {
            let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
            store.recover().await.unwrap();
            assert_eq!(record(&store, txn_id).writes[0].version, 2);
            store.commit(txn_id).await.unwrap();
            let next = prepared(&store, vec![put("a", "next")]).await;
            store.commit(next).await.unwrap();
            assert_eq!(value(&store, "a"), (3, Some("next".into())));
        }
        // Replaying the legacy branch's commit after a crash must not install it over
        // the newer value.
        let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
        store.recover().await.unwrap();
        assert_eq!(value(&store, "a"), (3, Some("next".into())));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkpoints_racing_prepares_commits_and_aborts_keep_every_prepared_branch() {
        let dir = tempfile::tempdir().unwrap();
        let mut still_prepared = Vec::new();
        {
            let store = Arc::new(SledStore::open(dir.path(), KvLimits::default()).unwrap());
            store.recover().await.unwrap();
            let durability = store.durability.clone();
            let checkpoints = tokio::task::spawn_blocking(move || {
                for _ in 0..40 {
                    durability.checkpoint().unwrap();
                }
            });
            let mut branches = Vec::new();
            for i in 0..240 {
                let store = store.clone();
                branches.push(tokio::spawn(async move {
                    let txn_id = prepared(&store, vec![put(&format!("k{i}"), "v")]).await;
                    match i % 3 {
                        0 => store.commit(txn_id).await.unwrap(),
                        1 => store.abort(txn_id).await.unwrap(),
                        _ => return Some(txn_id),
                    }
                    None
                }));
            }
            for branch in branches {
                still_prepared.extend(branch.await.unwrap());
            }
            checkpoints.await.unwrap();
        }
        let store = SledStore::open(dir.path(), KvLimits::default()).unwrap();
        let recovered = store.recover().await.unwrap();
        let mut found: Vec<TxnId> = recovered.prepared.iter().map(|b| b.meta.txn_id).collect();
        found.sort();
        still_prepared.sort();
        assert_eq!(found, still_prepared, "the prepared set after the restart");
        for i in 0..240 {
            let expected = if i % 3 == 0 {
                (1, Some("v".into()))
            } else {
                (0, None)
            };
            assert_eq!(value(&store, &format!("k{i}")), expected, "key k{i}");
        }
    }
}
