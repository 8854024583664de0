//! The saga template syntax: `{{ input.orderId }}`, `{{ steps.reserve.output.id }}`,
//! `{{ saga.uid }}`.
//!
//! - In a path, the value is percent-encoded so it stays one path segment.
//! - In a header value, the value is inserted as text; CR and LF are refused.
//! - In a JSON body, a string that is exactly one template takes the value with its JSON type
//!   (`"{{ input.items }}"` becomes the array); other strings get the text interpolated.
//!
//! Paths are dot-separated; array elements are `items.0` or `items[0]`.

use std::collections::HashMap;

use serde_json::Value;

/// Why a template could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{{{{ {expression} }}}}: {reason}")]
pub struct TemplateError {
    /// The expression between the braces (or the raw text for a syntax error).
    pub expression: String,
    pub reason: String,
}

impl TemplateError {
    fn new(expression: &str, reason: impl Into<String>) -> Self {
        Self {
            expression: expression.to_string(),
            reason: reason.into(),
        }
    }
}

/// What templates can read.
#[derive(Debug, Default, Clone)]
pub struct Scope<'a> {
    pub input: Option<&'a Value>,
    /// Outputs of the steps that have one, by step name.
    pub outputs: HashMap<&'a str, &'a Value>,
    pub saga_name: &'a str,
    pub saga_namespace: &'a str,
    pub saga_uid: &'a str,
}

/// A parsed expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Input(Vec<String>),
    StepOutput { step: String, path: Vec<String> },
    Saga(String),
}

enum Piece<'t> {
    Text(&'t str),
    Expr(&'t str),
}

fn pieces(template: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            out.push(Piece::Text(&rest[..start]));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| TemplateError::new(template, "unterminated '{{'"))?;
        out.push(Piece::Expr(after[..end].trim()));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

fn split_path(expression: &str, path: &str) -> Result<Vec<String>, TemplateError> {
    let mut segments = Vec::new();
    for part in path.split('.') {
        // `items[0][1]` → `items`, `0`, `1`
        let mut head = part;
        let mut indices = Vec::new();
        while let Some(open) = head.rfind('[') {
            let Some(inner) = head[open + 1..].strip_suffix(']') else {
                return Err(TemplateError::new(expression, "malformed '[index]'"));
            };
            if inner.is_empty() || !inner.bytes().all(|b| b.is_ascii_digit()) {
                return Err(TemplateError::new(expression, "an index must be a number"));
            }
            indices.push(inner.to_string());
            head = &head[..open];
        }
        if head.is_empty()
            || !head
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(TemplateError::new(
                expression,
                format!("invalid path segment {part:?}"),
            ));
        }
        segments.push(head.to_string());
        segments.extend(indices.into_iter().rev());
    }
    Ok(segments)
}

/// Parses one expression (the text between the braces).
pub fn parse_reference(expression: &str) -> Result<Reference, TemplateError> {
    if expression.is_empty() {
        return Err(TemplateError::new(expression, "empty expression"));
    }
    let segments = split_path(expression, expression)?;
    match segments.first().map(String::as_str) {
        Some("input") => Ok(Reference::Input(segments[1..].to_vec())),
        Some("steps") => {
            let step = segments
                .get(1)
                .ok_or_else(|| TemplateError::new(expression, "expected steps.NAME.output"))?;
            if segments.get(2).map(String::as_str) != Some("output") {
                return Err(TemplateError::new(
                    expression,
                    "expected steps.NAME.output[.path]",
                ));
            }
            Ok(Reference::StepOutput {
                step: step.clone(),
                path: segments[3..].to_vec(),
            })
        }
        Some("saga") => match segments.get(1).map(String::as_str) {
            Some(field @ ("name" | "namespace" | "uid")) if segments.len() == 2 => {
                Ok(Reference::Saga(field.to_string()))
            }
            _ => Err(TemplateError::new(
                expression,
                "saga fields are saga.name, saga.namespace and saga.uid",
            )),
        },
        _ => Err(TemplateError::new(
            expression,
            "expressions start with input, steps or saga",
        )),
    }
}

