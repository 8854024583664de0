//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's semantics:
//!
//! - A replica takes the Lease when it has no holder, or when its record (holder, renew time)
//!   has not changed for `leaseDurationSeconds` as measured on this replica's own clock (so
//!   clock skew between machines does not matter).
//! - The holder renews every `retry_period`; writes use the Lease's resourceVersion, so two
//!   replicas can never both win a race.
//! - The holder **steps down** (reports `false`) when it could not renew for `renew_deadline`,
//!   which is shorter than the lease duration: it stops leading before anyone else may start.
//! - On shutdown the holder releases the Lease so another replica takes over at once.
//!
//! The saga engine (and the status writer) read leadership from the `watch::Receiver<bool>`
//! that [`spawn`] returns.
//!
//! Why not a crate: `kube-leader-election` is on kube 4; `kube-lease-manager` 0.13 supports
//! kube 5 but keeps reporting leadership while renewals fail (no renew deadline), which a saga
//! engine cannot accept.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;

/// Leader-election settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// This replica's identity (its pod name in a cluster).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

#[derive(Clone, PartialEq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    transitions: Option<i32>,
}

struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    /// The last record seen and when (local clock) it was first seen.
    observed: Option<(Record, Instant)>,
}

fn lease_seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

impl Elector {
    /// One attempt: `Ok(true)` when this replica holds the Lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let me = self.cfg.identity.clone();
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(lease_seconds(self.cfg.lease_duration)),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = Record {
            holder: holder.clone(),
            renew_time: spec.renew_time.clone(),
            transitions: spec.lease_transitions,
        };
        let observed_at = match &self.observed {
            Some((r, at)) if *r == record => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((record, at));
                at
            }
        };
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.cfg.lease_duration);
        let mine = holder.as_deref() == Some(me.as_str());
        let expired = holder.is_none() || observed_at.elapsed() > duration;
        if !mine && !expired {
            return Ok(false);
        }
        let mut new_spec = spec.clone();
        new_spec.holder_identity = Some(me);
        new_spec.lease_duration_seconds = Some(lease_seconds(self.cfg.lease_duration));
        new_spec.renew_time = Some(now.clone());
        if !mine {
            new_spec.acquire_time = Some(now);
            new_spec.lease_transitions =
                Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        lease.spec = Some(new_spec);
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Someone else wrote first.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if this replica holds it.
    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
}

/// Starts electing. The receiver is `true` while this replica leads; the task ends (releasing
/// the Lease if held) when `shutdown` turns `true`.
pub fn spawn(
    client: Client,
    cfg: LeaseConfig,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<bool>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut elector = Elector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg: cfg.clone(),
            observed: None,
        };
        let mut last_renew: Option<Instant> = None;
        let set = |leading: bool| {
            tx.send_if_modified(|v| {
                if *v == leading {
                    return false;
                }
                *v = leading;
                metrics.leader.set(i64::from(leading));
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, leading, "leadership changed");
                true
            });
        };
        loop {
            // A hung API call must not keep a stale leader: bound each attempt.
            let attempt =
                tokio::time::timeout(cfg.renew_deadline, elector.try_acquire_or_renew()).await;
            match attempt.unwrap_or_else(|_| {
                Err(kube::Error::Service(
                    "leader election: Lease request timed out".into(),
                ))
            }) {
                Ok(true) => {
                    last_renew = Some(Instant::now());
                    set(true);
                }
                Ok(false) => {
                    last_renew = None;
                    set(false);
                }
                Err(e) => {
                    tracing::warn!(lease = %cfg.name, error = %e, "leader election: cannot read or write the Lease");
                    if last_renew.is_none_or(|t| t.elapsed() > cfg.renew_deadline) {
                        set(false);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.retry_period) => {}
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            }
        }
        let was_leader = *tx.borrow();
        set(false);
        if was_leader {
            match tokio::time::timeout(Duration::from_secs(3), elector.release()).await {
                Ok(Ok(())) => tracing::info!(lease = %cfg.name, "Lease released"),
                Ok(Err(e)) => tracing::warn!(lease = %cfg.name, error = %e, "releasing the Lease"),
                Err(_) => tracing::warn!(lease = %cfg.name, "releasing the Lease timed out"),
            }
        }
    });
    (rx, task)
}

/// `true` while both `a` and `b` are `true` (e.g. "leader" and "index ready"); `false` for good
/// once either sender is gone.
pub fn all_true(
    mut a: watch::Receiver<bool>,
    mut b: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*a.borrow_and_update() && *b.borrow_and_update());
    tokio::spawn(async move {
        loop {
            let changed = tokio::select! {
                r = a.changed() => r,
                r = b.changed() => r,
                _ = tx.closed() => return,
            };
            let both = changed.is_ok() && *a.borrow_and_update() && *b.borrow_and_update();
            tx.send_if_modified(|v| std::mem::replace(v, both) != both);
            if changed.is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn all_true_follows_both_inputs() {
        let (a_tx, a) = watch::channel(true);
        let (b_tx, b) = watch::channel(false);
        let mut both = all_true(a, b);
        assert!(!*both.borrow_and_update());
        b_tx.send_replace(true);
        both.changed().await.expect("changed");
        assert!(*both.borrow_and_update());
        a_tx.send_replace(false);
        both.changed().await.expect("changed");
        assert!(!*both.borrow_and_update());
        a_tx.send_replace(true);
        both.changed().await.expect("changed");
        assert!(*both.borrow_and_update());
        drop(b_tx);
        both.changed().await.expect("changed");
        assert!(!*both.borrow_and_update());
    }
}
