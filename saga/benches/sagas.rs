//! Saga throughput (a benchmark, not a test): how many 3-step sagas per second the engine
//! completes against real HTTP services on 127.0.0.1, with the status kept (a) in memory and
//! (b) in local mode's fsynced file store — side by side in one run.
//!
//! `cargo bench -p sagamesh-saga --bench sagas` (release build). SAGAS=N sets the count.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use sagamesh_api::saga::{SagaPhase, SagaSpec, SagaStatus};
use sagamesh_saga::{
    EngineConfig, Event, SagaRef, SagaStore, StoreError, file_store::FileStore, run,
};

// The tests' direct caller: plain HTTP to the test services (the mesh client's own cost is in
// the proxy benchmark).
#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)] // the re-exported Fault is for the tests
mod common;
use common::{DirectCaller as Direct, TestService};
use serde_json::json;

#[derive(Clone, Default)]
struct MemoryStore(Arc<Mutex<HashMap<String, SagaStatus>>>);

impl SagaStore for MemoryStore {
    async fn save(&self, saga: &SagaRef, status: &SagaStatus, _: &Event) -> Result<(), StoreError> {
        self.0
            .lock()
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .insert(saga.name.clone(), status.clone());
        Ok(())
    }
}

fn spec() -> SagaSpec {
    serde_json::from_value(json!({
        "input": {"id": "1"},
        "steps": [
            {"name": "a", "action": {"service": "orders", "path": "/orders"}, "compensation": {"service": "orders", "path": "/undo"}},
            {"name": "b", "action": {"service": "inventory", "path": "/reservations"}, "compensation": {"service": "inventory", "path": "/undo"}},
            {"name": "c", "action": {"service": "payment", "path": "/charges"}}
        ]
    }))
    .unwrap_or_default()
}

async fn measure<S: SagaStore + Clone + 'static>(
    label: &str,
    store: S,
    caller: Direct,
    count: usize,
    concurrency: usize,
    make_ref: impl Fn(usize) -> SagaRef,
) -> f64 {
    let spec = Arc::new(spec());
    let start = Instant::now();
    let next = Arc::new(Mutex::new(0usize));
    let refs: Arc<Vec<SagaRef>> = Arc::new((0..count).map(make_ref).collect());
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (store, caller, spec, next, refs) = (
            store.clone(),
            caller.clone(),
            spec.clone(),
            next.clone(),
            refs.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut ok = 0usize;
            loop {
                let i = {
                    let Ok(mut n) = next.lock() else { return ok };
                    *n += 1;
                    *n - 1
                };
                if i >= refs.len() {
                    return ok;
                }
                let config = EngineConfig {
                    jitter: false,
                    ..EngineConfig::default()
                };
                if let Ok(status) = run(
                    &refs[i],
                    &spec,
                    SagaStatus::default(),
                    &store,
                    &caller,
                    &config,
                )
                .await
                    && status.phase == SagaPhase::Succeeded
                {
                    ok += 1;
                }
            }
        }));
    }
    let mut succeeded = 0;
    for worker in workers {
        succeeded += worker.await.unwrap_or(0);
    }
    let rate = succeeded as f64 / start.elapsed().as_secs_f64();
    println!("| {label} | {count} | {concurrency} | {succeeded} | {rate:.0} |");
    rate
}

#[tokio::main]
async fn main() {
    let count: usize = std::env::var("SAGAS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let mut services = Vec::new();
    for name in ["orders", "inventory", "payment"] {
        let Ok(service) = TestService::start(name).await else {
            eprintln!("could not start {name}");
            return;
        };
        services.push(service);
    }
    let caller = Direct::new(&services.iter().collect::<Vec<_>>());
    let dir = std::env::temp_dir().join(format!("sagamesh-saga-bench-{}", std::process::id()));
    let Ok(file_store) = FileStore::open(&dir) else {
        eprintln!("could not open {}", dir.display());
        return;
    };
    println!(
        "| store | sagas | concurrent | succeeded | sagas/s |\n| --- | ---: | ---: | ---: | ---: |"
    );
    for round in 0..2 {
        let memory = MemoryStore::default();
        measure("memory", memory, caller.clone(), count, 32, |i| SagaRef {
            namespace: "b".into(),
            name: format!("m{round}-{i}"),
            uid: format!("m{round}-{i}"),
        })
        .await;
        let store = file_store.clone();
        let prepare = store.clone();
        measure(
            "file (fsync per record)",
            store,
            caller.clone(),
            count / 4,
            32,
            move |i| {
                let name = format!("f{round}-{i}");
                let uid = prepare
                    .create("b", &name, "h", None)
                    .map(|r| r.uid)
                    .unwrap_or_default();
                SagaRef {
                    namespace: "b".into(),
                    name,
                    uid,
                }
            },
        )
        .await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    drop(services);
}
