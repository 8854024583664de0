//! `sagamesh-operator` as a real process on the test bed (real kube-apiserver + etcd, RBAC on),
//! running as a ServiceAccount bound to exactly `deploy/rbac/operator-rbac.yaml`: status of
//! ServiceRegistrations, the discovery gRPC API, quiet status, Events, leader election.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::{Operator, Watcher, create_pod, operator_setup, ready_addresses, set_pod_status};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use sagamesh_api::{ServiceRegistration, ServiceRegistrationStatus};
use sagamesh_discovery::proto as pb;
use sagamesh_testing::{TestBed, eventually, test_bed};
use serde_json::json;

async fn bed(test: &str) -> Option<TestBed> {
    let bed = test_bed(test).await?;
    bed.install_crds().await.expect("CRDs install");
    Some(bed)
}

async fn create_sreg(client: &Client, ns: &str, name: &str, app: &str) -> anyhow::Result<()> {
    let obj: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "sagamesh.io/v1alpha1",
        "kind": "ServiceRegistration",
        "metadata": { "name": name },
        "spec": {
            "selector": { "app": app },
            "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }],
            "loadBalancer": { "policy": "RoundRobin" },
        },
    }))?;
    Api::<ServiceRegistration>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &obj)
        .await
        .with_context(|| format!("creating ServiceRegistration {name}"))?;
    Ok(())
}

fn condition<'a>(status: &'a ServiceRegistrationStatus, type_: &str) -> Option<(&'a str, &'a str)> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

/// Waits until the registration's status (for its current generation) satisfies `pred`.
async fn wait_status(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    pred: impl Fn(&ServiceRegistrationStatus) -> bool,
) -> anyhow::Result<ServiceRegistration> {
    let api: Api<ServiceRegistration> = Api::namespaced(client.clone(), ns);
    let pred = &pred;
    let api = &api;
    eventually(what, Duration::from_secs(30), || async move {
        let obj = api.get(name).await.ok()?;
        let status = obj.status.as_ref()?;
        (status.observed_generation == obj.metadata.generation && pred(status)).then_some(obj)
    })
    .await
}

