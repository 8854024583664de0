//! Discovery from ServiceRegistration manifests on disk: one YAML file, or every `*.yaml` /
//! `*.yml` file of a directory (not recursive). Multi-document files are fine; documents of other
//! kinds (e.g. `Saga`) are checked, then ignored. Only registrations with explicit
//! `spec.endpoints` can be served without a cluster; a selector-based one refuses its file.
//!
//! The files are checked by a [`ManifestChecker`]: the one manifest loader (`sagamesh-manifest`,
//! as `sagamesh local` and the API server check them). The sidecar runs it as a short-lived child
//! process, `sagamesh-manifest-check --json FILE...`, so that the validator — CRD schemas, CEL,
//! the YAML parser — is neither linked into the proxy nor resident between reloads (it would
//! roughly double the sidecar's idle RSS; docs/benchmarks.md). Programs that link the loader
//! anyway (`sagamesh sidecar`, tests) check in-process.
//!
//! The path is polled (modification times, sizes and the file list) every `interval`; a change
//! reloads everything. A file that fails its check is logged with its problems and its last good
//! content is kept; every other file keeps working. When the checker itself fails (cannot start,
//! crashes, times out), every file keeps its last good content.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::proto as pb;
use sagamesh_api::manifest_report::FileReport;
use tokio::sync::watch;

use crate::name::ServiceKey;
use crate::{Discover, Resolution, Watches};

/// The checker program's name; the sidecar looks for it beside its own binary, then on `PATH`.
pub const CHECKER_PROGRAM: &str = "sagamesh-manifest-check";
/// How long one run of a checker program may take before it is killed.
pub const CHECKER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a manifest file was not used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// What the manifest loader refused: each problem as `file:line: field: message`.
    #[error("{}", .0.join("; "))]
    Invalid(Vec<String>),
    /// A valid registration a sidecar cannot serve from files.
    #[error("{file}:{line}: {message}")]
    Unservable {
        file: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{0}: missing from the manifest checker's report")]
    NotReported(PathBuf),
}

/// Why the checker gave no reports.
#[derive(Debug, thiserror::Error)]
pub enum CheckerError {
    #[error(
        "cannot run the manifest checker {program:?}: {source} (it ships with the sidecar as {CHECKER_PROGRAM}: `cargo build -p sagamesh-manifest`, then put it beside sagamesh-sidecar, on PATH, or name it with --manifest-checker)"
    )]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("the manifest checker {program:?} {status}: {stderr}")]
    Failed {
        program: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("the manifest checker {program:?} did not finish within {timeout:?} and was killed")]
    Timeout { program: PathBuf, timeout: Duration },
    #[error("the manifest checker {program:?} printed an unreadable report: {source}")]
    Report {
        program: PathBuf,
        source: serde_json::Error,
    },
    #[error("waiting for the manifest checker {program:?}: {source}")]
    Wait {
        program: PathBuf,
        source: std::io::Error,
    },
}

type CheckFn = dyn Fn(&[PathBuf]) -> Result<Vec<FileReport>, CheckerError> + Send + Sync;

/// Checks manifest files: one [`FileReport`] per file, in order.
#[derive(Clone)]
pub struct ManifestChecker(Arc<CheckFn>);

impl ManifestChecker {
    /// Runs `program --json FILE...` for every check and reads its JSON reports from stdout;
    /// a run longer than `timeout` is killed.
    pub fn command(program: impl Into<PathBuf>, timeout: Duration) -> Self {
        let program = program.into();
        ManifestChecker(Arc::new(move |files: &[PathBuf]| {
            run_checker(&program, files, timeout)
        }))
    }

    /// Checks in this process (for programs that link `sagamesh-manifest` anyway).
    pub fn in_process(
        check: impl Fn(&[PathBuf]) -> Vec<FileReport> + Send + Sync + 'static,
    ) -> Self {
        ManifestChecker(Arc::new(move |files: &[PathBuf]| Ok(check(files))))
    }

    pub fn check(&self, files: &[PathBuf]) -> Result<Vec<FileReport>, CheckerError> {
        (self.0)(files)
    }
}

fn run_checker(
    program: &Path,
    files: &[PathBuf],
    timeout: Duration,
) -> Result<Vec<FileReport>, CheckerError> {
    let mut child = Command::new(program)
        .arg("--json")
        .arg("--")
        .args(files)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| CheckerError::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
    // Both pipes are drained while the child runs, or a large report would block it.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let failed = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                break Err(CheckerError::Timeout {
                    program: program.to_path_buf(),
                    timeout,
                });
            }
            Err(source) => {
                break Err(CheckerError::Wait {
                    program: program.to_path_buf(),
                    source,
                });
            }
        }
    };
    let status = match failed {
        Ok(status) => status,
        Err(e) => {
            // Killed by its PID (the handle), then reaped.
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        return Err(CheckerError::Failed {
            program: program.to_path_buf(),
            status,
            stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
        });
    }
    serde_json::from_slice(&stdout).map_err(|source| CheckerError::Report {
        program: program.to_path_buf(),
        source,
    })
}

