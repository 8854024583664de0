//! End to end: the operator (a real process, as its ServiceAccount) + a sidecar discovering over
//! gRPC (the `sagamesh-sidecar` library, in-process) + real HTTP backends on 127.0.0.1..5. Pods
//! are scaled 3 → 5 → 2 and the operator is SIGKILLed and restarted while requests flow through
//! the sidecar; not one request may fail.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use common::{Operator, create_pod, free_port, http_get, operator_setup, set_pod_status};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use parking_lot::Mutex;
use sagamesh_api::ServiceRegistration;
use sagamesh_testing::backend::Backend;
use sagamesh_testing::{TestBed, eventually, test_bed};
use serde_json::{Value, json};

// === backends ===

/// A backend on 127.0.0.`host`, answering with its own address (its name).
fn backend(host: u8, port: u16) -> Backend {
    let addr = SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), port));
    Backend::start_at(&addr.ip().to_string(), addr)
}

/// A port free on 127.0.0.1 to 127.0.0.5 at once (pods share their targetPort).
async fn port_free_on_all(hosts: u8) -> anyhow::Result<u16> {
    for _ in 0..20 {
        let port = free_port();
        let mut ok = true;
        for h in 1..=hosts {
            if std::net::TcpListener::bind((Ipv4Addr::new(127, 0, 0, h), port)).is_err() {
                ok = false;
                break;
            }
        }
        if ok {
            return Ok(port);
        }
    }
    anyhow::bail!("no port free on 127.0.0.1..{hosts}")
}

// === load ===

#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// `workers` loops of GET through the sidecar's outbound listener, until stopped.
fn start_load(
    outbound: SocketAddr,
    authority: String,
    workers: usize,
) -> (Arc<Load>, tokio::task::JoinSet<()>) {
    let load = Arc::new(Load::default());
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let load = load.clone();
        let client = client.clone();
        let authority = authority.clone();
        set.spawn(async move {
            while !load.stop.load(Ordering::Relaxed) {
                let req = hyper::Request::get(format!("http://{outbound}/"))
                    .header(hyper::header::HOST, authority.as_str())
                    .body(Full::new(Bytes::new()));
                let Ok(req) = req else { return };
                let result = tokio::time::timeout(Duration::from_secs(5), async {
                    let resp = client.request(req).await.map_err(|e| e.to_string())?;
                    let status = resp.status();
                    let headers = format!("{:?}", resp.headers().get("x-sagamesh-error"));
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?;
                    if status.is_success() {
                        Ok(())
                    } else {
                        Err(format!("{status} {headers} {:?}", body.to_bytes()))
                    }
                })
                .await
                .unwrap_or_else(|_| Err("timed out".into()));
                match result {
                    Ok(()) => {
                        load.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        load.failed.fetch_add(1, Ordering::Relaxed);
                        let mut f = load.failures.lock();
                        if f.len() < 20 {
                            f.push(e);
                        }
                    }
                }
            }
        });
    }
    (load, set)
}

// === cluster side ===

async fn bed(test: &str) -> Option<TestBed> {
    let bed = test_bed(test).await?;
    bed.install_crds().await.expect("CRDs install");
    Some(bed)
}

async fn add_pod(client: &Client, ns: &str, i: u8) -> anyhow::Result<()> {
    create_pod(client, ns, &format!("orders-{i}"), &[("app", "orders")]).await?;
    set_pod_status(
        client,
        ns,
        &format!("orders-{i}"),
        &format!("127.0.0.{i}"),
        true,
    )
    .await
}

