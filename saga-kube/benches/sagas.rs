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
//!   latency is from the create request to a watcher seeing `Succeeded`. The controller runs
//!   every saga it sees at once (one task per saga; kube's `Controller` has no concurrency
//!   limit by default).
//! - on Kubernetes after a restart: the same number of sagas, each stopped with its second
//!   step's call in flight when the controller stops (as on SIGTERM); a new controller resumes
//!   them. Time from its start to the last `Succeeded`.
//!
//! `cargo bench -p sagamesh-saga-kube --bench sagas` (release build). Knobs (environment):
//! `SAGAS` (memory rounds, default 2000; the file rounds run a quarter), `KUBE_SAGAS` (default
//! 200; also the all-at-once memory round), `ROUNDS` (default 2), `KUBE_TIMEOUT_SECS` (per
//! Kubernetes wait, default 300), `RESUME=0` skips the restart round.
//! The Kubernetes rounds need `scripts/testbed.sh up` and `eval "$(scripts/testbed.sh env)"`;
//! without it they print SKIP and the other rounds still run.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    future::Future,
    path::{Path, PathBuf},
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
use sagamesh_api::saga::{CallPhase, Saga, SagaPhase, SagaSpec, SagaStatus};
use sagamesh_saga::{
    EngineConfig, Event, SagaRef, SagaStore, StoreError, file_store::FileStore, run,
};
use sagamesh_saga_kube::{KubeSagaStore, SagaController, SagaMetrics};
use sagamesh_testing::stats::{ms, percentile};
use sagamesh_testing::{TestBed, test_bed};
use serde_json::{Value, json};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tower::{Layer, Service};

// The tests' direct caller: plain HTTP to the test services (the mesh client's own cost is in
// the proxy benchmark).
use sagamesh_testing::saga::{DirectCaller as Direct, Fault, TestService};

const SERVICES: [&str; 4] = ["orders", "inventory", "payment", "shipping"];
/// Saga creates in flight at once in the Kubernetes rounds.
const CREATE_CONCURRENCY: usize = 32;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The saga: 4 steps, each a POST to one of the 4 services (a templated body or path), each
/// with a compensation (never needed here: every step succeeds).
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
    /// Successful status PUTs per saga so far.
    puts_ok: HashMap<String, u64>,
    /// Refused (409) status PUTs, by how many successful ones that saga had before.
    conflicts_after: BTreeMap<u64, u64>,
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
        // .../sagas/NAME/status
        let saga = req
            .uri()
            .path()
            .strip_suffix("/status")
            .and_then(|p| p.rsplit('/').next())
            .unwrap_or_default()
            .to_string();
        let counts = self.counts.clone();
        let started = Instant::now();
        let response = self.inner.call(req);
        Box::pin(async move {
            let result = response.await;
            let code = result.as_ref().map(|r| r.status().as_u16()).ok();
            let outcome = code.map_or("error".to_string(), |c| c.to_string());
            if let Ok(mut tally) = counts.0.lock() {
                *tally.requests.entry((kind, outcome)).or_default() += 1;
                if kind == "PUT saga status" {
                    tally.status_put.push(started.elapsed());
                    let ok = tally.puts_ok.entry(saga).or_default();
                    match code {
                        Some(200..300) => *ok += 1,
                        Some(409) => {
                            let before = *ok;
                            *tally.conflicts_after.entry(before).or_default() += 1;
                        }
                        _ => {}
                    }
                }
            }
            result
        })
    }
}

