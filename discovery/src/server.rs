//! The discovery gRPC server: `Watch(namespace, service)` answers with the service's full state
//! at once and then with every change.
//!
//! It knows nothing of Kubernetes: it reads each service's [`Resolution`] from a [`Source`] (the
//! operator's index, or local mode's manifest directory). Every watcher of a service shares one
//! `tokio::sync::watch` channel, so a slow watcher only ever gets the latest state (coalesced)
//! and never holds back the others, and no watcher causes an API call.

use sagamesh_api::names::is_dns_label;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::name::ServiceKey;
use crate::proto as pb;
use crate::{Discover, Resolution};
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use prometheus_client::metrics::{
    counter::Counter,
    gauge::Gauge,
    histogram::{Histogram, exponential_buckets},
};
use prometheus_client::registry::Registry;

/// The server's metrics; [`ServerMetrics::register`] names them `discovery_*` in the caller's
/// registry (the operator's: `sagamesh_operator_discovery_*`).
#[derive(Clone, Debug)]
pub struct ServerMetrics {
    /// Watch streams open.
    pub watchers: Gauge,
    /// Updates sent to watchers (coalesced per watcher).
    pub updates_sent: Counter,
    /// Time from a change in the source to its update leaving for a watcher.
    pub push_latency: Histogram,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self {
            watchers: Gauge::default(),
            updates_sent: Counter::default(),
            push_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
        }
    }
}

impl ServerMetrics {
    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "discovery_watchers",
            "Discovery Watch streams open",
            self.watchers.clone(),
        );
        registry.register(
            "discovery_updates",
            "Discovery updates sent to watchers (coalesced per watcher)",
            self.updates_sent.clone(),
        );
        registry.register(
            "discovery_push_latency_seconds",
            "Time from a change in the index to its update leaving for a watcher",
            self.push_latency.clone(),
        );
    }
}

/// A source the server can serve: a [`Discover`] (each service's [`Resolution`], from the
/// source's [`crate::Watches`] table) that also tells when its picture is complete and hears
/// when a watcher goes away. The operator's index and the local control plane implement it;
/// the operator's in-process mesh client reads the same index through [`Discover`].
pub trait Source: Discover {
    /// Becomes `true` once the source holds a complete picture (initial lists done). Watches
    /// are answered only after that, so a restarting control plane never pushes a half-empty
    /// state to the sidecars.
    fn ready(&self) -> watch::Receiver<bool>;

    /// Called when a watcher of the service goes away (after its receiver is dropped), so the
    /// source can forget services nobody watches ([`crate::Watches::release`]).
    fn release(&self, service: &ServiceKey);
}

/// How long a `Watch` waits for the source to become ready before answering `UNAVAILABLE`
/// (the sidecar then retries with backoff, keeping its last known state).
const READY_WAIT: Duration = Duration::from_secs(30);

/// The `sagamesh.discovery.v1.Discovery` service.
pub struct DiscoveryService<D> {
    source: Arc<D>,
    metrics: Arc<ServerMetrics>,
    shutdown: watch::Receiver<bool>,
}

impl<D: Source> DiscoveryService<D> {
    /// `shutdown` turning `true` ends every open stream cleanly.
    pub fn new(
        source: Arc<D>,
        metrics: Arc<ServerMetrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        DiscoveryService {
            source,
            metrics,
            shutdown,
        }
    }

    /// The tonic service, ready for `Server::add_service`.
    pub fn into_server(self) -> pb::discovery_server::DiscoveryServer<Self> {
        pb::discovery_server::DiscoveryServer::new(self)
    }
}

/// Keeps the watcher gauge right and tells the source when a watcher goes away.
struct WatchGuard<D: Source> {
    source: Arc<D>,
    metrics: Arc<ServerMetrics>,
    service: ServiceKey,
}

impl<D: Source> Drop for WatchGuard<D> {
    fn drop(&mut self) {
        self.metrics.watchers.dec();
        self.source.release(&self.service);
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::Update, Status>> + Send>>;

#[tonic::async_trait]
impl<D: Source> pb::discovery_server::Discovery for DiscoveryService<D> {
    type WatchStream = UpdateStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        if !is_dns_label(&req.namespace) || !is_dns_label(&req.service) {
            return Err(Status::invalid_argument(
                "namespace and service must be Kubernetes object names (DNS labels)",
            ));
        }
        let mut ready = self.source.ready();
        match tokio::time::timeout(READY_WAIT, ready.wait_for(|r| *r)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(Status::unavailable("control plane is shutting down")),
            Err(_) => {
                return Err(Status::unavailable(
                    "control plane has not finished its initial sync",
                ));
            }
        }
        tracing::debug!(namespace = %req.namespace, service = %req.service, caller = %req.caller, "watch opened");

        let service = ServiceKey::new(&req.namespace, &req.service);
        let rx = self.source.watch(&service);
        self.metrics.watchers.inc();
        // The guard lives in the stream's closure: it drops (after the receiver, which
        // `WatchStream` owns and drops first) when the client goes away or the server stops.
        let guard = WatchGuard {
            source: self.source.clone(),
            metrics: self.metrics.clone(),
            service,
        };
        let metrics = self.metrics.clone();
        let mut first = true;
        let mut shutdown = self.shutdown.clone();
        let stopped = async move {
            // A closed sender also means shutdown.
            let _ = shutdown.wait_for(|s| *s).await;
        };
        let stream = WatchStream::new(rx)
            .filter_map(move |state: Resolution| {
                let _keep = &guard;
                // A ready source never holds a pending state; if one did, there is nothing to say.
                let update = state.to_update();
                if let Some(changed_at) = state.changed_at().filter(|_| update.is_some()) {
                    if first {
                        first = false;
                    } else {
                        metrics
                            .push_latency
                            .observe(changed_at.elapsed().as_secs_f64());
                    }
                    metrics.updates_sent.inc();
                }
                std::future::ready(update.map(Ok))
            })
            .take_until(stopped);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves the discovery API on `listener` until `shutdown` turns `true`.
pub async fn serve<D: Source>(
    listener: tokio::net::TcpListener,
    service: DiscoveryService<D>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut signal = shutdown.clone();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = signal.wait_for(|s| *s).await;
        });
    // Every Watch stream ends on shutdown, but a graceful HTTP/2 shutdown then waits for each
    // client to close its connection, and a sidecar that is slow to read the GOAWAY would hold
    // the operator's exit (and the replica's rollout) for as long as it likes: after
    // DRAIN_CONNECTIONS the remaining connections are dropped.
    let mut drained = shutdown;
    tokio::select! {
        served = server => served,
        _ = async {
            let _ = drained.wait_for(|s| *s).await;
            tokio::time::sleep(DRAIN_CONNECTIONS).await;
        } => {
            tracing::debug!(after = ?DRAIN_CONNECTIONS, "discovery: closing connections still open after shutdown");
            Ok(())
        }
    }
}

/// How long discovery connections get to close after shutdown (their streams have ended).
const DRAIN_CONNECTIONS: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;
    use pb::discovery_server::Discovery as _;
    use std::sync::Mutex;

