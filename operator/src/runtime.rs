//! Wiring: watches feed the index; the index feeds the reconciler (kube-runtime's controller
//! `applier`, the engine of `Controller`) and the discovery server; leader election gates the
//! writers; the admin server reports on all of it.
//!
//! Why `applier` rather than `Controller::new(..).run(..)`: the reconciler must also run when the
//! index (pods, EndpointSlices, Services) changes a registration's summary, and `Controller`'s
//! ways to add such a trigger (`reconcile_on`, shared streams) sit behind unstable features in
//! kube-runtime 5. `applier` is the stable function `Controller::run` is built on: same
//! scheduler, deduplication and per-object serialisation, with our own queue.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::controller::{self, applier};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher::{self, Event, watcher};
use kube::runtime::{WatchStreamExt, reflector::store::Writer};
use kube::{Api, Client, Resource};
use sagamesh_api::ServiceRegistration;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::index::{Indexed, SharedIndex};
use crate::leader::{self, LeaseConfig};
use crate::metrics::Metrics;
use crate::reconcile::{self, Context};
use sagamesh_discovery::server::{self as discovery, DiscoveryService, Source as _};
use sagamesh_server::admin::{self, AdminState};

/// Everything the operator needs to run.
#[derive(Clone, Debug)]
pub struct Settings {
    pub discovery_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub lease: LeaseConfig,
    /// Watch one namespace only (its ServiceRegistrations, pods, Services and EndpointSlices);
    /// `None`: all namespaces.
    pub watch_namespace: Option<String>,
    /// Name of the reporting controller in Events.
    pub controller_name: String,
    /// Run sagas (on the Lease holder).
    pub sagas: bool,
    /// Serve the sidecar-injection webhook.
    pub webhook: Option<crate::webhook::WebhookSettings>,
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A part that runs for the life of the operator failed, panicked or ended.
    #[error("the {part} {reason}")]
    Part { part: &'static str, reason: String },
}

/// How long the parts get to finish after shutdown (releasing the Lease, draining servers)
/// before they are aborted.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// How long the saga controller gets to stop after shutdown (see where it is spawned).
const SAGA_CONTROLLER_GRACE: Duration = Duration::from_secs(3);

/// Runs the operator's parts, each meant to run until shutdown: the first one that fails,
/// panics or ends on its own stops all of them, and [`Supervisor::run`] returns an error naming
/// it. A replica with a dead part must not stay up reporting ready.
pub(crate) struct Supervisor {
    tasks: JoinSet<Result<(), String>>,
    names: HashMap<tokio::task::Id, &'static str>,
    stop_tx: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
}

impl Supervisor {
    pub(crate) fn new() -> Self {
        let (stop_tx, stop) = watch::channel(false);
        Supervisor {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            stop_tx,
            stop,
        }
    }

    /// Turns `true` when the parts are to stop.
    pub(crate) fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.clone()
    }

    /// A part that watches [`Supervisor::stop_signal`] and ends by itself when it turns true.
    pub(crate) fn spawn<E: std::fmt::Display>(
        &mut self,
        part: &'static str,
        task: impl Future<Output = Result<(), E>> + Send + 'static,
    ) {
        let handle = self
            .tasks
            .spawn(async move { task.await.map_err(|e| e.to_string()) });
        self.names.insert(handle.id(), part);
    }

