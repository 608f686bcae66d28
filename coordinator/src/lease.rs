//! Who leads: the leader lease that picks the one node of a cluster running the round engine
//! (pure, sans-IO; the store keeps the record and `service` drives it).
//!
//! The lease is one row in the shared database: the holder's node id, a fencing token that
//! grows with every change of holder, and a heartbeat counter the holder bumps. No clock is
//! compared across machines: a node that wants the lease watches the record on its own
//! monotonic clock and takes it only after it has *seen* the record stay the same for a whole
//! lease duration (a failed read starts the wait again), with a compare-and-swap on exactly the
//! record it saw.
//!
//! Safety does not rest on timing. Everything a leader tells trainers waits for a database
//! commit, and every commit checks the token (`Db::set_fence`), so a deposed leader, however
//! late its clock or long its pause, gets nothing durable and announces nothing. The holder
//! therefore steps down when it *knows* it lost (a renewal finds another token, or a commit is
//! fenced), and keeps trying through a database outage: when the database comes back, either
//! its renewal succeeds (nobody took over, so it simply goes on) or it learns it was replaced.
//! Only after [`LeaseTiming::give_up`] without a confirmed renewal does it stop anyway, so
//! trainers held by a node cut off from the database move on to the nodes that can reach it.

use std::time::{Duration, Instant};

/// This node no longer holds the leader lease (another node took it, or it could not renew in
/// time); it stops leading.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("this node no longer holds the leader lease")]
pub struct LostLeadership;

/// The lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The holding node's id; empty when the last holder let it go.
    pub holder: String,
    /// The fencing token: raised by one at every change of holder.
    pub token: i64,
    /// Bumped by the holder at every renewal.
    pub beat: i64,
    /// Where the holder accepts trainers (for operators and standby nodes' logs).
    pub address: String,
}

impl LeaseRecord {
    /// Whether the last holder released it on the way out.
    pub fn is_released(&self) -> bool {
        self.holder.is_empty()
    }
}

/// How long a lease lasts and how often it is touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// A record unchanged for this long is taken over.
    pub duration: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
    /// How often a standby node reads the record.
    pub poll_every: Duration,
}

impl LeaseTiming {
    /// Timing for a lease of `duration`: renewed five times, read ten times per duration.
    pub fn for_duration(duration: Duration) -> Self {
        Self {
            duration,
            renew_every: duration / 5,
            poll_every: duration / 10,
        }
    }

    /// How long the holder goes on without a confirmed renewal before it stops: six lease
    /// durations, and at least 30 s, so a short database outage is ridden out in place.
    pub fn give_up(&self) -> Duration {
        (self.duration * 6).max(Duration::from_secs(30))
    }
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self::for_duration(Duration::from_secs(5))
    }
}

/// What a standby node should do after reading the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standby {
    /// Read again at this instant.
    WaitUntil(Instant),
    /// Try to take the lease: replace exactly `seen` (`None`: there is no record yet).
    Acquire {
        /// The record to replace.
        seen: Option<LeaseRecord>,
    },
}

/// A node waiting for the lease: remembers when it last saw the record change.
#[derive(Debug, Clone)]
pub struct Watcher {
    node: String,
    timing: LeaseTiming,
    seen: Option<(LeaseRecord, Instant)>,
}

impl Watcher {
    /// A watcher for node `node`.
    pub fn new(node: impl Into<String>, timing: LeaseTiming) -> Self {
        Self {
            node: node.into(),
            timing,
            seen: None,
        }
    }

    /// Decides what to do after reading `record` at `now`.
    ///
    /// The lease is taken at once when there is no record, when it was released, or when this
    /// node holds it: only one process serves a data directory (its lock), so a record naming
    /// this node was left by a process of this node that is gone. Otherwise it is taken only
    /// once the record has stayed the same for a whole duration.
    pub fn observe(&mut self, now: Instant, record: Option<LeaseRecord>) -> Standby {
        let Some(record) = record else {
            return Standby::Acquire { seen: None };
        };
        if record.is_released() || record.holder == self.node {
            return Standby::Acquire { seen: Some(record) };
        }
        match &self.seen {
            Some((seen, since)) if *seen == record => {
                if now.saturating_duration_since(*since) >= self.timing.duration {
                    Standby::Acquire { seen: Some(record) }
                } else {
                    Standby::WaitUntil(now + self.timing.poll_every)
                }
            }
            _ => {
                self.seen = Some((record, now));
                Standby::WaitUntil(now + self.timing.poll_every)
            }
        }
    }

