//! Tributary's cross-crate test kit: a protocol client, a synthetic trainer that speaks the real
//! protocol with made-up deltas (and can misbehave on purpose), and the load generator's parts.

pub mod client;
pub mod load;
pub mod synthetic;
pub mod tls;
