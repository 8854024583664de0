//! Sagas in the operator: the saga controller (sagamesh-saga), run by the Lease holder, calling
//! services through the sidecar's own client — fed in-process from the operator's index, so a
//! saga step reaches exactly the endpoints every sidecar sees.

use std::sync::Arc;

use kube::{Client, runtime::events::Reporter};
use sagamesh_discovery::{Discover as SidecarDiscover, Resolution, Watches, name::ServiceKey};
use sagamesh_mesh::{ClientConfig, MeshClient};
use sagamesh_saga::EngineConfig;
use sagamesh_saga_kube::{KubeSagaStore, SagaController};
use sagamesh_saga_mesh::MeshCaller;
use tokio::sync::watch;

use crate::index::SharedIndex;
use crate::metrics::Metrics;
use sagamesh_discovery::server::{View, ViewSource};

fn resolution(view: &View) -> Resolution {
    match &view.snapshot {
        Some(snapshot) => Resolution::Snapshot {
            revision: view.revision,
            snapshot: Arc::new(snapshot.clone()),
        },
        None => Resolution::DoesNotExist {
            revision: view.revision,
        },
    }
}

/// The index as a sidecar discovery source: one forwarding task per watched service.
pub struct IndexDiscover {
    index: SharedIndex,
    watches: Arc<Watches>,
}

impl IndexDiscover {
    pub fn new(index: SharedIndex) -> Arc<Self> {
        Arc::new(Self {
            index,
            watches: Arc::default(),
        })
    }
}

impl SidecarDiscover for IndexDiscover {
    fn watch(&self, service: &ServiceKey) -> watch::Receiver<Resolution> {
        let mut source = self.index.subscribe(&service.namespace, &service.name);
        let initial = resolution(&source.borrow_and_update());
        let (rx, new) = self.watches.subscribe(service, || initial);
        if new {
            let (key, watches) = (service.clone(), self.watches.clone());
            // The client keeps one receiver per destination for the life of the process, so
            // the forwarding runs as long as the index does.
            tokio::spawn(async move {
                while source.changed().await.is_ok() {
                    let view = source.borrow_and_update().clone();
                    watches.set(&key, resolution(&view));
                }
            });
        }
        rx
    }

    fn debug_state(&self) -> serde_json::Value {
        self.watches.to_json()
    }

    fn is_ready(&self) -> bool {
        *self.index.ready().borrow()
    }
}

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
    let discover = IndexDiscover::new(index);
    let mesh = MeshClient::new(discover, ClientConfig::default(), metrics.mesh.clone());
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
