//! The Helm chart: lint, render with default and non-default values, refuse bad values through
//! values.schema.json, carry exactly the CRDs in crds/, and install into the real test bed.
//!
//! helm is built from its Go module by scripts/helm.sh on first use (cached).

use std::{path::PathBuf, process::Command};

use anyhow::{Context, bail, ensure};
use sagamesh_testing::{repo_root, test_bed};
use serde_json::Value;

fn helm(args: &[&str]) -> anyhow::Result<std::process::Output> {
    let root = repo_root();
    Command::new(root.join("scripts/helm.sh"))
        .args(args)
        .current_dir(&root)
        .output()
        .context("running scripts/helm.sh")
}

fn chart() -> String {
    repo_root()
        .join("charts/sagamesh")
        .to_string_lossy()
        .into_owned()
}

/// Splits a multi-document YAML stream into JSON values (empty documents dropped).
fn documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in yaml.split("\n---") {
        let body: String = doc
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        if body.trim().is_empty() {
            continue;
        }
        let value: Value = serde_saphyr::from_str(&body)
            .with_context(|| format!("parsing rendered YAML:\n{body}"))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn render(extra: &[&str]) -> anyhow::Result<Vec<Value>> {
    let chart = chart();
    let mut args = vec![
        "template",
        "sm",
        chart.as_str(),
        "--namespace",
        "sagamesh-system",
    ];
    args.extend_from_slice(extra);
    let out = helm(&args)?;
    ensure!(
        out.status.success(),
        "helm template {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    documents(&String::from_utf8_lossy(&out.stdout))
}

fn kinds(docs: &[Value]) -> Vec<String> {
    let mut kinds: Vec<_> = docs
        .iter()
        .filter_map(|d| d["kind"].as_str().map(str::to_string))
        .collect();
    kinds.sort();
    kinds
}

fn find<'a>(docs: &'a [Value], kind: &str) -> anyhow::Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .with_context(|| format!("no {kind} rendered"))
}

#[test]
fn helm_lint_passes() -> anyhow::Result<()> {
    let out = helm(&["lint", "--strict", &chart()])?;
    ensure!(
        out.status.success(),
        "helm lint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn renders_with_default_values() -> anyhow::Result<()> {
    let docs = render(&[])?;
    ensure!(
        kinds(&docs)
            == [
                "ClusterRole",
                "ClusterRoleBinding",
                "CustomResourceDefinition",
                "CustomResourceDefinition",
                "Deployment",
                "MutatingWebhookConfiguration",
                "PodDisruptionBudget",
                "Role",
                "RoleBinding",
                "Service",
                "Service",
                "ServiceAccount"
            ],
        "kinds: {:?}",
        kinds(&docs)
    );
    let deployment = find(&docs, "Deployment")?;
    let pod = &deployment["spec"]["template"]["spec"];
    ensure!(deployment["spec"]["replicas"] == 2);
    ensure!(pod["securityContext"]["runAsNonRoot"] == true);
    ensure!(pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault");
    let container = &pod["containers"][0];
    ensure!(container["securityContext"]["readOnlyRootFilesystem"] == true);
    ensure!(container["securityContext"]["allowPrivilegeEscalation"] == false);
    ensure!(container["securityContext"]["capabilities"]["drop"] == serde_json::json!(["ALL"]));
    ensure!(
        pod["affinity"]["podAntiAffinity"].is_object(),
        "anti-affinity by default"
    );
    let webhook = &find(&docs, "MutatingWebhookConfiguration")?["webhooks"][0];
    ensure!(webhook["failurePolicy"] == "Fail");
    ensure!(webhook["namespaceSelector"]["matchLabels"]["sagamesh.io/inject"] == "enabled");
    for crd in docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
    {
        ensure!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep",
            "crds.keep by default"
        );
    }
    Ok(())
}

#[test]
fn renders_with_non_default_values() -> anyhow::Result<()> {
    let docs = render(&[
        "--set",
        "operator.replicas=3",
        "--set",
        "webhook.failurePolicy=Ignore",
        "--set",
        "webhook.certManager.enabled=true",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "crds.keep=false",
        "--set",
        "operator.podDisruptionBudget.enabled=false",
        "--set",
        "operator.image.tag=v9.9.9",
        "--set",
        "operator.spreadOverNodes=false",
    ])?;
    let kinds = kinds(&docs);
    ensure!(
        kinds.contains(&"Certificate".to_string()) && kinds.contains(&"Issuer".to_string()),
        "{kinds:?}"
    );
    ensure!(kinds.contains(&"ServiceMonitor".to_string()), "{kinds:?}");
    ensure!(
        !kinds.contains(&"PodDisruptionBudget".to_string()),
        "{kinds:?}"
    );
    let deployment = find(&docs, "Deployment")?;
    ensure!(deployment["spec"]["replicas"] == 3);
    let pod = &deployment["spec"]["template"]["spec"];
    ensure!(pod["containers"][0]["image"] == "ghcr.io/sagamesh/operator:v9.9.9");
    ensure!(pod["affinity"].is_null());
    let webhook = find(&docs, "MutatingWebhookConfiguration")?;
    ensure!(webhook["webhooks"][0]["failurePolicy"] == "Ignore");
    ensure!(
        webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
            == "sagamesh-system/sm-sagamesh-injector"
    );
    for crd in docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
    {
        ensure!(
            crd["metadata"]["annotations"]
                .get("helm.sh/resource-policy")
                .is_none()
        );
    }
    let docs = render(&[
        "--set",
        "crds.enabled=false",
        "--set",
        "webhook.enabled=false",
    ])?;
    let minimal = self::kinds(&docs);
    ensure!(
        !minimal
            .iter()
            .any(|k| k == "CustomResourceDefinition" || k == "MutatingWebhookConfiguration"),
        "{minimal:?}"
    );
    Ok(())
}

#[test]
fn bad_values_are_refused_by_the_schema() -> anyhow::Result<()> {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--set-string", "operator.replicas=two"],
            "/operator/replicas",
        ),
        (&["--set", "operator.replicas=0"], "/operator/replicas"),
        (
            &["--set", "webhook.failurePolicy=Sometimes"],
            "/webhook/failurePolicy",
        ),
        (
            &["--set", "webhook.timeoutSeconds=60"],
            "/webhook/timeoutSeconds",
        ),
        (
            &["--set", "operator.image.pullPolicy=Sometimes"],
            "/operator/image/pullPolicy",
        ),
        (&["--set", "operatr.replicas=2"], "operatr"),
        (&["--set", "operator.logFormat=xml"], "/operator/logFormat"),
        (
            &["--set", "serviceMonitor.interval=often"],
            "/serviceMonitor/interval",
        ),
    ];
    let chart = chart();
    for (set, field) in cases {
        let mut args = vec!["template", "sm", chart.as_str()];
        args.extend_from_slice(set);
        let out = helm(&args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{set:?} was accepted");
        ensure!(
            stderr.contains(field),
            "{set:?}: the error does not name {field}: {stderr}"
        );
    }
    Ok(())
}

