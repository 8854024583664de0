//! Discovery from ServiceRegistration manifests on disk: one YAML file, or every `*.yaml` /
//! `*.yml` file of a directory (not recursive). Multi-document files are fine; documents of other
//! kinds (e.g. `Saga`) are ignored. Only registrations with explicit `spec.endpoints` can be
//! served without a cluster; a selector-based one is reported and skipped.
//!
//! The path is polled (modification times, sizes and the file list) every `interval`; a change
//! reloads everything. A file that fails to parse is logged with its name and error and its last
//! good content is kept; every other file keeps working.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::proto as pb;
use sagamesh_manifest::Manifest;
use tokio::sync::watch;

use crate::name::ServiceKey;
use crate::{Discover, Resolution, Watches};

/// Why a manifest file was not used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read: {0}")]
    Read(#[from] std::io::Error),
    /// What the one manifest loader (`sagamesh-manifest`, as `sagamesh local`) refused: each
    /// problem with its file, line and field.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<sagamesh_manifest::ManifestError>),
    /// A valid registration a sidecar cannot serve from files.
    #[error("{file}:{line}: {message}")]
    Unservable {
        file: PathBuf,
        line: usize,
        message: String,
    },
}

/// Parses the ServiceRegistrations of one file into snapshots, checked as `sagamesh local` and
/// the API server check them; Sagas in the file are checked too, then ignored. Any problem
/// refuses the whole file (its last good content stays in use).
pub fn parse_manifests(
    file: &Path,
    text: &str,
    default_namespace: &str,
) -> Result<Vec<(ServiceKey, pb::Snapshot)>, ManifestError> {
    let loaded = sagamesh_manifest::load_str(file, text);
    if !loaded.errors.is_empty() {
        return Err(ManifestError::Invalid(loaded.errors));
    }
    let mut out = Vec::new();
    for located in loaded.manifests {
        let Manifest::ServiceRegistration(reg) = located.manifest else {
            continue;
        };
        let unservable = |message: String| ManifestError::Unservable {
            file: located.file.clone(),
            line: located.line,
            message,
        };
        // The loader checked the name (a DNS label).
        let name = reg.metadata.name.clone().unwrap_or_default();
        let namespace = reg
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| default_namespace.to_string());
        if reg.spec.endpoints.is_none() {
            return Err(unservable(format!(
                "{name}: only spec.endpoints can be served from files (spec.selector needs the cluster)"
            )));
        }
        let snapshot = pb::snapshot_from_spec(&namespace, &name, &reg.spec)
            .map_err(|e| unservable(format!("{name}: {e}")))?;
        out.push((ServiceKey::new(namespace, name), snapshot));
    }
    Ok(out)
}

type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

struct State {
    /// Last good parse of each file.
    files: HashMap<PathBuf, Vec<(ServiceKey, pb::Snapshot)>>,
    errors: BTreeMap<String, String>,
    fingerprint: Option<Fingerprint>,
}

