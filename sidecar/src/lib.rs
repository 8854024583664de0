//! Sagamesh data plane.
//!
//! The sidecar binary (`main.rs`) is a thin wrapper around [`Sidecar`]. The client side of the
//! mesh — discovery, balancing, circuit breaking, retries, timeouts, load shedding — lives in
//! [`client::MeshClient`] so the saga engine in the operator calls services through exactly the
//! same code as the sidecar's outbound proxy.
//!
//! Breaker terms, used everywhere: an endpoint's breaker is *closed* while traffic flows, *open*
//! while the endpoint is ejected, *half-open* while probe requests test it.

pub mod admin;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod caller;
pub mod client;
pub mod config;
pub mod discovery;
pub mod endpoint;
pub mod error;
pub mod exposition;
pub mod h1_upstream;
pub mod h2_upstream;
pub mod metrics;
pub mod name;
pub mod otlp;
pub mod policy;
pub mod pool;
pub mod proxy;
pub mod retry;
pub mod sidecar;
pub mod trace;

pub use client::{ClientConfig, MeshClient};
pub use config::Config;
pub use error::MeshError;
pub use sidecar::Sidecar;
