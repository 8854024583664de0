//! The executor: drives one saga from whatever its stored status says to a terminal phase.
//!
//! Durability: every [`Event`] is folded into the status and written with
//! [`SagaStore::save`] (which must be durable when it returns) before the engine acts on it. In
//! particular `CallStarted` is stored before the request is sent and the call's result before the
//! next step begins, so a process killed anywhere resumes from the status with [`run`]. A call
//! that was in flight is sent again with the same `Idempotency-Key`: delivery is at-least-once,
//! never exactly-once; services deduplicate by key.

use std::{future::Future, time::Duration};

use k8s_openapi::jiff::Timestamp;
use sagamesh_api::trace_context::{TRACEPARENT, TraceContext, hex_decode};
use sagamesh_api::{
    backoff::{Backoff, Jitter},
    duration,
    saga::{HttpCall, HttpMethod, MAX_OUTPUT_BYTES, SagaPhase, SagaSpec, SagaStatus},
};
use serde_json::Value;

use crate::{
    state::{Call, Event, Next, apply, next},
    template::{self, Reference, Scope},
};

/// The saga being run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Why the store could not save.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Someone else changed the saga (another leader, a deletion): stop running it here.
    #[error("the saga was changed or removed elsewhere: {0}")]
    Conflict(String),
    #[error("could not save the saga status: {0}")]
    Unavailable(String),
}

/// Where saga status lives (the Saga's status subresource, or the local on-disk store).
pub trait SagaStore: Send + Sync {
    /// Durably records `status`, reached by `event`, before returning.
    fn save(
        &self,
        saga: &SagaRef,
        status: &SagaStatus,
        event: &Event,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// One HTTP call to a registered service.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRequest {
    /// Namespace of the service (the saga's own unless the call names `name.namespace`).
    pub namespace: String,
    pub service: String,
    pub port: Option<String>,
    pub method: HttpMethod,
    pub path: String,
    /// Headers, including `Idempotency-Key` and `traceparent`.
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub timeout: Duration,
}

/// What came back from a call.
#[derive(Debug, Clone, PartialEq)]
pub enum CallOutcome {
    Answered {
        status: u16,
        body: Vec<u8>,
    },
    /// No HTTP answer. `maybe_delivered`: the request may have reached the service (timeout,
    /// connection broken after sending); false when it surely did not (connection refused).
    NoAnswer {
        error: String,
        maybe_delivered: bool,
    },
}

/// Sends saga calls through the mesh's balancing, breaker and retry policy.
pub trait ServiceCaller: Send + Sync {
    fn call(&self, request: CallRequest) -> impl Future<Output = CallOutcome> + Send;
    /// Whether `service` is registered in `namespace` (validation before any call).
    fn has_service(&self, namespace: &str, service: &str) -> impl Future<Output = bool> + Send;
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub default_step_timeout: Duration,
    pub default_attempts: u32,
    pub default_backoff: Duration,
    pub default_max_backoff: Duration,
    /// Attempts of a compensation before the saga is left `Failed` for a person.
    pub compensation_attempts: u32,
    /// Randomize backoff (full jitter). Tests turn it off for repeatable timing.
    pub jitter: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            default_step_timeout: Duration::from_secs(10),
            default_attempts: 3,
            default_backoff: Duration::from_millis(100),
            default_max_backoff: Duration::from_secs(5),
            compensation_attempts: 5,
            jitter: true,
        }
    }
}

/// Why a run stopped before the saga was terminal.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The `Idempotency-Key` of a call: `<saga uid>/<step>/<action|compensation>`.
pub fn idempotency_key(uid: &str, step: &str, call: Call) -> String {
    format!("{uid}/{step}/{}", call.kind())
}

