//! Sagamesh data plane: the sidecar's listeners (outbound and inbound proxy, admin), its
//! configuration, tracing export, and [`Sidecar`], which `main.rs` runs. The client side of the
//! mesh — balancing, circuit breaking, retries, timeouts, pools — is [`sagamesh_mesh`], and
//! where endpoints come from is [`sagamesh_discovery`].

pub mod admin;
pub mod config;
pub mod otlp;
pub mod proxy;
pub mod sidecar;
pub mod trace;

pub use config::Config;
pub use sidecar::Sidecar;
