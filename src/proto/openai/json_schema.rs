//! The JSON-schema subset that constrained decoding follows, compiled into a
//! small graph of value kinds ([`JsonGrammar`]). Every server checks a
//! request's schema with [`JsonGrammar::from_schema`] before anything runs,
//! so an unsupported keyword is a 400 naming it wherever the body is sent;
//! the engine walks the same graph byte by byte.
//!
//! Supported: `type` (one or a list), `properties`, `required`,
//! `additionalProperties`, `items`, `minItems`, `maxItems`, `minLength`,
//! `maxLength`, `enum`, `const`,
//! `anyOf`, `$ref` to `#/$defs/…` or `#/definitions/…`, and the annotations
//! (`title`, `description`, `default`, `examples`, …), which constrain
//! nothing. An object with `properties` is written with those keys only
//! (each at most once, every `required` one present), which is valid whether
//! or not the schema allows others.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// An index into [`JsonGrammar::nodes`].
pub type NodeId = u32;

/// Caps that keep a schema's automaton small whatever a client sends.
pub const MAX_SCHEMA_NODES: usize = 2048;
/// Properties of one object (the automaton keeps a 64-bit seen set).
pub const MAX_PROPERTIES: usize = 64;
/// Values of one `enum`.
pub const MAX_ENUM: usize = 64;
/// Bytes of one `enum`/`const` value or property name, as JSON text.
pub const MAX_LITERAL_BYTES: usize = 1024;
/// Nesting of subschemas.
const MAX_DEPTH: usize = 64;

/// The well-known nodes every grammar starts with, for free-form values.
pub const ANY: NodeId = 0;
/// An object with any keys and any values.
pub const ANY_OBJECT: NodeId = 1;
/// An array of any values.
pub const ANY_ARRAY: NodeId = 2;
/// `true`, `false` or `null`.
pub const ANY_KEYWORD: NodeId = 3;
/// Any string.
pub const ANY_STRING: NodeId = 4;

/// One kind of value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaNode {
    /// Any JSON value.
    Any,
    /// An object. With `props` non-empty only those keys are written;
    /// otherwise any key, with values of `extra` (`None`: no key at all).
    Object {
        /// Each property's key as JSON string text without its opening quote
        /// (escaped, closing quote included), and its value's node.
        props: Vec<(Vec<u8>, NodeId)>,
        /// Bit i: property i is required.
        required: u64,
        extra: Option<NodeId>,
    },
    Array {
        items: NodeId,
        min: u32,
        max: Option<u32>,
    },
    /// A string of `min` to `max` characters.
    String {
        min: u32,
        max: Option<u32>,
    },
    Number {
        integer: bool,
    },
    /// Exactly one of these JSON texts (compact).
    Literals(Vec<Vec<u8>>),
    AnyOf(Vec<NodeId>),
}

/// A compiled schema: the graph and its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonGrammar {
    pub nodes: Vec<SchemaNode>,
    pub root: NodeId,
}

/// Why a schema is refused: the keyword (or `schema` itself) and the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at {path})")]
pub struct SchemaError {
    /// The keyword at fault, for the error's `param`.
    pub keyword: String,
    /// A JSON pointer into the schema.
    pub path: String,
    pub message: String,
}

/// Keywords that describe and constrain nothing.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
    "strict",
];

/// Keywords the compiler reads.
const UNDERSTOOD: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "enum",
    "const",
    "anyOf",
    "$ref",
];

impl JsonGrammar {
    fn base() -> Self {
        JsonGrammar {
            nodes: vec![
                SchemaNode::Any,
                SchemaNode::Object {
                    props: Vec::new(),
                    required: 0,
                    extra: Some(ANY),
                },
                SchemaNode::Array {
                    items: ANY,
                    min: 0,
                    max: None,
                },
                SchemaNode::Literals(vec![b"true".to_vec(), b"false".to_vec(), b"null".to_vec()]),
                SchemaNode::String { min: 0, max: None },
            ],
            root: ANY,
        }
    }

