//! Protobuf bytes to proto3 JSON, written straight from the wire format by a writer compiled
//! once per response type.
//!
//! The dynamic path (`prost_reflect`: decode into a `DynamicMessage`, then serialize it through
//! serde) builds a map of values per message and looks each field's descriptor up again to
//! write it; for a product that was about 45,000 instructions, more than the products service's
//! own SQLite read (bench/README.md, "The REST read path"). This writer reads the message's
//! fields where they lie and writes the JSON prost-reflect would write, with the gateway's
//! options: every field (defaults too) in field-number order, fields with presence only when
//! set, 64-bit integers as strings, enums by name, bytes in base64, timestamps in RFC 3339.
//! One difference, on purpose: map entries are written sorted by key, where prost-reflect
//! writes them in its hash map's order, which changes from process to process (and with it the
//! edge cache's ETag).
//!
//! A message it does not take the canonical way (a singular message field sent twice, which
//! protobuf merges; a field whose wire type does not match its declaration; groups) returns
//! [`Unusual`] and the caller falls back to the dynamic path, so any input is answered as
//! before. A type with a well-known type other than `Timestamp` anywhere inside it gets no
//! writer at all.

use std::collections::HashMap;
use std::sync::Arc;

use prost_reflect::{Cardinality, Kind, MessageDescriptor};

/// A response type's writer and those of the messages inside it.
#[derive(Debug)]
pub struct JsonWriter {
    messages: Vec<Schema>,
    /// Value names by number, per enum.
    enums: Vec<Arc<EnumNames>>,
}

#[derive(Debug)]
struct Schema {
    /// Sorted by field number.
    fields: Vec<Field>,
    timestamp: bool,
}

