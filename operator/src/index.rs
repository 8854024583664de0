//! The operator's one in-memory index: ServiceRegistrations, Pods, Services and EndpointSlices,
//! fed by watches, shared by the reconciler (which reads a [`Summary`] per registration) and the
//! discovery server and the operator's saga calls (which read each service's [`Resolution`]
//! through the one per-service watch table, [`Watches`]).
//!
//! Where a selector-based registration's endpoints come from:
//! - If a **Service of the same name** exists in the namespace, its **EndpointSlices win**: the
//!   Service's owner has said how the workload is exposed (its own selector, readiness as the
//!   EndpointSlice controller sees it, terminating endpoints), and `kube-proxy` agrees with it.
//!   Each registration port is matched to a slice port by name, else by number (its
//!   `targetPort`, else `port`).
//! - Otherwise **pods** matching `spec.selector` in the namespace that have an IP are the
//!   endpoints, at each port's `targetPort`; a pod is ready when its `Ready` condition is `True`
//!   and it is not being deleted.
//! - Explicit `spec.endpoints` are used as they are (all ready).
//!
//! A registration's endpoint counts are per address: a pod serving two ports counts once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use parking_lot::RwLock;
use sagamesh_api::{ServiceRegistration, service_registration as sr};
use sagamesh_discovery::proto as pb;
use tokio::sync::{mpsc, watch};

use sagamesh_discovery::name::ServiceKey;
use sagamesh_discovery::server::Source as ServedSource;
use sagamesh_discovery::{Discover, Resolution, Watches};

/// The label the EndpointSlice controller puts on a Service's slices.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

// === inputs, trimmed to what the index needs ===

/// What the index keeps of a pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodInfo {
    pub labels: BTreeMap<String, String>,
    /// `None` while the pod has no IP, or once it has finished (Succeeded/Failed).
    pub ip: Option<String>,
    pub ready: bool,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let finished = status
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        let ready = !terminating
            && status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let ip = status
            .and_then(|s| s.pod_ip.clone())
            .filter(|ip| !ip.is_empty() && !finished);
        PodInfo {
            labels: pod.labels().clone(),
            ip,
            ready,
        }
    }
}

/// A port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq)]
pub struct SlicePort {
    pub name: String,
    pub port: i32,
}

/// An endpoint of an EndpointSlice (its first address, as the API asks consumers to use).
#[derive(Clone, Debug, PartialEq)]
pub struct SliceEndpoint {
    pub address: String,
    pub ready: bool,
    pub zone: String,
}

/// What the index keeps of an EndpointSlice.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceInfo {
    /// The Service it belongs to.
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

impl SliceInfo {
    /// `None` for a slice that belongs to no Service.
    pub fn from_slice(slice: &EndpointSlice) -> Option<Self> {
        let service = slice.labels().get(SERVICE_NAME_LABEL)?.clone();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(SlicePort {
                    name: p.name.clone().unwrap_or_default(),
                    port: p.port?,
                })
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .filter_map(|e| {
                let address = e.addresses.first()?.clone();
                // A nil `ready` means ready (API docs); a terminating endpoint is never ready.
                let conditions = e.conditions.as_ref();
                let ready = conditions.and_then(|c| c.ready).unwrap_or(true)
                    && !conditions.and_then(|c| c.terminating).unwrap_or(false);
                Some(SliceEndpoint {
                    address,
                    ready,
                    zone: e.zone.clone().unwrap_or_default(),
                })
            })
            .collect();
        Some(SliceInfo {
            service,
            ports,
            endpoints,
        })
    }
}

/// What the index keeps of a ServiceRegistration: its spec, and the spec converted to the wire
/// (or why it could not be).
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    pub generation: Option<i64>,
    pub spec: sr::ServiceRegistrationSpec,
    wire: Result<Wire, String>,
}

#[derive(Clone, Debug, PartialEq)]
struct Wire {
    ports: Vec<pb::Port>,
    policy: pb::Policy,
    explicit: Vec<pb::Endpoint>,
}

