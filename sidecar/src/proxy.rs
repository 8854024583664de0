//! The listeners: the shared HTTP/1.1 + h2c accept loop with the sidecar's limits, the
//! outbound proxy (authority → [`MeshClient`]) and the inbound proxy (→ the app's port).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::otlp::{OtlpExporter, SpanKind, SpanRecord};
use crate::trace::{self, Sampler, TraceContext};
use sagamesh_discovery::name::parse_authority;
use sagamesh_mesh::body::{self, BoxBody};
use sagamesh_mesh::caller::{self, Caller};
use sagamesh_mesh::client::{ClientConfig, MeshClient, send_failure, strip_hop_by_hop};
use sagamesh_mesh::error::{ERROR_HEADER, MeshError};
use sagamesh_mesh::metrics::{DestinationLabels, Metrics, RequestLabels, status_class};
use sagamesh_mesh::pool::{Pool, PoolConfig};
use sagamesh_server::{DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_HEADER_BYTES, ServeOptions};

/// Exports the span of one proxied request, when OTLP export is on and the trace is sampled
/// (an unsampled caller's trace, or a root the sampler left out, is only propagated).
#[allow(clippy::too_many_arguments)]
fn export_span(
    otlp: Option<&OtlpExporter>,
    parent: Option<TraceContext>,
    context: TraceContext,
    name: impl FnOnce() -> String,
    kind: SpanKind,
    start: std::time::SystemTime,
    method: &Method,
    resp: &Response<BoxBody>,
) {
    let Some(otlp) = otlp.filter(|_| context.is_sampled()) else {
        return;
    };
    let mut attributes = vec![
        ("http.request.method", method.as_str().into()),
        (
            "http.response.status_code",
            i64::from(resp.status().as_u16()).into(),
        ),
    ];
    let error = resp
        .headers()
        .get(ERROR_HEADER)
        .and_then(|v| v.to_str().ok());
    if let Some(e) = error {
        attributes.push(("sagamesh.error", e.into()));
    }
    otlp.export(SpanRecord {
        context,
        parent_span_id: parent.map(|p| p.span_id),
        name: name(),
        kind,
        start,
        end: std::time::SystemTime::now(),
        attributes,
        error: error.is_some() || resp.status().is_server_error(),
    });
}

/// Limits every listener applies to what callers send.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest request head (HTTP/1 read buffer; HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Largest request body; larger ones get a 413 (or the stream is cut when the size was
    /// not announced).
    pub max_body_bytes: u64,
    /// Time a client has to send a full HTTP/1 request head (slow-loris guard). hyper also
    /// applies it to idle keep-alive connections, so it doubles as their idle timeout.
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_body_bytes: 16 * 1024 * 1024,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
        }
    }
}

