//! Tributary's cross-crate test kit: a synthetic trainer that speaks the real
//! protocol with made-up deltas (and can misbehave on purpose), and the load generator's parts.
//! The protocol client is the real trainer's (`tributary_trainer::net`), re-exported here.

pub mod load;
pub mod synthetic;

pub use tributary_trainer::net::{client, tls};
