//! The test HTTP backend: a [`TestServer`] that answers every request with its name (body and
//! `x-backend`), after a settable delay, with a settable status; it reports the request body's
//! length in `x-body-len` and echoes the `traceparent` it received in `x-seen-traceparent`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};

use crate::server::{TestServer, handler};

pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    /// Requests received.
    pub hits: Arc<AtomicUsize>,
    pub delay_ms: Arc<AtomicU64>,
    pub status: Arc<AtomicU16>,
    server: TestServer,
}

impl Backend {
    /// A backend on `ip` (one of the 127.0.0.x loopback addresses), port chosen by the OS.
    pub fn start(name: &str, ip: [u8; 4]) -> Backend {
        Self::start_at(name, SocketAddr::from((ip, 0)))
    }

    pub fn start_at(name: &str, addr: SocketAddr) -> Backend {
        let hits = Arc::new(AtomicUsize::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let status = Arc::new(AtomicU16::new(200));
        let answer = {
            let (name, hits, delay, status) = (
                name.to_string(),
                hits.clone(),
                delay_ms.clone(),
                status.clone(),
            );
            handler(move |req| {
                let (name, hits, delay, status) =
                    (name.clone(), hits.clone(), delay.clone(), status.clone());
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let d = delay.load(Ordering::SeqCst);
                    if d > 0 {
                        tokio::time::sleep(Duration::from_millis(d)).await;
                    }
                    let seen = req.headers().get("traceparent").cloned();
                    let len = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes().len())
                        .unwrap_or(usize::MAX);
                    let mut resp = Response::new(Full::new(Bytes::from(name.clone())));
                    *resp.status_mut() = StatusCode::from_u16(status.load(Ordering::SeqCst))
                        .unwrap_or(StatusCode::OK);
                    if let Ok(v) = name.parse() {
                        resp.headers_mut().insert("x-backend", v);
                    }
                    resp.headers_mut().insert("x-body-len", len.into());
                    if let Some(t) = seen {
                        resp.headers_mut().insert("x-seen-traceparent", t);
                    }
                    resp
                }
            })
        };
        let server = TestServer::start(addr, answer);
        Backend {
            name: name.to_string(),
            addr: server.addr(),
            hits,
            delay_ms,
            status,
            server,
        }
    }

    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn set_status(&self, status: StatusCode) {
        self.status.store(status.as_u16(), Ordering::SeqCst);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Kills the server: the listener and every open connection close at once.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts again on the same address.
    pub fn restart(&mut self) {
        self.server.restart();
    }

    /// Stops gracefully: requests in flight finish, idle connections close.
    pub async fn stop(&mut self) {
        self.server.stop().await;
    }
}