/// Checks what the CRD's rules cannot: every service is registered, every template refers to
/// an earlier step (or, in a compensation, its own) and to input that exists.
pub async fn validate<C: ServiceCaller>(
    saga: &SagaRef,
    spec: &SagaSpec,
    caller: &C,
) -> Result<(), String> {
    let position = |name: &str| spec.steps.iter().position(|s| s.name == name);
    for (i, step) in spec.steps.iter().enumerate() {
        let calls = [
            ("action", Some(&step.action)),
            ("compensation", step.compensation.as_ref()),
        ];
        for (kind, call) in calls {
            let Some(call) = call else { continue };
            let (namespace, service) = split_service(&saga.namespace, &call.service);
            if !caller.has_service(&namespace, &service).await {
                return Err(format!(
                    "step {:?} {kind}: service {:?} is not registered in namespace {namespace:?}",
                    step.name, service
                ));
            }
            let mut refs = template::references(&call.path)
                .map_err(|e| format!("step {:?} {kind} path: {e}", step.name))?;
            for header in call.headers.iter().flatten() {
                refs.extend(template::references(&header.value).map_err(|e| {
                    format!("step {:?} {kind} header {}: {e}", step.name, header.name)
                })?);
            }
            if let Some(body) = &call.body {
                refs.extend(
                    template::json_references(body)
                        .map_err(|e| format!("step {:?} {kind} body: {e}", step.name))?,
                );
            }
            for (expression, reference) in refs {
                let fail = |why: String| {
                    Err(format!(
                        "step {:?} {kind}: {{{{ {expression} }}}}: {why}",
                        step.name
                    ))
                };
                match reference {
                    Reference::StepOutput { step: target, .. } => match position(&target) {
                        None => return fail(format!("unknown step {target:?}")),
                        Some(j) if j > i || (j == i && kind == "action") => {
                            return fail(format!("step {target:?} has not run yet at this point"));
                        }
                        Some(_) => {}
                    },
                    Reference::Input(_) => {
                        let scope = Scope {
                            input: spec.input.as_ref(),
                            ..Default::default()
                        };
                        if let Err(e) =
                            template::render_text(&format!("{{{{ {expression} }}}}"), &scope)
                        {
                            return fail(e.reason);
                        }
                    }
                    Reference::Saga(_) => {}
                }
            }
        }
    }
    Ok(())
}

fn split_service(saga_namespace: &str, service: &str) -> (String, String) {
    match service.split_once('.') {
        Some((name, namespace)) => (namespace.to_string(), name.to_string()),
        None => (saga_namespace.to_string(), service.to_string()),
    }
}

struct Runner<'a, S, C> {
    saga: &'a SagaRef,
    spec: &'a SagaSpec,
    store: &'a S,
    caller: &'a C,
    config: &'a EngineConfig,
    status: SagaStatus,
}

/// Runs the saga from `status` until it is terminal (or the store refuses a write).
pub async fn run<S: SagaStore, C: ServiceCaller>(
    saga: &SagaRef,
    spec: &SagaSpec,
    status: SagaStatus,
    store: &S,
    caller: &C,
    config: &EngineConfig,
) -> Result<SagaStatus, EngineError> {
    let mut runner = Runner {
        saga,
        spec,
        store,
        caller,
        config,
        status,
    };
    runner.run().await?;
    Ok(runner.status)
}

