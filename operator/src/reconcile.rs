//! The ServiceRegistration reconciler: turns the index's [`Summary`] of a registration into its
//! `status` (observedGeneration, endpoint counts, the `Ready` and `EndpointsResolved`
//! conditions), written only when it differs from what is there, with an Event on every
//! transition of `Ready`. Only the leader writes; every replica computes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use parking_lot::Mutex;
use sagamesh_api::backoff::{Backoff, FailureBackoff, Jitter};
use sagamesh_api::{ServiceRegistration, ServiceRegistrationStatus};
use tokio::sync::watch;

use crate::index::{Outcome, SharedIndex, Source, Summary};
use crate::metrics::{ErrorLabels, Metrics};

/// The field manager of the operator's writes.
pub const FIELD_MANAGER: &str = "sagamesh-operator";

/// Condition types.
pub const READY: &str = "Ready";
pub const ENDPOINTS_RESOLVED: &str = "EndpointsResolved";

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ServiceRegistration {0} has no namespace")]
    NoNamespace(String),
    #[error("writing the status of {name}: {source}")]
    WriteStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// The fixed metric label of this error.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::NoNamespace(_) => "no_namespace",
            Error::WriteStatus { .. } => "write_status",
        }
    }
}

/// What a reconcile needs.
pub struct Context {
    pub client: Client,
    pub index: SharedIndex,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Only the leader writes status and publishes Events.
    pub leader: watch::Receiver<bool>,
    /// Consecutive failures per object, for the exponential requeue.
    failures: FailureBackoff<(String, String)>,
    /// The last status this replica wrote per object, with the resourceVersion it produced:
    /// the reflector's copy may not have caught up with our own write yet.
    written: Mutex<HashMap<(String, String), (u64, ServiceRegistrationStatus)>>,
}

impl Context {
    pub fn new(
        client: Client,
        index: SharedIndex,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        leader: watch::Receiver<bool>,
    ) -> Self {
        Context {
            client,
            index,
            recorder,
            metrics,
            leader,
            failures: FailureBackoff::new(REQUEUE_BACKOFF),
            written: Mutex::new(HashMap::new()),
        }
    }
}

/// The reasons and messages of both conditions for a summary.
fn conditions_for(summary: &Summary) -> [(&'static str, bool, &'static str, String); 2] {
    let (ready, total) = (summary.ready, summary.total);
    let source = match summary.source {
        Source::Pods => "pods matching spec.selector",
        Source::EndpointSlices => "the EndpointSlices of the same-named Service",
        Source::Explicit => "spec.endpoints",
    };
    let resolved = match &summary.outcome {
        Outcome::EndpointsFound | Outcome::NoReadyEndpoints => (
            true,
            if summary.source == Source::Explicit {
                "ExplicitEndpoints"
            } else {
                "EndpointsFound"
            },
            format!("{total} endpoints from {source}"),
        ),
        Outcome::NoMatchingPods => (
            false,
            "NoMatchingPods",
            "no pod with an IP matches spec.selector".to_string(),
        ),
        Outcome::NoEndpoints => (false, "NoEndpoints", format!("no endpoints in {source}")),
        Outcome::InvalidPort(m) => (false, "InvalidPort", m.clone()),
        Outcome::InvalidSpec(m) => (false, "InvalidSpec", m.clone()),
    };
    let ready_cond = match &summary.outcome {
        Outcome::EndpointsFound => (
            true,
            "EndpointsReady",
            format!("{ready} of {total} endpoints ready"),
        ),
        Outcome::NoReadyEndpoints => (
            false,
            "NoReadyEndpoints",
            format!("none of {total} endpoints is ready"),
        ),
        _ => (false, resolved.1, resolved.2.clone()),
    };
    [
        (READY, ready_cond.0, ready_cond.1, ready_cond.2),
        (ENDPOINTS_RESOLVED, resolved.0, resolved.1, resolved.2),
    ]
}

/// The status a summary calls for. A condition whose status did not change keeps its
/// `lastTransitionTime`, so an unchanged situation gives an identical status (and no write).
pub fn desired_status(
    summary: &Summary,
    generation: Option<i64>,
    current: Option<&ServiceRegistrationStatus>,
    now: &Time,
) -> ServiceRegistrationStatus {
    let conditions = conditions_for(summary)
        .into_iter()
        .map(|(type_, ok, reason, message)| {
            let status = if ok { "True" } else { "False" };
            let previous = current
                .and_then(|c| c.conditions.iter().find(|c| c.type_ == type_))
                .filter(|c| c.status == status);
            Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message,
                observed_generation: generation,
                last_transition_time: previous
                    .map(|c| c.last_transition_time.clone())
                    .unwrap_or_else(|| now.clone()),
            }
        })
        .collect();
    ServiceRegistrationStatus {
        observed_generation: generation,
        ready_endpoints: summary.ready,
        total_endpoints: summary.total,
        conditions,
    }
}

fn ready_condition(status: Option<&ServiceRegistrationStatus>) -> Option<(&str, &str)> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

fn resource_version(obj: &ServiceRegistration) -> Option<u64> {
    obj.metadata.resource_version.as_deref()?.parse().ok()
}

