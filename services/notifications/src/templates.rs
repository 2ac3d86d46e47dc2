//! What each event says to the customer: an email subject and body, and an SMS text.

use shopverse_events::envelope::*;
use shopverse_proto::common::v1::Money;
use shopverse_proto::delivery::v1::ShipmentEvent;
use shopverse_proto::orders::v1::{Order, OrderCancelled, OrderEvent};
use shopverse_proto::payments::v1::PaymentEvent;
use shopverse_proto::users::v1::UserRegistered;

/// A rendered notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub user_id: String,
    /// Set for `user.registered`, which carries it; others look it up.
    pub email: Option<String>,
    pub display_name: Option<String>,
    /// The shipping address's phone, for order events that have one.
    pub phone: Option<String>,
    pub subject: String,
    pub body: String,
    pub sms: String,
}

/// "EUR 12.34", "JPY 500": as many decimals as the currency's minor unit has. A code that is
/// not ISO 4217 (which no service lets in) is shown as it came, in minor units.
pub fn money(m: Option<&Money>) -> String {
    match m {
        Some(m) => match shopverse_money::Money::parse(m.amount_minor, &m.currency) {
            Ok(money) => money.to_string(),
            Err(_) => format!("{} {} (minor units)", m.currency, m.amount_minor),
        },
        None => "-".into(),
    }
}

/// The last 8 characters of a long id (a UUID), which is how customers quote their order.
fn short(id: &str) -> &str {
    if id.len() > 12 {
        id.get(id.len() - 8..).unwrap_or(id)
    } else {
        id
    }
}

fn lines(o: &Order) -> String {
    o.lines
        .iter()
        .map(|l| {
            format!(
                "  {} x {}  {}",
                l.quantity,
                l.name,
                money(l.line_total.as_ref())
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn phone(o: &Order) -> Option<String> {
    o.shipping_address
        .as_ref()
        .map(|a| a.phone.clone())
        .filter(|p| !p.is_empty())
}

type DecodeResult = Result<Option<Rendered>, DecodeError>;

/// Renders `ev`; `None` for events customers are not told about.
pub fn render(ev: &Envelope) -> DecodeResult {
    let t = ev.r#type.as_str();
    let order_msg = |o: Order, subject: String, body: String, sms: String| Rendered {
        user_id: o.user_id.clone(),
        email: None,
        display_name: None,
        phone: phone(&o),
        subject,
        body,
        sms,
    };
    Ok(Some(if t == USER_REGISTERED.name {
        let u: UserRegistered = decode_payload(ev)?;
        Rendered {
            user_id: u.user_id,
            email: Some(u.email),
            display_name: Some(u.display_name.clone()),
            phone: None,
            subject: "Welcome to ShopVerse".into(),
            body: format!(
                "Hello {},\n\nyour ShopVerse account is ready. Happy shopping!\n",
                u.display_name
            ),
            sms: "Welcome to ShopVerse!".into(),
        }
    } else if [ORDER_PLACED.name, ORDER_CONFIRMED.name].contains(&t) {
        let Some(o) = decode_payload::<OrderEvent>(ev)?.order else {
            return Ok(None);
        };
        let (what, next) = if t == ORDER_PLACED.name {
            (
                "received",
                "We will confirm it as soon as the payment goes through.",
            )
        } else {
            (
                "confirmed",
                "Payment received; we are preparing your parcel.",
            )
        };
        let id = short(&o.id).to_owned();
        let total = money(o.total.as_ref());
        let body = format!(
            "Your order {id} is {what}.\n\n{}\n\nTotal: {total}\n\n{next}\n",
            lines(&o)
        );
        order_msg(
            o,
            format!("Order {id} {what}"),
            body,
            format!("ShopVerse: order {id} {what}, total {total}."),
        )
    } else if t == ORDER_CANCELLED.name {
        let c: OrderCancelled = decode_payload(ev)?;
        let Some(o) = c.order else { return Ok(None) };
        let id = short(&o.id).to_owned();
        let refund = if c.was_paid {
            " Your payment will be refunded."
        } else {
            ""
        };
        let body = format!("Your order {id} was cancelled: {}.{refund}\n", c.reason);
        order_msg(
            o,
            format!("Order {id} cancelled"),
            body,
            format!("ShopVerse: order {id} cancelled.{refund}"),
        )
    } else if t == PAYMENT_FAILED.name {
        let p: PaymentEvent = decode_payload(ev)?;
        let id = short(&p.order_id).to_owned();
        Rendered {
            user_id: p.user_id,
            email: None,
            display_name: None,
            phone: None,
            subject: format!("Payment for order {id} failed"),
            body: format!(
                "We could not take {} for order {id}: {}.\n",
                money(p.amount.as_ref()),
                p.reason
            ),
            sms: format!("ShopVerse: payment for order {id} failed ({}).", p.reason),
        }
    } else if [
        SHIPMENT_SCHEDULED.name,
        SHIPMENT_SHIPPED.name,
        SHIPMENT_DELIVERED.name,
    ]
    .contains(&t)
    {
        let Some(s) = decode_payload::<ShipmentEvent>(ev)?.shipment else {
            return Ok(None);
        };
        let id = short(&s.order_id).to_owned();
        let what = match t {
            "shipment.scheduled" => format!(
                "will ship with {} (tracking {})",
                s.carrier, s.tracking_number
            ),
            "shipment.shipped" => format!(
                "is on its way with {} (tracking {})",
                s.carrier, s.tracking_number
            ),
            _ => "was delivered".to_owned(),
        };
        Rendered {
            user_id: s.user_id,
            email: None,
            display_name: None,
            phone: None,
            subject: format!("Order {id} {what}"),
            body: format!("Your order {id} {what}.\n"),
            sms: format!("ShopVerse: order {id} {what}."),
        }
    } else {
        return Ok(None);
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_formats() {
        let m = |a, c: &str| Money {
            amount_minor: a,
            currency: c.into(),
        };
        assert_eq!(money(Some(&m(1234, "EUR"))), "EUR 12.34");
        assert_eq!(money(Some(&m(5, "USD"))), "USD 0.05");
        assert_eq!(money(Some(&m(-150, "EUR"))), "EUR -1.50");
        assert_eq!(money(Some(&m(500, "JPY"))), "JPY 500");
        assert_eq!(money(Some(&m(1500, "KWD"))), "KWD 1.500");
        assert_eq!(money(Some(&m(500, "ZZZ"))), "ZZZ 500 (minor units)");
    }
}
