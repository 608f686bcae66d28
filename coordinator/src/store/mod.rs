//! Durable state: metadata in SQLite or PostgreSQL ([`db`]) and content-addressed blobs.
//! Only this module touches the database or the blob layout.
//!
//! Blobs live in two tiers, both named by their blake3 hash: small deltas (up to
//! [`INLINE_BLOB_MAX`] bytes) are rows of the database, written in the same transaction as the
//! submission they belong to; everything else is a file in the blob directory ([`blobs`]).
//! Creating a file costs about a millisecond on this project's ext4 machines (inode allocation),
//! more than everything else a small upload needs; a row costs microseconds under group commit.

pub mod blobs;
pub mod db;
pub mod fleet;
pub mod gc;
pub mod leases;
pub mod objects;
pub mod postgres;
mod postgres_tls;
pub mod read_pool;
mod sql;
pub mod staged;
pub mod test_garage;
pub mod test_postgres;

use std::path::Path;

use tributary_shared::BlobHash;

use crate::store::blobs::{BlobError, BlobStore};
use crate::store::db::Db;

/// Deltas up to this size are stored in the database rather than as files.
pub const INLINE_BLOB_MAX: usize = 64 * 1024;

/// Reads blobs by hash, verifying them.
pub trait BlobSource {
    /// The blob's bytes, checked against `hash`.
    fn get(&self, hash: &BlobHash) -> Result<Vec<u8>, BlobError>;

    /// [`BlobSource::get`] for each of `hashes`, in order (a source may fetch them at once).
    fn get_many(&self, hashes: &[BlobHash]) -> Vec<Result<Vec<u8>, BlobError>> {
        hashes.iter().map(|hash| self.get(hash)).collect()
    }
}

impl BlobSource for BlobStore {
    fn get(&self, hash: &BlobHash) -> Result<Vec<u8>, BlobError> {
        BlobStore::get(self, hash)
    }

    fn get_many(&self, hashes: &[BlobHash]) -> Vec<Result<Vec<u8>, BlobError>> {
        BlobStore::get_many(self, hashes)
    }
}

/// Both tiers of a data directory, for readers outside the hub (aggregation, `verify`).
#[derive(Debug)]
pub struct StoredBlobs {
    files: BlobStore,
    db: Db,
}

impl StoredBlobs {
    /// Opens a data directory's blobs for reading.
    pub fn open(data_dir: &Path) -> Result<Self, BlobError> {
        let files = BlobStore::at_data_dir(data_dir)?;
        let db = Db::open_read_only_in(data_dir).map_err(|error| BlobError::Io {
            path: data_dir.join(db::DATABASE_FILE),
            source: std::io::Error::other(error.to_string()),
        })?;
        Ok(Self { files, db })
    }

    /// The blob files.
    pub fn files(&self) -> &BlobStore {
        &self.files
    }
}

impl BlobSource for StoredBlobs {
    fn get(&self, hash: &BlobHash) -> Result<Vec<u8>, BlobError> {
        match self.files.get(hash) {
            Err(BlobError::NotFound { .. }) => {}
            other => return other,
        }
        let bytes = self
            .db
            .inline_blob(hash)
            .map_err(|error| BlobError::Io {
                path: "the database".into(),
                source: std::io::Error::other(error.to_string()),
            })?
            .ok_or(BlobError::NotFound { hash: *hash })?;
        blobs::check_content(hash, bytes)
    }

    fn get_many(&self, hashes: &[BlobHash]) -> Vec<Result<Vec<u8>, BlobError>> {
        // Files (or objects) first, all at once; the small deltas kept as rows after.
        self.files
            .get_many(hashes)
            .into_iter()
            .zip(hashes)
            .map(|(found, hash)| match found {
                Err(BlobError::NotFound { .. }) => self.get(hash),
                other => other,
            })
            .collect()
    }
}
