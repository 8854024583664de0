//! The endpoints of one destination as of one discovery update: each with its readiness and
//! port name, the balancer over them, the candidates per service port (computed once per
//! update, not per request), and the circuit-breaking rules that span endpoints — which
//! breakers let a request through, and the max-ejection-percent rule when one trips.

use std::sync::Arc;

use http::HeaderMap;
use sagamesh_discovery::proto as pb;
use tokio::time::Instant;

use crate::balance::Balancer;
use crate::breaker::{Admit, BreakerConfig, BreakerState};
use crate::endpoint::Endpoint;
use crate::metrics::{DestinationMetrics, Metrics};
use crate::policy::ServicePolicy;
use crate::retry::Outcome;

/// One endpoint as discovery last described it.
pub(crate) struct Entry {
    endpoint: Arc<Endpoint>,
    ready: bool,
    /// The service port it serves; empty for "the service's first port".
    port_name: String,
}

impl AsRef<Endpoint> for Entry {
    fn as_ref(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// The endpoint chosen for one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pick {
    pub(crate) index: usize,
    /// Whether the attempt is a half-open breaker's probe.
    pub(crate) probe: bool,
}

/// Where an endpoint's metrics go: the client's registry, under its destination's label.
#[derive(Clone, Copy)]
pub(crate) struct MetricLabels<'a> {
    pub(crate) metrics: &'a Metrics,
    pub(crate) destination: &'a str,
}

impl MetricLabels<'_> {
    fn breaker_gauge(&self, ep: &Endpoint, state: BreakerState) {
        ep.metrics()
            .breaker_state(self.metrics, self.destination, ep.key())
            .set(state.gauge());
    }
}

pub(crate) struct EndpointSet {
    entries: Vec<Entry>,
    balancer: Balancer,
    breaker: BreakerConfig,
    /// Per service port (in the snapshot's order): the ready endpoints serving it.
    candidates: Vec<Vec<usize>>,
}

impl EndpointSet {
    /// The endpoints of `snapshot`; those also in `previous` (same address, port, weight and
    /// breaker settings) keep their load, breaker and connections.
    pub(crate) fn build(
        snapshot: Option<&pb::Snapshot>,
        policy: &ServicePolicy,
        previous: Option<&EndpointSet>,
    ) -> Self {
        let mut entries: Vec<Entry> = Vec::new();
        for e in snapshot.iter().flat_map(|s| s.endpoints.iter()) {
            let Ok(port) = u16::try_from(e.port) else {
                continue;
            };
            if port == 0 || e.address.is_empty() {
                continue;
            }
            let weight = if e.weight == 0 { 1 } else { e.weight };
            let key = format!("{}:{port}", e.address);
            if entries.iter().any(|x| x.endpoint.key() == key) {
                continue;
            }
            let reused = previous.and_then(|p| {
                p.entries
                    .iter()
                    .find(|x| x.endpoint.is_same(&key, weight, &policy.breaker))
            });
            let endpoint = match reused {
                Some(x) => x.endpoint.clone(),
                None => Arc::new(Endpoint::new(
                    e.address.clone(),
                    port,
                    weight,
                    e.zone.clone(),
                    policy.breaker.clone(),
                )),
            };
            entries.push(Entry {
                endpoint,
                ready: e.ready,
                port_name: e.port_name.clone(),
            });
        }
        let ports = snapshot.map(|s| s.ports.as_slice()).unwrap_or_default();
        let candidates = ports
            .iter()
            .enumerate()
            .map(|(p, port)| {
                (0..entries.len())
                    .filter(|i| {
                        let e = &entries[*i];
                        e.ready && (e.port_name == port.name || (e.port_name.is_empty() && p == 0))
                    })
                    .collect()
            })
            .collect();
        // A new endpoint needs no seeded estimate: until its first answer its estimate is
        // stale, so the balancer sends it a request at once (see `endpoint::PeakEwma`).
        let balancer = Balancer::new(policy.balance.clone(), &entries);
        EndpointSet {
            entries,
            balancer,
            breaker: policy.breaker.clone(),
            candidates,
        }
    }

    pub(crate) fn endpoint(&self, pick: Pick) -> &Arc<Endpoint> {
        &self.entries[pick.index].endpoint
    }

