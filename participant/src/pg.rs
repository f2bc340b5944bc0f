//! The PostgreSQL resource manager (feature `postgres`): a branch is a PostgreSQL
//! transaction that becomes `PREPARE TRANSACTION` at prepare and `COMMIT PREPARED` /
//! `ROLLBACK PREPARED` at the decision.
//!
//! - Global ids are `ratify:<participant>:<txn uuid>:<epoch>:<payload digest>`, built only
//!   from validated parts (PostgreSQL takes the id as a literal, not a parameter), so a
//!   restarted participant rebuilds each branch's metadata from `pg_prepared_xacts`.
//! - Outcomes live in `ratify_branches`. The `committed` row of a branch is written
//!   inside the prepared transaction itself, so it exists exactly when the branch
//!   committed: a repeated Commit whose prepared transaction is gone is answered from it.
//! - PostgreSQL never times out a prepared transaction. The participant runtime does: a
//!   branch prepared past the termination deadline asks the coordinator (presumed abort),
//!   and [`PgStore::scan_prepared`] finds prepared transactions of this participant that
//!   the runtime does not know (call it periodically and hand them to
//!   [`crate::runtime::Runtime::adopt_prepared`]).
//! - The key-value data API uses the table `ratify_kv(key, value, version)`; data services
//!   with their own tables run their SQL in a branch from [`PgStore::branch`].
//!
//! The server needs `max_prepared_transactions > 0` (and `synchronous_commit = on`, the
//! default, for PREPARE TRANSACTION and COMMIT PREPARED to be durable on return).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ratify_proto::TxnId;
use ratify_proto::v1::{self, kv_op::Op};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, NoTls};
use tracing::{debug, warn};

use crate::kv::eval::{self, Rejection};
use crate::kv::service::KvStore;
use crate::kv::{KvLimits, Staging, Versioned};
use crate::store::{
    BranchMeta, FinishedAs, OnePhaseOutcome, PayloadDigest, PreparedBranch, Recovered,
    ResourceManager, StoreError, StoreVote, Tombstone,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ratify_branches (
    participant text NOT NULL,
    txn bytea NOT NULL,
    outcome text NOT NULL,
    digest bigint,
    finished_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (participant, txn)
);
CREATE TABLE IF NOT EXISTS ratify_kv (
    key bytea PRIMARY KEY,
    value bytea,
    version bigint NOT NULL
);";

/// Settings of the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// A libpq-style connection string or URL (`postgres://user@host:port/db`).
    pub conninfo: String,
    /// The participant's name (part of every global id, so participants sharing a
    /// server never touch each other's prepared transactions).
    pub participant: String,
    pub max_connections: usize,
    /// How long a key-value branch waits for a row lock before voting NO.
    pub lock_timeout: Duration,
    pub limits: KvLimits,
}

impl PgOptions {
    pub fn new(conninfo: impl Into<String>, participant: impl Into<String>) -> Self {
        Self {
            conninfo: conninfo.into(),
            participant: participant.into(),
            max_connections: 16,
            lock_timeout: Duration::from_millis(200),
            limits: KvLimits::default(),
        }
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// A PostgreSQL error that belongs to the transaction (constraint, serialization, lock
/// timeout...) rather than to the connection: the branch votes NO with its message.
fn db_message(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error()
        .map(|db| format!("{} ({})", db.message(), db.code().code()))
}

#[derive(Debug)]
struct PoolInner {
    config: tokio_postgres::Config,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
}

/// A small connection pool: at most `max_connections` open at once.
#[derive(Debug, Clone)]
struct Pool(Arc<PoolInner>);

/// A pooled connection; returned to the pool on drop unless it broke.
#[derive(Debug)]
pub struct PooledClient {
    client: Option<Client>,
    pool: Pool,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for PooledClient {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("present until dropped")
    }
}

impl Drop for PooledClient {
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && !client.is_closed()
        {
            self.pool
                .0
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(client);
        }
    }
}

impl Pool {
    async fn get(&self) -> Result<PooledClient, StoreError> {
        let permit = self.0.permits.clone().acquire_owned().await.map_err(io)?;
        loop {
            let idle = self.0.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match idle {
                Some(client) if !client.is_closed() => {
                    return Ok(PooledClient {
                        client: Some(client),
                        pool: self.clone(),
                        _permit: permit,
                    });
                }
                Some(_) => continue,
                None => break,
            }
        }
        let (client, connection) = self
            .0
            .config
            .connect(NoTls)
            .await
            .map_err(|e| StoreError::Io(format!("connecting to PostgreSQL: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "PostgreSQL connection ended");
            }
        });
        Ok(PooledClient {
            client: Some(client),
            pool: self.clone(),
            _permit: permit,
        })
    }
}

/// An open (not yet prepared) PostgreSQL transaction of one branch, for a data service's
/// own SQL. Everything executed through it commits or aborts with the Ratify transaction.
#[derive(Debug, Clone)]
pub struct PgBranch {
    conn: Arc<tokio::sync::Mutex<PooledClient>>,
}

impl PgBranch {
    pub async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        self.conn.lock().await.execute(sql, params).await
    }

    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        self.conn.lock().await.query(sql, params).await
    }
}

