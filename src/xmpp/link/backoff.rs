//! Reconnect delays for the component links: exponential growth from `min` to `max` with
//! "equal jitter" (half the delay fixed, half random), so that the links of a restarted home
//! node — and the links of every gateway node of a cluster — do not all come back in the same
//! second. Pure: the caller passes the random draw, so tests are deterministic.

use std::time::Duration;

/// Exponential backoff state of one link.
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

    /// The delay before the next round. `jitter` is a draw from `[0, 1)` (clamped): the delay is
    /// `base/2 + base/2 × jitter` where `base = min(min × 2^attempts, max)`.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        // 2^20 × 1 s is far past any sane cap; stop doubling there so the shift cannot overflow.
        let factor = 1u32 << self.attempt.min(20);
        let base = self.min.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// A connection stayed up long enough: start again from `min`.
    pub fn reset(&mut self) {
        self.attempt = 0;
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
        // Out-of-range draws are clamped, never negative or above the base.
        assert_eq!(b.next_delay(7.0), Duration::from_secs(4));
        for _ in 0..100 {
            assert!(b.next_delay(f64::NAN.max(0.3)) <= Duration::from_secs(60));
        }
        assert!(b.attempts() > 20);
    }
}
