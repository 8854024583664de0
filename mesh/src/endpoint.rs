//! One endpoint of a destination: its address, weight, load (in-flight requests, peak-EWMA
//! latency) and circuit breaker.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::body::BoxBody;
use crate::breaker::{Breaker, BreakerConfig};
use crate::metrics::EndpointMetrics;
use crate::pool::{Pool, PoolConfig, SendError};

/// Peak-EWMA latency estimate, as in tower's `load::PeakEwma` (same math: a sample above the
/// current estimate replaces it at once; one below is blended in as
/// `estimate * d + sample * (1 - d)` with `d = exp(-elapsed/tau)`, decaying once; and the
/// estimate decays towards zero while no sample arrives, so a slow endpoint is tried again
/// eventually).
///
/// Two additions, because peak-EWMA alone starves equal endpoints when traffic has little
/// concurrency (measured: with three identical backends one got 0 of 799 requests, and a pod
/// that turned Ready waited 1.58 s for its first request). An estimate holds a peak for tens of
/// seconds at a 10 s decay, and an endpoint that loses every comparison gets no sample that
/// could correct it. So:
/// - the default estimate is a prior, not a measurement: the first sample replaces it;
/// - an estimate with no sample for [`STALE_AFTER`] is stale: the balancer sends such an
///   endpoint one request (see [`Endpoint::ewma_cost`]), and its answer replaces the stale
///   estimate instead of being blended into it. A slow endpoint stays slow (its fresh sample is
///   high again) and gets one probe per `STALE_AFTER`; an equal one is back at once.
///
/// Why not tower's type itself: `tower::load::PeakEwma` wraps a `Service` and its estimate is
/// only readable through tower's `p2c::Balance`, which cannot weight endpoints, hash requests,
/// skip ejected endpoints or steer a retry away from the endpoint that just failed. So the
/// balancer here is our own and keeps the estimator next to the endpoint.
#[derive(Debug)]
pub struct PeakEwma {
    estimate_ns: f64,
    updated: Instant,
    tau_ns: f64,
    /// Whether a sample has arrived since the estimate was the default.
    measured: bool,
}

/// Default decay time of the estimate (tower's default for Linkerd is 10s).
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
/// Estimate of an endpoint that has not answered yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Least weight of a sample below the estimate. tower's weight, `1 - exp(-elapsed/tau)`, is
/// 1e-4 for samples a millisecond apart at a 10 s decay, so one slow answer (a scheduling
/// hiccup) would steer traffic away from an equal endpoint for seconds; with this floor a
/// peak is forgotten after about ten normal answers, while an endpoint whose answers are all
/// slow keeps its high estimate.
pub const MIN_SAMPLE_WEIGHT: f64 = 0.25;
/// An estimate without a sample for this long no longer describes the endpoint. Short enough
/// that an equal endpoint hit by one slow answer is back within a fraction of a second (the
/// ±25% share over 1,000 requests in the balancing test), long enough that a slow endpoint
/// gets only a few probes per second.
pub const STALE_AFTER: Duration = Duration::from_millis(10);

impl PeakEwma {
    pub fn new(default_rtt: Duration, decay: Duration, now: Instant) -> Self {
        PeakEwma {
            estimate_ns: default_rtt.as_nanos() as f64,
            updated: now,
            tau_ns: decay.as_nanos().max(1) as f64,
            measured: false,
        }
    }

    fn decay_factor(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_nanos() as f64;
        (-elapsed / self.tau_ns).exp()
    }

    /// Adds a latency sample.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        // The blend weight of a sample below the estimate is at least MIN_SAMPLE_WEIGHT.
        let decay = self.decay_factor(now).min(1.0 - MIN_SAMPLE_WEIGHT);
        self.estimate_ns = if self.is_stale(now) || rtt > self.estimate_ns * decay {
            rtt
        } else {
            self.estimate_ns * decay + rtt * (1.0 - decay)
        };
        self.updated = now;
        self.measured = true;
    }

    /// No sample yet, or none for [`STALE_AFTER`].
    pub fn is_stale(&self, now: Instant) -> bool {
        !self.measured || now.saturating_duration_since(self.updated) >= STALE_AFTER
    }

    /// The current estimate in nanoseconds.
    pub fn estimate(&self, now: Instant) -> f64 {
        self.estimate_ns * self.decay_factor(now)
    }
}

