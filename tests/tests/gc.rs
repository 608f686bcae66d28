//! Garbage collection of blob files against a live coordinator: unreferenced files older than
//! the grace period go, while everything the ledger or the open round refers to stays (checked
//! by `verify`, which reads every referenced blob).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use common::*;
use tributary_coordinator::store::blobs::BlobStore;
use tributary_coordinator::store::gc;
use tributary_coordinator::verify::verify_data_dir;
use tributary_shared::{ExperimentId, RoundId};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_keeps_what_the_ledger_and_the_open_round_refer_to() {
    let dir = tempfile::tempdir().unwrap();
    // Deltas of 100,000 int8 values are blob files.
    let config = parse(&experiment_toml("gc", 2, 100_000, 4, 4, 3, 4));
    let running = start(dir.path(), Some(config), vec![]).await;
    let (gate, handles) = hold_round_open(&running, 300).await;
    let mut progress = running.progress.clone();

    // Garbage: one file written two hours ago, one just now.
    let store = BlobStore::at(dir.path().join("blobs"));
    let old = store.put(&vec![1u8; 100_000]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(store.path(&old).unwrap())
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    let young = store.put(&vec![2u8; 100_000]).unwrap();

    // Mid-round, with the default grace: the old garbage goes, the young stays, and so do the
    // open round's accepted deltas.
    let report = gc::collect(dir.path(), &BTreeSet::new(), gc::DEFAULT_GRACE, false).unwrap();
    assert_eq!(report.removed, 1, "{report:?}");
    assert_eq!(report.bytes_freed, 100_000);
    assert_eq!(store.stored_len(&old).unwrap(), None);
    assert!(store.stored_len(&young).unwrap().is_some());
    // Even with no grace at all, nothing the open round refers to is collected.
    let db = tributary_coordinator::store::db::Db::open_read_only(&dir.path().join("tributary.db"))
        .unwrap();
    let open_round = db
        .round_submissions(&ExperimentId("gc".into()), RoundId(0))
        .unwrap();
    drop(db);
    assert_eq!(open_round.len(), 3);
    gc::collect(dir.path(), &BTreeSet::new(), Duration::ZERO, false).unwrap();
    assert_eq!(store.stored_len(&young).unwrap(), None);
    for (hash, _) in &open_round {
        assert!(
            store.stored_len(hash).unwrap().is_some(),
            "an accepted delta was collected"
        );
    }

    gate.arrive();
    for handle in handles {
        let report = tokio::time::timeout(Duration::from_secs(120), handle)
            .await
            .expect("trainer finished in time")
            .unwrap()
            .unwrap();
        assert!(report.finished);
    }
    tokio::time::timeout(Duration::from_secs(30), progress.wait_for(|p| p.finished))
        .await
        .expect("the experiment finishes")
        .unwrap();
    running.shutdown().await.unwrap();

    // After the run, a collection with no grace leaves everything `verify` needs.
    let report = gc::collect(dir.path(), &BTreeSet::new(), Duration::ZERO, false).unwrap();
    assert!(report.scanned > 8, "{report:?}");
    let verified = verify_data_dir(dir.path()).expect("verify passes after collection");
    assert_eq!(verified[0].rounds, 2);
}
