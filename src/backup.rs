//! `shopverse backup` and `shopverse restore`.
//!
//! A backup is a folder: a snapshot of every SQLite database, `pg_dump` custom-format archives for
//! services on PostgreSQL, a copy of the signing keys, and `manifest.json` with a SHA-256 per
//! file.
//!
//! The SQLite snapshots are **one cut** ([`sqlite_cut`]): for the instant it takes to open a
//! read transaction on every file, no file commits a write, so the snapshots show the whole
//! appliance at one moment: every event a service's snapshot says it handled, the log's
//! snapshot holds, and every outbox row the log's snapshot lacks is still pending in its
//! service's snapshot. Databases on PostgreSQL are dumped one by one (no cut across them); there
//! the derived event ids ([`shopverse_events::envelope::Origin`]) and the inboxes make a
//! re-handled event raise nothing new.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::AppConfig;

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub created_at_ms: i64,
    pub shopverse_version: String,
    pub files: Vec<ManifestFile>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Path inside the backup folder.
    pub name: String,
    /// `sqlite`, `pg_dump` or `key`.
    pub kind: String,
    /// Where it belongs: a database URL (password removed) or a path.
    pub origin: String,
    pub sha256: String,
    pub bytes: u64,
}

/// The databases of this configuration: `(name, url)`.
fn databases(cfg: &AppConfig) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = shopverse::services::ALL
        .iter()
        .map(|u| (u.name().to_owned(), u.database_url(cfg)))
        .collect();
    // The payment provider's ledger: the simulator's own store.
    all.push((
        "payment-simulator".into(),
        cfg.services.payments.simulator_url(&cfg.data.dir),
    ));
    // Kafka keeps its own log (back it up with the cluster's own tools); the outboxes hold
    // whatever was not yet published.
    if cfg.events.backend == crate::config::EventsBackend::Embedded {
        all.push(("events".into(), cfg.events_url()));
    }
    all
}

fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    Some(PathBuf::from(rest.split('?').next().unwrap_or(rest)))
}

fn digest(path: &Path) -> anyhow::Result<(String, u64)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let hex: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((hex, bytes.len() as u64))
}

/// How long one try waits for each file's write lock, and how many tries the cut gets.
const FENCE_WAIT: std::time::Duration = std::time::Duration::from_millis(250);
const FENCE_TRIES: u32 = 40;

/// Snapshots every `(name, database, target)` at one instant and writes each snapshot to its
/// target; returns how long writers were held back.
///
/// Each file's write lock is taken in turn (`BEGIN IMMEDIATE`, waiting [`FENCE_WAIT`] at most
/// for each; a writer of the appliance that holds one file and wants another is never waited on
/// for long: on a busy file every lock taken is let go and the cut is tried again). With every
/// lock held, a read transaction is opened on each file, which fixes its snapshot; then the
/// locks are let go and the appliance writes on. Each snapshot is then copied with SQLite's
/// backup API from inside its read transaction, so what is copied is the cut.
fn sqlite_cut(files: &[(String, PathBuf, PathBuf)]) -> anyhow::Result<std::time::Duration> {
    use rusqlite::{Connection, OpenFlags};
    let open = |path: &Path, flags: OpenFlags| -> anyhow::Result<Connection> {
        let c = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .with_context(|| format!("opening {}", path.display()))?;
        c.busy_timeout(FENCE_WAIT)?;
        Ok(c)
    };
    let (snapshots, paused) = 'cut: {
        for _ in 0..FENCE_TRIES {
            let started = std::time::Instant::now();
            let mut fences = Vec::with_capacity(files.len());
            for (_, path, _) in files {
                let fence = open(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
                match fence.execute_batch("BEGIN IMMEDIATE") {
                    Ok(()) => fences.push(fence),
                    Err(rusqlite::Error::SqliteFailure(e, _))
                        if e.code == rusqlite::ErrorCode::DatabaseBusy =>
                    {
                        break;
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("locking {}", path.display()));
                    }
                }
            }
            if fences.len() < files.len() {
                // Let go of every lock before trying again.
                drop(fences);
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            let mut snapshots = Vec::with_capacity(files.len());
            for (_, path, _) in files {
                let snap = open(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
                snap.execute_batch("BEGIN")?;
                // The first read fixes what this transaction sees.
                snap.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
                    r.get::<_, i64>(0)
                })
                .with_context(|| format!("reading {}", path.display()))?;
                snapshots.push(snap);
            }
            for fence in &fences {
                fence.execute_batch("ROLLBACK")?;
            }
            break 'cut (snapshots, started.elapsed());
        }
        bail!(
            "could not take one cut: a database stayed busy through {FENCE_TRIES} tries; try again"
        );
    };
    for ((name, _, target), snap) in files.iter().zip(&snapshots) {
        let mut dst =
            Connection::open(target).with_context(|| format!("creating {}", target.display()))?;
        let step = rusqlite::backup::Backup::new(snap, &mut dst)?
            .step(-1)
            .with_context(|| format!("copying the snapshot of {name}"))?;
        if step != rusqlite::backup::StepResult::Done {
            bail!("copying the snapshot of {name} did not finish ({step:?})");
        }
        // A plain file, as a restore expects: no WAL beside it.
        dst.pragma_update(None, "journal_mode", "DELETE")?;
        drop(dst);
    }
    for snap in snapshots {
        snap.execute_batch("COMMIT")?;
    }
    Ok(paused)
}