/// Identity of an endpoint within a destination: `address:port`.
pub type EndpointKey = String;

/// One endpoint and its live state, shared by every request to it. Its breaker is reached only
/// through [`Endpoint::breaker`], which keeps the lock-free [`Endpoint::is_closed`] in step.
#[derive(Debug)]
pub struct Endpoint {
    key: EndpointKey,
    /// `address:port` (IPv6 in brackets) as a URI authority, parsed once; `None` when the
    /// address is not a valid host (requests to it then fail as bad requests).
    authority: Option<http::uri::Authority>,
    address: String,
    port: u16,
    weight: u32,
    zone: String,
    in_flight: AtomicU32,
    ewma: Mutex<PeakEwma>,
    breaker: Mutex<Breaker>,
    /// Whether the breaker is closed, readable without its lock: the usual request finds every
    /// breaker closed and takes no breaker lock to choose an endpoint.
    closed: AtomicBool,
    /// Smooth weighted round-robin's running weight.
    rr_current: AtomicI64,
    /// This endpoint's metric handles (its destination is fixed: endpoints are per destination).
    metrics: EndpointMetrics,
    /// Connections to this endpoint.
    pool: Pool,
}

impl Endpoint {
    pub fn new(
        address: String,
        port: u16,
        weight: u32,
        zone: String,
        breaker: BreakerConfig,
    ) -> Self {
        let now = Instant::now();
        let host = if address.contains(':') {
            format!("[{address}]")
        } else {
            address.clone()
        };
        Endpoint {
            key: format!("{address}:{port}"),
            authority: http::uri::Authority::try_from(format!("{host}:{port}")).ok(),
            address,
            port,
            weight: weight.max(1),
            zone,
            in_flight: AtomicU32::new(0),
            ewma: Mutex::new(PeakEwma::new(DEFAULT_RTT, DEFAULT_DECAY, now)),
            breaker: Mutex::new(Breaker::new(breaker, now)),
            closed: AtomicBool::new(true),
            rr_current: AtomicI64::new(0),
            metrics: Default::default(),
            pool: Default::default(),
        }
    }

    /// `address:port`.
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn weight(&self) -> u32 {
        self.weight
    }

    pub fn zone(&self) -> &str {
        &self.zone
    }

    pub fn authority(&self) -> Option<&http::uri::Authority> {
        self.authority.as_ref()
    }

    pub fn metrics(&self) -> &EndpointMetrics {
        &self.metrics
    }

    /// Whether this endpoint can stand for discovery's `address:port` with `weight` under
    /// breaker settings `breaker` (then it keeps its load, breaker and connections).
    pub fn is_same(&self, key: &str, weight: u32, breaker: &BreakerConfig) -> bool {
        self.key == key && self.weight == weight.max(1) && self.breaker(|b| b.config() == breaker)
    }

    /// Runs `f` on the breaker under its lock (a poisoned lock is taken over: the breaker's
    /// state is plain counters, valid after any panic).
    pub fn breaker<R>(&self, f: impl FnOnce(&mut Breaker) -> R) -> R {
        let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        let result = f(&mut breaker);
        self.closed.store(!breaker.is_ejected(), Ordering::Relaxed);
        result
    }

    /// Whether the breaker is closed (traffic flows without a probe), without its lock.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Adds the weight to smooth weighted round-robin's running weight; returns the new value.
    pub fn rr_advance(&self) -> i64 {
        let w = i64::from(self.weight);
        self.rr_current.fetch_add(w, Ordering::Relaxed) + w
    }

    /// Charges the chosen endpoint the round's total weight.
    pub fn rr_charge(&self, total: i64) {
        self.rr_current.fetch_sub(total, Ordering::Relaxed);
    }

    /// Peak-EWMA cost: latency estimate times (in-flight + 1), divided by weight; zero for an
    /// idle endpoint whose estimate is stale (see [`PeakEwma`]), so that it gets the one
    /// request that measures it again.
    pub fn ewma_cost(&self, now: Instant) -> f64 {
        let in_flight = self.in_flight();
        let Ok(ewma) = self.ewma.lock() else {
            return 0.0;
        };
        if in_flight == 0 && ewma.is_stale(now) {
            return 0.0;
        }
        ewma.estimate(now) * f64::from(in_flight + 1) / f64::from(self.weight)
    }

