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

use crate::body::{self, BoxBody, Guarded};
use crate::endpoint::{Endpoint, InFlight};
use crate::endpoint_set::{EndpointSet, MetricLabels};
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
    endpoints: EndpointSet,
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
        let endpoints =
            EndpointSet::build(snapshot.as_deref(), &policy, previous.map(|p| &p.endpoints));
        // A budget whose settings stay keeps its balance.
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
            st.endpoints
                .retire_missing_from(&next.endpoints, &self.metrics);
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
    /// Looked up on every request: foldhash (seeded per map) instead of SipHash costs about 260
    /// instructions per request less under callgrind; the map holds at most
    /// `max_destinations` names, which bounds what colliding names could cost.
    destinations: Mutex<HashMap<ServiceKey, Arc<Destination>, foldhash::fast::RandomState>>,
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
                destinations: Mutex::new(HashMap::default()),
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
        let port_index = match &target.port {
            Some(p) => snapshot
                .ports
                .iter()
                .position(|x| match p {
                    PortRef::Number(n) => x.port == u32::from(*n),
                    PortRef::Name(n) => &x.name == n,
                })
                .ok_or_else(|| MeshError::UnknownService(format!("{name} has no port {p}")))?,
            None if snapshot.ports.is_empty() => return Err(MeshError::NoEndpoints(name.clone())),
            None => 0,
        };
        let grpc =
            pb::Protocol::try_from(snapshot.ports[port_index].protocol) == Ok(pb::Protocol::Grpc);
        let candidates = state.endpoints.candidates(port_index);
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

        // Every request earns retry budget; a retry spends it.
        if let Some((_, b)) = &state.budget {
            b.deposit();
        }
        let retry = policy
            .retry
            .as_ref()
            .filter(|r| r.attempts > 1 && retry::may_retry(r, &parts.method, &parts.headers));
        // Retries need a replayable body.
        let (body, retry) = match retry {
            Some(r) => match self.replayable(body).await? {
                Ok(bytes) => (RequestBody::Replayable(bytes), Some(r)),
                Err(streamed) => (RequestBody::Once(Some(streamed)), None),
            },
            None => (RequestBody::Once(Some(body)), None),
        };
        let mut attempts = Attempts {
            client: &self.inner,
            state: &state,
            dest: &dest.metrics,
            candidates,
            parts,
            body,
            retry,
            max: retry.map_or(1, |r| r.attempts),
            use_h2,
            tried: Vec::new(),
            delivered: false,
        };
        // Pinned where it is: the attempts future is large, and a timeout taking it by value
        // would copy it on every request.
        let result = {
            let mut run = std::pin::pin!(attempts.run());
            match policy.timeout {
                Some(t) => match tokio::time::timeout(t, run.as_mut()).await {
                    Ok(r) => r,
                    Err(_) => Err(MeshError::Timeout(name.clone())),
                },
                None => run.await,
            }
        };
        let result = result.map_err(|e| e.delivered_before(attempts.delivered));
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

    /// The whole body, when it is small enough to keep for retries (`Ok`), or the body itself
    /// to send once (`Err`): one larger than `max_retry_body_bytes`, or of unknown length.
    async fn replayable(&self, body: BoxBody) -> Result<Result<Bytes, BoxBody>, MeshError> {
        if body.is_end_stream() {
            return Ok(Ok(Bytes::new()));
        }
        let limit = self.inner.cfg.max_retry_body_bytes;
        if body.size_hint().exact().is_none_or(|n| n > limit) {
            return Ok(Err(body));
        }
        let collected = http_body_util::Limited::new(body, limit as usize)
            .collect()
            .await
            .map_err(|e| MeshError::BadRequest(format!("reading request body: {e}")))?;
        Ok(Ok(collected.to_bytes()))
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
        let mut out = serde_json::Map::new();
        for (name, dest) in dests {
            let st = dest.current();
            out.insert(
                name,
                serde_json::json!({
                    "inFlight": dest.in_flight.load(Ordering::Relaxed),
                    "policy": format!("{:?}", st.policy.balance),
                    "endpoints": st.endpoints.to_json(),
                }),
            );
        }
        serde_json::Value::Object(out)
    }
}

/// A request's body for its attempts.
enum RequestBody {
    /// Kept whole: every attempt sends a copy.
    Replayable(Bytes),
    /// Streamed: the first attempt takes it, there is no second.
    Once(Option<BoxBody>),
}

/// One request's attempts: the first, then retries while the outcome is retryable, the
/// budget allows and endpoints are left.
struct Attempts<'a> {
    client: &'a Inner,
    state: &'a DestState,
    dest: &'a DestinationMetrics,
    candidates: &'a [usize],
    parts: http::request::Parts,
    body: RequestBody,
    /// The retry policy, when this request may be retried.
    retry: Option<&'a RetryConfig>,
    max: u32,
    use_h2: bool,
    /// Endpoints tried so far (a retry prefers another one).
    tried: Vec<usize>,
    /// Whether an attempt before the last may have reached the service: read after `run`,
    /// also when the overall timeout cancelled it.
    delivered: bool,
}

type Answer = Result<(Response<BoxBody>, InFlight), MeshError>;

