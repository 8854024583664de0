//! Saga throughput (a benchmark, not a test): how many 4-step sagas per second complete, with
//! every step a real HTTP call to a test service on 127.0.0.1, and how many status writes each
//! saga costs — side by side in one run, with the status kept
//!
//! - in memory (the engine alone),
//! - in local mode's fsynced file store,
//! - on Kubernetes: `Saga` objects created in a fresh namespace of the test bed (kube-apiserver +
//!   etcd) and run by the operator's own `SagaController` and `KubeSagaStore`; every status write
//!   is a `PUT .../status` guarded by `resourceVersion`. The controller's client counts the
//!   requests it sends, and the API server's `apiserver_request_total` is read before and after;
//!   latency is from the create request to a watcher seeing `Succeeded`.
//!
//! `cargo bench -p sagamesh-saga --bench sagas` (release build). Knobs (environment):
//! `SAGAS` (memory rounds, default 2000; the file rounds run a quarter), `KUBE_SAGAS` (default
//! 200), `ROUNDS` (default 2), `KUBE_TIMEOUT_SECS` (per Kubernetes round, default 300).
//! The Kubernetes rounds need `scripts/testbed.sh up` and `eval "$(scripts/testbed.sh env)"`;
//! without it they print SKIP and the other rounds still run.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context as TaskContext, Poll},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use http::{Method, Request, Response, Uri};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    client::{Body, ClientBuilder},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{events::Reporter, watcher},
};
use prometheus_client::registry::Registry;
use sagamesh_api::saga::{Saga, SagaPhase, SagaSpec, SagaStatus};
use sagamesh_saga::{
    EngineConfig, Event, SagaRef, SagaStore, StoreError,
    file_store::FileStore,
    kubernetes::{KubeSagaStore, SagaController, SagaMetrics},
    run,
};
use sagamesh_testing::{TestBed, test_bed};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tower::{Layer, Service};

// The tests' direct caller: plain HTTP to the test services (the mesh client's own cost is in
// the proxy benchmark).
#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)] // the re-exported Fault is for the tests
mod common;
use common::{DirectCaller as Direct, TestService};

const SERVICES: [&str; 4] = ["orders", "inventory", "payment", "shipping"];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The saga: 4 steps, each a POST to one of the 4 services with a templated body, each with a
/// compensation (never needed here: every step succeeds).
fn spec_json(order_id: &str) -> Value {
    json!({
        "input": { "orderId": order_id, "amount": 10 },
        "steps": [
            { "name": "create-order",
              "action": { "service": "orders", "path": "/orders", "body": { "id": "{{ input.orderId }}" } },
              "compensation": { "service": "orders", "method": "DELETE", "path": "/orders/{{ input.orderId }}" } },
            { "name": "reserve",
              "action": { "service": "inventory", "path": "/reservations", "body": { "order": "{{ input.orderId }}" } },
              "compensation": { "service": "inventory", "method": "DELETE", "path": "/reservations/{{ input.orderId }}" } },
            { "name": "charge",
              "action": { "service": "payment", "path": "/charges/{{ input.amount }}" },
              "compensation": { "service": "payment", "path": "/refunds/{{ input.orderId }}" } },
            { "name": "ship",
              "action": { "service": "shipping", "path": "/shipments", "body": { "order": "{{ input.orderId }}" } },
              "compensation": { "service": "shipping", "method": "DELETE", "path": "/shipments/{{ input.orderId }}" } }
        ]
    })
}

fn spec() -> SagaSpec {
    serde_json::from_value(spec_json("1")).expect("the benchmark's saga spec parses")
}

