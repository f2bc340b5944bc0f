//! The gRPC Participant service: validates each request, turns wire types into domain
//! types, and hands every batch entry to the runtime concurrently (so a store can serve
//! a whole batch with one fsync).

use std::sync::Arc;

use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_proto::v1::participant_server::Participant;
use tonic::{Request, Response, Status};

use crate::branch::Vote;
use crate::runtime::{Decision, Refused, Runtime};
use crate::store::{BranchMeta, OnePhaseOutcome, PayloadDigest, ResourceManager};

/// The Participant service over a runtime.
#[derive(Debug)]
pub struct ParticipantService<R> {
    runtime: Arc<Runtime<R>>,
    /// Set by [`Self::close_streams`]; every clone shares it.
    streams_closing: Arc<tokio::sync::watch::Sender<bool>>,
    /// Permits for streamed requests under way, across every stream.
    streams_in_flight: Arc<tokio::sync::Semaphore>,
}

impl<R> ParticipantService<R> {
    pub fn new(runtime: Arc<Runtime<R>>) -> Self {
        Self {
            runtime,
            streams_closing: Arc::new(tokio::sync::watch::Sender::new(false)),
            streams_in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_STREAM_IN_FLIGHT)),
        }
    }

    /// Ends every `PrepareStream` once the requests under way on it are answered, and
    /// any opened later as soon as it starts. Call it when shutting down: a coordinator
    /// keeps its stream open for as long as it runs, and a graceful shutdown waits for
    /// open streams to end. The coordinator then fails nothing that was answered, and
    /// sends its next batches on a new stream (to the restarted participant).
    pub fn close_streams(&self) {
        self.streams_closing.send_replace(true);
    }
}

impl<R> Clone for ParticipantService<R> {
    fn clone(&self) -> Self {
        Self {
            runtime: self.runtime.clone(),
            streams_closing: self.streams_closing.clone(),
            streams_in_flight: self.streams_in_flight.clone(),
        }
    }
}

/// Prepare requests all `PrepareStream`s of one service may have under way at once; past
/// it no stream is read until one is answered (HTTP/2 flow control then holds the
/// coordinator back).
pub const MAX_STREAM_IN_FLIGHT: usize = 1024;

/// The answer stream of `PrepareStream`.
pub type PrepareAnswers = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<v1::PrepareStreamResponse, Status>> + Send>,
>;

