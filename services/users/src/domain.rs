//! Input rules for accounts: email, password, display name, addresses.

use shopverse_kit::ServiceError;
use shopverse_proto::common::v1::Address;

pub const MIN_PASSWORD_CHARS: usize = 10;
const MAX_PASSWORD_BYTES: usize = 1024;
pub const MAX_ADDRESSES: usize = 20;

/// Trims and lowercases an email address and checks its shape.
pub fn normalize_email(raw: &str) -> Result<String, ServiceError> {
    let email = raw.trim().to_lowercase();
    let bad = |why: &str| Err(ServiceError::invalid("email", why));
    if email.is_empty() {
        return bad("is required");
    }
    if email.len() > 254 {
        return bad("is longer than 254 characters");
    }
    let Some((local, domain)) = email.rsplit_once('@') else {
        return bad("is not an email address (no @)");
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c));
    if !local_ok {
        return bad("has an invalid part before the @");
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !domain_ok {
        return bad("has an invalid domain");
    }
    Ok(email)
}

pub fn check_password(pw: &str) -> Result<(), ServiceError> {
    if pw.chars().count() < MIN_PASSWORD_CHARS {
        return Err(ServiceError::invalid(
            "password",
            format!("must be at least {MIN_PASSWORD_CHARS} characters"),
        ));
    }
    if pw.len() > MAX_PASSWORD_BYTES {
        return Err(ServiceError::invalid(
            "password",
            "must be at most 1024 bytes",
        ));
    }
    Ok(())
}

use shopverse_kit::validate::text;

pub fn display_name(raw: &str, email: &str) -> Result<String, ServiceError> {
    let name = text("display_name", raw, 100, false)?;
    if name.is_empty() {
        return Ok(email.split('@').next().unwrap_or_default().to_owned());
    }
    Ok(name)
}

pub fn addresses(list: &[Address]) -> Result<Vec<Address>, ServiceError> {
    if list.len() > MAX_ADDRESSES {
        return Err(ServiceError::invalid(
            "addresses",
            format!("at most {MAX_ADDRESSES} addresses"),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, a)| shopverse_kit::validate::address(&format!("addresses[{i}]"), a))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(
            normalize_email("  Ada@Example.COM ").ok().as_deref(),
            Some("ada@example.com")
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@x.io",
            "ada@localhost",
            "a..b@x.io",
            "ada@-x.io",
            "a b@x.io",
            "ada@x..io",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn passwords_and_addresses() {
        assert!(check_password("short").is_err());
        assert!(check_password("ten chars!").is_ok());
        assert!(
            check_password("ünïcödé✓✓✓").is_ok(),
            "counts characters, not bytes"
        );
        let a = Address {
            line1: "1 Main St".into(),
            city: "Berlin".into(),
            postal_code: "10115".into(),
            country: "de".into(),
            ..Default::default()
        };
        assert_eq!(
            addresses(std::slice::from_ref(&a)).expect("valid")[0].country,
            "DE"
        );
        let e = addresses(&[Address {
            country: "Germany".into(),
            ..a
        }])
        .unwrap_err();
        assert!(e.to_string().starts_with("addresses[0].country"), "{e}");
    }
}
