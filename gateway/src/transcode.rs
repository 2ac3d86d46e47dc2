//! JSON to protobuf and back, following the proto3 JSON mapping (what Envoy's transcoder and
//! grpc-gateway do), and the gRPC message framing.

use bytes::Bytes;

use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage,
    SerializeOptions, Value,
};

use crate::router::{BodyRule, Route};

/// Why a request could not be turned into its RPC's message: always the client's fault (400).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BadRequest {
    pub message: String,
    /// The field at fault, when one is.
    pub field: Option<String>,
}

fn bad(field: Option<&str>, message: impl Into<String>) -> BadRequest {
    BadRequest {
        message: message.into(),
        field: field.map(str::to_owned),
    }
}

/// Builds the request message of `route` from path bindings, the query string and the body.
pub fn request_message(
    route: &Route,
    bindings: &[(String, String)],
    query: Option<&str>,
    body: &[u8],
) -> Result<DynamicMessage, BadRequest> {
    let desc = route.method.input();
    let mut msg = match &route.body {
        BodyRule::All => from_json(&desc, body)?,
        BodyRule::Field(f) => {
            let mut m = DynamicMessage::new(desc.clone());
            let field = desc
                .get_field_by_name(f)
                .ok_or_else(|| bad(Some(f), format!("no field `{f}`")))?;
            if let Kind::Message(inner) = field.kind() {
                m.set_field(&field, Value::Message(from_json(&inner, body)?));
            }
            m
        }
        BodyRule::None => DynamicMessage::new(desc.clone()),
    };
    for (path, value) in bindings {
        set_path(&mut msg, path, value)?;
    }
    // Query parameters fill what the path and body did not (GET, DELETE, or `body: "field"`).
    if route.body != BodyRule::All
        && let Some(q) = query
    {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = form_decode(k);
            if bindings.iter().any(|(b, _)| *b == k) {
                continue;
            }
            set_path(&mut msg, &k, &form_decode(v))?;
        }
    }
    Ok(msg)
}

fn from_json(desc: &MessageDescriptor, body: &[u8]) -> Result<DynamicMessage, BadRequest> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut track = serde_path_to_error::Track::new();
    let opts = DeserializeOptions::new().deny_unknown_fields(true);
    let res = DynamicMessage::deserialize_with_options(
        desc.clone(),
        serde_path_to_error::Deserializer::new(&mut de, &mut track),
        &opts,
    );
    let msg = res.and_then(|m| de.end().map(|_| m)).map_err(|e| {
        let path = track.path().to_string();
        let syntax = e.is_syntax() || e.is_eof();
        let field = (!syntax && path != "." && path != "?" && !path.is_empty()).then_some(path);
        let message = match &field {
            Some(f) => format!("field `{f}`: {e}"),
            None => format!("invalid JSON body: {e}"),
        };
        BadRequest { message, field }
    })?;
    Ok(msg)
}

/// `+` and `%XX` decoding of a query string part.
fn form_decode(s: &str) -> String {
    crate::router::percent_decode(&s.replace('+', " "))
}

/// Sets the (possibly nested, dotted) field `path` of `msg` from its text form.
fn set_path(msg: &mut DynamicMessage, path: &str, value: &str) -> Result<(), BadRequest> {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    let desc = msg.descriptor();
    let field = desc
        .get_field_by_name(head)
        .or_else(|| desc.get_field_by_json_name(head))
        .ok_or_else(|| bad(Some(path), format!("unknown field `{path}`")))?;
    if let Some(rest) = rest {
        let Value::Message(inner) = msg.get_field_mut(&field) else {
            return Err(bad(Some(path), format!("`{head}` is not a message")));
        };
        return set_path(inner, rest, value);
    }
    let parsed = scalar(&field, value).ok_or_else(|| {
        bad(
            Some(path),
            format!(
                "field `{path}`: `{value}` is not a valid {:?}",
                field.kind()
            ),
        )
    })?;
    if field.is_list() {
        if let Value::List(list) = msg.get_field_mut(&field) {
            list.push(parsed);
        }
    } else {
        msg.set_field(&field, parsed);
    }
    Ok(())
}

