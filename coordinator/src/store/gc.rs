//! Garbage collection of blob files nothing refers to: bodies of uploads that were refused or
//! late after they were stored, adapters of rounds that never committed. Run at start and
//! periodically by `serve`, and by `tributary-coordinator gc`.
//!
//! What is kept: every blob the database refers to ([`Db::referenced_blobs`]), the caller's
//! extra roots (the served base model), and every file younger than the grace period. The grace
//! period covers the one window in which a needed blob is not referenced yet: an upload written
//! by its connection task before the hub records it, or a round's adapter written before its
//! ledger entry commits. It must exceed the longest upload (the body deadline plus the queue
//! wait); the default is an hour.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use tributary_shared::BlobHash;

use crate::store::blobs::{BlobError, BlobFile, BlobStore};
use crate::store::db::{Db, DbError};

/// How old an unreferenced blob must be before it is removed, by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Blob files looked at.
    pub scanned: u64,
    /// Files removed.
    pub removed: u64,
    /// Bytes they held.
    pub bytes_freed: u64,
    /// Unreferenced files kept because they are younger than the grace period.
    pub kept_young: u64,
}

/// Why a collection could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GcError {
    /// The database could not be read.
    #[error("cannot read the database: {0}")]
    Db(#[from] DbError),
    /// The blobs could not be listed or one removed.
    #[error("blob store: {0}")]
    Blobs(#[from] BlobError),
}

/// The decision, pure: which `files` to remove given what is `referenced`.
pub fn unreferenced<'a>(
    files: &'a [BlobFile],
    referenced: &BTreeSet<BlobHash>,
    grace: Duration,
    now: SystemTime,
) -> (Vec<&'a BlobFile>, u64) {
    let mut remove = Vec::new();
    let mut young = 0;
    for file in files.iter().filter(|f| !referenced.contains(&f.hash)) {
        let age = now.duration_since(file.modified).unwrap_or(Duration::ZERO);
        if age >= grace {
            remove.push(file);
        } else {
            young += 1;
        }
    }
    (remove, young)
}

/// Collects `data_dir`'s unreferenced blob files older than `grace`, keeping `roots` too.
pub fn collect(
    data_dir: &Path,
    roots: &BTreeSet<BlobHash>,
    grace: Duration,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    let db = Db::open_read_only_in(data_dir)?;
    // The referenced set is read before the directory is listed: a blob written after this
    // point is younger than the grace period when it is listed.
    let mut referenced = db.referenced_blobs()?;
    referenced.extend(roots.iter().copied());
    let store = BlobStore::at_data_dir(data_dir)?;
    let files = store.list()?;
    let (remove, kept_young) = unreferenced(&files, &referenced, grace, SystemTime::now());
    let mut report = GcReport {
        scanned: files.len() as u64,
        kept_young,
        ..GcReport::default()
    };
    for file in remove {
        if !dry_run {
            store.remove(&file.hash)?;
        }
        report.removed += 1;
        report.bytes_freed += file.len;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn referenced_and_young_files_are_never_removed(
            files in proptest::collection::vec((any::<[u8; 32]>(), 0u64..7200), 0..64),
            grace in 0u64..7200,
        ) {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
            let files: Vec<BlobFile> = files
                .iter()
                .map(|(hash, age)| BlobFile {
                    hash: BlobHash(*hash),
                    len: 1,
                    modified: now - Duration::from_secs(*age),
                })
                .collect();
            let referenced: BTreeSet<BlobHash> = files.iter().step_by(3).map(|f| f.hash).collect();
            let grace = Duration::from_secs(grace);
            let (remove, young) = unreferenced(&files, &referenced, grace, now);
            for file in &remove {
                prop_assert!(!referenced.contains(&file.hash));
                prop_assert!(now.duration_since(file.modified).unwrap() >= grace);
            }
            let unreferenced_count = files.iter().filter(|f| !referenced.contains(&f.hash)).count();
            prop_assert_eq!(remove.len() as u64 + young, unreferenced_count as u64);
        }
    }
}