    /// A part with no shutdown of its own: dropped when the stop signal turns true.
    pub(crate) fn spawn_until_stop(
        &mut self,
        part: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        let mut stop = self.stop.clone();
        self.spawn(part, async move {
            tokio::select! {
                () = task => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            Ok::<_, std::convert::Infallible>(())
        });
    }

    /// Supervises until `external_shutdown` turns true (or its sender goes: `Ok`) or a part
    /// stops early (`Err` naming it); then stops every part and waits for them, at most
    /// [`SHUTDOWN_GRACE`].
    pub(crate) async fn run(
        self,
        mut external_shutdown: watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let Supervisor {
            mut tasks,
            names,
            stop_tx,
            stop: _,
        } = self;
        let part = |id| names.get(&id).copied().unwrap_or("unnamed task");
        let joined = tokio::select! {
            _ = external_shutdown.wait_for(|s| *s) => None,
            joined = tasks.join_next_with_id() => joined,
        };
        let outcome = match joined {
            // Shutdown asked for (or no part at all).
            None => Ok(()),
            Some(joined) => {
                let (id, reason) = match joined {
                    Ok((id, Ok(()))) => (id, "ended while it should run".to_string()),
                    Ok((id, Err(e))) => (id, format!("failed: {e}")),
                    Err(e) if e.is_panic() => (
                        e.id(),
                        format!("panicked: {}", panic_message(e.into_panic())),
                    ),
                    Err(e) => (e.id(), format!("was cancelled: {e}")),
                };
                let part = part(id);
                tracing::error!(part, %reason, "an operator part stopped; shutting down");
                Err(Error::Part { part, reason })
            }
        };
        stop_tx.send_replace(true);
        let drain = async {
            while let Some(joined) = tasks.join_next_with_id().await {
                match joined {
                    Ok((id, Ok(()))) => tracing::debug!(part = part(id), "stopped"),
                    Ok((id, Err(e))) => {
                        tracing::warn!(part = part(id), error = %e, "failed while shutting down")
                    }
                    Err(e) if e.is_panic() => {
                        tracing::warn!(part = part(e.id()), "panicked while shutting down")
                    }
                    Err(_) => {}
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "parts still running after the shutdown grace; aborting them");
            tasks.shutdown().await;
        }
        outcome
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Applies a watcher's events to the index; a (re)list replaces the kind as a whole.
async fn feed_index<K, S>(
    kind: &'static str,
    stream: S,
    index: SharedIndex,
    mut on_delete: impl FnMut(&K),
) where
    K: Indexed + Resource + Clone + Debug + Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut relist: Vec<K> = Vec::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => relist.clear(),
            Ok(Event::InitApply(obj)) => relist.push(obj),
            Ok(Event::InitDone) => {
                let objs = std::mem::take(&mut relist);
                tracing::debug!(kind, count = objs.len(), "listed");
                index.reset(&objs);
            }
            Ok(Event::Apply(obj)) => index.apply(&obj),
            Ok(Event::Delete(obj)) => {
                on_delete(&obj);
                index.delete(&obj);
            }
            // The watcher retries with backoff; the index keeps its state meanwhile.
            Err(e) => tracing::warn!(kind, error = %e, "watch failed; retrying"),
        }
    }
}

fn watch_kind<K>(
    client: &Client,
    namespace: Option<&str>,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + use<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + 'static,
{
    watcher(api::<K>(client, namespace), watcher::Config::default()).default_backoff()
}

fn reflect(
    writer: Writer<ServiceRegistration>,
    stream: impl Stream<Item = Result<Event<ServiceRegistration>, watcher::Error>> + Send,
) -> impl Stream<Item = Result<Event<ServiceRegistration>, watcher::Error>> + Send {
    reflector::reflector(writer, stream)
}

/// Runs the operator until `shutdown` turns `true`.
pub async fn run(
    client: Client,
    settings: Settings,
    external_shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    // Every part stops on `shutdown`: the caller's shutdown, or any part stopping early.
    let mut parts = Supervisor::new();
    let shutdown = parts.stop_signal();
    let metrics = Arc::new(Metrics::default());
    let (index, triggers) = SharedIndex::new();

    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { what, addr, source })
    };
    let discovery_listener = bind("discovery", settings.discovery_addr).await?;
    let admin_listener = bind("admin", settings.admin_addr).await?;
    let webhook_listener = match &settings.webhook {
        Some(webhook) => Some(bind("webhook", webhook.addr).await?),
        None => None,
    };
    tracing::info!(
        discovery = %settings.discovery_addr,
        admin = %settings.admin_addr,
        namespace = settings.watch_namespace.as_deref().unwrap_or("(all)"),
        lease = %format!("{}/{}", settings.lease.namespace, settings.lease.name),
        identity = %settings.lease.identity,
        "starting"
    );

    let (leader, leader_task) = leader::spawn(
        client.clone(),
        settings.lease.clone(),
        metrics.clone(),
        shutdown.clone(),
    );
    // Ends after shutdown, once the Lease is released.
    parts.spawn("leader election", async move {
        leader_task.await.map_err(|e| match e.try_into_panic() {
            Ok(payload) => format!("panicked: {}", panic_message(payload)),
            Err(e) => e.to_string(),
        })
    });

