//! `deploy/rbac/operator-rbac.yaml` (what the operator is tested with) against the Helm chart's
//! RBAC rules: every permission the operator needs must be granted by the chart too, or a
//! `helm install` would give an operator that fails where the tests passed.

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

fn covered(
    need: &(String, String, String, String),
    granted: &[(String, String, String, String)],
) -> bool {
    granted.iter().any(|(g, r, v, n)| {
        g == &need.0 && r == &need.1 && (v == &need.2 || v == "*") && (n.is_empty() || n == &need.3)
    })
}

#[test]
fn the_chart_grants_everything_the_operator_is_tested_with() -> anyhow::Result<()> {
    let docs = common::rbac_documents()?;
    let chart = common::repo_root().join("charts/sagamesh/files/rbac");
    let read = |name: &str| -> anyhow::Result<Vec<Value>> {
        let text = std::fs::read_to_string(chart.join(name))
            .with_context(|| format!("reading the chart's {name}"))?;
        serde_saphyr::from_str(&text).with_context(|| format!("parsing the chart's {name}"))
    };
    for (kind, chart_file) in [
        ("ClusterRole", "cluster-rules.yaml"),
        ("Role", "namespace-rules.yaml"),
    ] {
        let ours = docs
            .iter()
            .find(|d| d["kind"] == kind)
            .with_context(|| format!("no {kind} in deploy/rbac"))?;
        let ours = grants(
            ours["rules"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default(),
        );
        let theirs = grants(&read(chart_file)?);
        let missing: Vec<_> = ours.iter().filter(|n| !covered(n, &theirs)).collect();
        ensure!(
            missing.is_empty(),
            "the chart's {chart_file} lacks {missing:?}"
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
