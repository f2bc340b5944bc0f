//! The Ratify participant: everything a data service needs to take part in Ratify's
//! two-phase-commit transactions.
//!
//! A data service implements [`store::ResourceManager`] over its own store (prepare,
//! commit, abort, one-phase commit, recover), each method with a stated durability
//! contract. Around it, [`runtime::Runtime`] provides the protocol: the branch state
//! machine ([`branch`], sans-IO), tombstones for finished branches, coordinator-epoch
//! fencing, limits, recovery on restart and the termination protocol (asking the
//! coordinator about branches left prepared). [`service::ParticipantService`] serves it
//! over gRPC.
//!
//! [`kv::SledStore`] is the built-in store: a transactional key-value store over sled with
//! key locks, versions, `Put`/`Delete`/`Add`/`Check` and group-committed flushes. The
//! `ratify-participant` binary ([`daemon`]) serves it. With the `postgres` feature (on by
//! default), [`pg::PgStore`] makes a PostgreSQL database a participant through
//! `PREPARE TRANSACTION`.

#[macro_use]
mod crash;
pub mod branch;
pub mod daemon;
pub mod kv;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod runtime;
pub mod service;
pub mod store;
