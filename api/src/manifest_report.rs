//! What the manifest checker (`sagamesh-manifest-check --json FILE...`, from `sagamesh-manifest`)
//! prints and the sidecar's `--manifests` discovery reads: the contract between the two
//! programs. The sidecar runs the checker as a short-lived child so that the validator (the CRD
//! schemas, CEL, the YAML parser) is neither linked into nor resident in the long-running proxy.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ServiceRegistrationSpec;

/// One file's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileReport {
    /// The path as it was given to the checker.
    pub file: PathBuf,
    /// Every valid ServiceRegistration of the file, in document order (Sagas are checked, then
    /// left out: discovery does not use them).
    #[serde(default)]
    pub registrations: Vec<CheckedRegistration>,
    /// Each problem as `file:line: field: message`; any problem refuses the whole file.
    #[serde(default)]
    pub problems: Vec<String>,
}

/// A ServiceRegistration that passed the CRD schema and CEL checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckedRegistration {
    /// 1-based line of its document.
    pub line: usize,
    pub name: String,
    /// `metadata.namespace`, when the manifest names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub spec: ServiceRegistrationSpec,
}
