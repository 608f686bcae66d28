//! Tokenizers, through the `tokenizers` crate: built from a GGUF file's metadata, or read from a
//! Hugging Face `tokenizer.json`.
//!
//! GGUF files describe two kinds, and each is rebuilt as the model's published `tokenizer.json`
//! configures it, so token ids equal the `tokenizers`/`sentencepiece` reference:
//! - `gpt2`: byte-level BPE from tokens and merges, split first by the pre-tokenizer
//!   `tokenizer.ggml.pre` names (GPT-2's, Llama 3's `llama-bpe`, Qwen2's `qwen2` with NFC, or
//!   single digits first for `smollm` and its kin). An unknown pre-tokenizer is an error.
//! - `llama`: SentencePiece BPE (Llama 2, Mistral) from pieces and scores, with byte fallback;
//!   merges are ordered by the score of the piece they make, as SentencePiece merges.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Llama 3's split pattern (`tokenizer.ggml.pre = llama-bpe`): digits in groups of up to three.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split pattern (`tokenizer.ggml.pre = qwen2`): single digits.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// SentencePiece's word-boundary mark.
const SPACE_MARK: &str = "\u{2581}";

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
    /// The model's chat template (Jinja), if it has one: GGUF `tokenizer.chat_template`, or
    /// `chat_template` in a Hugging Face folder's `tokenizer_config.json`.
    pub chat_template: Option<String>,
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

/// A JSON file of a Hugging Face folder, parsed, with its path; `None` when there is no such
/// file (one that cannot be read or parsed is an error).
fn read_json(
    path: &Path,
) -> Result<Option<(std::path::PathBuf, serde_json::Value)>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(TokenizerError::Unsupported(format!(
                "{}: {error}",
                path.display()
            )))
        }
    };
    let parsed = serde_json::from_str(&text)
        .map_err(|e| TokenizerError::Unsupported(format!("{}: {e}", path.display())))?;
    Ok(Some((path.to_owned(), parsed)))
}

fn library(error: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Library(error.to_string())
}

/// Per-token GGUF types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
fn token_types(file: &Gguf, count: usize) -> Vec<u64> {
    match file.get("tokenizer.ggml.token_type") {
        Ok(Value::Array(items)) => items.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        _ => vec![1; count],
    }
}

/// Control tokens (type 3) are special: matched whole in text, never split.
fn add_control_tokens(inner: &mut Tokenizer, tokens: &[String], types: &[u64]) {
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter().chain(std::iter::repeat(&1)))
        .filter(|(_, kind)| **kind == 3)
        .map(|(token, _)| AddedToken::from(token.clone(), true))
        .collect();
    inner.add_special_tokens(&specials);
}

