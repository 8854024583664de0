//! `sagamesh-bench-backend ADDR`: the upstream of the proxy benchmark (`scripts/bench-proxy.sh`).
//!
//! One thread, HTTP/1.1 and h2c on one port (hyper's auto builder), no logging. Every request is
//! answered at once:
//! - `content-type: application/grpc…`: the request body is read, then a gRPC unary answer (a
//!   5-byte frame header and a 2-byte message) with the trailers `grpc-status: 0`;
//! - `GET /__hits`: the number of requests served so far (not counted itself), so the script can
//!   check that a proxy spread one connection's requests over all backends;
//! - anything else: `200` with a 2-byte body `ok`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

type Body = BoxBody<Bytes, Infallible>;

/// A gRPC message frame: not compressed, length 2, a protobuf message `{1: 1}`.
const GRPC_REPLY: &[u8] = &[0, 0, 0, 0, 2, 0x08, 0x01];

fn full(b: Bytes) -> Body {
    Full::new(b).boxed()
}

async fn handle(req: Request<Incoming>, hits: Arc<AtomicU64>) -> Response<Body> {
    if req.uri().path() == "/__hits" {
        return Response::new(full(hits.load(Ordering::Relaxed).to_string().into()));
    }
    hits.fetch_add(1, Ordering::Relaxed);
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        let mut r = Response::new(full(Bytes::from_static(b"ok")));
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return r;
    }
    // Read the whole request message, as a unary gRPC server does.
    let _ = req.into_body().collect().await;
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = futures_util::stream::iter([
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(GRPC_REPLY))),
        Ok(Frame::trailers(trailers)),
    ]);
    let mut r = Response::new(StreamBody::new(frames).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    r
}

fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18081".into())
        .parse()
        .expect("usage: sagamesh-bench-backend ADDR (e.g. 127.0.0.1:18081)");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let hits = Arc::new(AtomicU64::new(0));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let hits = hits.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let hits = hits.clone();
                    async move { Ok::<_, Infallible>(handle(req, hits).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
