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

impl BlobStore {
    /// Opens (creating) the store at `root`, removing temporary files a crash left behind.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let root = root.into();
        fs::create_dir_all(root.join("tmp")).map_err(io_error(&root))?;
        let tmp = root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_error(&tmp))? {
            let entry = entry.map_err(io_error(&tmp))?;
            let _ = fs::remove_file(entry.path());
        }
        Ok(Self { root })
    }

    /// Where the blob named `hash` lives (two-level fan-out by the first hex byte).
    pub fn path(&self, hash: &BlobHash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// True if the blob is stored.
    pub fn contains(&self, hash: &BlobHash) -> bool {
        self.path(hash).is_file()
    }

    /// Stores `bytes`, returning their hash. Idempotent.
    pub fn put(&self, bytes: &[u8]) -> Result<BlobHash, BlobError> {
        let mut writer = self.writer()?;
        writer.write(bytes)?;
        let (hash, _) = writer.commit()?;
        Ok(hash)
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
        let actual = BlobHash::of(&bytes);
        if actual != *hash {
            return Err(BlobError::Corrupt {
                expected: *hash,
                actual,
            });
        }
        Ok(bytes)
    }

    /// The stored size of a blob.
    pub fn len(&self, hash: &BlobHash) -> Result<u64, BlobError> {
        let path = self.path(hash);
        match fs::metadata(&path) {
            Ok(meta) => Ok(meta.len()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                Err(BlobError::NotFound { hash: *hash })
            }
            Err(error) => Err(io_error(&path)(error)),
        }
    }

    /// Opens a blob for streaming reads (no hash check; the reader's peer checks).
    pub fn open_read(&self, hash: &BlobHash) -> Result<File, BlobError> {
        let path = self.path(hash);
        File::open(&path).map_err(|error| match error.kind() {
            io::ErrorKind::NotFound => BlobError::NotFound { hash: *hash },
            _ => io_error(&path)(error),
        })
    }

    /// Starts a streaming write that hashes as it goes.
    pub fn writer(&self) -> Result<BlobWriter, BlobError> {
        let counter = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .root
            .join("tmp")
            .join(format!("{}-{counter}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(io_error(&temp))?;
        Ok(BlobWriter {
            store: self.clone(),
            temp,
            file: Some(file),
            hasher: blake3::Hasher::new(),
            len: 0,
        })
    }
}

/// A blob being written. Dropping it without [`BlobWriter::commit`] discards it.
#[derive(Debug)]
pub struct BlobWriter {
    store: BlobStore,
    temp: PathBuf,
    file: Option<File>,
    hasher: blake3::Hasher,
    len: u64,
}

impl BlobWriter {
    /// Appends bytes.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        let file = self.file.as_mut().expect("the file is present until commit");
        file.write_all(bytes).map_err(io_error(&self.temp))
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The hash of what was written so far.
    pub fn hash(&self) -> BlobHash {
        self.hasher.finalize().into()
    }

    /// Makes the blob durable under its hash: fsync, rename, fsync the directory.
    pub fn commit(mut self) -> Result<(BlobHash, u64), BlobError> {
        let hash = self.hash();
        let file = self.file.take().expect("the file is present until commit");
        file.sync_all().map_err(io_error(&self.temp))?;
        drop(file);
        let target = self.store.path(&hash);
        let dir = target.parent().expect("blob paths have a parent").to_owned();
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        fs::rename(&self.temp, &target).map_err(io_error(&target))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&dir))?;
        Ok((hash, self.len))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_and_streaming_agree() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let hash = store.put(b"hello world").unwrap();
        assert_eq!(hash, BlobHash::of(b"hello world"));
        assert_eq!(store.get(&hash).unwrap(), b"hello world");
        let mut writer = store.writer().unwrap();
        writer.write(b"hello ").unwrap();
        writer.write(b"world").unwrap();
        assert_eq!(writer.commit().unwrap(), (hash, 11));
        assert_eq!(store.len(&hash).unwrap(), 11);
    }

    #[test]
    fn dropped_writer_leaves_nothing_and_corruption_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut writer = store.writer().unwrap();
        writer.write(b"partial").unwrap();
        let hash = writer.hash();
        drop(writer);
        assert!(!store.contains(&hash));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let missing = store.get(&BlobHash::of(b"nope"));
        assert!(matches!(missing, Err(BlobError::NotFound { .. })));
        let hash = store.put(b"good").unwrap();
        fs::write(store.path(&hash), b"evil").unwrap();
        assert!(matches!(store.get(&hash), Err(BlobError::Corrupt { .. })));
    }
}
