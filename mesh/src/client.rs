//! The mesh client: the caller's side of every request to a meshed service — discovery,
//! balancing, circuit breaking, retries with a budget, timeouts and load shedding. The outbound
//! proxy is a thin HTTP front of [`MeshClient::send`]; the saga engine uses the same type.
//!
//! Flow of one request: resolve the destination (waiting up to `discovery_timeout` for the
//! first answer), shed if too many are in flight, buffer the body when the request may be
//! retried, then attempt → classify → record in the endpoint's breaker → retry (budget,
//! backoff, another endpoint) until success, a non-retryable answer, or the overall deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
};
use http_body::Body as _;
use http_body_util::BodyExt;
use prometheus_client::metrics::gauge::Gauge;
use sagamesh_discovery::proto as pb;
use tokio::sync::watch;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use crate::balance::Balancer;
use crate::body::{self, BoxBody, Guarded};
use crate::breaker::{Admit, BreakerState};
use crate::endpoint::{Endpoint, InFlight};
use crate::error::MeshError;
use crate::metrics::{DestinationMetrics, Metrics, ServiceLabels};
use crate::policy::{RetryConfig, ServicePolicy};
use crate::pool::{PoolConfig, SendError};
use crate::retry::{self, Outcome};
use sagamesh_discovery::name::{PortRef, ServiceKey, Target};
use sagamesh_discovery::{Discover, Resolution};

/// Client settings that are not per-service policy.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// How long a request waits for discovery's first answer about a new destination.
    pub discovery_timeout: Duration,
    /// Largest request body kept in memory so the request can be retried; a larger body is
    /// sent once.
    pub max_retry_body_bytes: u64,
    /// TCP connect timeout to an endpoint.
    pub connect_timeout: Duration,
    /// How long idle pooled connections are kept.
    pub pool_idle_timeout: Duration,
    /// Random jitter on retry backoff (turn off for repeatable tests).
    pub jitter: bool,
    /// Most distinct destinations watched; requests to further names get `unknown-service`
    /// (bounds memory, discovery streams and metric label sets whatever names callers send).
    pub max_destinations: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            discovery_timeout: Duration::from_secs(3),
            max_retry_body_bytes: 64 * 1024,
            connect_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(90),
            jitter: true,
            max_destinations: 1000,
        }
    }
}

impl From<&ClientConfig> for PoolConfig {
    fn from(cfg: &ClientConfig) -> Self {
        PoolConfig {
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.pool_idle_timeout,
        }
    }
}

/// The state of one destination as of its last discovery update.
struct DestState {
    resolution: Resolution,
    snapshot: Option<Arc<pb::Snapshot>>,
    policy: ServicePolicy,
    endpoints: Vec<Arc<Endpoint>>,
    /// (ready, port name) per endpoint.
    meta: Vec<(bool, String)>,
    balancer: Balancer,
    budget: Option<(RetryBudgetKey, Arc<TpsBudget>)>,
}

type RetryBudgetKey = (u32, u32, Duration);

fn budget_key(r: &RetryConfig) -> RetryBudgetKey {
    (
        r.budget_ratio.to_bits(),
        r.budget_min_per_second,
        r.budget_ttl,
    )
}

