//! HTTP/2 to an endpoint on the `h2` crate directly, without hyper's HTTP/2 client on top.
//!
//! Why: per request, hyper's client sends the request through a channel to its connection
//! task, spawns a task that waits for the response and hands it back through a oneshot, and
//! spawns another that pipes the request body (its first try to send the body always finds no
//! flow-control capacity assigned yet, so a unary gRPC call always got the second task). In the
//! callgrind profile of the sidecar's gRPC path those were about a fifth of the instructions.
//! Here the request's own task sends the headers, sends a body that has already arrived in
//! full together with them, and awaits the response; only a body still streaming in gets a
//! pipe task. Flow-control windows and limits are hyper's client defaults.
//!
//! A stream opens only when the endpoint has room for it, and never for a caller that has gone.
//! h2 queues a stream sent beyond the endpoint's `SETTINGS_MAX_CONCURRENT_STREAMS` and opens
//! it later, sending its HEADERS (then a RST_STREAM) even if its caller has gone by then; and
//! `SendRequest::poll_ready` cannot tell, because h2 counts a stream as open only once the
//! connection's task has run, so a burst of requests on one runtime thread all look ready.
//! A caller that opened 500 streams and left 50 ms later had 300-320 HEADERS reach an
//! endpoint allowing 100, 200-220 of them after it left, and a live request then got `502`
//! (issue #13; an h2 server may take such bursts of resets for a reset flood). So each
//! connection counts its streams in use itself ([`Slot`]: from before the HEADERS until the
//! response body ends or is dropped and the request body is sent or given up), against the
//! endpoint's current limit; requests wait for a slot one at a time (fair, in arrival order),
//! and a request whose caller has gone meanwhile ([`crate::caller`]) takes none.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::body::{self, Arrived, BodyError, BoxBody};
use crate::caller::{self, Gone};

// hyper's client defaults, kept so the switch changes nothing on the wire.
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// One HTTP/2 connection to an endpoint. Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct Connection {
    /// The handle streams are opened with, one request at a time (see the module docs).
    opener: Arc<tokio::sync::Mutex<SendRequest<Bytes>>>,
    slots: Arc<Slots>,
    closed: Arc<AtomicBool>,
}

/// The streams of a connection in use, and a wake-up for the request waiting for one.
#[derive(Debug, Default)]
struct Slots {
    in_use: AtomicUsize,
    freed: Notify,
}

/// One stream's place in the endpoint's concurrent streams; given back when dropped.
#[derive(Debug)]
struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// Held by the response body, and shared with the pipe task when there is one (the stream is
/// in use until both are done).
#[derive(Debug)]
#[expect(dead_code, reason = "held for its drop")]
enum SlotRef {
    Own(Slot),
    Shared(Arc<Slot>),
}

/// Why a request did not get a response.
#[derive(Debug)]
pub enum Error {
    /// The connection could not take the request (it has gone away); nothing was sent, and
    /// the request is handed back for another connection.
    NotSent(h2::Error, Box<Request<BoxBody>>),
    /// The request was sent (at least in part) and failed.
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

impl Connection {
    /// HTTP/2 handshake (prior knowledge, as h2c) on `io`; the connection is driven by a task
    /// of its own until the endpoint or every clone goes away.
    pub async fn handshake(io: TcpStream) -> Result<Self, h2::Error> {
        let (tx, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST)
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "endpoint h2 connection ended with an error");
            }
            flag.store(true, Ordering::Release);
        });
        Ok(Connection {
            opener: Arc::new(tokio::sync::Mutex::new(tx)),
            slots: Arc::default(),
            closed,
        })
    }

    /// Whether the connection has ended (a new request needs a new one).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `req` (absolute URI: h2 takes `:scheme` and `:authority` from it) and waits for
    /// the response head.
    pub async fn send(&self, req: Request<BoxBody>) -> Result<Response<BoxBody>, Error> {
        // One request at a time waits for room; the others wait their turn here.
        let mut opener = self.opener.lock().await;
        let slot = loop {
            let freed = self.slots.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            let in_use = self.slots.in_use.load(Ordering::Acquire);
            if in_use < opener.current_max_send_streams() {
                self.slots.in_use.fetch_add(1, Ordering::AcqRel);
                break Slot(self.slots.clone());
            }
            freed.await;
        };
        if let Err(e) = std::future::poll_fn(|cx| opener.poll_ready(cx)).await {
            return Err(Error::NotSent(e, Box::new(req)));
        }
        // Woken for a caller that has gone: no stream for it. Its own error, not the
        // endpoint's (see `Gone`).
        if caller::has_gone() {
            return Err(Error::Failed(Box::new(BodyError(Box::new(Gone)))));
        }
        let (parts, body) = req.into_parts();
        // A body that has already arrived in full (a unary gRPC call's one message, a small
        // POST) goes out with the headers.
        let body = body::arrived(body)
            .await
            .map_err(|e| Error::Failed(Box::new(e)))?;
        let end_of_stream = matches!(&body, Arrived::Complete(data) if data.is_empty());
        let (response, mut stream) = opener
            .send_request(Request::from_parts(parts, ()), end_of_stream)
            .map_err(|e| Error::Failed(e.into()))?;
        drop(opener);
        // Where a pipe task records the caller's body failing (only when there is one).
        let mut body_error: Option<Arc<Mutex<Option<BodyError>>>> = None;
        let slot = match body {
            Arrived::Complete(data) => {
                if !end_of_stream {
                    stream
                        .send_data(data, true)
                        .map_err(|e| Error::Failed(e.into()))?;
                }
                SlotRef::Own(slot)
            }
            Arrived::Streaming(body) => {
                let error = Arc::new(Mutex::new(None));
                body_error = Some(error.clone());
                let slot = Arc::new(slot);
                let pipe = Pipe {
                    body,
                    stream,
                    pending: None,
                    error,
                    _slot: slot.clone(),
                };
                tokio::spawn(pipe);
                SlotRef::Shared(slot)
            }
        };
        match response.await {
            Ok(resp) => {
                let size = if resp.body().is_end_stream() {
                    SizeHint::with_exact(0)
                } else {
                    resp.headers()
                        .get(header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .map_or_else(SizeHint::default, SizeHint::with_exact)
                };
                Ok(resp.map(|recv| {
                    body::boxed(ResponseBody {
                        recv,
                        data_done: false,
                        size,
                        slot: Some(slot),
                    })
                }))
            }
            Err(e) => {
                // The caller's body failing is the caller's fault, not the endpoint's.
                let caller = body_error.and_then(|e| e.lock().ok()?.take());
                Err(Error::Failed(match caller {
                    Some(b) => Box::new(b),
                    None => Box::new(e),
                }))
            }
        }
    }
}

