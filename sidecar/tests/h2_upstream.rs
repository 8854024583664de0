//! HTTP/2 towards endpoints (`sidecar/src/h2_upstream.rs`), with real h2c traffic on loopback:
//! bodies larger than every flow-control window in both directions, a request body that
//! arrives slowly in pieces, trailers both ways, a streamed body over the limit, and an
//! endpoint restarted under a pooled connection.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sagamesh_discovery::StaticDiscovery;
use sagamesh_sidecar::config::Config;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

type ClientBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// An h2c server on its own runtime that answers with the request body it read in full, the
/// length in `x-received-len`, and trailers: `x-echo-trailer: done` plus, when the request had
/// a trailer `x-request-trailer`, its value in `x-request-trailer-seen`.
struct EchoBackend {
    addr: SocketAddr,
    rt: Option<Runtime>,
}

impl EchoBackend {
    fn start() -> EchoBackend {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let collected = req.into_body().collect().await;
                        let Ok(collected) = collected else {
                            let mut r = Response::new(frames(Vec::new()));
                            *r.status_mut() = StatusCode::BAD_REQUEST;
                            return Ok::<_, Infallible>(r);
                        };
                        let mut trailers = HeaderMap::new();
                        trailers.insert("x-echo-trailer", HeaderValue::from_static("done"));
                        if let Some(v) = collected
                            .trailers()
                            .and_then(|t| t.get("x-request-trailer"))
                        {
                            trailers.insert("x-request-trailer-seen", v.clone());
                        }
                        let body = collected.to_bytes();
                        let len = body.len();
                        let mut r = Response::new(frames(vec![
                            Frame::data(body),
                            Frame::trailers(trailers),
                        ]));
                        r.headers_mut().insert("x-received-len", len.into());
                        Ok(r)
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        EchoBackend { addr, rt: Some(rt) }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn frames(list: Vec<Frame<Bytes>>) -> ClientBody {
    StreamBody::new(tokio_stream::iter(list.into_iter().map(Ok))).boxed()
}

/// One h2c connection to the sidecar's outbound port (prior knowledge).
async fn h2_client(proxy: SocketAddr) -> hyper::client::conn::http2::SendRequest<ClientBody> {
    let io = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(io))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    tx
}

async fn send(
    tx: &mut hyper::client::conn::http2::SendRequest<ClientBody>,
    authority: &str,
    body: ClientBody,
) -> Result<(StatusCode, HeaderMap, Bytes, Option<HeaderMap>), hyper::Error> {
    let req = Request::post(format!("http://{authority}/echo"))
        .body(body)
        .expect("request");
    let resp = tokio::time::timeout(WAIT, tx.send_request(req))
        .await
        .expect("response timed out")?;
    let (parts, body) = resp.into_parts();
    let collected = tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("body timed out")?;
    let trailers = collected.trailers().cloned();
    Ok((parts.status, parts.headers, collected.to_bytes(), trailers))
}

fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

async fn echo_sidecar(backend: &EchoBackend, config: Config) -> sagamesh_sidecar::Sidecar {
    let d = StaticDiscovery::new();
    d.set(snapshot("echo", &spec(&[backend.addr])));
    start_sidecar_with(config, d).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_slow_bodies_and_trailers_go_both_ways() {
    let backend = EchoBackend::start();
    let sidecar = echo_sidecar(&backend, Config::local_test()).await;
    let mut tx = h2_client(sidecar.outbound_addr()).await;

    // 6 MiB up and down: more than the 2 MiB stream and 5 MiB connection windows, so both
    // directions only finish if flow control is given back as the data is read. The request
    // body comes in 1 MiB pieces with pauses (the sidecar must stream it, not find it
    // complete), then a trailer.
    let payload = pattern(6 * 1024 * 1024);
    let (chunks_tx, chunks_rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
    let sender = {
        let payload = payload.clone();
        tokio::spawn(async move {
            for piece in payload.chunks(1024 * 1024) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let frame = Frame::data(Bytes::copy_from_slice(piece));
                if chunks_tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("x-request-trailer", HeaderValue::from_static("sent-last"));
            let _ = chunks_tx.send(Ok(Frame::trailers(trailers))).await;
        })
    };
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(chunks_rx)).boxed();
    let (status, headers, echoed, trailers) = send(&mut tx, "echo.default", body)
        .await
        .expect("streamed request");
    sender.await.expect("sender");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers.get("x-received-len").and_then(|v| v.to_str().ok()),
        Some("6291456")
    );
    assert!(
        echoed == payload,
        "echoed body differs ({} bytes)",
        echoed.len()
    );
    let trailers = trailers.expect("response trailers");
    assert_eq!(
        trailers.get("x-echo-trailer").map(|v| v.as_bytes()),
        Some(&b"done"[..])
    );
    assert_eq!(
        trailers.get("x-request-trailer-seen").map(|v| v.as_bytes()),
        Some(&b"sent-last"[..]),
        "the request's trailer reached the endpoint"
    );

    // Small bodies that are complete on arrival (the unary gRPC shape), many at once on the
    // same connection.
    let mut calls = Vec::new();
    for i in 0..64usize {
        let mut tx = tx.clone();
        calls.push(tokio::spawn(async move {
            let body = Full::new(Bytes::from(format!("call {i}")))
                .map_err(|never| match never {})
                .boxed();
            send(&mut tx, "echo.default", body).await
        }));
    }
    for (i, call) in calls.into_iter().enumerate() {
        let (status, _, echoed, trailers) = call.await.expect("task").expect("small request");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(echoed, Bytes::from(format!("call {i}")));
        assert!(trailers.is_some_and(|t| t.contains_key("x-echo-trailer")));
    }
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_body_over_the_limit_is_the_callers_fault() {
    let backend = EchoBackend::start();
    let mut config = Config::local_test();
    config.max_body_bytes = 64 * 1024;
    let sidecar = echo_sidecar(&backend, config).await;
    let mut tx = h2_client(sidecar.outbound_addr()).await;

    // More times than the breaker's consecutive-failure threshold: were the endpoint blamed,
    // it would be ejected and the last request would fail.
    for _ in 0..8 {
        let (chunks_tx, chunks_rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        tokio::spawn(async move {
            for _ in 0..16 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let frame = Frame::data(Bytes::from(vec![b'x'; 16 * 1024]));
                if chunks_tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
        });
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(chunks_rx)).boxed();
        match send(&mut tx, "echo.default", body).await {
            Ok((status, headers, _, _)) => {
                assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
                assert_eq!(
                    headers
                        .get("x-sagamesh-error")
                        .and_then(|v| v.to_str().ok()),
                    Some("body-too-large")
                );
            }
            // The sidecar may also reset the stream the caller is still sending on after it
            // answered; hyper then reports the reset instead of the answer.
            Err(e) => assert!(e.to_string().contains("stream"), "unexpected error: {e}"),
        }
    }
    let body = Full::new(Bytes::from_static(b"small"))
        .map_err(|never| match never {})
        .boxed();
    let (status, _, echoed, _) = send(&mut tx, "echo.default", body)
        .await
        .expect("request within the limit");
    assert_eq!(status, StatusCode::OK, "the endpoint was not blamed");
    assert_eq!(echoed, Bytes::from_static(b"small"));
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_endpoint_gets_a_new_connection() {
    let mut backend = Backend::start("b1", [127, 0, 0, 1]);
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &spec(&[backend.addr])));
    let sidecar = start_sidecar(d).await;
    let mut tx = h2_client(sidecar.outbound_addr()).await;
    let get = |tx: &mut hyper::client::conn::http2::SendRequest<ClientBody>| {
        let req = Request::get("http://web.default/")
            .body(frames(Vec::new()))
            .expect("request");
        let fut = tx.send_request(req);
        async move {
            let resp = tokio::time::timeout(WAIT, fut)
                .await
                .expect("timed out")
                .expect("response");
            resp.status()
        }
    };
    for _ in 0..3 {
        assert_eq!(get(&mut tx).await, StatusCode::OK);
    }
    // Every socket of the endpoint closes, then it listens again on the same address: the
    // pooled HTTP/2 connection is seen closed and the next requests use a new one.
    backend.restart();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..10 {
        assert_eq!(get(&mut tx).await, StatusCode::OK);
    }
    assert_eq!(
        backend.hits(),
        13,
        "every request reached the endpoint once"
    );
    sidecar.shutdown().await;
}
