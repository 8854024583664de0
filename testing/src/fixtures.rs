//! Manifests shared by the API-server tests and the local-mode validator tests: full valid
//! objects (every field set) and invalid ones that each break one rule, with what the API
//! server must say.

use serde_json::{Value, json};

pub fn full_registration_with_endpoints() -> Value {
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

pub fn full_registration_with_selector() -> Value {
    let mut value = full_registration_with_endpoints();
    value["metadata"]["name"] = json!("orders");
    let spec = value["spec"].as_object_mut().expect("spec is an object");
    spec.remove("endpoints");
    spec.insert(
        "selector".into(),
        json!({ "app": "orders", "tier": "backend", "app.kubernetes.io/part-of": "shop_v1.2" }),
    );
    value
}

pub fn full_saga() -> Value {
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
                    "action": { "service": "users", "method": "GET",
                                "path": "/users/42?fields=name%2Cemail;v=1&tag=a:b@c~d!$'()*+,=" }
                }
            ]
        }
    })
}

/// One invalid manifest: how it breaks a rule and what the API server must say.
pub struct Invalid {
    pub what: &'static str,
    pub manifest: Value,
    /// Every one of these must appear in the API server's message.
    pub expect: &'static [&'static str],
}

/// Sets the value at a JSON pointer; the last segment may be a new key of an existing object.
pub fn set(mut value: Value, pointer: &str, new: Value) -> Value {
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

pub fn remove(mut value: Value, pointer: &str, key: &str) -> Value {
    value
        .pointer_mut(pointer)
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("{pointer} is an object in the fixture"))
        .remove(key);
    value
}

pub fn invalid_registrations() -> Vec<Invalid> {
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
        Invalid {
            what: "a registration name with a dot (reads as service.namespace to callers)",
            manifest: set(base(), "/metadata/name", json!("catalog.v2")),
            expect: &["metadata.name", "must be a DNS label without dots"],
        },
        Invalid {
            what: "a registration name starting with a digit (no Service name)",
            manifest: set(base(), "/metadata/name", json!("1catalog")),
            expect: &["metadata.name must be a DNS label without dots"],
        },
        Invalid {
            what: "a selector label value with a space",
            manifest: set(
                remove(base(), "/spec", "endpoints"),
                "/spec/selector",
                json!({ "app": "orders", "tier": "back end" }),
            ),
            expect: &["spec.selector", "values must be label values"],
        },
        Invalid {
            what: "a selector label value longer than 63 characters",
            manifest: set(
                remove(base(), "/spec", "endpoints"),
                "/spec/selector",
                json!({ "app": "o".repeat(64) }),
            ),
            expect: &["spec.selector.app", "Too long"],
        },
        Invalid {
            what: "a selector label key that is no label key",
            manifest: set(
                remove(base(), "/spec", "endpoints"),
                "/spec/selector",
                json!({ "app": "orders", "-tier?": "backend" }),
            ),
            expect: &["spec.selector", "keys must be label keys"],
        },
        Invalid {
            what: "the same endpoint address and port twice",
            manifest: set(
                base(),
                "/spec/endpoints/1",
                json!({ "address": "127.0.0.1", "port": 9001, "weight": 5 }),
            ),
            expect: &["spec.endpoints[1]", "Duplicate value"],
        },
    ]
}

pub fn invalid_sagas() -> Vec<Invalid> {
    let base = full_saga;
    let mut cases = vec![
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
        Invalid {
            what: "a header value with CR LF (header injection)",
            manifest: set(
                base(),
                "/spec/steps/0/action/headers/0/value",
                json!("shop\r\nX-Injected: yes"),
            ),
            expect: &[
                "spec.steps[0].action.headers[0].value",
                "must not contain CR, LF or NUL",
            ],
        },
        Invalid {
            what: "a header value with a bare LF",
            manifest: set(
                base(),
                "/spec/steps/0/action/headers/0/value",
                json!("shop\nX-Injected: yes"),
            ),
            expect: &[
                "spec.steps[0].action.headers[0].value",
                "must not contain CR, LF or NUL",
            ],
        },
        Invalid {
            what: "two headers whose names differ only in case",
            manifest: set(
                base(),
                "/spec/steps/0/action/headers/1/name",
                json!("x-tenant"),
            ),
            expect: &[
                "spec.steps[0].action.headers",
                "header names must be unique regardless of case",
            ],
        },
        Invalid {
            what: "a step retry backoff larger than its maxBackoff",
            manifest: set(base(), "/spec/steps/0/retry/backoff", json!("5s")),
            expect: &[
                "spec.steps[0].retry.backoff",
                "must not exceed retry.maxBackoff",
            ],
        },
    ];
    for name in HOP_BY_HOP_HEADERS {
        cases.push(Invalid {
            what: name,
            manifest: set(
                base(),
                "/spec/steps/0/compensation/headers",
                json!([{ "name": name, "value": "x" }]),
            ),
            expect: &["spec.steps[0].compensation.headers[0].name", "hop-by-hop"],
        });
    }
    for (what, path) in BAD_PATHS {
        cases.push(Invalid {
            what,
            manifest: set(base(), "/spec/steps/1/action/path", json!(path)),
            expect: &[
                "spec.steps[1].action.path",
                "valid in an HTTP request target",
            ],
        });
    }
    cases
}

/// Hop-by-hop and upgrade headers (one per case, spelt as users would): a saga call must not
/// set them, the proxy between the saga runner and the service owns the connection.
const HOP_BY_HOP_HEADERS: [&str; 7] = [
    "Upgrade",
    "Keep-Alive",
    "TE",
    "Trailer",
    "Proxy-Authorization",
    "proxy-connection",
    "CONNECTION",
];

/// Paths with bytes that are not valid in an origin-form request target (RFC 3986 pchar, '/',
/// '?' and %XX), outside `{{ ... }}` templates.
const BAD_PATHS: [(&str, &str); 7] = [
    ("a path with a space", "/orders/ 1"),
    (
        "a path with CR LF (request splitting)",
        "/orders/1 HTTP/1.1\r\nHost: evil",
    ),
    ("a path with a fragment", "/orders#fragment"),
    ("a path with non-ASCII letters", "/orders/\u{e9}t\u{e9}"),
    ("a path with a broken %-escape", "/orders/%zz"),
    ("a path with '<' and '>'", "/orders/<1>"),
    (
        "a path with a brace outside a template",
        "/orders/{{ input.orderId }}/{x}",
    ),
];