impl Registration {
    pub fn new(generation: Option<i64>, spec: sr::ServiceRegistrationSpec) -> Self {
        let wire = (|| -> Result<Wire, pb::ConversionError> {
            Ok(Wire {
                ports: pb::ports_from_spec(&spec.ports)?,
                policy: pb::policy_from_spec(&spec)?,
                explicit: pb::explicit_endpoints_from_spec(&spec)?,
            })
        })()
        .map_err(|e| e.to_string());
        Registration {
            generation,
            spec,
            wire,
        }
    }

    pub fn from_object(obj: &ServiceRegistration) -> Self {
        Registration::new(obj.metadata.generation, obj.spec.clone())
    }

    fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.spec.endpoints.is_none()
            && self
                .spec
                .selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
    }
}

// === outputs ===

/// Where a registration's endpoints came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Pods,
    EndpointSlices,
    Explicit,
}

/// What resolving a registration's endpoints gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// At least one endpoint, at least one of them ready.
    EndpointsFound,
    /// Endpoints exist, none is ready.
    NoReadyEndpoints,
    /// The selector matches no pod that has an IP.
    NoMatchingPods,
    /// The same-named Service has no endpoints, or `spec.endpoints` is empty.
    NoEndpoints,
    /// The Service's EndpointSlices expose none of the registration's ports.
    InvalidPort(String),
    /// The spec could not be converted (a bad duration, ...).
    InvalidSpec(String),
}

/// The part of a resolution the status is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub generation: Option<i64>,
    pub source: Source,
    pub ready: u32,
    pub total: u32,
    pub outcome: Outcome,
}

/// A registration resolved against the index: what the reconciler reports and what watchers
/// see (as a [`Resolution`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub summary: Summary,
    /// `None` when the spec is invalid: watchers then see `DoesNotExist`.
    pub snapshot: Option<Arc<pb::Snapshot>>,
}

