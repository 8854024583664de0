//! `ServiceRegistration` (short name `sreg`): a service and the policy every caller's sidecar
//! applies to it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::{duration_schema, optional_duration_schema};

/// DNS-1035 label: what a Kubernetes Service name must look like.
pub const SERVICE_NAME_PATTERN: &str = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$";

/// A ServiceRegistration's name is what callers address (`name` or `name.namespace`), so it is a
/// Service name without dots: `catalog.v2` would read as service `catalog` in namespace `v2`.
const NAME_RULE: &str = "self.metadata.name.matches('^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$')";
const NAME_MESSAGE: &str = "metadata.name must be a DNS label without dots (lowercase letters, \
                            digits and '-', starting with a letter, at most 63): callers address \
                            a service as name or name.namespace";

/// A label key: an optional DNS-subdomain prefix (at most 253) and `/`, then a name of at most
/// 63 alphanumerics, `-`, `_` and `.`, starting and ending with an alphanumeric.
const SELECTOR_KEY_RULE: &str = r#"self.all(k, k.matches("^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$") && k.indexOf('/') <= 253)"#;
const SELECTOR_KEY_MESSAGE: &str = "spec.selector keys must be label keys: an optional DNS \
                                    subdomain prefix and '/', then at most 63 alphanumerics, \
                                    '-', '_' or '.', starting and ending with an alphanumeric";
/// A label value: empty, or at most 63 alphanumerics, `-`, `_` and `.`, starting and ending with
/// an alphanumeric (the length is the schema's `maxLength`).
const SELECTOR_VALUE_RULE: &str =
    "self.all(k, self[k].matches('^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$'))";
const SELECTOR_VALUE_MESSAGE: &str = "spec.selector values must be label values: empty, or at \
                                      most 63 alphanumerics, '-', '_' or '.', starting and \
                                      ending with an alphanumeric";

/// Spec of a ServiceRegistration: where a service's endpoints come from and the policy every
/// caller's sidecar applies when it sends requests to it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "sagamesh.io",
    version = "v1alpha1",
    kind = "ServiceRegistration",
    plural = "serviceregistrations",
    shortname = "sreg",
    category = "sagamesh",
    namespaced,
    status = "ServiceRegistrationStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "A service known to the Sagamesh mesh: where its endpoints come from (pods selected by \
           label, or explicit addresses) and the load-balancing, circuit-breaking, retry and \
           timeout policy every caller's sidecar applies to it.",
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyEndpoints","description":"Ready endpoints"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".status.totalEndpoints","description":"All known endpoints"}"#,
    printcolumn = r#"{"name":"Policy","type":"string","jsonPath":".spec.loadBalancer.policy","description":"Load-balancing policy"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new(NAME_RULE).message(NAME_MESSAGE)
)]
#[x_kube(validation = Rule::new("has(self.selector) != has(self.endpoints)")
    .message("exactly one of spec.selector and spec.endpoints must be set: selector for pods in the cluster, endpoints for explicit addresses"))]
#[x_kube(validation = Rule::new("self.ports.all(p, self.ports.exists_one(q, q.port == p.port))")
    .message("spec.ports: port numbers must be unique").field_path(".ports"))]
#[serde(rename_all = "camelCase")]
pub struct ServiceRegistrationSpec {
    /// Labels selecting the service's pods in this namespace. Pods that are Ready and have an IP
    /// become endpoints, at each port's `targetPort`. If a Service of the same name exists, its
    /// EndpointSlices are used instead of pods. Mutually exclusive with `endpoints`.
    /// Keys and values follow Kubernetes label syntax.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = { "type": "string", "maxLength": 63 }))]
    #[x_kube(validation = Rule::new("size(self) > 0").message("spec.selector must not be empty: an empty selector would match every pod"))]
    #[x_kube(validation = Rule::new(SELECTOR_KEY_RULE).message(SELECTOR_KEY_MESSAGE))]
    #[x_kube(validation = Rule::new(SELECTOR_VALUE_RULE).message(SELECTOR_VALUE_MESSAGE))]
    pub selector: Option<BTreeMap<String, String>>,

    /// Explicit endpoints, for workloads outside the cluster and for local mode. Mutually
    /// exclusive with `selector`. Each address and port appears once (a list keyed by both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["address", "port"]))]
    pub endpoints: Option<Vec<ExplicitEndpoint>>,

    /// The ports the service is called on. Callers address `name:port`; the first port is used
    /// when a caller gives none. Port names and numbers are unique.
    #[schemars(length(min = 1, max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub ports: Vec<ServicePort>,

