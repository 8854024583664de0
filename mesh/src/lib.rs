//! Sagamesh's mesh client: [`MeshClient`] sends a request to a service the way every Sagamesh
//! caller does — endpoints from discovery ([`sagamesh_discovery`]), balancing, circuit
//! breaking, retries with a budget, timeouts, load shedding, pooled HTTP/1.1 and HTTP/2
//! connections. The sidecar's outbound proxy and the saga engine's calls (operator, local mode)
//! are both callers of this one client.
//!
//! Breaker terms, used everywhere: an endpoint's breaker is *closed* while traffic flows, *open*
//! while the endpoint is ejected, *half-open* while probe requests test it.

pub(crate) mod balance;
pub mod body;
pub(crate) mod breaker;
pub mod caller;
pub mod client;
pub(crate) mod endpoint;
pub(crate) mod endpoint_set;
pub mod error;
pub(crate) mod h1_upstream;
/// Public for the sidecar's HTTP/2 stream tests (`sidecar/tests/h2_streams.rs`), which drive
/// one upstream connection by hand; callers use [`MeshClient`].
#[doc(hidden)]
pub mod h2_upstream;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod retry;

/// The HTTP/1.1 response parser's entry points for the fuzz targets in `fuzz/` (not an API).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use h1_upstream::fuzzing;

pub use client::{ClientConfig, MeshClient};
pub use error::MeshError;
