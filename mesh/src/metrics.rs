//! Prometheus metrics (prometheus-client), all prefixed `sagamesh_`. Labels are bounded: a
//! direction, a destination (`name.namespace`), an endpoint (`address:port`) of a known
//! destination, a status class and a fixed error code.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

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

/// Every metric of the mesh client: the sidecar serves them on its admin port, the operator
/// and `sagamesh local` (whose saga calls go through the same client) on their `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    /// The registry of [`Metrics::new`]; `None` when registered in the caller's registry.
    registry: Option<Arc<Mutex<Registry>>>,
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

/// The prefix of every mesh metric's name.
pub const PREFIX: &str = "sagamesh";

impl Metrics {
    /// The metrics in a registry of their own, named `sagamesh_*`; [`Metrics::encode`] renders it.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let metrics = Self::register(&mut registry);
        Metrics {
            registry: Some(Arc::new(Mutex::new(registry))),
            ..metrics
        }
    }

    /// The metrics registered in the caller's `registry`, which serves them (give it a
    /// sub-registry with the prefix [`PREFIX`] to keep the sidecar's names); [`Metrics::encode`]
    /// is then empty.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            registry: None,
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
        m
    }

    /// Counts an outbound request answered by the mesh before it had a destination (`destination`
    /// is a fixed placeholder such as `unknown`, so such requests add no series per name).
    pub fn outbound_without_destination(
        &self,
        destination: &str,
        status: http::StatusCode,
        error: &str,
        elapsed: std::time::Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                direction: "outbound".into(),
                destination: destination.into(),
                status_class: status_class(status),
                error: error.into(),
            })
            .inc();
        self.latency
            .get_or_create(&DestinationLabels {
                direction: "outbound".into(),
                destination: destination.into(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// OpenMetrics text of the registry of [`Metrics::new`] (empty for [`Metrics::register`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Some(Ok(r)) = self.registry.as_ref().map(|r| r.lock()) {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}

const CLASSES: [&str; 6] = ["0xx", "1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(status: http::StatusCode) -> usize {
    usize::from(status.as_u16() / 100).min(5)
}

/// `2xx` for 200 and so on.
pub fn status_class(status: http::StatusCode) -> String {
    CLASSES[class_index(status)].to_string()
}

/// The metric handles of one destination in one direction, each made on first use and then
/// reused, so a request builds no label set and hashes nothing to count itself. A series
/// appears in `/metrics` when first used, as with `get_or_create`.
pub struct DestinationMetrics {
    metrics: Metrics,
    direction: &'static str,
    destination: String,
    /// `requests_total` without a mesh error, by status class.
    answered: [OnceLock<Counter>; 6],
    latency: OnceLock<Histogram>,
    in_flight: OnceLock<Gauge>,
    retries: OnceLock<Counter>,
}

impl DestinationMetrics {
    pub fn new(metrics: &Metrics, direction: &'static str, destination: String) -> Self {
        DestinationMetrics {
            metrics: metrics.clone(),
            direction,
            destination,
            answered: Default::default(),
            latency: OnceLock::new(),
            in_flight: OnceLock::new(),
            retries: OnceLock::new(),
        }
    }

    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// Drops the series of an endpoint that left this destination.
    pub fn remove_endpoint(&self, endpoint: &str) {
        self.metrics.remove_endpoint(&self.destination, endpoint);
    }

    /// Counts a request answered with `status`, and `error` when the mesh made the answer.
    pub fn request(&self, status: http::StatusCode, error: &str) {
        let class = class_index(status);
        if error.is_empty() {
            self.answered[class]
                .get_or_init(|| self.request_counter(class, ""))
                .inc();
        } else {
            self.request_counter(class, error).inc();
        }
    }

    fn request_counter(&self, class: usize, error: &str) -> Counter {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                direction: self.direction.into(),
                destination: self.destination.clone(),
                status_class: CLASSES[class].into(),
                error: error.into(),
            })
            .clone()
    }

    fn labels(&self) -> DestinationLabels {
        DestinationLabels {
            direction: self.direction.into(),
            destination: self.destination.clone(),
        }
    }

    pub fn latency(&self) -> &Histogram {
        self.latency
            .get_or_init(|| self.metrics.latency.get_or_create(&self.labels()).clone())
    }

    pub fn in_flight(&self) -> &Gauge {
        self.in_flight
            .get_or_init(|| self.metrics.in_flight.get_or_create(&self.labels()).clone())
    }

    pub fn retries(&self) -> &Counter {
        self.retries.get_or_init(|| {
            self.metrics
                .retries
                .get_or_create(&ServiceLabels {
                    destination: self.destination.clone(),
                })
                .clone()
        })
    }
}

/// The metric handles of one endpoint of a destination, made on first use. When the endpoint
/// leaves its destination, [`Metrics::remove_endpoint`] drops its series and
/// [`EndpointMetrics::retire`] keeps requests still in flight on it from making them again.
#[derive(Debug, Default)]
pub struct EndpointMetrics {
    success: OnceLock<Counter>,
    failure: OnceLock<Counter>,
    ejections: OnceLock<Counter>,
    breaker_state: OnceLock<Gauge>,
    retired: AtomicBool,
}

impl EndpointMetrics {
    /// A handle from `create`, or a detached one (counted nowhere) once the endpoint left.
    fn handle<M: Clone + Default>(&self, create: impl FnOnce() -> M) -> M {
        if self.retired.load(Ordering::Relaxed) {
            M::default()
        } else {
            create()
        }
    }

    /// Counts an attempt by its outcome as the breaker sees it.
    pub fn attempt(&self, metrics: &Metrics, destination: &str, endpoint: &str, failure: bool) {
        let (cell, outcome) = if failure {
            (&self.failure, "failure")
        } else {
            (&self.success, "success")
        };
        cell.get_or_init(|| {
            self.handle(|| {
                metrics
                    .attempts
                    .get_or_create(&AttemptLabels {
                        destination: destination.to_string(),
                        endpoint: endpoint.to_string(),
                        outcome: outcome.into(),
                    })
                    .clone()
            })
        })
        .inc();
    }

    /// Counts an ejection by the circuit breaker.
    pub fn ejected(&self, metrics: &Metrics, destination: &str, endpoint: &str) {
        self.ejections
            .get_or_init(|| {
                self.handle(|| {
                    metrics
                        .ejections
                        .get_or_create(&endpoint_labels(destination, endpoint))
                        .clone()
                })
            })
            .inc();
    }

    /// The `endpoint_breaker_state` gauge.
    pub fn breaker_state(&self, metrics: &Metrics, destination: &str, endpoint: &str) -> &Gauge {
        self.breaker_state.get_or_init(|| {
            self.handle(|| {
                metrics
                    .breaker_state
                    .get_or_create(&endpoint_labels(destination, endpoint))
                    .clone()
            })
        })
    }

    /// The endpoint left its destination: handles made from now on are detached.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }
}

fn endpoint_labels(destination: &str, endpoint: &str) -> EndpointLabels {
    EndpointLabels {
        destination: destination.to_string(),
        endpoint: endpoint.to_string(),
    }
}

impl Metrics {
    /// Drops every series of `endpoint` of `destination` (it left the destination), so pod
    /// churn does not grow `/metrics` and no breaker state stays frozen at its last value.
    pub fn remove_endpoint(&self, destination: &str, endpoint: &str) {
        for outcome in ["success", "failure"] {
            self.attempts.remove(&AttemptLabels {
                destination: destination.to_string(),
                endpoint: endpoint.to_string(),
                outcome: outcome.into(),
            });
        }
        let labels = endpoint_labels(destination, endpoint);
        self.ejections.remove(&labels);
        self.breaker_state.remove(&labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_handles_count_in_the_registry() {
        let m = Metrics::new();
        let d = DestinationMetrics::new(&m, "outbound", "web.default".into());
        d.request(http::StatusCode::OK, "");
        d.request(http::StatusCode::OK, "");
        d.request(http::StatusCode::SERVICE_UNAVAILABLE, "no-endpoints");
        d.latency().observe(0.002);
        d.in_flight().inc();
        d.retries().inc();
        let e = EndpointMetrics::default();
        e.attempt(&m, "web.default", "10.0.0.1:80", false);
        e.breaker_state(&m, "web.default", "10.0.0.1:80").set(2);
        let text = m.encode();
        for line in [
            r#"sagamesh_requests_total{direction="outbound",destination="web.default",status_class="2xx",error=""} 2"#,
            r#"sagamesh_requests_total{direction="outbound",destination="web.default",status_class="5xx",error="no-endpoints"} 1"#,
            r#"sagamesh_request_duration_seconds_count{direction="outbound",destination="web.default"} 1"#,
            r#"sagamesh_requests_in_flight{direction="outbound",destination="web.default"} 1"#,
            r#"sagamesh_retries_total{destination="web.default"} 1"#,
            r#"sagamesh_endpoint_attempts_total{destination="web.default",endpoint="10.0.0.1:80",outcome="success"} 1"#,
            r#"sagamesh_endpoint_breaker_state{destination="web.default",endpoint="10.0.0.1:80"} 2"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // Unused handles make no series.
        assert!(!text.contains(r#"outcome="failure""#), "{text}");
        assert!(!text.contains(r#"status_class="4xx""#), "{text}");
        assert_eq!(status_class(http::StatusCode::NOT_FOUND), "4xx");
    }

    #[test]
    fn requests_without_a_destination_count_under_their_placeholder() {
        let m = Metrics::new();
        m.outbound_without_destination(
            "unknown",
            http::StatusCode::BAD_REQUEST,
            "bad-request",
            std::time::Duration::from_millis(1),
        );
        let text = m.encode();
        for line in [
            r#"sagamesh_requests_total{direction="outbound",destination="unknown",status_class="4xx",error="bad-request"} 1"#,
            r#"sagamesh_request_duration_seconds_count{direction="outbound",destination="unknown"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
