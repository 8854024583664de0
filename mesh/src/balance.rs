//! Per-request endpoint choice.
//!
//! Why our own balancer rather than `tower::balance::p2c::Balance`: tower's p2c picks among
//! ready services of a `Discover` stream with equal weight, and has no notion of endpoint
//! weights, consistent hashing, ejected endpoints or "any endpoint but the one that just
//! failed" for retries. The algorithms are the same (power of two choices over peak-EWMA cost
//! or in-flight requests), applied to the candidate set the client computed.

use std::sync::Mutex;

use http::HeaderName;
use rand::Rng;
use tokio::time::Instant;

use crate::endpoint::Endpoint;

/// Load-balancing policy of a destination.
#[derive(Clone, Debug, PartialEq)]
pub enum BalancePolicy {
    /// Smooth weighted round robin (as nginx): each endpoint in turn, in proportion to weight.
    RoundRobin,
    /// Power of two choices (weighted sampling) on in-flight requests / weight.
    LeastRequest,
    /// Power of two choices on peak-EWMA latency × (in-flight + 1) / weight. The default.
    PeakEwma,
    /// A hash ring on the value of a header; requests without it are spread at random.
    ConsistentHash { header: HeaderName },
}

/// Virtual nodes per unit of weight on the hash ring.
const RING_POINTS_PER_WEIGHT: u32 = 64;
/// Bound on the ring size, whatever the weights.
const MAX_RING_POINTS: usize = 64 * 1024;

/// FNV-1a 64 (stable across builds and platforms, so every sidecar maps a key the same way),
/// then a finalizer so nearby keys spread over the ring.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = sagamesh_api::stable_hash::fnv1a(bytes);
    // Finalizer from murmur3.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^= h >> 33;
    h
}

/// A balancer for one endpoint set (rebuilt when discovery changes the set).
#[derive(Debug)]
pub struct Balancer {
    policy: BalancePolicy,
    /// Sorted (point, endpoint index), for ConsistentHash.
    ring: Vec<(u64, usize)>,
    rr_lock: Mutex<()>,
}

impl Balancer {
    pub fn new(policy: BalancePolicy, endpoints: &[impl AsRef<Endpoint>]) -> Self {
        let mut ring = Vec::new();
        if matches!(policy, BalancePolicy::ConsistentHash { .. }) {
            let total: u64 = endpoints
                .iter()
                .map(|e| u64::from(e.as_ref().weight()))
                .sum::<u64>()
                .max(1);
            let per_weight =
                (MAX_RING_POINTS as u64 / total).clamp(1, RING_POINTS_PER_WEIGHT.into());
            for (i, e) in endpoints.iter().enumerate() {
                let e = e.as_ref();
                for v in 0..u64::from(e.weight()) * per_weight {
                    ring.push((fnv1a(format!("{}#{v}", e.key()).as_bytes()), i));
                }
            }
            ring.sort_unstable();
        }
        Balancer {
            policy,
            ring,
            rr_lock: Mutex::new(()),
        }
    }

    /// Picks one of `candidates` (indices into `endpoints`, never empty when called with a
    /// useful result). `headers` feed ConsistentHash.
    pub fn pick(
        &self,
        endpoints: &[impl AsRef<Endpoint>],
        candidates: &[usize],
        headers: &http::HeaderMap,
    ) -> Option<usize> {
        match candidates {
            [] => return None,
            [only] => {
                if matches!(self.policy, BalancePolicy::RoundRobin) {
                    // Keep round-robin state consistent even with one candidate.
                    let _ = self.round_robin(endpoints, candidates);
                }
                return Some(*only);
            }
            _ => {}
        }
        let now = Instant::now();
        match &self.policy {
            BalancePolicy::RoundRobin => self.round_robin(endpoints, candidates),
            BalancePolicy::LeastRequest => Some(p2c(endpoints, candidates, |e| {
                f64::from(e.in_flight()) / f64::from(e.weight())
            })),
            BalancePolicy::PeakEwma => Some(p2c(endpoints, candidates, |e| e.ewma_cost(now))),
            BalancePolicy::ConsistentHash { header } => match headers.get(header) {
                Some(v) if !self.ring.is_empty() => {
                    let h = fnv1a(v.as_bytes());
                    let start = self.ring.partition_point(|(p, _)| *p < h);
                    let n = self.ring.len();
                    (0..n)
                        .map(|k| self.ring[(start + k) % n].1)
                        .find(|i| candidates.contains(i))
                }
                _ => Some(weighted_sample(endpoints, candidates, None)),
            },
        }
    }

    fn round_robin(
        &self,
        endpoints: &[impl AsRef<Endpoint>],
        candidates: &[usize],
    ) -> Option<usize> {
        let _guard = self.rr_lock.lock().ok()?;
        let total: i64 = candidates
            .iter()
            .map(|i| i64::from(endpoints[*i].as_ref().weight()))
            .sum();
        let mut best: Option<(usize, i64)> = None;
        for i in candidates {
            let cw = endpoints[*i].as_ref().rr_advance();
            if best.is_none_or(|(_, b)| cw > b) {
                best = Some((*i, cw));
            }
        }
        let (i, _) = best?;
        endpoints[i].as_ref().rr_charge(total);
        Some(i)
    }
}

