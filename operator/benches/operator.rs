//! Operator benchmark on the test bed (not a test; nothing is asserted):
//!
//! 1. Push latency: 500 discovery watchers (one gRPC connection each, as 500 sidecars) of one
//!    service; a pod's Ready condition is flipped 20 times through the API server; for every
//!    watcher and flip, the time from sending the status patch to that watcher receiving the
//!    update that reflects it. p50 / p99 / max over all 10,000 samples.
//! 2. Memory: 1,000 ServiceRegistrations selecting 10,000 ready pods (10 each); the operator's
//!    resident memory (VmRSS, VmHWM) once every status shows 10/10, against its memory before.
//!
//! Run: `scripts/testbed.sh up && eval "$(scripts/testbed.sh env)" &&
//!       cargo bench -p sagamesh-operator --bench operator`
//! Results are printed and written to `target/bench/operator.json`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::{Operator, create_pod, operator_setup, set_pod_status};
use futures_util::{StreamExt, stream};
use kube::Client;
use kube::api::{Api, ListParams, PostParams};
use parking_lot::Mutex;
use sagamesh_api::ServiceRegistration;
use sagamesh_discovery::proto as pb;
use sagamesh_discovery::proto::discovery_client::DiscoveryClient;
use sagamesh_testing::stats::{ms, percentile};
use serde_json::json;

const WATCHERS: usize = 500;
const FLIPS: usize = 20;
const REGISTRATIONS: usize = 1000;
const PODS_PER_REGISTRATION: usize = 10;
const CONCURRENCY: usize = 32;

/// (VmRSS, VmHWM) in KiB of a process.
fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} not in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

async fn create_sreg(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let obj: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "sagamesh.io/v1alpha1",
        "kind": "ServiceRegistration",
        "metadata": { "name": name },
        "spec": {
            "selector": { "app": name },
            "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }],
        },
    }))?;
    Api::<ServiceRegistration>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &obj)
        .await?;
    Ok(())
}

/// Pod `i` of registration `r`: documentation-free private addresses, data only (no traffic).
fn pod_ip(r: usize, i: usize) -> String {
    format!("10.{}.{}.{}", r / 250, r % 250, i + 1)
}

async fn add_pods(client: &Client, ns: &str, r: usize) -> anyhow::Result<()> {
    let app = format!("svc-{r}");
    for i in 0..PODS_PER_REGISTRATION {
        let name = format!("svc-{r}-{i}");
        create_pod(client, ns, &name, &[("app", &app)]).await?;
        set_pod_status(client, ns, &name, &pod_ip(r, i), true).await?;
    }
    Ok(())
}

fn ready_count(u: &pb::Update) -> usize {
    match &u.kind {
        Some(pb::update::Kind::Snapshot(s)) => s.endpoints.iter().filter(|e| e.ready).count(),
        _ => 0,
    }
}

