//! Sagas as Kubernetes objects: the status subresource is the durable store, and a kube-rs
//! `Controller` runs every non-terminal saga — only while this replica holds the Lease.
//!
//! - Writes use `PUT .../status` with the last `resourceVersion` this replica saw, so two
//!   replicas can never both advance a saga: the loser gets a conflict, reads the saga again
//!   and stops.
//! - The controller's cache (its watch) lags behind the store's own writes. A cached copy older
//!   than the last version this store wrote or read (less [`progress`]) starts nothing: the
//!   watch brings the newer version, which is reconciled then. Without this, each late event
//!   after a saga finished started a run from an outdated status whose first write was refused.
//!   What the store remembers is an optimisation only (bounded by the sagas that exist; a new
//!   process starts empty): the status in the API server is the only truth.
//! - A finalizer keeps a running saga from disappearing mid-flight: deleting it lets it reach a
//!   terminal phase (compensating if a step fails) before the object goes.
//! - Events mark the transitions a person cares about; metrics count them.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use futures::StreamExt;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        watcher,
    },
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use sagamesh_api::backoff::{Backoff, FailureBackoff, Jitter};
use sagamesh_api::saga::{Saga, SagaStatus};
use tokio::{sync::watch, task::JoinHandle};

use sagamesh_saga::{
    engine::{self, EngineConfig, SagaRef, SagaStore, ServiceCaller, StoreError},
    state::{Call, Event, progress},
};

/// Finalizer that keeps a running saga until it is terminal.
pub const FINALIZER: &str = "sagamesh.io/saga";

/// How long a cached copy older than what the store knows is left to the watch to replace
/// before the controller reads the saga from the API server itself.
const STALE_PATIENCE: Duration = Duration::from_secs(30);
/// When a saga whose cached copy is outdated is looked at again (the watch event bringing the
/// newer version normally comes first).
const STALE_RECHECK: Duration = Duration::from_secs(5);
/// How often the store forgets sagas that no longer exist (deleted without this replica
/// releasing their finalizer).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    call: String,
    outcome: String,
}

/// Saga metrics, registered under the `saga` prefix of the given registry.
#[derive(Clone)]
pub struct SagaMetrics {
    events: Family<KindLabels, Counter>,
    calls: Family<CallLabels, Histogram>,
    running: Gauge,
}

impl SagaMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            events: Family::default(),
            calls: Family::new_with_constructor(|| {
                Histogram::new([
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
            }),
            running: Gauge::default(),
        };
        let registry = registry.sub_registry_with_prefix("saga");
        registry.register(
            "events",
            "Saga transitions by kind (SagaSucceeded, SagaCompensated, SagaFailed, ActionFailed, AttemptFailed (a retry follows), CompensationSucceeded, ...)",
            metrics.events.clone(),
        );
        registry.register(
            "call_duration_seconds",
            "Latency of saga calls by call (action, compensation) and outcome",
            metrics.calls.clone(),
        );
        registry.register(
            "running",
            "Sagas being executed by this replica",
            metrics.running.clone(),
        );
        metrics
    }
}

/// The event kind as metrics and Events name it (a fixed, bounded set).
fn event_kind(event: &Event) -> &'static str {
    match event {
        Event::Started { .. } => "SagaStarted",
        Event::Invalid { .. } => "SagaInvalid",
        Event::CallStarted {
            call: Call::Action(_),
            ..
        } => "ActionStarted",
        Event::CallStarted { .. } => "CompensationStarted",
        Event::CallSucceeded {
            call: Call::Action(_),
            ..
        } => "ActionSucceeded",
        Event::CallSucceeded { .. } => "CompensationSucceeded",
        Event::AttemptFailed { .. } => "AttemptFailed",
        Event::CallFailed {
            call: Call::Action(_),
            ..
        } => "ActionFailed",
        Event::CallFailed { .. } => "CompensationFailed",
        Event::CompensationSkipped { .. } => "CompensationSkipped",
        Event::DeadlineExceeded => "DeadlineExceeded",
    }
}

