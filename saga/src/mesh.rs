//! Saga calls through the mesh: [`MeshCaller`] sends each call with the sidecar's own
//! [`MeshClient`] — the same discovery, balancing, circuit breaking, retry budget and timeouts
//! every sidecar applies — so a saga step is just another caller of the service.

use std::{sync::Arc, time::Duration};

use http_body_util::BodyExt;
use hyper::{Method, Request};
use sagamesh_api::saga::HttpMethod;
use sagamesh_sidecar::{
    MeshClient, MeshError,
    body::{self, BoxBody},
    discovery::Resolution,
    name::{PortRef, ServiceKey, Target},
};

use crate::engine::{CallOutcome, CallRequest, ServiceCaller};

/// Largest response body read from a saga call (outputs beyond 4 KiB are not kept anyway).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// A [`ServiceCaller`] over the sidecar's client.
#[derive(Clone)]
pub struct MeshCaller {
    client: MeshClient,
    /// How long to wait for discovery's first answer about a service.
    discovery_wait: Duration,
}

impl MeshCaller {
    pub fn new(client: MeshClient) -> Self {
        Self {
            client,
            discovery_wait: Duration::from_secs(5),
        }
    }

    /// The service's state, waiting up to `discovery_wait` for a first answer.
    async fn resolve(&self, key: &ServiceKey) -> Resolution {
        let mut rx = self.client.discover().watch(key);
        let wait = async {
            loop {
                let current = rx.borrow_and_update().clone();
                if current != Resolution::Pending {
                    return current;
                }
                if rx.changed().await.is_err() {
                    return Resolution::Pending;
                }
            }
        };
        tokio::time::timeout(self.discovery_wait, wait)
            .await
            .unwrap_or(Resolution::Pending)
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
        let authority = format!("{}.{}", key.name, key.namespace);
        let mut builder = Request::builder()
            .method(method(request.method))
            .uri(format!("http://{authority}{}", request.path));
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
            Err(error) => {
                // Failures the mesh decided before sending anything cannot have taken effect;
                // anything else (timeout, reset, budget spent after such) may have.
                let maybe_delivered = !matches!(
                    error,
                    MeshError::UnknownService(_)
                        | MeshError::NoEndpoints(_)
                        | MeshError::CircuitOpen(_)
                        | MeshError::Overloaded(_)
                        | MeshError::ConnectFailure { .. }
                        | MeshError::BadRequest(_)
                        | MeshError::BodyTooLarge
                );
                CallOutcome::NoAnswer {
                    error: format!("{} ({})", error, error.code()),
                    maybe_delivered,
                }
            }
        }
    }

    async fn has_service(&self, namespace: &str, service: &str) -> bool {
        matches!(
            self.resolve(&ServiceKey::new(namespace, service)).await,
            Resolution::Snapshot { .. }
        )
    }
}

/// A shared caller for the engine.
pub fn mesh_caller(client: MeshClient) -> Arc<MeshCaller> {
    Arc::new(MeshCaller::new(client))
}