fn scalar(field: &FieldDescriptor, v: &str) -> Option<Value> {
    Some(match field.kind() {
        Kind::String => Value::String(v.to_owned()),
        Kind::Bool => Value::Bool(match v {
            "true" => true,
            "false" => false,
            _ => return None,
        }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(v.parse().ok()?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(v.parse().ok()?),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(v.parse().ok()?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(v.parse().ok()?),
        Kind::Float => Value::F32(v.parse().ok()?),
        Kind::Double => Value::F64(v.parse().ok()?),
        Kind::Bytes => Value::Bytes(Bytes::from(v.as_bytes().to_vec())),
        Kind::Enum(e) => Value::EnumNumber(match e.get_value_by_name(v) {
            Some(val) => val.number(),
            None => {
                let n: i32 = v.parse().ok()?;
                e.get_value(n)?.number()
            }
        }),
        Kind::Message(_) => return None,
    })
}

/// The response message as JSON, by the route's compiled writer when there is one and it takes
/// the message ([`crate::protojson`]), else by [`response_json`] (which also words the error of
/// a message neither can read).
pub fn route_json(
    writer: Option<&crate::protojson::JsonWriter>,
    desc: &MessageDescriptor,
    bytes: &[u8],
) -> Result<Vec<u8>, String> {
    if let Some(w) = writer {
        let mut out = Vec::with_capacity(bytes.len() * 2 + 16);
        if w.write(bytes, &mut out).is_ok() {
            return Ok(out);
        }
    }
    response_json(desc, bytes)
}

/// The response message as JSON on the dynamic path: proto3 JSON names, every field present
/// (defaults included), enums by name, 64-bit integers as strings.
pub fn response_json(desc: &MessageDescriptor, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let msg = DynamicMessage::decode(desc.clone(), bytes)
        .map_err(|e| format!("undecodable response: {e}"))?;
    let opts = SerializeOptions::new().skip_default_fields(false);
    let mut out = Vec::with_capacity(bytes.len() * 2 + 16);
    let mut ser = serde_json::Serializer::new(&mut out);
    msg.serialize_with_options(&mut ser, &opts)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Router;
    use http::Method;
    use prost::Message;

    #[test]
    fn json_path_and_query_make_the_message() {
        let r = Router::from_descriptor_set(shopverse_proto::FILE_DESCRIPTOR_SET).unwrap();
        let m = r.find(&Method::GET, "/v1/products").unwrap();
        let msg = request_message(
            m.route,
            &m.bindings,
            Some("category_id=c1&query=red+shoe&page_size=5&sort=PRODUCT_SORT_PRICE_ASC"),
            b"",
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_slice(
            &response_json(&msg.descriptor(), &msg.encode_to_vec()).unwrap(),
        )
        .unwrap();
        assert_eq!(json["categoryId"], "c1");
        assert_eq!(json["query"], "red shoe");
        assert_eq!(json["pageSize"], 5);
        assert_eq!(json["sort"], "PRODUCT_SORT_PRICE_ASC");

        let m = r.find(&Method::PATCH, "/v1/products/p1").unwrap();
        let msg = request_message(
            m.route,
            &m.bindings,
            None,
            br#"{"expectedVersion": "3", "price": {"amountMinor": "990", "currency": "EUR"}}"#,
        )
        .unwrap();
        let json: serde_json::Value = serde_json::from_slice(
            &response_json(&msg.descriptor(), &msg.encode_to_vec()).unwrap(),
        )
        .unwrap();
        assert_eq!(json["id"], "p1");
        assert_eq!(json["expectedVersion"], "3");
        assert_eq!(json["price"]["amountMinor"], "990");
    }

    #[test]
    fn bad_json_names_the_field() {
        let r = Router::from_descriptor_set(shopverse_proto::FILE_DESCRIPTOR_SET).unwrap();
        let m = r.find(&Method::POST, "/v1/auth/login").unwrap();
        let e = request_message(
            m.route,
            &m.bindings,
            None,
            br#"{"email": "a@b.c", "bogus": 1}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("bogus"), "{}", e.message);
        let e = request_message(m.route, &m.bindings, None, br#"{"email": 42}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("email"), "{}", e.message);
        let e = request_message(m.route, &m.bindings, None, b"{not json").unwrap_err();
        assert!(e.message.starts_with("invalid JSON body"), "{}", e.message);
        let m = r.find(&Method::GET, "/v1/products").unwrap();
        let e = request_message(m.route, &m.bindings, Some("page_size=lots"), b"").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("page_size"));
        let e = request_message(m.route, &m.bindings, Some("nope=1"), b"").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("nope"));
    }
}