    /// How each caller's sidecar spreads requests over the endpoints.
    #[serde(default)]
    pub load_balancer: LoadBalancer,

    /// Per-endpoint outlier ejection and the service-level fail-fast breaker. Defaults apply when
    /// unset (5 consecutive failures eject an endpoint for 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,

    /// Retry policy. When unset, requests are not retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,

    /// Overall deadline of one request, retries included (e.g. `5s`). Past it the caller gets a
    /// 504 with `x-sagamesh-error: timeout`. Unset means no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_duration_schema")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("spec.timeout must be a positive duration such as 500ms or 5s"))]
    pub timeout: Option<String>,

    /// Most requests one caller's sidecar keeps in flight to this service; beyond it requests
    /// are refused at once with a 503 and `x-sagamesh-error: overloaded`. Unset: 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_in_flight_requests: Option<u32>,
}

/// One explicit endpoint of a service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("isIP(self.address) || self.address.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')")
    .message("address must be an IP address or a DNS name").field_path(".address"))]
#[serde(rename_all = "camelCase")]
pub struct ExplicitEndpoint {
    /// IP address or DNS name of the endpoint (e.g. `127.0.0.2`, `db.example.com`).
    #[schemars(length(min = 1, max = 253))]
    pub address: String,
    /// Port the endpoint listens on.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Relative share of traffic (default 1). An endpoint with weight 3 gets about three times
    /// the requests of one with weight 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub weight: Option<u32>,
    /// Zone of the endpoint (topology label), reported in metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub zone: Option<String>,
}

/// A port the service is called on.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Name of the port (a DNS label such as `http` or `grpc`), unique within the service.
    #[schemars(
        regex(pattern = r"^[a-z]([-a-z0-9]{0,13}[a-z0-9])?$"),
        length(max = 15)
    )]
    pub name: String,
    /// Port callers address (`orders:8080`).
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Port on the selected pods; defaults to `port`. Ignored for explicit endpoints, which name
    /// their own ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub target_port: Option<i32>,
    /// Application protocol: `HTTP` (HTTP/1.1 and h2c) or `GRPC`.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Application protocol of a port.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2 without TLS (h2c).
    #[default]
    #[serde(rename = "HTTP")]
    Http,
    /// gRPC (HTTP/2); status is read from `grpc-status` as well as the HTTP status.
    #[serde(rename = "GRPC")]
    Grpc,
}

/// Load-balancing settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("self.policy != 'ConsistentHash' || has(self.hashHeader)")
    .message("spec.loadBalancer.hashHeader is required when policy is ConsistentHash").field_path(".hashHeader"))]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    /// Policy: `RoundRobin`, `LeastRequest` (power of two choices on in-flight requests),
    /// `PeakEwma` (power of two choices on peak-EWMA latency; the default), or `ConsistentHash`
    /// (on the value of `hashHeader`).
    #[serde(default)]
    pub policy: LoadBalancerPolicy,
    /// Request header whose value picks the endpoint when policy is `ConsistentHash`
    /// (e.g. `x-user-id`). Requests without the header are spread at random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"), length(max = 256))]
    pub hash_header: Option<String>,
}

/// Load-balancing policy.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum LoadBalancerPolicy {
    /// Each endpoint in turn, in proportion to its weight.
    RoundRobin,
    /// Power of two choices: of two random endpoints, the one with fewer requests in flight.
    LeastRequest,
    /// Power of two choices on peak-EWMA latency times in-flight requests (the default).
    #[default]
    PeakEwma,
    /// A hash ring on a request header, so the same key reaches the same endpoint.
    ConsistentHash,
}

