//! The metrics `sagamesh local` serves on its `/metrics`: the mesh metrics of saga calls under
//! the sidecar's names (`sagamesh_requests_total`, `sagamesh_retries_total`, ...) and the
//! discovery server's under the operator's (`sagamesh_operator_discovery_*`), so a dashboard
//! made for a cluster reads local mode unchanged.

use prometheus_client::registry::Registry;
use sagamesh_discovery::server::ServerMetrics;
use sagamesh_mesh::metrics::{self as mesh_metrics, Metrics as MeshMetrics};

/// The local control plane's metrics, in one registry.
pub struct Metrics {
    registry: Registry,
    pub mesh: MeshMetrics,
    pub discovery: ServerMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let mesh = MeshMetrics::register(registry.sub_registry_with_prefix(mesh_metrics::PREFIX));
        let discovery = ServerMetrics::default();
        discovery.register(registry.sub_registry_with_prefix("sagamesh_operator"));
        Metrics {
            registry,
            mesh,
            discovery,
        }
    }
}

impl sagamesh_server::admin::EncodeMetrics for Metrics {
    fn encode(&self) -> Result<String, std::fmt::Error> {
        sagamesh_server::admin::EncodeMetrics::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagamesh_server::admin::EncodeMetrics as _;

    #[test]
    fn mesh_and_discovery_series_under_the_cluster_names() {
        let m = Metrics::default();
        m.mesh
            .retries
            .get_or_create(&mesh_metrics::ServiceLabels {
                destination: "orders.shop".into(),
            })
            .inc();
        let text = m.encode().expect("encode");
        for name in [
            "sagamesh_retries_total{destination=\"orders.shop\"} 1",
            "sagamesh_operator_discovery_watchers 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
