//! The workspace's seams hold: the data plane compiles no Kubernetes client, the saga engine
//! knows neither the mesh, discovery, Kubernetes' client nor an HTTP stack, local mode and the
//! CLI run without the operator. Read from
//! `cargo tree` (normal and build dependencies, from Cargo.lock; it may fetch the manifests of
//! packages for other platforms that a build on this one never downloaded).

use std::collections::BTreeSet;
use std::process::Command;

/// Every package in `package`'s dependency tree (itself included).
fn tree(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "tree",
            "--locked",
            "-p",
            package,
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn assert_absent(package: &str, forbidden: &[&str]) {
    let deps = tree(package);
    assert!(deps.contains(package), "{package} is not in its own tree");
    let found: Vec<_> = forbidden.iter().filter(|f| deps.contains(**f)).collect();
    assert!(found.is_empty(), "{package} depends on {found:?}");
}

#[test]
fn the_data_plane_compiles_no_kubernetes_client() {
    for package in [
        "sagamesh-sidecar",
        "sagamesh-mesh",
        "sagamesh-discovery",
        "sagamesh-api",
        // Local mode runs without a cluster: it needs kube-core's CRD types only.
        "sagamesh-local",
        "sagamesh",
    ] {
        assert_absent(
            package,
            &["kube-client", "kube-runtime", "sagamesh-operator"],
        );
    }
}

/// The manifest validator (jsonschema, kube-cel, the YAML parser) is for local mode and the
/// checker program the sidecar's `--manifests` runs as a child: the sidecar, the mesh library,
/// discovery and the control plane do without it.
#[test]
fn only_manifest_readers_compile_the_validator() {
    for package in [
        "sagamesh-sidecar",
        "sagamesh-mesh",
        "sagamesh-discovery",
        "sagamesh-saga-mesh",
    ] {
        assert_absent(package, &["sagamesh-manifest", "kube-cel", "jsonschema"]);
    }
}

#[test]
fn the_saga_engine_knows_neither_the_mesh_nor_discovery_nor_kubernetes_nor_http() {
    assert_absent(
        "sagamesh-saga",
        &[
            "sagamesh-mesh",
            "sagamesh-discovery",
            "sagamesh-sidecar",
            "kube-client",
            "kube-runtime",
            "hyper",
            "h2",
            "tonic",
        ],
    );
}

#[test]
fn local_mode_and_the_cli_run_without_the_operator() {
    assert_absent("sagamesh-local", &["sagamesh-operator", "sagamesh-sidecar"]);
    assert_absent("sagamesh", &["sagamesh-operator"]);
}