/// Circuit breaking: per-endpoint outlier ejection, and a service-level breaker that fails fast
/// with a 503 (`x-sagamesh-error: circuit-open` or `no-endpoints`) when nothing healthy is left.
///
/// Terms: an endpoint's breaker is *closed* when traffic flows, *open* while it is ejected, and
/// *half-open* while probe requests test whether it has recovered.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!has(self.baseEjectionTime) || !has(self.maxEjectionTime) || duration(self.baseEjectionTime) <= duration(self.maxEjectionTime)")
    .message("spec.circuitBreaker.baseEjectionTime must not exceed maxEjectionTime").field_path(".baseEjectionTime"))]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Consecutive failures (5xx, connect failures, resets, timeouts) that eject an endpoint.
    /// Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub consecutive_failures: Option<u32>,
    /// Failure ratio over `failureWindow` that ejects an endpoint, in [0, 1]; only counted once
    /// the window holds `minimumRequests`. Unset: ratio-based ejection is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub failure_ratio: Option<f64>,
    /// Sliding window over which `failureRatio` is computed (e.g. `10s`). Default 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_duration_schema")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("spec.circuitBreaker.failureWindow must be a positive duration"))]
    pub failure_window: Option<String>,
    /// Requests the window must hold before `failureRatio` can eject. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub minimum_requests: Option<u32>,
    /// How long an endpoint stays ejected the first time (e.g. `30s`); each repeated ejection
    /// multiplies it, up to `maxEjectionTime`. Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_duration_schema")]
    pub base_ejection_time: Option<String>,
    /// Upper bound of the growing ejection time. Default 300s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_duration_schema")]
    pub max_ejection_time: Option<String>,
    /// Most endpoints, as a percentage of all, that may be ejected at once (0-100). Default 50.
    /// Keeps one bad signal from draining the whole service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: Option<u32>,
    /// Probe requests let through to an endpoint whose ejection time is over (half-open); that
    /// many successes close its breaker, one failure ejects it again. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub half_open_probes: Option<u32>,
}

/// Retry policy of a service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Total attempts including the first (>= 1; 1 means no retry). Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub attempts: Option<u32>,
    /// Failure classes that are retried. Default: `gateway-error`, `connect-failure`, `reset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    #[x_kube(validation = Rule::new("self.all(c, self.exists_one(d, d == c))").message("spec.retry.retryOn entries must be unique"))]
    pub retry_on: Option<Vec<RetryOn>>,
    /// Further HTTP status codes that are retried (e.g. 409, 429).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.all(c, c >= 100 && c <= 599)").message("spec.retry.retriableStatusCodes must be HTTP status codes (100-599)"))]
    pub retriable_status_codes: Option<Vec<u16>>,
    /// Deadline of each attempt (e.g. `1s`); unset: only the overall `spec.timeout` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_duration_schema")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("spec.retry.perTryTimeout must be a positive duration"))]
    pub per_try_timeout: Option<String>,
    /// Exponential backoff with full jitter between attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Retry budget: retries allowed as a share of recent requests, so retries never multiply
    /// an outage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
    /// Retry requests with non-idempotent methods (POST, PATCH) even without an
    /// `Idempotency-Key` header. Default false: only GET, HEAD, OPTIONS, PUT, DELETE, TRACE and
    /// requests carrying `Idempotency-Key` are retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_non_idempotent: Option<bool>,
}

/// A class of failure that may be retried.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503 and 504 responses.
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// The connection to the endpoint could not be made.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The endpoint reset or closed the connection before answering.
    #[serde(rename = "reset")]
    Reset,
}

/// Exponential backoff with full jitter: before retry n, wait a random time in
/// [0, min(maxInterval, baseInterval * 2^n)].
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("duration(self.baseInterval) <= duration(self.maxInterval)")
    .message("backoff.baseInterval must not exceed backoff.maxInterval").field_path(".baseInterval"))]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    /// First backoff interval (e.g. `25ms`).
    #[schemars(schema_with = "duration_schema")]
    pub base_interval: String,
    /// Largest backoff interval (e.g. `1s`).
    #[schemars(schema_with = "duration_schema")]
    pub max_interval: String,
}

/// Retry budget, after Finagle and tower: each request deposits `ratio` of a retry; each retry
/// withdraws one; `minRetriesPerSecond` are always allowed so low traffic can still retry.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries allowed per original request, in [0, 1] (e.g. 0.2: at most 20% extra load).
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ratio: f64,
    /// Retries per second always allowed, whatever the ratio. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub min_retries_per_second: Option<u32>,
    /// How long a deposit counts (e.g. `10s`). Default 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_duration_schema")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('60s')").message("spec.retry.budget.ttl must be between 1s and 60s"))]
    pub ttl: Option<String>,
}

/// Observed state of a ServiceRegistration, written by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRegistrationStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Endpoints that are ready to take traffic.
    #[serde(default)]
    pub ready_endpoints: u32,
    /// All endpoints known, ready or not.
    #[serde(default)]
    pub total_endpoints: u32,
    /// `Ready` (the service has ready endpoints and a valid policy) and `EndpointsResolved`
    /// (the endpoint source could be read), with reasons such as `NoMatchingPods`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_rule_is_the_service_name_pattern() {
        assert!(NAME_RULE.contains(&format!("'{SERVICE_NAME_PATTERN}'")));
    }
}
