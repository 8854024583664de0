//! `sagamesh demo`: the whole mesh on one machine, exercised and reported.
//!
//! 1. Starts the local control plane, 9 example service instances (users ×3, orders, inventory
//!    and payment ×2 each) each with its sidecar on its own 127.0.0.x address, and a client
//!    sidecar — all as child processes of this binary.
//! 2. Sends requests to `users` through the client's sidecar and shows how they were balanced.
//! 3. Kills one users instance (app and sidecar, SIGKILL) under load and shows it ejected with no
//!    failed request.
//! 4. Runs an order saga that succeeds and one that payment declines, compensated in reverse.
//! 5. Prints a report, writes an HTML report with a latency chart, stops everything it started.
//!
//! It exits 0 only when every check holds.

mod procs;
mod report;
mod traffic;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;
use sagamesh_api::saga::SagaPhase;
use sagamesh_saga::file_store::FileStore;

use crate::style::Style;
use procs::Procs;
use traffic::{Sample, http_get};

/// Flags of `sagamesh demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Working directory for manifests, state, logs and the report (default: a new directory
    /// under the system temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Requests in the balancing phase.
    #[arg(long, default_value_t = 600)]
    pub requests: usize,
    /// Seconds of load in the kill phase.
    #[arg(long, default_value_t = 6)]
    pub kill_phase_seconds: u64,
}

/// One service instance of the demo.
#[derive(Debug, Clone)]
pub struct Instance {
    pub service: &'static str,
    pub name: String,
    pub ip: String,
    pub app_port: u16,
}

impl Instance {
    pub fn endpoint(&self) -> String {
        format!("{}:4143", self.ip)
    }
}

const SERVICES: [(&str, u8, u8); 4] = [
    ("users", 3, 11),
    ("orders", 2, 21),
    ("inventory", 2, 31),
    ("payment", 2, 41),
];
const CLIENT_IP: &str = "127.0.0.10";

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn registration(service: &str, instances: &[&Instance]) -> String {
    let endpoints: String = instances
        .iter()
        .map(|i| format!("    - address: {}\n      port: 4143\n", i.ip))
        .collect();
    let policy = if service == "users" {
        "RoundRobin"
    } else {
        "PeakEwma"
    };
    format!(
        "apiVersion: sagamesh.io/v1alpha1
kind: ServiceRegistration
metadata:
  name: {service}
  namespace: shop
spec:
  endpoints:
{endpoints}  ports:
    - name: http
      port: 8080
  loadBalancer:
    policy: {policy}
  circuitBreaker:
    consecutiveFailures: 3
    baseEjectionTime: 30s
    maxEjectionPercent: 67
  retry:
    attempts: 3
    retryOn: [connect-failure, reset, gateway-error]
    backoff: {{ baseInterval: 10ms, maxInterval: 100ms }}
    budget: {{ ratio: 0.5, minRetriesPerSecond: 20 }}
  timeout: 3s
"
    )
}

fn order_saga(name: &str, order_id: &str, sku: &str, qty: u32, amount: f64) -> String {
    format!(
        r#"apiVersion: sagamesh.io/v1alpha1
kind: Saga
metadata:
  name: {name}
  namespace: shop
spec:
  input: {{ orderId: "{order_id}", sku: {sku}, qty: {qty}, amount: {amount} }}
  deadline: 1m
  steps:
    - name: create-order
      action: {{ service: orders, method: POST, path: /orders, body: {{ orderId: "{{{{ input.orderId }}}}", items: [{{ sku: "{{{{ input.sku }}}}", qty: "{{{{ input.qty }}}}" }}] }} }}
      compensation: {{ service: orders, method: DELETE, path: "/orders/{{{{ steps.create-order.output.id }}}}" }}
    - name: reserve-stock
      action: {{ service: inventory, method: POST, path: /reservations, body: {{ order: "{{{{ steps.create-order.output.id }}}}", sku: "{{{{ input.sku }}}}", qty: "{{{{ input.qty }}}}" }} }}
      compensation: {{ service: inventory, method: DELETE, path: "/reservations/by-order/{{{{ steps.create-order.output.id }}}}" }}
    - name: charge
      action: {{ service: payment, method: POST, path: /charges, body: {{ amount: "{{{{ input.amount }}}}", order: "{{{{ steps.create-order.output.id }}}}" }} }}
      compensation: {{ service: payment, method: POST, path: /refunds, body: {{ charge: "{{{{ steps.charge.output.id }}}}" }} }}
    - name: confirm
      action: {{ service: orders, method: PUT, path: "/orders/{{{{ steps.create-order.output.id }}}}/confirmed" }}
"#
    )
}