/// The PostgreSQL store.
#[derive(Debug)]
pub struct PgStore {
    pool: Pool,
    name: String,
    staging: Staging,
    lock_timeout: Duration,
    /// Open branches (BEGIN done, not prepared).
    open: Mutex<HashMap<TxnId, PgBranch>>,
    /// Global ids of prepared branches.
    gids: Mutex<HashMap<TxnId, String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl PgStore {
    /// Connects, checks the server allows prepared transactions, and creates the tables.
    pub async fn open(options: PgOptions) -> Result<Self, StoreError> {
        crate::daemon::validate_name(&options.participant)
            .map_err(|e| StoreError::Refused(e.to_string()))?;
        let config: tokio_postgres::Config = options.conninfo.parse().map_err(|e| {
            StoreError::Refused(format!("invalid PostgreSQL connection string: {e}"))
        })?;
        let pool = Pool(Arc::new(PoolInner {
            config,
            idle: Mutex::default(),
            permits: Arc::new(Semaphore::new(options.max_connections.max(2))),
        }));
        let conn = pool.get().await?;
        let row = conn
            .query_one("SHOW max_prepared_transactions", &[])
            .await
            .map_err(io)?;
        let max: String = row.get(0);
        if max.trim() == "0" {
            return Err(StoreError::Refused(
                "the PostgreSQL server has max_prepared_transactions = 0; set it above 0 (and restart it) to use it as a participant".into(),
            ));
        }
        conn.batch_execute(SCHEMA).await.map_err(io)?;
        drop(conn);
        Ok(Self {
            pool,
            name: options.participant,
            staging: Staging::new(options.limits),
            lock_timeout: options.lock_timeout,
            open: Mutex::default(),
            gids: Mutex::default(),
        })
    }

    fn prefix(&self) -> String {
        format!("ratify:{}:", self.name)
    }

    fn gid(&self, meta: &BranchMeta) -> String {
        // Only validated parts: the name ([A-Za-z0-9._-]), a UUID, two integers.
        format!(
            "{}{}:{}:{:016x}",
            self.prefix(),
            meta.txn_id,
            meta.epoch,
            meta.digest.0
        )
    }

    fn parse_gid(&self, gid: &str) -> Option<BranchMeta> {
        let rest = gid.strip_prefix(&self.prefix())?;
        let mut parts = rest.split(':');
        let txn_id: TxnId = parts.next()?.parse().ok()?;
        let epoch: u64 = parts.next()?.parse().ok()?;
        let digest = u64::from_str_radix(parts.next()?, 16).ok()?;
        Some(BranchMeta {
            txn_id,
            epoch,
            digest: PayloadDigest(digest),
            incarnation: 0,
        })
    }

    /// The incarnation to enlist branches under (see [`Staging::incarnation`]): a branch
    /// begun before this process restarted votes NO, its open transaction being gone.
    pub fn incarnation(&self) -> u64 {
        self.staging.incarnation()
    }

    /// Begins a branch for `txn_id` (or joins the open one) for a data service's own SQL.
    pub async fn branch(&self, txn_id: TxnId) -> Result<PgBranch, StoreError> {
        if let Some(branch) = lock(&self.open).get(&txn_id) {
            return Ok(branch.clone());
        }
        let conn = self.pool.get().await?;
        conn.batch_execute("BEGIN").await.map_err(io)?;
        let branch = PgBranch {
            conn: Arc::new(tokio::sync::Mutex::new(conn)),
        };
        let stored = lock(&self.open)
            .entry(txn_id)
            .or_insert_with(|| branch.clone())
            .clone();
        if !Arc::ptr_eq(&stored.conn, &branch.conn) {
            // Another call for the same transaction won: never pool a connection that is
            // inside a transaction.
            let _ = branch.conn.lock().await.batch_execute("ROLLBACK").await;
        }
        Ok(stored)
    }

    /// Prepared transactions of this participant on the server, with their metadata.
    pub async fn scan_prepared(&self) -> Result<Vec<PreparedBranch>, StoreError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query(
                "SELECT gid, (extract(epoch from prepared) * 1000)::bigint FROM pg_prepared_xacts \
                 WHERE left(gid, length($1)) = $1 AND database = current_database()",
                &[&self.prefix()],
            )
            .await
            .map_err(io)?;
        let mut branches = Vec::new();
        for row in rows {
            let gid: String = row.get(0);
            let at: i64 = row.get(1);
            match self.parse_gid(&gid) {
                Some(meta) => {
                    lock(&self.gids).insert(meta.txn_id, gid);
                    branches.push(PreparedBranch {
                        meta,
                        prepared_at_unix_ms: at.max(0) as u64,
                    });
                }
                None => {
                    warn!(%gid, "a prepared transaction with Ratify's prefix has a malformed id; left alone")
                }
            }
        }
        Ok(branches)
    }

