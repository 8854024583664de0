//! The injection webhook on the real API server: the webhook runs on 127.0.0.1 with a
//! certificate made by the operator's code (kept in a Secret, CA bundle patched into the
//! MutatingWebhookConfiguration), and the API server calls it for every pod created.

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Namespace, Pod},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use sagamesh_injector::{
    certs::{ensure_secret, patch_ca_bundle, server_config},
    mutate::{InjectConfig, SIDECAR_NAME},
    server::serve,
};
use sagamesh_server::TlsHandle;
use sagamesh_testing::{eventually, test_bed};
use serde_json::json;

fn inject_config() -> InjectConfig {
    InjectConfig {
        image: "sagamesh/sidecar:test".into(),
        image_pull_policy: "IfNotPresent".into(),
        discovery_addr: "http://sagamesh-operator.sagamesh-system.svc:8090".into(),
        resources: serde_json::from_value(json!({"requests": {"cpu": "10m", "memory": "16Mi"}}))
            .unwrap_or_default(),
        log_format: "json".into(),
        log_level: "info".into(),
    }
}

fn pod(
    name: &str,
    labels: serde_json::Value,
    annotations: serde_json::Value,
) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
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
        .map_or(0, |c| c.iter().filter(|c| c.name == SIDECAR_NAME).count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_in_labelled_namespaces_get_the_native_sidecar_once() {
    let Some(bed) = test_bed("pods_in_labelled_namespaces_get_the_native_sidecar_once").await
    else {
        return;
    };
    bed.with_namespace("inject", |client, ns| async move {
        // The operator's certificate: generated into a Secret, its CA patched into the webhook.
        let (cert, changed) = ensure_secret(&client, &ns, "injector-tls", &["127.0.0.1".to_string()]).await?;
        ensure!(changed, "a new certificate is written the first time");
        let (again, changed) = ensure_secret(&client, &ns, "injector-tls", &["127.0.0.1".to_string()]).await?;
        ensure!(!changed && again == cert, "the stored certificate is reused");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve(listener, TlsHandle::new(server_config(&cert)?), inject_config(), stop_rx));

        // Only namespaces of this test are selected, so other tests are never affected.
        let selector_value = ns.clone();
        let webhook_name = format!("{ns}-injector");
        let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        configs
            .create(&PostParams::default(), &serde_json::from_value(json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": webhook_name},
                "webhooks": [{
                    "name": "inject.sagamesh.io",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "failurePolicy": "Fail",
                    "reinvocationPolicy": "IfNeeded",
                    "timeoutSeconds": 10,
                    "clientConfig": {"url": format!("https://127.0.0.1:{port}/inject")},
                    "namespaceSelector": {"matchLabels": {"sagamesh.io/inject": "enabled", "sagamesh.io/test": selector_value}},
                    "objectSelector": {"matchExpressions": [{"key": "sagamesh.io/inject", "operator": "NotIn", "values": ["disabled"]}]},
                    "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}]
                }]
            }))?)
            .await?;
        patch_ca_bundle(&client, &webhook_name, &cert.ca_pem).await?;
        let stored = configs.get(&webhook_name).await?;
        ensure!(
            stored.webhooks.iter().flatten().all(|w| w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) == Some(cert.ca_pem.as_bytes())),
            "the CA bundle is in the webhook configuration"
        );

        let namespaces: Api<Namespace> = Api::all(client.clone());
        let label = json!({"metadata": {"labels": {"sagamesh.io/inject": "enabled", "sagamesh.io/test": ns}}});
        namespaces.patch(&ns, &PatchParams::default(), &Patch::Merge(&label)).await?;
        let other = format!("{ns}-plain");
        namespaces
            .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": other, "labels": {"sagamesh.io/test": ns}}}))?)
            .await?;

        let result = async {
            // The API server calls the webhook: the pod comes back with the native sidecar.
            let injected = eventually("the webhook to be called", Duration::from_secs(20), || async {
                let _ = Api::<Pod>::namespaced(client.clone(), &ns).delete("web", &DeleteParams::default()).await;
                create(&client, &ns, &pod("web", json!({}), json!({})).ok()?).await.ok()
            })
            .await?;
            ensure!(sidecars(&injected) == 1, "one sidecar: {:?}", injected.spec.as_ref().map(|s| &s.init_containers));
            let sidecar = &injected.spec.as_ref().and_then(|s| s.init_containers.clone()).unwrap_or_default()[0];
            ensure!(sidecar.restart_policy.as_deref() == Some("Always"), "a native sidecar");
            ensure!(sidecar.image.as_deref() == Some("sagamesh/sidecar:test"));
            ensure!(injected.metadata.annotations.as_ref().and_then(|a| a.get("sagamesh.io/injected")).map(String::as_str) == Some("true"));

            // Unlabelled namespace, label opt-out, annotation opt-out: no sidecar.
            ensure!(sidecars(&create(&client, &other, &pod("web", json!({}), json!({}))?).await?) == 0, "unlabelled namespace");
            ensure!(sidecars(&create(&client, &ns, &pod("out-label", json!({"sagamesh.io/inject": "disabled"}), json!({}))?).await?) == 0, "label opt-out");
            ensure!(sidecars(&create(&client, &ns, &pod("out-annotation", json!({}), json!({"sagamesh.io/inject": "disabled"}))?).await?) == 0, "annotation opt-out");

            // Re-admitting an injected pod (its spec already has the sidecar) does not add another.
            let mut again = injected.clone();
            again.metadata = kube::core::ObjectMeta { name: Some("web-again".into()), annotations: injected.metadata.annotations.clone(), ..Default::default() };
            if let Some(spec) = again.spec.as_mut() {
                spec.node_name = None;
            }
            let readmitted = create(&client, &ns, &again).await.context("re-admitting an injected pod")?;
            ensure!(sidecars(&readmitted) == 1, "not injected twice");

            // A bad override annotation is refused with the annotation named.
            match create(&client, &ns, &pod("bad", json!({}), json!({"sagamesh.io/app-port": "http"}))?).await {
                Err(kube::Error::Api(e)) => ensure!(e.message.contains("sagamesh.io/app-port"), "{}", e.message),
                other => anyhow::bail!("a bad annotation must be refused, got {other:?}"),
            }
            Ok(())
        }
        .await;
        let _ = configs.delete(&webhook_name, &DeleteParams::default()).await;
        let _ = namespaces.delete(&other, &DeleteParams::background()).await;
        let _ = stop_tx.send(true);
        let _ = server.await;
        result
    })
    .await;
}
