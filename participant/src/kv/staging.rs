//! Operations staged under a transaction id before prepare, shared by the key-value
//! stores (sled and PostgreSQL): limits, validation, the incarnation check and expiry.
//! Staged operations live in memory only: a restart loses them, and the incarnation
//! makes the branch's prepare vote NO rather than commit part of it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use ratify_proto::TxnId;
use ratify_proto::v1;

use super::eval::{self, Rejection};
use crate::store::BranchMeta;

/// Limits of the key-value stores; each violation is refused with a clear status.
#[derive(Debug, Clone)]
pub struct KvLimits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub max_ops_per_branch: usize,
    /// Branches with staged operations, not yet prepared.
    pub max_active_branches: usize,
    /// A staged branch untouched this long is dropped (its prepare then votes NO).
    pub active_branch_timeout: Duration,
}

impl Default for KvLimits {
    fn default() -> Self {
        Self {
            max_key_bytes: 1024,
            max_value_bytes: 64 * 1024,
            max_ops_per_branch: 1000,
            max_active_branches: 10_000,
            active_branch_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug)]
struct ActiveBranch {
    ops: Vec<v1::KvOp>,
    touched: Instant,
}

#[derive(Debug)]
pub struct Staging {
    limits: KvLimits,
    incarnation: u64,
    active: Mutex<HashMap<TxnId, ActiveBranch>>,
    /// Branches whose staged operations were dropped (timeout), so their prepare votes NO.
    expired: Mutex<HashMap<TxnId, Instant>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Staging {
    pub fn new(limits: KvLimits) -> Self {
        let incarnation = loop {
            let candidate = fastrand::u64(..);
            if candidate != 0 {
                break candidate;
            }
        };
        Self {
            limits,
            incarnation,
            active: Mutex::default(),
            expired: Mutex::default(),
        }
    }

    pub fn limits(&self) -> &KvLimits {
        &self.limits
    }

    /// A random id of this process's life: branches enlisted under another incarnation
    /// lost their staged operations in a restart.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Whether a branch has staged operations in this incarnation.
    pub fn is_active(&self, txn_id: &TxnId) -> bool {
        lock(&self.active).contains_key(txn_id)
    }

    /// Stages operations under a transaction id (each validated by the caller).
    pub fn stage(&self, txn_id: TxnId, ops: Vec<v1::KvOp>) -> Result<usize, tonic::Status> {
        let mut active = lock(&self.active);
        if !active.contains_key(&txn_id) && active.len() >= self.limits.max_active_branches {
            return Err(tonic::Status::resource_exhausted(format!(
                "{} branches already have staged operations (the limit)",
                self.limits.max_active_branches
            )));
        }
        let branch = active.entry(txn_id).or_insert_with(|| ActiveBranch {
            ops: Vec::new(),
            touched: Instant::now(),
        });
        if branch.ops.len() + ops.len() > self.limits.max_ops_per_branch {
            return Err(tonic::Status::resource_exhausted(format!(
                "a branch holds at most {} operations; it has {} and {} more were sent",
                self.limits.max_ops_per_branch,
                branch.ops.len(),
                ops.len()
            )));
        }
        branch.ops.extend(ops);
        branch.touched = Instant::now();
        Ok(branch.ops.len())
    }

    /// Puts operations taken by [`Staging::take`] back, ahead of any staged since, when the
    /// store could not finish with them (an I/O error before the outcome was decided), so a
    /// retry sees the whole branch again.
    pub fn restore(&self, txn_id: TxnId, mut ops: Vec<v1::KvOp>) {
        let mut active = lock(&self.active);
        let branch = active.entry(txn_id).or_insert_with(|| ActiveBranch {
            ops: Vec::new(),
            touched: Instant::now(),
        });
        ops.append(&mut branch.ops);
        branch.ops = ops;
        branch.touched = Instant::now();
    }

    /// Drops a branch's staged operations (it aborted).
    pub fn discard(&self, txn_id: &TxnId) {
        lock(&self.active).remove(txn_id);
    }

    /// Drops staged branches idle past the timeout. Returns how many were dropped.
    pub fn expire_idle(&self) -> usize {
        let timeout = self.limits.active_branch_timeout;
        let now = Instant::now();
        let dropped: Vec<TxnId> = {
            let mut active = lock(&self.active);
            let ids: Vec<TxnId> = active
                .iter()
                .filter(|(_, b)| now.duration_since(b.touched) > timeout)
                .map(|(t, _)| *t)
                .collect();
            for id in &ids {
                active.remove(id);
            }
            ids
        };
        let mut expired = lock(&self.expired);
        expired.retain(|_, at| now.duration_since(*at) < timeout * 12);
        for id in &dropped {
            expired.insert(*id, now);
        }
        dropped.len()
    }

    /// Validates one operation against the limits.
    pub fn validate_op(&self, index: usize, op: &v1::KvOp) -> Result<(), String> {
        let op = op
            .op
            .as_ref()
            .ok_or_else(|| format!("operation {index} is empty"))?;
        let key = eval::key_of(op);
        if key.is_empty() {
            return Err(format!("operation {index} has an empty key"));
        }
        if key.len() > self.limits.max_key_bytes {
            return Err(format!(
                "operation {index}: key of {} bytes exceeds the limit of {} bytes",
                key.len(),
                self.limits.max_key_bytes
            ));
        }
        if let v1::kv_op::Op::Put(put) = op
            && put.value.len() > self.limits.max_value_bytes
        {
            return Err(format!(
                "operation {index}: value of {} bytes exceeds the limit of {} bytes",
                put.value.len(),
                self.limits.max_value_bytes
            ));
        }
        Ok(())
    }

    /// Takes a branch's operations for prepare: the staged ones, then the payload's.
    /// Rejected (the branch votes NO) when the participant restarted since the branch
    /// was enlisted, when its staged operations expired, or when the payload is
    /// malformed or over the limits.
    pub fn take(&self, meta: &BranchMeta, payload: &Bytes) -> Result<Vec<v1::KvOp>, Rejection> {
        let staged = lock(&self.active).remove(&meta.txn_id);
        if meta.incarnation != 0 && meta.incarnation != self.incarnation {
            return Err(Rejection(
                "the participant restarted since the branch was enlisted; its staged operations are lost"
                    .into(),
            ));
        }
        if lock(&self.expired).remove(&meta.txn_id).is_some() {
            return Err(Rejection(
                "the branch's staged operations expired before prepare".into(),
            ));
        }
        let mut ops = staged.map(|b| b.ops).unwrap_or_default();
        if !payload.is_empty() {
            let decoded = v1::KvOps::decode(payload.as_ref())
                .map_err(|e| Rejection(format!("malformed payload: {e}")))?;
            for (index, op) in decoded.ops.iter().enumerate() {
                self.validate_op(index, op).map_err(Rejection)?;
            }
            ops.extend(decoded.ops);
        }
        if ops.len() > self.limits.max_ops_per_branch {
            return Err(Rejection(format!(
                "{} operations exceed the limit of {} per branch",
                ops.len(),
                self.limits.max_ops_per_branch
            )));
        }
        Ok(ops)
    }
}