    // Watches → index.
    let ns = settings.watch_namespace.as_deref();
    parts.spawn_until_stop(
        "Pod watcher",
        feed_index::<Pod, _>("Pod", watch_kind::<Pod>(&client, ns), index.clone(), |_| {}),
    );
    parts.spawn_until_stop(
        "Service watcher",
        feed_index::<Service, _>(
            "Service",
            watch_kind::<Service>(&client, ns),
            index.clone(),
            |_| {},
        ),
    );
    parts.spawn_until_stop(
        "EndpointSlice watcher",
        feed_index::<EndpointSlice, _>(
            "EndpointSlice",
            watch_kind::<EndpointSlice>(&client, ns),
            index.clone(),
            |_| {},
        ),
    );
    let (store, writer) = reflector::store::<ServiceRegistration>();
    let ctx = Arc::new(Context::new(
        client.clone(),
        index.clone(),
        Recorder::new(
            client.clone(),
            Reporter {
                controller: settings.controller_name.clone(),
                instance: Some(settings.lease.identity.clone()),
            },
        ),
        metrics.clone(),
        leader.clone(),
    ));
    {
        let ctx = ctx.clone();
        parts.spawn_until_stop(
            "ServiceRegistration watcher",
            feed_index::<ServiceRegistration, _>(
                "ServiceRegistration",
                reflect(writer, watch_kind::<ServiceRegistration>(&client, ns)),
                index.clone(),
                move |obj| {
                    reconcile::forget(
                        &ctx,
                        &obj.metadata.namespace.clone().unwrap_or_default(),
                        &obj.metadata.name.clone().unwrap_or_default(),
                    )
                },
            ),
        );
    }

