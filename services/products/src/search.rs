//! Search's rules, free of SQL: how text becomes words, how a query becomes an index
//! expression, how a match is scored, which price band a price falls in, and which known words
//! a misspelt one may have meant.
//!
//! Both backends index the same words: the service writes each product's words, lowercased
//! and separated by single spaces (`search_name`, `search_text`), and SQLite's FTS5 and
//! PostgreSQL's `to_tsvector('simple', …)` split them again at the spaces. A query's words
//! are found whole, the last one also as a prefix (as the user types). Scoring runs here, on
//! the words, so both backends rank alike and a page's order does not move when other
//! products are added.

use std::collections::{BTreeMap, BTreeSet};

/// At most this many words of a query are used.
pub const MAX_QUERY_WORDS: usize = 10;
/// A misspelt word is corrected only from this many letters on.
pub const TYPO_MIN_LETTERS: usize = 5;
/// Words shorter than this are not kept in the vocabulary: they are never corrected to.
pub const VOCABULARY_MIN_LETTERS: usize = TYPO_MIN_LETTERS - 1;
/// Upper bounds (exclusive, minor units) of the price bands but the last, which is open.
pub const PRICE_BANDS: [i64; 7] = [1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000];

/// The words of `text`: runs of letters and digits, lowercased.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

/// `text` as the index keeps it: its words separated by single spaces.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for w in words(text) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&w);
    }
    out
}

/// The indexed text of a product other than its name: description, then attribute values.
pub fn body_text<'a>(description: &str, attribute_values: impl Iterator<Item = &'a str>) -> String {
    let mut out = normalize(description);
    for v in attribute_values {
        let v = normalize(v);
        if !v.is_empty() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&v);
        }
    }
    out
}

/// The distinct words of a product's indexed text that go into the vocabulary, each with
/// whether its name holds it.
pub fn vocabulary(search_name: &str, search_text: &str) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    let long = |w: &&str| w.chars().count() >= VOCABULARY_MIN_LETTERS;
    for w in search_text.split(' ').filter(long) {
        out.insert(w.to_owned(), false);
    }
    for w in search_name.split(' ').filter(long) {
        out.insert(w.to_owned(), true);
    }
    out
}

/// The price band of `price_minor`: its index in [`PRICE_BANDS`], or their count for the last.
pub fn price_band(price_minor: i64) -> i64 {
    PRICE_BANDS
        .iter()
        .position(|upper| price_minor < *upper)
        .unwrap_or(PRICE_BANDS.len()) as i64
}

/// `(lowest, highest exclusive)` of band `b`; `None` for the open end.
pub fn band_range(b: i64) -> (i64, Option<i64>) {
    let i = usize::try_from(b).unwrap_or(0).min(PRICE_BANDS.len());
    let low = if i == 0 { 0 } else { PRICE_BANDS[i - 1] };
    (low, PRICE_BANDS.get(i).copied())
}

/// At most this many known words a last word's prefix stands for (see [`Query::completions`]).
pub const MAX_COMPLETIONS: usize = 64;

/// A parsed query: its words, the last one also matched as a prefix when `prefix` is set.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub words: Vec<String>,
    pub prefix: bool,
    /// The known words the last word's prefix stands for, itself included if known: the index
    /// then looks each up as a whole word. An index asked for a prefix merges the lists of
    /// every word it begins before it can hand over the newest match (a query for `ideal*`
    /// cost 2.75 ms at 100k products against 0.08 ms for `ideal`), where a few whole words
    /// are walked side by side. `None`: matched as a prefix by the index itself (two or three
    /// letters, which FTS5 keeps a prefix index for, or too many completions).
    pub completions: Option<Vec<String>>,
    /// A word of the query that no active product holds: nothing can match (set by the
    /// service from the vocabulary, which has every word of four letters or more).
    pub unmatched: bool,
    /// How many products are expected to match anywhere, and in their name, from the
    /// vocabulary's counts as if the words were independent; `None` when a word is too short
    /// for the vocabulary. PostgreSQL's plan is chosen by it.
    pub expected: Option<(f64, f64)>,
}

/// What the index is asked: every word (all of them must match), in the name only or anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every word in the name.
    Name,
    /// Every word somewhere, but not every word in the name.
    Rest,
    /// Every word somewhere.
    All,
}

