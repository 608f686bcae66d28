//! Tributary's shared vocabulary: the wire protocol, the delta format and its codecs, identities
//! and signatures, the ledger entry, experiment configuration types and the aggregation math.
//!
//! Everything here is pure: no sockets, files, clocks, async runtime, SQLite or burn. Both the
//! coordinator and the trainer depend on this crate; it depends on neither.
#![warn(missing_docs)]

pub mod aggregate;
pub mod codec;
pub mod config;
pub mod delta;
pub mod frame;
pub mod identity;
pub mod ids;
pub mod ledger;
pub mod loss_check;
pub mod peft;
pub mod replica;
pub mod selection;
pub mod wire;

pub use delta::{Delta, DeltaError, Layout, NamedTensor};
pub use ids::{BlobHash, CertificateHash, ExperimentId, ExperimentUid, RoundId, TaskId, TrainerId};
