//! The admin HTTP server: `/metrics` (Prometheus text), `/healthz` (the process serves) and
//! `/readyz` (the index has listed every kind once, so discovery answers with full state).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sagamesh_mesh::exposition;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// What the admin endpoints report on.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub ready: watch::Receiver<bool>,
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
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
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n".into());
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
                "encoding failed\n".into(),
            ),
        },
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => {
            if *state.ready.borrow() {
                text(StatusCode::OK, PLAIN, "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "initial sync not done\n".into(),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` turns `true`.
pub async fn serve(listener: TcpListener, state: AdminState, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let accept = req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let resp = respond(&state, req.method(), req.uri().path(), accept);
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let (tx, ready) = watch::channel(false);
        let state = AdminState {
            metrics: Arc::new(Metrics::default()),
            ready,
        };
        assert_eq!(
            respond(&state, &Method::GET, "/healthz", None).status(),
            StatusCode::OK
        );
        assert_eq!(
            respond(&state, &Method::GET, "/readyz", None).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        tx.send_replace(true);
        assert_eq!(
            respond(&state, &Method::GET, "/readyz", None).status(),
            StatusCode::OK
        );
        assert_eq!(
            respond(&state, &Method::GET, "/metrics", None).status(),
            StatusCode::OK
        );
        assert_eq!(
            respond(&state, &Method::GET, "/x", None).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            respond(&state, &Method::POST, "/metrics", None).status(),
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
        let state = AdminState {
            metrics: Arc::new(Metrics::default()),
            ready,
        };
        drop(state.metrics.reconcile_timer());

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
                .find(|s| s.metric == "sagamesh_operator_reconciles_total")
                .expect("reconciles");
            assert!(
                matches!(reconciles.value, Value::Counter(v) if v == 1.0),
                "{accept:?}: {:?} in\n{body}",
                reconciles.value
            );
            assert!(
                scrape.samples.iter().any(|s| s.metric
                    == "sagamesh_operator_reconcile_duration_seconds"
                    && matches!(s.value, Value::Histogram(_))),
                "{body}"
            );
        }
    }
}