/// Manifest-file discovery. Drop stops the polling task.
pub struct FileDiscovery {
    path: PathBuf,
    default_namespace: String,
    watches: Watches,
    state: Mutex<State>,
    revision: AtomicU64,
    loaded: AtomicBool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl FileDiscovery {
    /// Loads `path` now and polls it every `interval` from a background task.
    pub fn spawn(
        path: impl Into<PathBuf>,
        default_namespace: &str,
        interval: Duration,
    ) -> Arc<Self> {
        let this = Arc::new(FileDiscovery {
            path: path.into(),
            default_namespace: default_namespace.to_string(),
            watches: Watches::default(),
            state: Mutex::new(State {
                files: HashMap::new(),
                errors: BTreeMap::new(),
                fingerprint: None,
            }),
            revision: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
            task: Mutex::new(None),
        });
        this.reload_if_changed();
        let weak = Arc::downgrade(&this);
        let handle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                // File I/O is small and rare; keep it off the async workers anyway.
                let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
            }
        });
        if let Ok(mut t) = this.task.lock() {
            *t = Some(handle);
        }
        this
    }

    fn files(&self) -> Vec<PathBuf> {
        if self.path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(&self.path)
                .map(|rd| {
                    rd.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| {
                            p.is_file()
                                && matches!(
                                    p.extension().and_then(|e| e.to_str()),
                                    Some("yaml" | "yml")
                                )
                        })
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            files
        } else {
            vec![self.path.clone()]
        }
    }

    fn fingerprint(files: &[PathBuf]) -> Fingerprint {
        files
            .iter()
            .map(|p| {
                let md = std::fs::metadata(p).ok();
                (
                    p.clone(),
                    md.as_ref().and_then(|m| m.modified().ok()),
                    md.map(|m| m.len()).unwrap_or(0),
                )
            })
            .collect()
    }

    /// Reloads when the files changed; returns whether it did.
    pub fn reload_if_changed(&self) -> bool {
        let files = self.files();
        let fp = Self::fingerprint(&files);
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if state.fingerprint.as_ref() == Some(&fp) {
            return false;
        }
        state.fingerprint = Some(fp);
        state.files.retain(|p, _| files.contains(p));
        state.errors.clear();
        for file in &files {
            let parsed = std::fs::read_to_string(file)
                .map_err(ManifestError::from)
                .and_then(|text| parse_manifests(file, &text, &self.default_namespace));
            match parsed {
                Ok(services) => {
                    state.files.insert(file.clone(), services);
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "manifest ignored; its last good content (if any) stays in use");
                    state
                        .errors
                        .insert(file.display().to_string(), e.to_string());
                }
            }
        }
        let mut all: HashMap<ServiceKey, pb::Snapshot> = HashMap::new();
        for services in state.files.values() {
            for (k, s) in services {
                if all.insert(k.clone(), s.clone()).is_some() {
                    tracing::warn!(service = %k, "service defined in more than one manifest; one wins");
                }
            }
        }
        let revision = self.revision.fetch_add(1, Ordering::Relaxed) + 1;
        drop(state);
        self.watches
            .update_all(|key| Resolution::of(revision, all.remove(key).map(Arc::new)));
        // Services nobody watches yet are created on first watch from the stored files.
        self.loaded.store(true, Ordering::Relaxed);
        tracing::info!(path = %self.path.display(), revision, "manifests loaded");
        true
    }

    fn lookup(&self, key: &ServiceKey) -> Resolution {
        let state = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let revision = self.revision.load(Ordering::Relaxed);
        state
            .files
            .values()
            .flatten()
            .find(|(k, _)| k == key)
            .map(|(_, s)| Resolution::snapshot(revision, Arc::new(s.clone())))
            .unwrap_or_else(|| Resolution::does_not_exist(revision))
    }

    /// Files that failed to load, with their errors.
    pub fn errors(&self) -> BTreeMap<String, String> {
        self.state
            .lock()
            .map(|s| s.errors.clone())
            .unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FileDiscovery {
    fn drop(&mut self) {
        if let Ok(mut t) = self.task.lock()
            && let Some(h) = t.take()
        {
            h.abort();
        }
    }
}

impl Discover for FileDiscovery {
    fn watch(&self, service: &ServiceKey) -> watch::Receiver<Resolution> {
        self.watches.subscribe(service, || self.lookup(service)).0
    }

    fn debug_state(&self) -> serde_json::Value {
        serde_json::json!({
            "source": "file",
            "path": self.path.display().to_string(),
            "errors": self.errors(),
            "services": self.watches.to_json(),
        })
    }

    fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: sagamesh.io/v1alpha1
kind: ServiceRegistration
metadata: {name: orders, namespace: shop}
spec:
  endpoints:
    - {address: 127.0.0.2, port: 8080, weight: 2}
  ports: [{name: http, port: 80}]
  loadBalancer: {policy: RoundRobin}
---
apiVersion: sagamesh.io/v1alpha1
kind: Saga
metadata: {name: ignored}
spec:
  steps:
    - {name: create, action: {service: orders, path: /orders}}
---
apiVersion: sagamesh.io/v1alpha1
kind: ServiceRegistration
metadata: {name: payments}
spec:
  endpoints: [{address: 127.0.0.3, port: 9090}]
  ports: [{name: grpc, port: 90, protocol: GRPC}]
"#;

    fn parse(text: &str) -> Result<Vec<(ServiceKey, pb::Snapshot)>, ManifestError> {
        parse_manifests(Path::new("m.yaml"), text, "default")
    }

    #[test]
    fn parses_multi_document_files() {
        let out = parse(GOOD).expect("parse");
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, ServiceKey::new("shop", "orders"));
        assert_eq!(out[0].1.endpoints[0].weight, 2);
        assert_eq!(out[1].0, ServiceKey::new("default", "payments"));
    }

    /// What `sagamesh local` refuses, the sidecar refuses, with the same file, line and field.
    #[test]
    fn refuses_what_local_mode_refuses_naming_file_line_and_field() {
        let bad_port = GOOD.replace("port: 8080, weight: 2", "port: 99999, weight: 2");
        let e = parse(&bad_port).expect_err("port out of range");
        assert!(
            e.to_string()
                .starts_with("m.yaml:7: spec.endpoints[0].port: "),
            "{e}"
        );
        let loaded = sagamesh_manifest::load_str(Path::new("m.yaml"), &bad_port);
        assert_eq!(e.to_string(), loaded.errors[0].to_string());

        // No apiVersion: the API server would not take it either.
        let e = parse("kind: ServiceRegistration\nmetadata: {name: x}\nspec: {ports: 5}\n")
            .expect_err("bad");
        assert!(e.to_string().contains("apiVersion"), "{e}");
        // An invalid Saga refuses the file too, though the sidecar does not use Sagas.
        let bad_saga = GOOD.replace("path: /orders", "path: orders");
        let e = parse(&bad_saga).expect_err("bad saga");
        assert!(e.to_string().contains("spec.steps[0].action.path"), "{e}");
        let e = parse("a: [").expect_err("bad yaml");
        assert!(e.to_string().contains("invalid YAML"), "{e}");
    }

    #[test]
    fn selector_registrations_cannot_be_served_from_files() {
        let selector = "apiVersion: sagamesh.io/v1alpha1\nkind: ServiceRegistration\nmetadata: {name: x}\nspec: {selector: {app: x}, ports: [{name: http, port: 80}]}\n";
        let e = parse(selector).expect_err("selector");
        assert!(
            matches!(e, ManifestError::Unservable { line: 1, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("spec.endpoints"), "{e}");
    }
}
