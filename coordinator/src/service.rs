//! The gRPC edge: the Coordinator and Admin services. Each request is validated (ids,
//! names, sizes) and turned into an engine input; engine refusals become gRPC statuses.

use bytes::Bytes;
use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_proto::v1::admin_server::Admin;
use ratify_proto::v1::coordinator_server::Coordinator;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, ExecuteBranch, Input, Outcome, Refusal, Reply, Txn, TxnState};
use crate::log::Decision;
use crate::registry::{validate_endpoint, validate_name};
use crate::runtime::{Handle, unix_ms};

/// Limits checked at the edge.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_total_payload_bytes: usize,
    pub max_reason_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1 << 20,
            max_total_payload_bytes: 4 << 20,
            max_reason_bytes: 4096,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CoordinatorService {
    handle: Handle,
    limits: Limits,
}

impl CoordinatorService {
    pub fn new(handle: Handle, limits: Limits) -> Self {
        Self { handle, limits }
    }
}

fn txn_id(bytes: &Bytes) -> Result<TxnId, Status> {
    TxnId::try_from(bytes).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn to_status(refusal: Refusal) -> Status {
    match refusal {
        Refusal::NotFound(m) => Status::not_found(m),
        Refusal::FailedPrecondition(m) => Status::failed_precondition(m),
        Refusal::ResourceExhausted(m) => Status::resource_exhausted(m),
        Refusal::InvalidArgument(m) => Status::invalid_argument(m),
        Refusal::DeadlineExceeded(m) => Status::deadline_exceeded(m),
    }
}

fn outcome_to_wire(outcome: Outcome) -> v1::Outcome {
    match outcome {
        Outcome::Committed => v1::Outcome::Committed,
        Outcome::Aborted => v1::Outcome::Aborted,
        Outcome::InProgress => v1::Outcome::InProgress,
        Outcome::Unknown => v1::Outcome::Unknown,
    }
}

/// Time from a commit request to its answer, by outcome.
fn record_commit_latency(started: std::time::Instant, outcome: Outcome) {
    let label = match outcome {
        Outcome::Committed => "committed",
        Outcome::Aborted => "aborted",
        Outcome::InProgress | Outcome::Unknown => "unknown",
    };
    metrics::histogram!("ratify_commit_latency_seconds", "outcome" => label)
        .record(started.elapsed().as_secs_f64());
}

fn stopped() -> Status {
    Status::unavailable("the coordinator is shutting down")
}

/// Text that goes into the log and the timeline: bounded, no control characters (so it
/// cannot forge log lines or terminal escapes).
fn clean_text(text: &str, max: usize, what: &str) -> Result<String, Status> {
    if text.len() > max {
        return Err(Status::invalid_argument(format!(
            "{what} is longer than {max} bytes"
        )));
    }
    if text.chars().any(|c| c.is_control()) {
        return Err(Status::invalid_argument(format!(
            "{what} contains control characters"
        )));
    }
    Ok(text.to_string())
}

async fn outcome_reply(
    handle: &Handle,
    make: impl FnOnce(crate::engine::ReqId) -> Input,
) -> Result<(TxnId, Outcome, String), Status> {
    match handle.request(make).await.ok_or_else(stopped)? {
        Reply::Outcome {
            txn,
            outcome,
            reason,
        } => Ok((txn, outcome, reason)),
        Reply::Refused(r) => Err(to_status(r)),
        other => Err(Status::internal(format!(
            "unexpected engine reply {other:?}"
        ))),
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn begin(
        &self,
        request: Request<v1::BeginRequest>,
    ) -> Result<Response<v1::BeginResponse>, Status> {
        let timeout_ms = request.into_inner().timeout_ms;
        let txn = TxnId::generate();
        match self
            .handle
            .request(|req| Input::Begin {
                txn,
                timeout_ms,
                req,
            })
            .await
            .ok_or_else(stopped)?
        {
            Reply::Begun { txn } => Ok(Response::new(v1::BeginResponse {
                txn_id: txn.to_vec().into(),
                txn_id_text: txn.to_string(),
            })),
            Reply::Refused(r) => Err(to_status(r)),
            other => Err(Status::internal(format!(
                "unexpected engine reply {other:?}"
            ))),
        }
    }

    async fn enlist(
        &self,
        request: Request<v1::EnlistRequest>,
    ) -> Result<Response<v1::EnlistResponse>, Status> {
        let request = request.into_inner();
        let txn = txn_id(&request.txn_id)?;
        validate_name(&request.participant).map_err(Status::invalid_argument)?;
        let registry = &self.handle.registry;
        if !request.endpoint.is_empty() {
            validate_endpoint(&request.endpoint).map_err(Status::invalid_argument)?;
            registry
                .register(&request.participant, &request.endpoint)
                .map_err(Status::failed_precondition)?;
        }
        let endpoint = registry.endpoint(&request.participant).ok_or_else(|| {
            Status::failed_precondition(format!(
                "participant {} is not registered",
                request.participant
            ))
        })?;
        let participant = request.participant;
        let incarnation = request.incarnation;
        match self
            .handle
            .request(|req| Input::Enlist {
                txn,
                participant,
                incarnation,
                endpoint,
                req,
            })
            .await
            .ok_or_else(stopped)?
        {
            Reply::Enlisted { epoch } => Ok(Response::new(v1::EnlistResponse { epoch })),
            Reply::Refused(r) => Err(to_status(r)),
            other => Err(Status::internal(format!(
                "unexpected engine reply {other:?}"
            ))),
        }
    }

    async fn commit(
        &self,
        request: Request<v1::CommitTxnRequest>,
    ) -> Result<Response<v1::CommitTxnResponse>, Status> {
        let request = request.into_inner();
        let txn = txn_id(&request.txn_id)?;
        let wait_for_phase2 = request.wait_for_phase2;
        let started = std::time::Instant::now();
        let (_, outcome, reason) = outcome_reply(&self.handle, |req| Input::Commit {
            txn,
            wait_for_phase2,
            req,
        })
        .await?;
        record_commit_latency(started, outcome);
        Ok(Response::new(v1::CommitTxnResponse {
            outcome: outcome_to_wire(outcome) as i32,
            reason,
        }))
    }

    async fn abort(
        &self,
        request: Request<v1::AbortTxnRequest>,
    ) -> Result<Response<v1::AbortTxnResponse>, Status> {
        let request = request.into_inner();
        let txn = txn_id(&request.txn_id)?;
        let reason = clean_text(&request.reason, self.limits.max_reason_bytes, "reason")?;
        let (_, outcome, _) =
            outcome_reply(&self.handle, |req| Input::Abort { txn, reason, req }).await?;
        Ok(Response::new(v1::AbortTxnResponse {
            outcome: outcome_to_wire(outcome) as i32,
        }))
    }

    async fn execute(
        &self,
        request: Request<v1::ExecuteRequest>,
    ) -> Result<Response<v1::ExecuteResponse>, Status> {
        let request = request.into_inner();
        let mut total = 0usize;
        let mut branches = Vec::with_capacity(request.branches.len());
        for branch in request.branches {
            validate_name(&branch.participant).map_err(Status::invalid_argument)?;
            if branch.payload.len() > self.limits.max_payload_bytes {
                return Err(Status::invalid_argument(format!(
                    "payload for {} is {} bytes; the limit is {}",
                    branch.participant,
                    branch.payload.len(),
                    self.limits.max_payload_bytes
                )));
            }
            total += branch.payload.len();
            if total > self.limits.max_total_payload_bytes {
                return Err(Status::invalid_argument(format!(
                    "payloads exceed {} bytes in all",
                    self.limits.max_total_payload_bytes
                )));
            }
            // Only registered participants are dialled; the request names, never addresses.
            let endpoint = self
                .handle
                .registry
                .endpoint(&branch.participant)
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "participant {} is not registered",
                        branch.participant
                    ))
                })?;
            branches.push(ExecuteBranch {
                participant: branch.participant,
                endpoint,
                payload: branch.payload,
            });
        }
        let txn = TxnId::generate();
        let (timeout_ms, wait_for_phase2) = (request.timeout_ms, request.wait_for_phase2);
        let started = std::time::Instant::now();
        let (txn, outcome, reason) = outcome_reply(&self.handle, |req| Input::Execute {
            txn,
            branches,
            timeout_ms,
            wait_for_phase2,
            req,
        })
        .await?;
        record_commit_latency(started, outcome);
        Ok(Response::new(v1::ExecuteResponse {
            txn_id: txn.to_vec().into(),
            outcome: outcome_to_wire(outcome) as i32,
            reason,
        }))
    }

    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let request = request.into_inner();
        validate_name(&request.participant).map_err(Status::invalid_argument)?;
        validate_endpoint(&request.endpoint).map_err(Status::invalid_argument)?;
        self.handle
            .registry
            .register(&request.participant, &request.endpoint)
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(v1::RegisterResponse {
            epoch: self.handle.epoch(),
        }))
    }

    async fn get_outcome(
        &self,
        request: Request<v1::GetOutcomeRequest>,
    ) -> Result<Response<v1::GetOutcomeResponse>, Status> {
        let request = request.into_inner();
        let txn = txn_id(&request.txn_id)?;
        let for_participant = !request.participant.is_empty();
        if for_participant {
            validate_name(&request.participant).map_err(Status::invalid_argument)?;
        }
        let outcome = self
            .handle
            .query(move |engine| engine.outcome(&txn, for_participant))
            .await
            .ok_or_else(stopped)?;
        Ok(Response::new(v1::GetOutcomeResponse {
            outcome: outcome_to_wire(outcome) as i32,
        }))
    }
}