/// Every reference in a template string.
pub fn references(template: &str) -> Result<Vec<(String, Reference)>, TemplateError> {
    pieces(template)?
        .into_iter()
        .filter_map(|p| match p {
            Piece::Expr(e) => Some(parse_reference(e).map(|r| (e.to_string(), r))),
            Piece::Text(_) => None,
        })
        .collect()
}

/// Every reference in the string values of a JSON body.
pub fn json_references(body: &Value) -> Result<Vec<(String, Reference)>, TemplateError> {
    let mut out = Vec::new();
    visit_strings(body, &mut |s| {
        out.extend(references(s)?);
        Ok(())
    })?;
    Ok(out)
}

fn visit_strings(
    value: &Value,
    f: &mut impl FnMut(&str) -> Result<(), TemplateError>,
) -> Result<(), TemplateError> {
    match value {
        Value::String(s) => f(s),
        Value::Array(items) => items.iter().try_for_each(|v| visit_strings(v, f)),
        Value::Object(map) => map.values().try_for_each(|v| visit_strings(v, f)),
        _ => Ok(()),
    }
}

fn lookup<'v>(
    expression: &str,
    root: &'v Value,
    root_name: &str,
    path: &[String],
) -> Result<&'v Value, TemplateError> {
    let mut current = root;
    let mut walked = root_name.to_string();
    for segment in path {
        current = match current {
            Value::Object(map) => map.get(segment),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        }
        .ok_or_else(|| {
            TemplateError::new(expression, format!("{walked} has no field {segment:?}"))
        })?;
        walked = format!("{walked}.{segment}");
    }
    Ok(current)
}

fn resolve(expression: &str, scope: &Scope<'_>) -> Result<Value, TemplateError> {
    match parse_reference(expression)? {
        Reference::Input(path) => {
            let input = scope
                .input
                .ok_or_else(|| TemplateError::new(expression, "the saga has no input"))?;
            lookup(expression, input, "input", &path).cloned()
        }
        Reference::StepOutput { step, path } => {
            let output = scope.outputs.get(step.as_str()).ok_or_else(|| {
                TemplateError::new(expression, format!("step {step:?} has no output (yet)"))
            })?;
            lookup(expression, output, &format!("steps.{step}.output"), &path).cloned()
        }
        Reference::Saga(field) => Ok(Value::String(
            match field.as_str() {
                "name" => scope.saga_name,
                "namespace" => scope.saga_namespace,
                _ => scope.saga_uid,
            }
            .to_string(),
        )),
    }
}

fn as_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn render_with(
    template: &str,
    scope: &Scope<'_>,
    encode: impl Fn(&str) -> String,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    for piece in pieces(template)? {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Expr(e) => out.push_str(&encode(&as_text(&resolve(e, scope)?))),
        }
    }
    Ok(out)
}

/// Renders a string template as text.
pub fn render_text(template: &str, scope: &Scope<'_>) -> Result<String, TemplateError> {
    render_with(template, scope, str::to_string)
}

/// Renders a request path: substituted values are percent-encoded (RFC 3986 unreserved
/// characters stay), so a value can never add path segments or a query.
pub fn render_path(template: &str, scope: &Scope<'_>) -> Result<String, TemplateError> {
    render_with(template, scope, |value| {
        let mut encoded = String::with_capacity(value.len());
        for byte in value.bytes() {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
                encoded.push(byte as char);
            } else {
                encoded.push_str(&format!("%{byte:02X}"));
            }
        }
        encoded
    })
}

/// Renders a header value; refuses values that would break the header (CR, LF, NUL).
pub fn render_header(template: &str, scope: &Scope<'_>) -> Result<String, TemplateError> {
    let value = render_text(template, scope)?;
    if value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
        return Err(TemplateError::new(
            template,
            "renders to a header value with CR, LF or NUL",
        ));
    }
    Ok(value)
}

