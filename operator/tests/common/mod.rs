//! Helpers for running `sagamesh-operator` on the test bed exactly as its RBAC allows:
//! - [`install_rbac`] applies `deploy/rbac/operator-rbac.yaml` for a test namespace (the
//!   cluster-scoped objects get per-namespace names and an owner reference to the Namespace, so
//!   the garbage collector removes them with it);
//! - [`operator_kubeconfig`] gets a ServiceAccount token through the TokenRequest API and writes a
//!   kubeconfig with it (server and CA from the admin kubeconfig);
//! - [`Operator`] runs the binary as a child process and SIGKILLs it on drop;
//! - [`Watcher`] is a gRPC discovery client that keeps the latest update;
//! - pods are created and their status (IP, Ready) patched by the test (no kubelet).
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::Kubeconfig;
use kube::{Client, Resource};
use sagamesh_discovery::proto as pb;
use sagamesh_discovery::proto::discovery_client::DiscoveryClient;
use serde_json::{Value, json};
use tokio::sync::watch;

pub const SA: &str = "sagamesh-operator";
const MANAGER: &str = "sagamesh-operator-tests";

pub fn repo_root() -> PathBuf {
    sagamesh_testing::repo_root()
}

/// The RBAC manifest's documents, as JSON.
pub fn rbac_documents() -> anyhow::Result<Vec<Value>> {
    let path = repo_root().join("deploy/rbac/operator-rbac.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_saphyr::from_multiple(&text).with_context(|| format!("parsing {}", path.display()))
}

fn ssa() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// Applies `deploy/rbac/operator-rbac.yaml` for the operator's ServiceAccount in `ns`.
pub async fn install_rbac(client: &Client, ns: &str) -> anyhow::Result<()> {
    let namespace = Api::<Namespace>::all(client.clone()).get(ns).await?;
    let owner = OwnerReference {
        api_version: "v1".into(),
        kind: "Namespace".into(),
        name: ns.into(),
        uid: namespace
            .metadata
            .uid
            .clone()
            .context("namespace has no uid")?,
        ..Default::default()
    };
    let cluster_name = format!("{SA}-{ns}");
    for mut doc in rbac_documents()? {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        if let Some(subjects) = doc["subjects"].as_array_mut() {
            for s in subjects {
                s["namespace"] = json!(ns);
            }
        }
        match kind.as_str() {
            "ClusterRole" | "ClusterRoleBinding" => {
                doc["metadata"]["name"] = json!(cluster_name);
                doc["metadata"]["ownerReferences"] = json!([owner]);
                if kind == "ClusterRoleBinding" {
                    doc["roleRef"]["name"] = json!(cluster_name);
                }
            }
            _ => doc["metadata"]["namespace"] = json!(ns),
        }
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match kind.as_str() {
            "ServiceAccount" => {
                let obj: ServiceAccount = serde_json::from_value(doc)?;
                Api::<ServiceAccount>::namespaced(client.clone(), ns)
                    .patch(&name, &ssa(), &Patch::Apply(&obj))
                    .await?;
            }
            "ClusterRole" => {
                let obj: ClusterRole = serde_json::from_value(doc)?;
                Api::<ClusterRole>::all(client.clone())
                    .patch(&name, &ssa(), &Patch::Apply(&obj))
                    .await?;
            }
            "ClusterRoleBinding" => {
                let obj: ClusterRoleBinding = serde_json::from_value(doc)?;
                Api::<ClusterRoleBinding>::all(client.clone())
                    .patch(&name, &ssa(), &Patch::Apply(&obj))
                    .await?;
            }
            "Role" => {
                let obj: Role = serde_json::from_value(doc)?;
                Api::<Role>::namespaced(client.clone(), ns)
                    .patch(&name, &ssa(), &Patch::Apply(&obj))
                    .await?;
            }
            "RoleBinding" => {
                let obj: RoleBinding = serde_json::from_value(doc)?;
                Api::<RoleBinding>::namespaced(client.clone(), ns)
                    .patch(&name, &ssa(), &Patch::Apply(&obj))
                    .await?;
            }
            other => bail!("unexpected kind {other:?} in deploy/rbac/operator-rbac.yaml"),
        }
    }
    Ok(())
}

/// Writes a kubeconfig that authenticates as the operator's ServiceAccount in `ns` with a token
/// from the TokenRequest API (server and CA taken from the admin kubeconfig).
pub async fn operator_kubeconfig(
    client: &Client,
    admin_kubeconfig: &Path,
    ns: &str,
) -> anyhow::Result<PathBuf> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(SA, &PostParams::default(), &request)
        .await
        .context("TokenRequest for the operator's ServiceAccount")?
        .status
        .context("TokenRequest without status")?
        .token;
    let admin = Kubeconfig::read_from(admin_kubeconfig)?;
    let context_name = admin
        .current_context
        .clone()
        .context("admin kubeconfig has no current-context")?;
    let cluster_name = admin
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .context("admin kubeconfig: current context not found")?;
    let cluster = admin
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.as_ref())
        .context("admin kubeconfig: cluster not found")?;
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "bed", "cluster": {
            "server": cluster.server,
            "certificate-authority": cluster.certificate_authority,
            "certificate-authority-data": cluster.certificate_authority_data,
        }}],
        "users": [{ "name": SA, "user": { "token": token } }],
        "contexts": [{ "name": "operator", "context": { "cluster": "bed", "user": SA, "namespace": ns } }],
        "current-context": "operator",
    });
    let path = std::env::temp_dir().join(format!("sagamesh-operator-{ns}.kubeconfig"));
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

