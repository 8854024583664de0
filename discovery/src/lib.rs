//! Where endpoints and policy come from, behind one trait: the control plane's gRPC stream
//! ([`grpc::GrpcDiscovery`]), a file or directory of ServiceRegistration manifests
//! ([`file::FileDiscovery`], checked by `sagamesh-manifest-check` in a child process), or a
//! fixed in-memory table ([`StaticDiscovery`], for tests and embedding).
//!
//! Every source hands out one `watch::Receiver<Resolution>` per service: the receiver always
//! holds the latest full state, so a source that loses its upstream simply stops updating it
//! and callers keep the last known state.
//!
//! [`proto`] is the discovery protocol itself (the generated gRPC code and its conversions from
//! the ServiceRegistration types); [`server`] serves it over any [`server::Source`].

pub mod file;
pub mod grpc;
pub mod name;
pub mod proto;
pub mod server;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::proto as pb;
use tokio::sync::watch;

use crate::name::ServiceKey;

/// What is known about one service: the one service-state type of Sagamesh. The control
/// plane's sources (the operator's index, the local control plane) keep it in a [`Watches`]
/// table, the discovery server streams it, and every sidecar-side source hands it to the mesh
/// client.
///
/// `revision` grows with every change (unique across a source); `changed_at` is when the source
/// made the change (for the discovery server's push-latency metric) and is not part of the
/// state: two resolutions that differ only in it are equal.
#[derive(Clone, Debug)]
pub enum Resolution {
    /// Nothing heard yet.
    Pending,
    /// The source says the service does not exist.
    DoesNotExist { revision: u64, changed_at: Instant },
    /// Full state of the service.
    Snapshot {
        revision: u64,
        changed_at: Instant,
        snapshot: Arc<pb::Snapshot>,
    },
}

impl PartialEq for Resolution {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Resolution::Pending, Resolution::Pending) => true,
            (
                Resolution::DoesNotExist { revision: a, .. },
                Resolution::DoesNotExist { revision: b, .. },
            ) => a == b,
            (
                Resolution::Snapshot {
                    revision: a,
                    snapshot: x,
                    ..
                },
                Resolution::Snapshot {
                    revision: b,
                    snapshot: y,
                    ..
                },
            ) => a == b && x == y,
            _ => false,
        }
    }
}

impl Resolution {
    /// The service's full state, changed now.
    pub fn snapshot(revision: u64, snapshot: Arc<pb::Snapshot>) -> Self {
        Resolution::Snapshot {
            revision,
            changed_at: Instant::now(),
            snapshot,
        }
    }

    /// The service does not exist, as of now.
    pub fn does_not_exist(revision: u64) -> Self {
        Resolution::DoesNotExist {
            revision,
            changed_at: Instant::now(),
        }
    }

    /// From the source's current snapshot, if any.
    pub fn of(revision: u64, snapshot: Option<Arc<pb::Snapshot>>) -> Self {
        match snapshot {
            Some(snapshot) => Resolution::snapshot(revision, snapshot),
            None => Resolution::does_not_exist(revision),
        }
    }

    /// From a discovery `Update` message; `None` if it carries neither kind.
    pub fn from_update(update: pb::Update) -> Option<Self> {
        match update.kind? {
            pb::update::Kind::Snapshot(s) => {
                Some(Resolution::snapshot(update.revision, Arc::new(s)))
            }
            pb::update::Kind::DoesNotExist(_) => Some(Resolution::does_not_exist(update.revision)),
        }
    }

    /// The discovery `Update` message for this state; `None` while pending.
    pub fn to_update(&self) -> Option<pb::Update> {
        match self {
            Resolution::Pending => None,
            Resolution::DoesNotExist { revision, .. } => Some(pb::Update {
                revision: *revision,
                kind: Some(pb::update::Kind::DoesNotExist(pb::DoesNotExist {})),
            }),
            Resolution::Snapshot {
                revision, snapshot, ..
            } => Some(pb::Update {
                revision: *revision,
                kind: Some(pb::update::Kind::Snapshot(pb::Snapshot::clone(snapshot))),
            }),
        }
    }

    /// When the source made this change (`None` while pending).
    pub fn changed_at(&self) -> Option<Instant> {
        match self {
            Resolution::Pending => None,
            Resolution::DoesNotExist { changed_at, .. }
            | Resolution::Snapshot { changed_at, .. } => Some(*changed_at),
        }
    }

    /// JSON for `/debug/discovery`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Resolution::Pending => serde_json::json!({"state": "pending"}),
            Resolution::DoesNotExist { revision, .. } => {
                serde_json::json!({"state": "does-not-exist", "revision": revision})
            }
            Resolution::Snapshot {
                revision, snapshot, ..
            } => serde_json::json!({
                "state": "snapshot",
                "revision": revision,
                "endpoints": snapshot.endpoints.iter().map(|e| serde_json::json!({
                    "address": e.address, "port": e.port, "weight": e.weight,
                    "zone": e.zone, "ready": e.ready, "portName": e.port_name,
                })).collect::<Vec<_>>(),
                "ports": snapshot.ports.iter().map(|p| serde_json::json!({
                    "name": p.name, "port": p.port, "targetPort": p.target_port,
                    "protocol": pb::Protocol::try_from(p.protocol).unwrap_or_default().as_str_name(),
                })).collect::<Vec<_>>(),
                "policy": snapshot.policy.as_ref().and_then(|p| pb::spec_from_snapshot(&pb::Snapshot {
                    policy: Some(p.clone()), ..Default::default()
                }).ok()).map(|s| serde_json::json!({
                    "loadBalancer": s.load_balancer, "circuitBreaker": s.circuit_breaker,
                    "retry": s.retry, "timeout": s.timeout,
                    "maxInFlightRequests": s.max_in_flight_requests,
                })),
            }),
        }
    }
}

