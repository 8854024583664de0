//! Connections to one endpoint: idle HTTP/1.1 connections for reuse, and one shared HTTP/2
//! connection that carries every h2 request (per-request balancing happens above, across
//! endpoints; the HTTP/2 side is in [`crate::h2_upstream`]).
//!
//! HTTP/1.1 takes one of two paths. A request whose body is complete when it is sent (no body,
//! a small POST that arrived with its head, a retry's buffered body: nearly every service call)
//! goes through [`crate::h1_upstream`] on the request's own task, and its idle connections hold
//! only their sockets. A request whose body is still streaming in goes through hyper's HTTP/1
//! client, which writes the body while it reads the response; those connections are pooled
//! apart.
//!
//! Why not hyper-util's pooling `Client`: the profile of the sidecar's hot path showed it as
//! the largest single cost after the proxy's own fixes — a global pool map hashed with SipHash
//! on every checkout and return, boxed connect futures raced against checkouts, and, for every
//! HTTP/1.1 request, a task spawned only to wait until the connection could be pooled again.
//! Here the pool belongs to the endpoint the balancer already chose, so a checkout is a pop from
//! a short vector, and an HTTP/1.1 connection goes back to it when its response body ends.
//! Kept from hyper-util's behaviour: a request that a reused connection could not send (it was
//! closed meanwhile) is sent again on another connection, idle connections expire, and connect
//! failures are told apart from failures after sending.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::{self, Arrived, BodyError, BoxBody};
use crate::{h1_upstream, h2_upstream};

/// Most idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE: usize = 256;

/// Why a request could not be sent.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (nothing was sent): the reason.
    Connect(String),
    /// The request failed on an open connection (a hyper or h2 error, or the caller's
    /// [`BodyError`] when sending its body failed).
    Request(Box<dyn std::error::Error + Send + Sync>),
}

/// Connection settings.
#[derive(Clone, Copy, Debug)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

type Idle = Arc<Mutex<Vec<(http1::SendRequest<BoxBody>, Instant)>>>;

/// Idle connections of the lean HTTP/1.1 path; a finished response body puts its connection
/// back here.
#[derive(Debug, Default)]
struct LeanIdle(Mutex<Vec<(h1_upstream::Connection, Instant)>>);

impl h1_upstream::Release for LeanIdle {
    fn release(&self, conn: h1_upstream::Connection) {
        let mut idle = lock(&self.0);
        if idle.len() < MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }
}

/// The connections of one endpoint.
#[derive(Debug, Default)]
pub struct Pool {
    lean: Arc<LeanIdle>,
    /// hyper's connections, for requests with a streaming body.
    idle: Idle,
    h2: Mutex<Option<h2_upstream::Connection>>,
    /// Held while an h2 connection is being made, so concurrent requests share it.
    h2_connecting: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

async fn connect(host: &str, port: u16, cfg: &PoolConfig) -> Result<TcpStream, SendError> {
    let stream =
        match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect((host, port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SendError::Connect(format!("tcp connect error: {e}"))),
            Err(_) => {
                return Err(SendError::Connect(format!(
                    "tcp connect timed out after {:?}",
                    cfg.connect_timeout
                )));
            }
        };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// HTTP/1.1 towards endpoints. `writev(false)`: hyper then copies the body into the buffer
/// that holds the head and sends both with one `send`, rather than a `writev` of separate
/// pieces; for the small messages most service calls are, that cost less kernel time per
/// request in the proxy benchmark (docs/benchmarks.md). Large bodies pay one extra copy.
fn http1_builder() -> http1::Builder {
    let mut b = http1::Builder::new();
    b.writev(false);
    b
}

impl Pool {
    /// Number of idle HTTP/1.1 connections (for tests and the debug dump).
    pub fn idle_h1(&self) -> usize {
        lock(&self.idle).len() + lock(&self.lean.0).len()
    }

    /// Sends `req` to `host:port`: over HTTP/2 when `h2` (the request's URI must then carry
    /// scheme and authority), else over HTTP/1.1 in origin form (`Host` set by the caller).
    pub async fn send(
        &self,
        host: &str,
        port: u16,
        req: Request<BoxBody>,
        h2: bool,
        cfg: &PoolConfig,
    ) -> Result<Response<BoxBody>, SendError> {
        if h2 {
            self.send_h2(host, port, req, cfg).await
        } else {
            self.send_h1(host, port, req, cfg).await
        }
    }

    fn checkout_h1(&self, idle_timeout: Duration) -> Option<http1::SendRequest<BoxBody>> {
        let now = Instant::now();
        let mut idle = lock(&self.idle);
        while let Some((tx, since)) = idle.pop() {
            if !tx.is_closed() && now.saturating_duration_since(since) < idle_timeout {
                return Some(tx);
            }
        }
        None
    }

    fn checkout_lean(&self, idle_timeout: Duration) -> Option<h1_upstream::Connection> {
        let now = Instant::now();
        let mut idle = lock(&self.lean.0);
        while let Some((conn, since)) = idle.pop() {
            if now.saturating_duration_since(since) < idle_timeout && conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    /// HTTP/1.1: the lean path when the body is complete now, else hyper's client.
    async fn send_h1(
        &self,
        host: &str,
        port: u16,
        req: Request<BoxBody>,
        cfg: &PoolConfig,
    ) -> Result<Response<BoxBody>, SendError> {
        let (parts, body) = req.into_parts();
        match body::arrived(body)
            .await
            .map_err(|e| SendError::Request(Box::new(e)))?
        {
            Arrived::Complete(data) => self.send_lean(host, port, &parts, &data, cfg).await,
            Arrived::Streaming(body) => {
                self.send_hyper(host, port, Request::from_parts(parts, body), cfg)
                    .await
            }
        }
    }

    async fn send_lean(
        &self,
        host: &str,
        port: u16,
        parts: &http::request::Parts,
        data: &[u8],
        cfg: &PoolConfig,
    ) -> Result<Response<BoxBody>, SendError> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let encoded = h1_upstream::encode(&parts.method, path, &parts.headers, data);
        // A safe request may go once more on a new connection when a reused one was closed by
        // the endpoint just as it was sent (its keep-alive timeout), as browsers and Go do.
        let safe = matches!(
            parts.method,
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::TRACE
        );
        let release: Arc<dyn h1_upstream::Release> = self.lean.clone();
        let mut resent = false;
        loop {
            let (conn, reused) = match self.checkout_lean(cfg.idle_timeout) {
                Some(c) => (c, true),
                None => (
                    h1_upstream::Connection::new(connect(host, port, cfg).await?),
                    false,
                ),
            };
            match h1_upstream::send(conn, &encoded, reused, release.clone()).await {
                Ok(resp) => return Ok(resp),
                Err(h1_upstream::Error::NotSent(_)) if reused => continue,
                Err(h1_upstream::Error::ClosedBeforeResponse) if reused && safe && !resent => {
                    resent = true;
                }
                Err(e) => return Err(SendError::Request(Box::new(e))),
            }
        }
    }

    async fn send_hyper(
        &self,
        host: &str,
        port: u16,
        mut req: Request<BoxBody>,
        cfg: &PoolConfig,
    ) -> Result<Response<BoxBody>, SendError> {
        // Origin form towards the endpoint (RFC 9112 §3.2.1): hyper's connection API writes the
        // URI as it is given, and the caller's is absolute.
        if req.uri().scheme().is_some() {
            let mut origin = http::uri::Parts::default();
            origin.path_and_query = req.uri().path_and_query().cloned();
            if let Ok(uri) = http::Uri::from_parts(origin) {
                *req.uri_mut() = uri;
            }
        }
        loop {
            let (mut tx, reused) = match self.checkout_h1(cfg.idle_timeout) {
                Some(tx) => (tx, true),
                None => {
                    let io = TokioIo::new(connect(host, port, cfg).await?);
                    let (tx, conn) = http1_builder()
                        .handshake::<_, BoxBody>(io)
                        .await
                        .map_err(|e| SendError::Connect(format!("handshake: {e}")))?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "endpoint connection ended with an error");
                        }
                    });
                    (tx, false)
                }
            };
            // A pooled connection whose last response just ended may need a moment.
            if reused && tx.ready().await.is_err() {
                continue;
            }
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    return Ok(resp.map(|b| {
                        body::boxed(ReturnOnEnd {
                            inner: b,
                            tx: Some(tx),
                            idle: self.idle.clone(),
                            done: false,
                        })
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the pooled connection was closed meanwhile. Try another.
                    Some(m) if reused => req = m,
                    _ => return Err(SendError::Request(Box::new(e.into_error()))),
                },
            }
        }
    }

