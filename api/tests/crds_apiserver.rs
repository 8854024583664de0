//! The CRDs on a real kube-apiserver (the test bed): they install and become Established, full
//! valid objects round-trip unchanged, invalid ones are refused with the offending field named,
//! and kubectl shows the printer columns and the field docs.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use sagamesh_api::{Saga, SagaSpec, ServiceRegistration, ServiceRegistrationSpec};
use sagamesh_testing::{TestBed, eventually, test_bed};
use serde_json::{Value, json};

fn full_registration_with_endpoints() -> Value {
    json!({
        "apiVersion": "sagamesh.io/v1alpha1",
        "kind": "ServiceRegistration",
        "metadata": { "name": "payments" },
        "spec": {
            "endpoints": [
                { "address": "127.0.0.1", "port": 9001, "weight": 2, "zone": "zone-a" },
                { "address": "payments-2.example.com", "port": 9002, "weight": 1, "zone": "zone-b" }
            ],
            "ports": [
                { "name": "http", "port": 8080, "targetPort": 9000, "protocol": "HTTP" },
                { "name": "grpc", "port": 9090, "protocol": "GRPC" }
            ],
            "loadBalancer": { "policy": "ConsistentHash", "hashHeader": "x-user-id" },
            "circuitBreaker": {
                "consecutiveFailures": 5,
                "failureRatio": 0.5,
                "failureWindow": "10s",
                "minimumRequests": 20,
                "baseEjectionTime": "30s",
                "maxEjectionTime": "5m",
                "maxEjectionPercent": 50,
                "halfOpenProbes": 2
            },
            "retry": {
                "attempts": 3,
                "retryOn": ["5xx", "gateway-error", "connect-failure", "reset"],
                "retriableStatusCodes": [409, 429],
                "perTryTimeout": "1s",
                "backoff": { "baseInterval": "25ms", "maxInterval": "1s" },
                "budget": { "ratio": 0.2, "minRetriesPerSecond": 10, "ttl": "10s" },
                "retryNonIdempotent": false
            },
            "timeout": "5s",
            "maxInFlightRequests": 1000
        }
    })
}

fn full_registration_with_selector() -> Value {
    let mut value = full_registration_with_endpoints();
    value["metadata"]["name"] = json!("orders");
    let spec = value["spec"].as_object_mut().expect("spec is an object");
    spec.remove("endpoints");
    spec.insert(
        "selector".into(),
        json!({ "app": "orders", "tier": "backend" }),
    );
    value
}

fn full_saga() -> Value {
    json!({
        "apiVersion": "sagamesh.io/v1alpha1",
        "kind": "Saga",
        "metadata": { "name": "order-1001" },
        "spec": {
            "input": { "orderId": "1001", "items": [{ "sku": "apple", "qty": 3 }], "amount": 12.5 },
            "deadline": "5m",
            "steps": [
                {
                    "name": "create-order",
                    "action": {
                        "service": "orders", "port": "http", "method": "POST", "path": "/orders",
                        "headers": [{ "name": "X-Tenant", "value": "shop" }, { "name": "X-Order", "value": "{{ input.orderId }}" }],
                        "body": { "id": "{{ input.orderId }}", "items": "{{ input.items }}" }
                    },
                    "compensation": {
                        "service": "orders", "port": "http", "method": "DELETE",
                        "path": "/orders/{{ input.orderId }}"
                    },
                    "timeout": "5s",
                    "retry": { "attempts": 3, "backoff": "100ms", "maxBackoff": "2s" }
                },
                {
                    "name": "reserve-stock",
                    "action": { "service": "inventory.shop", "method": "POST", "path": "/reservations",
                                "body": { "order": "{{ steps.create-order.output.id }}" } },
                    "compensation": { "service": "inventory.shop", "method": "DELETE",
                                      "path": "/reservations/{{ steps.reserve-stock.output.id }}" }
                },
                {
                    "name": "charge",
                    "action": { "service": "payment", "method": "PUT", "path": "/charges/{{ input.orderId }}",
                                "body": { "amount": "{{ input.amount }}" } },
                    "compensation": { "service": "payment", "method": "PATCH", "path": "/charges/{{ input.orderId }}/refund" }
                },
                {
                    "name": "notify",
                    "action": { "service": "users", "method": "GET", "path": "/users/42" }
                }
            ]
        }
    })
}

