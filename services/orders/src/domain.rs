//! The orders domain: an order's status and the transitions allowed between them, and the
//! cart's limits. No storage and no RPC here; the store and the service depend on this, never
//! the other way round.

use shopverse_proto::orders::v1::OrderStatus;

/// The most lines a cart holds.
pub const MAX_CART_LINES: usize = 100;
/// The most units of one product a cart line holds.
pub const MAX_LINE_QUANTITY: i64 = 99;

/// Where an order is: `PendingPayment → Confirmed → Shipped → Delivered`, and `→ Cancelled`
/// from the first two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderState {
    PendingPayment,
    Confirmed,
    Shipped,
    Delivered,
    Cancelled,
}

impl OrderState {
    pub const ALL: [OrderState; 5] = [
        OrderState::PendingPayment,
        OrderState::Confirmed,
        OrderState::Shipped,
        OrderState::Delivered,
        OrderState::Cancelled,
    ];

    /// As the database stores it.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::PendingPayment => "PENDING_PAYMENT",
            OrderState::Confirmed => "CONFIRMED",
            OrderState::Shipped => "SHIPPED",
            OrderState::Delivered => "DELIVERED",
            OrderState::Cancelled => "CANCELLED",
        }
    }

    /// The status a stored name stands for.
    pub fn parse(s: &str) -> Option<OrderState> {
        OrderState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether an order may move from `self` to `to`.
    pub fn can_become(self, to: OrderState) -> bool {
        use OrderState::*;
        matches!(
            (self, to),
            (PendingPayment, Confirmed)
                | (Confirmed, Shipped)
                | (Shipped, Delivered)
                | (PendingPayment, Cancelled)
                | (Confirmed, Cancelled)
        )
    }

    /// The status of the API for `self`.
    pub fn to_proto(self) -> OrderStatus {
        match self {
            OrderState::PendingPayment => OrderStatus::PendingPayment,
            OrderState::Confirmed => OrderStatus::Confirmed,
            OrderState::Shipped => OrderStatus::Shipped,
            OrderState::Delivered => OrderStatus::Delivered,
            OrderState::Cancelled => OrderStatus::Cancelled,
        }
    }

    /// `self` for a status of the API (`None`: unspecified).
    pub fn from_proto(s: OrderStatus) -> Option<OrderState> {
        OrderState::ALL.into_iter().find(|st| st.to_proto() == s)
    }
}

/// Where a checkout attempt is: `Reserving` (stock being held under the order id), then
/// `Placed` (the order exists) or `Failed` (refused, with the reason); a `Reserving` attempt
/// left too long goes `Abandoning` (its stock being released) and then `Abandoned`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutState {
    Reserving,
    Placed,
    Failed,
    Abandoning,
    Abandoned,
}

impl CheckoutState {
    pub const ALL: [CheckoutState; 5] = [
        CheckoutState::Reserving,
        CheckoutState::Placed,
        CheckoutState::Failed,
        CheckoutState::Abandoning,
        CheckoutState::Abandoned,
    ];

    /// As the database stores it.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckoutState::Reserving => "RESERVING",
            CheckoutState::Placed => "PLACED",
            CheckoutState::Failed => "FAILED",
            CheckoutState::Abandoning => "ABANDONING",
            CheckoutState::Abandoned => "ABANDONED",
        }
    }

    /// The state a stored name stands for.
    pub fn parse(s: &str) -> Option<CheckoutState> {
        CheckoutState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether an attempt may move from `self` to `to`.
    pub fn can_become(self, to: CheckoutState) -> bool {
        use CheckoutState::*;
        matches!(
            (self, to),
            (Reserving, Placed)
                | (Reserving, Failed)
                | (Reserving, Abandoning)
                | (Abandoning, Abandoned)
        )
    }
}

impl std::fmt::Display for OrderState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkout_states_round_trip_and_end_where_they_should() {
        for s in CheckoutState::ALL {
            assert_eq!(CheckoutState::parse(s.as_str()), Some(s));
        }
        // Placed, Failed and Abandoned are final.
        for end in [
            CheckoutState::Placed,
            CheckoutState::Failed,
            CheckoutState::Abandoned,
        ] {
            assert!(
                CheckoutState::ALL.iter().all(|to| !end.can_become(*to)),
                "{end:?}"
            );
        }
    }

    #[test]
    fn statuses_round_trip_and_only_forward_moves_are_allowed() {
        for s in OrderState::ALL {
            assert_eq!(OrderState::parse(s.as_str()), Some(s));
            assert_eq!(OrderState::from_proto(s.to_proto()), Some(s));
            assert!(!s.can_become(s), "{s} to itself");
        }
        assert_eq!(OrderState::parse("pending_payment"), None);
        assert_eq!(OrderState::from_proto(OrderStatus::Unspecified), None);
        let allowed: Vec<(OrderState, OrderState)> = OrderState::ALL
            .into_iter()
            .flat_map(|a| OrderState::ALL.into_iter().map(move |b| (a, b)))
            .filter(|(a, b)| a.can_become(*b))
            .collect();
        use OrderState::*;
        assert_eq!(
            allowed,
            [
                (PendingPayment, Confirmed),
                (PendingPayment, Cancelled),
                (Confirmed, Shipped),
                (Confirmed, Cancelled),
                (Shipped, Delivered),
            ]
        );
    }
}