/// Renders a JSON body (see the module docs for how types are kept).
pub fn render_json(body: &Value, scope: &Scope<'_>) -> Result<Value, TemplateError> {
    Ok(match body {
        Value::String(s) => {
            let parts = pieces(s)?;
            match parts.as_slice() {
                [Piece::Expr(e)] => resolve(e, scope)?,
                _ => Value::String(render_text(s, scope)?),
            }
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render_json(v, scope))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_json(v, scope)?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope<'a>(input: &'a Value, outputs: &'a [(&'a str, Value)]) -> Scope<'a> {
        Scope {
            input: Some(input),
            outputs: outputs.iter().map(|(k, v)| (*k, v)).collect(),
            saga_name: "order-1",
            saga_namespace: "shop",
            saga_uid: "uid-1",
        }
    }

    #[test]
    fn renders_input_and_outputs_in_text() {
        let input = json!({"orderId": "1001", "qty": 3, "items": [{"sku": "apple"}]});
        let outputs = [("reserve", json!({"id": "r-9"}))];
        let s = scope(&input, &outputs);
        assert_eq!(
            render_text(
                "order {{ input.orderId }} x{{input.qty}} {{ steps.reserve.output.id }}",
                &s
            ),
            Ok("order 1001 x3 r-9".into())
        );
        assert_eq!(
            render_text("{{ input.items[0].sku }}", &s),
            Ok("apple".into())
        );
        assert_eq!(
            render_text("{{ input.items.0.sku }}", &s),
            Ok("apple".into())
        );
        assert_eq!(
            render_text("{{ saga.uid }}/{{ saga.name }}", &s),
            Ok("uid-1/order-1".into())
        );
        assert_eq!(render_text("no templates", &s), Ok("no templates".into()));
    }

    #[test]
    fn paths_are_percent_encoded() {
        let input = json!({"id": "a/b?c=d e"});
        let s = scope(&input, &[]);
        assert_eq!(
            render_path("/orders/{{ input.id }}", &s),
            Ok("/orders/a%2Fb%3Fc%3Dd%20e".into())
        );
    }

    #[test]
    fn json_bodies_keep_types() {
        let input = json!({"items": [1, 2], "amount": 12.5, "id": "7"});
        let s = scope(&input, &[]);
        let body = json!({"items": "{{ input.items }}", "amount": "{{input.amount}}", "note": "order {{ input.id }}", "n": 1});
        assert_eq!(
            render_json(&body, &s),
            Ok(json!({"items": [1, 2], "amount": 12.5, "note": "order 7", "n": 1}))
        );
    }

    #[test]
    fn errors_name_the_expression() {
        let input = json!({"orderId": "1"});
        let s = scope(&input, &[]);
        let e = render_text("{{ input.customer.id }}", &s).unwrap_err();
        assert_eq!(e.expression, "input.customer.id");
        assert!(e.reason.contains("no field \"customer\""), "{e}");
        let e = render_text("{{ steps.charge.output.id }}", &s).unwrap_err();
        assert!(e.reason.contains("step \"charge\" has no output"), "{e}");
        assert!(
            render_text("{{ input.orderId", &s)
                .unwrap_err()
                .reason
                .contains("unterminated")
        );
        assert!(render_text("{{ env.HOME }}", &s).is_err());
        assert!(render_text("{{ steps.x.status }}", &s).is_err());
        assert!(render_text("{{ input.a[x] }}", &s).is_err());
        assert!(render_text("{{ }}", &s).is_err());
        assert_eq!(
            e.to_string(),
            "{{ steps.charge.output.id }}: step \"charge\" has no output (yet)"
        );
    }

    #[test]
    fn header_values_cannot_inject_lines() {
        let input = json!({"evil": "a\r\nX-Admin: 1"});
        let s = scope(&input, &[]);
        assert!(render_header("{{ input.evil }}", &s).is_err());
    }

    #[test]
    fn references_are_listed_for_validation() {
        let refs = json_references(&json!({"a": ["{{ steps.one.output.id }}", "x {{ input.y }}"]}))
            .unwrap();
        assert_eq!(
            refs.into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
            vec![
                Reference::StepOutput {
                    step: "one".into(),
                    path: vec!["id".into()]
                },
                Reference::Input(vec!["y".into()]),
            ]
        );
    }
}