/// A client like the operator's (kube's default stack, with its retry of 429/503/504) whose
/// requests are counted.
async fn counting_client(kubeconfig: &Path, counts: &ApiCounts) -> anyhow::Result<Client> {
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

/// CPU time (user + system) of the test bed's kube-apiserver and etcd (by the PIDs
/// `scripts/testbed.sh` records next to the kubeconfig) and of this process (the controller,
/// the test services, the bench's watcher).
#[derive(Clone, Copy)]
struct Cpu {
    apiserver: Option<Duration>,
    etcd: Option<Duration>,
    this: Option<Duration>,
    at: Instant,
}

fn cpu_of(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name: state is field 3, utime 14, stime 15 (in USER_HZ = 100).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

impl Cpu {
    fn sample(testbed_dir: &Path) -> Self {
        let pid = |name: &str| {
            std::fs::read_to_string(testbed_dir.join(format!("{name}.pid")))
                .ok()
                .and_then(|p| cpu_of(p.trim()))
        };
        Self {
            apiserver: pid("kube-apiserver"),
            etcd: pid("etcd"),
            this: cpu_of("self"),
            at: Instant::now(),
        }
    }

    fn describe_since(&self, before: &Cpu, count: usize) -> String {
        let wall = self.at.duration_since(before.at);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let part = |name: &str, a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => {
                let used = a.saturating_sub(b);
                format!(
                    "{name} {:.2} s ({:.1} ms per saga)",
                    used.as_secs_f64(),
                    ms(used) / count as f64
                )
            }
            _ => format!("{name} n/a"),
        };
        format!(
            "CPU time over those {:.2} s (the machine has {cores} cores, so {:.2} CPU-seconds): {}, {}, {}",
            wall.as_secs_f64(),
            wall.as_secs_f64() * cores as f64,
            part("kube-apiserver", self.apiserver, before.apiserver),
            part("etcd", self.etcd, before.etcd),
            part(
                "this process (controller, test services, bench watcher)",
                self.this,
                before.this
            ),
        )
    }
}

/// What one Kubernetes round measured.
struct KubeRound {
    row: Row,
    notes: Vec<String>,
}

/// A saga as the bench's watcher saw it.
struct Seen {
    name: String,
    phase: SagaPhase,
    /// The `reserve` step's action has been sent and not answered.
    reserve_in_flight: bool,
    when: Instant,
}

/// The bench's view of a namespace's Sagas, fed by a kube watcher (no polling).
struct Tracker {
    rx: mpsc::UnboundedReceiver<Seen>,
    task: JoinHandle<()>,
    /// Sagas whose `reserve` call is in flight now.
    in_flight: HashSet<String>,
    /// When each saga was first seen terminal.
    terminal: HashMap<String, (SagaPhase, Instant)>,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Tracker {
    /// Starts watching; returns once the initial list is done.
    async fn start(api: Api<Saga>) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
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
                let when = Instant::now();
                let status = saga.status.unwrap_or_default();
                let reserve_in_flight = status
                    .steps
                    .iter()
                    .any(|s| s.name == "reserve" && s.action.phase == CallPhase::Running);
                let seen = Seen {
                    name: saga.metadata.name.unwrap_or_default(),
                    phase: status.phase,
                    reserve_in_flight,
                    when,
                };
                if tx.send(seen).is_err() {
                    return;
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), ready_rx)
            .await
            .context("the bench's watcher did not list the namespace within 30s")?
            .context("the bench's watcher stopped")?;
        Ok(Self {
            rx,
            task,
            in_flight: HashSet::new(),
            terminal: HashMap::new(),
        })
    }

    /// Takes the watcher's reports until `done` holds; fails at `deadline`.
    async fn until(
        &mut self,
        what: &str,
        deadline: tokio::time::Instant,
        done: impl Fn(&Self) -> bool,
    ) -> anyhow::Result<()> {
        while !done(self) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(seen)) => {
                    if seen.reserve_in_flight {
                        self.in_flight.insert(seen.name.clone());
                    } else {
                        self.in_flight.remove(&seen.name);
                    }
                    if seen.phase.is_terminal() {
                        self.terminal
                            .entry(seen.name)
                            .or_insert((seen.phase, seen.when));
                    }
                }
                Ok(None) => bail!("the bench's watcher stopped"),
                Err(_) => bail!(
                    "timed out waiting for {what} ({} sagas in flight at reserve, {} terminal)",
                    self.in_flight.len(),
                    self.terminal.len()
                ),
            }
        }
        Ok(())
    }

    /// Benchmark sagas (named `s-…`) seen terminal.
    fn finished(&self) -> usize {
        self.terminal.keys().filter(|n| n.starts_with("s-")).count()
    }
}

