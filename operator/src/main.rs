//! `sagamesh-operator`: the Sagamesh control plane (see the library's docs).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use sagamesh_operator::leader::LeaseConfig;
use sagamesh_operator::runtime::{self, Settings};
use sagamesh_operator::telemetry::{self, LogFormat};

fn duration(s: &str) -> Result<Duration, String> {
    sagamesh_api::duration::parse(s).map_err(|e| e.to_string())
}

/// Sagamesh control plane: ServiceRegistration reconciler, discovery gRPC API, leader election.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Print the CRDs this operator manages, as YAML, and exit.
    #[arg(long)]
    print_crds: bool,

    /// Kubeconfig file; default: in-cluster config, else $KUBECONFIG, else ~/.kube/config.
    #[arg(long, env = "SAGAMESH_KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,

    /// Address of the discovery gRPC API.
    #[arg(long, env = "SAGAMESH_DISCOVERY_ADDR", default_value = "0.0.0.0:8090")]
    discovery_addr: SocketAddr,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SAGAMESH_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,

    /// Watch only this namespace; default: all namespaces.
    #[arg(long, env = "SAGAMESH_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,

    /// Name of the leader-election Lease.
    #[arg(long, env = "SAGAMESH_LEASE_NAME", default_value = "sagamesh-operator")]
    lease_name: String,

    /// Namespace of the Lease; default: the operator's own namespace ($POD_NAMESPACE, else
    /// the in-cluster or kubeconfig namespace).
    #[arg(long, env = "SAGAMESH_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,

    /// How long a Lease holder is trusted without renewing.
    #[arg(long, env = "SAGAMESH_LEASE_DURATION", default_value = "15s", value_parser = duration)]
    lease_duration: Duration,

    /// A leader that could not renew for this long steps down (shorter than the duration).
    #[arg(long, env = "SAGAMESH_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = duration)]
    lease_renew_deadline: Duration,

    /// How often to try to take or renew the Lease.
    #[arg(long, env = "SAGAMESH_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = duration)]
    lease_retry_period: Duration,

    /// This replica's identity in the Lease and in Events; default: $POD_NAME, else
    /// hostname and process id.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// Log format.
    #[arg(long, env = "SAGAMESH_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster config and no usable kubeconfig")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "sagamesh-operator".into());
    format!("{host}-{}", std::process::id())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_crds {
        for (_, yaml) in sagamesh_api::crdgen::crd_files()? {
            println!("---\n{yaml}");
        }
        return Ok(());
    }
    telemetry::init(args.log_format);
    anyhow::ensure!(
        args.lease_renew_deadline < args.lease_duration,
        "--lease-renew-deadline must be shorter than --lease-duration"
    );
    let client = client(args.kubeconfig.as_deref()).await?;
    let lease_namespace = args
        .lease_namespace
        .or_else(|| {
            std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| client.default_namespace().to_string());
    let settings = Settings {
        discovery_addr: args.discovery_addr,
        admin_addr: args.admin_addr,
        watch_namespace: args.watch_namespace,
        controller_name: "sagamesh-operator".into(),
        lease: LeaseConfig {
            name: args.lease_name,
            namespace: lease_namespace,
            identity: args
                .identity
                .filter(|s| !s.is_empty())
                .unwrap_or_else(default_identity),
            lease_duration: args.lease_duration,
            renew_deadline: args.lease_renew_deadline,
            retry_period: args.lease_retry_period,
        },
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let operator = tokio::spawn(runtime::run(client, settings, stop_rx));
    tokio::select! {
        r = shutdown_signal() => {
            r?;
            tracing::info!("shutting down");
            stop_tx.send_replace(true);
        }
        // Ended on its own: only on an error.
        _ = std::future::pending::<()>() => {}
    }
    operator
        .await
        .context("operator task panicked")?
        .context("operator failed")
}
