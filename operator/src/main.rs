//! `sagamesh-operator`: the Sagamesh control plane (see the library's docs).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::config::{KubeConfigOptions, Kubeconfig};
use sagamesh_injector::mutate::InjectConfig;
use sagamesh_operator::leader::LeaseConfig;
use sagamesh_operator::runtime::{self, Settings};
use sagamesh_operator::webhook::{CertSource, WebhookSettings};
use sagamesh_server::logging::{self, LogFormat};

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

    /// Do not run sagas (the Lease holder runs them by default).
    #[arg(long, env = "SAGAMESH_NO_SAGAS")]
    no_sagas: bool,

    /// Serve the sidecar-injection webhook (HTTPS) on this address; off when unset.
    #[arg(long, env = "SAGAMESH_WEBHOOK_ADDR")]
    webhook_addr: Option<SocketAddr>,

    /// The MutatingWebhookConfiguration whose CA bundle the operator keeps current.
    #[arg(
        long,
        env = "SAGAMESH_WEBHOOK_CONFIGURATION",
        default_value = "sagamesh-injector"
    )]
    webhook_configuration: String,

    /// The Secret (in the operator's namespace) holding the webhook's certificate.
    #[arg(
        long,
        env = "SAGAMESH_WEBHOOK_SECRET",
        default_value = "sagamesh-injector-tls"
    )]
    webhook_secret: String,

    /// The webhook's Service name (the certificate is made for its DNS names).
    #[arg(
        long,
        env = "SAGAMESH_WEBHOOK_SERVICE",
        default_value = "sagamesh-injector"
    )]
    webhook_service: String,

    /// Further names or IP addresses for the webhook certificate (comma-separated), e.g. when
    /// the API server reaches the webhook by URL.
    #[arg(long, env = "SAGAMESH_WEBHOOK_EXTRA_SAN", value_delimiter = ',')]
    webhook_extra_san: Vec<String>,

    /// `operator` (made and rotated by the operator) or `cert-manager` (files in
    /// --webhook-cert-dir).
    #[arg(long, env = "SAGAMESH_WEBHOOK_CERT_SOURCE", default_value = "operator", value_parser = ["operator", "cert-manager"])]
    webhook_cert_source: String,

    /// Directory of tls.crt / tls.key when the certificate comes from cert-manager.
    #[arg(
        long,
        env = "SAGAMESH_WEBHOOK_CERT_DIR",
        default_value = "/var/run/sagamesh/webhook-tls"
    )]
    webhook_cert_dir: std::path::PathBuf,

    /// Image of the injected sidecar.
    #[arg(
        long,
        env = "SAGAMESH_SIDECAR_IMAGE",
        default_value = "ghcr.io/sagamesh/sidecar:0.1.0"
    )]
    sidecar_image: String,

    /// Pull policy of the injected sidecar.
    #[arg(
        long,
        env = "SAGAMESH_SIDECAR_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    sidecar_image_pull_policy: String,

    /// Resources of the injected sidecar, as JSON (`{"requests":{"cpu":"10m"}}`).
    #[arg(long, env = "SAGAMESH_SIDECAR_RESOURCES", default_value = "{}")]
    sidecar_resources: String,

    /// Log format of the injected sidecar (json or plain).
    #[arg(
        long,
        env = "SAGAMESH_SIDECAR_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    sidecar_log_format: LogFormat,

    /// Log filter of the injected sidecar.
    #[arg(long, env = "SAGAMESH_SIDECAR_LOG_LEVEL", default_value = "info")]
    sidecar_log_level: String,

    /// The discovery address injected sidecars use (host:port); default: the webhook Service's
    /// namespace and the discovery port.
    #[arg(long, env = "SAGAMESH_DISCOVERY_SERVICE")]
    discovery_service: Option<String>,
}

fn webhook_settings(args: &Args, namespace: &str) -> anyhow::Result<Option<WebhookSettings>> {
    let Some(addr) = args.webhook_addr else {
        return Ok(None);
    };
    let resources = serde_json::from_str(&args.sidecar_resources).with_context(|| {
        format!(
            "--sidecar-resources is not a resources object: {}",
            args.sidecar_resources
        )
    })?;
    let service = &args.webhook_service;
    let cert = if args.webhook_cert_source == "cert-manager" {
        CertSource::Files(args.webhook_cert_dir.clone())
    } else {
        CertSource::Operator {
            namespace: namespace.to_string(),
            secret: args.webhook_secret.clone(),
            dns_names: [
                format!("{service}.{namespace}.svc"),
                format!("{service}.{namespace}.svc.cluster.local"),
                format!("{service}.{namespace}"),
            ]
            .into_iter()
            .chain(args.webhook_extra_san.iter().cloned())
            .collect(),
        }
    };
    let discovery = args.discovery_service.clone().unwrap_or_else(|| {
        format!(
            "sagamesh-operator.{namespace}.svc:{}",
            args.discovery_addr.port()
        )
    });
    let log_format = args.sidecar_log_format.as_str().to_string();
    Ok(Some(WebhookSettings {
        addr,
        configuration: args.webhook_configuration.clone(),
        cert,
        inject: InjectConfig {
            image: args.sidecar_image.clone(),
            image_pull_policy: args.sidecar_image_pull_policy.clone(),
            discovery_addr: format!("http://{discovery}"),
            resources,
            log_format,
            log_level: args.sidecar_log_level.clone(),
        },
    }))
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
    logging::init(args.log_format);
    anyhow::ensure!(
        args.lease_renew_deadline < args.lease_duration,
        "--lease-renew-deadline must be shorter than --lease-duration"
    );
    let client = client(args.kubeconfig.as_deref()).await?;
    let lease_namespace = args
        .lease_namespace
        .clone()
        .or_else(|| {
            std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| client.default_namespace().to_string());
    let webhook = webhook_settings(&args, &lease_namespace)?;
    let settings = Settings {
        sagas: !args.no_sagas,
        webhook,
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
    let mut operator = tokio::spawn(runtime::run(client, settings, stop_rx));
    let ended = tokio::select! {
        r = shutdown_signal() => {
            r?;
            tracing::info!("shutting down");
            stop_tx.send_replace(true);
            operator.await
        }
        // Ends on its own only when a part of it failed (or could not start): the process
        // must then exit non-zero rather than stay up doing nothing.
        ended = &mut operator => ended,
    };
    ended
        .context("operator task panicked")?
        .context("operator failed")
}
