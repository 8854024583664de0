//! The local control plane: manifests from a directory are the source of truth. It watches the
//! directory, keeps the registrations (explicit endpoints) in a discovery table, and runs every
//! Saga with the same engine as the operator, its state in the on-disk [`FileStore`].
//!
//! - A bad manifest is reported (file, line, field) and skipped; the others keep working.
//! - A Saga's spec is fixed when it first starts (as on a cluster): editing the manifest later
//!   is reported and ignored; give the saga a new name to run it again.
//! - On start, every saga the store holds that is not terminal resumes, even if its manifest is
//!   gone: a saga is never dropped.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use sagamesh_api::saga::SagaSpec;
use sagamesh_discovery::proto::snapshot_from_spec;
use sagamesh_discovery::{StaticDiscovery, name::ServiceKey};
use sagamesh_mesh::{ClientConfig, MeshClient, metrics::Metrics};
use sagamesh_saga::{
    EngineConfig, SagaRef,
    file_store::{FileStore, FileStoreError},
};
use sagamesh_saga_mesh::MeshCaller;
use tokio::task::JoinHandle;

use sagamesh_manifest::{Located, Manifest, ManifestError, load_dir};

/// Settings of the local control plane.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// Directory of ServiceRegistration and Saga manifests.
    pub manifests: PathBuf,
    /// Directory of the saga store.
    pub state: PathBuf,
    /// How often the manifest directory is checked for changes.
    pub poll: Duration,
    pub engine: EngineConfig,
    pub client: ClientConfig,
}

/// Why the local control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("saga store: {0}")]
    Store(#[from] FileStoreError),
}

type Key = (String, String);
type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

/// One registration's change, as the discovery table and its watchers see it.
pub trait RegistrationSink: Send + Sync + 'static {
    fn set(&self, namespace: &str, name: &str, snapshot: sagamesh_discovery::proto::Snapshot);
    fn remove(&self, namespace: &str, name: &str);
    /// Called after every load of the directory (the first one makes the source ready).
    fn loaded(&self) {}
}

/// The local control plane.
pub struct LocalControlPlane {
    opts: LocalOptions,
    store: FileStore,
    discovery: Arc<StaticDiscovery>,
    sinks: Vec<Arc<dyn RegistrationSink>>,
    caller: Arc<MeshCaller>,
    registered: Mutex<HashSet<Key>>,
    running: Mutex<HashMap<Key, JoinHandle<()>>>,
    errors: Mutex<Vec<ManifestError>>,
    warned: Mutex<HashSet<String>>,
    fingerprint: Mutex<Option<Fingerprint>>,
}

/// The hash of a saga's spec stored on disk (FNV-1a: the same on every build).
fn spec_hash(spec: &SagaSpec) -> String {
    let hash = sagamesh_api::stable_hash::fnv1a(&serde_json::to_vec(spec).unwrap_or_default());
    format!("{hash:016x}")
}

impl LocalControlPlane {
    /// Opens the store; nothing runs until [`LocalControlPlane::run`].
    /// Saga calls count in `mesh_metrics` (`sagamesh local` serves them on its `/metrics`).
    pub fn new(
        opts: LocalOptions,
        sinks: Vec<Arc<dyn RegistrationSink>>,
        mesh_metrics: Metrics,
    ) -> Result<Arc<Self>, LocalError> {
        let store = FileStore::open(&opts.state)?;
        let discovery = StaticDiscovery::new();
        let client = MeshClient::new(discovery.clone(), opts.client.clone(), mesh_metrics);
        Ok(Arc::new(Self {
            caller: Arc::new(MeshCaller::new(client)),
            opts,
            store,
            discovery,
            sinks,
            registered: Mutex::default(),
            running: Mutex::default(),
            errors: Mutex::default(),
            warned: Mutex::default(),
            fingerprint: Mutex::default(),
        }))
    }

    /// The store sagas are kept in.
    pub fn store(&self) -> &FileStore {
        &self.store
    }