    async fn find_gid(&self, txn_id: &TxnId) -> Result<Option<String>, StoreError> {
        if let Some(gid) = lock(&self.gids).get(txn_id) {
            return Ok(Some(gid.clone()));
        }
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt(
                "SELECT gid FROM pg_prepared_xacts WHERE left(gid, length($1)) = $1 AND database = current_database()",
                &[&format!("{}{}:", self.prefix(), txn_id)],
            )
            .await
            .map_err(io)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn outcome(&self, txn_id: &TxnId) -> Result<Option<String>, StoreError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt(
                "SELECT outcome FROM ratify_branches WHERE participant = $1 AND txn = $2",
                &[&self.name, &txn_id.as_bytes().as_slice()],
            )
            .await
            .map_err(io)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Records a tombstone in autocommit (not forced: presumed abort covers its loss).
    async fn tombstone(
        &self,
        txn_id: &TxnId,
        outcome: &str,
        digest: Option<PayloadDigest>,
    ) -> Result<(), StoreError> {
        let conn = self.pool.get().await?;
        conn.execute(
            "INSERT INTO ratify_branches (participant, txn, outcome, digest) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (participant, txn) DO NOTHING",
            &[&self.name, &txn_id.as_bytes().as_slice(), &outcome, &digest.map(|d| d.0 as i64)],
        )
        .await
        .map_err(io)?;
        Ok(())
    }

    /// Applies key-value operations inside the branch's transaction.
    async fn apply_ops(
        &self,
        conn: &Client,
        ops: &[v1::KvOp],
    ) -> Result<Result<(), Rejection>, tokio_postgres::Error> {
        conn.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{}ms'",
            self.lock_timeout.as_millis().max(1)
        ))
        .await?;
        for op in ops {
            let Some(op) = &op.op else {
                return Ok(Err(Rejection("empty operation".into())));
            };
            let key: &[u8] = eval::key_of(op);
            let current = conn
                .query_opt(
                    "SELECT value, version FROM ratify_kv WHERE key = $1 FOR UPDATE",
                    &[&key],
                )
                .await?;
            let (value, version): (Option<Vec<u8>>, i64) =
                current.map(|r| (r.get(0), r.get(1))).unwrap_or((None, 0));
            let new_value: Option<Option<Vec<u8>>> = match op {
                Op::Check(check) => {
                    if version as u64 != check.version {
                        return Ok(Err(Rejection(format!(
                            "check failed on key {}: version is {version}, expected {}",
                            eval::show_key(key),
                            check.version
                        ))));
                    }
                    None
                }
                Op::Put(put) => Some(Some(put.value.to_vec())),
                Op::Delete(_) => Some(None),
                Op::Add(add) => {
                    let now = match &value {
                        None => 0,
                        Some(bytes) => match std::str::from_utf8(bytes)
                            .ok()
                            .and_then(|s| s.trim().parse::<i64>().ok())
                        {
                            Some(n) => n,
                            None => {
                                return Ok(Err(Rejection(format!(
                                    "key {} does not hold a decimal integer",
                                    eval::show_key(key)
                                ))));
                            }
                        },
                    };
                    let Some(result) = now.checked_add(add.delta) else {
                        return Ok(Err(Rejection(format!(
                            "add overflows on key {}",
                            eval::show_key(key)
                        ))));
                    };
                    if let Some(min) = add.min
                        && result < min
                    {
                        return Ok(Err(Rejection(format!(
                            "add of {} to key {} gives {result}, below its bound {min}",
                            add.delta,
                            eval::show_key(key)
                        ))));
                    }
                    Some(Some(result.to_string().into_bytes()))
                }
            };
            if let Some(v) = new_value {
                conn.execute(
                    "INSERT INTO ratify_kv (key, value, version) VALUES ($1, $2, 1) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, version = ratify_kv.version + 1",
                    &[&key, &v],
                )
                .await?;
            }
        }
        Ok(Ok(()))
    }

    /// Runs the branch's work up to (not including) its end: BEGIN (or the open branch),
    /// its operations, and the `committed` outcome row. Returns the connection, or the
    /// reason to vote NO (the transaction is then rolled back).
    async fn run_branch(
        &self,
        meta: &BranchMeta,
        ops: &[v1::KvOp],
    ) -> Result<Result<PgBranch, String>, StoreError> {
        let open = lock(&self.open).remove(&meta.txn_id);
        let branch = match open {
            Some(b) => b,
            None => {
                let conn = self.pool.get().await?;
                conn.batch_execute("BEGIN").await.map_err(io)?;
                PgBranch {
                    conn: Arc::new(tokio::sync::Mutex::new(conn)),
                }
            }
        };
        let result = {
            let conn = branch.conn.lock().await;
            match self.apply_ops(&conn, ops).await {
                Ok(Ok(())) => conn
                    .execute(
                        "INSERT INTO ratify_branches (participant, txn, outcome, digest) VALUES ($1, $2, 'committed', $3)",
                        &[&self.name, &meta.txn_id.as_bytes().as_slice(), &(meta.digest.0 as i64)],
                    )
                    .await
                    .map(|_| Ok(())),
                Ok(Err(Rejection(reason))) => Ok(Err(reason)),
                Err(e) => Err(e),
            }
        };
        match result {
            Ok(Ok(())) => Ok(Ok(branch)),
            Ok(Err(reason)) => {
                let _ = branch.conn.lock().await.batch_execute("ROLLBACK").await;
                Ok(Err(reason))
            }
            Err(e) => match db_message(&e) {
                Some(message) => {
                    let _ = branch.conn.lock().await.batch_execute("ROLLBACK").await;
                    Ok(Err(message))
                }
                None => {
                    let _ = branch.conn.lock().await.batch_execute("ROLLBACK").await;
                    Err(io(e))
                }
            },
        }
    }
}