/// The response body: DATA frames (their flow-control capacity given back as they are read),
/// then trailers.
struct ResponseBody {
    recv: RecvStream,
    data_done: bool,
    size: SizeHint,
    /// Given back at the end of the body, or when it is dropped.
    slot: Option<SlotRef>,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(BodyError(Box::new(e))))),
                None => self.data_done = true,
            }
        }
        let polled = ready!(self.recv.poll_trailers(cx));
        self.slot = None;
        match polled {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(BodyError(Box::new(e))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.size
    }
}

/// Pipes a request body that is still arriving into its stream, one chunk per grant of
/// flow-control capacity (so a slow endpoint slows the caller down instead of filling memory).
/// A failing caller body resets the stream and is recorded for the response's error.
struct Pipe {
    body: BoxBody,
    stream: SendStream<Bytes>,
    pending: Option<Frame<Bytes>>,
    error: Arc<Mutex<Option<BodyError>>>,
    /// The stream's slot, shared with the response body.
    _slot: Arc<Slot>,
}

impl Pipe {
    fn fail(&mut self, e: BodyError) {
        // Recorded before the reset: the reset wakes the response future, on another worker
        // thread maybe, and it must find the caller's error there, or the endpoint is blamed
        // (`502 reset`, a breaker failure) instead of the caller (`413`/`400`).
        if let Ok(mut slot) = self.error.lock() {
            *slot = Some(e);
        }
        self.stream.send_reset(Reason::CANCEL);
    }

    fn send_trailers(&mut self, trailers: HeaderMap) -> Result<(), h2::Error> {
        self.stream.reserve_capacity(0);
        self.stream.send_trailers(trailers)
    }
}

impl Future for Pipe {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            // The endpoint reset the stream (it answered early, or gave up): stop reading.
            if this.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            let frame = match this.pending.take() {
                Some(f) => f,
                None => match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                    Some(Ok(f)) => f,
                    Some(Err(e)) => {
                        this.fail(e);
                        return Poll::Ready(());
                    }
                    None => {
                        let _ = this.stream.send_data(Bytes::new(), true);
                        return Poll::Ready(());
                    }
                },
            };
            let frame = match frame.into_data() {
                Ok(data) => {
                    if !data.is_empty() && this.stream.capacity() == 0 {
                        this.stream.reserve_capacity(1);
                        match this.stream.poll_capacity(cx) {
                            Poll::Pending => {
                                this.pending = Some(Frame::data(data));
                                return Poll::Pending;
                            }
                            Poll::Ready(Some(Ok(_))) => {}
                            Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                        }
                    }
                    let end = this.body.is_end_stream();
                    if this.stream.send_data(data, end).is_err() || end {
                        return Poll::Ready(());
                    }
                    continue;
                }
                Err(frame) => frame,
            };
            if let Ok(trailers) = frame.into_trailers() {
                let _ = this.send_trailers(trailers);
                return Poll::Ready(());
            }
        }
    }
}
