//! OpenAI's `response_format`: `{"type": "text"}` (the default),
//! `{"type": "json_object"}` and `{"type": "json_schema", "json_schema":
//! {"name", "schema", "strict"}}`. The two JSON kinds become a
//! [`JsonGrammar`] the engine decodes under; anything else is a 400 naming
//! the field or schema keyword at fault.

use std::sync::Arc;

use serde_json::Value;

use super::json_schema::{JsonGrammar, SchemaError};

/// The longest `json_schema.name` OpenAI takes.
const MAX_NAME: usize = 64;

/// Why a `response_format` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseFormatError {
    #[error("response_format: {0}")]
    Shape(String),
    #[error("response_format.json_schema.schema: {0}")]
    Schema(SchemaError),
}

impl ResponseFormatError {
    /// The parameter at fault (OpenAI's `param`): the schema keyword when a
    /// keyword is refused.
    pub fn param(&self) -> String {
        match self {
            ResponseFormatError::Shape(_) => "response_format".into(),
            ResponseFormatError::Schema(e) if e.keyword == "schema" => {
                "response_format.json_schema.schema".into()
            }
            ResponseFormatError::Schema(e) => e.keyword.clone(),
        }
    }
}

/// The grammar a `response_format` value asks for: `None` for plain text
/// (`{"type": "text"}` or `null`).
pub fn parse(v: &Value) -> Result<Option<Arc<JsonGrammar>>, ResponseFormatError> {
    let shape = |m: &str| ResponseFormatError::Shape(m.to_string());
    let o = match v {
        Value::Null => return Ok(None),
        Value::Object(o) => o,
        _ => return Err(shape("must be an object with a type")),
    };
    match o.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Arc::new(JsonGrammar::any_object()))),
        Some("json_schema") => {
            let js = o
                .get("json_schema")
                .and_then(Value::as_object)
                .ok_or_else(|| shape("type json_schema needs a json_schema object"))?;
            match js.get("name").and_then(Value::as_str) {
                Some(n)
                    if !n.is_empty()
                        && n.len() <= MAX_NAME
                        && n.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') => {}
                _ => {
                    return Err(shape(
                        "json_schema.name must be 1 to 64 letters, digits, _ or -",
                    ))
                }
            }
            if js
                .get("strict")
                .is_some_and(|s| !s.is_boolean() && !s.is_null())
            {
                return Err(shape("json_schema.strict must be a boolean"));
            }
            // OpenAI's default schema is an empty one: any JSON value.
            let schema = js.get("schema").cloned().unwrap_or(Value::Bool(true));
            JsonGrammar::from_schema(&schema)
                .map(|g| Some(Arc::new(g)))
                .map_err(ResponseFormatError::Schema)
        }
        _ => Err(shape(
            "type must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_three_kinds() {
        assert_eq!(parse(&json!({"type": "text"})), Ok(None));
        assert_eq!(parse(&Value::Null), Ok(None));
        assert!(parse(&json!({"type": "json_object"})).unwrap().is_some());
        let s = json!({"type": "json_schema", "json_schema": {"name": "p", "strict": true,
                "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}});
        assert!(parse(&s).unwrap().is_some());
        let e = parse(&json!({"type": "json_schema", "json_schema": {"name": "p",
                "schema": {"type": "string", "format": "email"}}}))
        .unwrap_err();
        assert_eq!(e.param(), "format");
        assert!(e.to_string().contains("format"), "{e}");
        for bad in [
            json!({"type": "xml"}),
            json!("json"),
            json!({"type": "json_schema"}),
            json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
        ] {
            assert_eq!(parse(&bad).unwrap_err().param(), "response_format", "{bad}");
        }
    }
}
