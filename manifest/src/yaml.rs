//! YAML documents read with the parser's own positions: each document becomes a JSON value and
//! a table from field paths (`spec.steps[1].action.path`) to the line the field is on, so an
//! error can point at its line whatever the YAML style (block, flow, quoted keys, anchors).

use std::collections::HashMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_saphyr::Spanned;

/// One YAML node, with the positions of everything under it.
#[derive(Debug)]
enum Node {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<Node>, Spanned<Node>)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value")
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
        Ok(Node::UInt(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Node>>()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<Spanned<Node>, Spanned<Node>>()? {
            entries.push(entry);
        }
        Ok(Node::Map(entries))
    }
}

/// One document: its JSON value, the line it starts on and where each field is.
#[derive(Debug)]
pub(crate) struct Document {
    pub value: Value,
    /// 1-based line of the document's first node.
    pub line: usize,
    lines: HashMap<String, usize>,
}

impl Document {
    /// The line of `field` (`spec.steps[1].action.path`; a leading `.` is ignored), or of the
    /// nearest enclosing field that exists (a missing field is reported at its parent), or the
    /// document's first line.
    pub fn line_of(&self, field: &str) -> usize {
        let mut field = field.trim_start_matches('.');
        loop {
            if let Some(line) = self.lines.get(field) {
                return *line;
            }
            match field.rfind(['.', '[']) {
                Some(cut) => field = &field[..cut],
                None => return self.line,
            }
        }
    }
}

/// Why a YAML stream could not be read (from the position the parser reports).
#[derive(Debug)]
pub(crate) struct YamlError {
    /// 1-based line, when the parser knows it.
    pub line: Option<usize>,
    pub message: String,
}

/// Every document of `text`, in order. A document whose value cannot be used (a key that is not
/// a scalar) is an error of its own and the next document is read; a syntax error ends the
/// stream, and the documents after it are not read.
pub(crate) fn documents(text: &str) -> Vec<Result<Document, YamlError>> {
    let mut reader = std::io::Cursor::new(text.as_bytes());
    serde_saphyr::read::<_, Spanned<Node>>(&mut reader)
        .map(|doc| match doc {
            Ok(node) => document(node),
            Err(e) => Err(YamlError {
                line: e
                    .location()
                    .map(|l| usize::try_from(l.line()).unwrap_or(usize::MAX)),
                message: e
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("invalid YAML")
                    .to_string(),
            }),
        })
        .collect()
}

fn line(node: &Spanned<Node>) -> usize {
    usize::try_from(node.referenced.line()).unwrap_or(usize::MAX)
}

fn document(root: Spanned<Node>) -> Result<Document, YamlError> {
    let start = line(&root);
    let mut lines = HashMap::new();
    let value = to_json(root, String::new(), &mut lines)?;
    Ok(Document {
        value,
        line: start,
        lines,
    })
}

fn to_json(
    node: Spanned<Node>,
    path: String,
    lines: &mut HashMap<String, usize>,
) -> Result<Value, YamlError> {
    Ok(match node.value {
        Node::Null => Value::Null,
        Node::Bool(b) => Value::Bool(b),
        Node::Int(i) => Value::from(i),
        Node::UInt(u) => Value::from(u),
        Node::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        Node::Str(s) => Value::String(s),
        Node::Seq(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                let item_path = format!("{path}[{i}]");
                lines.insert(item_path.clone(), line(&item));
                out.push(to_json(item, item_path, lines)?);
            }
            Value::Array(out)
        }
        Node::Map(entries) => {
            let mut out = serde_json::Map::new();
            for (key, value) in entries {
                let key_line = line(&key);
                let name = match key.value {
                    Node::Str(s) => s,
                    Node::Int(i) => i.to_string(),
                    Node::UInt(u) => u.to_string(),
                    Node::Bool(b) => b.to_string(),
                    _ => {
                        return Err(YamlError {
                            line: Some(key_line),
                            message: "a mapping key must be a scalar".into(),
                        });
                    }
                };
                let child = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                lines.insert(child.clone(), key_line);
                out.insert(name, to_json(value, child, lines)?);
            }
            Value::Object(out)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_have_the_parsers_lines_in_any_style() {
        let text = "# comment\napiVersion: v1\nspec:\n  steps:\n    - name: a\n    - {name: b, action: {path: x}}\n  \"quoted\": 1\n---\nkind: Saga\n";
        let docs = documents(text);
        assert_eq!(docs.len(), 2);
        let first = docs[0].as_ref().expect("first");
        assert_eq!(first.value["spec"]["steps"][1]["action"]["path"], "x");
        assert_eq!(first.line_of("apiVersion"), 2);
        assert_eq!(first.line_of("spec.steps[0].name"), 5);
        assert_eq!(first.line_of("spec.steps[1].action.path"), 6);
        assert_eq!(first.line_of(".spec.quoted"), 7);
        // Missing: the nearest field that exists.
        assert_eq!(first.line_of("spec.steps[1].action.service"), 6);
        assert_eq!(first.line_of("spec.ports"), 3);
        let second = docs[1].as_ref().expect("second");
        assert_eq!(second.line_of("kind"), 9);
        assert_eq!(second.line, 9);
    }

    #[test]
    fn a_syntax_error_names_its_line() {
        let docs = documents("a: 1\n---\nb: [unclosed\n");
        assert!(docs[0].is_ok());
        let error = docs
            .iter()
            .find_map(|d| d.as_ref().err())
            .expect("an error");
        assert_eq!(error.line, Some(3), "{error:?}");
    }
}