impl TextTokenizer {
    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.model` `gpt2` or `llama`).
    pub fn from_gguf(file: &Gguf) -> Result<Self, TokenizerError> {
        let model = file.get_str("tokenizer.ggml.model").unwrap_or("");
        let inner = match model {
            "gpt2" => Self::byte_level_bpe(file)?,
            "llama" => Self::sentencepiece_bpe(file)?,
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "tokenizer model {other:?} (byte-level BPE \"gpt2\" or SentencePiece \"llama\")"
                )))
            }
        };
        let id = |key: &str| file.get_u64(key).ok().and_then(|v| u32::try_from(v).ok());
        Ok(Self {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            chat_template: file
                .get_str("tokenizer.chat_template")
                .ok()
                .map(str::to_owned),
        })
    }

    /// GPT-2-style byte-level BPE, pre-tokenized as `tokenizer.ggml.pre` says.
    fn byte_level_bpe(file: &Gguf) -> Result<Tokenizer, TokenizerError> {
        let tokens = strings(file, "tokenizer.ggml.tokens")?;
        let merges = strings(file, "tokenizer.ggml.merges")?;
        let types = token_types(file, tokens.len());
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
        let pre = file.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            // Llama 3 takes a pre-token found whole in the vocabulary as it is.
            .ignore_merges(pre == "llama-bpe")
            .build()
            .map_err(library)?;
        let mut inner = Tokenizer::new(bpe);
        let split = |pattern: &str| {
            Split::new(
                SplitPattern::Regex(pattern.to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(library)
        };
        // Bytes to GPT-2's printable alphabet, after a split of its own or someone else's.
        let own_split = ByteLevel::new(false, true, true);
        let bytes_only = ByteLevel::new(false, true, false);
        match pre {
            "default" | "gpt2" | "gpt-2" => {
                inner.with_pre_tokenizer(Some(own_split));
            }
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva" => {
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    own_split.into(),
                ])));
            }
            "llama-bpe" | "llama3" => {
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    split(LLAMA3_PATTERN)?.into(),
                    bytes_only.into(),
                ])));
            }
            "qwen2" => {
                inner.with_normalizer(Some(NFC));
                inner.with_pre_tokenizer(Some(Sequence::new(vec![
                    split(QWEN2_PATTERN)?.into(),
                    bytes_only.into(),
                ])));
            }
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "pre-tokenizer {other:?} (tokenizer.ggml.pre; known: default, llama-bpe, \
                     qwen2, smollm, starcoder, refact, command-r, codeshell, exaone, minerva)"
                )))
            }
        }
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        add_control_tokens(&mut inner, &tokens, &types);
        Ok(inner)
    }

    /// SentencePiece BPE (Llama 2, Mistral): pieces with scores, byte fallback, a word-boundary
    /// mark for spaces and one in front of the text (`tokenizer.ggml.add_space_prefix`, on by
    /// default).
    fn sentencepiece_bpe(file: &Gguf) -> Result<Tokenizer, TokenizerError> {
        let tokens = strings(file, "tokenizer.ggml.tokens")?;
        let scores: Vec<f64> = match file.get("tokenizer.ggml.scores") {
            Ok(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_f64().ok_or_else(|| {
                        TokenizerError::Unsupported(
                            "tokenizer.ggml.scores holds a non-number".into(),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(TokenizerError::Unsupported(
                    "tokenizer.ggml.scores is missing".into(),
                ))
            }
        };
        if scores.len() != tokens.len() {
            return Err(TokenizerError::Unsupported(format!(
                "{} scores for {} tokens",
                scores.len(),
                tokens.len()
            )));
        }
        let types = token_types(file, tokens.len());
        let ids: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.as_str(), id as u32))
            .collect();
        // Every way a normal piece splits into two pieces is a merge; SentencePiece merges the
        // pair whose piece scores highest first.
        let mut candidates: Vec<(f64, u32, u32, u32)> = Vec::new();
        for (id, token) in tokens.iter().enumerate() {
            if types.get(id).copied().unwrap_or(1) != 1 {
                continue;
            }
            for (at, _) in token.char_indices().skip(1) {
                let (left, right) = token.split_at(at);
                if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                    candidates.push((scores[id], id as u32, l, r));
                }
            }
        }
        candidates.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(&b.2))
                .then(a.3.cmp(&b.3))
        });
        let merges = candidates
            .iter()
            .map(|&(_, _, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
            .collect();
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.clone(), id as u32))
            .collect();
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(unk) = types.iter().position(|kind| *kind == 2) {
            builder = builder.unk_token(tokens[unk].clone());
        }
        let mut inner = Tokenizer::new(builder.build().map_err(library)?);
        let space_prefix = !matches!(
            file.get("tokenizer.ggml.add_space_prefix"),
            Ok(Value::Bool(false))
        );
        let spaces = Replace::new(" ", SPACE_MARK).map_err(library)?;
        if space_prefix {
            inner.with_normalizer(Some(NormalizerSequence::new(vec![
                Prepend::new(SPACE_MARK.to_owned()).into(),
                spaces.into(),
            ])));
        } else {
            inner.with_normalizer(Some(spaces));
        }
        inner.with_decoder(Some(DecoderSequence::new(vec![
            Replace::new(SPACE_MARK, " ").map_err(library)?.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
            Strip::new(' ', usize::from(space_prefix), 0).into(),
        ])));
        add_control_tokens(&mut inner, &tokens, &types);
        Ok(inner)
    }

    /// Reads a Hugging Face `tokenizer.json`; `bos`/`eos` are looked up by the usual names.
    /// Its post-processor, truncation and padding are dropped: this tokenizer adds no special
    /// tokens (the chat template prints them), a document is never cut or padded, and offsets
    /// stay untrimmed (a `ByteLevel` post-processor with `trim_offsets` would give a token of
    /// spaces an empty range, and the chat mask would misplace it).
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let mut inner =
            Tokenizer::from_file(path).map_err(|e| TokenizerError::Library(e.to_string()))?;
        inner
            .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
            .with_padding(None)
            .with_truncation(None)
            .map_err(library)?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        Ok(Self {
            bos: find(&["<|im_start|>", "<s>", "<|begin_of_text|>", "<|endoftext|>"]),
            eos: find(&["<|im_end|>", "</s>", "<|end_of_text|>", "<|endoftext|>"]),
            inner,
            chat_template: None,
        })
    }

    /// Reads a Hugging Face folder's tokenizer: `tokenizer.json`, the chat template
    /// ([`TextTokenizer::read_chat_template`]) and the BOS/EOS tokens that
    /// `tokenizer_config.json`, else `special_tokens_map.json`, names (a string,
    /// `{"content": …}`, or `null` for none; by the usual names when neither names one). A
    /// named token that `tokenizer.json` lacks is an error.
    pub fn from_folder(dir: &Path) -> Result<Self, TokenizerError> {
        let mut tokenizer = Self::from_file(&dir.join("tokenizer.json"))?;
        let configs = [
            read_json(&dir.join("tokenizer_config.json"))?,
            read_json(&dir.join("special_tokens_map.json"))?,
        ];
        for (key, slot) in [
            ("bos_token", &mut tokenizer.bos),
            ("eos_token", &mut tokenizer.eos),
        ] {
            let Some((path, value)) = configs
                .iter()
                .flatten()
                .find_map(|(path, config)| Some((path, config.get(key)?)))
            else {
                continue;
            };
            let named = match value {
                serde_json::Value::Null => None,
                value => Some(
                    value
                        .as_str()
                        .or_else(|| value.get("content").and_then(|c| c.as_str()))
                        .ok_or_else(|| {
                            TokenizerError::Unsupported(format!(
                                "{}: {key} is neither a string nor {{\"content\": …}}",
                                path.display()
                            ))
                        })?,
                ),
            };
            *slot = named
                .map(|text| {
                    tokenizer.inner.token_to_id(text).ok_or_else(|| {
                        TokenizerError::Unsupported(format!(
                            "{}: {key} {text:?} is not a token of tokenizer.json",
                            path.display()
                        ))
                    })
                })
                .transpose()?;
        }
        tokenizer.chat_template = Self::read_chat_template(dir)?;
        Ok(tokenizer)
    }

    /// Reads the chat template of a Hugging Face folder: `chat_template.jinja`, or
    /// `chat_template` in `tokenizer_config.json` (a string, or a list of named templates of
    /// which `default` is taken). `None` when the folder has none.
    pub fn read_chat_template(dir: &Path) -> Result<Option<String>, TokenizerError> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            return std::fs::read_to_string(&jinja)
                .map(Some)
                .map_err(|e| TokenizerError::Unsupported(format!("{}: {e}", jinja.display())));
        }
        let Some((_, parsed)) = read_json(&dir.join("tokenizer_config.json"))? else {
            return Ok(None);
        };
        Ok(match parsed.get("chat_template") {
            Some(serde_json::Value::String(template)) => Some(template.clone()),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|entry| entry.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|entry| entry.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_owned),
            _ => None,
        })
    }

    /// The token string of `id` (special tokens included).
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The model's chat template, compiled, with its BOS and EOS tokens.
    pub fn chat_template(&self) -> Result<crate::chat::ChatTemplate, crate::chat::ChatError> {
        let source = self.chat_template.as_deref().ok_or_else(|| {
            crate::chat::ChatError::Template(
                "the model has no chat template, which conversations need".into(),
            )
        })?;
        let token = |id: Option<u32>| id.and_then(|id| self.token(id)).unwrap_or_default();
        crate::chat::ChatTemplate::new(source, &token(self.bos), &token(self.eos))
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, false)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|e| TokenizerError::Library(e.to_string()))
    }

    /// Token ids of `text` (no special tokens added), each with the byte range of `text` it
    /// came from (never empty: no post-processor trims it, see [`TextTokenizer::from_file`]).
    pub fn encode_with_offsets(
        &self,
        text: &str,
    ) -> Result<Vec<(u32, Range<usize>)>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Library(e.to_string()))?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_offsets())
            .map(|(&id, &(start, end))| (id, start..end))
            .collect())
    }

    /// The text of `ids` with special tokens written out (as a chat template prints them).
    pub fn decode_with_special_tokens(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, false)
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
