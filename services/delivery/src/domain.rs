//! Shipments as types: the states a shipment moves through, and the carrier rule.
//!
//! # Carrier and ETA rule
//! Destination in `home_country` (default DE): DHL, 2 days. Elsewhere in the EU: DPD, 4 days.
//! Anywhere else: UPS, 7 days. Days are calendar days from confirmation. The tracking number is
//! the carrier's prefix and 12 hex digits derived from the order id, so it is stable across
//! redeliveries of `order.confirmed`.

use sha2::{Digest, Sha256};

pub const DAY_MS: i64 = 86_400_000;

const EU: &[&str] = &[
    "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE", "IT",
    "LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK",
];

/// Where a shipment is: `Scheduled → Shipped → Delivered`, or `Scheduled → Cancelled` when its
/// order is cancelled before it left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShipmentState {
    Scheduled,
    Shipped,
    Delivered,
    Cancelled,
}

impl ShipmentState {
    /// As stored in `shipments.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            ShipmentState::Scheduled => "SCHEDULED",
            ShipmentState::Shipped => "SHIPPED",
            ShipmentState::Delivered => "DELIVERED",
            ShipmentState::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<ShipmentState> {
        [
            ShipmentState::Scheduled,
            ShipmentState::Shipped,
            ShipmentState::Delivered,
            ShipmentState::Cancelled,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// The one state each state may move to next (an operator's, or a cancellation's).
    pub fn can_become(self, to: ShipmentState) -> bool {
        matches!(
            (self, to),
            (ShipmentState::Scheduled, ShipmentState::Shipped)
                | (ShipmentState::Shipped, ShipmentState::Delivered)
                | (ShipmentState::Scheduled, ShipmentState::Cancelled)
        )
    }

    /// How the state reads in a message: `shipped`.
    pub fn word(self) -> String {
        self.as_str().to_lowercase()
    }
}

/// `(carrier, days)` for a destination.
pub fn carrier_for(home: &str, country: &str) -> (&'static str, i64) {
    if country == home {
        ("DHL", 2)
    } else if EU.contains(&country) {
        ("DPD", 4)
    } else {
        ("UPS", 7)
    }
}

/// The carrier's prefix and 12 hex digits derived from the order id.
pub fn tracking_number(carrier: &str, order_id: &str) -> String {
    let digest: String = Sha256::digest(order_id.as_bytes())
        .iter()
        .take(6)
        .map(|b| format!("{b:02X}"))
        .collect();
    format!("{carrier}{digest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carriers() {
        assert_eq!(carrier_for("DE", "DE"), ("DHL", 2));
        assert_eq!(carrier_for("DE", "FR"), ("DPD", 4));
        assert_eq!(carrier_for("DE", "US"), ("UPS", 7));
    }

    #[test]
    fn states_move_forward_only() {
        use ShipmentState::*;
        let all = [Scheduled, Shipped, Delivered, Cancelled];
        let allowed: Vec<_> = all
            .iter()
            .flat_map(|a| all.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| a.can_become(*b))
            .collect();
        assert_eq!(
            allowed,
            [
                (Scheduled, Shipped),
                (Scheduled, Cancelled),
                (Shipped, Delivered)
            ]
        );
        for s in all {
            assert_eq!(ShipmentState::parse(s.as_str()), Some(s));
        }
        assert_eq!(ShipmentState::parse("LOST"), None);
    }

    #[test]
    fn tracking_numbers_are_stable() {
        assert_eq!(tracking_number("DHL", "o-1"), tracking_number("DHL", "o-1"));
        assert_eq!(tracking_number("DHL", "o-1").len(), 3 + 12);
        assert_ne!(tracking_number("DHL", "o-1"), tracking_number("DHL", "o-2"));
    }
}
