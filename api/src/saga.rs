//! `Saga` (short name `saga`): one distributed transaction of ordered steps, each an HTTP call to
//! a registered service with a compensating call.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::optional_duration_schema;

/// Most steps one saga may have.
pub const MAX_STEPS: usize = 50;
/// Most events kept in `status.history`; older ones are dropped (the per-step records keep the
/// outcome), so an object never nears etcd's size limit.
pub const MAX_HISTORY: usize = 100;
/// Most bytes of a step's JSON output kept in status.
pub const MAX_OUTPUT_BYTES: usize = 4096;

/// Spec of a Saga: the input and the ordered steps.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "sagamesh.io",
    version = "v1alpha1",
    kind = "Saga",
    plural = "sagas",
    shortname = "saga",
    category = "sagamesh",
    namespaced,
    status = "SagaStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "One distributed transaction: ordered steps, each an HTTP call to a registered service \
           with a compensating call. When a step fails for good, the completed steps are \
           compensated in reverse order. Delivery is at-least-once: every call carries an \
           Idempotency-Key so services can deduplicate.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Saga phase"}"#,
    printcolumn = r#"{"name":"Step","type":"string","jsonPath":".status.currentStep","description":"Step running or compensating now"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable once the saga is created; create a new Saga instead"))]
#[serde(rename_all = "camelCase")]
pub struct SagaSpec {
    /// Input of the saga, any JSON value; steps read it as `{{ input.path.to.field }}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json_schema")]
    pub input: Option<serde_json::Value>,

    /// The steps, run in order. Each step's JSON response body is its output, readable by later
    /// steps as `{{ steps.NAME.output.path }}`. Step names are unique (a list keyed by name).
    #[schemars(length(min = 1, max = 50))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub steps: Vec<SagaStep>,

    /// Deadline of the whole saga, counted from its start (e.g. `5m`). When it passes, the
    /// running step is abandoned and completed steps are compensated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_duration_schema")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("spec.deadline must be a positive duration such as 30s or 5m"))]
    pub deadline: Option<String>,
}

/// One step of a saga.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SagaStep {
    /// Name of the step, unique in the saga (a DNS label such as `reserve-stock`).
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"),
        length(max = 63)
    )]
    pub name: String,
    /// The call that does the step's work.
    pub action: HttpCall,
    /// The call that undoes the action when a later step fails. Leave it out only for a step
    /// that needs no undoing (a read, or a final step nothing runs after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<HttpCall>,
    /// Deadline of one attempt of the action (e.g. `5s`). Default 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_duration_schema")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("step timeout must be a positive duration such as 500ms or 5s"))]
    pub timeout: Option<String>,
    /// Retries of the action. Compensations are always retried with backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<StepRetry>,
}

/// An HTTP call to a registered service. Path, header values and string values in the body may
/// hold templates: `{{ input.orderId }}`, `{{ steps.reserve.output.id }}`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpCall {
    /// The ServiceRegistration to call: `name` (same namespace) or `name.namespace`.
    #[schemars(regex(
        pattern = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?$"
    ))]
    pub service: String,
    /// Port name of the service; default: its first port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[a-z]([-a-z0-9]{0,13}[a-z0-9])?$"),
        length(max = 15)
    )]
    pub port: Option<String>,
    /// HTTP method. Default POST.
    #[serde(default)]
    pub method: HttpMethod,
    /// Request path, starting with `/`, with optional query (e.g. `/orders/{{ input.orderId }}`).
    /// Outside templates only what an HTTP request target may hold: letters, digits,
    /// `-._~!$&'()*+,;=:@/?` and `%XX` escapes (no spaces, `#`, or non-ASCII: percent-encode them).
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("path must start with '/'"))]
    #[x_kube(validation = Rule::new(PATH_RULE).message(PATH_MESSAGE))]
    pub path: String,
    /// Extra request headers (values may hold templates). Names are unique, regardless of case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[x_kube(validation = Rule::new("self.all(h, self.exists_one(g, g.name.lowerAscii() == h.name.lowerAscii()))")
        .message("header names must be unique regardless of case: HTTP header names are case-insensitive"))]
    pub headers: Option<Vec<HttpHeader>>,
    /// Request body, any JSON value; string values may hold templates. Sent as
    /// `application/json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json_schema")]
    pub body: Option<serde_json::Value>,
}

/// The path rule: RFC 3986 `pchar`, `/`, `?` or `%XX`, or a whole `{{ expression }}` template
/// (an expression is a dotted path with `[index]`es, see saga/src/template.rs; its value is
/// percent-encoded when the path is rendered). The leading `/` is the rule before it, so a path
/// without one gets one message.
const PATH_RULE: &str = r#"self.matches("^([-A-Za-z0-9._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2}|\\{\\{[ \\t]*[-A-Za-z0-9_.\\[\\]]+[ \\t]*\\}\\})*$")"#;
const PATH_MESSAGE: &str = "path must hold only what is valid in an HTTP request target: \
                            letters, digits, -._~!$&'()*+,;=:@/? and %XX escapes (percent-encode \
                            spaces, '#', '%' and non-ASCII), plus {{ ... }} templates";

