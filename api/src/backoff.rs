//! The one exponential backoff of Sagamesh: the mesh's retries, the discovery client's
//! reconnects, the breaker's ejection times, the OTLP exporter, the operator's requeues and the
//! saga engine's step retries all take their delays from [`Backoff`].
//!
//! Delay `n` (1 for the first retry) is bounded by `min(max, base * 2^(n-1))`; the [`Jitter`]
//! policy then picks the delay inside that bound.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;

/// How a delay is drawn from its bound `b` (the names of the AWS architecture blog's
/// "Exponential Backoff And Jitter", which compares them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly `b` (deterministic; for tests and for the breaker's ejection times).
    None,
    /// Uniform in `[0, b]`: spreads callers the most; for retries of a request.
    Full,
    /// Uniform in `[b/2, b]`: never retries at once; for reconnects and requeues.
    Equal,
}

/// An exponential backoff: `base` doubling per retry up to `max`, with a jitter policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub jitter: Jitter,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration, jitter: Jitter) -> Self {
        Self { base, max, jitter }
    }

    /// `min(max, base * 2^(n-1))`: the bound of delay `n` (1 = the first), before jitter.
    pub fn bound(&self, n: u32) -> Duration {
        self.base
            .saturating_mul(2u32.saturating_pow(n.saturating_sub(1).min(20)))
            .min(self.max)
    }

    /// Delay `n` (1 = the first retry), jittered by the policy.
    pub fn delay(&self, n: u32) -> Duration {
        let bound = self.bound(n);
        if bound.is_zero() {
            return bound;
        }
        let nanos = |d: Duration| d.as_nanos().min(u128::from(u64::MAX)) as u64;
        match self.jitter {
            Jitter::None => bound,
            Jitter::Full => Duration::from_nanos(rand::rng().random_range(0..=nanos(bound))),
            Jitter::Equal => {
                let half = bound / 2;
                half + Duration::from_nanos(rand::rng().random_range(0..=nanos(bound - half)))
            }
        }
    }
}

/// Consecutive failures per key (an object a controller reconciles), and the backoff they earn:
/// the delay before retrying after the `n`-th failure in a row is `backoff.delay(n)`. A success
/// or the object's deletion forgets the count.
#[derive(Debug)]
pub struct FailureBackoff<K> {
    backoff: Backoff,
    failures: Mutex<HashMap<K, u32>>,
}

impl<K: Hash + Eq> FailureBackoff<K> {
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a failure of `key`; returns how many in a row and the delay before the next try.
    pub fn failed(&self, key: K) -> (u32, Duration) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        (*n, self.backoff.delay(*n))
    }

    /// Forgets `key`'s failures (it succeeded, or it is gone).
    pub fn reset(&self, key: &K) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// How many keys have failures counted.
    pub fn len(&self) -> usize {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn bound_doubles_from_base_and_caps() {
        let b = Backoff::new(100 * MS, 1000 * MS, Jitter::None);
        let delays: Vec<_> = (1..=6).map(|n| b.delay(n)).collect();
        assert_eq!(
            delays,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(b.bound(0), 100 * MS, "0 reads as the first");
        assert_eq!(b.bound(u32::MAX), 1000 * MS, "no overflow");
        let huge = Backoff::new(Duration::MAX, Duration::MAX, Jitter::Full);
        assert_eq!(huge.bound(40), Duration::MAX);
        let _ = huge.delay(40);
    }

    #[test]
    fn jitter_policies_stay_in_their_range() {
        for n in 1..=8 {
            let full = Backoff::new(10 * MS, 500 * MS, Jitter::Full);
            let equal = Backoff {
                jitter: Jitter::Equal,
                ..full
            };
            let bound = full.bound(n);
            for _ in 0..200 {
                assert!(full.delay(n) <= bound);
                let d = equal.delay(n);
                assert!(d >= bound / 2 && d <= bound, "{d:?} of {bound:?}");
            }
        }
        // Full jitter really spreads: 200 draws are not all the same.
        let full = Backoff::new(MS, 100 * MS, Jitter::Full);
        let draws: std::collections::HashSet<_> = (0..200).map(|_| full.delay(8)).collect();
        assert!(draws.len() > 100);
        assert_eq!(
            Backoff::new(Duration::ZERO, MS, Jitter::Full).delay(3),
            Duration::ZERO
        );
    }

    #[test]
    fn failures_grow_the_delay_until_reset() {
        let f = FailureBackoff::new(Backoff::new(500 * MS, 4000 * MS, Jitter::None));
        let delays: Vec<_> = (0..5).map(|_| f.failed("a")).collect();
        assert_eq!(
            delays,
            [
                (1, 500 * MS),
                (2, 1000 * MS),
                (3, 2000 * MS),
                (4, 4000 * MS),
                (5, 4000 * MS)
            ]
        );
        assert_eq!(f.failed("b"), (1, 500 * MS), "counted per key");
        f.reset(&"a");
        assert_eq!(f.failed("a"), (1, 500 * MS), "a success starts over");
        f.reset(&"a");
        f.reset(&"b");
        assert!(f.is_empty());
    }
}
