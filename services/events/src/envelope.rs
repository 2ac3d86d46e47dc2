//! The envelope, the topics and the catalogue of event types.

use prost::Message;
use shopverse_kit::clock::to_timestamp;

pub use shopverse_proto::events::v1::Envelope;

pub const TOPIC_USERS: &str = "shopverse.users";
pub const TOPIC_CATALOG: &str = "shopverse.catalog";
pub const TOPIC_ORDERS: &str = "shopverse.orders";
pub const TOPIC_PAYMENTS: &str = "shopverse.payments";
pub const TOPIC_DELIVERY: &str = "shopverse.delivery";

/// Every topic the system uses, for provisioning.
pub const ALL_TOPICS: &[&str] = &[
    TOPIC_USERS,
    TOPIC_CATALOG,
    TOPIC_ORDERS,
    TOPIC_PAYMENTS,
    TOPIC_DELIVERY,
];

/// The dead-letter topic of `topic`.
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// One kind of event: its name, the topic it goes to, the protobuf message of its payload and
/// the payload's schema version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventType {
    pub name: &'static str,
    pub topic: &'static str,
    pub payload_type: &'static str,
    pub schema_version: u32,
}

macro_rules! event_types {
    ($($konst:ident = $name:literal on $topic:ident carries $payload:literal;)*) => {
        $(pub const $konst: EventType = EventType {
            name: $name,
            topic: $topic,
            payload_type: $payload,
            schema_version: 1,
        };)*
        /// Every event type the system emits.
        pub const ALL_EVENT_TYPES: &[EventType] = &[$($konst),*];
    };
}

event_types! {
    USER_REGISTERED = "user.registered" on TOPIC_USERS carries "shopverse.users.v1.UserRegistered";
    PRODUCT_CREATED = "product.created" on TOPIC_CATALOG carries "shopverse.products.v1.ProductChanged";
    PRODUCT_UPDATED = "product.updated" on TOPIC_CATALOG carries "shopverse.products.v1.ProductChanged";
    PRODUCT_ARCHIVED = "product.archived" on TOPIC_CATALOG carries "shopverse.products.v1.ProductChanged";
    STOCK_CHANGED = "stock.changed" on TOPIC_CATALOG carries "shopverse.products.v1.StockChanged";
    ORDER_PLACED = "order.placed" on TOPIC_ORDERS carries "shopverse.orders.v1.OrderEvent";
    ORDER_CONFIRMED = "order.confirmed" on TOPIC_ORDERS carries "shopverse.orders.v1.OrderEvent";
    ORDER_SHIPPED = "order.shipped" on TOPIC_ORDERS carries "shopverse.orders.v1.OrderEvent";
    ORDER_DELIVERED = "order.delivered" on TOPIC_ORDERS carries "shopverse.orders.v1.OrderEvent";
    ORDER_CANCELLED = "order.cancelled" on TOPIC_ORDERS carries "shopverse.orders.v1.OrderCancelled";
    PAYMENT_SUCCEEDED = "payment.succeeded" on TOPIC_PAYMENTS carries "shopverse.payments.v1.PaymentEvent";
    PAYMENT_FAILED = "payment.failed" on TOPIC_PAYMENTS carries "shopverse.payments.v1.PaymentEvent";
    PAYMENT_REFUNDED = "payment.refunded" on TOPIC_PAYMENTS carries "shopverse.payments.v1.PaymentEvent";
    SHIPMENT_SCHEDULED = "shipment.scheduled" on TOPIC_DELIVERY carries "shopverse.delivery.v1.ShipmentEvent";
    SHIPMENT_SHIPPED = "shipment.shipped" on TOPIC_DELIVERY carries "shopverse.delivery.v1.ShipmentEvent";
    SHIPMENT_DELIVERED = "shipment.delivered" on TOPIC_DELIVERY carries "shopverse.delivery.v1.ShipmentEvent";
}

/// Looks an event type up by name.
pub fn event_type(name: &str) -> Option<&'static EventType> {
    ALL_EVENT_TYPES.iter().find(|t| t.name == name)
}

/// What raised an event, which decides its id and its trace.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// A request with nothing to make it repeatable: a fresh UUIDv7, the request's trace.
    Request { traceparent: Option<&'a str> },
    /// A request that is repeatable by a key (a checkout's idempotency key, an order's
    /// reservation): the same key gives the same id, so a retried request raises nothing new.
    Keyed {
        key: &'a str,
        traceparent: Option<&'a str>,
    },
    /// The handling of another event: the same cause gives the same id, so handling a cause
    /// twice (a redelivery that met a lost inbox row, a restore) raises the same event, which
    /// every inbox downstream drops. The cause's trace goes on.
    Event(&'a Envelope),
}

impl Origin<'_> {
    /// A request with no trace and no key.
    pub const NONE: Origin<'static> = Origin::Request { traceparent: None };

    /// The id of an event of `kind` about `subject` raised by this origin.
    pub fn event_id(&self, kind: &EventType, subject: &str) -> String {
        match self {
            Origin::Request { .. } => uuid::Uuid::now_v7().to_string(),
            Origin::Keyed { key, .. } => derived_id("key", key, kind, subject),
            Origin::Event(cause) => derived_id("event", &cause.id, kind, subject),
        }
    }

    fn traceparent(&self) -> &str {
        match self {
            Origin::Request { traceparent } | Origin::Keyed { traceparent, .. } => {
                traceparent.unwrap_or_default()
            }
            Origin::Event(cause) => &cause.traceparent,
        }
    }
}

