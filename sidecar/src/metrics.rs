//! Prometheus metrics (prometheus-client), all prefixed `sagamesh_`. Labels are bounded: a
//! direction, a destination (`name.namespace`), an endpoint (`address:port`) of a known
//! destination, a status class and a fixed error code.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `outbound` or `inbound`.
    pub direction: String,
    pub destination: String,
    /// `1xx`..`5xx`.
    pub status_class: String,
    /// The `x-sagamesh-error` code, or empty when the answer came from the destination.
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub direction: String,
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub destination: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub destination: String,
    pub endpoint: String,
    /// `success` or `failure` (as the breaker counts it).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination: String,
}

fn latency_histogram() -> Histogram {
    // 1ms .. ~33s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric of the sidecar.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    /// Requests answered, by direction, destination, status class and mesh error.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to response headers.
    pub latency: Family<DestinationLabels, Histogram, fn() -> Histogram>,
    /// Attempts sent to endpoints (first tries and retries), by outcome.
    pub attempts: Family<AttemptLabels, Counter>,
    /// Retries sent.
    pub retries: Family<ServiceLabels, Counter>,
    /// Retries wanted but refused by the retry budget.
    pub budget_exhausted: Family<ServiceLabels, Counter>,
    /// Endpoint ejections by the circuit breaker.
    pub ejections: Family<EndpointLabels, Counter>,
    /// Breaker state per endpoint: 0 closed, 1 half-open, 2 open.
    pub breaker_state: Family<EndpointLabels, Gauge>,
    /// Requests in flight per destination.
    pub in_flight: Family<DestinationLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sagamesh");
        let m = Metrics {
            registry: Arc::new(Mutex::new(Registry::default())),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            attempts: Family::default(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            ejections: Family::default(),
            breaker_state: Family::default(),
            in_flight: Family::default(),
        };
        registry.register("requests", "Requests answered", m.requests.clone());
        registry.register(
            "request_duration_seconds",
            "Time to response headers",
            m.latency.clone(),
        );
        registry.register(
            "endpoint_attempts",
            "Attempts sent to endpoints, first tries and retries",
            m.attempts.clone(),
        );
        registry.register("retries", "Retries sent", m.retries.clone());
        registry.register(
            "retry_budget_exhausted",
            "Retries refused by the retry budget",
            m.budget_exhausted.clone(),
        );
        registry.register(
            "endpoint_ejections",
            "Endpoint ejections by the circuit breaker",
            m.ejections.clone(),
        );
        registry.register(
            "endpoint_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            m.breaker_state.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests in flight",
            m.in_flight.clone(),
        );
        Metrics {
            registry: Arc::new(Mutex::new(registry)),
            ..m
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}

/// `2xx` for 200 and so on.
pub fn status_class(status: http::StatusCode) -> String {
    format!("{}xx", status.as_u16() / 100)
}