#[tokio::test]
async fn three_ready_pods_make_a_ready_registration_and_a_not_ready_pod_leaves_watchers_within_1s()
{
    let test = "three_ready_pods_make_a_ready_registration";
    let Some(bed) = bed(test).await else { return };
    let bed2 = bed.clone();
    bed.with_namespace("op-ready", move |client, ns| async move {
        let kubeconfig = operator_setup(&bed2, &client, &ns).await?;
        let operator = Operator::start_steady(&kubeconfig, &ns, "op-a")?;
        operator.wait_ready().await?;

        create_sreg(&client, &ns, "orders", "orders").await?;
        for i in 1..=3 {
            create_pod(&client, &ns, &format!("orders-{i}"), &[("app", "orders")]).await?;
        }
        // A pod of another app is never an endpoint of orders.
        create_pod(&client, &ns, "payments-1", &[("app", "payments")]).await?;
        set_pod_status(&client, &ns, "payments-1", "127.0.0.9", true).await?;
        for i in 1..=3 {
            set_pod_status(
                &client,
                &ns,
                &format!("orders-{i}"),
                &format!("127.0.0.{i}"),
                true,
            )
            .await?;
        }

        let obj = wait_status(&client, &ns, "orders", "Ready 3/3", |s| {
            s.ready_endpoints == 3
                && s.total_endpoints == 3
                && condition(s, "Ready") == Some(("True", "EndpointsReady"))
                && condition(s, "EndpointsResolved") == Some(("True", "EndpointsFound"))
        })
        .await?;
        ensure!(
            obj.status.as_ref().map(|s| s.observed_generation) == Some(obj.metadata.generation)
        );

        let mut watcher = Watcher::open(operator.discovery, &ns, "orders").await?;
        let all = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
            .map(String::from)
            .to_vec();
        let update = watcher
            .wait_for("3 ready endpoints", Duration::from_secs(10), |u| {
                ready_addresses(u).as_ref() == Some(&all)
            })
            .await?;
        let Some(pb::update::Kind::Snapshot(snapshot)) = &update.kind else {
            anyhow::bail!("expected a snapshot");
        };
        ensure!(
            snapshot
                .endpoints
                .iter()
                .all(|e| e.port == 8080 && e.port_name == "http")
        );
        ensure!(
            snapshot
                .policy
                .as_ref()
                .and_then(|p| p.load_balancer.as_ref())
                .map(|lb| lb.policy)
                == Some(pb::LoadBalancerPolicy::RoundRobin as i32)
        );
        let revision = update.revision;

        // Pod 2 turns NotReady: gone from the watcher's ready set within a second.
        set_pod_status(&client, &ns, "orders-2", "127.0.0.2", false).await?;
        let patched = Instant::now();
        let update = watcher
            .wait_for(
                "127.0.0.2 to leave the ready set",
                Duration::from_secs(1),
                |u| {
                    ready_addresses(u).as_deref()
                        == Some(&["127.0.0.1".to_string(), "127.0.0.3".to_string()][..])
                },
            )
            .await?;
        eprintln!(
            "NotReady pod left the watcher's view {:?} after the patch",
            patched.elapsed()
        );
        ensure!(update.revision > revision, "revision must grow");
        wait_status(&client, &ns, "orders", "Ready 2/3", |s| {
            s.ready_endpoints == 2 && s.total_endpoints == 3
        })
        .await?;

        // And back.
        set_pod_status(&client, &ns, "orders-2", "127.0.0.2", true).await?;
        watcher
            .wait_for("127.0.0.2 back", Duration::from_secs(5), |u| {
                ready_addresses(u).as_ref() == Some(&all)
            })
            .await?;

        ensure!(
            operator
                .metric("sagamesh_operator_discovery_watchers")
                .await?
                == 1.0
        );
        ensure!(operator.metric("sagamesh_operator_leader").await? == 1.0);
        operator.ensure_never_forbidden()?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn deleting_a_registration_empties_its_watchers_and_no_matching_pods_is_reported() {
    let test = "deleting_a_registration_empties_its_watchers";
    let Some(bed) = bed(test).await else { return };
    let bed2 = bed.clone();
    bed.with_namespace("op-delete", move |client, ns| async move {
        let kubeconfig = operator_setup(&bed2, &client, &ns).await?;
        let operator = Operator::start_steady(&kubeconfig, &ns, "op-a")?;
        operator.wait_ready().await?;

        // A registration whose selector matches nothing.
        create_sreg(&client, &ns, "ghost", "nobody").await?;
        wait_status(&client, &ns, "ghost", "Ready=False NoMatchingPods", |s| {
            condition(s, "Ready") == Some(("False", "NoMatchingPods"))
                && condition(s, "EndpointsResolved") == Some(("False", "NoMatchingPods"))
                && s.ready_endpoints == 0
                && s.total_endpoints == 0
        })
        .await?;
        // With a Warning Event naming the reason (written as the operator's ServiceAccount).
        let events: Api<Event> = Api::namespaced(client.clone(), &ns);
        eventually(
            "a NoMatchingPods Event",
            Duration::from_secs(10),
            || async {
                let list = events.list(&ListParams::default()).await.ok()?;
                list.items
                    .iter()
                    .any(|e| {
                        e.reason.as_deref() == Some("NoMatchingPods")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("ghost")
                            && e.type_.as_deref() == Some("Warning")
                    })
                    .then_some(())
            },
        )
        .await?;

        // A registration with one ready pod, watched, then deleted.
        create_sreg(&client, &ns, "orders", "orders").await?;
        create_pod(&client, &ns, "orders-1", &[("app", "orders")]).await?;
        set_pod_status(&client, &ns, "orders-1", "127.0.0.1", true).await?;
        let mut watcher = Watcher::open(operator.discovery, &ns, "orders").await?;
        watcher
            .wait_for("one ready endpoint", Duration::from_secs(10), |u| {
                ready_addresses(u) == Some(vec!["127.0.0.1".to_string()])
            })
            .await?;
        // A watcher of a name nobody registered hears DoesNotExist at once.
        let mut nobody = Watcher::open(operator.discovery, &ns, "nobody").await?;
        nobody
            .wait_for("DoesNotExist", Duration::from_secs(5), |u| {
                matches!(u.kind, Some(pb::update::Kind::DoesNotExist(_)))
            })
            .await?;

        Api::<ServiceRegistration>::namespaced(client.clone(), &ns)
            .delete("orders", &DeleteParams::default())
            .await?;
        watcher
            .wait_for(
                "DoesNotExist after the delete",
                Duration::from_secs(10),
                |u| matches!(u.kind, Some(pb::update::Kind::DoesNotExist(_))),
            )
            .await?;
        // Registered again: the same stream sees it come back.
        create_sreg(&client, &ns, "orders", "orders").await?;
        watcher
            .wait_for("the registration back", Duration::from_secs(10), |u| {
                ready_addresses(u) == Some(vec!["127.0.0.1".to_string()])
            })
            .await?;
        operator.ensure_never_forbidden()?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn status_is_not_rewritten_when_nothing_changes() {
    let test = "status_is_not_rewritten_when_nothing_changes";
    let Some(bed) = bed(test).await else { return };
    let bed2 = bed.clone();
    bed.with_namespace("op-quiet", move |client, ns| async move {
        let kubeconfig = operator_setup(&bed2, &client, &ns).await?;
        let operator = Operator::start_steady(&kubeconfig, &ns, "op-a")?;
        operator.wait_ready().await?;
        create_sreg(&client, &ns, "orders", "orders").await?;
        for i in 1..=3 {
            create_pod(&client, &ns, &format!("orders-{i}"), &[("app", "orders")]).await?;
            set_pod_status(
                &client,
                &ns,
                &format!("orders-{i}"),
                &format!("127.0.0.{i}"),
                true,
            )
            .await?;
        }
        let settled = wait_status(&client, &ns, "orders", "Ready 3/3", |s| {
            s.ready_endpoints == 3 && condition(s, "Ready") == Some(("True", "EndpointsReady"))
        })
        .await?;
        // Let any in-flight reconcile finish before counting.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let api: Api<ServiceRegistration> = Api::namespaced(client.clone(), &ns);
        let before = api.get("orders").await?;
        let writes_before = operator
            .metric("sagamesh_operator_status_writes_total")
            .await?;
        let reconciles_before = operator
            .metric("sagamesh_operator_reconciles_total")
            .await?;

        // Things happen that change nothing about the registration: pods get annotations, an
        // unrelated pod comes and goes.
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
        for i in 1..=3 {
            pods.patch(
                &format!("orders-{i}"),
                &PatchParams::default(),
                &Patch::Merge(&json!({ "metadata": { "annotations": { "touched": "yes" } } })),
            )
            .await?;
        }
        create_pod(&client, &ns, "other", &[("app", "other")]).await?;
        set_pod_status(&client, &ns, "other", "127.0.0.7", true).await?;

        // Count writes of the registration over a 3s quiet period.
        let mut versions = vec![before.resource_version()];
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let now = api.get("orders").await?;
            if versions.last() != Some(&now.resource_version()) {
                versions.push(now.resource_version());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            versions.len() == 1,
            "the registration was rewritten during the quiet period: resourceVersions {versions:?}"
        );
        let after = api.get("orders").await?;
        ensure!(
            after.status == settled.status,
            "status changed: {:?}",
            after.status
        );
        let writes_after = operator
            .metric("sagamesh_operator_status_writes_total")
            .await?;
        ensure!(
            writes_after == writes_before,
            "status writes went from {writes_before} to {writes_after}"
        );
        // Unrelated changes do not even reach the reconciler.
        let reconciles_after = operator
            .metric("sagamesh_operator_reconciles_total")
            .await?;
        ensure!(
            reconciles_after == reconciles_before,
            "reconciles went from {reconciles_before} to {reconciles_after}"
        );
        operator.ensure_never_forbidden()?;
        Ok(())
    })
    .await;
}

async fn lease_holder(client: &Client, ns: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt("sagamesh-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

#[tokio::test]
async fn two_operators_one_holds_the_lease_and_killing_it_hands_the_lease_over() {
    let test = "two_operators_one_holds_the_lease";
    let Some(bed) = bed(test).await else { return };
    let bed2 = bed.clone();
    bed.with_namespace("op-lease", move |client, ns| async move {
        let kubeconfig = operator_setup(&bed2, &client, &ns).await?;
        let a = Operator::start(&kubeconfig, &ns, "op-a")?;
        let b = Operator::start(&kubeconfig, &ns, "op-b")?;
        a.wait_ready().await?;
        b.wait_ready().await?;
        let holder = eventually("a Lease holder", Duration::from_secs(20), || async {
            lease_holder(&client, &ns).await
        })
        .await?;
        let (mut leader, follower) = if holder == "op-a" { (a, b) } else { (b, a) };
        ensure!(
            holder == leader.identity,
            "holder {holder} is neither replica"
        );

        // Exactly one says it leads, and it stays so across several renewals.
        for _ in 0..6 {
            let l = leader.metric("sagamesh_operator_leader").await?;
            let f = follower.metric("sagamesh_operator_leader").await?;
            ensure!(
                (l, f) == (1.0, 0.0),
                "leader gauges: {}={l}, {}={f}",
                leader.identity,
                follower.identity
            );
            ensure!(lease_holder(&client, &ns).await.as_deref() == Some(leader.identity.as_str()));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Both serve discovery.
        create_sreg(&client, &ns, "orders", "orders").await?;
        create_pod(&client, &ns, "orders-1", &[("app", "orders")]).await?;
        set_pod_status(&client, &ns, "orders-1", "127.0.0.1", true).await?;
        for op in [&leader, &follower] {
            let mut w = Watcher::open(op.discovery, &ns, "orders").await?;
            w.wait_for("one ready endpoint", Duration::from_secs(10), |u| {
                ready_addresses(u) == Some(vec!["127.0.0.1".to_string()])
            })
            .await?;
        }
        wait_status(&client, &ns, "orders", "Ready 1/1", |s| {
            s.ready_endpoints == 1
        })
        .await?;
        ensure!(
            follower
                .metric("sagamesh_operator_status_writes_total")
                .await?
                == 0.0,
            "only the leader writes status"
        );

        leader.ensure_never_forbidden()?;
        // SIGKILL the leader: the follower takes over once the Lease expires.
        let killed = leader.identity.clone();
        leader.kill();
        let new_holder = eventually("the Lease handed over", Duration::from_secs(30), || async {
            lease_holder(&client, &ns).await.filter(|h| *h != killed)
        })
        .await?;
        ensure!(new_holder == follower.identity, "new holder {new_holder}");
        eventually(
            "the follower to report leadership",
            Duration::from_secs(10),
            || async {
                (follower.metric("sagamesh_operator_leader").await.ok()? == 1.0).then_some(())
            },
        )
        .await?;
        // The new leader reconciles: a new pod shows up in the status.
        create_pod(&client, &ns, "orders-2", &[("app", "orders")]).await?;
        set_pod_status(&client, &ns, "orders-2", "127.0.0.2", true).await?;
        wait_status(&client, &ns, "orders", "Ready 2/2 by the new leader", |s| {
            s.ready_endpoints == 2
        })
        .await?;
        follower.ensure_never_forbidden()?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn endpoint_slices_of_a_same_named_service_win_over_pods() {
    let test = "endpoint_slices_of_a_same_named_service_win_over_pods";
    let Some(bed) = bed(test).await else { return };
    let bed2 = bed.clone();
    bed.with_namespace("op-slices", move |client, ns| async move {
        use k8s_openapi::api::core::v1::Service;
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        let kubeconfig = operator_setup(&bed2, &client, &ns).await?;
        let operator = Operator::start_steady(&kubeconfig, &ns, "op-a")?;
        operator.wait_ready().await?;
        create_sreg(&client, &ns, "orders", "orders").await?;
        create_pod(&client, &ns, "orders-1", &[("app", "orders")]).await?;
        set_pod_status(&client, &ns, "orders-1", "127.0.0.1", true).await?;
        let mut watcher = Watcher::open(operator.discovery, &ns, "orders").await?;
        watcher
            .wait_for("the pod", Duration::from_secs(10), |u| {
                ready_addresses(u) == Some(vec!["127.0.0.1".to_string()])
            })
            .await?;

        // A same-named Service (without selector, so the test writes its EndpointSlice; the bed
        // has no nodes, so the EndpointSlice controller would list no pod endpoints). The API
        // server refuses loopback addresses in EndpointSlices, so these are documentation
        // addresses (TEST-NET-1): only data here, no traffic is ever sent to them.
        let service: Service = serde_json::from_value(json!({
            "metadata": { "name": "orders" },
            "spec": { "ports": [{ "name": "http", "port": 80, "targetPort": 9090 }] },
        }))?;
        Api::<Service>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &service)
            .await?;
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": { "name": "orders-1", "labels": { "kubernetes.io/service-name": "orders" } },
            "addressType": "IPv4",
            "ports": [{ "name": "http", "port": 9090, "protocol": "TCP" }],
            "endpoints": [
                { "addresses": ["192.0.2.5"], "conditions": { "ready": true }, "zone": "zone-a" },
                { "addresses": ["192.0.2.6"], "conditions": { "ready": true } },
                { "addresses": ["192.0.2.8"], "conditions": { "ready": false } },
            ],
        }))?;
        Api::<EndpointSlice>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &slice)
            .await?;
        let update = watcher
            .wait_for("the EndpointSlice's endpoints", Duration::from_secs(10), |u| {
                ready_addresses(u)
                    == Some(vec!["192.0.2.5".to_string(), "192.0.2.6".to_string()])
            })
            .await?;
        let Some(pb::update::Kind::Snapshot(snapshot)) = &update.kind else {
            anyhow::bail!("expected a snapshot");
        };
        ensure!(snapshot.endpoints.len() == 3, "{:?}", snapshot.endpoints);
        ensure!(snapshot.endpoints.iter().all(|e| e.port == 9090));
        wait_status(&client, &ns, "orders", "2/3 from EndpointSlices", |s| {
            s.ready_endpoints == 2
                && s.total_endpoints == 3
                && condition(s, "Ready") == Some(("True", "EndpointsReady"))
        })
        .await?;

        // The Service goes: back to the pods.
        Api::<Service>::namespaced(client.clone(), &ns)
            .delete("orders", &DeleteParams::default())
            .await?;
        watcher
            .wait_for("the pod again", Duration::from_secs(10), |u| {
                ready_addresses(u) == Some(vec!["127.0.0.1".to_string()])
            })
            .await?;
        operator.ensure_never_forbidden()?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn sigterm_ends_watch_streams_releases_the_lease_and_exits_zero() {
    let test = "sigterm_ends_watch_streams_releases_the_lease";
    let Some(bed) = bed(test).await else { return };
    let bed2 = bed.clone();
    bed.with_namespace("op-sigterm", move |client, ns| async move {
        let kubeconfig = operator_setup(&bed2, &client, &ns).await?;
        let mut operator = Operator::start_steady(&kubeconfig, &ns, "op-a")?;
        operator.wait_ready().await?;
        eventually("the Lease", Duration::from_secs(20), || async {
            lease_holder(&client, &ns).await.filter(|h| h == "op-a")
        })
        .await?;
        create_sreg(&client, &ns, "orders", "orders").await?;
        let mut watcher = Watcher::open(operator.discovery, &ns, "orders").await?;

        // SIGTERM, by PID, to the process this test started.
        let pid = operator.child.id().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()?;
        ensure!(status.success(), "kill -TERM {pid}");
        let exited = match eventually("the operator to exit", Duration::from_secs(10), || {
            let polled = operator.child.try_wait();
            async move { polled.ok().flatten() }
        })
        .await
        {
            Ok(exited) => exited,
            Err(e) => anyhow::bail!("{e}; the operator's log:\n{}", operator.log()),
        };
        ensure!(exited.success(), "exit status {exited}: {}", operator.log());
        // The open Watch stream ended (the sidecar reconnects elsewhere) ...
        let ended = tokio::time::timeout(Duration::from_secs(5), watcher.latest.changed()).await;
        ensure!(
            matches!(ended, Ok(Err(_))),
            "the Watch stream did not end on shutdown"
        );
        // ... and the Lease is free at once, not after its 15s duration.
        ensure!(
            lease_holder(&client, &ns).await.is_none(),
            "the Lease was not released"
        );
        Ok(())
    })
    .await;
}