/// A `SagaController` built exactly as the operator builds it (`KubeSagaStore` with metrics,
/// leading from the start), limited to one namespace, on a client whose requests are counted.
struct RunningController {
    task: JoinHandle<()>,
    stop: oneshot::Sender<()>,
    counts: ApiCounts,
    registry: Registry,
}

async fn start_controller(
    kubeconfig: &Path,
    ns: &str,
    caller: Arc<Direct>,
    config: EngineConfig,
) -> anyhow::Result<RunningController> {
    let counts = ApiCounts::default();
    let client = counting_client(kubeconfig, &counts).await?;
    let mut registry = Registry::default();
    let metrics = SagaMetrics::new(&mut registry);
    let store = KubeSagaStore::new(
        client.clone(),
        Reporter {
            controller: "sagamesh-bench".into(),
            instance: None,
        },
        Some(metrics),
    );
    let (_leader_tx, leader_rx) = watch::channel(true);
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(
        SagaController {
            client,
            caller,
            config,
            store,
            leader: leader_rx,
            namespace: Some(ns.to_string()),
        }
        .run(async move {
            let _ = stop_rx.await;
        }),
    );
    Ok(RunningController {
        task,
        stop,
        counts,
        registry,
    })
}

impl RunningController {
    /// Stops as the operator does on SIGTERM: the controller ends and aborts the sagas it runs
    /// (their calls in flight are dropped). Returns how long that took.
    async fn stop(self) -> Duration {
        let started = Instant::now();
        let _ = self.stop.send(());
        if tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .is_err()
        {
            eprintln!("a controller did not stop within 10s");
        }
        started.elapsed()
    }
}

