//! The saga engine against real HTTP services on 127.0.0.1: happy path, compensation in reverse,
//! a compensation that never succeeds, the deadline, validation, and crash safety (runs aborted at
//! random moments and resumed from the last stored status).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use sagamesh_api::saga::{CallPhase, SagaPhase, SagaSpec, SagaStatus};
use sagamesh_saga::{EngineConfig, Event, SagaRef, SagaStore, StoreError, run};
use sagamesh_testing::saga::{DirectCaller, Fault, TestService};
use serde_json::json;

/// Keeps each saga's status as JSON, as the API server or the disk store would.
#[derive(Clone, Default)]
struct MemoryStore {
    saved: Arc<Mutex<HashMap<String, String>>>,
    writes: Arc<Mutex<Vec<String>>>,
}

impl MemoryStore {
    fn load(&self, name: &str) -> SagaStatus {
        let saved = self.saved.lock().expect("lock");
        saved
            .get(name)
            .map(|json| serde_json::from_str(json).expect("stored status parses"))
            .unwrap_or_default()
    }
}

impl SagaStore for MemoryStore {
    async fn save(
        &self,
        saga: &SagaRef,
        status: &SagaStatus,
        event: &Event,
    ) -> Result<(), StoreError> {
        let json =
            serde_json::to_string(status).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        self.saved
            .lock()
            .expect("lock")
            .insert(saga.name.clone(), json);
        self.writes
            .lock()
            .expect("lock")
            .push(format!("{}: {event:?}", saga.name));
        Ok(())
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        default_backoff: Duration::from_millis(5),
        default_max_backoff: Duration::from_millis(20),
        jitter: false,
        ..EngineConfig::default()
    }
}