    /// A read of the record failed: this node did not see the record, so it cannot say the
    /// record stayed unchanged; the wait starts again from the next successful read.
    pub fn read_failed(&mut self) {
        self.seen = None;
    }

    /// A takeover attempt lost the race (someone else changed the record first): watch the
    /// new record from scratch.
    pub fn lost_race(&mut self) {
        self.seen = None;
    }
}

/// The node holding the lease: tracks when it must renew and when it must stop acting.
#[derive(Debug, Clone)]
pub struct Holder {
    timing: LeaseTiming,
    token: i64,
    /// The start of the last renewal the database confirmed.
    confirmed_at: Instant,
}

/// What the holder should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Renew now.
    Renew,
    /// Nothing until this instant.
    WaitUntil(Instant),
    /// Too long without a confirmed renewal ([`LeaseTiming::give_up`]): stop, so trainers
    /// move on to a node that can reach the database.
    StepDown,
}

impl Holder {
    /// The lease was taken (or renewed) with `token` by an attempt that started at `at`.
    pub fn new(timing: LeaseTiming, token: i64, at: Instant) -> Self {
        Self {
            timing,
            token,
            confirmed_at: at,
        }
    }

    /// The fencing token.
    pub fn token(&self) -> i64 {
        self.token
    }

    /// A renewal that started at `attempt_started` was confirmed.
    pub fn renewed(&mut self, attempt_started: Instant) {
        self.confirmed_at = self.confirmed_at.max(attempt_started);
    }

    /// When it stops unless a renewal is confirmed before.
    pub fn step_down_at(&self) -> Instant {
        self.confirmed_at + self.timing.give_up()
    }