impl Query {
    /// The query of `text`; `None` when it has no words. The last word is a prefix from two
    /// letters on: one letter would match most of a catalog and tell the ranking nothing.
    pub fn parse(text: &str) -> Option<Query> {
        let mut words: Vec<String> = Vec::new();
        for w in self::words(text) {
            if !words.contains(&w) {
                words.push(w);
            }
            if words.len() == MAX_QUERY_WORDS {
                break;
            }
        }
        let prefix = words.last().is_some_and(|w| w.chars().count() >= 2);
        (!words.is_empty()).then_some(Query {
            words,
            prefix,
            completions: None,
            unmatched: false,
            expected: None,
        })
    }

    /// The last word, when it is matched as a prefix and long enough for the vocabulary to
    /// hold its completions.
    pub fn completable(&self) -> Option<&str> {
        let last = self.words.last()?;
        (self.prefix && last.chars().count() >= VOCABULARY_MIN_LETTERS).then_some(last.as_str())
    }

    /// Whether the last word is looked up as the index's own prefix query.
    fn index_prefix(&self) -> bool {
        self.prefix && self.completions.is_none()
    }

    /// The words as one string, as the client is shown a corrected query.
    pub fn text(&self) -> String {
        self.words.join(" ")
    }

    /// FTS5's query syntax: quoted words (a word holds only letters and digits), the last
    /// with `*` for a prefix. [`Scope::Name`] is meant for the names' own index
    /// (`products_name_fts`), so it is the words alone; [`Scope::Rest`] excludes name matches
    /// with a column filter, which FTS5 walks alongside the words' entries.
    pub fn fts5(&self, scope: Scope) -> String {
        let all = format!("({})", self.expression('"', " AND ", " OR ", "*"));
        match scope {
            Scope::All | Scope::Name => all,
            Scope::Rest => format!("{all} NOT (search_name : {all})"),
        }
    }

    /// `to_tsquery('simple', …)`'s syntax: `'word'` joined by `&`, `:*` for the prefix.
    pub fn tsquery(&self) -> String {
        self.expression('\'', " & ", " | ", ":*")
    }

    /// The words quoted with `quote` and joined by `and`; the last one's completions joined
    /// by `or` in parentheses, or the last word followed by `prefix` for the index's own
    /// prefix query.
    fn expression(&self, quote: char, and: &str, or: &str, prefix: &str) -> String {
        let quoted = |w: &str| format!("{quote}{w}{quote}");
        let last = self.words.len().saturating_sub(1);
        let mut parts: Vec<String> = Vec::with_capacity(self.words.len());
        for (i, w) in self.words.iter().enumerate() {
            parts.push(match &self.completions {
                Some(c) if i == last => {
                    let any: Vec<String> = c.iter().map(|w| quoted(w)).collect();
                    format!("({})", any.join(or))
                }
                _ if i == last && self.index_prefix() => format!("{}{prefix}", quoted(w)),
                _ => quoted(w),
            });
        }
        parts.join(and)
    }

    /// How well a product with these indexed words matches, higher first; 0 when it does not
    /// hold every word. A BM25F-like sum over the query's words: a word in the name counts three
    /// times one in the rest, repeats count less and less, long fields dilute, and a prefix
    /// counts 0.8 of a whole word. A name holding the words in order, next to each other, gets
    /// a bonus. Field lengths are divided by fixed typical lengths rather than the catalog's
    /// averages, so a score depends on the product and the query alone.
    pub fn score(&self, search_name: &str, search_text: &str) -> i64 {
        const K1: f64 = 1.2;
        const B: f64 = 0.75;
        const NAME_WEIGHT: f64 = 3.0;
        const NAME_LEN: f64 = 6.0;
        const TEXT_LEN: f64 = 40.0;
        let n = self.words.len();
        // Each field is read once: per query word, its hits (1 whole, 0.8 as a prefix).
        let mut name_hits = [0.0_f64; MAX_QUERY_WORDS];
        let mut text_hits = [0.0_f64; MAX_QUERY_WORDS];
        let mut in_order = false;
        // Where the run of the query's words in order, in the name, has got to.
        let mut run = 0;
        let name_len = self.count_hits(search_name, &mut name_hits, |i, hit| {
            run = if hit && i == Some(run) {
                run + 1
            } else {
                usize::from(hit && i == Some(0))
            };
            in_order |= run == n;
        });
        let text_len = self.count_hits(search_text, &mut text_hits, |_, _| {});
        let norm = |len: usize, typical: f64| 1.0 - B + B * (len as f64 / typical);
        let (name_norm, text_norm) = (norm(name_len, NAME_LEN), norm(text_len, TEXT_LEN));
        let mut score = 0.0;
        for i in 0..n {
            let tf = NAME_WEIGHT * name_hits[i] / name_norm + text_hits[i] / text_norm;
            if tf == 0.0 {
                return 0;
            }
            score += tf * (K1 + 1.0) / (tf + K1);
        }
        if n > 1 && in_order {
            score += 0.5;
        }
        (score * 1_000_000.0).round() as i64
    }

