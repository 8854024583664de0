//! `shop-service`: the example services of the Sagamesh demo and the kind example, one binary
//! for four roles.
//!
//! - `users`:     `GET /users/{id}`
//! - `orders`:    `POST /orders`, `PUT /orders/{id}/confirmed`, `DELETE /orders/{id}` (cancel),
//!   `DELETE /orders/by-id/{orderId}`
//! - `inventory`: `POST /reservations`, `DELETE /reservations/{id}` (release),
//!   `DELETE /reservations/by-order/{orderId}`
//! - `payment`:   `POST /charges` (declined with 402 above `--decline-over`), `POST /refunds`
//!
//! Every answer names the instance (`x-instance` header and `"instance"` field), so balancing
//! can be seen. Requests with an `Idempotency-Key` take effect once: a repeated key gets the
//! first answer again. State lives in memory, or in `--state-file` shared by every instance of
//! a service (a file under an exclusive lock, standing in for the service's database).
//! `GET /debug/effects` lists each key's effect count; `GET /healthz` answers 200.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fs::{File, OpenOptions},
    io::{Read, Seek, Write},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Role {
    Users,
    Orders,
    Inventory,
    Payment,
}

/// An example service of the Sagamesh demo.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Args {
    /// Which service to be.
    #[arg(long, env = "SHOP_ROLE", value_enum)]
    pub role: Role,
    /// Address to listen on.
    #[arg(long, env = "SHOP_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Name of this instance, shown in every answer (default: role@address).
    #[arg(long, env = "SHOP_INSTANCE")]
    pub instance: Option<String>,
    /// State shared by every instance of the service (default: in memory).
    #[arg(long, env = "SHOP_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// payment: decline charges above this amount with 402.
    #[arg(long, env = "SHOP_DECLINE_OVER", default_value_t = 1000.0)]
    pub decline_over: f64,
    /// Delay every answer by this many milliseconds (to play a slow instance).
    #[arg(long, env = "SHOP_DELAY_MS", default_value_t = 0)]
    pub delay_ms: u64,
}

/// The service's state: answers by idempotency key, effects, and the business records.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    answers: BTreeMap<String, (u16, Value)>,
    effects: BTreeMap<String, u32>,
    records: BTreeMap<String, Value>,
    next_id: u64,
}

enum Store {
    Memory(Mutex<State>),
    File(Mutex<PathBuf>),
}

impl Store {
    /// Runs `f` on the state: under the in-process lock, and for a file under an exclusive file
    /// lock too, so instances in other processes take turns.
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> anyhow::Result<T> {
        match self {
            Store::Memory(state) => Ok(f(&mut state.lock().unwrap_or_else(|p| p.into_inner()))),
            Store::File(path) => {
                let path = path.lock().unwrap_or_else(|p| p.into_inner());
                let mut file: File = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&*path)
                    .with_context(|| format!("opening {}", path.display()))?;
                file.lock().context("locking the state file")?;
                let mut text = String::new();
                file.read_to_string(&mut text)?;
                let mut state: State = if text.trim().is_empty() {
                    State::default()
                } else {
                    serde_json::from_str(&text).context("reading the state file")?
                };
                let out = f(&mut state);
                file.set_len(0)?;
                file.rewind()?;
                file.write_all(serde_json::to_string(&state)?.as_bytes())?;
                file.sync_data()?;
                file.unlock()?;
                Ok(out)
            }
        }
    }
}

struct Service {
    pub role: Role,
    instance: String,
    pub decline_over: f64,
    delay: Duration,
    store: Store,
}

type Answer = (StatusCode, Value);

