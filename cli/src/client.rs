//! Connections, name lookups and the mapping of failures to exit codes.

use std::fmt;
use std::time::Duration;

use ratify_proto::TxnId;
use ratify_proto::v1;
use ratify_proto::v1::admin_client::AdminClient;
use ratify_proto::v1::coordinator_client::CoordinatorClient;
use ratify_proto::v1::kv_client::KvClient;
use ratify_proto::v1::participant_client::ParticipantClient;
use tonic::transport::Channel;

/// Exit codes of `ratify` (documented in README.md).
pub mod exit {
    pub const OK: u8 = 0;
    /// An unexpected error.
    pub const ERROR: u8 = 1;
    /// Bad usage (from clap).
    pub const USAGE: u8 = 2;
    /// The transaction, key or participant does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// The request was refused (invalid, out of order, over a limit, contradicts a decision).
    pub const REFUSED: u8 = 4;
    /// A node could not be reached or did not answer in time.
    pub const UNAVAILABLE: u8 = 5;
    /// `--fail-if-any` and something is in doubt.
    pub const IN_DOUBT: u8 = 6;
    /// `txn commit` ended with the transaction aborted.
    pub const ABORTED: u8 = 7;
    /// `ratify demo`: a check failed.
    pub const CHECK_FAILED: u8 = 8;
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        let code = match status.code() {
            tonic::Code::NotFound => exit::NOT_FOUND,
            tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
            | tonic::Code::ResourceExhausted
            | tonic::Code::AlreadyExists => exit::REFUSED,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => exit::UNAVAILABLE,
            _ => exit::ERROR,
        };
        Self::new(code, format!("{}: {}", status.code(), status.message()))
    }
}

impl From<anyhow::Error> for CliError {
    fn from(error: anyhow::Error) -> Self {
        Self::new(exit::ERROR, format!("{error:#}"))
    }
}

pub type CliResult<T> = Result<T, CliError>;

pub async fn channel(endpoint: &str) -> CliResult<Channel> {
    let e = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| CliError::new(exit::USAGE, format!("invalid endpoint {endpoint:?}: {e}")))?;
    e.connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| CliError::new(exit::UNAVAILABLE, format!("cannot reach {endpoint}: {e}")))
}

pub async fn coordinator(endpoint: &str) -> CliResult<CoordinatorClient<Channel>> {
    Ok(CoordinatorClient::new(channel(endpoint).await?))
}

pub async fn admin(endpoint: &str) -> CliResult<AdminClient<Channel>> {
    Ok(AdminClient::new(channel(endpoint).await?))
}

pub async fn participant(endpoint: &str) -> CliResult<ParticipantClient<Channel>> {
    Ok(ParticipantClient::new(channel(endpoint).await?))
}

pub async fn kv(endpoint: &str) -> CliResult<KvClient<Channel>> {
    Ok(KvClient::new(channel(endpoint).await?))
}

pub fn parse_txn(text: &str) -> CliResult<TxnId> {
    text.parse()
        .map_err(|e: ratify_proto::InvalidTxnId| CliError::new(exit::USAGE, e.to_string()))
}

/// A participant's endpoint: taken as is when given as a URL, else looked up by name in
/// the coordinator's registry.
pub async fn participant_endpoint(coordinator: &str, name_or_url: &str) -> CliResult<String> {
    if name_or_url.starts_with("http://") || name_or_url.starts_with("https://") {
        return Ok(name_or_url.to_string());
    }
    let mut admin = admin(coordinator).await?;
    let list = admin
        .list_participants(v1::ListParticipantsRequest {})
        .await?
        .into_inner();
    list.participants
        .into_iter()
        .find(|p| p.name == name_or_url)
        .map(|p| p.endpoint)
        .ok_or_else(|| {
            CliError::new(
                exit::NOT_FOUND,
                format!(
                    "the coordinator at {coordinator} knows no participant named {name_or_url:?}"
                ),
            )
        })
}
