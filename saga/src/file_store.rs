//! The embedded durable saga store of local mode: one append-only log file per saga.
//!
//! Each write appends one JSON line `{"uid": ..., "spec_hash": ..., "status": {...}}` and fsyncs
//! before returning, so the engine's "record before acting" rule holds across a SIGKILL. Loading
//! takes the last complete line. A line torn by a crash mid-write is cut off when the store is
//! opened ([`FileStore::open`] repairs every log's tail), so the next record starts on a line of
//! its own instead of joining the torn one (which would hide it). Since the status
//! itself carries the bounded history, each line is self-contained, and a log longer than
//! [`COMPACT_AFTER`] lines is rewritten to its last line (write to a temporary file, fsync,
//! rename, fsync the directory).
//!
//! Written by hand rather than on an embedded database: the access pattern is one small record
//! per saga, appended and read back whole, which a file and fsync do with no dependency.

use sagamesh_api::names::is_dns_subdomain;
use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use sagamesh_api::saga::{SagaSpec, SagaStatus};
use serde::{Deserialize, Serialize};

use crate::{
    engine::{SagaRef, SagaStore, StoreError},
    state::Event,
};

/// Lines after which a saga's log is compacted to its last record.
pub const COMPACT_AFTER: usize = 64;

/// Errors of the file store.
#[derive(Debug, thiserror::Error)]
pub enum FileStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid saga name {0:?}: expected a DNS label")]
    InvalidName(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileStoreError + '_ {
    move |source| FileStoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One record of a saga's log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub uid: String,
    /// Hash of the spec the saga was started with (a changed manifest is not a new saga).
    pub spec_hash: String,
    /// The spec the saga runs, so it resumes even if its manifest is gone.
    #[serde(default)]
    pub spec: Option<SagaSpec>,
    pub status: SagaStatus,
}

/// A saga as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSaga {
    pub namespace: String,
    pub name: String,
    pub record: Record,
}

/// A saga's spec hash and spec.
type SpecEntry = (String, Option<SagaSpec>);

/// The directory-backed store.
#[derive(Clone)]
pub struct FileStore {
    dir: PathBuf,
    /// Per-file write lock and line count.
    files: Arc<Mutex<HashMap<PathBuf, usize>>>,
    /// The spec (and its hash) of each saga, filled by [`FileStore::create`] and
    /// [`FileStore::load`], written with every record.
    specs: Arc<Mutex<HashMap<PathBuf, SpecEntry>>>,
}

impl FileStore {
    /// Opens (creating) the store in `dir`, and repairs the tail of every saga's log: a last
    /// line torn by a crash (no newline, or not a record) is cut off, so appends start clean.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, FileStoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        for log in logs(&dir)? {
            repair_tail(&log.path)?;
        }
        Ok(Self {
            dir,
            files: Arc::default(),
            specs: Arc::default(),
        })
    }

    fn path(&self, namespace: &str, name: &str) -> Result<PathBuf, FileStoreError> {
        for part in [namespace, name] {
            if !is_dns_subdomain(part) {
                return Err(FileStoreError::InvalidName(part.to_string()));
            }
        }
        Ok(self.dir.join(namespace).join(format!("{name}.log")))
    }

    /// The last complete record of a saga, if it was ever stored.
    pub fn load(&self, namespace: &str, name: &str) -> Result<Option<Record>, FileStoreError> {
        let path = self.path(namespace, name)?;
        let record = read_last(&path)?;
        if let Some(record) = &record {
            self.specs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(path, (record.spec_hash.clone(), record.spec.clone()));
        }
        Ok(record)
    }

    /// Stores a new saga (pending) with its spec and returns its record.
    pub fn create(
        &self,
        namespace: &str,
        name: &str,
        spec_hash: &str,
        spec: Option<SagaSpec>,
    ) -> Result<Record, FileStoreError> {
        let path = self.path(namespace, name)?;
        let record = Record {
            uid: sagamesh_api::trace_context::random_uid(),
            spec_hash: spec_hash.to_string(),
            spec: spec.clone(),
            status: SagaStatus::default(),
        };
        self.specs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.clone(), (spec_hash.to_string(), spec));
        self.append(&path, &record)?;
        Ok(record)
    }

    /// Removes a saga's log.
    pub fn remove(&self, namespace: &str, name: &str) -> Result<(), FileStoreError> {
        let path = self.path(namespace, name)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(FileStoreError::Io { path, source: e }),
        }
    }

    /// Every stored saga, sorted by namespace and name.
    pub fn list(&self) -> Result<Vec<StoredSaga>, FileStoreError> {
        let mut out = Vec::new();
        for log in logs(&self.dir)? {
            if let Some(record) = read_last(&log.path)? {
                out.push(StoredSaga {
                    namespace: log.namespace,
                    name: log.name,
                    record,
                });
            }
        }
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(out)
    }

    fn append(&self, path: &Path, record: &Record) -> Result<(), FileStoreError> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let parent = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(parent).map_err(io(parent))?;
        let mut line = serde_json::to_vec(record).map_err(|e| FileStoreError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        let count = files.entry(path.to_path_buf()).or_insert(0);
        if *count >= COMPACT_AFTER {
            // Rewrite the log as its newest record, atomically.
            let tmp = path.with_extension("log.tmp");
            let mut file = File::create(&tmp).map_err(io(&tmp))?;
            file.write_all(&line).map_err(io(&tmp))?;
            file.sync_all().map_err(io(&tmp))?;
            fs::rename(&tmp, path).map_err(io(path))?;
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io(parent))?;
            *count = 1;
            return Ok(());
        }
        let new_file = !path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        file.write_all(&line).map_err(io(path))?;
        file.sync_data().map_err(io(path))?;
        if new_file {
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io(parent))?;
        }
        *count += 1;
        Ok(())
    }
}