impl Attempts<'_> {
    async fn run(&mut self) -> Answer {
        let mut last: Option<Answer> = None;
        let per_try = self.retry.and_then(|r| r.per_try_timeout);
        let caller_retries = self
            .parts
            .extensions
            .get::<retry::CallerRetries>()
            .is_some();
        let name = self.dest.destination();
        let labels = MetricLabels {
            metrics: &self.client.metrics,
            destination: name,
        };
        for attempt in 1..=self.max {
            if attempt > 1
                && let Err(answer) = self.wait_for_retry(attempt, &mut last).await
            {
                return answer;
            }
            let Some(pick) = self.state.endpoints.pick(
                self.candidates,
                &self.tried,
                &self.parts.headers,
                labels,
            ) else {
                // Nothing left to try: report the last real failure if there was one.
                return last.unwrap_or_else(|| Err(MeshError::CircuitOpen(name.to_string())));
            };
            self.tried.push(pick.index);
            let Some(body) = self.next_body() else { break };
            // The last possible attempt takes the headers; earlier ones send a copy.
            let headers = if attempt == self.max {
                std::mem::take(&mut self.parts.headers)
            } else {
                self.parts.headers.clone()
            };
            let ep = self.state.endpoints.endpoint(pick).clone();
            let req = build_request(&self.parts, headers, body, &ep, self.use_h2)?;
            let (outcome, result) = send_attempt(
                &ep,
                pick.probe,
                req,
                per_try,
                self.use_h2,
                &self.client.pool,
            )
            .await;
            self.state.endpoints.record(pick, outcome, labels);
            if let Some(prev) = &last {
                self.delivered |= prev.as_ref().map_or_else(|e| e.maybe_delivered(), |_| true);
            }
            let retry = attempt < self.max
                && self
                    .retry
                    .is_some_and(|cfg| retry::is_retryable(cfg, outcome))
                && (!caller_retries || retry::retried_for_retrying_caller(outcome));
            last = Some(result);
            if !retry {
                break;
            }
        }
        last.unwrap_or_else(|| Err(MeshError::NoEndpoints(name.to_string())))
    }

    /// Spends retry budget and sleeps the backoff before attempt `attempt`; `Err` holds the
    /// answer to give instead when there is no budget left.
    async fn wait_for_retry(&self, attempt: u32, last: &mut Option<Answer>) -> Result<(), Answer> {
        let name = self.dest.destination();
        let (Some(cfg), Some((_, budget))) = (self.retry, self.state.budget.as_ref()) else {
            return Err(last
                .take()
                .unwrap_or_else(|| Err(MeshError::NoEndpoints(name.to_string()))));
        };
        if !budget.withdraw() {
            self.client
                .metrics
                .budget_exhausted
                .get_or_create(&ServiceLabels {
                    destination: name.to_string(),
                })
                .inc();
            return Err(match last.take() {
                Some(Err(e)) => Err(MeshError::BudgetExhausted {
                    service: name.to_string(),
                    last: e.to_string(),
                    maybe_delivered: e.maybe_delivered(),
                }),
                Some(ok) => ok,
                None => Err(MeshError::NoEndpoints(name.to_string())),
            });
        }
        self.dest.retries().inc();
        tokio::time::sleep(retry::backoff(cfg, attempt - 1, self.client.cfg.jitter)).await;
        Ok(())
    }

    fn next_body(&mut self) -> Option<BoxBody> {
        match &mut self.body {
            RequestBody::Replayable(bytes) => Some(body::full(bytes.clone())),
            RequestBody::Once(body) => body.take(),
        }
    }
}

/// Sends one attempt to `ep`: its outcome for the breaker and retry rules, and its answer.
async fn send_attempt(
    ep: &Arc<Endpoint>,
    probe: bool,
    req: Request<BoxBody>,
    per_try: Option<Duration>,
    use_h2: bool,
    pool: &PoolConfig,
) -> (Outcome, Answer) {
    let in_flight = ep.track();
    // A probe whose request is cancelled gives its slot back.
    let mut probe_guard = ProbeGuard {
        ep: ep.clone(),
        armed: probe,
    };
    let start = Instant::now();
    let mut fut = std::pin::pin!(ep.send(req, use_h2, pool));
    let res = match per_try {
        Some(t) => tokio::time::timeout(t, fut.as_mut()).await.ok(),
        None => Some(fut.await),
    };
    probe_guard.armed = false;
    match res {
        None => {
            ep.observe_rtt(start.elapsed());
            (
                Outcome::Timeout,
                Err(MeshError::Timeout(format!(
                    "{} (per-try timeout)",
                    ep.key()
                ))),
            )
        }
        Some(Ok(resp)) => {
            ep.observe_rtt(start.elapsed());
            let status = grpc_status_as_http(resp.headers()).unwrap_or(resp.status());
            (Outcome::Response(status), Ok((resp, in_flight)))
        }
        Some(Err(e)) => {
            let (outcome, err) = send_failure(ep.key(), e);
            (outcome, Err(err))
        }
    }
}

struct ProbeGuard {
    ep: Arc<Endpoint>,
    armed: bool,
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if self.armed {
            self.ep.breaker(|b| b.release_probe());
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
    uri.authority = Some(ep.authority().cloned().ok_or_else(|| {
        MeshError::BadRequest(format!("bad endpoint address {:?}", ep.address()))
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