    /// The ready endpoints serving the snapshot's `port_index`th port.
    pub(crate) fn candidates(&self, port_index: usize) -> &[usize] {
        self.candidates
            .get(port_index)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Stops the metric series of endpoints that are not in `next`.
    pub(crate) fn retire_missing_from(&self, next: &EndpointSet, metrics: &DestinationMetrics) {
        for gone in self
            .entries
            .iter()
            .map(|e| &e.endpoint)
            .filter(|e| !next.entries.iter().any(|n| n.endpoint.key() == e.key()))
        {
            gone.metrics().retire();
            metrics.remove_endpoint(gone.key());
        }
    }

    /// Chooses among `candidates` an endpoint whose breaker lets a request through,
    /// preferring ones this request has not `tried`; `None` when every breaker is open.
    pub(crate) fn pick(
        &self,
        candidates: &[usize],
        tried: &[usize],
        headers: &HeaderMap,
        labels: MetricLabels<'_>,
    ) -> Option<Pick> {
        // The usual case, a first try with every breaker closed, takes no breaker lock and
        // borrows the candidates.
        if tried.is_empty()
            && candidates
                .iter()
                .all(|i| self.entries[*i].endpoint.is_closed())
        {
            let index = self.balancer.pick(&self.entries, candidates, headers)?;
            if self.entries[index].endpoint.is_closed() {
                return Some(Pick {
                    index,
                    probe: false,
                });
            }
        }
        let now = Instant::now();
        let available = |i: &usize| self.entries[*i].endpoint.breaker(|b| b.available(now));
        let mut pool: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|i| !tried.contains(i) && available(i))
            .collect();
        if pool.is_empty() {
            pool = candidates.iter().copied().filter(available).collect();
        }
        while !pool.is_empty() {
            let index = self.balancer.pick(&self.entries, &pool, headers)?;
            let ep = &self.entries[index].endpoint;
            match ep.breaker(|b| b.admit(now)) {
                Admit::Yes => {
                    return Some(Pick {
                        index,
                        probe: false,
                    });
                }
                Admit::Probe => {
                    labels.breaker_gauge(ep, BreakerState::HalfOpen);
                    return Some(Pick { index, probe: true });
                }
                Admit::No => pool.retain(|x| *x != index),
            }
        }
        None
    }

    /// Feeds an attempt's outcome to its endpoint's breaker, and ejects the endpoint when the
    /// breaker trips and the max-ejection-percent rule allows it (always when every other
    /// endpoint is failing too: ejecting none would send all traffic to a failing one anyway).
    pub(crate) fn record(&self, pick: Pick, outcome: Outcome, labels: MetricLabels<'_>) {
        let now = Instant::now();
        let ep = &self.entries[pick.index].endpoint;
        let failure = outcome.is_failure();
        ep.metrics()
            .attempt(labels.metrics, labels.destination, ep.key(), failure);
        let (tripped, mut state) = ep.breaker(|b| {
            let tripped = b.record(!failure, pick.probe, now);
            (tripped, b.state(now))
        });
        if tripped && self.may_eject(pick.index, now) {
            let time = ep.breaker(|b| {
                let time = b.eject(now);
                state = b.state(now);
                time
            });
            ep.metrics()
                .ejected(labels.metrics, labels.destination, ep.key());
            tracing::warn!(destination = labels.destination, endpoint = %ep.key(), ejection = ?time, "endpoint ejected");
        }
        labels.breaker_gauge(ep, state);
    }

    /// The max-ejection-percent rule for ejecting `index`.
    fn may_eject(&self, index: usize, now: Instant) -> bool {
        let total = self.entries.len();
        let mut ejected = 0;
        let mut others_failing = true;
        for (j, other) in self.entries.iter().enumerate() {
            other.endpoint.breaker(|b| {
                if b.is_ejected() {
                    ejected += 1;
                } else if j != index && !b.trips(now) {
                    others_failing = false;
                }
            });
        }
        let max_pct = self.breaker.max_ejection_percent as usize;
        (ejected + 1) * 100 <= max_pct * total || others_failing
    }

