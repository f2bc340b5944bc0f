//! The `ratify` command-line tool. It talks to coordinators and participants only over
//! gRPC. Besides the client and operator verbs it runs local stacks: `ratify dev` (a
//! coordinator and participants in the foreground) and `ratify demo` (a self-contained
//! bank-transfer run that crashes and recovers the coordinator and proves conservation).
//! Both spawn `ratify` itself, through hidden `coordinator` and `participant`
//! subcommands, so they need no other binary.

pub mod bank;
pub mod bench;
pub mod client;
pub mod commands;
pub mod demo;
pub mod dev;
pub mod output;
pub mod proc;
pub mod stack;