/// A UUIDv8 from SHA-256 of what makes an event what it is: where it comes from (`scope`,
/// `source`), its type and its subject. Each part is length-prefixed, so no two different
/// inputs hash the same bytes.
fn derived_id(scope: &str, source: &str, kind: &EventType, subject: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [scope, source, kind.name, subject] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Uuid::new_v8(bytes).to_string()
}

/// Builds an envelope whose id and trace come from `origin`.
pub fn new_envelope(
    kind: &EventType,
    source: &str,
    subject: &str,
    now_ms: i64,
    origin: Origin<'_>,
    payload: &impl Message,
) -> Envelope {
    Envelope {
        id: origin.event_id(kind, subject),
        r#type: kind.name.to_owned(),
        source: source.to_owned(),
        time: Some(to_timestamp(now_ms)),
        subject: subject.to_owned(),
        // Raised inside an exported span (a request's, a consumer's): that span's context, so
        // the event's consumers continue the same trace; else what the origin carried.
        traceparent: shopverse_kit::trace::current_traceparent()
            .unwrap_or_else(|| origin.traceparent().to_owned()),
        payload_type: kind.payload_type.to_owned(),
        schema_version: kind.schema_version,
        payload: payload.encode_to_vec(),
    }
}

/// Why an event could not be understood. Such an event is poison: it goes to the dead-letter
/// topic at once instead of being retried.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("undecodable envelope: {0}")]
    Envelope(prost::DecodeError),
    #[error("undecodable {payload_type} payload of event {event_id}: {source}")]
    Payload {
        event_id: String,
        payload_type: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("event {event_id}: type {event_type} is not one we know")]
    UnknownType {
        event_id: String,
        event_type: String,
    },
    #[error("event {event_id}: {event_type} schema version {version} is newer than we understand")]
    UnknownVersion {
        event_id: String,
        event_type: String,
        version: u32,
    },
}

pub fn decode_envelope(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    Envelope::decode(bytes).map_err(DecodeError::Envelope)
}

/// The catalogue entry of `env`'s type, if this build knows the type and the schema version.
pub fn check_known(env: &Envelope) -> Result<&'static EventType, DecodeError> {
    let known = event_type(&env.r#type).ok_or_else(|| DecodeError::UnknownType {
        event_id: env.id.clone(),
        event_type: env.r#type.clone(),
    })?;
    if env.schema_version > known.schema_version {
        return Err(DecodeError::UnknownVersion {
            event_id: env.id.clone(),
            event_type: env.r#type.clone(),
            version: env.schema_version,
        });
    }
    Ok(known)
}

/// Decodes the payload of `env` as `M`, checking that its type and version are known.
pub fn decode_payload<M: Message + Default>(env: &Envelope) -> Result<M, DecodeError> {
    check_known(env)?;
    M::decode(env.payload.as_slice()).map_err(|source| DecodeError::Payload {
        event_id: env.id.clone(),
        payload_type: env.payload_type.clone(),
        source,
    })
}

#[cfg(test)]
mod origin_tests {
    use super::*;

    fn cause(id: &str) -> Envelope {
        Envelope {
            id: id.into(),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_event_raised_by_the_same_cause_has_the_same_id() {
        let (a, b) = (cause("a"), cause("b"));
        let id = |o: Origin<'_>, k: &EventType, s: &str| o.event_id(k, s);
        let first = id(Origin::Event(&a), &ORDER_CONFIRMED, "o1");
        assert_eq!(first, id(Origin::Event(&a), &ORDER_CONFIRMED, "o1"));
        assert_ne!(first, id(Origin::Event(&b), &ORDER_CONFIRMED, "o1"));
        assert_ne!(first, id(Origin::Event(&a), &ORDER_CANCELLED, "o1"));
        assert_ne!(first, id(Origin::Event(&a), &ORDER_CONFIRMED, "o2"));
        let keyed = |key| Origin::Keyed {
            key,
            traceparent: None,
        };
        assert_eq!(
            id(keyed("k"), &ORDER_PLACED, "o1"),
            id(keyed("k"), &ORDER_PLACED, "o1")
        );
        assert_ne!(
            id(keyed("a"), &ORDER_CONFIRMED, "o1"),
            first,
            "a key and an event id of the same text differ"
        );
        // Parts are length-prefixed: moving a character between them changes the id.
        assert_ne!(
            id(Origin::Event(&cause("ab")), &ORDER_PLACED, "c"),
            id(Origin::Event(&cause("a")), &ORDER_PLACED, "bc")
        );
        let parsed = uuid::Uuid::parse_str(&first).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 8);
        assert_ne!(
            id(Origin::NONE, &ORDER_PLACED, "o1"),
            id(Origin::NONE, &ORDER_PLACED, "o1"),
            "a plain request gets a fresh id"
        );
    }

    #[test]
    fn a_caused_event_carries_its_causes_trace() {
        let a = cause("a");
        let env = new_envelope(
            &ORDER_CONFIRMED,
            "orders",
            "o1",
            0,
            Origin::Event(&a),
            &Envelope::default(),
        );
        assert_eq!(env.traceparent, a.traceparent);
        assert_eq!(env.id, Origin::Event(&a).event_id(&ORDER_CONFIRMED, "o1"));
    }
}
