//! The differential check every target ends with: the same response bytes, split into the same
//! reads, go to the sidecar's HTTP/1.1 exchange (`sagamesh_mesh::fuzzing`) and
//! to hyper's client (`hyper::client::conn::http1`), and both must agree: both accept or both
//! refuse, and when both accept, on the status, the version, every header field, the body's
//! exact length (when it has one), its bytes and its trailers.
//!
//! # Input format (all targets)
//! Byte 0: bit 0 set = the request is a HEAD (else GET). Byte 1: how the bytes are split into
//! reads (see [`split`]). The rest: the target's bytes.
//!
//! # Deliberate differences (each one is skipped by [`compare`], and only that one)
//! 1. A final `101 Switching Protocols`: the sidecar never asks for an upgrade (`Upgrade` is
//!    hop-by-hop and stripped), so it refuses one; hyper hands the 101 to its caller.
//! 2. Limits. `Content-Length` has at most 19 digits and a chunk size at most 15 hex digits
//!    in the sidecar (no overflow arithmetic; leading zeros beyond that are refused), where hyper
//!    takes any number of digits whose value fits a `u64`. A chunk-size line (size and
//!    extensions) is at most 4 KiB in the sidecar; hyper allows 16 KiB of extensions per body.
//!    Heads and trailer sections: 64 KiB in the sidecar, 16 KiB of trailers and about 400 KiB
//!    of buffer in hyper; inputs here stay below 16 KiB (`-max_len` in scripts/fuzz.sh). hyper
//!    is given the sidecar's 128 header fields (`max_headers`), so that limit is the same.
//! 3. A `Transfer-Encoding` list whose last element is empty (`chunked,`): RFC 9110 §5.6.1 says
//!    a recipient MUST ignore empty list elements, so for the sidecar the last coding is
//!    `chunked`; hyper takes the empty element as the last coding and reads until close.
//! 4. Trailer lines ended by a bare LF: the sidecar refuses them (a trailer section ends where
//!    every reader sees it end: CRLF CRLF); hyper's chunked decoder reads on to a CRLF CRLF and
//!    hands what it collected to httparse, which takes a bare LF as a line end, so it accepts
//!    some of them.

use std::pin::{Pin, pin};
use std::task::Poll;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body::Body;
use hyper_util::rt::TokioIo;
use sagamesh_mesh::fuzzing::{self, Exchange, Script};

/// The head every chunked-body target puts before its bytes.
pub const CHUNKED_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";

/// A fuzz input: the request method, how the bytes are split, the target's bytes.
pub struct Input<'a> {
    pub head_method: bool,
    pub split: u8,
    pub bytes: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        match data {
            [flags, split, bytes @ ..] => Some(Input {
                head_method: flags & 1 == 1,
                split: *split,
                bytes,
            }),
            _ => None,
        }
    }
}

/// Splits `bytes` into reads: `seed` 0 is one read; otherwise reads of 1 to `2^(seed % 8)`
/// bytes, their lengths drawn from a small generator seeded by `seed / 8`.
pub fn split(bytes: &[u8], seed: u8) -> Vec<Bytes> {
    let all = Bytes::copy_from_slice(bytes);
    if seed == 0 {
        return vec![all];
    }
    let max = 1usize << (seed % 8);
    let mut state = u32::from(seed / 8).wrapping_mul(2_654_435_761) | 1;
    let mut reads = Vec::new();
    let mut at = 0;
    while at < all.len() {
        // xorshift32
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (1 + state as usize % max).min(all.len() - at);
        reads.push(all.slice(at..at + n));
        at += n;
    }
    reads
}

/// hyper's client on the same reads.
pub fn hyper_exchange(head_method: bool, reads: Vec<Bytes>) -> Exchange {
    let max_polls = 64 + 8 * reads.iter().map(Bytes::len).sum::<usize>();
    let method = if head_method {
        Method::HEAD
    } else {
        Method::GET
    };
    fuzzing::run(
        async move {
            let failed = |e: hyper::Error| Exchange {
                head: Err(e.to_string()),
                exact_size: None,
                body: Ok((Vec::new(), None)),
                released: false,
            };
            let io = TokioIo::new(Script::new(reads));
            let (mut tx, conn) = match hyper::client::conn::http1::Builder::new()
                .max_headers(128)
                .handshake::<_, http_body_util_empty::Empty>(io)
                .await
            {
                Ok(pair) => pair,
                Err(e) => return failed(e),
            };
            let mut req = Request::new(http_body_util_empty::Empty);
            *req.method_mut() = method;
            *req.uri_mut() = http::Uri::from_static("/");
            let client = async move {
                let resp = match tx.send_request(req).await {
                    Ok(resp) => resp,
                    Err(e) => return failed(e),
                };
                let (parts, mut body) = resp.into_parts();
                let exact_size = body.size_hint().exact();
                let mut data = Vec::new();
                let mut trailers = None;
                let mut error = None;
                while let Some(frame) =
                    std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                {
                    match frame {
                        Ok(frame) => match frame.into_data() {
                            Ok(d) => data.extend_from_slice(&d),
                            Err(frame) => trailers = frame.into_trailers().ok(),
                        },
                        Err(e) => {
                            error = Some(e.to_string());
                            break;
                        }
                    }
                }
                Exchange {
                    head: Ok((parts.status, parts.version, parts.headers)),
                    exact_size,
                    body: match error {
                        Some(e) => Err(e),
                        None => Ok((data, trailers)),
                    },
                    released: false,
                }
            };
            // The connection task and the request, polled together (a join without a runtime).
            // The request first, so that it is queued before the connection reads anything (a
            // response with no request outstanding is an error to hyper).
            let mut conn = pin!(conn);
            let mut client = pin!(client);
            let mut conn_done = false;
            std::future::poll_fn(|cx| {
                if let Poll::Ready(out) = client.as_mut().poll(cx) {
                    return Poll::Ready(out);
                }
                if !conn_done && conn.as_mut().poll(cx).is_ready() {
                    conn_done = true;
                }
                client.as_mut().poll(cx)
            })
            .await
        },
        max_polls,
    )
}