/// A source of service state.
pub trait Discover: Send + Sync + 'static {
    /// Starts watching `service` (or joins the existing watch) and returns its state.
    fn watch(&self, service: &ServiceKey) -> watch::Receiver<Resolution>;

    /// Everything the source holds, as JSON (for `/debug/discovery`).
    fn debug_state(&self) -> serde_json::Value;

    /// Whether the source has loaded at least once (for `/ready`).
    fn is_ready(&self) -> bool {
        true
    }
}

/// The table of per-service watch senders every source keeps.
#[derive(Default, Debug)]
pub struct Watches {
    senders: Mutex<HashMap<ServiceKey, watch::Sender<Resolution>>>,
}

impl Watches {
    /// Subscribes, creating the entry with `initial` if new. Returns whether it was new.
    pub fn subscribe(
        &self,
        key: &ServiceKey,
        initial: impl FnOnce() -> Resolution,
    ) -> (watch::Receiver<Resolution>, bool) {
        let mut map = lock(&self.senders);
        if let Some(tx) = map.get(key) {
            return (tx.subscribe(), false);
        }
        let (tx, rx) = watch::channel(initial());
        map.insert(key.clone(), tx);
        (rx, true)
    }

    /// Sets the state of a service (creating its entry), notifying watchers only on change.
    pub fn set(&self, key: &ServiceKey, value: Resolution) {
        let mut map = lock(&self.senders);
        match map.get(key) {
            Some(tx) => {
                publish(tx, value);
            }
            None => {
                let (tx, _) = watch::channel(value);
                map.insert(key.clone(), tx);
            }
        }
    }

    /// Sets the state of a service only if someone subscribed to it (a control-plane source
    /// keeps entries only for watched services). Returns whether the entry exists.
    pub fn set_if_watched(&self, key: &ServiceKey, value: Resolution) -> bool {
        let map = lock(&self.senders);
        let Some(tx) = map.get(key) else {
            return false;
        };
        publish(tx, value);
        true
    }

    /// Forgets a service nobody watches any more (no receiver left); keeps it otherwise.
    pub fn release(&self, key: &ServiceKey) {
        let mut map = lock(&self.senders);
        if map.get(key).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(key);
        }
    }

    /// The watched services.
    pub fn keys(&self) -> Vec<ServiceKey> {
        lock(&self.senders).keys().cloned().collect()
    }

    /// Applies `f` to every entry's key to compute its new state.
    pub fn update_all(&self, mut f: impl FnMut(&ServiceKey) -> Resolution) {
        let map = lock(&self.senders);
        for (key, tx) in map.iter() {
            let value = f(key);
            publish(tx, value);
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let map = lock(&self.senders);
        let mut keys: Vec<_> = map.keys().cloned().collect();
        keys.sort();
        serde_json::Value::Object(
            keys.into_iter()
                .filter_map(|k| {
                    let v = map.get(&k)?.borrow().to_json();
                    Some((k.to_string(), v))
                })
                .collect(),
        )
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sends `value` to a service's watchers unless it has the state they already hold.
fn publish(tx: &watch::Sender<Resolution>, value: Resolution) {
    tx.send_if_modified(|cur| {
        if same_state(cur, &value) {
            false
        } else {
            *cur = value;
            true
        }
    });
}

/// Equal content, whatever the revision (a reload that changes nothing wakes nobody).
fn same_state(a: &Resolution, b: &Resolution) -> bool {
    match (a, b) {
        (Resolution::Pending, Resolution::Pending) => true,
        (Resolution::DoesNotExist { .. }, Resolution::DoesNotExist { .. }) => true,
        (Resolution::Snapshot { snapshot: x, .. }, Resolution::Snapshot { snapshot: y, .. }) => {
            x == y
        }
        _ => false,
    }
}

/// A fixed, programmable table: services are set by the embedding code. Unknown services
/// read as `DoesNotExist`.
#[derive(Default, Debug)]
pub struct StaticDiscovery {
    watches: Watches,
    revision: std::sync::atomic::AtomicU64,
}

impl StaticDiscovery {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sets a service's full state.
    pub fn set(&self, snapshot: pb::Snapshot) {
        let revision = self
            .revision
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let key = ServiceKey::new(&snapshot.namespace, &snapshot.service);
        self.watches
            .set(&key, Resolution::snapshot(revision, Arc::new(snapshot)));
    }

    /// Removes a service.
    pub fn remove(&self, key: &ServiceKey) {
        let revision = self
            .revision
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        self.watches.set(key, Resolution::does_not_exist(revision));
    }
}

impl Discover for StaticDiscovery {
    fn watch(&self, service: &ServiceKey) -> watch::Receiver<Resolution> {
        self.watches
            .subscribe(service, || Resolution::does_not_exist(0))
            .0
    }

    fn debug_state(&self) -> serde_json::Value {
        serde_json::json!({"source": "static", "services": self.watches.to_json()})
    }
}