    /// `response_format: {"type": "json_object"}`: one object, any content.
    pub fn any_object() -> Self {
        JsonGrammar {
            root: ANY_OBJECT,
            ..Self::base()
        }
    }

    /// Compile a JSON schema, refusing what the subset does not cover.
    pub fn from_schema(schema: &Value) -> Result<Self, SchemaError> {
        let mut c = Compiler {
            g: Self::base(),
            root: schema,
            refs: HashMap::new(),
        };
        let root = c.compile(schema, "#", 0)?;
        c.g.root = root;
        Ok(c.g)
    }
}

struct Compiler<'a> {
    g: JsonGrammar,
    root: &'a Value,
    /// `$ref` targets compiled (or being compiled: recursion is allowed).
    refs: HashMap<String, NodeId>,
}

fn err(keyword: &str, path: &str, message: impl Into<String>) -> SchemaError {
    SchemaError {
        keyword: keyword.to_string(),
        path: path.to_string(),
        message: message.into(),
    }
}

/// A JSON string's text, escaped as serde_json writes it.
fn json_text(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

impl Compiler<'_> {
    fn push(&mut self, node: SchemaNode, path: &str) -> Result<NodeId, SchemaError> {
        if self.g.nodes.len() >= MAX_SCHEMA_NODES {
            return Err(err(
                "schema",
                path,
                format!("the schema is too large (over {MAX_SCHEMA_NODES} subschemas)"),
            ));
        }
        self.g.nodes.push(node);
        Ok((self.g.nodes.len() - 1) as NodeId)
    }

    fn compile(&mut self, s: &Value, path: &str, depth: usize) -> Result<NodeId, SchemaError> {
        if depth > MAX_DEPTH {
            return Err(err("schema", path, "the schema nests too deeply"));
        }
        let o = match s {
            Value::Bool(true) => return Ok(ANY),
            Value::Object(o) => o,
            _ => return Err(err("schema", path, "a schema must be an object or true")),
        };
        if let Some(k) = o
            .keys()
            .find(|k| !UNDERSTOOD.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str()))
        {
            return Err(err(
                k,
                path,
                format!("unsupported JSON schema keyword {k:?} in response_format"),
            ));
        }
        if let Some(r) = o.get("$ref") {
            if o.keys()
                .any(|k| UNDERSTOOD.contains(&k.as_str()) && k != "$ref")
            {
                return Err(err("$ref", path, "$ref beside other constraints"));
            }
            return self.reference(r, path, depth);
        }
        if let Some(c) = o.get("const") {
            return self.literals(std::slice::from_ref(c), "const", path);
        }
        if let Some(e) = o.get("enum") {
            let values = e
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| err("enum", path, "enum must be a non-empty array"))?;
            return self.literals(values, "enum", path);
        }
        if let Some(any) = o.get("anyOf") {
            if o.contains_key("type") {
                return Err(err("anyOf", path, "anyOf beside type"));
            }
            let alts = any
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| err("anyOf", path, "anyOf must be a non-empty array"))?;
            let mut ids = Vec::with_capacity(alts.len());
            for (i, a) in alts.iter().enumerate() {
                ids.push(self.compile(a, &format!("{path}/anyOf/{i}"), depth + 1)?);
            }
            return self.push(SchemaNode::AnyOf(ids), path);
        }
        let types: Vec<&str> = match o.get("type") {
            None => {
                if o.contains_key("properties") || o.contains_key("additionalProperties") {
                    vec!["object"]
                } else if o.contains_key("items") {
                    vec!["array"]
                } else {
                    return Ok(ANY);
                }
            }
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| err("type", path, "type must name JSON types"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(err("type", path, "type must name JSON types")),
        };
        let mut ids = Vec::with_capacity(types.len());
        for t in types {
            ids.push(self.typed(t, o, path, depth)?);
        }
        if ids.len() == 1 {
            Ok(ids[0])
        } else {
            self.push(SchemaNode::AnyOf(ids), path)
        }
    }

    fn reference(&mut self, r: &Value, path: &str, depth: usize) -> Result<NodeId, SchemaError> {
        let r = r
            .as_str()
            .ok_or_else(|| err("$ref", path, "$ref must be a string"))?;
        if let Some(&id) = self.refs.get(r) {
            return Ok(id);
        }
        let target = ["#/$defs/", "#/definitions/"]
            .iter()
            .find_map(|p| {
                let name = r.strip_prefix(p)?;
                self.root.get(&p[2..p.len() - 1])?.get(name)
            })
            .ok_or_else(|| {
                err(
                    "$ref",
                    path,
                    "only $ref to #/$defs/NAME or #/definitions/NAME of this schema is supported",
                )
            })?;
        // Reserve the node first so that a recursive reference finds it.
        let id = self.push(SchemaNode::Any, path)?;
        self.refs.insert(r.to_string(), id);
        let body = self.compile(target, r, depth + 1)?;
        let node = self.g.nodes[body as usize].clone();
        self.g.nodes[id as usize] = node;
        Ok(id)
    }

    fn literals(&mut self, values: &[Value], kw: &str, path: &str) -> Result<NodeId, SchemaError> {
        if values.len() > MAX_ENUM {
            return Err(err(kw, path, format!("at most {MAX_ENUM} enum values")));
        }
        let mut texts: Vec<Vec<u8>> = values.iter().map(json_text).collect();
        if texts.iter().any(|t| t.len() > MAX_LITERAL_BYTES) {
            return Err(err(
                kw,
                path,
                format!("enum and const values are at most {MAX_LITERAL_BYTES} bytes"),
            ));
        }
        texts.sort();
        texts.dedup();
        self.push(SchemaNode::Literals(texts), path)
    }

    fn typed(
        &mut self,
        t: &str,
        o: &Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<NodeId, SchemaError> {
        match t {
            "string" => self.string(o, path),
            "number" => self.push(SchemaNode::Number { integer: false }, path),
            "integer" => self.push(SchemaNode::Number { integer: true }, path),
            "boolean" => self.push(
                SchemaNode::Literals(vec![b"false".to_vec(), b"true".to_vec()]),
                path,
            ),
            "null" => self.push(SchemaNode::Literals(vec![b"null".to_vec()]), path),
            "object" => self.object(o, path, depth),
            "array" => self.array(o, path, depth),
            other => Err(err(
                "type",
                path,
                format!(
                    "unknown type {:?}",
                    other.chars().take(32).collect::<String>()
                ),
            )),
        }
    }

    fn string(&mut self, o: &Map<String, Value>, path: &str) -> Result<NodeId, SchemaError> {
        let min = count(o, "minLength", path)?.unwrap_or(0);
        let max = count(o, "maxLength", path)?;
        if max.is_some_and(|m| m < min) {
            return Err(err("maxLength", path, "maxLength is below minLength"));
        }
        if min == 0 && max.is_none() {
            return Ok(ANY_STRING);
        }
        self.push(SchemaNode::String { min, max }, path)
    }

    fn object(
        &mut self,
        o: &Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<NodeId, SchemaError> {
        let props = match o.get("properties") {
            None => Map::new(),
            Some(Value::Object(p)) => p.clone(),
            Some(_) => return Err(err("properties", path, "properties must be an object")),
        };
        if props.len() > MAX_PROPERTIES {
            return Err(err(
                "properties",
                path,
                format!("at most {MAX_PROPERTIES} properties per object"),
            ));
        }
        let required: Vec<&str> = match o.get("required") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| err("required", path, "required must list names"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(err("required", path, "required must list names")),
        };
        let additional = o.get("additionalProperties");
        if props.is_empty() {
            if !required.is_empty() {
                return Err(err(
                    "required",
                    path,
                    "required without properties is not supported",
                ));
            }
            let extra = match additional {
                None | Some(Value::Bool(true)) => Some(ANY),
                Some(Value::Bool(false)) => None,
                Some(s) => {
                    Some(self.compile(s, &format!("{path}/additionalProperties"), depth + 1)?)
                }
            };
            if extra == Some(ANY) {
                return Ok(ANY_OBJECT);
            }
            return self.push(
                SchemaNode::Object {
                    props: Vec::new(),
                    required: 0,
                    extra,
                },
                path,
            );
        }
        if matches!(additional, Some(v) if !v.is_boolean()) {
            return Err(err(
                "additionalProperties",
                path,
                "additionalProperties as a schema beside properties is not supported",
            ));
        }
        let mut out = Vec::with_capacity(props.len());
        let mut req_bits = 0u64;
        for (i, (name, sub)) in props.iter().enumerate() {
            let mut key = json_text(&Value::String(name.clone()));
            if key.len() > MAX_LITERAL_BYTES {
                return Err(err("properties", path, "a property name is too long"));
            }
            key.remove(0);
            let id = self.compile(sub, &format!("{path}/properties/{name}"), depth + 1)?;
            out.push((key, id));
            if required.contains(&name.as_str()) {
                req_bits |= 1 << i;
            }
        }
        if let Some(missing) = required.iter().find(|r| !props.contains_key(**r)) {
            return Err(err(
                "required",
                path,
                format!(
                    "required names {:?}, which is not in properties",
                    missing.chars().take(64).collect::<String>()
                ),
            ));
        }
        self.push(
            SchemaNode::Object {
                props: out,
                required: req_bits,
                extra: None,
            },
            path,
        )
    }

    fn array(
        &mut self,
        o: &Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<NodeId, SchemaError> {
        let items = match o.get("items") {
            None => ANY,
            Some(s) => self.compile(s, &format!("{path}/items"), depth + 1)?,
        };
        let min = count(o, "minItems", path)?.unwrap_or(0);
        let max = count(o, "maxItems", path)?;
        if max.is_some_and(|m| m < min) {
            return Err(err("maxItems", path, "maxItems is below minItems"));
        }
        if items == ANY && min == 0 && max.is_none() {
            return Ok(ANY_ARRAY);
        }
        self.push(SchemaNode::Array { items, min, max }, path)
    }
}

/// A count keyword (`minItems`, `maxLength`, …), when present.
fn count(o: &Map<String, Value>, k: &str, path: &str) -> Result<Option<u32>, SchemaError> {
    match o.get(k) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| err(k, path, format!("{k} must be a count"))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn unsupported_keywords_are_named() {
        for (schema, kw) in [
            (json!({"type": "string", "pattern": "^a"}), "pattern"),
            (
                json!({"type": "object", "properties": {"a": {"type": "number", "minimum": 0}}}),
                "minimum",
            ),
            (json!({"oneOf": [{"type": "string"}]}), "oneOf"),
            (
                json!({"type": "object", "required": ["x"], "properties": {"a": {}}}),
                "required",
            ),
            (json!({"$ref": "http://example.com/s"}), "$ref"),
            (json!({"type": "date"}), "type"),
        ] {
            let e = JsonGrammar::from_schema(&schema).unwrap_err();
            assert_eq!(e.keyword, kw, "{schema}: {e}");
        }
    }

    #[test]
    fn a_typical_schema_compiles() {
        let s = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "who"},
                "age": {"type": "integer"},
                "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3},
                "kind": {"enum": ["a", "b"]},
                "spouse": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/person"}]}
            },
            "required": ["name", "age"],
            "additionalProperties": false,
            "$defs": {
                "tag": {"type": "string"},
                "person": {"type": "object", "properties": {"name": {"type": "string"}}}
            }
        });
        let g = JsonGrammar::from_schema(&s).unwrap();
        let SchemaNode::Object {
            props, required, ..
        } = &g.nodes[g.root as usize]
        else {
            panic!("{g:?}");
        };
        assert_eq!(props.len(), 5);
        // Keys in the map's order (sorted, or as written where serde_json
        // preserves it).
        let at = |k: &[u8]| props.iter().position(|p| p.0 == k).unwrap();
        assert_eq!(*required, (1 << at(b"name\"")) | (1 << at(b"age\"")));
    }
}
