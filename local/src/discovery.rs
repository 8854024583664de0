//! Local mode's discovery source: the registrations from the manifest directory, served by the
//! operator's own discovery gRPC server ([`sagamesh_discovery::server`]), so sidecars in local
//! mode watch exactly the API they watch in a cluster.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use sagamesh_discovery::proto::Snapshot;
use sagamesh_discovery::server::{View, ViewSource};
use tokio::sync::watch;

use crate::runner::RegistrationSink;

type Key = (String, String);

/// Registrations by namespace and name, with one watch channel per watched service.
pub struct LocalDiscovery {
    ready: watch::Sender<bool>,
    revision: AtomicU64,
    current: Mutex<HashMap<Key, Snapshot>>,
    watches: Mutex<HashMap<Key, watch::Sender<Arc<View>>>>,
}

impl LocalDiscovery {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            ready: watch::channel(false).0,
            revision: AtomicU64::new(0),
            current: Mutex::default(),
            watches: Mutex::default(),
        })
    }

    fn next_revision(&self) -> u64 {
        self.revision.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn view(&self, snapshot: Option<Snapshot>) -> Arc<View> {
        Arc::new(View {
            revision: self.next_revision(),
            changed_at: Instant::now(),
            snapshot,
        })
    }

    fn publish(&self, key: &Key, snapshot: Option<Snapshot>) {
        let watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = watches.get(key) {
            tx.send_replace(self.view(snapshot));
        }
    }
}

impl RegistrationSink for LocalDiscovery {
    fn set(&self, namespace: &str, name: &str, snapshot: Snapshot) {
        let key = (namespace.to_string(), name.to_string());
        let changed = {
            let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            current.insert(key.clone(), snapshot.clone()).as_ref() != Some(&snapshot)
        };
        if changed {
            self.publish(&key, Some(snapshot));
        }
    }

    fn remove(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        if self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key)
            .is_some()
        {
            self.publish(&key, None);
        }
    }

    fn loaded(&self) {
        self.ready.send_replace(true);
    }
}

impl ViewSource for LocalDiscovery {
    fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    fn subscribe(&self, namespace: &str, service: &str) -> watch::Receiver<Arc<View>> {
        let key = (namespace.to_string(), service.to_string());
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = watches.get(&key) {
            return tx.subscribe();
        }
        let snapshot = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let (tx, rx) = watch::channel(self.view(snapshot));
        watches.insert(key, tx);
        rx
    }

    fn release(&self, namespace: &str, service: &str) {
        let key = (namespace.to_string(), service.to_string());
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        if watches.get(&key).is_some_and(|tx| tx.receiver_count() == 0) {
            watches.remove(&key);
        }
    }
}
