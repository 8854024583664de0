//! Sagamesh local mode: the same resources without a cluster. Manifests come from a directory
//! and are checked as the API server would check them (`sagamesh-manifest`).

pub mod discovery;
pub mod metrics;
pub mod runner;
