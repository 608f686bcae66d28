//! The trainer's side of the wire: TLS trust ([`tls`]), an authenticated protocol session
//! ([`client`]) and the choice of coordinator node ([`failover`]).

pub mod client;
pub mod failover;
pub mod tls;

use tributary_shared::frame::FrameError;
use tributary_shared::wire::RejectReason;

/// A connection or protocol failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The connection could not be started.
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream failed.
    #[error("write failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("read failed: {0}")]
    Read(#[from] quinn::ReadError),
    /// Reading a whole stream failed.
    #[error("read failed: {0}")]
    ReadToEnd(#[from] quinn::ReadToEndError),
    /// The stream was already closed.
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    /// A frame could not be encoded or decoded.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The coordinator refused the hello.
    #[error("refused ({reason}): {detail}")]
    Refused {
        /// Why.
        reason: RejectReason,
        /// Its explanation.
        detail: String,
    },
    /// The peer said something out of order.
    #[error("protocol: {0}")]
    Protocol(String),
    /// TLS configuration or certificate trouble.
    #[error("tls: {0}")]
    Tls(String),
    /// A socket could not be made.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
