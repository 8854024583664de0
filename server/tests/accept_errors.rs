//! Out of file descriptors (EMFILE), the accept loop pauses with a growing backoff instead of
//! spinning on the failed accept, and serves the waiting connection once descriptors are free.
//!
//! Its own test binary: it lowers this process's descriptor limit.

use std::convert::Infallible;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use sagamesh_server::{ServeOptions, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Log lines written by the server under test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().expect("lock"))
            .matches(needle)
            .count()
    }
}

#[tokio::test]
async fn accept_failures_back_off_and_recover() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .finish();
    // This thread only: the test runtime is single-threaded, so the server task logs here.
    let _guard = tracing::subscriber::set_default(subscriber);

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_stop, shutdown) = watch::channel(false);
    tokio::spawn(serve(
        listener,
        ServeOptions::default(),
        shutdown,
        |_peer| {
            service_fn(|_req| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"served"))))
            })
        },
    ));

    // Fill the descriptor table (under a lowered limit), leaving one for the client's socket.
    let limit = 256;
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(limit),
            maximum: rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum,
        },
    )
    .expect("lower RLIMIT_NOFILE");
    let mut hog = Vec::new();
    while let Ok(file) = std::fs::File::open("/dev/null") {
        hog.push(file);
        assert!(hog.len() <= limit as usize, "the limit did not apply");
    }
    hog.pop();
    // Completes in the kernel's backlog; the server's accept then has no descriptor to give it.
    let mut client = std::net::TcpStream::connect(addr).expect("connect");

    tokio::time::sleep(Duration::from_millis(700)).await;
    let failures = logs.count("accept failed");
    // 5 ms doubling: about 7 attempts in 700 ms. A loop without backoff fails thousands of
    // times in that time, one with a fixed 50 ms pause 14 times.
    assert!(
        (2..=10).contains(&failures),
        "{failures} failed accepts in 700 ms"
    );

    drop(hog);
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .expect("write");
    client.set_nonblocking(true).expect("nonblocking");
    let mut client = tokio::net::TcpStream::from_std(client).expect("tokio stream");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer))
        .await
        .expect("served once descriptors are free")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("served"), "{answer}");
    let _ = client.shutdown().await;
}
