//! Failures the mesh itself produces, each with an HTTP status and the `x-sagamesh-error` value
//! that names its cause. Every variant has a fixed label, so metrics stay bounded.

use http::StatusCode;

/// The header on every response the sidecar makes itself.
pub const ERROR_HEADER: &str = "x-sagamesh-error";

/// A failure produced by the mesh rather than by the destination service.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// No ServiceRegistration of that name (or discovery never answered for it).
    #[error("unknown service {0}")]
    UnknownService(String),
    /// The service exists but has no ready endpoint on the requested port.
    #[error("service {0} has no ready endpoints")]
    NoEndpoints(String),
    /// Every endpoint is ejected by its circuit breaker.
    #[error("every endpoint of {0} is ejected (circuit open)")]
    CircuitOpen(String),
    /// A retry was needed but the retry budget is spent.
    #[error("retry budget of {service} exhausted after: {last}")]
    BudgetExhausted {
        service: String,
        last: String,
        /// An earlier attempt may have reached the service.
        maybe_delivered: bool,
    },
    /// The overall deadline (or the last per-try timeout) passed.
    #[error("request to {0} timed out")]
    Timeout(String),
    /// Too many requests in flight to the destination.
    #[error("too many requests in flight to {0}")]
    Overloaded(String),
    /// No connection could be made to the endpoint.
    #[error("connect to {endpoint} failed: {reason}")]
    ConnectFailure {
        endpoint: String,
        reason: String,
        /// An earlier attempt (before retries) may have reached the service.
        maybe_delivered: bool,
    },
    /// The endpoint reset or closed the connection before answering.
    #[error("{endpoint} reset the request: {reason}")]
    Reset { endpoint: String, reason: String },
    /// The request itself is unusable (bad authority, body too large...).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request body is larger than the configured limit.
    #[error("request body larger than the limit")]
    BodyTooLarge,
}

impl MeshError {
    /// The value of `x-sagamesh-error` (also the `error` metric label).
    pub fn code(&self) -> &'static str {
        match self {
            MeshError::UnknownService(_) => "unknown-service",
            MeshError::NoEndpoints(_) => "no-endpoints",
            MeshError::CircuitOpen(_) => "circuit-open",
            MeshError::BudgetExhausted { .. } => "budget-exhausted",
            MeshError::Timeout(_) => "timeout",
            MeshError::Overloaded(_) => "overloaded",
            MeshError::ConnectFailure { .. } => "connect-failure",
            MeshError::Reset { .. } => "reset",
            MeshError::BadRequest(_) => "bad-request",
            MeshError::BodyTooLarge => "body-too-large",
        }
    }

    /// Whether the request may have reached the service (and so may have taken effect): the
    /// answer a saga engine needs before re-sending a call. Conservative: `true` unless the
    /// mesh knows no attempt got past connecting.
    pub fn maybe_delivered(&self) -> bool {
        match self {
            MeshError::UnknownService(_)
            | MeshError::NoEndpoints(_)
            | MeshError::CircuitOpen(_)
            | MeshError::Overloaded(_)
            | MeshError::BadRequest(_) => false,
            MeshError::ConnectFailure {
                maybe_delivered, ..
            }
            | MeshError::BudgetExhausted {
                maybe_delivered, ..
            } => *maybe_delivered,
            MeshError::Timeout(_) | MeshError::Reset { .. } | MeshError::BodyTooLarge => true,
        }
    }

    /// Marks that an earlier attempt may have reached the service.
    pub(crate) fn delivered_before(self, earlier: bool) -> Self {
        match self {
            MeshError::ConnectFailure {
                endpoint,
                reason,
                maybe_delivered,
            } => MeshError::ConnectFailure {
                endpoint,
                reason,
                maybe_delivered: maybe_delivered || earlier,
            },
            MeshError::BudgetExhausted {
                service,
                last,
                maybe_delivered,
            } => MeshError::BudgetExhausted {
                service,
                last,
                maybe_delivered: maybe_delivered || earlier,
            },
            e => e,
        }
    }

    /// The status the caller gets.
    pub fn status(&self) -> StatusCode {
        match self {
            MeshError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            MeshError::Reset { .. } => StatusCode::BAD_GATEWAY,
            MeshError::BadRequest(_) => StatusCode::BAD_REQUEST,
            MeshError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}
