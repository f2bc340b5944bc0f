//! The decision log seam. The engine only ever asks a log to make records durable and, at
//! start, to replay them. [`wal::Wal`] is the local implementation (segmented files,
//! CRC32C frames, group commit); a Raft-replicated log is meant to be the second one,
//! behind the same trait, without touching the engine.

pub mod frame;
pub mod wal;

use std::future::Future;

use ratify_proto::TxnId;
use ratify_proto::v1;

/// A transaction's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    Commit,
    Abort,
}

/// A participant as the log names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogParticipant {
    pub name: String,
    pub incarnation: u64,
    pub endpoint: String,
}

/// A record of the decision log (domain form of `ratify.v1.WalRecord`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogRecord {
    /// The decision, naming the participants that get phase 2. COMMIT is forced before
    /// any Commit message; ABORT is not (presumed abort) unless an operator forced it.
    Decision {
        txn: TxnId,
        decision: Decision,
        participants: Vec<LogParticipant>,
        at_unix_ms: u64,
        /// Set when an operator forced the decision.
        actor: String,
        reason: String,
        epoch: u64,
    },
    /// Every participant acknowledged phase 2 (not forced).
    End { txn: TxnId },
}

impl LogRecord {
    pub fn txn(&self) -> TxnId {
        match self {
            LogRecord::Decision { txn, .. } | LogRecord::End { txn } => *txn,
        }
    }
}

/// Why a stored record cannot be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid log record: {0}")]
pub struct InvalidRecord(pub String);

fn participants_from(list: Vec<v1::WalParticipant>) -> Vec<LogParticipant> {
    list.into_iter()
        .map(|p| LogParticipant {
            name: p.name,
            incarnation: p.incarnation,
            endpoint: p.endpoint,
        })
        .collect()
}

fn participants_to(list: &[LogParticipant]) -> Vec<v1::WalParticipant> {
    list.iter()
        .map(|p| v1::WalParticipant {
            name: p.name.clone(),
            incarnation: p.incarnation,
            endpoint: p.endpoint.clone(),
        })
        .collect()
}

fn txn_of(bytes: &bytes::Bytes) -> Result<TxnId, InvalidRecord> {
    TxnId::try_from(bytes).map_err(|e| InvalidRecord(e.to_string()))
}

impl TryFrom<v1::WalRecord> for LogRecord {
    type Error = InvalidRecord;

    fn try_from(record: v1::WalRecord) -> Result<Self, Self::Error> {
        use v1::wal_record::Body;
        match record.body {
            None => Err(InvalidRecord("record has no body".into())),
            Some(Body::Decision(d)) => {
                let decision = match v1::WalDecision::try_from(d.decision) {
                    Ok(v1::WalDecision::Commit) => Decision::Commit,
                    Ok(v1::WalDecision::Abort) => Decision::Abort,
                    _ => return Err(InvalidRecord(format!("unknown decision {}", d.decision))),
                };
                Ok(LogRecord::Decision {
                    txn: txn_of(&d.txn_id)?,
                    decision,
                    participants: participants_from(d.participants),
                    at_unix_ms: d.at_unix_ms,
                    actor: d.actor,
                    reason: d.reason,
                    epoch: d.epoch,
                })
            }
            Some(Body::End(e)) => Ok(LogRecord::End {
                txn: txn_of(&e.txn_id)?,
            }),
        }
    }
}

impl From<&LogRecord> for v1::WalRecord {
    fn from(record: &LogRecord) -> Self {
        use v1::wal_record::Body;
        let body = match record {
            LogRecord::Decision {
                txn,
                decision,
                participants,
                at_unix_ms,
                actor,
                reason,
                epoch,
            } => Body::Decision(v1::DecisionRecord {
                txn_id: txn.to_vec().into(),
                decision: match decision {
                    Decision::Commit => v1::WalDecision::Commit,
                    Decision::Abort => v1::WalDecision::Abort,
                } as i32,
                participants: participants_to(participants),
                at_unix_ms: *at_unix_ms,
                actor: actor.clone(),
                reason: reason.clone(),
                epoch: *epoch,
            }),
            LogRecord::End { txn } => Body::End(v1::EndRecord {
                txn_id: txn.to_vec().into(),
            }),
        };
        v1::WalRecord { body: Some(body) }
    }
}

/// A log failure. After an fsync failure the log is poisoned for good: nothing written
/// since can be trusted to be durable, so the coordinator must stop.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("decision log failed; the coordinator must stop: {0}")]
    Failed(String),
}

/// Counters a log reports (for metrics and the bench).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    pub records: u64,
    pub batches: u64,
    pub fsyncs: u64,
    pub segments_removed: u64,
}

/// The seam between the engine's driver and durable storage.
pub trait DecisionLog: Send + Sync + 'static {
    /// The coordinator epoch, raised durably every time the log is opened.
    fn epoch(&self) -> u64;

    /// Appends and returns only once the records are durable (fsynced, or Raft-committed).
    /// Concurrent calls share one fsync (group commit). The records are queued at the
    /// call, before the future is first polled, and the future borrows nothing from the
    /// log, so the driver can keep it beside its other work.
    fn append(
        &self,
        records: Vec<LogRecord>,
    ) -> impl Future<Output = Result<(), LogError>> + Send + use<Self>;

    /// Appends without waiting: the records are ordered before any later append and are
    /// made durable with the next forced batch (or on their own after a short linger),
    /// but nobody waits for that. For records whose loss is safe (presumed abort).
    fn append_unforced(&self, records: Vec<LogRecord>) -> Result<(), LogError>;

    /// The records recovered when the log was opened, oldest first (taken once).
    fn take_recovered(&self) -> Vec<LogRecord>;

    fn stats(&self) -> LogStats;
}