/// A response the sidecar makes itself, with `x-sagamesh-error`. gRPC callers get a
/// trailers-only gRPC error (UNAVAILABLE, or DEADLINE_EXCEEDED for timeouts) so their client
/// library reports it properly.
pub fn error_response(err: &MeshError, grpc: bool) -> Response<BoxBody> {
    let mut resp = if grpc {
        let code = match err {
            MeshError::Timeout(_) => "4",
            MeshError::BadRequest(_) => "3",
            MeshError::BodyTooLarge => "8",
            _ => "14",
        };
        let mut r = Response::new(body::empty());
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static(code));
        if let Ok(v) = HeaderValue::from_str(&err.to_string().replace(['\r', '\n'], " ")) {
            h.insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(body::full(format!("{err}\n")));
        *r.status_mut() = err.status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    resp.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(err.code()));
    resp
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Checks announced body size and wraps the body with the limit.
fn limit_body(req: Request<Incoming>, max: u64) -> Result<Request<BoxBody>, MeshError> {
    if req.body().size_hint().lower() > max {
        return Err(MeshError::BodyTooLarge);
    }
    Ok(req.map(|b| {
        http_body_util::Limited::new(b, usize::try_from(max).unwrap_or(usize::MAX))
            .map_err(body::BodyError)
            .boxed()
    }))
}

/// Refuses what RFC 9112 §3.2 says a server must not act on and hyper lets through: more
/// than one `Host` header, and the asterisk form (`GET *`) on anything but OPTIONS. CONNECT is
/// not proxied. Cheap: no allocation unless refused.
fn check_request_target<B>(req: &Request<B>) -> Result<(), MeshError> {
    if req.method() == Method::CONNECT {
        return Err(MeshError::BadRequest("CONNECT is not supported".into()));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Err(MeshError::BadRequest("more than one Host header".into()));
    }
    if req.uri().path() == "*" && req.method() != Method::OPTIONS {
        return Err(MeshError::BadRequest(
            "the asterisk-form request target is only for OPTIONS".into(),
        ));
    }
    Ok(())
}

/// Serves `listener` until `shutdown` turns true, then stops accepting and drains open
/// connections for up to `grace` (the accept loop is `sagamesh_server::serve`).
pub async fn serve<S, F>(
    listener: TcpListener,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
    handler: S,
) where
    S: Fn(Request<Incoming>, SocketAddr) -> F + Send + Sync + 'static,
    F: Future<Output = Response<BoxBody>> + Send + 'static,
{
    let options = ServeOptions {
        header_read_timeout: limits.header_read_timeout,
        max_header_bytes: limits.max_header_bytes,
        grace,
        ..ServeOptions::default()
    };
    // Shared by every connection and request: a clone per request is one reference count.
    let handler = Arc::new(handler);
    sagamesh_server::serve(listener, options, shutdown, move |peer| {
        let handler = handler.clone();
        // Marked gone when the connection ends, which drops this service (see `caller`).
        let caller = Caller::new();
        let gone_on_end = caller.gone_on_drop();
        service_fn(move |req| {
            let _connection_open = &gone_on_end;
            // Boxed: a request's future (balancing, retries, the endpoint call) is several
            // KiB, and hyper moves it into place and, for HTTP/2, into a task per stream;
            // copying it on every request was the top cost of the h2 path. The handler's
            // future is created inside the box on first poll, not built on the stack and then
            // copied in.
            let handler = handler.clone();
            let fut: Pin<Box<dyn Future<Output = Response<BoxBody>> + Send>> =
                Box::pin(caller::scope(caller.clone(), async move {
                    handler(req, peer).await
                }));
            async move { Ok::<_, Infallible>(fut.await) }
        })
    })
    .await
}

/// The outbound proxy's handler state.
#[derive(Clone)]
pub struct Outbound {
    pub client: MeshClient,
    pub default_namespace: Arc<str>,
    pub cluster_domain: Arc<str>,
    pub limits: Limits,
    pub otlp: Option<OtlpExporter>,
    /// Samples the traces this proxy starts.
    pub sampler: Sampler,
}

impl Outbound {
    /// Handles one request from the app.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<BoxBody> {
        let grpc = is_grpc(&req);
        let start = Instant::now();
        match self.route(req).await {
            Ok(resp) => resp,
            Err(e) => {
                // Failures before a destination was known are counted here; the client counts
                // the rest.
                self.client.metrics().outbound_without_destination(
                    "unknown",
                    e.status(),
                    e.code(),
                    start.elapsed(),
                );
                error_response(&e, grpc)
            }
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<BoxBody>, MeshError> {
        check_request_target(&req)?;
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .ok_or_else(|| MeshError::BadRequest("no authority or Host header".into()))?;
        let target = parse_authority(&authority, &self.default_namespace, &self.cluster_domain)
            .map_err(|e| MeshError::BadRequest(e.to_string()))?;
        let grpc = is_grpc(&req);
        let mut req = limit_body(req, self.limits.max_body_bytes)?;
        let (parent, ctx) = trace::propagate_with_parent(req.headers_mut(), self.sampler);
        let span = tracing::debug_span!("outbound", destination = %target.service, trace_id = %ctx.trace_id_hex());
        let _entered = span.enter();
        let started = std::time::SystemTime::now();
        let method = req.method().clone();
        let resp = match self.client.send(&target, req).await {
            Ok(mut resp) => {
                strip_hop_by_hop(resp.headers_mut());
                resp
            }
            Err(e) => {
                tracing::debug!(destination = %target.service, error = %e, "request failed in the mesh");
                error_response(&e, grpc)
            }
        };
        export_span(
            self.otlp.as_ref(),
            parent,
            ctx,
            || format!("outbound {}", target.service),
            SpanKind::Client,
            started,
            &method,
            &resp,
        );
        Ok(resp)
    }
}

/// The inbound proxy: forwards to the app on 127.0.0.1:`app_port` and records inbound metrics.
/// The app's connections are pooled like an endpoint's ([`Pool`]: the lean HTTP/1.1 path, hyper's
/// client for streaming bodies, one shared HTTP/2 connection).
#[derive(Clone)]
pub struct Inbound {
    pub app: SocketAddr,
    pub metrics: Metrics,
    pub limits: Limits,
    pool: Arc<Pool>,
    pool_config: PoolConfig,
    app_host: Arc<str>,
    label: Arc<str>,
    pub otlp: Option<OtlpExporter>,
    /// Samples the traces this proxy starts.
    pub sampler: Sampler,
}

impl Inbound {
    pub fn new(app: SocketAddr, metrics: Metrics, limits: Limits) -> Self {
        Inbound {
            app,
            metrics,
            limits,
            pool: Arc::default(),
            pool_config: PoolConfig::from(&ClientConfig::default()),
            app_host: app.ip().to_string().into(),
            label: format!("app:{}", app.port()).into(),
            otlp: None,
            sampler: Sampler::ALWAYS,
        }
    }

    /// Connect and idle timeouts towards the app (the defaults until set).
    pub fn set_pool_config(&mut self, cfg: PoolConfig) {
        self.pool_config = cfg;
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<BoxBody> {
        let start = Instant::now();
        let grpc = is_grpc(&req);
        let started = std::time::SystemTime::now();
        let method = req.method().clone();
        let mut req = req;
        let (parent, ctx) = trace::propagate_with_parent(req.headers_mut(), self.sampler);
        let resp = match self.forward(req).await {
            Ok(r) => r,
            Err(e) => error_response(&e, grpc),
        };
        export_span(
            self.otlp.as_ref(),
            parent,
            ctx,
            || format!("inbound {}", self.label),
            SpanKind::Server,
            started,
            &method,
            &resp,
        );
        let error = resp
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                direction: "inbound".into(),
                destination: self.label.to_string(),
                status_class: status_class(resp.status()),
                error,
            })
            .inc();
        self.metrics
            .latency
            .get_or_create(&DestinationLabels {
                direction: "inbound".into(),
                destination: self.label.to_string(),
            })
            .observe(start.elapsed().as_secs_f64());
        resp
    }

    async fn forward(&self, req: Request<Incoming>) -> Result<Response<BoxBody>, MeshError> {
        check_request_target(&req)?;
        let h2 = req.version() == http::Version::HTTP_2;
        let req = limit_body(req, self.limits.max_body_bytes)?;
        let (mut parts, body) = req.into_parts();
        let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
        strip_hop_by_hop(&mut parts.headers);
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        parts.uri = format!("http://{}{path}", self.app)
            .parse()
            .map_err(|e| MeshError::BadRequest(format!("bad request target: {e}")))?;
        if h2 {
            parts.headers.remove(header::HOST);
        } else if let Some(a) = authority
            && !parts.headers.contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(&a)
        {
            parts.headers.insert(header::HOST, v);
        }
        parts.version = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        let req = Request::from_parts(parts, body);
        let res = self
            .pool
            .send(&self.app_host, self.app.port(), req, h2, &self.pool_config)
            .await;
        match res {
            Ok(mut resp) => {
                strip_hop_by_hop(resp.headers_mut());
                Ok(resp)
            }
            Err(e) => Err(send_failure(&self.app.to_string(), e).1),
        }
    }
}