impl Service {
    /// Applies one business request to the state; `None` for an unknown route.
    fn apply(
        &self,
        state: &mut State,
        method: &Method,
        path: &str,
        body: &Value,
    ) -> Option<Answer> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let mut new_id = |prefix: &str| {
            state.next_id += 1;
            format!("{prefix}-{}", state.next_id)
        };
        let answer = match (self.role, method, segments.as_slice()) {
            (Role::Users, &Method::GET, ["users", id]) => (
                StatusCode::OK,
                json!({"id": id, "name": format!("user {id}")}),
            ),
            (Role::Orders, &Method::POST, ["orders"]) => {
                let id = new_id("ord");
                let order = json!({"id": id, "orderId": body["orderId"], "items": body["items"], "status": "created"});
                state.records.insert(id.clone(), order.clone());
                (StatusCode::CREATED, order)
            }
            (Role::Orders, &Method::PUT, ["orders", id, "confirmed"]) => {
                self.set_status(state, id, "confirmed")
            }
            (Role::Orders, &Method::DELETE, ["orders", "by-id", order_id]) => {
                let found = state
                    .records
                    .iter()
                    .find(|(_, o)| o["orderId"] == *order_id)
                    .map(|(k, _)| k.clone());
                match found {
                    Some(id) => self.set_status(state, &id, "cancelled"),
                    None => (
                        StatusCode::OK,
                        json!({"orderId": order_id, "status": "nothing to cancel"}),
                    ),
                }
            }
            (Role::Orders, &Method::DELETE, ["orders", id]) => {
                self.set_status(state, id, "cancelled")
            }
            (Role::Orders, &Method::GET, ["orders", id]) => match state.records.get(*id) {
                Some(order) => (StatusCode::OK, order.clone()),
                None => (StatusCode::NOT_FOUND, json!({"error": "no such order"})),
            },
            (Role::Inventory, &Method::POST, ["reservations"]) => {
                let id = new_id("res");
                let reservation = json!({"id": id, "order": body["order"], "sku": body["sku"], "qty": body["qty"], "status": "reserved"});
                state.records.insert(id.clone(), reservation.clone());
                (StatusCode::CREATED, reservation)
            }
            (Role::Inventory, &Method::DELETE, ["reservations", "by-order", order]) => {
                let ids: Vec<_> = state
                    .records
                    .iter()
                    .filter(|(_, r)| r["order"] == *order)
                    .map(|(k, _)| k.clone())
                    .collect();
                for id in &ids {
                    self.set_status(state, id, "released");
                }
                (StatusCode::OK, json!({"order": order, "released": ids}))
            }
            (Role::Inventory, &Method::DELETE, ["reservations", id]) => {
                self.set_status(state, id, "released")
            }
            (Role::Payment, &Method::POST, ["charges"]) => {
                let amount = body["amount"].as_f64().unwrap_or(0.0);
                if amount > self.decline_over {
                    (
                        StatusCode::PAYMENT_REQUIRED,
                        json!({"error": "card declined", "amount": amount, "limit": self.decline_over}),
                    )
                } else {
                    let id = new_id("ch");
                    let charge = json!({"id": id, "amount": amount, "status": "charged"});
                    state.records.insert(id.clone(), charge.clone());
                    (StatusCode::CREATED, charge)
                }
            }
            (Role::Payment, &Method::POST, ["refunds"]) => match body["charge"].as_str() {
                Some(charge) => self.set_status(state, charge, "refunded"),
                None => (
                    StatusCode::BAD_REQUEST,
                    json!({"error": "body needs \"charge\""}),
                ),
            },
            _ => return None,
        };
        Some(answer)
    }

    fn set_status(&self, state: &mut State, id: &str, status: &str) -> Answer {
        match state.records.get_mut(id) {
            Some(record) => {
                record["status"] = json!(status);
                (StatusCode::OK, record.clone())
            }
            None => (
                StatusCode::NOT_FOUND,
                json!({"error": format!("no record {id}")}),
            ),
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let key = req
            .headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let answer = match Limited::new(req.into_body(), 1 << 20).collect().await {
            Err(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": "body over 1 MiB"}),
            ),
            Ok(body) => {
                let body = body.to_bytes();
                let body: Value = if body.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&body).unwrap_or(Value::Null)
                };
                self.answer(&method, &path, key, &body)
            }
        };
        let mut value = answer.1;
        if let Value::Object(map) = &mut value {
            map.insert("instance".into(), json!(self.instance));
        }
        let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
        *response.status_mut() = answer.0;
        let headers = response.headers_mut();
        headers.insert(
            "content-type",
            hyper::header::HeaderValue::from_static("application/json"),
        );
        if let Ok(instance) = self.instance.parse() {
            headers.insert("x-instance", instance);
        }
        response
    }

    fn answer(&self, method: &Method, path: &str, key: Option<String>, body: &Value) -> Answer {
        match (method, path) {
            (&Method::GET, "/healthz") => return (StatusCode::OK, json!({"ok": true})),
            (&Method::GET, "/debug/effects") => {
                return match self
                    .store
                    .with(|s| json!({"effects": s.effects, "records": s.records}))
                {
                    Ok(v) => (StatusCode::OK, v),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        json!({"error": format!("{e:#}")}),
                    ),
                };
            }
            _ => {}
        }
        let result = self.store.with(|state| {
            if let Some(key) = &key
                && let Some((status, value)) = state.answers.get(key)
            {
                return (
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::OK),
                    value.clone(),
                );
            }
            let Some(answer) = self.apply(state, method, path, body) else {
                return (
                    StatusCode::NOT_FOUND,
                    json!({"error": format!("no route {method} {path}")}),
                );
            };
            // Only effects are remembered: a refusal (4xx/5xx) may be retried with the same key.
            if let Some(key) = key
                && answer.0.is_success()
            {
                *state.effects.entry(key.clone()).or_default() += 1;
                state
                    .answers
                    .insert(key, (answer.0.as_u16(), answer.1.clone()));
            }
            answer
        });
        result.unwrap_or_else(|e| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": format!("{e:#}")}),
            )
        })
    }
}

/// Serves until SIGTERM or Ctrl-C.
pub async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let service = Arc::new(Service {
        role: args.role,
        instance: args
            .instance
            .unwrap_or_else(|| format!("{:?}@{}", args.role, args.listen).to_lowercase()),
        decline_over: args.decline_over,
        delay: Duration::from_millis(args.delay_ms),
        store: match args.state_file {
            Some(path) => Store::File(Mutex::new(path)),
            None => Store::Memory(Mutex::default()),
        },
    });
    eprintln!("{} listening on {}", service.instance, args.listen);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let service = service.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let service = service.clone();
                        async move { Ok::<_, Infallible>(service.handle(req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            _ = sigterm.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
