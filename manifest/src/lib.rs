//! ServiceRegistration and Saga manifests read from files, checked the way the API server checks
//! them: the CRD's OpenAPI schema (types, patterns, ranges, enums, required fields) and its CEL
//! rules (`x-kubernetes-validations`, evaluated with kube-cel). Every problem is reported with
//! file, line and field — the line from the YAML parser's own positions ([`yaml`]); one bad
//! document never hides the good ones before it (a YAML syntax error ends its file there).
//!
//! The one manifest loader: `sagamesh local` and the sidecar's `--manifests` both read files
//! through it, so a file one accepts the other accepts too.

pub mod report;
mod yaml;

use std::{
    cell::OnceCell,
    fmt,
    path::{Path, PathBuf},
};

use kube::CustomResourceExt;
use sagamesh_api::names::is_dns_label;
use sagamesh_api::{Saga, ServiceRegistration};
use serde_json::Value;

use crate::yaml::Document;

/// One problem in one manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based line of the offending field (or of its document when the field has no line).
    pub line: usize,
    /// Field path such as `spec.steps[1].action.path`; empty for a whole-document problem.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

/// A valid manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum Manifest {
    ServiceRegistration(Box<ServiceRegistration>),
    Saga(Box<Saga>),
}

impl Manifest {
    pub fn namespace(&self) -> &str {
        let meta = match self {
            Manifest::ServiceRegistration(r) => &r.metadata,
            Manifest::Saga(s) => &s.metadata,
        };
        meta.namespace.as_deref().unwrap_or("default")
    }

    pub fn name(&self) -> &str {
        let meta = match self {
            Manifest::ServiceRegistration(r) => &r.metadata,
            Manifest::Saga(s) => &s.metadata,
        };
        meta.name.as_deref().unwrap_or_default()
    }
}

/// A manifest and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    pub file: PathBuf,
    pub line: usize,
    pub manifest: Manifest,
}

/// What a file or directory held.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Loaded {
    pub manifests: Vec<Located>,
    pub errors: Vec<ManifestError>,
}

/// The `*.yaml` / `*.yml` files of `dir` (not recursive), in name order.
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every `*.yaml` / `*.yml` file of `dir` (not recursive), in name order.
pub fn load_dir(dir: &Path) -> Loaded {
    let files = match manifest_files(dir) {
        Ok(files) => files,
        Err(e) => {
            return Loaded {
                manifests: Vec::new(),
                errors: vec![ManifestError {
                    file: dir.to_path_buf(),
                    line: 0,
                    field: String::new(),
                    message: format!("cannot read directory: {e}"),
                }],
            };
        }
    };
    let mut loaded = Loaded::default();
    for one in load_files(&files) {
        loaded.manifests.extend(one.manifests);
        loaded.errors.extend(one.errors);
    }
    loaded
}

/// Reads one file or every `*.yaml` / `*.yml` file of a directory.
pub fn load_path(path: &Path) -> Loaded {
    if path.is_dir() {
        return load_dir(path);
    }
    match std::fs::read_to_string(path) {
        Ok(text) => load_str(path, &text),
        Err(e) => Loaded {
            manifests: Vec::new(),
            errors: vec![ManifestError {
                file: path.to_path_buf(),
                line: 0,
                field: String::new(),
                message: format!("cannot read: {e}"),
            }],
        },
    }
}

/// Reads each of `files` on its own (one [`Loaded`] per file, in order), compiling the schemas
/// once for all of them.
pub fn load_files(files: &[PathBuf]) -> Vec<Loaded> {
    let schemas = Schemas::default();
    files
        .iter()
        .map(|file| match std::fs::read_to_string(file) {
            Ok(text) => load_with(&schemas, file, &text),
            Err(e) => Loaded {
                manifests: Vec::new(),
                errors: vec![ManifestError {
                    file: file.clone(),
                    line: 0,
                    field: String::new(),
                    message: format!("cannot read: {e}"),
                }],
            },
        })
        .collect()
}