impl<S: SagaStore, C: ServiceCaller> Runner<'_, S, C> {
    async fn record(&mut self, event: Event) -> Result<(), StoreError> {
        apply(self.spec, &mut self.status, &event, Timestamp::now());
        self.store.save(self.saga, &self.status, &event).await
    }

    fn deadline(&self) -> Option<Timestamp> {
        let deadline = duration::parse(self.spec.deadline.as_deref()?).ok()?;
        let started = self.status.started_at.as_ref()?.0;
        let span = k8s_openapi::jiff::SignedDuration::try_from(deadline).ok()?;
        started.checked_add(span).ok()
    }

    fn time_left(&self) -> Option<Duration> {
        let deadline = self.deadline()?;
        let left = deadline.duration_since(Timestamp::now());
        Some(Duration::try_from(left).unwrap_or(Duration::ZERO))
    }

    async fn run(&mut self) -> Result<(), StoreError> {
        loop {
            if self.status.phase == SagaPhase::Running && self.time_left() == Some(Duration::ZERO) {
                self.record(Event::DeadlineExceeded).await?;
                continue;
            }
            match next(self.spec, &self.status) {
                Next::Done(_) => return Ok(()),
                Next::Start => {
                    let event = match validate(self.saga, self.spec, self.caller).await {
                        Ok(()) => Event::Started {
                            trace_id: TraceContext::new_root().trace_id_hex(),
                        },
                        Err(reason) => Event::Invalid { reason },
                    };
                    self.record(event).await?;
                }
                Next::Send { call, attempt } => self.send(call, attempt).await?,
            }
        }
    }

    fn max_attempts(&self, call: Call) -> u32 {
        let step = &self.spec.steps[call.step()];
        let configured = step
            .retry
            .as_ref()
            .map(|r| r.attempts)
            .unwrap_or(self.config.default_attempts);
        match call {
            Call::Action(_) => configured.max(1),
            Call::Compensation(_) => configured.max(self.config.compensation_attempts),
        }
    }

    fn backoff(&self, call: Call, attempt: u32) -> Duration {
        let retry = self.spec.steps[call.step()].retry.as_ref();
        let parse = |s: Option<&String>, default| {
            s.and_then(|s| duration::parse(s).ok()).unwrap_or(default)
        };
        let base = parse(
            retry.and_then(|r| r.backoff.as_ref()),
            self.config.default_backoff,
        );
        let max = parse(
            retry.and_then(|r| r.max_backoff.as_ref()),
            self.config.default_max_backoff,
        );
        let jitter = if self.config.jitter {
            Jitter::Equal
        } else {
            Jitter::None
        };
        Backoff::new(base, max, jitter).delay(attempt)
    }

    fn scope(&self) -> Scope<'_> {
        Scope {
            input: self.spec.input.as_ref(),
            outputs: self
                .status
                .steps
                .iter()
                .filter_map(|s| s.action.output.as_ref().map(|o| (s.name.as_str(), o)))
                .collect(),
            saga_name: &self.saga.name,
            saga_namespace: &self.saga.namespace,
            saga_uid: &self.saga.uid,
        }
    }

    fn build_request(&self, call: Call, http: &HttpCall) -> Result<CallRequest, String> {
        let step = &self.spec.steps[call.step()];
        let scope = self.scope();
        let path = template::render_path(&http.path, &scope).map_err(|e| format!("path: {e}"))?;
        let mut headers = Vec::new();
        for header in http.headers.iter().flatten() {
            let value = template::render_header(&header.value, &scope)
                .map_err(|e| format!("header {}: {e}", header.name))?;
            headers.push((header.name.clone(), value));
        }
        headers.push((
            "Idempotency-Key".into(),
            idempotency_key(&self.saga.uid, &step.name, call),
        ));
        // One trace per saga (its id kept in the status), a new span per call.
        let mut context = TraceContext::new_root();
        if let Some(trace_id) = self.status.trace_id.as_deref().and_then(hex_decode::<16>) {
            context.trace_id = trace_id;
        }
        headers.push((TRACEPARENT.into(), context.to_header()));
        let body = match &http.body {
            Some(body) => {
                let rendered =
                    template::render_json(body, &scope).map_err(|e| format!("body: {e}"))?;
                headers.push(("content-type".into(), "application/json".into()));
                Some(serde_json::to_vec(&rendered).map_err(|e| format!("body: {e}"))?)
            }
            None => None,
        };
        let step_timeout = step
            .timeout
            .as_deref()
            .and_then(|t| duration::parse(t).ok())
            .unwrap_or(self.config.default_step_timeout);
        let timeout = match (call, self.time_left()) {
            (Call::Action(_), Some(left)) => step_timeout.min(left),
            _ => step_timeout,
        };
        let (namespace, service) = split_service(&self.saga.namespace, &http.service);
        Ok(CallRequest {
            namespace,
            service,
            port: http.port.clone(),
            method: http.method,
            path,
            headers,
            body,
            timeout,
        })
    }

    async fn send(&mut self, call: Call, attempt: u32) -> Result<(), StoreError> {
        let step = &self.spec.steps[call.step()];
        let http = match call {
            Call::Action(_) => Some(&step.action),
            Call::Compensation(_) => step.compensation.as_ref(),
        };
        let Some(http) = http else {
            return self
                .record(Event::CompensationSkipped { step: call.step() })
                .await;
        };
        if attempt > self.max_attempts(call) {
            // Only after a restart: the last attempt was sent and its answer was never recorded.
            let error = format!(
                "{} attempts made; the last one's outcome is unknown",
                attempt - 1
            );
            return self
                .record(Event::CallFailed {
                    call,
                    http_status: None,
                    error,
                    in_doubt: true,
                })
                .await;
        }
        let request = match self.build_request(call, http) {
            Ok(request) => request,
            Err(error) => {
                let error = format!("template of step {:?} {}: {error}", step.name, call.kind());
                return self
                    .record(Event::CallFailed {
                        call,
                        http_status: None,
                        error,
                        in_doubt: false,
                    })
                    .await;
            }
        };
        let timeout = request.timeout;
        self.record(Event::CallStarted { call, attempt }).await?;
        tracing::debug!(saga = %self.saga.name, step = %step.name, call = call.kind(), attempt, "sending");
        let outcome = match tokio::time::timeout(timeout, self.caller.call(request)).await {
            Ok(outcome) => outcome,
            Err(_) => CallOutcome::NoAnswer {
                error: format!("no answer within {}", duration::format(timeout)),
                maybe_delivered: true,
            },
        };
        let (http_status, error, retryable, in_doubt) = match outcome {
            CallOutcome::Answered { status, body } if (200..300).contains(&status) => {
                let (output, note) = match call {
                    Call::Action(_) => parse_output(&body),
                    Call::Compensation(_) => (None, None),
                };
                return self
                    .record(Event::CallSucceeded {
                        call,
                        http_status: status,
                        output,
                        note,
                    })
                    .await;
            }
            CallOutcome::Answered { status, body } => {
                let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                let retryable = status >= 500 || status == 408 || status == 429;
                (
                    Some(status),
                    format!("HTTP {status}: {text}"),
                    retryable,
                    false,
                )
            }
            CallOutcome::NoAnswer {
                error,
                maybe_delivered,
            } => (None, error, true, maybe_delivered),
        };
        if matches!(call, Call::Action(_)) && self.time_left() == Some(Duration::ZERO) {
            return self.record(Event::DeadlineExceeded).await;
        }
        if retryable && attempt < self.max_attempts(call) {
            self.record(Event::AttemptFailed {
                call,
                http_status,
                error,
            })
            .await?;
            let mut wait = self.backoff(call, attempt);
            if let (Call::Action(_), Some(left)) = (call, self.time_left()) {
                wait = wait.min(left);
            }
            tokio::time::sleep(wait).await;
            return Ok(());
        }
        self.record(Event::CallFailed {
            call,
            http_status,
            error,
            in_doubt,
        })
        .await
    }
}

/// A step's output: its JSON body (a non-JSON body is kept as a string), unless larger than
/// [`MAX_OUTPUT_BYTES`].
fn parse_output(body: &[u8]) -> (Option<Value>, Option<String>) {
    if body.is_empty() {
        return (None, None);
    }
    if body.len() > MAX_OUTPUT_BYTES {
        let note = format!(
            "output of {} bytes was not kept (limit {MAX_OUTPUT_BYTES})",
            body.len()
        );
        return (None, Some(note));
    }
    match serde_json::from_slice(body) {
        Ok(value) => (Some(value), None),
        Err(_) => (
            Some(Value::String(String::from_utf8_lossy(body).into_owned())),
            None,
        ),
    }
}
