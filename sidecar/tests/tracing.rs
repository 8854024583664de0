//! Tracing and metrics exposition against real sockets: a collector stand-in on 127.0.0.1
//! receiving OTLP/HTTP JSON, the real sidecar and its admin listener.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use sagamesh_discovery::StaticDiscovery;
use sagamesh_sidecar::config::Config;
use sagamesh_sidecar::otlp::{ExportConfig, OtlpExporter, SpanKind, SpanRecord, USER_AGENT};
use sagamesh_sidecar::trace::TraceContext;

/// One export the collector received.
#[derive(Clone, Debug)]
struct Received {
    at: Instant,
    user_agent: Option<String>,
    body: serde_json::Value,
}

/// An OTLP/HTTP collector stand-in: answers each export with the next of `script` (status,
/// optional Retry-After), then 200 once the script is used up, and keeps what it received.
struct Collector {
    addr: std::net::SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start(script: Vec<(u16, Option<&'static str>)>) -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
        let store = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let store = store.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let store = store.clone();
                            let script = script.clone();
                            async move {
                                assert_eq!(req.uri().path(), "/v1/traces");
                                let user_agent = req
                                    .headers()
                                    .get(http::header::USER_AGENT)
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_string);
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                store.lock().expect("lock").push(Received {
                                    at: Instant::now(),
                                    user_agent,
                                    body: serde_json::from_slice(&body)
                                        .unwrap_or(serde_json::Value::Null),
                                });
                                let (status, retry_after) = script
                                    .lock()
                                    .expect("lock")
                                    .pop_front()
                                    .unwrap_or((200, None));
                                let mut resp = http::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::from_static(b"{}"),
                                ));
                                *resp.status_mut() = StatusCode::from_u16(status).expect("status");
                                if let Some(after) = retry_after {
                                    resp.headers_mut().insert(
                                        http::header::RETRY_AFTER,
                                        http::HeaderValue::from_static(after),
                                    );
                                }
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        Collector {
            addr,
            received,
            task,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    /// Every span received, in every export.
    fn spans(&self) -> Vec<serde_json::Value> {
        self.received()
            .iter()
            .flat_map(|r| {
                r.body["resourceSpans"][0]["scopeSpans"][0]["spans"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn span_named(name: &str) -> SpanRecord {
    let now = SystemTime::now();
    SpanRecord {
        context: TraceContext::new_root(),
        parent_span_id: None,
        name: name.into(),
        kind: SpanKind::Client,
        start: now,
        end: now,
        attributes: vec![],
        error: false,
    }
}

fn names(spans: &[serde_json::Value]) -> Vec<String> {
    spans
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect()
}

/// Quick retries, no jitter.
fn quick() -> ExportConfig {
    ExportConfig {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        jitter: false,
        ..ExportConfig::default()
    }
}

#[tokio::test]
async fn an_unsampled_caller_is_propagated_but_not_exported() {
    let collector = Collector::start(vec![]).await;
    let b = Backend::start("a", [127, 0, 0, 1]);
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &spec(&[b.addr])));
    let mut config = Config::local_test();
    config.otlp_endpoint = Some(format!("http://{}", collector.addr));
    let sidecar = start_sidecar_with(config, d).await;
    let client = http_client();

    let unsampled = "00-11111111111111111111111111111111-00f067aa0ba902b7-00";
    let g = request(
        &client,
        sidecar.outbound_addr(),
        "GET",
        "web",
        "/",
        &[("traceparent", unsampled)],
    )
    .await;
    let seen = g.header("x-seen-traceparent").expect("traceparent");
    assert!(
        seen.starts_with("00-11111111111111111111111111111111-") && seen.ends_with("-00"),
        "{seen}"
    );
    assert!(
        !seen.contains("00f067aa0ba902b7"),
        "a child is sent on: {seen}"
    );

    // A sampled request after it: once its span is in, the unsampled one would be too.
    let sampled = "00-22222222222222222222222222222222-00f067aa0ba902b7-01";
    let g = request(
        &client,
        sidecar.outbound_addr(),
        "GET",
        "web",
        "/",
        &[("traceparent", sampled)],
    )
    .await;
    assert!(g.header("x-seen-traceparent").expect("tp").ends_with("-01"));
    eventually("the sampled span reaches the collector", || {
        let found = collector
            .spans()
            .iter()
            .any(|s| s["traceId"] == "22222222222222222222222222222222");
        async move { found }
    })
    .await;
    let spans = collector.spans();
    assert!(
        spans
            .iter()
            .all(|s| s["traceId"] != "11111111111111111111111111111111"),
        "an unsampled trace was exported: {spans:?}"
    );
    let span = &spans[0];
    let status = span["attributes"]
        .as_array()
        .expect("attributes")
        .iter()
        .find(|a| a["key"] == "http.response.status_code")
        .expect("status code attribute");
    assert_eq!(status["value"], serde_json::json!({"intValue": "200"}));
    let received = collector.received();
    assert_eq!(received[0].user_agent.as_deref(), Some(USER_AGENT));
    assert!(USER_AGENT.starts_with("sagamesh-sidecar/"));
    sidecar.shutdown().await;
}

#[tokio::test]
async fn roots_follow_the_sampling_ratio_downstream() {
    let collector = Collector::start(vec![]).await;
    let b = Backend::start("a", [127, 0, 0, 1]);
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &spec(&[b.addr])));
    let mut config = Config::local_test();
    config.otlp_endpoint = Some(format!("http://{}", collector.addr));
    config.trace_sampling_ratio = 0.0;
    let sidecar = start_sidecar_with(config, d).await;
    let client = http_client();

    // A trace this sidecar starts: not sampled, and the flags sent on say so.
    let g = request(&client, sidecar.outbound_addr(), "GET", "web", "/root", &[]).await;
    let seen = g.header("x-seen-traceparent").expect("traceparent");
    assert!(seen.ends_with("-00"), "{seen}");
    let root_trace = seen.split('-').nth(1).expect("trace id").to_string();

    // A caller's sampled trace is still followed, and exported.
    let sampled = "00-33333333333333333333333333333333-00f067aa0ba902b7-01";
    let g = request(
        &client,
        sidecar.outbound_addr(),
        "GET",
        "web",
        "/",
        &[("traceparent", sampled)],
    )
    .await;
    assert!(g.header("x-seen-traceparent").expect("tp").ends_with("-01"));
    eventually("the caller's sampled span reaches the collector", || {
        let found = collector
            .spans()
            .iter()
            .any(|s| s["traceId"] == "33333333333333333333333333333333");
        async move { found }
    })
    .await;
    assert!(
        collector
            .spans()
            .iter()
            .all(|s| s["traceId"] != root_trace.as_str()),
        "the unsampled root was exported"
    );
    sidecar.shutdown().await;
}

#[tokio::test]
async fn a_batch_answered_503_is_retried_until_delivered() {
    let collector = Collector::start(vec![(503, None), (503, None)]).await;
    let exporter = OtlpExporter::spawn_with(&format!("http://{}", collector.addr), "svc", quick());
    exporter.export(span_named("first"));
    eventually("three attempts reach the collector", || {
        let n = collector.received().len();
        async move { n >= 3 }
    })
    .await;
    let received = collector.received();
    assert_eq!(received.len(), 3, "{received:?}");
    for r in &received {
        assert_eq!(
            names(
                &r.body["resourceSpans"][0]["scopeSpans"][0]["spans"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            ),
            ["first"]
        );
    }
    // The backoff doubles: 50ms, then 100ms (generous lower bounds only).
    assert!(received[1].at - received[0].at >= Duration::from_millis(40));
    assert!(received[2].at - received[1].at >= Duration::from_millis(80));
    assert_eq!(exporter.dropped_spans(), 0);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let collector = Collector::start(vec![(429, Some("1"))]).await;
    let exporter = OtlpExporter::spawn_with(&format!("http://{}", collector.addr), "svc", quick());
    exporter.export(span_named("later"));
    eventually("the retry reaches the collector", || {
        let n = collector.received().len();
        async move { n >= 2 }
    })
    .await;
    let received = collector.received();
    // Retry-After: 1 — not the 50ms backoff.
    let gap = received[1].at - received[0].at;
    assert!(gap >= Duration::from_millis(900), "retried after {gap:?}");
}

#[tokio::test]
async fn a_batch_answered_400_is_not_retried() {
    let collector = Collector::start(vec![(400, None), (400, None), (400, None)]).await;
    let exporter = OtlpExporter::spawn_with(&format!("http://{}", collector.addr), "svc", quick());
    exporter.export(span_named("refused"));
    eventually("the first export reaches the collector", || {
        let n = collector.received().len();
        async move { n >= 1 }
    })
    .await;
    // The next export the collector sees is the next batch, not a retry of the refused one.
    exporter.export(span_named("next"));
    eventually("the second export reaches the collector", || {
        let n = collector.received().len();
        async move { n >= 2 }
    })
    .await;
    let received = collector.received();
    let batches: Vec<Vec<String>> = received
        .iter()
        .map(|r| {
            names(
                &r.body["resourceSpans"][0]["scopeSpans"][0]["spans"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(batches[..2], [vec!["refused"], vec!["next"]], "{batches:?}");
}

async fn metrics_with(admin: std::net::SocketAddr, accept: Option<&str>) -> Got {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
    let got = request(&http_client(), admin, "GET", "admin", "/metrics", &headers).await;
    assert_eq!(got.status, StatusCode::OK);
    got
}

#[tokio::test]
async fn metrics_answer_openmetrics_or_prometheus_text_as_asked() {
    let b = Backend::start("a", [127, 0, 0, 1]);
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &spec(&[b.addr])));
    let sidecar = start_sidecar(d).await;
    let g = get(&http_client(), sidecar.outbound_addr(), "web").await;
    assert_eq!(g.status, StatusCode::OK);

    let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    let got = metrics_with(sidecar.admin_addr(), Some(prometheus)).await;
    assert_eq!(
        got.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(got.body.ends_with("# EOF\n"), "{}", got.body);

    for accept in [None, Some("*/*"), Some("text/plain")] {
        let got = metrics_with(sidecar.admin_addr(), accept).await;
        assert_eq!(
            got.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8"),
            "{accept:?}"
        );
        let scrape = prometheus_parse::Scrape::parse(got.body.lines().map(|l| Ok(l.to_string())))
            .expect("0.0.4 parses");
        let requests: Vec<_> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "sagamesh_requests_total")
            .collect();
        assert!(!requests.is_empty(), "{}", got.body);
        for s in requests {
            assert!(
                matches!(s.value, prometheus_parse::Value::Counter(_)),
                "{accept:?}: {s:?} is not a counter in\n{}",
                got.body
            );
        }
        assert!(
            scrape
                .samples
                .iter()
                .any(|s| s.metric == "sagamesh_request_duration_seconds"
                    && matches!(s.value, prometheus_parse::Value::Histogram(_))),
            "{}",
            got.body
        );
    }
    sidecar.shutdown().await;
}
