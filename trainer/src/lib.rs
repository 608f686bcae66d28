//! Tributary's trainer: everything a volunteer's machine needs to fine-tune an adapter.
//!
//! This first part reads the model and the data: [`gguf`] parses GGUF model files and dequantizes
//! their tensors; [`shakespeare`] splits the plays into the federated benchmark's clients. The
//! burn model, LoRA training and the QUIC client come next (see the project's issues).
//!
//! The trainer never depends on the coordinator; both share `tributary-shared`.

pub mod gguf;
pub mod shakespeare;
