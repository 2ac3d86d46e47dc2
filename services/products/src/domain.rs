//! The catalog's rules: what a valid price, name, SKU, attribute set and image list are, how a
//! name becomes a slug, and how the category tree is ordered and walked.

use std::collections::{BTreeMap, HashMap};

use shopverse_kit::ServiceError;
use shopverse_proto::common::v1::Money;

use crate::store::CategoryRow;

/// A price as products keep it: an ISO 4217 currency and from 0 to `max` minor units.
pub fn check_money(field: &str, m: &Money, max: i64) -> Result<(), ServiceError> {
    if !(0..=max).contains(&m.amount_minor) {
        return Err(ServiceError::invalid(
            format!("{field}.amount_minor"),
            format!("must be between 0 and {max}"),
        ));
    }
    if let Err(e) = shopverse_money::Currency::parse(&m.currency) {
        return Err(ServiceError::invalid(
            format!("{field}.currency"),
            e.to_string(),
        ));
    }
    Ok(())
}

pub fn check_text(field: &str, v: &str, min: usize, max: usize) -> Result<String, ServiceError> {
    let v = v.trim();
    let n = v.chars().count();
    if n < min {
        return Err(ServiceError::invalid(
            field,
            if min == 1 {
                "is required".to_owned()
            } else {
                format!("must be at least {min} characters")
            },
        ));
    }
    if n > max {
        return Err(ServiceError::invalid(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    Ok(v.to_owned())
}

pub fn check_sku(sku: &str) -> Result<String, ServiceError> {
    let sku = sku.trim();
    if sku.is_empty()
        || sku.len() > 64
        || !sku
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ServiceError::invalid(
            "sku",
            "must be 1 to 64 letters, digits, '-', '_' or '.'",
        ));
    }
    Ok(sku.to_owned())
}

pub fn check_attributes(
    attrs: &HashMap<String, String>,
) -> Result<BTreeMap<String, String>, ServiceError> {
    if attrs.len() > 50 {
        return Err(ServiceError::invalid("attributes", "at most 50 attributes"));
    }
    attrs
        .iter()
        .map(|(k, v)| {
            let key = check_text("attributes", k, 1, 64)?;
            let value = check_text(&format!("attributes.{key}"), v, 0, 500)?;
            Ok((key, value))
        })
        .collect()
}

pub fn check_images(urls: &[String]) -> Result<Vec<String>, ServiceError> {
    if urls.len() > 20 {
        return Err(ServiceError::invalid("image_urls", "at most 20 images"));
    }
    urls.iter()
        .enumerate()
        .map(|(i, u)| {
            let u = u.trim();
            if !(u.starts_with("https://") || u.starts_with("http://"))
                || u.len() > 2000
                || u.contains(char::is_whitespace)
            {
                return Err(ServiceError::invalid(
                    format!("image_urls[{i}]"),
                    "must be an http(s) URL",
                ));
            }
            Ok(u.to_owned())
        })
        .collect()
}

pub fn slugify(name: &str) -> String {
    let mut s = String::new();
    for c in name.to_lowercase().chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c);
        } else if !s.ends_with('-') && !s.is_empty() {
            s.push('-');
        }
    }
    s.trim_end_matches('-').to_owned()
}

/// Categories ordered parents first, then by name.
pub fn tree_order(mut cats: Vec<CategoryRow>) -> Vec<CategoryRow> {
    let mut out = Vec::with_capacity(cats.len());
    let mut placed: std::collections::HashSet<String> = std::collections::HashSet::new();
    while !cats.is_empty() {
        let before = cats.len();
        let (ready, rest): (Vec<_>, Vec<_>) = cats
            .into_iter()
            .partition(|c| c.parent_id.as_ref().is_none_or(|p| placed.contains(p)));
        for c in ready {
            placed.insert(c.id.clone());
            out.push(c);
        }
        cats = rest;
        if cats.len() == before {
            // Orphans (a parent that no longer exists) go last rather than vanish.
            out.append(&mut cats);
        }
    }
    out
}

/// `root` and every category below it.
pub fn descendants(cats: &[CategoryRow], root: &str) -> Vec<String> {
    let mut out = vec![root.to_owned()];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i].clone();
        out.extend(
            cats.iter()
                .filter(|c| c.parent_id.as_deref() == Some(parent.as_str()))
                .map(|c| c.id.clone()),
        );
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_and_tree_order() {
        assert_eq!(slugify("Home & Kitchen"), "home-kitchen");
        assert_eq!(slugify("  TVs, 4K!  "), "tvs-4k");
        let c = |id: &str, parent: Option<&str>| CategoryRow {
            id: id.into(),
            name: id.into(),
            slug: id.into(),
            parent_id: parent.map(Into::into),
        };
        let ordered = tree_order(vec![
            c("b1", Some("b")),
            c("a", None),
            c("b", None),
            c("b1x", Some("b1")),
        ]);
        let ids: Vec<&str> = ordered.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, vec!["a", "b", "b1", "b1x"]);
        let all = ordered.clone();
        assert_eq!(descendants(&all, "b"), vec!["b", "b1", "b1x"]);
    }
}
