//! Discovery from the control plane's gRPC `Watch` streams: one stream per destination service,
//! opened on first use. When a stream fails or ends, the last known state stays in force and the
//! stream is reopened with exponential backoff (with jitter), so a control-plane outage never
//! fails a request to a healthy endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::Rng;
use sagamesh_api::discovery as pb;
use sagamesh_api::discovery::discovery_client::DiscoveryClient;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use super::{Discover, Resolution, Watches};
use crate::name::ServiceKey;

/// Reconnect backoff of the discovery streams.
#[derive(Clone, Debug)]
pub struct ReconnectBackoff {
    pub base: Duration,
    pub max: Duration,
    /// Full jitter when true; exactly `min(max, base * 2^n)` when false (tests).
    pub jitter: bool,
}

impl Default for ReconnectBackoff {
    fn default() -> Self {
        ReconnectBackoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
            jitter: true,
        }
    }
}

impl ReconnectBackoff {
    pub fn delay(&self, failures: u32) -> Duration {
        let cap = self
            .base
            .saturating_mul(2u32.saturating_pow(failures.min(20)))
            .min(self.max);
        if self.jitter {
            // Half fixed, half random: never hammers, never waits for nothing.
            let half = cap / 2;
            half + Duration::from_nanos(
                rand::rng().random_range(0..=half.as_nanos().min(u128::from(u64::MAX)) as u64),
            )
        } else {
            cap
        }
    }
}

/// gRPC discovery client. Dropping it stops every stream.
pub struct GrpcDiscovery {
    channel: Channel,
    caller: String,
    backoff: ReconnectBackoff,
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
    pub fn new(
        address: &str,
        caller: &str,
        backoff: ReconnectBackoff,
    ) -> Result<Arc<Self>, AddressError> {
        let endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| AddressError(address.into(), e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        Ok(Arc::new(GrpcDiscovery {
            channel: endpoint.connect_lazy(),
            caller: caller.to_string(),
            backoff,
            watches: Arc::new(Watches::default()),
            tasks: std::sync::Mutex::new(Vec::new()),
            connected: Arc::new(AtomicBool::new(false)),
        }))
    }

    fn start(&self, key: ServiceKey) {
        let client = DiscoveryClient::new(self.channel.clone());
        let watches = self.watches.clone();
        let backoff = self.backoff.clone();
        let connected = self.connected.clone();
        let request = pb::WatchRequest {
            namespace: key.namespace.clone(),
            service: key.name.clone(),
            caller: self.caller.clone(),
        };
        let task = tokio::spawn(async move {
            let mut failures: u32 = 0;
            loop {
                match client.clone().watch(request.clone()).await {
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
                let delay = backoff.delay(failures);
                failures = failures.saturating_add(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps_without_jitter() {
        let b = ReconnectBackoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: false,
        };
        assert_eq!(b.delay(0), Duration::from_millis(100));
        assert_eq!(b.delay(1), Duration::from_millis(200));
        assert_eq!(b.delay(3), Duration::from_millis(800));
        assert_eq!(b.delay(4), Duration::from_secs(1));
        assert_eq!(b.delay(100), Duration::from_secs(1));
        let j = ReconnectBackoff { jitter: true, ..b };
        for n in 0..10 {
            let d = j.delay(n);
            assert!(d >= b.delay(n) / 2 && d <= b.delay(n));
        }
    }
}
