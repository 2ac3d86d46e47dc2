//! Money as one type: an amount in integer minor units of an ISO 4217 currency.
//!
//! Arithmetic is checked and returns [`MoneyError`], never a wrapped value (release builds do
//! not check integer overflow). A [`Currency`] exists only for a code on the ISO 4217 list,
//! and carries that currency's minor-unit exponent, which is what [`Money`]'s `Display` uses:
//! `EUR 12.34`, `JPY 500`, `BHD 1.250`.

#![forbid(unsafe_code)]

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("`{0}` is not an ISO 4217 currency code")]
    UnknownCurrency(String),
    #[error("{0} and {1} cannot be added: the currencies differ")]
    CurrencyMismatch(Currency, Currency),
    #[error("the amount is out of range")]
    Overflow,
}

/// An ISO 4217 currency: its code and minor-unit exponent (2 for EUR, 0 for JPY, 3 for BHD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: [u8; 3],
    exponent: u8,
}

impl Currency {
    pub const EUR: Currency = Currency {
        code: *b"EUR",
        exponent: 2,
    };

    /// The currency of `code`, which must be on the ISO 4217 list (upper case, as the list
    /// spells it).
    pub fn parse(code: &str) -> Result<Currency, MoneyError> {
        let unknown = || MoneyError::UnknownCurrency(code.chars().take(16).collect());
        let bytes: [u8; 3] = code.as_bytes().try_into().map_err(|_| unknown())?;
        let at = ISO_4217
            .binary_search_by(|(c, _)| c.as_bytes().cmp(&bytes[..]))
            .map_err(|_| unknown())?;
        Ok(Currency {
            code: bytes,
            exponent: ISO_4217[at].1,
        })
    }

    pub fn code(&self) -> &str {
        // Always one of the list's ASCII codes.
        std::str::from_utf8(&self.code).unwrap_or("XXX")
    }

    /// Digits after the decimal separator in the currency's minor unit.
    pub fn exponent(&self) -> u8 {
        self.exponent
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// An amount of money in minor units (cents for EUR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    amount_minor: i64,
    currency: Currency,
}

impl Money {
    pub fn new(amount_minor: i64, currency: Currency) -> Money {
        Money {
            amount_minor,
            currency,
        }
    }

    /// Zero of `currency`.
    pub fn zero(currency: Currency) -> Money {
        Money::new(0, currency)
    }

    /// An amount as a wire message carries it: minor units and a currency code.
    pub fn parse(amount_minor: i64, currency: &str) -> Result<Money, MoneyError> {
        Ok(Money::new(amount_minor, Currency::parse(currency)?))
    }

    pub fn amount_minor(&self) -> i64 {
        self.amount_minor
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    pub fn is_positive(&self) -> bool {
        self.amount_minor > 0
    }

    /// `self + other`, in the same currency.
    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch(self.currency, other.currency));
        }
        let amount = self
            .amount_minor
            .checked_add(other.amount_minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(amount, self.currency))
    }

    /// `self - other`, in the same currency.
    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch(self.currency, other.currency));
        }
        let amount = self
            .amount_minor
            .checked_sub(other.amount_minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(amount, self.currency))
    }

    /// `self × quantity` (a line of `quantity` items at this unit price).
    pub fn checked_mul(self, quantity: i64) -> Result<Money, MoneyError> {
        let amount = self
            .amount_minor
            .checked_mul(quantity)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(amount, self.currency))
    }

    /// The sum of `items`, all in `currency` (zero for none).
    pub fn sum(
        currency: Currency,
        items: impl IntoIterator<Item = Money>,
    ) -> Result<Money, MoneyError> {
        items
            .into_iter()
            .try_fold(Money::zero(currency), Money::checked_add)
    }
}

/// `EUR 12.34`, `JPY 500`, `BHD -1.250`: the code, then the amount with as many decimals as
/// the currency's minor unit has.
impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exp = u32::from(self.currency.exponent);
        let sign = if self.amount_minor < 0 { "-" } else { "" };
        // unsigned_abs: i64::MIN has no positive i64.
        let abs = self.amount_minor.unsigned_abs();
        if exp == 0 {
            return write!(f, "{} {sign}{abs}", self.currency);
        }
        let unit = 10u64.pow(exp);
        write!(
            f,
            "{} {sign}{}.{:0width$}",
            self.currency,
            abs / unit,
            abs % unit,
            width = exp as usize
        )
    }
}

