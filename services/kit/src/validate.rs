//! Input rules shared by services: bounded text and postal addresses.

use shopverse_proto::common::v1::Address;

use crate::error::ServiceError;

/// Trims `value` and checks its length (in characters) and that it has no control characters.
pub fn text(field: &str, value: &str, max: usize, required: bool) -> Result<String, ServiceError> {
    let v = value.trim();
    if required && v.is_empty() {
        return Err(ServiceError::invalid(field, "is required"));
    }
    if v.chars().count() > max {
        return Err(ServiceError::invalid(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(ServiceError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(v.to_owned())
}

/// Checks and normalises an address; `field` names it in errors (`shipping_address`,
/// `addresses[2]`).
pub fn address(field: &str, a: &Address) -> Result<Address, ServiceError> {
    let f = |name: &str| format!("{field}.{name}");
    let country = a.country.trim().to_ascii_uppercase();
    if country.len() != 2 || !country.chars().all(|c| c.is_ascii_uppercase()) {
        return Err(ServiceError::invalid(
            f("country"),
            "must be an ISO 3166-1 alpha-2 code such as DE",
        ));
    }
    let phone = text(&f("phone"), &a.phone, 32, false)?;
    if !phone
        .chars()
        .all(|c| c.is_ascii_digit() || "+ -()".contains(c))
    {
        return Err(ServiceError::invalid(
            f("phone"),
            "may hold digits, spaces, +, - and parentheses only",
        ));
    }
    Ok(Address {
        label: text(&f("label"), &a.label, 50, false)?,
        recipient: text(&f("recipient"), &a.recipient, 200, false)?,
        line1: text(&f("line1"), &a.line1, 200, true)?,
        line2: text(&f("line2"), &a.line2, 200, false)?,
        city: text(&f("city"), &a.city, 100, true)?,
        postal_code: text(&f("postal_code"), &a.postal_code, 20, true)?,
        country,
        phone,
    })
}

/// Addresses are stored as JSON; this mirrors the protobuf message field for field.
#[derive(serde::Serialize, serde::Deserialize, Default)]
#[serde(default)]
struct StoredAddress {
    label: String,
    recipient: String,
    line1: String,
    line2: String,
    city: String,
    postal_code: String,
    country: String,
    phone: String,
}

impl From<&Address> for StoredAddress {
    fn from(a: &Address) -> Self {
        StoredAddress {
            label: a.label.clone(),
            recipient: a.recipient.clone(),
            line1: a.line1.clone(),
            line2: a.line2.clone(),
            city: a.city.clone(),
            postal_code: a.postal_code.clone(),
            country: a.country.clone(),
            phone: a.phone.clone(),
        }
    }
}

impl From<StoredAddress> for Address {
    fn from(a: StoredAddress) -> Self {
        Address {
            label: a.label,
            recipient: a.recipient,
            line1: a.line1,
            line2: a.line2,
            city: a.city,
            postal_code: a.postal_code,
            country: a.country,
            phone: a.phone,
        }
    }
}

/// Addresses as the JSON text a database column keeps.
pub fn addresses_to_json(list: &[Address]) -> String {
    let stored: Vec<StoredAddress> = list.iter().map(StoredAddress::from).collect();
    serde_json::to_string(&stored).unwrap_or_else(|_| "[]".into())
}

pub fn addresses_from_json(s: &str) -> Vec<Address> {
    serde_json::from_str::<Vec<StoredAddress>>(s)
        .unwrap_or_default()
        .into_iter()
        .map(Address::from)
        .collect()
}

pub fn address_to_json(a: &Address) -> String {
    serde_json::to_string(&StoredAddress::from(a)).unwrap_or_else(|_| "{}".into())
}

pub fn address_from_json(s: &str) -> Address {
    serde_json::from_str::<StoredAddress>(s)
        .unwrap_or_default()
        .into()
}
