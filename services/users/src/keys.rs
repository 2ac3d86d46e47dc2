//! Signing keys: Ed25519, kept as files in the keys folder.
//!
//! `keys.json` lists every key (`kid`, created, retired); each private key is `<kid>.key`, its
//! PKCS#8 DER (mode 0600). The newest unretired key signs. `shopverse keys rotate` adds a key and
//! retires the previous one, whose public half stays in the JWKS until every token it signed has
//! expired. A running service notices the rotation on its next use (it watches the manifest's
//! modification time), so the CLI and the service need no other channel.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::EncodingKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const MANIFEST: &str = "keys.json";
/// RFC 8410 PKCS#8 v1 prefix for an Ed25519 private key; the 32-byte seed follows.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// Clock skew verifiers are allowed; a retired key stays published this much longer.
pub const LEEWAY_SECS: i64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("keys folder {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {reason}")]
    Corrupt { file: PathBuf, reason: String },
    #[error("the keys folder {0} has no active signing key")]
    NoActiveKey(PathBuf),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyMeta {
    pub kid: String,
    pub created_at_ms: i64,
    pub retired_at_ms: Option<i64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    keys: Vec<KeyMeta>,
}

/// A public key as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub kid: String,
    /// base64url of the 32-byte Ed25519 public key (the JWK `x`).
    pub x: String,
    pub retired_at_ms: Option<i64>,
}

struct Loaded {
    modified: Option<SystemTime>,
    active: Option<(String, EncodingKey)>,
    public: Vec<PublicKey>,
}

pub struct KeyStore {
    dir: PathBuf,
    loaded: RwLock<Loaded>,
}

fn io(dir: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        dir: dir.to_owned(),
        source,
    }
}

fn pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = PKCS8_ED25519_PREFIX.to_vec();
    der.extend_from_slice(seed);
    der
}

fn seed_of(der: &[u8], file: &Path) -> Result<[u8; 32], KeyError> {
    der.strip_prefix(&PKCS8_ED25519_PREFIX[..])
        .and_then(|s| <[u8; 32]>::try_from(s).ok())
        .ok_or_else(|| KeyError::Corrupt {
            file: file.to_owned(),
            reason: "not an Ed25519 PKCS#8 private key".into(),
        })
}

fn public_x(seed: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(
        ed25519_dalek::SigningKey::from_bytes(seed)
            .verifying_key()
            .to_bytes(),
    )
}

fn read_manifest(dir: &Path) -> Result<Manifest, KeyError> {
    let file = dir.join(MANIFEST);
    match std::fs::read(&file) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| KeyError::Corrupt {
            file,
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
        Err(e) => Err(io(dir)(e)),
    }
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename) with owner-only permissions.
fn write_private(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io(dir))?;
    f.write_all(bytes).map_err(io(dir))?;
    f.sync_all().map_err(io(dir))?;
    std::fs::rename(&tmp, path).map_err(io(dir))?;
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), KeyError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    Ok(())
}

/// Adds a new signing key and retires the current one. Returns the new key's id.
pub fn rotate(dir: &Path, now_ms: i64) -> Result<String, KeyError> {
    create_dir(dir)?;
    let mut manifest = read_manifest(dir)?;
    let seed: [u8; 32] = rand::random();
    let x = public_x(&seed);
    let thumb = Sha256::digest(x.as_bytes());
    let kid = format!("sv-{}", &URL_SAFE_NO_PAD.encode(thumb)[..16]);
    write_private(dir, &dir.join(format!("{kid}.key")), &pkcs8(&seed))?;
    for k in manifest
        .keys
        .iter_mut()
        .filter(|k| k.retired_at_ms.is_none())
    {
        k.retired_at_ms = Some(now_ms);
    }
    manifest.keys.push(KeyMeta {
        kid: kid.clone(),
        created_at_ms: now_ms,
        retired_at_ms: None,
    });
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| KeyError::Corrupt {
        file: dir.join(MANIFEST),
        reason: e.to_string(),
    })?;
    write_private(dir, &dir.join(MANIFEST), &json)?;
    Ok(kid)
}

