//! HTTP/1.1 to an endpoint for requests whose body is complete when they are sent (no body, a
//! small POST, a retry's buffered body): the request's own task writes the request and reads
//! the response on the socket, and the connection holds no buffer while it is idle.
//!
//! Why not hyper's HTTP/1 client here: it drives every connection from a task of its own, so
//! each request goes through a dispatch channel and a oneshot (a task wake-up per request the
//! proxy does not otherwise need), and it keeps an 8 KiB read and an 8 KiB write buffer per
//! connection for as long as the connection lives. A sidecar's idle upstream connections are
//! most of its connections (each endpoint keeps the ones a burst opened), so that was most of
//! its heap in the proxy benchmark (docs/benchmarks.md): about 29 KiB per idle connection,
//! against about 1 KiB here. No crate offers an HTTP/1.1 client exchange without its own
//! connection task; parsing is `httparse` (hyper's parser), framing follows RFC 9112.
//!
//! A request whose body is still streaming in goes to hyper's client instead (see
//! [`crate::pool`]): hyper writes such a body while it reads the response, which a server that
//! answers early (or echoes as it reads) needs.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::body::{self, BodyError, BoxBody};

/// Largest response head (status line and headers) or trailer block accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most response header fields.
const MAX_HEADERS: usize = 128;
/// How much is read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;
/// Longest chunk-size line (size, extensions) accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the request failed before any of it could have reached the endpoint's
    /// application (the connection had gone away); the request may be sent on another one.
    #[error("connection closed before the request was sent: {0}")]
    NotSent(#[source] std::io::Error),
    #[error("writing the request: {0}")]
    Write(#[source] std::io::Error),
    #[error("reading the response: {0}")]
    Read(#[source] std::io::Error),
    #[error("connection closed before the response head was complete")]
    ClosedBeforeResponse,
    #[error("invalid response head: {0}")]
    Parse(String),
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("invalid chunked response body: {0}")]
    Chunked(&'static str),
    #[error("connection closed before the response body was complete")]
    Incomplete,
}

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

/// A connection's transport. With the `fuzzing` feature, also a scripted endpoint.
#[cfg(not(feature = "fuzzing"))]
type Io = TcpStream;
#[cfg(feature = "fuzzing")]
type Io = fuzzing::Io;

/// An idle connection: only the socket.
#[derive(Debug)]
pub struct Connection {
    io: Io,
}

impl Connection {
    pub fn new(io: TcpStream) -> Self {
        #[cfg(feature = "fuzzing")]
        let io = fuzzing::Io::Tcp(io);
        Connection { io }
    }

    /// Whether an idle connection can take a request: the endpoint has not closed it and has
    /// sent nothing unasked. Costs no system call when the socket has not become readable.
    pub fn is_usable(&self) -> bool {
        let mut probe = [0u8; 1];
        match self.io.try_read(&mut probe) {
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            // EOF (closed) or unexpected bytes: unusable either way.
            Ok(_) => false,
        }
    }
}

/// Where a finished response gives its connection back (the endpoint's idle list).
pub trait Release: Send + Sync + 'static {
    fn release(&self, conn: Connection);
}

/// The request, encoded once: kept so it can be written again on another connection when the
/// first one turns out to be closed.
pub struct Encoded {
    bytes: Vec<u8>,
    head_method: bool,
}

/// Encodes a request whose body is complete: `data` is all of it. Hop-by-hop headers must
/// have been removed by the caller; framing (`content-length`) is set here.
pub fn encode(method: &Method, path_and_query: &str, headers: &HeaderMap, data: &[u8]) -> Encoded {
    let mut out = Vec::with_capacity(256 + data.len());
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut had_length = false;
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            had_length = true;
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // As hyper's client: no length for an empty body of a method that has no body semantics,
    // unless the caller sent one.
    let bodyless = matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    );
    if !data.is_empty() || had_length || !bodyless {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(data.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    Encoded {
        bytes: out,
        head_method: *method == Method::HEAD,
    }
}

/// Writes the request on `conn` and reads the response head. On success the response's body
/// reads the rest from the connection and hands it to `release` once it has ended cleanly.
/// `reused`: the connection has carried requests before (a failed first write is then
/// [`Error::NotSent`]).
pub async fn send(
    mut conn: Connection,
    req: &Encoded,
    reused: bool,
    release: std::sync::Arc<dyn Release>,
) -> Result<Response<BoxBody>, Error> {
    let write_error = match conn.io.write_all(&req.bytes).await {
        Ok(()) => None,
        // The endpoint closed a pooled connection: the kernel refuses the first write at once
        // (EPIPE/ECONNRESET), so nothing reached the application.
        Err(e) if reused && is_closed_error(&e) => return Err(Error::NotSent(e)),
        Err(e) => Some(e),
    };
    // Even when the write failed, the endpoint may have answered before it stopped reading (a
    // 413 for a body it would not take, say): that answer is what the caller should get. The
    // connection is not reused then.
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let head = match read_final_head(&mut conn, &mut buf).await {
        Ok(head) => head,
        Err(e) => return Err(write_error.map_or(e, Error::Write)),
    };
    Ok(respond(
        head,
        conn,
        buf,
        req.head_method,
        write_error.is_none(),
        release,
    ))
}

/// Reads response heads until a final one (interim 1xx answers are skipped).
async fn read_final_head(conn: &mut Connection, buf: &mut BytesMut) -> Result<Head, Error> {
    loop {
        let head = loop {
            if let Some(head) = parse_head(buf)? {
                break head;
            }
            if buf.len() >= MAX_HEAD_BYTES {
                return Err(Error::HeadTooLarge);
            }
            buf.reserve(READ_CHUNK);
            match conn.io.read_buf(buf).await {
                Ok(0) if buf.is_empty() => return Err(Error::ClosedBeforeResponse),
                Ok(0) => {
                    return Err(Error::Parse(
                        "connection closed inside the response head".into(),
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(Error::Read(e)),
            }
        };
        // Interim responses (100 Continue, 103 Early Hints) are skipped; 101 would switch
        // protocols, which the sidecar never asks for (`Upgrade` is stripped as hop-by-hop).
        if !head.status.is_informational() {
            return Ok(head);
        }
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::Parse("unexpected 101 Switching Protocols".into()));
        }
    }
}

fn is_closed_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        BrokenPipe | ConnectionReset | ConnectionAborted | NotConnected
    )
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

/// Parses a response head from the front of `buf`, removing it; `None` while incomplete.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Error::Parse(e.to_string())),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| Error::Parse("bad status code".into()))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Header values are slices of the head's bytes, which are frozen once (no copy per value).
    let ranges: Vec<(HeaderName, std::ops::Range<usize>)> = {
        let base = buf.as_ptr() as usize;
        let mut v = Vec::with_capacity(parsed.headers.len());
        for h in parsed.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| Error::Parse(format!("bad header name {:?}", h.name)))?;
            let start = h.value.as_ptr() as usize - base;
            v.push((name, start..start + h.value.len()));
        }
        v
    };
    let bytes = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(ranges.len());
    for (name, range) in ranges {
        let value = HeaderValue::from_maybe_shared(bytes.slice(range))
            .map_err(|_| Error::Parse(format!("bad value of header {name}")))?;
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
    }))
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    /// Until the endpoint closes the connection (which then cannot be reused).
    Close,
}

