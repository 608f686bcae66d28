//! Content-addressed blobs, named by their blake3 hash: files in the data directory's `blobs`
//! (the embedded default), or objects in S3-compatible storage ([`super::objects`]).
//!
//! File writes go to a temporary file in the same directory, are fsynced, renamed to their hash
//! and the directory fsynced, so a crash leaves either no blob or the whole blob, never a torn
//! one. Readers verify the hash of what they read, whatever the backend.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::io::AsyncReadExt;
use tributary_shared::BlobHash;

use super::objects::ObjectBlobs;

/// The name of the file in a data directory that points its blobs at object storage.
pub const BLOBS_FILE: &str = "blobs.url";

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
    /// The object store failed or refused.
    #[error("object store {url}: {detail}")]
    Remote {
        /// The store.
        url: String,
        /// What went wrong.
        detail: String,
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

/// A stored blob, as the collector sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobFile {
    /// Its name.
    pub hash: BlobHash,
    /// Its size in bytes.
    pub len: u64,
    /// When it was last written.
    pub modified: SystemTime,
}

/// The blob store: a directory, or a bucket prefix. Cloning shares it.
#[derive(Debug, Clone)]
pub struct BlobStore {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Dir(PathBuf),
    Objects(Arc<ObjectBlobs>),
}

/// A blob being read for a download, chunk by chunk (unverified; the reader checks the hash).
#[derive(Debug)]
pub enum BlobReader {
    /// From a file.
    File(tokio::fs::File),
    /// From an object store.
    Chunks(tokio::sync::mpsc::Receiver<Result<bytes::Bytes, BlobError>>),
}

impl BlobReader {
    /// The next chunk, `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<bytes::Bytes>, BlobError> {
        match self {
            Self::File(file) => {
                let mut buffer = vec![0u8; 64 * 1024];
                let n = file
                    .read(&mut buffer)
                    .await
                    .map_err(|source| BlobError::Io {
                        path: "a blob being downloaded".into(),
                        source,
                    })?;
                buffer.truncate(n);
                Ok((n > 0).then(|| buffer.into()))
            }
            Self::Chunks(chunks) => chunks.recv().await.transpose(),
        }
    }
}

/// Where a data directory's blobs live: the URL in its [`BLOBS_FILE`], else its `blobs`.
pub fn blobs_url(data_dir: &Path) -> Result<Option<String>, BlobError> {
    let pointer = data_dir.join(BLOBS_FILE);
    match fs::read_to_string(&pointer) {
        Ok(url) => Ok(Some(url.trim().to_owned())),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(BlobError::Io {
            path: pointer,
            source,
        }),
    }
}

