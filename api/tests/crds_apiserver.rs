//! The CRDs on a real kube-apiserver (the test bed): they install and become Established, full
//! valid objects round-trip unchanged, invalid ones are refused with the offending field named,
//! and kubectl shows the printer columns and the field docs.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use sagamesh_api::{Saga, SagaSpec, ServiceRegistration, ServiceRegistrationSpec};
use sagamesh_testing::{
    TestBed, eventually,
    fixtures::{
        Invalid, full_registration_with_endpoints, full_registration_with_selector, full_saga,
        invalid_registrations, invalid_sagas,
    },
    test_bed,
};
use serde_json::{Value, json};

fn api_resource<K: Resource<DynamicType = ()>>() -> ApiResource {
    ApiResource::erase::<K>(&())
}

async fn create_dynamic(
    client: &Client,
    ns: &str,
    ar: &ApiResource,
    value: &Value,
) -> kube::Result<DynamicObject> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, ar);
    let object: DynamicObject =
        serde_json::from_value(value.clone()).map_err(kube::Error::SerdeError)?;
    api.create(&PostParams::default(), &object).await
}

async fn bed(test: &str) -> Option<TestBed> {
    let bed = test_bed(test).await?;
    bed.install_crds().await.expect("CRDs install");
    Some(bed)
}

#[tokio::test]
async fn crds_apply_with_kubectl_and_become_established() {
    // `install_crds` runs `kubectl apply -f crds/` and waits for the Established condition.
    let Some(bed) = test_bed("crds_apply_with_kubectl_and_become_established").await else {
        return;
    };
    bed.install_crds()
        .await
        .expect("kubectl apply -f crds/ and Established");
    // Applying again is a no-op, as users re-run it on upgrade.
    bed.install_crds().await.expect("re-apply is idempotent");
}

#[tokio::test]
async fn full_valid_objects_read_back_unchanged() {
    let Some(bed) = bed("full_valid_objects_read_back_unchanged").await else {
        return;
    };
    bed.with_namespace("full-valid", |client, ns| async move {
        for manifest in [
            full_registration_with_endpoints(),
            full_registration_with_selector(),
        ] {
            let sent: ServiceRegistrationSpec = serde_json::from_value(manifest["spec"].clone())?;
            let api: Api<ServiceRegistration> = Api::namespaced(client.clone(), &ns);
            let object: ServiceRegistration = serde_json::from_value(manifest.clone())?;
            api.create(&PostParams::default(), &object)
                .await
                .context("create sreg")?;
            let name = object.metadata.name.clone().unwrap_or_default();
            let back = api.get(&name).await?;
            ensure!(
                back.spec == sent,
                "{name}: spec changed on the way: {:#?}\n!=\n{sent:#?}",
                back.spec
            );
            // And byte-for-byte as JSON, so no field was dropped by pruning.
            let raw: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &ns, &api_resource::<ServiceRegistration>());
            let raw_back = raw.get(&name).await?;
            ensure!(
                raw_back.data["spec"] == manifest["spec"],
                "{name}: stored spec differs: {}",
                raw_back.data["spec"]
            );
        }

        let manifest = full_saga();
        let sent: SagaSpec = serde_json::from_value(manifest["spec"].clone())?;
        let api: Api<Saga> = Api::namespaced(client.clone(), &ns);
        let object: Saga = serde_json::from_value(manifest.clone())?;
        api.create(&PostParams::default(), &object)
            .await
            .context("create saga")?;
        let back = api.get("order-1001").await?;
        ensure!(back.spec == sent, "saga spec changed on the way");
        let raw: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &ns, &api_resource::<Saga>());
        ensure!(
            raw.get("order-1001").await?.data["spec"] == manifest["spec"],
            "stored saga spec differs"
        );

        // The spec is immutable once created.
        let patch = json!({ "spec": { "deadline": "10m" } });
        match api
            .patch("order-1001", &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(e)) if e.message.contains("spec is immutable") => {}
            other => bail!("changing a saga's spec must be refused as immutable, got {other:?}"),
        }
        Ok(())
    })
    .await;
}

async fn assert_refused(
    client: &Client,
    ns: &str,
    ar: &ApiResource,
    case: &Invalid,
) -> anyhow::Result<()> {
    match create_dynamic(client, ns, ar, &case.manifest).await {
        Ok(_) => bail!("{}: the API server accepted it", case.what),
        Err(kube::Error::Api(e)) => {
            ensure!(
                e.code == 422,
                "{}: expected 422 Invalid, got {}: {}",
                case.what,
                e.code,
                e.message
            );
            for needle in case.expect {
                ensure!(
                    e.message.contains(needle),
                    "{}: message does not name {needle:?}: {}",
                    case.what,
                    e.message
                );
            }
            Ok(())
        }
        Err(other) => bail!("{}: unexpected error {other}", case.what),
    }
}