#[derive(Debug)]
struct Field {
    number: u32,
    /// `"jsonName":`, escaped.
    key: Box<[u8]>,
    kind: K,
    shape: Shape,
    /// Written only when set (message fields, `optional`, oneof members).
    presence: bool,
    /// The oneof it belongs to (its index in the message), if any.
    oneof: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    Single,
    List,
    /// A map: the entry's key and value kinds.
    Map(K, K),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum K {
    Double,
    Float,
    Int32,
    Int64,
    Uint32,
    Uint64,
    Sint32,
    Sint64,
    Fixed32,
    Fixed64,
    Sfixed32,
    Sfixed64,
    Bool,
    String,
    Bytes,
    /// Index into the writer's enum names.
    Enum(usize),
    /// Index into the writer's messages.
    Message(usize),
}

/// The input is valid protobuf this writer does not take: use the dynamic path.
#[derive(Debug)]
pub struct Unusual;

/// Why a message cannot be written: the dynamic path says the same (a 502).
#[derive(Debug, thiserror::Error)]
#[error("undecodable response: {0}")]
pub struct Undecodable(&'static str);

#[derive(Debug)]
pub enum WriteError {
    Unusual(Unusual),
    Undecodable(Undecodable),
}

impl From<Undecodable> for WriteError {
    fn from(e: Undecodable) -> Self {
        WriteError::Undecodable(e)
    }
}

impl From<Unusual> for WriteError {
    fn from(e: Unusual) -> Self {
        WriteError::Unusual(e)
    }
}

/// Enum value names by number, shared by the writers that use the enum.
type EnumNames = HashMap<i32, Box<str>>;

struct Compiler {
    messages: Vec<Schema>,
    index: HashMap<String, usize>,
    enums: Vec<Arc<EnumNames>>,
    enum_index: HashMap<String, usize>,
}

impl JsonWriter {
    /// The writer of `desc`, or `None` when it holds a well-known type this writer does not
    /// write (the dynamic path serves that type).
    pub fn compile(desc: &MessageDescriptor) -> Option<JsonWriter> {
        let mut c = Compiler {
            messages: Vec::new(),
            index: HashMap::new(),
            enums: Vec::new(),
            enum_index: HashMap::new(),
        };
        c.message(desc)?;
        Some(JsonWriter {
            messages: c.messages,
            enums: c.enums,
        })
    }
}

impl Compiler {
    fn message(&mut self, desc: &MessageDescriptor) -> Option<usize> {
        if let Some(&i) = self.index.get(desc.full_name()) {
            return Some(i);
        }
        let name = desc.full_name();
        let timestamp = name == "google.protobuf.Timestamp";
        if name.starts_with("google.protobuf.") && !timestamp {
            return None;
        }
        let i = self.messages.len();
        self.index.insert(name.to_owned(), i);
        self.messages.push(Schema {
            fields: Vec::new(),
            timestamp,
        });
        let mut fields = Vec::new();
        for f in desc.fields() {
            let shape = if f.is_map() {
                let Kind::Message(entry) = f.kind() else {
                    return None;
                };
                let key = self.kind(&entry.map_entry_key_field().kind())?;
                let value = self.kind(&entry.map_entry_value_field().kind())?;
                Shape::Map(key, value)
            } else if f.cardinality() == Cardinality::Repeated {
                Shape::List
            } else {
                Shape::Single
            };
            let kind = match shape {
                Shape::Map(..) => K::Bool,
                _ => self.kind(&f.kind())?,
            };
            let mut key = serde_json::to_vec(f.json_name()).ok()?;
            key.push(b':');
            fields.push(Field {
                number: f.number(),
                key: key.into_boxed_slice(),
                kind,
                shape,
                presence: f.supports_presence(),
                oneof: f.containing_oneof().and_then(|o| {
                    desc.oneofs()
                        .position(|x| x.name() == o.name())
                        .and_then(|i| u32::try_from(i).ok())
                }),
            });
        }
        fields.sort_by_key(|f| f.number);
        self.messages[i].fields = fields;
        Some(i)
    }

    fn kind(&mut self, kind: &Kind) -> Option<K> {
        Some(match kind {
            Kind::Double => K::Double,
            Kind::Float => K::Float,
            Kind::Int32 => K::Int32,
            Kind::Int64 => K::Int64,
            Kind::Uint32 => K::Uint32,
            Kind::Uint64 => K::Uint64,
            Kind::Sint32 => K::Sint32,
            Kind::Sint64 => K::Sint64,
            Kind::Fixed32 => K::Fixed32,
            Kind::Fixed64 => K::Fixed64,
            Kind::Sfixed32 => K::Sfixed32,
            Kind::Sfixed64 => K::Sfixed64,
            Kind::Bool => K::Bool,
            Kind::String => K::String,
            Kind::Bytes => K::Bytes,
            Kind::Enum(e) => {
                if e.full_name() == "google.protobuf.NullValue" {
                    return None;
                }
                if let Some(&i) = self.enum_index.get(e.full_name()) {
                    return Some(K::Enum(i));
                }
                let names: EnumNames = e.values().map(|v| (v.number(), v.name().into())).collect();
                let i = self.enums.len();
                self.enum_index.insert(e.full_name().to_owned(), i);
                self.enums.push(Arc::new(names));
                K::Enum(i)
            }
            Kind::Message(m) => K::Message(self.message(m)?),
        })
    }
}

/// One field occurrence on the wire: which field (index in its schema), its wire type, and
/// where its payload lies.
#[derive(Clone, Copy)]
struct Seen {
    field: u16,
    wire: u8,
    start: u32,
    end: u32,
}

impl JsonWriter {
    /// Appends the JSON of the message in `bytes` to `out`.
    pub fn write(&self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), WriteError> {
        if bytes.len() > u32::MAX as usize {
            return Err(Unusual.into());
        }
        let mut seen = Vec::with_capacity(16);
        self.message(0, bytes, out, &mut seen)
    }

    fn message(
        &self,
        index: usize,
        bytes: &[u8],
        out: &mut Vec<u8>,
        seen: &mut Vec<Seen>,
    ) -> Result<(), WriteError> {
        let schema = &self.messages[index];
        let mark = seen.len();
        // One pass over the wire: where each known field's occurrences lie.
        let mut at = 0usize;
        while at < bytes.len() {
            let tag = varint(bytes, &mut at)?;
            let (number, wire) = (tag >> 3, (tag & 7) as u8);
            if number == 0 || number > u64::from(u32::MAX >> 3) {
                return Err(Undecodable("invalid field number").into());
            }
            let start = at;
            match wire {
                0 => {
                    varint(bytes, &mut at)?;
                }
                1 => at = take(bytes, at, 8)?,
                2 => {
                    let len = usize::try_from(varint(bytes, &mut at)?)
                        .map_err(|_| Undecodable("length out of range"))?;
                    at = take(bytes, at, len)?;
                }
                5 => at = take(bytes, at, 4)?,
                // Groups: protobuf 2's, never written by these services.
                _ => return Err(Unusual.into()),
            }
            let Ok(field) = schema
                .fields
                .binary_search_by_key(&(number as u32), |f| f.number)
            else {
                // Unknown fields are skipped, as the dynamic path does.
                continue;
            };
            let payload_start = if wire == 2 {
                start_of_payload(bytes, start)?
            } else {
                start
            };
            seen.push(Seen {
                field: field as u16,
                wire,
                start: payload_start as u32,
                end: at as u32,
            });
        }
        if schema.timestamp {
            let r = self.timestamp(bytes, &seen[mark..], out);
            seen.truncate(mark);
            return r;
        }
        out.push(b'{');
        let mut first = true;
        // Oneofs with a member set: protobuf keeps the last member sent, which this writer
        // does not track; two members of one oneof go the dynamic way.
        let mut oneofs = 0u64;
        for (fi, field) in schema.fields.iter().enumerate() {
            let n = seen[mark..]
                .iter()
                .filter(|s| s.field as usize == fi)
                .count();
            if n == 0 && field.presence {
                continue;
            }
            if let Some(o) = field.oneof {
                let bit = 1u64.checked_shl(o).ok_or(Unusual)?;
                if oneofs & bit != 0 {
                    return Err(Unusual.into());
                }
                oneofs |= bit;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(&field.key);
            match field.shape {
                Shape::Single => {
                    let last = seen[mark..]
                        .iter()
                        .rev()
                        .find(|s| s.field as usize == fi)
                        .copied();
                    match last {
                        None => self.default(field.kind, out),
                        Some(s) => {
                            if n > 1 && matches!(field.kind, K::Message(_)) {
                                // Protobuf merges the occurrences of a message field.
                                return Err(Unusual.into());
                            }
                            let one = self.single(field.kind, bytes, s, out, seen);
                            one?;
                        }
                    }
                }
                Shape::List => {
                    out.push(b'[');
                    let mut any = false;
                    let list: Vec<Seen> = seen[mark..]
                        .iter()
                        .filter(|s| s.field as usize == fi)
                        .copied()
                        .collect();
                    for s in list {
                        if s.wire == 2 && packable(field.kind) {
                            let mut p = s.start as usize;
                            while p < s.end as usize {
                                if any {
                                    out.push(b',');
                                }
                                any = true;
                                p =
                                    self.packed_one(field.kind, &bytes[..s.end as usize], p, out)?;
                            }
                        } else {
                            if any {
                                out.push(b',');
                            }
                            any = true;
                            self.single(field.kind, bytes, s, out, seen)?;
                        }
                    }
                    out.push(b']');
                }
                Shape::Map(key, value) => {
                    let entries: Vec<Seen> = seen[mark..]
                        .iter()
                        .filter(|s| s.field as usize == fi)
                        .copied()
                        .collect();
                    self.map(key, value, bytes, &entries, out, seen)?;
                }
            }
        }
        out.push(b'}');
        seen.truncate(mark);
        Ok(())
    }

    /// A map's entries, sorted by key, the last of equal keys winning (as protobuf decodes).
    fn map(
        &self,
        key: K,
        value: K,
        bytes: &[u8],
        entries: &[Seen],
        out: &mut Vec<u8>,
        seen: &mut Vec<Seen>,
    ) -> Result<(), WriteError> {
        // (key as JSON text, the value's occurrence, if any)
        let mut pairs: Vec<(Vec<u8>, Option<Seen>)> = Vec::with_capacity(entries.len());
        for e in entries {
            if e.wire != 2 {
                return Err(Unusual.into());
            }
            let entry = &bytes[..e.end as usize];
            let mut at = e.start as usize;
            let (mut k, mut v) = (None, None);
            while at < e.end as usize {
                let tag = varint(entry, &mut at)?;
                let (number, wire) = (tag >> 3, (tag & 7) as u8);
                let start = at;
                match wire {
                    0 => {
                        varint(entry, &mut at)?;
                    }
                    1 => at = take(entry, at, 8)?,
                    2 => {
                        let len = usize::try_from(varint(entry, &mut at)?)
                            .map_err(|_| Undecodable("length out of range"))?;
                        at = take(entry, at, len)?;
                    }
                    5 => at = take(entry, at, 4)?,
                    _ => return Err(Unusual.into()),
                }
                let payload = if wire == 2 {
                    start_of_payload(entry, start)?
                } else {
                    start
                };
                let s = Seen {
                    field: 0,
                    wire,
                    start: payload as u32,
                    end: at as u32,
                };
                match number {
                    1 => k = Some(s),
                    2 => {
                        if v.is_some() && matches!(value, K::Message(_)) {
                            return Err(Unusual.into());
                        }
                        v = Some(s);
                    }
                    _ => {}
                }
            }
            // The key as a JSON string.
            let mut text = Vec::new();
            match k {
                Some(s) => self.single(key, bytes, s, &mut text, seen)?,
                None => self.default(key, &mut text),
            }
            if text.first() != Some(&b'"') {
                text.insert(0, b'"');
                text.push(b'"');
            }
            pairs.push((text, v));
        }
        // Stable: among equal keys the last stays last, and is the one kept.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        out.push(b'{');
        let mut first = true;
        for (i, (k, v)) in pairs.iter().enumerate() {
            if pairs.get(i + 1).is_some_and(|next| next.0 == *k) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(k);
            out.push(b':');
            match v {
                Some(s) => self.single(value, bytes, *s, out, seen)?,
                None => self.default(value, out),
            }
        }
        out.push(b'}');
        Ok(())
    }

    /// One value of `kind` from its occurrence.
    fn single(
        &self,
        kind: K,
        bytes: &[u8],
        s: Seen,
        out: &mut Vec<u8>,
        seen: &mut Vec<Seen>,
    ) -> Result<(), WriteError> {
        let payload = &bytes[s.start as usize..s.end as usize];
        match (kind, s.wire) {
            (K::String, 2) => {
                let text =
                    std::str::from_utf8(payload).map_err(|_| Undecodable("invalid UTF-8"))?;
                json_str(text, out);
            }
            (K::Bytes, 2) => {
                use base64::Engine;
                out.push(b'"');
                let mut b64 = String::new();
                base64::engine::general_purpose::STANDARD.encode_string(payload, &mut b64);
                out.extend_from_slice(b64.as_bytes());
                out.push(b'"');
            }
            (K::Message(m), 2) => self.message(m, payload, out, seen)?,
            (k, w) if w == wire_type(k) => {
                self.packed_one(k, payload, 0, out)?;
            }
            _ => return Err(Unusual.into()),
        }
        Ok(())
    }

    /// One scalar at `at` in `bytes` (a varint or fixed-width value); where the next begins.
    fn packed_one(
        &self,
        kind: K,
        bytes: &[u8],
        mut at: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, WriteError> {
        let mut fixed = |n: usize| -> Result<u64, WriteError> {
            let end = take(bytes, at, n)?;
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(&bytes[at..end]);
            at = end;
            Ok(u64::from_le_bytes(v))
        };
        match kind {
            K::Double => {
                let v = f64::from_bits(fixed(8)?);
                float(v, out);
            }
            K::Float => {
                let v = f32::from_bits(fixed(4)? as u32);
                if v.is_finite() {
                    let _ = serde_json::to_writer(&mut *out, &v);
                } else {
                    float(f64::from(v), out);
                }
            }
            K::Fixed32 => push_int(out, fixed(4)?, false),
            K::Sfixed32 => push_signed(out, i64::from(fixed(4)? as u32 as i32), false),
            K::Fixed64 => push_int(out, fixed(8)?, true),
            K::Sfixed64 => push_signed(out, fixed(8)? as i64, true),
            _ => {
                let v = varint(bytes, &mut at)?;
                match kind {
                    K::Int32 => push_signed(out, i64::from(v as i32), false),
                    K::Int64 => push_signed(out, v as i64, true),
                    K::Uint32 => push_int(out, u64::from(v as u32), false),
                    K::Uint64 => push_int(out, v, true),
                    K::Sint32 => {
                        let n = ((v as u32) >> 1) as i32 ^ -((v as u32 & 1) as i32);
                        push_signed(out, i64::from(n), false)
                    }
                    K::Sint64 => push_signed(out, (v >> 1) as i64 ^ -((v & 1) as i64), true),
                    K::Bool => out.extend_from_slice(if v != 0 { b"true" } else { b"false" }),
                    K::Enum(e) => self.enum_value(e, v as i32, out),
                    _ => return Err(Unusual.into()),
                }
            }
        }
        Ok(at)
    }

    fn enum_value(&self, e: usize, n: i32, out: &mut Vec<u8>) {
        match self.enums[e].get(&n) {
            Some(name) => json_str(name, out),
            None => push_signed(out, i64::from(n), false),
        }
    }

    /// The default value of a field not on the wire.
    fn default(&self, kind: K, out: &mut Vec<u8>) {
        match kind {
            K::Double | K::Float => out.extend_from_slice(b"0.0"),
            K::Int64 | K::Uint64 | K::Sint64 | K::Fixed64 | K::Sfixed64 => {
                out.extend_from_slice(b"\"0\"")
            }
            K::Int32 | K::Uint32 | K::Sint32 | K::Fixed32 | K::Sfixed32 => out.push(b'0'),
            K::Bool => out.extend_from_slice(b"false"),
            K::String | K::Bytes => out.extend_from_slice(b"\"\""),
            K::Enum(e) => self.enum_value(e, 0, out),
            // A message value inside a map, absent: its defaults.
            K::Message(m) => {
                let mut seen = Vec::new();
                let _ = self.message(m, &[], out, &mut seen);
            }
        }
    }

    /// `google.protobuf.Timestamp` as RFC 3339 (UTC, `Z`, 0, 3, 6 or 9 fractional digits),
    /// within the years 1 to 9999 as the JSON mapping requires.
    fn timestamp(&self, bytes: &[u8], seen: &[Seen], out: &mut Vec<u8>) -> Result<(), WriteError> {
        let (mut seconds, mut nanos) = (0i64, 0i32);
        for s in seen {
            let mut at = s.start as usize;
            match (s.field, s.wire) {
                (0, 0) => seconds = varint(bytes, &mut at)? as i64,
                (1, 0) => nanos = varint(bytes, &mut at)? as i32,
                _ => return Err(Unusual.into()),
            }
        }
        // The schema's fields are `seconds` (1) then `nanos` (2).
        if !(-62_135_596_800..=253_402_300_799).contains(&seconds)
            || !(0..1_000_000_000).contains(&nanos)
        {
            return Err(Undecodable("timestamp out of range").into());
        }
        let (days, rem) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
        let (y, m, d) = civil_from_days(days);
        let mut text = String::with_capacity(32);
        use std::fmt::Write as _;
        let _ = write!(
            text,
            "\"{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        );
        let _ = if nanos == 0 {
            write!(text, "Z\"")
        } else if nanos % 1_000_000 == 0 {
            write!(text, ".{:03}Z\"", nanos / 1_000_000)
        } else if nanos % 1_000 == 0 {
            write!(text, ".{:06}Z\"", nanos / 1_000)
        } else {
            write!(text, ".{nanos:09}Z\"")
        };
        out.extend_from_slice(text.as_bytes());
        Ok(())
    }
}

fn packable(k: K) -> bool {
    !matches!(k, K::String | K::Bytes | K::Message(_))
}

fn wire_type(k: K) -> u8 {
    match k {
        K::Double | K::Fixed64 | K::Sfixed64 => 1,
        K::Float | K::Fixed32 | K::Sfixed32 => 5,
        K::String | K::Bytes | K::Message(_) => 2,
        _ => 0,
    }
}

fn float(v: f64, out: &mut Vec<u8>) {
    if v.is_finite() {
        let _ = serde_json::to_writer(&mut *out, &v);
    } else if v == f64::INFINITY {
        out.extend_from_slice(b"\"Infinity\"");
    } else if v == f64::NEG_INFINITY {
        out.extend_from_slice(b"\"-Infinity\"");
    } else {
        out.extend_from_slice(b"\"NaN\"");
    }
}

fn json_str(s: &str, out: &mut Vec<u8>) {
    // serde_json's escaping, which the dynamic path uses too.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn push_int(out: &mut Vec<u8>, v: u64, quoted: bool) {
    if quoted {
        out.push(b'"');
    }
    out.extend_from_slice(crate::reply::decimal(v, &mut [0; 20]));
    if quoted {
        out.push(b'"');
    }
}

fn push_signed(out: &mut Vec<u8>, v: i64, quoted: bool) {
    if quoted {
        out.push(b'"');
    }
    if v < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(crate::reply::decimal(v.unsigned_abs(), &mut [0; 20]));
    if quoted {
        out.push(b'"');
    }
}

fn varint(bytes: &[u8], at: &mut usize) -> Result<u64, Undecodable> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let b = *bytes.get(*at).ok_or(Undecodable("truncated varint"))?;
        *at += 1;
        if shift == 63 && b > 1 {
            return Err(Undecodable("varint overflow"));
        }
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(Undecodable("varint overflow"))
}

fn take(bytes: &[u8], at: usize, n: usize) -> Result<usize, Undecodable> {
    at.checked_add(n)
        .filter(|&end| end <= bytes.len())
        .ok_or(Undecodable("truncated field"))
}

/// Where a length-delimited payload begins: after the length varint that starts at `start`.
fn start_of_payload(bytes: &[u8], start: usize) -> Result<usize, Undecodable> {
    let mut at = start;
    varint(bytes, &mut at)?;
    Ok(at)
}

/// Howard Hinnant's days-to-civil: the proleptic Gregorian date of a day count from 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transcode::{response_json, route_json};
    use prost::Message;
    use prost_reflect::{DescriptorPool, DynamicMessage, MapKey, Value};

    /// xorshift64*: deterministic, so a failure repeats with its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    fn pool() -> DescriptorPool {
        DescriptorPool::decode(shopverse_proto::FILE_DESCRIPTOR_SET).expect("descriptors")
    }

    fn text(rng: &mut Rng) -> String {
        const PIECES: [&str; 10] = ["a", "Zz", " ", "\"", "\\", "\n", "\u{1}", "é", "日本", "🙂"];
        (0..rng.below(6))
            .map(|_| PIECES[rng.below(PIECES.len() as u64) as usize])
            .collect()
    }

    fn scalar(kind: &Kind, rng: &mut Rng, depth: u32, maps: &mut bool) -> Value {
        let extreme = |rng: &mut Rng| match rng.below(4) {
            0 => 0u64,
            1 => u64::MAX,
            2 => 1 << 63,
            _ => rng.next(),
        };
        match kind {
            Kind::Double => Value::F64(match rng.below(6) {
                0 => f64::NAN,
                1 => f64::INFINITY,
                2 => -0.5,
                3 => 1e300,
                _ => rng.next() as f64 / 3.0,
            }),
            Kind::Float => Value::F32(match rng.below(5) {
                0 => f32::NEG_INFINITY,
                1 => 0.1,
                _ => rng.next() as f32 / 7.0,
            }),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(extreme(rng) as i32),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(extreme(rng) as i64),
            Kind::Uint32 | Kind::Fixed32 => Value::U32(extreme(rng) as u32),
            Kind::Uint64 | Kind::Fixed64 => Value::U64(extreme(rng)),
            Kind::Bool => Value::Bool(rng.chance(50)),
            Kind::String => Value::String(text(rng)),
            Kind::Bytes => Value::Bytes((0..rng.below(7)).map(|_| rng.next() as u8).collect()),
            Kind::Enum(e) => {
                let values: Vec<i32> = e.values().map(|v| v.number()).collect();
                Value::EnumNumber(if rng.chance(90) {
                    values[rng.below(values.len() as u64) as usize]
                } else {
                    77
                })
            }
            Kind::Message(m) => Value::Message(message(m, rng, depth + 1, maps)),
        }
    }

    /// A message of `desc` with random fields set (timestamps within range).
    fn message(
        desc: &MessageDescriptor,
        rng: &mut Rng,
        depth: u32,
        maps: &mut bool,
    ) -> DynamicMessage {
        let mut m = DynamicMessage::new(desc.clone());
        if desc.full_name() == "google.protobuf.Timestamp" {
            m.set_field_by_name(
                "seconds",
                Value::I64(
                    rng.below(253_402_300_799) as i64 - 62_135_596_800 * (rng.below(2) as i64),
                ),
            );
            let nanos = [0, 5_000_000, 123_000, 7, 999_999_999][rng.below(5) as usize];
            m.set_field_by_name("nanos", Value::I32(nanos));
            return m;
        }
        for f in desc.fields() {
            if rng.chance(30) || (depth > 3 && matches!(f.kind(), Kind::Message(_))) {
                continue;
            }
            if f.is_map() {
                let Kind::Message(entry) = f.kind() else {
                    continue;
                };
                let (kf, vf) = (entry.map_entry_key_field(), entry.map_entry_value_field());
                let mut map = std::collections::HashMap::new();
                for _ in 0..rng.below(4) {
                    let key = match scalar(&kf.kind(), rng, depth, maps) {
                        Value::String(s) => MapKey::String(s),
                        Value::I32(v) => MapKey::I32(v),
                        Value::I64(v) => MapKey::I64(v),
                        Value::U32(v) => MapKey::U32(v),
                        Value::U64(v) => MapKey::U64(v),
                        Value::Bool(v) => MapKey::Bool(v),
                        _ => continue,
                    };
                    map.insert(key, scalar(&vf.kind(), rng, depth, maps));
                }
                *maps |= map.len() > 1;
                m.set_field(&f, Value::Map(map));
            } else if f.is_list() {
                let list = (0..rng.below(4))
                    .map(|_| scalar(&f.kind(), rng, depth, maps))
                    .collect();
                m.set_field(&f, Value::List(list));
            } else {
                m.set_field(&f, scalar(&f.kind(), rng, depth, maps));
            }
        }
        m
    }

    /// Every message type of the services, at random, a few hundred times each: the compiled
    /// writer writes what the dynamic path writes (byte for byte where no map holds two entries
    /// or more, whose order the dynamic path leaves to its hash map; as JSON values always).
    #[test]
    fn writes_what_the_dynamic_path_writes_for_every_message_type() {
        let pool = pool();
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut compared = 0;
        for desc in pool.all_messages() {
            let name = desc.full_name();
            if !name.starts_with("shopverse.") || desc.is_map_entry() {
                continue;
            }
            let Some(writer) = JsonWriter::compile(&desc) else {
                continue;
            };
            for round in 0..200 {
                let mut maps = false;
                let msg = message(&desc, &mut rng, 0, &mut maps);
                let bytes = msg.encode_to_vec();
                let ours = route_json(Some(&writer), &desc, &bytes);
                let theirs = response_json(&desc, &bytes);
                match (&ours, &theirs) {
                    (Ok(a), Ok(b)) => {
                        let va: serde_json::Value =
                            serde_json::from_slice(a).expect("our JSON parses");
                        let vb: serde_json::Value = serde_json::from_slice(b).expect("JSON");
                        assert_eq!(va, vb, "{name} round {round}");
                        if !maps {
                            assert_eq!(
                                String::from_utf8_lossy(a),
                                String::from_utf8_lossy(b),
                                "{name} round {round}"
                            );
                        }
                        let mut direct = Vec::new();
                        assert!(
                            writer.write(&bytes, &mut direct).is_ok(),
                            "{name}: fell back"
                        );
                    }
                    (Err(_), Err(_)) => {}
                    _ => panic!("{name} round {round}: {ours:?} against {theirs:?}"),
                }
                compared += 1;
            }
        }
        assert!(compared > 10_000, "only {compared} messages compared");
    }

    /// Wire forms prost does not write but a peer may: fields out of order, a scalar sent twice
    /// (the last wins), a message field sent twice (merged), two members of one oneof, bytes
    /// cut short. Whatever the writer does with them, the answer is the dynamic path's.
    #[test]
    fn unusual_and_broken_wire_forms_answer_as_the_dynamic_path() {
        let pool = pool();
        let desc = pool
            .get_message_by_name("shopverse.products.v1.Product")
            .expect("Product");
        let writer = JsonWriter::compile(&desc).expect("a writer");
        let same = |bytes: &[u8]| {
            let ours = route_json(Some(&writer), &desc, bytes);
            let theirs = response_json(&desc, bytes);
            match (ours, theirs) {
                (Ok(a), Ok(b)) => assert_eq!(
                    serde_json::from_slice::<serde_json::Value>(&a).expect("ours"),
                    serde_json::from_slice::<serde_json::Value>(&b).expect("theirs"),
                    "{bytes:?}"
                ),
                (Err(_), Err(_)) => {}
                (a, b) => panic!("{bytes:?}: {a:?} against {b:?}"),
            }
        };
        // name = "b" then id = "a" (out of order); version twice (last wins).
        same(b"\x1a\x01b\x0a\x01a\x50\x05\x50\x07");
        // price (field 5) twice: merged.
        same(b"\x2a\x03\x08\x96\x01\x2a\x05\x12\x03EUR");
        // created_at twice, out of range, truncated, a bad varint, a group, invalid UTF-8.
        same(b"\x5a\x02\x08\x01\x5a\x02\x10\x05");
        same(b"\x5a\x0b\x08\xff\xff\xff\xff\xff\xff\xff\xff\x7f\x00");
        same(b"\x0a\x05ab");
        same(b"\x50\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01");
        same(b"\x0b\x0c");
        same(b"\x0a\x02\xc3\x28");
        // An unknown field is skipped.
        same(b"\xf8\x07\x01\x0a\x01x");
        // attributes with a repeated key: the last wins.
        same(b"\x3a\x06\x0a\x01k\x12\x01a\x3a\x06\x0a\x01k\x12\x01b");
        let mut out = Vec::new();
        writer
            .write(
                b"\x3a\x06\x0a\x01k\x12\x01a\x3a\x06\x0a\x01k\x12\x01b",
                &mut out,
            )
            .expect("written");
        assert!(String::from_utf8_lossy(&out).contains(r#""attributes":{"k":"b"}"#));
    }
}
