//! The discovery API between the control plane and the sidecars (gRPC, protobuf in
//! `proto/sagamesh/discovery/v1/discovery.proto`), and conversions between its messages and the
//! ServiceRegistration CRD types.
//!
//! The generated code is re-exported here: messages (`Update`, `Snapshot`, `Policy`, ...), the
//! server trait and wrapper (`discovery_server::{Discovery, DiscoveryServer}`) and the client
//! (`discovery_client::DiscoveryClient`).
//!
//! Conversions: [`snapshot_from_spec`] / [`policy_from_spec`] turn a spec into what the control
//! plane sends (fallible: duration strings are parsed), [`spec_from_snapshot`] goes back (used by
//! tests and debugging). Unset optional fields stay unset in both directions: defaults are
//! resolved by the sidecar, in one place. Enum values a newer peer may send and this code does not
//! know are read leniently: an unknown retry class is skipped, an unknown load-balancer policy or
//! protocol becomes the default, so one new field never makes a whole snapshot unusable.

use std::time::Duration;

use sagamesh_api::duration::{self, DurationError};
use sagamesh_api::service_registration as sr;

/// Generated protobuf messages and gRPC stubs of `sagamesh.discovery.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("sagamesh.discovery.v1");
}

pub use v1::*;

/// Why a spec or message could not be converted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConversionError {
    #[error("{field}: {source}")]
    Duration {
        field: &'static str,
        #[source]
        source: DurationError,
    },
    #[error("{field}: value {value} is out of range")]
    OutOfRange { field: &'static str, value: i64 },
}

// === durations ===

/// Parses a CRD duration string (`250ms`, `1m30s`) into a protobuf `Duration`.
pub fn duration_to_proto(
    field: &'static str,
    value: &str,
) -> Result<prost_types::Duration, ConversionError> {
    let d = duration::parse(value).map_err(|source| ConversionError::Duration { field, source })?;
    std_duration_to_proto(field, d)
}

/// Converts a `std::time::Duration` into a protobuf `Duration`.
pub fn std_duration_to_proto(
    field: &'static str,
    d: Duration,
) -> Result<prost_types::Duration, ConversionError> {
    let seconds = i64::try_from(d.as_secs()).map_err(|_| ConversionError::OutOfRange {
        field,
        value: i64::MAX,
    })?;
    Ok(prost_types::Duration {
        seconds,
        nanos: d.subsec_nanos() as i32,
    })
}

/// Converts a protobuf `Duration` into a `std::time::Duration`; negative durations are refused.
pub fn duration_from_proto(
    field: &'static str,
    d: &prost_types::Duration,
) -> Result<Duration, ConversionError> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(ConversionError::OutOfRange {
            field,
            value: d.seconds.min(i64::from(d.nanos)),
        });
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

fn opt_duration_to_proto(
    field: &'static str,
    value: &Option<String>,
) -> Result<Option<prost_types::Duration>, ConversionError> {
    value
        .as_deref()
        .map(|v| duration_to_proto(field, v))
        .transpose()
}

fn opt_duration_to_string(
    field: &'static str,
    value: &Option<prost_types::Duration>,
) -> Result<Option<String>, ConversionError> {
    value
        .as_ref()
        .map(|d| duration_from_proto(field, d).map(duration::format))
        .transpose()
}

fn port_to_proto(field: &'static str, port: i32) -> Result<u32, ConversionError> {
    u32::try_from(port).map_err(|_| ConversionError::OutOfRange {
        field,
        value: i64::from(port),
    })
}

fn port_from_proto(field: &'static str, port: u32) -> Result<i32, ConversionError> {
    i32::try_from(port).map_err(|_| ConversionError::OutOfRange {
        field,
        value: i64::from(port),
    })
}

// === enums ===

impl From<sr::Protocol> for Protocol {
    fn from(p: sr::Protocol) -> Self {
        match p {
            sr::Protocol::Http => Protocol::Http,
            sr::Protocol::Grpc => Protocol::Grpc,
        }
    }
}

impl From<Protocol> for sr::Protocol {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Unspecified | Protocol::Http => sr::Protocol::Http,
            Protocol::Grpc => sr::Protocol::Grpc,
        }
    }
}

impl From<sr::LoadBalancerPolicy> for LoadBalancerPolicy {
    fn from(p: sr::LoadBalancerPolicy) -> Self {
        match p {
            sr::LoadBalancerPolicy::RoundRobin => LoadBalancerPolicy::RoundRobin,
            sr::LoadBalancerPolicy::LeastRequest => LoadBalancerPolicy::LeastRequest,
            sr::LoadBalancerPolicy::PeakEwma => LoadBalancerPolicy::PeakEwma,
            sr::LoadBalancerPolicy::ConsistentHash => LoadBalancerPolicy::ConsistentHash,
        }
    }
}

