//! Sagas run by `sagamesh-operator` processes (as the ServiceAccount of deploy/rbac) against
//! real HTTP services on 127.0.0.1:
//!
//! - Crash safety: 50 sagas while the operator is SIGKILLed at random moments, at least 10
//!   times; every saga ends terminal, none is lost, no idempotency key takes effect twice.
//! - Failover: two replicas; the Lease holder is killed mid-saga; the other takes the Lease and
//!   finishes.

mod common;

use std::time::Duration;

use anyhow::{Context, ensure};
use common::{Operator, operator_setup};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};
use sagamesh_api::{
    ServiceRegistration,
    saga::{Saga, SagaPhase},
};
use sagamesh_testing::{
    eventually,
    shop::{Fault, TestService},
    test_bed,
};
use serde_json::json;

async fn register(
    client: &Client,
    ns: &str,
    name: &str,
    service: &TestService,
) -> anyhow::Result<()> {
    let api: Api<ServiceRegistration> = Api::namespaced(client.clone(), ns);
    let registration: ServiceRegistration = serde_json::from_value(json!({
        "apiVersion": "sagamesh.io/v1alpha1",
        "kind": "ServiceRegistration",
        "metadata": {"name": name},
        "spec": {
            "endpoints": [{"address": service.addr.ip().to_string(), "port": service.addr.port()}],
            "ports": [{"name": "http", "port": 8080}]
        }
    }))?;
    api.create(&PostParams::default(), &registration).await?;
    Ok(())
}

fn order(name: &str, amount: u32) -> anyhow::Result<Saga> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "sagamesh.io/v1alpha1",
        "kind": "Saga",
        "metadata": {"name": name},
        "spec": {
            "input": {"orderId": name, "amount": amount},
            "steps": [
                {"name": "create-order",
                 "action": {"service": "orders", "path": "/orders", "body": {"id": "{{ input.orderId }}"}},
                 "compensation": {"service": "orders", "method": "DELETE", "path": "/orders/{{ input.orderId }}"},
                 "retry": {"attempts": 20, "backoff": "50ms"}},
                {"name": "reserve",
                 "action": {"service": "inventory", "path": "/reservations", "body": {"order": "{{ input.orderId }}"}},
                 "compensation": {"service": "inventory", "method": "DELETE", "path": "/reservations/{{ input.orderId }}"},
                 "retry": {"attempts": 20, "backoff": "50ms"}},
                {"name": "charge",
                 "action": {"service": "payment", "path": "/charges/{{ input.amount }}"},
                 "retry": {"attempts": 20, "backoff": "50ms"}}
            ]
        }
    }))?)
}

struct Shop {
    orders: TestService,
    inventory: TestService,
    payment: TestService,
}

async fn shop(client: &Client, ns: &str) -> anyhow::Result<Shop> {
    let shop = Shop {
        orders: TestService::start("orders").await?,
        inventory: TestService::start("inventory").await?,
        payment: TestService::start("payment").await?,
    };
    register(client, ns, "orders", &shop.orders).await?;
    register(client, ns, "inventory", &shop.inventory).await?;
    register(client, ns, "payment", &shop.payment).await?;
    Ok(shop)
}

async fn phases(api: &Api<Saga>) -> anyhow::Result<Vec<(String, Option<SagaPhase>)>> {
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|s| {
            (
                s.metadata.name.clone().unwrap_or_default(),
                s.status.map(|st| st.phase),
            )
        })
        .collect())
}