impl KeyStore {
    /// Opens the keys folder, generating the first key when there is none.
    pub fn open_or_init(dir: &Path, now_ms: i64) -> Result<KeyStore, KeyError> {
        let manifest = read_manifest(dir)?;
        if !manifest.keys.iter().any(|k| k.retired_at_ms.is_none()) {
            let kid = rotate(dir, now_ms)?;
            tracing::info!(%kid, dir = %dir.display(), "generated a signing key");
        }
        let store = KeyStore {
            dir: dir.to_owned(),
            loaded: RwLock::new(Loaded {
                modified: None,
                active: None,
                public: Vec::new(),
            }),
        };
        store.reload_if_changed()?;
        Ok(store)
    }

    fn manifest_mtime(&self) -> Option<SystemTime> {
        std::fs::metadata(self.dir.join(MANIFEST))
            .and_then(|m| m.modified())
            .ok()
    }

    fn reload_if_changed(&self) -> Result<(), KeyError> {
        let mtime = self.manifest_mtime();
        if let Ok(l) = self.loaded.read()
            && l.modified.is_some()
            && l.modified == mtime
        {
            return Ok(());
        }
        let manifest = read_manifest(&self.dir)?;
        let mut public = Vec::new();
        let mut active = None;
        for k in &manifest.keys {
            let file = self.dir.join(format!("{}.key", k.kid));
            let der = std::fs::read(&file).map_err(io(&self.dir))?;
            let seed = seed_of(&der, &file)?;
            public.push(PublicKey {
                kid: k.kid.clone(),
                x: public_x(&seed),
                retired_at_ms: k.retired_at_ms,
            });
            if k.retired_at_ms.is_none() {
                active = Some((k.kid.clone(), EncodingKey::from_ed_der(&der)));
            }
        }
        if let Ok(mut l) = self.loaded.write() {
            *l = Loaded {
                modified: mtime,
                active,
                public,
            };
        }
        Ok(())
    }

    /// The key that signs now: `(kid, key)`.
    pub fn active(&self) -> Result<(String, EncodingKey), KeyError> {
        if let Err(e) = self.reload_if_changed() {
            // Keep signing with what we had; a half-written rotation must not stop logins.
            tracing::warn!(error = %e, "reloading signing keys failed; keeping the loaded ones");
        }
        self.loaded
            .read()
            .ok()
            .and_then(|l| l.active.clone())
            .ok_or_else(|| KeyError::NoActiveKey(self.dir.clone()))
    }

    /// Keys that may still verify a live token: the active one and those retired less than
    /// `access_ttl_secs` (plus leeway) ago.
    pub fn published(&self, now_ms: i64, access_ttl_secs: i64) -> Vec<PublicKey> {
        let _ = self.reload_if_changed();
        let horizon = (access_ttl_secs + LEEWAY_SECS) * 1000;
        self.loaded
            .read()
            .map(|l| {
                l.public
                    .iter()
                    .filter(|k| k.retired_at_ms.is_none_or(|r| now_ms - r < horizon))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_old_keys_until_their_tokens_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = KeyStore::open_or_init(dir.path(), 1_000_000).expect("init");
        let (first, _) = store.active().expect("active");
        assert_eq!(store.published(1_000_000, 900).len(), 1);
        // Another open finds the same key instead of making one.
        let again = KeyStore::open_or_init(dir.path(), 1_000_000).expect("reopen");
        assert_eq!(again.active().expect("active").0, first);

        std::thread::sleep(std::time::Duration::from_millis(20));
        let second = rotate(dir.path(), 2_000_000).expect("rotate");
        assert_ne!(first, second);
        assert_eq!(
            store.active().expect("active").0,
            second,
            "the running store sees the rotation"
        );
        let kids: Vec<String> = store
            .published(2_000_000, 900)
            .into_iter()
            .map(|k| k.kid)
            .collect();
        assert_eq!(kids, vec![first.clone(), second.clone()]);
        let later = 2_000_000 + (900 + LEEWAY_SECS) * 1000;
        let kids: Vec<String> = store
            .published(later, 900)
            .into_iter()
            .map(|k| k.kid)
            .collect();
        assert_eq!(kids, vec![second]);
    }
}