fn api_resource<K: Resource<DynamicType = ()>>() -> ApiResource {
    ApiResource::erase::<K>(&())
}

async fn create_dynamic(
    client: &Client,
    ns: &str,
    ar: &ApiResource,
    value: &Value,
) -> kube::Result<DynamicObject> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, ar);
    let object: DynamicObject =
        serde_json::from_value(value.clone()).map_err(kube::Error::SerdeError)?;
    api.create(&PostParams::default(), &object).await
}

async fn bed(test: &str) -> Option<TestBed> {
    let bed = test_bed(test).await?;
    bed.install_crds().await.expect("CRDs install");
    Some(bed)
}

#[tokio::test]
async fn crds_apply_with_kubectl_and_become_established() {
    // `install_crds` runs `kubectl apply -f crds/` and waits for the Established condition.
    let Some(bed) = test_bed("crds_apply_with_kubectl_and_become_established").await else {
        return;
    };
    bed.install_crds()
        .await
        .expect("kubectl apply -f crds/ and Established");
    // Applying again is a no-op, as users re-run it on upgrade.
    bed.install_crds().await.expect("re-apply is idempotent");
}

#[tokio::test]
async fn full_valid_objects_read_back_unchanged() {
    let Some(bed) = bed("full_valid_objects_read_back_unchanged").await else {
        return;
    };
    bed.with_namespace("full-valid", |client, ns| async move {
        for manifest in [
            full_registration_with_endpoints(),
            full_registration_with_selector(),
        ] {
            let sent: ServiceRegistrationSpec = serde_json::from_value(manifest["spec"].clone())?;
            let api: Api<ServiceRegistration> = Api::namespaced(client.clone(), &ns);
            let object: ServiceRegistration = serde_json::from_value(manifest.clone())?;
            api.create(&PostParams::default(), &object)
                .await
                .context("create sreg")?;
            let name = object.metadata.name.clone().unwrap_or_default();
            let back = api.get(&name).await?;
            ensure!(
                back.spec == sent,
                "{name}: spec changed on the way: {:#?}\n!=\n{sent:#?}",
                back.spec
            );
            // And byte-for-byte as JSON, so no field was dropped by pruning.
            let raw: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &ns, &api_resource::<ServiceRegistration>());
            let raw_back = raw.get(&name).await?;
            ensure!(
                raw_back.data["spec"] == manifest["spec"],
                "{name}: stored spec differs: {}",
                raw_back.data["spec"]
            );
        }

        let manifest = full_saga();
        let sent: SagaSpec = serde_json::from_value(manifest["spec"].clone())?;
        let api: Api<Saga> = Api::namespaced(client.clone(), &ns);
        let object: Saga = serde_json::from_value(manifest.clone())?;
        api.create(&PostParams::default(), &object)
            .await
            .context("create saga")?;
        let back = api.get("order-1001").await?;
        ensure!(back.spec == sent, "saga spec changed on the way");
        let raw: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &ns, &api_resource::<Saga>());
        ensure!(
            raw.get("order-1001").await?.data["spec"] == manifest["spec"],
            "stored saga spec differs"
        );

        // The spec is immutable once created.
        let patch = json!({ "spec": { "deadline": "10m" } });
        match api
            .patch("order-1001", &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(e)) if e.message.contains("spec is immutable") => {}
            other => bail!("changing a saga's spec must be refused as immutable, got {other:?}"),
        }
        Ok(())
    })
    .await;
}

/// One invalid manifest: how it breaks a rule and what the API server must say.
struct Invalid {
    what: &'static str,
    manifest: Value,
    /// Every one of these must appear in the API server's message.
    expect: &'static [&'static str],
}

/// Sets the value at a JSON pointer; the last segment may be a new key of an existing object.
fn set(mut value: Value, pointer: &str, new: Value) -> Value {
    if let Some(slot) = value.pointer_mut(pointer) {
        *slot = new;
        return value;
    }
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
    value
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("{parent} is an object in the fixture"))
        .insert(key.to_string(), new);
    value
}

fn remove(mut value: Value, pointer: &str, key: &str) -> Value {
    value
        .pointer_mut(pointer)
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("{pointer} is an object in the fixture"))
        .remove(key);
    value
}