impl From<LoadBalancerPolicy> for sr::LoadBalancerPolicy {
    fn from(p: LoadBalancerPolicy) -> Self {
        match p {
            LoadBalancerPolicy::Unspecified | LoadBalancerPolicy::PeakEwma => {
                sr::LoadBalancerPolicy::PeakEwma
            }
            LoadBalancerPolicy::RoundRobin => sr::LoadBalancerPolicy::RoundRobin,
            LoadBalancerPolicy::LeastRequest => sr::LoadBalancerPolicy::LeastRequest,
            LoadBalancerPolicy::ConsistentHash => sr::LoadBalancerPolicy::ConsistentHash,
        }
    }
}

impl From<sr::RetryOn> for RetryOn {
    fn from(r: sr::RetryOn) -> Self {
        match r {
            sr::RetryOn::ServerError => RetryOn::ServerError,
            sr::RetryOn::GatewayError => RetryOn::GatewayError,
            sr::RetryOn::ConnectFailure => RetryOn::ConnectFailure,
            sr::RetryOn::Reset => RetryOn::Reset,
        }
    }
}

/// The CRD retry class of a protobuf one; `None` for `UNSPECIFIED`.
pub fn retry_on_from_proto(r: RetryOn) -> Option<sr::RetryOn> {
    match r {
        RetryOn::Unspecified => None,
        RetryOn::ServerError => Some(sr::RetryOn::ServerError),
        RetryOn::GatewayError => Some(sr::RetryOn::GatewayError),
        RetryOn::ConnectFailure => Some(sr::RetryOn::ConnectFailure),
        RetryOn::Reset => Some(sr::RetryOn::Reset),
    }
}

// === policy messages ===

impl From<&sr::LoadBalancer> for LoadBalancer {
    fn from(lb: &sr::LoadBalancer) -> Self {
        LoadBalancer {
            policy: LoadBalancerPolicy::from(lb.policy) as i32,
            hash_header: lb.hash_header.clone(),
        }
    }
}

impl From<&LoadBalancer> for sr::LoadBalancer {
    fn from(lb: &LoadBalancer) -> Self {
        sr::LoadBalancer {
            policy: LoadBalancerPolicy::try_from(lb.policy)
                .unwrap_or_default()
                .into(),
            hash_header: lb.hash_header.clone(),
        }
    }
}

impl TryFrom<&sr::CircuitBreaker> for CircuitBreaker {
    type Error = ConversionError;
    fn try_from(cb: &sr::CircuitBreaker) -> Result<Self, Self::Error> {
        Ok(CircuitBreaker {
            consecutive_failures: cb.consecutive_failures,
            failure_ratio: cb.failure_ratio,
            failure_window: opt_duration_to_proto(
                "spec.circuitBreaker.failureWindow",
                &cb.failure_window,
            )?,
            minimum_requests: cb.minimum_requests,
            base_ejection_time: opt_duration_to_proto(
                "spec.circuitBreaker.baseEjectionTime",
                &cb.base_ejection_time,
            )?,
            max_ejection_time: opt_duration_to_proto(
                "spec.circuitBreaker.maxEjectionTime",
                &cb.max_ejection_time,
            )?,
            max_ejection_percent: cb.max_ejection_percent,
            half_open_probes: cb.half_open_probes,
        })
    }
}

impl TryFrom<&CircuitBreaker> for sr::CircuitBreaker {
    type Error = ConversionError;
    fn try_from(cb: &CircuitBreaker) -> Result<Self, Self::Error> {
        Ok(sr::CircuitBreaker {
            consecutive_failures: cb.consecutive_failures,
            failure_ratio: cb.failure_ratio,
            failure_window: opt_duration_to_string(
                "circuitBreaker.failureWindow",
                &cb.failure_window,
            )?,
            minimum_requests: cb.minimum_requests,
            base_ejection_time: opt_duration_to_string(
                "circuitBreaker.baseEjectionTime",
                &cb.base_ejection_time,
            )?,
            max_ejection_time: opt_duration_to_string(
                "circuitBreaker.maxEjectionTime",
                &cb.max_ejection_time,
            )?,
            max_ejection_percent: cb.max_ejection_percent,
            half_open_probes: cb.half_open_probes,
        })
    }
}