impl ResourceManager for PgStore {
    async fn prepare(&self, meta: BranchMeta, payload: Bytes) -> Result<StoreVote, StoreError> {
        let ops = match self.staging.take(&meta, &payload) {
            Ok(ops) => ops,
            Err(Rejection(reason)) => {
                self.tombstone(&meta.txn_id, "aborted", Some(meta.digest))
                    .await?;
                return Ok(StoreVote::No { reason });
            }
        };
        let writes = ops
            .iter()
            .any(|o| !matches!(o.op, Some(Op::Check(_)) | None));
        let has_open = lock(&self.open).contains_key(&meta.txn_id);
        if !writes && !has_open {
            if ops.is_empty() {
                self.tombstone(&meta.txn_id, "read-only", Some(meta.digest))
                    .await?;
                return Ok(StoreVote::ReadOnly);
            }
            // Checks only: validate them, then nothing to commit.
            let conn = self.pool.get().await?;
            conn.batch_execute("BEGIN").await.map_err(io)?;
            let checked = self.apply_ops(&conn, &ops).await;
            let _ = conn.batch_execute("ROLLBACK").await;
            // Released before the tombstone takes a connection of its own: holding one
            // while waiting for another could exhaust the pool.
            drop(conn);
            return match checked {
                Ok(Ok(())) => {
                    self.tombstone(&meta.txn_id, "read-only", Some(meta.digest))
                        .await?;
                    Ok(StoreVote::ReadOnly)
                }
                Ok(Err(Rejection(reason))) => {
                    self.tombstone(&meta.txn_id, "aborted", Some(meta.digest))
                        .await?;
                    Ok(StoreVote::No { reason })
                }
                Err(e) => match db_message(&e) {
                    Some(reason) => Ok(StoreVote::No { reason }),
                    None => Err(io(e)),
                },
            };
        }
        let branch = match self.run_branch(&meta, &ops).await? {
            Ok(branch) => branch,
            Err(reason) => {
                self.tombstone(&meta.txn_id, "aborted", Some(meta.digest))
                    .await?;
                return Ok(StoreVote::No { reason });
            }
        };
        let gid = self.gid(&meta);
        // The id is a literal: it is built from validated parts only (see gid()). Not a
        // `Transaction` guard: after PREPARE the session has no transaction to roll back.
        let prepared = branch
            .conn
            .lock()
            .await
            .batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
            .await;
        drop(branch);
        if let Err(e) = prepared {
            return match db_message(&e) {
                // PostgreSQL rolled the transaction back (e.g. a serialization failure).
                Some(reason) => {
                    self.tombstone(&meta.txn_id, "aborted", Some(meta.digest))
                        .await?;
                    Ok(StoreVote::No { reason })
                }
                None => Err(io(e)),
            };
        }
        lock(&self.gids).insert(meta.txn_id, gid);
        // PREPARE TRANSACTION returned: the branch is on disk (with synchronous_commit on)
        // and survives a crash of this process or of the server.
        crash_point!("participant::pg::prepared");
        Ok(StoreVote::Yes)
    }