    /// Problems in the manifests as of the last load.
    pub fn errors(&self) -> Vec<ManifestError> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs until `shutdown` resolves, then stops the sagas in flight (they resume from the
    /// store on the next start).
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        self.reload(true);
        self.resume_stored();
        let this = self.clone();
        let poll = async move {
            let mut tick = tokio::time::interval(this.opts.poll.max(Duration::from_millis(20)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                this.reload(false);
            }
        };
        tokio::select! {
            _ = poll => {}
            _ = shutdown => {}
        }
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        for (_, task) in running.drain() {
            task.abort();
        }
    }

    fn fingerprint(&self) -> Fingerprint {
        let mut files: Vec<_> = std::fs::read_dir(&self.opts.manifests)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let md = std::fs::metadata(&p).ok();
                let modified = md.as_ref().and_then(|m| m.modified().ok());
                (p, modified, md.map(|m| m.len()).unwrap_or(0))
            })
            .collect()
    }

    /// Loads the directory if it changed (or `force`), applies registrations, starts sagas.
    pub fn reload(self: &Arc<Self>, force: bool) -> bool {
        let fingerprint = self.fingerprint();
        {
            let mut last = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
            if !force && last.as_ref() == Some(&fingerprint) {
                return false;
            }
            *last = Some(fingerprint);
        }
        let loaded = load_dir(&self.opts.manifests);
        let mut errors = loaded.errors;
        for error in &errors {
            tracing::error!(file = %error.file.display(), line = error.line, field = %error.field, "{}", error.message);
        }
        let (registrations, sagas): (Vec<_>, Vec<_>) = loaded
            .manifests
            .into_iter()
            .partition(|m| matches!(m.manifest, Manifest::ServiceRegistration(_)));
        errors.extend(self.apply_registrations(&registrations));
        self.start_sagas(&sagas);
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()) = errors;
        true
    }

    fn apply_registrations(&self, registrations: &[Located]) -> Vec<ManifestError> {
        let mut errors = Vec::new();
        let mut now = HashSet::new();
        for located in registrations {
            let Manifest::ServiceRegistration(reg) = &located.manifest else {
                continue;
            };
            let (namespace, name) = (
                located.manifest.namespace().to_string(),
                located.manifest.name().to_string(),
            );
            if reg.spec.endpoints.is_none() {
                errors.push(ManifestError {
                    file: located.file.clone(),
                    line: located.line,
                    field: "spec.selector".into(),
                    message: "local mode has no pods to select: give spec.endpoints instead".into(),
                });
                continue;
            }
            match snapshot_from_spec(&namespace, &name, &reg.spec) {
                Ok(snapshot) => {
                    self.discovery.set(snapshot.clone());
                    for sink in &self.sinks {
                        sink.set(&namespace, &name, snapshot.clone());
                    }
                    now.insert((namespace, name));
                }
                Err(e) => errors.push(ManifestError {
                    file: located.file.clone(),
                    line: located.line,
                    field: String::new(),
                    message: e.to_string(),
                }),
            }
        }
        let mut registered = self.registered.lock().unwrap_or_else(|p| p.into_inner());
        for (namespace, name) in registered.difference(&now) {
            tracing::info!(%namespace, %name, "registration removed");
            self.discovery
                .remove(&ServiceKey::new(namespace.clone(), name.clone()));
            for sink in &self.sinks {
                sink.remove(namespace, name);
            }
        }
        *registered = now;
        for sink in &self.sinks {
            sink.loaded();
        }
        errors
    }

    fn warn_once(&self, message: String) {
        if self
            .warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(message.clone())
        {
            tracing::warn!("{message}");
        }
    }

    fn start_sagas(self: &Arc<Self>, sagas: &[Located]) {
        for located in sagas {
            let Manifest::Saga(saga) = &located.manifest else {
                continue;
            };
            let (namespace, name) = (
                located.manifest.namespace().to_string(),
                located.manifest.name().to_string(),
            );
            let hash = spec_hash(&saga.spec);
            let record = match self.store.load(&namespace, &name) {
                Ok(Some(record)) => {
                    if record.spec_hash != hash {
                        self.warn_once(format!(
                            "{}:{}: saga {namespace}/{name} changed after it started; a saga's spec is fixed, so the change is ignored (use a new name to run it again)",
                            located.file.display(),
                            located.line
                        ));
                    }
                    record
                }
                Ok(None) => {
                    match self
                        .store
                        .create(&namespace, &name, &hash, Some(saga.spec.clone()))
                    {
                        Ok(record) => record,
                        Err(e) => {
                            tracing::error!(%namespace, %name, error = %e, "cannot store the saga");
                            continue;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(%namespace, %name, error = %e, "cannot read the saga store");
                    continue;
                }
            };
            let spec = record.spec.clone().unwrap_or_else(|| saga.spec.clone());
            let _ = self.spawn(namespace, name, record.uid, spec, record.status);
        }
    }

    /// Resumes every non-terminal saga in the store.
    fn resume_stored(self: &Arc<Self>) {
        let stored = match self.store.list() {
            Ok(stored) => stored,
            Err(e) => {
                tracing::error!(error = %e, "cannot list the saga store");
                return;
            }
        };
        for saga in stored {
            if saga.record.status.phase.is_terminal() {
                continue;
            }
            let Some(spec) = saga.record.spec.clone() else {
                tracing::error!(namespace = %saga.namespace, name = %saga.name, "stored saga has no spec; cannot resume");
                continue;
            };
            let (namespace, name) = (saga.namespace.clone(), saga.name.clone());
            let phase = saga.record.status.phase;
            if self.spawn(
                saga.namespace,
                saga.name,
                saga.record.uid,
                spec,
                saga.record.status,
            ) {
                tracing::info!(%namespace, %name, ?phase, "resuming saga from the store");
            }
        }
    }

    fn spawn(
        self: &Arc<Self>,
        namespace: String,
        name: String,
        uid: String,
        spec: SagaSpec,
        status: sagamesh_api::saga::SagaStatus,
    ) -> bool {
        if status.phase.is_terminal() {
            return false;
        }
        let key = (namespace.clone(), name.clone());
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|_, task| !task.is_finished());
        if running.contains_key(&key) {
            return false;
        }
        let this = self.clone();
        let task = tokio::spawn(async move {
            let saga = SagaRef {
                namespace,
                name,
                uid,
            };
            match sagamesh_saga::run(
                &saga,
                &spec,
                status,
                &this.store,
                this.caller.as_ref(),
                &this.opts.engine,
            )
            .await
            {
                Ok(status) => {
                    tracing::info!(saga = %saga.name, namespace = %saga.namespace, phase = ?status.phase, "saga finished")
                }
                Err(e) => {
                    tracing::error!(saga = %saga.name, error = %e, "saga stopped; it resumes on the next start")
                }
            }
        });
        running.insert(key, task);
        true
    }
}
