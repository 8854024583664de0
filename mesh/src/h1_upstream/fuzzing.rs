//! What the fuzz targets in `fuzz/` need from the HTTP/1.1 response parser, behind the cargo
//! feature `fuzzing` (which only the fuzz crate enables). Not an API: names and shapes change
//! with the fuzz targets.
//!
//! With the feature on, a [`super::Connection`] reads from [`Io`], which is either a real socket
//! or a [`Script`]: the bytes a fuzz input says the endpoint sends, split into reads at the
//! points the input chooses. [`exchange`] then runs the real [`super::send`] (request written,
//! interim heads skipped, final head parsed, framing chosen) and polls the real response body
//! to its end, without a runtime.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, StatusCode, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A connection's transport: a socket, or a scripted endpoint.
#[derive(Debug)]
pub enum Io {
    Tcp(TcpStream),
    Script(Script),
}

impl Io {
    pub(super) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Tcp(s) => s.try_read(buf),
            Io::Script(_) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Script(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Script(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Script(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Script(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A scripted endpoint: each read returns (up to the reader's buffer) the next of `reads`, with
/// one `Pending` (woken at once) before each, and end of file after the last. Writes are
/// taken whole and dropped.
#[derive(Debug)]
pub struct Script {
    reads: VecDeque<Bytes>,
    ready: bool,
}

impl Script {
    /// Empty reads are left out: an empty read means end of file.
    pub fn new(reads: impl IntoIterator<Item = Bytes>) -> Self {
        Script {
            reads: reads.into_iter().filter(|r| !r.is_empty()).collect(),
            ready: false,
        }
    }
}

impl AsyncRead for Script {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if !this.ready && !this.reads.is_empty() {
            this.ready = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if let Some(front) = this.reads.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front.split_to(n));
            if front.is_empty() {
                this.reads.pop_front();
                this.ready = false;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Script {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A parsed response head: status, version, header fields.
pub type Head = (StatusCode, Version, HeaderMap);

/// [`super::parse_head`].
pub fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, String> {
    super::parse_head(buf)
        .map(|h| h.map(|h| (h.status, h.version, h.headers)))
        .map_err(|e| e.to_string())
}

/// How a response body is delimited: [`super::Framing`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    Close,
}

/// [`super::framing`] and [`super::keep_alive`] of a head: the framing (or why it is refused)
/// and whether the connection could carry another request.
pub fn framing(head: &Head, head_method: bool) -> (Result<Framing, String>, bool) {
    let head = super::Head {
        status: head.0,
        version: head.1,
        headers: head.2.clone(),
    };
    let framing = super::framing(&head, head_method)
        .map(|f| match f {
            super::Framing::Length(n) => Framing::Length(n),
            super::Framing::Chunked => Framing::Chunked,
            super::Framing::Close => Framing::Close,
        })
        .map_err(|e| e.to_string());
    (framing, super::keep_alive(&head))
}

/// [`super::chunk_size_line`].
pub fn chunk_size_line(buf: &[u8]) -> Result<Option<(usize, u64)>, &'static str> {
    super::chunk_size_line(buf)
}

/// [`super::parse_trailers`].
pub fn parse_trailers(buf: &mut BytesMut) -> Result<Option<Option<HeaderMap>>, String> {
    super::parse_trailers(buf).map_err(|e| e.to_string())
}

/// What a response exchange gave.
#[derive(Debug)]
pub struct Exchange {
    /// The final head, or why there was none.
    pub head: Result<Head, String>,
    /// The body's exact size hint, when it had one.
    pub exact_size: Option<u64>,
    /// All the body's data and its trailers, or why the body failed. `Ok` when the head failed.
    pub body: Result<(Vec<u8>, Option<HeaderMap>), String>,
    /// The connection was handed back for reuse.
    pub released: bool,
}

struct Released(AtomicBool);

impl super::Release for Released {
    fn release(&self, _conn: super::Connection) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Polls `fut` with a waker that does nothing: every `Pending` in an exchange is a [`Script`]'s
/// (which is ready on the next poll), so the future must be done within `max_polls` polls.
///
/// # Panics
/// When it is not: the parser waits for something that never comes (a hang).
pub fn run<F: Future>(fut: F, max_polls: usize) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..max_polls {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("no progress after {max_polls} polls");
}

/// Sends a GET (or a HEAD) on a connection whose endpoint answers with `reads`, then reads the
/// whole response body, polling it frame by frame.
pub fn exchange(head_method: bool, reads: Vec<Bytes>) -> Exchange {
    let max_polls = 64 + 4 * reads.iter().map(Bytes::len).sum::<usize>();
    let method = if head_method {
        Method::HEAD
    } else {
        Method::GET
    };
    let req = super::encode(&method, "/", &HeaderMap::new(), b"");
    let conn = super::Connection {
        io: Io::Script(Script::new(reads)),
    };
    let released = Arc::new(Released(AtomicBool::new(false)));
    let release: Arc<dyn super::Release> = released.clone();
    run(
        async move {
            let resp = match super::send(conn, &req, false, release).await {
                Ok(resp) => resp,
                Err(e) => {
                    return Exchange {
                        head: Err(e.to_string()),
                        exact_size: None,
                        body: Ok((Vec::new(), None)),
                        released: released.0.load(Ordering::SeqCst),
                    };
                }
            };
            let (parts, mut body) = resp.into_parts();
            let exact_size = body.size_hint().exact();
            let mut data = Vec::new();
            let mut trailers = None;
            let mut failed = None;
            while let Some(frame) =
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            {
                match frame {
                    Ok(frame) => match frame.into_data() {
                        Ok(d) => {
                            assert!(trailers.is_none(), "data after trailers");
                            data.extend_from_slice(&d);
                        }
                        Err(frame) => {
                            assert!(trailers.is_none(), "two trailer frames");
                            trailers = frame.into_trailers().ok();
                        }
                    },
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            // An ended body stays ended.
            let again = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            assert!(again.is_none(), "a frame after the end");
            if failed.is_none() {
                assert!(body.is_end_stream(), "ended without is_end_stream");
            }
            Exchange {
                head: Ok((parts.status, parts.version, parts.headers)),
                exact_size,
                body: match failed {
                    Some(e) => Err(e),
                    None => Ok((data, trailers)),
                },
                released: released.0.load(Ordering::SeqCst),
            }
        },
        max_polls,
    )
}