/// (namespace, saga, call) of a call in flight, for its latency.
type CallKey = (String, String, String);

/// What the store keeps about one saga (by uid).
#[derive(Default)]
struct Tracked {
    /// The run in progress (see [`KubeSagaStore::remember`]).
    run: u64,
    /// The object the run's next write is based on: its `resourceVersion` guards the write.
    /// `None` between runs.
    base: Option<Saga>,
    /// [`progress`] of the newest version this store knows the API server holds (the answer
    /// to its last successful write, or what it read after a conflict), and when it learned it.
    newest: Option<(u64, Instant)>,
}

#[derive(Default)]
struct Tracking {
    sagas: HashMap<String, Tracked>,
    runs: u64,
}

/// Whether a cached copy of a saga can be acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freshness {
    /// As new as anything this store knows of.
    Current,
    /// Older than a version this store wrote or read `known_for` ago.
    Outdated { known_for: Duration },
}

/// The status subresource as a [`SagaStore`].
#[derive(Clone)]
pub struct KubeSagaStore {
    client: Client,
    recorder: Recorder,
    metrics: Option<SagaMetrics>,
    tracking: Arc<Mutex<Tracking>>,
    call_started: Arc<Mutex<HashMap<CallKey, Instant>>>,
}

impl KubeSagaStore {
    pub fn new(client: Client, reporter: Reporter, metrics: Option<SagaMetrics>) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            tracking: Arc::default(),
            call_started: Arc::default(),
        }
    }

    fn tracking(&self) -> MutexGuard<'_, Tracking> {
        self.tracking.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a run of `saga` from this copy: it is the base of the run's first write. Returns
    /// the run's number (for [`Self::end_run`]).
    pub fn remember(&self, saga: &Saga) -> u64 {
        let mut tracking = self.tracking();
        tracking.runs += 1;
        let run = tracking.runs;
        let tracked = tracking
            .sagas
            .entry(saga.uid().unwrap_or_default())
            .or_default();
        tracked.run = run;
        tracked.base = Some(saga.clone());
        run
    }

    /// Ends run `run` of `saga` (finished, stopped or aborted): a later run starts from a
    /// cached copy again.
    pub fn end_run(&self, saga: &SagaRef, run: u64) {
        if let Some(tracked) = self.tracking().sagas.get_mut(&saga.uid)
            && tracked.run == run
        {
            tracked.base = None;
        }
        self.call_started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(namespace, name, _), _| *namespace != saga.namespace || *name != saga.name);
    }

    /// Notes that the API server holds `saga` (just read from it).
    fn learn(&self, saga: &Saga) {
        let Some(uid) = saga.uid() else { return };
        let progress = saga.status.as_ref().map(progress).unwrap_or(0);
        self.tracking().sagas.entry(uid).or_default().newest = Some((progress, Instant::now()));
    }

    /// Forgets the saga `uid` (deleted).
    fn forget(&self, uid: &str) {
        self.tracking().sagas.remove(uid);
    }

    /// Forgets every saga not in `live` (uids), but for one with a run in progress.
    fn retain_live(&self, live: &HashSet<String>) {
        self.tracking()
            .sagas
            .retain(|uid, tracked| tracked.base.is_some() || live.contains(uid));
    }

    /// Whether `saga`, a cached copy, is older than a version this store wrote or read.
    fn freshness(&self, saga: &Saga) -> Freshness {
        let uid = saga.uid().unwrap_or_default();
        let tracking = self.tracking();
        match tracking.sagas.get(&uid).and_then(|t| t.newest) {
            Some((newest, learned)) if saga.status.as_ref().map(progress).unwrap_or(0) < newest => {
                Freshness::Outdated {
                    known_for: learned.elapsed(),
                }
            }
            _ => Freshness::Current,
        }
    }

    /// How many sagas this store keeps anything for: those it ran, until they are deleted.
    pub fn tracked(&self) -> usize {
        self.tracking().sagas.len()
    }

    fn observe(&self, saga: &SagaRef, event: &Event) {
        let Some(metrics) = &self.metrics else { return };
        metrics
            .events
            .get_or_create(&KindLabels {
                kind: event_kind(event).to_string(),
            })
            .inc();
        let (call, outcome) = match event {
            Event::CallStarted { call, .. } => {
                let key = (
                    saga.namespace.clone(),
                    saga.name.clone(),
                    format!("{call:?}"),
                );
                self.call_started
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, Instant::now());
                return;
            }
            Event::CallSucceeded { call, .. } => (call, "succeeded"),
            Event::AttemptFailed { call, .. } | Event::CallFailed { call, .. } => (call, "failed"),
            _ => return,
        };
        let key = (
            saga.namespace.clone(),
            saga.name.clone(),
            format!("{call:?}"),
        );
        if let Some(started) = self
            .call_started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key)
        {
            metrics
                .calls
                .get_or_create(&CallLabels {
                    call: call.kind().to_string(),
                    outcome: outcome.to_string(),
                })
                .observe(started.elapsed().as_secs_f64());
        }
    }

    /// Publishes a Kubernetes Event for the transitions a person cares about.
    async fn publish(&self, saga: &Saga, status: &SagaStatus, event: &Event) {
        let step_name = |call: &Call| {
            status
                .steps
                .get(call.step())
                .map(|s| s.name.clone())
                .unwrap_or_default()
        };
        let (type_, reason, note) = match event {
            Event::Started { trace_id } => {
                (EventType::Normal, "Started", format!("trace id {trace_id}"))
            }
            Event::Invalid { reason } => (EventType::Warning, "Invalid", reason.clone()),
            Event::CallFailed {
                call: call @ Call::Action(_),
                error,
                ..
            } => (
                EventType::Warning,
                "StepFailed",
                format!("step {:?} failed: {error}; compensating", step_name(call)),
            ),
            Event::CallFailed { call, error, .. } => (
                EventType::Warning,
                "CompensationFailed",
                format!(
                    "compensation of step {:?} failed for good: {error}. A person must undo the remaining effects by hand (see status.steps), then delete this Saga.",
                    step_name(call)
                ),
            ),
            Event::DeadlineExceeded => (
                EventType::Warning,
                "DeadlineExceeded",
                "the saga deadline passed; compensating".to_string(),
            ),
            _ if status.phase.is_terminal() => (
                if status.phase == sagamesh_api::saga::SagaPhase::Succeeded {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                match status.phase {
                    sagamesh_api::saga::SagaPhase::Succeeded => "Succeeded",
                    sagamesh_api::saga::SagaPhase::Compensated => "Compensated",
                    _ => "Failed",
                },
                format!("saga is {:?}", status.phase),
            ),
            _ => return,
        };
        let event = KubeEvent {
            type_,
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: "Run".to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &saga.object_ref(&())).await {
            tracing::warn!(saga = %saga.name_any(), error = %e, "could not publish an Event");
        }
    }
}

