//! The content-addressed blob directory: files named by their blake3 hash.
//!
//! Writes go to a temporary file in the same directory, are fsynced, renamed to their hash and
//! the directory fsynced, so a crash leaves either no blob or the whole blob, never a torn one.
//! Readers verify the hash of what they read.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tributary_shared::BlobHash;

/// A blob store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// Filesystem error.
    #[error("blob store i/o at {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// No such blob.
    #[error("blob {hash} not found")]
    NotFound {
        /// Which.
        hash: BlobHash,
    },
    /// The file's contents do not hash to its name.
    #[error("blob {expected} is corrupt: its content hashes to {actual}")]
    Corrupt {
        /// The name.
        expected: BlobHash,
        /// The content's hash.
        actual: BlobHash,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The blob directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Marks a temporary file name: `<hash>.tmp-<pid>-<n>`.
const TEMP_MARK: &str = ".tmp-";

impl BlobStore {
    /// Opens (creating) the store at `root`, removing temporary files a crash left behind.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_error(&root))?;
        for entry in fs::read_dir(&root).map_err(io_error(&root))? {
            let dir = entry.map_err(io_error(&root))?.path();
            if !dir.is_dir() {
                continue;
            }
            for file in fs::read_dir(&dir).map_err(io_error(&dir))? {
                let path = file.map_err(io_error(&dir))?.path();
                let is_temp = path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.contains(TEMP_MARK));
                if is_temp {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(Self { root })
    }

    /// The store at `root` for reading, without the start-up cleanup of [`BlobStore::open`].
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Where the blob named `hash` lives (two-level fan-out by the first hex byte).
    pub fn path(&self, hash: &BlobHash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// Stores `bytes`, returning their hash. Idempotent.
    pub fn put(&self, bytes: &[u8]) -> Result<BlobHash, BlobError> {
        let hash = BlobHash::of(bytes);
        self.put_hashed(hash, bytes)?;
        Ok(hash)
    }

    /// Stores `bytes` whose hash the caller computed while receiving them (checked in debug
    /// builds). The temporary file lives beside its final name, so the rename stays inside one
    /// fan-out directory and concurrent writers rarely share a directory lock.
    pub fn put_hashed(&self, hash: BlobHash, bytes: &[u8]) -> Result<(), BlobError> {
        debug_assert_eq!(
            hash,
            BlobHash::of(bytes),
            "caller's hash must match the bytes"
        );
        let target = self.path(&hash);
        if target.is_file() {
            // Another writer may have renamed it in but not yet synced the directory: sync it
            // here too, so "stored" always means durable.
            let dir = target.parent().expect("blob paths have a parent");
            return File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_error(dir));
        }
        let dir = target
            .parent()
            .expect("blob paths have a parent")
            .to_owned();
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(io_error(&dir))?;
            // The new fan-out directory's own entry must be durable too.
            File::open(&self.root)
                .and_then(|root| root.sync_all())
                .map_err(io_error(&self.root))?;
        }
        let counter = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!(
            "{}{TEMP_MARK}{}-{counter}",
            hash.to_hex(),
            std::process::id()
        ));
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)?;
            file.write_all(bytes)?;
            file.sync_all()
        })();
        if let Err(source) = written {
            let _ = fs::remove_file(&temp);
            return Err(BlobError::Io { path: temp, source });
        }
        fs::rename(&temp, &target).map_err(io_error(&target))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&dir))?;
        Ok(())
    }

    /// Reads a blob whole, verifying its hash.
    pub fn get(&self, hash: &BlobHash) -> Result<Vec<u8>, BlobError> {
        let path = self.path(hash);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound { hash: *hash })
            }
            Err(error) => return Err(io_error(&path)(error)),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_error(&path))?;
        check_content(hash, bytes)
    }
}

/// Returns `bytes` if they hash to `hash`, else [`BlobError::Corrupt`].
pub fn check_content(hash: &BlobHash, bytes: Vec<u8>) -> Result<Vec<u8>, BlobError> {
    let actual = BlobHash::of(&bytes);
    if actual != *hash {
        return Err(BlobError::Corrupt {
            expected: *hash,
            actual,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_and_len_agree() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let hash = store.put(b"hello world").unwrap();
        assert_eq!(hash, BlobHash::of(b"hello world"));
        assert_eq!(store.get(&hash).unwrap(), b"hello world");
        assert_eq!(store.put(b"hello world").unwrap(), hash, "idempotent");
        assert_eq!(store.get(&hash).unwrap().len(), 11);
    }

    #[test]
    fn leftovers_are_cleaned_and_corruption_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let hash = store.put(b"good").unwrap();
        let leftover = store
            .path(&hash)
            .with_file_name(format!("{}{TEMP_MARK}1-1", hash.to_hex()));
        fs::write(&leftover, b"half").unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        assert!(
            !leftover.exists(),
            "a crash's temporary file is removed on open"
        );
        let missing = store.get(&BlobHash::of(b"nope"));
        assert!(matches!(missing, Err(BlobError::NotFound { .. })));
        fs::write(store.path(&hash), b"evil").unwrap();
        assert!(matches!(store.get(&hash), Err(BlobError::Corrupt { .. })));
    }
}