impl DestState {
    fn build(resolution: Resolution, previous: Option<&DestState>) -> Self {
        let snapshot = match &resolution {
            Resolution::Snapshot { snapshot, .. } => Some(snapshot.clone()),
            _ => None,
        };
        let policy = ServicePolicy::from_proto(snapshot.as_ref().and_then(|s| s.policy.as_ref()));
        let mut endpoints = Vec::new();
        let mut meta = Vec::new();
        for e in snapshot.iter().flat_map(|s| s.endpoints.iter()) {
            let Ok(port) = u16::try_from(e.port) else {
                continue;
            };
            if port == 0 || e.address.is_empty() {
                continue;
            }
            let weight = if e.weight == 0 { 1 } else { e.weight };
            let key = format!("{}:{port}", e.address);
            // Keep load and breaker state of endpoints that stay.
            let reused = previous.and_then(|p| {
                p.endpoints.iter().find(|x| {
                    x.key == key
                        && x.weight == weight
                        && x.breaker
                            .lock()
                            .is_ok_and(|b| *b.config() == policy.breaker)
                })
            });
            let ep = match reused {
                Some(x) => x.clone(),
                None => Arc::new(Endpoint::new(
                    e.address.clone(),
                    port,
                    weight,
                    e.zone.clone(),
                    policy.breaker.clone(),
                )),
            };
            if endpoints.iter().any(|x: &Arc<Endpoint>| x.key == ep.key) {
                continue;
            }
            endpoints.push(ep);
            meta.push((e.ready, e.port_name.clone()));
        }
        // A new endpoint needs no seeded estimate: until its first answer its estimate is
        // stale, so the balancer sends it a request at once (see `endpoint::PeakEwma`).
        let balancer = Balancer::new(policy.balance.clone(), &endpoints);
        let budget = policy.retry.as_ref().map(|r| {
            let key = budget_key(r);
            match previous
                .and_then(|p| p.budget.as_ref())
                .filter(|(k, _)| *k == key)
            {
                Some(b) => b.clone(),
                None => (
                    key,
                    Arc::new(TpsBudget::new(
                        r.budget_ttl,
                        r.budget_min_per_second.min(i32::MAX as u32 - 1),
                        r.budget_ratio,
                    )),
                ),
            }
        });
        DestState {
            resolution,
            snapshot,
            policy,
            endpoints,
            meta,
            balancer,
            budget,
        }
    }
}

struct Destination {
    label: String,
    metrics: DestinationMetrics,
    rx: Mutex<watch::Receiver<Resolution>>,
    state: RwLock<Arc<DestState>>,
    in_flight: Arc<AtomicU32>,
}

impl Destination {
    fn current(&self) -> Arc<DestState> {
        let changed = {
            let Ok(mut rx) = self.rx.lock() else {
                return self.snapshot_state();
            };
            if rx.has_changed().unwrap_or(false) {
                Some(rx.borrow_and_update().clone())
            } else {
                None
            }
        };
        if let Some(resolution) = changed
            && let Ok(mut st) = self.state.write()
        {
            let next = DestState::build(resolution, Some(&st));
            for gone in st
                .endpoints
                .iter()
                .filter(|e| !next.endpoints.iter().any(|n| n.key == e.key))
            {
                gone.metrics.retire();
                self.metrics.remove_endpoint(&gone.key);
            }
            *st = Arc::new(next);
        }
        self.snapshot_state()
    }

