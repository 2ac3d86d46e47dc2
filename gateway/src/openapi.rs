//! The OpenAPI 3.1 document of the REST surface, derived from the same routes the gateway
//! serves, with each route's auth requirement.

use std::collections::BTreeMap;

use prost_reflect::{Kind, MessageDescriptor};
use serde_json::{Value, json};

use crate::router::{Access, BodyRule, Router};

fn schema_name(m: &MessageDescriptor) -> String {
    m.full_name().to_owned()
}

fn field_schema(kind: &Kind, todo: &mut Vec<MessageDescriptor>) -> Value {
    match kind {
        Kind::String => json!({"type": "string"}),
        Kind::Bool => json!({"type": "boolean"}),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => {
            json!({"type": "integer", "format": "int32"})
        }
        // proto3 JSON writes 64-bit integers as strings.
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            json!({"type": "string", "format": "int64"})
        }
        Kind::Float | Kind::Double => json!({"type": "number"}),
        Kind::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
        Kind::Enum(e) => {
            json!({"type": "string", "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>()})
        }
        Kind::Message(m) if m.full_name() == "google.protobuf.Timestamp" => {
            json!({"type": "string", "format": "date-time"})
        }
        Kind::Message(m) => {
            todo.push(m.clone());
            json!({"$ref": format!("#/components/schemas/{}", schema_name(m))})
        }
    }
}

fn message_schema(m: &MessageDescriptor, todo: &mut Vec<MessageDescriptor>) -> Value {
    let mut props = serde_json::Map::new();
    for f in m.fields() {
        let s = if f.is_map() {
            let value_kind = match f.kind() {
                Kind::Message(entry) => entry.map_entry_value_field().kind(),
                k => k,
            };
            json!({"type": "object", "additionalProperties": field_schema(&value_kind, todo)})
        } else if f.is_list() {
            json!({"type": "array", "items": field_schema(&f.kind(), todo)})
        } else {
            field_schema(&f.kind(), todo)
        };
        props.insert(f.json_name().to_owned(), s);
    }
    json!({"type": "object", "properties": props})
}

/// The document, as JSON.
pub fn document(router: &Router) -> Value {
    let mut paths: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    let mut todo: Vec<MessageDescriptor> = Vec::new();
    for r in router.routes() {
        // OpenAPI paths have no custom verbs; `{id}:archive` stays literal in the key.
        let path = r.template.to_string();
        let input = r.method.input();
        let mut params = Vec::new();
        let bound: Vec<String> = path
            .split('/')
            .filter_map(|s| {
                s.strip_prefix('{')
                    .and_then(|s| s.split('}').next())
                    .map(str::to_owned)
            })
            .collect();
        for b in &bound {
            params.push(
                json!({"name": b, "in": "path", "required": true, "schema": {"type": "string"}}),
            );
        }
        if r.body == BodyRule::None {
            for f in input.fields().filter(|f| {
                !bound.contains(&f.name().to_owned()) && !matches!(f.kind(), Kind::Message(_))
            }) {
                params.push(json!({"name": f.name(), "in": "query", "required": false, "schema": field_schema(&f.kind(), &mut todo)}));
            }
        }
        let mut op = json!({
            "operationId": r.method.name(),
            "summary": format!("{} ({})", r.method.name(), r.grpc_path),
            "tags": [r.service],
            "parameters": params,
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": field_schema(&Kind::Message(r.method.output()), &mut todo)}}},
                "default": {"description": "An error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            },
        });
        if r.body != BodyRule::None {
            op["requestBody"] = json!({"required": false, "content": {"application/json": {"schema": field_schema(&Kind::Message(input.clone()), &mut todo)}}});
        }
        match r.access {
            Access::Public => op["security"] = json!([]),
            Access::Customer => {
                op["security"] = json!([{"bearer": []}]);
                op["x-shopverse-role"] = json!("customer");
            }
            Access::Admin => {
                op["security"] = json!([{"bearer": []}]);
                op["x-shopverse-role"] = json!("admin");
            }
        }
        paths
            .entry(path)
            .or_default()
            .insert(r.http_method.as_str().to_lowercase(), op);
    }
    paths
        .entry(crate::feed::PATH.to_owned())
        .or_default()
        .insert("get".into(), stream_operation());
    let mut schemas = serde_json::Map::new();
    schemas.insert(
        "Error".into(),
        json!({"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string", "description": "the gRPC status name, e.g. NOT_FOUND"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": {"type": "object"}}
        }}),
    );
    while let Some(m) = todo.pop() {
        let name = schema_name(&m);
        if schemas.contains_key(&name) {
            continue;
        }
        let s = message_schema(&m, &mut todo);
        schemas.insert(name, s);
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "ShopVerse API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Derived from the services' protobuf contracts and their google.api.http rules."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
        }
    })
}

/// The live event stream ([`crate::feed`]), which no protobuf rule describes.
fn stream_operation() -> Value {
    json!({
        "operationId": "StreamEvents",
        "summary": "The caller's events as server-sent events",
        "description": "Every event on the bus since this gateway started, as `text/event-stream`: \
            an admin sees all of them, a customer the events of their own orders \
            (order.*, payment.*, shipment.*). Each event has `id: <feed>-<seq>`, `event: <type>` \
            and one `data:` line of JSON (type, topic, partition, offset, subject, source, timeMs, \
            traceId, and orderId, status, reason, amountMinor, currency, carrier, trackingNumber \
            where the event has them). Send the last id seen as `Last-Event-ID` to resume: \
            the events after it come first, or `event: reset` when they can no longer be given \
            (reload through the REST routes). A comment line is a heartbeat on a quiet stream. \
            A client that falls behind the gateway's buffer, or whose writes stall past the \
            write timeout, is cut off; past the cap on open streams the answer is 503.",
        "tags": ["events"],
        "security": [{"bearer": []}],
        "x-shopverse-role": "customer",
        "parameters": [{"name": "Last-Event-ID", "in": "header", "required": false,
                        "schema": {"type": "string"}}],
        "responses": {
            "200": {"description": "The stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            "default": {"description": "An error", "content": {"application/json":
                        {"schema": {"$ref": "#/components/schemas/Error"}}}}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_with_its_auth() {
        let r = Router::from_descriptor_set(shopverse_proto::FILE_DESCRIPTOR_SET).unwrap();
        let doc = document(&r);
        let ops: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        // Every route, and the event stream.
        assert_eq!(ops, r.routes().len() + 1);
        let stream = &doc["paths"]["/v1/events/stream"]["get"];
        assert!(stream["responses"]["200"]["content"]["text/event-stream"].is_object());
        let login = &doc["paths"]["/v1/auth/login"]["post"];
        assert_eq!(login["security"], json!([]));
        let me = &doc["paths"]["/v1/me"]["get"];
        assert_eq!(me["x-shopverse-role"], "customer");
        assert!(
            doc["components"]["schemas"]["shopverse.products.v1.Product"]["properties"]["price"]
                .is_object()
        );
        let list = &doc["paths"]["/v1/products"]["get"]["parameters"];
        assert!(
            list.as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "page_size" && p["in"] == "query")
        );
    }
}
