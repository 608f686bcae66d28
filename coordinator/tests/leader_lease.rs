//! The leader lease in the database, on SQLite and on a real PostgreSQL server: exactly one
//! node takes it, a takeover raises the fencing token, and a deposed leader's batches are
//! rolled back whole.

use tributary_coordinator::admission::TokenBinding;
use tributary_coordinator::lease::LeaseRecord;
use tributary_coordinator::store::db::{Db, DbError, Location};
use tributary_coordinator::store::leases::{Fence, LEADER};
use tributary_coordinator::store::test_postgres::TestPostgres;
use tributary_shared::TrainerId;

fn binding(n: u8) -> TokenBinding {
    TokenBinding {
        token: [n; 32],
        trainer: TrainerId([n; 32]),
    }
}

fn fence(holder: &str, token: i64) -> Option<Fence> {
    Some(Fence {
        name: LEADER.into(),
        holder: holder.into(),
        token,
    })
}

/// Two nodes (two connections to one database): `a` leads, `b` takes over, `a` is fenced.
fn takeover_fences_the_old_leader(mut a: Db, b: Db) {
    assert_eq!(a.lease(LEADER).unwrap(), None);
    assert_eq!(
        a.acquire_lease(LEADER, "a", "10.0.0.1:7433", None).unwrap(),
        Some(1)
    );
    // The second node lost the race for the empty slot.
    assert_eq!(
        b.acquire_lease(LEADER, "b", "10.0.0.2:7433", None).unwrap(),
        None
    );
    assert!(a.renew_lease(LEADER, "a", 1).unwrap());
    a.set_fence(fence("a", 1));
    a.begin_batch().unwrap();
    a.record_token_binding(&binding(1)).unwrap();
    a.commit_batch().unwrap();

    // `b` takes over exactly the record it saw; a stale view loses.
    let seen = b.lease(LEADER).unwrap().unwrap();
    assert_eq!(
        seen,
        LeaseRecord {
            holder: "a".into(),
            token: 1,
            beat: 1,
            address: "10.0.0.1:7433".into()
        }
    );
    let stale = LeaseRecord {
        beat: 0,
        ..seen.clone()
    };
    assert_eq!(
        b.acquire_lease(LEADER, "b", "10.0.0.2:7433", Some(&stale))
            .unwrap(),
        None
    );
    assert_eq!(
        b.acquire_lease(LEADER, "b", "10.0.0.2:7433", Some(&seen))
            .unwrap(),
        Some(2)
    );

    // The old leader can neither renew nor commit: its batch is rolled back whole.
    assert!(!a.renew_lease(LEADER, "a", 1).unwrap());
    a.begin_batch().unwrap();
    a.record_token_binding(&binding(2)).unwrap();
    match a.commit_batch() {
        Err(DbError::Fenced { token: 1 }) => {}
        other => panic!("a deposed leader committed: {other:?}"),
    }
    a.rollback_batch().unwrap();
    let kept: Vec<u8> = b
        .token_bindings()
        .unwrap()
        .iter()
        .map(|binding| binding.token[0])
        .collect();
    assert!(kept.contains(&1), "{kept:?}");
    assert!(
        !kept.contains(&2),
        "a deposed leader's batch was kept: {kept:?}"
    );

    // A release hands the lease over without waiting.
    assert!(b.release_lease(LEADER, "b", 2).unwrap());
    let released = a.lease(LEADER).unwrap().unwrap();
    assert!(released.is_released());
    assert_eq!(
        a.acquire_lease(LEADER, "a", "10.0.0.1:7433", Some(&released))
            .unwrap(),
        Some(3)
    );
    a.set_fence(fence("a", 3));
    a.begin_batch().unwrap();
    a.record_token_binding(&binding(4)).unwrap();
    a.commit_batch().unwrap();
}

#[test]
fn a_takeover_fences_the_old_leader_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tributary.db");
    let a = Db::open(&path).unwrap();
    let b = Db::open(&path).unwrap();
    takeover_fences_the_old_leader(a, b);
}

#[test]
fn a_takeover_fences_the_old_leader_on_postgres() {
    let server = TestPostgres::start().unwrap();
    let location = Location::Postgres(server.create_database("lease").unwrap());
    let a = Db::open_at(&location).unwrap();
    let b = Db::open_at(&location).unwrap();
    takeover_fences_the_old_leader(a, b);
}

/// Eight nodes race for a lease whose holder went silent: exactly one wins, with the next
/// token, and the others see its record.
#[test]
fn of_nodes_racing_for_a_lease_exactly_one_wins() {
    let server = TestPostgres::start().unwrap();
    let location = Location::Postgres(server.create_database("race").unwrap());
    let first = Db::open_at(&location).unwrap();
    assert_eq!(
        first.acquire_lease(LEADER, "gone", "x", None).unwrap(),
        Some(1)
    );
    let seen = first.lease(LEADER).unwrap().unwrap();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
    let racers: Vec<_> = (0..8)
        .map(|n| {
            let (location, seen, barrier) = (location.clone(), seen.clone(), barrier.clone());
            std::thread::spawn(move || {
                let db = Db::open_at(&location).unwrap();
                barrier.wait();
                let node = format!("node-{n}");
                db.acquire_lease(LEADER, &node, "x", Some(&seen))
                    .unwrap()
                    .map(|token| (node, token))
            })
        })
        .collect();
    let winners: Vec<(String, i64)> = racers
        .into_iter()
        .filter_map(|racer| racer.join().unwrap())
        .collect();
    assert_eq!(winners.len(), 1, "{winners:?}");
    let record = first.lease(LEADER).unwrap().unwrap();
    assert_eq!((record.holder, record.token), (winners[0].0.clone(), 2));
}
