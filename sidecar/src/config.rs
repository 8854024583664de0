//! Sidecar settings: flags, each with an environment variable (the injected container sets the
//! variables). Durations are written as in the CRDs (`250ms`, `30s`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sagamesh_mesh::ClientConfig;

use crate::proxy::Limits;

fn duration(s: &str) -> Result<Duration, String> {
    sagamesh_api::duration::parse(s).map_err(|e| e.to_string())
}

fn ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "{s:?} is not a ratio from 0.0 to 1.0 (0.1 samples one trace in ten)"
        )),
    }
}

pub use sagamesh_server::logging::LogFormat;

/// `sagamesh-sidecar` settings.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "sagamesh-sidecar",
    version,
    about = "Sagamesh data plane: outbound and inbound proxy with per-request balancing, circuit breaking, retries and timeouts"
)]
pub struct Config {
    /// Where the app sends outbound requests (plain HTTP/1.1 or h2c, destination as authority).
    #[arg(long, env = "SAGAMESH_OUTBOUND_ADDR", default_value = "127.0.0.1:4140")]
    pub outbound_addr: SocketAddr,

    /// Inbound listener; forwards to the app's port. Disabled when no app port is set.
    #[arg(long, env = "SAGAMESH_INBOUND_ADDR", default_value = "0.0.0.0:4143")]
    pub inbound_addr: SocketAddr,

    /// The app's port on 127.0.0.1 that inbound requests are forwarded to.
    #[arg(long, env = "SAGAMESH_APP_PORT")]
    pub app_port: Option<u16>,

    /// Admin listener: /metrics, /ready, /live, /debug/discovery.
    #[arg(long, env = "SAGAMESH_ADMIN_ADDR", default_value = "0.0.0.0:4191")]
    pub admin_addr: SocketAddr,

    /// The control plane's discovery gRPC address, e.g. http://sagamesh-operator.sagamesh:8090.
    #[arg(long, env = "SAGAMESH_DISCOVERY_ADDR", conflicts_with = "manifests")]
    pub discovery_addr: Option<String>,

    /// A ServiceRegistration manifest file or directory (local mode), polled for changes.
    #[arg(long, env = "SAGAMESH_MANIFESTS")]
    pub manifests: Option<PathBuf>,

    /// How often the manifests are checked for changes.
    #[arg(long, env = "SAGAMESH_MANIFEST_POLL_INTERVAL", default_value = "1s", value_parser = duration)]
    pub manifest_poll_interval: Duration,

    /// The program that checks the --manifests files (run as `PROGRAM --json -- FILE...` on each
    /// change, so its validator is not resident in the sidecar). Default: sagamesh-manifest-check
    /// beside this binary, else on PATH.
    #[arg(long, env = "SAGAMESH_MANIFEST_CHECKER")]
    pub manifest_checker: Option<PathBuf>,

    /// Namespace of destinations named without one (`orders` = `orders.<namespace>`); the pod's
    /// own namespace.
    #[arg(long, env = "SAGAMESH_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Cluster DNS domain, for `name.ns.svc.<domain>` authorities.
    #[arg(long, env = "SAGAMESH_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Who this sidecar is, sent to the control plane (e.g. pod-name.namespace).
    #[arg(long, env = "SAGAMESH_CALLER", default_value = "unknown")]
    pub caller: String,

    /// How long a request waits for discovery's first answer about a new destination.
    #[arg(long, env = "SAGAMESH_DISCOVERY_TIMEOUT", default_value = "3s", value_parser = duration)]
    pub discovery_timeout: Duration,

    /// Largest request body buffered so the request can be retried; larger bodies are sent once.
    #[arg(long, env = "SAGAMESH_MAX_RETRY_BODY_BYTES", default_value_t = ClientConfig::default().max_retry_body_bytes)]
    pub max_retry_body_bytes: u64,

    /// Largest request body accepted (413 beyond).
    #[arg(long, env = "SAGAMESH_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: u64,

    /// Largest request head accepted (HTTP/1 head, HTTP/2 header list).
    #[arg(long, env = "SAGAMESH_MAX_HEADER_BYTES", default_value_t = Limits::default().max_header_bytes)]
    pub max_header_bytes: usize,

    /// Time a caller has from connecting to the end of its first request head (HTTP/1.1 and
    /// HTTP/2), and on HTTP/1.1 between requests on a kept-alive connection; past it the
    /// connection is closed.
    #[arg(long, env = "SAGAMESH_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub header_read_timeout: Duration,

    /// Most distinct destinations watched at once; further names get `unknown-service`.
    #[arg(long, env = "SAGAMESH_MAX_DESTINATIONS", default_value_t = ClientConfig::default().max_destinations)]
    pub max_destinations: usize,

    /// TCP connect timeout to endpoints.
    #[arg(long, env = "SAGAMESH_CONNECT_TIMEOUT", default_value = "1s", value_parser = duration)]
    pub connect_timeout: Duration,

    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "SAGAMESH_SHUTDOWN_GRACE", default_value = "30s", value_parser = duration)]
    pub shutdown_grace: Duration,

    /// No random jitter on retry backoff (repeatable tests).
    #[arg(long, env = "SAGAMESH_NO_JITTER", default_value_t = false)]
    pub no_jitter: bool,

    /// OTLP/HTTP collector for spans (JSON encoding, plain HTTP), e.g. http://otel-collector:4318.
    /// Unset: no span export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Share of the traces this sidecar starts that are sampled (exported here and, through
    /// the `traceparent` flags, by the sidecars downstream), 0.0 to 1.0. A caller's own
    /// sampling decision is always followed.
    #[arg(long, env = "SAGAMESH_TRACE_SAMPLING_RATIO", default_value_t = 1.0, value_parser = ratio)]
    pub trace_sampling_ratio: f64,

    /// `service.name` of exported spans.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "sagamesh-sidecar")]
    pub otel_service_name: String,

    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "SAGAMESH_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Threads that serve traffic. 1: a single-threaded runtime (everything on one thread, as
    /// one HAProxy thread or one Envoy worker); N > 1: N worker threads. Unset: one per CPU.
    #[arg(long, env = "SAGAMESH_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

