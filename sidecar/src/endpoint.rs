//! One endpoint of a destination: its address, weight, load (in-flight requests, peak-EWMA
//! latency) and circuit breaker.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::breaker::{Breaker, BreakerConfig};

/// Peak-EWMA latency estimate, as in tower's `load::PeakEwma` (same math: a new sample above
/// the estimate replaces it at once, one below decays into it with `exp(-elapsed/tau)`, and the
/// estimate decays towards zero while no sample arrives, so a slow endpoint is tried again
/// eventually).
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
}

/// Default decay time of the estimate (tower's default for Linkerd is 10s).
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
/// Estimate of an endpoint that has not answered yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

impl PeakEwma {
    pub fn new(default_rtt: Duration, decay: Duration, now: Instant) -> Self {
        PeakEwma {
            estimate_ns: default_rtt.as_nanos() as f64,
            updated: now,
            tau_ns: decay.as_nanos().max(1) as f64,
        }
    }

    fn decayed(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_nanos() as f64;
        self.estimate_ns * (-elapsed / self.tau_ns).exp()
    }

    /// Adds a latency sample.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let current = self.decayed(now);
        self.estimate_ns = if rtt > current {
            rtt
        } else {
            let elapsed = now.saturating_duration_since(self.updated).as_nanos() as f64;
            let decay = (-elapsed / self.tau_ns).exp();
            current * decay + rtt * (1.0 - decay)
        };
        self.updated = now;
    }

    /// Replaces the estimate (a new endpoint starts at its peers' average, see the client).
    pub fn seed(&mut self, estimate_ns: f64, now: Instant) {
        self.estimate_ns = estimate_ns;
        self.updated = now;
    }

    /// The current estimate in nanoseconds.
    pub fn estimate(&self, now: Instant) -> f64 {
        self.decayed(now)
    }
}

/// Identity of an endpoint within a destination: `address:port`.
pub type EndpointKey = String;

/// One endpoint and its live state, shared by every request to it.
#[derive(Debug)]
pub struct Endpoint {
    pub key: EndpointKey,
    /// `address:port` (IPv6 in brackets) as a URI authority, parsed once; `None` when the
    /// address is not a valid host (requests to it then fail as bad requests).
    pub authority: Option<http::uri::Authority>,
    pub address: String,
    pub port: u16,
    pub weight: u32,
    pub zone: String,
    pub in_flight: AtomicU32,
    pub ewma: Mutex<PeakEwma>,
    pub breaker: Mutex<Breaker>,
    /// Smooth weighted round-robin's running weight.
    pub rr_current: AtomicI64,
    /// This endpoint's metric handles (its destination is fixed: endpoints are per destination).
    pub metrics: crate::metrics::EndpointMetrics,
    /// Connections to this endpoint.
    pub pool: crate::pool::Pool,
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
            rr_current: AtomicI64::new(0),
            metrics: Default::default(),
            pool: Default::default(),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Peak-EWMA cost: latency estimate times (in-flight + 1), divided by weight.
    pub fn ewma_cost(&self, now: Instant) -> f64 {
        let est = self.ewma.lock().map(|e| e.estimate(now)).unwrap_or(0.0);
        est * f64::from(self.in_flight() + 1) / f64::from(self.weight)
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
        // A low sample pulls it down smoothly, not at once.
        e.observe(Duration::from_millis(1), Instant::now());
        assert!(e.estimate(Instant::now()) > 1e6);
    }
}