/// Ready endpoint addresses the sidecar holds for any destination (from /debug/discovery).
async fn sidecar_ready_addresses(admin: SocketAddr) -> anyhow::Result<Vec<String>> {
    let (_, body) = http_get(admin, "/debug/discovery").await?;
    let doc: Value = serde_json::from_str(&body).context("parsing /debug/discovery")?;
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::Array(eps)) = map.get("endpoints") {
                    for e in eps {
                        if e["ready"] == json!(true)
                            && let Some(a) = e["address"].as_str()
                        {
                            out.push(a.to_string());
                        }
                    }
                }
                for (k, child) in map {
                    if k != "endpoints" {
                        walk(child, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&doc["discovery"], &mut out);
    out.sort();
    out.dedup();
    Ok(out)
}

async fn wait_sidecar_view(admin: SocketAddr, hosts: &[u8]) -> anyhow::Result<()> {
    let want: Vec<String> = hosts.iter().map(|h| format!("127.0.0.{h}")).collect();
    let want = &want;
    eventually(
        &format!("the sidecar to hold {want:?}"),
        Duration::from_secs(10),
        || async move { (sidecar_ready_addresses(admin).await.ok()? == *want).then_some(()) },
    )
    .await
}

/// Waits until every backend in `hosts` has served at least `n` more requests.
async fn wait_traffic(
    backends: &BTreeMap<u8, Backend>,
    hosts: &[u8],
    n: usize,
) -> anyhow::Result<()> {
    let start: BTreeMap<u8, usize> = hosts.iter().map(|h| (*h, backends[h].hits())).collect();
    let start = &start;
    eventually(
        &format!("traffic on {hosts:?}"),
        Duration::from_secs(15),
        || async move {
            hosts
                .iter()
                .all(|h| backends[h].hits() >= start[h] + n)
                .then_some(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_traffic_survives_scaling_and_an_operator_restart_with_zero_failures() {
    let test = "sidecar_traffic_survives_scaling_and_an_operator_restart";
    let Some(bed) = bed(test).await else { return };
    let bed2 = bed.clone();
    bed.with_namespace("op-e2e", move |client, ns| async move {
        let kubeconfig = operator_setup(&bed2, &client, &ns).await?;
        let discovery = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let mut operator = Operator::start_on(&kubeconfig, &ns, "op-1", discovery, admin)?;
        operator.wait_ready().await?;

        let port = port_free_on_all(5).await?;
        let sreg: ServiceRegistration = serde_json::from_value(json!({
            "apiVersion": "sagamesh.io/v1alpha1",
            "kind": "ServiceRegistration",
            "metadata": { "name": "orders" },
            "spec": {
                "selector": { "app": "orders" },
                "ports": [{ "name": "http", "port": 80, "targetPort": port }],
                "loadBalancer": { "policy": "RoundRobin" },
            },
        }))?;
        Api::<ServiceRegistration>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &sreg)
            .await?;

        // Three pods, each a real backend that listens before it is marked Ready.
        let mut backends = BTreeMap::new();
        for i in 1..=3u8 {
            backends.insert(i, backend(i, port));
            add_pod(&client, &ns, i).await?;
        }

        let mut config = sagamesh_sidecar::Config::local_test();
        config.discovery_addr = Some(format!("http://{discovery}"));
        config.namespace = ns.clone();
        config.caller = "e2e".into();
        let sidecar = sagamesh_sidecar::Sidecar::start(config).await?;
        let (outbound, sidecar_admin) = (sidecar.outbound_addr(), sidecar.admin_addr());
        // The first request opens the discovery stream.
        let (load, mut workers) = start_load(outbound, format!("orders.{ns}"), 4);
        wait_sidecar_view(sidecar_admin, &[1, 2, 3]).await?;

        // Balanced across all three (round robin: each gets about a third).
        let before: Vec<usize> = (1..=3).map(|i| backends[&i].hits()).collect();
        wait_traffic(&backends, &[1, 2, 3], 100).await?;
        let delta: Vec<usize> = (1..=3)
            .map(|i| backends[&i].hits() - before[i as usize - 1])
            .collect();
        let total: usize = delta.iter().sum();
        eprintln!("3 pods: requests per backend {delta:?}");
        ensure!(
            delta.iter().all(|d| *d * 5 >= total),
            "unbalanced: {delta:?}"
        );

        // Scale 3 -> 5.
        for i in 4..=5u8 {
            backends.insert(i, backend(i, port));
            add_pod(&client, &ns, i).await?;
        }
        wait_sidecar_view(sidecar_admin, &[1, 2, 3, 4, 5]).await?;
        wait_traffic(&backends, &[1, 2, 3, 4, 5], 50).await?;

        // Scale 5 -> 2, as Kubernetes does it: the pod is deleted (its endpoint goes), and the
        // process stops only once callers no longer send to it (a preStop wait), finishing
        // what is in flight.
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        for i in 3..=5u8 {
            pods.delete(
                &format!("orders-{i}"),
                &DeleteParams::default().grace_period(0),
            )
            .await?;
        }
        wait_sidecar_view(sidecar_admin, &[1, 2]).await?;
        let seen: Vec<usize> = (3..=5u8).map(|i| backends[&i].hits()).collect();
        // The preStop wait: until nothing new has reached the removed pods for 500ms.
        let mut last = seen.clone();
        let mut quiet_since = tokio::time::Instant::now();
        let deadline = quiet_since + Duration::from_secs(10);
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now: Vec<usize> = (3..=5u8).map(|i| backends[&i].hits()).collect();
            if now != last {
                last = now;
                quiet_since = tokio::time::Instant::now();
            } else if quiet_since.elapsed() >= Duration::from_millis(500) {
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the sidecar kept sending to removed pods for 10s: {last:?}"
            );
        }
        eprintln!(
            "requests that reached removed pods after the sidecar dropped them: {:?}",
            last.iter()
                .zip(&seen)
                .map(|(a, b)| a - b)
                .collect::<Vec<_>>()
        );
        for i in 3..=5u8 {
            if let Some(mut b) = backends.remove(&i) {
                b.stop().await;
            }
        }
        wait_traffic(&backends, &[1, 2], 100).await?;
        wait_status_ready(&client, &ns, 2).await?;

        // SIGKILL the operator under load: the sidecar keeps its last state. The control plane
        // stays away for a while (its port refuses connections; the sidecar retries with backoff).
        operator.kill();
        let outage_start = load.ok.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        wait_traffic(&backends, &[1, 2], 100).await?;
        eprintln!(
            "{} requests served while the operator was down",
            load.ok.load(Ordering::Relaxed) - outage_start
        );
        // Restarted on the same address: the sidecar reconnects and gets the full state.
        let operator = Operator::start_on(&kubeconfig, &ns, "op-2", discovery, admin)?;
        operator.wait_ready().await?;
        eventually(
            "the sidecar to reconnect",
            Duration::from_secs(20),
            || async {
                (operator
                    .metric("sagamesh_operator_discovery_watchers")
                    .await
                    .ok()?
                    >= 1.0)
                    .then_some(())
            },
        )
        .await?;
        wait_traffic(&backends, &[1, 2], 100).await?;
        // The new operator pushes changes: scale 2 -> 3 again.
        backends.insert(3, backend(3, port));
        add_pod(&client, &ns, 3).await?;
        wait_sidecar_view(sidecar_admin, &[1, 2, 3]).await?;
        wait_traffic(&backends, &[1, 2, 3], 50).await?;

        load.stop.store(true, Ordering::Relaxed);
        while workers.join_next().await.is_some() {}
        let (ok, failed) = (
            load.ok.load(Ordering::Relaxed),
            load.failed.load(Ordering::Relaxed),
        );
        eprintln!("requests: {ok} ok, {failed} failed");
        ensure!(
            failed == 0,
            "{failed} requests failed (of {}): {:?}",
            ok + failed,
            load.failures.lock()
        );
        ensure!(ok > 500, "too little traffic to mean anything: {ok}");
        sidecar.shutdown().await;
        operator.ensure_never_forbidden()?;
        Ok(())
    })
    .await;
}

async fn wait_status_ready(client: &Client, ns: &str, ready: u32) -> anyhow::Result<()> {
    let api: Api<ServiceRegistration> = Api::namespaced(client.clone(), ns);
    let api = &api;
    eventually(
        &format!("status {ready} ready"),
        Duration::from_secs(20),
        || async move {
            let obj = api.get("orders").await.ok()?;
            (obj.status?.ready_endpoints == ready).then_some(())
        },
    )
    .await
}
