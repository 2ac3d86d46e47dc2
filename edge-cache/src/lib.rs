//! The gateway's edge cache store: HTTP responses kept in sled on disk, behind a bounded LRU
//! in memory, surviving restarts.
//!
//! Each entry records status, headers, body, when it was stored, its TTL and its
//! stale-while-revalidate and stale-if-error windows, its ETag and its tags (a product id, say),
//! and is written with a checksum: an entry that fails it (a torn write, a flipped bit) is
//! dropped and counted, never served. The disk holds at most `max_disk_bytes`; beyond that the
//! least recently used entries go (recency is updated at most once a minute per entry, so hits
//! rarely write). Purges go by key, by tag, or everything.
//!
//! This crate is the store; deciding what to cache (methods, `Cache-Control`, auth) and when to
//! revalidate belongs to the gateway.

#![forbid(unsafe_code)]

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prometheus::{IntCounter, IntGauge, Registry};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 4] = b"SVC1";
/// Hits refresh an entry's recency at most this often.
const TOUCH_EVERY_MS: i64 = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("edge cache store: {0}")]
    Sled(#[from] sled::Error),
}

#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    pub max_disk_bytes: u64,
    pub max_memory_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_disk_bytes: 256 << 20,
            max_memory_bytes: 32 << 20,
        }
    }
}

/// A stored response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    #[serde(skip)]
    pub body: Bytes,
    pub stored_at_ms: i64,
    pub ttl_ms: i64,
    pub stale_while_revalidate_ms: i64,
    pub stale_if_error_ms: i64,
    pub etag: Option<String>,
    pub tags: Vec<String>,
}

/// How usable an entry is at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Within its TTL: serve it.
    Fresh,
    /// Past its TTL, within stale-while-revalidate: serve it and refresh in the background.
    Stale,
    /// Past that, within stale-if-error: serve it only if the upstream fails.
    StaleIfError,
    /// Too old to serve.
    Expired,
}

impl Entry {
    pub fn freshness(&self, now_ms: i64) -> Freshness {
        let age = now_ms - self.stored_at_ms;
        if age < self.ttl_ms {
            Freshness::Fresh
        } else if age < self.ttl_ms + self.stale_while_revalidate_ms {
            Freshness::Stale
        } else if age < self.ttl_ms + self.stale_if_error_ms {
            Freshness::StaleIfError
        } else {
            Freshness::Expired
        }
    }

    /// The whole seconds of freshness left at `now_ms` (0 once stale), for `max-age`.
    pub fn max_age_secs(&self, now_ms: i64) -> u64 {
        u64::try_from((self.ttl_ms - (now_ms - self.stored_at_ms)).max(0) / 1000).unwrap_or(0)
    }