pub use sagamesh_testing::free_port;

/// Lease timings `[duration, renew deadline, retry period]` for failover tests: a SIGKILLed
/// leader is replaced about 3s later.
pub const SHORT_LEASE: [&str; 3] = ["3s", "2s", "500ms"];
/// The operator's defaults.
pub const STEADY_LEASE: [&str; 3] = ["15s", "10s", "2s"];

/// A running `sagamesh-operator` process; SIGKILLed on drop.
pub struct Operator {
    pub child: Child,
    pub identity: String,
    pub discovery: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Operator {
    /// Starts the operator as the ServiceAccount of `kubeconfig`, watching only `ns` and electing
    /// on a Lease in `ns`, with a short lease so tests see handovers quickly.
    pub fn start(kubeconfig: &Path, ns: &str, identity: &str) -> anyhow::Result<Self> {
        let discovery = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        Self::start_on(kubeconfig, ns, identity, discovery, admin)
    }

    /// Like [`Operator::start`], on given addresses (a restarted operator keeps its address).
    pub fn start_on(
        kubeconfig: &Path,
        ns: &str,
        identity: &str,
        discovery: SocketAddr,
        admin: SocketAddr,
    ) -> anyhow::Result<Self> {
        Self::start_custom(kubeconfig, ns, identity, discovery, admin, SHORT_LEASE)
    }

    /// Like [`Operator::start`] with the production lease timings: no test that does not
    /// exercise failover loses leadership to a slow API server on a busy machine.
    pub fn start_steady(kubeconfig: &Path, ns: &str, identity: &str) -> anyhow::Result<Self> {
        let discovery = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        Self::start_custom(kubeconfig, ns, identity, discovery, admin, STEADY_LEASE)
    }

    /// Starts the operator with lease timings `[duration, renew deadline, retry period]`.
    pub fn start_custom(
        kubeconfig: &Path,
        ns: &str,
        identity: &str,
        discovery: SocketAddr,
        admin: SocketAddr,
        lease: [&str; 3],
    ) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(format!("sagamesh-operator-{ns}-{identity}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_sagamesh-operator"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--discovery-addr", &discovery.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--watch-namespace", ns, "--lease-namespace", ns])
            .args(["--identity", identity])
            .args([
                "--lease-duration",
                lease[0],
                "--lease-renew-deadline",
                lease[1],
            ])
            .args(["--lease-retry-period", lease[2]])
            .env("RUST_LOG", "info,sagamesh_operator=debug")
            .env_remove("POD_NAME")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting sagamesh-operator")?;
        Ok(Operator {
            child,
            identity: identity.to_string(),
            discovery,
            admin,
            log,
        })
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The operator's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the log shows the API server refusing the operator something (RBAC).
    pub fn ensure_never_forbidden(&self) -> anyhow::Result<()> {
        let log = self.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("forbidden") || l.contains("Forbidden"))
        {
            bail!(
                "{}: the API server refused the operator something: {line}",
                self.identity
            );
        }
        Ok(())
    }

    /// GET on the admin port.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(self.admin, path).await
    }

    /// A metric's value from /metrics (first sample of that exact name).
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let (_, body) = self.admin_get("/metrics").await?;
        body.lines()
            .find_map(|l| {
                let (n, v) = l.split_once(' ')?;
                (n == name).then(|| v.trim().parse::<f64>().ok()).flatten()
            })
            .with_context(|| format!("metric {name} not in /metrics"))
    }

    /// Waits until /readyz answers 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        sagamesh_testing::eventually(
            &format!("operator {} /readyz", self.identity),
            Duration::from_secs(30),
            || async { matches!(self.admin_get("/readyz").await, Ok((200, _))).then_some(()) },
        )
        .await
        .with_context(|| format!("operator log:\n{}", self.log()))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- last lines of operator {} ({}) ---",
                self.identity,
                self.log.display()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A minimal HTTP/1.1 GET (status, body) with a timeout.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no HTTP status")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .context("HTTP GET timed out")?
}

