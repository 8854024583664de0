//! Sagamesh's HTTP serving, in one place: the accept loop every listener runs ([`serve`], with
//! its head-read timeout, accept-error backoff, optional TLS and graceful drain), the control
//! plane's admin endpoints ([`admin`]), `/metrics` content negotiation ([`exposition`]) and
//! the one logging set-up ([`logging`]).

mod accept;
pub mod admin;
pub mod exposition;
pub mod logging;

pub use accept::{
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_MAX_HEADER_BYTES, ServeOptions, TlsHandle, serve,
};
