//! The sidecar-injection webhook served by a running `sagamesh-operator` process (test mode:
//! the API server reaches it by URL on 127.0.0.1). The operator makes the certificate, stores it
//! in a Secret and patches the CA bundle into the MutatingWebhookConfiguration itself; then pods
//! in a labelled namespace come back with the native sidecar, others do not, and an injected
//! pod is never injected twice.

mod common;

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, ensure};
use common::free_port;
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Namespace, Pod, Secret},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use sagamesh_testing::{eventually, test_bed};
use serde_json::json;

struct Proc(Child, std::path::PathBuf);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            eprintln!(
                "operator log:\n{}",
                std::fs::read_to_string(&self.1).unwrap_or_default()
            );
        }
    }
}

fn pod(name: &str, labels: serde_json::Value) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "example/app", "ports": [{"containerPort": 8080}]}]}
    }))?)
}

async fn create(client: &Client, ns: &str, pod: &Pod) -> kube::Result<Pod> {
    sagamesh_testing::create_pod(client, ns, pod).await
}

fn sidecars(pod: &Pod) -> usize {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .map_or(0, |c| {
            c.iter()
                .filter(|c| {
                    c.name == "sagamesh-sidecar" && c.restart_policy.as_deref() == Some("Always")
                })
                .count()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_injects_the_native_sidecar_through_its_webhook() {
    let Some(bed) = test_bed("the_operator_injects_the_native_sidecar_through_its_webhook").await
    else {
        return;
    };
    bed.install_crds().await.expect("CRDs install");
    let kubeconfig = bed.kubeconfig.clone();
    bed.with_namespace("op-webhook", move |client, ns| async move {
        let port = free_port();
        let configuration = format!("{ns}-injector");
        let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        // As the chart installs it: no CA bundle yet; the operator writes it.
        configs
            .create(&PostParams::default(), &serde_json::from_value(json!({
                "metadata": {"name": configuration},
                "webhooks": [{
                    "name": "inject.sagamesh.io",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "failurePolicy": "Fail",
                    "reinvocationPolicy": "IfNeeded",
                    "clientConfig": {"url": format!("https://127.0.0.1:{port}/inject")},
                    "namespaceSelector": {"matchLabels": {"sagamesh.io/inject": "enabled", "sagamesh.io/test": ns}},
                    "objectSelector": {"matchExpressions": [{"key": "sagamesh.io/inject", "operator": "NotIn", "values": ["disabled"]}]},
                    "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}]
                }]
            }))?)
            .await?;

        let log = std::env::temp_dir().join(format!("sagamesh-operator-{ns}-webhook.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_sagamesh-operator"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--discovery-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--watch-namespace", &ns, "--lease-namespace", &ns, "--identity", "op-webhook"])
            .args(["--webhook-addr", &format!("127.0.0.1:{port}")])
            .args(["--webhook-configuration", &configuration, "--webhook-extra-san", "127.0.0.1"])
            .args(["--sidecar-image", "sagamesh/sidecar:test", "--sidecar-resources", r#"{"requests":{"cpu":"10m"}}"#])
            .env_remove("POD_NAME")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting sagamesh-operator")?;
        let _operator = Proc(child, log);

        // The operator made the certificate and wrote its CA into the configuration.
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let secret = eventually("the certificate Secret", Duration::from_secs(30), || async { secrets.get_opt("sagamesh-injector-tls").await.ok().flatten() }).await?;
        let ca = secret.data.as_ref().and_then(|d| d.get("ca.crt")).context("ca.crt in the Secret")?.clone();
        eventually("the CA bundle in the webhook configuration", Duration::from_secs(30), || async {
            let config = configs.get(&configuration).await.ok()?;
            config.webhooks?.iter().all(|w| w.client_config.ca_bundle.as_ref() == Some(&ca)).then_some(())
        })
        .await?;

        let namespaces: Api<Namespace> = Api::all(client.clone());
        let label = json!({"metadata": {"labels": {"sagamesh.io/inject": "enabled", "sagamesh.io/test": ns}}});
        namespaces.patch(&ns, &PatchParams::default(), &Patch::Merge(&label)).await?;
        let plain = format!("{ns}-plain");
        namespaces.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": plain}}))?).await?;

        let result = async {
            let injected = eventually("the webhook to inject", Duration::from_secs(30), || async {
                let _ = Api::<Pod>::namespaced(client.clone(), &ns).delete("web", &DeleteParams::default()).await;
                create(&client, &ns, &pod("web", json!({})).ok()?).await.ok()
            })
            .await?;
            ensure!(sidecars(&injected) == 1, "the native sidecar: {:?}", injected.spec.as_ref().map(|s| &s.init_containers));
            ensure!(sidecars(&create(&client, &plain, &pod("web", json!({}))?).await?) == 0, "unlabelled namespace");
            ensure!(sidecars(&create(&client, &ns, &pod("out", json!({"sagamesh.io/inject": "disabled"}))?).await?) == 0, "opted out");
            let mut again = injected.clone();
            again.metadata = kube::core::ObjectMeta { name: Some("web-again".into()), ..Default::default() };
            ensure!(sidecars(&create(&client, &ns, &again).await?) == 1, "re-admitting does not inject twice");
            Ok(())
        }
        .await;
        let _ = configs.delete(&configuration, &DeleteParams::default()).await;
        let _ = namespaces.delete(&plain, &DeleteParams::background()).await;
        result
    })
    .await;
}
