//! gRPC through the sidecar (real tonic servers and client) and the gRPC discovery stream
//! (a real tonic discovery server that the test kills and restarts).

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use http::StatusCode;
use sagamesh_api::backoff::{Backoff, Jitter};
use sagamesh_api::service_registration as sr;
use sagamesh_discovery::StaticDiscovery;
use sagamesh_discovery::grpc::GrpcDiscovery;
use sagamesh_discovery::proto as pb;
use sagamesh_discovery::proto::discovery_server::{Discovery, DiscoveryServer};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::transport::Server;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A tonic server on its own runtime; `kill` closes every socket at once.
struct GrpcServer {
    addr: SocketAddr,
    rt: Option<Runtime>,
}

impl GrpcServer {
    fn start<F, Fut>(addr: SocketAddr, serve: F) -> GrpcServer
    where
        F: FnOnce(tokio_stream::wrappers::TcpListenerStream) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let std_listener = {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                match std::net::TcpListener::bind(addr) {
                    Ok(l) => break l,
                    Err(e) if std::time::Instant::now() < deadline => {
                        eprintln!("bind {addr}: {e}; retrying");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("bind {addr}: {e}"),
                }
            }
        };
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let fut = {
            let _guard = rt.enter();
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            serve(tokio_stream::wrappers::TcpListenerStream::new(listener))
        };
        rt.spawn(fut);
        GrpcServer { addr, rt: Some(rt) }
    }

    fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gRPC health server that counts the calls it answers.
