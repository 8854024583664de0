//! `sagamesh-manifest-check` as a program: its human output, and its JSON reports read by the
//! sidecar's file discovery through a real child process.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sagamesh_discovery::Discover;
use sagamesh_discovery::file::{CHECKER_TIMEOUT, FileDiscovery, ManifestChecker};
use sagamesh_discovery::name::ServiceKey;

const BIN: &str = env!("CARGO_BIN_EXE_sagamesh-manifest-check");

const GOOD: &str = r#"
apiVersion: sagamesh.io/v1alpha1
kind: ServiceRegistration
metadata: {name: orders, namespace: shop}
spec:
  endpoints:
    - {address: 127.0.0.2, port: 8080, weight: 2}
  ports: [{name: http, port: 80}]
  loadBalancer: {policy: RoundRobin}
---
apiVersion: sagamesh.io/v1alpha1
kind: Saga
metadata: {name: ignored}
spec:
  steps:
    - {name: create, action: {service: orders, path: /orders}}
---
apiVersion: sagamesh.io/v1alpha1
kind: ServiceRegistration
metadata: {name: payments}
spec:
  endpoints: [{address: 127.0.0.3, port: 9090}]
  ports: [{name: grpc, port: 90, protocol: GRPC}]
"#;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sagamesh-check-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

#[test]
fn names_each_problem_with_file_line_and_field_and_fails() {
    let dir = temp_dir("human");
    std::fs::write(dir.join("good.yaml"), GOOD).expect("write");
    std::fs::write(
        dir.join("bad.yml"),
        GOOD.replace("port: 8080, weight: 2", "port: 99999, weight: 2"),
    )
    .expect("write");
    std::fs::write(dir.join("notes.txt"), "not a manifest").expect("write");

    let out = Command::new(BIN).arg(&dir).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    let expected = format!(
        "{}:7: spec.endpoints[0].port: ",
        dir.join("bad.yml").display()
    );
    assert!(stderr.starts_with(&expected), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stdout.contains("2 file(s): 2 ServiceRegistration(s) valid, 1 problem(s)"),
        "{stdout}"
    );

    let out = Command::new(BIN)
        .arg(dir.join("good.yaml"))
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");

    let out = Command::new(BIN).output().expect("run without paths");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// What `sagamesh local` refuses, the sidecar refuses, with the same file, line and field: both
/// go through the one loader, the sidecar through the checker program.
#[tokio::test]
async fn file_discovery_through_the_checker_program_refuses_what_local_mode_refuses() {
    let dir = temp_dir("discovery");
    let file = dir.join("m.yaml");
    std::fs::write(&file, GOOD).expect("write");
    let checker = ManifestChecker::command(BIN, CHECKER_TIMEOUT);
    let d =
        FileDiscovery::spawn(&dir, "default", Duration::from_secs(3600), checker).expect("checked");
    let snapshot = |key: ServiceKey| {
        d.watch(&key)
            .borrow()
            .to_update()
            .and_then(|u| u.kind)
            .map(|k| format!("{k:?}"))
            .unwrap_or_default()
    };
    assert!(snapshot(ServiceKey::new("shop", "orders")).contains("127.0.0.2"));
    assert!(snapshot(ServiceKey::new("default", "payments")).contains("127.0.0.3"));
    assert!(d.errors().is_empty(), "{:?}", d.errors());

    let bad_port = GOOD.replace("port: 8080, weight: 2", "port: 99999, weight: 2");
    std::fs::write(&file, &bad_port).expect("write");
    assert!(d.reload_if_changed());
    let local_mode = sagamesh_manifest::load_str(&file, &bad_port);
    assert_eq!(local_mode.errors.len(), 1, "{:?}", local_mode.errors);
    assert_eq!(
        d.errors().get(&file.display().to_string()),
        Some(&local_mode.errors[0].to_string()),
        "{:?}",
        d.errors()
    );
    // The last good content stays in use.
    assert!(snapshot(ServiceKey::new("shop", "orders")).contains("127.0.0.2"));

    // An invalid Saga refuses the file too, though discovery does not use Sagas; so does YAML
    // that does not parse.
    for (text, needle) in [
        (
            GOOD.replace("path: /orders", "path: orders"),
            "spec.steps[0].action.path",
        ),
        ("a: [".to_string(), "invalid YAML"),
    ] {
        std::fs::write(&file, &text).expect("write");
        assert!(d.reload_if_changed());
        let errors = d.errors();
        let e = errors
            .get(&file.display().to_string())
            .cloned()
            .unwrap_or_default();
        assert!(e.contains(needle), "{e}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn json_mode_reports_every_file_even_unreadable_ones() {
    let dir = temp_dir("json");
    let good = dir.join("good.yaml");
    std::fs::write(&good, GOOD).expect("write");
    let missing = dir.join("missing.yaml");
    let out = Command::new(BIN)
        .args(["--json", "--"])
        .args([&good, &missing])
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let reports: Vec<sagamesh_api::manifest_report::FileReport> =
        serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0].registrations.len(), 2);
    assert!(
        reports[1].problems[0].contains("cannot read"),
        "{reports:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
