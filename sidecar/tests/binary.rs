//! The real `sagamesh-sidecar` binary: flags, readiness from a manifest file, and SIGTERM
//! draining an in-flight request before exiting 0.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use http::StatusCode;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        // Only the process this test started, by its handle.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn help_documents_flags_and_env() {
    let out = Command::new(env!("CARGO_BIN_EXE_sagamesh-sidecar"))
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--outbound-addr",
        "SAGAMESH_OUTBOUND_ADDR",
        "--manifests",
        "--discovery-addr",
        "--shutdown-grace",
        "--worker-threads",
        "SAGAMESH_WORKER_THREADS",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let backend = Backend::start("slow", [127, 0, 0, 1]);
    backend.set_delay(Duration::from_millis(1500));
    let dir = std::env::temp_dir().join(format!("sagamesh-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let manifest = dir.join("web.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: sagamesh.io/v1alpha1\nkind: ServiceRegistration\nmetadata: {{name: web}}\nspec:\n  endpoints: [{{address: \"127.0.0.1\", port: {}}}]\n  ports: [{{name: http, port: 80}}]\n",
            backend.addr.port()
        ),
    )
    .expect("manifest");
    let outbound = free_port([127, 0, 0, 1]);
    let admin = free_port([127, 0, 0, 1]);
    let child = Command::new(env!("CARGO_BIN_EXE_sagamesh-sidecar"))
        .args(["--manifests"])
        .arg(&manifest)
        .arg("--manifest-checker")
        .arg(sagamesh_testing::manifest_checker())
        .args(["--outbound-addr", &outbound.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--shutdown-grace", "10s", "--log-format", "json"])
        // The single-threaded runtime, as in the benchmark.
        .args(["--worker-threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let mut child = Child(child);
    let client = http_client();
    eventually("ready", || {
        let client = client.clone();
        async move {
            let req = http::Request::get(format!("http://{admin}/ready"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("req");
            matches!(client.request(req).await, Ok(r) if r.status() == StatusCode::OK)
        }
    })
    .await;

    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { get(&client, outbound, "web").await }
    });
    eventually("request reached the backend", || {
        let hits = backend.hits.clone();
        async move { hits.load(std::sync::atomic::Ordering::SeqCst) == 1 }
    })
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());

    let got = tokio::time::timeout(WAIT, in_flight)
        .await
        .expect("bounded")
        .expect("task");
    assert_eq!(
        got.status,
        StatusCode::OK,
        "the in-flight request finished: {got:?}"
    );
    assert_eq!(got.body, "slow");

    let deadline = std::time::Instant::now() + WAIT;
    let exit = loop {
        if let Some(s) = child.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sidecar did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exit.code(), Some(0), "exit status {exit:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