    async fn h2_connection(
        &self,
        host: &str,
        port: u16,
        cfg: &PoolConfig,
        fresh: bool,
    ) -> Result<(h2_upstream::Connection, bool), SendError> {
        let current = |pool: &Self| lock(&pool.h2).as_ref().filter(|c| !c.is_closed()).cloned();
        if !fresh && let Some(c) = current(self) {
            return Ok((c, true));
        }
        let _connecting = self.h2_connecting.lock().await;
        if !fresh && let Some(c) = current(self) {
            return Ok((c, true));
        }
        let io = connect(host, port, cfg).await?;
        let conn = h2_upstream::Connection::handshake(io)
            .await
            .map_err(|e| SendError::Connect(format!("h2 handshake: {e}")))?;
        *lock(&self.h2) = Some(conn.clone());
        Ok((conn, false))
    }

    async fn send_h2(
        &self,
        host: &str,
        port: u16,
        req: Request<BoxBody>,
        cfg: &PoolConfig,
    ) -> Result<Response<BoxBody>, SendError> {
        let (conn, reused) = self.h2_connection(host, port, cfg, false).await?;
        let failed = |e: h2_upstream::Error| match e {
            h2_upstream::Error::NotSent(e, _) => SendError::Request(Box::new(e)),
            h2_upstream::Error::Failed(e) => SendError::Request(e),
        };
        match conn.send(req).await {
            Ok(resp) => Ok(resp),
            // The shared connection went away before this request was sent: once more on a
            // new one (as hyper-util's pool does).
            Err(h2_upstream::Error::NotSent(_, req)) if reused => {
                let (conn, _) = self.h2_connection(host, port, cfg, true).await?;
                conn.send(*req).await.map_err(failed)
            }
            Err(e) => Err(failed(e)),
        }
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/1.1 response body that gives its connection back to the endpoint's idle list
    /// when it was read to the end (a body dropped half-read takes its connection with it).
    struct ReturnOnEnd {
        #[pin]
        inner: Incoming,
        tx: Option<http1::SendRequest<BoxBody>>,
        idle: Idle,
        // The body said it ended (chunked bodies never report is_end_stream).
        done: bool,
    }

    impl PinnedDrop for ReturnOnEnd {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if (*this.done || this.inner.is_end_stream())
                && let Some(tx) = this.tx.take()
                && !tx.is_closed()
            {
                let mut idle = lock(this.idle);
                if idle.len() < MAX_IDLE {
                    idle.push((tx, Instant::now()));
                }
            }
        }
    }
}

impl Body for ReturnOnEnd {
    type Data = bytes::Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, BodyError>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        if matches!(res, Poll::Ready(None)) {
            *this.done = true;
        }
        res.map_err(|e| BodyError(Box::new(e)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
