//! Prometheus metrics of the operator, served on the admin port's `/metrics`. The operator's own
//! names start with `sagamesh_operator_`; its saga calls' mesh metrics keep the sidecar's names
//! (`sagamesh_requests_total`, `sagamesh_endpoint_attempts_total`, ...). Every label value comes
//! from a fixed set or from the registered services and endpoints (series of endpoints that
//! leave are removed).

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{Histogram, exponential_buckets},
};
use prometheus_client::registry::Registry;
use sagamesh_discovery::server::ServerMetrics;
use sagamesh_mesh::metrics::{self as mesh_metrics, Metrics as MeshMetrics};

/// The label of a reconcile error: one fixed value per error kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: &'static str,
}

/// Every metric of the operator, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub status_writes: Counter,
    pub events_published: Counter,
    /// The discovery server's (`sagamesh_operator_discovery_*`).
    pub discovery: ServerMetrics,
    pub leader: Gauge,
    /// Saga transitions, call latency and sagas running (`sagamesh_operator_saga_*`).
    pub saga: sagamesh_saga_kube::SagaMetrics,
    /// The mesh client's metrics of saga calls (`sagamesh_*`, the names every sidecar uses).
    pub mesh: MeshMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        let mesh = MeshMetrics::register(root.sub_registry_with_prefix(mesh_metrics::PREFIX));
        let registry = root.sub_registry_with_prefix("sagamesh_operator");
        let reconciles = Counter::default();
        registry.register(
            "reconciles",
            "ServiceRegistration reconciles run",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "ServiceRegistration reconciles that failed, by error kind",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            reconcile_duration.clone(),
        );
        let status_writes = Counter::default();
        registry.register(
            "status_writes",
            "ServiceRegistration status patches sent (only when the status changed)",
            status_writes.clone(),
        );
        let events_published = Counter::default();
        registry.register(
            "events_published",
            "Kubernetes Events published on condition transitions",
            events_published.clone(),
        );
        let discovery = ServerMetrics::default();
        discovery.register(registry);
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        let saga = sagamesh_saga_kube::SagaMetrics::new(registry);
        Metrics {
            registry: root,
            saga,
            mesh,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            status_writes,
            events_published,
            discovery,
            leader,
        }
    }
}

impl sagamesh_server::admin::EncodeMetrics for Metrics {
    fn encode(&self) -> Result<String, std::fmt::Error> {
        sagamesh_server::admin::EncodeMetrics::encode(&self.registry)
    }
}

impl Metrics {
    /// Starts timing a reconcile; the duration is recorded when the timer drops.
    pub fn reconcile_timer(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: &self.reconcile_duration,
        }
    }
}

/// Records a reconcile's duration on drop.
pub struct ReconcileTimer<'a> {
    start: Instant,
    histogram: &'a Histogram,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagamesh_server::admin::EncodeMetrics as _;

    #[test]
    fn encodes_every_metric_with_the_prefix() {
        let m = Metrics::default();
        m.reconcile_errors
            .get_or_create(&ErrorLabels { error: "kube" })
            .inc();
        drop(m.reconcile_timer());
        m.mesh
            .retries
            .get_or_create(&mesh_metrics::ServiceLabels {
                destination: "orders.shop".into(),
            })
            .inc();
        let text = m.encode().expect("encode");
        for name in [
            "sagamesh_operator_reconciles_total 1",
            "sagamesh_operator_reconcile_errors_total{error=\"kube\"} 1",
            "sagamesh_operator_reconcile_duration_seconds_count 1",
            "sagamesh_operator_status_writes_total 0",
            "sagamesh_operator_discovery_watchers 0",
            "sagamesh_operator_discovery_push_latency_seconds_count 0",
            "sagamesh_operator_leader 0",
            "sagamesh_retries_total{destination=\"orders.shop\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
