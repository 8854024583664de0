//! The policy of a destination with every default resolved, read from a discovery snapshot.
//! This is the one place where the CRD's documented defaults become numbers.

use std::collections::HashSet;
use std::time::Duration;

use sagamesh_api::service_registration::RetryOn;
use sagamesh_discovery::proto as pb;

use crate::balance::BalancePolicy;
use crate::breaker::BreakerConfig;

/// Default most in-flight requests per destination (`spec.maxInFlightRequests`).
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 10_000;

/// Retry settings with defaults resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryConfig {
    /// Total attempts including the first.
    pub attempts: u32,
    pub retry_on: HashSet<RetryOn>,
    pub retriable_status_codes: HashSet<u16>,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Share of original requests that may be retried.
    pub budget_ratio: f32,
    pub budget_min_per_second: u32,
    pub budget_ttl: Duration,
    pub retry_non_idempotent: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 3,
            retry_on: [
                RetryOn::GatewayError,
                RetryOn::ConnectFailure,
                RetryOn::Reset,
            ]
            .into_iter()
            .collect(),
            retriable_status_codes: HashSet::new(),
            per_try_timeout: None,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            budget_ratio: 0.2,
            budget_min_per_second: 10,
            budget_ttl: Duration::from_secs(10),
            retry_non_idempotent: false,
        }
    }
}

/// The full policy of one destination service.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePolicy {
    pub balance: BalancePolicy,
    pub breaker: BreakerConfig,
    /// `None`: requests are not retried.
    pub retry: Option<RetryConfig>,
    /// Overall deadline, retries included.
    pub timeout: Option<Duration>,
    pub max_in_flight: u32,
}

