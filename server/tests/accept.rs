//! The accept loop's guards on real sockets: a connection that sends no request head (plain,
//! HTTP/2 preface only, or no TLS handshake) is closed after the head-read timeout while a
//! prompt one is served; TLS is served with the handle's configuration.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use sagamesh_server::{ServeOptions, TlsHandle, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const HEAD_TIMEOUT: Duration = Duration::from_millis(300);

async fn start(tls: Option<TlsHandle>) -> (std::net::SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, shutdown) = watch::channel(false);
    let options = ServeOptions {
        header_read_timeout: HEAD_TIMEOUT,
        tls,
        ..ServeOptions::default()
    };
    tokio::spawn(serve(listener, options, shutdown, |_peer| {
        service_fn(|_req| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
        })
    }));
    (addr, stop)
}

/// Reads until the server closes; how long that took (capped at 5 s).
async fn time_to_close(stream: &mut (impl AsyncReadExt + Unpin)) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    start.elapsed()
}

async fn get(stream: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin)) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .expect("answered in time")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_head_timeout() {
    let (addr, _stop) = start(None).await;
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let mut preface_only = TcpStream::connect(addr).await.expect("connect");
    preface_only
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write");
    let mut partial_head = TcpStream::connect(addr).await.expect("connect");
    partial_head
        .write_all(b"GET / HTTP/1.1\r\nhost:")
        .await
        .expect("write");
    for (what, stream) in [
        ("silent", &mut silent),
        ("h2 preface only", &mut preface_only),
        ("partial head", &mut partial_head),
    ] {
        let closed_after = time_to_close(stream).await;
        assert!(
            closed_after < Duration::from_secs(3),
            "{what}: still open after {closed_after:?}"
        );
    }
    // A prompt request on a new connection is served.
    let mut prompt = TcpStream::connect(addr).await.expect("connect");
    let answer = get(&mut prompt).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hello"), "{answer}");
}

#[tokio::test]
async fn keep_alive_connection_outlives_the_first_head_timeout() {
    let (addr, _stop) = start(None).await;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    for _ in 0..3 {
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("answered")
            .expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // Under the idle timeout, well past the time the first head had to arrive in total.
        tokio::time::sleep(HEAD_TIMEOUT / 2).await;
    }
}

fn tls_pair() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

#[tokio::test]
async fn tls_is_served_and_a_missing_handshake_times_out() {
    let (server, client) = tls_pair();
    let (addr, _stop) = start(Some(TlsHandle::new(server))).await;

    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(client)
        .connect(name, tcp)
        .await
        .expect("handshake");
    let answer = get(&mut tls).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let mut no_handshake = TcpStream::connect(addr).await.expect("connect");
    let closed_after = time_to_close(&mut no_handshake).await;
    assert!(
        closed_after < Duration::from_secs(3),
        "no handshake: still open after {closed_after:?}"
    );
}
