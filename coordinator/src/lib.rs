//! The Ratify coordinator: presumed-abort two-phase commit across participants.
//!
//! - [`engine`]: the transaction state machine, sans-IO (no tokio, tonic or files).
//! - [`log`]: the [`log::DecisionLog`] seam and its local implementation, the segmented
//!   WAL with group commit ([`log::wal`]) over a pure frame format ([`log::frame`]).
//! - [`runtime`]: the tokio driver: feeds the engine, performs its actions (batched RPCs
//!   per participant, log appends, timers, replies) and recovers on start. Prepare
//!   batches travel on one long-lived stream per participant (`prepare_link`).
//! - [`registry`]: participant name -> endpoint; the only addresses ever dialled.
//! - [`service`]: the Coordinator and Admin gRPC services.
//! - [`daemon`]: the `ratify-coordinator` binary (config, metrics, health, reflection).

#[macro_use]
mod crash;
pub mod daemon;
pub mod engine;
pub mod log;
mod prepare_link;
pub mod registry;
pub mod runtime;
pub mod service;