impl Default for ServicePolicy {
    fn default() -> Self {
        ServicePolicy {
            balance: BalancePolicy::PeakEwma,
            breaker: BreakerConfig::default(),
            retry: None,
            timeout: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

fn dur(d: &Option<prost_types::Duration>) -> Option<Duration> {
    // Invalid (negative) durations from a peer are treated as unset rather than failing the
    // whole snapshot.
    d.as_ref()
        .and_then(|d| pb::duration_from_proto("duration", d).ok())
}

impl ServicePolicy {
    /// Resolves a protobuf policy (absent: all defaults).
    pub fn from_proto(policy: Option<&pb::Policy>) -> Self {
        let Some(p) = policy else {
            return ServicePolicy::default();
        };
        let mut out = ServicePolicy::default();
        if let Some(lb) = &p.load_balancer {
            out.balance = match pb::LoadBalancerPolicy::try_from(lb.policy).unwrap_or_default() {
                pb::LoadBalancerPolicy::RoundRobin => BalancePolicy::RoundRobin,
                pb::LoadBalancerPolicy::LeastRequest => BalancePolicy::LeastRequest,
                pb::LoadBalancerPolicy::ConsistentHash => match &lb.hash_header {
                    Some(h) => match http::HeaderName::from_bytes(h.as_bytes()) {
                        Ok(h) => BalancePolicy::ConsistentHash { header: h },
                        Err(_) => BalancePolicy::PeakEwma,
                    },
                    None => BalancePolicy::PeakEwma,
                },
                pb::LoadBalancerPolicy::Unspecified | pb::LoadBalancerPolicy::PeakEwma => {
                    BalancePolicy::PeakEwma
                }
            };
        }
        if let Some(cb) = &p.circuit_breaker {
            let d = BreakerConfig::default();
            out.breaker = BreakerConfig {
                consecutive_failures: cb
                    .consecutive_failures
                    .unwrap_or(d.consecutive_failures)
                    .max(1),
                failure_ratio: cb.failure_ratio.filter(|r| r.is_finite()),
                failure_window: dur(&cb.failure_window)
                    .filter(|w| !w.is_zero())
                    .unwrap_or(d.failure_window),
                minimum_requests: cb.minimum_requests.unwrap_or(d.minimum_requests).max(1),
                base_ejection_time: dur(&cb.base_ejection_time).unwrap_or(d.base_ejection_time),
                max_ejection_time: dur(&cb.max_ejection_time).unwrap_or(d.max_ejection_time),
                max_ejection_percent: cb
                    .max_ejection_percent
                    .unwrap_or(d.max_ejection_percent)
                    .min(100),
                half_open_probes: cb.half_open_probes.unwrap_or(d.half_open_probes).max(1),
            };
        }
        if let Some(r) = &p.retry {
            let d = RetryConfig::default();
            let (base, max) = match &r.backoff {
                Some(b) => (
                    dur(&b.base_interval).unwrap_or(d.backoff_base),
                    dur(&b.max_interval).unwrap_or(d.backoff_max),
                ),
                None => (d.backoff_base, d.backoff_max),
            };
            out.retry = Some(RetryConfig {
                attempts: r.attempts.unwrap_or(d.attempts).clamp(1, 10),
                retry_on: match &r.retry_on {
                    Some(list) => list
                        .values
                        .iter()
                        .filter_map(|v| {
                            pb::RetryOn::try_from(*v)
                                .ok()
                                .and_then(pb::retry_on_from_proto)
                        })
                        .collect(),
                    None => d.retry_on,
                },
                retriable_status_codes: r
                    .retriable_status_codes
                    .iter()
                    .filter_map(|c| u16::try_from(*c).ok())
                    .collect(),
                per_try_timeout: dur(&r.per_try_timeout).filter(|t| !t.is_zero()),
                backoff_base: base,
                backoff_max: max.max(base),
                budget_ratio: r
                    .budget
                    .as_ref()
                    .map(|b| b.ratio as f32)
                    .filter(|r| r.is_finite())
                    .unwrap_or(d.budget_ratio)
                    .clamp(0.0, 1000.0),
                budget_min_per_second: r
                    .budget
                    .as_ref()
                    .and_then(|b| b.min_retries_per_second)
                    .unwrap_or(d.budget_min_per_second),
                // tower's TpsBudget accepts 1s..=60s (as the CRD does).
                budget_ttl: r
                    .budget
                    .as_ref()
                    .and_then(|b| dur(&b.ttl))
                    .unwrap_or(d.budget_ttl)
                    .clamp(Duration::from_secs(1), Duration::from_secs(60)),
                retry_non_idempotent: r.retry_non_idempotent.unwrap_or(false),
            });
        }
        out.timeout = dur(&p.timeout).filter(|t| !t.is_zero());
        out.max_in_flight = p
            .max_in_flight_requests
            .unwrap_or(DEFAULT_MAX_IN_FLIGHT)
            .max(1);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagamesh_api::service_registration as sr;

    #[test]
    fn defaults_when_unset() {
        let p = ServicePolicy::from_proto(None);
        assert_eq!(p, ServicePolicy::default());
        assert_eq!(p.breaker.consecutive_failures, 5);
        assert_eq!(p.breaker.base_ejection_time, Duration::from_secs(30));
    }

    #[test]
    fn spec_values_come_through() {
        let spec = sr::ServiceRegistrationSpec {
            load_balancer: sr::LoadBalancer {
                policy: sr::LoadBalancerPolicy::ConsistentHash,
                hash_header: Some("x-user".into()),
            },
            retry: Some(sr::RetryPolicy {
                attempts: Some(4),
                retry_on: Some(vec![sr::RetryOn::ServerError]),
                per_try_timeout: Some("200ms".into()),
                budget: Some(sr::RetryBudget {
                    ratio: 0.5,
                    min_retries_per_second: Some(1),
                    ttl: Some("90s".into()),
                }),
                ..Default::default()
            }),
            circuit_breaker: Some(sr::CircuitBreaker {
                consecutive_failures: Some(2),
                ..Default::default()
            }),
            timeout: Some("1s".into()),
            max_in_flight_requests: Some(7),
            ..Default::default()
        };
        let proto = pb::policy_from_spec(&spec).expect("policy");
        let p = ServicePolicy::from_proto(Some(&proto));
        assert!(
            matches!(p.balance, BalancePolicy::ConsistentHash { ref header } if header == "x-user")
        );
        let r = p.retry.expect("retry");
        assert_eq!(r.attempts, 4);
        assert_eq!(r.retry_on, [RetryOn::ServerError].into_iter().collect());
        assert_eq!(r.per_try_timeout, Some(Duration::from_millis(200)));
        assert_eq!(
            r.budget_ttl,
            Duration::from_secs(60),
            "clamped to tower's range"
        );
        assert_eq!(p.breaker.consecutive_failures, 2);
        assert_eq!(p.breaker.max_ejection_percent, 50);
        assert_eq!(p.timeout, Some(Duration::from_secs(1)));
        assert_eq!(p.max_in_flight, 7);
    }
}
