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

/// A request body as it stands when the request is about to be sent.
pub enum Arrived {
    /// All of it has arrived: the whole body (empty when there is none), to send in one go.
    Complete(Bytes),
    /// More is still to come; a first frame already taken to find out is put back in front.
    Streaming(BoxBody),
}

/// Looks at `body` once, without waiting: complete (a GET, a small POST that came with its
/// head, a retry's buffered body, a unary gRPC message) or still streaming in. Polling registers
/// the current task's waker on the body, which is harmless.
pub async fn arrived(mut body: BoxBody) -> Result<Arrived, BodyError> {
    if body.is_end_stream() {
        return Ok(Arrived::Complete(Bytes::new()));
    }
    let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
    match polled {
        Poll::Pending => Ok(Arrived::Streaming(body)),
        Poll::Ready(None) => Ok(Arrived::Complete(Bytes::new())),
        Poll::Ready(Some(Err(e))) => Err(e),
        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
            Ok(data) if body.is_end_stream() => Ok(Arrived::Complete(data)),
            Ok(data) => Ok(Arrived::Streaming(boxed(Prefixed::new(
                Frame::data(data),
                body,
            )))),
            Err(frame) => Ok(Arrived::Streaming(boxed(Prefixed::new(frame, body)))),
        },
    }
}

/// A body whose first frame has already been taken from `rest` (to see whether it was
/// complete): that frame, then the rest.
struct Prefixed {
    first: Option<Frame<Bytes>>,
    rest: BoxBody,
}

impl Prefixed {
    fn new(first: Frame<Bytes>, rest: BoxBody) -> Self {
        Prefixed {
            first: Some(first),
            rest,
        }
    }
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.first.take() {
            Some(f) => Poll::Ready(Some(Ok(f))),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.size_hint();
        let n = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map_or(0, |d| d.len() as u64);
        // Upper first: the lower bound may never exceed it.
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(n));
        }
        hint.set_lower(rest.lower().saturating_add(n));
        hint
    }
}
