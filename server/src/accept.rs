//! The one accept loop: every Sagamesh HTTP server (the sidecar's outbound, inbound and admin
//! listeners, the operator's and local mode's admin servers, the injection webhook) accepts
//! connections here, with the same guards:
//!
//! - a request head must arrive within `header_read_timeout` of accept (slow-loris guard for
//!   HTTP/1 and HTTP/2 alike; hyper's own HTTP/1 timer then bounds each later head and idle
//!   keep-alive);
//! - a failed accept (EMFILE when the process is out of file descriptors, ENOBUFS, ...) backs
//!   off before the next one instead of spinning on the error;
//! - TLS, when configured, must finish its handshake within the same timeout;
//! - on shutdown the listener closes at once and open connections get `grace` to finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::{Service, service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use sagamesh_api::backoff::{Backoff, Jitter};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Default time a client has to send a request head.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default largest request head (HTTP/1 read buffer; HTTP/2 header list).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;

/// The pause after a failed accept grows from 5 ms to 1 s while accepts keep failing (a full
/// descriptor table frees up only as connections close), and starts over after one succeeds.
const ACCEPT_BACKOFF: Backoff = Backoff::new(
    Duration::from_millis(5),
    Duration::from_secs(1),
    Jitter::None,
);

/// How a server accepts and serves connections.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Time a client has from accept (TLS handshake included) to a full first request head,
    /// and, on HTTP/1, for each later head and between keep-alive requests.
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1 read buffer; HTTP/2 header list).
    pub max_header_bytes: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// How long open connections may finish after shutdown before they are closed.
    pub grace: Duration,
    /// Serve TLS with the configuration this handle holds at each accept.
    pub tls: Option<TlsHandle>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_concurrent_streams: 1024,
            grace: Duration::from_secs(1),
            tls: None,
        }
    }
}

/// The TLS configuration a server uses for new connections; replaced on certificate rotation
/// without restarting the server.
#[derive(Clone)]
pub struct TlsHandle(Arc<RwLock<Arc<rustls::ServerConfig>>>);

impl std::fmt::Debug for TlsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsHandle")
    }
}

impl TlsHandle {
    pub fn new(config: Arc<rustls::ServerConfig>) -> Self {
        Self(Arc::new(RwLock::new(config)))
    }
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn replace(&self, config: Arc<rustls::ServerConfig>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = config;
    }
}

fn builder(options: &ServeOptions) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(options.max_header_bytes.max(8192))
        // One flat buffer per write instead of a writev of head and body pieces (see the mesh's
        // `pool::http1_builder`).
        .writev(false)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(options.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(options.max_concurrent_streams);
    builder
}

/// Serves `listener` until `shutdown` turns true, then stops accepting and drains open
/// connections for up to `options.grace`. `make_service` builds each connection's service
/// from the peer's address; whatever the service owns lives exactly as long as the connection.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    options: ServeOptions,
    mut shutdown: watch::Receiver<bool>,
    make_service: M,
) where
    M: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = Arc::new(builder(&options));
    let graceful = GracefulShutdown::new();
    // Accepts failed in a row.
    let mut failures = 0u32;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                failures = 0;
                accepted
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let pause = ACCEPT_BACKOFF.delay(failures);
                tracing::warn!(error = %e, ?pause, "accept failed; pausing");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let service = make_service(peer);
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let head_timeout = options.header_read_timeout;
        match &options.tls {
            None => {
                tokio::spawn(async move {
                    connection(&builder, watcher, stream, service, head_timeout, peer).await;
                });
            }
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                tokio::spawn(async move {
                    let stream =
                        match tokio::time::timeout(head_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "no TLS handshake in time; closing");
                                return;
                            }
                        };
                    connection(&builder, watcher, stream, service, head_timeout, peer).await;
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(options.grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?options.grace, "grace period over; closing connections still open");
    }
}

/// Serves one connection. Until its first request head is in, the connection lives on the head
/// timeout: hyper's HTTP/1 head timer only starts once hyper_util has told HTTP/1 from HTTP/2
/// (which waits for bytes), and HTTP/2 has none, so a silent connection, or one that sent only
/// the h2 preface, would otherwise be held forever.
async fn connection<I, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    io: I,
    service: S,
    head_timeout: Duration,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // A load first: on HTTP/2 many streams share the flag, so no write per request once set.
    let got_head = Arc::new(AtomicBool::new(false));
    let seen = got_head.clone();
    let service = service_fn(move |req| {
        if !seen.load(Ordering::Relaxed) {
            seen.store(true, Ordering::Relaxed);
        }
        service.call(req)
    });
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    let mut conn = std::pin::pin!(watcher.watch(conn));
    let result = match tokio::time::timeout(head_timeout, conn.as_mut()).await {
        Ok(result) => result,
        Err(_) if !got_head.load(Ordering::Relaxed) => {
            tracing::debug!(%peer, ?head_timeout, "no request head in time; closing");
            return;
        }
        Err(_) => conn.await,
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