fn health_server(ip: [u8; 4], calls: Arc<AtomicUsize>) -> GrpcServer {
    GrpcServer::start(SocketAddr::from((ip, 0)), move |incoming| async move {
        let (_reporter, health) = tonic_health::server::health_reporter();
        let counted = tonic::service::interceptor::InterceptedService::new(
            health,
            move |req: tonic::Request<()>| {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(req)
            },
        );
        let _ = Server::builder()
            .add_service(counted)
            .serve_with_incoming(incoming)
            .await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_one_connection_reaches_three_servers_evenly() {
    let calls: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let servers: Vec<GrpcServer> = [[127, 0, 0, 1], [127, 0, 0, 2], [127, 0, 0, 3]]
        .into_iter()
        .zip(&calls)
        .map(|(ip, c)| health_server(ip, c.clone()))
        .collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let mut s = spec(&addrs);
    s.ports = vec![sr::ServicePort {
        name: "grpc".into(),
        port: 50051,
        protocol: sr::Protocol::Grpc,
        ..Default::default()
    }];
    s.load_balancer.policy = sr::LoadBalancerPolicy::RoundRobin;
    let d = StaticDiscovery::new();
    d.set(snapshot("health", &s));
    let sidecar = start_sidecar(d).await;

    // ONE HTTP/2 connection to the sidecar, addressed to the service.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", sidecar.outbound_addr()))
            .expect("endpoint")
            .origin("http://health.default:50051".parse().expect("origin"))
            .connect()
            .await
            .expect("connect");
    let mut client = HealthClient::new(channel.clone());
    for _ in 0..90 {
        let resp = tokio::time::timeout(
            WAIT,
            client.check(HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await
        .expect("call timed out")
        .expect("call failed");
        assert_eq!(resp.into_inner().status, 1, "SERVING");
    }
    let counts: Vec<usize> = calls.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    for c in &counts {
        assert!(
            (27..=33).contains(c),
            "uneven spread over one connection: {counts:?}"
        );
    }

    // A mesh failure reaches a gRPC client as a gRPC status.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", sidecar.outbound_addr()))
            .expect("endpoint")
            .origin("http://nosuch.default:50051".parse().expect("origin"))
            .connect()
            .await
            .expect("connect");
    let err = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(
        err.metadata()
            .get("x-sagamesh-error")
            .and_then(|v| v.to_str().ok()),
        Some("unknown-service")
    );
    sidecar.shutdown().await;
}

/// A discovery server that serves whatever snapshot the test sets, and counts subscriptions.
#[derive(Clone)]
struct TestDiscovery {
    current: watch::Receiver<(u64, pb::Snapshot)>,
    watches: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Discovery for TestDiscovery {
    type WatchStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Update, tonic::Status>> + Send>>;

    async fn watch(
        &self,
        request: tonic::Request<pb::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let req = request.into_inner();
        self.watches.fetch_add(1, Ordering::SeqCst);
        let stream = tokio_stream::wrappers::WatchStream::new(self.current.clone()).map(
            move |(revision, snapshot)| {
                let kind = if snapshot.service == req.service && snapshot.namespace == req.namespace
                {
                    pb::update::Kind::Snapshot(snapshot)
                } else {
                    pb::update::Kind::DoesNotExist(pb::DoesNotExist {})
                };
                Ok(pb::Update {
                    revision,
                    kind: Some(kind),
                })
            },
        );
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

fn discovery_server(addr: SocketAddr, svc: TestDiscovery) -> GrpcServer {
    GrpcServer::start(addr, move |incoming| async move {
        let _ = Server::builder()
            .add_service(DiscoveryServer::new(svc))
            .serve_with_incoming(incoming)
            .await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_server_killed_mid_load_fails_no_request_and_is_resubscribed() {
    let a = Backend::start("a", [127, 0, 0, 1]);
    let b = Backend::start("b", [127, 0, 0, 2]);
    let c = Backend::start("c", [127, 0, 0, 3]);
    let (tx, rx) = watch::channel((1, snapshot("web", &spec(&[a.addr, b.addr]))));
    let svc = TestDiscovery {
        current: rx,
        watches: Arc::new(AtomicUsize::new(0)),
    };
    let mut server = discovery_server(free_port([127, 0, 0, 1]), svc.clone());
    let discovery = GrpcDiscovery::new(
        &format!("http://{}", server.addr),
        "test",
        Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(200),
            Jitter::None,
        ),
    )
    .expect("discovery");
    let sidecar = start_sidecar(discovery).await;
    let proxy = sidecar.outbound_addr();
    let client = http_client();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let worker = {
        let (client, stop, done) = (client.clone(), stop.clone(), done.clone());
        tokio::spawn(async move {
            let mut got = Vec::new();
            let deadline = std::time::Instant::now() + WAIT;
            while !stop.load(Ordering::SeqCst)
                && got.len() < 5000
                && std::time::Instant::now() < deadline
            {
                got.push(get(&client, proxy, "web").await);
                done.fetch_add(1, Ordering::SeqCst);
            }
            got
        })
    };
    let wait_for = |n: usize| {
        let done = done.clone();
        async move {
            eventually("load progress", || {
                let done = done.clone();
                async move { done.load(Ordering::SeqCst) >= n }
            })
            .await
        }
    };
    wait_for(50).await;
    server.kill();
    let at_kill = done.load(Ordering::SeqCst);
    // The control plane is away: requests go on with the last known state.
    wait_for(at_kill + 150).await;

    // The endpoint set changes while it is away; it comes back and the sidecar resubscribes.
    tx.send((2, snapshot("web", &spec(&[a.addr, b.addr, c.addr]))))
        .expect("update");
    server = discovery_server(server.addr, svc.clone());
    eventually("the new snapshot arrives", || {
        let client = client.clone();
        let admin = sidecar.admin_addr();
        async move {
            let dbg = request(&client, admin, "GET", "admin", "/debug/discovery", &[]).await;
            let json: serde_json::Value = serde_json::from_str(&dbg.body).expect("json");
            json["discovery"]["services"]["web.default"]["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == 3)
        }
    })
    .await;
    eventually("c gets traffic after resubscription", || {
        let hits = c.hits.clone();
        async move { hits.load(Ordering::SeqCst) > 0 }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let got = worker.await.expect("worker");
    let failed: Vec<_> = got.iter().filter(|g| g.status != StatusCode::OK).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(svc.watches.load(Ordering::SeqCst) >= 2, "resubscribed");
    drop(server);
    sidecar.shutdown().await;
}
