//! Cursor pagination by id: a page token is the last id of the previous page, opaque to
//! clients. Ids are UUIDv7, so id order is creation order and a page stays stable while rows
//! are added.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::ServiceError;

/// A validated page request: at most `limit` rows after (or before) `cursor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub limit: i64,
    /// The last id of the previous page; empty for the first page.
    pub cursor: String,
}

impl Page {
    /// Checks `page_size` (0 means `default`) against `1..=max` and decodes `page_token`.
    pub fn parse(
        page_size: i32,
        page_token: &str,
        default: i64,
        max: i64,
    ) -> Result<Page, ServiceError> {
        let limit = match i64::from(page_size) {
            0 => default,
            n if (1..=max).contains(&n) => n,
            _ => {
                return Err(ServiceError::invalid(
                    "page_size",
                    format!("must be between 1 and {max}"),
                ));
            }
        };
        let cursor = if page_token.is_empty() {
            String::new()
        } else {
            URL_SAFE_NO_PAD
                .decode(page_token)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ServiceError::invalid("page_token", "is not a token this service issued")
                })?
        };
        Ok(Page { limit, cursor })
    }

    /// How many rows to fetch: one more than the page, to learn whether another page follows.
    pub fn fetch(&self) -> i64 {
        self.limit + 1
    }

    /// Cuts `rows` (fetched with [`Page::fetch`]) to the page and returns the next page's token,
    /// empty when this is the last page.
    pub fn finish<T>(&self, rows: &mut Vec<T>, id: impl Fn(&T) -> &str) -> String {
        let more = rows.len() as i64 > self.limit;
        rows.truncate(usize::try_from(self.limit).unwrap_or(usize::MAX));
        match rows.last() {
            Some(last) if more => URL_SAFE_NO_PAD.encode(id(last).as_bytes()),
            _ => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages() {
        assert!(Page::parse(-1, "", 20, 100).is_err());
        assert!(Page::parse(101, "", 20, 100).is_err());
        assert!(Page::parse(10, "%%%", 20, 100).is_err());
        let p = Page::parse(0, "", 20, 100).unwrap();
        assert_eq!((p.limit, p.fetch()), (20, 21));
        let p = Page::parse(2, "", 20, 100).unwrap();
        let mut rows = vec!["a", "b", "c"];
        let token = p.finish(&mut rows, |r| r);
        assert_eq!(rows, vec!["a", "b"]);
        assert_eq!(Page::parse(2, &token, 20, 100).unwrap().cursor, "b");
        let mut last = vec!["c"];
        assert_eq!(p.finish(&mut last, |r| r), "");
    }
}
