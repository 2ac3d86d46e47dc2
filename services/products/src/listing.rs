//! `ListProducts`: browsing, sorting, search with relevance, filters and facets.
//!
//! A search's cost is bounded whatever the catalog's size. The index finds the matches
//! newest first and stops after the rank window; only that window is scored (in
//! [`search::Query::score`]), and older matches follow in index order. Products with every
//! word in their name form the first group, the rest the second, each windowed alike.
//!
//! Pages of a search stay still while products are added: the first page fixes the highest
//! product number it may show, and the page token carries the group, whether it was in the
//! window, and the score and number of the last product shown.

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use shopverse_kit::ServiceError;
use shopverse_kit::identity::Identity;
use shopverse_proto::products::v1::*;
use shopverse_storage::DbKind;

use crate::app::{Products, product_to_proto};
use crate::domain::descendants;
use crate::search::{self, Query, Scope};
use crate::store::{CategoryRow, CursorKey, Filter, ListQuery, Sort};

/// At most this many attribute filters.
const MAX_ATTRIBUTE_FILTERS: usize = 10;

#[derive(serde::Serialize, serde::Deserialize)]
struct PageToken {
    /// Sort order the token belongs to.
    s: i32,
    /// Hash of the filters; a token only continues the query it came from.
    f: String,
    /// Sorted lists: the last product's sort key and id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<CursorKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    i: Option<String>,
    /// Searches by relevance: where the last page ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<RankPos>,
    /// The query was corrected on the first page.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    c: bool,
}

/// A place in a search's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct RankPos {
    /// The highest product number the search shows (fixed by its first page).
    h: i64,
    /// Group: 0 every word in the name, 1 the rest.
    t: u8,
    /// In the group's rank window (ordered by score), or after it (by number).
    w: bool,
    /// Score (in the window).
    k: i64,
    /// Product number.
    d: i64,
}

