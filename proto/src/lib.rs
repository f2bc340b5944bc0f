//! Ratify's wire protocol, package `ratify.v1`: the Participant, Coordinator, Admin and
//! Kv gRPC services and the coordinator's WAL record types, generated from `proto/`.
//!
//! Wire types stay here. Domain types with required fields made non-optional, checked
//! on receipt with `TryFrom`, live in the crates that use them.
//!
//! Also what both daemons share below their services: `dial` (how a runtime opens its
//! connections), `frame` and `segment` (the log files' framing and writing) and
//! `runtime` (the tokio runtime they serve on).

pub mod dial;
pub mod frame;
pub mod runtime;
pub mod segment;

#[allow(clippy::all, clippy::pedantic, missing_debug_implementations)]
pub mod v1 {
    tonic::include_proto!("ratify.v1");
}

/// The encoded `FileDescriptorSet` of every `ratify.v1` file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ratify_descriptor.bin"));

use std::fmt;
use std::str::FromStr;

/// A transaction id: 16 bytes, a time-ordered UUIDv7 handed out by the coordinator.
///
/// This is the one domain type both sides share, because it is the protocol's key: every
/// message of a transaction carries it and every store indexes by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId([u8; 16]);

/// Why bytes or text are not a transaction id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTxnId(pub String);

impl fmt::Display for InvalidTxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid transaction id: {}", self.0)
    }
}

impl std::error::Error for InvalidTxnId {}

/// A source of transaction ids that replaces UUIDv7 on one thread.
type IdSource = Box<dyn FnMut() -> TxnId>;

thread_local! {
    static ID_SOURCE: std::cell::RefCell<Option<IdSource>> = const { std::cell::RefCell::new(None) };
}

impl TxnId {
    /// A new time-ordered id (UUIDv7), unless this thread has an id source (see
    /// [`TxnId::set_thread_id_source`]).
    pub fn generate() -> Self {
        if let Some(id) = ID_SOURCE.with(|source| source.borrow_mut().as_mut().map(|next| next())) {
            return id;
        }
        Self(*uuid::Uuid::now_v7().as_bytes())
    }

    /// Makes [`TxnId::generate`] on the calling thread draw from `source` (`None`
    /// restores UUIDv7). For the deterministic simulation, which runs every simulated
    /// node on one thread and needs the same ids on every replay of a seed.
    pub fn set_thread_id_source(source: Option<IdSource>) {
        ID_SOURCE.with(|slot| *slot.borrow_mut() = source);
    }

    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    /// Milliseconds since the Unix epoch embedded in a UUIDv7 (0 for other ids).
    pub fn unix_ms(&self) -> u64 {
        let b = &self.0;
        if b[6] >> 4 != 7 {
            return 0;
        }
        u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
    }
}

impl TryFrom<&[u8]> for TxnId {
    type Error = InvalidTxnId;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        let array: [u8; 16] = bytes
            .try_into()
            .map_err(|_| InvalidTxnId(format!("expected 16 bytes, got {}", bytes.len())))?;
        if array == [0; 16] {
            return Err(InvalidTxnId("the nil id is not a transaction".into()));
        }
        Ok(Self(array))
    }
}

impl TryFrom<&bytes_compat::Bytes> for TxnId {
    type Error = InvalidTxnId;

    fn try_from(bytes: &bytes_compat::Bytes) -> Result<Self, Self::Error> {
        Self::try_from(bytes.as_ref())
    }
}

/// prost generates `bytes::Bytes` fields (`.bytes(".")` in build.rs).
mod bytes_compat {
    pub use prost::bytes::Bytes;
}

impl FromStr for TxnId {
    type Err = InvalidTxnId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parsed = uuid::Uuid::parse_str(text.trim())
            .map_err(|e| InvalidTxnId(format!("{text:?}: {e}")))?;
        Self::try_from(parsed.as_bytes().as_slice())
    }
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&uuid::Uuid::from_bytes(self.0).hyphenated(), f)
    }
}

impl fmt::Debug for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TxnId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_id_round_trips_through_text_and_rejects_bad_input() {
        let id = TxnId::generate();
        assert_eq!(id.to_string().parse::<TxnId>().unwrap(), id);
        assert!(id.unix_ms() > 1_700_000_000_000);
        assert!(TxnId::try_from(&[1u8; 15][..]).is_err());
        assert!(TxnId::try_from(&[0u8; 16][..]).is_err());
        assert!("not-a-uuid".parse::<TxnId>().is_err());
        assert!("../../etc".parse::<TxnId>().is_err());
    }
}