impl TryFrom<&sr::RetryPolicy> for RetryPolicy {
    type Error = ConversionError;
    fn try_from(r: &sr::RetryPolicy) -> Result<Self, Self::Error> {
        Ok(RetryPolicy {
            attempts: r.attempts,
            retry_on: r.retry_on.as_ref().map(|list| RetryOnList {
                values: list.iter().map(|c| RetryOn::from(*c) as i32).collect(),
            }),
            retriable_status_codes: r
                .retriable_status_codes
                .iter()
                .flatten()
                .map(|c| u32::from(*c))
                .collect(),
            per_try_timeout: opt_duration_to_proto("spec.retry.perTryTimeout", &r.per_try_timeout)?,
            backoff: r
                .backoff
                .as_ref()
                .map(|b| -> Result<_, ConversionError> {
                    Ok(Backoff {
                        base_interval: Some(duration_to_proto(
                            "spec.retry.backoff.baseInterval",
                            &b.base_interval,
                        )?),
                        max_interval: Some(duration_to_proto(
                            "spec.retry.backoff.maxInterval",
                            &b.max_interval,
                        )?),
                    })
                })
                .transpose()?,
            budget: r
                .budget
                .as_ref()
                .map(|b| -> Result<_, ConversionError> {
                    Ok(RetryBudget {
                        ratio: b.ratio,
                        min_retries_per_second: b.min_retries_per_second,
                        ttl: opt_duration_to_proto("spec.retry.budget.ttl", &b.ttl)?,
                    })
                })
                .transpose()?,
            retry_non_idempotent: r.retry_non_idempotent,
        })
    }
}

impl TryFrom<&RetryPolicy> for sr::RetryPolicy {
    type Error = ConversionError;
    fn try_from(r: &RetryPolicy) -> Result<Self, Self::Error> {
        let zero = prost_types::Duration::default();
        Ok(sr::RetryPolicy {
            attempts: r.attempts,
            retry_on: r.retry_on.as_ref().map(|list| {
                list.values
                    .iter()
                    .filter_map(|v| RetryOn::try_from(*v).ok().and_then(retry_on_from_proto))
                    .collect()
            }),
            retriable_status_codes: if r.retriable_status_codes.is_empty() {
                None
            } else {
                Some(
                    r.retriable_status_codes
                        .iter()
                        .map(|c| {
                            u16::try_from(*c).map_err(|_| ConversionError::OutOfRange {
                                field: "retry.retriableStatusCodes",
                                value: i64::from(*c),
                            })
                        })
                        .collect::<Result<_, _>>()?,
                )
            },
            per_try_timeout: opt_duration_to_string("retry.perTryTimeout", &r.per_try_timeout)?,
            backoff: r
                .backoff
                .as_ref()
                .map(|b| -> Result<_, ConversionError> {
                    Ok(sr::Backoff {
                        base_interval: duration::format(duration_from_proto(
                            "retry.backoff.baseInterval",
                            b.base_interval.as_ref().unwrap_or(&zero),
                        )?),
                        max_interval: duration::format(duration_from_proto(
                            "retry.backoff.maxInterval",
                            b.max_interval.as_ref().unwrap_or(&zero),
                        )?),
                    })
                })
                .transpose()?,
            budget: r
                .budget
                .as_ref()
                .map(|b| -> Result<_, ConversionError> {
                    Ok(sr::RetryBudget {
                        ratio: b.ratio,
                        min_retries_per_second: b.min_retries_per_second,
                        ttl: opt_duration_to_string("retry.budget.ttl", &b.ttl)?,
                    })
                })
                .transpose()?,
            retry_non_idempotent: r.retry_non_idempotent,
        })
    }
}

// === spec <-> snapshot ===

/// The policy part of a spec as the control plane sends it.
pub fn policy_from_spec(spec: &sr::ServiceRegistrationSpec) -> Result<Policy, ConversionError> {
    Ok(Policy {
        load_balancer: Some(LoadBalancer::from(&spec.load_balancer)),
        circuit_breaker: spec
            .circuit_breaker
            .as_ref()
            .map(CircuitBreaker::try_from)
            .transpose()?,
        retry: spec.retry.as_ref().map(RetryPolicy::try_from).transpose()?,
        timeout: opt_duration_to_proto("spec.timeout", &spec.timeout)?,
        max_in_flight_requests: spec.max_in_flight_requests,
    })
}

