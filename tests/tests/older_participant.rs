//! A participant built before Prepare could carry decisions (rolling upgrades: the data
//! services that embed the participant crate upgrade on their own schedule). It drops
//! the carried decisions unread and answers only the prepares; the coordinator must
//! notice, stop carrying to it, and bring every ignored decision to it alone, so that no
//! transaction stays in doubt.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_proto::v1::participant_server::{Participant, ParticipantServer};
use ratify_tests::{
    Stack, StackOptions, coordinator, coordinator_in_doubt, eventually, payload, put,
};
use tonic::{Request, Response, Status};

/// What the older participant saw.
#[derive(Default)]
struct Seen {
    /// Prepare calls that carried decisions it could not read.
    prepares_with_decisions: usize,
    /// Transactions it received a Commit RPC for.
    committed: HashSet<TxnId>,
    /// PrepareStream calls it refused.
    stream_attempts: usize,
}

/// Votes YES to everything and acknowledges every Commit and Abort RPC, as a participant
/// of the previous protocol version would; its `PrepareResponse` has no decision results.
#[derive(Clone, Default)]
struct OlderParticipant(Arc<Mutex<Seen>>);

#[tonic::async_trait]
impl Participant for OlderParticipant {
    type PrepareStreamStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<v1::PrepareStreamResponse, Status>> + Send>,
    >;

    /// A build of the previous protocol version has no PrepareStream: gRPC answers an
    /// unknown method with UNIMPLEMENTED, as here.
    async fn prepare_stream(
        &self,
        _request: Request<tonic::Streaming<v1::PrepareStreamRequest>>,
    ) -> Result<Response<Self::PrepareStreamStream>, Status> {
        self.0.lock().unwrap().stream_attempts += 1;
        Err(Status::unimplemented("PrepareStream"))
    }

    async fn prepare(
        &self,
        request: Request<v1::PrepareRequest>,
    ) -> Result<Response<v1::PrepareResponse>, Status> {
        let request = request.into_inner();
        if !request.commits.is_empty() || !request.aborts.is_empty() {
            self.0.lock().unwrap().prepares_with_decisions += 1;
        }
        let results = request
            .branches
            .into_iter()
            .map(|b| v1::PrepareResult {
                txn_id: b.txn_id,
                vote: v1::Vote::Yes as i32,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(v1::PrepareResponse {
            results,
            ..Default::default()
        }))
    }

    async fn commit(
        &self,
        request: Request<v1::CommitRequest>,
    ) -> Result<Response<v1::CommitResponse>, Status> {
        let mut seen = self.0.lock().unwrap();
        let results = request
            .into_inner()
            .branches
            .into_iter()
            .map(|b| {
                seen.committed
                    .insert(TxnId::try_from(&b.txn_id).expect("a valid id"));
                v1::AckResult {
                    txn_id: b.txn_id,
                    error: None,
                }
            })
            .collect();
        Ok(Response::new(v1::CommitResponse { results }))
    }

    async fn abort(
        &self,
        request: Request<v1::AbortRequest>,
    ) -> Result<Response<v1::AbortResponse>, Status> {
        let results = request
            .into_inner()
            .branches
            .into_iter()
            .map(|b| v1::AckResult {
                txn_id: b.txn_id,
                error: None,
            })
            .collect();
        Ok(Response::new(v1::AbortResponse { results }))
    }

    async fn commit_one_phase(
        &self,
        _request: Request<v1::CommitOnePhaseRequest>,
    ) -> Result<Response<v1::CommitOnePhaseResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn list_in_doubt(
        &self,
        _request: Request<v1::ListInDoubtRequest>,
    ) -> Result<Response<v1::ListInDoubtResponse>, Status> {
        Ok(Response::new(v1::ListInDoubtResponse::default()))
    }

    async fn get_stats(
        &self,
        _request: Request<v1::ParticipantStatsRequest>,
    ) -> Result<Response<v1::ParticipantStats>, Status> {
        Ok(Response::new(v1::ParticipantStats::default()))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn decisions_an_older_participant_ignores_reach_it_alone() {
    let older = OlderParticipant::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ParticipantServer::new(older.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    // A long linger, so that each decision is still queued when the next transaction's
    // Prepare leaves and is carried (the path under test), however slow the machine.
    let stack = Stack::start(StackOptions {
        participants: 1,
        coordinator_args: vec![
            "--participant".into(),
            format!("old=http://{address}"),
            "--decision-linger-ms".into(),
            "100".into(),
        ],
        ..StackOptions::default()
    });
    let endpoint = stack.coordinator.endpoint();
    let mut client = coordinator(&endpoint).await.unwrap();
    let mut executed = HashSet::new();
    for i in 0..10 {
        let response = client
            .execute(v1::ExecuteRequest {
                branches: vec![
                    v1::ExecuteBranch {
                        participant: "p1".into(),
                        payload: payload(vec![put(&format!("k{i}"), "v")]),
                    },
                    v1::ExecuteBranch {
                        participant: "old".into(),
                        payload: payload(vec![put(&format!("k{i}"), "v")]),
                    },
                ],
                timeout_ms: 0,
                wait_for_phase2: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.outcome(), v1::Outcome::Committed, "{response:?}");
        executed.insert(TxnId::try_from(&response.txn_id).unwrap());
    }
    let settled = eventually(Duration::from_secs(20), || async {
        coordinator_in_doubt(&endpoint)
            .await
            .is_some_and(|t| t.is_empty())
    })
    .await;
    let seen = older.0.lock().unwrap();
    assert!(settled, "transactions still in doubt\n{}", stack.logs());
    assert!(
        seen.prepares_with_decisions >= 1,
        "no Prepare carried a decision to the older participant"
    );
    assert_eq!(
        seen.prepares_with_decisions, 1,
        "the coordinator kept carrying decisions after they were ignored"
    );
    assert_eq!(seen.committed, executed, "every commit reached it alone");
    assert_eq!(
        seen.stream_attempts, 1,
        "the coordinator tried PrepareStream once, then sent Prepare calls"
    );
    drop(seen);
    server.abort();
}
