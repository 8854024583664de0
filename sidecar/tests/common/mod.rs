//! Test helpers: real HTTP backends ([`sagamesh_testing::backend`]) and gRPC servers on
//! loopback, each on its own runtime so a test can kill one (every socket closes at once) and
//! start it again on the same address.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sagamesh_api::service_registration as sr;
use sagamesh_discovery::Discover;
use sagamesh_discovery::proto as pb;
use sagamesh_sidecar::Sidecar;
use sagamesh_sidecar::config::Config;

/// Every wait in a test is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

/// A free port on `ip` (bound, then released).
pub fn free_port(ip: [u8; 4]) -> SocketAddr {
    sagamesh_testing::free_addr(ip)
}

/// The test HTTP backend (HTTP/1.1 and h2c; kill, restart, graceful stop).
#[allow(unused_imports)]
pub use sagamesh_testing::backend::Backend;

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
