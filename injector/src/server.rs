//! The admission webhook: HTTPS, `POST /inject` with an `AdmissionReview` of a Pod, answered
//! with a JSON patch that adds the sidecar (or no patch). A pod the webhook cannot mutate (a bad
//! override annotation) is refused with a message that names the annotation.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use tokio::{net::TcpListener, sync::watch};

use sagamesh_server::{ServeOptions, TlsHandle};

use crate::mutate::{InjectConfig, injection_patch};

/// Largest AdmissionReview accepted (the API server sends at most a few hundred KiB).
const MAX_BODY: usize = 4 << 20;

/// The decision for one review.
pub fn review(
    body: &[u8],
    config: &InjectConfig,
) -> Result<AdmissionReview<kube::core::DynamicObject>, String> {
    let review: AdmissionReview<Pod> = serde_json::from_slice(body)
        .map_err(|e| format!("not an AdmissionReview of a Pod: {e}"))?;
    let request: AdmissionRequest<Pod> = review
        .try_into()
        .map_err(|e| format!("invalid AdmissionReview: {e}"))?;
    let response = AdmissionResponse::from(&request);
    let Some(pod) = &request.object else {
        return Ok(response.into_review());
    };
    let response = match injection_patch(pod, config) {
        Ok(Some(patch)) => match serde_json::from_value::<json_patch::Patch>(patch) {
            Ok(patch) => response
                .with_patch(patch)
                .map_err(|e| format!("serializing the patch: {e}"))?,
            Err(e) => response.deny(format!("internal error building the patch: {e}")),
        },
        Ok(None) => response,
        Err(e) => response.deny(format!("sagamesh sidecar injection: {e}")),
    };
    Ok(response.into_review())
}

async fn handle(req: Request<Incoming>, config: Arc<InjectConfig>) -> Response<Full<Bytes>> {
    let respond = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/inject") => {}
        (&Method::GET, "/healthz") => return respond(StatusCode::OK, "ok\n".into()),
        _ => return respond(StatusCode::NOT_FOUND, "not found\n".into()),
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return respond(StatusCode::PAYLOAD_TOO_LARGE, format!("{e}\n")),
    };
    match review(&body, &config) {
        Ok(review) => match serde_json::to_string(&review) {
            Ok(json) => {
                let mut response = respond(StatusCode::OK, json);
                response.headers_mut().insert(
                    "content-type",
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                response
            }
            Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        Err(e) => respond(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// Serves the webhook on `listener` with the TLS configuration `tls` holds at each accept, until
/// `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: TlsHandle,
    config: InjectConfig,
    shutdown: watch::Receiver<bool>,
) {
    let config = Arc::new(config);
    let options = ServeOptions {
        // The API server calls with its own timeout (10 s by default): a handshake or head
        // slower than that has no one waiting for it.
        header_read_timeout: std::time::Duration::from_secs(10),
        tls: Some(tls),
        ..ServeOptions::default()
    };
    sagamesh_server::serve(listener, options, shutdown, move |_peer| {
        let config = config.clone();
        service_fn(move |req| {
            let config = config.clone();
            async move { Ok::<_, Infallible>(handle(req, config).await) }
        })
    })
    .await
}