    async fn commit(&self, txn_id: TxnId) -> Result<(), StoreError> {
        let Some(gid) = self.find_gid(&txn_id).await? else {
            // No prepared transaction: committed before (its outcome row says so), or lost.
            return match self.outcome(&txn_id).await?.as_deref() {
                Some("committed") => Ok(()),
                other => Err(StoreError::Io(format!(
                    "no prepared transaction for {txn_id} (outcome {other:?})"
                ))),
            };
        };
        let conn = self.pool.get().await?;
        // COMMIT PREPARED is durable on return; the outcome row commits with it.
        let committed = conn
            .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
            .await;
        drop(conn);
        match committed {
            Ok(()) => {}
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => {
                if self.outcome(&txn_id).await?.as_deref() != Some("committed") {
                    return Err(StoreError::Io(format!(
                        "prepared transaction {gid} vanished without committing"
                    )));
                }
            }
            Err(e) => return Err(io(e)),
        }
        lock(&self.gids).remove(&txn_id);
        Ok(())
    }

    async fn abort(&self, txn_id: TxnId) -> Result<(), StoreError> {
        self.staging.discard(&txn_id);
        let open = lock(&self.open).remove(&txn_id);
        if let Some(branch) = open {
            let _ = branch.conn.lock().await.batch_execute("ROLLBACK").await;
        }
        if let Some(gid) = self.find_gid(&txn_id).await? {
            let conn = self.pool.get().await?;
            let rolled_back = conn
                .batch_execute(&format!("ROLLBACK PREPARED '{gid}'"))
                .await;
            drop(conn);
            match rolled_back {
                Ok(()) => {}
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_OBJECT) => {}
                Err(e) => return Err(io(e)),
            }
            lock(&self.gids).remove(&txn_id);
        }
        self.tombstone(&txn_id, "aborted", None).await
    }

    async fn commit_one_phase(
        &self,
        meta: BranchMeta,
        payload: Bytes,
    ) -> Result<OnePhaseOutcome, StoreError> {
        // A retry whose first attempt's answer was lost: the outcome row decides.
        match self.outcome(&meta.txn_id).await?.as_deref() {
            Some("committed") => return Ok(OnePhaseOutcome::Committed),
            Some(_) => {
                return Ok(OnePhaseOutcome::Aborted {
                    reason: "the branch was aborted".into(),
                });
            }
            None => {}
        }
        let ops = match self.staging.take(&meta, &payload) {
            Ok(ops) => ops,
            Err(Rejection(reason)) => {
                self.tombstone(&meta.txn_id, "aborted", Some(meta.digest))
                    .await?;
                return Ok(OnePhaseOutcome::Aborted { reason });
            }
        };
        let branch = match self.run_branch(&meta, &ops).await {
            Ok(Ok(branch)) => branch,
            Ok(Err(reason)) => {
                self.tombstone(&meta.txn_id, "aborted", Some(meta.digest))
                    .await?;
                return Ok(OnePhaseOutcome::Aborted { reason });
            }
            Err(error) => {
                // Nothing was committed: keep the operations for the retry.
                self.staging.restore(meta.txn_id, ops);
                return Err(error);
            }
        };
        let committed = branch.conn.lock().await.batch_execute("COMMIT").await;
        drop(branch);
        match committed {
            Ok(()) => Ok(OnePhaseOutcome::Committed),
            Err(e) => match db_message(&e) {
                Some(reason) => {
                    self.tombstone(&meta.txn_id, "aborted", Some(meta.digest))
                        .await?;
                    Ok(OnePhaseOutcome::Aborted { reason })
                }
                None => {
                    // The connection broke around COMMIT: the outcome row, written in
                    // the same transaction, tells whether it took effect.
                    if self.outcome(&meta.txn_id).await?.as_deref() == Some("committed") {
                        Ok(OnePhaseOutcome::Committed)
                    } else {
                        self.staging.restore(meta.txn_id, ops);
                        Err(io(e))
                    }
                }
            },
        }
    }

    async fn recover(&self) -> Result<Recovered, StoreError> {
        let prepared = self.scan_prepared().await?;
        let conn = self.pool.get().await?;
        let rows = conn
            .query(
                "SELECT txn, outcome, digest, (extract(epoch from finished_at) * 1000)::bigint \
                 FROM ratify_branches WHERE participant = $1",
                &[&self.name],
            )
            .await
            .map_err(io)?;
        let mut tombstones = Vec::new();
        for row in rows {
            let txn: Vec<u8> = row.get(0);
            let outcome: String = row.get(1);
            let digest: Option<i64> = row.get(2);
            let at: i64 = row.get(3);
            let Ok(txn_id) = TxnId::try_from(txn.as_slice()) else {
                continue;
            };
            let finished_as = match outcome.as_str() {
                "committed" => FinishedAs::Committed,
                "read-only" => FinishedAs::ReadOnly,
                _ => FinishedAs::Aborted,
            };
            tombstones.push(Tombstone {
                txn_id,
                finished_as,
                digest: digest.map(|d| PayloadDigest(d as u64)),
                finished_at_unix_ms: at.max(0) as u64,
            });
        }
        Ok(Recovered {
            prepared,
            tombstones,
        })
    }

    async fn forget(&self, txn_ids: Vec<TxnId>) -> Result<(), StoreError> {
        let ids: Vec<Vec<u8>> = txn_ids.iter().map(|t| t.to_vec()).collect();
        let conn = self.pool.get().await?;
        conn.execute(
            "DELETE FROM ratify_branches WHERE participant = $1 AND txn = ANY($2)",
            &[&self.name, &ids],
        )
        .await
        .map_err(io)?;
        Ok(())
    }
}

impl KvStore for PgStore {
    fn staging(&self) -> &Staging {
        &self.staging
    }

    async fn read(&self, key: &[u8]) -> Result<Versioned, StoreError> {
        let conn = self.pool.get().await?;
        // Autocommit read: only committed rows are visible, never a prepared branch's.
        let row = conn
            .query_opt(
                "SELECT value, version FROM ratify_kv WHERE key = $1",
                &[&key],
            )
            .await
            .map_err(io)?;
        Ok(match row {
            Some(r) => Versioned {
                value: r.get(0),
                version: r.get::<_, i64>(1) as u64,
            },
            None => Versioned::default(),
        })
    }
}