fn saga_ref(name: &str) -> SagaRef {
    SagaRef {
        namespace: "shop".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

/// The order saga: create the order, reserve stock, charge, confirm.
fn order_saga(order_id: &str) -> SagaSpec {
    serde_json::from_value(json!({
        "input": { "orderId": order_id, "sku": "apple", "qty": 2, "amount": 12.5 },
        "steps": [
            { "name": "create-order",
              "action": { "service": "orders", "method": "POST", "path": "/orders",
                          "body": { "orderId": "{{ input.orderId }}" } },
              "compensation": { "service": "orders", "method": "DELETE", "path": "/orders/{{ steps.create-order.output.id }}" },
              "retry": { "attempts": 2 } },
            { "name": "reserve",
              "action": { "service": "inventory", "method": "POST", "path": "/reservations",
                          "headers": [{ "name": "X-Order", "value": "{{ steps.create-order.output.id }}" }],
                          "body": { "order": "{{ steps.create-order.output.id }}", "sku": "{{ input.sku }}", "qty": "{{ input.qty }}" } },
              "compensation": { "service": "inventory", "method": "DELETE", "path": "/reservations/{{ steps.reserve.output.id }}" },
              "retry": { "attempts": 2 } },
            { "name": "charge",
              "action": { "service": "payment", "method": "POST", "path": "/charges",
                          "body": { "amount": "{{ input.amount }}", "reservation": "{{ steps.reserve.output.id }}" } },
              "compensation": { "service": "payment", "method": "POST", "path": "/refunds",
                                "body": { "charge": "{{ steps.charge.output.id }}" } },
              "retry": { "attempts": 2 } },
            { "name": "confirm",
              "action": { "service": "orders", "method": "PUT", "path": "/orders/{{ steps.create-order.output.id }}/confirmed" } }
        ]
    }))
    .expect("the order saga parses")
}

struct Shop {
    orders: TestService,
    inventory: TestService,
    payment: TestService,
    caller: DirectCaller,
}

async fn shop() -> Shop {
    let orders = TestService::start("orders").await.expect("orders starts");
    let inventory = TestService::start("inventory")
        .await
        .expect("inventory starts");
    let payment = TestService::start("payment").await.expect("payment starts");
    let caller = DirectCaller::new(&[&orders, &inventory, &payment]);
    Shop {
        orders,
        inventory,
        payment,
        caller,
    }
}

async fn run_to_end(shop: &Shop, store: &MemoryStore, name: &str, spec: &SagaSpec) -> SagaStatus {
    let saga = saga_ref(name);
    tokio::time::timeout(
        Duration::from_secs(30),
        run(
            &saga,
            spec,
            store.load(name),
            store,
            &shop.caller,
            &config(),
        ),
    )
    .await
    .expect("the saga finishes within 30s")
    .expect("the store accepts every write")
}

fn calls(shop: &Shop) -> Vec<String> {
    let mut all: Vec<_> = [&shop.orders, &shop.inventory, &shop.payment]
        .iter()
        .flat_map(|s| {
            s.log().into_iter().map(|r| {
                (
                    r.key.unwrap_or_default(),
                    format!("{} {} {}", s.name, r.method, r.path),
                )
            })
        })
        .collect();
    all.sort();
    all.into_iter().map(|(_, c)| c).collect()
}

#[tokio::test]
async fn happy_path_runs_every_step_in_order_with_outputs_flowing() {
    let shop = shop().await;
    let store = MemoryStore::default();
    let status = run_to_end(&shop, &store, "o1", &order_saga("1001")).await;
    assert_eq!(status.phase, SagaPhase::Succeeded, "{status:#?}");
    assert!(
        status
            .steps
            .iter()
            .all(|s| s.action.phase == CallPhase::Succeeded)
    );

    let orders = shop.orders.log();
    assert_eq!(orders[0].body, json!({"orderId": "1001"}));
    let order_id = "orders-1";
    assert_eq!(orders[1].path, format!("/orders/{order_id}/confirmed"));
    let reserve = &shop.inventory.log()[0];
    // Types are kept: qty stays a number.
    assert_eq!(
        reserve.body,
        json!({"order": order_id, "sku": "apple", "qty": 2})
    );
    assert_eq!(
        shop.payment.log()[0].body,
        json!({"amount": 12.5, "reservation": "inventory-1"})
    );

    // Keys and one trace for the whole saga.
    assert_eq!(orders[0].key.as_deref(), Some("uid-o1/create-order/action"));
    assert_eq!(reserve.key.as_deref(), Some("uid-o1/reserve/action"));
    let trace_ids: std::collections::HashSet<_> = [&shop.orders, &shop.inventory, &shop.payment]
        .iter()
        .flat_map(|s| s.log())
        .map(|r| r.traceparent.expect("traceparent sent")[3..35].to_string())
        .collect();
    assert_eq!(trace_ids.len(), 1, "one trace id: {trace_ids:?}");
    assert_eq!(
        status.trace_id.as_deref(),
        trace_ids.iter().next().map(String::as_str)
    );
}

#[tokio::test]
async fn a_step_failing_for_good_compensates_the_completed_steps_in_reverse() {
    let shop = shop().await;
    shop.payment.fault("/charges", Fault::Always(500));
    let store = MemoryStore::default();
    let status = run_to_end(&shop, &store, "o2", &order_saga("1002")).await;
    assert_eq!(status.phase, SagaPhase::Compensated, "{status:#?}");
    assert_eq!(status.steps[2].action.phase, CallPhase::Failed);
    assert_eq!(
        status.steps[2].action.attempts, 2,
        "the failing step was retried"
    );

    let writes = store.writes.lock().expect("lock").clone();
    let compensations: Vec<_> = writes
        .iter()
        .filter(|w| w.contains("CallSucceeded { call: Compensation"))
        .map(|w| {
            w.split("Compensation(")
                .nth(1)
                .and_then(|s| s.chars().next())
                .unwrap_or('?')
        })
        .collect();
    assert_eq!(
        compensations,
        vec!['1', '0'],
        "reserve then create-order: {writes:#?}"
    );
    assert_eq!(
        shop.inventory.log().last().map(|r| r.path.clone()),
        Some("/reservations/inventory-1".into())
    );
    assert_eq!(
        shop.orders
            .log()
            .last()
            .map(|r| (r.method.clone(), r.key.clone())),
        Some((
            "DELETE".into(),
            Some("uid-o2/create-order/compensation".into())
        ))
    );
    assert!(
        shop.payment.log().iter().all(|r| r.path == "/charges"),
        "the failed charge is not refunded"
    );
}

#[tokio::test]
async fn a_compensation_that_never_succeeds_leaves_the_saga_failed_naming_the_step() {
    let shop = shop().await;
    shop.payment.fault("/charges", Fault::Always(502));
    shop.inventory.fault("/reservations/", Fault::Always(500));
    let store = MemoryStore::default();
    let status = run_to_end(&shop, &store, "o3", &order_saga("1003")).await;
    assert_eq!(status.phase, SagaPhase::Failed, "{status:#?}");
    let reserve = &status.steps[1].compensation;
    assert_eq!(
        (reserve.phase, reserve.attempts),
        (CallPhase::Failed, config().compensation_attempts)
    );
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .expect("Failed condition");
    assert_eq!(condition.reason, "CompensationFailed");
    assert!(
        condition.message.contains("\"reserve\""),
        "{}",
        condition.message
    );
    let deletes = shop
        .inventory
        .log()
        .iter()
        .filter(|r| r.method == "DELETE")
        .count();
    assert_eq!(deletes, 5, "the compensation was retried");
}

#[tokio::test]
async fn the_deadline_passing_mid_saga_compensates() {
    let shop = shop().await;
    shop.inventory
        .fault("/reservations", Fault::Delay(Duration::from_secs(3)));
    let mut spec = order_saga("1004");
    spec.deadline = Some("700ms".into());
    // The reservation's outcome is unknown, so its compensation cannot use its output; it
    // releases by order instead (a compensation that needs an output it does not have fails the
    // saga for a person to look at).
    spec.steps[1]
        .compensation
        .as_mut()
        .expect("has compensation")
        .path = "/reservations/by-order/{{ steps.create-order.output.id }}".into();
    let store = MemoryStore::default();
    let status = run_to_end(&shop, &store, "o4", &spec).await;
    assert_eq!(status.phase, SagaPhase::Compensated, "{status:#?}");
    assert_eq!(status.steps[1].action.in_doubt, Some(true));
    assert!(status.history.iter().any(|e| e.kind == "DeadlineExceeded"));
    // The reservation may have been made (it was in doubt), so it is undone too, then the order.
    assert_eq!(status.steps[1].compensation.phase, CallPhase::Succeeded);
    assert_eq!(status.steps[0].compensation.phase, CallPhase::Succeeded);
}

#[tokio::test]
async fn an_invalid_saga_fails_before_any_call_with_the_reason() {
    let shop = shop().await;
    let store = MemoryStore::default();
    let mut unknown_service = order_saga("1005");
    unknown_service.steps[2].action.service = "billing".into();
    let status = run_to_end(&shop, &store, "o5", &unknown_service).await;
    assert_eq!(status.phase, SagaPhase::Failed);
    let message = &status.conditions[0].message;
    assert!(
        message.contains("step \"charge\"") && message.contains("\"billing\" is not registered"),
        "{message}"
    );

    let mut unknown_step = order_saga("1006");
    unknown_step.steps[1].action.path = "/reservations/{{ steps.reserv.output.id }}".into();
    let status = run_to_end(&shop, &store, "o6", &unknown_step).await;
    assert_eq!(status.phase, SagaPhase::Failed);
    let message = &status.conditions[0].message;
    assert!(
        message.contains(
            "step \"reserve\" action: {{ steps.reserv.output.id }}: unknown step \"reserv\""
        ),
        "{message}"
    );

    let mut missing_input = order_saga("1007");
    missing_input.steps[0].action.body = Some(json!({"customer": "{{ input.customer.id }}"}));
    let status = run_to_end(&shop, &store, "o7", &missing_input).await;
    assert!(
        status.conditions[0]
            .message
            .contains("input has no field \"customer\""),
        "{:?}",
        status.conditions
    );
    assert!(
        calls(&shop).is_empty(),
        "no call was made: {:?}",
        calls(&shop)
    );
}

/// 50 sagas, each run in a task that is aborted at random moments (a crash), then resumed from
/// the last stored status, until terminal. Every saga ends terminal and no key's effect was
/// applied twice; a compensated saga undid exactly what it did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_survive_crashes_at_random_moments() {
    use rand::{Rng, SeedableRng};
    let shop = shop().await;
    // Some payments fail for good (those sagas compensate); some services are flaky.
    shop.payment.fault("/charges", Fault::FirstN(10));
    // Every call takes a few milliseconds, so crashes land mid-saga.
    shop.inventory
        .fault("/reservations", Fault::Delay(Duration::from_millis(2)));
    shop.orders
        .fault("/orders", Fault::Delay(Duration::from_millis(2)));
    let store = MemoryStore::default();
    let mut specs = HashMap::new();
    for i in 0..50 {
        let mut spec = order_saga(&format!("{i}"));
        // Crashes re-send in-flight calls as new attempts: allow plenty.
        for step in &mut spec.steps {
            step.retry = Some(sagamesh_api::saga::StepRetry {
                attempts: 20,
                ..Default::default()
            });
        }
        // Undo by order id, so even an action in doubt (no output) can be undone.
        spec.steps[0]
            .compensation
            .as_mut()
            .expect("has compensation")
            .path = "/orders/by-id/{{ input.orderId }}".into();
        spec.steps[1]
            .compensation
            .as_mut()
            .expect("has compensation")
            .path = "/reservations/by-order/{{ input.orderId }}".into();
        if i % 5 == 0 {
            spec.steps[2].action.path = "/charges-declined".into();
        }
        specs.insert(format!("s{i}"), spec);
    }
    shop.payment.fault("/charges-declined", Fault::Always(402));

    let mut crashes = 0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..200u64 {
        // Sagas join in waves of 5, so every early round has fresh sagas in flight to kill.
        let started = (5 * (round as usize + 1)).min(specs.len());
        let pending: Vec<_> = (0..started)
            .map(|i| format!("s{i}"))
            .filter(|name| !store.load(name).phase.is_terminal())
            .collect();
        if pending.is_empty() && started == specs.len() {
            break;
        }
        let mut tasks = Vec::new();
        for name in pending {
            let (shop_caller, store, spec) =
                (shop.caller.clone(), store.clone(), specs[&name].clone());
            tasks.push(tokio::spawn(async move {
                let saga = saga_ref(&name);
                let status = store.load(&name);
                let _ = run(&saga, &spec, status, &store, &shop_caller, &config()).await;
            }));
        }
        // The first 15 rounds: let them run a random while, then "kill the process" (abort every
        // task mid-flight). After that no more kills (each kill re-sends the call in flight as a
        // new attempt, so 15 stays below the 20 attempts allowed): every saga must then finish.
        if round < 15 {
            let pause = Duration::from_millis(rng.random_range(1..6) + round / 2);
            tokio::time::sleep(pause).await;
            let mut killed = false;
            for task in &tasks {
                if !task.is_finished() {
                    task.abort();
                    killed = true;
                }
            }
            if killed {
                crashes += 1;
            }
        }
        for task in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
        }
        assert!(round < 199, "sagas did not finish after 200 restarts");
    }
    assert!(
        crashes >= 10,
        "only {crashes} crashes happened; the test needs at least 10"
    );

    for (name, spec) in &specs {
        let status = store.load(name);
        assert!(status.phase.is_terminal(), "{name} is {:?}", status.phase);
        // Declined payments compensate. Others succeed, unless crashes used up a step's attempts
        // (each restart re-sends the call in flight as a new attempt): then they compensate too.
        // None may end Failed: every compensation here can complete.
        let exhausted = status.steps.iter().any(|s| s.action.in_doubt == Some(true));
        let expected = if spec.steps[2].action.path == "/charges-declined" || exhausted {
            SagaPhase::Compensated
        } else {
            SagaPhase::Succeeded
        };
        assert_eq!(status.phase, expected, "{name}: {status:#?}");
    }
    for service in [&shop.orders, &shop.inventory, &shop.payment] {
        for (key, applied) in service.effects() {
            assert_eq!(
                applied, 1,
                "{}: effect of {key} applied {applied} times",
                service.name
            );
        }
    }
    // Every compensated saga undid, exactly once, each step whose action took (or may have
    // taken) effect.
    for name in specs.keys() {
        let status = store.load(name);
        if status.phase != SagaPhase::Compensated {
            continue;
        }
        for (step, service) in
            status
                .steps
                .iter()
                .zip([&shop.orders, &shop.inventory, &shop.payment])
        {
            let took_effect =
                step.action.phase == CallPhase::Succeeded || step.action.in_doubt == Some(true);
            let key = format!("uid-{name}/{}/compensation", step.name);
            let undone = service.effects().get(&key).copied().unwrap_or(0);
            assert_eq!(
                undone,
                u32::from(took_effect),
                "{name}: {key} applied {undone} times"
            );
        }
    }
}
