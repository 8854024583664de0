//! Sagamesh's API: the one source of truth for the CRD types (`ServiceRegistration`, `Saga`),
//! the CRD YAML generated from them, and the policy types the sidecar and operator share. No
//! gRPC and no HTTP: the discovery protocol lives in `sagamesh-discovery`.

pub mod backoff;
pub mod crdgen;
pub mod duration;
pub mod manifest_report;
pub mod names;
pub mod saga;
pub mod service_registration;
pub mod stable_hash;
pub mod trace_context;

pub use saga::{Saga, SagaSpec, SagaStatus};
pub use service_registration::{
    ServiceRegistration, ServiceRegistrationSpec, ServiceRegistrationStatus,
};

/// The API group of every Sagamesh resource.
pub const GROUP: &str = "sagamesh.io";
/// The API version of every Sagamesh resource.
pub const VERSION: &str = "v1alpha1";
