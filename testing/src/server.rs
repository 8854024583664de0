//! A real HTTP server on loopback for tests: HTTP/1.1 and h2c on one port, each server on its
//! own single-worker runtime, so a test can kill it (the listener and every open connection
//! close at once, as when a process dies), start it again on the same address, or stop it
//! gracefully (in-flight requests finish, idle keep-alive connections close).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// What answers each request.
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>
        + Send
        + Sync,
>;

/// Wraps an async closure as a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

pub struct TestServer {
    addr: SocketAddr,
    handler: Handler,
    running: Option<Running>,
}

struct Running {
    rt: Runtime,
    stop: watch::Sender<bool>,
    connections: Arc<AtomicUsize>,
}

impl TestServer {
    /// Serves `handler` on `addr` (port 0: one the OS chooses, kept across restarts).
    pub fn start(addr: SocketAddr, handler: Handler) -> Self {
        let mut server = TestServer {
            addr,
            handler,
            running: None,
        };
        server.run();
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn run(&mut self) {
        let listener = bind(self.addr);
        self.addr = listener.local_addr().expect("the listener's address");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a test server runtime");
        let (stop, stop_rx) = watch::channel(false);
        let connections = Arc::new(AtomicUsize::new(0));
        let (handler, live) = (self.handler.clone(), connections.clone());
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let mut stop_accept = stop_rx.clone();
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    _ = async { let _ = stop_accept.wait_for(|s| *s).await; } => return,
                };
                let handler = handler.clone();
                let mut stop_conn = stop_rx.clone();
                let live = live.clone();
                live.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let answer = handler(req);
                        async move { Ok::<_, Infallible>(answer.await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    let mut conn = std::pin::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = async { let _ = stop_conn.wait_for(|s| *s).await; } => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        self.running = Some(Running {
            rt,
            stop,
            connections,
        });
    }

    /// Kills the server: the listener and every open connection close at once.
    pub fn kill(&mut self) {
        if let Some(running) = self.running.take() {
            running.rt.shutdown_background();
        }
    }

    /// Starts again on the same address.
    pub fn restart(&mut self) {
        self.kill();
        self.run();
    }

    /// Stops accepting, lets requests in flight finish (at most 10 s), closes idle connections.
    pub async fn stop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        running.stop.send_replace(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while running.connections.load(Ordering::SeqCst) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        running.rt.shutdown_background();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn bind(addr: SocketAddr) -> std::net::TcpListener {
    // A killed server's port may linger briefly; retry for a while.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => {
                l.set_nonblocking(true).expect("nonblocking");
                return l;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("bind {addr}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("bind {addr}: {e}"),
        }
    }
}
