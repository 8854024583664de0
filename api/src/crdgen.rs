//! CRD YAML generated from the Rust types. `crds/` holds the output; a test fails if it drifts.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
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
    vec![ServiceRegistration::crd(), Saga::crd()]
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
