//! The Sagamesh saga engine core, shared by the operator (sagas as Kubernetes objects, in
//! `sagamesh-saga-kube`) and local mode (sagas in an on-disk store, [`file_store`]). It depends
//! on neither Kubernetes' client nor an HTTP stack: stores and callers are traits.
//!
//! - [`template`]: `{{ input.x }}` / `{{ steps.NAME.output.path }}` rendering.
//! - [`state`]: the event-sourced state machine over `SagaStatus` (pure).
//! - [`engine`]: the executor that drives a saga to a terminal phase through a [`engine::SagaStore`]
//!   and a [`engine::ServiceCaller`].

pub mod engine;
pub mod file_store;
pub mod state;
pub mod template;

pub use engine::{
    CallOutcome, CallRequest, EngineConfig, EngineError, SagaRef, SagaStore, ServiceCaller,
    StoreError, idempotency_key, run, validate,
};
pub use state::{Call, Event, Next};