fn saga_object(name: &str) -> Saga {
    let mut object = json!({
        "apiVersion": "sagamesh.io/v1alpha1",
        "kind": "Saga",
        "metadata": { "name": name },
    });
    object["spec"] = spec_json(name);
    serde_json::from_value(object).expect("the benchmark's Saga object parses")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One round's figures, one table row.
struct Row {
    store: String,
    sagas: usize,
    concurrent: String,
    succeeded: usize,
    elapsed: Duration,
    writes: u64,
    latencies: Vec<Duration>,
}

impl Row {
    fn print(mut self) {
        self.latencies.sort();
        let rate = self.succeeded as f64 / self.elapsed.as_secs_f64();
        let writes = self.writes as f64 / self.sagas.max(1) as f64;
        println!(
            "| {} | {} | {} | {} | {:.1} | {rate:.0} | {writes:.2} | {:.1} | {:.1} | {:.1} |",
            self.store,
            self.sagas,
            self.concurrent,
            self.succeeded,
            self.elapsed.as_secs_f64(),
            ms(percentile(&self.latencies, 0.5)),
            ms(percentile(&self.latencies, 0.99)),
            ms(self.latencies.last().copied().unwrap_or_default()),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Memory and file stores, driven by the engine directly.

#[derive(Clone, Default)]
struct MemoryStore(Arc<Mutex<HashMap<String, SagaStatus>>>);

impl SagaStore for MemoryStore {
    async fn save(&self, saga: &SagaRef, status: &SagaStatus, _: &Event) -> Result<(), StoreError> {
        self.0
            .lock()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .insert(saga.name.clone(), status.clone());
        Ok(())
    }
}

/// Counts the writes of another store.
#[derive(Clone)]
struct Counted<S> {
    inner: S,
    writes: Arc<AtomicU64>,
}

impl<S: SagaStore> SagaStore for Counted<S> {
    async fn save(
        &self,
        saga: &SagaRef,
        status: &SagaStatus,
        event: &Event,
    ) -> Result<(), StoreError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.save(saga, status, event).await
    }
}

async fn measure<S: SagaStore + Clone + 'static>(
    label: &str,
    store: S,
    caller: Direct,
    count: usize,
    concurrency: usize,
    make_ref: impl Fn(usize) -> SagaRef,
) -> Row {
    let store = Counted {
        inner: store,
        writes: Arc::default(),
    };
    let spec = Arc::new(spec());
    let refs: Arc<Vec<SagaRef>> = Arc::new((0..count).map(make_ref).collect());
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (store, caller, spec, next, refs) = (
            store.clone(),
            caller.clone(),
            spec.clone(),
            next.clone(),
            refs.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= refs.len() {
                    return latencies;
                }
                let config = EngineConfig {
                    jitter: false,
                    ..EngineConfig::default()
                };
                let started = Instant::now();
                if let Ok(status) = run(
                    &refs[i],
                    &spec,
                    SagaStatus::default(),
                    &store,
                    &caller,
                    &config,
                )
                .await
                    && status.phase == SagaPhase::Succeeded
                {
                    latencies.push(started.elapsed());
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.unwrap_or_default());
    }
    Row {
        store: label.to_string(),
        sagas: count,
        concurrent: concurrency.to_string(),
        succeeded: latencies.len(),
        elapsed: start.elapsed(),
        writes: store.writes.load(Ordering::Relaxed),
        latencies,
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes: counting what the controller's client sends.

/// Requests sent by the controller's client, by (kind, HTTP status or "error"), and the
/// latency of every status PUT.
#[derive(Clone, Default)]
struct ApiCounts(Arc<Mutex<ApiTally>>);

#[derive(Clone, Default)]
struct ApiTally {
    requests: BTreeMap<(&'static str, String), u64>,
    status_put: Vec<Duration>,
}

impl ApiCounts {
    fn snapshot(&self) -> ApiTally {
        self.0.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

impl ApiTally {
    /// Requests of `kind` (any outcome) since `before`.
    fn since(&self, before: &ApiTally, kind: &str) -> u64 {
        let sum = |t: &ApiTally| -> u64 {
            t.requests
                .iter()
                .filter(|((k, _), _)| *k == kind)
                .map(|(_, n)| n)
                .sum()
        };
        sum(self) - sum(before)
    }

    /// Every (kind, outcome) count since `before`, as text.
    fn describe_since(&self, before: &ApiTally) -> String {
        self.requests
            .iter()
            .filter_map(|(key, n)| {
                let n = n - before.requests.get(key).copied().unwrap_or(0);
                (n > 0).then(|| format!("{} → {}: {n}", key.0, key.1))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn classify(method: &Method, uri: &Uri) -> &'static str {
    let path = uri.path();
    let watch = uri.query().is_some_and(|q| q.contains("watch=true"));
    let saga = path.contains("/sagas");
    let events = path.contains("/events");
    match *method {
        Method::PUT if saga && path.ends_with("/status") => "PUT saga status",
        Method::PATCH if saga => "PATCH saga (finalizer)",
        Method::POST if events => "POST Event",
        Method::PATCH if events => "PATCH Event",
        Method::GET if watch => "GET watch",
        Method::GET => "GET list/get",
        _ => "other",
    }
}

impl<S> Layer<S> for ApiCounts {
    type Service = Counting<S>;
    fn layer(&self, inner: S) -> Counting<S> {
        Counting {
            inner,
            counts: self.clone(),
        }
    }
}

struct Counting<S> {
    inner: S,
    counts: ApiCounts,
}

type BoxedResponse<B, E> = Pin<Box<dyn Future<Output = Result<Response<B>, E>> + Send>>;

impl<S, B> Service<Request<Body>> for Counting<S>
where
    S: Service<Request<Body>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = BoxedResponse<B, S::Error>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let kind = classify(req.method(), req.uri());
        let counts = self.counts.clone();
        let started = Instant::now();
        let response = self.inner.call(req);
        Box::pin(async move {
            let result = response.await;
            let outcome = match &result {
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => "error".to_string(),
            };
            if let Ok(mut tally) = counts.0.lock() {
                *tally.requests.entry((kind, outcome)).or_default() += 1;
                if kind == "PUT saga status" {
                    tally.status_put.push(started.elapsed());
                }
            }
            result
        })
    }
}

/// A client like the operator's (kube's default stack, with its retry of 429/503/504) whose
/// requests are counted.
async fn counting_client(
    kubeconfig: &std::path::Path,
    counts: &ApiCounts,
) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(ClientBuilder::try_from(config)?.with_layer(counts).build())
}

/// The API server's own count of `PUT sagas/status`, by HTTP code, from `/metrics`.
async fn server_status_puts(client: &Client) -> anyhow::Result<BTreeMap<String, u64>> {
    let request = Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| {
        l.starts_with("apiserver_request_total{")
            && l.contains("resource=\"sagas\"")
            && l.contains("subresource=\"status\"")
            && l.contains("verb=\"PUT\"")
    }) {
        let code = line
            .split("code=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("?");
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(code.to_string()).or_default() += value as u64;
    }
    Ok(out)
}

/// Sum of the saga module's own `saga_events_total` (one per status write that succeeded).
fn saga_events_total(registry: &Registry) -> u64 {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, registry).is_err() {
        return 0;
    }
    text.lines()
        .filter(|l| l.starts_with("saga_events_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// What one Kubernetes round measured.
struct KubeRound {
    row: Row,
    notes: Vec<String>,
}

/// Watches the namespace's Sagas and reports (name, phase, when) the first time each is seen
/// terminal; `ready` fires once the initial list is done.
fn watch_terminal(
    api: Api<Saga>,
    ready: oneshot::Sender<()>,
    seen: mpsc::UnboundedSender<(String, SagaPhase, Instant)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ready = Some(ready);
        let mut done = std::collections::HashSet::new();
        let mut stream = watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = stream.next().await {
            let saga = match event {
                Ok(watcher::Event::InitDone) => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                    continue;
                }
                Ok(watcher::Event::Apply(saga) | watcher::Event::InitApply(saga)) => saga,
                Ok(_) => continue,
                Err(e) => {
                    eprintln!("bench watcher: {e}");
                    continue;
                }
            };
            let now = Instant::now();
            let phase = saga.status.as_ref().map(|s| s.phase).unwrap_or_default();
            if phase.is_terminal()
                && done.insert(saga.name_any())
                && seen.send((saga.name_any(), phase, now)).is_err()
            {
                return;
            }
        }
    })
}

async fn kube_round(
    client: Client,
    ns: String,
    kubeconfig: std::path::PathBuf,
    caller: Arc<Direct>,
    count: usize,
    create_concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<KubeRound> {
    // The controller, exactly as the operator builds it (EngineConfig::default(), metrics on),
    // leading from the start, limited to the fresh namespace.
    let counts = ApiCounts::default();
    let controller_client = counting_client(&kubeconfig, &counts).await?;
    let mut registry = Registry::default();
    let metrics = SagaMetrics::new(&mut registry);
    let store = KubeSagaStore::new(
        controller_client.clone(),
        Reporter {
            controller: "sagamesh-bench".into(),
            instance: None,
        },
        Some(metrics),
    );
    let (_leader_tx, leader_rx) = watch::channel(true);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let controller = tokio::spawn(
        SagaController {
            client: controller_client,
            caller,
            config: EngineConfig::default(),
            store,
            leader: leader_rx,
            namespace: Some(ns.clone()),
        }
        .run(async move {
            let _ = stop_rx.await;
        }),
    );

    let api: Api<Saga> = Api::namespaced(client.clone(), &ns);
    let (ready_tx, ready_rx) = oneshot::channel();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let watcher_task = watch_terminal(api.clone(), ready_tx, seen_tx);
    tokio::time::timeout(Duration::from_secs(30), ready_rx)
        .await
        .context("the bench's watcher did not list the namespace within 30s")??;

    let outcome = async {
        // Warm-up: one saga through the whole path (connections, caches), not counted.
        api.create(&PostParams::default(), &saga_object("warmup"))
            .await?;
        match tokio::time::timeout(Duration::from_secs(60), seen_rx.recv()).await {
            Ok(Some((_, SagaPhase::Succeeded, _))) => {}
            other => bail!("the warm-up saga did not succeed within 60s: {other:?}"),
        }
        // Let the controller's follow-up reconciles of the warm-up settle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = counts.snapshot();
        let events_before = saga_events_total(&registry);
        let server_before = server_status_puts(&client).await?;

        let start = Instant::now();
        let created: HashMap<String, Instant> = futures::stream::iter(0..count)
            .map(|i| {
                let api = api.clone();
                async move {
                    let name = format!("s-{i:05}");
                    let sent = Instant::now();
                    api.create(&PostParams::default(), &saga_object(&name))
                        .await
                        .with_context(|| format!("creating {name}"))?;
                    anyhow::Ok((name, sent))
                }
            })
            .buffer_unordered(create_concurrency)
            .try_collect()
            .await?;
        let all_created = start.elapsed();

        let deadline = tokio::time::Instant::now() + timeout;
        let mut finished: HashMap<String, (SagaPhase, Instant)> = HashMap::new();
        while finished.len() < count {
            match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
                Ok(Some((name, phase, when))) => {
                    finished.insert(name, (phase, when));
                }
                Ok(None) => bail!("the bench's watcher stopped"),
                Err(_) => bail!(
                    "only {} of {count} sagas terminal after {timeout:?}",
                    finished.len()
                ),
            }
        }
        let last = finished.values().map(|(_, t)| *t).max().unwrap_or(start);
        let elapsed = last.duration_since(start);
        // Late reconciles of the finished sagas (the controller's own watch events) settle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = counts.snapshot();
        let events_after = saga_events_total(&registry);
        let server_after = server_status_puts(&client).await?;

        let mut latencies = Vec::new();
        let mut succeeded = 0;
        for (name, (phase, when)) in &finished {
            if *phase == SagaPhase::Succeeded {
                succeeded += 1;
                if let Some(sent) = created.get(name) {
                    latencies.push(when.duration_since(*sent));
                }
            }
        }
        let puts = after.since(&before, "PUT saga status");
        let per = |n: u64| n as f64 / count as f64;
        let mut put_latency: Vec<Duration> = after.status_put[before.status_put.len()..].to_vec();
        put_latency.sort();
        let server: Vec<String> = server_after
            .iter()
            .map(|(code, n)| {
                format!(
                    "{code}: {}",
                    n - server_before.get(code).copied().unwrap_or(0)
                )
            })
            .collect();
        let notes = vec![
            format!(
                "{count} Saga objects created in {:.2} s ({create_concurrency} creates in flight); \
                 first create to last Succeeded {:.2} s",
                all_created.as_secs_f64(),
                elapsed.as_secs_f64()
            ),
            format!(
                "status PUTs per saga: {:.2} sent by the controller's client, {:.2} recorded \
                 (saga_events_total), API server's apiserver_request_total PUT sagas/status by \
                 code: {}",
                per(puts),
                per(events_after - events_before),
                server.join(", ")
            ),
            format!(
                "other requests per saga: finalizer PATCH {:.2}, Event POST {:.2}, Event PATCH {:.2}",
                per(after.since(&before, "PATCH saga (finalizer)")),
                per(after.since(&before, "POST Event")),
                per(after.since(&before, "PATCH Event")),
            ),
            format!(
                "PUT status latency as the controller saw it: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
                 ({} PUTs)",
                ms(percentile(&put_latency, 0.5)),
                ms(percentile(&put_latency, 0.99)),
                ms(put_latency.last().copied().unwrap_or_default()),
                put_latency.len()
            ),
            format!(
                "all controller requests in the round: {}",
                after.describe_since(&before)
            ),
        ];
        anyhow::Ok(KubeRound {
            row: Row {
                store: "Kubernetes (PUT status)".into(),
                sagas: count,
                concurrent: format!("{count} (all)"),
                succeeded,
                elapsed,
                writes: puts,
                latencies,
            },
            notes,
        })
    }
    .await;

    // Clean up while the controller still runs: deleting a terminal saga lets the controller
    // drop its finalizer, so the namespace can go.
    let cleanup = async {
        api.delete_collection(&DeleteParams::default(), &ListParams::default())
            .await?;
        let gone = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                match api.list(&ListParams::default()).await {
                    Ok(list) if list.items.is_empty() => return,
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        })
        .await;
        if gone.is_err() {
            // Some saga was not terminal: drop the finalizers so the namespace is not stuck.
            for saga in api.list(&ListParams::default()).await?.items {
                let patch = json!({"metadata": {"finalizers": null}});
                let _ = api
                    .patch(
                        &saga.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await;
            }
        }
        anyhow::Ok(())
    }
    .await;
    let _ = stop_tx.send(());
    if tokio::time::timeout(Duration::from_secs(10), controller)
        .await
        .is_err()
    {
        eprintln!("the controller did not stop within 10s");
    }
    watcher_task.abort();
    let round = outcome?;
    cleanup.context("cleaning up the Sagas")?;
    Ok(round)
}

/// One Kubernetes round in a fresh namespace (deleted afterwards); `None` (after a message)
/// when it failed.
async fn run_kube_round(
    bed: &TestBed,
    caller: Arc<Direct>,
    count: usize,
    timeout: Duration,
) -> Option<KubeRound> {
    let out: Arc<Mutex<Option<KubeRound>>> = Arc::default();
    let (bed, slot) = (bed.clone(), out.clone());
    let joined = tokio::spawn(async move {
        let kubeconfig = bed.kubeconfig.clone();
        bed.with_namespace("saga-bench", move |client, ns| async move {
            let round = kube_round(client, ns, kubeconfig, caller, count, 32, timeout).await?;
            if let Ok(mut slot) = slot.lock() {
                *slot = Some(round);
            }
            Ok(())
        })
        .await
    })
    .await;
    if joined.is_err() {
        eprintln!("Kubernetes round FAILED (see the message above)");
    }
    out.lock().ok()?.take()
}

#[tokio::main]
async fn main() {
    let count = env_usize("SAGAS", 2000);
    let kube_count = env_usize("KUBE_SAGAS", 200);
    let rounds = env_usize("ROUNDS", 2);
    let kube_timeout = Duration::from_secs(env_usize("KUBE_TIMEOUT_SECS", 300) as u64);

    let mut services = Vec::new();
    for name in SERVICES {
        let Ok(service) = TestService::start(name).await else {
            eprintln!("could not start {name}");
            return;
        };
        services.push(service);
    }
    let caller = Direct::new(&services.iter().collect::<Vec<_>>());
    let dir = std::env::temp_dir().join(format!("sagamesh-saga-bench-{}", std::process::id()));
    let Ok(file_store) = FileStore::open(&dir) else {
        eprintln!("could not open {}", dir.display());
        return;
    };

    let bed = test_bed("saga benchmark, Kubernetes store").await;
    match &bed {
        None => println!(
            "SKIP Kubernetes store: SAGAMESH_TEST_KUBECONFIG is unset. Start the test bed with \
             `scripts/testbed.sh up` and `eval \"$(scripts/testbed.sh env)\"` to include it."
        ),
        Some(bed) => {
            if let Err(e) = bed.install_crds().await {
                eprintln!("installing the CRDs failed: {e:#}");
                return;
            }
        }
    }

    println!(
        "4-step sagas, every step an HTTP call to a test service on 127.0.0.1; {} CPUs.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| store | sagas | concurrent | succeeded | seconds | sagas/s | status writes/saga | p50 ms | p99 ms | max ms |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let mut notes = Vec::new();
    for round in 0..rounds {
        let name = |prefix: &str, i: usize| format!("{prefix}{round}-{i}");
        measure(
            "memory",
            MemoryStore::default(),
            caller.clone(),
            count,
            32,
            |i| SagaRef {
                namespace: "b".into(),
                name: name("m", i),
                uid: name("m", i),
            },
        )
        .await
        .print();
        measure(
            "memory",
            MemoryStore::default(),
            caller.clone(),
            kube_count,
            kube_count,
            |i| SagaRef {
                namespace: "b".into(),
                name: name("a", i),
                uid: name("a", i),
            },
        )
        .await
        .print();
        let store = file_store.clone();
        let prepare = store.clone();
        measure(
            "file (fsync per record)",
            store,
            caller.clone(),
            count / 4,
            32,
            move |i| {
                let name = name("f", i);
                let uid = prepare
                    .create("b", &name, "h", None)
                    .map(|r| r.uid)
                    .unwrap_or_default();
                SagaRef {
                    namespace: "b".into(),
                    name,
                    uid,
                }
            },
        )
        .await
        .print();
        if let Some(bed) = &bed
            && let Some(result) =
                run_kube_round(bed, Arc::new(caller.clone()), kube_count, kube_timeout).await
        {
            result.row.print();
            notes.push(format!("Kubernetes round {}:", round + 1));
            notes.extend(result.notes.into_iter().map(|n| format!("- {n}")));
        }
    }
    if !notes.is_empty() {
        println!();
        for note in notes {
            println!("{note}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    drop(services);
}