    pub fn observe_rtt(&self, rtt: Duration) {
        if let Ok(mut e) = self.ewma.lock() {
            e.observe(rtt, Instant::now());
        }
    }

    /// Counts a request in flight until the guard drops.
    pub fn track(self: &std::sync::Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Sends `req` on a pooled connection to this endpoint.
    pub async fn send(
        &self,
        req: http::Request<BoxBody>,
        use_h2: bool,
        cfg: &PoolConfig,
    ) -> Result<http::Response<BoxBody>, SendError> {
        self.pool
            .send(&self.address, self.port, req, use_h2, cfg)
            .await
    }
}

/// An in-flight request on an endpoint.
#[derive(Debug)]
pub struct InFlight(std::sync::Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn peak_is_taken_at_once_and_decays() {
        let mut e = PeakEwma::new(
            Duration::from_millis(10),
            Duration::from_secs(10),
            Instant::now(),
        );
        e.observe(Duration::from_millis(100), Instant::now());
        assert!((e.estimate(Instant::now()) - 100e6).abs() < 1.0);
        tokio::time::advance(Duration::from_secs(10)).await;
        let decayed = e.estimate(Instant::now());
        assert!(decayed < 100e6 * 0.4 && decayed > 100e6 * 0.3, "{decayed}");
        // A low sample right after the peak pulls it down smoothly, not at once.
        e.observe(Duration::from_millis(100), Instant::now());
        e.observe(Duration::from_millis(1), Instant::now());
        assert!(e.estimate(Instant::now()) > 50e6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lower_sample_is_blended_with_one_decay() {
        let mut e = PeakEwma::new(DEFAULT_RTT, Duration::from_secs(10), Instant::now());
        e.observe(Duration::from_millis(100), Instant::now());
        tokio::time::advance(Duration::from_millis(5)).await;
        e.observe(Duration::from_millis(20), Instant::now());
        // 5 ms at tau 10 s: d = exp(-0.0005), floored at 1 - MIN_SAMPLE_WEIGHT.
        let d = (-0.0005f64).exp().min(1.0 - MIN_SAMPLE_WEIGHT);
        let want = 100e6 * d + 20e6 * (1.0 - d);
        let got = e.estimate(Instant::now());
        assert!((got - want).abs() < 1.0, "{got} != {want}");
        // Decaying the estimate a second time (the old defect) would give less.
        assert!(got > 100e6 * d * d + 20e6 * (1.0 - d) + 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_default_and_stale_estimates_are_replaced_by_a_sample() {
        let mut e = PeakEwma::new(DEFAULT_RTT, DEFAULT_DECAY, Instant::now());
        assert!(e.is_stale(Instant::now()), "no sample yet");
        e.observe(Duration::from_millis(1), Instant::now());
        assert!(
            (e.estimate(Instant::now()) - 1e6).abs() < 1.0,
            "the prior is replaced"
        );
        assert!(!e.is_stale(Instant::now()));
        e.observe(Duration::from_millis(40), Instant::now());
        tokio::time::advance(STALE_AFTER).await;
        assert!(e.is_stale(Instant::now()));
        e.observe(Duration::from_millis(2), Instant::now());
        assert!(
            (e.estimate(Instant::now()) - 2e6).abs() < 1.0,
            "a stale peak is replaced"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_endpoint_with_a_stale_estimate_costs_nothing() {
        let ep = Arc::new(Endpoint::new(
            "127.0.0.1".into(),
            80,
            1,
            String::new(),
            BreakerConfig::default(),
        ));
        assert_eq!(ep.ewma_cost(Instant::now()), 0.0, "never measured");
        let busy = ep.track();
        assert!(
            ep.ewma_cost(Instant::now()) > 0.0,
            "its one request is in flight"
        );
        drop(busy);
        ep.observe_rtt(Duration::from_millis(3));
        assert!(ep.ewma_cost(Instant::now()) > 0.0, "fresh");
        tokio::time::advance(STALE_AFTER).await;
        assert_eq!(ep.ewma_cost(Instant::now()), 0.0, "stale again");
    }
}