    /// Adds each word of `field` to the hits of the query word it matches; calls `each` with
    /// the query word's index a word matched as the `i`-th word of the query's order (the
    /// first match), or `None`. Returns the field's word count.
    fn count_hits(
        &self,
        field: &str,
        hits: &mut [f64; MAX_QUERY_WORDS],
        mut each: impl FnMut(Option<usize>, bool),
    ) -> usize {
        let last = self.words.len().saturating_sub(1);
        let mut len = 0;
        for t in field.split(' ').filter(|t| !t.is_empty()) {
            len += 1;
            let mut first = None;
            for (i, w) in self.words.iter().enumerate() {
                let h = if t == w {
                    1.0
                } else if self.prefix && i == last && t.starts_with(w.as_str()) {
                    0.8
                } else {
                    continue;
                };
                hits[i] += h;
                first.get_or_insert(i);
            }
            each(first, first.is_some());
        }
        len
    }
}

/// Every word one edit away from `word` (a letter deleted, inserted, replaced, or two
/// neighbours swapped), over the letters a-z, the digits and `word`'s own letters.
pub fn one_edit_away(word: &str) -> BTreeSet<String> {
    let chars: Vec<char> = word.chars().collect();
    let mut alphabet: BTreeSet<char> = ('a'..='z').chain('0'..='9').collect();
    alphabet.extend(chars.iter().copied());
    let mut out = BTreeSet::new();
    let s = |v: &[char]| v.iter().collect::<String>();
    for i in 0..chars.len() {
        let mut v = chars.clone();
        v.remove(i);
        out.insert(s(&v));
        if i + 1 < chars.len() {
            let mut v = chars.clone();
            v.swap(i, i + 1);
            out.insert(s(&v));
        }
        for &c in &alphabet {
            let mut v = chars.clone();
            v[i] = c;
            out.insert(s(&v));
        }
    }
    for i in 0..=chars.len() {
        for &c in &alphabet {
            let mut v = chars.clone();
            v.insert(i, c);
            out.insert(s(&v));
        }
    }
    out.remove(word);
    out
}