/// Points a data directory's blobs at `url` for good, or checks that they already point there.
/// A directory whose blobs are elsewhere (another URL, or files already in `blobs`) is refused.
pub fn bind_blobs(data_dir: &Path, url: &str) -> Result<(), BlobError> {
    let refuse = |detail: String| BlobError::Remote {
        url: url.to_owned(),
        detail,
    };
    match blobs_url(data_dir)? {
        Some(bound) if bound == url => Ok(()),
        Some(bound) => Err(refuse(format!(
            "the data directory {} keeps its blobs in {bound}; use another data directory",
            data_dir.display()
        ))),
        None if fs::read_dir(data_dir.join("blobs")).is_ok_and(|mut d| d.next().is_some()) => {
            Err(refuse(format!(
                "the data directory {} already keeps its blobs in files; use another data \
                 directory",
                data_dir.display()
            )))
        }
        None => crate::durable::write_atomically(
            &data_dir.join(BLOBS_FILE),
            format!("{url}\n").as_bytes(),
            false,
        )
        .map_err(|source| BlobError::Io {
            path: data_dir.join(BLOBS_FILE),
            source,
        }),
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Marks a temporary file name: `<hash>.tmp-<pid>-<n>`.
const TEMP_MARK: &str = ".tmp-";

impl BlobStore {
    /// Opens (creating) the store at `root`, removing temporary files a crash left behind.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let root = root.into();
        Self::clean_dir(&root)?;
        Ok(Self {
            backend: Backend::Dir(root),
        })
    }

    /// Opens a data directory's blobs, wherever they live (see [`blobs_url`]); a directory is
    /// cleaned of a crash's temporary files.
    pub fn open_in(data_dir: &Path) -> Result<Self, BlobError> {
        match blobs_url(data_dir)? {
            Some(url) => Self::objects(&url),
            None => Self::open(data_dir.join("blobs")),
        }
    }

    /// A data directory's blobs for reading, wherever they live.
    pub fn at_data_dir(data_dir: &Path) -> Result<Self, BlobError> {
        match blobs_url(data_dir)? {
            Some(url) => Self::objects(&url),
            None => Ok(Self::at(data_dir.join("blobs"))),
        }
    }

    /// Blobs in object storage at `url` (`s3://bucket/prefix`), with the `AWS_*` settings of
    /// the environment.
    pub fn objects(url: &str) -> Result<Self, BlobError> {
        Ok(Self {
            backend: Backend::Objects(Arc::new(ObjectBlobs::connect(url)?)),
        })
    }

    /// Blobs in object storage at `url`, with the `AWS_*` settings given.
    pub fn objects_with(
        url: &str,
        settings: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, BlobError> {
        Ok(Self {
            backend: Backend::Objects(Arc::new(ObjectBlobs::connect_with(url, settings)?)),
        })
    }

    fn clean_dir(root: &Path) -> Result<(), BlobError> {
        let root = root.to_owned();
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
        Ok(())
    }

    /// The directory at `root` for reading, without the start-up cleanup of
    /// [`BlobStore::open`].
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self {
            backend: Backend::Dir(root.into()),
        }
    }

    /// Where the file of blob `hash` lives (two-level fan-out by the first hex byte); `None`
    /// in object storage.
    pub fn path(&self, hash: &BlobHash) -> Option<PathBuf> {
        match &self.backend {
            Backend::Dir(root) => Some(dir_path(root, hash)),
            Backend::Objects(_) => None,
        }
    }

    /// Where the blobs are, for messages.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Dir(root) => root.display().to_string(),
            Backend::Objects(objects) => objects.url().to_owned(),
        }
    }

    /// The stored size of blob `hash`, if it is stored.
    pub fn stored_len(&self, hash: &BlobHash) -> Result<Option<u64>, BlobError> {
        match &self.backend {
            Backend::Dir(root) => {
                let path = dir_path(root, hash);
                match fs::metadata(&path) {
                    Ok(metadata) => Ok(Some(metadata.len())),
                    Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(error) => Err(io_error(&path)(error)),
                }
            }
            Backend::Objects(objects) => objects.len(hash),
        }
    }

    /// Opens blob `hash` for a streamed download: its stored length and a reader.
    pub async fn reader(&self, hash: &BlobHash) -> Result<(u64, BlobReader), BlobError> {
        match &self.backend {
            Backend::Dir(root) => {
                let path = dir_path(root, hash);
                let file = match tokio::fs::File::open(&path).await {
                    Ok(file) => file,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {
                        return Err(BlobError::NotFound { hash: *hash })
                    }
                    Err(error) => return Err(io_error(&path)(error)),
                };
                let len = file.metadata().await.map_err(io_error(&path))?.len();
                Ok((len, BlobReader::File(file)))
            }
            Backend::Objects(objects) => {
                let (len, chunks) = objects.stream(hash).await?;
                Ok((len, BlobReader::Chunks(chunks)))
            }
        }
    }

    /// Every stored blob (files or objects), for the collector.
    pub fn list(&self) -> Result<Vec<BlobFile>, BlobError> {
        match &self.backend {
            Backend::Dir(root) => list_dir(root),
            Backend::Objects(objects) => objects.list(),
        }
    }

    /// Deletes blob `hash` (a missing one is not an error).
    pub fn remove(&self, hash: &BlobHash) -> Result<(), BlobError> {
        match &self.backend {
            Backend::Dir(root) => {
                let path = dir_path(root, hash);
                match fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(error) => Err(io_error(&path)(error)),
                }
            }
            Backend::Objects(objects) => objects.remove(hash),
        }
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
        let root = match &self.backend {
            Backend::Dir(root) => root,
            Backend::Objects(objects) => return objects.put(&hash, bytes),
        };
        let target = dir_path(root, &hash);
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
            File::open(root)
                .and_then(|root| root.sync_all())
                .map_err(io_error(root))?;
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
        let root = match &self.backend {
            Backend::Dir(root) => root,
            Backend::Objects(objects) => return check_content(hash, objects.get(hash)?),
        };
        let path = dir_path(root, hash);
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

impl BlobStore {
    /// [`BlobStore::get`] for each of `hashes`, in order: from object storage, several
    /// requests at once.
    pub fn get_many(&self, hashes: &[BlobHash]) -> Vec<Result<Vec<u8>, BlobError>> {
        match &self.backend {
            Backend::Objects(objects) => hashes
                .iter()
                .zip(objects.get_many(hashes, PARALLEL_GETS))
                .map(|(hash, got)| got.and_then(|bytes| check_content(hash, bytes)))
                .collect(),
            Backend::Dir(_) => hashes.iter().map(|hash| self.get(hash)).collect(),
        }
    }
}

/// Object-store reads in flight at once in [`BlobStore::get_many`].
const PARALLEL_GETS: usize = 16;

fn dir_path(root: &Path, hash: &BlobHash) -> PathBuf {
    let hex = hash.to_hex();
    root.join(&hex[..2]).join(hex)
}

/// The blob files under `root` (none when it does not exist).
fn list_dir(root: &Path) -> Result<Vec<BlobFile>, BlobError> {
    let mut files = Vec::new();
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(files),
        Err(error) => return Err(io_error(root)(error)),
    };
    for entry in entries {
        let dir = entry.map_err(io_error(root))?.path();
        if !dir.is_dir() {
            continue;
        }
        for file in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let file = file.map_err(io_error(&dir))?;
            let Some(hash) = file
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<BlobHash>().ok())
            else {
                continue;
            };
            let path = file.path();
            let metadata = file.metadata().map_err(io_error(&path))?;
            if !metadata.is_file() {
                continue;
            }
            files.push(BlobFile {
                hash,
                len: metadata.len(),
                modified: metadata.modified().map_err(io_error(&path))?,
            });
        }
    }
    Ok(files)
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
            .unwrap()
            .with_file_name(format!("{}{TEMP_MARK}1-1", hash.to_hex()));
        fs::write(&leftover, b"half").unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        assert!(
            !leftover.exists(),
            "a crash's temporary file is removed on open"
        );
        let missing = store.get(&BlobHash::of(b"nope"));
        assert!(matches!(missing, Err(BlobError::NotFound { .. })));
        fs::write(store.path(&hash).unwrap(), b"evil").unwrap();
        assert!(matches!(store.get(&hash), Err(BlobError::Corrupt { .. })));
    }
}