    /// A source with one settable state per service.
    struct Fake {
        ready: watch::Sender<bool>,
        watches: crate::Watches,
        released: Mutex<Vec<String>>,
    }

    impl Fake {
        fn new() -> Arc<Self> {
            Arc::new(Fake {
                ready: watch::channel(true).0,
                watches: crate::Watches::default(),
                released: Mutex::new(Vec::new()),
            })
        }
        fn set(&self, service: &str, state: Resolution) {
            self.watches.set(&ServiceKey::new("ns", service), state);
        }
    }

    impl Discover for Fake {
        fn watch(&self, service: &ServiceKey) -> watch::Receiver<Resolution> {
            self.watches
                .subscribe(service, || Resolution::does_not_exist(1))
                .0
        }
        fn debug_state(&self) -> serde_json::Value {
            self.watches.to_json()
        }
    }

    impl Source for Fake {
        fn ready(&self) -> watch::Receiver<bool> {
            self.ready.subscribe()
        }
        fn release(&self, service: &ServiceKey) {
            self.released
                .lock()
                .expect("lock")
                .push(service.name.to_string());
        }
    }

    fn snapshot(addresses: &[&str]) -> pb::Snapshot {
        pb::Snapshot {
            namespace: "ns".into(),
            service: "orders".into(),
            endpoints: addresses
                .iter()
                .map(|a| pb::Endpoint {
                    address: (*a).into(),
                    port: 80,
                    ready: true,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn request(service: &str) -> Request<pb::WatchRequest> {
        Request::new(pb::WatchRequest {
            namespace: "ns".into(),
            service: service.into(),
            caller: "test".into(),
        })
    }

    #[tokio::test]
    async fn sends_current_state_then_latest_change_coalesced() {
        let fake = Fake::new();
        let metrics = Arc::new(ServerMetrics::default());
        let (_stop_tx, stop) = watch::channel(false);
        let svc = DiscoveryService::new(fake.clone(), metrics.clone(), stop);
        let mut stream = svc
            .watch(request("orders"))
            .await
            .expect("watch")
            .into_inner();
        let first = stream.next().await.expect("first").expect("ok");
        assert_eq!(first.revision, 1);
        assert!(matches!(
            first.kind,
            Some(pb::update::Kind::DoesNotExist(_))
        ));
        // Three changes while the watcher is not reading: it gets only the last one.
        for (rev, addrs) in [
            (2, vec!["10.0.0.1"]),
            (3, vec!["10.0.0.2"]),
            (4, vec!["10.0.0.3"]),
        ] {
            fake.set(
                "orders",
                Resolution::snapshot(rev, Arc::new(snapshot(&addrs))),
            );
        }
        let next = stream.next().await.expect("next").expect("ok");
        assert_eq!(next.revision, 4);
        let Some(pb::update::Kind::Snapshot(s)) = next.kind else {
            panic!("expected a snapshot");
        };
        assert_eq!(s.endpoints[0].address, "10.0.0.3");
        assert_eq!(metrics.watchers.get(), 1);
        drop(stream);
        assert_eq!(metrics.watchers.get(), 0);
        assert_eq!(
            fake.released.lock().expect("lock").as_slice(),
            ["orders".to_string()]
        );
    }

    #[tokio::test]
    async fn refuses_bad_names() {
        let fake = Fake::new();
        let (_stop_tx, stop) = watch::channel(false);
        let svc = DiscoveryService::new(fake, Arc::new(ServerMetrics::default()), stop);
        for bad in ["", "Orders", "a/b", "-x", &"x".repeat(64)] {
            let err = svc.watch(request(bad)).await.err().expect("refused");
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn streams_end_on_shutdown() {
        let fake = Fake::new();
        let (stop_tx, stop) = watch::channel(false);
        let svc = DiscoveryService::new(fake, Arc::new(ServerMetrics::default()), stop);
        let mut stream = svc
            .watch(request("orders"))
            .await
            .expect("watch")
            .into_inner();
        assert!(stream.next().await.is_some());
        stop_tx.send_replace(true);
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("ends in time");
        assert!(end.is_none());
    }
}