/// Creates `s-00000`… as fast as `concurrency` requests in flight allow. Returns when the
/// first create was sent, when each create was sent, and how long creating them all took.
async fn create_sagas(
    api: &Api<Saga>,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<(Instant, HashMap<String, Instant>, Duration)> {
    let start = Instant::now();
    let created = futures::stream::iter(0..count)
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
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    Ok((start, created, start.elapsed()))
}

/// Deletes every Saga of the namespace and waits for them to go (a running controller drops
/// the finalizer of a terminal saga); after `wait`, drops any finalizer left, so the namespace
/// can be deleted.
async fn delete_sagas(api: &Api<Saga>, wait: Duration) -> anyhow::Result<()> {
    api.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    let gone = async {
        loop {
            match api.list(&ListParams::default()).await {
                Ok(list) if list.items.is_empty() => return,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    };
    if tokio::time::timeout(wait, gone).await.is_ok() {
        return Ok(());
    }
    for saga in api.list(&ListParams::default()).await?.items {
        let patch = json!({"metadata": {"finalizers": null}});
        api.patch(
            &saga.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    Ok(())
}

fn latency_notes(tally: &ApiTally, before: &ApiTally, count: usize) -> Vec<String> {
    let per = |kind: &str| tally.since(before, kind) as f64 / count as f64;
    let mut put_latency: Vec<Duration> = tally.status_put[before.status_put.len()..].to_vec();
    put_latency.sort();
    vec![
        format!(
            "other requests per saga: finalizer PATCH {:.2}, Event POST {:.2}, Event PATCH {:.2}",
            per("PATCH saga (finalizer)"),
            per("POST Event"),
            per("PATCH Event"),
        ),
        format!(
            "PUT status latency as the controller saw it: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
             ({} PUTs)",
            ms(percentile(&put_latency, 0.5)),
            ms(percentile(&put_latency, 0.99)),
            ms(put_latency.last().copied().unwrap_or_default()),
            put_latency.len()
        ),
        format!("all controller requests: {}", tally.describe_since(before)),
        format!(
            "409s by how many successful status writes that saga had before: {}",
            {
                let since: Vec<String> = tally
                    .conflicts_after
                    .iter()
                    .filter_map(|(ok, n)| {
                        let n = n - before.conflicts_after.get(ok).copied().unwrap_or(0);
                        (n > 0).then(|| format!("after {ok}: {n}"))
                    })
                    .collect();
                if since.is_empty() {
                    "none".to_string()
                } else {
                    since.join(", ")
                }
            }
        ),
    ]
}

fn server_diff(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> String {
    after
        .iter()
        .map(|(code, n)| format!("{code}: {}", n - before.get(code).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Throughput: `count` sagas created at once, run by one controller, until all are terminal.
async fn throughput_round(
    client: Client,
    ns: String,
    kubeconfig: PathBuf,
    caller: Arc<Direct>,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<KubeRound> {
    let api: Api<Saga> = Api::namespaced(client.clone(), &ns);
    let testbed_dir = kubeconfig.parent().unwrap_or(Path::new("."));
    let mut tracker = Tracker::start(api.clone()).await?;
    let controller = start_controller(&kubeconfig, &ns, caller, EngineConfig::default()).await?;
    let outcome = async {
        // Warm-up: one saga through the whole path (connections, caches), not counted.
        api.create(&PostParams::default(), &saga_object("warmup"))
            .await?;
        let warm_deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        tracker
            .until("the warm-up saga", warm_deadline, |t| {
                t.terminal.contains_key("warmup")
            })
            .await?;
        // Let the controller's follow-up reconciles of the warm-up settle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = controller.counts.snapshot();
        let events_before = saga_events_total(&controller.registry);
        let server_before = server_status_puts(&client).await?;

        let cpu_before = Cpu::sample(testbed_dir);
        let (start, created, all_created) = create_sagas(&api, count, CREATE_CONCURRENCY).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        tracker
            .until("every saga to finish", deadline, |t| t.finished() >= count)
            .await?;
        let cpu_after = Cpu::sample(testbed_dir);
        let finished: Vec<_> = tracker
            .terminal
            .iter()
            .filter(|(name, _)| name.starts_with("s-"))
            .collect();
        let last = finished.iter().map(|(_, (_, t))| *t).max().unwrap_or(start);
        let elapsed = last.duration_since(start);
        // Late reconciles of the finished sagas (the controller's own watch events) settle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = controller.counts.snapshot();
        let events_after = saga_events_total(&controller.registry);
        let server_after = server_status_puts(&client).await?;

        let mut latencies = Vec::new();
        for (name, (phase, when)) in &finished {
            if *phase == SagaPhase::Succeeded
                && let Some(sent) = created.get(*name)
            {
                latencies.push(when.duration_since(*sent));
            }
        }
        let puts = after.since(&before, "PUT saga status");
        let mut notes = vec![
            format!(
                "{count} Saga objects created in {:.2} s ({CREATE_CONCURRENCY} creates in flight); \
                 first create to last Succeeded {:.2} s",
                all_created.as_secs_f64(),
                elapsed.as_secs_f64()
            ),
            format!(
                "status PUTs per saga: {:.2} sent by the controller's client, {:.2} succeeded \
                 (saga_events_total); the API server's apiserver_request_total for PUT \
                 sagas/status, by code: {}",
                puts as f64 / count as f64,
                (events_after - events_before) as f64 / count as f64,
                server_diff(&server_after, &server_before)
            ),
        ];
        notes.extend(latency_notes(&after, &before, count));
        notes.push(cpu_after.describe_since(&cpu_before, count));
        let object = api.get("s-00000").await?;
        notes.push(format!(
            "a finished Saga is {} bytes of JSON ({} of them status); every PUT sends the whole \
             object and gets it back, and every watcher (the controller's and the bench's) is \
             sent each new version",
            serde_json::to_vec(&object)?.len(),
            serde_json::to_vec(&object.status)?.len()
        ));
        anyhow::Ok(KubeRound {
            row: Row {
                store: "Kubernetes (PUT status)".into(),
                sagas: count,
                concurrent: format!("{count} (all)"),
                succeeded: latencies.len(),
                elapsed,
                writes: puts,
                latencies,
            },
            notes,
        })
    }
    .await;
    // Clean up while the controller still runs.
    let cleanup = delete_sagas(&api, Duration::from_secs(120)).await;
    controller.stop().await;
    let round = outcome?;
    cleanup.context("deleting the Sagas")?;
    Ok(round)
}

/// Resume after a restart: `count` sagas run until every one has its `reserve` call in flight
/// (that service never answers), the controller stops as on SIGTERM, and a new controller (new
/// client, new store, the service answering again) resumes them; from its start to the last
/// `Succeeded`.
async fn resume_round(
    client: Client,
    ns: String,
    kubeconfig: PathBuf,
    callers: (Arc<Direct>, Arc<Direct>),
    count: usize,
    timeout: Duration,
) -> anyhow::Result<KubeRound> {
    let (stuck, answering) = callers;
    let api: Api<Saga> = Api::namespaced(client.clone(), &ns);
    let testbed_dir = kubeconfig.parent().unwrap_or(Path::new("."));
    let mut tracker = Tracker::start(api.clone()).await?;
    // The first controller waits for the stuck call (the default 10 s step timeout would
    // otherwise end it while the rest are still being created).
    let first_config = EngineConfig {
        default_step_timeout: Duration::from_secs(600),
        ..EngineConfig::default()
    };
    let mut first = Some(start_controller(&kubeconfig, &ns, stuck, first_config).await?);
    let mut second: Option<RunningController> = None;
    let outcome = async {
        let (start, _, _) = create_sagas(&api, count, CREATE_CONCURRENCY).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        tracker
            .until("every saga's reserve call in flight", deadline, |t| {
                t.in_flight.len() >= count
            })
            .await?;
        let all_in_flight = start.elapsed();
        let stopped_in = match first.take() {
            Some(controller) => controller.stop().await,
            None => Duration::ZERO,
        };
        let server_before = server_status_puts(&client).await?;

        let cpu_before = Cpu::sample(testbed_dir);
        let restart = Instant::now();
        let controller =
            start_controller(&kubeconfig, &ns, answering, EngineConfig::default()).await?;
        let counts = controller.counts.clone();
        second = Some(controller);
        let deadline = tokio::time::Instant::now() + timeout;
        tracker
            .until("every saga to finish after the restart", deadline, |t| {
                t.finished() >= count
            })
            .await?;
        let cpu_after = Cpu::sample(testbed_dir);
        let mut latencies = Vec::new();
        let mut last = restart;
        for (phase, when) in tracker.terminal.values() {
            last = last.max(*when);
            if *phase == SagaPhase::Succeeded {
                latencies.push(when.duration_since(restart));
            }
        }
        let elapsed = last.duration_since(restart);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = counts.snapshot();
        let server_after = server_status_puts(&client).await?;
        let none = ApiTally::default();
        let puts = after.since(&none, "PUT saga status");
        let mut notes = vec![
            format!(
                "{count} sagas created and all with `reserve` in flight after {:.2} s; the \
                 controller stopped in {:.2} s; a new one started and the last saga was \
                 Succeeded {:.2} s later",
                all_in_flight.as_secs_f64(),
                stopped_in.as_secs_f64(),
                elapsed.as_secs_f64()
            ),
            format!(
                "status PUTs per saga after the restart: {:.2} (re-send reserve: CallStarted, \
                 CallSucceeded; then 2 for each remaining step); the API server's \
                 apiserver_request_total for PUT sagas/status, by code: {}",
                puts as f64 / count as f64,
                server_diff(&server_after, &server_before)
            ),
        ];
        notes.extend(latency_notes(&after, &none, count));
        notes.push(cpu_after.describe_since(&cpu_before, count));
        anyhow::Ok(KubeRound {
            row: Row {
                store: "Kubernetes, resume after a controller restart".into(),
                sagas: count,
                concurrent: format!("{count} (all)"),
                succeeded: latencies.len(),
                elapsed,
                writes: puts,
                latencies,
            },
            notes,
        })
    }
    .await;
    let running = second.is_some() || first.is_some();
    let cleanup = delete_sagas(
        &api,
        Duration::from_secs(if running && outcome.is_ok() { 120 } else { 5 }),
    )
    .await;
    for controller in [first, second].into_iter().flatten() {
        controller.stop().await;
    }
    let round = outcome?;
    cleanup.context("deleting the Sagas")?;
    Ok(round)
}

/// Runs a Kubernetes round in a fresh namespace (deleted afterwards); `None` (after a message)
/// when it failed.
async fn in_namespace<F, Fut>(bed: &TestBed, what: &str, round: F) -> Option<KubeRound>
where
    F: FnOnce(Client, String, PathBuf) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<KubeRound>> + Send + 'static,
{
    let out: Arc<Mutex<Option<KubeRound>>> = Arc::default();
    let (bed, slot) = (bed.clone(), out.clone());
    let joined = tokio::spawn(async move {
        let kubeconfig = bed.kubeconfig.clone();
        bed.with_namespace("saga-bench", move |client, ns| async move {
            let result = round(client, ns, kubeconfig).await?;
            if let Ok(mut slot) = slot.lock() {
                *slot = Some(result);
            }
            Ok(())
        })
        .await
    })
    .await;
    if joined.is_err() {
        eprintln!("Kubernetes round ({what}) FAILED (see the message above)");
    }
    out.lock().ok()?.take()
}

#[tokio::main]
async fn main() {
    let count = env_usize("SAGAS", 2000);
    let kube_count = env_usize("KUBE_SAGAS", 200);
    let rounds = env_usize("ROUNDS", 2);
    let kube_timeout = Duration::from_secs(env_usize("KUBE_TIMEOUT_SECS", 300) as u64);
    let resume = env_usize("RESUME", 1) == 1;

    let mut services = Vec::new();
    for name in SERVICES {
        let Ok(service) = TestService::start(name).await else {
            eprintln!("could not start {name}");
            return;
        };
        services.push(service);
    }
    let caller = Direct::new(&services.iter().collect::<Vec<_>>());
    // For the restart round: an inventory whose reservations never answer (until the
    // controller that sent them is stopped).
    let Ok(stuck_inventory) = TestService::start("inventory").await else {
        eprintln!("could not start the stuck inventory service");
        return;
    };
    stuck_inventory.fault("/reservations", Fault::Delay(Duration::from_secs(600)));
    let stuck = Direct::new(
        &services
            .iter()
            .map(|s| {
                if s.name == "inventory" {
                    &stuck_inventory
                } else {
                    s
                }
            })
            .collect::<Vec<_>>(),
    );
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
        let Some(bed) = &bed else { continue };
        let (answering, count) = (Arc::new(caller.clone()), kube_count);
        if let Some(result) = in_namespace(bed, "throughput", move |client, ns, kubeconfig| {
            throughput_round(client, ns, kubeconfig, answering, count, kube_timeout)
        })
        .await
        {
            result.row.print();
            notes.push(format!("Kubernetes, round {}:", round + 1));
            notes.extend(result.notes.into_iter().map(|n| format!("- {n}")));
        }
        if !resume {
            continue;
        }
        let callers = (Arc::new(stuck.clone()), Arc::new(caller.clone()));
        if let Some(result) = in_namespace(bed, "restart", move |client, ns, kubeconfig| {
            resume_round(client, ns, kubeconfig, callers, count, kube_timeout)
        })
        .await
        {
            result.row.print();
            notes.push(format!("Kubernetes restart, round {}:", round + 1));
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
    drop((services, stuck_inventory));
}