/// One saga's log file: `<dir>/<namespace>/<name>.log`.
struct LogFile {
    namespace: String,
    name: String,
    path: PathBuf,
}

/// Every saga log under `dir` (namespace directories with valid names, `.log` files in them).
fn logs(dir: &Path) -> Result<Vec<LogFile>, FileStoreError> {
    let mut out = Vec::new();
    for ns_entry in fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let namespace = ns_entry.file_name().to_string_lossy().into_owned();
        if !ns_entry.path().is_dir() || !is_dns_subdomain(&namespace) {
            continue;
        }
        for entry in fs::read_dir(ns_entry.path())
            .map_err(io(&ns_entry.path()))?
            .flatten()
        {
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(".log") {
                out.push(LogFile {
                    namespace: namespace.clone(),
                    name: name.to_string(),
                    path: entry.path(),
                });
            }
        }
    }
    Ok(out)
}

/// Cuts a log back to the end of its last complete record (a line that ends in a newline and
/// parses), fsyncing the cut; returns how many bytes were dropped.
fn repair_tail(path: &Path) -> Result<u64, FileStoreError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let mut keep = 0;
    let mut start = 0;
    while let Some(newline) = bytes[start..].iter().position(|&b| b == b'\n') {
        let end = start + newline;
        if serde_json::from_slice::<Record>(&bytes[start..end]).is_ok() {
            keep = end + 1;
        }
        start = end + 1;
    }
    let dropped = (bytes.len() - keep) as u64;
    if dropped > 0 {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io(path))?;
        file.set_len(keep as u64).map_err(io(path))?;
        file.sync_all().map_err(io(path))?;
        tracing::warn!(
            file = %path.display(),
            dropped_bytes = dropped,
            "saga log ended in a torn or invalid record (crash mid-write?); cut it off"
        );
    }
    Ok(dropped)
}

fn read_last(path: &Path) -> Result<Option<Record>, FileStoreError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(FileStoreError::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    let mut last = None;
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(io(path))?;
        // A torn line (crash mid-write) does not parse and is skipped; earlier lines stand.
        if let Ok(record) = serde_json::from_slice::<Record>(&line) {
            last = Some(record);
        }
    }
    Ok(last)
}

