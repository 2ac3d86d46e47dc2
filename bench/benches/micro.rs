//! Scenario 6 of the benchmarks: the gateway's per-request decisions, one at a time.
//!
//! - `route_match/rest/{N}`: the REST router (segment trie from `google.api.http` rules) with
//!   N generated routes; `route_match/passthrough/{N}`: the pass-through prefix table.
//! - `jwt_verify/cold`: an EdDSA signature check (token not seen before);
//!   `jwt_verify/cached`: the same token again (the verified-token cache).
//! - `rate_limit/decision`: one local GCRA decision.
//! - `cache_lookup/hot`: an entry in the memory tier; `cache_lookup/cold`: one only on disk.
//! - `transcode/json_to_protobuf` (a request body into its message, encoded) and
//!   `transcode/protobuf_to_json` (a product back into proto3 JSON).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use base64::Engine;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::Method;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use prost::Message;
use shopverse_gateway::auth::Verifier;
use shopverse_gateway::config::{GatewayConfig, LimitBy, RateLimitPolicy};
use shopverse_gateway::prefix::PrefixIndex;
use shopverse_gateway::ratelimit::Limiter;
use shopverse_gateway::router::Router;
use shopverse_gateway::transcode::{request_message, response_json};
use shopverse_kit::clock::SystemClock;

/// A descriptor set with one service of `n` routes `GET /v1/r{i}/{id}/items/{item}`.
fn router_with(n: usize) -> Router {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut proto = String::from(
        "syntax = \"proto3\";\npackage bench.v1;\nimport \"google/api/annotations.proto\";\n\
         import \"shopverse/api/v1/options.proto\";\n\
         message Req { string id = 1; string item = 2; }\nmessage Resp { string id = 1; }\n\
         service Bench {\n",
    );
    for i in 0..n {
        proto.push_str(&format!(
            "  rpc M{i}(Req) returns (Resp) {{ option (google.api.http) = {{get: \"/v1/r{i}/{{id}}/items/{{item}}\"}}; \
             option (shopverse.api.v1.access) = ACCESS_POLICY_PUBLIC; }}\n"
        ));
    }
    proto.push_str("}\n");
    std::fs::write(dir.path().join("bench.proto"), proto).expect("writing the proto");
    let protos = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    let mut compiler =
        protox::Compiler::new([dir.path(), std::path::Path::new(protos)]).expect("protox");
    compiler.include_imports(true).include_source_info(false);
    compiler
        .open_files(["bench.proto"])
        .expect("the generated proto compiles");
    Router::from_descriptor_set(&compiler.encode_file_descriptor_set()).expect("a router")
}

fn route_match(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_match");
    for n in [100usize, 1000] {
        let router = router_with(n);
        let path = format!("/v1/r{}/p-123/items/i-9", n / 2);
        assert!(router.find(&Method::GET, &path).is_ok());
        g.bench_function(format!("rest/{n}"), |b| {
            b.iter(|| black_box(router.find(&Method::GET, black_box(&path)).is_ok()))
        });
        let prefixes: Vec<String> = (0..n).map(|i| format!("/r{i}/")).collect();
        let index = PrefixIndex::new(prefixes.iter().map(String::as_str));
        let path = format!("/r{}/static/logo.png", n / 2);
        assert_eq!(index.first_match(&path), Some(n / 2));
        g.bench_function(format!("passthrough/{n}"), |b| {
            b.iter(|| black_box(index.first_match(black_box(&path))))
        });
    }
    g.finish();
}

fn jwt_verify(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let _entered = rt.enter();
    // A fixed Ed25519 key: the PKCS#8 wrapping of a 32-byte seed.
    let seed = [7u8; 32];
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&seed);
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public);
    let keys = || {
        HashMap::from([(
            "k1".to_owned(),
            DecodingKey::from_ed_components(&x).expect("a public key"),
        )])
    };
    let config = GatewayConfig::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("k1".into());
    let claims = serde_json::json!({
        "sub": "0192f5e4-7a1b-7cc3-9d2e-3f1a2b3c4d5e", "roles": ["customer"],
        "iss": config.issuer, "aud": config.audience, "iat": now, "exp": now + 900,
    });
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(&der))
        .expect("a signed token");
    let verifier = || {
        let channel = tonic::transport::Channel::from_static("http://127.0.0.1:9").connect_lazy();
        let v = Verifier::new(channel, &config, Arc::new(SystemClock));
        v.install_keys(keys());
        v
    };
    let mut g = c.benchmark_group("jwt_verify");
    g.bench_function("cold", |b| {
        b.iter_batched(
            verifier,
            |v| {
                let r = rt.block_on(v.verify(&token));
                assert!(r.is_ok());
                v
            },
            BatchSize::SmallInput,
        )
    });
    let warm = verifier();
    assert!(rt.block_on(warm.verify(&token)).is_ok());
    g.bench_function("cached", |b| {
        b.iter(|| black_box(rt.block_on(warm.verify(black_box(&token))).is_ok()))
    });
    g.finish();
}

