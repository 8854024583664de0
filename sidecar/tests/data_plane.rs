//! The data plane end to end: real HTTP backends on 127.0.0.x, the real sidecar (in-process,
//! through its library), real sockets. Every wait is bounded.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use sagamesh_api::service_registration as sr;
use sagamesh_discovery::StaticDiscovery;
use sagamesh_discovery::file::{CHECKER_TIMEOUT, FileDiscovery, ManifestChecker};
use sagamesh_sidecar::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn round_robin(mut s: sr::ServiceRegistrationSpec) -> sr::ServiceRegistrationSpec {
    s.load_balancer.policy = sr::LoadBalancerPolicy::RoundRobin;
    s
}

fn with_retries(
    mut s: sr::ServiceRegistrationSpec,
    budget: sr::RetryBudget,
) -> sr::ServiceRegistrationSpec {
    s.retry = Some(sr::RetryPolicy {
        attempts: Some(3),
        backoff: Some(sr::Backoff {
            base_interval: "5ms".into(),
            max_interval: "20ms".into(),
        }),
        budget: Some(budget),
        ..Default::default()
    });
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_shares_within_ten_percent() {
    let backends = [
        Backend::start("a", [127, 0, 0, 1]),
        Backend::start("b", [127, 0, 0, 2]),
        Backend::start("c", [127, 0, 0, 3]),
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &round_robin(spec(&addrs))));
    let sidecar = start_sidecar(d).await;
    let client = http_client();
    let mut got = Vec::new();
    for _ in 0..300 {
        let g = get(&client, sidecar.outbound_addr(), "web").await;
        assert_eq!(g.status, StatusCode::OK, "{g:?}");
        got.push(g);
    }
    let t = tally(&got);
    for name in ["a", "b", "c"] {
        let n = t.get(name).copied().unwrap_or(0);
        assert!((90..=110).contains(&n), "{name} got {n} of 300: {t:?}");
    }
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_avoids_a_twenty_times_slower_backend() {
    let backends = [
        Backend::start("fast1", [127, 0, 0, 1]),
        Backend::start("fast2", [127, 0, 0, 2]),
        Backend::start("slow", [127, 0, 0, 3]),
    ];
    backends[0].set_delay(Duration::from_millis(5));
    backends[1].set_delay(Duration::from_millis(5));
    backends[2].set_delay(Duration::from_millis(100));
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let d = StaticDiscovery::new();
    // PeakEwma is the default policy.
    d.set(snapshot("web", &spec(&addrs)));
    let sidecar = start_sidecar(d).await;
    let proxy = sidecar.outbound_addr();
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(tokio::spawn(async move {
            let client = http_client();
            let mut got = Vec::new();
            for _ in 0..50 {
                got.push(get(&client, proxy, "web").await);
            }
            got
        }));
    }
    let mut got = Vec::new();
    for w in workers {
        got.extend(w.await.expect("worker"));
    }
    assert!(got.iter().all(|g| g.status == StatusCode::OK));
    let t = tally(&got);
    let fast = t.get("fast1").copied().unwrap_or(0) + t.get("fast2").copied().unwrap_or(0);
    assert!(
        fast * 100 >= 80 * got.len(),
        "fast backends got {fast} of {}: {t:?}",
        got.len()
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_is_ejected_with_no_failed_get_and_readmitted() {
    let mut backends = [
        Backend::start("a", [127, 0, 0, 1]),
        Backend::start("b", [127, 0, 0, 2]),
        Backend::start("c", [127, 0, 0, 3]),
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let mut s = with_retries(
        round_robin(spec(&addrs)),
        sr::RetryBudget {
            ratio: 0.2,
            min_retries_per_second: Some(10),
            ttl: None,
        },
    );
    s.circuit_breaker = Some(sr::CircuitBreaker {
        consecutive_failures: Some(3),
        base_ejection_time: Some("300ms".into()),
        max_ejection_time: Some("1s".into()),
        ..Default::default()
    });
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &s));
    let sidecar = start_sidecar(d).await;
    let proxy = sidecar.outbound_addr();
    let client = http_client();

    // Steady load from two workers until 150 responses after b was killed (bounded).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let load = || {
        let (client, stop, done) = (client.clone(), stop.clone(), done.clone());
        async move {
            let mut got = Vec::new();
            let deadline = std::time::Instant::now() + WAIT;
            while !stop.load(std::sync::atomic::Ordering::SeqCst)
                && got.len() < 5000
                && std::time::Instant::now() < deadline
            {
                got.push(get(&client, proxy, "web").await);
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            got
        }
    };
    let w1 = tokio::spawn(load());
    let w2 = tokio::spawn(load());
    let d1 = done.clone();
    eventually("steady load", || {
        let d = d1.clone();
        async move { d.load(std::sync::atomic::Ordering::SeqCst) >= 60 }
    })
    .await;
    backends[1].kill();
    let killed_at = done.load(std::sync::atomic::Ordering::SeqCst);
    let d2 = done.clone();
    eventually("load after the kill", || {
        let d = d2.clone();
        async move { d.load(std::sync::atomic::Ordering::SeqCst) >= killed_at + 150 }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut got = w1.await.expect("w1");
    got.extend(w2.await.expect("w2"));
    let failed: Vec<_> = got.iter().filter(|g| g.status != StatusCode::OK).collect();
    assert!(failed.is_empty(), "failed GETs: {failed:?}");

    let m = scrape(sidecar.admin_addr()).await;
    let b_key = backends[1].addr.to_string();
    assert!(
        metric(
            &m,
            "sagamesh_endpoint_ejections_total",
            &[("endpoint", &b_key)]
        ) >= 1.0,
        "b was not ejected"
    );
    assert!(
        metric(
            &m,
            "sagamesh_endpoint_breaker_state",
            &[("endpoint", &b_key)]
        ) >= 1.0,
        "b's breaker should be open (or half-open while probing)"
    );

    // b comes back: a probe closes its breaker and it gets traffic again.
    let before = backends[1].hits();
    backends[1].restart();
    eventually("b readmitted", || {
        let client = client.clone();
        let hits = backends[1].hits.clone();
        async move {
            let g = get(&client, proxy, "web").await;
            assert_eq!(g.status, StatusCode::OK, "{g:?}");
            hits.load(std::sync::atomic::Ordering::SeqCst) > before + 2
        }
    })
    .await;
    let m = scrape(sidecar.admin_addr()).await;
    assert_eq!(
        metric(
            &m,
            "sagamesh_endpoint_breaker_state",
            &[("endpoint", &b_key)]
        ),
        0.0,
        "b's breaker should be closed again"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_fails_fast_with_503() {
    // Ports with nothing listening: connections are refused.
    let addrs = [free_port([127, 0, 0, 1]), free_port([127, 0, 0, 2])];
    let mut s = with_retries(
        spec(&addrs),
        sr::RetryBudget {
            ratio: 0.2,
            min_retries_per_second: Some(10),
            ttl: None,
        },
    );
    s.timeout = Some("30s".into());
    s.circuit_breaker = Some(sr::CircuitBreaker {
        consecutive_failures: Some(2),
        ..Default::default()
    });
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &s));
    // A service with no endpoints at all.
    d.set(snapshot("empty", &spec(&[])));
    let sidecar = start_sidecar(d).await;
    let client = http_client();
    let mut last = None;
    for _ in 0..10 {
        let start = std::time::Instant::now();
        let g = get(&client, sidecar.outbound_addr(), "web").await;
        assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE, "{g:?}");
        assert!(g.error().is_some(), "{g:?}");
        // Far below the 30s deadline: nothing waits for a timeout.
        assert!(start.elapsed() < Duration::from_secs(5));
        last = Some(g);
    }
    let last = last.expect("responses");
    assert_eq!(last.error(), Some("circuit-open"), "{last:?}");

    let g = get(&client, sidecar.outbound_addr(), "empty").await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(g.error(), Some("no-endpoints"));
    let g = get(&client, sidecar.outbound_addr(), "nosuch").await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(g.error(), Some("unknown-service"));
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stay_within_the_budget_in_a_total_outage() {
    let addrs = [free_port([127, 0, 0, 1]), free_port([127, 0, 0, 2])];
    let mut s = spec(&addrs);
    s.retry = Some(sr::RetryPolicy {
        attempts: Some(5),
        backoff: Some(sr::Backoff {
            base_interval: "1ms".into(),
            max_interval: "1ms".into(),
        }),
        // No minimum rate: only 20% of requests may be retried.
        budget: Some(sr::RetryBudget {
            ratio: 0.2,
            min_retries_per_second: Some(0),
            ttl: Some("10s".into()),
        }),
        ..Default::default()
    });
    // Breaker out of the way, so every request really tries.
    s.circuit_breaker = Some(sr::CircuitBreaker {
        consecutive_failures: Some(10000),
        ..Default::default()
    });
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &s));
    let sidecar = start_sidecar(d).await;
    let client = http_client();
    let n = 100;
    for _ in 0..n {
        let g = get(&client, sidecar.outbound_addr(), "web").await;
        assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE, "{g:?}");
        assert!(
            matches!(g.error(), Some("connect-failure" | "budget-exhausted")),
            "{g:?}"
        );
    }
    let m = scrape(sidecar.admin_addr()).await;
    let retries = metric(
        &m,
        "sagamesh_retries_total",
        &[("destination", "web.default")],
    );
    let refused = metric(
        &m,
        "sagamesh_retry_budget_exhausted_total",
        &[("destination", "web.default")],
    );
    let attempts = metric(
        &m,
        "sagamesh_endpoint_attempts_total",
        &[("destination", "web.default")],
    );
    // Without a budget: 4 retries per request (400). With it: about 20 per 100 requests.
    assert!(retries > 0.0, "some retries must be allowed");
    assert!(
        retries <= 0.2 * n as f64 + 1.0,
        "retries {retries} exceed the budget"
    );
    assert!(refused >= 1.0, "the budget must have refused retries");
    assert_eq!(
        attempts,
        n as f64 + retries,
        "attempts = requests + retries"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_past_the_deadline_gets_504() {
    let slow = Backend::start("slow", [127, 0, 0, 1]);
    slow.set_delay(Duration::from_secs(3));
    let mut s = spec(&[slow.addr]);
    s.timeout = Some("200ms".into());
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &s));
    let sidecar = start_sidecar(d).await;
    let start = std::time::Instant::now();
    let g = get(&http_client(), sidecar.outbound_addr(), "web").await;
    assert_eq!(g.status, StatusCode::GATEWAY_TIMEOUT, "{g:?}");
    assert_eq!(g.error(), Some("timeout"));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "answered before the backend did"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_shedding_answers_503_overloaded() {
    let slow = Backend::start("slow", [127, 0, 0, 1]);
    slow.set_delay(Duration::from_millis(500));
    let mut s = spec(&[slow.addr]);
    s.max_in_flight_requests = Some(1);
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &s));
    let sidecar = start_sidecar(d).await;
    let proxy = sidecar.outbound_addr();
    let first = tokio::spawn(async move { get(&http_client(), proxy, "web").await });
    eventually("first request in flight", || {
        let hits = slow.hits.clone();
        async move { hits.load(std::sync::atomic::Ordering::SeqCst) == 1 }
    })
    .await;
    let second = get(&http_client(), proxy, "web").await;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.error(), Some("overloaded"));
    assert_eq!(first.await.expect("first").status, StatusCode::OK);
    // Once it is done, the next one passes.
    assert_eq!(
        get(&http_client(), proxy, "web").await.status,
        StatusCode::OK
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_is_continued_or_started() {
    let b = Backend::start("a", [127, 0, 0, 1]);
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &spec(&[b.addr])));
    let sidecar = start_sidecar(d).await;
    let client = http_client();
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let g = request(
        &client,
        sidecar.outbound_addr(),
        "GET",
        "web.default.svc.cluster.local:80",
        "/",
        &[("traceparent", parent)],
    )
    .await;
    let seen = g
        .header("x-seen-traceparent")
        .expect("backend saw a traceparent");
    assert!(
        seen.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{seen}"
    );
    assert!(
        !seen.contains("00f067aa0ba902b7"),
        "a child span, not the parent: {seen}"
    );
    let g = get(&client, sidecar.outbound_addr(), "web.default").await;
    let seen = g.header("x-seen-traceparent").expect("a trace is started");
    assert_eq!(seen.len(), 55, "{seen}");
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_what_was_sent() {
    let ok = Backend::start("ok", [127, 0, 0, 1]);
    let broken = Backend::start("broken", [127, 0, 0, 2]);
    broken
        .status
        .store(500, std::sync::atomic::Ordering::SeqCst);
    let d = StaticDiscovery::new();
    d.set(snapshot("ok", &spec(&[ok.addr])));
    d.set(snapshot("broken", &spec(&[broken.addr])));
    let sidecar = start_sidecar(d).await;
    let client = http_client();
    for _ in 0..7 {
        assert_eq!(
            get(&client, sidecar.outbound_addr(), "ok").await.status,
            StatusCode::OK
        );
    }
    for _ in 0..3 {
        assert_eq!(
            get(&client, sidecar.outbound_addr(), "broken").await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    for _ in 0..2 {
        get(&client, sidecar.outbound_addr(), "nosuch").await;
    }
    let m = scrape(sidecar.admin_addr()).await;
    let req = "sagamesh_requests_total";
    assert_eq!(
        metric(
            &m,
            req,
            &[("destination", "ok.default"), ("status_class", "2xx")]
        ),
        7.0
    );
    assert_eq!(
        metric(
            &m,
            req,
            &[
                ("destination", "broken.default"),
                ("status_class", "5xx"),
                ("error", "")
            ]
        ),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            req,
            &[
                ("destination", "nosuch.default"),
                ("error", "unknown-service")
            ]
        ),
        2.0
    );
    assert_eq!(metric(&m, req, &[("direction", "outbound")]), 12.0);
    assert_eq!(
        metric(
            &m,
            "sagamesh_request_duration_seconds_count",
            &[("destination", "ok.default")]
        ),
        7.0
    );
    assert_eq!(
        metric(
            &m,
            "sagamesh_endpoint_attempts_total",
            &[
                ("endpoint", &broken.addr.to_string()),
                ("outcome", "failure")
            ]
        ),
        3.0
    );
    sidecar.shutdown().await;
}

/// What the sidecar did with raw bytes.
#[derive(Debug)]
enum RawAnswer {
    /// An HTTP/1 status line.
    Status(String),
    /// It closed the connection (possibly after some bytes, e.g. an HTTP/2 GOAWAY).
    Closed,
}

/// Sends raw bytes and reads the answer: an HTTP/1 status line, or the connection closing.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> RawAnswer {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The sidecar may close while we write: that is an acceptable answer.
    if s.write_all(bytes).await.is_err() {
        return RawAnswer::Closed;
    }
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return RawAnswer::Closed,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.starts_with(b"HTTP/1.") && got.windows(2).any(|w| w == b"\r\n") {
                        let text = String::from_utf8_lossy(&got).into_owned();
                        return RawAnswer::Status(text.lines().next().unwrap_or("").to_string());
                    }
                }
            }
        }
    })
    .await;
    read.unwrap_or_else(|_| {
        panic!(
            "no answer and no close within 15s for {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(60)])
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx_or_a_closed_connection() {
    let b = Backend::start("a", [127, 0, 0, 1]);
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &spec(&[b.addr])));
    let mut config = Config::local_test();
    config.max_header_bytes = 16 * 1024;
    config.max_body_bytes = 1024;
    let sidecar = start_sidecar_with(config, d).await;
    let proxy = sidecar.outbound_addr();
    let huge_header = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let corpus: Vec<(&str, Vec<u8>)> = vec![
        ("bad request line", b"GARBAGE\r\n\r\n".to_vec()),
        ("bad method", b"G@T / HTTP/1.1\r\nHost: web\r\n\r\n".to_vec()),
        ("bad version", b"GET / HTTP/9.9\r\nHost: web\r\n\r\n".to_vec()),
        ("oversized header", huge_header.into_bytes()),
        ("header without colon", b"GET / HTTP/1.1\r\nHost web\r\n\r\n".to_vec()),
        ("bad content-length", b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: abc\r\n\r\n".to_vec()),
        ("two content-lengths", b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec()),
        ("bad chunked encoding", b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("invalid h2 preface", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n\0\0\0\0\0\0\0\0\0".to_vec()),
        ("h2 preface then garbage frames", [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(), &[0xff; 64]].concat()),
        ("bad authority", b"GET / HTTP/1.1\r\nHost: not_a_service!\r\n\r\n".to_vec()),
        ("no host", b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        ("CONNECT", b"CONNECT web:80 HTTP/1.1\r\nHost: web:80\r\n\r\n".to_vec()),
        ("body over the limit", format!("POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5000\r\n\r\n{}", "x".repeat(5000)).into_bytes()),
        ("nul in header", b"GET / HTTP/1.1\r\nHost: web\r\nX: a\0b\r\n\r\n".to_vec()),
    ];
    for (what, bytes) in &corpus {
        let answer = raw(proxy, bytes).await;
        if let RawAnswer::Status(line) = &answer {
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("{what}: not an HTTP status line: {line:?}"));
            assert!((400..500).contains(&code), "{what}: got {line:?}");
        }
        // Still serving.
        let g = get(&http_client(), proxy, "web").await;
        assert_eq!(g.status, StatusCode::OK, "after {what}: {g:?}");
    }
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_change_is_applied_without_restart() {
    let a = Backend::start("a", [127, 0, 0, 1]);
    let b = Backend::start("b", [127, 0, 0, 2]);
    let dir = std::env::temp_dir().join(format!("sagamesh-manifests-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let manifest = |addr: std::net::SocketAddr| {
        format!(
            "apiVersion: sagamesh.io/v1alpha1\nkind: ServiceRegistration\nmetadata: {{name: web}}\nspec:\n  endpoints: [{{address: \"{}\", port: {}}}]\n  ports: [{{name: http, port: 80}}]\n",
            addr.ip(),
            addr.port()
        )
    };
    std::fs::write(dir.join("web.yaml"), manifest(a.addr)).expect("write");
    std::fs::write(
        dir.join("broken.yaml"),
        "kind: ServiceRegistration\nspec: [",
    )
    .expect("write");
    // The sidecar binary's way: the checker program as a child on every change.
    let checker = ManifestChecker::command(sagamesh_testing::manifest_checker(), CHECKER_TIMEOUT);
    let d = FileDiscovery::spawn(&dir, "default", Duration::from_millis(50), checker)
        .expect("the checker runs");
    let sidecar = start_sidecar(d.clone()).await;
    let client = http_client();
    let g = get(&client, sidecar.outbound_addr(), "web").await;
    assert_eq!(g.header("x-backend"), Some("a"), "{g:?}");

    // The broken file is reported, and did not stop web.yaml.
    let dbg = request(
        &client,
        sidecar.admin_addr(),
        "GET",
        "admin",
        "/debug/discovery",
        &[],
    )
    .await;
    let json: serde_json::Value = serde_json::from_str(&dbg.body).expect("json");
    let errors = &json["discovery"]["errors"];
    assert!(
        errors
            .as_object()
            .is_some_and(|e| e.keys().any(|k| k.ends_with("broken.yaml"))),
        "{json}"
    );
    assert_eq!(
        json["discovery"]["services"]["web.default"]["state"],
        "snapshot"
    );

    std::fs::write(dir.join("web.yaml"), manifest(b.addr)).expect("rewrite");
    eventually("the new endpoint is used", || {
        let client = client.clone();
        let proxy = sidecar.outbound_addr();
        async move { get(&client, proxy, "web").await.header("x-backend") == Some("b") }
    })
    .await;
    // Removing the file removes the service.
    std::fs::remove_file(dir.join("web.yaml")).expect("remove");
    eventually("the service is gone", || {
        let client = client.clone();
        let proxy = sidecar.outbound_addr();
        async move { get(&client, proxy, "web").await.error() == Some("unknown-service") }
    })
    .await;
    sidecar.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_forwards_to_the_app_and_counts() {
    let app = Backend::start("app", [127, 0, 0, 1]);
    let mut config = Config::local_test();
    config.app_port = Some(app.addr.port());
    let sidecar = start_sidecar_with(config, StaticDiscovery::new()).await;
    let inbound = sidecar.inbound_addr().expect("inbound listener");
    let client = http_client();
    for _ in 0..4 {
        let g = get(&client, inbound, "anything").await;
        assert_eq!(g.status, StatusCode::OK);
        assert_eq!(g.header("x-backend"), Some("app"));
    }
    let m = scrape(sidecar.admin_addr()).await;
    let label = format!("app:{}", app.addr.port());
    assert_eq!(
        metric(
            &m,
            "sagamesh_requests_total",
            &[
                ("direction", "inbound"),
                ("destination", &label),
                ("status_class", "2xx")
            ]
        ),
        4.0
    );
    drop(app);
    // The app is gone: a pooled connection may see the reset (502) before a new connect is
    // refused (503); either way the sidecar names the cause.
    let g = get(&client, inbound, "anything").await;
    assert!(
        matches!(
            (g.status.as_u16(), g.error()),
            (502, Some("reset")) | (503, Some("connect-failure"))
        ),
        "{g:?}"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_forwards_h2c_and_posts_on_pooled_connections() {
    let app = Backend::start("app", [127, 0, 0, 1]);
    let mut config = Config::local_test();
    config.app_port = Some(app.addr.port());
    let sidecar = start_sidecar_with(config, StaticDiscovery::new()).await;
    let inbound = sidecar.inbound_addr().expect("inbound listener");
    // h2c from the caller: HTTP/2 to the app as well.
    let h2: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    for _ in 0..3 {
        let g = get(&h2, inbound, "anything").await;
        assert_eq!(g.status, StatusCode::OK, "{g:?}");
        assert_eq!(g.header("x-backend"), Some("app"));
    }
    // HTTP/1.1 POSTs with a body: the lean path, one pooled connection at a time.
    let client = http_client();
    for i in 0..3 {
        let g = request_with_body(
            &client,
            inbound,
            "POST",
            "anything",
            "/orders",
            &[],
            bytes::Bytes::from(format!("order {i}")),
        )
        .await;
        assert_eq!(g.status, StatusCode::OK, "{g:?}");
    }
    assert_eq!(app.hits(), 6);
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_ready_live_and_drain() {
    let d = StaticDiscovery::new();
    let sidecar = start_sidecar(d).await;
    let client = http_client();
    let admin = sidecar.admin_addr();
    assert_eq!(
        request(&client, admin, "GET", "a", "/live", &[])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        request(&client, admin, "GET", "a", "/ready", &[])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        request(&client, admin, "GET", "a", "/nope", &[])
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let _ = Arc::new(());
    tokio::time::timeout(WAIT, sidecar.shutdown())
        .await
        .expect("shutdown is bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_retried_only_with_an_idempotency_key_and_its_body_is_replayed() {
    let broken = Backend::start("broken", [127, 0, 0, 1]);
    broken
        .status
        .store(503, std::sync::atomic::Ordering::SeqCst);
    let ok = Backend::start("ok", [127, 0, 0, 2]);
    let s = with_retries(
        round_robin(spec(&[broken.addr, ok.addr])),
        sr::RetryBudget {
            ratio: 1.0,
            min_retries_per_second: Some(100),
            ttl: None,
        },
    );
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &s));
    let sidecar = start_sidecar(d).await;
    let client = http_client();
    let body = bytes::Bytes::from(vec![b'x'; 1000]);
    let mut plain_503 = 0;
    for _ in 0..4 {
        // Round robin alternates; a 503 from `broken` goes back to the caller unretried.
        let g = request_with_body(
            &client,
            sidecar.outbound_addr(),
            "POST",
            "web",
            "/",
            &[],
            body.clone(),
        )
        .await;
        if g.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(g.header("x-backend"), Some("broken"));
            assert_eq!(g.error(), None, "the backend's own 503");
            plain_503 += 1;
        }
    }
    assert_eq!(plain_503, 2, "POST without Idempotency-Key is not retried");
    for _ in 0..4 {
        let g = request_with_body(
            &client,
            sidecar.outbound_addr(),
            "POST",
            "web",
            "/",
            &[("idempotency-key", "saga-1/step/action")],
            body.clone(),
        )
        .await;
        assert_eq!(g.status, StatusCode::OK, "{g:?}");
        assert_eq!(
            g.header("x-body-len"),
            Some("1000"),
            "the body is replayed whole"
        );
    }
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_are_bounded() {
    let mut config = Config::local_test();
    config.max_destinations = 2;
    let sidecar = start_sidecar_with(config, StaticDiscovery::new()).await;
    let client = http_client();
    for name in ["one", "two", "three", "four"] {
        let g = get(&client, sidecar.outbound_addr(), name).await;
        assert_eq!(g.error(), Some("unknown-service"));
    }
    let m = scrape(sidecar.admin_addr()).await;
    assert_eq!(
        metric(&m, "sagamesh_requests_total", &[("destination", "other")]),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "sagamesh_requests_total",
            &[("destination", "three.default")]
        ),
        0.0
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_with_the_propagated_ids() {
    use http_body_util::BodyExt;
    // A fake OTLP/HTTP collector that keeps every JSON body it gets.
    let bodies: Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let collector = listener.local_addr().expect("addr");
    let store = bodies.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            if let Ok(v) = serde_json::from_slice(&body) {
                                store.lock().expect("lock").push(v);
                            }
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(b"{}")),
                            ))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    let b = Backend::start("a", [127, 0, 0, 1]);
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &spec(&[b.addr])));
    let mut config = Config::local_test();
    config.otlp_endpoint = Some(format!("http://{collector}"));
    let sidecar = start_sidecar_with(config, d).await;
    let g = request(
        &http_client(),
        sidecar.outbound_addr(),
        "GET",
        "web",
        "/",
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
    )
    .await;
    let seen = g
        .header("x-seen-traceparent")
        .expect("traceparent")
        .to_string();
    let sent_span = seen.split('-').nth(2).expect("span id").to_string();
    eventually("the span reaches the collector", || {
        let bodies = bodies.clone();
        let sent_span = sent_span.clone();
        async move {
            bodies.lock().expect("lock").iter().any(|v| {
                let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
                span["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736"
                    && span["parentSpanId"] == "00f067aa0ba902b7"
                    && span["spanId"] == sent_span.as_str()
                    && span["name"] == "outbound web.default"
            })
        }
    })
    .await;
    sidecar.shutdown().await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_retries_on_another_endpoint() {
    let slow = Backend::start("slow", [127, 0, 0, 1]);
    slow.set_delay(Duration::from_secs(3));
    let fast = Backend::start("fast", [127, 0, 0, 2]);
    let mut s = with_retries(
        round_robin(spec(&[slow.addr, fast.addr])),
        sr::RetryBudget {
            ratio: 1.0,
            min_retries_per_second: Some(100),
            ttl: None,
        },
    );
    if let Some(r) = s.retry.as_mut() {
        r.per_try_timeout = Some("150ms".into());
    }
    s.timeout = Some("10s".into());
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &s));
    let sidecar = start_sidecar(d).await;
    let client = http_client();
    for _ in 0..4 {
        let g = get(&client, sidecar.outbound_addr(), "web").await;
        assert_eq!(g.status, StatusCode::OK, "{g:?}");
        assert_eq!(g.header("x-backend"), Some("fast"));
    }
    assert!(
        slow.hits() >= 1,
        "the slow endpoint was tried first at least once"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_a_key_on_one_endpoint() {
    let backends = [
        Backend::start("a", [127, 0, 0, 1]),
        Backend::start("b", [127, 0, 0, 2]),
        Backend::start("c", [127, 0, 0, 3]),
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let mut s = spec(&addrs);
    s.load_balancer = sr::LoadBalancer {
        policy: sr::LoadBalancerPolicy::ConsistentHash,
        hash_header: Some("x-user".into()),
    };
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &s));
    let sidecar = start_sidecar(d).await;
    let client = http_client();
    let mut used = std::collections::HashSet::new();
    for user in 0..30 {
        let key = format!("user-{user}");
        let first = request(
            &client,
            sidecar.outbound_addr(),
            "GET",
            "web",
            "/",
            &[("x-user", &key)],
        )
        .await;
        let backend = first.header("x-backend").expect("backend").to_string();
        for _ in 0..3 {
            let again = request(
                &client,
                sidecar.outbound_addr(),
                "GET",
                "web",
                "/",
                &[("x-user", &key)],
            )
            .await;
            assert_eq!(
                again.header("x-backend"),
                Some(backend.as_str()),
                "{key} moved"
            );
        }
        used.insert(backend);
    }
    assert_eq!(used.len(), 3, "30 keys spread over all endpoints: {used:?}");
    sidecar.shutdown().await;
}

/// The saga engine's use: `MeshClient` directly, a port by name, `has_service`, and whether a
/// failed call may have been delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_client_as_a_library() {
    use sagamesh_discovery::name::{PortRef, ServiceKey, Target};
    use sagamesh_mesh::metrics::Metrics;
    use sagamesh_mesh::{ClientConfig, MeshClient, body};

    let b = Backend::start("orders", [127, 0, 0, 1]);
    let d = StaticDiscovery::new();
    let mut s = spec(&[b.addr]);
    s.ports[0].name = "api".into();
    d.set(snapshot("orders", &s));
    d.set(snapshot("down", &spec(&[free_port([127, 0, 0, 2])])));
    let client = MeshClient::new(d, ClientConfig::default(), Metrics::new());

    assert!(
        client
            .has_service(&ServiceKey::new("default", "orders"))
            .await
    );
    assert!(
        !client
            .has_service(&ServiceKey::new("default", "nosuch"))
            .await
    );

    let target = Target::new(
        ServiceKey::new("default", "orders"),
        Some(PortRef::Name("api".into())),
    );
    let req = http::Request::post("/orders")
        .header("idempotency-key", "saga-uid/reserve/action")
        .body(body::full("{}"))
        .expect("request");
    let resp = client.send(&target, req).await.expect("answered");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers().get("x-backend").map(|v| v.as_bytes()),
        Some(&b"orders"[..])
    );

    let wrong_port = Target::new(
        ServiceKey::new("default", "orders"),
        Some(PortRef::Name("grpc".into())),
    );
    let err = client
        .send(&wrong_port, http::Request::new(body::empty()))
        .await
        .expect_err("no such port");
    assert_eq!(err.code(), "unknown-service");
    assert!(!err.maybe_delivered());

    let down = Target::new(ServiceKey::new("default", "down"), None);
    let err = client
        .send(&down, http::Request::new(body::empty()))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), "connect-failure");
    assert!(
        !err.maybe_delivered(),
        "a refused connection surely did not deliver"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ejection_percent_caps_ejections_while_one_endpoint_is_healthy() {
    let mut backends = [
        Backend::start("a", [127, 0, 0, 1]),
        Backend::start("b", [127, 0, 0, 2]),
        Backend::start("c", [127, 0, 0, 3]),
        Backend::start("d", [127, 0, 0, 1]),
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let mut s = with_retries(
        round_robin(spec(&addrs)),
        sr::RetryBudget {
            ratio: 1.0,
            min_retries_per_second: Some(1000),
            ttl: None,
        },
    );
    // Enough attempts to get past the three dead endpoints before any is ejected.
    if let Some(r) = s.retry.as_mut() {
        r.attempts = Some(4);
    }
    s.circuit_breaker = Some(sr::CircuitBreaker {
        consecutive_failures: Some(2),
        max_ejection_percent: Some(50),
        ..Default::default()
    });
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &s));
    let sidecar = start_sidecar(d).await;
    for b in backends.iter_mut().take(3) {
        b.kill();
    }
    let client = http_client();
    for _ in 0..60 {
        let g = get(&client, sidecar.outbound_addr(), "web").await;
        assert_eq!(g.status, StatusCode::OK, "{g:?}");
        assert_eq!(g.header("x-backend"), Some("d"));
    }
    let m = scrape(sidecar.admin_addr()).await;
    let open: Vec<String> = addrs
        .iter()
        .map(|a| a.to_string())
        .filter(|a| metric(&m, "sagamesh_endpoint_breaker_state", &[("endpoint", a)]) > 0.0)
        .collect();
    assert_eq!(
        open.len(),
        2,
        "at most 50% of 4 endpoints ejected: {open:?}"
    );
    sidecar.shutdown().await;
}

/// A listener on 127.0.0.1 whose accept queue is full: further connects hang (their SYNs are
/// dropped), as to an app that has stopped accepting. Returns the port and what must stay
/// alive.
fn unanswering_listener() -> (u16, tokio::net::TcpListener, Vec<std::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let listener = socket.listen(1).expect("listen");
    let addr = listener.local_addr().expect("addr");
    // Fill the accept queue (backlog 1 holds two), never accepting.
    let mut held = Vec::new();
    for _ in 0..2 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            held.push(s);
        }
    }
    (addr.port(), listener, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_connects_to_the_app_with_the_configured_timeout() {
    let (port, _listener, _held) = unanswering_listener();
    let mut config = Config::local_test();
    config.app_port = Some(port);
    config.connect_timeout = Duration::from_millis(300);
    let sidecar = start_sidecar_with(config, StaticDiscovery::new()).await;
    let inbound = sidecar.inbound_addr().expect("inbound listener");
    let g = get(&http_client(), inbound, "anything").await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE, "{g:?}");
    assert_eq!(g.error(), Some("connect-failure"));
    assert!(
        g.body.contains("timed out after 300ms"),
        "the inbound used the configured 300 ms connect timeout: {g:?}"
    );
    sidecar.shutdown().await;
}