impl SagaStore for FileStore {
    async fn save(
        &self,
        saga: &SagaRef,
        status: &SagaStatus,
        _event: &Event,
    ) -> Result<(), StoreError> {
        let path = self
            .path(&saga.namespace, &saga.name)
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let (spec_hash, spec) = self
            .specs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&path)
            .cloned()
            .unwrap_or_default();
        let record = Record {
            uid: saga.uid.clone(),
            spec_hash,
            spec,
            status: status.clone(),
        };
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.append(&path, &record))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sagamesh_api::saga::SagaPhase;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sagamesh-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn records_survive_reopening_and_torn_lines_are_ignored() {
        let dir = temp_dir("torn");
        let store = FileStore::open(&dir).expect("open");
        let created = store.create("shop", "order-1", "h1", None).expect("create");
        let saga = SagaRef {
            namespace: "shop".into(),
            name: "order-1".into(),
            uid: created.uid.clone(),
        };
        let status = SagaStatus {
            phase: SagaPhase::Running,
            ..Default::default()
        };
        store
            .save(&saga, &status, &Event::DeadlineExceeded)
            .await
            .expect("save");

        // A crash mid-write leaves half a line.
        let path = dir.join("shop/order-1.log");
        let mut file = OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open log");
        file.write_all(br#"{"uid":"x","spec_hash":"h1","status":{"phase":"Succ"#)
            .expect("write");

        let reopened = FileStore::open(&dir).expect("reopen");
        let record = reopened
            .load("shop", "order-1")
            .expect("load")
            .expect("stored");
        assert_eq!(
            (record.uid, record.spec_hash, record.status.phase),
            (created.uid, "h1".into(), SagaPhase::Running)
        );
        assert_eq!(reopened.list().expect("list").len(), 1);
        let _ = fs::remove_dir_all(&dir);
    }

    /// The issue's sequence: tear the last record, open, save, restart, read.
    #[tokio::test]
    async fn a_save_after_a_torn_tail_is_read_back_after_a_restart() {
        let dir = temp_dir("torn-tail");
        let store = FileStore::open(&dir).expect("open");
        let created = store.create("shop", "order-2", "h1", None).expect("create");
        let saga = SagaRef {
            namespace: "shop".into(),
            name: "order-2".into(),
            uid: created.uid.clone(),
        };
        let running = SagaStatus {
            phase: SagaPhase::Running,
            ..Default::default()
        };
        for _ in 0..2 {
            store
                .save(&saga, &running, &Event::DeadlineExceeded)
                .await
                .expect("save");
        }
        drop(store);

        // Tear the last record: a crash in the middle of writing it.
        let path = dir.join("shop/order-2.log");
        let len = fs::metadata(&path).expect("stat").len();
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open log");
        file.set_len(len - 10).expect("truncate");
        drop(file);

        let store = FileStore::open(&dir).expect("open after the crash");
        store
            .load("shop", "order-2")
            .expect("load")
            .expect("stored");
        let compensating = SagaStatus {
            phase: SagaPhase::Compensating,
            ..Default::default()
        };
        store
            .save(&saga, &compensating, &Event::DeadlineExceeded)
            .await
            .expect("save after the crash");
        drop(store);

        let restarted = FileStore::open(&dir).expect("restart");
        let record = restarted
            .load("shop", "order-2")
            .expect("load")
            .expect("stored");
        assert_eq!(record.status.phase, SagaPhase::Compensating);
        assert_eq!(record.uid, created.uid);
        assert_eq!(
            restarted.list().expect("list")[0].record.status.phase,
            SagaPhase::Compensating
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_log_of_only_a_torn_record_is_emptied() {
        let dir = temp_dir("only-torn");
        fs::create_dir_all(dir.join("shop")).expect("mkdir");
        let path = dir.join("shop/s.log");
        fs::write(&path, br#"{"uid":"x","spec_hash":"h","sta"#).expect("write");
        let store = FileStore::open(&dir).expect("open");
        assert_eq!(fs::metadata(&path).expect("stat").len(), 0);
        assert_eq!(store.load("shop", "s").expect("load"), None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn long_logs_are_compacted_to_the_last_record() {
        let dir = temp_dir("compact");
        let store = FileStore::open(&dir).expect("open");
        let created = store.create("default", "s", "h", None).expect("create");
        let saga = SagaRef {
            namespace: "default".into(),
            name: "s".into(),
            uid: created.uid,
        };
        for i in 0..(COMPACT_AFTER as u64 * 2 + 3) {
            let status = SagaStatus {
                history_dropped: Some(i),
                ..Default::default()
            };
            store
                .save(&saga, &status, &Event::DeadlineExceeded)
                .await
                .expect("save");
        }
        let lines = fs::read_to_string(dir.join("default/s.log"))
            .expect("read")
            .lines()
            .count();
        assert!(lines <= COMPACT_AFTER, "{lines} lines");
        let record = store.load("default", "s").expect("load").expect("stored");
        assert_eq!(
            record.status.history_dropped,
            Some(COMPACT_AFTER as u64 * 2 + 2)
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn names_cannot_escape_the_directory() {
        let store = FileStore::open(temp_dir("names")).expect("open");
        assert!(matches!(
            store.load("..", "x"),
            Err(FileStoreError::InvalidName(_))
        ));
        assert!(matches!(
            store.load("shop", "../etc/passwd"),
            Err(FileStoreError::InvalidName(_))
        ));
        assert!(matches!(
            store.create("shop", "A", "h", None),
            Err(FileStoreError::InvalidName(_))
        ));
    }
}