/// What the demo saw, for the report.
pub struct Findings {
    pub dir: PathBuf,
    pub balance: Vec<Sample>,
    pub kill: Vec<Sample>,
    pub kill_at: Duration,
    pub victim: Instance,
    pub victim_ejections: u64,
    pub sagas: Vec<sagamesh_saga::file_store::StoredSaga>,
    pub instances: Vec<Instance>,
    pub started: Instant,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let style = Style::detect();
    let started = Instant::now();
    let dir = match args.dir {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!("sagamesh-demo-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["manifests", "state", "logs", "data"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    println!(
        "{} working in {}",
        style.bold("sagamesh demo"),
        dir.display()
    );
    let exe = std::env::current_exe().context("finding the sagamesh binary")?;
    let mut procs = Procs::new(exe, dir.join("logs"));

    // Instances and their manifests.
    let mut instances = Vec::new();
    for (service, count, base) in SERVICES {
        for i in 0..count {
            instances.push(Instance {
                service,
                name: format!("{service}-{}", i + 1),
                ip: format!("127.0.0.{}", base + i),
                app_port: free_port()?,
            });
        }
    }
    let manifests = dir.join("manifests");
    let registrations: Vec<String> = SERVICES
        .iter()
        .map(|(service, _, _)| {
            let mine: Vec<&Instance> = instances.iter().filter(|i| i.service == *service).collect();
            registration(service, &mine)
        })
        .collect();
    std::fs::write(manifests.join("services.yaml"), registrations.join("---\n"))?;

    print!(
        "starting the control plane, {} service instances with sidecars, and a client sidecar ... ",
        instances.len()
    );
    let discovery_port = free_port()?;
    procs.spawn(
        "control-plane",
        &[
            "local".to_string(),
            "--manifests".into(),
            manifests.to_string_lossy().into_owned(),
            "--state".into(),
            dir.join("state").to_string_lossy().into_owned(),
            "--poll".into(),
            "200ms".into(),
            "--discovery-addr".into(),
            format!("127.0.0.1:{discovery_port}"),
            "--admin-addr".into(),
            format!("127.0.0.1:{}", free_port()?),
        ],
    )?;
    let discovery = format!("http://127.0.0.1:{discovery_port}");
    for instance in &instances {
        let mut app = vec![
            "shop-service".to_string(),
            "--role".into(),
            instance.service.into(),
            "--listen".into(),
            format!("127.0.0.1:{}", instance.app_port),
            "--instance".into(),
            instance.name.clone(),
        ];
        if instance.service != "users" {
            // Instances of a service share its state, as they would share a database.
            app.extend([
                "--state-file".into(),
                dir.join("data")
                    .join(format!("{}.json", instance.service))
                    .to_string_lossy()
                    .into_owned(),
            ]);
        }
        if instance.service == "payment" {
            app.extend(["--decline-over".into(), "1000".into()]);
        }
        procs.spawn(
            &instance.name,
            &app.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        procs.spawn(
            &format!("{}-sidecar", instance.name),
            &sidecar_args(
                &instance.ip,
                Some(instance.app_port),
                &discovery,
                &instance.name,
            ),
        )?;
    }
    procs.spawn(
        "client-sidecar",
        &sidecar_args(CLIENT_IP, None, &discovery, "client"),
    )?;
    wait_ready(&instances).await?;
    println!("{}", style.green("ready"));

    // Balancing.
    println!(
        "\n{} {} requests to users through the client's sidecar",
        style.bold("1. Balancing:"),
        args.requests
    );
    let balance = traffic::burst(CLIENT_IP, "users", args.requests, 4).await;

    // A killed instance.
    let victim = instances
        .iter()
        .find(|i| i.name == "users-2")
        .cloned()
        .context("users-2 exists")?;
    println!(
        "{} load for {}s; users-2 (app and sidecar) is killed after 1.5s",
        style.bold("2. Failure:"),
        args.kill_phase_seconds
    );
    let load = tokio::spawn(traffic::steady(
        CLIENT_IP.to_string(),
        "users",
        Duration::from_secs(args.kill_phase_seconds),
        4,
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let kill_at = Duration::from_millis(1500);
    procs.kill(&victim.name)?;
    procs.kill(&format!("{}-sidecar", victim.name))?;
    let kill = load.await.context("load task")?;
    let metrics = http_get(&format!("http://{CLIENT_IP}:4191/metrics"), None)
        .await
        .map(|r| r.body)
        .unwrap_or_default();
    let victim_ejections = ejections(&metrics, &victim.endpoint());

    // Sagas.
    println!(
        "{} order-1001 (42.50) and order-1002 (4999.00, over the payment limit)",
        style.bold("3. Sagas:")
    );
    std::fs::write(
        manifests.join("order-1001.yaml"),
        order_saga("order-1001", "1001", "apple", 3, 42.5),
    )?;
    std::fs::write(
        manifests.join("order-1002.yaml"),
        order_saga("order-1002", "1002", "pear", 500, 4999.0),
    )?;
    let store = FileStore::open(dir.join("state"))?;
    let sagas = wait_sagas(&store, &["order-1001", "order-1002"]).await?;

    procs.stop_all();
    let findings = Findings {
        dir: dir.clone(),
        balance,
        kill,
        kill_at,
        victim,
        victim_ejections,
        sagas,
        instances,
        started,
    };
    let checks = report::checks(&findings);
    print!("{}", report::terminal(&findings, &checks, &style));
    let html = dir.join("report.html");
    std::fs::write(&html, report::html(&findings, &checks))
        .with_context(|| format!("writing {}", html.display()))?;
    println!("\nHTML report: {}", html.display());
    println!(
        "Explore: sagamesh saga get order-1002 -n shop --state {}",
        dir.join("state").display()
    );
    if checks.iter().all(|c| c.passed) {
        println!(
            "{} in {:.0}s",
            style.green("demo passed"),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    } else {
        bail!(
            "{} of {} checks failed (logs in {})",
            checks.iter().filter(|c| !c.passed).count(),
            checks.len(),
            dir.join("logs").display()
        )
    }
}

/// A sidecar on `ip`, discovering through the local control plane's gRPC API.
fn sidecar_args(ip: &str, app_port: Option<u16>, discovery: &str, caller: &str) -> Vec<String> {
    let mut args = vec![
        "sidecar".to_string(),
        format!("--outbound-addr={ip}:4140"),
        format!("--inbound-addr={ip}:4143"),
        format!("--admin-addr={ip}:4191"),
        format!("--discovery-addr={discovery}"),
        "--namespace=shop".into(),
        format!("--caller={caller}.shop"),
    ];
    if let Some(port) = app_port {
        args.push(format!("--app-port={port}"));
    }
    args
}

/// Waits until every sidecar answers /ready and every app answers through its sidecar.
async fn wait_ready(instances: &[Instance]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut admins: Vec<String> = instances
        .iter()
        .map(|i| format!("http://{}:4191/ready", i.ip))
        .collect();
    admins.push(format!("http://{CLIENT_IP}:4191/ready"));
    for url in admins.iter().chain(
        instances
            .iter()
            .map(|i| format!("http://{}/healthz", i.endpoint()))
            .collect::<Vec<_>>()
            .iter(),
    ) {
        loop {
            if matches!(http_get(url, None).await, Ok(r) if r.status == 200) {
                break;
            }
            if Instant::now() > deadline {
                bail!("{url} did not become ready within 30s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The `sagamesh_endpoint_ejections_total` count for one endpoint in Prometheus text.
fn ejections(metrics: &str, endpoint: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("sagamesh_endpoint_ejections") && l.contains(&format!("\"{endpoint}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

async fn wait_sagas(
    store: &FileStore,
    names: &[&str],
) -> anyhow::Result<Vec<sagamesh_saga::file_store::StoredSaga>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored: Vec<_> = store
            .list()?
            .into_iter()
            .filter(|s| names.contains(&s.name.as_str()))
            .collect();
        if stored.len() == names.len() && stored.iter().all(|s| s.record.status.phase.is_terminal())
        {
            return Ok(stored);
        }
        if Instant::now() > deadline {
            let phases: Vec<String> = stored
                .iter()
                .map(|s| format!("{}: {:?}", s.name, s.record.status.phase))
                .collect();
            bail!("sagas did not finish within 60s: {phases:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a stored saga ended in `phase`.
pub fn ended(saga: &sagamesh_saga::file_store::StoredSaga, phase: SagaPhase) -> bool {
    saga.record.status.phase == phase
}