fn check_effects(shop: &Shop) -> anyhow::Result<()> {
    for service in [&shop.orders, &shop.inventory, &shop.payment] {
        for (key, count) in service.effects() {
            ensure!(
                count == 1,
                "{}: effect of {key} applied {count} times",
                service.name
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sagas_survive_ten_operator_kills() {
    let Some(bed) = test_bed("fifty_sagas_survive_ten_operator_kills").await else {
        return;
    };
    bed.install_crds().await.expect("CRDs install");
    let bed2 = bed.clone();
    bed.with_namespace("op-saga-crash", move |client, ns| async move {
        let kubeconfig = operator_setup(&bed2, &client, &ns).await?;
        let shop = shop(&client, &ns).await?;
        // Calls take a little while, so kills land mid-call too.
        shop.orders
            .fault("/orders", Fault::Delay(Duration::from_millis(400)));
        shop.inventory
            .fault("/reservations", Fault::Delay(Duration::from_millis(400)));
        shop.payment.fault("/charges/999", Fault::Always(402));
        let api: Api<Saga> = Api::namespaced(client.clone(), &ns);
        let mut operator = Operator::start(&kubeconfig, &ns, "op-a")?;
        let mut created = 0;
        let mut kills = 0;
        // Kills while sagas were still in flight: the ones that count.
        let mut kills_mid_flight = 0;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        while kills_mid_flight < 10 || created < 50 {
            ensure!(
                kills < 30,
                "only {kills_mid_flight} of {kills} kills landed mid-flight"
            );
            // Sagas join in waves of 5, so each kill has fresh sagas in flight.
            for _ in 0..5 {
                if created < 50 {
                    // Every fifth order is declined at payment and must be compensated.
                    let amount = if created % 5 == 0 { 999 } else { 10 };
                    api.create(
                        &PostParams::default(),
                        &order(&format!("o{created}"), amount)?,
                    )
                    .await?;
                    created += 1;
                }
            }
            // xorshift: a repeatable sequence of "random" moments, 300-1100ms apart.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            tokio::time::sleep(Duration::from_millis(300 + seed % 800)).await;
            operator.ensure_never_forbidden()?;
            let in_flight = phases(&api)
                .await?
                .iter()
                .any(|(_, p)| !p.is_some_and(|p| p.is_terminal()));
            operator.kill();
            kills += 1;
            if in_flight {
                kills_mid_flight += 1;
            }
            let (discovery, admin) = (operator.discovery, operator.admin);
            operator = Operator::start_on(&kubeconfig, &ns, "op-a", discovery, admin)?;
        }
        let all_terminal = eventually(
            "every saga to be terminal",
            Duration::from_secs(120),
            || async {
                let phases = phases(&api).await.ok()?;
                phases
                    .iter()
                    .all(|(_, p)| p.is_some_and(|p| p.is_terminal()))
                    .then_some(phases)
            },
        )
        .await
        .with_context(|| format!("operator log:\n{}", operator.log()))?;
        ensure!(
            all_terminal.len() == 50,
            "no saga lost: {}",
            all_terminal.len()
        );
        for (name, phase) in &all_terminal {
            let declined = name.trim_start_matches('o').parse::<u32>().unwrap_or(1) % 5 == 0;
            let expected = if declined {
                SagaPhase::Compensated
            } else {
                SagaPhase::Succeeded
            };
            ensure!(
                *phase == Some(expected),
                "{name}: {phase:?}, expected {expected:?}"
            );
        }
        check_effects(&shop)?;
        ensure!(shop.payment.effects().len() == 40, "40 charges, one each");
        operator.ensure_never_forbidden()?;
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_replica_takes_the_lease_and_finishes_the_sagas() {
    let Some(bed) = test_bed("the_other_replica_takes_the_lease_and_finishes_the_sagas").await
    else {
        return;
    };
    bed.install_crds().await.expect("CRDs install");
    let bed2 = bed.clone();
    bed.with_namespace("op-saga-failover", move |client, ns| async move {
        let kubeconfig = operator_setup(&bed2, &client, &ns).await?;
        let shop = shop(&client, &ns).await?;
        shop.inventory
            .fault("/reservations", Fault::Delay(Duration::from_millis(1500)));
        let mut a = Operator::start(&kubeconfig, &ns, "op-a")?;
        let mut b = Operator::start(&kubeconfig, &ns, "op-b")?;
        let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
        let holder = eventually("a Lease holder", Duration::from_secs(30), || async {
            leases
                .get("sagamesh-operator")
                .await
                .ok()?
                .spec?
                .holder_identity
        })
        .await?;
        let api: Api<Saga> = Api::namespaced(client.clone(), &ns);
        for i in 0..5 {
            api.create(&PostParams::default(), &order(&format!("f{i}"), 10)?)
                .await?;
        }
        eventually(
            "a saga in its slow step",
            Duration::from_secs(30),
            || async {
                let sagas = api.list(&ListParams::default()).await.ok()?;
                sagas
                    .items
                    .iter()
                    .any(|s| {
                        s.status.as_ref().and_then(|st| st.current_step.as_deref())
                            == Some("reserve")
                    })
                    .then_some(())
            },
        )
        .await?;
        let (leader, survivor) = if holder == "op-a" {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        leader.kill();
        let new_holder = eventually(
            "the survivor to take the Lease",
            Duration::from_secs(30),
            || async {
                let holder = leases
                    .get("sagamesh-operator")
                    .await
                    .ok()?
                    .spec?
                    .holder_identity?;
                (holder == survivor.identity).then_some(holder)
            },
        )
        .await?;
        ensure!(new_holder != holder);
        eventually("every saga to succeed", Duration::from_secs(60), || async {
            let phases = phases(&api).await.ok()?;
            phases
                .iter()
                .all(|(_, p)| *p == Some(SagaPhase::Succeeded))
                .then_some(())
        })
        .await
        .with_context(|| format!("survivor log:\n{}", survivor.log()))?;
        check_effects(&shop)?;
        ensure!(shop.payment.effects().len() == 5);
        // The survivor's saga calls went through its mesh client, whose metrics its /metrics
        // serves under the sidecar's names (the charges are all after the failover).
        let charges = survivor
            .metric(&format!(
                "sagamesh_requests_total{{direction=\"outbound\",destination=\"payment.{ns}\",status_class=\"2xx\",error=\"\"}}"
            ))
            .await?;
        ensure!(charges >= 1.0, "saga calls on /metrics: {charges}");
        survivor.ensure_never_forbidden()?;
        Ok(())
    })
    .await;
}