/// The Admin service.
#[derive(Debug, Clone)]
pub struct AdminService {
    handle: Handle,
    limits: Limits,
}

impl AdminService {
    pub fn new(handle: Handle, limits: Limits) -> Self {
        Self { handle, limits }
    }
}

fn state_to_wire(state: TxnState) -> v1::TxnState {
    match state {
        TxnState::Active => v1::TxnState::Active,
        TxnState::Preparing => v1::TxnState::Preparing,
        TxnState::Deciding => v1::TxnState::Deciding,
        TxnState::Committed => v1::TxnState::Committed,
        TxnState::Aborted => v1::TxnState::Aborted,
    }
}

fn summary(t: &Txn, now: u64) -> v1::TxnSummary {
    v1::TxnSummary {
        txn_id: t.id.to_vec().into(),
        txn_id_text: t.id.to_string(),
        state: state_to_wire(t.state) as i32,
        age_ms: now.saturating_sub(t.started_at),
        participants: t
            .branches
            .iter()
            .map(|b| v1::ParticipantBranch {
                participant: b.participant.clone(),
                state: b.state.as_str().to_string(),
                last_error: b.last_error.clone(),
                attempts: b.attempts,
            })
            .collect(),
        pending: t.pending().into_iter().map(str::to_string).collect(),
        last_error: if t.last_error.is_empty() {
            t.abort_reason.clone()
        } else {
            t.last_error.clone()
        },
    }
}