pub async fn backup(cfg: &AppConfig, to: &Path) -> anyhow::Result<Manifest> {
    if to.exists()
        && std::fs::read_dir(to)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    {
        bail!("{} is not empty; back up into a new folder", to.display());
    }
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    shopverse_storage::install_drivers();
    let mut files = Vec::new();
    let all = databases(cfg);
    let mut sqlite = Vec::new();
    for (name, url) in &all {
        if let Some(path) = sqlite_path(url) {
            if path.exists() {
                sqlite.push((name.clone(), path, to.join(format!("{name}.db"))));
            } else {
                println!(
                    "  {name:<18} skipped (no database yet at {})",
                    path.display()
                );
            }
        }
    }
    if !sqlite.is_empty() {
        let files = sqlite.clone();
        let paused = tokio::task::spawn_blocking(move || sqlite_cut(&files))
            .await
            .context("the snapshot task failed")??;
        println!(
            "  one cut of {} SQLite databases: writers paused for {:.1} ms",
            sqlite.len(),
            paused.as_secs_f64() * 1e3
        );
    }
    for (name, url) in all {
        let origin = shopverse_storage::redact(&url);
        if let Some(path) = sqlite_path(&url) {
            if !path.exists() {
                continue;
            }
            let file = format!("{name}.db");
            let target = to.join(&file);
            let (sha256, bytes) = digest(&target)?;
            println!("  {name:<18} {bytes:>10} bytes  sqlite snapshot");
            files.push(ManifestFile {
                name: file,
                kind: "sqlite".into(),
                origin,
                sha256,
                bytes,
            });
        } else {
            let file = format!("{name}.pgdump");
            let target = to.join(&file);
            let status = std::process::Command::new("pg_dump")
                .args(["--format=custom", "--file"])
                .arg(&target)
                .arg(&url)
                .status()
                .with_context(|| {
                    format!("running pg_dump for {name} (install the PostgreSQL client)")
                })?;
            if !status.success() {
                bail!("pg_dump of {origin} failed ({status})");
            }
            let (sha256, bytes) = digest(&target)?;
            println!("  {name:<18} {bytes:>10} bytes  pg_dump");
            files.push(ManifestFile {
                name: file,
                kind: "pg_dump".into(),
                origin,
                sha256,
                bytes,
            });
        }
    }
    let keys = cfg.services.users.keys_dir(&cfg.data.dir);
    if keys.exists() {
        std::fs::create_dir_all(to.join("keys"))?;
        for e in std::fs::read_dir(&keys)?.filter_map(Result::ok) {
            let p = e.path();
            if p.is_file() && p.extension().is_none_or(|x| x != "tmp") {
                let name = format!("keys/{}", e.file_name().to_string_lossy());
                std::fs::copy(&p, to.join(&name))
                    .with_context(|| format!("copying {}", p.display()))?;
                let (sha256, bytes) = digest(&to.join(&name))?;
                files.push(ManifestFile {
                    name,
                    kind: "key".into(),
                    origin: p.display().to_string(),
                    sha256,
                    bytes,
                });
            }
        }
        println!(
            "  {:<18} {} files",
            "keys",
            files.iter().filter(|f| f.kind == "key").count()
        );
    }
    let manifest = Manifest {
        format: 1,
        created_at_ms: shopverse_kit::Clock::now_ms(&shopverse_kit::SystemClock),
        shopverse_version: env!("CARGO_PKG_VERSION").into(),
        files,
    };
    std::fs::write(
        to.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    Ok(manifest)
}

pub async fn restore(cfg: &AppConfig, from: &Path) -> anyhow::Result<usize> {
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(from.join("manifest.json")).with_context(|| {
            format!("{} has no manifest.json; is it a backup?", from.display())
        })?)
        .context("reading manifest.json")?;
    if manifest.format != 1 {
        bail!(
            "backup format {} is not one this version restores",
            manifest.format
        );
    }
    for f in &manifest.files {
        let (sha, _) = digest(&from.join(&f.name))?;
        if sha != f.sha256 {
            bail!(
                "{} is damaged (checksum mismatch); nothing was restored",
                f.name
            );
        }
    }
    let _lock = shopverse::appliance::lock_data_dir(&cfg.data.dir)
        .context("stop ShopVerse before restoring")?;
    let urls = databases(cfg);
    let mut restored = 0;
    for f in &manifest.files {
        match f.kind.as_str() {
            "sqlite" => {
                let name = f.name.trim_end_matches(".db");
                let url = urls
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, u)| u.clone())
                    .with_context(|| format!("no database `{name}` in this configuration"))?;
                let path = sqlite_path(&url).with_context(|| {
                    format!("{name} is configured on PostgreSQL, the backup holds SQLite")
                })?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                for suffix in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
                let tmp = path.with_extension("db.restoring");
                std::fs::copy(from.join(&f.name), &tmp)?;
                std::fs::rename(&tmp, &path)?;
            }
            "pg_dump" => {
                let name = f.name.trim_end_matches(".pgdump");
                let url = urls
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, u)| u.clone())
                    .with_context(|| format!("no database `{name}` in this configuration"))?;
                let status = std::process::Command::new("pg_restore")
                    .args(["--clean", "--if-exists", "--no-owner", "--dbname", &url])
                    .arg(from.join(&f.name))
                    .status()
                    .context("running pg_restore (install the PostgreSQL client)")?;
                if !status.success() {
                    bail!("pg_restore of {name} failed ({status})");
                }
            }
            "key" => {
                let keys = cfg.services.users.keys_dir(&cfg.data.dir);
                std::fs::create_dir_all(&keys)?;
                let file = f.name.trim_start_matches("keys/");
                std::fs::copy(from.join(&f.name), keys.join(file))?;
            }
            other => bail!("unknown kind `{other}` in the manifest"),
        }
        restored += 1;
    }
    Ok(restored)
}