    fn encode(&self, touched_ms: i64) -> Vec<u8> {
        let meta = serde_json::to_vec(&(self, touched_ms)).unwrap_or_default();
        let mut out = Vec::with_capacity(4 + 32 + 4 + meta.len() + self.body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&[0u8; 32]);
        out.extend_from_slice(&u32::try_from(meta.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&self.body);
        let sum = Sha256::digest(&out[36..]);
        out[4..36].copy_from_slice(&sum);
        out
    }

    /// `None` when the bytes are not an intact entry.
    fn decode(bytes: &[u8]) -> Option<(Entry, i64)> {
        if bytes.len() < 40
            || &bytes[..4] != MAGIC
            || Sha256::digest(&bytes[36..]).as_slice() != &bytes[4..36]
        {
            return None;
        }
        let len = usize::try_from(u32::from_be_bytes(bytes[36..40].try_into().ok()?)).ok()?;
        let meta = bytes.get(40..40 + len)?;
        let (mut entry, touched): (Entry, i64) = serde_json::from_slice(meta).ok()?;
        entry.body = Bytes::copy_from_slice(&bytes[40 + len..]);
        Some((entry, touched))
    }

    fn size(&self) -> u64 {
        (self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + 256) as u64
    }
}

struct Metrics {
    hits: IntCounter,
    misses: IntCounter,
    evictions: IntCounter,
    corrupt: IntCounter,
    purges: IntCounter,
    memory_bytes: IntGauge,
    disk_bytes: IntGauge,
}

struct Memory {
    /// Shared: a hit hands out the entry without copying its headers, tags and ETag.
    lru: lru::LruCache<String, Arc<Entry>>,
    bytes: u64,
}

pub struct EdgeCache {
    db: sled::Db,
    entries: sled::Tree,
    /// `tag \0 key` -> (): which entries carry a tag.
    tags: sled::Tree,
    /// `touched_ms (8 bytes, big-endian) key` -> (): entries in recency order.
    order: sled::Tree,
    memory: Mutex<Memory>,
    disk_bytes: Mutex<u64>,
    config: CacheConfig,
    metrics: Metrics,
}

fn order_key(touched: i64, key: &str) -> Vec<u8> {
    let mut k = (touched.max(0) as u64).to_be_bytes().to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

fn tag_key(tag: &str, key: &str) -> Vec<u8> {
    let mut k = tag.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

impl EdgeCache {
    /// Opens (creating) the store in `dir`.
    pub fn open(
        dir: &Path,
        config: CacheConfig,
        registry: &Registry,
    ) -> Result<EdgeCache, CacheError> {
        let db = sled::open(dir)?;
        let entries = db.open_tree("entries")?;
        let tags = db.open_tree("tags")?;
        let order = db.open_tree("order")?;
        let disk: u64 = entries
            .iter()
            .values()
            .filter_map(Result::ok)
            .map(|v| v.len() as u64)
            .sum();
        let metrics = Metrics {
            hits: int_counter(
                registry,
                "edge_cache_hits_total",
                "Responses served from the edge cache",
            ),
            misses: int_counter(
                registry,
                "edge_cache_misses_total",
                "Lookups the edge cache could not serve",
            ),
            evictions: int_counter(
                registry,
                "edge_cache_evictions_total",
                "Entries evicted to keep the disk bound",
            ),
            corrupt: int_counter(
                registry,
                "edge_cache_corrupt_total",
                "Entries dropped because they failed their checksum",
            ),
            purges: int_counter(
                registry,
                "edge_cache_purged_total",
                "Entries removed by purges",
            ),
            memory_bytes: int_gauge(
                registry,
                "edge_cache_memory_bytes",
                "Bytes held in the memory tier",
            ),
            disk_bytes: int_gauge(registry, "edge_cache_disk_bytes", "Bytes held on disk"),
        };
        metrics
            .disk_bytes
            .set(i64::try_from(disk).unwrap_or(i64::MAX));
        let cap = NonZeroUsize::new(100_000).unwrap_or(NonZeroUsize::MIN);
        Ok(EdgeCache {
            db,
            entries,
            tags,
            order,
            memory: Mutex::new(Memory {
                lru: lru::LruCache::new(cap),
                bytes: 0,
            }),
            disk_bytes: Mutex::new(disk),
            config,
            metrics,
        })
    }

    fn remember(&self, key: &str, entry: &Arc<Entry>) {
        let Ok(mut m) = self.memory.lock() else {
            return;
        };
        if let Some(old) = m.lru.put(key.to_owned(), Arc::clone(entry)) {
            m.bytes = m.bytes.saturating_sub(old.size());
        }
        m.bytes += entry.size();
        while m.bytes > self.config.max_memory_bytes {
            match m.lru.pop_lru() {
                Some((_, e)) => m.bytes = m.bytes.saturating_sub(e.size()),
                None => break,
            }
        }
        self.metrics
            .memory_bytes
            .set(i64::try_from(m.bytes).unwrap_or(i64::MAX));
    }

    fn forget(&self, key: &str) {
        if let Ok(mut m) = self.memory.lock()
            && let Some(old) = m.lru.pop(key)
        {
            m.bytes = m.bytes.saturating_sub(old.size());
            self.metrics
                .memory_bytes
                .set(i64::try_from(m.bytes).unwrap_or(i64::MAX));
        }
    }

    /// The entry under `key`, if any, and how fresh it is at `now_ms`. Expired entries are
    /// returned too (the caller may revalidate with their ETag).
    pub fn get(
        &self,
        key: &str,
        now_ms: i64,
    ) -> Result<Option<(Arc<Entry>, Freshness)>, CacheError> {
        if let Ok(mut m) = self.memory.lock()
            && let Some(e) = m.lru.get(key)
        {
            let f = e.freshness(now_ms);
            self.metrics.hits.inc();
            return Ok(Some((Arc::clone(e), f)));
        }
        let Some(raw) = self.entries.get(key)? else {
            self.metrics.misses.inc();
            return Ok(None);
        };
        let Some((entry, touched)) = Entry::decode(&raw) else {
            tracing::warn!(key, "edge cache entry failed its checksum; dropped");
            self.metrics.corrupt.inc();
            self.remove(key)?;
            self.metrics.misses.inc();
            return Ok(None);
        };
        if now_ms - touched > TOUCH_EVERY_MS {
            // Recency for eviction, written rarely.
            let _ = self.order.remove(order_key(touched, key));
            let _ = self.order.insert(order_key(now_ms, key), &[]);
            let _ = self.entries.insert(key, entry.encode(now_ms));
        }
        let entry = Arc::new(entry);
        self.remember(key, &entry);
        self.metrics.hits.inc();
        let f = entry.freshness(now_ms);
        Ok(Some((entry, f)))
    }

    /// Stores `entry` under `key`, evicting the least recently used entries beyond the disk bound.
    pub fn put(&self, key: &str, entry: &Entry) -> Result<(), CacheError> {
        self.remove(key)?;
        let bytes = entry.encode(entry.stored_at_ms);
        let len = bytes.len() as u64;
        self.entries.insert(key, bytes)?;
        self.order.insert(order_key(entry.stored_at_ms, key), &[])?;
        for t in &entry.tags {
            self.tags.insert(tag_key(t, key), &[])?;
        }
        self.remember(key, &Arc::new(entry.clone()));
        if let Ok(mut d) = self.disk_bytes.lock() {
            *d += len;
        }
        // Evict the least recently used until the disk bound holds (`remove` keeps the count).
        while self.disk_bytes() > self.config.max_disk_bytes {
            let Some(Ok((oldest, _))) = self.order.iter().next() else {
                break;
            };
            let victim = String::from_utf8_lossy(&oldest[8..]).into_owned();
            self.remove(&victim)?;
            let _ = self.order.remove(&oldest);
            self.metrics.evictions.inc();
            if victim == key {
                break;
            }
        }
        self.metrics
            .disk_bytes
            .set(i64::try_from(self.disk_bytes()).unwrap_or(i64::MAX));
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<bool, CacheError> {
        self.forget(key);
        let Some(raw) = self.entries.remove(key)? else {
            return Ok(false);
        };
        if let Ok(mut d) = self.disk_bytes.lock() {
            *d = d.saturating_sub(raw.len() as u64);
            self.metrics
                .disk_bytes
                .set(i64::try_from(*d).unwrap_or(i64::MAX));
        }
        if let Some((entry, touched)) = Entry::decode(&raw) {
            let _ = self.order.remove(order_key(touched, key));
            for t in &entry.tags {
                let _ = self.tags.remove(tag_key(t, key));
            }
        }
        Ok(true)
    }

    pub fn purge_key(&self, key: &str) -> Result<usize, CacheError> {
        let n = usize::from(self.remove(key)?);
        self.metrics.purges.inc_by(n as u64);
        Ok(n)
    }

    /// Removes every entry tagged `tag`; returns how many.
    pub fn purge_tag(&self, tag: &str) -> Result<usize, CacheError> {
        let mut prefix = tag.as_bytes().to_vec();
        prefix.push(0);
        let keys: Vec<String> = self
            .tags
            .scan_prefix(&prefix)
            .keys()
            .filter_map(Result::ok)
            .map(|k| String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            .collect();
        let mut n = 0;
        for k in keys {
            let _ = self.tags.remove(tag_key(tag, &k));
            n += usize::from(self.remove(&k)?);
        }
        self.metrics.purges.inc_by(n as u64);
        Ok(n)
    }

    pub fn purge_all(&self) -> Result<usize, CacheError> {
        let n = self.entries.len();
        self.entries.clear()?;
        self.tags.clear()?;
        self.order.clear()?;
        if let Ok(mut m) = self.memory.lock() {
            m.lru.clear();
            m.bytes = 0;
        }
        if let Ok(mut d) = self.disk_bytes.lock() {
            *d = 0;
        }
        self.metrics.memory_bytes.set(0);
        self.metrics.disk_bytes.set(0);
        self.metrics.purges.inc_by(n as u64);
        Ok(n)
    }

    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes.lock().map(|d| *d).unwrap_or(0)
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory.lock().map(|m| m.bytes).unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Lookups that found a usable entry, lookups that did not, and entries evicted, since
    /// the cache was opened.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.metrics.hits.get(),
            self.metrics.misses.get(),
            self.metrics.evictions.get(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes everything to disk (also done in the background by sled).
    pub fn flush(&self) -> Result<(), CacheError> {
        self.db.flush()?;
        Ok(())
    }

    /// Test hook: overwrite the stored bytes of `key` (to simulate damage).
    #[doc(hidden)]
    pub fn raw_insert(&self, key: &str, bytes: &[u8]) -> Result<(), CacheError> {
        self.forget(key);
        self.entries.insert(key, bytes)?;
        Ok(())
    }
}

/// A counter registered in `registry` (a name registered twice keeps its first collector).
#[allow(clippy::expect_used)] // the names are constants of this file
fn int_counter(registry: &prometheus::Registry, name: &str, help: &str) -> prometheus::IntCounter {
    let opts = prometheus::Opts::new(name, help).namespace("shopverse");
    let c = prometheus::IntCounter::with_opts(opts).expect("a valid metric name");
    if let Err(e) = registry.register(Box::new(c.clone())) {
        tracing::debug!(error = %e, "metric already registered");
    }
    c
}

/// A gauge registered in `registry`, as [`int_counter`].
#[allow(clippy::expect_used)] // the names are constants of this file
fn int_gauge(registry: &prometheus::Registry, name: &str, help: &str) -> prometheus::IntGauge {
    let opts = prometheus::Opts::new(name, help).namespace("shopverse");
    let g = prometheus::IntGauge::with_opts(opts).expect("a valid metric name");
    if let Err(e) = registry.register(Box::new(g.clone())) {
        tracing::debug!(error = %e, "metric already registered");
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(now: i64, body: &str, tags: &[&str]) -> Entry {
        Entry {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body.to_owned()),
            stored_at_ms: now,
            ttl_ms: 60_000,
            stale_while_revalidate_ms: 30_000,
            stale_if_error_ms: 86_400_000,
            etag: Some("\"v1\"".into()),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    #[test]
    fn freshness_windows() {
        let e = entry(0, "x", &[]);
        assert_eq!(e.freshness(59_999), Freshness::Fresh);
        assert_eq!(e.freshness(60_000), Freshness::Stale);
        assert_eq!(e.freshness(89_999), Freshness::Stale);
        assert_eq!(e.freshness(90_000), Freshness::StaleIfError);
        assert_eq!(e.freshness(86_460_000), Freshness::Expired);
        assert_eq!(e.max_age_secs(0), 60);
        assert_eq!(e.max_age_secs(59_999), 0);
        assert_eq!(e.max_age_secs(100_000), 0);
    }

    #[test]
    fn survives_restart_and_purges_by_tag() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = EdgeCache::open(dir.path(), CacheConfig::default(), &Registry::new()).unwrap();
            assert!(c.get("a", 0).unwrap().is_none(), "miss");
            c.put("a", &entry(0, "alpha", &["p1"])).unwrap();
            c.put("b", &entry(0, "beta", &["p1", "p2"])).unwrap();
            c.put("c", &entry(0, "gamma", &["p3"])).unwrap();
            assert_eq!(
                c.get("a", 10).unwrap().unwrap().0.body,
                Bytes::from("alpha"),
                "hit after miss"
            );
            c.flush().unwrap();
        }
        // sled's background flusher holds the file lock a moment after the cache is dropped
        // (this failed once on a loaded machine with "could not acquire lock"): wait for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let c = loop {
            match EdgeCache::open(dir.path(), CacheConfig::default(), &Registry::new()) {
                Ok(c) => break c,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("reopening: {e}; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("reopening the cache: {e}"),
            }
        };
        let (e, f) = c.get("b", 1_000).unwrap().unwrap();
        assert_eq!(
            (e.body.clone(), f),
            (Bytes::from("beta"), Freshness::Fresh),
            "fresh after a restart"
        );
        assert_eq!(c.purge_tag("p1").unwrap(), 2);
        assert!(c.get("a", 1_000).unwrap().is_none());
        assert!(c.get("b", 1_000).unwrap().is_none());
        assert!(c.get("c", 1_000).unwrap().is_some());
        assert_eq!(c.purge_all().unwrap(), 1);
        assert!(c.is_empty());
    }

    #[test]
    fn a_corrupt_entry_is_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new();
        let c = EdgeCache::open(dir.path(), CacheConfig::default(), &reg).unwrap();
        c.put("k", &entry(0, "good", &[])).unwrap();
        let mut raw = entry(0, "good", &[]).encode(0);
        let last = raw.len() - 1;
        raw[last] ^= 0xff;
        c.raw_insert("k", &raw).unwrap();
        assert!(c.get("k", 1).unwrap().is_none(), "never served");
        assert_eq!(c.metrics.corrupt.get(), 1);
        assert!(c.is_empty(), "dropped");
        c.raw_insert("j", b"not an entry at all").unwrap();
        assert!(c.get("j", 1).unwrap().is_none());
        assert_eq!(c.metrics.corrupt.get(), 2);
    }

    #[test]
    fn size_bounds_hold_under_ten_times_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let config = CacheConfig {
            max_disk_bytes: 200_000,
            max_memory_bytes: 50_000,
        };
        let c = EdgeCache::open(dir.path(), config, &Registry::new()).unwrap();
        let body = "x".repeat(1_000);
        for i in 0..2_000 {
            c.put(&format!("k{i}"), &entry(i, &body, &[])).unwrap();
            assert!(
                c.disk_bytes() <= config.max_disk_bytes,
                "disk bound at {i}: {}",
                c.disk_bytes()
            );
            assert!(
                c.memory_bytes() <= config.max_memory_bytes,
                "memory bound at {i}"
            );
        }
        assert!(
            c.metrics.evictions.get() > 1_000,
            "evictions {} len {} disk {}",
            c.metrics.evictions.get(),
            c.len(),
            c.disk_bytes()
        );
        // The newest entries survive; the oldest went.
        assert!(c.get("k1999", 2_000).unwrap().is_some());
        assert!(c.get("k0", 2_000).unwrap().is_none());
    }
}
