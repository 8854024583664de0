//! The saga controller on the real API server (test bed) with real HTTP services on 127.0.0.1:
//! leader gating, success, compensation with Events, a controller killed mid-saga and
//! restarted, two controllers racing (split brain) without double effects, and deletion held
//! by the finalizer until the saga is terminal.

mod common;

use std::{sync::Arc, time::Duration};

use anyhow::{Context, ensure};
use common::{DirectCaller, Fault, TestService};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams},
    runtime::events::Reporter,
};
use sagamesh_api::saga::{Saga, SagaPhase};
use sagamesh_saga::{
    EngineConfig,
    kubernetes::{KubeSagaStore, SagaController},
};
use sagamesh_testing::{eventually, test_bed};
use serde_json::json;
use tokio::{sync::watch, task::JoinHandle};

struct Shop {
    orders: TestService,
    inventory: TestService,
    payment: TestService,
    caller: Arc<DirectCaller>,
}

async fn shop() -> anyhow::Result<Shop> {
    let orders = TestService::start("orders").await?;
    let inventory = TestService::start("inventory").await?;
    let payment = TestService::start("payment").await?;
    let caller = Arc::new(DirectCaller::new(&[&orders, &inventory, &payment]));
    Ok(Shop {
        orders,
        inventory,
        payment,
        caller,
    })
}

fn order(name: &str, amount: f64) -> anyhow::Result<Saga> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "sagamesh.io/v1alpha1",
        "kind": "Saga",
        "metadata": { "name": name },
        "spec": {
            "input": { "orderId": name, "amount": amount },
            "steps": [
                { "name": "create-order",
                  "action": { "service": "orders", "path": "/orders", "body": { "id": "{{ input.orderId }}" } },
                  "compensation": { "service": "orders", "method": "DELETE", "path": "/orders/{{ input.orderId }}" } },
                { "name": "reserve",
                  "action": { "service": "inventory", "path": "/reservations", "body": { "order": "{{ input.orderId }}" } },
                  "compensation": { "service": "inventory", "method": "DELETE", "path": "/reservations/{{ input.orderId }}" } },
                { "name": "charge",
                  "action": { "service": "payment", "path": "/charges/{{ input.amount }}" },
                  "compensation": { "service": "payment", "path": "/refunds/{{ input.orderId }}" },
                  "retry": { "attempts": 20, "backoff": "10ms" } }
            ]
        }
    }))?)
}

fn start_controller(
    client: &Client,
    ns: &str,
    caller: Arc<DirectCaller>,
    leader: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let store = KubeSagaStore::new(
        client.clone(),
        Reporter {
            controller: "sagamesh-test".into(),
            instance: None,
        },
        None,
    );
    let controller = SagaController {
        client: client.clone(),
        caller,
        config: EngineConfig {
            default_backoff: Duration::from_millis(10),
            // Every kill of a controller re-sends the call in flight as a new attempt.
            default_attempts: 20,
            jitter: false,
            ..EngineConfig::default()
        },
        store,
        leader,
        namespace: Some(ns.to_string()),
    };
    tokio::spawn(controller.run(std::future::pending()))
}

async fn phase_of(api: &Api<Saga>, name: &str) -> Option<SagaPhase> {
    api.get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|s| s.status)
        .map(|s| s.phase)
}

