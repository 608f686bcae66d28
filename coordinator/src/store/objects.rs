//! Blobs in S3-compatible object storage (AWS S3, Cloudflare R2, MinIO, Garage, …) through the
//! `object_store` crate: the same content-addressed names as the blob directory, under a bucket
//! prefix.
//!
//! The store is used synchronously, like the blob directory: its requests run on a small
//! runtime of their own and callers wait on a channel, which any thread may do (entering a
//! second runtime would not be allowed from the coordinator's async tasks). One runtime also
//! keeps the HTTP connection pool on one reactor. Downloads stream chunk by chunk.
//!
//! An object is written with one `PUT` (S3 makes it visible whole or not at all, and answers
//! only once it is stored) or, above [`MULTIPART_FROM`], as a multipart upload completed at the
//! end. Every read is checked against its hash by the caller, as with files.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::sync::mpsc;
use tributary_shared::BlobHash;

use super::blobs::{BlobError, BlobFile};

/// Objects at least this large go up as multipart uploads, in parts of this size.
pub const MULTIPART_FROM: usize = 16 * 1024 * 1024;

/// A bucket prefix holding blobs.
#[derive(Debug)]
pub struct ObjectBlobs {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// Always `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for ObjectBlobs {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async task may not; this does not.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl ObjectBlobs {
    /// Connects to `url` (`s3://bucket/prefix`). Credentials, region and endpoint come from
    /// the usual AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT` for a server other than AWS, `AWS_ALLOW_HTTP=true` for plain HTTP).
    pub fn connect(url: &str) -> Result<Self, BlobError> {
        Self::connect_with(url, std::env::vars())
    }

