//! A small builder for the documents: operations as JSON objects, schemas
//! taken from `ToSchema` types and kept once each under
//! `components/schemas`.

use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::proto::routes;

/// A document being assembled.
#[derive(Default)]
pub(super) struct Doc {
    paths: Map<String, Value>,
    schemas: Map<String, Value>,
}

impl Doc {
    /// A `$ref` to `T`'s schema; `T` and every type it names are added to
    /// the components.
    pub fn schema<T: ToSchema>(&mut self) -> Value {
        let mut named = Vec::new();
        T::schemas(&mut named);
        for (name, schema) in named {
            self.schemas
                .insert(name, serde_json::to_value(schema).unwrap_or_default());
        }
        let name = T::name().into_owned();
        self.schemas.insert(
            name.clone(),
            serde_json::to_value(T::schema()).unwrap_or_default(),
        );
        json!({ "$ref": format!("#/components/schemas/{name}") })
    }

    /// A schema written out, under `name`, for a body that has no wire type
    /// (an ad-hoc JSON object of a handler).
    pub fn named(&mut self, name: &str, schema: Value) -> Value {
        self.schemas.insert(name.to_string(), schema);
        json!({ "$ref": format!("#/components/schemas/{name}") })
    }

    /// Add `op` as `method` (lower case) of `path`.
    pub fn add(&mut self, method: &str, path: &str, op: Op) {
        let mut op = op.0;
        // Path parameters, from the template: every one is an id string.
        let mut params: Vec<Value> = path
            .split('{')
            .skip(1)
            .filter_map(|s| s.split('}').next())
            .map(|name| {
                json!({"name": name, "in": "path", "required": true,
                       "schema": {"type": "string", "minLength": 1}})
            })
            .collect();
        if let Some(Value::Array(query)) = op.remove("parameters") {
            params.extend(query);
        }
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        let item = self
            .paths
            .entry(path.to_string())
            .or_insert_with(|| json!({}));
        item[method] = Value::Object(op);
    }

    /// The whole document.
    pub fn finish(self, title: &str, description: &str, security: Value) -> Value {
        json!({
            "openapi": "3.1.0",
            "info": {
                "title": title,
                "description": description,
                "version": env!("CARGO_PKG_VERSION"),
                "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
            },
            "paths": self.paths,
            "components": {
                "schemas": self.schemas,
                "securitySchemes": security,
            },
        })
    }
}

/// One operation.
pub(super) struct Op(Map<String, Value>);

impl Op {
    pub fn new(id: &str, tag: &str, summary: &str) -> Op {
        let mut m = Map::new();
        m.insert("operationId".into(), json!(id));
        m.insert("tags".into(), json!([tag]));
        m.insert("summary".into(), json!(summary));
        m.insert("responses".into(), json!({}));
        Op(m)
    }

    pub fn describe(mut self, text: &str) -> Op {
        self.0.insert("description".into(), json!(text));
        self
    }

    /// A query parameter (a string unless `schema` says otherwise).
    pub fn query(mut self, name: &str, description: &str, schema: Value) -> Op {
        let params = self
            .0
            .entry("parameters")
            .or_insert_with(|| Value::Array(vec![]));
        if let Value::Array(p) = params {
            p.push(json!({"name": name, "in": "query", "required": false,
                          "description": description, "schema": schema}));
        }
        self
    }

    /// The security schemes any one of which the operation takes.
    pub fn auth(mut self, schemes: &[&str]) -> Op {
        let any: Vec<Value> = schemes
            .iter()
            .map(|s| {
                let mut one = Map::new();
                one.insert(s.to_string(), json!([]));
                Value::Object(one)
            })
            .collect();
        self.0.insert("security".into(), Value::Array(any));
        self
    }

    /// A JSON request body of `schema`.
    pub fn body(mut self, schema: Value, required: bool) -> Op {
        self.0.insert(
            "requestBody".into(),
            json!({"required": required,
                   "content": {"application/json": {"schema": schema}}}),
        );
        self
    }

    /// A response of `status` with `content` (media type to schema).
    pub fn answer(mut self, status: u16, description: &str, content: &[(&str, Value)]) -> Op {
        let mut r = json!({ "description": description });
        if !content.is_empty() {
            let c: Map<String, Value> = content
                .iter()
                .map(|(ct, schema)| (ct.to_string(), json!({ "schema": schema })))
                .collect();
            r["content"] = Value::Object(c);
        }
        self.0["responses"][status.to_string()] = r;
        self
    }

    /// A JSON response of `status`.
    pub fn json(self, status: u16, description: &str, schema: Value) -> Op {
        self.answer(status, description, &[("application/json", schema)])
    }

    /// A 402 with its challenge, as JSON or an RFC 9457 problem.
    pub fn payment_required(self, challenge: &Value) -> Op {
        self.answer(
            402,
            reason(402),
            &[
                ("application/json", challenge.clone()),
                ("application/problem+json", challenge.clone()),
            ],
        )
    }

    /// Error responses, all with `schema` (the API's error shape).
    pub fn errors(mut self, statuses: &[u16], schema: &Value) -> Op {
        for s in statuses {
            self = self.json(*s, reason(*s), schema.clone());
        }
        self
    }
}

/// Why a status is answered, in a word or two.
fn reason(status: u16) -> &'static str {
    match status {
        400 => "Invalid request",
        401 => "Missing or invalid credentials",
        402 => "Payment required",
        403 => "Not allowed for these credentials",
        404 => "No such resource, or a route this server does not serve (`not_supported`)",
        408 => "The work took longer than allowed",
        409 => "Conflicts with the resource's state",
        413 => "Request body too large",
        415 => "Body not labelled application/json",
        422 => "Body of the wrong shape",
        426 => "A WebSocket upgrade is required",
        429 => "Too many requests; retry later",
        500 => "Internal error",
        502 => "An upstream (node, provider, facilitator) failed",
        503 => "No capacity or not ready; retry later",
        504 => "The node did not answer in time",
        _ => "Error",
    }
}

/// Any JSON object (a body whose keys vary: a policy, a listing that
/// depends on the provider).
pub(super) fn any_object(description: &str) -> Value {
    json!({"type": "object", "description": description})
}

/// A plain-text body.
pub(super) fn text() -> Value {
    json!({"type": "string"})
}

/// `/metrics` and `/openapi.json`, which both servers answer alike.
pub(super) fn add_metrics_and_document(d: &mut Doc) {
    d.add(
        "get",
        routes::METRICS,
        Op::new("metrics", "operations", "Prometheus metrics").answer(
            200,
            "The Prometheus text format",
            &[("text/plain", text())],
        ),
    );
    d.add(
        "get",
        routes::OPENAPI,
        Op::new("openapi", "operations", "This document").json(
            200,
            "OpenAPI 3.1",
            any_object("An OpenAPI document"),
        ),
    );
}
