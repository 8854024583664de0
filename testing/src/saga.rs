//! A direct caller for the saga engine's tests, over the test services of [`crate::shop`].

use std::{collections::HashMap, net::SocketAddr};

pub use crate::shop::{Fault, TestService};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use sagamesh_saga::{CallOutcome, CallRequest, ServiceCaller};

/// A caller that reaches test services by name on 127.0.0.1 (plain HTTP, no mesh policy): the
/// engine's own retry, timeout and compensation logic is what these tests exercise.
#[derive(Clone)]
pub struct DirectCaller {
    services: HashMap<String, SocketAddr>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl DirectCaller {
    pub fn new(services: &[&TestService]) -> Self {
        Self {
            services: services.iter().map(|s| (s.name.clone(), s.addr)).collect(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl ServiceCaller for DirectCaller {
    async fn call(&self, request: CallRequest) -> CallOutcome {
        let Some(addr) = self.services.get(&request.service) else {
            return CallOutcome::NoAnswer {
                error: format!("unknown service {}", request.service),
                maybe_delivered: false,
            };
        };
        let method = format!("{:?}", request.method).to_uppercase();
        let mut builder = Request::builder()
            .method(method.as_str())
            .uri(format!("http://{addr}{}", request.path));
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        let req = match builder.body(Full::new(Bytes::from(request.body.unwrap_or_default()))) {
            Ok(req) => req,
            Err(e) => {
                return CallOutcome::NoAnswer {
                    error: e.to_string(),
                    maybe_delivered: false,
                };
            }
        };
        match self.client.request(req).await {
            Ok(response) => {
                let status = response.status().as_u16();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes().to_vec())
                    .unwrap_or_default();
                CallOutcome::Answered { status, body }
            }
            Err(e) => CallOutcome::NoAnswer {
                error: e.to_string(),
                maybe_delivered: !e.is_connect(),
            },
        }
    }

    async fn has_service(&self, _namespace: &str, service: &str) -> bool {
        self.services.contains_key(service)
    }
}
