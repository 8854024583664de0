//! The example services as real processes: idempotent effects, declines, shared state between
//! two instances.

use std::{
    process::{Child, Command},
    time::Duration,
};

use sagamesh_testing::free_port;
use serde_json::{Value, json};

struct Instance {
    child: Child,
    url: String,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(role: &str, extra: &[&str]) -> Instance {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shop-service"))
        .args(["--role", role, "--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .spawn()
        .expect("shop-service starts");
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Instance { child, url };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("{role} did not listen on {port}");
}

/// A minimal blocking HTTP/1.1 client (curl is not assumed).
fn call(method: &str, url: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = std::net::TcpStream::connect(host).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let key = key
        .map(|k| format!("Idempotency-Key: {k}\r\n"))
        .unwrap_or_default();
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{key}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response[9..12].parse().expect("status");
    let (_, json) = response.split_once("\r\n\r\n").expect("body");
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

#[test]
fn a_repeated_idempotency_key_takes_effect_once() {
    let orders = start("orders", &[]);
    let first = call(
        "POST",
        &format!("{}/orders", orders.url),
        Some("k1"),
        Some(json!({"orderId": "42"})),
    );
    let again = call(
        "POST",
        &format!("{}/orders", orders.url),
        Some("k1"),
        Some(json!({"orderId": "42"})),
    );
    assert_eq!(first.0, 201);
    assert_eq!(first, again);
    let other = call(
        "POST",
        &format!("{}/orders", orders.url),
        Some("k2"),
        Some(json!({"orderId": "43"})),
    );
    assert_ne!(other.1["id"], first.1["id"]);
    let effects = call("GET", &format!("{}/debug/effects", orders.url), None, None).1;
    assert_eq!(effects["effects"], json!({"k1": 1, "k2": 1}));
    let id = first.1["id"].as_str().expect("id");
    let cancelled = call(
        "DELETE",
        &format!("{}/orders/{id}", orders.url),
        Some("k3"),
        None,
    );
    assert_eq!(
        (cancelled.0, &cancelled.1["status"]),
        (200, &json!("cancelled"))
    );
}

#[test]
fn payments_above_the_limit_are_declined_without_effect() {
    let payment = start("payment", &["--decline-over", "100"]);
    let declined = call(
        "POST",
        &format!("{}/charges", payment.url),
        Some("c1"),
        Some(json!({"amount": 250})),
    );
    assert_eq!(declined.0, 402);
    let charged = call(
        "POST",
        &format!("{}/charges", payment.url),
        Some("c2"),
        Some(json!({"amount": 50})),
    );
    assert_eq!(charged.0, 201);
    let refund = call(
        "POST",
        &format!("{}/refunds", payment.url),
        Some("r1"),
        Some(json!({"charge": charged.1["id"]})),
    );
    assert_eq!(refund.1["status"], "refunded");
    let effects = call("GET", &format!("{}/debug/effects", payment.url), None, None).1;
    assert_eq!(effects["effects"], json!({"c2": 1, "r1": 1}));
}

#[test]
fn instances_share_state_through_the_state_file() {
    let state = std::env::temp_dir().join(format!("shop-state-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&state);
    let path = state.to_string_lossy().into_owned();
    let a = start("inventory", &["--state-file", &path, "--instance", "inv-a"]);
    let b = start("inventory", &["--state-file", &path, "--instance", "inv-b"]);
    let made = call(
        "POST",
        &format!("{}/reservations", a.url),
        Some("res-1"),
        Some(json!({"order": "o1", "sku": "apple", "qty": 2})),
    );
    assert_eq!(made.1["instance"], "inv-a");
    // The same key at the other instance: the first answer, no second effect.
    let retried = call(
        "POST",
        &format!("{}/reservations", b.url),
        Some("res-1"),
        Some(json!({"order": "o1"})),
    );
    assert_eq!(retried.1["id"], made.1["id"]);
    assert_eq!(retried.1["instance"], "inv-b");
    let released = call(
        "DELETE",
        &format!("{}/reservations/by-order/o1", b.url),
        Some("rel-1"),
        None,
    );
    assert_eq!(released.1["released"], json!([made.1["id"]]));
    let _ = std::fs::remove_file(&state);
}