    /// The endpoints as `/debug/discovery`-style JSON.
    pub(crate) fn to_json(&self) -> Vec<serde_json::Value> {
        let now = Instant::now();
        self.entries
            .iter()
            .map(|e| {
                let ep = &e.endpoint;
                serde_json::json!({
                    "endpoint": ep.key(), "weight": ep.weight(), "zone": ep.zone(),
                    "ready": e.ready, "portName": e.port_name, "inFlight": ep.in_flight(),
                    "breaker": ep.breaker(|b| b.state(now)),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn snapshot(endpoints: &[(&str, bool, &str)], ports: &[&str]) -> pb::Snapshot {
        pb::Snapshot {
            endpoints: endpoints
                .iter()
                .map(|(address, ready, port_name)| pb::Endpoint {
                    address: address.to_string(),
                    port: 80,
                    weight: 1,
                    ready: *ready,
                    port_name: port_name.to_string(),
                    ..Default::default()
                })
                .collect(),
            ports: ports
                .iter()
                .map(|name| pb::Port {
                    name: name.to_string(),
                    port: 80,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn policy(consecutive_failures: u32, max_ejection_percent: u32) -> ServicePolicy {
        let mut p = ServicePolicy::from_proto(None);
        p.breaker.consecutive_failures = consecutive_failures;
        p.breaker.max_ejection_percent = max_ejection_percent;
        p.breaker.base_ejection_time = Duration::from_secs(30);
        p
    }

    #[test]
    fn candidates_are_the_ready_endpoints_of_each_port() {
        let s = snapshot(
            &[
                ("10.0.0.1", true, ""),
                ("10.0.0.2", false, ""),
                ("10.0.0.3", true, "admin"),
                ("10.0.0.4", true, "http"),
                ("10.0.0.4", true, "http"),
            ],
            &["http", "admin"],
        );
        let set = EndpointSet::build(Some(&s), &policy(5, 50), None);
        assert_eq!(set.entries.len(), 4, "the duplicate is dropped");
        // An endpoint without a port name serves the first port.
        assert_eq!(set.candidates(0), &[0, 3]);
        assert_eq!(set.candidates(1), &[2]);
        assert!(set.candidates(2).is_empty());
    }

    #[test]
    fn endpoints_that_stay_keep_their_state_and_those_that_go_are_retired() {
        let p = policy(1, 100);
        let metrics = Metrics::new();
        let labels = MetricLabels {
            metrics: &metrics,
            destination: "web.default",
        };
        let first = EndpointSet::build(
            Some(&snapshot(
                &[("10.0.0.1", true, ""), ("10.0.0.2", true, "")],
                &["http"],
            )),
            &p,
            None,
        );
        let pick = Pick {
            index: 0,
            probe: false,
        };
        let gone = Pick {
            index: 1,
            probe: false,
        };
        first.record(gone, Outcome::Response(http::StatusCode::OK), labels);
        assert!(metrics.encode().contains("10.0.0.2"));
        first.record(pick, Outcome::ConnectFailure, labels);
        assert!(!first.endpoint(pick).is_closed(), "ejected");

        let next = EndpointSet::build(
            Some(&snapshot(&[("10.0.0.1", true, "")], &["http"])),
            &p,
            Some(&first),
        );
        assert!(Arc::ptr_eq(next.endpoint(pick), first.endpoint(pick)));
        assert!(!next.endpoint(pick).is_closed(), "still ejected");
        let dest = DestinationMetrics::new(&metrics, "outbound", "web.default".into());
        first.retire_missing_from(&next, &dest);
        // A late outcome on the endpoint that left creates no series again.
        first.record(gone, Outcome::Response(http::StatusCode::OK), labels);
        let text = metrics.encode();
        assert!(!text.contains("10.0.0.2"), "{text}");
        assert!(text.contains("10.0.0.1"), "{text}");
    }

    #[test]
    fn max_ejection_percent_keeps_half_of_the_endpoints_unless_all_fail() {
        let metrics = Metrics::new();
        let labels = MetricLabels {
            metrics: &metrics,
            destination: "web.default",
        };
        let addresses: Vec<String> = (1..=4).map(|i| format!("10.0.0.{i}")).collect();
        let s = snapshot(
            &addresses
                .iter()
                .map(|a| (a.as_str(), true, ""))
                .collect::<Vec<_>>(),
            &["http"],
        );
        let set = EndpointSet::build(Some(&s), &policy(1, 50), None);
        let fail = |index| {
            set.record(
                Pick {
                    index,
                    probe: false,
                },
                Outcome::ConnectFailure,
                labels,
            )
        };
        let closed = || {
            (0..4)
                .filter(|i| {
                    set.endpoint(Pick {
                        index: *i,
                        probe: false,
                    })
                    .is_closed()
                })
                .count()
        };
        fail(0);
        fail(1);
        assert_eq!(closed(), 2, "two of four may be ejected");
        fail(2);
        assert_eq!(closed(), 2, "a third is not: 75% > 50%");
        // Every endpoint still in service is failing: ejecting spares nobody.
        fail(3);
        assert_eq!(closed(), 1, "beyond 50% when every other one is failing");
        fail(2);
        assert_eq!(closed(), 0);

        // With every breaker open nothing is picked: the request is answered as circuit-open.
        let all: Vec<usize> = (0..4).collect();
        assert_eq!(set.pick(&all, &[], &HeaderMap::new(), labels), None);
    }
}