/// Helm's YAML round trip writes `minimum: 0.0` as `0`; compare numbers by value.
fn numbers_as_floats(value: &Value) -> Value {
    match value {
        Value::Number(n) => n.as_f64().map(Value::from).unwrap_or(Value::Null),
        Value::Array(items) => Value::Array(items.iter().map(numbers_as_floats).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), numbers_as_floats(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[test]
fn chart_crds_are_the_generated_crds() -> anyhow::Result<()> {
    let docs = render(&[])?;
    let rendered: Vec<_> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .collect();
    ensure!(rendered.len() == 2);
    for file in [
        "sagas.sagamesh.io.yaml",
        "serviceregistrations.sagamesh.io.yaml",
    ] {
        let path: PathBuf = repo_root().join("crds").join(file);
        let expected: Value = serde_saphyr::from_str(&std::fs::read_to_string(&path)?)?;
        let name = &expected["metadata"]["name"];
        let Some(actual) = rendered.iter().find(|d| &d["metadata"]["name"] == name) else {
            bail!("chart lacks {name}");
        };
        ensure!(
            numbers_as_floats(&actual["spec"]) == numbers_as_floats(&expected["spec"]),
            "{name}: the chart's CRD spec differs from crds/{file}"
        );
    }
    Ok(())
}

/// `helm install` into the real API server: every object is accepted. CRDs are installed by
/// the other tests already (kubectl apply), so the release leaves them out and the chart's CRDs
/// are checked with a server-side dry run instead.
#[tokio::test]
async fn helm_install_into_the_test_bed() {
    let Some(bed) = test_bed("helm_install_into_the_test_bed").await else {
        return;
    };
    bed.install_crds().await.expect("CRDs install");
    let kubeconfig = bed.kubeconfig.to_string_lossy().into_owned();
    let bed2 = bed.clone();
    bed.with_namespace("helm-install", move |_client, ns| async move {
        let release = format!("r{}", &ns[ns.len().saturating_sub(6)..]);
        let chart = chart();
        let out = helm(&[
            "install",
            &release,
            &chart,
            "--namespace",
            &ns,
            "--kubeconfig",
            &kubeconfig,
            "--set",
            "crds.enabled=false",
            "--timeout",
            "60s",
        ])?;
        ensure!(
            out.status.success(),
            "helm install: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let notes = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            notes.contains("sagamesh.io/inject=enabled"),
            "NOTES tell the next step: {notes}"
        );

        let operator = format!("{release}-sagamesh-operator");
        for (kind, name, namespaced) in [
            ("deployment", operator.as_str(), true),
            ("serviceaccount", operator.as_str(), true),
            ("role", operator.as_str(), true),
            ("rolebinding", operator.as_str(), true),
            ("service", operator.as_str(), true),
            ("poddisruptionbudget", operator.as_str(), true),
            ("clusterrole", operator.as_str(), false),
            ("clusterrolebinding", operator.as_str(), false),
            (
                "mutatingwebhookconfiguration",
                &format!("{release}-sagamesh-injector"),
                false,
            ),
        ] {
            let mut args = vec!["get", kind, name];
            if namespaced {
                args.extend(["-n", ns.as_str()]);
            }
            let out = bed2.kubectl(&args)?;
            ensure!(
                out.status.success(),
                "{kind}/{name} missing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        // The chart's CRDs are accepted by the API server as rendered.
        let out = helm(&[
            "template",
            &release,
            &chart,
            "--namespace",
            &ns,
            "--show-only",
            "templates/crds.yaml",
        ])?;
        ensure!(out.status.success());
        let crds_file = std::env::temp_dir().join(format!("{release}-crds.yaml"));
        std::fs::write(&crds_file, &out.stdout)?;
        let out = bed2.kubectl(&[
            "apply",
            "--dry-run=server",
            "-f",
            &crds_file.to_string_lossy(),
        ])?;
        let _ = std::fs::remove_file(&crds_file);
        ensure!(
            out.status.success(),
            "server dry-run of the chart CRDs: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let out = helm(&[
            "uninstall",
            &release,
            "--namespace",
            &ns,
            "--kubeconfig",
            &kubeconfig,
        ])?;
        ensure!(
            out.status.success(),
            "helm uninstall: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = bed2.kubectl(&["get", "clusterrole", &operator])?;
        ensure!(
            !out.status.success(),
            "uninstall removes cluster-scoped objects too"
        );
        Ok(())
    })
    .await;
}