/// The correction of each word from `known` (candidate word → products holding it): the
/// candidate held by the most products, the alphabetically first on a tie.
pub fn best_correction(known: &BTreeMap<String, i64>) -> Option<String> {
    known
        .iter()
        .filter(|(_, n)| **n > 0)
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(w, _)| w.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_becomes_words() {
        assert_eq!(
            normalize("  Nimbus 14-inch Laptop, 16GB!"),
            "nimbus 14 inch laptop 16gb"
        );
        assert_eq!(normalize("Crème BRÛLÉE"), "crème brûlée");
        assert_eq!(normalize("!!"), "");
        assert_eq!(
            body_text("Deep bass.", ["Northwind", "", "Blue-green"].into_iter()),
            "deep bass northwind blue green"
        );
        let v = vocabulary("aurora wireless headphones", "30 h battery wireless");
        let v: Vec<(&str, bool)> = v.iter().map(|(w, n)| (w.as_str(), *n)).collect();
        assert_eq!(
            v,
            [
                ("aurora", true),
                ("battery", false),
                ("headphones", true),
                ("wireless", true)
            ]
        );
    }

    #[test]
    fn queries_become_index_expressions() {
        let q = Query::parse("Wireless head").unwrap();
        assert_eq!(q.words, vec!["wireless", "head"]);
        assert!(q.prefix);
        assert_eq!(q.fts5(Scope::All), r#"("wireless" AND "head"*)"#);
        assert_eq!(q.fts5(Scope::Name), r#"("wireless" AND "head"*)"#);
        assert_eq!(
            q.fts5(Scope::Rest),
            r#"("wireless" AND "head"*) NOT (search_name : ("wireless" AND "head"*))"#
        );
        assert_eq!(q.tsquery(), "'wireless' & 'head':*");
        assert_eq!(q.completable(), Some("head"));
        let completed = Query {
            completions: Some(vec!["head".into(), "headphones".into()]),
            ..q.clone()
        };
        assert_eq!(
            completed.fts5(Scope::All),
            r#"("wireless" AND ("head" OR "headphones"))"#
        );
        assert_eq!(completed.tsquery(), "'wireless' & ('head' | 'headphones')");
        assert_eq!(Query::parse("wireless hea").unwrap().completable(), None);
        // One letter last: no prefix. Quotes and operators are not words.
        let q = Query::parse(r#"a" OR "b NEAR(x"#).unwrap();
        assert_eq!(q.words, vec!["a", "or", "b", "near", "x"]);
        assert!(!q.prefix);
        assert_eq!(Query::parse(" ,;- "), None);
        let many = Query::parse(&"w ".repeat(3).to_string()).unwrap();
        assert_eq!(many.words, vec!["w"], "repeated words count once");
        let long: String = (0..20).map(|i| format!("w{i} ")).collect();
        assert_eq!(Query::parse(&long).unwrap().words.len(), MAX_QUERY_WORDS);
    }

    #[test]
    fn the_name_outranks_the_description_and_whole_words_outrank_prefixes() {
        let q = Query::parse("lamp").unwrap();
        let in_name = q.score("desk lamp", "a lamp for your desk");
        let in_text = q.score("desk light", "works as a lamp");
        assert!(in_name > in_text, "{in_name} > {in_text}");
        assert_eq!(q.score("desk light", "bright"), 0, "no match scores 0");
        let q = Query::parse("lam").unwrap();
        assert!(q.score("lamp", "") > 0, "a prefix matches");
        assert!(
            Query::parse("lamp").unwrap().score("lamp", "") > q.score("lamp", ""),
            "a whole word beats a prefix"
        );
        // The words in order in the name beat the same words apart.
        let q = Query::parse("red shoe").unwrap();
        assert!(q.score("big red shoe", "") > q.score("red big shoe", ""));
        // Shorter names are closer matches.
        let q = Query::parse("kettle").unwrap();
        assert!(q.score("kettle", "") > q.score("kettle with a whistle and a long spout", ""));
    }

    #[test]
    fn bands_cover_every_price_once() {
        assert_eq!(price_band(0), 0);
        assert_eq!(price_band(999), 0);
        assert_eq!(price_band(1_000), 1);
        assert_eq!(price_band(99_999), 6);
        assert_eq!(price_band(100_000), 7);
        assert_eq!(price_band(i64::MAX), 7);
        for b in 0..=7 {
            let (low, high) = band_range(b);
            assert_eq!(price_band(low), b);
            if let Some(h) = high {
                assert_eq!(price_band(h - 1), b);
                assert_eq!(price_band(h), b + 1);
            }
        }
    }

    #[test]
    fn corrections_are_one_edit_away() {
        let near = one_edit_away("lapmp");
        assert!(near.contains("lamp"), "a deletion");
        assert!(
            one_edit_away("headphnes").contains("headphones"),
            "an insertion"
        );
        assert!(
            one_edit_away("keyboarf").contains("keyboard"),
            "a replacement"
        );
        assert!(one_edit_away("speakre").contains("speaker"), "a swap");
        assert!(!near.contains("lapmp"));
        assert!(
            !one_edit_away("headphnes").contains("headphone"),
            "two edits away"
        );
        let known: BTreeMap<String, i64> = [
            ("lamp".into(), 3),
            ("lump".into(), 9),
            ("limp".into(), 9),
            ("lapp".into(), 0),
        ]
        .into_iter()
        .collect();
        assert_eq!(best_correction(&known).as_deref(), Some("limp"));
        assert_eq!(best_correction(&BTreeMap::new()), None);
    }
}
