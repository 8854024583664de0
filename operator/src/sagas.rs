//! Sagas in the operator: the saga controller (sagamesh-saga), run by the Lease holder, calling
//! services through the sidecar's own client — reading the operator's index directly (it is a
//! `Discover` source), so a saga step reaches exactly the endpoints every sidecar sees.

use std::sync::Arc;

use kube::{Client, runtime::events::Reporter};
use sagamesh_mesh::{ClientConfig, MeshClient};
use sagamesh_saga::EngineConfig;
use sagamesh_saga_kube::{KubeSagaStore, SagaController};
use sagamesh_saga_mesh::MeshCaller;
use tokio::sync::watch;

use crate::index::SharedIndex;
use crate::metrics::Metrics;
use sagamesh_discovery::server::Source as _;

/// Runs the saga controller until `shutdown` turns true; sagas run only while `leader` is true.
/// Saga transitions count in `metrics.saga`, saga calls in `metrics.mesh` (both on `/metrics`).
/// `namespace`: only that namespace's sagas (`--watch-namespace`), else all.
pub async fn run(
    client: Client,
    index: SharedIndex,
    leader: watch::Receiver<bool>,
    reporter: Reporter,
    metrics: Arc<Metrics>,
    namespace: Option<String>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Validation asks whether each service is registered: answer only from a complete index,
    // or a saga created while the operator starts would fail on a service not listed yet.
    let mut ready = index.ready();
    tokio::select! {
        r = ready.wait_for(|r| *r) => if r.is_err() { return },
        _ = shutdown.wait_for(|s| *s) => return,
    }
    // The index is the mesh client's discovery source itself: the same watch channels the
    // discovery server streams to the sidecars.
    let mesh = MeshClient::new(
        Arc::new(index),
        ClientConfig::default(),
        metrics.mesh.clone(),
    );
    let controller = SagaController {
        store: KubeSagaStore::new(client.clone(), reporter, Some(metrics.saga.clone())),
        client,
        caller: Arc::new(MeshCaller::new(mesh)),
        config: EngineConfig::default(),
        leader,
        namespace,
    };
    controller
        .run(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await;
}