/// Resolves one registration against the objects of its namespace. Pure.
fn resolve(namespace: &str, name: &str, reg: &Registration, ns: &NsIndex) -> Resolved {
    let wire = match &reg.wire {
        Ok(w) => w,
        Err(msg) => {
            return Resolved {
                summary: Summary {
                    generation: reg.generation,
                    source: if reg.spec.endpoints.is_some() {
                        Source::Explicit
                    } else {
                        Source::Pods
                    },
                    ready: 0,
                    total: 0,
                    outcome: Outcome::InvalidSpec(msg.clone()),
                },
                snapshot: None,
            };
        }
    };
    let mut outcome = None;
    let (source, mut endpoints) = if reg.spec.endpoints.is_some() {
        (Source::Explicit, wire.explicit.clone())
    } else if ns.services.contains(name) {
        let mut endpoints = Vec::new();
        let mut any_address = false;
        for slice in ns.slices.values().filter(|s| s.service == name) {
            any_address |= !slice.endpoints.is_empty();
            for port in &reg.spec.ports {
                let target = port.target_port.unwrap_or(port.port);
                let Some(sp) = slice
                    .ports
                    .iter()
                    .find(|sp| !sp.name.is_empty() && sp.name == port.name)
                    .or_else(|| slice.ports.iter().find(|sp| sp.port == target))
                else {
                    continue;
                };
                let Ok(number) = u32::try_from(sp.port) else {
                    continue;
                };
                endpoints.extend(slice.endpoints.iter().map(|e| pb::Endpoint {
                    address: e.address.clone(),
                    port: number,
                    weight: 0,
                    zone: e.zone.clone(),
                    ready: e.ready,
                    port_name: port.name.clone(),
                }));
            }
        }
        if any_address && endpoints.is_empty() {
            let wanted: Vec<String> = reg
                .spec
                .ports
                .iter()
                .map(|p| format!("{} ({})", p.name, p.target_port.unwrap_or(p.port)))
                .collect();
            outcome = Some(Outcome::InvalidPort(format!(
                "the EndpointSlices of Service {name} expose none of the ports {}",
                wanted.join(", ")
            )));
        }
        (Source::EndpointSlices, endpoints)
    } else {
        let mut endpoints = Vec::new();
        for pod in ns.pods.values().filter(|p| reg.selects(&p.labels)) {
            let Some(ip) = &pod.ip else { continue };
            for port in &reg.spec.ports {
                let Ok(number) = u32::try_from(port.target_port.unwrap_or(port.port)) else {
                    continue;
                };
                endpoints.push(pb::Endpoint {
                    address: ip.clone(),
                    port: number,
                    weight: 0,
                    zone: String::new(),
                    ready: pod.ready,
                    port_name: port.name.clone(),
                });
            }
        }
        (Source::Pods, endpoints)
    };
    // Deterministic order, one entry per (address, port name): the same inputs always give the
    // same snapshot, so nothing is pushed when nothing changed.
    endpoints.sort_by(|a, b| {
        (&a.address, &a.port_name, !a.ready).cmp(&(&b.address, &b.port_name, !b.ready))
    });
    endpoints.dedup_by(|a, b| a.address == b.address && a.port_name == b.port_name);

    let mut all = BTreeSet::new();
    let mut ready = BTreeSet::new();
    for e in &endpoints {
        all.insert(e.address.as_str());
        if e.ready {
            ready.insert(e.address.as_str());
        }
    }
    let total = u32::try_from(all.len()).unwrap_or(u32::MAX);
    let ready = u32::try_from(ready.len()).unwrap_or(u32::MAX);
    let outcome = outcome.unwrap_or(if total == 0 {
        match source {
            Source::Pods => Outcome::NoMatchingPods,
            Source::EndpointSlices | Source::Explicit => Outcome::NoEndpoints,
        }
    } else if ready == 0 {
        Outcome::NoReadyEndpoints
    } else {
        Outcome::EndpointsFound
    });
    Resolved {
        summary: Summary {
            generation: reg.generation,
            source,
            ready,
            total,
            outcome,
        },
        snapshot: Some(Arc::new(pb::Snapshot {
            namespace: namespace.to_string(),
            service: name.to_string(),
            endpoints,
            ports: wire.ports.clone(),
            policy: Some(wire.policy.clone()),
        })),
    }
}

// === the index ===

#[derive(Default)]
struct NsIndex {
    registrations: HashMap<String, Registration>,
    pods: HashMap<String, PodInfo>,
    services: HashSet<String>,
    slices: HashMap<String, SliceInfo>,
    resolutions: HashMap<String, Resolved>,
}

impl NsIndex {
    fn is_empty(&self) -> bool {
        self.registrations.is_empty()
            && self.pods.is_empty()
            && self.services.is_empty()
            && self.slices.is_empty()
            && self.resolutions.is_empty()
    }
}

/// The kinds the index watches; all must have listed once before it is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Registrations,
    Pods,
    Services,
    EndpointSlices,
}

const KINDS: [Kind; 4] = [
    Kind::Registrations,
    Kind::Pods,
    Kind::Services,
    Kind::EndpointSlices,
];

/// The index proper; use it through [`SharedIndex`].
pub struct Index {
    namespaces: HashMap<String, NsIndex>,
    /// The watched services' state (the discovery server's and the saga calls' receivers).
    watches: Watches,
    next_revision: u64,
    synced: HashSet<Kind>,
    ready: watch::Sender<bool>,
    triggers: mpsc::UnboundedSender<(String, String)>,
}

/// The index, shared by the watch tasks, the reconciler and the discovery server.
#[derive(Clone)]
pub struct SharedIndex(Arc<RwLock<Index>>);