/// Samples one candidate with probability proportional to weight, skipping `except`.
fn weighted_sample(
    endpoints: &[impl AsRef<Endpoint>],
    candidates: &[usize],
    except: Option<usize>,
) -> usize {
    let total: u64 = candidates
        .iter()
        .filter(|i| Some(**i) != except)
        .map(|i| u64::from(endpoints[*i].as_ref().weight()))
        .sum();
    if total == 0 {
        return candidates[0];
    }
    let mut r = rand::rng().random_range(0..total);
    for i in candidates.iter().filter(|i| Some(**i) != except) {
        let w = u64::from(endpoints[*i].as_ref().weight());
        if r < w {
            return *i;
        }
        r -= w;
    }
    candidates[0]
}

/// Power of two choices: two distinct candidates sampled by weight, the lower cost wins.
fn p2c(
    endpoints: &[impl AsRef<Endpoint>],
    candidates: &[usize],
    cost: impl Fn(&Endpoint) -> f64,
) -> usize {
    let a = weighted_sample(endpoints, candidates, None);
    let b = weighted_sample(endpoints, candidates, Some(a));
    if cost(endpoints[b].as_ref()) < cost(endpoints[a].as_ref()) {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerConfig;
    use std::sync::Arc;
    use std::time::Duration;

    fn eps(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Arc::new(Endpoint::new(
                    format!("10.0.0.{i}"),
                    80,
                    *w,
                    String::new(),
                    BreakerConfig::default(),
                ))
            })
            .collect()
    }

    fn counts(b: &Balancer, e: &[Arc<Endpoint>], cands: &[usize], n: usize) -> Vec<usize> {
        let mut c = vec![0; e.len()];
        let h = http::HeaderMap::new();
        for _ in 0..n {
            c[b.pick(e, cands, &h).expect("pick")] += 1;
        }
        c
    }

    #[test]
    fn weighted_round_robin_is_exact() {
        let e = eps(&[1, 2, 3]);
        let b = Balancer::new(BalancePolicy::RoundRobin, &e);
        assert_eq!(counts(&b, &e, &[0, 1, 2], 600), vec![100, 200, 300]);
        // Smooth: never the same heavy endpoint many times in a row.
        let e = eps(&[1, 1, 1]);
        let b = Balancer::new(BalancePolicy::RoundRobin, &e);
        let h = http::HeaderMap::new();
        let seq: Vec<usize> = (0..6)
            .map(|_| b.pick(&e, &[0, 1, 2], &h).expect("pick"))
            .collect();
        assert_eq!(seq, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn round_robin_skips_non_candidates() {
        let e = eps(&[1, 1, 1]);
        let b = Balancer::new(BalancePolicy::RoundRobin, &e);
        assert_eq!(counts(&b, &e, &[0, 2], 100), vec![50, 0, 50]);
    }

    #[test]
    fn least_request_avoids_busy_endpoint() {
        let e = eps(&[1, 1, 1]);
        let _busy: Vec<_> = (0..10).map(|_| e[0].track()).collect();
        let b = Balancer::new(BalancePolicy::LeastRequest, &e);
        let c = counts(&b, &e, &[0, 1, 2], 300);
        assert_eq!(c[0], 0, "p2c never prefers the busy one: {c:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_avoids_slow_endpoint() {
        let e = eps(&[1, 1, 1]);
        e[0].observe_rtt(Duration::from_millis(200));
        e[1].observe_rtt(Duration::from_millis(10));
        e[2].observe_rtt(Duration::from_millis(10));
        let b = Balancer::new(BalancePolicy::PeakEwma, &e);
        let c = counts(&b, &e, &[0, 1, 2], 300);
        assert_eq!(c[0], 0, "{c:?}");
        assert!(c[1] > 100 && c[2] > 100, "{c:?}");
    }

    #[test]
    fn consistent_hash_is_sticky_and_moves_only_when_needed() {
        let e = eps(&[1, 1, 1]);
        let b = Balancer::new(
            BalancePolicy::ConsistentHash {
                header: HeaderName::from_static("x-user"),
            },
            &e,
        );
        let mut spread = [0; 3];
        for user in 0..300 {
            let mut h = http::HeaderMap::new();
            h.insert("x-user", format!("user-{user}").parse().expect("header"));
            let first = b.pick(&e, &[0, 1, 2], &h).expect("pick");
            assert_eq!(b.pick(&e, &[0, 1, 2], &h), Some(first), "sticky");
            spread[first] += 1;
            // With its endpoint gone, the key moves; with another gone, it stays.
            let without: Vec<usize> = (0..3).filter(|i| *i != first).collect();
            assert_ne!(b.pick(&e, &without, &h), Some(first));
            let other = (first + 1) % 3;
            let keep: Vec<usize> = (0..3).filter(|i| *i != other).collect();
            assert_eq!(b.pick(&e, &keep, &h), Some(first));
        }
        assert!(spread.iter().all(|c| *c > 50), "{spread:?}");
    }
}