/// The active ISO 4217 codes with their minor-unit exponents, sorted by code. Funds, metals
/// and testing codes without a minor unit (XAU, XDR, XTS, XXX, ...) are not money here.
#[rustfmt::skip]
const ISO_4217: &[(&str, u8)] = &[
    ("AED", 2), ("AFN", 2), ("ALL", 2), ("AMD", 2), ("AOA", 2), ("ARS", 2), ("AUD", 2),
    ("AWG", 2), ("AZN", 2), ("BAM", 2), ("BBD", 2), ("BDT", 2), ("BGN", 2), ("BHD", 3),
    ("BIF", 0), ("BMD", 2), ("BND", 2), ("BOB", 2), ("BOV", 2), ("BRL", 2), ("BSD", 2),
    ("BTN", 2), ("BWP", 2), ("BYN", 2), ("BZD", 2), ("CAD", 2), ("CDF", 2), ("CHE", 2),
    ("CHF", 2), ("CHW", 2), ("CLF", 4), ("CLP", 0), ("CNY", 2), ("COP", 2), ("COU", 2),
    ("CRC", 2), ("CUP", 2), ("CVE", 2), ("CZK", 2), ("DJF", 0), ("DKK", 2), ("DOP", 2),
    ("DZD", 2), ("EGP", 2), ("ERN", 2), ("ETB", 2), ("EUR", 2), ("FJD", 2), ("FKP", 2),
    ("GBP", 2), ("GEL", 2), ("GHS", 2), ("GIP", 2), ("GMD", 2), ("GNF", 0), ("GTQ", 2),
    ("GYD", 2), ("HKD", 2), ("HNL", 2), ("HTG", 2), ("HUF", 2), ("IDR", 2), ("ILS", 2),
    ("INR", 2), ("IQD", 3), ("IRR", 2), ("ISK", 0), ("JMD", 2), ("JOD", 3), ("JPY", 0),
    ("KES", 2), ("KGS", 2), ("KHR", 2), ("KMF", 0), ("KPW", 2), ("KRW", 0), ("KWD", 3),
    ("KYD", 2), ("KZT", 2), ("LAK", 2), ("LBP", 2), ("LKR", 2), ("LRD", 2), ("LSL", 2),
    ("LYD", 3), ("MAD", 2), ("MDL", 2), ("MGA", 2), ("MKD", 2), ("MMK", 2), ("MNT", 2),
    ("MOP", 2), ("MRU", 2), ("MUR", 2), ("MVR", 2), ("MWK", 2), ("MXN", 2), ("MXV", 2),
    ("MYR", 2), ("MZN", 2), ("NAD", 2), ("NGN", 2), ("NIO", 2), ("NOK", 2), ("NPR", 2),
    ("NZD", 2), ("OMR", 3), ("PAB", 2), ("PEN", 2), ("PGK", 2), ("PHP", 2), ("PKR", 2),
    ("PLN", 2), ("PYG", 0), ("QAR", 2), ("RON", 2), ("RSD", 2), ("RUB", 2), ("RWF", 0),
    ("SAR", 2), ("SBD", 2), ("SCR", 2), ("SDG", 2), ("SEK", 2), ("SGD", 2), ("SHP", 2),
    ("SLE", 2), ("SOS", 2), ("SRD", 2), ("SSP", 2), ("STN", 2), ("SVC", 2), ("SYP", 2),
    ("SZL", 2), ("THB", 2), ("TJS", 2), ("TMT", 2), ("TND", 3), ("TOP", 2), ("TRY", 2),
    ("TTD", 2), ("TWD", 2), ("TZS", 2), ("UAH", 2), ("UGX", 0), ("USD", 2), ("USN", 2),
    ("UYI", 0), ("UYU", 2), ("UYW", 4), ("UZS", 2), ("VED", 2), ("VES", 2), ("VND", 0),
    ("VUV", 0), ("WST", 2), ("XAF", 0), ("XCD", 2), ("XCG", 2), ("XOF", 0), ("XPF", 0),
    ("YER", 2), ("ZAR", 2), ("ZMW", 2), ("ZWG", 2),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_sorted_and_codes_parse_to_their_exponents() {
        assert!(
            ISO_4217.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted, no duplicates"
        );
        for (code, exp) in ISO_4217 {
            let c = Currency::parse(code).map_err(|e| e.to_string());
            assert_eq!(
                c.map(|c| (c.code().to_owned(), c.exponent())),
                Ok(((*code).to_owned(), *exp))
            );
        }
        for bad in [
            "",
            "EU",
            "EURO",
            "eur",
            "ABC",
            "XXX",
            "XAU",
            "E\u{20ac}",
            "ÆUR",
        ] {
            assert!(
                matches!(Currency::parse(bad), Err(MoneyError::UnknownCurrency(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn amounts_format_with_the_currency_exponent() {
        let m = |a, c| {
            Money::parse(a, c)
                .map(|m| m.to_string())
                .unwrap_or_default()
        };
        assert_eq!(m(1234, "EUR"), "EUR 12.34");
        assert_eq!(m(5, "EUR"), "EUR 0.05");
        assert_eq!(m(-5, "EUR"), "EUR -0.05");
        assert_eq!(m(500, "JPY"), "JPY 500");
        assert_eq!(m(1250, "BHD"), "BHD 1.250");
        assert_eq!(m(12345, "CLF"), "CLF 1.2345");
        assert_eq!(m(i64::MIN, "EUR"), "EUR -92233720368547758.08");
        assert_eq!(m(i64::MAX, "JPY"), "JPY 9223372036854775807");
    }

    #[test]
    fn arithmetic_is_checked_and_keeps_one_currency() {
        let eur = |a| Money::new(a, Currency::EUR);
        let Ok(usd) = Currency::parse("USD") else {
            panic!("USD is on the list")
        };
        assert_eq!(eur(2).checked_add(eur(3)), Ok(eur(5)));
        assert_eq!(eur(i64::MAX).checked_add(eur(1)), Err(MoneyError::Overflow));
        assert_eq!(eur(i64::MIN).checked_sub(eur(1)), Err(MoneyError::Overflow));
        assert_eq!(
            eur(1).checked_add(Money::new(1, usd)),
            Err(MoneyError::CurrencyMismatch(Currency::EUR, usd))
        );
        assert_eq!(
            eur(900_000_000_000_000_000).checked_mul(99),
            Err(MoneyError::Overflow)
        );
        assert_eq!(Money::sum(Currency::EUR, [eur(1), eur(2)]), Ok(eur(3)));
        assert_eq!(Money::sum(Currency::EUR, []), Ok(eur(0)));
    }

    /// Over prices, quantities and line counts up to and past the bounds, the checked result
    /// is the exact (128-bit) one whenever that fits in an i64, and an error otherwise: never
    /// a wrapped value.
    #[test]
    fn checked_totals_are_exact_or_refused() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let edges = [
            0i64,
            1,
            99,
            100,
            1 << 31,
            100_000_000_000,
            i64::MAX / 9900,
            i64::MAX / 99,
            i64::MAX,
        ];
        for round in 0..20_000 {
            let price = if round % 3 == 0 {
                edges[(next() % edges.len() as u64) as usize]
            } else {
                (next() >> (next() % 64)) as i64 & i64::MAX
            };
            let qty = (next() % 100) as i64;
            let lines = 1 + (next() % 100) as usize;
            let exact = i128::from(price) * i128::from(qty) * lines as i128;
            let line = Money::new(price, Currency::EUR).checked_mul(qty);
            let total = line.and_then(|l| Money::sum(Currency::EUR, std::iter::repeat_n(l, lines)));
            match i64::try_from(exact) {
                Ok(want) => assert_eq!(
                    total.map(|t| t.amount_minor()),
                    Ok(want),
                    "{price} x {qty} x {lines}"
                ),
                Err(_) => assert_eq!(
                    total,
                    Err(MoneyError::Overflow),
                    "{price} x {qty} x {lines}"
                ),
            }
        }
    }
}