fn list(
    engine: &Engine,
    filter: &v1::ListTransactionsRequest,
    now: u64,
) -> v1::ListTransactionsResponse {
    let limit = match filter.limit {
        0 => 1000,
        n => n.min(10_000) as usize,
    };
    let state = v1::TxnState::try_from(filter.state).unwrap_or(v1::TxnState::Unspecified);
    let mut matching: Vec<&Txn> = engine
        .txns()
        .filter(|t| !filter.in_doubt_only || t.in_doubt())
        .filter(|t| state == v1::TxnState::Unspecified || state_to_wire(t.state) == state)
        .filter(|t| now.saturating_sub(t.started_at) >= filter.min_age_ms)
        .collect();
    let total = matching.len() as u64;
    matching.sort_by_key(|t| (t.started_at, t.id));
    v1::ListTransactionsResponse {
        transactions: matching
            .into_iter()
            .take(limit)
            .map(|t| summary(t, now))
            .collect(),
        total,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_transactions(
        &self,
        request: Request<v1::ListTransactionsRequest>,
    ) -> Result<Response<v1::ListTransactionsResponse>, Status> {
        let filter = request.into_inner();
        if v1::TxnState::try_from(filter.state).is_err() {
            return Err(Status::invalid_argument(format!(
                "unknown state {}",
                filter.state
            )));
        }
        let now = unix_ms();
        let response = self
            .handle
            .query(move |engine| list(engine, &filter, now))
            .await
            .ok_or_else(stopped)?;
        Ok(Response::new(response))
    }

    async fn get_transaction(
        &self,
        request: Request<v1::GetTransactionRequest>,
    ) -> Result<Response<v1::TransactionDetail>, Status> {
        let txn = txn_id(&request.into_inner().txn_id)?;
        let now = unix_ms();
        let detail = self
            .handle
            .query(move |engine| match engine.txn(&txn) {
                Some(t) => Some(v1::TransactionDetail {
                    summary: Some(summary(t, now)),
                    timeline: t
                        .timeline
                        .iter()
                        .map(|e| v1::TimelineEvent {
                            at_unix_ms: e.at,
                            event: e.what.clone(),
                        })
                        .collect(),
                    outcome: outcome_to_wire(engine.outcome(&txn, false)) as i32,
                }),
                None => match engine.outcome(&txn, false) {
                    Outcome::Unknown => None,
                    known => Some(v1::TransactionDetail {
                        summary: None,
                        timeline: Vec::new(),
                        outcome: outcome_to_wire(known) as i32,
                    }),
                },
            })
            .await
            .ok_or_else(stopped)?;
        detail
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no record of transaction {txn}")))
    }

    async fn resolve(
        &self,
        request: Request<v1::ResolveRequest>,
    ) -> Result<Response<v1::ResolveResponse>, Status> {
        let request = request.into_inner();
        let txn = txn_id(&request.txn_id)?;
        let decision = match v1::Outcome::try_from(request.decision) {
            Ok(v1::Outcome::Committed) => Decision::Commit,
            Ok(v1::Outcome::Aborted) => Decision::Abort,
            _ => {
                return Err(Status::invalid_argument(
                    "decision must be COMMITTED or ABORTED",
                ));
            }
        };
        let reason = clean_text(&request.reason, self.limits.max_reason_bytes, "reason")?;
        if reason.trim().is_empty() {
            return Err(Status::invalid_argument("a reason is required"));
        }
        let actor = clean_text(&request.actor, 256, "actor")?;
        match self
            .handle
            .request(|req| Input::Resolve {
                txn,
                decision,
                actor,
                reason,
                req,
            })
            .await
            .ok_or_else(stopped)?
        {
            Reply::Resolved { outcome, message } => Ok(Response::new(v1::ResolveResponse {
                outcome: outcome_to_wire(outcome) as i32,
                message,
            })),
            Reply::Refused(r) => Err(to_status(r)),
            other => Err(Status::internal(format!(
                "unexpected engine reply {other:?}"
            ))),
        }
    }

    async fn get_stats(
        &self,
        _request: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::CoordinatorStats>, Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let log = self.handle.log_stats();
        let counters = &self.handle.counters;
        let in_flight = self
            .handle
            .query(|engine| engine.in_flight() as u64)
            .await
            .ok_or_else(stopped)?;
        Ok(Response::new(v1::CoordinatorStats {
            epoch: self.handle.epoch(),
            log_records: log.records,
            log_batches: log.batches,
            log_fsyncs: log.fsyncs,
            participant_rpcs: counters.participant_rpcs.load(Relaxed),
            participant_branches: counters.participant_branches.load(Relaxed),
            committed: counters.committed.load(Relaxed),
            aborted: counters.aborted.load(Relaxed),
            in_flight,
        }))
    }

    async fn list_participants(
        &self,
        _request: Request<v1::ListParticipantsRequest>,
    ) -> Result<Response<v1::ListParticipantsResponse>, Status> {
        Ok(Response::new(v1::ListParticipantsResponse {
            participants: self
                .handle
                .registry
                .list()
                .into_iter()
                .map(|(name, entry)| v1::ParticipantInfo {
                    name,
                    endpoint: entry.endpoint,
                    source: entry.source.as_str().to_string(),
                })
                .collect(),
        }))
    }
}
