//! `sagamesh local`: the local control plane, and the embedded sidecar runner.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Args;
use std::sync::Arc;

use sagamesh_discovery::file::ManifestChecker;
use sagamesh_discovery::server::{DiscoveryService, serve};
use sagamesh_local::{
    discovery::LocalDiscovery,
    metrics::Metrics,
    runner::{LocalControlPlane, LocalOptions, RegistrationSink},
};
use sagamesh_mesh::ClientConfig;
use sagamesh_saga::EngineConfig;
use sagamesh_server::admin::{self, AdminState};
use sagamesh_sidecar::Sidecar;

/// Flags of `sagamesh local`.
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// Directory of ServiceRegistration (with spec.endpoints) and Saga manifests; watched.
    #[arg(long, env = "SAGAMESH_MANIFESTS")]
    pub manifests: PathBuf,
    /// Directory where saga state is kept (fsynced; survives a kill).
    #[arg(long, env = "SAGAMESH_STATE", default_value = ".sagamesh/state")]
    pub state: PathBuf,
    /// How often the manifest directory is checked for changes.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub poll: Duration,
    /// Serve the discovery gRPC API (the same one the operator serves) on this address.
    #[arg(
        long,
        env = "SAGAMESH_DISCOVERY_LISTEN",
        default_value = "127.0.0.1:8090"
    )]
    pub discovery_addr: std::net::SocketAddr,
    /// Serve `/metrics` (discovery, and the mesh metrics of saga calls: retries, ejections,
    /// attempts per endpoint), `/healthz` and `/readyz` on this address.
    #[arg(
        long,
        env = "SAGAMESH_LOCAL_ADMIN_LISTEN",
        default_value = "127.0.0.1:8091"
    )]
    pub admin_addr: std::net::SocketAddr,
    /// Log as JSON lines.
    #[arg(long, env = "SAGAMESH_LOG_JSON")]
    pub log_json: bool,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    sagamesh_api::duration::parse(s).map_err(|e| e.to_string())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs the local control plane until SIGTERM or Ctrl-C.
pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    let opts = LocalOptions {
        manifests: args.manifests.clone(),
        state: args.state.clone(),
        poll: args.poll,
        engine: EngineConfig::default(),
        client: ClientConfig::default(),
    };
    let discovery = LocalDiscovery::new();
    let metrics = Arc::new(Metrics::default());
    let control_plane = LocalControlPlane::new(
        opts,
        vec![discovery.clone() as Arc<dyn RegistrationSink>],
        metrics.mesh.clone(),
    )
    .with_context(|| format!("opening the saga store in {}", args.state.display()))?;
    let listener = tokio::net::TcpListener::bind(args.discovery_addr)
        .await
        .with_context(|| format!("listening for discovery on {}", args.discovery_addr))?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("listening for admin on {}", args.admin_addr))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let service = DiscoveryService::new(
        discovery,
        Arc::new(metrics.discovery.clone()),
        stop_rx.clone(),
    );
    let server = tokio::spawn(serve(listener, service, stop_rx.clone()));
    // Ready once serving: the manifests are read on the control plane's first poll, and a
    // manifest error is reported, not fatal.
    let (_ready_tx, ready) = tokio::sync::watch::channel(true);
    let admin_server = tokio::spawn(admin::serve(
        admin_listener,
        AdminState { metrics, ready },
        stop_rx,
    ));
    tracing::info!(manifests = %args.manifests.display(), state = %args.state.display(), discovery = %args.discovery_addr, admin = %args.admin_addr, "local control plane running");
    control_plane.run(shutdown_signal()).await;
    let _ = stop_tx.send(true);
    if let Err(e) = admin_server.await {
        tracing::warn!(error = %e, "admin server task failed");
    }
    match server.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "discovery server stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "discovery server task failed"),
        Ok(Ok(())) => {}
    }
    tracing::info!("stopped; sagas in flight resume on the next start");
    Ok(())
}

/// Runs a sidecar until SIGTERM or Ctrl-C, then drains. This binary links the manifest loader
/// anyway (local mode), so `--manifests` is checked in-process unless `--manifest-checker` names
/// a program.
pub async fn run_sidecar(config: sagamesh_sidecar::Config) -> anyhow::Result<()> {
    let checker = match &config.manifest_checker {
        Some(_) => sagamesh_sidecar::sidecar::manifest_checker(&config),
        None => ManifestChecker::in_process(sagamesh_manifest::report::check_files),
    };
    let discover = Sidecar::discovery_from_config(&config, checker)?;
    let sidecar = Sidecar::start_with(config, discover)
        .await
        .context("starting the sidecar")?;
    shutdown_signal().await;
    sidecar.shutdown().await;
    Ok(())
}