impl Config {
    /// Defaults for embedding and tests: every listener on 127.0.0.1 with an OS-chosen port.
    /// The numbers are the libraries' own defaults (`ClientConfig::default()`,
    /// `Limits::default()`), which the flags' defaults must equal (a test checks).
    pub fn local_test() -> Self {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let client = ClientConfig::default();
        let limits = Limits::default();
        Config {
            outbound_addr: any,
            inbound_addr: any,
            app_port: None,
            admin_addr: any,
            discovery_addr: None,
            manifests: None,
            manifest_poll_interval: Duration::from_millis(100),
            manifest_checker: None,
            namespace: "default".into(),
            cluster_domain: "cluster.local".into(),
            caller: "test".into(),
            discovery_timeout: client.discovery_timeout,
            max_retry_body_bytes: client.max_retry_body_bytes,
            max_body_bytes: limits.max_body_bytes,
            max_header_bytes: limits.max_header_bytes,
            header_read_timeout: limits.header_read_timeout,
            max_destinations: client.max_destinations,
            connect_timeout: client.connect_timeout,
            shutdown_grace: Duration::from_secs(5),
            no_jitter: true,
            otlp_endpoint: None,
            trace_sampling_ratio: 1.0,
            otel_service_name: "sagamesh-sidecar".into(),
            log_format: LogFormat::Text,
            worker_threads: None,
        }
    }

    /// The tokio runtime `--worker-threads` asks for.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        match self.worker_threads {
            Some(1) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            Some(n) => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(usize::from(n))
                .enable_all()
                .build(),
            None => tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_parse() {
        let c = Config::try_parse_from([
            "sagamesh-sidecar",
            "--manifests",
            "/etc/sagamesh",
            "--shutdown-grace",
            "1500ms",
            "--app-port",
            "8080",
        ])
        .expect("parse");
        assert_eq!(c.shutdown_grace, Duration::from_millis(1500));
        assert_eq!(c.app_port, Some(8080));
        assert_eq!(c.outbound_addr.port(), 4140);
        assert!(
            Config::try_parse_from(["x", "--manifests", "a", "--discovery-addr", "http://b"])
                .is_err()
        );
        assert!(Config::try_parse_from(["x", "--shutdown-grace", "soon"]).is_err());
    }

    /// The flags' defaults and the libraries' defaults are one set of numbers.
    #[test]
    fn flag_defaults_are_the_library_defaults() {
        let flags = Config::try_parse_from(["x"]).expect("parse");
        let library = Config::local_test();
        assert_eq!(
            (
                flags.discovery_timeout,
                flags.max_retry_body_bytes,
                flags.max_body_bytes,
                flags.max_header_bytes,
                flags.header_read_timeout,
                flags.max_destinations,
                flags.connect_timeout,
                flags.trace_sampling_ratio,
                flags.log_format,
            ),
            (
                library.discovery_timeout,
                library.max_retry_body_bytes,
                library.max_body_bytes,
                library.max_header_bytes,
                library.header_read_timeout,
                library.max_destinations,
                library.connect_timeout,
                library.trace_sampling_ratio,
                library.log_format,
            )
        );
    }

    #[test]
    fn trace_sampling_ratio_is_validated() {
        let c = Config::try_parse_from(["x"]).expect("parse");
        assert_eq!(c.trace_sampling_ratio, 1.0);
        for (value, want) in [("0", 0.0), ("0.25", 0.25), ("1.0", 1.0)] {
            let c = Config::try_parse_from(["x", "--trace-sampling-ratio", value]).expect(value);
            assert_eq!(c.trace_sampling_ratio, want);
        }
        for bad in ["1.5", "-0.1", "NaN", "half", "inf"] {
            let e = Config::try_parse_from(["x".into(), format!("--trace-sampling-ratio={bad}")])
                .expect_err(bad)
                .to_string();
            assert!(e.contains("not a ratio from 0.0 to 1.0"), "{bad}: {e}");
        }
    }

    #[test]
    fn worker_threads_pick_the_runtime() {
        let c = Config::try_parse_from(["x"]).expect("parse");
        assert_eq!(c.worker_threads, None);
        let rt = c.runtime().expect("runtime");
        assert_eq!(
            rt.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::MultiThread
        );

        let c = Config::try_parse_from(["x", "--worker-threads", "1"]).expect("parse");
        let rt = c.runtime().expect("runtime");
        assert_eq!(
            rt.handle().runtime_flavor(),
            tokio::runtime::RuntimeFlavor::CurrentThread
        );
        assert_eq!(rt.metrics().num_workers(), 1);

        let c = Config::try_parse_from(["x", "--worker-threads", "3"]).expect("parse");
        let rt = c.runtime().expect("runtime");
        assert_eq!(rt.metrics().num_workers(), 3);

        assert!(Config::try_parse_from(["x", "--worker-threads", "0"]).is_err());
        assert!(Config::try_parse_from(["x", "--worker-threads", "many"]).is_err());
    }
}
