//! Whether the caller of the request being served is still there.
//!
//! When a caller's connection closes, hyper drops the futures of its requests, but only the
//! next time it polls them, and it polls a request's future before it looks for the reset: a
//! request woken by anything else (say, room at the endpoint) runs one step more for a caller
//! that has gone. So the listeners run each request's future inside a [`scope`] whose
//! [`Caller`] is marked gone when its connection ends, and the HTTP/2 upstream asks
//! [`has_gone`] before it opens a stream (issue #13: never a stream for a request already
//! cancelled; `a_request_woken_after_its_caller_left_opens_no_stream` in
//! `tests/h2_streams.rs` makes that one poll by hand).
//!
//! A task-local rather than a request extension: the mesh client awaits every attempt in the
//! request's own task, so the scope reaches it without a field on every request (an extension
//! costs allocations per request on the hot path) or a parameter through the client's layers.
//! Outside a scope (the saga engine's calls) the caller never goes.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

tokio::task_local! {
    static CALLER: Caller;
}

/// One per connection to a listener: set once the connection has ended.
#[derive(Clone, Debug, Default)]
pub struct Caller(Arc<AtomicBool>);

impl Caller {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the caller gone.
    pub fn set_gone(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_gone(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Marks the caller gone when the returned guard is dropped (by the task serving the
    /// connection, however it ends).
    pub fn gone_on_drop(&self) -> GoneOnDrop {
        GoneOnDrop(self.clone())
    }
}

/// See [`Caller::gone_on_drop`].
#[derive(Debug)]
pub struct GoneOnDrop(Caller);

impl Drop for GoneOnDrop {
    fn drop(&mut self) {
        self.0.set_gone();
    }
}

/// Runs `f` (a request's future) for `caller`.
pub fn scope<F: Future>(caller: Caller, f: F) -> impl Future<Output = F::Output> {
    CALLER.scope(caller, f)
}

/// Whether the caller of the request this task serves has gone (false outside a [`scope`]).
pub fn has_gone() -> bool {
    CALLER.try_with(Caller::is_gone).unwrap_or(false)
}

/// Why a request was not sent: its caller has gone. Carried as the caller's
/// [`BodyError`](crate::body::BodyError), so it is nobody's failure: not the endpoint's (the
/// breaker does not count it) and never retried.
#[derive(Debug, thiserror::Error)]
#[error("the caller has gone")]
pub struct Gone;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scope_reports_the_connection_ending() {
        assert!(!has_gone(), "outside a scope the caller stays");
        let caller = Caller::new();
        let guard = caller.gone_on_drop();
        let before = scope(caller.clone(), async { has_gone() }).await;
        drop(guard);
        let after = scope(caller, async { has_gone() }).await;
        assert!(!before);
        assert!(after);
    }
}
