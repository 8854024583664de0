//! The saga controller on the real API server (test bed) with real HTTP services on 127.0.0.1:
//! leader gating, success, compensation with Events, a controller killed mid-saga and
//! restarted, two controllers racing (split brain) without double effects, and deletion held
//! by the finalizer until the saga is terminal; and a controller whose watch lags (older copies
//! of sagas it already finished arriving late) making no status write for them.

use std::{
    future::Future,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use anyhow::{Context, ensure};
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, StreamBody, combinators::UnsyncBoxBody};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams},
    client::{Body, ClientBuilder},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::events::Reporter,
};
use sagamesh_api::saga::{Saga, SagaPhase};
use sagamesh_saga::EngineConfig;
use sagamesh_saga_kube::{KubeSagaStore, SagaController};
use sagamesh_testing::saga::{DirectCaller, Fault, TestService};
use sagamesh_testing::{eventually, test_bed};
use serde_json::json;
use tokio::{sync::watch, task::JoinHandle};
use tower::{Layer, Service};

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

fn new_store(client: &Client) -> KubeSagaStore {
    KubeSagaStore::new(
        client.clone(),
        Reporter {
            controller: "sagamesh-test".into(),
            instance: None,
        },
        None,
    )
}

fn start_controller(
    client: &Client,
    ns: &str,
    caller: Arc<DirectCaller>,
    leader: watch::Receiver<bool>,
) -> JoinHandle<()> {
    start_controller_with(client, ns, caller, leader, new_store(client))
}

fn start_controller_with(
    client: &Client,
    ns: &str,
    caller: Arc<DirectCaller>,
    leader: watch::Receiver<bool>,
    store: KubeSagaStore,
) -> JoinHandle<()> {
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

// ---------------------------------------------------------------------------------------------
// Late watch events: the controller's client counts its requests (as the saga benchmark does)
// and hands every watch response's data to the controller `lag` after it arrived, so the
// controller's cache is always behind the saga's own writes, as on a busy API server.

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type LaggedBody = UnsyncBoxBody<Bytes, BoxError>;

#[derive(Clone, Debug, Default)]
struct Counts {
    /// `PUT .../sagas/NAME/status`, any answer.
    status_puts: u64,
    /// Of those, refused with 409 Conflict.
    status_conflicts: u64,
    /// `GET .../sagas/NAME` (not a list, not a watch).
    saga_gets: u64,
    /// `PATCH .../sagas/NAME` (the finalizer), any answer.
    finalizer_patches: u64,
    /// Chunks of watch data handed over late.
    watch_chunks_delayed: u64,
}

#[derive(Clone)]
struct LaggingWatch {
    counts: Arc<Mutex<Counts>>,
    lag: Duration,
}

impl LaggingWatch {
    fn counts(&self) -> Counts {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl<S> Layer<S> for LaggingWatch {
    type Service = Lagging<S>;
    fn layer(&self, inner: S) -> Lagging<S> {
        Lagging {
            inner,
            layer: self.clone(),
        }
    }
}

struct Lagging<S> {
    inner: S,
    layer: LaggingWatch,
}

impl<S, B> Service<Request<Body>> for Lagging<S>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<LaggedBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<LaggedBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let path = req.uri().path().to_string();
        let watch = req.uri().query().is_some_and(|q| q.contains("watch=true"));
        let one_saga = path.contains("/sagas/");
        let method = req.method().clone();
        let layer = self.layer.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            if let Ok(mut counts) = layer.counts.lock() {
                if method == Method::PUT && one_saga && path.ends_with("/status") {
                    counts.status_puts += 1;
                    if response.status().as_u16() == 409 {
                        counts.status_conflicts += 1;
                    }
                } else if method == Method::GET && one_saga && !watch {
                    counts.saga_gets += 1;
                } else if method == Method::PATCH && one_saga {
                    counts.finalizer_patches += 1;
                }
            }
            Ok(if watch {
                response.map(|body| lagging_body(body, layer))
            } else {
                response.map(|body| body.map_err(Into::into).boxed_unsync())
            })
        })
    }
}

/// `body`'s frames, each handed over `lag` after it arrived (in order).
fn lagging_body<B>(body: B, layer: LaggingWatch) -> LaggedBody
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let lag = layer.lag;
    tokio::spawn(async move {
        let mut body = std::pin::pin!(body);
        while let Some(frame) = body.frame().await {
            if let Ok(mut counts) = layer.counts.lock() {
                counts.watch_chunks_delayed += 1;
            }
            let due = tokio::time::Instant::now() + lag;
            if tx.send((due, frame.map_err(Into::into))).is_err() {
                return;
            }
        }
    });
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        let (due, frame) = rx.recv().await?;
        tokio::time::sleep_until(due).await;
        Some((frame, rx))
    });
    StreamBody::new(Box::pin(frames)).boxed_unsync()
}