/// The ports of a spec as the control plane sends them.
pub fn ports_from_spec(ports: &[sr::ServicePort]) -> Result<Vec<Port>, ConversionError> {
    ports
        .iter()
        .map(|p| {
            Ok(Port {
                name: p.name.clone(),
                port: port_to_proto("spec.ports[].port", p.port)?,
                target_port: p
                    .target_port
                    .map(|t| port_to_proto("spec.ports[].targetPort", t))
                    .transpose()?
                    .unwrap_or(0),
                protocol: Protocol::from(p.protocol) as i32,
            })
        })
        .collect()
}

/// The explicit `spec.endpoints` as protobuf endpoints (all ready: nothing probes them but the
/// sidecars' own breakers). Empty for selector-based services, whose endpoints the control plane
/// finds itself.
pub fn explicit_endpoints_from_spec(
    spec: &sr::ServiceRegistrationSpec,
) -> Result<Vec<Endpoint>, ConversionError> {
    spec.endpoints
        .iter()
        .flatten()
        .map(|e| {
            Ok(Endpoint {
                address: e.address.clone(),
                port: port_to_proto("spec.endpoints[].port", e.port)?,
                weight: e.weight.unwrap_or(0),
                zone: e.zone.clone().unwrap_or_default(),
                ready: true,
                port_name: String::new(),
            })
        })
        .collect()
}

/// The full snapshot of a service whose endpoints are explicit (`spec.endpoints`). For a
/// selector-based service, the control plane sets `endpoints` from the pods it found.
pub fn snapshot_from_spec(
    namespace: &str,
    service: &str,
    spec: &sr::ServiceRegistrationSpec,
) -> Result<Snapshot, ConversionError> {
    Ok(Snapshot {
        namespace: namespace.to_string(),
        service: service.to_string(),
        endpoints: explicit_endpoints_from_spec(spec)?,
        ports: ports_from_spec(&spec.ports)?,
        policy: Some(policy_from_spec(spec)?),
    })
}

