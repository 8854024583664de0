//! Span export over OTLP/HTTP with JSON encoding (`POST <endpoint>/v1/traces`), enabled by
//! `OTEL_EXPORTER_OTLP_ENDPOINT`. One span per proxied request (kind CLIENT outbound, SERVER
//! inbound) whose span id is the one passed on in `traceparent`, so the trace links up with
//! the apps' own spans.
//!
//! Kept small on purpose: plain-HTTP collectors only (no TLS), batches of up to 256 spans sent
//! every second, and a bounded queue — when the collector is slow or away, spans are dropped
//! (and counted), never requests. A batch the collector answers 429, 502, 503 or 504 (the
//! responses the OTLP/HTTP spec calls retryable) or that cannot be delivered is sent again
//! after the `Retry-After` delay or an exponential backoff with jitter, a bounded number of
//! times; any other answer (400 and the rest) is final. While a batch waits, new spans wait in
//! the queue; once it is full the newest spans are dropped (`dropped_spans`), so what is
//! already queued keeps its order and is sent first.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sagamesh_api::backoff::{Backoff, Jitter};
use tokio::sync::mpsc;

use crate::trace::TraceContext;
use sagamesh_api::trace_context::hex;

/// Span kinds of OTLP.
#[derive(Clone, Copy, Debug)]
pub enum SpanKind {
    Server = 2,
    Client = 3,
}

/// An attribute value, encoded as OTLP's `AnyValue`.
#[derive(Clone, Debug, PartialEq)]
pub enum AttributeValue {
    String(String),
    /// An int64: `{"intValue": "200"}`, a string of digits as the protobuf JSON mapping writes
    /// 64-bit integers (what OTLP/JSON uses).
    Int(i64),
}

impl AttributeValue {
    fn to_json(&self) -> serde_json::Value {
        match self {
            AttributeValue::String(s) => serde_json::json!({ "stringValue": s }),
            AttributeValue::Int(i) => serde_json::json!({ "intValue": i.to_string() }),
        }
    }
}

impl From<String> for AttributeValue {
    fn from(s: String) -> Self {
        AttributeValue::String(s)
    }
}

impl From<&str> for AttributeValue {
    fn from(s: &str) -> Self {
        AttributeValue::String(s.to_string())
    }
}

impl From<i64> for AttributeValue {
    fn from(i: i64) -> Self {
        AttributeValue::Int(i)
    }
}

/// One finished span.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    pub context: TraceContext,
    pub parent_span_id: Option<[u8; 8]>,
    pub name: String,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, AttributeValue)>,
    pub error: bool,
}

const QUEUE: usize = 4096;
const BATCH: usize = 256;

/// `User-Agent` of the exports. The OpenTelemetry SDKs send `OTel-OTLP-Exporter-<lang>/<v>`;
/// this is not their exporter, so it names itself.
pub const USER_AGENT: &str = concat!("sagamesh-sidecar/", env!("CARGO_PKG_VERSION"));

/// How a batch is retried.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// Attempts per batch, the first included.
    pub max_attempts: u32,
    /// Backoff before the first retry, doubled for each further one up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured; longer ones are cut to this.
    pub max_retry_after: Duration,
    /// Time one attempt may take.
    pub timeout: Duration,
    /// Random jitter on the backoff (off for repeatable tests).
    pub jitter: bool,
}

impl Default for ExportConfig {
    /// The OpenTelemetry SDKs' defaults, roughly: five attempts, 1s backoff growing to 5s.
    fn default() -> Self {
        ExportConfig {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            jitter: true,
        }
    }
}

/// Handle to the exporter task; cheap to clone.
#[derive(Clone)]
pub struct OtlpExporter {
    tx: mpsc::Sender<SpanRecord>,
    dropped: Arc<AtomicU64>,
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos().to_string())
        .unwrap_or_else(|_| "0".into())
}

/// The OTLP/JSON body for a batch of spans.
pub fn encode(service_name: &str, spans: &[SpanRecord]) -> serde_json::Value {
    let spans: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut span = serde_json::json!({
                "traceId": hex(&s.context.trace_id),
                "spanId": hex(&s.context.span_id),
                "name": s.name,
                "kind": s.kind as i32,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": s.attributes.iter().map(|(k, v)| serde_json::json!({
                    "key": k, "value": v.to_json()
                })).collect::<Vec<_>>(),
                "status": {"code": if s.error { 2 } else { 0 }},
            });
            if let Some(p) = s.parent_span_id {
                span["parentSpanId"] = serde_json::Value::String(hex(&p));
            }
            span
        })
        .collect();
    serde_json::json!({
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service_name}}]},
            "scopeSpans": [{"scope": {"name": "sagamesh-sidecar"}, "spans": spans}],
        }]
    })
}

/// What one attempt to send a batch came to.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Delivered,
    /// Retryable; `Some` when the collector said when (`Retry-After`).
    Retry(Option<Duration>),
    /// Refused for good (400 and other non-retryable answers).
    Refused(http::StatusCode),
}

/// The OTLP/HTTP spec's retryable statuses.
fn is_retryable(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

/// A `Retry-After` of delta-seconds. The HTTP-date form is not read (collectors send seconds):
/// it falls back to the backoff.
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let seconds = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_secs(seconds))
}

