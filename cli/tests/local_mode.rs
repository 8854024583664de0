//! Local mode as a user runs it: real processes from the `sagamesh` binary.
//!
//! - The demo exits 0 and its reports show balanced shares, the ejection, one Succeeded and one
//!   Compensated saga with compensations in reverse order.
//! - `sagamesh local` killed with SIGKILL mid-saga and restarted: the saga resumes from disk and
//!   ends terminal with no duplicated effect; a malformed manifest is reported with file, line
//!   and field while the others keep working.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sagamesh_testing::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_sagamesh");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], log: &Path) -> Proc {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    Proc(
        Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("sagamesh starts"),
    )
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sagamesh-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

fn saga_json(state: &Path, name: &str) -> Option<serde_json::Value> {
    let out = Command::new(BIN)
        .args([
            "saga",
            "get",
            name,
            "-n",
            "shop",
            "-o",
            "json",
            "--state",
            &state.to_string_lossy(),
        ])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

#[test]
fn the_demo_passes_and_reports_what_happened() {
    let dir = temp_dir("demo");
    let out = Command::new(BIN)
        .args([
            "demo",
            "--dir",
            &dir.to_string_lossy(),
            "--requests",
            "300",
            "--kill-phase-seconds",
            "4",
        ])
        .env("NO_COLOR", "1")
        .output()
        .expect("demo runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "users-1    100        33.3%",
        "ejected by the client's circuit breaker",
        "Saga shop/order-1001   phase Succeeded",
        "Saga shop/order-1002   phase Compensated",
        "compensated: reserve-stock then create-order",
        "demo passed",
    ] {
        assert!(
            text.contains(expected),
            "the report lacks {expected:?}:\n{text}"
        );
    }
    let html = std::fs::read_to_string(dir.join("report.html")).expect("HTML report written");
    assert!(
        html.contains("6 of 6 checks passed") && html.contains("<svg"),
        "HTML report incomplete"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_local_control_plane_resumes_its_sagas_from_disk() {
    let dir = temp_dir("kill");
    let (manifests, state, logs) = (dir.join("manifests"), dir.join("state"), dir.join("logs"));
    for d in [&manifests, &state, &logs] {
        std::fs::create_dir_all(d).expect("dir");
    }
    // Real example services; inventory is slow, so the control plane dies mid-step.
    let mut services = Vec::new();
    let mut registrations = Vec::new();
    for (role, extra) in [
        ("orders", vec![]),
        ("inventory", vec!["--delay-ms", "1500"]),
        ("payment", vec![]),
    ] {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["shop-service", "--role", role, "--listen", &listen];
        args.extend(extra);
        services.push((role, port, spawn(&args, &logs.join(format!("{role}.log")))));
        registrations.push(format!(
            "apiVersion: sagamesh.io/v1alpha1\nkind: ServiceRegistration\nmetadata:\n  name: {role}\n  namespace: shop\nspec:\n  endpoints:\n    - address: 127.0.0.1\n      port: {port}\n  ports:\n    - name: http\n      port: 8080\n"
        ));
    }
    std::fs::write(manifests.join("services.yaml"), registrations.join("---\n")).expect("write");
    std::fs::write(
        manifests.join("order.yaml"),
        r#"apiVersion: sagamesh.io/v1alpha1
kind: Saga
metadata:
  name: order-7
  namespace: shop
spec:
  input: { orderId: "7", amount: 20 }
  steps:
    - name: create-order
      action: { service: orders, path: /orders, body: { orderId: "{{ input.orderId }}" } }
      compensation: { service: orders, method: DELETE, path: "/orders/by-id/{{ input.orderId }}" }
    - name: reserve-stock
      action: { service: inventory, path: /reservations, body: { order: "{{ input.orderId }}" } }
      compensation: { service: inventory, method: DELETE, path: "/reservations/by-order/{{ input.orderId }}" }
    - name: charge
      action: { service: payment, path: /charges, body: { amount: "{{ input.amount }}" } }
"#,
    )
    .expect("write");
    // A malformed manifest next to them.
    std::fs::write(manifests.join("bad.yaml"), "apiVersion: sagamesh.io/v1alpha1\nkind: ServiceRegistration\nmetadata:\n  name: bad\nspec:\n  ports:\n    - name: http\n      port: 0\n  endpoints:\n    - address: 127.0.0.1\n      port: 9\n").expect("write");
    for (_, port, _) in &services {
        wait_until("an example service", Duration::from_secs(20), || {
            get(*port, "/healthz").is_some()
        });
    }

    let local_args = |discovery: u16, admin: u16| {
        vec![
            "local".to_string(),
            "--manifests".into(),
            manifests.to_string_lossy().into_owned(),
            "--state".into(),
            state.to_string_lossy().into_owned(),
            "--poll".into(),
            "100ms".into(),
            "--discovery-addr".into(),
            format!("127.0.0.1:{discovery}"),
            "--admin-addr".into(),
            format!("127.0.0.1:{admin}"),
        ]
    };
    let first_log = logs.join("local-1.log");
    let args = local_args(free_port(), free_port());
    let mut control_plane = spawn(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &first_log,
    );
    wait_until(
        "the saga to be in its slow step",
        Duration::from_secs(20),
        || saga_json(&state, "order-7").is_some_and(|s| s["currentStep"] == "reserve-stock"),
    );
    // SIGKILL mid-step: no chance to write anything.
    control_plane.0.kill().expect("SIGKILL");
    let _ = control_plane.0.wait();
    let log = std::fs::read_to_string(&first_log).expect("log");
    assert!(
        log.contains("bad.yaml") && log.contains("spec.ports[0].port"),
        "the bad manifest is reported with file and field:\n{log}"
    );
    assert!(log.contains("line=8"), "and its line:\n{log}");

    let admin = free_port();
    let args = local_args(free_port(), admin);
    let _control_plane = spawn(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &logs.join("local-2.log"),
    );
    wait_until(
        "the resumed saga to succeed",
        Duration::from_secs(30),
        || saga_json(&state, "order-7").is_some_and(|s| s["phase"] == "Succeeded"),
    );
    // The saga's calls are on the control plane's /metrics, under the sidecar's names.
    let metrics = get(admin, "/metrics").expect("/metrics answers");
    let payment_port = services
        .iter()
        .find(|(role, _, _)| *role == "payment")
        .map(|(_, port, _)| *port)
        .expect("payment");
    for series in [
        "sagamesh_requests_total{direction=\"outbound\",destination=\"payment.shop\",status_class=\"2xx\",error=\"\"} 1".to_string(),
        format!("sagamesh_endpoint_attempts_total{{destination=\"payment.shop\",endpoint=\"127.0.0.1:{payment_port}\",outcome=\"success\"}} 1"),
        "sagamesh_operator_discovery_watchers 0".to_string(),
    ] {
        assert!(metrics.contains(&series), "{series} missing from\n{metrics}");
    }
    for (role, port, _) in &services {
        let effects: serde_json::Value =
            serde_json::from_str(&get(*port, "/debug/effects").expect("effects")).expect("json");
        let effects = effects["effects"].as_object().cloned().unwrap_or_default();
        assert_eq!(effects.len(), 1, "{role}: one effect: {effects:?}");
        assert!(
            effects.values().all(|n| n == 1),
            "{role}: no key applied twice: {effects:?}"
        );
    }
    let list = Command::new(BIN)
        .args(["saga", "list", "--state", &state.to_string_lossy()])
        .env("NO_COLOR", "1")
        .output()
        .expect("saga list");
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("NAMESPACE   NAME      PHASE       STEP   AGE")
            && text.contains("shop        order-7   Succeeded"),
        "{text}"
    );
    drop(services);
    let _ = std::fs::remove_dir_all(&dir);
}
