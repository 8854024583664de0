//! `deploy/rbac/operator-rbac.yaml` (what the operator is tested with) against the Helm chart's
//! RBAC as rendered: the chart grants exactly those rules (plus the webhook's, each limited to
//! its one object), so a `helm install` gives the operator what the tests proved it needs and
//! no more.

mod common;

use anyhow::{Context, ensure};
use serde_json::Value;

/// (apiGroup, resource, verb, resourceName or "") for every rule.
fn grants(rules: &[Value]) -> Vec<(String, String, String, String)> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for rule in rules {
        let names = strings(&rule["resourceNames"]);
        let names = if names.is_empty() {
            vec![String::new()]
        } else {
            names
        };
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for v in strings(&rule["verbs"]) {
                    for n in &names {
                        out.push((g.clone(), r.clone(), v.clone(), n.clone()));
                    }
                }
            }
        }
    }
    out
}

/// (apiGroup, resource, verb, resourceName or "").
type Grant = (String, String, String, String);

/// The chart's RBAC as `helm template` renders it (release `sagamesh`, so its names are the ones
/// deploy/rbac uses): every ClusterRole and Role rule as grants.
fn chart_grants(extra: &[&str]) -> anyhow::Result<Vec<(&'static str, Vec<Grant>)>> {
    let root = common::repo_root();
    let mut args = vec![
        "template",
        "sagamesh",
        "charts/sagamesh",
        "--namespace",
        "sagamesh-system",
        "--show-only",
        "templates/operator-rbac.yaml",
    ];
    args.extend_from_slice(extra);
    let out = std::process::Command::new(root.join("scripts/helm.sh"))
        .args(&args)
        .current_dir(&root)
        .output()
        .context("running scripts/helm.sh")?;
    ensure!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut result = Vec::new();
    for doc in text.split("\n---") {
        let doc: Value = match serde_saphyr::from_str(doc) {
            Ok(doc) => doc,
            Err(_) => continue,
        };
        for kind in ["ClusterRole", "Role"] {
            if doc["kind"] == kind {
                let mut g = grants(
                    doc["rules"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default(),
                );
                g.sort();
                result.push((kind, g));
            }
        }
    }
    Ok(result)
}

fn deploy_grants(kind: &str) -> anyhow::Result<Vec<Grant>> {
    let docs = common::rbac_documents()?;
    let doc = docs
        .iter()
        .find(|d| d["kind"] == kind)
        .with_context(|| format!("no {kind} in deploy/rbac"))?;
    let mut g = grants(
        doc["rules"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default(),
    );
    g.sort();
    Ok(g)
}

fn grant(group: &str, resource: &str, verb: &str, name: &str) -> Grant {
    (group.into(), resource.into(), verb.into(), name.into())
}

#[test]
fn the_chart_grants_exactly_what_the_operator_is_tested_with() -> anyhow::Result<()> {
    // Without the webhook: the very rules the integration tests run the operator with.
    for (kind, chart) in chart_grants(&["--set", "webhook.enabled=false"])? {
        let ours = deploy_grants(kind)?;
        ensure!(
            chart == ours,
            "the chart's {kind} differs from deploy/rbac:\nchart: {chart:?}\ndeploy: {ours:?}"
        );
    }
    // With the webhook (the default): plus its configuration's CA bundle and its certificate
    // Secret, each limited to its one object.
    for (kind, chart) in chart_grants(&[])? {
        let mut expected = deploy_grants(kind)?;
        if kind == "ClusterRole" {
            for verb in ["get", "patch"] {
                expected.push(grant(
                    "admissionregistration.k8s.io",
                    "mutatingwebhookconfigurations",
                    verb,
                    "sagamesh-injector",
                ));
            }
        } else {
            expected.push(grant("", "secrets", "create", ""));
            for verb in ["get", "update"] {
                expected.push(grant("", "secrets", verb, "sagamesh-injector-tls"));
            }
        }
        expected.sort();
        ensure!(
            chart == expected,
            "the chart's {kind} with the webhook:\nchart: {chart:?}\nexpected: {expected:?}"
        );
    }
    Ok(())
}

#[test]
fn the_manifest_grants_no_write_on_pods_or_secrets_and_no_wildcards() -> anyhow::Result<()> {
    for doc in common::rbac_documents()? {
        let rules = doc["rules"].as_array().cloned().unwrap_or_default();
        for (g, r, v, _) in grants(&rules) {
            ensure!(g != "*" && r != "*" && v != "*", "wildcard in {g}/{r}/{v}");
            ensure!(
                r != "secrets",
                "the operator needs no secrets (yet): {v} {r}"
            );
            if r == "pods"
                || r == "services"
                || r == "endpointslices"
                || r == "serviceregistrations"
            {
                ensure!(
                    v == "list" || v == "watch",
                    "{r} must be read-only, found {v}"
                );
            }
        }
    }
    Ok(())
}