/// The backoff before retry number `retry` (1 for the first): doubling from
/// `initial_backoff` up to `max_backoff`; with jitter, a random point in its upper half.
fn backoff(config: &ExportConfig, retry: u32) -> Duration {
    let jitter = if config.jitter {
        Jitter::Equal
    } else {
        Jitter::None
    };
    Backoff::new(config.initial_backoff, config.max_backoff, jitter).delay(retry)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn send_once(client: &HttpClient, url: &str, body: &Bytes, timeout: Duration) -> Attempt {
    let req = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, USER_AGENT)
        .body(Full::new(body.clone()));
    let Ok(req) = req else {
        tracing::warn!(url, "invalid OTLP endpoint; batch dropped");
        return Attempt::Refused(http::StatusCode::BAD_REQUEST);
    };
    match tokio::time::timeout(timeout, client.request(req)).await {
        Ok(Ok(r)) if r.status().is_success() => Attempt::Delivered,
        Ok(Ok(r)) if is_retryable(r.status()) => {
            tracing::debug!(status = %r.status(), "OTLP collector asks to retry");
            Attempt::Retry(retry_after(r.headers()))
        }
        Ok(Ok(r)) => Attempt::Refused(r.status()),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "OTLP export failed");
            Attempt::Retry(None)
        }
        Err(_) => {
            tracing::debug!("OTLP export timed out");
            Attempt::Retry(None)
        }
    }
}

/// Sends one batch, retrying as [`ExportConfig`] says; true when it was delivered.
async fn send_batch(client: &HttpClient, url: &str, body: Bytes, config: &ExportConfig) -> bool {
    for attempt in 1..=config.max_attempts.max(1) {
        let wait = match send_once(client, url, &body, config.timeout).await {
            Attempt::Delivered => return true,
            Attempt::Refused(status) => {
                tracing::warn!(%status, "OTLP collector refused spans; batch dropped");
                return false;
            }
            Attempt::Retry(after) => after.map_or_else(
                || backoff(config, attempt),
                |a| a.min(config.max_retry_after),
            ),
        };
        if attempt < config.max_attempts {
            tokio::time::sleep(wait).await;
        }
    }
    tracing::warn!(
        attempts = config.max_attempts,
        "OTLP export failed; batch dropped"
    );
    false
}

impl OtlpExporter {
    /// Starts exporting to `endpoint` (e.g. `http://otel-collector:4318`; `/v1/traces` is
    /// appended unless the URL already ends with it).
    pub fn spawn(endpoint: &str, service_name: &str) -> Self {
        Self::spawn_with(endpoint, service_name, ExportConfig::default())
    }

    /// [`spawn`](Self::spawn) with retry settings.
    pub fn spawn_with(endpoint: &str, service_name: &str, config: ExportConfig) -> Self {
        let url = if endpoint.trim_end_matches('/').ends_with("/v1/traces") {
            endpoint.to_string()
        } else {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        };
        let (tx, mut rx) = mpsc::channel::<SpanRecord>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let service_name = service_name.to_string();
        let dropped_task = dropped.clone();
        tokio::spawn(async move {
            let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
            let mut batch = Vec::with_capacity(BATCH);
            let mut dropped_reported = 0;
            loop {
                let first = rx.recv().await;
                let Some(first) = first else { return };
                batch.push(first);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
                while batch.len() < BATCH {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(s)) => batch.push(s),
                        Ok(None) | Err(_) => break,
                    }
                }
                let body = Bytes::from(encode(&service_name, &batch).to_string());
                batch.clear();
                send_batch(&client, &url, body, &config).await;
                let dropped = dropped_task.load(Ordering::Relaxed);
                if dropped > dropped_reported {
                    tracing::warn!(
                        dropped = dropped - dropped_reported,
                        total = dropped,
                        "spans dropped: export queue full"
                    );
                    dropped_reported = dropped;
                }
            }
        });
        OtlpExporter { tx, dropped }
    }

    /// Queues a span; drops it (the newest) when the queue is full.
    pub fn export(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Spans dropped so far because the queue was full.
    pub fn dropped_spans(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_ids_as_hex_and_links_the_parent() {
        let ctx = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("ctx");
        let now = SystemTime::now();
        let v = encode(
            "svc",
            &[SpanRecord {
                context: ctx,
                parent_span_id: Some([1, 2, 3, 4, 5, 6, 7, 8]),
                name: "outbound web.default".into(),
                kind: SpanKind::Client,
                start: now,
                end: now,
                attributes: vec![
                    ("http.request.method", "GET".into()),
                    ("http.response.status_code", 200.into()),
                ],
                error: false,
            }],
        );
        let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span["spanId"], "00f067aa0ba902b7");
        assert_eq!(span["parentSpanId"], "0102030405060708");
        assert_eq!(span["kind"], 3);
        assert_eq!(
            span["attributes"],
            serde_json::json!([
                {"key": "http.request.method", "value": {"stringValue": "GET"}},
                {"key": "http.response.status_code", "value": {"intValue": "200"}},
            ])
        );
    }

    #[test]
    fn retry_after_and_backoff() {
        let mut h = http::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("3"),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);

        let config = ExportConfig {
            jitter: false,
            ..ExportConfig::default()
        };
        let waits: Vec<_> = (1..=5).map(|r| backoff(&config, r).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 5, 5]);
        let jittered = ExportConfig::default();
        for retry in 1..=5 {
            let d = backoff(&jittered, retry);
            let full = backoff(&config, retry);
            assert!(d >= full / 2 && d <= full, "{d:?} for {full:?}");
        }
        for status in [429, 502, 503, 504] {
            assert!(is_retryable(
                http::StatusCode::from_u16(status).expect("status")
            ));
        }
        for status in [400, 401, 403, 404, 413, 500, 501] {
            assert!(!is_retryable(
                http::StatusCode::from_u16(status).expect("status")
            ));
        }
    }
}