/// Parses and checks every document of one file's text.
pub fn load_str(file: &Path, text: &str) -> Loaded {
    load_with(&Schemas::default(), file, text)
}

fn load_with(schemas: &Schemas, file: &Path, text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    let error = |line: usize, field: String, message: String| ManifestError {
        file: file.to_path_buf(),
        line,
        field,
        message,
    };
    for doc in yaml::documents(text) {
        let doc = match doc {
            Ok(doc) => doc,
            Err(e) => {
                loaded.errors.push(error(
                    e.line.unwrap_or(0),
                    String::new(),
                    format!("invalid YAML: {}", e.message),
                ));
                continue;
            }
        };
        match check_document(schemas, &doc) {
            Ok(manifest) => loaded.manifests.push(Located {
                file: file.to_path_buf(),
                line: doc.line,
                manifest,
            }),
            Err(problems) => loaded.errors.extend(
                problems
                    .into_iter()
                    .map(|p| error(doc.line_of(&p.field), p.field, p.message)),
            ),
        }
    }
    loaded
}

struct Problem {
    field: String,
    message: String,
}

fn problem(field: &str, message: impl Into<String>) -> Problem {
    Problem {
        field: field.trim_start_matches('.').to_string(),
        message: message.into(),
    }
}

/// A kind's OpenAPI schema and its JSON Schema validator.
struct Schema {
    openapi: Value,
    validator: Result<jsonschema::Validator, String>,
}

/// The kinds' schemas, compiled on first use within one load (a directory's files share them)
/// and dropped after it: a sidecar that reads its manifests keeps no validator between reloads
/// (they are several MiB).
#[derive(Default)]
struct Schemas {
    registration: OnceCell<Schema>,
    saga: OnceCell<Schema>,
}

impl Schemas {
    fn of(&self, kind: &str) -> Option<&Schema> {
        type Crd =
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let (cell, crd): (_, fn() -> Crd) = match kind {
            "ServiceRegistration" => (&self.registration, ServiceRegistration::crd),
            "Saga" => (&self.saga, Saga::crd),
            _ => return None,
        };
        Some(cell.get_or_init(|| {
            let openapi = crd()
                .spec
                .versions
                .first()
                .and_then(|v| v.schema.as_ref())
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .and_then(|s| serde_json::to_value(s).ok())
                .unwrap_or(Value::Null);
            let validator = jsonschema::validator_for(&to_json_schema(&openapi))
                .map_err(|e| format!("internal error compiling the CRD schema: {e}"));
            Schema { openapi, validator }
        }))
    }
}

