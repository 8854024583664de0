//! ServiceRegistration and Saga manifests read from files, checked the way the API server checks
//! them: the CRD's OpenAPI schema (types, patterns, ranges, enums, required fields) and its CEL
//! rules (`x-kubernetes-validations`, evaluated with kube-cel). Every problem is reported with
//! file, line and field; one bad document never hides the good ones.

use sagamesh_api::names::is_dns_label;
use std::{
    fmt,
    path::{Path, PathBuf},
};

use kube::CustomResourceExt;
use sagamesh_api::{Saga, ServiceRegistration};
use serde_json::Value;

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

/// Reads every `*.yaml` / `*.yml` file of `dir` (not recursive), in name order.
pub fn load_dir(dir: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .collect(),
        Err(e) => {
            loaded.errors.push(ManifestError {
                file: dir.to_path_buf(),
                line: 0,
                field: String::new(),
                message: format!("cannot read directory: {e}"),
            });
            return loaded;
        }
    };
    files.sort();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let one = load_str(&file, &text);
                loaded.manifests.extend(one.manifests);
                loaded.errors.extend(one.errors);
            }
            Err(e) => loaded.errors.push(ManifestError {
                file,
                line: 0,
                field: String::new(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    loaded
}

/// Splits a YAML stream into documents: `(first line, text)`.
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs.into_iter()
        .filter(|(_, d)| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// Parses and checks every document of one file's text.
pub fn load_str(file: &Path, text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    for (start, doc) in documents(text) {
        match check_document(&doc) {
            Ok(manifest) => loaded.manifests.push(Located {
                file: file.to_path_buf(),
                line: start,
                manifest,
            }),
            Err(problems) => loaded
                .errors
                .extend(problems.into_iter().map(|p| ManifestError {
                    file: file.to_path_buf(),
                    line: start + p.line_in_doc.unwrap_or(0),
                    field: p.field,
                    message: p.message,
                })),
        }
    }
    loaded
}

struct Problem {
    /// 0-based line within the document.
    line_in_doc: Option<usize>,
    field: String,
    message: String,
}

fn problem(doc: &str, field: &str, message: impl Into<String>) -> Problem {
    Problem {
        line_in_doc: find_line(doc, field),
        field: field.to_string(),
        message: message.into(),
    }
}

fn check_document(doc: &str) -> Result<Manifest, Vec<Problem>> {
    let value: Value = serde_saphyr::from_str(doc).map_err(|e| {
        let line = e.location().map(|l| (l.line() as usize).saturating_sub(1));
        let message = e
            .to_string()
            .lines()
            .next()
            .unwrap_or("invalid YAML")
            .to_string();
        vec![Problem {
            line_in_doc: line,
            field: String::new(),
            message: format!("invalid YAML: {message}"),
        }]
    })?;
    let api_version = value["apiVersion"].as_str().unwrap_or_default();
    let kind = value["kind"].as_str().unwrap_or_default();
    if api_version != "sagamesh.io/v1alpha1" {
        return Err(vec![problem(
            doc,
            "apiVersion",
            format!(
                "expected sagamesh.io/v1alpha1, got {:?}",
                value["apiVersion"]
            ),
        )]);
    }
    let crd = match kind {
        "ServiceRegistration" => ServiceRegistration::crd(),
        "Saga" => Saga::crd(),
        other => {
            return Err(vec![problem(
                doc,
                "kind",
                format!("expected ServiceRegistration or Saga, got {other:?}"),
            )]);
        }
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
                doc,
                field,
                "must be a DNS label (lowercase letters, digits and '-', at most 63)",
            ));
        }
    }
    let schema = crd
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref());
    let schema = match schema.map(serde_json::to_value) {
        Some(Ok(schema)) => schema,
        _ => {
            return Err(vec![problem(
                doc,
                "",
                "internal error: the CRD has no schema",
            )]);
        }
    };
    problems.extend(schema_problems(doc, &schema, &value));
    if problems.is_empty() {
        // CEL rules only run on a structurally valid object, as on the API server.
        if let Err(errors) = kube_cel::Validator::new().validate(&schema, &value, None) {
            for error in errors.into_vec() {
                problems.push(problem(doc, &error.field_path, error.message));
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
    typed.map_err(|e| vec![problem(doc, "", e.to_string())])
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

fn schema_problems(doc: &str, schema: &Value, value: &Value) -> Vec<Problem> {
    let json_schema = to_json_schema(schema);
    let validator = match jsonschema::validator_for(&json_schema) {
        Ok(v) => v,
        Err(e) => {
            return vec![problem(
                doc,
                "",
                format!("internal error compiling the CRD schema: {e}"),
            )];
        }
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
                return problem(doc, &field, "Required value");
            }
            problem(doc, &field, error.to_string())
        })
        .collect();
    duplicate_keys(doc, schema, value, String::new(), &mut problems);
    problems
}

/// `x-kubernetes-list-type: map` lists: the items' keys must be unique (JSON Schema has no word
/// for this).
fn duplicate_keys(
    doc: &str,
    schema: &Value,
    value: &Value,
    path: String,
    problems: &mut Vec<Problem>,
) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if let Some(child_schema) = schema["properties"].get(key) {
                    let child_path = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    duplicate_keys(doc, child_schema, child, child_path, problems);
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
                            doc,
                            &format!("{path}[{i}]"),
                            format!("Duplicate value: {}", key.join(", ")),
                        ));
                    }
                }
            }
            for (i, item) in items.iter().enumerate() {
                duplicate_keys(
                    doc,
                    &schema["items"],
                    item,
                    format!("{path}[{i}]"),
                    problems,
                );
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

enum Segment {
    Key(String),
    Index(usize),
}

/// Finds the 0-based line of a field (`spec.steps[1].action.path`) in block-style YAML by
/// walking keys and list items by indentation. Best effort: flow-style YAML (`{a: 1}`) falls
/// back to the deepest key found.
fn find_line(doc: &str, field: &str) -> Option<usize> {
    let mut segments = Vec::new();
    for part in field
        .trim_start_matches('.')
        .split('.')
        .filter(|p| !p.is_empty())
    {
        let (key, rest) = part
            .split_once('[')
            .map(|(k, r)| (k, Some(r)))
            .unwrap_or((part, None));
        if !key.is_empty() {
            segments.push(Segment::Key(key.to_string()));
        }
        for index in rest.into_iter().flat_map(|r| r.split('[')) {
            if let Ok(i) = index.trim_end_matches(']').parse::<usize>() {
                segments.push(Segment::Index(i));
            }
        }
    }
    let lines: Vec<&str> = doc.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let (mut from, mut to, mut min_indent) = (0usize, lines.len(), 0usize);
    let mut found = None;
    for segment in segments {
        let mut hit = None;
        match &segment {
            Segment::Key(key) => {
                for (i, line) in lines.iter().enumerate().take(to).skip(from) {
                    let trimmed = line.trim_start().trim_start_matches("- ");
                    if indent(line) >= min_indent
                        && (trimmed.starts_with(&format!("{key}:"))
                            || trimmed.starts_with(&format!("\"{key}\":")))
                    {
                        hit = Some(i);
                        break;
                    }
                }
            }
            Segment::Index(index) => {
                let mut seen = 0;
                let mut item_indent = None;
                for (i, line) in lines.iter().enumerate().take(to).skip(from) {
                    let trimmed = line.trim_start();
                    if trimmed.starts_with("- ") || trimmed == "-" {
                        let this = indent(line);
                        if item_indent.is_none_or(|ii| this == ii) {
                            item_indent = Some(this);
                            if seen == *index {
                                hit = Some(i);
                                break;
                            }
                            seen += 1;
                        }
                    }
                }
            }
        }
        let Some(line) = hit else { break };
        found = Some(line);
        // The value of this key / item: the following lines indented deeper (and, for a list
        // item, its own line).
        let own = indent(lines[line])
            + if matches!(segment, Segment::Index(_)) {
                2
            } else {
                0
            };
        from = if matches!(segment, Segment::Index(_)) {
            line
        } else {
            line + 1
        };
        let end = lines
            .iter()
            .enumerate()
            .skip(line + 1)
            .find(|(_, l)| {
                !l.trim().is_empty()
                    && indent(l) <= indent(lines[line])
                    && !(matches!(segment, Segment::Key(_))
                        && l.trim_start().starts_with("- ")
                        && indent(l) == indent(lines[line]))
            })
            .map(|(i, _)| i)
            .unwrap_or(lines.len());
        to = end;
        min_indent = own.min(indent(lines[line]) + 1);
    }
    found
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
