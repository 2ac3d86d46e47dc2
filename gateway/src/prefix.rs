//! The pass-through table: which configured prefix a request path falls under.
//!
//! The rule is the configuration's: the *first* listed prefix that the path starts with wins.
//! A linear scan would cost one comparison per route on every request (a thousand for a
//! thousand routes); this byte trie walks the path once, so the cost depends on the length of
//! the matching prefix, not on the size of the table.

/// No route ends at this node.
const NONE: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Node {
    /// Next byte and child node, sorted by byte.
    children: Vec<(u8, u32)>,
    /// The lowest index of a prefix that ends here.
    entry: u32,
}

#[derive(Debug, Clone)]
pub struct PrefixIndex {
    nodes: Vec<Node>,
}

impl PrefixIndex {
    pub fn new<'a>(prefixes: impl IntoIterator<Item = &'a str>) -> PrefixIndex {
        let mut nodes = vec![Node {
            children: Vec::new(),
            entry: NONE,
        }];
        for (i, prefix) in prefixes.into_iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(NONE - 1);
            let mut at = 0usize;
            for b in prefix.bytes() {
                at = match nodes[at].children.binary_search_by_key(&b, |(c, _)| *c) {
                    Ok(k) => nodes[at].children[k].1 as usize,
                    Err(k) => {
                        let next = nodes.len();
                        nodes.push(Node {
                            children: Vec::new(),
                            entry: NONE,
                        });
                        nodes[at].children.insert(k, (b, next as u32));
                        next
                    }
                };
            }
            nodes[at].entry = nodes[at].entry.min(i);
        }
        PrefixIndex { nodes }
    }

    /// The index of the first listed prefix that `path` starts with.
    pub fn first_match(&self, path: &str) -> Option<usize> {
        let mut node = &self.nodes[0];
        let mut best = node.entry;
        for b in path.bytes() {
            match node.children.binary_search_by_key(&b, |(c, _)| *c) {
                Ok(k) => {
                    node = &self.nodes[node.children[k].1 as usize];
                    best = best.min(node.entry);
                }
                Err(_) => break,
            }
        }
        (best != NONE).then_some(best as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trie against the rule it replaces, on every pair of a few tricky tables and paths.
    #[test]
    fn the_first_listed_prefix_wins_as_with_a_linear_scan() {
        let tables: &[&[&str]] = &[
            &[],
            &["/"],
            &["/static/", "/"],
            &["/", "/static/"],
            &["/static/img/", "/static/", "/st"],
            &["/st", "/static/", "/static/img/"],
            &["/a", "/a", "/ab"],
            &["/ümlaut/", "/ü"],
        ];
        let paths = [
            "",
            "/",
            "/s",
            "/st",
            "/static",
            "/static/",
            "/static/img/x.png",
            "/stuff",
            "/a",
            "/ab",
            "/abc",
            "/b",
            "/ümlaut/x",
            "/ü",
        ];
        for table in tables {
            let index = PrefixIndex::new(table.iter().copied());
            for path in paths {
                let linear = table.iter().position(|p| path.starts_with(p));
                assert_eq!(
                    index.first_match(path),
                    linear,
                    "table {table:?}, path {path:?}"
                );
            }
        }
    }

    #[test]
    fn a_thousand_routes_match_like_a_scan() {
        let prefixes: Vec<String> = (0..1000).map(|i| format!("/svc{i}/")).collect();
        let index = PrefixIndex::new(prefixes.iter().map(String::as_str));
        for path in [
            "/svc0/x",
            "/svc999/items/1",
            "/svc10/",
            "/svc1",
            "/svc1000/",
            "/other",
        ] {
            let linear = prefixes.iter().position(|p| path.starts_with(p.as_str()));
            assert_eq!(index.first_match(path), linear, "{path}");
        }
    }
}
