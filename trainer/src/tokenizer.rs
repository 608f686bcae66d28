//! Tokenizers, through the `tokenizers` crate: built from a GGUF file's GPT-2-style byte-level BPE
//! metadata (tokens + merges), or read from a Hugging Face `tokenizer.json`.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::gguf::{Gguf, Value};

/// A tokenizer that could not be built or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// The model file lacks what a tokenizer needs, or holds something unsupported.
    #[error("tokenizer: {0}")]
    Unsupported(String),
    /// The `tokenizers` crate refused.
    #[error("tokenizer: {0}")]
    Library(String),
}

/// Text to token ids and back, with the model's special tokens.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Beginning-of-sequence token, if the model has one.
    pub bos: Option<u32>,
    /// End-of-sequence token, if the model has one.
    pub eos: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn strings(file: &Gguf, key: &str) -> Result<Vec<String>, TokenizerError> {
    match file.get(key) {
        Ok(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| TokenizerError::Unsupported(format!("{key} holds a non-string")))
            })
            .collect(),
        _ => Err(TokenizerError::Unsupported(format!("{key} is missing"))),
    }
}

impl TextTokenizer {
    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.model = gpt2`).
    ///
    /// Pre-tokenization follows the file's `tokenizer.ggml.pre`: single digits are split off
    /// first for the pre-tokenizers that do so in llama.cpp (`smollm`, `starcoder`, …), then
    /// GPT-2's byte-level split.
    pub fn from_gguf(file: &Gguf) -> Result<Self, TokenizerError> {
        let model = file.get_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported(format!(
                "tokenizer model {model:?} (only GPT-2-style byte-level BPE, \"gpt2\")"
            )));
        }
        let tokens = strings(file, "tokenizer.ggml.tokens")?;
        let merges = strings(file, "tokenizer.ggml.merges")?;
        let types: Vec<u64> = match file.get("tokenizer.ggml.token_type") {
            Ok(Value::Array(items)) => items.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let mut vocab = Vocab::default();
        for (id, token) in tokens.iter().enumerate() {
            vocab.insert(token.clone(), id as u32);
        }
        let merges = merges
            .iter()
            .map(|merge| {
                merge
                    .split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| TokenizerError::Unsupported(format!("merge {merge:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Library(e.to_string()))?;
        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre = file.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let splits_digits = matches!(
            pre,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva"
        );
        if splits_digits {
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                byte_level.into(),
            ])));
        } else {
            inner.with_pre_tokenizer(Some(byte_level));
        }
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control tokens (type 3) are special: matched whole, never split by BPE.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .filter(|(_, kind)| **kind == 3)
            .map(|(token, _)| AddedToken::from(token.clone(), true))
            .collect();
        inner.add_special_tokens(&specials);
        let id = |key: &str| file.get_u64(key).ok().and_then(|v| u32::try_from(v).ok());
        Ok(Self {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
        })
    }

    /// Reads a Hugging Face `tokenizer.json`; `bos`/`eos` are looked up by the usual names.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner =
            Tokenizer::from_file(path).map_err(|e| TokenizerError::Library(e.to_string()))?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        Ok(Self {
            bos: find(&["<|im_start|>", "<s>", "<|begin_of_text|>", "<|endoftext|>"]),
            eos: find(&["<|im_end|>", "</s>", "<|end_of_text|>", "<|endoftext|>"]),
            inner,
        })
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, false)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|e| TokenizerError::Library(e.to_string()))
    }

    /// The text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Library(e.to_string()))
    }

    /// Vocabulary size, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
