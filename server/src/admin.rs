//! The control plane's admin endpoints (the operator and `sagamesh local`): `/metrics`
//! (Prometheus text or OpenMetrics, negotiated), `/healthz` (the process serves) and `/readyz`
//! (the control plane has its full state, so discovery answers completely).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::accept::{ServeOptions, serve as serve_http};
use crate::exposition;

/// Something whose metrics `/metrics` shows, as OpenMetrics text.
pub trait EncodeMetrics: Send + Sync + 'static {
    fn encode(&self) -> Result<String, std::fmt::Error>;
}

impl EncodeMetrics for Registry {
    fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, self)?;
        Ok(out)
    }
}

/// What the admin endpoints report on.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<dyn EncodeMetrics>,
    pub ready: watch::Receiver<bool>,
}

/// A plain response with a content type (the admin servers, the sidecar's included, and the
/// webhook answer these).
pub fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Answers one admin request; `accept` is its `Accept` header (`/metrics` negotiates on it).
pub fn respond(
    state: &AdminState,
    method: &Method,
    path: &str,
    accept: Option<&str>,
) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n");
    }
    match path {
        "/metrics" => match state.metrics.encode() {
            Ok(openmetrics) => {
                let (content_type, body) = exposition::render(openmetrics, accept);
                text(StatusCode::OK, content_type, body)
            }
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                PLAIN,
                "encoding failed\n",
            ),
        },
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n"),
        "/readyz" => {
            if *state.ready.borrow() {
                text(StatusCode::OK, PLAIN, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "initial sync not done\n",
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` turns `true`.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: watch::Receiver<bool>) {
    serve_http(listener, ServeOptions::default(), shutdown, move |_peer| {
        let state = state.clone();
        service_fn(move |req: Request<Incoming>| {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let resp = respond(&state, req.method(), req.uri().path(), accept);
            async move { Ok::<_, Infallible>(resp) }
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

    fn state(ready: watch::Receiver<bool>) -> AdminState {
        let mut registry = Registry::default();
        let sub = registry.sub_registry_with_prefix("sagamesh_test");
        let reconciles = Counter::<u64>::default();
        sub.register("reconciles", "Reconciles run", reconciles.clone());
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 4));
        sub.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        reconciles.inc();
        duration.observe(0.002);
        AdminState {
            metrics: Arc::new(registry),
            ready,
        }
    }

    #[test]
    fn routes() {
        let (tx, ready) = watch::channel(false);
        let state = state(ready);
        let status = |method: &Method, path: &str| respond(&state, method, path, None).status();
        assert_eq!(status(&Method::GET, "/healthz"), StatusCode::OK);
        assert_eq!(
            status(&Method::GET, "/readyz"),
            StatusCode::SERVICE_UNAVAILABLE
        );
        tx.send_replace(true);
        assert_eq!(status(&Method::GET, "/readyz"), StatusCode::OK);
        assert_eq!(status(&Method::GET, "/metrics"), StatusCode::OK);
        assert_eq!(status(&Method::GET, "/x"), StatusCode::NOT_FOUND);
        assert_eq!(
            status(&Method::POST, "/metrics"),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    async fn metrics(state: &AdminState, accept: Option<&str>) -> (String, String) {
        use http_body_util::BodyExt;
        let resp = respond(state, &Method::GET, "/metrics", accept);
        assert_eq!(resp.status(), StatusCode::OK);
        let content_type = resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .expect("content type")
            .to_string();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (
            content_type,
            String::from_utf8(body.to_vec()).expect("utf-8"),
        )
    }

    #[tokio::test]
    async fn metrics_negotiate_openmetrics_or_prometheus_text() {
        use prometheus_parse::{Scrape, Value};
        let (_tx, ready) = watch::channel(true);
        let state = state(ready);

        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        let (content_type, body) = metrics(&state, Some(prometheus)).await;
        assert_eq!(
            content_type,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");

        for accept in [None, Some("*/*"), Some("text/plain;version=0.0.4")] {
            let (content_type, body) = metrics(&state, accept).await;
            assert_eq!(
                content_type, "text/plain; version=0.0.4; charset=utf-8",
                "{accept:?}"
            );
            let scrape =
                Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("0.0.4 parses");
            let reconciles = scrape
                .samples
                .iter()
                .find(|s| s.metric == "sagamesh_test_reconciles_total")
                .expect("reconciles");
            assert!(
                matches!(reconciles.value, Value::Counter(v) if v == 1.0),
                "{accept:?}: {:?} in\n{body}",
                reconciles.value
            );
            assert!(
                scrape
                    .samples
                    .iter()
                    .any(|s| s.metric == "sagamesh_test_reconcile_duration_seconds"
                        && matches!(s.value, Value::Histogram(_))),
                "{body}"
            );
        }
    }
}
