//! Auditor tokens: who may read the individual deltas of an experiment that keeps them private
//! (the default). Merged adapters are public; a volunteer's own delta says more about its data
//! than anyone else needs to know, so the hub serves it only when the experiment sets
//! `publish_deltas = true`, or to a request bearing an auditor token
//! (`Authorization: Bearer TOKEN`).
//!
//! Tokens are made by `tributary-coordinator auditor-token`; `DATA_DIR/auditors` holds only their
//! blake3 hashes, one per line (delete a line to revoke it). The file is read on each request
//! for a private blob, so changes apply at once.

use std::io::Write as _;
use std::path::Path;

/// The file of auditor token hashes in a data directory.
pub const AUDITORS_FILE: &str = "auditors";

/// Makes a new auditor token, appends its hash to `DATA_DIR/auditors` (created 0600) and
/// returns the token.
pub fn new_token(data_dir: &Path) -> std::io::Result<String> {
    let token = format!("audit-{}", hex::encode(rand::random::<[u8; 24]>()));
    let path = data_dir.join(AUDITORS_FILE);
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&path)?;
    writeln!(file, "{}", hash(&token))?;
    file.sync_all()?;
    Ok(token)
}

/// True when `token` is one of the data directory's auditor tokens. A missing file admits
/// nobody.
pub fn is_auditor(data_dir: &Path, token: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(data_dir.join(AUDITORS_FILE)) else {
        return false;
    };
    let presented = hash(token.trim());
    text.lines().any(|line| line.trim() == presented)
}

fn hash(token: &str) -> String {
    hex::encode(blake3::hash(token.as_bytes()).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_admits_until_its_line_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_auditor(dir.path(), "anything"));
        let first = new_token(dir.path()).unwrap();
        let second = new_token(dir.path()).unwrap();
        assert!(is_auditor(dir.path(), &first));
        assert!(is_auditor(dir.path(), &second));
        assert!(!is_auditor(dir.path(), "audit-0000"));
        let file = dir.path().join(AUDITORS_FILE);
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains(&first), "only hashes are stored");
        let kept: Vec<&str> = text.lines().skip(1).collect();
        std::fs::write(&file, kept.join("\n")).unwrap();
        assert!(!is_auditor(dir.path(), &first));
        assert!(is_auditor(dir.path(), &second));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let dir = tempfile::tempdir().unwrap();
            new_token(dir.path()).unwrap();
            let mode = std::fs::metadata(dir.path().join(AUDITORS_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0);
        }
    }
}
