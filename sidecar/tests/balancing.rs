//! The default policy (PeakEwma) end to end: equal backends get equal shares, a new or newly
//! Ready endpoint gets traffic at once, and endpoint metric series leave with their endpoint.
//! Real backends on 127.0.0.x and the real sidecar; every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use http::StatusCode;
use sagamesh_discovery::StaticDiscovery;

/// The tests of this file run one at a time: shares measured while another test's traffic
/// competes for the two cores would measure the machine, not the balancer.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

/// Sends `total` GETs to `web` from `workers` concurrent clients, returns the share per backend.
async fn shares(
    proxy: SocketAddr,
    workers: usize,
    total: usize,
) -> std::collections::HashMap<String, usize> {
    let mut tasks = Vec::new();
    for _ in 0..workers {
        tasks.push(tokio::spawn(async move {
            let client = http_client();
            let mut got = Vec::new();
            for _ in 0..total / workers {
                got.push(get(&client, proxy, "web").await);
            }
            got
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.extend(t.await.expect("worker"));
    }
    assert!(
        got.iter().all(|g| g.status == StatusCode::OK),
        "every request succeeds"
    );
    tally(&got)
}

/// Whether every backend's share is within ±25% of an equal share.
fn within_quarter_of_equal(
    t: &std::collections::HashMap<String, usize>,
    total: usize,
) -> Result<(), String> {
    let equal = total as f64 / 3.0;
    for name in ["a", "b", "c"] {
        let n = t.get(name).copied().unwrap_or(0) as f64;
        if (n - equal).abs() > 0.25 * equal {
            return Err(format!(
                "{name} got {n} of {total} (equal share {equal:.0} ± 25%): {t:?}"
            ));
        }
    }
    Ok(())
}

/// Measures the shares of `workers` callers over 1,000 requests, up to three times: passes on
/// the first round within ±25% of equal shares. On a loaded machine (other builds and tests on
/// the two cores) one backend can really answer slower for a while, and PeakEwma rightly moves
/// traffic away from it, so one round can measure the machine rather than the policy; the
/// defect this guards against (one of three equal backends starved: 0 of 799) fails every round.
async fn spreads_within_a_quarter(proxy: SocketAddr, workers: usize) {
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let t = shares(proxy, workers, 1000).await;
        eprintln!("{workers} caller(s) shares: {t:?}");
        match within_quarter_of_equal(&t, 1000) {
            Ok(()) => return,
            Err(e) => rounds.push(e),
        }
    }
    panic!("{workers} caller(s), three rounds out of bounds: {rounds:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_spreads_equal_backends_within_a_quarter_of_equal_shares() {
    let _serial = one_at_a_time().await;
    let backends = [
        Backend::start("a", [127, 0, 0, 1]),
        Backend::start("b", [127, 0, 0, 2]),
        Backend::start("c", [127, 0, 0, 3]),
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &spec(&addrs)));
    let sidecar = start_sidecar(d).await;
    let proxy = sidecar.outbound_addr();
    // One caller at a time (no in-flight requests to spread the load), then four.
    spreads_within_a_quarter(proxy, 1).await;
    spreads_within_a_quarter(proxy, 4).await;
    sidecar.shutdown().await;
}

/// Sends GETs one after another until `backend` answers one; returns how many were sent and
/// how long it took.
async fn until_hit(proxy: SocketAddr, backend: &Backend) -> (usize, Duration) {
    let client = http_client();
    let start = std::time::Instant::now();
    let before = backend.hits();
    for n in 1..=1000 {
        let got = get(&client, proxy, "web").await;
        assert_eq!(got.status, StatusCode::OK);
        if backend.hits() > before {
            return (n, start.elapsed());
        }
    }
    panic!("{} got none of 1000 requests", backend.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_or_newly_ready_endpoint_gets_traffic_at_once() {
    let _serial = one_at_a_time().await;
    let backends = [
        Backend::start("a", [127, 0, 0, 1]),
        Backend::start("b", [127, 0, 0, 2]),
        Backend::start("c", [127, 0, 0, 3]),
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &spec(&addrs[..2])));
    let sidecar = start_sidecar(d.clone()).await;
    let proxy = sidecar.outbound_addr();
    // Warm up: the two first endpoints have fresh latency estimates.
    shares(proxy, 2, 200).await;

    // A new endpoint joins.
    d.set(snapshot("web", &spec(&addrs)));
    let (n, took) = until_hit(proxy, &backends[2]).await;
    eprintln!("new endpoint: first request after {n} requests, {took:?}");
    // p2c draws the new endpoint in one pick of three; 10 misses in a row has odds 1.7e-5
    // when it is preferred, while an endpoint starved by its default estimate gets none.
    assert!(n <= 10, "the new endpoint got its first request after {n}");
    assert!(
        took < Duration::from_millis(100),
        "the new endpoint got its first request after {took:?}"
    );

    // An endpoint that was listed but not Ready turns Ready.
    let mut snap = snapshot("web", &spec(&addrs));
    snap.endpoints[2].ready = false;
    d.set(snap.clone());
    shares(proxy, 2, 200).await;
    let hits = backends[2].hits();
    shares(proxy, 2, 100).await;
    assert_eq!(backends[2].hits(), hits, "a NotReady endpoint gets nothing");
    snap.endpoints[2].ready = true;
    d.set(snap);
    let (n, took) = until_hit(proxy, &backends[2]).await;
    eprintln!("newly Ready endpoint: first request after {n} requests, {took:?}");
    assert!(
        n <= 10,
        "the Ready endpoint got its first request after {n}"
    );
    assert!(
        took < Duration::from_millis(100),
        "the Ready endpoint got its first request after {took:?}"
    );
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_series_leave_with_their_endpoint() {
    let _serial = one_at_a_time().await;
    let backends: Vec<Backend> = (1..=4)
        .map(|i| Backend::start(&format!("b{i}"), [127, 0, 0, i]))
        .collect();
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &spec(&addrs[..2])));
    let sidecar = start_sidecar(d.clone()).await;
    let proxy = sidecar.outbound_addr();
    let client = http_client();
    // Pod churn: the endpoint set changes ten times, every endpoint serves some requests.
    for round in 0..10 {
        let set = [addrs[round % 4], addrs[(round + 1) % 4]];
        d.set(snapshot("web", &spec(&set)));
        for _ in 0..20 {
            assert_eq!(get(&client, proxy, "web").await.status, StatusCode::OK);
        }
    }
    // The last set is endpoints 2 and 3 (round 9: 9 % 4 = 1, 10 % 4 = 2).
    let live: Vec<String> = [addrs[1], addrs[2]].iter().map(|a| a.to_string()).collect();
    let scrape = scrape(sidecar.admin_addr()).await;
    for family in [
        "sagamesh_endpoint_attempts_total",
        "sagamesh_endpoint_breaker_state",
        "sagamesh_endpoint_ejections_total",
    ] {
        let endpoints: std::collections::BTreeSet<String> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == family)
            .filter_map(|s| s.labels.get("endpoint").map(str::to_string))
            .collect();
        for e in &endpoints {
            assert!(
                live.contains(e),
                "{family} still has a series for {e}, which left (live: {live:?})"
            );
        }
    }
    for e in &live {
        assert!(
            metric(
                &scrape,
                "sagamesh_endpoint_attempts_total",
                &[("endpoint", e)]
            ) > 0.0,
            "the live endpoint {e} keeps its series"
        );
    }
    sidecar.shutdown().await;
}