fn invalid_registrations() -> Vec<Invalid> {
    let base = full_registration_with_endpoints;
    vec![
        Invalid {
            what: "a port given as a string",
            manifest: set(base(), "/spec/ports/0/port", json!("eighty")),
            expect: &["spec.ports[0].port", "integer"],
        },
        Invalid {
            what: "a failure ratio above 1",
            manifest: set(base(), "/spec/circuitBreaker/failureRatio", json!(1.5)),
            expect: &[
                "spec.circuitBreaker.failureRatio",
                "less than or equal to 1",
            ],
        },
        Invalid {
            what: "both selector and endpoints",
            manifest: set(base(), "/spec/selector", json!({ "app": "x" })),
            expect: &["exactly one of spec.selector and spec.endpoints"],
        },
        Invalid {
            what: "neither selector nor endpoints",
            manifest: remove(base(), "/spec", "endpoints"),
            expect: &["exactly one of spec.selector and spec.endpoints"],
        },
        Invalid {
            what: "an unknown load-balancer policy",
            manifest: set(base(), "/spec/loadBalancer/policy", json!("Random")),
            expect: &[
                "spec.loadBalancer.policy",
                "Unsupported value",
                "\"PeakEwma\"",
            ],
        },
        Invalid {
            what: "a negative timeout",
            manifest: set(base(), "/spec/timeout", json!("-5s")),
            expect: &["spec.timeout"],
        },
        Invalid {
            what: "a zero timeout",
            manifest: set(base(), "/spec/timeout", json!("0s")),
            expect: &["spec.timeout must be a positive duration"],
        },
        Invalid {
            what: "zero retry attempts",
            manifest: set(base(), "/spec/retry/attempts", json!(0)),
            expect: &["spec.retry.attempts", "greater than or equal to 1"],
        },
        Invalid {
            what: "ConsistentHash without a hash header",
            manifest: remove(base(), "/spec/loadBalancer", "hashHeader"),
            expect: &[
                "spec.loadBalancer.hashHeader",
                "required when policy is ConsistentHash",
            ],
        },
        Invalid {
            what: "a base ejection time above the maximum",
            manifest: set(
                base(),
                "/spec/circuitBreaker/baseEjectionTime",
                json!("10m"),
            ),
            expect: &[
                "spec.circuitBreaker.baseEjectionTime",
                "must not exceed maxEjectionTime",
            ],
        },
        Invalid {
            what: "duplicate port names",
            manifest: set(base(), "/spec/ports/1/name", json!("http")),
            expect: &["spec.ports[1]", "Duplicate value"],
        },
        Invalid {
            what: "duplicate port numbers",
            manifest: set(base(), "/spec/ports/1/port", json!(8080)),
            expect: &["spec.ports", "port numbers must be unique"],
        },
        Invalid {
            what: "an unparseable duration",
            manifest: set(base(), "/spec/retry/perTryTimeout", json!("5 seconds")),
            expect: &["spec.retry.perTryTimeout", "should match"],
        },
        Invalid {
            what: "an endpoint address that is neither IP nor DNS name",
            manifest: set(
                base(),
                "/spec/endpoints/0/address",
                json!("not an address!"),
            ),
            expect: &["spec.endpoints[0].address", "IP address or a DNS name"],
        },
        Invalid {
            what: "an endpoint port out of range",
            manifest: set(base(), "/spec/endpoints/1/port", json!(70000)),
            expect: &["spec.endpoints[1].port", "less than or equal to 65535"],
        },
        Invalid {
            what: "a negative retry budget ratio",
            manifest: set(base(), "/spec/retry/budget/ratio", json!(-0.1)),
            expect: &["spec.retry.budget.ratio", "greater than or equal to 0"],
        },
        Invalid {
            what: "no ports",
            manifest: set(base(), "/spec/ports", json!([])),
            expect: &["spec.ports", "at least 1 items"],
        },
        Invalid {
            what: "a retriable status code that is no HTTP status",
            manifest: set(
                base(),
                "/spec/retry/retriableStatusCodes",
                json!([429, 700]),
            ),
            expect: &["spec.retry.retriableStatusCodes", "100-599"],
        },
        Invalid {
            what: "an unknown retryOn class",
            manifest: set(base(), "/spec/retry/retryOn", json!(["5xx", "sometimes"])),
            expect: &["spec.retry.retryOn[1]", "Unsupported value"],
        },
        Invalid {
            what: "an empty selector",
            manifest: set(
                remove(base(), "/spec", "endpoints"),
                "/spec/selector",
                json!({}),
            ),
            expect: &["spec.selector must not be empty"],
        },
    ]
}

