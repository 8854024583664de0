//! Test helpers: real HTTP backends and gRPC servers on loopback, each on its own runtime so a
//! test can kill one (every socket closes at once) and start it again on the same address.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sagamesh_api::service_registration as sr;
use sagamesh_discovery::Discover;
use sagamesh_discovery::proto as pb;
use sagamesh_sidecar::Sidecar;
use sagamesh_sidecar::config::Config;
use tokio::runtime::Runtime;

/// Every wait in a test is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A free port on `ip` (bound, then released).
pub fn free_port(ip: [u8; 4]) -> SocketAddr {
    sagamesh_testing::free_addr(ip)
}

fn bind_std(addr: SocketAddr) -> std::net::TcpListener {
    // The port may linger briefly after a kill; retry for a while.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => {
                l.set_nonblocking(true).expect("nonblocking");
                return l;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("bind {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }
}

/// A real HTTP/1.1 + h2c backend. Answers with its name in the body and `x-backend`, after
/// `delay`, with `status`; echoes the `traceparent` it received in `x-seen-traceparent`.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub delay_ms: Arc<AtomicU64>,
    pub status: Arc<AtomicU16>,
    rt: Option<Runtime>,
}

impl Backend {
    pub fn start(name: &str, ip: [u8; 4]) -> Backend {
        Self::start_at(name, SocketAddr::from((ip, 0)))
    }

    pub fn start_at(name: &str, addr: SocketAddr) -> Backend {
        let mut b = Backend {
            name: name.to_string(),
            addr,
            hits: Arc::new(AtomicUsize::new(0)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            status: Arc::new(AtomicU16::new(200)),
            rt: None,
        };
        b.run();
        b
    }

    fn run(&mut self) {
        let listener = bind_std(self.addr);
        self.addr = listener.local_addr().expect("addr");
        let rt = runtime();
        let (name, hits, delay, status) = (
            self.name.clone(),
            self.hits.clone(),
            self.delay_ms.clone(),
            self.status.clone(),
        );
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (name, hits, delay, status) =
                    (name.clone(), hits.clone(), delay.clone(), status.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
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
                            *resp.status_mut() =
                                StatusCode::from_u16(status.load(Ordering::SeqCst))
                                    .unwrap_or(StatusCode::OK);
                            resp.headers_mut()
                                .insert("x-backend", name.parse().expect("name header"));
                            resp.headers_mut().insert("x-body-len", len.into());
                            if let Some(t) = seen {
                                resp.headers_mut().insert("x-seen-traceparent", t);
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        self.rt = Some(rt);
    }

    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Kills the server: the listener and every open connection close at once.
    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    /// Starts again on the same address.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A spec with explicit endpoints at `addrs` and one HTTP port 80.
pub fn spec(addrs: &[SocketAddr]) -> sr::ServiceRegistrationSpec {
    sr::ServiceRegistrationSpec {
        endpoints: Some(
            addrs
                .iter()
                .map(|a| sr::ExplicitEndpoint {
                    address: a.ip().to_string(),
                    port: i32::from(a.port()),
                    weight: None,
                    zone: None,
                })
                .collect(),
        ),
        ports: vec![sr::ServicePort {
            name: "http".into(),
            port: 80,
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub fn snapshot(name: &str, spec: &sr::ServiceRegistrationSpec) -> pb::Snapshot {
    pb::snapshot_from_spec("default", name, spec).expect("snapshot")
}

pub async fn start_sidecar(discover: Arc<dyn Discover>) -> Sidecar {
    start_sidecar_with(Config::local_test(), discover).await
}

pub async fn start_sidecar_with(config: Config, discover: Arc<dyn Discover>) -> Sidecar {
    Sidecar::start_with(config, discover)
        .await
        .expect("sidecar")
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response, read in full.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn error(&self) -> Option<&str> {
        self.header("x-sagamesh-error")
    }
}

/// Sends `method path` to `proxy` with `Host: host`.
pub async fn request(
    client: &HttpClient,
    proxy: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Got {
    request_with_body(client, proxy, method, host, path, headers, Bytes::new()).await
}

/// Like [`request`], with a body.
pub async fn request_with_body(
    client: &HttpClient,
    proxy: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Got {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{proxy}{path}"))
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).expect("request");
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("body timed out")
        .expect("body")
        .to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub async fn get(client: &HttpClient, proxy: SocketAddr, host: &str) -> Got {
    request(client, proxy, "GET", host, "/", &[]).await
}

/// Scrapes and parses `/metrics` with a Prometheus text parser.
pub async fn scrape(admin: SocketAddr) -> prometheus_parse::Scrape {
    let got = request(&http_client(), admin, "GET", "admin", "/metrics", &[]).await;
    assert_eq!(got.status, StatusCode::OK);
    let lines = got.body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("metrics parse")
}

/// Sum of the samples of `name` whose labels include every pair of `labels`.
pub fn metric(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// Counts responses by `x-backend`.
pub fn tally(got: &[Got]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for g in got {
        *m.entry(g.header("x-backend").unwrap_or("none").to_string())
            .or_insert(0) += 1;
    }
    m
}

/// Polls `f` until it returns true, for at most `WAIT`.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let waited = sagamesh_testing::eventually(what, WAIT, || {
        let check = f();
        async move { check.await.then_some(()) }
    })
    .await;
    if let Err(e) = waited {
        panic!("{e}");
    }
}

/// A shared mutable value for test servers.
pub type Shared<T> = Arc<Mutex<T>>;
