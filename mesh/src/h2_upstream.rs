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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;

use crate::body::{self, Arrived, BodyError, BoxBody};

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
    tx: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
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
        Ok(Connection { tx, closed })
    }

    /// Whether the connection has ended (a new request needs a new one).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `req` (absolute URI: h2 takes `:scheme` and `:authority` from it) and waits for
    /// the response head.
    pub async fn send(&self, req: Request<BoxBody>) -> Result<Response<BoxBody>, Error> {
        let mut tx = match self.tx.clone().ready().await {
            Ok(tx) => tx,
            Err(e) => return Err(Error::NotSent(e, Box::new(req))),
        };
        let (parts, body) = req.into_parts();
        // A body that has already arrived in full (a unary gRPC call's one message, a small
        // POST) goes out with the headers.
        let body = body::arrived(body)
            .await
            .map_err(|e| Error::Failed(Box::new(e)))?;
        let end_of_stream = matches!(&body, Arrived::Complete(data) if data.is_empty());
        let (response, mut stream) = tx
            .send_request(Request::from_parts(parts, ()), end_of_stream)
            .map_err(|e| Error::Failed(e.into()))?;
        // Where a pipe task records the caller's body failing (only when there is one).
        let mut body_error: Option<Arc<Mutex<Option<BodyError>>>> = None;
        match body {
            Arrived::Complete(data) => {
                if !end_of_stream {
                    stream
                        .send_data(data, true)
                        .map_err(|e| Error::Failed(e.into()))?;
                }
            }
            Arrived::Streaming(body) => {
                let error = Arc::new(Mutex::new(None));
                body_error = Some(error.clone());
                let pipe = Pipe {
                    body,
                    stream,
                    pending: None,
                    error,
                };
                tokio::spawn(pipe);
            }
        }
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
        match ready!(self.recv.poll_trailers(cx)) {
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
}

impl Pipe {
    fn fail(&mut self, e: BodyError) {
        self.stream.send_reset(Reason::CANCEL);
        if let Ok(mut slot) = self.error.lock() {
            *slot = Some(e);
        }
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