impl SagaStore for KubeSagaStore {
    async fn save(
        &self,
        saga: &SagaRef,
        status: &SagaStatus,
        event: &Event,
    ) -> Result<(), StoreError> {
        let base = self
            .tracking()
            .sagas
            .get(&saga.uid)
            .and_then(|t| t.base.clone());
        let Some(mut object) = base else {
            return Err(StoreError::Conflict(format!(
                "saga {}/{} is not tracked",
                saga.namespace, saga.name
            )));
        };
        let mut status = status.clone();
        status.observed_generation = object.metadata.generation;
        object.status = Some(status.clone());
        let api: Api<Saga> = Api::namespaced(self.client.clone(), &saga.namespace);
        match api
            .replace_status(&saga.name, &PostParams::default(), &object)
            .await
        {
            Ok(updated) => {
                {
                    let mut tracking = self.tracking();
                    let tracked = tracking.sagas.entry(saga.uid.clone()).or_default();
                    tracked.newest = Some((progress(&status), Instant::now()));
                    tracked.base = Some(updated.clone());
                }
                self.observe(saga, event);
                self.publish(&updated, &status, event).await;
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // The copy was outdated (another replica wrote, or the object changed): this run
                // stops. Read what the API server holds, so the next run does not start from a
                // copy older than that.
                match api.get_opt(&saga.name).await {
                    Ok(Some(current)) if current.uid().as_deref() == Some(saga.uid.as_str()) => {
                        self.learn(&current)
                    }
                    Ok(_) => self.forget(&saga.uid),
                    Err(error) => {
                        tracing::warn!(saga = %saga.name, namespace = %saga.namespace, %error, "could not read the saga after a conflict")
                    }
                }
                Err(StoreError::Conflict(e.message))
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                self.forget(&saga.uid);
                Err(StoreError::Conflict(e.message))
            }
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }
}

/// Runs sagas from the API server while `leader` is true.
pub struct SagaController<C> {
    pub client: Client,
    pub caller: Arc<C>,
    pub config: EngineConfig,
    pub store: KubeSagaStore,
    pub leader: watch::Receiver<bool>,
    /// Restrict to one namespace (tests); `None`: all namespaces.
    pub namespace: Option<String>,
}

struct Context<C> {
    client: Client,
    caller: Arc<C>,
    config: EngineConfig,
    store: KubeSagaStore,
    leader: watch::Receiver<bool>,
    running: Mutex<HashMap<(String, String), JoinHandle<()>>>,
    /// Consecutive reconcile failures per saga, for the exponential requeue.
    failures: FailureBackoff<(String, String)>,
}

/// Requeue delay of a saga whose reconcile failed in a row: 500 ms doubling, at most 1 minute
/// (a saga waits on it, so sooner than the operator's 5 minutes), equal jitter.
const REQUEUE_BACKOFF: Backoff = Backoff::new(
    Duration::from_millis(500),
    Duration::from_secs(60),
    Jitter::Equal,
);

/// Why a reconcile failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl<C: ServiceCaller + 'static> SagaController<C> {
    /// Runs until `shutdown` resolves; aborts the sagas in flight when leadership is lost.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ) {
        let api: Api<Saga> = match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let ctx = Arc::new(Context {
            client: self.client,
            caller: self.caller,
            config: self.config,
            store: self.store,
            leader: self.leader.clone(),
            running: Mutex::default(),
            failures: FailureBackoff::new(REQUEUE_BACKOFF),
        });
        // Becoming leader re-reconciles everything; losing it stops every saga at once (the new
        // leader resumes them from their status).
        let (trigger_tx, trigger_rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut leader = self.leader;
        let watch_ctx = ctx.clone();
        let leadership = tokio::spawn(async move {
            loop {
                let is_leader = *leader.borrow_and_update();
                if is_leader {
                    let _ = trigger_tx.try_send(());
                } else {
                    let mut running = watch_ctx.running.lock().unwrap_or_else(|p| p.into_inner());
                    for (_, task) in running.drain() {
                        task.abort();
                    }
                }
                if leader.changed().await.is_err() {
                    return;
                }
            }
        });
        let trigger = tokio_stream_from(trigger_rx);
        let controller = Controller::new(api, watcher::Config::default());
        // Forget sagas deleted without this replica releasing their finalizer.
        let cache = controller.store();
        let prune_store = ctx.store.clone();
        let pruning = tokio::spawn(async move {
            if cache.wait_until_ready().await.is_err() {
                return;
            }
            let mut every = tokio::time::interval(PRUNE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let live: HashSet<String> = cache.state().iter().filter_map(|s| s.uid()).collect();
                prune_store.retain_live(&live);
            }
        });
        controller
            .reconcile_all_on(trigger)
            .graceful_shutdown_on(shutdown)
            .run(reconcile_counted::<C>, error_policy::<C>, ctx.clone())
            .for_each(|_| async {})
            .await;
        leadership.abort();
        pruning.abort();
        let mut running = ctx.running.lock().unwrap_or_else(|p| p.into_inner());
        for (_, task) in running.drain() {
            task.abort();
        }
    }
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<()>,
) -> impl futures::Stream<Item = ()> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn reconcile<C: ServiceCaller + 'static>(
    saga: Arc<Saga>,
    ctx: Arc<Context<C>>,
) -> Result<Action, ReconcileError> {
    if !*ctx.leader.borrow() {
        return Ok(Action::await_change());
    }
    let namespace = saga.namespace().unwrap_or_default();
    let name = saga.name_any();
    let key = (namespace.clone(), name.clone());
    let api: Api<Saga> = Api::namespaced(ctx.client.clone(), &namespace);
    match ctx.store.freshness(&saga) {
        Freshness::Current => {}
        Freshness::Outdated { known_for } if known_for < STALE_PATIENCE => {
            // This store wrote (or read) a newer version than the cache holds. The watch brings
            // it and that reconciles again; a run started from this copy would only have its
            // first write refused.
            return Ok(Action::requeue(STALE_RECHECK));
        }
        Freshness::Outdated { .. } => {
            // The cache has lagged for long: ask the API server, the only truth.
            match api.get_opt(&name).await? {
                Some(current) if current.uid() == saga.uid() => ctx.store.learn(&current),
                _ => ctx.store.forget(&saga.uid().unwrap_or_default()),
            }
            return Ok(Action::requeue(STALE_RECHECK));
        }
    }
    let status = saga.status.clone().unwrap_or_default();
    let has_finalizer = saga.finalizers().iter().any(|f| f == FINALIZER);
    let deleting = saga.meta().deletion_timestamp.is_some();

    let running = {
        let mut running = ctx.running.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|_, task| !task.is_finished());
        running.contains_key(&key)
    };
    let never_started =
        status.phase == sagamesh_api::saga::SagaPhase::Pending && status.steps.is_empty();
    if status.phase.is_terminal() || (deleting && never_started && !running) {
        if deleting && has_finalizer {
            let finalizers: Vec<_> = saga
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            let patch = serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": saga.resource_version()}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                // Gone already: released by an earlier reconcile of an older copy.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            // The object goes now: nothing to remember about it.
            ctx.store.forget(&saga.uid().unwrap_or_default());
        }
        return Ok(Action::await_change());
    }
    if running {
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    if !has_finalizer && !deleting {
        let mut finalizers = saga.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        let patch = serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": saga.resource_version()}});
        // The patch result triggers the next reconcile, which starts the saga.
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        return Ok(Action::await_change());
    }
    let saga_ref = SagaRef {
        namespace: namespace.clone(),
        name: name.clone(),
        uid: saga.uid().unwrap_or_default(),
    };
    let run = RunGuard::start(&ctx.store, &saga, saga_ref.clone());
    let task_ctx = ctx.clone();
    let spec = saga.spec.clone();
    let task = tokio::spawn(async move {
        let _run = run;
        let result = engine::run(
            &saga_ref,
            &spec,
            status,
            &task_ctx.store,
            task_ctx.caller.as_ref(),
            &task_ctx.config,
        )
        .await;
        match result {
            Ok(status) => {
                tracing::info!(saga = %saga_ref.name, namespace = %saga_ref.namespace, phase = ?status.phase, "saga finished")
            }
            Err(e) => {
                tracing::warn!(saga = %saga_ref.name, namespace = %saga_ref.namespace, error = %e, "saga run stopped; it resumes on the next reconcile")
            }
        }
    });
    ctx.running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, task);
    Ok(Action::requeue(Duration::from_secs(10)))
}

