//! Retry decisions: which outcomes are retried, which requests may be, and how long to wait.
//! The budget itself is tower's `retry::budget::TpsBudget` (ratio of recent requests plus a
//! minimum rate), held per destination by the client.

use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};
use sagamesh_api::backoff::{Backoff, Jitter};
use sagamesh_api::service_registration::RetryOn;

use crate::policy::RetryConfig;

/// The outcome of one attempt, as far as retries and the breaker care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response; the status (gRPC: mapped from `grpc-status` of a trailers-only response).
    Response(StatusCode),
    /// No connection could be made.
    ConnectFailure,
    /// The connection broke before a response.
    Reset,
    /// The per-try timeout passed.
    Timeout,
    /// The caller's request body failed (malformed or over the limit): not the endpoint's fault.
    CallerError,
}

impl Outcome {
    /// Whether the breaker counts it as a failure: 5xx, connect failures, resets, timeouts.
    pub fn is_failure(self) -> bool {
        match self {
            Outcome::Response(s) => s.is_server_error(),
            Outcome::CallerError => false,
            _ => true,
        }
    }
}

/// Whether `outcome` is retried under `cfg`.
pub fn is_retryable(cfg: &RetryConfig, outcome: Outcome) -> bool {
    match outcome {
        Outcome::Response(s) => {
            // Cheap tests first: most answers are not errors and no codes are listed.
            let code = s.as_u16();
            (!cfg.retriable_status_codes.is_empty() && cfg.retriable_status_codes.contains(&code))
                || (s.is_server_error() && cfg.retry_on.contains(&RetryOn::ServerError))
                || (matches!(code, 502..=504) && cfg.retry_on.contains(&RetryOn::GatewayError))
        }
        Outcome::ConnectFailure => cfg.retry_on.contains(&RetryOn::ConnectFailure),
        Outcome::Reset => cfg.retry_on.contains(&RetryOn::Reset),
        Outcome::CallerError => false,
        // A per-try timeout is a gateway timeout (504).
        Outcome::Timeout => {
            cfg.retry_on.contains(&RetryOn::GatewayError)
                || cfg.retry_on.contains(&RetryOn::ServerError)
                || cfg.retriable_status_codes.contains(&504)
        }
    }
}

/// A request extension for callers that retry on their own (the saga engine: each of its
/// attempts is one step attempt, counted and backed off by the step's retry policy). The mesh
/// then retries such a request only when nothing was sent (a connect failure, if the
/// destination's policy retries those): moving to another endpoint is endpoint selection, not
/// an attempt, so the service sees exactly the caller's attempts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallerRetries;

/// Whether the mesh retries `outcome` of a request whose caller retries on its own.
pub fn retried_for_retrying_caller(outcome: Outcome) -> bool {
    outcome == Outcome::ConnectFailure
}

/// The header that makes a non-idempotent request retryable.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Whether the request may be sent more than once: idempotent methods (RFC 9110), requests with
/// `Idempotency-Key`, or anything when `retry_non_idempotent` is set.
pub fn may_retry(cfg: &RetryConfig, method: &Method, headers: &HeaderMap) -> bool {
    cfg.retry_non_idempotent
        || matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        )
        || headers.contains_key(IDEMPOTENCY_KEY)
}

/// Exponential backoff before retry `n` (1 = first retry): full jitter in
/// `[0, min(max, base * 2^(n-1))]`, or exactly the bound without jitter.
pub fn backoff(cfg: &RetryConfig, n: u32, jitter: bool) -> Duration {
    let jitter = if jitter { Jitter::Full } else { Jitter::None };
    Backoff::new(cfg.backoff_base, cfg.backoff_max, jitter).delay(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let cfg = RetryConfig::default();
        assert!(is_retryable(
            &cfg,
            Outcome::Response(StatusCode::BAD_GATEWAY)
        ));
        assert!(!is_retryable(
            &cfg,
            Outcome::Response(StatusCode::INTERNAL_SERVER_ERROR)
        ));
        assert!(is_retryable(&cfg, Outcome::ConnectFailure));
        assert!(is_retryable(&cfg, Outcome::Reset));
        assert!(is_retryable(&cfg, Outcome::Timeout));
        let cfg = RetryConfig {
            retry_on: [RetryOn::ServerError].into_iter().collect(),
            retriable_status_codes: [429].into_iter().collect(),
            ..Default::default()
        };
        assert!(is_retryable(
            &cfg,
            Outcome::Response(StatusCode::INTERNAL_SERVER_ERROR)
        ));
        assert!(is_retryable(
            &cfg,
            Outcome::Response(StatusCode::TOO_MANY_REQUESTS)
        ));
        assert!(!is_retryable(
            &cfg,
            Outcome::Response(StatusCode::NOT_FOUND)
        ));
        assert!(!is_retryable(&cfg, Outcome::ConnectFailure));
    }

    #[test]
    fn idempotency() {
        let cfg = RetryConfig::default();
        let mut h = HeaderMap::new();
        assert!(may_retry(&cfg, &Method::GET, &h));
        assert!(!may_retry(&cfg, &Method::POST, &h));
        h.insert("Idempotency-Key", "saga/1/step".parse().expect("header"));
        assert!(may_retry(&cfg, &Method::POST, &h));
        let all = RetryConfig {
            retry_non_idempotent: true,
            ..Default::default()
        };
        assert!(may_retry(&all, &Method::PATCH, &HeaderMap::new()));
    }

    #[test]
    fn backoff_bounds() {
        let cfg = RetryConfig::default();
        assert_eq!(backoff(&cfg, 1, false), Duration::from_millis(25));
        assert_eq!(backoff(&cfg, 2, false), Duration::from_millis(50));
        assert_eq!(backoff(&cfg, 10, false), Duration::from_millis(250));
        for n in 1..8 {
            assert!(backoff(&cfg, n, true) <= backoff(&cfg, n, false));
        }
    }
}
