//! `join --only-idle`: compute only while the machine's owner is not using it.
//!
//! "In use" means that other processes keep the CPU busy: their share of all cores, measured from
//! `/proc/stat` minus this process's own time from `/proc/self/stat`, is above a threshold. The
//! trainer pauses at once when that happens, and resumes only after the machine has been quiet
//! for a while, so that a short lull in a game or a build does not make it jump back in.
//! [`IdleGate`] holds the rule and is pure; [`CpuMeter`] reads the counters (Linux only; other
//! systems report no readings and the trainer never pauses for this reason).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// CPU time counters, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuSample {
    /// All ticks on all cores since boot, idle included.
    pub total: u64,
    /// Ticks on all cores spent idle (idle + iowait).
    pub idle: u64,
    /// Ticks this process spent (user + system).
    pub own: u64,
}

impl CpuSample {
    /// The share of the machine's CPU (0..=1) that other processes used between `earlier` and
    /// `self`; `None` when no time passed.
    pub fn others_share_since(&self, earlier: &CpuSample) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        if total == 0 {
            return None;
        }
        let idle = self.idle.saturating_sub(earlier.idle);
        let own = self.own.saturating_sub(earlier.own);
        let others = total.saturating_sub(idle).saturating_sub(own);
        Some((others as f64 / total as f64).clamp(0.0, 1.0))
    }
}

/// Parses the first (`cpu`) line of `/proc/stat`: returns (total, idle) ticks.
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if fields.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some((total, idle))
}

/// Parses `/proc/self/stat`: returns this process's user + system ticks.
pub fn parse_self_stat(text: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces: count from the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Reads the CPU counters of this machine.
#[derive(Debug, Default)]
pub struct CpuMeter;

impl CpuMeter {
    /// A reading, or `None` where `/proc` is not available.
    pub fn sample(&self) -> Option<CpuSample> {
        let (total, idle) = parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let own = parse_self_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
        Some(CpuSample { total, idle, own })
    }
}

/// Samples the CPU every `interval` and keeps `in_use` set while the owner uses the machine
/// (the compute threads wait while it is set). Runs until the task is dropped.
pub async fn watch(in_use: Arc<AtomicBool>, mut gate: IdleGate, interval: Duration) {
    let meter = CpuMeter;
    let Some(mut last) = meter.sample() else {
        tracing::warn!("--only-idle: no CPU counters on this system; computing regardless");
        in_use.store(false, Ordering::Relaxed);
        return;
    };
    in_use.store(gate.in_use(), Ordering::Relaxed);
    loop {
        tokio::time::sleep(interval).await;
        let Some(now) = meter.sample() else { continue };
        let share = now.others_share_since(&last);
        // Always move on, so that a counter that went backwards (a CPU taken offline) costs one
        // reading, not every later one.
        last = now;
        let Some(share) = share else { continue };
        let was = gate.in_use();
        let busy = gate.update(Instant::now(), share);
        if busy != was {
            if busy {
                tracing::info!(
                    others = format!("{:.0}%", share * 100.0),
                    "machine in use: pausing"
                );
            } else {
                tracing::info!("machine idle: computing");
            }
        }
        in_use.store(busy, Ordering::Relaxed);
    }
}

/// Decides, from successive readings, whether the owner is using the machine.
#[derive(Debug, Clone)]
pub struct IdleGate {
    /// Others' share of the CPU above which the machine counts as in use.
    pub busy_above: f64,
    /// Quiet time needed before computing again.
    pub quiet_for: Duration,
    in_use: bool,
    quiet_since: Option<Instant>,
}

impl IdleGate {
    /// A gate that starts out "in use" (the trainer waits for the first quiet period).
    pub fn new(busy_above: f64, quiet_for: Duration) -> Self {
        Self {
            busy_above,
            quiet_for,
            in_use: true,
            quiet_since: None,
        }
    }

    /// Feeds the others' share measured up to `now`; returns whether the machine is in use.
    pub fn update(&mut self, now: Instant, others_share: f64) -> bool {
        if others_share > self.busy_above {
            self.in_use = true;
            self.quiet_since = None;
        } else {
            let since = *self.quiet_since.get_or_insert(now);
            if now.duration_since(since) >= self.quiet_for {
                self.in_use = false;
            }
        }
        self.in_use
    }

    /// The current decision.
    pub fn in_use(&self) -> bool {
        self.in_use
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 50 2 25 400 10 0 1 1 0 0\n";
        assert_eq!(parse_proc_stat(stat), Some((981, 820)));
        assert_eq!(parse_proc_stat("intr 1 2 3"), None);
        let own = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 42 8 0 0 20 0 1 0";
        assert_eq!(parse_self_stat(own), Some(50));
        assert_eq!(parse_self_stat("garbage"), None);
    }

    #[test]
    fn others_share_excludes_idle_and_our_own_time() {
        let a = CpuSample {
            total: 1000,
            idle: 600,
            own: 100,
        };
        let b = CpuSample {
            total: 2000,
            idle: 1000,
            own: 500,
        };
        // 1000 ticks: 400 idle, 400 ours, 200 others.
        assert_eq!(b.others_share_since(&a), Some(0.2));
        assert_eq!(a.others_share_since(&a), None);
        assert_eq!(a.others_share_since(&b), None);
    }

    #[test]
    fn the_gate_pauses_at_once_and_resumes_after_a_quiet_period() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut gate = IdleGate::new(0.25, Duration::from_secs(30));
        assert!(gate.update(at(0), 0.05), "waits for a quiet period first");
        assert!(gate.update(at(29), 0.05));
        assert!(!gate.update(at(30), 0.05));
        assert!(gate.update(at(31), 0.6), "the owner is back");
        assert!(gate.update(at(40), 0.1));
        assert!(
            gate.update(at(50), 0.3),
            "a spike restarts the quiet period"
        );
        assert!(gate.update(at(60), 0.0));
        assert!(gate.update(at(89), 0.0));
        assert!(!gate.update(at(90), 0.0));
    }

    #[test]
    fn the_meter_reads_this_machine() {
        if let Some(sample) = CpuMeter.sample() {
            assert!(sample.total >= sample.idle);
            assert!(sample.total > 0);
        }
    }
}