impl SharedIndex {
    /// A new, empty index. The receiver yields `(namespace, name)` of every registration whose
    /// [`Summary`] changed: the reconciler's queue.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<(String, String)>) {
        let (triggers, rx) = mpsc::unbounded_channel();
        // Revisions start at the wall clock in microseconds, so they also grow across restarts
        // of the control plane (sidecars may compare them after reconnecting).
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
            .unwrap_or(1);
        let index = Index {
            namespaces: HashMap::new(),
            watches: Watches::default(),
            next_revision: start,
            synced: HashSet::new(),
            ready: watch::channel(false).0,
            triggers,
        };
        (SharedIndex(Arc::new(RwLock::new(index))), rx)
    }

    /// The summary of one registration, if the index holds it.
    pub fn summary(&self, namespace: &str, name: &str) -> Option<Summary> {
        let index = self.0.read();
        index
            .namespaces
            .get(namespace)?
            .resolutions
            .get(name)
            .map(|r| r.summary.clone())
    }

    /// The snapshot watchers of a service see now (`None`: DoesNotExist).
    pub fn snapshot(&self, namespace: &str, name: &str) -> Option<Arc<pb::Snapshot>> {
        let index = self.0.read();
        index
            .namespaces
            .get(namespace)?
            .resolutions
            .get(name)?
            .snapshot
            .clone()
    }

    /// Whether every kind has been listed once.
    pub fn is_ready(&self) -> bool {
        *self.0.read().ready.borrow()
    }

    /// Number of registrations and of pods held (for logs and benchmarks).
    pub fn sizes(&self) -> (usize, usize) {
        let index = self.0.read();
        index.namespaces.values().fold((0, 0), |(r, p), ns| {
            (r + ns.registrations.len(), p + ns.pods.len())
        })
    }

    /// Applies one object (added or modified).
    pub fn apply<K: Indexed>(&self, obj: &K) {
        obj.apply_to(&mut self.0.write());
    }

    /// Removes one object.
    pub fn delete<K: Indexed>(&self, obj: &K) {
        obj.delete_from(&mut self.0.write());
    }

    /// Replaces every object of a kind (after a (re)list), then marks the kind synced.
    pub fn reset<K: Indexed>(&self, objs: &[K]) {
        let mut index = self.0.write();
        K::reset(&mut index, objs);
        index.synced.insert(K::KIND);
        index.recompute_all();
        if KINDS.iter().all(|k| index.synced.contains(k)) {
            index
                .ready
                .send_if_modified(|r| !std::mem::replace(r, true));
        }
    }
}

impl Index {
    fn ns(&mut self, namespace: &str) -> &mut NsIndex {
        self.namespaces.entry(namespace.to_string()).or_default()
    }

    fn recompute_all(&mut self) {
        let keys: Vec<(String, String)> = self
            .namespaces
            .iter()
            .flat_map(|(ns, idx)| {
                idx.registrations
                    .keys()
                    .chain(idx.resolutions.keys())
                    .map(move |n| (ns.clone(), n.clone()))
            })
            .chain(
                self.watches
                    .keys()
                    .into_iter()
                    .map(|key| (key.namespace, key.name)),
            )
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for (ns, name) in keys {
            self.recompute(&ns, &name);
        }
    }

    /// Re-resolves one registration; pushes to its watchers if the snapshot changed and queues a
    /// reconcile if its summary changed.
    fn recompute(&mut self, namespace: &str, name: &str) {
        let Index {
            namespaces,
            watches,
            next_revision,
            triggers,
            ..
        } = self;
        let Some(ns) = namespaces.get_mut(namespace) else {
            return;
        };
        let new = ns
            .registrations
            .get(name)
            .map(|reg| resolve(namespace, name, reg, ns));
        let old = ns.resolutions.get(name);
        if let Some(new) = &new
            && old.map(|o| &o.summary) != Some(&new.summary)
        {
            // The receiver only goes away when the operator stops.
            let _ = triggers.send((namespace.to_string(), name.to_string()));
        }
        let old_snapshot = old.and_then(|o| o.snapshot.as_ref());
        let new_snapshot = new.as_ref().and_then(|n| n.snapshot.as_ref());
        if old_snapshot != new_snapshot {
            let state = Resolution::of(*next_revision + 1, new_snapshot.cloned());
            if watches.set_if_watched(&ServiceKey::new(namespace, name), state) {
                *next_revision += 1;
            }
        }
        match new {
            Some(new) => {
                ns.resolutions.insert(name.to_string(), new);
            }
            None => {
                ns.resolutions.remove(name);
                if ns.is_empty() {
                    namespaces.remove(namespace);
                }
            }
        }
    }