async fn push_latency(
    client: &Client,
    ns: &str,
    operator: &Operator,
) -> anyhow::Result<serde_json::Value> {
    create_sreg(client, ns, "svc-0").await?;
    add_pods(client, ns, 0).await?;

    // 500 watchers, each on its own connection; each records (ready count, when) per update.
    type Seen = Arc<Mutex<Vec<(usize, Instant)>>>;
    let mut seen: Vec<Seen> = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    let url = format!("http://{}", operator.discovery);
    for w in 0..WATCHERS {
        let mut client = DiscoveryClient::connect(url.clone())
            .await
            .with_context(|| format!("watcher {w} connecting"))?;
        let mut stream = client
            .watch(pb::WatchRequest {
                namespace: ns.into(),
                service: "svc-0".into(),
                caller: format!("bench-{w}"),
            })
            .await?
            .into_inner();
        let log: Seen = Arc::default();
        seen.push(log.clone());
        tasks.spawn(async move {
            let _client = client;
            while let Ok(Some(u)) = stream.message().await {
                log.lock().push((ready_count(&u), Instant::now()));
            }
        });
    }
    // Everyone has the initial state.
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen
        .iter()
        .any(|s| s.lock().last().map(|(n, _)| *n) != Some(PODS_PER_REGISTRATION))
    {
        ensure!(
            Instant::now() < deadline,
            "watchers did not all get the initial state"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut samples = Vec::with_capacity(WATCHERS * FLIPS);
    for flip in 0..FLIPS {
        let ready = flip % 2 == 1;
        let want = if ready {
            PODS_PER_REGISTRATION
        } else {
            PODS_PER_REGISTRATION - 1
        };
        let marks: Vec<usize> = seen.iter().map(|s| s.lock().len()).collect();
        let sent = Instant::now();
        set_pod_status(client, ns, "svc-0-0", &pod_ip(0, 0), ready).await?;
        let deadline = sent + Duration::from_secs(30);
        loop {
            let done = seen
                .iter()
                .zip(&marks)
                .all(|(s, m)| s.lock()[*m..].iter().any(|(n, _)| *n == want));
            if done {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "flip {flip} did not reach every watcher in 30s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for (s, m) in seen.iter().zip(&marks) {
            if let Some((_, at)) = s.lock()[*m..].iter().find(|(n, _)| *n == want) {
                samples.push(at.duration_since(sent));
            }
        }
        // Let the API server and the operator settle between flips.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tasks.abort_all();
    samples.sort();
    let (p50, p99, max) = (
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or_default(),
    );
    println!(
        "push latency, pod status patch -> {WATCHERS} watchers ({} samples): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        samples.len(),
        ms(p50),
        ms(p99),
        ms(max)
    );
    Ok(json!({
        "watchers": WATCHERS, "flips": FLIPS, "samples": samples.len(),
        "p50_ms": ms(p50), "p99_ms": ms(p99), "max_ms": ms(max),
    }))
}

async fn memory(
    client: &Client,
    ns: &str,
    operator: &Operator,
) -> anyhow::Result<serde_json::Value> {
    let pid = operator.child.id();
    let (rss_before, _) = memory_kib(pid)?;
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = stream::iter(1..REGISTRATIONS)
        .map(|r| async move {
            create_sreg(client, ns, &format!("svc-{r}")).await?;
            add_pods(client, ns, r).await
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    for r in results {
        r?;
    }
    let created = started.elapsed();
    // Every registration resolved by the operator: all statuses 10/10.
    let api: Api<ServiceRegistration> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let list = api.list(&ListParams::default()).await?;
        let done = list
            .items
            .iter()
            .filter(|s| {
                s.status.as_ref().map(|st| st.ready_endpoints as usize)
                    == Some(PODS_PER_REGISTRATION)
            })
            .count();
        if done == REGISTRATIONS {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {done} registrations resolved after 10 minutes"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let resolved = started.elapsed();
    let (rss, hwm) = memory_kib(pid)?;
    println!(
        "memory with {REGISTRATIONS} registrations / {} endpoints: RSS {:.1} MiB (before: {:.1} MiB), peak {:.1} MiB; objects created in {:.0} s, all statuses 10/10 after {:.0} s",
        REGISTRATIONS * PODS_PER_REGISTRATION,
        rss as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        hwm as f64 / 1024.0,
        created.as_secs_f64(),
        resolved.as_secs_f64()
    );
    Ok(json!({
        "registrations": REGISTRATIONS,
        "endpoints": REGISTRATIONS * PODS_PER_REGISTRATION,
        "rss_mib": rss as f64 / 1024.0,
        "rss_before_mib": rss_before as f64 / 1024.0,
        "peak_rss_mib": hwm as f64 / 1024.0,
        "create_seconds": created.as_secs_f64(),
        "all_resolved_seconds": resolved.as_secs_f64(),
    }))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing useful either.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start tokio: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async {
        let Some(bed) = sagamesh_testing::test_bed("operator benchmark").await else {
            return;
        };
        if let Err(e) = bed.install_crds().await {
            eprintln!("installing CRDs: {e:#}");
            std::process::exit(1);
        }
        let bed2 = bed.clone();
        bed.with_namespace("op-bench", move |client, ns| async move {
            let kubeconfig = operator_setup(&bed2, &client, &ns).await?;
            let operator = Operator::start(&kubeconfig, &ns, "bench")?;
            operator.wait_ready().await?;
            let push = push_latency(&client, &ns, &operator).await?;
            let mem = memory(&client, &ns, &operator).await?;
            let out = sagamesh_testing::repo_root().join("target/bench");
            std::fs::create_dir_all(&out)?;
            let report = json!({ "push_latency": push, "memory": mem });
            std::fs::write(
                out.join("operator.json"),
                serde_json::to_vec_pretty(&report)?,
            )?;
            println!("written to {}", out.join("operator.json").display());
            Ok(())
        })
        .await;
    });
}