    fn snapshot_state(&self) -> Arc<DestState> {
        match self.state.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    async fn wait_resolved(&self, timeout: Duration) -> Arc<DestState> {
        let st = self.current();
        if !matches!(st.resolution, Resolution::Pending) {
            return st;
        }
        let rx = self.rx.lock().ok().map(|rx| rx.clone());
        if let Some(mut rx) = rx {
            let _ =
                tokio::time::timeout(timeout, rx.wait_for(|r| !matches!(r, Resolution::Pending)))
                    .await;
        }
        self.current()
    }
}

/// A request's hold on its destination's in-flight count.
struct DestInFlight {
    counter: Arc<AtomicU32>,
    gauge: Gauge,
}

impl Drop for DestInFlight {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

/// The guards a response body keeps until it ends.
#[allow(dead_code)]
struct ResponseGuards {
    dest: DestInFlight,
    endpoint: InFlight,
}

struct Inner {
    discover: Arc<dyn Discover>,
    cfg: ClientConfig,
    metrics: Metrics,
    destinations: Mutex<HashMap<ServiceKey, Arc<Destination>>>,
    pool: PoolConfig,
}

/// The mesh client. Cheap to clone; all clones share pools, breakers and budgets.
#[derive(Clone)]
pub struct MeshClient {
    inner: Arc<Inner>,
}

const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy `proxy-connection` and `keep-alive`),
/// `transfer-encoding` included.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    PROXY_CONNECTION,
    KEEP_ALIVE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those `Connection` names.
/// Runs on every request and response: when none is present (the usual case) it only compares
/// the names present, without hashing or allocating.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    // A message with both is framed by Transfer-Encoding, and a proxy must drop the received
    // Content-Length before forwarding it (RFC 9112 §6.3): the next hop frames it anew, and a
    // stale length would contradict the body it gets.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !s.is_empty())
        .collect();
    for h in named {
        headers.remove(h.as_str());
    }
    // gRPC needs `te: trailers` end to end.
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The HTTP status a gRPC status code stands for, for breaker and retry decisions: UNAVAILABLE
/// is a 503, DEADLINE_EXCEEDED a 504, INTERNAL/UNKNOWN/DATA_LOSS a 500; others are the
/// caller's business (200).
fn grpc_status_as_http(headers: &HeaderMap) -> Option<StatusCode> {
    let code: u32 = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(match code {
        14 => StatusCode::SERVICE_UNAVAILABLE,
        4 => StatusCode::GATEWAY_TIMEOUT,
        2 | 13 | 15 => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::OK,
    })
}

impl MeshClient {
    pub fn new(discover: Arc<dyn Discover>, cfg: ClientConfig, metrics: Metrics) -> Self {
        let pool = PoolConfig::from(&cfg);
        MeshClient {
            inner: Arc::new(Inner {
                discover,
                cfg,
                metrics,
                destinations: Mutex::new(HashMap::new()),
                pool,
            }),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn discover(&self) -> &Arc<dyn Discover> {
        &self.inner.discover
    }

    fn destination(&self, key: &ServiceKey) -> Option<Arc<Destination>> {
        let mut map = match self.inner.destinations.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(d) = map.get(key) {
            return Some(d.clone());
        }
        if map.len() >= self.inner.cfg.max_destinations && !map.contains_key(key) {
            return None;
        }
        let dest = map
            .entry(key.clone())
            .or_insert_with(|| {
                let mut rx = self.inner.discover.watch(key);
                let first = rx.borrow_and_update().clone();
                Arc::new(Destination {
                    label: key.to_string(),
                    metrics: DestinationMetrics::new(
                        &self.inner.metrics,
                        "outbound",
                        key.to_string(),
                    ),
                    rx: Mutex::new(rx),
                    state: RwLock::new(Arc::new(DestState::build(first, None))),
                    in_flight: Arc::new(AtomicU32::new(0)),
                })
            })
            .clone();
        Some(dest)
    }

    /// Sends a request to `target` and records it in the outbound metrics. The request's URI
    /// path and query are kept; its scheme and authority are replaced per endpoint.
    pub async fn send(
        &self,
        target: &Target,
        req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, MeshError> {
        let start = Instant::now();
        let Some(dest) = self.destination(&target.service) else {
            let e = MeshError::UnknownService(format!(
                "{} (more than {} destinations in use)",
                target.service, self.inner.cfg.max_destinations
            ));
            self.inner.metrics.outbound_without_destination(
                "other",
                e.status(),
                e.code(),
                start.elapsed(),
            );
            return Err(e);
        };
        let result = self.send_inner(dest.clone(), target, req).await;
        match &result {
            Ok(r) => dest.metrics.request(r.status(), ""),
            Err(e) => dest.metrics.request(e.status(), e.code()),
        }
        dest.metrics
            .latency()
            .observe(start.elapsed().as_secs_f64());
        result
    }

    async fn send_inner(
        &self,
        dest: Arc<Destination>,
        target: &Target,
        req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, MeshError> {
        let state = dest.wait_resolved(self.inner.cfg.discovery_timeout).await;
        let name = &dest.label;
        let snapshot = match &state.resolution {
            Resolution::Snapshot { .. } => state.snapshot.clone(),
            Resolution::DoesNotExist { .. } => None,
            Resolution::Pending => {
                return Err(MeshError::UnknownService(format!(
                    "{name} (discovery has not answered)"
                )));
            }
        }
        .ok_or_else(|| MeshError::UnknownService(name.clone()))?;

        // The port: the one named, else the first.
        let port = match &target.port {
            Some(p) => snapshot
                .ports
                .iter()
                .find(|x| match p {
                    PortRef::Number(n) => x.port == u32::from(*n),
                    PortRef::Name(n) => &x.name == n,
                })
                .ok_or_else(|| MeshError::UnknownService(format!("{name} has no port {p}")))?,
            None => snapshot
                .ports
                .first()
                .ok_or_else(|| MeshError::NoEndpoints(name.clone()))?,
        };
        let first_port = snapshot.ports.first().map(|p| p.name.as_str());
        let grpc = pb::Protocol::try_from(port.protocol) == Ok(pb::Protocol::Grpc);
        let candidates: Vec<usize> = state
            .meta
            .iter()
            .enumerate()
            .filter(|(_, (ready, port_name))| {
                *ready
                    && (port_name == &port.name
                        || (port_name.is_empty() && first_port == Some(port.name.as_str())))
            })
            .map(|(i, _)| i)
            .collect();
        if candidates.is_empty() {
            return Err(MeshError::NoEndpoints(name.clone()));
        }

        // Load shedding.
        let policy = &state.policy;
        if dest.in_flight.fetch_add(1, Ordering::Relaxed) >= policy.max_in_flight {
            dest.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(MeshError::Overloaded(name.clone()));
        }
        let gauge = dest.metrics.in_flight().clone();
        gauge.inc();
        let dest_guard = DestInFlight {
            counter: dest.in_flight.clone(),
            gauge,
        };

        let (mut parts, body) = req.into_parts();
        let use_h2 = grpc || parts.version == Version::HTTP_2;
        let authority = target_authority(&parts, target);
        strip_hop_by_hop(&mut parts.headers);
        if use_h2 {
            parts.headers.remove(header::HOST);
        } else if !parts.headers.contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(&authority)
        {
            parts.headers.insert(header::HOST, v);
        }

        // Retries need a replayable body.
        if let Some((_, b)) = &state.budget {
            b.deposit();
        }
        let mut retry_cfg = policy
            .retry
            .as_ref()
            .filter(|r| r.attempts > 1 && retry::may_retry(r, &parts.method, &parts.headers));
        let mut body = Some(body);
        let mut buffered: Option<Bytes> = None;
        if retry_cfg.is_some() {
            let b = body.take().unwrap_or_else(body::empty);
            let exact = b.size_hint().exact();
            if b.is_end_stream() {
                buffered = Some(Bytes::new());
            } else if exact.is_some_and(|n| n <= self.inner.cfg.max_retry_body_bytes) {
                let collected =
                    http_body_util::Limited::new(b, self.inner.cfg.max_retry_body_bytes as usize)
                        .collect()
                        .await
                        .map_err(|e| MeshError::BadRequest(format!("reading request body: {e}")))?;
                buffered = Some(collected.to_bytes());
            } else {
                body = Some(b);
                retry_cfg = None;
            }
        }
        let attempts = retry_cfg.map(|r| r.attempts).unwrap_or(1);

        let mut delivered = false;
        let run = self.attempts(
            &mut delivered,
            &state,
            &dest.metrics,
            &candidates,
            &mut parts,
            body,
            buffered,
            retry_cfg,
            attempts,
            use_h2,
        );
        // Pinned where it is: the attempts future is large, and a timeout taking it by value
        // would copy it on every request.
        let result = {
            let mut run = std::pin::pin!(run);
            match policy.timeout {
                Some(t) => match tokio::time::timeout(t, run.as_mut()).await {
                    Ok(r) => r,
                    Err(_) => Err(MeshError::Timeout(name.clone())),
                },
                None => run.await,
            }
        };
        let result = result.map_err(|e| e.delivered_before(delivered));
        result.map(|(resp, ep_guard)| {
            resp.map(|b| {
                body::boxed(Guarded::new(
                    b,
                    ResponseGuards {
                        dest: dest_guard,
                        endpoint: ep_guard,
                    },
                ))
            })
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempts(
        &self,
        delivered: &mut bool,
        state: &DestState,
        dest_metrics: &DestinationMetrics,
        candidates: &[usize],
        parts: &mut http::request::Parts,
        mut body: Option<BoxBody>,
        buffered: Option<Bytes>,
        retry_cfg: Option<&RetryConfig>,
        attempts: u32,
        use_h2: bool,
    ) -> Result<(Response<BoxBody>, InFlight), MeshError> {
        let mut tried: Vec<usize> = Vec::new();
        let mut last: Option<Result<(Response<BoxBody>, InFlight), MeshError>> = None;
        let per_try = retry_cfg.and_then(|r| r.per_try_timeout);
        let caller_retries = parts.extensions.get::<retry::CallerRetries>().is_some();
        let name = dest_metrics.destination();
        for attempt in 1..=attempts {
            if attempt > 1 {
                let (Some(cfg), Some((_, budget))) = (retry_cfg, state.budget.as_ref()) else {
                    break;
                };
                if !budget.withdraw() {
                    self.inner
                        .metrics
                        .budget_exhausted
                        .get_or_create(&ServiceLabels {
                            destination: name.to_string(),
                        })
                        .inc();
                    return match last {
                        Some(Err(e)) => Err(MeshError::BudgetExhausted {
                            service: name.to_string(),
                            last: e.to_string(),
                            maybe_delivered: e.maybe_delivered(),
                        }),
                        Some(ok) => ok,
                        None => Err(MeshError::NoEndpoints(name.to_string())),
                    };
                }
                dest_metrics.retries().inc();
                tokio::time::sleep(retry::backoff(cfg, attempt - 1, self.inner.cfg.jitter)).await;
            }
            let (idx, probe) = match self.pick(state, name, candidates, &tried, &parts.headers) {
                Ok(p) => p,
                // Nothing left to try: report the last real failure if there was one.
                Err(e) => return last.unwrap_or(Err(e)),
            };
            tried.push(idx);
            let ep = state.endpoints[idx].clone();
            let req_body = match (&buffered, body.take()) {
                (Some(b), _) => body::full(b.clone()),
                (None, Some(b)) => b,
                (None, None) => break,
            };
            // The last possible attempt takes the headers; earlier ones send a copy.
            let headers = if attempt == attempts {
                std::mem::take(&mut parts.headers)
            } else {
                parts.headers.clone()
            };
            let req = build_request(parts, headers, req_body, &ep, use_h2)?;
            let (outcome, result) = self.attempt(&ep, probe, req, per_try, use_h2).await;
            self.record(state, name, idx, probe, outcome);
            // Whether an attempt before the one in `last` may have reached the service.
            if let Some(prev) = &last {
                *delivered |= prev.as_ref().map_or_else(|e| e.maybe_delivered(), |_| true);
            }
            let retry = attempt < attempts
                && retry_cfg.is_some_and(|cfg| retry::is_retryable(cfg, outcome))
                && (!caller_retries || retry::retried_for_retrying_caller(outcome));
            last = Some(result);
            if !retry {
                break;
            }
        }
        last.unwrap_or_else(|| Err(MeshError::NoEndpoints(name.to_string())))
    }

    /// Chooses an endpoint among the candidates whose breakers let traffic through, preferring
    /// ones not tried yet by this request. Returns its index and whether it is a probe.
    fn pick(
        &self,
        state: &DestState,
        name: &str,
        candidates: &[usize],
        tried: &[usize],
        headers: &HeaderMap,
    ) -> Result<(usize, bool), MeshError> {
        let now = Instant::now();
        let available = |i: &usize| {
            state.endpoints[*i]
                .breaker
                .lock()
                .is_ok_and(|b| b.available(now))
        };
        // The usual case, a first try with every breaker closed, borrows the candidates.
        let mut pool: std::borrow::Cow<'_, [usize]> =
            if tried.is_empty() && candidates.iter().all(available) {
                std::borrow::Cow::Borrowed(candidates)
            } else {
                let mut p: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|i| !tried.contains(i) && available(i))
                    .collect();
                if p.is_empty() {
                    p = candidates.iter().copied().filter(available).collect();
                }
                std::borrow::Cow::Owned(p)
            };
        while !pool.is_empty() {
            let Some(i) = state.balancer.pick(&state.endpoints, &pool, headers) else {
                break;
            };
            let ep = &state.endpoints[i];
            let admit = ep
                .breaker
                .lock()
                .map(|mut b| b.admit(now))
                .unwrap_or(Admit::No);
            match admit {
                Admit::Yes => return Ok((i, false)),
                Admit::Probe => {
                    self.set_gauge(name, ep, BreakerState::HalfOpen);
                    return Ok((i, true));
                }
                Admit::No => pool.to_mut().retain(|x| *x != i),
            }
        }
        Err(MeshError::CircuitOpen(name.to_string()))
    }

    async fn attempt(
        &self,
        ep: &Arc<Endpoint>,
        probe: bool,
        req: Request<BoxBody>,
        per_try: Option<Duration>,
        use_h2: bool,
    ) -> (Outcome, Result<(Response<BoxBody>, InFlight), MeshError>) {
        let in_flight = ep.track();
        // A probe whose request is cancelled gives its slot back.
        let probe_guard = ProbeGuard {
            ep: ep.clone(),
            armed: probe,
        };
        let start = Instant::now();
        let fut = ep
            .pool
            .send(&ep.address, ep.port, req, use_h2, &self.inner.pool);
        let mut fut = std::pin::pin!(fut);
        let res = match per_try {
            Some(t) => tokio::time::timeout(t, fut.as_mut()).await.ok(),
            None => Some(fut.await),
        };
        let mut probe_guard = probe_guard;
        probe_guard.armed = false;
        match res {
            None => {
                ep.observe_rtt(start.elapsed());
                (
                    Outcome::Timeout,
                    Err(MeshError::Timeout(format!("{} (per-try timeout)", ep.key))),
                )
            }
            Some(Ok(resp)) => {
                ep.observe_rtt(start.elapsed());
                let status = grpc_status_as_http(resp.headers()).unwrap_or(resp.status());
                (Outcome::Response(status), Ok((resp, in_flight)))
            }
            Some(Err(e)) => {
                let (outcome, err) = send_failure(&ep.key, e);
                (outcome, Err(err))
            }
        }
    }

    fn set_gauge(&self, name: &str, ep: &Endpoint, state: BreakerState) {
        ep.metrics
            .breaker_state(&self.inner.metrics, name, &ep.key)
            .set(state.gauge());
    }

    /// Feeds an outcome to the endpoint's breaker and ejects it when it trips and the
    /// max-ejection-percent rule allows (always when every other endpoint is failing too).
    fn record(&self, state: &DestState, name: &str, idx: usize, probe: bool, outcome: Outcome) {
        let now = Instant::now();
        let ep = &state.endpoints[idx];
        let failure = outcome.is_failure();
        ep.metrics
            .attempt(&self.inner.metrics, name, &ep.key, failure);
        let tripped = ep
            .breaker
            .lock()
            .map(|mut b| b.record(!failure, probe, now))
            .unwrap_or(false);
        if tripped {
            let total = state.endpoints.len();
            let mut ejected = 0;
            let mut others_failing = true;
            for (j, other) in state.endpoints.iter().enumerate() {
                if let Ok(b) = other.breaker.lock() {
                    if b.is_ejected() {
                        ejected += 1;
                    } else if j != idx && !b.trips(now) {
                        others_failing = false;
                    }
                }
            }
            let max_pct = state.policy.breaker.max_ejection_percent as usize;
            if (ejected + 1) * 100 <= max_pct * total || others_failing {
                let time = ep.breaker.lock().map(|mut b| b.eject(now)).ok();
                ep.metrics.ejected(&self.inner.metrics, name, &ep.key);
                tracing::warn!(destination = name, endpoint = %ep.key, ejection = ?time, "endpoint ejected");
            }
        }
        let st = ep
            .breaker
            .lock()
            .map(|b| b.state(now))
            .unwrap_or(BreakerState::Closed);
        self.set_gauge(name, ep, st);
    }

    /// Whether `service` is registered (waits up to the discovery timeout for a first answer).
    pub async fn has_service(&self, service: &ServiceKey) -> bool {
        match self.destination(service) {
            Some(d) => matches!(
                d.wait_resolved(self.inner.cfg.discovery_timeout)
                    .await
                    .resolution,
                Resolution::Snapshot { .. }
            ),
            None => false,
        }
    }

    /// JSON of what the client holds per destination (endpoints, breaker states, in-flight).
    pub fn debug_state(&self) -> serde_json::Value {
        let dests: Vec<(String, Arc<Destination>)> = match self.inner.destinations.lock() {
            Ok(m) => m.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            Err(_) => Vec::new(),
        };
        let now = Instant::now();
        let mut out = serde_json::Map::new();
        for (name, dest) in dests {
            let st = dest.current();
            out.insert(
                name,
                serde_json::json!({
                    "inFlight": dest.in_flight.load(Ordering::Relaxed),
                    "policy": format!("{:?}", st.policy.balance),
                    "endpoints": st.endpoints.iter().zip(&st.meta).map(|(e, (ready, port_name))| serde_json::json!({
                        "endpoint": e.key, "weight": e.weight, "zone": e.zone, "ready": ready,
                        "portName": port_name, "inFlight": e.in_flight(),
                        "breaker": e.breaker.lock().map(|b| b.state(now)).unwrap_or(BreakerState::Closed),
                    })).collect::<Vec<_>>(),
                }),
            );
        }
        serde_json::Value::Object(out)
    }
}

struct ProbeGuard {
    ep: Arc<Endpoint>,
    armed: bool,
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if self.armed
            && let Ok(mut b) = self.ep.breaker.lock()
        {
            b.release_probe();
        }
    }
}

/// What a failed send to `endpoint` means: no connection (nothing was sent), the caller's own
/// request body failing, or a failure on the connection after sending began.
pub fn send_failure(endpoint: &str, e: SendError) -> (Outcome, MeshError) {
    match e {
        SendError::Connect(reason) => (
            Outcome::ConnectFailure,
            MeshError::ConnectFailure {
                endpoint: endpoint.to_string(),
                reason,
                maybe_delivered: false,
            },
        ),
        SendError::Request(e) => match caller_body_error(&*e) {
            Some(caller) => (Outcome::CallerError, caller),
            None => (
                Outcome::Reset,
                MeshError::Reset {
                    endpoint: endpoint.to_string(),
                    reason: error_chain(&*e),
                },
            ),
        },
    }
}

/// When an attempt failed because the caller's request body failed (bad chunked encoding,
/// over the size limit), the error to answer with: the caller's fault, not the endpoint's.
pub(crate) fn caller_body_error(e: &(dyn std::error::Error + 'static)) -> Option<MeshError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(body_err) = err.downcast_ref::<body::BodyError>() {
            let mut inner: Option<&(dyn std::error::Error + 'static)> = Some(&*body_err.0);
            while let Some(i) = inner {
                if i.is::<http_body_util::LengthLimitError>() {
                    return Some(MeshError::BodyTooLarge);
                }
                inner = i.source();
            }
            return Some(MeshError::BadRequest(format!("request body: {body_err}")));
        }
        cur = err.source();
    }
    None
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The authority the caller used (for `Host` towards HTTP/1 endpoints).
fn target_authority(parts: &http::request::Parts, target: &Target) -> String {
    parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| match &target.port {
            Some(PortRef::Number(p)) => format!("{}:{p}", target.service.name),
            _ => target.service.name.clone(),
        })
}

fn build_request(
    parts: &http::request::Parts,
    headers: HeaderMap,
    body: BoxBody,
    ep: &Endpoint,
    use_h2: bool,
) -> Result<Request<BoxBody>, MeshError> {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority =
        Some(ep.authority.clone().ok_or_else(|| {
            MeshError::BadRequest(format!("bad endpoint address {:?}", ep.address))
        })?);
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    let uri = Uri::from_parts(uri)
        .map_err(|e| MeshError::BadRequest(format!("bad request target: {e}")))?;
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = if use_h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *req.headers_mut() = headers;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_transfer_encoding_takes_content_length_with_it() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["te", "x-kept"], "{h:?}");

        // Content-Length alone is the message's framing: kept.
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        strip_hop_by_hop(&mut h);
        assert_eq!(
            h.get(header::CONTENT_LENGTH).map(|v| v.as_bytes()),
            Some(&b"10"[..])
        );
    }
}
