//! Wiring: watches feed the index; the index feeds the reconciler (kube-runtime's controller
//! `applier`, the engine of `Controller`) and the discovery server; leader election gates the
//! writers; the admin server reports on all of it.
//!
//! Why `applier` rather than `Controller::new(..).run(..)`: the reconciler must also run when the
//! index (pods, EndpointSlices, Services) changes a registration's summary, and `Controller`'s
//! ways to add such a trigger (`reconcile_on`, shared streams) sit behind unstable features in
//! kube-runtime 5. `applier` is the stable function `Controller::run` is built on: same
//! scheduler, deduplication and per-object serialisation, with our own queue.

use std::convert::Infallible;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;

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
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::admin::{self, AdminState};
use crate::discovery::{self, Discover, DiscoveryService};
use crate::index::{Indexed, SharedIndex};
use crate::leader::{self, LeaseConfig};
use crate::metrics::Metrics;
use crate::reconcile::{self, Context};

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
    #[error("discovery gRPC server: {0}")]
    Discovery(#[from] tonic::transport::Error),
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
    mut external_shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    // Our own stop signal: the caller's shutdown, or the discovery server failing.
    let (stop_tx, shutdown) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            let _ = external_shutdown.wait_for(|s| *s).await;
            stop_tx.send_replace(true);
        });
    }
    let metrics = Arc::new(Metrics::default());
    let (index, triggers) = SharedIndex::new();

    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { what, addr, source })
    };
    let discovery_listener = bind("discovery", settings.discovery_addr).await?;
    let admin_listener = bind("admin", settings.admin_addr).await?;
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

    // Watches → index.
    let ns = settings.watch_namespace.as_deref();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(feed_index::<Pod, _>(
        "Pod",
        watch_kind::<Pod>(&client, ns),
        index.clone(),
        |_| {},
    ));
    tasks.spawn(feed_index::<Service, _>(
        "Service",
        watch_kind::<Service>(&client, ns),
        index.clone(),
        |_| {},
    ));
    tasks.spawn(feed_index::<EndpointSlice, _>(
        "EndpointSlice",
        watch_kind::<EndpointSlice>(&client, ns),
        index.clone(),
        |_| {},
    ));
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
        tasks.spawn(feed_index::<ServiceRegistration, _>(
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
        ));
    }

    // Reconciler queue: the index's summary changes, plus everything whenever this replica
    // becomes the leader (statuses may have gone stale while another replica led, or none did).
    let (requeue_tx, requeue_rx) =
        tokio::sync::mpsc::unbounded_channel::<ObjectRef<ServiceRegistration>>();
    {
        let requeue_tx = requeue_tx.clone();
        let mut triggers = triggers;
        tasks.spawn(async move {
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
        tasks.spawn(async move {
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
        tasks.spawn(async move {
            // Statuses are computed from a complete index only.
            if ready.wait_for(|r| *r).await.is_err() {
                return;
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
        });
    }

    // Sagas, run by the leader through the mesh client fed from the index.
    if settings.sagas {
        let reporter = Reporter {
            controller: settings.controller_name.clone(),
            instance: Some(settings.lease.identity.clone()),
        };
        tasks.spawn(crate::sagas::run(
            client.clone(),
            index.clone(),
            // Sagas run only with a complete index: right after a (re)start the Lease may be
            // ours again before the first lists are in, and an empty index would answer
            // DoesNotExist for every service a step calls.
            leader::all_true(leader.clone(), index.ready()),
            reporter,
            metrics.saga.clone(),
            settings.watch_namespace.clone(),
            shutdown.clone(),
        ));
    }
    // The sidecar-injection webhook (every replica serves it).
    if let Some(webhook) = settings.webhook.clone() {
        let (client, shutdown) = (client.clone(), shutdown.clone());
        tasks.spawn(async move {
            if let Err(e) = crate::webhook::run(client, webhook, shutdown).await {
                tracing::error!(error = %e, "the sidecar-injection webhook stopped");
            }
        });
    }

    // Servers.
    tasks.spawn(admin::serve(
        admin_listener,
        AdminState {
            metrics: metrics.clone(),
            ready: index.ready(),
        },
        shutdown.clone(),
    ));
    let service = DiscoveryService::new(Arc::new(index.clone()), metrics.clone(), shutdown.clone());
    let result = discovery::serve(discovery_listener, service, shutdown.clone()).await;

    // The discovery server returns on shutdown (or failure): stop the rest.
    stop_tx.send_replace(true);
    tasks.abort_all();
    // Release the Lease (bounded inside the task).
    let _ = leader_task.await;
    result.map_err(Error::from)
}
