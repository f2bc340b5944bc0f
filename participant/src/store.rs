//! The resource-manager seam: the trait a data service implements over its own store.
//!
//! The runtime ([`crate::runtime`]) owns the protocol (tombstones, epochs, per-branch
//! ordering, termination, recovery); a [`ResourceManager`] owns the data. Every method
//! states what must be on disk before it returns, because the runtime answers the
//! coordinator as soon as it does.

use std::future::Future;

use bytes::Bytes;
use ratify_proto::TxnId;

/// A stable 64-bit digest of a prepare payload (FNV-1a), kept with prepared branches
/// and tombstones so a second prepare with a different payload is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PayloadDigest(pub u64);

impl PayloadDigest {
    pub fn of(payload: &[u8]) -> Self {
        // FNV-1a: fixed forever, so digests persisted by one build compare with the next.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in payload {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self(hash)
    }
}

/// What the runtime tells the store about a branch it asks it to prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BranchMeta {
    pub txn_id: TxnId,
    /// The coordinator epoch that sent the prepare.
    pub epoch: u64,
    pub digest: PayloadDigest,
    /// The participant incarnation the branch was enlisted under (0: not enlisted).
    pub incarnation: u64,
}

/// The store's vote on a prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreVote {
    Yes,
    No { reason: String },
    ReadOnly,
}

/// The outcome of a one-phase commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnePhaseOutcome {
    Committed,
    Aborted { reason: String },
}

/// How a finished branch ended, as its tombstone records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishedAs {
    Committed,
    Aborted,
    ReadOnly,
}

/// A finished branch's tombstone, kept so late and duplicate messages get the first answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tombstone {
    pub txn_id: TxnId,
    pub finished_as: FinishedAs,
    pub digest: Option<PayloadDigest>,
    pub finished_at_unix_ms: u64,
}

/// A branch found prepared on restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreparedBranch {
    pub meta: BranchMeta,
    pub prepared_at_unix_ms: u64,
}

/// What the store holds durably about branches, read once at start.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    pub prepared: Vec<PreparedBranch>,
    pub tombstones: Vec<Tombstone>,
}

/// A store failure. `Fatal` means the store can no longer promise durability (an fsync
/// failed): the participant must stop rather than go on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage failure: {0}")]
    Io(String),
    #[error("fatal storage failure, the participant must stop: {0}")]
    Fatal(String),
    #[error("store refused the request: {0}")]
    Refused(String),
}

/// Counters a store may report (flushes shared by group commit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub flushes: u64,
    pub flush_waiters: u64,
}

/// A data service's store, driven by the participant runtime.
///
/// The runtime guarantees that calls for one transaction id never overlap, that
/// `commit` and `abort` of a prepared branch come only after `prepare` answered YES,
/// and that a branch it has a tombstone for is not handed to the store again.
/// Calls for different transactions run concurrently; a store should make concurrent
/// prepares share one fsync (group commit).
pub trait ResourceManager: Send + Sync + 'static {
    /// Evaluates the branch (its staged operations plus `payload`), takes its locks, and
    /// votes.
    ///
    /// Durability: before returning [`StoreVote::Yes`], the branch's results, its locks'
    /// extent and `meta` must be on disk together, so that after a crash `recover`
    /// returns it and `commit` can still apply it. NO and READ_ONLY release everything
    /// and leave a tombstone (which need not be forced: presumed abort makes a lost NO
    /// safe). Must never block forever on a lock: a conflict votes NO.
    fn prepare(
        &self,
        meta: BranchMeta,
        payload: Bytes,
    ) -> impl Future<Output = Result<StoreVote, StoreError>> + Send;

    /// Applies a prepared branch, releases its locks and records a Committed tombstone.
    ///
    /// Durability: the applied data and the tombstone must be on disk, atomically with the
    /// removal of the prepared record, before returning Ok.
    fn commit(&self, txn_id: TxnId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Discards the branch (prepared or merely staged, or unknown), releases its locks and
    /// records an Aborted tombstone.
    ///
    /// Durability: none required (presumed abort: if the abort is lost in a crash, the
    /// branch comes back prepared and the termination protocol hears ABORTED again).
    fn abort(&self, txn_id: TxnId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Prepares and applies in one step (a transaction with this participant alone).
    ///
    /// Durability: on Committed, the applied data and a Committed tombstone are on disk
    /// before returning; on Aborted nothing is applied.
    fn commit_one_phase(
        &self,
        meta: BranchMeta,
        payload: Bytes,
    ) -> impl Future<Output = Result<OnePhaseOutcome, StoreError>> + Send;

    /// Reads every prepared branch (re-taking its locks) and every tombstone. Called once,
    /// before the participant serves.
    fn recover(&self) -> impl Future<Output = Result<Recovered, StoreError>> + Send;

    /// Drops tombstones the runtime no longer keeps (retention passed). No durability
    /// required.
    fn forget(&self, txn_ids: Vec<TxnId>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Counters for monitoring; none by default.
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }

    /// Asks the store to hold back its next group-commit flush while the returned guard
    /// lives. The runtime takes it around its first pass over one Prepare RPC's
    /// entries, so that every entry has queued its record before the flush starts and
    /// the batch shares one fsync instead of the first entry's record going out alone.
    /// (Not for Commit batches: their records wait for a prepare's flush anyway, and
    /// holding would delay prepares, which clients wait on.) A hold only delays: a store
    /// must bound it (the sled store flushes anyway after 10 ms). None by default.
    fn hold_flushes(&self) -> FlushHold {
        FlushHold::none()
    }
}

/// See [`ResourceManager::hold_flushes`]: dropping it releases the hold.
#[must_use = "the hold ends when this is dropped"]
pub struct FlushHold(#[allow(dead_code)] Option<Box<dyn Send + Sync>>);

impl std::fmt::Debug for FlushHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FlushHold").field(&self.0.is_some()).finish()
    }
}

impl FlushHold {
    /// No hold (a store without group commit).
    pub fn none() -> Self {
        Self(None)
    }

    /// A hold that `release` ends when dropped.
    pub fn new(release: impl Send + Sync + 'static) -> Self {
        Self(Some(Box::new(release)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_digest_is_stable_and_discriminates() {
        // Pinned value: digests are persisted, so the function must never change.
        assert_eq!(PayloadDigest::of(b"").0, 0xcbf2_9ce4_8422_2325);
        assert_eq!(PayloadDigest::of(b"a").0, 0xaf63_dc4c_8601_ec8c);
        assert_ne!(PayloadDigest::of(b"ab"), PayloadDigest::of(b"ba"));
    }
}