fn invalid_sagas() -> Vec<Invalid> {
    let base = full_saga;
    vec![
        Invalid {
            what: "duplicate step names",
            manifest: set(base(), "/spec/steps/2/name", json!("create-order")),
            expect: &["spec.steps[2]", "Duplicate value"],
        },
        Invalid {
            what: "a compensation without a path",
            manifest: remove(base(), "/spec/steps/0/compensation", "path"),
            expect: &["spec.steps[0].compensation.path", "Required value"],
        },
        Invalid {
            what: "a path that does not start with /",
            manifest: set(base(), "/spec/steps/1/action/path", json!("reservations")),
            expect: &["spec.steps[1].action.path", "must start with '/'"],
        },
        Invalid {
            what: "a service name that is not a DNS label",
            manifest: set(base(), "/spec/steps/0/action/service", json!("Orders_Svc")),
            expect: &["spec.steps[0].action.service", "should match"],
        },
        Invalid {
            what: "an unknown HTTP method",
            manifest: set(base(), "/spec/steps/0/action/method", json!("FETCH")),
            expect: &["spec.steps[0].action.method", "Unsupported value"],
        },
        Invalid {
            what: "no steps",
            manifest: set(base(), "/spec/steps", json!([])),
            expect: &["spec.steps", "at least 1 items"],
        },
        Invalid {
            what: "a zero deadline",
            manifest: set(base(), "/spec/deadline", json!("0s")),
            expect: &["spec.deadline", "positive duration"],
        },
        Invalid {
            what: "a header Sagamesh sets itself",
            manifest: set(
                base(),
                "/spec/steps/0/action/headers/1/name",
                json!("Idempotency-Key"),
            ),
            expect: &["spec.steps[0].action.headers[1].name", "must not be Host"],
        },
        Invalid {
            what: "a header name that is not an HTTP token",
            manifest: set(
                base(),
                "/spec/steps/0/action/headers/0/name",
                json!("X Tenant"),
            ),
            expect: &["spec.steps[0].action.headers[0].name", "should match"],
        },
        Invalid {
            what: "a negative step timeout",
            manifest: set(base(), "/spec/steps/0/timeout", json!("-1s")),
            expect: &["spec.steps[0].timeout"],
        },
        Invalid {
            what: "zero step attempts",
            manifest: set(base(), "/spec/steps/0/retry/attempts", json!(0)),
            expect: &["spec.steps[0].retry.attempts", "greater than or equal to 1"],
        },
        Invalid {
            what: "a step with an uppercase name",
            manifest: set(base(), "/spec/steps/3/name", json!("Notify")),
            expect: &["spec.steps[3].name", "should match"],
        },
        Invalid {
            what: "a step without an action",
            manifest: remove(base(), "/spec/steps/3", "action"),
            expect: &["spec.steps[3].action", "Required value"],
        },
    ]
}

async fn assert_refused(
    client: &Client,
    ns: &str,
    ar: &ApiResource,
    case: &Invalid,
) -> anyhow::Result<()> {
    match create_dynamic(client, ns, ar, &case.manifest).await {
        Ok(_) => bail!("{}: the API server accepted it", case.what),
        Err(kube::Error::Api(e)) => {
            ensure!(
                e.code == 422,
                "{}: expected 422 Invalid, got {}: {}",
                case.what,
                e.code,
                e.message
            );
            for needle in case.expect {
                ensure!(
                    e.message.contains(needle),
                    "{}: message does not name {needle:?}: {}",
                    case.what,
                    e.message
                );
            }
            Ok(())
        }
        Err(other) => bail!("{}: unexpected error {other}", case.what),
    }
}