    /// What to do at `now`.
    pub fn poll(&self, now: Instant) -> Holding {
        if now >= self.step_down_at() {
            return Holding::StepDown;
        }
        let renew_at = self.confirmed_at + self.timing.renew_every;
        if now >= renew_at {
            Holding::Renew
        } else {
            Holding::WaitUntil(renew_at)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: &str, token: i64, beat: i64) -> LeaseRecord {
        LeaseRecord {
            holder: holder.into(),
            token,
            beat,
            address: "127.0.0.1:7433".into(),
        }
    }

    fn timing() -> LeaseTiming {
        LeaseTiming::for_duration(Duration::from_secs(5))
    }

    #[test]
    fn a_missing_released_or_own_record_is_taken_at_once() {
        let start = Instant::now();
        let mut watcher = Watcher::new("b", timing());
        assert_eq!(
            watcher.observe(start, None),
            Standby::Acquire { seen: None }
        );
        let released = record("", 3, 9);
        assert_eq!(
            watcher.observe(start, Some(released.clone())),
            Standby::Acquire {
                seen: Some(released)
            }
        );
        let own = record("b", 4, 0);
        assert_eq!(
            watcher.observe(start, Some(own.clone())),
            Standby::Acquire { seen: Some(own) }
        );
    }

    #[test]
    fn a_beating_lease_is_never_taken() {
        let start = Instant::now();
        let mut watcher = Watcher::new("b", timing());
        // The holder beats every second; the watcher reads every half second for a minute.
        for step in 0..120u64 {
            let now = start + Duration::from_millis(500 * step);
            let beat = (step / 2) as i64;
            let decision = watcher.observe(now, Some(record("a", 1, beat)));
            assert!(
                matches!(decision, Standby::WaitUntil(_)),
                "took a live lease at step {step}"
            );
        }
    }

    #[test]
    fn a_silent_lease_is_taken_after_a_whole_duration_of_silence() {
        let start = Instant::now();
        let mut watcher = Watcher::new("b", timing());
        let last = record("a", 1, 7);
        // First seen at `start`; the holder never beats again.
        let mut taken_at = None;
        for step in 0..200u64 {
            let now = start + Duration::from_millis(100 * step);
            if let Standby::Acquire { seen } = watcher.observe(now, Some(last.clone())) {
                assert_eq!(seen, Some(last.clone()));
                taken_at = Some(now - start);
                break;
            }
        }
        assert_eq!(taken_at, Some(Duration::from_secs(5)));
    }

    #[test]
    fn a_change_of_holder_restarts_the_wait() {
        let start = Instant::now();
        let mut watcher = Watcher::new("c", timing());
        watcher.observe(start, Some(record("a", 1, 7)));
        // Just before the duration, another node took over: its record is new.
        let later = start + Duration::from_millis(4900);
        assert!(matches!(
            watcher.observe(later, Some(record("b", 2, 0))),
            Standby::WaitUntil(_)
        ));
        assert!(matches!(
            watcher.observe(start + Duration::from_secs(6), Some(record("b", 2, 0))),
            Standby::WaitUntil(_)
        ));
        assert!(matches!(
            watcher.observe(later + Duration::from_secs(5), Some(record("b", 2, 0))),
            Standby::Acquire { .. }
        ));
    }

    #[test]
    fn a_lost_race_watches_the_winner_from_scratch() {
        let start = Instant::now();
        let mut watcher = Watcher::new("c", timing());
        watcher.observe(start, Some(record("a", 1, 7)));
        let late = start + Duration::from_secs(5);
        assert!(matches!(
            watcher.observe(late, Some(record("a", 1, 7))),
            Standby::Acquire { .. }
        ));
        watcher.lost_race();
        // The same record read again after the race: a full duration starts now.
        assert!(matches!(
            watcher.observe(late, Some(record("a", 1, 7))),
            Standby::WaitUntil(_)
        ));
    }

    #[test]
    fn a_failed_read_restarts_the_wait() {
        let start = Instant::now();
        let mut watcher = Watcher::new("b", timing());
        let silent = record("a", 1, 7);
        watcher.observe(start, Some(silent.clone()));
        // The database was away for a while; the first read after it shows the same record.
        watcher.read_failed();
        let back = start + Duration::from_secs(10);
        assert!(matches!(
            watcher.observe(back, Some(silent.clone())),
            Standby::WaitUntil(_)
        ));
        assert!(matches!(
            watcher.observe(back + Duration::from_millis(4900), Some(silent.clone())),
            Standby::WaitUntil(_)
        ));
        assert!(matches!(
            watcher.observe(back + Duration::from_secs(5), Some(silent)),
            Standby::Acquire { .. }
        ));
    }

    #[test]
    fn the_holder_renews_on_time_and_rides_out_an_outage_before_giving_up() {
        let timing = timing();
        let start = Instant::now();
        let mut holder = Holder::new(timing, 4, start);
        assert_eq!(holder.token(), 4);
        assert_eq!(
            holder.poll(start),
            Holding::WaitUntil(start + Duration::from_secs(1))
        );
        assert_eq!(holder.poll(start + Duration::from_secs(1)), Holding::Renew);
        holder.renewed(start + Duration::from_secs(1));
        assert_eq!(
            holder.poll(start + Duration::from_millis(1500)),
            Holding::WaitUntil(start + Duration::from_secs(2))
        );
        // Renewals fail from here on (the database is away): it keeps trying for 30 s.
        assert_eq!(holder.poll(start + Duration::from_secs(20)), Holding::Renew);
        assert_eq!(
            holder.poll(start + Duration::from_millis(30_999)),
            Holding::Renew
        );
        assert_eq!(
            holder.poll(start + Duration::from_secs(31)),
            Holding::StepDown
        );
        // A late confirmation of an older attempt cannot move the deadline back.
        holder.renewed(start);
        assert_eq!(
            holder.poll(start + Duration::from_secs(31)),
            Holding::StepDown
        );
        // One that started later does.
        holder.renewed(start + Duration::from_secs(30));
        assert_eq!(holder.poll(start + Duration::from_secs(31)), Holding::Renew);
    }

    #[test]
    fn a_watcher_never_takes_a_lease_renewed_through_flaky_reads() {
        // The holder renews every second; one read in three fails.
        let start = Instant::now();
        let mut watcher = Watcher::new("b", timing());
        for step in 0..600u64 {
            let now = start + Duration::from_millis(100 * step);
            if step % 3 == 0 {
                watcher.read_failed();
                continue;
            }
            let beat = (step / 10) as i64;
            assert!(
                matches!(
                    watcher.observe(now, Some(record("a", 1, beat))),
                    Standby::WaitUntil(_)
                ),
                "took a live lease at step {step}"
            );
        }
    }
}
