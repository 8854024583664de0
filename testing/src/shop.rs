//! Real HTTP test services for saga and local-mode tests: each records every request with its idempotency key,
//! applies each key's effect once (a repeated key gets the stored answer), and fails on command.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming};
use serde_json::{Value, json};

use crate::server::{TestServer, handler};

/// How a path prefix misbehaves.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Always answer with this status (no effect applied).
    Always(u16),
    /// Fail the first N requests with 503, then behave.
    FirstN(u32),
    /// Answer after this delay (effect applied first).
    Delay(Duration),
}

#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub key: Option<String>,
    pub traceparent: Option<String>,
    pub body: Value,
}

#[derive(Default)]
struct State {
    log: Vec<Received>,
    /// Effects applied, per idempotency key.
    effects: HashMap<String, u32>,
    answers: HashMap<String, (u16, Value)>,
    faults: Vec<(String, Fault)>,
    next_id: u64,
}

/// One test service on 127.0.0.1, served by a [`TestServer`] (HTTP/1.1 and h2c, its own
/// runtime); it stops when the last clone is dropped.
#[derive(Clone)]
pub struct TestService {
    pub name: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _server: Arc<TestServer>,
}

/// What the request handler needs (not the server itself, which owns the handler).
struct Shared {
    name: String,
    state: Mutex<State>,
}

impl TestService {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            name: name.to_string(),
            state: Mutex::default(),
        });
        let answer = {
            let shared = shared.clone();
            handler(move |req| {
                let shared = shared.clone();
                async move { shared.handle(req).await }
            })
        };
        let server = TestServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), answer);
        Ok(Self {
            name: name.to_string(),
            addr: server.addr(),
            shared,
            _server: Arc::new(server),
        })
    }

    pub fn fault(&self, path_prefix: &str, fault: Fault) {
        self.lock().faults.push((path_prefix.to_string(), fault));
    }

    pub fn log(&self) -> Vec<Received> {
        self.lock().log.clone()
    }

    pub fn effects(&self) -> HashMap<String, u32> {
        self.lock().effects.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.lock()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let key = header("idempotency-key");
        let traceparent = header("traceparent");
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (fault, answer) = {
            let mut state = self.lock();
            state.log.push(Received {
                method: method.clone(),
                path: path.clone(),
                key: key.clone(),
                traceparent,
                body: body.clone(),
            });
            let mut fault = None;
            for (prefix, f) in state.faults.iter_mut() {
                if path.starts_with(prefix.as_str()) {
                    match f {
                        Fault::FirstN(0) => {}
                        Fault::FirstN(n) => {
                            *n -= 1;
                            fault = Some(Fault::Always(503));
                        }
                        other => fault = Some(other.clone()),
                    }
                }
            }
            let answer = match (&fault, &key) {
                (Some(Fault::Always(status)), _) => (*status, json!({"error": "injected"})),
                (_, Some(key)) if state.answers.contains_key(key) => state.answers[key].clone(),
                (_, key) => {
                    state.next_id += 1;
                    let answer = (
                        200,
                        json!({"id": format!("{}-{}", self.name, state.next_id), "path": path, "echo": body}),
                    );
                    if let Some(key) = key {
                        *state.effects.entry(key.clone()).or_default() += 1;
                        state.answers.insert(key.clone(), answer.clone());
                    }
                    answer
                }
            };
            (fault, answer)
        };
        if let Some(Fault::Delay(d)) = fault {
            tokio::time::sleep(d).await;
        }
        let mut response = Response::new(Full::new(Bytes::from(answer.1.to_string())));
        *response.status_mut() = hyper::StatusCode::from_u16(answer.0)
            .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        response
    }
}
