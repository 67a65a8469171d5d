//! The `bazaar` discovery extension of the code-execution 402 (x402 v2
//! `extensions.bazaar`): `info` holds an example call (`input`: an HTTP
//! POST with a JSON body) and an example answer (`output`); `schema` is the
//! JSON Schema (draft 2020-12) that validates `info`, with the full schema
//! of the request body under `input.body` and of the answer under
//! `output.example`, so that a catalogue learns both from the 402 alone.

use serde_json::{json, Value};

/// The JSON Schema of the request body of `POST /api/x402/compute`.
pub fn request_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "stack": {"type": "string", "enum": ["python", "node"], "default": "python",
                "description": "python (python3) or node (Node.js)"},
            "size": {"type": "string", "enum": ["small", "med", "large"], "default": "small",
                "description": "resources and price tier"},
            "timeout_seconds": {"type": "integer", "minimum": 1,
                "description": "wall-clock limit; clamped to the size's maximum"},
            "code": {"type": "string", "minLength": 1, "description": "the program (at most 1 MB)"},
            "files": {"type": "object", "additionalProperties": {"type": "string", "contentEncoding": "base64"},
                "description": "input files, name -> base64 (at most 10 MB decoded)"}
        },
        "required": ["code"]
    })
}

/// The JSON Schema of a 200 answer.
pub fn response_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "stdout": {"type": "string"},
            "stderr": {"type": "string"},
            "exit_code": {"type": "integer"},
            "execution_time_ms": {"type": "integer", "minimum": 0},
            "files": {"type": "object", "additionalProperties": {"type": "string", "contentEncoding": "base64"},
                "description": "files the program created or changed, name -> base64"},
            "stack": {"type": "string", "enum": ["python", "node"]},
            "size": {"type": "string", "enum": ["small", "med", "large"]},
            "sandbox_id": {"type": "string"}
        },
        "required": ["stdout", "stderr", "exit_code", "execution_time_ms", "files", "stack", "size", "sandbox_id"]
    })
}

/// An example request body.
pub fn input_example() -> Value {
    json!({"code": "print('Hello!')", "stack": "python", "size": "small"})
}

/// The answer to [`input_example`].
pub fn output_example() -> Value {
    json!({
        "stdout": "Hello!\n", "stderr": "", "exit_code": 0, "execution_time_ms": 42,
        "files": {}, "stack": "python", "size": "small", "sandbox_id": "sbx_0123456789abcdef"
    })
}

/// The `extensions.bazaar` value.
pub fn extension() -> Value {
    json!({
        "info": {
            "input": {
                "type": "http",
                "method": "POST",
                "bodyType": "json",
                "body": input_example(),
            },
            "output": {
                "type": "json",
                "example": output_example(),
            }
        },
        "schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "input": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string", "const": "http"},
                        "method": {"type": "string", "enum": ["POST"]},
                        "bodyType": {"type": "string", "enum": ["json"]},
                        "body": request_schema(),
                        "headers": {"type": "object", "additionalProperties": {"type": "string"}}
                    },
                    "required": ["type", "method", "bodyType", "body"],
                    "additionalProperties": false
                },
                "output": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string", "const": "json"},
                        "example": response_schema()
                    },
                    "required": ["type"]
                }
            },
            "required": ["input"]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checks a catalogue makes, by hand: the examples have the fields
    /// and types the schemas name.
    fn conforms(value: &Value, schema: &Value) -> bool {
        let Some(obj) = value.as_object() else {
            return false;
        };
        let required = schema["required"].as_array().cloned().unwrap_or_default();
        if !required
            .iter()
            .all(|r| r.as_str().is_some_and(|k| obj.contains_key(k)))
        {
            return false;
        }
        obj.iter().all(|(k, v)| {
            let t = &schema["properties"][k]["type"];
            match t.as_str() {
                Some("string") => v.is_string(),
                Some("integer") => v.is_i64() || v.is_u64(),
                Some("object") => v.is_object(),
                _ => false,
            }
        })
    }

    #[test]
    fn examples_match_their_schemas() {
        assert!(conforms(&input_example(), &request_schema()));
        assert!(conforms(&output_example(), &response_schema()));
        let e = extension();
        assert_eq!(e["info"]["input"]["method"], "POST");
        assert_eq!(
            e["schema"]["properties"]["input"]["properties"]["body"],
            request_schema()
        );
        assert_eq!(
            e["schema"]["properties"]["output"]["properties"]["example"],
            response_schema()
        );
        // Small enough for a header (base64 of the whole 402 stays well
        // under the usual 8 KiB header limits).
        assert!(e.to_string().len() < 4096, "{}", e.to_string().len());
    }
}
