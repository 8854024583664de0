//! The admin listener: `/metrics`, `/ready`, `/live`, `/debug/discovery`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use bytes::Bytes;
use http_body_util::Full;
use sagamesh_mesh::client::MeshClient;
use sagamesh_server::admin::text;
use sagamesh_server::exposition;

/// Admin handler state.
#[derive(Clone)]
pub struct Admin {
    pub client: MeshClient,
    /// Set when the sidecar starts draining: `/ready` turns 503.
    pub draining: Arc<AtomicBool>,
}

impl Admin {
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
        }
        match req.uri().path() {
            "/metrics" => {
                let accept = req
                    .headers()
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let (content_type, body) =
                    exposition::render(self.client.metrics().encode(), accept);
                text(StatusCode::OK, content_type, body)
            }
            "/live" => text(StatusCode::OK, "text/plain", "live\n"),
            "/ready" => {
                if self.draining.load(Ordering::Relaxed) {
                    text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
                } else if !self.client.discover().is_ready() {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "discovery not loaded\n",
                    )
                } else {
                    text(StatusCode::OK, "text/plain", "ready\n")
                }
            }
            "/debug/discovery" => {
                let doc = serde_json::json!({
                    "discovery": self.client.discover().debug_state(),
                    "destinations": self.client.debug_state(),
                });
                text(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec_pretty(&doc).unwrap_or_default(),
                )
            }
            _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }
}
