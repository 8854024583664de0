//! The per-endpoint circuit breaker: a small, synchronous state machine fed with the outcome of
//! every request, with time passed in (tokio's clock, so tests run on paused time).
//!
//! States: *closed* (traffic flows), *open* (ejected until a deadline), *half-open* (up to
//! `half_open_probes` probe requests; that many successes close it, one failure re-opens it
//! with a longer ejection). An endpoint trips on `consecutive_failures` failures in a row, or
//! when the failure ratio over `failure_window` reaches `failure_ratio` once the window holds
//! `minimum_requests`. Ejection time doubles on each repeated ejection up to
//! `max_ejection_time`, and resets once the endpoint has stayed closed for `max_ejection_time`.
//!
//! Whether a tripped endpoint may actually be ejected (max ejection percent) is decided by the
//! owner of the endpoint set, which sees all endpoints: see [`Breaker::trips`] and
//! [`Breaker::eject`].

use std::time::Duration;

use sagamesh_api::backoff::{Backoff, Jitter};
use tokio::time::Instant;

/// Breaker settings with defaults resolved (see `spec.circuitBreaker`).
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub failure_ratio: Option<f64>,
    pub failure_window: Duration,
    pub minimum_requests: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            failure_ratio: None,
            failure_window: Duration::from_secs(10),
            minimum_requests: 20,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
            half_open_probes: 1,
        }
    }
}

/// Externally visible state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// The value of the `breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// What a request may do with this endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Normal traffic.
    Yes,
    /// A half-open probe: its outcome decides the breaker.
    Probe,
    No,
}

#[derive(Clone, Copy, Debug)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

const BUCKETS: usize = 10;

/// Failure counts over a sliding window, in `BUCKETS` time buckets.
#[derive(Clone, Debug)]
struct Window {
    bucket_len: Duration,
    /// (bucket start, requests, failures)
    buckets: [(Option<Instant>, u32, u32); BUCKETS],
}

impl Window {
    fn new(window: Duration) -> Self {
        Window {
            bucket_len: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            buckets: [(None, 0, 0); BUCKETS],
        }
    }

    fn slot(&self, now: Instant, origin: Instant) -> (usize, Instant) {
        let len = self.bucket_len.as_nanos();
        let n = now.saturating_duration_since(origin).as_nanos() / len;
        // n * len <= the elapsed nanoseconds, which fit u64 for 584 years.
        let start = origin + Duration::from_nanos(u64::try_from(n * len).unwrap_or(u64::MAX));
        ((n % BUCKETS as u128) as usize, start)
    }

    fn record(&mut self, now: Instant, origin: Instant, failed: bool) {
        let (i, start) = self.slot(now, origin);
        let b = &mut self.buckets[i];
        if b.0 != Some(start) {
            *b = (Some(start), 0, 0);
        }
        b.1 += 1;
        if failed {
            b.2 += 1;
        }
    }

    fn totals(&self, now: Instant) -> (u32, u32) {
        let span = self.bucket_len * BUCKETS as u32;
        self.buckets
            .iter()
            .filter(|b| b.0.is_some_and(|s| now.saturating_duration_since(s) < span))
            .fold((0, 0), |(r, f), b| (r + b.1, f + b.2))
    }

    fn clear(&mut self) {
        self.buckets = [(None, 0, 0); BUCKETS];
    }
}

