//! REST routes derived from the descriptor set's `google.api.http` rules, matched in time
//! proportional to the path (a trie over segments), never to the number of routes.
//!
//! Literal segments win over variables; a route's custom verb (`/v1/products/{id}:archive`)
//! belongs to its last segment. A path that matches no template is 404; a path that matches
//! with another HTTP method is 405 with the methods that would work.

use http::Method;
use prost_reflect::{DescriptorPool, MethodDescriptor, Value};

/// Who may call a route (the `shopverse.api.v1.access` option of its RPC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    #[default]
    Public,
    Customer,
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRule {
    /// No body (GET, DELETE): every field comes from the path and the query.
    None,
    /// `body: "*"`: the JSON body is the request message.
    All,
    /// `body: "field"`: the JSON body is that field.
    Field(String),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub http_method: Method,
    /// Shared, so every request can name its route in metrics without copying it.
    pub template: std::sync::Arc<str>,
    pub method: MethodDescriptor,
    /// `/shopverse.users.v1.UsersService/Login`
    pub grpc_path: String,
    /// The service short name the upstream pool is keyed by: `users`.
    pub service: String,
    pub body: BodyRule,
    pub access: Access,
    /// The response's JSON writer, compiled once ([`crate::protojson`]).
    pub json: Option<std::sync::Arc<crate::protojson::JsonWriter>>,
    /// Field path per variable segment, in order.
    vars: Vec<String>,
}

#[derive(Default)]
struct Node {
    /// FxHash: the keys are the protos' path segments, not a client's choice.
    literal: rustc_hash::FxHashMap<String, Node>,
    variable: Option<Box<Node>>,
    /// Route ids ending here, by custom verb (one or two verbs at most: a list, searched
    /// without building a key).
    ends: Vec<(Option<String>, Vec<usize>)>,
}

impl Node {
    fn ends(&self, verb: Option<&str>) -> Option<&[usize]> {
        self.ends
            .iter()
            .find(|(v, _)| v.as_deref() == verb)
            .map(|(_, ids)| ids.as_slice())
    }
}

/// A matched route with the path variables bound to their field paths.
#[derive(Debug)]
pub struct Matched<'a> {
    pub route: &'a Route,
    pub bindings: Vec<(String, String)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum MatchError {
    NotFound,
    /// The methods the path allows.
    MethodNotAllowed(Vec<Method>),
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("descriptor set: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    #[error("{method}: bad HTTP template `{template}`: {reason}")]
    Template {
        method: String,
        template: String,
        reason: String,
    },
    #[error("{0} and {1} map to the same method and path")]
    Duplicate(String, String),
}

pub struct Router {
    routes: Vec<Route>,
    root: Node,
    pool: DescriptorPool,
}

enum Seg {
    Lit(String),
    Var(String),
}

fn parse_template(t: &str) -> Result<(Vec<Seg>, Option<String>), String> {
    let path = t.strip_prefix('/').ok_or("must start with /")?;
    let (path, verb) = match path.rsplit_once(':') {
        // A ':' after the last '/' (and outside braces) is the custom verb.
        Some((p, v)) if !v.contains('/') && !v.contains('}') => (p, Some(v.to_owned())),
        _ => (path, None),
    };
    let segs = path
        .split('/')
        .map(|s| {
            if let Some(inner) = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if inner.contains('=') {
                    return Err(format!("`{s}`: variable patterns are not supported"));
                }
                Ok(Seg::Var(inner.to_owned()))
            } else if s.is_empty() || s.contains(['{', '}']) {
                Err(format!("bad segment `{s}`"))
            } else {
                Ok(Seg::Lit(s.to_owned()))
            }
        })
        .collect::<Result<_, _>>()?;
    Ok((segs, verb))
}

fn access_of(pool: &DescriptorPool, m: &MethodDescriptor) -> Option<Access> {
    let ext = pool.get_extension_by_name("shopverse.api.v1.access")?;
    let opts = m.options();
    match opts.get_extension(&ext).as_ref() {
        Value::EnumNumber(1) => Some(Access::Public),
        Value::EnumNumber(2) => Some(Access::Customer),
        Value::EnumNumber(3) => Some(Access::Admin),
        _ => None,
    }
}

/// `(verb, template, body)` of every binding of `m`'s `google.api.http` rule.
fn http_bindings(pool: &DescriptorPool, m: &MethodDescriptor) -> Vec<(Method, String, String)> {
    let Some(ext) = pool.get_extension_by_name("google.api.http") else {
        return Vec::new();
    };
    let opts = m.options();
    if !opts.has_extension(&ext) {
        return Vec::new();
    }
    let rule = opts.get_extension(&ext);
    let Value::Message(rule) = rule.as_ref() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut rules = vec![rule.clone()];
    if let Some(Value::List(more)) = rule.get_field_by_name("additional_bindings").as_deref() {
        rules.extend(more.iter().filter_map(|v| v.as_message().cloned()));
    }
    for r in rules {
        let body = r
            .get_field_by_name("body")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        for (name, method) in [
            ("get", Method::GET),
            ("put", Method::PUT),
            ("post", Method::POST),
            ("delete", Method::DELETE),
            ("patch", Method::PATCH),
        ] {
            if r.has_field_by_name(name)
                && let Some(t) = r
                    .get_field_by_name(name)
                    .and_then(|v| v.as_str().map(str::to_owned))
            {
                out.push((method, t, body.clone()));
            }
        }
    }
    out
}