fn rate_limit(c: &mut Criterion) {
    let limiter = Limiter::new(Arc::new(SystemClock));
    let policy = RateLimitPolicy {
        name: "bench".into(),
        paths: vec![],
        requests: 100_000_000,
        per_secs: 1,
        burst: 100_000_000,
        by: LimitBy::Ip,
    };
    c.bench_function("rate_limit/decision", |b| {
        b.iter(|| {
            black_box(
                limiter
                    .check_local(0, &policy, black_box("ip:127.0.0.1"))
                    .allowed,
            )
        })
    });
}

fn cache_lookup(c: &mut Criterion) {
    let entry = shopverse_edge_cache::Entry {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: bytes::Bytes::from(vec![b'x'; 1500]),
        stored_at_ms: shopverse_kit::Clock::now_ms(&SystemClock),
        ttl_ms: 3_600_000,
        stale_while_revalidate_ms: 0,
        stale_if_error_ms: 0,
        etag: Some("\"e\"".into()),
        tags: vec!["product:p-1".into()],
    };
    let now = entry.stored_at_ms + 1;
    let open = |memory: u64| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let cache = shopverse_edge_cache::EdgeCache::open(
            dir.path(),
            shopverse_edge_cache::CacheConfig {
                max_disk_bytes: 64 << 20,
                max_memory_bytes: memory,
            },
            &prometheus::Registry::new(),
        )
        .expect("a cache");
        cache.put("GET /v1/products/p-1", &entry).expect("stored");
        (dir, cache)
    };
    let mut g = c.benchmark_group("cache_lookup");
    let (_hot_dir, hot) = open(32 << 20);
    g.bench_function("hot", |b| {
        b.iter(|| black_box(hot.get(black_box("GET /v1/products/p-1"), now).is_ok()))
    });
    // A memory tier too small to keep the entry: every lookup reads it from sled.
    let (_cold_dir, cold) = open(1);
    g.bench_function("cold", |b| {
        b.iter(|| black_box(cold.get(black_box("GET /v1/products/p-1"), now).is_ok()))
    });
    g.finish();
}

fn transcode(c: &mut Criterion) {
    let router = Router::from_descriptor_set(shopverse_proto::FILE_DESCRIPTOR_SET).expect("router");
    let matched = router
        .find(&Method::POST, "/v1/cart/items")
        .expect("the cart route");
    let body = br#"{"productId":"0192f5e4-7a1b-7cc3-9d2e-3f1a2b3c4d5e","quantity":2}"#;
    let mut g = c.benchmark_group("transcode");
    g.bench_function("json_to_protobuf", |b| {
        b.iter(|| {
            let m = request_message(matched.route, &matched.bindings, None, black_box(body))
                .map(|m| m.encode_to_vec());
            black_box(m.is_ok())
        })
    });
    let product = shopverse_proto::products::v1::Product {
        id: "0192f5e4-7a1b-7cc3-9d2e-3f1a2b3c4d5e".into(),
        sku: "MUG-001".into(),
        name: "Enamel mug".into(),
        description: "A 350 ml enamel mug with a rolled rim.".into(),
        price: Some(shopverse_proto::common::v1::Money {
            currency: "EUR".into(),
            amount_minor: 1299,
        }),
        category_id: "0192f5e4-0000-7cc3-9d2e-3f1a2b3c4d5e".into(),
        attributes: HashMap::from([("colour".into(), "blue".into())]),
        image_urls: vec!["/img/mug.png".into()],
        active: true,
        version: 3,
        created_at: None,
        updated_at: None,
    }
    .encode_to_vec();
    let desc = router
        .pool()
        .get_message_by_name("shopverse.products.v1.Product")
        .expect("the Product message");
    assert!(response_json(&desc, &product).is_ok());
    g.bench_function("protobuf_to_json", |b| {
        b.iter(|| black_box(response_json(&desc, black_box(&product)).map(|j| j.len())))
    });
    g.finish();
}

criterion_group!(
    benches,
    route_match,
    jwt_verify,
    rate_limit,
    cache_lookup,
    transcode
);
criterion_main!(benches);
