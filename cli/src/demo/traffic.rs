//! The demo's traffic: requests through the client's sidecar, each recorded.

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// One request as the client saw it.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Since the phase began.
    pub at: Duration,
    pub latency: Duration,
    pub status: u16,
    /// `x-instance` of the answer.
    pub instance: Option<String>,
    /// `x-sagamesh-error`, or the client's own error.
    pub error: Option<String>,
}

impl Sample {
    pub fn ok(&self) -> bool {
        self.status == 200
    }
}

pub struct Response {
    pub status: u16,
    pub instance: Option<String>,
    pub mesh_error: Option<String>,
    pub body: String,
}

fn client() -> &'static Client<HttpConnector, Empty<Bytes>> {
    static CLIENT: OnceLock<Client<HttpConnector, Empty<Bytes>>> = OnceLock::new();
    CLIENT.get_or_init(|| Client::builder(TokioExecutor::new()).build_http())
}

/// GET `url`, with `Host: host` when given.
pub async fn http_get(url: &str, host: Option<&str>) -> anyhow::Result<Response> {
    let mut builder = Request::get(url);
    if let Some(host) = host {
        builder = builder.header("host", host);
    }
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client().request(builder.body(Empty::new())?),
    )
    .await??;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (status, instance, mesh_error) = (
        response.status().as_u16(),
        header("x-instance"),
        header("x-sagamesh-error"),
    );
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Response {
        status,
        instance,
        mesh_error,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

async fn one(client_ip: &str, host: &str, i: usize, start: Instant) -> Sample {
    let sent = Instant::now();
    let result = http_get(&format!("http://{client_ip}:4140/users/{i}"), Some(host)).await;
    let latency = sent.elapsed();
    let at = sent.duration_since(start);
    match result {
        Ok(r) => Sample {
            at,
            latency,
            status: r.status,
            instance: r.instance,
            error: r.mesh_error,
        },
        Err(e) => Sample {
            at,
            latency,
            status: 0,
            instance: None,
            error: Some(e.to_string()),
        },
    }
}

/// `total` requests from `concurrency` workers, as fast as they go.
pub async fn burst(client_ip: &str, host: &str, total: usize, concurrency: usize) -> Vec<Sample> {
    let start = Instant::now();
    let next = Arc::new(Mutex::new(0usize));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (next, client_ip, host) = (next.clone(), client_ip.to_string(), host.to_string());
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let i = {
                    let mut n = next.lock().unwrap_or_else(|p| p.into_inner());
                    *n += 1;
                    *n
                };
                if i > total {
                    return samples;
                }
                samples.push(one(&client_ip, &host, i, start).await);
            }
        }));
    }
    collect(workers).await
}

/// Requests from `concurrency` workers for `duration`, each pausing 10ms between requests.
pub async fn steady(
    client_ip: String,
    host: &'static str,
    duration: Duration,
    concurrency: usize,
) -> Vec<Sample> {
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let client_ip = client_ip.clone();
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut i = w * 100_000;
            while start.elapsed() < duration {
                i += 1;
                samples.push(one(&client_ip, host, i, start).await);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            samples
        }));
    }
    collect(workers).await
}

async fn collect(workers: Vec<tokio::task::JoinHandle<Vec<Sample>>>) -> Vec<Sample> {
    let mut all = Vec::new();
    for worker in workers {
        if let Ok(samples) = worker.await {
            all.extend(samples);
        }
    }
    all.sort_by_key(|s| s.at);
    all
}