async fn lagging_client(kubeconfig: &Path, layer: &LaggingWatch) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(ClientBuilder::try_from(config)?.with_layer(layer).build())
}

/// Status writes of the `order` saga: `Started`, then `CallStarted` and `CallSucceeded` for
/// each of its 3 steps.
const WRITES_SUCCEEDED: u64 = 1 + 2 * 3;
/// Declined at `charge` (402, not retried): `Started`, 2 steps done (4), `charge` started and
/// failed (2), then `reserve` and `create-order` compensated (4).
const WRITES_COMPENSATED: u64 = 1 + 4 + 2 + 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_watch_events_after_a_saga_finished_cost_no_status_write() {
    let Some(bed) = test_bed("late_watch_events_after_a_saga_finished_cost_no_status_write").await
    else {
        return;
    };
    bed.install_crds().await.expect("CRDs install");
    let kubeconfig = bed.kubeconfig.clone();
    bed.with_namespace("saga-late-watch", |client, ns| async move {
        let shop = shop().await?;
        shop.payment.fault("/charges/5000", Fault::Always(402));
        let api: Api<Saga> = Api::namespaced(client.clone(), &ns);
        // Every version of every saga reaches the controller 1 s after it was written: a saga
        // runs to its end (a few tens of ms here) long before the watch brings its first
        // versions, which then arrive one by one, all older than the last write.
        let lag = Duration::from_secs(1);
        let layer = LaggingWatch {
            counts: Arc::default(),
            lag,
        };
        let lagging = lagging_client(&kubeconfig, &layer).await?;
        let store = new_store(&lagging);
        let (_leader_tx, leader_rx) = watch::channel(true);
        let controller =
            start_controller_with(&lagging, &ns, shop.caller.clone(), leader_rx, store.clone());
        let ok: Vec<String> = (0..6).map(|i| format!("ok{i}")).collect();
        let declined: Vec<String> = (0..2).map(|i| format!("declined{i}")).collect();
        for name in &ok {
            api.create(&PostParams::default(), &order(name, 10.0)?)
                .await?;
        }
        for name in &declined {
            api.create(&PostParams::default(), &order(name, 5000.0)?)
                .await?;
        }
        for name in &ok {
            wait_phase(&api, name, SagaPhase::Succeeded).await?;
        }
        for name in &declined {
            wait_phase(&api, name, SagaPhase::Compensated).await?;
        }
        // Every older version the watch still holds arrives and is reconciled meanwhile.
        tokio::time::sleep(lag * 4).await;
        let counts = layer.counts();
        ensure!(
            counts.watch_chunks_delayed > 0,
            "the watch was not delayed: {counts:?}"
        );
        ensure!(
            counts.status_conflicts == 0,
            "status PUTs refused (409) after the sagas finished: {counts:?}"
        );
        let expected =
            ok.len() as u64 * WRITES_SUCCEEDED + declined.len() as u64 * WRITES_COMPENSATED;
        ensure!(
            counts.status_puts == expected,
            "{} status PUTs for {expected} transitions: {counts:?}",
            counts.status_puts
        );
        ensure!(counts.saga_gets == 0, "no GET without a 409: {counts:?}");
        for service in [&shop.orders, &shop.inventory, &shop.payment] {
            let log = service.log();
            let keys: std::collections::HashSet<_> = log.iter().map(|r| r.key.clone()).collect();
            ensure!(
                keys.len() == log.len(),
                "{}: a call was sent twice: {} requests, {} keys",
                service.name,
                log.len(),
                keys.len()
            );
        }

        // Deleting them releases the finalizers, and the store forgets them.
        for name in ok.iter().chain(&declined) {
            api.delete(name, &DeleteParams::default()).await?;
        }
        eventually("the sagas to go", Duration::from_secs(30), || async {
            let list = api.list(&ListParams::default()).await.ok()?;
            list.items.is_empty().then_some(())
        })
        .await?;
        eventually(
            "the store to forget the deleted sagas",
            Duration::from_secs(10),
            || async { (store.tracked() == 0).then_some(()) },
        )
        .await?;
        tokio::time::sleep(lag * 2).await;
        let after = layer.counts();
        ensure!(
            after.status_puts == counts.status_puts,
            "status PUTs after deletion: {after:?}"
        );
        ensure!(
            after.finalizer_patches == 2 * (ok.len() + declined.len()) as u64,
            "one finalizer PATCH to add and one to release per saga: {after:?}"
        );
        controller.abort();
        Ok(())
    })
    .await;
}
