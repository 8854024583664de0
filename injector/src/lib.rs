//! Sidecar injection for Sagamesh: the pod mutation ([`mutate`]), the admission webhook server
//! ([`server`]) and its serving certificate, made and rotated by the operator ([`certs`]).

pub mod certs;
pub mod mutate;
pub mod server;
