//! The local control plane with real HTTP services on 127.0.0.1: manifests picked up live, a bad
//! manifest reported without stopping the others, sagas run to Succeeded and Compensated, and a
//! control plane stopped mid-saga resumes from disk with no effect applied twice.

use std::{path::Path, time::Duration};

use sagamesh_api::saga::SagaPhase;
use sagamesh_local::runner::{LocalControlPlane, LocalOptions};
use sagamesh_mesh::{ClientConfig, metrics::Metrics};
use sagamesh_saga::EngineConfig;
use sagamesh_testing::{
    eventually,
    shop::{Fault, TestService},
};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sagamesh-local-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn registration(name: &str, service: &TestService) -> String {
    format!(
        "apiVersion: sagamesh.io/v1alpha1\nkind: ServiceRegistration\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  endpoints:\n    - address: {}\n      port: {}\n  ports:\n    - name: http\n      port: 8080\n",
        service.addr.ip(),
        service.addr.port()
    )
}

fn saga(name: &str, amount: u32) -> String {
    format!(
        r#"apiVersion: sagamesh.io/v1alpha1
kind: Saga
metadata:
  name: {name}
  namespace: shop
spec:
  input: {{ orderId: "{name}", amount: {amount} }}
  steps:
    - name: create-order
      action: {{ service: orders, path: /orders, body: {{ id: "{{{{ input.orderId }}}}" }} }}
      compensation: {{ service: orders, method: DELETE, path: "/orders/{{{{ input.orderId }}}}" }}
    - name: reserve
      action: {{ service: inventory, path: /reservations }}
      compensation: {{ service: inventory, method: DELETE, path: "/reservations/{{{{ input.orderId }}}}" }}
    - name: charge
      action: {{ service: payment, path: "/charges/{{{{ input.amount }}}}" }}
      retry: {{ attempts: 2, backoff: 10ms }}
"#
    )
}

fn options(manifests: &Path, state: &Path) -> LocalOptions {
    LocalOptions {
        manifests: manifests.to_path_buf(),
        state: state.to_path_buf(),
        poll: Duration::from_millis(50),
        engine: EngineConfig {
            default_backoff: Duration::from_millis(10),
            jitter: false,
            ..EngineConfig::default()
        },
        client: ClientConfig {
            jitter: false,
            ..ClientConfig::default()
        },
    }
}

async fn phase(cp: &LocalControlPlane, name: &str) -> Option<SagaPhase> {
    cp.store()
        .load("shop", name)
        .ok()
        .flatten()
        .map(|r| r.status.phase)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_drive_sagas_and_bad_files_are_reported() {
    let orders = TestService::start("orders").await.expect("orders");
    let inventory = TestService::start("inventory").await.expect("inventory");
    let payment = TestService::start("payment").await.expect("payment");
    payment.fault("/charges/5000", Fault::Always(402));
    let dir = temp_dir("manifests");
    let state = temp_dir("state");
    let registrations = [
        ("orders", &orders),
        ("inventory", &inventory),
        ("payment", &payment),
    ]
    .iter()
    .map(|(n, s)| registration(n, s))
    .collect::<Vec<_>>()
    .join("---\n");
    std::fs::write(dir.join("services.yaml"), registrations).expect("write");
    std::fs::write(dir.join("order-ok.yaml"), saga("ok", 10)).expect("write");
    std::fs::write(dir.join("broken.yaml"), "apiVersion: sagamesh.io/v1alpha1\nkind: Saga\nmetadata:\n  name: broken\nspec:\n  steps:\n    - name: x\n      action:\n        service: orders\n        path: no-slash\n").expect("write");

    let cp =
        LocalControlPlane::new(options(&dir, &state), Vec::new(), Metrics::new()).expect("starts");
    let runner = tokio::spawn(cp.clone().run(std::future::pending()));
    eventually("saga ok to succeed", Duration::from_secs(20), || async {
        (phase(&cp, "ok").await == Some(SagaPhase::Succeeded)).then_some(())
    })
    .await
    .expect("ok succeeds");
    let errors = cp.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .to_string()
            .contains("broken.yaml:10: spec.steps[0].action.path"),
        "{}",
        errors[0]
    );

    // A new manifest is picked up without a restart; payment declines it, so it compensates.
    std::fs::write(dir.join("order-declined.yaml"), saga("declined", 5000)).expect("write");
    eventually(
        "saga declined to compensate",
        Duration::from_secs(20),
        || async { (phase(&cp, "declined").await == Some(SagaPhase::Compensated)).then_some(()) },
    )
    .await
    .expect("declined compensates");
    let record = cp
        .store()
        .load("shop", "declined")
        .expect("load")
        .expect("stored");
    let compensated: Vec<_> = record
        .status
        .history
        .iter()
        .filter(|e| e.kind == "CompensationSucceeded")
        .filter_map(|e| e.step.clone())
        .collect();
    assert_eq!(compensated, ["reserve", "create-order"]);

    // Fixing the broken file clears its error.
    std::fs::remove_file(dir.join("broken.yaml")).expect("remove");
    eventually("errors to clear", Duration::from_secs(10), || async {
        cp.errors().is_empty().then_some(())
    })
    .await
    .expect("cleared");
    runner.abort();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_stopped_mid_saga_resumes_from_disk() {
    let orders = TestService::start("orders").await.expect("orders");
    let inventory = TestService::start("inventory").await.expect("inventory");
    let payment = TestService::start("payment").await.expect("payment");
    inventory.fault("/reservations", Fault::Delay(Duration::from_millis(800)));
    let dir = temp_dir("resume-manifests");
    let state = temp_dir("resume-state");
    let registrations = [
        ("orders", &orders),
        ("inventory", &inventory),
        ("payment", &payment),
    ]
    .iter()
    .map(|(n, s)| registration(n, s))
    .collect::<Vec<_>>()
    .join("---\n");
    std::fs::write(dir.join("services.yaml"), registrations).expect("write");
    std::fs::write(dir.join("order.yaml"), saga("slow", 10)).expect("write");

    let cp =
        LocalControlPlane::new(options(&dir, &state), Vec::new(), Metrics::new()).expect("starts");
    let runner = tokio::spawn(cp.clone().run(std::future::pending()));
    eventually(
        "the saga to be in its slow step",
        Duration::from_secs(20),
        || async {
            let record = cp.store().load("shop", "slow").ok().flatten()?;
            (record.status.current_step.as_deref() == Some("reserve")).then_some(())
        },
    )
    .await
    .expect("reaches reserve");
    runner.abort();
    let _ = runner.await;
    drop(cp);
    // The manifest is even gone: the stored spec is enough to finish.
    std::fs::remove_file(dir.join("order.yaml")).expect("remove");

    let cp = LocalControlPlane::new(options(&dir, &state), Vec::new(), Metrics::new())
        .expect("restarts");
    let runner = tokio::spawn(cp.clone().run(std::future::pending()));
    eventually(
        "the resumed saga to succeed",
        Duration::from_secs(20),
        || async { (phase(&cp, "slow").await == Some(SagaPhase::Succeeded)).then_some(()) },
    )
    .await
    .expect("resumes");
    runner.abort();
    for service in [&orders, &inventory, &payment] {
        for (key, count) in service.effects() {
            assert_eq!(count, 1, "{}: {key} applied {count} times", service.name);
        }
    }
    assert_eq!(inventory.effects().len(), 1);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&state);
}