fn txn_id(bytes: &bytes::Bytes) -> Result<TxnId, Status> {
    TxnId::try_from(bytes).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn branch_error(refused: Refused) -> v1::BranchError {
    v1::BranchError {
        code: refused.0 as i32,
        message: refused.1,
    }
}

impl<R: ResourceManager> ParticipantService<R> {
    fn check_batch(&self, len: usize) -> Result<(), Status> {
        if len == 0 {
            return Err(Status::invalid_argument("empty batch"));
        }
        let max = self.runtime.config().max_batch;
        if len > max {
            return Err(Status::invalid_argument(format!(
                "batch of {len} entries exceeds the limit of {max}"
            )));
        }
        Ok(())
    }

    /// Answers one `PrepareStream` request exactly as `Prepare` would answer it.
    async fn answer_streamed(
        &self,
        message: v1::PrepareStreamRequest,
    ) -> v1::PrepareStreamResponse {
        let id = message.id;
        let answer = match message.request {
            None => Err(Status::invalid_argument(
                "a PrepareStream request without a request",
            )),
            Some(request) => self.prepare(Request::new(request)).await,
        };
        match answer {
            Ok(response) => v1::PrepareStreamResponse {
                id,
                response: Some(response.into_inner()),
                error: None,
            },
            Err(status) => v1::PrepareStreamResponse {
                id,
                response: None,
                error: Some(v1::BranchError {
                    code: status.code() as i32,
                    message: status.message().to_string(),
                }),
            },
        }
    }

    /// Applies one decision to every entry of a batch, concurrently, each answered on its own.
    async fn decide(
        &self,
        branches: &[v1::DecisionBranch],
        decision: Decision,
    ) -> Result<Vec<v1::AckResult>, Status> {
        let entries = self.decision_entries(branches)?;
        let txn_ids: Vec<TxnId> = entries.iter().map(|(txn_id, _)| *txn_id).collect();
        let results = self.runtime.decide_batch(entries, decision).await;
        Ok(txn_ids
            .into_iter()
            .zip(results)
            .map(|(txn_id, result)| v1::AckResult {
                txn_id: txn_id.to_vec().into(),
                error: result.err().map(branch_error),
            })
            .collect())
    }

    /// Validates a whole batch of decision entries before acting on any, so a malformed
    /// entry changes nothing.
    fn decision_entries(
        &self,
        branches: &[v1::DecisionBranch],
    ) -> Result<Vec<(TxnId, u64)>, Status> {
        self.check_batch(branches.len())?;
        branches
            .iter()
            .map(|b| Ok((txn_id(&b.txn_id)?, b.epoch)))
            .collect()
    }
}

#[tonic::async_trait]
impl<R: ResourceManager> Participant for ParticipantService<R> {
    type PrepareStreamStream = PrepareAnswers;

    /// Serves each request on a task of its own, as separate Prepare calls would be, and
    /// answers it when it is done: a batch waiting on a lock holds up no other.
    async fn prepare_stream(
        &self,
        request: Request<tonic::Streaming<v1::PrepareStreamRequest>>,
    ) -> Result<Response<PrepareAnswers>, Status> {
        let mut requests = request.into_inner();
        let (answers, mut receiver) = tokio::sync::mpsc::channel(MAX_STREAM_IN_FLIGHT);
        let in_flight = self.streams_in_flight.clone();
        let service = self.clone();
        let mut closing = self.streams_closing.subscribe();
        tokio::spawn(async move {
            loop {
                // Ends when the coordinator closes its side, the stream breaks, or the
                // participant shuts down; what is under way still finishes (its answer
                // may find no reader).
                let next = async {
                    let permit = in_flight.clone().acquire_owned().await;
                    (permit, requests.message().await)
                };
                let (permit, message) = tokio::select! {
                    biased;
                    _ = closing.wait_for(|closing| *closing) => break,
                    next = next => next,
                };
                let Ok(permit) = permit else {
                    break;
                };
                let message = match message {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(status) => {
                        // Undecodable or over the size limit: the coordinator learns why
                        // (the stream cannot go on after a bad frame).
                        let _ = answers.send(Err(status)).await;
                        break;
                    }
                };
                let (service, answers) = (service.clone(), answers.clone());
                tokio::spawn(async move {
                    let answer = service.answer_streamed(message).await;
                    let _ = answers.send(Ok(answer)).await;
                    drop(permit);
                });
            }
        });
        // The answers end once the reader and every request under way are done.
        let answers = futures::stream::poll_fn(move |cx| receiver.poll_recv(cx));
        Ok(Response::new(Box::pin(answers)))
    }

    async fn prepare(
        &self,
        request: Request<v1::PrepareRequest>,
    ) -> Result<Response<v1::PrepareResponse>, Status> {
        let request = request.into_inner();
        // The whole request is validated before any entry is acted on: a malformed entry
        // changes nothing.
        self.check_batch(request.branches.len())?;
        let carried = request.commits.len() + request.aborts.len();
        let max = self.runtime.config().max_batch;
        if carried > max {
            return Err(Status::invalid_argument(format!(
                "{carried} carried decisions exceed the limit of {max}"
            )));
        }
        let mut decisions = Vec::with_capacity(carried);
        for (branches, decision) in [
            (&request.commits, Decision::Commit),
            (&request.aborts, Decision::Abort),
        ] {
            for branch in branches {
                decisions.push((txn_id(&branch.txn_id)?, branch.epoch, decision));
            }
        }
        let mut ids: Vec<&TxnId> = decisions.iter().map(|d| &d.0).collect();
        ids.sort_unstable();
        if let Some(pair) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(Status::invalid_argument(format!(
                "transaction {} has more than one carried decision",
                pair[0]
            )));
        }
        let mut entries = Vec::with_capacity(request.branches.len());
        for branch in request.branches {
            let meta = BranchMeta {
                txn_id: txn_id(&branch.txn_id)?,
                epoch: branch.epoch,
                digest: PayloadDigest::of(&branch.payload),
                incarnation: branch.incarnation,
            };
            entries.push((meta, branch.payload));
        }
        let txn_ids: Vec<TxnId> = entries.iter().map(|(meta, _)| meta.txn_id).collect();
        let decided: Vec<(TxnId, Decision)> = decisions.iter().map(|d| (d.0, d.2)).collect();
        let (acks, answers) = self.runtime.decide_then_prepare(decisions, entries).await;
        let results = txn_ids
            .into_iter()
            .zip(answers)
            .map(|(txn_id, answer)| {
                let (vote, reason) = match answer.vote {
                    Vote::Yes => (v1::Vote::Yes, String::new()),
                    Vote::No { reason } => (v1::Vote::No, reason),
                    Vote::ReadOnly => (v1::Vote::ReadOnly, String::new()),
                };
                v1::PrepareResult {
                    txn_id: txn_id.to_vec().into(),
                    vote: vote as i32,
                    reason,
                    error: answer.error.map(branch_error),
                }
            })
            .collect();
        let (mut commit_results, mut abort_results) = (Vec::new(), Vec::new());
        for ((txn_id, decision), result) in decided.into_iter().zip(acks) {
            let ack = v1::AckResult {
                txn_id: txn_id.to_vec().into(),
                error: result.err().map(branch_error),
            };
            match decision {
                Decision::Commit => commit_results.push(ack),
                Decision::Abort => abort_results.push(ack),
            }
        }
        Ok(Response::new(v1::PrepareResponse {
            results,
            commit_results,
            abort_results,
        }))
    }

    async fn commit(
        &self,
        request: Request<v1::CommitRequest>,
    ) -> Result<Response<v1::CommitResponse>, Status> {
        let results = self
            .decide(&request.into_inner().branches, Decision::Commit)
            .await?;
        Ok(Response::new(v1::CommitResponse { results }))
    }

    async fn abort(
        &self,
        request: Request<v1::AbortRequest>,
    ) -> Result<Response<v1::AbortResponse>, Status> {
        let results = self
            .decide(&request.into_inner().branches, Decision::Abort)
            .await?;
        Ok(Response::new(v1::AbortResponse { results }))
    }

    async fn commit_one_phase(
        &self,
        request: Request<v1::CommitOnePhaseRequest>,
    ) -> Result<Response<v1::CommitOnePhaseResponse>, Status> {
        let request = request.into_inner();
        let meta = BranchMeta {
            txn_id: txn_id(&request.txn_id)?,
            epoch: request.epoch,
            digest: PayloadDigest::of(&request.payload),
            incarnation: request.incarnation,
        };
        match self.runtime.commit_one_phase(meta, request.payload).await {
            Ok(OnePhaseOutcome::Committed) => Ok(Response::new(v1::CommitOnePhaseResponse {
                committed: true,
                reason: String::new(),
            })),
            Ok(OnePhaseOutcome::Aborted { reason }) => {
                Ok(Response::new(v1::CommitOnePhaseResponse {
                    committed: false,
                    reason,
                }))
            }
            Err((code, message)) => Err(Status::new(code, message)),
        }
    }

    async fn get_stats(
        &self,
        _request: Request<v1::ParticipantStatsRequest>,
    ) -> Result<Response<v1::ParticipantStats>, Status> {
        let stats = self.runtime.store().stats();
        Ok(Response::new(v1::ParticipantStats {
            flushes: stats.flushes,
            flush_waiters: stats.flush_waiters,
            prepared: self
                .runtime
                .prepared_total
                .load(std::sync::atomic::Ordering::Relaxed),
        }))
    }

    async fn list_in_doubt(
        &self,
        request: Request<v1::ListInDoubtRequest>,
    ) -> Result<Response<v1::ListInDoubtResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => 1000,
            n => n.min(100_000) as usize,
        };
        let (branches, total) = self.runtime.in_doubt(limit);
        Ok(Response::new(v1::ListInDoubtResponse {
            branches: branches
                .into_iter()
                .map(|b| v1::InDoubtBranch {
                    txn_id: b.txn_id.to_vec().into(),
                    epoch: b.epoch,
                    prepared_at_unix_ms: b.prepared_at_unix_ms,
                    last_inquiry: b.last_inquiry,
                    inquiries: b.inquiries,
                })
                .collect(),
            total: total as u64,
        }))
    }
}