fn check_document(schemas: &Schemas, doc: &Document) -> Result<Manifest, Vec<Problem>> {
    let value = doc.value.clone();
    let api_version = value["apiVersion"].as_str().unwrap_or_default();
    let kind = value["kind"].as_str().unwrap_or_default();
    if api_version != "sagamesh.io/v1alpha1" {
        return Err(vec![problem(
            "apiVersion",
            format!(
                "expected sagamesh.io/v1alpha1, got {:?}",
                value["apiVersion"]
            ),
        )]);
    }
    let Some(schema) = schemas.of(kind) else {
        return Err(vec![problem(
            "kind",
            format!("expected ServiceRegistration or Saga, got {kind:?}"),
        )]);
    };
    let mut problems = Vec::new();
    for (field, value) in [
        ("metadata.name", &value["metadata"]["name"]),
        ("metadata.namespace", &value["metadata"]["namespace"]),
    ] {
        let ok = match value {
            Value::String(s) => is_dns_label(s),
            Value::Null => field == "metadata.namespace",
            _ => false,
        };
        if !ok {
            problems.push(problem(
                field,
                "must be a DNS label (lowercase letters, digits and '-', at most 63)",
            ));
        }
    }
    if schema.openapi.is_null() {
        return Err(vec![problem("", "internal error: the CRD has no schema")]);
    }
    problems.extend(schema_problems(schema, &value));
    if problems.is_empty() {
        // CEL rules only run on a structurally valid object, as on the API server.
        if let Err(errors) = kube_cel::Validator::new().validate(&schema.openapi, &value, None) {
            for error in errors.into_vec() {
                problems.push(problem(&error.field_path, error.message));
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let typed = match kind {
        "ServiceRegistration" => {
            serde_json::from_value(value).map(|r| Manifest::ServiceRegistration(Box::new(r)))
        }
        _ => serde_json::from_value(value).map(|s| Manifest::Saga(Box::new(s))),
    };
    typed.map_err(|e| vec![problem("", e.to_string())])
}

/// Rewrites the CRD's OpenAPI v3 schema as JSON Schema: `nullable` becomes a `null` type, and
/// nodes that keep unknown fields accept anything.
fn to_json_schema(node: &Value) -> Value {
    match node {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (key, value) in map {
                match key.as_str() {
                    "nullable" => {}
                    "properties" | "patternProperties" => {
                        let props = value.as_object().map(|p| {
                            p.iter()
                                .map(|(k, v)| (k.clone(), to_json_schema(v)))
                                .collect()
                        });
                        out.insert(key.clone(), Value::Object(props.unwrap_or_default()));
                    }
                    k if k.starts_with("x-kubernetes") => {}
                    _ => {
                        out.insert(key.clone(), to_json_schema(value));
                    }
                }
            }
            if map.get("nullable") == Some(&Value::Bool(true))
                && let Some(Value::String(t)) = out.get("type").cloned()
            {
                out.insert("type".into(), serde_json::json!([t, "null"]));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(to_json_schema).collect()),
        other => other.clone(),
    }
}

fn schema_problems(schema: &Schema, value: &Value) -> Vec<Problem> {
    let validator = match &schema.validator {
        Ok(v) => v,
        Err(e) => return vec![problem("", e.clone())],
    };
    let mut problems: Vec<Problem> = validator
        .iter_errors(value)
        .map(|error| {
            let mut field = pointer_to_field(&error.instance_path().to_string());
            // Name the missing field itself, as the API server does ("Required value").
            if let jsonschema::error::ValidationErrorKind::Required { property } = error.kind() {
                let name = property.as_str().unwrap_or_default();
                field = if field.is_empty() {
                    name.to_string()
                } else {
                    format!("{field}.{name}")
                };
                return problem(&field, "Required value");
            }
            problem(&field, error.to_string())
        })
        .collect();
    duplicate_keys(&schema.openapi, value, String::new(), &mut problems);
    problems
}

/// `x-kubernetes-list-type: map` lists: the items' keys must be unique (JSON Schema has no word
/// for this).
fn duplicate_keys(schema: &Value, value: &Value, path: String, problems: &mut Vec<Problem>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if let Some(child_schema) = schema["properties"].get(key) {
                    let child_path = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    duplicate_keys(child_schema, child, child_path, problems);
                }
            }
        }
        Value::Array(items) => {
            let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
                .as_array()
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if schema["x-kubernetes-list-type"] == "map" && !keys.is_empty() {
                let mut seen = std::collections::HashSet::new();
                for (i, item) in items.iter().enumerate() {
                    let key: Vec<String> = keys.iter().map(|k| item[*k].to_string()).collect();
                    if !seen.insert(key.clone()) {
                        problems.push(problem(
                            &format!("{path}[{i}]"),
                            format!("Duplicate value: {}", key.join(", ")),
                        ));
                    }
                }
            }
            for (i, item) in items.iter().enumerate() {
                duplicate_keys(&schema["items"], item, format!("{path}[{i}]"), problems);
            }
        }
        _ => {}
    }
}