/// An empty request body for hyper (`http_body_util::Empty` without the dependency).
mod http_body_util_empty {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::{Body, Frame, SizeHint};

    pub struct Empty;

    impl Body for Empty {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(None)
        }

        fn is_end_stream(&self) -> bool {
            true
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(0)
        }
    }
}

fn accepted(x: &Exchange) -> bool {
    x.head.is_ok() && x.body.is_ok()
}

fn why(x: &Exchange) -> &str {
    match (&x.head, &x.body) {
        (Err(e), _) | (Ok(_), Err(e)) => e,
        _ => "accepted",
    }
}

/// Difference 1: hyper gave a final 101.
fn upgrade(theirs: &Exchange) -> bool {
    matches!(&theirs.head, Ok((s, _, _)) if *s == StatusCode::SWITCHING_PROTOCOLS)
}

/// Difference 2: the sidecar refused a length beyond its digit limits, or a chunk-size line
/// beyond 4 KiB.
fn sidecar_limit(ours: &Exchange, theirs: &Exchange) -> bool {
    let e = why(ours);
    if e.contains("chunk size has more than 15 hex digits")
        || e.contains("chunk-size line too long")
    {
        return true;
    }
    let Ok((_, _, headers)) = &theirs.head else {
        return false;
    };
    e.contains("bad content-length")
        && headers
            .get_all(http::header::CONTENT_LENGTH)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .any(|p| p.trim_ascii().len() > 19)
}

/// Difference 3: a `Transfer-Encoding` whose last list element is empty.
fn empty_last_coding(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .is_some_and(|v| {
            v.as_bytes()
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().is_empty())
        })
}

/// Difference 4: the sidecar refused a trailer line ended by a bare LF.
fn bare_lf_trailer(ours: &Exchange) -> bool {
    why(ours).contains("trailers: line not ended by CRLF")
}

/// Runs both on `response` (split as `input` says) and panics where they disagree, other than
/// in the documented differences.
pub fn differential(input: &Input<'_>, response: &[u8]) {
    let ours = fuzzing::exchange(input.head_method, split(response, input.split));
    let theirs = hyper_exchange(input.head_method, split(response, input.split));
    compare(input.head_method, response, &ours, &theirs);
    if ours.released {
        assert!(
            accepted(&ours),
            "released a connection whose response failed"
        );
    }
}

/// The agreement rules; see the module docs for what is skipped and why.
pub fn compare(head_method: bool, response: &[u8], ours: &Exchange, theirs: &Exchange) {
    let show = || {
        format!(
            "HEAD={head_method} response={:?}\nsidecar: {}\nhyper:   {}",
            String::from_utf8_lossy(response),
            why(ours),
            why(theirs)
        )
    };
    if upgrade(theirs) {
        assert!(!accepted(ours), "sidecar took a 101\n{}", show());
        return;
    }
    if let (Ok((_, _, h)), _) | (_, Ok((_, _, h))) = (&ours.head, &theirs.head)
        && empty_last_coding(h)
    {
        return;
    }
    match (accepted(ours), accepted(theirs)) {
        (false, false) => {}
        (true, false) => panic!("sidecar accepted what hyper refused\n{}", show()),
        (false, true) if sidecar_limit(ours, theirs) || bare_lf_trailer(ours) => {}
        (false, true) => panic!("sidecar refused what hyper accepted\n{}", show()),
        (true, true) => {
            let (Ok(a), Ok(b)) = (&ours.head, &theirs.head) else {
                unreachable!("both accepted")
            };
            assert_eq!(a, b, "heads differ\n{}", show());
            assert_eq!(
                ours.exact_size,
                theirs.exact_size,
                "exact body sizes differ\n{}",
                show()
            );
            let (Ok(a), Ok(b)) = (&ours.body, &theirs.body) else {
                unreachable!("both accepted")
            };
            assert_eq!(a.0, b.0, "body bytes differ\n{}", show());
            assert_eq!(a.1, b.1, "trailers differ\n{}", show());
        }
    }
}

/// Checks that asking again on longer prefixes of `bytes` never changes a complete answer and
/// that every prefix shorter than a complete answer is incomplete; `f` returns the length a
/// complete answer consumed, `None` while incomplete, `Err` when refused. At most `max_checks`
/// prefixes are tried, evenly spread.
pub fn prefixes_are_incomplete<E: std::fmt::Debug>(
    bytes: &[u8],
    max_checks: usize,
    f: impl Fn(&[u8]) -> Result<Option<usize>, E>,
) {
    let Ok(Some(len)) = f(bytes) else {
        return;
    };
    assert!(
        len <= bytes.len(),
        "consumed {len} of {} bytes",
        bytes.len()
    );
    let step = len.div_ceil(max_checks.max(1)).max(1);
    for end in (0..len).step_by(step) {
        let r = f(&bytes[..end]);
        assert!(
            matches!(r, Ok(None)),
            "prefix {end} of a complete {len}: {r:?} for {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    assert!(
        matches!(f(&bytes[..len]), Ok(Some(l)) if l == len),
        "the consumed part alone is not the same answer"
    );
}