/// A saga's run, ended in the store when its task ends however it ends (finished, stopped by
/// a conflict, or aborted when leadership is lost), even if it never got to run.
struct RunGuard {
    store: KubeSagaStore,
    saga: SagaRef,
    run: u64,
}

impl RunGuard {
    fn start(store: &KubeSagaStore, object: &Saga, saga: SagaRef) -> Self {
        let run = store.remember(object);
        if let Some(m) = &store.metrics {
            m.running.inc();
        }
        Self {
            store: store.clone(),
            saga,
            run,
        }
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if let Some(m) = &self.store.metrics {
            m.running.dec();
        }
        self.store.end_run(&self.saga, self.run);
    }
}

/// Reconciles; a success forgets the saga's failures in a row.
async fn reconcile_counted<C: ServiceCaller + 'static>(
    saga: Arc<Saga>,
    ctx: Arc<Context<C>>,
) -> Result<Action, ReconcileError> {
    let key = (saga.namespace().unwrap_or_default(), saga.name_any());
    let result = reconcile(saga, ctx.clone()).await;
    if result.is_ok() {
        ctx.failures.reset(&key);
    }
    result
}

/// Logs a failed reconcile and requeues the saga with exponential backoff.
fn error_policy<C>(saga: Arc<Saga>, error: &ReconcileError, ctx: Arc<Context<C>>) -> Action {
    let key = (saga.namespace().unwrap_or_default(), saga.name_any());
    let (failures, delay) = ctx.failures.failed(key);
    tracing::warn!(saga = %saga.name_any(), %error, failures, retry_in = ?delay, "saga reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagamesh_saga::engine::{CallOutcome, CallRequest};

    /// Reconciles here fail before any call.
    struct NoCalls;

    impl ServiceCaller for NoCalls {
        async fn call(&self, _: CallRequest) -> CallOutcome {
            CallOutcome::NoAnswer {
                error: "no calls in this test".into(),
                maybe_delivered: false,
            }
        }
        async fn has_service(&self, _: &str, _: &str) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn failed_reconciles_back_off_exponentially_until_one_succeeds() {
        // An API server address nothing listens on: every write fails, quickly.
        let unreachable = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let config = kube::Config::new(format!("http://{unreachable}").parse().expect("valid URL"));
        let client = Client::try_from(config).expect("client");
        let (leader_tx, leader) = watch::channel(true);
        let ctx = Arc::new(Context {
            client: client.clone(),
            caller: Arc::new(NoCalls),
            config: EngineConfig::default(),
            store: KubeSagaStore::new(client, Reporter::from("test"), None),
            leader,
            running: Mutex::default(),
            // Without jitter, to read the delays exactly.
            failures: FailureBackoff::new(Backoff {
                jitter: Jitter::None,
                ..REQUEUE_BACKOFF
            }),
        });
        let spec = serde_json::from_value(serde_json::json!({
            "steps": [{"name": "a", "action": {"service": "orders", "path": "/orders"}}]
        }))
        .expect("spec");
        let mut saga = Saga::new("s", spec);
        saga.metadata.namespace = Some("shop".into());
        saga.metadata.uid = Some("u1".into());
        let saga = Arc::new(saga);

        let mut delays = Vec::new();
        for _ in 0..4 {
            let error = reconcile_counted(saga.clone(), ctx.clone())
                .await
                .expect_err("the finalizer patch cannot reach the API server");
            delays.push(error_policy(saga.clone(), &error, ctx.clone()));
        }
        let ms = |n| Action::requeue(Duration::from_millis(n));
        assert_eq!(delays, [ms(500), ms(1000), ms(2000), ms(4000)]);

        // A reconcile that succeeds (a follower's: nothing to do) starts the count over.
        leader_tx.send_replace(false);
        reconcile_counted(saga.clone(), ctx.clone())
            .await
            .expect("a follower's reconcile succeeds");
        assert!(ctx.failures.is_empty());
        leader_tx.send_replace(true);
        let error = reconcile_counted(saga.clone(), ctx.clone())
            .await
            .expect_err("fails again");
        assert_eq!(error_policy(saga, &error, ctx), ms(500));
    }
}
