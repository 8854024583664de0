//! Local mode's discovery source: the registrations from the manifest directory, served by the
//! operator's own discovery gRPC server ([`sagamesh_discovery::server`]), so sidecars in local
//! mode watch exactly the API they watch in a cluster.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use sagamesh_discovery::name::ServiceKey;
use sagamesh_discovery::proto::Snapshot;
use sagamesh_discovery::server::Source;
use sagamesh_discovery::{Discover, Resolution, Watches};
use tokio::sync::watch;

use crate::runner::RegistrationSink;

/// Registrations by namespace and name, with one watch channel per watched service.
pub struct LocalDiscovery {
    ready: watch::Sender<bool>,
    revision: AtomicU64,
    current: Mutex<HashMap<ServiceKey, Arc<Snapshot>>>,
    watches: Watches,
}

impl LocalDiscovery {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            ready: watch::channel(false).0,
            revision: AtomicU64::new(0),
            current: Mutex::default(),
            watches: Watches::default(),
        })
    }

    fn next_revision(&self) -> u64 {
        self.revision.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn current(&self) -> std::sync::MutexGuard<'_, HashMap<ServiceKey, Arc<Snapshot>>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RegistrationSink for LocalDiscovery {
    fn set(&self, namespace: &str, name: &str, snapshot: Snapshot) {
        let key = ServiceKey::new(namespace, name);
        let snapshot = Arc::new(snapshot);
        let mut current = self.current();
        if current.get(&key) != Some(&snapshot) {
            current.insert(key.clone(), snapshot.clone());
            // Under the table's lock, so a concurrent watch sees the old state or this one.
            self.watches
                .set_if_watched(&key, Resolution::snapshot(self.next_revision(), snapshot));
        }
    }

    fn remove(&self, namespace: &str, name: &str) {
        let key = ServiceKey::new(namespace, name);
        let mut current = self.current();
        if current.remove(&key).is_some() {
            self.watches
                .set_if_watched(&key, Resolution::does_not_exist(self.next_revision()));
        }
    }

    fn loaded(&self) {
        self.ready.send_replace(true);
    }
}

impl Discover for LocalDiscovery {
    fn watch(&self, service: &ServiceKey) -> watch::Receiver<Resolution> {
        let current = self.current();
        let snapshot = current.get(service).cloned();
        self.watches
            .subscribe(service, || Resolution::of(self.next_revision(), snapshot))
            .0
    }

    fn debug_state(&self) -> serde_json::Value {
        serde_json::json!({"source": "local", "services": self.watches.to_json()})
    }

    fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }
}

impl Source for LocalDiscovery {
    fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    fn release(&self, service: &ServiceKey) {
        self.watches.release(service);
    }
}