/// One request header of a saga call.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!(self.name.lowerAscii() in ['host', 'content-length', 'idempotency-key', 'traceparent', 'tracestate', 'connection', 'keep-alive', 'te', 'trailer', 'transfer-encoding', 'upgrade']) && !self.name.lowerAscii().startsWith('proxy-')")
    .message("header must not be Host, Content-Length, Idempotency-Key, traceparent or tracestate (Sagamesh sets those), nor a hop-by-hop or upgrade header (Connection, Keep-Alive, Proxy-*, TE, Trailer, Transfer-Encoding, Upgrade)").field_path(".name"))]
#[serde(rename_all = "camelCase")]
pub struct HttpHeader {
    /// Header name (an HTTP token such as `X-Tenant`). Not one Sagamesh sets (`Host`,
    /// `Content-Length`, `Idempotency-Key`, `traceparent`, `tracestate`), nor a hop-by-hop or
    /// upgrade header (`Connection`, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`,
    /// `Transfer-Encoding`, `Upgrade`).
    #[schemars(
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"),
        length(min = 1, max = 128)
    )]
    pub name: String,
    /// Header value; may hold templates. No CR, LF or NUL (they would end the header).
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new(r"!self.contains('\r') && !self.contains('\n') && !self.contains('\x00')")
        .message("header value must not contain CR, LF or NUL: they would end the header"))]
    pub value: String,
}

/// HTTP method of a saga call.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    #[default]
    Post,
    Put,
    Patch,
    Delete,
}

/// Retries of a step's action.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!has(self.backoff) || !has(self.maxBackoff) || duration(self.backoff) <= duration(self.maxBackoff)")
    .message("retry.backoff must not exceed retry.maxBackoff").field_path(".backoff"))]
#[serde(rename_all = "camelCase")]
pub struct StepRetry {
    /// Total attempts including the first (>= 1). Default 3.
    #[schemars(range(min = 1, max = 20))]
    pub attempts: u32,
    /// First backoff interval (e.g. `100ms`); doubles each attempt, with jitter. Default 100ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_duration_schema")]
    pub backoff: Option<String>,
    /// Largest backoff interval. Default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_duration_schema")]
    pub max_backoff: Option<String>,
}

/// Schema for a field holding any JSON value.
fn any_json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-preserve-unknown-fields": true,
        "nullable": true,
    })
}

/// Phase of a saga.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum SagaPhase {
    /// Accepted, not started.
    #[default]
    Pending,
    /// Running its steps' actions.
    Running,
    /// A step failed for good (or the deadline passed); completed steps are being undone.
    Compensating,
    /// Every step succeeded.
    Succeeded,
    /// A step failed and every completed step was compensated.
    Compensated,
    /// A compensation could not complete, or the saga was invalid: a person must look.
    Failed,
}

impl SagaPhase {
    /// Whether the saga is done (no further calls will be made).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Compensated | Self::Failed)
    }
}

/// Phase of one call (a step's action or its compensation).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum CallPhase {
    /// Not started.
    #[default]
    Pending,
    /// Sent (possibly in doubt: a restart re-sends it with the same idempotency key).
    Running,
    /// Answered with success.
    Succeeded,
    /// Failed for good.
    Failed,
    /// Not needed (e.g. no compensation defined, or the action never ran).
    Skipped,
}

/// Observed state of a Saga: an append-only record of what happened.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SagaStatus {
    /// Phase, the result of replaying the step records.
    #[serde(default)]
    pub phase: SagaPhase,
    /// The step running or compensating now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the first step started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the saga reached a terminal phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// W3C trace id shared by every call of the saga.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// One record per step, in spec order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub steps: Vec<StepStatus>,
    /// The most recent events, oldest first (at most 100; `historyDropped` counts older ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub history: Vec<SagaEvent>,
    /// Events dropped from the front of `history` to keep it bounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_dropped: Option<u64>,
    /// Conditions such as `Failed` (with what a person must do) and `Valid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The record of one step.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    /// Step name.
    pub name: String,
    /// The action's record.
    #[serde(default)]
    pub action: CallStatus,
    /// The compensation's record.
    #[serde(default)]
    pub compensation: CallStatus,
}

/// The record of one call.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CallStatus {
    /// Phase of the call.
    #[serde(default)]
    pub phase: CallPhase,
    /// Attempts made so far.
    #[serde(default)]
    pub attempts: u32,
    /// When the first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the call succeeded or failed for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// HTTP status of the last answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// The call failed without a definite answer (timed out, or the connection broke after the
    /// request was sent), so it may have taken effect: a failed action in doubt is compensated
    /// too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_doubt: Option<bool>,
    /// JSON response body (actions only), at most 4 KiB; a larger output is not kept (and
    /// templates reading it fail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json_schema")]
    pub output: Option<serde_json::Value>,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub error: Option<String>,
}

/// One event in a saga's history.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SagaEvent {
    /// Sequence number, from 1, never reused.
    pub seq: u64,
    /// When it happened.
    pub time: Time,
    /// What happened, e.g. `ActionStarted`, `ActionSucceeded`, `CompensationFailed`.
    pub kind: String,
    /// The step it concerns, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Attempt number, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// A short human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub message: Option<String>,
}
