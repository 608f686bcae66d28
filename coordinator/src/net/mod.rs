//! The QUIC driver: TLS setup, one task per connection, and the hub that owns the engine.

pub mod address_quota;
pub mod connection;
pub mod hub;
pub mod relay;
pub mod tls;
pub mod upload_queue;