async fn wait_phase(api: &Api<Saga>, name: &str, phase: SagaPhase) -> anyhow::Result<()> {
    eventually(
        &format!("{name} to be {phase:?}"),
        Duration::from_secs(60),
        || async { (phase_of(api, name).await == Some(phase)).then_some(()) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_runs_sagas_to_success_and_compensation() {
    let Some(bed) = test_bed("only_the_leader_runs_sagas_to_success_and_compensation").await else {
        return;
    };
    bed.install_crds().await.expect("CRDs install");
    bed.with_namespace("saga-controller", |client, ns| async move {
        let shop = shop().await?;
        shop.payment.fault("/charges/5000", Fault::Always(402));
        let api: Api<Saga> = Api::namespaced(client.clone(), &ns);
        let (leader_tx, leader_rx) = watch::channel(false);
        let controller = start_controller(&client, &ns, shop.caller.clone(), leader_rx);
        api.create(&PostParams::default(), &order("ok", 10.0)?)
            .await?;
        api.create(&PostParams::default(), &order("declined", 5000.0)?)
            .await?;

        // Not the leader: nothing runs.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        ensure!(
            phase_of(&api, "ok").await.is_none(),
            "a follower must not run sagas"
        );
        ensure!(shop.orders.log().is_empty());

        leader_tx.send(true)?;
        wait_phase(&api, "ok", SagaPhase::Succeeded).await?;
        wait_phase(&api, "declined", SagaPhase::Compensated).await?;
        let declined = api.get("declined").await?;
        let status = declined.status.context("status")?;
        let kinds: Vec<_> = status
            .history
            .iter()
            .map(|e| format!("{}:{}", e.kind, e.step.clone().unwrap_or_default()))
            .collect();
        let reserve = kinds
            .iter()
            .position(|k| k == "CompensationSucceeded:reserve");
        let create = kinds
            .iter()
            .position(|k| k == "CompensationSucceeded:create-order");
        ensure!(
            reserve.is_some() && reserve < create,
            "reverse order: {kinds:?}"
        );
        ensure!(
            declined
                .metadata
                .finalizers
                .unwrap_or_default()
                .contains(&"sagamesh.io/saga".to_string())
        );
        ensure!(status.observed_generation == declined.metadata.generation);

        // Events tell the story.
        let events: Api<KubeEvent> = Api::namespaced(client.clone(), &ns);
        let reasons = eventually("Events for the sagas", Duration::from_secs(10), || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            let reasons: Vec<String> = list.items.iter().filter_map(|e| e.reason.clone()).collect();
            (reasons.iter().any(|r| r == "Compensated") && reasons.iter().any(|r| r == "Succeeded"))
                .then_some(reasons)
        })
        .await?;
        ensure!(reasons.iter().any(|r| r == "StepFailed"), "{reasons:?}");

        // Deleting a terminal saga releases its finalizer.
        api.delete("ok", &DeleteParams::default()).await?;
        eventually(
            "the deleted saga to go",
            Duration::from_secs(15),
            || async {
                api.get_opt("ok")
                    .await
                    .ok()
                    .flatten()
                    .is_none()
                    .then_some(())
            },
        )
        .await?;
        controller.abort();
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_saga_resumes_and_racing_controllers_apply_each_effect_once() {
    let Some(bed) = test_bed("a_controller_killed_mid_saga_resumes").await else {
        return;
    };
    bed.install_crds().await.expect("CRDs install");
    bed.with_namespace("saga-crash", |client, ns| async move {
        let shop = shop().await?;
        // Slow steps, so kills land mid-saga.
        shop.inventory
            .fault("/reservations", Fault::Delay(Duration::from_millis(150)));
        shop.orders
            .fault("/orders", Fault::Delay(Duration::from_millis(50)));
        let api: Api<Saga> = Api::namespaced(client.clone(), &ns);
        let names: Vec<String> = (0..10).map(|i| format!("o{i}")).collect();
        for name in &names {
            api.create(&PostParams::default(), &order(name, 10.0)?)
                .await?;
        }
        let (_leader_tx, leader_rx) = watch::channel(true);
        // Kill and restart the controller several times.
        for round in 0..6u64 {
            let controller = start_controller(&client, &ns, shop.caller.clone(), leader_rx.clone());
            tokio::time::sleep(Duration::from_millis(200 + 70 * round)).await;
            controller.abort();
            let _ = controller.await;
        }
        // Then two controllers at once, both believing they lead: the resourceVersion guard
        // lets only one advance each saga.
        let a = start_controller(&client, &ns, shop.caller.clone(), leader_rx.clone());
        let b = start_controller(&client, &ns, shop.caller.clone(), leader_rx.clone());
        for name in &names {
            wait_phase(&api, name, SagaPhase::Succeeded).await?;
        }
        a.abort();
        b.abort();
        for service in [&shop.orders, &shop.inventory, &shop.payment] {
            let effects = service.effects();
            ensure!(
                effects.len() == names.len(),
                "{}: {} effects for {} sagas",
                service.name,
                effects.len(),
                names.len()
            );
            for (key, count) in effects {
                ensure!(count == 1, "{}: {key} applied {count} times", service.name);
            }
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_running_saga_waits_for_it_to_finish() {
    let Some(bed) = test_bed("deleting_a_running_saga_waits_for_it_to_finish").await else {
        return;
    };
    bed.install_crds().await.expect("CRDs install");
    bed.with_namespace("saga-delete", |client, ns| async move {
        let shop = shop().await?;
        shop.inventory
            .fault("/reservations", Fault::Delay(Duration::from_millis(1500)));
        let api: Api<Saga> = Api::namespaced(client.clone(), &ns);
        let (_leader_tx, leader_rx) = watch::channel(true);
        let controller = start_controller(&client, &ns, shop.caller.clone(), leader_rx);
        api.create(&PostParams::default(), &order("slow", 10.0)?)
            .await?;
        eventually(
            "the saga to reach the slow step",
            Duration::from_secs(15),
            || async {
                let saga = api.get("slow").await.ok()?;
                (saga.status?.current_step.as_deref() == Some("reserve")).then_some(())
            },
        )
        .await?;
        api.delete("slow", &DeleteParams::default()).await?;
        // Still there (finalizer), still running.
        let saga = api.get("slow").await?;
        ensure!(saga.metadata.deletion_timestamp.is_some());
        eventually(
            "the saga to finish and go",
            Duration::from_secs(30),
            || async {
                api.get_opt("slow")
                    .await
                    .ok()
                    .flatten()
                    .is_none()
                    .then_some(())
            },
        )
        .await?;
        ensure!(
            shop.payment.effects().len() == 1,
            "the saga ran to its end before the object went"
        );
        controller.abort();
        Ok(())
    })
    .await;
}
