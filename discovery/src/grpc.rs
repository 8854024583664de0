//! Discovery from the control plane's gRPC `Watch` streams: one stream per destination service,
//! opened on first use. When a stream fails or ends, the last known state stays in force and the
//! stream is reopened with exponential backoff (with jitter), so a control-plane outage never
//! fails a request to a healthy endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::proto as pb;
use crate::proto::discovery_client::DiscoveryClient;
use sagamesh_api::backoff::{Backoff, Jitter};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::name::ServiceKey;
use crate::{Discover, Resolution, Watches};

/// Reconnect backoff of the discovery streams: 100 ms doubling to 5 s, equal jitter (never
/// reconnects at once, never waits for nothing).
pub const RECONNECT_BACKOFF: Backoff = Backoff::new(
    Duration::from_millis(100),
    Duration::from_secs(5),
    Jitter::Equal,
);

/// The connection to the control plane, shared by every stream; replaced after a failure.
///
/// A failed stream drops the shared channel and the next attempt connects afresh (bounded by
/// the connect timeout), so every attempt either has a fresh connection or a clear connect
/// error in the log, whatever state the old connection was left in.
#[derive(Clone)]
struct SharedChannel {
    endpoint: Endpoint,
    current: Arc<std::sync::Mutex<Option<Channel>>>,
}

impl SharedChannel {
    async fn get(&self) -> Result<Channel, tonic::transport::Error> {
        if let Some(c) = self.current.lock().ok().and_then(|c| c.clone()) {
            return Ok(c);
        }
        let c = self.endpoint.connect().await?;
        if let Ok(mut cur) = self.current.lock() {
            *cur = Some(c.clone());
        }
        Ok(c)
    }

    fn invalidate(&self) {
        if let Ok(mut cur) = self.current.lock() {
            *cur = None;
        }
    }
}

/// gRPC discovery client. Dropping it stops every stream.
pub struct GrpcDiscovery {
    channel: SharedChannel,
    caller: String,
    backoff: Backoff,
    watches: Arc<Watches>,
    tasks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
    connected: Arc<AtomicBool>,
}

/// A bad discovery address.
#[derive(Debug, thiserror::Error)]
#[error("invalid discovery address {0:?}: {1}")]
pub struct AddressError(String, String);

impl GrpcDiscovery {
    /// `address` like `http://127.0.0.1:8090`. Connects lazily.
    pub fn new(address: &str, caller: &str, backoff: Backoff) -> Result<Arc<Self>, AddressError> {
        let endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| AddressError(address.into(), e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(24 * 3600))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(Arc::new(GrpcDiscovery {
            channel: SharedChannel {
                endpoint,
                current: Arc::new(std::sync::Mutex::new(None)),
            },
            caller: caller.to_string(),
            backoff,
            watches: Arc::new(Watches::default()),
            tasks: std::sync::Mutex::new(Vec::new()),
            connected: Arc::new(AtomicBool::new(false)),
        }))
    }

    fn start(&self, key: ServiceKey) {
        let channel = self.channel.clone();
        let watches = self.watches.clone();
        let backoff = self.backoff;
        let connected = self.connected.clone();
        let request = pb::WatchRequest {
            namespace: key.namespace.clone(),
            service: key.name.clone(),
            caller: self.caller.clone(),
        };
        let task = tokio::spawn(async move {
            let mut failures: u32 = 0;
            loop {
                let call = async {
                    let ch = channel.get().await.map_err(|e| {
                        tonic::Status::unavailable(format!("connecting to the control plane: {e}"))
                    })?;
                    DiscoveryClient::new(ch).watch(request.clone()).await
                };
                match call.await {
                    Ok(response) => {
                        let mut stream = response.into_inner();
                        loop {
                            match stream.message().await {
                                Ok(Some(update)) => {
                                    failures = 0;
                                    connected.store(true, Ordering::Relaxed);
                                    if let Some(r) = Resolution::from_update(update) {
                                        watches.set(&key, r);
                                    }
                                }
                                Ok(None) => {
                                    tracing::info!(service = %key, "discovery stream ended; reconnecting, last known state kept");
                                    break;
                                }
                                Err(status) => {
                                    tracing::warn!(service = %key, error = %status, "discovery stream failed; reconnecting, last known state kept");
                                    break;
                                }
                            }
                        }
                    }
                    Err(status) => {
                        tracing::warn!(service = %key, error = %status, "discovery watch refused or unreachable; retrying");
                    }
                }
                channel.invalidate();
                failures = failures.saturating_add(1);
                let delay = backoff.delay(failures);
                tokio::time::sleep(delay).await;
            }
        });
        if let Ok(mut t) = self.tasks.lock() {
            t.push(task.abort_handle());
        }
    }
}

impl Drop for GrpcDiscovery {
    fn drop(&mut self) {
        if let Ok(t) = self.tasks.lock() {
            for h in t.iter() {
                h.abort();
            }
        }
    }
}

impl Discover for GrpcDiscovery {
    fn watch(&self, service: &ServiceKey) -> watch::Receiver<Resolution> {
        let (rx, new) = self.watches.subscribe(service, || Resolution::Pending);
        if new {
            self.start(service.clone());
        }
        rx
    }

    fn debug_state(&self) -> serde_json::Value {
        serde_json::json!({
            "source": "grpc",
            "caller": self.caller,
            "everConnected": self.connected.load(Ordering::Relaxed),
            "services": self.watches.to_json(),
        })
    }
}