    /// Registrations of a namespace whose endpoints may depend on a pod with these labels.
    fn selecting(&self, namespace: &str, labels: &[&BTreeMap<String, String>]) -> Vec<String> {
        let Some(ns) = self.namespaces.get(namespace) else {
            return Vec::new();
        };
        ns.registrations
            .iter()
            .filter(|(name, reg)| {
                !ns.services.contains(*name) && labels.iter().any(|l| reg.selects(l))
            })
            .map(|(name, _)| name.clone())
            .collect()
    }
}

impl SharedIndex {
    /// Subscribes to one service; the receiver holds its current state at once.
    pub fn subscribe(&self, namespace: &str, service: &str) -> watch::Receiver<Resolution> {
        self.watch(&ServiceKey::new(namespace, service))
    }
}

impl Discover for SharedIndex {
    fn watch(&self, service: &ServiceKey) -> watch::Receiver<Resolution> {
        // Under the lock: no change (made under the write lock) can land between reading the
        // state and subscribing.
        let index = self.0.read();
        let revision = index.next_revision;
        let snapshot = index
            .namespaces
            .get(&service.namespace)
            .and_then(|ns| ns.resolutions.get(&service.name))
            .and_then(|r| r.snapshot.clone());
        index
            .watches
            .subscribe(service, || Resolution::of(revision, snapshot))
            .0
    }

    fn debug_state(&self) -> serde_json::Value {
        serde_json::json!({"source": "index", "services": self.0.read().watches.to_json()})
    }

    fn is_ready(&self) -> bool {
        SharedIndex::is_ready(self)
    }
}

impl ServedSource for SharedIndex {
    fn ready(&self) -> watch::Receiver<bool> {
        self.0.read().ready.subscribe()
    }

    fn release(&self, service: &ServiceKey) {
        self.0.read().watches.release(service);
    }
}

// === per-kind application ===

/// A kind of object the index holds.
pub trait Indexed: Sized {
    const KIND: Kind;
    fn apply_to(&self, index: &mut Index);
    fn delete_from(&self, index: &mut Index);
    /// Replaces every object of this kind (no recompute; the caller does it).
    fn reset(index: &mut Index, objs: &[Self]);
}

