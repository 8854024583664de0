//! Span export over OTLP/HTTP with JSON encoding (`POST <endpoint>/v1/traces`), enabled by
//! `OTEL_EXPORTER_OTLP_ENDPOINT`. One span per proxied request (kind CLIENT outbound, SERVER
//! inbound) whose span id is the one passed on in `traceparent`, so the trace links up with
//! the apps' own spans.
//!
//! Kept small on purpose: plain-HTTP collectors only (no TLS), batches of up to 256 spans sent
//! every second, and a bounded queue — when the collector is slow or away, spans are dropped
//! (and counted in the log), never requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::trace::TraceContext;

/// Span kinds of OTLP.
#[derive(Clone, Copy, Debug)]
pub enum SpanKind {
    Server = 2,
    Client = 3,
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
    pub attributes: Vec<(&'static str, String)>,
    pub error: bool,
}

const QUEUE: usize = 4096;
const BATCH: usize = 256;

/// Handle to the exporter task; cheap to clone.
#[derive(Clone)]
pub struct OtlpExporter {
    tx: mpsc::Sender<SpanRecord>,
    dropped: Arc<AtomicU64>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
                    "key": k, "value": {"stringValue": v}
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

impl OtlpExporter {
    /// Starts exporting to `endpoint` (e.g. `http://otel-collector:4318`; `/v1/traces` is
    /// appended unless the URL already ends with it).
    pub fn spawn(endpoint: &str, service_name: &str) -> Self {
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
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let mut batch = Vec::with_capacity(BATCH);
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
                let body = encode(&service_name, &batch).to_string();
                batch.clear();
                let req = http::Request::post(&url)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(body)));
                let Ok(req) = req else {
                    tracing::warn!(url, "invalid OTLP endpoint; span export stops");
                    return;
                };
                match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                    Ok(Ok(r)) if r.status().is_success() => {}
                    Ok(Ok(r)) => {
                        tracing::warn!(status = %r.status(), "OTLP collector refused spans")
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "OTLP export failed"),
                    Err(_) => tracing::warn!("OTLP export timed out"),
                }
                let d = dropped_task.swap(0, Ordering::Relaxed);
                if d > 0 {
                    tracing::warn!(dropped = d, "spans dropped: export queue full");
                }
            }
        });
        OtlpExporter { tx, dropped }
    }

    /// Queues a span; drops it when the queue is full.
    pub fn export(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
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
                attributes: vec![("http.request.method", "GET".into())],
                error: false,
            }],
        );
        let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span["spanId"], "00f067aa0ba902b7");
        assert_eq!(span["parentSpanId"], "0102030405060708");
        assert_eq!(span["kind"], 3);
    }
}
