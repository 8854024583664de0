//! CRD YAML generated from the Rust types. `crds/` holds the output; a test fails if it drifts.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

use crate::{Saga, ServiceRegistration};

const HEADER: &str = "# Generated from the Rust types in api/ by `cargo run -p sagamesh-api --bin crdgen`.\n\
                      # Do not edit by hand: a test fails when this file differs from the types.\n";

/// Error while rendering a CRD.
#[derive(Debug, thiserror::Error)]
#[error("rendering CRD {name} as YAML: {source}")]
pub struct CrdGenError {
    name: String,
    #[source]
    source: serde_saphyr::ser::Error,
}

/// Every Sagamesh CRD.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![ServiceRegistration::crd(), Saga::crd()];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            if let Some(schema) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                strip_unknown_formats(schema);
            }
        }
    }
    crds
}

/// schemars writes `format: uint32` (and `uint16`, `uint64`) for unsigned integers; the API server
/// does not know these formats and `kubectl apply` prints a warning for each. The `minimum: 0`
/// schemars adds alongside already says what the format meant, so the format is dropped.
fn strip_unknown_formats(schema: &mut JSONSchemaProps) {
    if schema
        .format
        .as_deref()
        .is_some_and(|f| f.starts_with("uint"))
    {
        schema.format = None;
    }
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        strip_unknown_formats(child);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        strip_unknown_formats(items);
    }
    if let Some(JSONSchemaPropsOrArray::Schemas(items)) = schema.items.as_mut() {
        items.iter_mut().for_each(strip_unknown_formats);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(extra)) = schema.additional_properties.as_mut() {
        strip_unknown_formats(extra);
    }
}

/// Each CRD as `(file name, YAML)`, e.g. `("sagas.sagamesh.io.yaml", "...")`.
pub fn crd_files() -> Result<Vec<(String, String)>, CrdGenError> {
    crds()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let yaml = serde_saphyr::to_string(&crd).map_err(|source| CrdGenError {
                name: name.clone(),
                source,
            })?;
            Ok((format!("{name}.yaml"), format!("{HEADER}{yaml}")))
        })
        .collect()
}