fn filter_hash(req: &ListProductsRequest, attributes: &[(String, String)]) -> String {
    let h = Sha256::digest(format!(
        "{}\x00{}\x00{}\x00{:?}\x00{:?}\x00{:?}",
        req.category_id,
        req.query.trim().to_lowercase(),
        req.include_archived,
        req.min_price_minor,
        req.max_price_minor,
        attributes,
    ));
    h.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// `name:value` or `name=value` filters, values lowercased, sorted.
fn attribute_filters(raw: &[String]) -> Result<Vec<(String, String)>, ServiceError> {
    if raw.len() > MAX_ATTRIBUTE_FILTERS {
        return Err(ServiceError::invalid(
            "attribute",
            format!("at most {MAX_ATTRIBUTE_FILTERS} attribute filters"),
        ));
    }
    let mut out = Vec::with_capacity(raw.len());
    for (i, a) in raw.iter().enumerate() {
        let Some((name, value)) = a.split_once([':', '=']) else {
            return Err(ServiceError::invalid(
                format!("attribute[{i}]"),
                "must be `name:value`",
            ));
        };
        let (name, value) = (name.trim(), value.trim());
        if name.is_empty() || name.chars().count() > 64 || value.chars().count() > 500 {
            return Err(ServiceError::invalid(
                format!("attribute[{i}]"),
                "must be `name:value` with a name of 1 to 64 characters",
            ));
        }
        out.push((name.to_owned(), value.to_lowercase()));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The request's sort; relevance when a query is given and none is asked for.
fn sort_of(req: &ListProductsRequest, has_query: bool) -> Result<Option<Sort>, ServiceError> {
    Ok(Some(match ProductSort::try_from(req.sort) {
        Ok(ProductSort::Unspecified) if has_query => return Ok(None),
        Ok(ProductSort::Relevance) if has_query => return Ok(None),
        Ok(ProductSort::Relevance) => {
            return Err(ServiceError::invalid("sort", "relevance needs a query"));
        }
        Ok(ProductSort::Unspecified | ProductSort::Newest) => Sort::Newest,
        Ok(ProductSort::PriceAsc) => Sort::PriceAsc,
        Ok(ProductSort::PriceDesc) => Sort::PriceDesc,
        Ok(ProductSort::NameAsc) => Sort::NameAsc,
        Err(_) => return Err(ServiceError::invalid("sort", "unknown sort order")),
    }))
}

impl Products {
    pub async fn list_products(
        &self,
        req: ListProductsRequest,
        caller: Option<&Identity>,
    ) -> Result<ListProductsResponse, ServiceError> {
        if req.include_archived && !caller.is_some_and(Identity::is_admin) {
            return Err(ServiceError::PermissionDenied(
                "include_archived needs the `admin` role".into(),
            ));
        }
        let limit = match req.page_size {
            0 => 20,
            n @ 1..=100 => usize::try_from(n).unwrap_or(20),
            _ => {
                return Err(ServiceError::invalid(
                    "page_size",
                    "must be between 1 and 100",
                ));
            }
        };
        if req.query.chars().count() > 200 {
            return Err(ServiceError::invalid(
                "query",
                "must be at most 200 characters",
            ));
        }
        let mut query = Query::parse(&req.query);
        // Only words are indexed: a query of punctuation alone finds nothing.
        let nothing = query.is_none() && !req.query.trim().is_empty();
        let sort = sort_of(&req, query.is_some() || nothing)?;
        for (field, v) in [
            ("min_price_minor", req.min_price_minor),
            ("max_price_minor", req.max_price_minor),
        ] {
            if v.is_some_and(|v| v < 0) {
                return Err(ServiceError::invalid(field, "must not be negative"));
            }
        }
        if let (Some(min), Some(max)) = (req.min_price_minor, req.max_price_minor)
            && min > max
        {
            return Err(ServiceError::invalid(
                "max_price_minor",
                "must not be below min_price_minor",
            ));
        }
        let attributes = attribute_filters(&req.attribute)?;
        let fhash = filter_hash(&req, &attributes);
        let token = if req.page_token.is_empty() {
            None
        } else {
            let bad = || ServiceError::invalid("page_token", "is not a token this query issued");
            let raw = URL_SAFE_NO_PAD.decode(&req.page_token).map_err(|_| bad())?;
            let t: PageToken = serde_json::from_slice(&raw).map_err(|_| bad())?;
            let fits = match sort {
                None => t.r.is_some(),
                Some(_) => t.k.is_some() && t.i.is_some(),
            };
            if t.s != req.sort || t.f != fhash || !fits {
                return Err(bad());
            }
            Some(t)
        };
        if nothing {
            return Ok(ListProductsResponse {
                facets: req.facets.then(|| facets_of(&[], &[])),
                ..Default::default()
            });
        }
        // The tree is read when a category or the facets need it.
        let all_categories = if req.category_id.is_empty() && !req.facets {
            Vec::new()
        } else {
            self.repo().categories().await?
        };
        let cats = if req.category_id.is_empty() {
            None
        } else {
            if !all_categories.iter().any(|c| c.id == req.category_id) {
                return Err(ServiceError::not_found("category", &req.category_id));
            }
            Some(descendants(&all_categories, &req.category_id))
        };
        if let Some(q) = query.take() {
            query = Some(self.complete(q, req.include_archived).await?);
        }
        // A category filter on a browse: how much of the catalog it holds, from the kept counts
        // (SQLite only: PostgreSQL plans by its own statistics).
        let categories_are_broad = match &cats {
            Some(ids) if query.is_none() && self.repo().db.kind() == DbKind::Sqlite => {
                let kept = self.repo().facet_cells_kept().await?;
                let total: i64 = kept.iter().map(|c| c.2).sum();
                let held: i64 = kept
                    .iter()
                    .filter(|c| ids.contains(&c.0))
                    .map(|c| c.2)
                    .sum();
                held.saturating_mul(100) >= total
            }
            _ => false,
        };
        let filter = Filter {
            categories: cats.as_deref(),
            include_archived: req.include_archived,
            min_price: req.min_price_minor,
            max_price: req.max_price_minor,
            attributes: &attributes,
            matching: None,
            categories_are_broad,
        };

        // A query none of whose matches exist is corrected, once, on its first page; the
        // pages after follow the correction.
        let mut corrected = None;
        if let Some(q) = &query
            && token.as_ref().is_some_and(|t| t.c)
        {
            corrected = self.correct(q, req.include_archived).await?;
        }
        let mut page = self
            .page(
                &filter,
                corrected.as_ref().or(query.as_ref()),
                sort,
                token.as_ref(),
                limit,
            )
            .await?;
        if token.is_none()
            && page.rows.is_empty()
            && let Some(q) = &query
            && (q.unmatched || !self.repo().any_match(q).await?)
            && let Some(c) = self.correct(q, req.include_archived).await?
        {
            corrected = Some(c);
            page = self
                .page(&filter, corrected.as_ref(), sort, None, limit)
                .await?;
        }
        let next_page_token = match page.next {
            Some(mut t) => {
                t.s = req.sort;
                t.f = fhash;
                t.c = corrected.is_some();
                URL_SAFE_NO_PAD.encode(serde_json::to_vec(&t).unwrap_or_default())
            }
            None => String::new(),
        };
        let facets = if req.facets {
            let mut filter = filter.clone();
            filter.matching = corrected
                .as_ref()
                .or(query.as_ref())
                .map(|q| (q, Scope::All));
            let plain = filter.matching.is_none()
                && filter.min_price.is_none()
                && filter.max_price.is_none()
                && attributes.is_empty()
                && !req.include_archived;
            let cells = if filter.matching.is_some_and(|(q, _)| q.unmatched) {
                Vec::new()
            } else if plain {
                let kept = self.repo().facet_cells_kept().await?;
                match &cats {
                    Some(ids) => kept
                        .into_iter()
                        .filter(|(c, _, _)| ids.contains(c))
                        .collect(),
                    None => kept,
                }
            } else {
                self.repo().facet_cells(&filter).await?
            };
            Some(facets_of(&cells, &all_categories))
        } else {
            None
        };
        Ok(ListProductsResponse {
            products: page.rows.iter().map(product_to_proto).collect(),
            next_page_token,
            corrected_query: corrected.map(|q| q.text()).unwrap_or_default(),
            facets,
        })
    }

    /// One page of what `filter` and `query` select, by `sort` or (`None`) relevance.
    async fn page(
        &self,
        filter: &Filter<'_>,
        query: Option<&Query>,
        sort: Option<Sort>,
        token: Option<&PageToken>,
        limit: usize,
    ) -> Result<Page, ServiceError> {
        if query.is_some_and(|q| q.unmatched) {
            return Ok(Page {
                rows: Vec::new(),
                next: None,
            });
        }
        match (sort, query) {
            (Some(sort), _) => {
                let mut filter = filter.clone();
                filter.matching = query.map(|q| (q, Scope::All));
                let after = token.and_then(|t| Some((t.k.clone()?, t.i.clone()?)));
                let mut rows = self
                    .repo()
                    .list(&ListQuery {
                        filter,
                        sort,
                        after,
                        limit: limit as i64 + 1,
                    })
                    .await?;
                let more = rows.len() > limit;
                rows.truncate(limit);
                let next = match rows.last() {
                    Some(last) if more => Some(PageToken {
                        s: 0,
                        f: String::new(),
                        k: Some(sort.key_of(last)),
                        i: Some(last.id.clone()),
                        r: None,
                        c: false,
                    }),
                    _ => None,
                };
                Ok(Page { rows, next })
            }
            (None, Some(q)) => {
                let at = token.and_then(|t| t.r);
                let (hits, more) = self.ranked(filter, q, at, limit).await?;
                let docs: Vec<i64> = hits.iter().map(|h| h.d).collect();
                let rows = self.repo().by_docs(&docs).await?;
                let next = hits.last().filter(|_| more).map(|last| PageToken {
                    s: 0,
                    f: String::new(),
                    k: None,
                    i: None,
                    r: Some(*last),
                    c: false,
                });
                Ok(Page { rows, next })
            }
            (None, None) => Err(ServiceError::invalid("sort", "relevance needs a query")),
        }
    }

    /// Up to `limit` places after `at` in `q`'s relevance order under `filter`, and whether
    /// more follow.
    async fn ranked(
        &self,
        filter: &Filter<'_>,
        q: &Query,
        at: Option<RankPos>,
        limit: usize,
    ) -> Result<(Vec<RankPos>, bool), ServiceError> {
        let window = self.config().search_rank_window;
        let hi = match at {
            Some(a) => a.h,
            None => self.repo().max_doc().await?,
        };
        let want = limit + 1;
        let mut out: Vec<RankPos> = Vec::with_capacity(want);
        for (t, scope) in [(0u8, Scope::Name), (1, Scope::Rest)] {
            if at.is_some_and(|a| a.t > t) {
                continue;
            }
            let here = at.filter(|a| a.t == t);
            let matches = self.repo().matches(filter, q, scope, hi, window).await?;
            if here.is_none_or(|a| a.w) {
                let mut scored: Vec<RankPos> = matches
                    .iter()
                    .map(|c| RankPos {
                        h: hi,
                        t,
                        w: true,
                        k: q.score(&c.search_name, &c.search_text),
                        d: c.doc,
                    })
                    .collect();
                scored.sort_by(|a, b| b.k.cmp(&a.k).then(b.d.cmp(&a.d)));
                let after = |p: &RankPos| match here {
                    Some(a) => p.k < a.k || (p.k == a.k && p.d < a.d),
                    None => true,
                };
                out.extend(scored.into_iter().filter(after).take(want - out.len()));
            }
            if out.len() >= want {
                break;
            }
            // A full window may have older matches after it.
            if matches.len() as i64 == window
                && let Some(oldest) = matches.last()
            {
                let below = match here {
                    Some(a) if !a.w => a.d.min(oldest.doc),
                    _ => oldest.doc,
                };
                let older = self
                    .repo()
                    .matches(filter, q, scope, below - 1, (want - out.len()) as i64)
                    .await?;
                out.extend(older.iter().map(|c| RankPos {
                    h: hi,
                    t,
                    w: false,
                    k: 0,
                    d: c.doc,
                }));
            }
            if out.len() >= want {
                break;
            }
        }
        let more = out.len() > limit;
        out.truncate(limit);
        Ok((out, more))
    }

    /// `q` with each word of five letters or more that no active product holds (nor, for the
    /// last, starts) replaced by the known word one edit away that most products hold;
    /// `None` when no word changed.
    pub(crate) async fn correct(
        &self,
        q: &Query,
        include_archived: bool,
    ) -> Result<Option<Query>, ServiceError> {
        let mut words = q.words.clone();
        let mut changed = false;
        let mut prefix = q.prefix;
        for (i, w) in q.words.iter().enumerate() {
            if w.chars().count() < search::TYPO_MIN_LETTERS {
                continue;
            }
            let known = self
                .repo()
                .term_counts(&std::iter::once(w.clone()).collect())
                .await?;
            let last = i + 1 == q.words.len();
            if !known.is_empty()
                || (last && q.prefix && !self.repo().completions(w, 1).await?.is_empty())
            {
                continue;
            }
            let near = self.repo().term_counts(&search::one_edit_away(w)).await?;
            if let Some(best) = search::best_correction(&near) {
                words[i] = best;
                changed = true;
                if last {
                    // The correction is a whole word.
                    prefix = false;
                }
            }
        }
        if !changed {
            return Ok(None);
        }
        let q = Query {
            words,
            prefix,
            completions: None,
            unmatched: false,
            expected: None,
        };
        Ok(Some(self.complete(q, include_archived).await?))
    }

    /// `q` with its last word's completions from the vocabulary, when it has at most
    /// [`search::MAX_COMPLETIONS`] of them. Not for a listing with archived products: the
    /// vocabulary holds active products' words only.
    /// Also marks `q` [`Query::unmatched`] when a word of four letters or more (or the last
    /// word's prefix) is in no active product: a search that cannot match costs one lookup,
    /// where PostgreSQL, misjudging a word it has no statistics for, could walk every product.
    async fn complete(&self, mut q: Query, include_archived: bool) -> Result<Query, ServiceError> {
        if include_archived {
            return Ok(q);
        }
        // Per query word: (products holding it, in their name); `None` when unknown.
        let mut counts: Vec<Option<(i64, i64)>> = vec![None; q.words.len()];
        if let Some(last) = q.completable() {
            let words = self
                .repo()
                .completions(last, search::MAX_COMPLETIONS + 1)
                .await?;
            q.unmatched = words.is_empty();
            if !words.is_empty() && words.len() <= search::MAX_COMPLETIONS {
                let stats = self
                    .repo()
                    .term_stats(&words.iter().cloned().collect())
                    .await?;
                let sum = stats.values().fold((0, 0), |a, s| (a.0 + s.0, a.1 + s.1));
                if let Some(c) = counts.last_mut() {
                    *c = Some(sum);
                }
                q.completions = Some(words);
            }
        }
        let whole: std::collections::BTreeSet<String> = q
            .words
            .iter()
            .enumerate()
            .filter(|(i, w)| {
                (i + 1 < q.words.len() || !q.prefix)
                    && w.chars().count() >= search::VOCABULARY_MIN_LETTERS
            })
            .map(|(_, w)| w.clone())
            .collect();
        if !q.unmatched && !whole.is_empty() {
            let stats = self.repo().term_stats(&whole).await?;
            q.unmatched = stats.len() < whole.len();
            for (i, w) in q.words.iter().enumerate() {
                if let Some(s) = stats.get(w) {
                    counts[i] = Some(*s);
                }
            }
        }
        if !q.unmatched
            && self.repo().db.kind() == DbKind::Postgres
            && counts.iter().all(Option::is_some)
        {
            let n = self.repo().max_doc().await?.max(1) as f64;
            let (mut all, mut names) = (n, n);
            for (a, b) in counts.into_iter().flatten() {
                all *= (a as f64 / n).min(1.0);
                names *= (b as f64 / n).min(1.0);
            }
            q.expected = Some((all, names));
        }
        Ok(q)
    }
}

struct Page {
    rows: Vec<crate::store::ProductRow>,
    next: Option<PageToken>,
}

/// Facets from `(category or '', band, products)` cells: each category counts its own cells
/// and its subcategories'.
fn facets_of(cells: &[(String, i64, i64)], categories: &[CategoryRow]) -> Facets {
    let parent: HashMap<&str, &str> = categories
        .iter()
        .filter_map(|c| Some((c.id.as_str(), c.parent_id.as_deref()?)))
        .collect();
    let mut per_category: BTreeMap<&str, i64> = BTreeMap::new();
    let mut bands = [0_i64; search::PRICE_BANDS.len() + 1];
    let mut total = 0_i64;
    for (cat, band, n) in cells {
        total = total.saturating_add(*n);
        let b = usize::try_from(*band)
            .unwrap_or(0)
            .min(search::PRICE_BANDS.len());
        bands[b] = bands[b].saturating_add(*n);
        // Up the tree; a broken tree (a cycle) stops after as many steps as it has categories.
        let mut at = Some(cat.as_str()).filter(|c| !c.is_empty());
        let mut steps = 0;
        while let Some(c) = at
            && steps <= categories.len()
        {
            *per_category.entry(c).or_default() += n;
            at = parent.get(c).copied();
            steps += 1;
        }
    }
    Facets {
        total,
        categories: categories
            .iter()
            .filter_map(|c| {
                let n = *per_category.get(c.id.as_str())?;
                (n > 0).then(|| CategoryCount {
                    category_id: c.id.clone(),
                    products: n,
                })
            })
            .collect(),
        price_bands: bands
            .iter()
            .enumerate()
            .map(|(b, n)| {
                let (min_minor, max_minor) = search::band_range(b as i64);
                PriceBandCount {
                    min_minor,
                    max_minor,
                    products: *n,
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_filters_parse_and_refuse() {
        let ok = attribute_filters(&["brand:Northwind".into(), "color = Blue ".into()]).unwrap();
        assert_eq!(
            ok,
            vec![
                ("brand".to_owned(), "northwind".to_owned()),
                ("color".to_owned(), "blue".to_owned())
            ]
        );
        assert!(attribute_filters(&["brand".into()]).is_err());
        assert!(attribute_filters(&[":x".into()]).is_err());
        assert!(attribute_filters(&vec!["a:b".to_owned(); 11]).is_err());
    }

    #[test]
    fn facets_roll_up_the_tree_and_add_up() {
        let c = |id: &str, parent: Option<&str>| CategoryRow {
            id: id.into(),
            name: id.into(),
            slug: id.into(),
            parent_id: parent.map(Into::into),
        };
        let cats = vec![c("a", None), c("a1", Some("a")), c("b", None)];
        let cells = vec![
            ("a".to_owned(), 0, 2),
            ("a1".to_owned(), 3, 5),
            (String::new(), 7, 1),
            ("b".to_owned(), 3, 0),
        ];
        let f = facets_of(&cells, &cats);
        assert_eq!(f.total, 8);
        let counts: Vec<(&str, i64)> = f
            .categories
            .iter()
            .map(|c| (c.category_id.as_str(), c.products))
            .collect();
        assert_eq!(counts, vec![("a", 7), ("a1", 5)]);
        assert_eq!(f.price_bands.len(), 8);
        assert_eq!(
            f.price_bands.iter().map(|b| b.products).sum::<i64>(),
            f.total
        );
        assert_eq!(f.price_bands[7].max_minor, None);
        assert_eq!(f.price_bands[3].products, 5);
    }
}
