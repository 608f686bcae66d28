//! Tributary's coordinator: runs an experiment as a sequence of rounds over QUIC.
//!
//! - [`engine`]: the round state machine (pure, sans-IO).
//! - [`net`]: the QUIC driver: the hub task that owns the engine, connection tasks, TLS.
//! - [`store`]: SQLite metadata and the content-addressed blob directory.
//! - [`derive`]: aggregation of a round from its stored inputs, shared by `serve` and `verify`.
//! - [`lease`]: which node of a cluster leads (pure).
//! - [`verify`], [`settings`], [`metrics`], [`http`], [`service`].
//!
//! The coordinator never links burn: adapters are named f32 tensors ([`tributary_shared::Delta`]).

pub mod admission;
pub mod auditors;
pub mod cli;
pub mod credits;
pub mod derive;
pub mod durable;
pub mod engine;
pub mod evaluation;
pub mod http;
pub mod leadership;
pub mod lease;
pub mod metrics;
pub mod net;
pub mod operator;
pub mod publish;
pub mod service;
pub mod settings;
pub mod store;
pub mod verify;
