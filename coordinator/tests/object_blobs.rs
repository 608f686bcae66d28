//! Blobs in a real S3-compatible server (Garage, started here): the same interface as the blob
//! directory, every read checked against its hash, multipart for large blobs, streamed reads,
//! listing and removal for the collector, and a clear error while the server is away.

use std::time::{Duration, Instant};

use tributary_coordinator::store::blobs::{bind_blobs, blobs_url, BlobError, BlobStore};
use tributary_coordinator::store::objects::{ObjectBlobs, MULTIPART_FROM};
use tributary_coordinator::store::test_garage::TestGarage;
use tributary_shared::BlobHash;

fn store(server: &TestGarage, prefix: &str) -> BlobStore {
    BlobStore::objects_with(&server.url(prefix), server.env()).unwrap()
}

#[test]
fn blobs_round_trip_through_object_storage() {
    let server = TestGarage::start().unwrap();
    let blobs = store(&server, "round-trip");
    let small = blobs.put(b"a small delta").unwrap();
    assert_eq!(small, BlobHash::of(b"a small delta"));
    assert_eq!(blobs.get(&small).unwrap(), b"a small delta");
    assert_eq!(blobs.put(b"a small delta").unwrap(), small, "idempotent");
    assert_eq!(blobs.stored_len(&small).unwrap(), Some(13));
    let missing = BlobHash::of(b"never stored");
    assert!(matches!(
        blobs.get(&missing),
        Err(BlobError::NotFound { .. })
    ));
    assert_eq!(blobs.stored_len(&missing).unwrap(), None);

    // Above the multipart threshold, in three parts.
    let large: Vec<u8> = (0..2 * MULTIPART_FROM + 12_345)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let large_hash = blobs.put(&large).unwrap();
    assert!(blobs.get(&large_hash).unwrap() == large);

    // Another prefix in the same bucket is another store.
    let other = store(&server, "elsewhere");
    assert!(matches!(other.get(&small), Err(BlobError::NotFound { .. })));

    let mut listed: Vec<(BlobHash, u64)> = blobs
        .list()
        .unwrap()
        .iter()
        .map(|f| (f.hash, f.len))
        .collect();
    listed.sort();
    let mut expected = vec![(small, 13), (large_hash, large.len() as u64)];
    expected.sort();
    assert_eq!(listed, expected);
    blobs.remove(&small).unwrap();
    blobs.remove(&small).unwrap();
    assert_eq!(blobs.stored_len(&small).unwrap(), None);
    assert_eq!(blobs.list().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_read_returns_the_whole_blob() {
    let server = TestGarage::start().unwrap();
    let blobs = store(&server, "stream");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let hash = {
        let (blobs, bytes) = (blobs.clone(), bytes.clone());
        tokio::task::spawn_blocking(move || blobs.put(&bytes).unwrap())
            .await
            .unwrap()
    };
    let (len, mut reader) = blobs.reader(&hash).await.unwrap();
    assert_eq!(len, bytes.len() as u64);
    let mut read = Vec::new();
    while let Some(chunk) = reader.next_chunk().await.unwrap() {
        read.extend_from_slice(&chunk);
    }
    assert!(read == bytes);
    assert!(matches!(
        blobs.reader(&BlobHash::of(b"absent")).await,
        Err(BlobError::NotFound { .. })
    ));
}

#[test]
fn a_tampered_object_is_refused() {
    let server = TestGarage::start().unwrap();
    let blobs = store(&server, "tamper");
    let hash = blobs.put(b"honest bytes").unwrap();
    // Someone with write access to the bucket replaces the object.
    ObjectBlobs::connect_with(&server.url("tamper"), server.env())
        .unwrap()
        .put(&hash, b"other bytes")
        .unwrap();
    assert!(matches!(blobs.get(&hash), Err(BlobError::Corrupt { .. })));
}

#[test]
fn an_absent_server_is_a_prompt_error() {
    let mut server = TestGarage::start().unwrap();
    let blobs = store(&server, "outage");
    let hash = blobs.put(b"before").unwrap();
    server.stop();
    let started = Instant::now();
    let error = blobs.put(b"during").unwrap_err();
    assert!(matches!(error, BlobError::Remote { .. }), "{error}");
    assert!(matches!(blobs.get(&hash), Err(BlobError::Remote { .. })));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "gave up after {:?}",
        started.elapsed()
    );
}

#[test]
fn a_data_directory_stays_bound_to_its_bucket() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(blobs_url(dir.path()).unwrap(), None);
    bind_blobs(dir.path(), "s3://one/prefix").unwrap();
    bind_blobs(dir.path(), "s3://one/prefix").unwrap();
    assert_eq!(
        blobs_url(dir.path()).unwrap().as_deref(),
        Some("s3://one/prefix")
    );
    assert!(bind_blobs(dir.path(), "s3://two/prefix").is_err());
    // A directory whose blobs are already files is not moved to a bucket.
    let used = tempfile::tempdir().unwrap();
    BlobStore::open(used.path().join("blobs"))
        .unwrap()
        .put(b"x")
        .unwrap();
    assert!(bind_blobs(used.path(), "s3://one/prefix").is_err());
}

/// A round's deltas fetched together: every answer in the order asked, each checked against
/// its hash, a missing one `NotFound` in its place; and faster than one by one.
#[test]
fn many_blobs_are_fetched_at_once_in_order() {
    let server = TestGarage::start().unwrap();
    let blobs = store(&server, "many");
    let stored: Vec<BlobHash> = (0..64u32)
        .map(|i| blobs.put(format!("delta number {i}").as_bytes()).unwrap())
        .collect();
    let missing = BlobHash::of(b"never stored");
    let mut asked = stored.clone();
    asked.insert(10, missing);
    let started = Instant::now();
    let answers = blobs.get_many(&asked);
    let together = started.elapsed();
    assert_eq!(answers.len(), asked.len());
    for (hash, answer) in asked.iter().zip(&answers) {
        match answer {
            Ok(bytes) => assert_eq!(BlobHash::of(bytes), *hash),
            Err(BlobError::NotFound { hash: gone }) => assert_eq!(*gone, missing),
            Err(error) => panic!("{error}"),
        }
    }
    assert!(matches!(answers[10], Err(BlobError::NotFound { .. })));
    let started = Instant::now();
    for hash in &stored {
        blobs.get(hash).unwrap();
    }
    let one_by_one = started.elapsed();
    eprintln!("64 blobs: {together:?} together, {one_by_one:?} one by one");
}