/// Reads a child's pipe to its end on a thread of its own.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Turns one file's report into snapshots; any problem, or a registration without
/// `spec.endpoints`, refuses the whole file.
pub fn snapshots_of(
    report: &FileReport,
    default_namespace: &str,
) -> Result<Vec<(ServiceKey, pb::Snapshot)>, ManifestError> {
    if !report.problems.is_empty() {
        return Err(ManifestError::Invalid(report.problems.clone()));
    }
    let mut out = Vec::new();
    for reg in &report.registrations {
        let unservable = |message: String| ManifestError::Unservable {
            file: report.file.clone(),
            line: reg.line,
            message,
        };
        let name = &reg.name;
        let namespace = reg.namespace.as_deref().unwrap_or(default_namespace);
        if reg.spec.endpoints.is_none() {
            return Err(unservable(format!(
                "{name}: only spec.endpoints can be served from files (spec.selector needs the cluster)"
            )));
        }
        let snapshot = pb::snapshot_from_spec(namespace, name, &reg.spec)
            .map_err(|e| unservable(format!("{name}: {e}")))?;
        out.push((ServiceKey::new(namespace, name.clone()), snapshot));
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
    checker: ManifestChecker,
    watches: Watches,
    state: Mutex<State>,
    revision: AtomicU64,
    loaded: AtomicBool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl FileDiscovery {
    /// Loads `path` now and polls it every `interval` from a background task. Fails when the
    /// checker cannot check the files now (a file's own problems are not a failure: they are
    /// logged and shown on `/debug/discovery`).
    pub fn spawn(
        path: impl Into<PathBuf>,
        default_namespace: &str,
        interval: Duration,
        checker: ManifestChecker,
    ) -> Result<Arc<Self>, CheckerError> {
        let this = Arc::new(FileDiscovery {
            path: path.into(),
            default_namespace: default_namespace.to_string(),
            checker,
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
        this.reload()?;
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
        Ok(this)
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

    /// Reloads when the files changed; returns whether it did. A checker failure is logged and
    /// shown on `/debug/discovery`; every file keeps its last good content.
    pub fn reload_if_changed(&self) -> bool {
        match self.reload() {
            Ok(changed) => changed,
            Err(e) => {
                tracing::warn!(error = %e, "manifests not checked; their last good content stays in use");
                true
            }
        }
    }

    fn reload(&self) -> Result<bool, CheckerError> {
        let files = self.files();
        let fp = Self::fingerprint(&files);
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if state.fingerprint.as_ref() == Some(&fp) {
            return Ok(false);
        }
        state.fingerprint = Some(fp);
        state.errors.clear();
        let reports = match self.checker.check(&files) {
            Ok(reports) => reports,
            Err(e) => {
                state
                    .errors
                    .insert(self.path.display().to_string(), e.to_string());
                return Err(e);
            }
        };
        state.files.retain(|p, _| files.contains(p));
        let mut reports: HashMap<PathBuf, FileReport> =
            reports.into_iter().map(|r| (r.file.clone(), r)).collect();
        for file in &files {
            let parsed = reports
                .remove(file)
                .ok_or_else(|| ManifestError::NotReported(file.clone()))
                .and_then(|report| snapshots_of(&report, &self.default_namespace));
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
        Ok(true)
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
    use sagamesh_api::manifest_report::CheckedRegistration;

    fn registration(name: &str, namespace: Option<&str>, spec: &str) -> CheckedRegistration {
        CheckedRegistration {
            line: 3,
            name: name.to_string(),
            namespace: namespace.map(str::to_string),
            spec: serde_json::from_str(spec).expect("spec"),
        }
    }

    const ENDPOINTS: &str = r#"{"endpoints": [{"address": "127.0.0.2", "port": 8080, "weight": 2}], "ports": [{"name": "http", "port": 80}]}"#;

    #[test]
    fn a_report_becomes_snapshots_in_the_default_namespace_unless_named() {
        let report = FileReport {
            file: "m.yaml".into(),
            registrations: vec![
                registration("orders", Some("shop"), ENDPOINTS),
                registration("payments", None, ENDPOINTS),
            ],
            problems: vec![],
        };
        let out = snapshots_of(&report, "default").expect("snapshots");
        assert_eq!(out[0].0, ServiceKey::new("shop", "orders"));
        assert_eq!(out[0].1.endpoints[0].weight, 2);
        assert_eq!(out[1].0, ServiceKey::new("default", "payments"));
    }

    #[test]
    fn problems_and_selector_registrations_refuse_the_file() {
        let mut report = FileReport {
            file: "m.yaml".into(),
            registrations: vec![],
            problems: vec!["m.yaml:7: spec.endpoints[0].port: too big".into()],
        };
        let e = snapshots_of(&report, "default").expect_err("problems");
        assert_eq!(e.to_string(), "m.yaml:7: spec.endpoints[0].port: too big");

        report.problems.clear();
        report.registrations = vec![registration(
            "x",
            None,
            r#"{"selector": {"app": "x"}, "ports": [{"name": "http", "port": 80}]}"#,
        )];
        let e = snapshots_of(&report, "default").expect_err("selector");
        assert!(
            matches!(e, ManifestError::Unservable { line: 3, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("spec.endpoints"), "{e}");
    }

    /// A real child process per case: a shell script standing in for the checker program.
    fn script(name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sagamesh-checker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[test]
    fn a_checker_program_gets_json_and_the_files_and_its_report_is_read() {
        // Echoes its arguments back as the report's file names.
        let program = script(
            "echo-args",
            r#"[ "$1" = --json ] && [ "$2" = -- ] || exit 9
shift 2
printf '['; sep=''; for f in "$@"; do printf '%s{"file":"%s"}' "$sep" "$f"; sep=','; done; printf ']'"#,
        );
        let checker = ManifestChecker::command(&program, CHECKER_TIMEOUT);
        let files = vec![PathBuf::from("a.yaml"), PathBuf::from("-b.yaml")];
        let reports = checker.check(&files).expect("reports");
        let got: Vec<_> = reports.iter().map(|r| r.file.clone()).collect();
        assert_eq!(got, files);
    }

    #[test]
    fn checker_failures_name_the_program_and_why() {
        let missing =
            ManifestChecker::command("/nonexistent/sagamesh-manifest-check", CHECKER_TIMEOUT);
        let e = missing.check(&[]).expect_err("missing");
        assert!(matches!(e, CheckerError::Spawn { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("/nonexistent/sagamesh-manifest-check"),
            "{e}"
        );
        assert!(e.to_string().contains("--manifest-checker"), "{e}");

        let failing = ManifestChecker::command(
            script("fails", "echo 'out of memory' >&2; exit 3"),
            CHECKER_TIMEOUT,
        );
        let e = failing.check(&[]).expect_err("fails");
        assert!(
            e.to_string().contains("exit status: 3: out of memory"),
            "{e}"
        );

        let garbage =
            ManifestChecker::command(script("garbage", "echo 'not json'"), CHECKER_TIMEOUT);
        let e = garbage.check(&[]).expect_err("garbage");
        assert!(matches!(e, CheckerError::Report { .. }), "{e}");

        let hangs =
            ManifestChecker::command(script("hangs", "exec sleep 30"), Duration::from_millis(200));
        let e = hangs.check(&[]).expect_err("hangs");
        assert!(matches!(e, CheckerError::Timeout { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_failing_checker_keeps_the_last_good_content_and_says_why() {
        let dir = std::env::temp_dir().join(format!("sagamesh-file-keep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("web.yaml"), "v1").expect("write");
        let fail = Arc::new(AtomicBool::new(false));
        let checker = {
            let fail = fail.clone();
            ManifestChecker(Arc::new(move |files: &[PathBuf]| {
                if fail.load(Ordering::Relaxed) {
                    return Err(CheckerError::Timeout {
                        program: "checker".into(),
                        timeout: Duration::ZERO,
                    });
                }
                Ok(files
                    .iter()
                    .map(|f| FileReport {
                        file: f.clone(),
                        registrations: vec![registration("web", None, ENDPOINTS)],
                        problems: vec![],
                    })
                    .collect())
            }))
        };
        let d = FileDiscovery::spawn(&dir, "default", Duration::from_secs(3600), checker)
            .expect("first load");
        let web = ServiceKey::new("default", "web");
        let rx = d.watch(&web);
        assert!(matches!(*rx.borrow(), Resolution::Snapshot { .. }));

        fail.store(true, Ordering::Relaxed);
        std::fs::write(dir.join("web.yaml"), "v2, longer").expect("write");
        assert!(d.reload_if_changed());
        assert!(
            matches!(*rx.borrow(), Resolution::Snapshot { .. }),
            "last good content kept"
        );
        let errors = d.errors();
        assert!(
            errors.values().any(|e| e.contains("did not finish")),
            "{errors:?}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
