//! The lean HTTP/1.1 path towards endpoints (`sidecar/src/h1_upstream.rs`), against a scripted
//! raw-TCP backend on loopback that answers the way real servers do, and sometimes the way
//! broken ones do: chunked bodies in pieces with extensions and trailers, `connection: close`,
//! bodies delimited by close, interim 100 responses, HEAD, a keep-alive connection closed by
//! the server while idle, truncated and malformed answers. Also: a request body still streaming
//! in takes hyper's path and arrives whole.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use sagamesh_discovery::StaticDiscovery;
use sagamesh_discovery::name::{ServiceKey, Target};
use sagamesh_mesh::metrics::Metrics;
use sagamesh_mesh::{ClientConfig, MeshClient, body};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that reads each request head (and a `content-length` body) and answers by path
/// with raw bytes. Counts the connections it accepted and records each request head.
struct Scripted {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_request(io: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if head.starts_with("POST /refuse-body ") {
                buf.clear();
                return Some((head, Vec::new()));
            }
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = io.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some((head, body));
        }
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Answers one request; `false` when the connection is to be closed afterwards.
async fn answer(io: &mut TcpStream, head: &str, body: &[u8]) -> bool {
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let pause = || tokio::time::sleep(Duration::from_millis(20));
    let w = |s: &'static str| s.as_bytes();
    match path.as_str() {
        "/chunked" => {
            for piece in [
                w("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-kind: chunked\r\n\r\n5\r"),
                w("\nhello\r\n6;ext=1\r\n wor"),
                w("ld\r\n0\r\nx-trailer: t1\r\n"),
                w("\r\n"),
            ] {
                let _ = io.write_all(piece).await;
                pause().await;
            }
            true
        }
        "/close" => {
            let _ = io
                .write_all(w(
                    "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                ))
                .await;
            false
        }
        "/until-close" => {
            let _ = io.write_all(w("HTTP/1.1 200 OK\r\n\r\nuntil-")).await;
            pause().await;
            let _ = io.write_all(w("close")).await;
            false
        }
        "/continue" => {
            let _ = io
                .write_all(w(
                    "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                ))
                .await;
            true
        }
        "/head" => {
            // A HEAD answer announces a length but has no body.
            let _ = io
                .write_all(w("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"))
                .await;
            true
        }
        "/garbage" => {
            let _ = io.write_all(w("NOT HTTP AT ALL\r\n\r\n")).await;
            false
        }
        "/bad-length" => {
            let _ = io
                .write_all(w("HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\nok"))
                .await;
            false
        }
        "/truncated" => {
            let _ = io
                .write_all(w("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"))
                .await;
            false
        }
        "/refuse-body" => {
            // Answers before reading the body, then closes with the body unread (the kernel
            // resets the connection, so the sender's write fails).
            let _ = io
                .write_all(w(
                    "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big\n",
                ))
                .await;
            let _ = io.shutdown().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            false
        }
        "/idle-close" => {
            // Keep-alive as far as the headers go, then the server closes the idle connection
            // (its keep-alive timeout).
            let _ = io
                .write_all(w("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"))
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            false
        }
        _ => {
            let reply = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-received-len: {}\r\n\r\n",
                body.len(),
                body.len()
            );
            let _ = io.write_all(reply.as_bytes()).await;
            let _ = io.write_all(body).await;
            true
        }
    }
}

impl Scripted {
    async fn start() -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, h) = (connections.clone(), heads.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut io, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some((head, body)) = read_request(&mut io, &mut buf).await {
                        h.lock().expect("heads").push(head.clone());
                        if !answer(&mut io, &head, &body).await {
                            break;
                        }
                    }
                });
            }
        });
        Scripted {
            addr,
            connections,
            heads,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn client_for(addr: SocketAddr) -> (MeshClient, Target) {
    let d = StaticDiscovery::new();
    d.set(snapshot("raw", &spec(&[addr])));
    let client = MeshClient::new(d, ClientConfig::default(), Metrics::new());
    (client, Target::new(ServiceKey::new("default", "raw"), None))
}

/// Sends `method path` through the mesh client and reads the whole response.
async fn call(
    client: &MeshClient,
    target: &Target,
    method: &str,
    path: &str,
) -> Result<(StatusCode, http::HeaderMap, Bytes, Option<http::HeaderMap>), String> {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .body(body::empty())
        .expect("request");
    let resp = tokio::time::timeout(WAIT, client.send(target, req))
        .await
        .expect("answer timed out")
        .map_err(|e| e.to_string())?;
    let (parts, b) = resp.into_parts();
    let collected = tokio::time::timeout(WAIT, b.collect())
        .await
        .expect("body timed out")
        .map_err(|e| format!("body: {e}"))?;
    let trailers = collected.trailers().cloned();
    Ok((parts.status, parts.headers, collected.to_bytes(), trailers))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_in_pieces_with_trailers_then_the_connection_is_reused() {
    let backend = Scripted::start().await;
    let (client, target) = client_for(backend.addr);
    for _ in 0..3 {
        let (status, headers, body, trailers) = call(&client, &target, "GET", "/chunked")
            .await
            .expect("answered");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-kind"], "chunked");
        assert_eq!(&body[..], b"hello world");
        let trailers = trailers.expect("trailers");
        assert_eq!(trailers["x-trailer"], "t1");
    }
    assert_eq!(
        backend.connections(),
        1,
        "one keep-alive connection for all three"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_and_close_delimited_bodies_are_not_reused() {
    let backend = Scripted::start().await;
    let (client, target) = client_for(backend.addr);
    for _ in 0..2 {
        let (status, _, body, _) = call(&client, &target, "GET", "/close")
            .await
            .expect("answered");
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    }
    for _ in 0..2 {
        let (_, _, body, _) = call(&client, &target, "GET", "/until-close")
            .await
            .expect("answered");
        assert_eq!(&body[..], b"until-close");
    }
    assert_eq!(backend.connections(), 4, "a new connection for each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_100_is_skipped_and_head_has_no_body() {
    let backend = Scripted::start().await;
    let (client, target) = client_for(backend.addr);
    let (status, _, body, _) = call(&client, &target, "GET", "/continue")
        .await
        .expect("answered");
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    let (status, headers, body, _) = call(&client, &target, "HEAD", "/head")
        .await
        .expect("answered");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-length"], "5");
    assert!(body.is_empty());
    // The same connection carried on after both.
    let (_, _, body, _) = call(&client, &target, "GET", "/").await.expect("answered");
    assert!(body.is_empty());
    assert_eq!(backend.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_closed_by_the_server_is_not_used_again() {
    let backend = Scripted::start().await;
    let (client, target) = client_for(backend.addr);
    for i in 0..5 {
        let (status, _, body, _) = call(&client, &target, "GET", "/idle-close")
            .await
            .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
        // Long enough for the server's close to arrive before the next request.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(backend.connections(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_answers_are_errors_and_the_client_goes_on() {
    let backend = Scripted::start().await;
    let (client, target) = client_for(backend.addr);
    let garbage = call(&client, &target, "GET", "/garbage")
        .await
        .expect_err("garbage");
    assert!(garbage.contains("invalid response head"), "{garbage}");
    let bad = call(&client, &target, "GET", "/bad-length")
        .await
        .expect_err("bad length");
    assert!(bad.contains("content-length"), "{bad}");
    let short = call(&client, &target, "GET", "/truncated")
        .await
        .expect_err("truncated");
    assert!(
        short.contains("before the response body was complete"),
        "{short}"
    );
    // Still serving, on a fresh connection.
    let (status, _, _, _) = call(&client, &target, "GET", "/").await.expect("answered");
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_get_a_length_and_a_streaming_body_still_arrives_whole() {
    let backend = Scripted::start().await;
    let (client, target) = client_for(backend.addr);
    // A complete body: one write with its length.
    let req = http::Request::post("/echo")
        .body(body::full("0123456789"))
        .expect("request");
    let resp = client.send(&target, req).await.expect("answered");
    assert_eq!(resp.headers()["x-received-len"], "10");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"0123456789");

    // A body still arriving when the request is sent (no length known): hyper's path, which
    // sends it chunked; the scripted backend only reads content-length bodies, so give it one.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let stream = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let streaming = body::boxed(http_body_util::BodyExt::map_err(stream, |e| match e {}));
    let req = http::Request::post("/echo")
        .header("content-length", "8")
        .body(streaming)
        .expect("request");
    let send = tokio::spawn({
        let client = client.clone();
        let target = target.clone();
        async move { client.send(&target, req).await }
    });
    for piece in ["abcd", "efgh"] {
        tokio::time::sleep(Duration::from_millis(30)).await;
        tx.send(Ok(Frame::data(Bytes::from(piece))))
            .await
            .expect("send");
    }
    drop(tx);
    let resp = tokio::time::timeout(WAIT, send)
        .await
        .expect("timed out")
        .expect("task")
        .expect("answered");
    assert_eq!(resp.headers()["x-received-len"], "8");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"abcdefgh");

    // Both paths send origin form, with the length they know.
    let heads = backend.heads.lock().expect("heads").clone();
    assert!(heads[0].starts_with("POST /echo HTTP/1.1\r\n"), "{heads:?}");
    assert!(heads[0].contains("content-length: 10\r\n"), "{heads:?}");
    assert!(heads[1].starts_with("POST /echo HTTP/1.1\r\n"), "{heads:?}");
    assert!(heads[1].contains("content-length: 8\r\n"), "{heads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_sent_before_the_body_was_read_reaches_the_caller() {
    let backend = Scripted::start().await;
    let (client, target) = client_for(backend.addr);
    // Far more than the socket buffers hold, so the write fails when the server resets.
    let big = Bytes::from(vec![b'x'; 64 * 1024 * 1024]);
    let req = http::Request::post("/refuse-body")
        .body(body::full(big))
        .expect("request");
    let resp = tokio::time::timeout(WAIT, client.send(&target, req))
        .await
        .expect("timed out")
        .expect("the endpoint's own answer");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"too big\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_proxy_empty_and_full_answers_reuse_one_connection() {
    let backend = Scripted::start().await;
    let d = StaticDiscovery::new();
    d.set(snapshot("raw", &spec(&[backend.addr])));
    let sidecar = start_sidecar(d).await;
    let client = http_client();
    for path in ["/", "/chunked", "/", "/continue", "/"] {
        let g = request(&client, sidecar.outbound_addr(), "GET", "raw", path, &[]).await;
        assert_eq!(g.status, StatusCode::OK, "{path}: {g:?}");
    }
    let g = request(
        &client,
        sidecar.outbound_addr(),
        "HEAD",
        "raw",
        "/head",
        &[],
    )
    .await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(
        backend.connections(),
        1,
        "one keep-alive connection for all six"
    );
    sidecar.shutdown().await;
}
