//! Saga calls through the sidecar's MeshClient: services found by discovery, named ports,
//! balancing, the mesh moving a step off a dead instance, and one layer of retries (the
//! engine's) for calls the service saw.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use sagamesh_api::{
    saga::{CallPhase, SagaPhase, SagaSpec, SagaStatus},
    service_registration::ServiceRegistrationSpec,
};
use sagamesh_discovery::{StaticDiscovery, proto::snapshot_from_spec};
use sagamesh_mesh::{ClientConfig, MeshClient, metrics::Metrics};
use sagamesh_saga::{EngineConfig, Event, SagaRef, SagaStore, StoreError, run};
use sagamesh_saga_mesh::MeshCaller;
use sagamesh_testing::shop::{Fault, TestService};
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

/// A registration of `addresses` (round robin) with the mesh retry policy `retry`.
fn registration(
    addresses: &[std::net::SocketAddr],
    retry: serde_json::Value,
) -> ServiceRegistrationSpec {
    serde_json::from_value(json!({
        "endpoints": addresses.iter().map(|a| json!({"address": a.ip().to_string(), "port": a.port()})).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8080}],
        "loadBalancer": {"policy": "RoundRobin"},
        "retry": retry
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
        let retry = json!({"attempts": 3, "retryOn": ["connect-failure", "gateway-error"], "backoff": {"baseInterval": "5ms", "maxInterval": "20ms"}});
        discovery
            .set(snapshot_from_spec("shop", name, &registration(&addrs, retry)).expect("snapshot"));
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
    for (i, status) in statuses.iter().enumerate() {
        assert_eq!(status.phase, SagaPhase::Succeeded, "{status:#?}");
        // The dead orders instance: the mesh moved the call (nothing was sent).
        assert_eq!(
            status.steps[0].action.attempts, 1,
            "connect failures are the mesh's"
        );
        // payment's one 503: an attempt the service saw, so the engine's to retry.
        let charge_attempts = if i == 0 { 2 } else { 1 };
        assert_eq!(
            status.steps[1].action.attempts, charge_attempts,
            "{status:#?}"
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

/// One layer retries: a step whose service always answers 503, under a destination policy that
/// retries 5xx three times, reaches the service exactly as often as the step's own
/// `retry.attempts` (without the rule: 3 × 3 = 9 requests). A compensation likewise.
#[tokio::test]
async fn a_failing_step_reaches_the_service_once_per_engine_attempt() {
    let payment = TestService::start("payment").await.expect("payment");
    let orders = TestService::start("orders").await.expect("orders");
    payment.fault("/charges", Fault::Always(503));
    let discovery = StaticDiscovery::new();
    for (name, addr) in [("payment", payment.addr), ("orders", orders.addr)] {
        let retry = json!({"attempts": 3, "retryOn": ["5xx", "connect-failure"], "backoff": {"baseInterval": "1ms", "maxInterval": "2ms"}});
        let spec = registration(&[addr], retry);
        discovery.set(snapshot_from_spec("shop", name, &spec).expect("snapshot"));
    }
    let client = MeshClient::new(discovery, ClientConfig::default(), Metrics::new());
    let caller = MeshCaller::new(client.clone());
    let spec: SagaSpec = serde_json::from_value(json!({
        "steps": [
            {"name": "create", "action": {"service": "orders", "path": "/orders", "body": {"id": "1"}},
             "compensation": {"service": "orders", "method": "DELETE", "path": "/orders/1"}},
            {"name": "charge", "action": {"service": "payment", "path": "/charges"},
             "retry": {"attempts": 3, "backoff": "1ms", "maxBackoff": "2ms"}}
        ]
    }))
    .expect("spec parses");
    let saga = SagaRef {
        namespace: "shop".into(),
        name: "one-layer".into(),
        uid: "u1".into(),
    };
    let status = tokio::time::timeout(
        Duration::from_secs(30),
        run(
            &saga,
            &spec,
            SagaStatus::default(),
            &Store::default(),
            &caller,
            &EngineConfig::default(),
        ),
    )
    .await
    .expect("finishes")
    .expect("store ok");
    assert_eq!(status.phase, SagaPhase::Compensated, "{status:#?}");
    assert_eq!(status.steps[1].action.attempts, 3);
    let charges = payment
        .log()
        .iter()
        .filter(|r| r.path == "/charges")
        .count();
    assert_eq!(
        charges, 3,
        "one request per engine attempt, none added by the mesh"
    );
    // The mesh's retries of 5xx still apply to every other caller.
    let metrics = client.metrics().encode();
    assert!(
        !metrics.lines().any(|l| l
            .starts_with("sagamesh_retries_total{destination=\"payment.shop\"}")
            && !l.ends_with(" 0")),
        "saga calls were retried by the mesh:\n{metrics}"
    );
}