#[tokio::test]
async fn invalid_manifests_are_refused_naming_the_field() {
    let Some(bed) = bed("invalid_manifests_are_refused_naming_the_field").await else {
        return;
    };
    bed.with_namespace("invalid", |client, ns| async move {
        // The fixtures themselves are valid: each invalid case differs from them in one rule.
        let sreg = api_resource::<ServiceRegistration>();
        let saga = api_resource::<Saga>();
        create_dynamic(&client, &ns, &sreg, &full_registration_with_endpoints())
            .await
            .context("base sreg valid")?;
        create_dynamic(&client, &ns, &saga, &full_saga())
            .await
            .context("base saga valid")?;

        let mut failures = Vec::new();
        let registrations = invalid_registrations();
        let sagas = invalid_sagas();
        ensure!(registrations.len() + sagas.len() >= 12);
        for (i, case) in registrations.iter().enumerate() {
            let mut case_manifest = case.manifest.clone();
            case_manifest["metadata"]["name"] = json!(format!("bad-{i}"));
            let case = Invalid {
                manifest: case_manifest,
                ..*case
            };
            if let Err(e) = assert_refused(&client, &ns, &sreg, &case).await {
                failures.push(format!("{e:#}"));
            }
        }
        for (i, case) in sagas.iter().enumerate() {
            let mut case_manifest = case.manifest.clone();
            case_manifest["metadata"]["name"] = json!(format!("bad-{i}"));
            let case = Invalid {
                manifest: case_manifest,
                ..*case
            };
            if let Err(e) = assert_refused(&client, &ns, &saga, &case).await {
                failures.push(format!("{e:#}"));
            }
        }
        ensure!(
            failures.is_empty(),
            "{} case(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn kubectl_shows_printer_columns_and_field_docs() {
    let Some(bed) = bed("kubectl_shows_printer_columns_and_field_docs").await else {
        return;
    };
    let kubectl_bed = bed.clone();
    bed.with_namespace("kubectl", move |client, ns| async move {
        create_dynamic(
            &client,
            &ns,
            &api_resource::<ServiceRegistration>(),
            &full_registration_with_endpoints(),
        )
        .await?;
        create_dynamic(&client, &ns, &api_resource::<Saga>(), &full_saga()).await?;
        // Status is a subresource: the operator writes it through /status.
        let sregs: Api<ServiceRegistration> = Api::namespaced(client.clone(), &ns);
        let status = json!({ "status": { "readyEndpoints": 2, "totalEndpoints": 3 } });
        sregs
            .patch_status("payments", &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        let sagas: Api<Saga> = Api::namespaced(client.clone(), &ns);
        let status = json!({ "status": { "phase": "Running", "currentStep": "reserve-stock" } });
        sagas
            .patch_status(
                "order-1001",
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await?;

        let out = kubectl_bed.kubectl(&["get", "sreg", "-n", &ns])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "kubectl get sreg: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines = text.lines();
        let header: Vec<_> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        ensure!(
            header == ["NAME", "READY", "TOTAL", "POLICY", "AGE"],
            "sreg columns: {text}"
        );
        let row: Vec<_> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        ensure!(
            row.get(..4) == Some(&["payments", "2", "3", "ConsistentHash"][..]),
            "sreg row: {text}"
        );

        let out = kubectl_bed.kubectl(&["get", "saga", "-n", &ns])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "kubectl get saga: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut lines = text.lines();
        let header: Vec<_> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        ensure!(
            header == ["NAME", "PHASE", "STEP", "AGE"],
            "saga columns: {text}"
        );
        let row: Vec<_> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        ensure!(
            row.get(..3) == Some(&["order-1001", "Running", "reserve-stock"][..]),
            "saga row: {text}"
        );

        // The OpenAPI document is published a moment after the CRD is Established.
        let explain = eventually(
            "kubectl explain saga.spec.steps",
            Duration::from_secs(30),
            || {
                let out = kubectl_bed.kubectl(&["explain", "saga.spec.steps"]);
                async move {
                    let out = out.ok()?;
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    (out.status.success() && text.contains("compensation")).then_some(text)
                }
            },
        )
        .await?;
        for doc in [
            "The steps, run in order",
            "The call that undoes the action when a later step fails",
            "Deadline of one attempt of the action",
        ] {
            ensure!(
                explain.contains(doc),
                "kubectl explain lacks {doc:?}:\n{explain}"
            );
        }
        let out =
            kubectl_bed.kubectl(&["explain", "sreg.spec.circuitBreaker.maxEjectionPercent"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains("Most endpoints, as a percentage of all"),
            "explain sreg field: {text}"
        );
        Ok(())
    })
    .await;
}