#[tokio::test]
async fn invalid_manifests_are_refused_naming_the_field() {
    let Some(bed) = bed("invalid_manifests_are_refused_naming_the_field").await else {
        return;
    };
    bed.with_namespace("invalid", |client, ns| async move {
        // The fixtures themselves are valid: each invalid case differs from them in one rule.
        let sreg = api_resource::<ServiceRegistration>();
        let saga = api_resource::<Saga>();
        create_dynamic(&client, &ns, &sreg, &full_registration_with_endpoints())
            .await
            .context("base sreg valid")?;
        create_dynamic(&client, &ns, &saga, &full_saga())
            .await
            .context("base saga valid")?;

        let mut failures = Vec::new();
        let registrations = invalid_registrations();
        let sagas = invalid_sagas();
        ensure!(registrations.len() + sagas.len() >= 12);
        let cases = registrations
            .iter()
            .map(|case| (&sreg, case))
            .chain(sagas.iter().map(|case| (&saga, case)));
        for (i, (resource, case)) in cases.enumerate() {
            let mut case_manifest = case.manifest.clone();
            // A unique name per case, unless the case is about the name.
            let base_names = [json!("payments"), json!("order-1001")];
            if base_names.contains(&case_manifest["metadata"]["name"]) {
                case_manifest["metadata"]["name"] = json!(format!("bad-{i}"));
            }
            let case = Invalid {
                manifest: case_manifest,
                ..*case
            };
            if let Err(e) = assert_refused(&client, &ns, resource, &case).await {
                failures.push(format!("{e:#}"));
            }
        }
        ensure!(
            failures.is_empty(),
            "{} case(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
        Ok(())
    })
    .await;
}

/// `kubectl get KIND -n NS`: the header's and the first row's columns, and the whole output.
fn kubectl_get(
    bed: &TestBed,
    kind: &str,
    ns: &str,
) -> anyhow::Result<(Vec<String>, Vec<String>, String)> {
    let out = bed.kubectl(&["get", kind, "-n", ns])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "kubectl get {kind}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = text
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>());
    let header = lines.next().unwrap_or_default();
    let row = lines.next().unwrap_or_default();
    Ok((header, row, text))
}

#[tokio::test]
async fn kubectl_shows_printer_columns_and_field_docs() {
    let Some(bed) = bed("kubectl_shows_printer_columns_and_field_docs").await else {
        return;
    };
    let kubectl_bed = bed.clone();
    bed.with_namespace("kubectl", move |client, ns| async move {
        create_dynamic(
            &client,
            &ns,
            &api_resource::<ServiceRegistration>(),
            &full_registration_with_endpoints(),
        )
        .await?;
        create_dynamic(&client, &ns, &api_resource::<Saga>(), &full_saga()).await?;
        // Status is a subresource: the operator writes it through /status.
        let sregs: Api<ServiceRegistration> = Api::namespaced(client.clone(), &ns);
        let status = json!({ "status": { "readyEndpoints": 2, "totalEndpoints": 3 } });
        sregs
            .patch_status("payments", &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        let sagas: Api<Saga> = Api::namespaced(client.clone(), &ns);
        let status = json!({ "status": { "phase": "Running", "currentStep": "reserve-stock" } });
        sagas
            .patch_status(
                "order-1001",
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await?;

        let (header, row, text) = kubectl_get(&kubectl_bed, "sreg", &ns)?;
        ensure!(
            header == ["NAME", "READY", "TOTAL", "POLICY", "AGE"],
            "sreg columns: {text}"
        );
        ensure!(
            row.len() >= 4 && row[..4] == ["payments", "2", "3", "ConsistentHash"],
            "sreg row: {text}"
        );
        let (header, row, text) = kubectl_get(&kubectl_bed, "saga", &ns)?;
        ensure!(
            header == ["NAME", "PHASE", "STEP", "AGE"],
            "saga columns: {text}"
        );
        ensure!(
            row.len() >= 3 && row[..3] == ["order-1001", "Running", "reserve-stock"],
            "saga row: {text}"
        );

        // The OpenAPI document is published a moment after the CRD is Established.
        let explain = eventually(
            "kubectl explain saga.spec.steps",
            Duration::from_secs(30),
            || {
                let out = kubectl_bed.kubectl(&["explain", "saga.spec.steps"]);
                async move {
                    let out = out.ok()?;
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    (out.status.success() && text.contains("compensation")).then_some(text)
                }
            },
        )
        .await?;
        for doc in [
            "The steps, run in order",
            "The call that undoes the action when a later step fails",
            "Deadline of one attempt of the action",
        ] {
            ensure!(
                explain.contains(doc),
                "kubectl explain lacks {doc:?}:\n{explain}"
            );
        }
        let out =
            kubectl_bed.kubectl(&["explain", "sreg.spec.circuitBreaker.maxEjectionPercent"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains("Most endpoints, as a percentage of all"),
            "explain sreg field: {text}"
        );
        Ok(())
    })
    .await;
}
