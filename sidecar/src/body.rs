//! Body types: one boxed body for requests and responses, and a wrapper that keeps guards
//! (in-flight counts) alive until the response body is finished.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error of every body the mesh handles. A concrete type rather than `BoxError` itself:
/// with `Box<dyn Error>` as a body error, hyper-util's `Into<BoxError>` bounds trip the
/// compiler's higher-ranked lifetime check on `Send` futures.
#[derive(Debug)]
pub struct BodyError(pub BoxError);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The body of every request and response the mesh handles.
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, BodyError>;

/// A body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> BoxBody {
    full(Bytes::new())
}

/// Boxes a body received by hyper.
pub fn incoming(body: hyper::body::Incoming) -> BoxBody {
    body.map_err(|e| BodyError(Box::new(e))).boxed()
}

/// Boxes a body with the mesh's error type.
pub fn boxed<B>(body: B) -> BoxBody
where
    B: Body<Data = Bytes, Error = BodyError> + Send + Sync + 'static,
{
    BoxBody::new(body)
}

pin_project_lite::pin_project! {
    /// A body that drops `guard` when it ends (or is dropped).
    pub struct Guarded<G> {
        #[pin]
        inner: BoxBody,
        guard: Option<G>,
    }
}

impl<G> Guarded<G> {
    pub fn new(inner: BoxBody, guard: G) -> Self {
        Guarded {
            inner,
            guard: Some(guard),
        }
    }
}

impl<G> Body for Guarded<G> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        let res = this.inner.poll_frame(cx);
        if matches!(res, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard.take();
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