fn framing(head: &Head, head_method: bool) -> Result<Framing, &'static str> {
    let s = head.status;
    if head_method || s == StatusCode::NO_CONTENT || s == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Length(0));
    }
    let te = head.headers.get_all(header::TRANSFER_ENCODING);
    if te.iter().next().is_some() {
        // RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing, even
        // with a Content-Length (HTTP/1.0 has no transfer codings; hyper refuses it too).
        if head.version == Version::HTTP_10 {
            return Err("transfer-encoding in an HTTP/1.0 response");
        }
        // Chunked must be the last coding; anything else is read until close. Empty list
        // elements are ignored (RFC 9110 §5.6.1); a field line that is not visible ASCII
        // names no coding the sidecar knows, so it is a last coding that is not chunked.
        let mut last_is_chunked = false;
        for v in te {
            match v.to_str() {
                Ok(v) => {
                    if let Some(c) = v.split(',').map(str::trim).rfind(|c| !c.is_empty()) {
                        last_is_chunked = c.eq_ignore_ascii_case("chunked");
                    }
                }
                Err(_) => last_is_chunked = false,
            }
        }
        return Ok(if last_is_chunked {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    let mut length: Option<u64> = None;
    for v in head.headers.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|b| *b == b',') {
            let n = parse_decimal(part.trim_ascii()).ok_or("bad content-length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting content-length values");
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

fn parse_decimal(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 {
        return None;
    }
    b.iter().try_fold(0u64, |acc, c| {
        c.is_ascii_digit().then(|| acc * 10 + u64::from(c - b'0'))
    })
}

fn keep_alive(head: &Head) -> bool {
    let mut close = head.version == Version::HTTP_10;
    for v in head.headers.get_all(header::CONNECTION) {
        for token in v.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            if token.eq_ignore_ascii_case(b"close") {
                return false;
            }
            if token.eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        }
    }
    !close
}

fn respond(
    head: Head,
    conn: Connection,
    buf: BytesMut,
    head_method: bool,
    may_reuse: bool,
    release: std::sync::Arc<dyn Release>,
) -> Response<BoxBody> {
    let reuse = may_reuse && keep_alive(&head);
    let (state, size, reusable) = match framing(&head, head_method) {
        Ok(Framing::Length(n)) => (State::Length(n), SizeHint::with_exact(n), reuse),
        Ok(Framing::Chunked) => (State::ChunkSize, SizeHint::default(), reuse),
        Ok(Framing::Close) => (State::UntilClose, SizeHint::default(), false),
        // Unusable framing: the body fails at once, the connection is not reused.
        Err(e) => (State::BadFraming(e), SizeHint::default(), false),
    };
    let mut resp = Response::new(());
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    let mut body = ResponseBody {
        conn: Some(conn),
        buf,
        // An empty body is over before anyone polls it (hyper's server never polls a body that
        // says it has ended), so its connection goes back at once.
        state: if state == State::Length(0) {
            State::Done
        } else {
            state
        },
        reusable,
        size,
        release,
    };
    body.finish_if_done();
    resp.map(|()| body::boxed(body))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many body bytes are still to come.
    Length(u64),
    /// Chunked: at a chunk-size line.
    ChunkSize,
    /// Chunked: inside a chunk with this many bytes left.
    ChunkData(u64),
    /// Chunked: the CRLF after a chunk's data.
    ChunkEnd,
    /// Chunked: the trailer section after the last chunk.
    Trailers,
    UntilClose,
    /// The head's framing (`content-length`, `transfer-encoding`) could not be used: the
    /// body is an error.
    BadFraming(&'static str),
    Done,
    Failed,
}

/// The response body, read from the connection as the caller polls it. When it has ended and
/// the connection can carry another request, the connection goes back to its idle list; a body
/// dropped early closes it.
struct ResponseBody {
    conn: Option<Connection>,
    buf: BytesMut,
    state: State,
    reusable: bool,
    size: SizeHint,
    release: std::sync::Arc<dyn Release>,
}

impl ResponseBody {
    /// At the end: the connection goes back to the endpoint when it may (nothing unread left
    /// over, keep-alive), and the read buffer is freed either way.
    fn finish_if_done(&mut self) {
        if self.state != State::Done {
            return;
        }
        if let Some(conn) = self.conn.take()
            && self.reusable
            && self.buf.is_empty()
        {
            self.release.release(conn);
        }
        self.buf = BytesMut::new();
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.state = State::Failed;
        self.conn = None;
        self.buf = BytesMut::new();
        Poll::Ready(Some(Err(BodyError(Box::new(e)))))
    }

    /// Reads more from the socket into the buffer: `Ok(0)` at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut self.buf)
    }

    /// Reads more into the buffer where the body must go on: the connection closing here cut
    /// the body short.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(match ready!(self.poll_fill(cx)) {
            Ok(0) => Err(Error::Incomplete),
            Ok(_) => Ok(()),
            Err(e) => Err(Error::Read(e)),
        })
    }

    /// Up to `max` bytes of body data: what is buffered, or what the next read brings.
    fn poll_take(&mut self, cx: &mut Context<'_>, max: u64) -> Poll<Result<Bytes, Error>> {
        if self.buf.is_empty()
            && let Err(e) = ready!(self.poll_more(cx))
        {
            return Poll::Ready(Err(e));
        }
        let n = usize::try_from(max)
            .unwrap_or(usize::MAX)
            .min(self.buf.len());
        Poll::Ready(Ok(self.buf.split_to(n).freeze()))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            match this.state {
                State::Done | State::Failed => return Poll::Ready(None),
                State::BadFraming(why) => {
                    return this.fail(Error::Parse(why.into()));
                }
                State::Length(0) => {
                    this.state = State::Done;
                    this.finish_if_done();
                    return Poll::Ready(None);
                }
                State::Length(left) => {
                    let data = match ready!(this.poll_take(cx, left)) {
                        Ok(d) => d,
                        Err(e) => return this.fail(e),
                    };
                    let left = left - data.len() as u64;
                    this.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length(left)
                    };
                    this.finish_if_done();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::UntilClose => {
                    if this.buf.is_empty() {
                        match ready!(this.poll_fill(cx)) {
                            Ok(0) => {
                                this.state = State::Done;
                                this.finish_if_done();
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(e) => return this.fail(Error::Read(e)),
                        }
                    }
                    let data = this.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ChunkSize => match chunk_size_line(&this.buf) {
                    Ok(Some((line_len, 0))) => {
                        this.buf.advance(line_len);
                        this.state = State::Trailers;
                    }
                    Ok(Some((line_len, size))) => {
                        this.buf.advance(line_len);
                        this.state = State::ChunkData(size);
                    }
                    Ok(None) => {
                        if let Err(e) = ready!(this.poll_more(cx)) {
                            return this.fail(e);
                        }
                    }
                    Err(e) => return this.fail(Error::Chunked(e)),
                },
                State::ChunkData(left) => {
                    let data = match ready!(this.poll_take(cx, left)) {
                        Ok(d) => d,
                        Err(e) => return this.fail(e),
                    };
                    let left = left - data.len() as u64;
                    this.state = if left == 0 {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left)
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ChunkEnd => {
                    if this.buf.len() < 2 {
                        if let Err(e) = ready!(this.poll_more(cx)) {
                            return this.fail(e);
                        }
                        continue;
                    }
                    if &this.buf[..2] != b"\r\n" {
                        return this.fail(Error::Chunked("missing CRLF after chunk data"));
                    }
                    this.buf.advance(2);
                    this.state = State::ChunkSize;
                }
                State::Trailers => match parse_trailers(&mut this.buf) {
                    Ok(Some(trailers)) => {
                        this.state = State::Done;
                        this.finish_if_done();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Ok(None) => {
                        if this.buf.len() >= MAX_HEAD_BYTES {
                            return this.fail(Error::HeadTooLarge);
                        }
                        if let Err(e) = ready!(this.poll_more(cx)) {
                            return this.fail(e);
                        }
                    }
                    Err(e) => return this.fail(e),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        self.size
    }
}

/// A chunk-size line at the front of `buf`: its length with CRLF and the chunk size; `None`
/// while incomplete. RFC 9112 §7.1: `chunk-size [ chunk-ext ] CRLF` with `chunk-size =
/// 1*HEXDIG` from the line's first byte; spaces and tabs may follow the size (BWS before an
/// extension, as hyper allows); extensions (`;name=value`) are ignored, but may not hold a CR.
fn chunk_size_line(buf: &[u8]) -> Result<Option<(usize, u64)>, &'static str> {
    let Some(lf) = buf.iter().take(MAX_CHUNK_LINE).position(|b| *b == b'\n') else {
        return if buf.len() >= MAX_CHUNK_LINE {
            Err("chunk-size line too long")
        } else {
            Ok(None)
        };
    };
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err("chunk-size line not ended by CRLF");
    }
    let line = &buf[..lf - 1];
    if line.contains(&b'\r') {
        return Err("bare CR in chunk-size line");
    }
    let size = line.split(|b| *b == b';').next().unwrap_or_default();
    let end = size
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(size.len());
    let (digits, rest) = size.split_at(end);
    if digits.is_empty() || !rest.iter().all(|b| *b == b' ' || *b == b'\t') {
        return Err("bad chunk size");
    }
    if digits.len() > 15 {
        return Err("chunk size has more than 15 hex digits");
    }
    let mut size: u64 = 0;
    for c in digits {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => c - b'A' + 10,
        };
        size = size * 16 + u64::from(d);
    }
    Ok(Some((lf + 1, size)))
}

/// The trailer section after the last chunk, up to and including its blank line: `Some(None)`
/// when it is empty, `None` while incomplete.
fn parse_trailers(buf: &mut BytesMut) -> Result<Option<Option<HeaderMap>>, Error> {
    if buf.starts_with(b"\r\n") {
        buf.advance(2);
        return Ok(Some(None));
    }
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (len, fields) = match httparse::parse_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete((len, fields))) => (len, fields),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Error::Parse(format!("trailers: {e}"))),
    };
    // Only CRLF ends a trailer line (RFC 9112 §7.1.2; a bare LF is a leniency §2.2 allows, not
    // taken here): where the section ends must be where any other reader sees it end, and
    // hyper's chunked decoder looks for CRLF CRLF.
    let section = &buf[..len];
    if section
        .iter()
        .enumerate()
        .any(|(i, b)| *b == b'\n' && (i == 0 || section[i - 1] != b'\r'))
    {
        return Err(Error::Parse("trailers: line not ended by CRLF".into()));
    }
    let mut trailers = HeaderMap::with_capacity(fields.len());
    for f in fields.iter() {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| Error::Parse(format!("bad trailer name {:?}", f.name)))?;
        let value = HeaderValue::from_bytes(f.value)
            .map_err(|_| Error::Parse(format!("bad value of trailer {name}")))?;
        trailers.append(name, value);
    }
    buf.advance(len);
    Ok(Some(Some(trailers)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Head {
        let mut b = BytesMut::from(raw.as_bytes());
        match parse_head(&mut b) {
            Ok(Some(h)) => h,
            other => panic!("{raw:?}: {other:?}", other = other.map(|o| o.is_some())),
        }
    }

    #[test]
    fn encodes_request_with_length_only_when_it_has_a_body() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("orders"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let get = encode(&Method::GET, "/a?b=1", &HeaderMap::new(), b"");
        assert_eq!(get.bytes, b"GET /a?b=1 HTTP/1.1\r\n\r\n");
        let post = encode(&Method::POST, "/", &h, b"hi");
        assert_eq!(
            String::from_utf8_lossy(&post.bytes),
            "POST / HTTP/1.1\r\nhost: orders\r\ncontent-length: 2\r\n\r\nhi"
        );
        let empty_post = encode(&Method::POST, "/", &HeaderMap::new(), b"");
        assert!(String::from_utf8_lossy(&empty_post.bytes).contains("content-length: 0\r\n"));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(
            framing(&head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"), false).ok(),
            Some(Framing::Length(5))
        );
        assert_eq!(
            framing(&head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"), true).ok(),
            Some(Framing::Length(0))
        );
        assert_eq!(
            framing(&head("HTTP/1.1 204 No Content\r\n\r\n"), false).ok(),
            Some(Framing::Length(0))
        );
        assert_eq!(
            framing(
                &head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n"),
                false
            )
            .ok(),
            Some(Framing::Chunked)
        );
        assert_eq!(
            framing(
                &head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"),
                false
            )
            .ok(),
            Some(Framing::Close)
        );
        assert_eq!(
            framing(&head("HTTP/1.1 200 OK\r\n\r\n"), false).ok(),
            Some(Framing::Close)
        );
        assert_eq!(
            framing(
                &head("HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\n\r\n"),
                false
            )
            .ok(),
            Some(Framing::Length(7))
        );
        assert!(
            framing(
                &head("HTTP/1.1 200 OK\r\ncontent-length: 7, 8\r\n\r\n"),
                false
            )
            .is_err()
        );
        assert!(
            framing(
                &head("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n"),
                false
            )
            .is_err()
        );
        assert!(
            framing(
                &head("HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n"),
                false
            )
            .is_err()
        );
    }

    /// Found by the `head` fuzz target: a `Transfer-Encoding` line that is not visible ASCII
    /// after a `chunked` one was skipped, so the body was read as chunked where hyper (and the
    /// RFC: chunked is not the last coding) reads it until close.
    #[test]
    fn transfer_encoding_that_is_not_ascii_is_not_chunked() {
        let mut h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        h.headers.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_bytes(b"chunked\xff").unwrap(),
        );
        assert_eq!(framing(&h, false).ok(), Some(Framing::Close));
        let h = head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip,\r\ntransfer-encoding: chunked, ,\r\n\r\n",
        );
        assert_eq!(framing(&h, false).ok(), Some(Framing::Chunked));
        let h = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding:\r\n\r\n");
        assert_eq!(framing(&h, false).ok(), Some(Framing::Chunked));
    }

    /// Found by the `head` fuzz target: an HTTP/1.0 response with Transfer-Encoding was read as
    /// chunked; RFC 9112 §6.1 says its framing is faulty (hyper refuses it).
    #[test]
    fn transfer_encoding_in_http_1_0_is_faulty_framing() {
        let chunked = "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(framing(&head(chunked), false).is_err());
        assert!(
            framing(
                &head("HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"),
                false
            )
            .is_err()
        );
        // No body either way: nothing to frame.
        assert_eq!(framing(&head(chunked), true).ok(), Some(Framing::Length(0)));
        assert_eq!(
            framing(
                &head("HTTP/1.0 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n"),
                false
            )
            .ok(),
            Some(Framing::Length(0))
        );
    }

    #[test]
    fn keep_alive_rules() {
        assert!(keep_alive(&head("HTTP/1.1 200 OK\r\n\r\n")));
        assert!(!keep_alive(&head(
            "HTTP/1.1 200 OK\r\nconnection: Close\r\n\r\n"
        )));
        assert!(!keep_alive(&head("HTTP/1.0 200 OK\r\n\r\n")));
        assert!(keep_alive(&head(
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\n\r\n"
        )));
    }

    #[test]
    fn head_parsing_is_incremental_and_bounded() {
        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx-a: 1\r\n"[..]);
        assert!(matches!(parse_head(&mut b), Ok(None)));
        b.extend_from_slice(b"\r\nbody");
        let h = match parse_head(&mut b) {
            Ok(Some(h)) => h,
            _ => panic!("complete head not parsed"),
        };
        assert_eq!(h.headers["x-a"], "1");
        assert_eq!(&b[..], b"body");
        let mut bad = BytesMut::from(&b"HTTP/1.1 2x0 OK\r\n\r\n"[..]);
        assert!(parse_head(&mut bad).is_err());
        let mut junk = BytesMut::from(&b"\x00\x01garbage\r\n\r\n"[..]);
        assert!(parse_head(&mut junk).is_err());
    }

    #[test]
    fn chunk_size_lines() {
        assert_eq!(chunk_size_line(b"1a\r\n"), Ok(Some((4, 26))));
        assert_eq!(chunk_size_line(b"A;ext=1\r\nxx"), Ok(Some((9, 10))));
        assert_eq!(chunk_size_line(b"0\r\n"), Ok(Some((3, 0))));
        assert_eq!(chunk_size_line(b"1a"), Ok(None));
        assert!(chunk_size_line(b"zz\r\n").is_err());
        assert!(chunk_size_line(b"1a\n").is_err());
        assert!(chunk_size_line(b"ffffffffffffffffffff\r\n").is_err());
        assert!(chunk_size_line(&[b'1'; MAX_CHUNK_LINE + 1]).is_err());
    }

    /// Found by the `chunk_size` fuzz target (hyper refuses these): a bare CR in the line was
    /// accepted (`0\r\r\n` read as `0`), and so were whitespace before the size and any ASCII
    /// whitespace after it.
    #[test]
    fn chunk_size_line_is_strict() {
        assert!(chunk_size_line(b"0\r\r\n").is_err());
        assert!(chunk_size_line(b"1;a\rb\r\n").is_err());
        assert!(chunk_size_line(b" 1\r\n").is_err());
        assert!(chunk_size_line(b"\t1\r\n").is_err());
        assert!(chunk_size_line(b"1\x0c\r\n").is_err());
        assert!(chunk_size_line(b"1 2\r\n").is_err());
        assert!(chunk_size_line(b";x\r\n").is_err());
        assert_eq!(chunk_size_line(b"1 \t;x\r\n"), Ok(Some((7, 1))));
        assert_eq!(chunk_size_line(b"1\t\r\n"), Ok(Some((4, 1))));
        assert_eq!(chunk_size_line(b"1;\x01\xff\r\n"), Ok(Some((6, 1))));
        assert_eq!(
            chunk_size_line(b"0000000000000001\r\n"),
            Err("chunk size has more than 15 hex digits")
        );
    }

    #[test]
    fn trailers() {
        let mut b = BytesMut::from(&b"\r\nnext"[..]);
        assert!(matches!(parse_trailers(&mut b), Ok(Some(None))));
        assert_eq!(&b[..], b"next");
        let mut t = BytesMut::from(&b"grpc-status: 0\r\n"[..]);
        assert!(matches!(parse_trailers(&mut t), Ok(None)));
        t.extend_from_slice(b"\r\n");
        match parse_trailers(&mut t) {
            Ok(Some(Some(h))) => assert_eq!(h["grpc-status"], "0"),
            _ => panic!("trailers not parsed"),
        }
        assert!(t.is_empty());
    }

    /// Chosen while writing the `trailers` fuzz target: a bare LF ended a trailer line (and
    /// `\n\n` the section), where hyper reads on to a CRLF CRLF.
    #[test]
    fn trailer_lines_end_with_crlf() {
        for raw in [&b"a: b\n\n"[..], b"a: b\r\n\n", b"a: b\nc: d\r\n\r\n"] {
            let mut b = BytesMut::from(raw);
            assert!(parse_trailers(&mut b).is_err(), "{raw:?}");
        }
        let mut b = BytesMut::from(&b"a: b\r\nc: d\r\n\r\n"[..]);
        assert!(matches!(parse_trailers(&mut b), Ok(Some(Some(t))) if t.len() == 2));
    }
}
