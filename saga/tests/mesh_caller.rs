//! Saga calls through the sidecar's MeshClient: services found by discovery, named ports,
//! balancing, and the mesh's retries carrying a step over a dead instance.

mod common;

use std::{collections::HashMap, sync::Mutex, time::Duration};

use common::{Fault, TestService};
use sagamesh_api::{
    discovery::snapshot_from_spec,
    saga::{CallPhase, SagaPhase, SagaSpec, SagaStatus},
    service_registration::ServiceRegistrationSpec,
};
use sagamesh_saga::{EngineConfig, Event, SagaRef, SagaStore, StoreError, mesh::MeshCaller, run};
use sagamesh_sidecar::{ClientConfig, MeshClient, discovery::StaticDiscovery, metrics::Metrics};
use serde_json::json;

#[derive(Default)]
struct Store(Mutex<HashMap<String, SagaStatus>>);

impl SagaStore for Store {
    async fn save(&self, saga: &SagaRef, status: &SagaStatus, _: &Event) -> Result<(), StoreError> {
        self.0
            .lock()
            .expect("lock")
            .insert(saga.name.clone(), status.clone());
        Ok(())
    }
}

fn registration(addresses: &[std::net::SocketAddr]) -> ServiceRegistrationSpec {
    serde_json::from_value(json!({
        "endpoints": addresses.iter().map(|a| json!({"address": a.ip().to_string(), "port": a.port()})).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8080}],
        "loadBalancer": {"policy": "RoundRobin"},
        "retry": {"attempts": 3, "retryOn": ["connect-failure", "gateway-error"], "backoff": {"baseInterval": "5ms", "maxInterval": "20ms"}}
    }))
    .expect("registration parses")
}

#[tokio::test]
async fn a_saga_runs_through_the_mesh_and_survives_a_dead_instance() {
    let orders_a = TestService::start("orders").await.expect("orders a");
    let orders_b = TestService::start("orders").await.expect("orders b");
    let payment = TestService::start("payment").await.expect("payment");
    payment.fault("/charges", Fault::FirstN(1));
    // An address nothing listens on: the mesh must route around it.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };

    let discovery = StaticDiscovery::new();
    for (name, addrs) in [
        ("orders", vec![orders_a.addr, orders_b.addr, dead]),
        ("payment", vec![payment.addr]),
    ] {
        discovery.set(snapshot_from_spec("shop", name, &registration(&addrs)).expect("snapshot"));
    }
    let client = MeshClient::new(
        discovery,
        ClientConfig {
            jitter: false,
            ..ClientConfig::default()
        },
        Metrics::new(),
    );
    let caller = MeshCaller::new(client);

    let spec: SagaSpec = serde_json::from_value(json!({
        "input": {"id": "7"},
        "steps": [
            {"name": "create", "action": {"service": "orders", "port": "http", "path": "/orders", "body": {"id": "{{ input.id }}"}},
             "compensation": {"service": "orders", "method": "DELETE", "path": "/orders/{{ input.id }}"}},
            {"name": "charge", "action": {"service": "payment.shop", "path": "/charges"}}
        ]
    }))
    .expect("spec parses");
    let store = Store::default();
    let mut statuses = Vec::new();
    for i in 0..6 {
        let saga = SagaRef {
            namespace: "shop".into(),
            name: format!("s{i}"),
            uid: format!("u{i}"),
        };
        let status = tokio::time::timeout(
            Duration::from_secs(30),
            run(
                &saga,
                &spec,
                SagaStatus::default(),
                &store,
                &caller,
                &EngineConfig {
                    jitter: false,
                    ..EngineConfig::default()
                },
            ),
        )
        .await
        .expect("finishes")
        .expect("store ok");
        statuses.push(status);
    }
    for status in &statuses {
        assert_eq!(status.phase, SagaPhase::Succeeded, "{status:#?}");
        assert!(
            status.steps.iter().all(|s| s.action.attempts == 1),
            "the mesh retried, not the engine"
        );
        assert_eq!(status.steps[1].action.phase, CallPhase::Succeeded);
    }
    // Balanced over both live orders instances; every key applied once.
    let (a, b) = (orders_a.effects().len(), orders_b.effects().len());
    assert_eq!(a + b, 6);
    assert!(a >= 2 && b >= 2, "orders calls spread: {a} / {b}");
    assert_eq!(payment.effects().len(), 6);

    // An unknown service fails validation before any call.
    let mut bad = spec.clone();
    bad.steps[1].action.service = "billing".into();
    let saga = SagaRef {
        namespace: "shop".into(),
        name: "bad".into(),
        uid: "ub".into(),
    };
    let status = run(
        &saga,
        &bad,
        SagaStatus::default(),
        &store,
        &caller,
        &EngineConfig::default(),
    )
    .await
    .expect("store ok");
    assert_eq!(status.phase, SagaPhase::Failed);
    assert!(
        status.conditions[0]
            .message
            .contains("\"billing\" is not registered"),
        "{:?}",
        status.conditions
    );
}
