//! Harness for integration tests against the real test bed (`scripts/testbed.sh`).
//!
//! - The test bed's kubeconfig comes from `SAGAMESH_TEST_KUBECONFIG` (`scripts/testbed.sh env`).
//! - When it is unset, [`test_bed`] prints a loud SKIPPED banner and returns `None`, so the test
//!   returns early; with `SAGAMESH_REQUIRE_TESTBED=1` (CI and `scripts/test.sh`) it panics
//!   instead, so a missing bed can never pass silently.
//! - [`TestBed::with_namespace`] runs a test body in a fresh namespace and deletes it afterwards,
//!   also when the body panics.

pub mod backend;
pub mod fixtures;
pub mod saga;
pub mod server;
pub mod shop;
pub mod stats;

use std::{
    future::Future,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, bail};
use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions},
};

/// Environment variable naming the test bed's kubeconfig.
pub const KUBECONFIG_ENV: &str = "SAGAMESH_TEST_KUBECONFIG";
/// When `1`, a missing test bed fails the test instead of skipping it.
pub const REQUIRE_ENV: &str = "SAGAMESH_REQUIRE_TESTBED";

/// A connection to the running test bed.
#[derive(Clone)]
pub struct TestBed {
    pub client: Client,
    pub kubeconfig: PathBuf,
}

/// Connects to the test bed, or returns `None` (after a loud banner on stderr) when
/// `SAGAMESH_TEST_KUBECONFIG` is unset. Panics when the bed is required but absent or unreachable.
pub async fn test_bed(test_name: &str) -> Option<TestBed> {
    let Some(path) = std::env::var_os(KUBECONFIG_ENV) else {
        if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
            panic!(
                "{test_name}: {REQUIRE_ENV}=1 but {KUBECONFIG_ENV} is unset; start the bed with \
                 `scripts/testbed.sh up` and `eval \"$(scripts/testbed.sh env)\"`"
            );
        }
        eprintln!(
            "\n*** SKIPPED {test_name}: {KUBECONFIG_ENV} is unset, so this integration test did NOT \
             run against a real kube-apiserver. Run `scripts/test.sh` (or `scripts/testbed.sh up` \
             and `eval \"$(scripts/testbed.sh env)\"`). ***\n"
        );
        return None;
    };
    let kubeconfig = PathBuf::from(path);
    match connect(&kubeconfig).await {
        Ok(client) => Some(TestBed { client, kubeconfig }),
        Err(e) => panic!(
            "{test_name}: cannot reach the test bed through {}: {e:#}",
            kubeconfig.display()
        ),
    }
}

/// Builds a client from a kubeconfig file.
pub async fn connect(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .context("loading kubeconfig")?;
    let client = Client::try_from(config).context("building client")?;
    client
        .apiserver_version()
        .await
        .context("asking the API server for its version")?;
    Ok(client)
}

/// The repository root (for `crds/`, `scripts/`, ...).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The manifest checker the sidecar runs for `--manifests` (another package's binary, which an
/// integration test does not get from cargo).
pub fn manifest_checker() -> PathBuf {
    workspace_bin("sagamesh-manifest", "sagamesh-manifest-check")
}

/// Binary `bin` of workspace package `package`, in this test's profile. `cargo test --workspace`
/// (scripts/test.sh) has built every package's binaries before any test runs; a test run of one
/// package builds it here once.
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // This test: <target>/<profile>/deps/<name>-<hash>.
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from <target>/<profile>/deps")
        .to_path_buf();
    let path = profile_dir.join(bin);
    let _one_build = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    if !path.is_file() {
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--profile",
                profile,
                "-p",
                package,
                "--bin",
                bin,
            ])
            .current_dir(repo_root())
            .status()
            .expect("running cargo build");
        assert!(
            status.success(),
            "cargo build -p {package} --bin {bin} failed"
        );
    }
    path
}

static NS_COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestBed {
    /// Runs `body` in a new namespace named after the test, then deletes the namespace, also
    /// when `body` fails or panics (the panic is re-raised after cleanup).
    pub async fn with_namespace<F, Fut>(&self, test_name: &str, body: F)
    where
        F: FnOnce(Client, String) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let ns = self
            .create_namespace(test_name)
            .await
            .unwrap_or_else(|e| panic!("{test_name}: creating namespace: {e:#}"));
        let outcome = tokio::spawn(body(self.client.clone(), ns.clone())).await;
        let cleanup = self.delete_namespace(&ns).await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{test_name} failed in namespace {ns}: {e:#}"),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(join) => panic!("{test_name}: test task was cancelled: {join}"),
        }
        if let Err(e) = cleanup {
            panic!("{test_name}: deleting namespace {ns}: {e:#}");
        }
    }

    async fn create_namespace(&self, test_name: &str) -> anyhow::Result<String> {
        let slug: String = test_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .trim_matches('-')
            .chars()
            .take(40)
            .collect();
        let unique = format!(
            "{:x}{:x}",
            std::process::id(),
            NS_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let name = format!("t-{}-{unique}", slug.trim_end_matches('-'));
        let api: Api<Namespace> = Api::all(self.client.clone());
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.clone());
        ns.metadata.labels = Some([("sagamesh.io/test".to_string(), "true".to_string())].into());
        api.create(&PostParams::default(), &ns).await?;
        Ok(name)
    }

    async fn delete_namespace(&self, name: &str) -> anyhow::Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Applies every CRD in `crds/` with `kubectl apply` and waits until each is Established.
    /// Tests in one process take turns; a race with another process creating the same CRD
    /// (AlreadyExists, Conflict) is retried.
    pub async fn install_crds(&self) -> anyhow::Result<()> {
        static INSTALL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _turn = INSTALL.lock().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let out =
                self.kubectl(&["apply", "-f", &repo_root().join("crds").to_string_lossy()])?;
            if out.status.success() {
                break;
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            let racing = stderr.contains("AlreadyExists") || stderr.contains("Conflict");
            if !racing || attempt >= 3 {
                bail!("kubectl apply -f crds/ failed: {stderr}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        for name in ["serviceregistrations.sagamesh.io", "sagas.sagamesh.io"] {
            tokio::time::timeout(
                Duration::from_secs(30),
                await_condition(crds.clone(), name, conditions::is_crd_established()),
            )
            .await
            .with_context(|| format!("CRD {name} did not become Established within 30s"))??;
        }
        Ok(())
    }

    /// Runs `kubectl` against the test bed.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .context("running kubectl (is it installed?)")
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released: fine for tests on one machine).
pub fn free_port() -> u16 {
    free_addr([127, 0, 0, 1]).port()
}

/// A free TCP address on `ip` (one of the 127.0.0.x loopback addresses), bound then released.
pub fn free_addr(ip: [u8; 4]) -> std::net::SocketAddr {
    std::net::TcpListener::bind(std::net::SocketAddr::from((ip, 0)))
        .and_then(|l| l.local_addr())
        .expect("a free port on loopback")
}

/// Polls `check` every 50ms until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates a pod, retrying for a few seconds while the namespace's `default` ServiceAccount
/// does not exist yet (the test bed's kube-controller-manager makes it just after the namespace).
pub async fn create_pod(
    client: &Client,
    namespace: &str,
    pod: &k8s_openapi::api::core::v1::Pod,
) -> kube::Result<k8s_openapi::api::core::v1::Pod> {
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    let mut tries = 0;
    loop {
        match api.create(&PostParams::default(), pod).await {
            Err(kube::Error::Api(e)) if e.message.contains("serviceaccount") && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}