// === pods ===

/// Creates a pod (never scheduled: there is no kubelet).
pub async fn create_pod(
    client: &Client,
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<()> {
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        },
        "spec": { "containers": [{ "name": "app", "image": "registry.invalid/app:1" }] },
    }))?;
    sagamesh_testing::create_pod(client, ns, &pod)
        .await
        .with_context(|| format!("creating pod {name}"))?;
    Ok(())
}

/// Sets a pod's IP and Ready condition through the status subresource, as a kubelet would.
pub async fn set_pod_status(
    client: &Client,
    ns: &str,
    name: &str,
    ip: &str,
    ready: bool,
) -> anyhow::Result<()> {
    let status = if ready { "True" } else { "False" };
    let patch = json!({ "status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{ "ip": ip }],
        "conditions": [
            { "type": "Ready", "status": status, "lastTransitionTime": "2026-01-01T00:00:00Z" },
            { "type": "ContainersReady", "status": status, "lastTransitionTime": "2026-01-01T00:00:00Z" },
        ],
    }});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("patching the status of pod {name}"))?;
    Ok(())
}

// === discovery client ===

/// The ready endpoint addresses of an update; `None` for DoesNotExist.
pub fn ready_addresses(update: &pb::Update) -> Option<Vec<String>> {
    match &update.kind {
        Some(pb::update::Kind::Snapshot(s)) => {
            let mut v: Vec<String> = s
                .endpoints
                .iter()
                .filter(|e| e.ready)
                .map(|e| e.address.clone())
                .collect();
            v.sort();
            v.dedup();
            Some(v)
        }
        _ => None,
    }
}

/// A discovery `Watch` stream kept open in the background; holds the latest update.
pub struct Watcher {
    pub latest: watch::Receiver<Option<pb::Update>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Opens `Watch(ns, service)` against `addr` (retrying the connection for up to 30s) and
    /// waits for the first update.
    pub async fn open(addr: SocketAddr, ns: &str, service: &str) -> anyhow::Result<Self> {
        let url = format!("http://{addr}");
        let request = pb::WatchRequest {
            namespace: ns.into(),
            service: service.into(),
            caller: "operator-tests".into(),
        };
        let stream = sagamesh_testing::eventually(
            &format!("a discovery Watch on {url}"),
            Duration::from_secs(30),
            || {
                let url = url.clone();
                let request = request.clone();
                async move {
                    let mut client = DiscoveryClient::connect(url).await.ok()?;
                    client.watch(request).await.ok().map(|r| r.into_inner())
                }
            },
        )
        .await?;
        let (tx, latest) = watch::channel(None);
        let task = tokio::spawn(async move {
            let mut stream = stream;
            while let Ok(Some(update)) = stream.message().await {
                tx.send_replace(Some(update));
            }
        });
        let mut w = Watcher { latest, task };
        w.wait_for("the first update", Duration::from_secs(10), |_| true)
            .await?;
        Ok(w)
    }

    /// Waits until the latest update satisfies `pred`; returns it.
    pub async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&pb::Update) -> bool,
    ) -> anyhow::Result<pb::Update> {
        let found = tokio::time::timeout(
            timeout,
            self.latest.wait_for(|u| u.as_ref().is_some_and(&mut pred)),
        )
        .await
        .map(|r| r.map(|u| u.clone()));
        match found {
            Ok(Ok(u)) => u.context("no update"),
            Ok(Err(_)) => bail!("discovery stream ended while waiting for {what}"),
            Err(_) => bail!(
                "timed out after {timeout:?} waiting for {what}; latest update: {:?}",
                self.latest.borrow().as_ref().map(ready_addresses)
            ),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The operator's identity-independent parts of a test: RBAC installed, a kubeconfig for its
/// ServiceAccount.
pub async fn operator_setup(
    bed: &sagamesh_testing::TestBed,
    client: &Client,
    ns: &str,
) -> anyhow::Result<PathBuf> {
    install_rbac(client, ns)
        .await
        .context("installing deploy/rbac")?;
    operator_kubeconfig(client, &bed.kubeconfig, ns).await
}

/// Object reference helper for events.
pub fn uid_of<K: Resource>(obj: &K) -> String {
    obj.meta().uid.clone().unwrap_or_default()
}
