//! The Kv data service of the sled participant: Get reads committed data; Stage queues
//! operations under a transaction id, enlisting the branch with the coordinator first.

use std::sync::Arc;
use std::time::Duration;

use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_proto::v1::coordinator_client::CoordinatorClient;
use ratify_proto::v1::kv_server::Kv;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::debug;

use super::{SledStore, Staging, Versioned};
use crate::runtime::Runtime;
use crate::store::{ResourceManager, StoreError};

/// A store that serves the key-value data API: committed reads, and staged writes that
/// its `prepare` evaluates.
pub trait KvStore: ResourceManager {
    fn staging(&self) -> &Staging;

    /// A key's committed value (never a prepared, undecided one).
    fn read(
        &self,
        key: &[u8],
    ) -> impl std::future::Future<Output = Result<Versioned, StoreError>> + Send;
}

impl KvStore for SledStore {
    fn staging(&self) -> &Staging {
        SledStore::staging(self)
    }

    async fn read(&self, key: &[u8]) -> Result<Versioned, StoreError> {
        self.get(key)
    }
}

/// Where the participant enlists its branches.
#[derive(Debug, Clone)]
pub struct Enlistment {
    /// This participant's registered name.
    pub name: String,
    /// The endpoint the coordinator should dial for this participant.
    pub advertised_endpoint: String,
    pub coordinator: CoordinatorClient<Channel>,
}

/// The Kv service.
#[derive(Debug)]
pub struct KvService<S> {
    runtime: Arc<Runtime<S>>,
    enlistment: Option<Enlistment>,
}

impl<S> Clone for KvService<S> {
    fn clone(&self) -> Self {
        Self {
            runtime: self.runtime.clone(),
            enlistment: self.enlistment.clone(),
        }
    }
}

impl<S: KvStore> KvService<S> {
    /// With `enlistment: None`, staged branches are not enlisted anywhere (a participant
    /// driven directly through its Participant service).
    pub fn new(runtime: Arc<Runtime<S>>, enlistment: Option<Enlistment>) -> Self {
        Self {
            runtime,
            enlistment,
        }
    }
}

#[tonic::async_trait]
impl<S: KvStore> Kv for KvService<S> {
    async fn get(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::GetResponse>, Status> {
        let key = request.into_inner().key;
        let store = self.runtime.store().staging();
        if key.is_empty() || key.len() > store.limits().max_key_bytes {
            return Err(Status::invalid_argument(format!(
                "key must be 1 to {} bytes, got {}",
                store.limits().max_key_bytes,
                key.len()
            )));
        }
        let value = self
            .runtime
            .store()
            .read(&key)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(v1::GetResponse {
            found: value.value.is_some(),
            value: value.value.unwrap_or_default().into(),
            version: value.version,
        }))
    }

    async fn stage(
        &self,
        request: Request<v1::StageRequest>,
    ) -> Result<Response<v1::StageResponse>, Status> {
        let request = request.into_inner();
        let txn_id = TxnId::try_from(&request.txn_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if request.ops.is_empty() {
            return Err(Status::invalid_argument("no operations"));
        }
        let store = self.runtime.store().staging();
        // Validate everything before touching any state.
        for (index, op) in request.ops.iter().enumerate() {
            store
                .validate_op(index, op)
                .map_err(Status::invalid_argument)?;
        }
        let past_staging = |state| {
            Status::failed_precondition(format!(
                "transaction {txn_id} is past staging on this participant ({state:?})"
            ))
        };
        let first_write = {
            let _serial = self.runtime.lock_txn(&txn_id).await;
            if let Some(state) = self.runtime.state_of(&txn_id) {
                return Err(past_staging(state));
            }
            !store.is_active(&txn_id)
        };
        if first_write && let Some(enlistment) = &self.enlistment {
            // Enlist before accepting the first write: a branch the coordinator does not
            // know would never be prepared, and its writes would silently vanish. Not under
            // the transaction's lock: that stripe also serves other transactions, and the
            // call may take seconds. (Enlisting twice is harmless.)
            let mut client = enlistment.coordinator.clone();
            let enlist = v1::EnlistRequest {
                txn_id: txn_id.to_vec().into(),
                participant: enlistment.name.clone(),
                endpoint: enlistment.advertised_endpoint.clone(),
                incarnation: store.incarnation(),
            };
            tokio::time::timeout(Duration::from_secs(5), client.enlist(enlist))
                .await
                .map_err(|_| Status::unavailable("enlisting with the coordinator timed out"))?
                .map_err(|status| {
                    Status::new(
                        status.code(),
                        format!("the coordinator refused enlistment: {}", status.message()),
                    )
                })?;
            debug!(txn = %txn_id, "enlisted");
        }
        let _serial = self.runtime.lock_txn(&txn_id).await;
        // A prepare may have come in while enlisting: then these writes are too late.
        if let Some(state) = self.runtime.state_of(&txn_id) {
            return Err(past_staging(state));
        }
        let staged = store.stage(txn_id, request.ops)?;
        Ok(Response::new(v1::StageResponse {
            staged: staged as u32,
        }))
    }
}