impl Router {
    /// Builds the routes of every RPC with an HTTP rule in `descriptor_set` (an encoded
    /// `FileDescriptorSet`). RPCs without a rule, or marked internal, get no route.
    pub fn from_descriptor_set(descriptor_set: &[u8]) -> Result<Router, RouterError> {
        let pool = DescriptorPool::decode(descriptor_set)?;
        let mut router = Router {
            routes: Vec::new(),
            root: Node::default(),
            pool: pool.clone(),
        };
        for service in pool.services() {
            let short = service
                .package_name()
                .split('.')
                .nth(1)
                .unwrap_or(service.package_name())
                .to_owned();
            for m in service.methods() {
                let Some(access) = access_of(&pool, &m) else {
                    continue;
                };
                for (http_method, template, body) in http_bindings(&pool, &m) {
                    router.add(&m, &short, http_method, &template, &body, access)?;
                }
            }
        }
        Ok(router)
    }

    fn add(
        &mut self,
        m: &MethodDescriptor,
        service: &str,
        http_method: Method,
        template: &str,
        body: &str,
        access: Access,
    ) -> Result<(), RouterError> {
        let bad = |reason: String| RouterError::Template {
            method: m.full_name().to_owned(),
            template: template.into(),
            reason,
        };
        let (segs, verb) = parse_template(template).map_err(bad)?;
        let mut node = &mut self.root;
        let mut vars = Vec::new();
        for s in segs {
            node = match s {
                Seg::Lit(l) => node.literal.entry(l).or_default(),
                Seg::Var(v) => {
                    vars.push(v);
                    node.variable.get_or_insert_with(Default::default)
                }
            };
        }
        let id = self.routes.len();
        let at = match node.ends.iter().position(|(v, _)| *v == verb) {
            Some(at) => at,
            None => {
                node.ends.push((verb, Vec::new()));
                node.ends.len() - 1
            }
        };
        let ends = &mut node.ends[at].1;
        if let Some(other) = ends
            .iter()
            .find(|i| self.routes[**i].http_method == http_method)
        {
            return Err(RouterError::Duplicate(
                self.routes[*other].method.full_name().to_owned(),
                m.full_name().to_owned(),
            ));
        }
        ends.push(id);
        self.routes.push(Route {
            http_method,
            template: template.into(),
            method: m.clone(),
            grpc_path: format!("/{}/{}", m.parent_service().full_name(), m.name()),
            service: service.to_owned(),
            body: match body {
                "" => BodyRule::None,
                "*" => BodyRule::All,
                f => BodyRule::Field(f.to_owned()),
            },
            access,
            json: crate::protojson::JsonWriter::compile(&m.output()).map(std::sync::Arc::new),
            vars,
        });
        Ok(())
    }

    /// The gRPC method at `path` (`/package.Service/Method`): its service short name and who may
    /// call it (`None`: internal, never through the gateway); `None` for an unknown method.
    pub fn grpc_method(&self, path: &str) -> Option<(String, Option<Access>)> {
        let (service, method) = path.strip_prefix('/').and_then(|p| p.split_once('/'))?;
        let svc = self.pool.get_service_by_name(service)?;
        let m = svc.methods().find(|m| m.name() == method)?;
        let short = svc
            .package_name()
            .split('.')
            .nth(1)
            .unwrap_or(svc.package_name())
            .to_owned();
        Some((short, access_of(&self.pool, &m)))
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The service a route template's calls go to.
    pub fn service_of_template(&self, template: &str) -> Option<&str> {
        self.routes
            .iter()
            .find(|r| &*r.template == template)
            .map(|r| r.service.as_str())
    }

    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }

    /// Finds the route for `method` and `path` (no query string).
    pub fn find(&self, method: &Method, path: &str) -> Result<Matched<'_>, MatchError> {
        let Some(rest) = path.strip_prefix('/') else {
            return Err(MatchError::NotFound);
        };
        let segs: Vec<&str> = rest.split('/').collect();
        // Segments are borrowed from `path` until a route is chosen; only its values are
        // decoded and copied.
        let mut captured: Vec<&str> = Vec::new();
        let mut candidates: Vec<(&[usize], Vec<&str>)> = Vec::new();
        // The last segment as is, and split at its last ':' for routes with a custom verb.
        walk(&self.root, &segs, 0, None, &mut captured, &mut candidates);
        if let Some((last, init)) = segs.split_last()
            && let Some((seg, verb)) = last.rsplit_once(':')
        {
            let mut with_verb: Vec<&str> = init.to_vec();
            with_verb.push(seg);
            walk(
                &self.root,
                &with_verb,
                0,
                Some(verb),
                &mut captured,
                &mut candidates,
            );
        }
        let mut allowed: Vec<Method> = Vec::new();
        for (ids, values) in &candidates {
            for id in *ids {
                let r = &self.routes[*id];
                if r.http_method == *method
                    || (*method == Method::HEAD && r.http_method == Method::GET)
                {
                    let bindings = r
                        .vars
                        .iter()
                        .cloned()
                        .zip(values.iter().map(|v| percent_decode(v)))
                        .collect();
                    return Ok(Matched { route: r, bindings });
                }
                allowed.push(r.http_method.clone());
            }
        }
        if allowed.is_empty() {
            return Err(MatchError::NotFound);
        }
        allowed.dedup();
        Err(MatchError::MethodNotAllowed(allowed))
    }
}

/// Collects the routes `segs` reaches (the ids ending at one node, with the segments its
/// variables took), literal branches before variable ones.
fn walk<'n, 'p>(
    node: &'n Node,
    segs: &[&'p str],
    i: usize,
    verb: Option<&str>,
    captured: &mut Vec<&'p str>,
    out: &mut Vec<(&'n [usize], Vec<&'p str>)>,
) {
    if i == segs.len() {
        if let Some(ids) = node.ends(verb) {
            out.push((ids, captured.clone()));
        }
        return;
    }
    let seg = segs[i];
    let found = out.len();
    if let Some(next) = node.literal.get(seg) {
        walk(next, segs, i + 1, verb, captured, out);
        if out.len() > found {
            return;
        }
    }
    if let Some(next) = &node.variable
        && !seg.is_empty()
    {
        captured.push(seg);
        walk(next, segs, i + 1, verb, captured, out);
        captured.pop();
    }
}

/// Decodes `%XX` escapes; invalid ones are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (
                (b[i + 1] as char).to_digit(16),
                (b[i + 2] as char).to_digit(16),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::from_descriptor_set(shopverse_proto::FILE_DESCRIPTOR_SET).unwrap()
    }

    #[test]
    fn routes_come_from_the_protos() {
        let r = router();
        assert!(r.routes().len() > 30, "{}", r.routes().len());
        assert!(
            r.routes()
                .iter()
                .all(|r| !r.grpc_path.contains("ReserveStock")),
            "internal RPCs have no route"
        );
        let m = r.find(&Method::GET, "/v1/products/abc").unwrap();
        assert_eq!(
            m.route.grpc_path,
            "/shopverse.products.v1.ProductsService/GetProduct"
        );
        assert_eq!(m.bindings, vec![("id".to_owned(), "abc".to_owned())]);
        assert_eq!(m.route.access, Access::Public);
        let m = r.find(&Method::POST, "/v1/products/abc:archive").unwrap();
        assert_eq!(
            m.route.grpc_path,
            "/shopverse.products.v1.ProductsService/ArchiveProduct"
        );
        assert_eq!(m.route.access, Access::Admin);
        let m = r.find(&Method::GET, "/v1/products/p%2F1/stock").unwrap();
        assert_eq!(
            m.bindings,
            vec![("product_id".to_owned(), "p/1".to_owned())]
        );
        let m = r.find(&Method::GET, "/.well-known/jwks.json").unwrap();
        assert_eq!(m.route.service, "users");
        let m = r.find(&Method::HEAD, "/v1/categories").unwrap();
        assert_eq!(m.route.http_method, Method::GET);
    }

    #[test]
    fn literals_win_and_errors_are_precise() {
        let r = router();
        // `/v1/cart/items/{product_id}` vs nothing literal: variable; `/v1/cart` literal.
        assert_eq!(
            r.find(&Method::GET, "/v1/cart")
                .unwrap()
                .route
                .method
                .name(),
            "GetCart"
        );
        assert_eq!(
            r.find(&Method::DELETE, "/v1/cart")
                .unwrap()
                .route
                .method
                .name(),
            "ClearCart"
        );
        assert!(matches!(
            r.find(&Method::GET, "/v1/nothing"),
            Err(MatchError::NotFound)
        ));
        match r.find(&Method::PUT, "/v1/categories") {
            Err(MatchError::MethodNotAllowed(m)) => assert_eq!(m, vec![Method::GET, Method::POST]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            r.find(&Method::GET, "/v1/products/"),
            Err(MatchError::NotFound)
        ));
        assert!(matches!(
            r.find(&Method::GET, "no-slash"),
            Err(MatchError::NotFound)
        ));
    }
}
