//! Exponential backoff with jitter, for one link ([`Backoff`]) or for every destination an
//! edge dials ([`DestinationBackoff`]). Delays grow from `min` to `max` with "equal jitter"
//! (half the delay fixed, half random) so links that failed together do not come back in the
//! same second; a link that stayed up for `stable` resets to `min`. Pure: the caller passes
//! the random draw and the time, so tests are deterministic.
//!
//! Used by the component links (reconnect delays), the s2s dialer and the accept loops.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Exponential backoff state of one link or destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// `min` is the first delay's ceiling, `max` the cap (a `max` below `min` is raised to it).
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// Failed rounds since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next round. `jitter` is a draw from `[0, 1)` (clamped; NaN counts
    /// as 0): the delay is `base/2 + base/2 × jitter` where `base = min(min × 2^attempts, max)`.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        // 2^20 × min is far past any sane cap; stop doubling there so the shift cannot overflow.
        let factor = 1u32 << self.attempt.min(20);
        let base = self.min.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        let j = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        half + half.mul_f64(j)
    }

    /// Start again from `min`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// A connection that came up at `up_since` and is still up at `now`: once it has stayed up
    /// for `stable`, the next failure starts again from `min`. A link that connects and drops
    /// at once keeps growing its delay (no reset on connect alone). Returns whether it reset.
    pub fn note_up(&mut self, up_since: Instant, now: Instant, stable: Duration) -> bool {
        if now.saturating_duration_since(up_since) >= stable && self.attempt > 0 {
            self.reset();
            return true;
        }
        false
    }
}

/// Backoff per destination (a SIP domain, an s2s domain): after a failed dial the destination
/// is *blocked* until its delay has passed, and callers fail fast instead of dialing again.
/// Bounded: at most `max_entries` destinations are remembered (expired ones are evicted first;
/// when none is expired, the new failure is not remembered — dialing is then merely not
/// throttled for it, which is the old behaviour, never a wrong refusal).
#[derive(Debug)]
pub struct DestinationBackoff<K> {
    min: Duration,
    max: Duration,
    max_entries: usize,
    table: HashMap<K, (Backoff, Instant)>,
}

impl<K: Eq + Hash + Clone> DestinationBackoff<K> {
    pub fn new(min: Duration, max: Duration, max_entries: usize) -> Self {
        DestinationBackoff {
            min,
            max,
            max_entries,
            table: HashMap::new(),
        }
    }

    /// `Err(until)` while `key` is in backoff at `now`.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Instant> {
        match self.table.get(key) {
            Some((_, until)) if *until > now => Err(*until),
            _ => Ok(()),
        }
    }

    /// A dial to `key` failed at `now`: block it for the next delay. Returns that delay.
    pub fn failed(&mut self, key: &K, now: Instant, jitter: f64) -> Duration {
        if !self.table.contains_key(key) && self.table.len() >= self.max_entries {
            self.table.retain(|_, (_, until)| *until > now);
        }
        if let Some((b, until)) = self.table.get_mut(key) {
            let d = b.next_delay(jitter);
            *until = now + d;
            return d;
        }
        let mut b = Backoff::new(self.min, self.max);
        let d = b.next_delay(jitter);
        if self.table.len() < self.max_entries {
            self.table.insert(key.clone(), (b, now + d));
        }
        d
    }

    /// A dial to `key` succeeded: forget its failures.
    pub fn succeeded(&mut self, key: &K) {
        self.table.remove(key);
    }

    /// A connection to `key` closed after being up for `lived`: its failures are forgotten
    /// only if it stayed up for `stable`. A peer that accepts and drops at once keeps growing
    /// its delay instead of being dialed at full rate. Returns whether it reset.
    pub fn connection_lasted(&mut self, key: &K, lived: Duration, stable: Duration) -> bool {
        if lived >= stable && self.table.remove(key).is_some() {
            return true;
        }
        false
    }

    /// Destinations remembered (blocked or with failures not yet forgotten).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_bounded_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let top: Vec<u64> = (0..9)
            .map(|_| b.next_delay(1.0).as_millis() as u64)
            .collect();
        assert_eq!(
            top,
            [1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]
        );
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(500));
        assert_eq!(b.next_delay(0.5), Duration::from_millis(1500));
        // Out-of-range and NaN draws are clamped, never negative or above the base.
        assert_eq!(b.next_delay(7.0), Duration::from_secs(4));
        assert_eq!(b.next_delay(f64::NAN), Duration::from_secs(4));
        for _ in 0..100 {
            assert!(b.next_delay(0.3) <= Duration::from_secs(60));
        }
        assert!(b.attempts() > 20);
    }

    #[test]
    fn resets_only_after_staying_up_long_enough() {
        let t0 = Instant::now();
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        b.next_delay(0.0);
        b.next_delay(0.0);
        let stable = Duration::from_secs(30);
        assert!(!b.note_up(t0, t0 + Duration::from_secs(5), stable));
        assert_eq!(b.attempts(), 2);
        assert!(b.note_up(t0, t0 + Duration::from_secs(30), stable));
        assert_eq!(b.attempts(), 0);
    }

    #[test]
    fn destination_is_blocked_until_its_delay_passed() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut d = DestinationBackoff::new(s(2), s(60), 100);
        assert_eq!(d.check(&"dead.example", t0), Ok(()));
        // jitter 1.0: the full base, 2 s.
        assert_eq!(d.failed(&"dead.example", t0, 1.0), s(2));
        assert_eq!(d.check(&"dead.example", t0 + s(1)), Err(t0 + s(2)));
        // Other destinations are not affected.
        assert_eq!(d.check(&"alive.example", t0 + s(1)), Ok(()));
        assert_eq!(d.check(&"dead.example", t0 + s(2)), Ok(()));
        // The next failure doubles the delay.
        assert_eq!(d.failed(&"dead.example", t0 + s(2), 1.0), s(4));
        assert_eq!(d.check(&"dead.example", t0 + s(5)), Err(t0 + s(6)));
        d.succeeded(&"dead.example");
        assert_eq!(d.check(&"dead.example", t0 + s(3)), Ok(()));
        assert!(d.is_empty());
    }

    #[test]
    fn destination_resets_only_after_a_stable_connection() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut d = DestinationBackoff::new(s(1), s(60), 10);
        d.failed(&"flaky", t0, 1.0);
        d.failed(&"flaky", t0 + s(1), 1.0);
        // Connected, dropped after 2 s: not stable (30 s), the next delay keeps growing.
        assert!(!d.connection_lasted(&"flaky", s(2), s(30)));
        assert_eq!(d.failed(&"flaky", t0 + s(10), 1.0), s(4));
        // Up for a minute: the failures are forgotten; the next delay starts from min again.
        assert!(d.connection_lasted(&"flaky", s(60), s(30)));
        assert_eq!(d.failed(&"flaky", t0 + s(100), 1.0), s(1));
    }

    #[test]
    fn destination_table_is_bounded() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut d = DestinationBackoff::new(s(10), s(60), 2);
        d.failed(&1, t0, 1.0);
        d.failed(&2, t0, 1.0);
        // Full and nothing expired: the third is not remembered (never wrongly blocked).
        d.failed(&3, t0, 1.0);
        assert_eq!(d.len(), 2);
        assert_eq!(d.check(&3, t0), Ok(()));
        // Once the others expired they make room.
        d.failed(&3, t0 + s(11), 1.0);
        assert_eq!(d.len(), 1);
        assert!(d.check(&3, t0 + s(12)).is_err());
    }
}
