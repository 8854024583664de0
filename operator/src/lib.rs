//! The Sagamesh control plane.
//!
//! - [`index`]: one in-memory index of ServiceRegistrations, Pods, Services and EndpointSlices,
//!   fed by watches and shared by everything else.
//! - [`reconcile`]: ServiceRegistration status (counts, conditions, Events), leader only.
//! - [`discovery`]: the discovery gRPC server; knows nothing of Kubernetes.
//! - [`leader`]: leader election on a Lease; the saga engine runs only on the leader.
//! - [`metrics`]: `/metrics` (served with `/healthz` and `/readyz` by
//!   `sagamesh_server::admin`); logs via `sagamesh_server::logging`.
//! - [`sagas`]: the saga controller (leader only), calling services through the sidecar's client.
//! - [`webhook`]: the sidecar-injection webhook and its certificate.
//! - [`runtime`]: the wiring.

pub mod index;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod runtime;
pub mod sagas;
pub mod webhook;