fn key<K: kube::Resource>(obj: &K) -> (String, String) {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

impl Indexed for ServiceRegistration {
    const KIND: Kind = Kind::Registrations;

    fn apply_to(&self, index: &mut Index) {
        let (ns, name) = key(self);
        let reg = Registration::from_object(self);
        let slot = index.ns(&ns);
        if slot.registrations.get(&name) == Some(&reg) {
            return;
        }
        slot.registrations.insert(name.clone(), reg);
        index.recompute(&ns, &name);
    }

    fn delete_from(&self, index: &mut Index) {
        let (ns, name) = key(self);
        if index
            .namespaces
            .get_mut(&ns)
            .and_then(|s| s.registrations.remove(&name))
            .is_some()
        {
            index.recompute(&ns, &name);
        }
    }

    fn reset(index: &mut Index, objs: &[Self]) {
        for ns in index.namespaces.values_mut() {
            ns.registrations.clear();
        }
        for obj in objs {
            let (ns, name) = key(obj);
            index
                .ns(&ns)
                .registrations
                .insert(name, Registration::from_object(obj));
        }
    }
}

impl Indexed for Pod {
    const KIND: Kind = Kind::Pods;

    fn apply_to(&self, index: &mut Index) {
        let (ns, name) = key(self);
        let info = PodInfo::from_pod(self);
        let old = index.ns(&ns).pods.insert(name, info.clone());
        if old.as_ref() == Some(&info) {
            return;
        }
        let mut labels = vec![&info.labels];
        if let Some(old) = &old {
            labels.push(&old.labels);
        }
        for reg in index.selecting(&ns, &labels) {
            index.recompute(&ns, &reg);
        }
    }

    fn delete_from(&self, index: &mut Index) {
        let (ns, name) = key(self);
        let Some(old) = index
            .namespaces
            .get_mut(&ns)
            .and_then(|s| s.pods.remove(&name))
        else {
            return;
        };
        for reg in index.selecting(&ns, &[&old.labels]) {
            index.recompute(&ns, &reg);
        }
    }

    fn reset(index: &mut Index, objs: &[Self]) {
        for ns in index.namespaces.values_mut() {
            ns.pods.clear();
        }
        for obj in objs {
            let (ns, name) = key(obj);
            index.ns(&ns).pods.insert(name, PodInfo::from_pod(obj));
        }
    }
}

impl Indexed for Service {
    const KIND: Kind = Kind::Services;

    fn apply_to(&self, index: &mut Index) {
        let (ns, name) = key(self);
        if index.ns(&ns).services.insert(name.clone()) {
            index.recompute(&ns, &name);
        }
    }

    fn delete_from(&self, index: &mut Index) {
        let (ns, name) = key(self);
        if index
            .namespaces
            .get_mut(&ns)
            .is_some_and(|s| s.services.remove(&name))
        {
            index.recompute(&ns, &name);
        }
    }

    fn reset(index: &mut Index, objs: &[Self]) {
        for ns in index.namespaces.values_mut() {
            ns.services.clear();
        }
        for obj in objs {
            let (ns, name) = key(obj);
            index.ns(&ns).services.insert(name);
        }
    }
}

impl Indexed for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlices;

    fn apply_to(&self, index: &mut Index) {
        let (ns, name) = key(self);
        let info = SliceInfo::from_slice(self);
        let slot = index.ns(&ns);
        let old = match &info {
            Some(info) => slot.slices.insert(name, info.clone()),
            None => slot.slices.remove(&name),
        };
        if old == info {
            return;
        }
        let services: BTreeSet<String> = old.into_iter().chain(info).map(|s| s.service).collect();
        for service in services {
            index.recompute(&ns, &service);
        }
    }

    fn delete_from(&self, index: &mut Index) {
        let (ns, name) = key(self);
        if let Some(old) = index
            .namespaces
            .get_mut(&ns)
            .and_then(|s| s.slices.remove(&name))
        {
            index.recompute(&ns, &old.service);
        }
    }

    fn reset(index: &mut Index, objs: &[Self]) {
        for ns in index.namespaces.values_mut() {
            ns.slices.clear();
        }
        for obj in objs {
            let (ns, name) = key(obj);
            if let Some(info) = SliceInfo::from_slice(obj) {
                index.ns(&ns).slices.insert(name, info);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use kube::api::ObjectMeta;

    fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            generation: Some(1),
            ..Default::default()
        }
    }

    fn pod(name: &str, app: &str, ip: Option<&str>, ready: bool) -> Pod {
        Pod {
            metadata: meta("shop", name, &[("app", app)]),
            spec: None,
            status: Some(PodStatus {
                pod_ip: ip.map(Into::into),
                phase: Some("Running".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn sreg(name: &str, selector: Option<&[(&str, &str)]>) -> ServiceRegistration {
        let mut obj = ServiceRegistration::new(
            name,
            sr::ServiceRegistrationSpec {
                selector: selector.map(|s| {
                    s.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                }),
                endpoints: if selector.is_none() {
                    Some(vec![sr::ExplicitEndpoint {
                        address: "db.example.com".into(),
                        port: 5432,
                        ..Default::default()
                    }])
                } else {
                    None
                },
                ports: vec![sr::ServicePort {
                    name: "http".into(),
                    port: 80,
                    target_port: Some(8080),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        obj.metadata = meta("shop", name, &[]);
        obj
    }

    fn ready_index() -> (SharedIndex, mpsc::UnboundedReceiver<(String, String)>) {
        let (index, rx) = SharedIndex::new();
        index.reset::<ServiceRegistration>(&[]);
        index.reset::<Pod>(&[]);
        index.reset::<Service>(&[]);
        index.reset::<EndpointSlice>(&[]);
        assert!(index.is_ready());
        (index, rx)
    }

    fn snapshot_of(state: &Resolution) -> Option<&pb::Snapshot> {
        match state {
            Resolution::Snapshot { snapshot, .. } => Some(snapshot),
            _ => None,
        }
    }

    fn revision_of(state: &Resolution) -> u64 {
        match state {
            Resolution::Snapshot { revision, .. } | Resolution::DoesNotExist { revision, .. } => {
                *revision
            }
            Resolution::Pending => 0,
        }
    }

    fn ready_addresses(state: &Resolution) -> Vec<String> {
        snapshot_of(state)
            .iter()
            .flat_map(|s| &s.endpoints)
            .filter(|e| e.ready)
            .map(|e| e.address.clone())
            .collect()
    }

    #[test]
    fn pods_become_endpoints_and_watchers_follow() {
        let (index, mut triggers) = ready_index();
        let mut rx = index.subscribe("shop", "orders");
        assert!(snapshot_of(&rx.borrow_and_update()).is_none());
        let rev0 = revision_of(&rx.borrow());

        index.apply(&sreg("orders", Some(&[("app", "orders")])));
        assert_eq!(
            triggers.try_recv().ok(),
            Some(("shop".into(), "orders".into()))
        );
        let s = index.summary("shop", "orders").expect("summary");
        assert_eq!(s.outcome, Outcome::NoMatchingPods);
        assert!(rx.has_changed().unwrap_or(false));
        assert!(revision_of(&rx.borrow_and_update()) > rev0);

        for (i, ip) in ["127.0.0.1", "127.0.0.2", "127.0.0.3"].iter().enumerate() {
            index.apply(&pod(&format!("p{i}"), "orders", Some(ip), true));
        }
        // A pod of another app changes nothing.
        index.apply(&pod("other", "payments", Some("127.0.0.9"), true));
        let s = index.summary("shop", "orders").expect("summary");
        assert_eq!(
            (s.ready, s.total, &s.outcome),
            (3, 3, &Outcome::EndpointsFound)
        );
        let view = rx.borrow_and_update().clone();
        assert_eq!(
            ready_addresses(&view),
            ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        );
        assert_eq!(snapshot_of(&view).map(|s| s.endpoints[0].port), Some(8080));

        // Same pod again: no push, no trigger.
        while triggers.try_recv().is_ok() {}
        index.apply(&pod("p0", "orders", Some("127.0.0.1"), true));
        assert!(!rx.has_changed().unwrap_or(true));
        assert!(triggers.try_recv().is_err());

        // NotReady: still known, no longer ready.
        index.apply(&pod("p1", "orders", Some("127.0.0.2"), false));
        let view = rx.borrow_and_update().clone();
        assert_eq!(ready_addresses(&view), ["127.0.0.1", "127.0.0.3"]);
        let s = index.summary("shop", "orders").expect("summary");
        assert_eq!((s.ready, s.total), (2, 3));

        // Deleted registration: DoesNotExist.
        index.delete(&sreg("orders", Some(&[("app", "orders")])));
        assert!(snapshot_of(&rx.borrow_and_update()).is_none());
        assert!(index.summary("shop", "orders").is_none());
    }

    #[test]
    fn endpoint_slices_win_when_a_same_named_service_exists() {
        let (index, _triggers) = ready_index();
        index.apply(&sreg("orders", Some(&[("app", "orders")])));
        index.apply(&pod("p0", "orders", Some("10.0.0.1"), true));
        let service = Service {
            metadata: meta("shop", "orders", &[]),
            ..Default::default()
        };
        index.apply(&service);
        // The Service exists but has no slices yet: no endpoints.
        let s = index.summary("shop", "orders").expect("summary");
        assert_eq!(
            (s.source, s.total, &s.outcome),
            (Source::EndpointSlices, 0, &Outcome::NoEndpoints)
        );
        let slice = |port_name: &str, port: i32| EndpointSlice {
            metadata: meta("shop", "orders-abc", &[(SERVICE_NAME_LABEL, "orders")]),
            address_type: "IPv4".into(),
            endpoints: vec![
                Endpoint {
                    addresses: vec!["10.1.0.1".into()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        ..Default::default()
                    }),
                    zone: Some("a".into()),
                    ..Default::default()
                },
                Endpoint {
                    addresses: vec!["10.1.0.2".into()],
                    conditions: Some(EndpointConditions {
                        ready: Some(false),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ports: Some(vec![EndpointPort {
                name: Some(port_name.into()),
                port: Some(port),
                ..Default::default()
            }]),
        };
        index.apply(&slice("http", 9000));
        let s = index.summary("shop", "orders").expect("summary");
        assert_eq!(
            (s.ready, s.total, &s.outcome),
            (1, 2, &Outcome::EndpointsFound)
        );
        let snap = index.snapshot("shop", "orders").expect("snapshot");
        assert_eq!(snap.endpoints[0].port, 9000);
        assert_eq!(snap.endpoints[0].zone, "a");
        // Matched by number when the names differ; no match at all: InvalidPort.
        index.apply(&slice("web", 8080));
        assert_eq!(index.summary("shop", "orders").map(|s| s.total), Some(2));
        index.apply(&slice("web", 1234));
        assert!(matches!(
            index.summary("shop", "orders").map(|s| s.outcome),
            Some(Outcome::InvalidPort(_))
        ));
        // Service gone: back to pods.
        index.delete(&service);
        let s = index.summary("shop", "orders").expect("summary");
        assert_eq!((s.source, s.ready), (Source::Pods, 1));
    }

    #[test]
    fn explicit_endpoints_and_invalid_specs() {
        let (index, _triggers) = ready_index();
        index.apply(&sreg("db", None));
        let s = index.summary("shop", "db").expect("summary");
        assert_eq!((s.source, s.ready, s.total), (Source::Explicit, 1, 1));
        let mut bad = sreg("bad", None);
        bad.spec.timeout = Some("soon".into());
        index.apply(&bad);
        assert!(matches!(
            index.summary("shop", "bad").map(|s| s.outcome),
            Some(Outcome::InvalidSpec(m)) if m.contains("spec.timeout")
        ));
        assert!(index.snapshot("shop", "bad").is_none());
    }

    #[test]
    fn not_ready_until_every_kind_listed_and_release_forgets_channels() {
        let (index, _rx) = SharedIndex::new();
        index.reset::<ServiceRegistration>(&[]);
        index.reset::<Pod>(&[]);
        index.reset::<Service>(&[]);
        assert!(!index.is_ready());
        index.reset::<EndpointSlice>(&[]);
        assert!(index.is_ready());
        let key = ServiceKey::new("x", "y");
        let rx = index.subscribe("x", "y");
        index.release(&key);
        assert_eq!(
            index.0.read().watches.keys(),
            std::slice::from_ref(&key),
            "still watched"
        );
        drop(rx);
        index.release(&key);
        assert!(index.0.read().watches.keys().is_empty());
    }

    #[test]
    fn a_relist_replaces_and_pushes_only_differences() {
        let (index, _triggers) = ready_index();
        index.apply(&sreg("orders", Some(&[("app", "orders")])));
        index.apply(&pod("p0", "orders", Some("10.0.0.1"), true));
        index.apply(&pod("p1", "orders", Some("10.0.0.2"), true));
        let mut rx = index.subscribe("shop", "orders");
        rx.borrow_and_update();
        // p1 vanished while the watch was down.
        index.reset(&[pod("p0", "orders", Some("10.0.0.1"), true)]);
        assert_eq!(ready_addresses(&rx.borrow_and_update()), ["10.0.0.1"]);
        index.reset(&[pod("p0", "orders", Some("10.0.0.1"), true)]);
        assert!(!rx.has_changed().unwrap_or(true));
    }
}
