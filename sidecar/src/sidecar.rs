//! Wiring: discovery source, mesh client, the three listeners, and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::config::Config;
use crate::proxy::{Inbound, Limits, Outbound, serve};
use http_body_util::BodyExt;
use sagamesh_discovery::file::{
    CHECKER_PROGRAM, CHECKER_TIMEOUT, CheckerError, FileDiscovery, ManifestChecker,
};
use sagamesh_discovery::grpc::{GrpcDiscovery, RECONNECT_BACKOFF};
use sagamesh_discovery::{Discover, StaticDiscovery};
use sagamesh_mesh::body;
use sagamesh_mesh::client::{ClientConfig, MeshClient};
use sagamesh_mesh::metrics::Metrics;
use sagamesh_mesh::pool::PoolConfig;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Discovery(#[from] sagamesh_discovery::grpc::AddressError),
    #[error("--manifests {path:?}: {source}")]
    Manifests { path: PathBuf, source: CheckerError },
}

/// The checker for `--manifests`: `--manifest-checker`, else `sagamesh-manifest-check` beside
/// this binary, else on `PATH`.
pub fn manifest_checker(config: &Config) -> ManifestChecker {
    let program = config.manifest_checker.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join(CHECKER_PROGRAM)))
            .filter(|beside| beside.is_file())
            .unwrap_or_else(|| PathBuf::from(CHECKER_PROGRAM))
    });
    ManifestChecker::command(program, CHECKER_TIMEOUT)
}

/// A running sidecar.
pub struct Sidecar {
    outbound_addr: SocketAddr,
    inbound_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    client: MeshClient,
    draining: Arc<AtomicBool>,
    shutdown_proxies: watch::Sender<bool>,
    shutdown_admin: watch::Sender<bool>,
    proxies: Vec<JoinHandle<()>>,
    admin: JoinHandle<()>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

impl Sidecar {
    /// Builds the discovery source the config names: gRPC, manifests (checked by `checker`), or
    /// (neither) an empty static table where every service is unknown.
    pub fn discovery_from_config(
        config: &Config,
        checker: ManifestChecker,
    ) -> Result<Arc<dyn Discover>, StartError> {
        Ok(match (&config.discovery_addr, &config.manifests) {
            (Some(addr), _) => GrpcDiscovery::new(addr, &config.caller, RECONNECT_BACKOFF)?,
            (None, Some(path)) => FileDiscovery::spawn(
                path,
                &config.namespace,
                config.manifest_poll_interval,
                checker,
            )
            .map_err(|source| StartError::Manifests {
                path: path.clone(),
                source,
            })?,
            (None, None) => {
                tracing::warn!("no --discovery-addr or --manifests: every destination is unknown");
                StaticDiscovery::new()
            }
        })
    }

    /// Starts the sidecar with the discovery source from the config.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let discover = Self::discovery_from_config(&config, manifest_checker(&config))?;
        Self::start_with(config, discover).await
    }

    /// Starts the sidecar with a given discovery source.
    pub async fn start_with(
        config: Config,
        discover: Arc<dyn Discover>,
    ) -> Result<Self, StartError> {
        let metrics = Metrics::new();
        let client_config = ClientConfig {
            discovery_timeout: config.discovery_timeout,
            max_retry_body_bytes: config.max_retry_body_bytes,
            connect_timeout: config.connect_timeout,
            jitter: !config.no_jitter,
            max_destinations: config.max_destinations,
            ..ClientConfig::default()
        };
        // The app's connections follow the same connect and idle timeouts as endpoints'.
        let app_pool = PoolConfig::from(&client_config);
        let client = MeshClient::new(discover, client_config, metrics.clone());
        let limits = Limits {
            max_header_bytes: config.max_header_bytes,
            max_body_bytes: config.max_body_bytes,
            header_read_timeout: config.header_read_timeout,
        };
        let (shutdown_proxies, proxies_rx) = watch::channel(false);
        let (shutdown_admin, admin_rx) = watch::channel(false);
        let draining = Arc::new(AtomicBool::new(false));

        let outbound_listener = bind(config.outbound_addr).await?;
        let outbound_addr = outbound_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: config.outbound_addr,
                source,
            })?;
        let otlp = config
            .otlp_endpoint
            .as_deref()
            .filter(|e| !e.is_empty())
            .map(|e| crate::otlp::OtlpExporter::spawn(e, &config.otel_service_name));
        let outbound = Outbound {
            client: client.clone(),
            default_namespace: config.namespace.clone().into(),
            cluster_domain: config.cluster_domain.clone().into(),
            limits: limits.clone(),
            otlp: otlp.clone(),
            sampler: crate::trace::Sampler::ratio(config.trace_sampling_ratio),
        };
        let mut proxies = vec![tokio::spawn(serve(
            outbound_listener,
            limits.clone(),
            proxies_rx.clone(),
            config.shutdown_grace,
            move |req, _peer| {
                let o = outbound.clone();
                async move { o.handle(req).await }
            },
        ))];

        let mut inbound_addr = None;
        if let Some(port) = config.app_port {
            let listener = bind(config.inbound_addr).await?;
            inbound_addr = listener.local_addr().ok();
            let mut inbound = Inbound::new(
                SocketAddr::from(([127, 0, 0, 1], port)),
                metrics.clone(),
                limits.clone(),
            );
            inbound.otlp = otlp.clone();
            inbound.set_pool_config(app_pool);
            inbound.sampler = crate::trace::Sampler::ratio(config.trace_sampling_ratio);
            proxies.push(tokio::spawn(serve(
                listener,
                limits.clone(),
                proxies_rx.clone(),
                config.shutdown_grace,
                move |req, _peer| {
                    let i = inbound.clone();
                    async move { i.handle(req).await }
                },
            )));
        }

        let admin_listener = bind(config.admin_addr).await?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: config.admin_addr,
                source,
            })?;
        let admin = Admin {
            client: client.clone(),
            draining: draining.clone(),
        };
        let admin = tokio::spawn(serve(
            admin_listener,
            limits,
            admin_rx,
            std::time::Duration::from_secs(1),
            move |req, _peer| {
                let a = admin.clone();
                async move {
                    a.handle(req)
                        .await
                        .map(|b| body::boxed(b.map_err(|never| match never {})))
                }
            },
        ));
        tracing::info!(%outbound_addr, ?inbound_addr, %admin_addr, "sidecar started");
        Ok(Sidecar {
            outbound_addr,
            inbound_addr,
            admin_addr,
            client,
            draining,
            shutdown_proxies,
            shutdown_admin,
            proxies,
            admin,
        })
    }

    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound_addr
    }

    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn client(&self) -> &MeshClient {
        &self.client
    }

    /// Stops accepting, lets in-flight requests finish (up to the grace period), then stops the
    /// admin listener. `/ready` answers 503 while draining.
    pub async fn shutdown(self) {
        self.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown_proxies.send(true);
        for p in self.proxies {
            let _ = p.await;
        }
        let _ = self.shutdown_admin.send(true);
        let _ = self.admin.await;
        tracing::info!("sidecar drained");
    }
}