/// One endpoint's breaker.
#[derive(Clone, Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: State,
    consecutive: u32,
    window: Window,
    origin: Instant,
    /// Ejections in a row; grows the ejection time.
    ejections: u32,
    closed_at: Instant,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig, now: Instant) -> Self {
        Breaker {
            window: Window::new(cfg.failure_window),
            cfg,
            state: State::Closed,
            consecutive: 0,
            origin: now,
            ejections: 0,
            closed_at: now,
        }
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.cfg
    }

    /// The state as of `now` (an open breaker whose time is over reads as half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state {
            State::Closed => BreakerState::Closed,
            State::Open { until } if now >= until => BreakerState::HalfOpen,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether the endpoint counts as ejected for the max-ejection-percent rule.
    pub fn is_ejected(&self) -> bool {
        !matches!(self.state, State::Closed)
    }

    /// Whether a request could be sent now, without taking a probe slot.
    pub fn available(&self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { until } => now >= until,
            State::HalfOpen {
                in_flight,
                successes,
            } => in_flight + successes < self.cfg.half_open_probes,
        }
    }

    /// Takes the right to send a request now.
    pub fn admit(&mut self, now: Instant) -> Admit {
        if let State::Open { until } = self.state
            && now >= until
        {
            self.state = State::HalfOpen {
                in_flight: 0,
                successes: 0,
            };
        }
        match &mut self.state {
            State::Closed => Admit::Yes,
            State::Open { .. } => Admit::No,
            State::HalfOpen {
                in_flight,
                successes,
            } => {
                if *in_flight + *successes < self.cfg.half_open_probes {
                    *in_flight += 1;
                    Admit::Probe
                } else {
                    Admit::No
                }
            }
        }
    }

    /// Gives back a probe slot whose request ended without an outcome (cancelled).
    pub fn release_probe(&mut self) {
        if let State::HalfOpen { in_flight, .. } = &mut self.state {
            *in_flight = in_flight.saturating_sub(1);
        }
    }

    /// Records an outcome. Returns `true` when the endpoint should now be ejected: the caller
    /// then checks the max-ejection-percent rule and calls [`Breaker::eject`] (or not).
    /// A failed probe always re-opens the breaker (it is already counted as ejected) and
    /// returns `false`.
    pub fn record(&mut self, success: bool, probe: bool, now: Instant) -> bool {
        match &mut self.state {
            State::HalfOpen {
                in_flight,
                successes,
            } if probe => {
                *in_flight = in_flight.saturating_sub(1);
                if success {
                    *successes += 1;
                    if *successes >= self.cfg.half_open_probes {
                        self.close(now);
                    }
                } else {
                    self.open(now);
                }
                false
            }
            State::Closed => {
                if self.ejections > 0
                    && now.saturating_duration_since(self.closed_at) >= self.cfg.max_ejection_time
                {
                    self.ejections = 0;
                }
                self.window.record(now, self.origin, !success);
                if success {
                    self.consecutive = 0;
                    false
                } else {
                    self.consecutive += 1;
                    self.trips(now)
                }
            }
            // Late outcomes of requests sent before an ejection change nothing.
            _ => false,
        }
    }

    /// Whether the failure criteria are met now (closed breakers only).
    pub fn trips(&self, now: Instant) -> bool {
        if !matches!(self.state, State::Closed) {
            return false;
        }
        if self.consecutive >= self.cfg.consecutive_failures {
            return true;
        }
        if let Some(ratio) = self.cfg.failure_ratio {
            let (requests, failures) = self.window.totals(now);
            if requests >= self.cfg.minimum_requests
                && f64::from(failures) >= ratio * f64::from(requests)
            {
                return true;
            }
        }
        false
    }

    /// Ejects the endpoint; returns how long for.
    pub fn eject(&mut self, now: Instant) -> Duration {
        self.open(now)
    }

    fn open(&mut self, now: Instant) -> Duration {
        // Each ejection in a row lasts twice the one before, without jitter (Envoy's rule).
        let time = Backoff::new(
            self.cfg.base_ejection_time,
            self.cfg.max_ejection_time.max(self.cfg.base_ejection_time),
            Jitter::None,
        )
        .delay(self.ejections.saturating_add(1));
        self.ejections = self.ejections.saturating_add(1);
        self.state = State::Open { until: now + time };
        time
    }

    fn close(&mut self, now: Instant) {
        self.state = State::Closed;
        self.consecutive = 0;
        self.window.clear();
        self.closed_at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(1),
            max_ejection_time: Duration::from_secs(5),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_trip_and_success_resets() {
        let now = Instant::now();
        let mut b = Breaker::new(cfg(), now);
        assert!(!b.record(false, false, now));
        assert!(!b.record(false, false, now));
        assert!(!b.record(true, false, now), "a success resets the count");
        assert!(!b.record(false, false, now));
        assert!(!b.record(false, false, now));
        assert!(b.record(false, false, now), "third in a row trips");
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_half_open_and_growing_time() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        assert_eq!(b.eject(t0), Duration::from_secs(1));
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(b.admit(t0), Admit::No);
        tokio::time::advance(Duration::from_secs(1)).await;
        let t1 = Instant::now();
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert_eq!(b.admit(t1), Admit::Probe);
        assert_eq!(b.admit(t1), Admit::No, "one probe at a time");
        // The probe fails: open again, twice as long.
        assert!(!b.record(false, true, t1));
        assert_eq!(b.state(t1), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert_eq!(b.admit(Instant::now()), Admit::No);
        tokio::time::advance(Duration::from_millis(1)).await;
        let t2 = Instant::now();
        assert_eq!(b.admit(t2), Admit::Probe);
        assert!(!b.record(true, true, t2));
        assert_eq!(b.state(t2), BreakerState::Closed);
        assert_eq!(b.admit(t2), Admit::Yes);
        // Ejection time is capped at max.
        for _ in 0..10 {
            b.eject(t2);
        }
        assert_eq!(b.eject(t2), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_probe_frees_its_slot() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        b.eject(t0);
        tokio::time::advance(Duration::from_secs(2)).await;
        let t1 = Instant::now();
        assert_eq!(b.admit(t1), Admit::Probe);
        b.release_probe();
        assert_eq!(b.admit(t1), Admit::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_ratio_needs_minimum_requests_and_slides() {
        let c = BreakerConfig {
            consecutive_failures: 1000,
            failure_ratio: Some(0.5),
            minimum_requests: 10,
            failure_window: Duration::from_secs(10),
            ..cfg()
        };
        let t0 = Instant::now();
        let mut b = Breaker::new(c, t0);
        // Alternate: never 1000 in a row, but 50% failures.
        let mut tripped = false;
        for i in 0..9 {
            tripped |= b.record(i % 2 == 0, false, Instant::now());
        }
        assert!(!tripped, "below minimum requests");
        // Old requests slide out of the window.
        tokio::time::advance(Duration::from_secs(11)).await;
        for i in 0..9 {
            tripped |= b.record(i % 2 == 0, false, Instant::now());
        }
        assert!(!tripped, "the first nine have left the window");
        assert!(
            b.record(false, false, Instant::now()),
            "10 requests, 5 failures"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failure_ratio_still_counts_after_two_to_the_32_buckets() {
        // 1 ms buckets: bucket number 2^32 is reached after 49.7 days of uptime.
        let c = BreakerConfig {
            consecutive_failures: 1000,
            failure_ratio: Some(0.5),
            minimum_requests: 10,
            failure_window: Duration::from_millis(10),
            ..cfg()
        };
        let mut b = Breaker::new(c, Instant::now());
        tokio::time::advance(Duration::from_secs(50 * 24 * 3600)).await;
        let mut tripped = false;
        for _ in 0..10 {
            tripped |= b.record(false, false, Instant::now());
        }
        assert!(tripped, "10 failures in one bucket trip the ratio");
    }
}