    // Reconciler queue: the index's summary changes, plus everything whenever this replica
    // becomes the leader (statuses may have gone stale while another replica led, or none did).
    let (requeue_tx, requeue_rx) =
        tokio::sync::mpsc::unbounded_channel::<ObjectRef<ServiceRegistration>>();
    {
        let requeue_tx = requeue_tx.clone();
        let mut triggers = triggers;
        parts.spawn_until_stop("index trigger forwarder", async move {
            while let Some((ns, name)) = triggers.recv().await {
                if requeue_tx.send(ObjectRef::new(&name).within(&ns)).is_err() {
                    return;
                }
            }
        });
    }
    {
        let mut leader = leader.clone();
        let store = store.clone();
        let mut ready = index.ready();
        parts.spawn_until_stop("leader requeue", async move {
            if ready.wait_for(|r| *r).await.is_err() {
                return;
            }
            loop {
                if leader.wait_for(|l| *l).await.is_err() {
                    return;
                }
                for obj in store.state() {
                    if requeue_tx.send(ObjectRef::from_obj(obj.as_ref())).is_err() {
                        return;
                    }
                }
                if leader.wait_for(|l| !*l).await.is_err() {
                    return;
                }
            }
        });
    }
    {
        let ctx = ctx.clone();
        let store = store.clone();
        let mut ready = index.ready();
        let mut stop = shutdown.clone();
        parts.spawn("reconciler", async move {
            // Statuses are computed from a complete index only.
            if ready.wait_for(|r| *r).await.is_err() {
                return Err("index gone before its initial sync");
            }
            let queue = UnboundedReceiverStream::new(requeue_rx).map(Ok::<_, Infallible>);
            let applied = applier(
                |obj, ctx| Box::pin(reconcile::reconcile(obj, ctx)),
                reconcile::error_policy,
                ctx,
                store,
                queue,
                controller::Config::default(),
            )
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "reconcile");
                }
            });
            tokio::select! {
                _ = applied => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {}
            }
            Ok(())
        });
    }

    // Sagas, run by the leader through the mesh client fed from the index.
    if settings.sagas {
        let reporter = Reporter {
            controller: settings.controller_name.clone(),
            instance: Some(settings.lease.identity.clone()),
        };
        let sagas = crate::sagas::run(
            client.clone(),
            index.clone(),
            // Sagas run only with a complete index: right after a (re)start the Lease may be
            // ours again before the first lists are in, and an empty index would answer
            // DoesNotExist for every service a step calls.
            leader::all_true(leader.clone(), index.ready()),
            reporter,
            metrics.clone(),
            settings.watch_namespace.clone(),
            shutdown.clone(),
        );
        let mut stop = shutdown.clone();
        parts.spawn("saga controller", async move {
            // kube's graceful controller shutdown waits for reconciles in flight, and was seen
            // to hold the exit past 10 s on a loaded machine with no saga at all; a saga cut
            // short resumes from its status on the next leader, so the wait is bounded.
            tokio::select! {
                _ = sagas => {}
                _ = async {
                    let _ = stop.wait_for(|s| *s).await;
                    tokio::time::sleep(SAGA_CONTROLLER_GRACE).await;
                } => tracing::warn!(grace = ?SAGA_CONTROLLER_GRACE, "saga controller still stopping after its grace; dropped"),
            }
            Ok::<_, std::convert::Infallible>(())
        });
    }
    // The sidecar-injection webhook (every replica serves it).
    if let (Some(webhook), Some(listener)) = (settings.webhook.clone(), webhook_listener) {
        parts.spawn(
            "sidecar-injection webhook",
            crate::webhook::run(client.clone(), webhook, listener, shutdown.clone()),
        );
    }

    // Servers.
    let admin = admin::serve(
        admin_listener,
        AdminState {
            metrics: metrics.clone(),
            ready: index.ready(),
        },
        shutdown.clone(),
    );
    parts.spawn("admin server", async move {
        admin.await;
        Ok::<_, std::convert::Infallible>(())
    });
    let service = DiscoveryService::new(
        Arc::new(index.clone()),
        Arc::new(metrics.discovery.clone()),
        shutdown.clone(),
    );
    parts.spawn(
        "discovery server",
        discovery::serve(discovery_listener, service, shutdown.clone()),
    );
    parts.run(external_shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A healthy part: runs until the stop signal, then reports that it saw it.
    fn healthy(parts: &mut Supervisor) -> tokio::sync::oneshot::Receiver<()> {
        let (saw_stop, rx) = tokio::sync::oneshot::channel();
        let mut stop = parts.stop_signal();
        parts.spawn("healthy part", async move {
            let _ = stop.wait_for(|s| *s).await;
            let _ = saw_stop.send(());
            Ok::<_, String>(())
        });
        rx
    }

    async fn run_with(bad: impl FnOnce(&mut Supervisor)) -> (Result<(), Error>, bool) {
        let mut parts = Supervisor::new();
        let saw_stop = healthy(&mut parts);
        bad(&mut parts);
        let (_keep, external) = watch::channel(false);
        let result = tokio::time::timeout(Duration::from_secs(10), parts.run(external))
            .await
            .expect("the supervisor returns in time");
        (result, saw_stop.await.is_ok())
    }

    fn part_and_reason(result: Result<(), Error>) -> (&'static str, String) {
        match result {
            Err(Error::Part { part, reason }) => (part, reason),
            other => panic!("expected a part error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_panicking_part_stops_all_and_is_named() {
        let (result, stopped) = run_with(|parts| {
            parts.spawn("Pod watcher", async {
                tokio::task::yield_now().await;
                panic!("boom");
                #[allow(unreachable_code)]
                Ok::<_, String>(())
            })
        })
        .await;
        let (part, reason) = part_and_reason(result);
        assert_eq!(part, "Pod watcher");
        assert!(
            reason.contains("panicked") && reason.contains("boom"),
            "{reason}"
        );
        assert!(stopped, "the healthy part was told to stop");
    }

    #[tokio::test]
    async fn a_failing_part_stops_all_and_is_named() {
        let (result, stopped) = run_with(|parts| {
            parts.spawn("sidecar-injection webhook", async {
                Err::<(), _>("no certificate".to_string())
            })
        })
        .await;
        let (part, reason) = part_and_reason(result);
        assert_eq!(part, "sidecar-injection webhook");
        assert!(reason.contains("no certificate"), "{reason}");
        assert!(stopped);
    }

    #[tokio::test]
    async fn a_part_ending_early_stops_all_and_is_named() {
        let (result, stopped) =
            run_with(|parts| parts.spawn_until_stop("index trigger forwarder", async {})).await;
        let (part, reason) = part_and_reason(result);
        assert_eq!(part, "index trigger forwarder");
        assert!(reason.contains("ended"), "{reason}");
        assert!(stopped);
    }

    #[tokio::test]
    async fn external_shutdown_stops_all_cleanly() {
        let mut parts = Supervisor::new();
        let saw_stop = healthy(&mut parts);
        parts.spawn_until_stop("forever", std::future::pending());
        let (tx, external) = watch::channel(false);
        let run = tokio::spawn(parts.run(external));
        tx.send_replace(true);
        let result = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("in time")
            .expect("no panic");
        assert!(result.is_ok(), "{result:?}");
        assert!(saw_stop.await.is_ok());
    }
}