/// A spec with explicit endpoints (every endpoint of the snapshot, ready or not) and the
/// snapshot's policy: the inverse of [`snapshot_from_spec`].
pub fn spec_from_snapshot(
    snapshot: &Snapshot,
) -> Result<sr::ServiceRegistrationSpec, ConversionError> {
    let policy = snapshot.policy.clone().unwrap_or_default();
    Ok(sr::ServiceRegistrationSpec {
        selector: None,
        endpoints: Some(
            snapshot
                .endpoints
                .iter()
                .map(|e| {
                    Ok(sr::ExplicitEndpoint {
                        address: e.address.clone(),
                        port: port_from_proto("endpoints[].port", e.port)?,
                        weight: (e.weight != 0).then_some(e.weight),
                        zone: (!e.zone.is_empty()).then(|| e.zone.clone()),
                    })
                })
                .collect::<Result<_, ConversionError>>()?,
        ),
        ports: snapshot
            .ports
            .iter()
            .map(|p| {
                Ok(sr::ServicePort {
                    name: p.name.clone(),
                    port: port_from_proto("ports[].port", p.port)?,
                    target_port: (p.target_port != 0)
                        .then(|| port_from_proto("ports[].targetPort", p.target_port))
                        .transpose()?,
                    protocol: Protocol::try_from(p.protocol).unwrap_or_default().into(),
                })
            })
            .collect::<Result<_, ConversionError>>()?,
        load_balancer: policy
            .load_balancer
            .as_ref()
            .map(sr::LoadBalancer::from)
            .unwrap_or_default(),
        circuit_breaker: policy
            .circuit_breaker
            .as_ref()
            .map(sr::CircuitBreaker::try_from)
            .transpose()?,
        retry: policy
            .retry
            .as_ref()
            .map(sr::RetryPolicy::try_from)
            .transpose()?,
        timeout: opt_duration_to_string("timeout", &policy.timeout)?,
        max_in_flight_requests: policy.max_in_flight_requests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn full_spec() -> sr::ServiceRegistrationSpec {
        sr::ServiceRegistrationSpec {
            selector: None,
            endpoints: Some(vec![
                sr::ExplicitEndpoint {
                    address: "127.0.0.2".into(),
                    port: 8080,
                    weight: Some(3),
                    zone: Some("a".into()),
                },
                sr::ExplicitEndpoint {
                    address: "db.example.com".into(),
                    port: 9090,
                    weight: None,
                    zone: None,
                },
            ]),
            ports: vec![
                sr::ServicePort {
                    name: "http".into(),
                    port: 80,
                    target_port: Some(8080),
                    protocol: sr::Protocol::Http,
                },
                sr::ServicePort {
                    name: "grpc".into(),
                    port: 90,
                    target_port: None,
                    protocol: sr::Protocol::Grpc,
                },
            ],
            load_balancer: sr::LoadBalancer {
                policy: sr::LoadBalancerPolicy::ConsistentHash,
                hash_header: Some("x-user".into()),
            },
            circuit_breaker: Some(sr::CircuitBreaker {
                consecutive_failures: Some(3),
                failure_ratio: Some(0.5),
                failure_window: Some("10s".into()),
                minimum_requests: Some(20),
                base_ejection_time: Some("250ms".into()),
                max_ejection_time: Some("300s".into()),
                max_ejection_percent: Some(50),
                half_open_probes: Some(2),
            }),
            retry: Some(sr::RetryPolicy {
                attempts: Some(3),
                retry_on: Some(vec![sr::RetryOn::GatewayError, sr::RetryOn::Reset]),
                retriable_status_codes: Some(vec![409, 429]),
                per_try_timeout: Some("1500ms".into()),
                backoff: Some(sr::Backoff {
                    base_interval: "25ms".into(),
                    max_interval: "1s".into(),
                }),
                budget: Some(sr::RetryBudget {
                    ratio: 0.2,
                    min_retries_per_second: Some(10),
                    ttl: Some("10s".into()),
                }),
                retry_non_idempotent: Some(false),
            }),
            timeout: Some("5s".into()),
            max_in_flight_requests: Some(100),
        }
    }

    #[test]
    fn spec_round_trips_through_the_wire() {
        let spec = full_spec();
        let snapshot = snapshot_from_spec("shop", "orders", &spec).expect("convert");
        assert_eq!(snapshot.endpoints.len(), 2);
        assert!(snapshot.endpoints.iter().all(|e| e.ready));
        // Through protobuf bytes, as a sidecar receives it.
        let update = Update {
            revision: 7,
            kind: Some(update::Kind::Snapshot(snapshot)),
        };
        let decoded = Update::decode(update.encode_to_vec().as_slice()).expect("decode");
        assert_eq!(decoded.revision, 7);
        let Some(update::Kind::Snapshot(snapshot)) = decoded.kind else {
            panic!("expected a snapshot");
        };
        let back = spec_from_snapshot(&snapshot).expect("back");
        assert_eq!(back, spec);
    }

    #[test]
    fn unset_fields_stay_unset() {
        let spec = sr::ServiceRegistrationSpec {
            endpoints: Some(vec![]),
            ports: vec![sr::ServicePort {
                name: "http".into(),
                port: 80,
                ..Default::default()
            }],
            ..Default::default()
        };
        let policy = policy_from_spec(&spec).expect("policy");
        assert!(policy.circuit_breaker.is_none());
        assert!(policy.retry.is_none());
        assert!(policy.timeout.is_none());
        assert!(policy.max_in_flight_requests.is_none());
        let back = spec_from_snapshot(&snapshot_from_spec("ns", "s", &spec).expect("snapshot"))
            .expect("back");
        assert_eq!(back, spec);
    }

    #[test]
    fn empty_retry_on_differs_from_unset() {
        let mut retry = sr::RetryPolicy {
            retry_on: Some(vec![]),
            ..Default::default()
        };
        let wire = RetryPolicy::try_from(&retry).expect("convert");
        assert_eq!(wire.retry_on, Some(RetryOnList { values: vec![] }));
        retry.retry_on = None;
        assert_eq!(
            RetryPolicy::try_from(&retry).expect("convert").retry_on,
            None
        );
    }

    #[test]
    fn bad_durations_name_the_field() {
        let spec = sr::ServiceRegistrationSpec {
            timeout: Some("soon".into()),
            ..Default::default()
        };
        let err = policy_from_spec(&spec).expect_err("must fail");
        assert!(err.to_string().contains("spec.timeout"), "{err}");
        assert!(
            duration_from_proto(
                "x",
                &prost_types::Duration {
                    seconds: -1,
                    nanos: 0
                }
            )
            .is_err()
        );
    }

    #[test]
    fn unknown_enum_values_are_read_leniently() {
        let lb = LoadBalancer {
            policy: 99,
            hash_header: None,
        };
        assert_eq!(
            sr::LoadBalancer::from(&lb).policy,
            sr::LoadBalancerPolicy::PeakEwma
        );
        let retry = RetryPolicy {
            retry_on: Some(RetryOnList {
                values: vec![RetryOn::Reset as i32, 42],
            }),
            ..Default::default()
        };
        assert_eq!(
            sr::RetryPolicy::try_from(&retry).expect("convert").retry_on,
            Some(vec![sr::RetryOn::Reset])
        );
    }
}
