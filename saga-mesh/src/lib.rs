//! Saga calls through the mesh: [`MeshCaller`] sends each call with the sidecar's own
//! [`MeshClient`] — the same discovery, balancing, circuit breaking, retry budget and timeouts
//! every sidecar applies — so a saga step is just another caller of the service.
//!
//! One layer retries: the engine. Each attempt it makes is one request to the service (the
//! step's `retry.attempts` is what the service sees at most); the mesh retries a saga call only
//! when it could not connect (nothing was sent), moving it to another endpoint.

use http_body_util::BodyExt;
use hyper::{Method, Request};
use sagamesh_api::saga::HttpMethod;
use sagamesh_discovery::name::{PortRef, ServiceKey, Target};
use sagamesh_mesh::{
    MeshClient,
    body::{self, BoxBody},
    retry::CallerRetries,
};

use sagamesh_saga::{CallOutcome, CallRequest, ServiceCaller};

/// Largest response body read from a saga call (outputs beyond 4 KiB are not kept anyway).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// A [`ServiceCaller`] over the sidecar's client.
#[derive(Clone)]
pub struct MeshCaller {
    client: MeshClient,
}

impl MeshCaller {
    pub fn new(client: MeshClient) -> Self {
        Self { client }
    }

    /// The client, e.g. for its metrics.
    pub fn client(&self) -> &MeshClient {
        &self.client
    }
}

fn method(m: HttpMethod) -> Method {
    match m {
        HttpMethod::Get => Method::GET,
        HttpMethod::Post => Method::POST,
        HttpMethod::Put => Method::PUT,
        HttpMethod::Patch => Method::PATCH,
        HttpMethod::Delete => Method::DELETE,
    }
}

impl ServiceCaller for MeshCaller {
    async fn call(&self, request: CallRequest) -> CallOutcome {
        let key = ServiceKey::new(request.namespace.clone(), request.service.clone());
        // A named port is resolved by the client from the service's ports.
        let target = Target::new(key.clone(), request.port.clone().map(PortRef::Name));
        // The engine counts and backs off a step's attempts; the mesh only moves a call that
        // could not connect to another endpoint.
        let mut builder = Request::builder()
            .extension(CallerRetries)
            .method(method(request.method))
            .uri(format!(
                "http://{}.{}{}",
                key.name, key.namespace, request.path
            ));
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        let body: BoxBody = match request.body {
            Some(bytes) => body::full(bytes),
            None => body::empty(),
        };
        let req = match builder.body(body) {
            Ok(req) => req,
            Err(e) => {
                return CallOutcome::NoAnswer {
                    error: format!("bad request: {e}"),
                    maybe_delivered: false,
                };
            }
        };
        match self.client.send(&target, req).await {
            Ok(response) => {
                let status = response.status().as_u16();
                let limited =
                    http_body_util::Limited::new(response.into_body(), MAX_RESPONSE_BYTES);
                match limited.collect().await {
                    Ok(body) => CallOutcome::Answered {
                        status,
                        body: body.to_bytes().to_vec(),
                    },
                    Err(e) => CallOutcome::NoAnswer {
                        error: format!("reading the answer: {e}"),
                        maybe_delivered: true,
                    },
                }
            }
            Err(error) => CallOutcome::NoAnswer {
                error: format!("{error} ({})", error.code()),
                // Failures the mesh decided before sending cannot have taken effect.
                maybe_delivered: error.maybe_delivered(),
            },
        }
    }

    async fn has_service(&self, namespace: &str, service: &str) -> bool {
        self.client
            .has_service(&ServiceKey::new(namespace, service))
            .await
    }
}