    /// [`ObjectBlobs::connect`] with the `AWS_*` settings taken from `settings` instead of the
    /// environment.
    pub fn connect_with(
        url: &str,
        settings: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, BlobError> {
        let fail = |detail: String| BlobError::Remote {
            url: url.to_owned(),
            detail,
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| fail("an object store URL starts with s3://".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(fail("the URL names no bucket".into()));
        }
        // The HTTP client's TLS needs a process-wide rustls provider; two are linked (ring for
        // QUIC, aws-lc-rs with the client), so name one. Installing it again is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Fail within seconds when the store is away (the caller retries, or refuses an
        // upload), rather than after the client's default three minutes of retries. Settings
        // from the environment come after, so they may change these (and allow plain HTTP).
        let retry = object_store::RetryConfig {
            max_retries: 3,
            retry_timeout: std::time::Duration::from_secs(10),
            ..Default::default()
        };
        let client = object_store::ClientOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(5))
            .with_timeout(std::time::Duration::from_secs(120));
        let mut builder = object_store::aws::AmazonS3Builder::new()
            .with_retry(retry)
            .with_client_options(client);
        for (key, value) in settings {
            if key.starts_with("AWS_") {
                if let Ok(key) = key.to_ascii_lowercase().parse() {
                    builder = builder.with_config(key, value);
                }
            }
        }
        let store = builder
            .with_bucket_name(bucket)
            .build()
            .map_err(|error| fail(error.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("object-store")
            .enable_all()
            .build()
            .map_err(|error| fail(format!("runtime: {error}")))?;
        Ok(Self {
            url: url.to_owned(),
            store: Arc::new(store),
            prefix: ObjectPath::from(prefix.trim_matches('/')),
            runtime: Some(runtime),
        })
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn spawn(&self, future: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Some(runtime) = &self.runtime {
            runtime.spawn(future);
        }
    }

    fn name(&self, hash: &BlobHash) -> ObjectPath {
        let hex = hash.to_hex();
        self.prefix.clone().join(&hex[..2]).join(hex)
    }

    fn error(&self, error: object_store::Error) -> BlobError {
        BlobError::Remote {
            url: self.url.clone(),
            detail: describe(&error),
        }
    }

    /// Runs `future` on the store's runtime and waits for it, from any thread.
    fn wait<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, BlobError> {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        self.spawn(async move {
            let _ = done.send(future.await);
        });
        result.recv().map_err(|_| BlobError::Remote {
            url: self.url.clone(),
            detail: "the object store's runtime stopped".into(),
        })
    }

    /// Stores `bytes` under `hash` (idempotent: the same name always holds the same bytes).
    pub fn put(&self, hash: &BlobHash, bytes: &[u8]) -> Result<(), BlobError> {
        let (store, name) = (self.store.clone(), self.name(hash));
        let bytes = Bytes::copy_from_slice(bytes);
        let result = self.wait(async move {
            if bytes.len() < MULTIPART_FROM {
                store.put(&name, PutPayload::from(bytes)).await.map(|_| ())
            } else {
                let upload = store.put_multipart(&name).await?;
                let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_FROM);
                for part in bytes.chunks(MULTIPART_FROM) {
                    writer.wait_for_capacity(4).await?;
                    writer.write(part);
                }
                writer.finish().await.map(|_| ())
            }
        })?;
        result.map_err(|error| self.error(error))
    }

    /// The bytes stored under `hash`, unverified.
    pub fn get(&self, hash: &BlobHash) -> Result<Vec<u8>, BlobError> {
        let (store, name) = (self.store.clone(), self.name(hash));
        let result = self.wait(async move {
            let found = store.get(&name).await?;
            found.bytes().await
        })?;
        match result {
            Ok(bytes) => Ok(bytes.to_vec()),
            Err(object_store::Error::NotFound { .. }) => Err(BlobError::NotFound { hash: *hash }),
            Err(error) => Err(self.error(error)),
        }
    }

    /// The bytes stored under each of `hashes`, unverified, in order; up to `concurrency`
    /// requests in flight at once (an object store answers each request in tens of
    /// milliseconds, so fetching a round's deltas one by one would take most of its close).
    pub fn get_many(
        &self,
        hashes: &[BlobHash],
        concurrency: usize,
    ) -> Vec<Result<Vec<u8>, BlobError>> {
        use futures_util::stream::{self, StreamExt as _};
        let names: Vec<ObjectPath> = hashes.iter().map(|hash| self.name(hash)).collect();
        let store = self.store.clone();
        let answers = self.wait(async move {
            stream::iter(names)
                .map(|name| {
                    let store = store.clone();
                    async move {
                        let found = store.get(&name).await?;
                        found.bytes().await
                    }
                })
                .buffered(concurrency.max(1))
                .collect::<Vec<_>>()
                .await
        });
        let answers = match answers {
            Ok(answers) => answers,
            Err(error) => {
                return hashes
                    .iter()
                    .map(|_| {
                        Err(BlobError::Remote {
                            url: self.url.clone(),
                            detail: error.to_string(),
                        })
                    })
                    .collect()
            }
        };
        hashes
            .iter()
            .zip(answers)
            .map(|(hash, answer)| match answer {
                Ok(bytes) => Ok(bytes.to_vec()),
                Err(object_store::Error::NotFound { .. }) => {
                    Err(BlobError::NotFound { hash: *hash })
                }
                Err(error) => Err(self.error(error)),
            })
            .collect()
    }

    /// The stored length under `hash`, if anything is stored there.
    pub fn len(&self, hash: &BlobHash) -> Result<Option<u64>, BlobError> {
        let (store, name) = (self.store.clone(), self.name(hash));
        match self.wait(async move { store.head(&name).await })? {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(self.error(error)),
        }
    }

    /// Streams the object under `hash`: its length, then its chunks as they arrive.
    pub async fn stream(
        &self,
        hash: &BlobHash,
    ) -> Result<(u64, mpsc::Receiver<Result<Bytes, BlobError>>), BlobError> {
        let (store, name, url) = (self.store.clone(), self.name(hash), self.url.clone());
        let (meta, chunks) = tokio::sync::oneshot::channel();
        let (sender, receiver) = mpsc::channel(4);
        let hash = *hash;
        self.spawn(async move {
            let found = match store.get(&name).await {
                Ok(found) => found,
                Err(object_store::Error::NotFound { .. }) => {
                    let _ = meta.send(Err(BlobError::NotFound { hash }));
                    return;
                }
                Err(error) => {
                    let _ = meta.send(Err(BlobError::Remote {
                        url,
                        detail: describe(&error),
                    }));
                    return;
                }
            };
            if meta.send(Ok(found.meta.size)).is_err() {
                return;
            }
            let mut stream = found.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|error| BlobError::Remote {
                    url: url.clone(),
                    detail: describe(&error),
                });
                let failed = chunk.is_err();
                if sender.send(chunk).await.is_err() || failed {
                    return;
                }
            }
        });
        let len = chunks.await.map_err(|_| BlobError::Remote {
            url: self.url.clone(),
            detail: "the object store's runtime stopped".into(),
        })??;
        Ok((len, receiver))
    }

    /// Every blob under the prefix, for the collector.
    pub fn list(&self) -> Result<Vec<BlobFile>, BlobError> {
        let (store, prefix) = (self.store.clone(), self.prefix.clone());
        let listed = self.wait(async move {
            let mut out = Vec::new();
            let mut stream = store.list(Some(&prefix));
            while let Some(meta) = stream.next().await {
                let meta = meta?;
                let Some(hash) = meta
                    .location
                    .filename()
                    .and_then(|name| name.parse::<BlobHash>().ok())
                else {
                    continue;
                };
                out.push(BlobFile {
                    hash,
                    len: meta.size,
                    modified: SystemTime::from(meta.last_modified),
                });
            }
            Ok::<_, object_store::Error>(out)
        })?;
        listed.map_err(|error| self.error(error))
    }

    /// Deletes the object under `hash` (deleting a missing one is not an error).
    pub fn remove(&self, hash: &BlobHash) -> Result<(), BlobError> {
        let (store, name) = (self.store.clone(), self.name(hash));
        match self.wait(async move { store.delete(&name).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(self.error(error)),
        }
    }
}

/// An error with its causes, which `object_store` keeps out of its message.
fn describe(error: &object_store::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