/// `/spec/steps/1/action/path` → `spec.steps[1].action.path`.
fn pointer_to_field(pointer: &str) -> String {
    let mut field = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if segment.bytes().all(|b| b.is_ascii_digit()) && !segment.is_empty() {
            field.push_str(&format!("[{segment}]"));
        } else {
            if !field.is_empty() {
                field.push('.');
            }
            field.push_str(&segment);
        }
    }
    field
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"apiVersion: sagamesh.io/v1alpha1
kind: ServiceRegistration
metadata:
  name: users
spec:
  endpoints:
    - address: 127.0.0.2
      port: 8080
  ports:
    - name: http
      port: 8080
---
apiVersion: sagamesh.io/v1alpha1
kind: Saga
metadata:
  name: order-1
  namespace: shop
spec:
  steps:
    - name: create
      action:
        service: orders
        path: /orders
    - name: charge
      action:
        service: payment
        path: charges
"#;

    #[test]
    fn good_documents_load_and_bad_ones_name_file_line_and_field() {
        let loaded = load_str(Path::new("shop.yaml"), GOOD);
        assert_eq!(loaded.manifests.len(), 1, "{:?}", loaded.errors);
        assert_eq!(loaded.manifests[0].manifest.name(), "users");
        assert_eq!(loaded.errors.len(), 1, "{:?}", loaded.errors);
        let error = &loaded.errors[0];
        assert_eq!(
            (error.line, error.field.as_str()),
            (27, "spec.steps[1].action.path")
        );
        assert!(
            error
                .to_string()
                .starts_with("shop.yaml:27: spec.steps[1].action.path: "),
            "{error}"
        );
        assert!(error.message.contains("must start with '/'"), "{error}");
    }

    #[test]
    fn schema_errors_name_the_field_and_its_line() {
        let text = GOOD
            .split("---")
            .next()
            .unwrap_or_default()
            .replace("port: 8080\n  ports", "port: 99999\n  ports");
        let loaded = load_str(Path::new("u.yaml"), &text);
        assert_eq!(loaded.errors.len(), 1, "{:?}", loaded.errors);
        assert_eq!(
            (loaded.errors[0].line, loaded.errors[0].field.as_str()),
            (8, "spec.endpoints[0].port")
        );
    }

    #[test]
    fn cel_rules_run_locally() {
        let text = GOOD
            .split("---")
            .next()
            .unwrap_or_default()
            .replace("spec:\n", "spec:\n  selector:\n    app: users\n");
        let loaded = load_str(Path::new("u.yaml"), &text);
        assert!(
            loaded.errors.iter().any(|e| e
                .message
                .contains("exactly one of spec.selector and spec.endpoints")),
            "{:?}",
            loaded.errors
        );
    }

    #[test]
    fn broken_yaml_and_wrong_kinds_are_reported() {
        let loaded = load_str(
            Path::new("x.yaml"),
            "apiVersion: sagamesh.io/v1alpha1\nkind: Saga\nmetadata: [unclosed\n",
        );
        assert_eq!(loaded.errors.len(), 1);
        assert!(
            loaded.errors[0].message.starts_with("invalid YAML"),
            "{:?}",
            loaded.errors
        );
        let loaded = load_str(
            Path::new("x.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n",
        );
        assert_eq!(
            (loaded.errors[0].line, loaded.errors[0].field.as_str()),
            (1, "apiVersion")
        );
        let loaded = load_str(
            Path::new("x.yaml"),
            "apiVersion: sagamesh.io/v1alpha1\nkind: Sagas\nmetadata:\n  name: p\n",
        );
        assert_eq!(
            (loaded.errors[0].line, loaded.errors[0].field.as_str()),
            (2, "kind")
        );
    }

    #[test]
    fn pointers_become_field_paths() {
        assert_eq!(
            pointer_to_field("/spec/steps/1/action/path"),
            "spec.steps[1].action.path"
        );
        assert_eq!(pointer_to_field(""), "");
    }
}
