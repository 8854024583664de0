//! HTTP hardening of the sidecar's listeners (issue #13): the head timeout from accept for
//! silent HTTP/1.1 and HTTP/2 connections, and the request-target and `Host` checks. Real sockets on 127.0.0.x, the real sidecar in-process.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use sagamesh_discovery::StaticDiscovery;
use sagamesh_sidecar::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame (length 0, type 4, no flags, stream 0).
const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Reads until the peer closes (EOF or a reset) and returns how long that took, or `None`
/// when it is still open after `within`. Whatever the server sends first (an HTTP/2 SETTINGS,
/// a GOAWAY, a 408) is read and ignored.
async fn closed_within(mut s: TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// Opens `count` connections to `addr`, sends `first` on each (possibly nothing), and checks
/// that the server closes every one of them within a generous bound of a 1 s head timeout.
async fn silent_connections_are_closed(addr: SocketAddr, count: usize, first: &[u8], what: &str) {
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        if !first.is_empty() {
            s.write_all(first).await.expect("write");
        }
        conns.push(s);
    }
    let waits: Vec<_> = conns
        .into_iter()
        .map(|s| tokio::spawn(closed_within(s, Duration::from_secs(15))))
        .collect();
    for (i, w) in waits.into_iter().enumerate() {
        let took = w.await.expect("join");
        let took = took.unwrap_or_else(|| panic!("{what}: connection {i} still open after 15 s"));
        // The timeout is 1 s: not much earlier (it must not cut a connection at once) ...
        assert!(
            took >= Duration::from_millis(500),
            "{what}: connection {i} closed after {took:?}, before the timeout"
        );
    }
}

async fn sidecar_with_head_timeout(app: Option<SocketAddr>) -> sagamesh_sidecar::Sidecar {
    let mut config = Config::local_test();
    config.header_read_timeout = Duration::from_secs(1);
    config.app_port = app.map(|a| a.port());
    start_sidecar_with(config, StaticDiscovery::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_head_timeout_on_both_listeners() {
    let app = Backend::start("app", [127, 0, 0, 1]);
    let sidecar = sidecar_with_head_timeout(Some(app.addr)).await;
    let inbound = sidecar.inbound_addr().expect("inbound listener");
    for (name, addr) in [("outbound", sidecar.outbound_addr()), ("inbound", inbound)] {
        silent_connections_are_closed(addr, 50, b"", &format!("{name}: silent")).await;
        silent_connections_are_closed(addr, 5, b"GET / HT", &format!("{name}: half a head")).await;
        silent_connections_are_closed(addr, 5, H2_PREFACE, &format!("{name}: h2 preface only"))
            .await;
        let preface_and_settings = [H2_PREFACE, EMPTY_SETTINGS].concat();
        silent_connections_are_closed(
            addr,
            5,
            &preface_and_settings,
            &format!("{name}: h2 preface + SETTINGS"),
        )
        .await;
    }
    // Requests still work, and a connection that sent a request is not cut by the timer.
    let g = get(&http_client(), inbound, "anything").await;
    assert_eq!(g.status, StatusCode::OK, "{g:?}");
    sidecar.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_is_bounded_and_a_slow_first_body_is_not_cut() {
    let app = Backend::start("app", [127, 0, 0, 1]);
    let sidecar = sidecar_with_head_timeout(Some(app.addr)).await;
    let inbound = sidecar.inbound_addr().expect("inbound listener");
    // One request, then idle on the kept-alive connection: closed after about the timeout.
    let mut s = TcpStream::connect(inbound).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(3).any(|w| w == b"app") {
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed before the answer");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    let took = closed_within(s, Duration::from_secs(15)).await;
    assert!(
        took.is_some(),
        "idle keep-alive connection still open after 15 s"
    );

    // A head in time and a body that takes longer than the timeout: still answered.
    let mut s = TcpStream::connect(inbound).await.expect("connect");
    s.write_all(b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\n\r\nab")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(b"cd").await.expect("write rest of the body");
    let mut got = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        while !got.windows(2).any(|w| w == b"\r\n") {
            let n = s.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "no answer");
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    sidecar.shutdown().await;
}

/// Sends raw bytes and returns the status line and the raw head of the answer.
async fn raw_answer(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("an answer in time");
    String::from_utf8_lossy(&got).into_owned()
}

fn assert_bad_request(answer: &str, what: &str) {
    assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer:?}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("x-sagamesh-error: bad-request"),
        "{what}: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_host_headers_and_asterisk_form_get_400_on_both_listeners() {
    let web = Backend::start("web", [127, 0, 0, 1]);
    let app = Backend::start("app", [127, 0, 0, 1]);
    let d = StaticDiscovery::new();
    d.set(snapshot("web", &spec(&[web.addr])));
    let mut config = Config::local_test();
    config.app_port = Some(app.addr.port());
    let sidecar = start_sidecar_with(config, d).await;
    let outbound = sidecar.outbound_addr();
    let inbound = sidecar.inbound_addr().expect("inbound listener");
    for (name, addr, backend) in [("outbound", outbound, &web), ("inbound", inbound, &app)] {
        let before = backend.hits();
        let two_hosts = raw_answer(
            addr,
            b"GET / HTTP/1.1\r\nHost: web\r\nHost: other\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_bad_request(&two_hosts, &format!("{name}: two Host headers"));
        let asterisk = raw_answer(
            addr,
            b"GET * HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_bad_request(&asterisk, &format!("{name}: GET *"));
        assert_eq!(
            backend.hits(),
            before,
            "{name}: a refused request reached the backend"
        );
        // A well-formed request still passes.
        let ok = raw_answer(
            addr,
            b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{name}: {ok:?}");
    }
    // Absolute form whose authority disagrees with Host: the target's authority routes
    // (RFC 9112 §3.2.2), and the endpoint sees it as the Host.
    let absolute = raw_answer(
        outbound,
        b"GET http://web/ HTTP/1.1\r\nHost: nosuchservice\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(absolute.starts_with("HTTP/1.1 200"), "{absolute:?}");
    assert!(absolute.contains("x-backend: web"), "{absolute:?}");
    sidecar.shutdown().await;
}