/// Reconciles one ServiceRegistration.
pub async fn reconcile(obj: Arc<ServiceRegistration>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer();
    if !*ctx.leader.borrow() {
        return Ok(Action::await_change());
    }
    let name = obj.name_any();
    let namespace = obj
        .namespace()
        .ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let key = (namespace.clone(), name.clone());
    let Some(summary) = ctx.index.summary(&namespace, &name) else {
        // The index has not seen it yet; it queues a reconcile when it does.
        return Ok(Action::await_change());
    };
    if summary.generation != obj.metadata.generation {
        return Ok(Action::await_change());
    }

    // What the status is now: the reflector's copy, unless our own later write has not
    // reached it yet.
    let store_rv = resource_version(&obj);
    let cached = ctx.written.lock().get(&key).cloned();
    let current = match (&cached, store_rv) {
        (Some((rv, status)), Some(store_rv)) if *rv > store_rv => Some(status.clone()),
        _ => obj.status.clone(),
    };
    let now = Time(Timestamp::now());
    let desired = desired_status(&summary, obj.metadata.generation, current.as_ref(), &now);
    if current.as_ref() != Some(&desired) {
        let api: Api<ServiceRegistration> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = serde_json::json!({ "status": desired });
        let written = api
            .patch_status(
                &name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.to_string()),
                    ..Default::default()
                },
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|source| Error::WriteStatus {
                name: format!("{namespace}/{name}"),
                source,
            })?;
        ctx.metrics.status_writes.inc();
        if let Some(rv) = resource_version(&written) {
            ctx.written
                .lock()
                .insert(key.clone(), (rv, desired.clone()));
        }
        tracing::info!(%namespace, %name, ready = summary.ready, total = summary.total, outcome = ?summary.outcome, "status written");

        let before = ready_condition(current.as_ref());
        let after = ready_condition(Some(&desired));
        if before != after
            && let Some(cond) = desired.conditions.iter().find(|c| c.type_ == READY)
        {
            let event = Event {
                type_: if cond.status == "True" {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason: cond.reason.clone(),
                note: Some(format!("Ready={}: {}", cond.status, cond.message)),
                action: "Reconcile".into(),
                secondary: None,
            };
            match ctx.recorder.publish(&event, &obj.object_ref(&())).await {
                Ok(()) => {
                    ctx.metrics.events_published.inc();
                }
                // An Event is informative; failing to publish one must not block the status.
                Err(e) => tracing::warn!(%namespace, %name, error = %e, "publishing an Event"),
            }
        }
    }
    ctx.failures.reset(&key);
    Ok(Action::await_change())
}

/// Requeue delay of an object after failures in a row: 500 ms doubling, at most 5 minutes,
/// equal jitter (objects failing together, e.g. in an API server outage, spread their retries).
pub const REQUEUE_BACKOFF: Backoff = Backoff::new(
    Duration::from_millis(500),
    Duration::from_secs(300),
    Jitter::Equal,
);

/// Logs and counts a failed reconcile; requeues it with exponential backoff.
pub fn error_policy(obj: Arc<ServiceRegistration>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels {
            error: error.metric_label(),
        })
        .inc();
    let key = (obj.namespace().unwrap_or_default(), obj.name_any());
    let (failures, delay) = ctx.failures.failed(key);
    tracing::warn!(error = %error, failures, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Forgets per-object state of a deleted registration.
pub fn forget(ctx: &Context, namespace: &str, name: &str) {
    let key = (namespace.to_string(), name.to_string());
    ctx.failures.reset(&key);
    ctx.written.lock().remove(&key);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(ready: u32, total: u32, outcome: Outcome) -> Summary {
        Summary {
            generation: Some(2),
            source: Source::Pods,
            ready,
            total,
            outcome,
        }
    }

    fn time(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("time"))
    }

    #[test]
    fn ready_status_and_reasons() {
        let s = desired_status(
            &summary(3, 3, Outcome::EndpointsFound),
            Some(2),
            None,
            &time(10),
        );
        assert_eq!(
            (s.ready_endpoints, s.total_endpoints, s.observed_generation),
            (3, 3, Some(2))
        );
        let ready = &s.conditions[0];
        assert_eq!(
            (
                ready.type_.as_str(),
                ready.status.as_str(),
                ready.reason.as_str()
            ),
            ("Ready", "True", "EndpointsReady")
        );
        let resolved = &s.conditions[1];
        assert_eq!(
            (resolved.status.as_str(), resolved.reason.as_str()),
            ("True", "EndpointsFound")
        );

        let s = desired_status(
            &summary(0, 0, Outcome::NoMatchingPods),
            Some(2),
            None,
            &time(10),
        );
        assert_eq!(
            (
                s.conditions[0].status.as_str(),
                s.conditions[0].reason.as_str()
            ),
            ("False", "NoMatchingPods")
        );
        assert_eq!(s.conditions[1].reason, "NoMatchingPods");

        let s = desired_status(
            &summary(0, 2, Outcome::NoReadyEndpoints),
            Some(2),
            None,
            &time(10),
        );
        assert_eq!(s.conditions[0].reason, "NoReadyEndpoints");
        assert_eq!(s.conditions[1].status, "True");
    }

    #[test]
    fn unchanged_situation_gives_an_identical_status() {
        let first = desired_status(
            &summary(3, 3, Outcome::EndpointsFound),
            Some(2),
            None,
            &time(10),
        );
        let again = desired_status(
            &summary(3, 3, Outcome::EndpointsFound),
            Some(2),
            Some(&first),
            &time(99),
        );
        assert_eq!(first, again);
        // Counts change, Ready stays True: same transition time, new message.
        let fewer = desired_status(
            &summary(2, 3, Outcome::EndpointsFound),
            Some(2),
            Some(&first),
            &time(99),
        );
        assert_eq!(fewer.conditions[0].last_transition_time, time(10));
        assert_ne!(fewer, first);
        // Ready flips: new transition time.
        let none = desired_status(
            &summary(0, 0, Outcome::NoMatchingPods),
            Some(2),
            Some(&first),
            &time(99),
        );
        assert_eq!(none.conditions[0].last_transition_time, time(99));
    }
}
