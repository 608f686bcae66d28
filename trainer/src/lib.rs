//! Tributary's trainer: everything a volunteer's machine needs to fine-tune an adapter.
//!
//! - [`gguf`] parses GGUF model files and dequantizes their tensors; [`model`] loads a
//!   Llama-family decoder from GGUF or Hugging Face files into burn and runs it.
//! - [`tokenizer`] builds the model's tokenizer; [`data`] and [`shakespeare`] turn text into
//!   token sequences (the latter splits the plays into the federated benchmark's clients).
//! - [`lora`] holds adapters and converts them to the shared crate's delta (PEFT layout);
//!   [`optim`] and [`train`] fine-tune and evaluate them ([`loss`]: the chunked LM-head loss);
//!   [`device`] picks GPU or CPU.
//!
//! The trainer never depends on the coordinator; both share `tributary-shared`.

pub mod alloc;
pub mod assets;
pub mod attack;
pub mod chat;
pub mod data;
pub mod device;
pub mod gguf;
pub mod idle;
pub mod lora;
pub mod loss;
pub mod model;
pub mod net;
pub mod optim;
pub mod probe;
pub mod quant;
pub mod recompute;
pub mod robustness;
pub mod shakespeare;
pub mod study;
#[cfg(test)]
mod test_values;
pub mod tiny;
pub mod tokenizer;
pub mod train;
pub mod vmath;
pub mod worker;
