//! Configuration: a TOML file, then `SHOPVERSE_*` environment overrides, then validation.
//!
//! Overrides name a key path with `__` between the parts, so `SHOPVERSE_SERVICES__USERS__LISTEN`
//! sets `services.users.listen`. A value is read as a TOML value when it parses as one
//! (`8080`, `true`, `["a","b"]`) and as a string otherwise.
//!
//! Every failure is a [`ConfigError`] naming the file (or the environment variable), the key and
//! the reason; nothing here panics on bad input.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// The environment variable prefix for overrides.
pub const ENV_PREFIX: &str = "SHOPVERSE_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: not valid TOML: {message}")]
    Syntax { file: PathBuf, message: String },
    #[error("{origin}: key `{key}`: {reason}")]
    Invalid {
        origin: String,
        key: String,
        reason: String,
    },
}

/// A validation failure inside a config struct, before we know which file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Checks a config beyond what its types say (ranges, cross-field rules).
pub trait Validate {
    fn validate(&self) -> Result<(), Invalid>;
}

/// Loads `path`, applies overrides from `env` (pass `std::env::vars()`), deserializes and
/// validates.
pub fn load<T: DeserializeOwned + Validate>(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_owned(),
        source,
    })?;
    from_str(&text, &path.display().to_string(), env)
}

/// Like [`load`], for a configuration already in memory; `origin` names it in errors.
pub fn from_str<T: DeserializeOwned + Validate>(
    text: &str,
    origin: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let mut table: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                file: PathBuf::from(origin),
                message: e.to_string().trim().replace('\n', " "),
            })?;
    let mut overridden: Vec<(String, String)> = Vec::new();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !rest.contains("__") {
            // Every config key lives in a table, so an override always has a `__`;
            // SHOPVERSE_CONFIG, SHOPVERSE_LOG and friends are the binary's, not config keys.
            continue;
        }
        // `…_FILE`: the value is the content of that file (systemd credentials, Docker and
        // Kubernetes secrets), so secrets never sit in a unit file or the environment.
        let (rest, value) = match rest.strip_suffix("_FILE") {
            Some(base) => {
                let text = std::fs::read_to_string(&raw).map_err(|e| ConfigError::Invalid {
                    origin: format!("environment variable {name}"),
                    key: base
                        .split("__")
                        .map(|p| p.to_ascii_lowercase())
                        .collect::<Vec<_>>()
                        .join("."),
                    reason: format!("cannot read {raw}: {e}"),
                })?;
                (
                    base,
                    toml::Value::String(text.trim_end_matches(['\n', '\r']).to_owned()),
                )
            }
            None => (rest, parse_env_value(&raw)),
        };
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        set_path(&mut table, &path, value).map_err(|reason| ConfigError::Invalid {
            origin: format!("environment variable {name}"),
            key: path.join("."),
            reason,
        })?;
        overridden.push((path.join("."), name));
    }
    let value = toml::Value::Table(table);
    let parsed: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        let origin = overridden
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, var)| format!("environment variable {var}"))
            .unwrap_or_else(|| origin.to_owned());
        ConfigError::Invalid {
            origin,
            key,
            reason: e.into_inner().to_string(),
        }
    })?;
    parsed.validate().map_err(|inv| {
        let origin = overridden
            .iter()
            .find(|(k, _)| *k == inv.key)
            .map(|(_, var)| format!("environment variable {var}"))
            .unwrap_or_else(|| origin.to_owned());
        ConfigError::Invalid {
            origin,
            key: inv.key,
            reason: inv.reason,
        }
    })?;
    Ok(parsed)
}

/// Checks a `database` setting: empty (the default file), `sqlite:` or `postgres:`.
pub fn check_database_url(url: &str) -> Result<(), String> {
    if url.is_empty()
        || url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://")
    {
        Ok(())
    } else {
        Err("must be empty, a sqlite:// URL or a postgres:// URL".into())
    }
}

/// The database URL a service uses: the configured one, or `<data_dir>/<service>.db`.
pub fn database_url_or_default(url: &str, data_dir: &Path, service: &str) -> String {
    if url.is_empty() {
        format!(
            "sqlite://{}",
            data_dir.join(format!("{service}.db")).display()
        )
    } else {
        url.to_owned()
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty key".into());
    };
    let mut cur = table;
    for part in parents {
        let entry = cur
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(format!(
                    "`{part}` is not a table, cannot set a key below it"
                ));
            }
        };
    }
    cur.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        server: Server,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Server {
        port: u16,
        #[serde(default)]
        name: String,
    }
    impl Validate for Cfg {
        fn validate(&self) -> Result<(), Invalid> {
            if self.server.port == 1 {
                return Err(Invalid::new("server.port", "port 1 is reserved"));
            }
            Ok(())
        }
    }

    #[test]
    fn env_overrides_file() {
        let c: Cfg = from_str(
            "[server]\nport = 80\n",
            "a.toml",
            [
                ("SHOPVERSE_SERVER__PORT".to_string(), "8081".to_string()),
                ("SHOPVERSE_SERVER__NAME".to_string(), "edge one".to_string()),
                ("OTHER".to_string(), "x".to_string()),
            ],
        )
        .expect("valid");
        assert_eq!(c.server.port, 8081);
        assert_eq!(c.server.name, "edge one");
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("name");
        std::fs::write(&secret, "from a file\n").expect("write");
        let c: Cfg = from_str(
            "[server]\nport = 80\n",
            "a.toml",
            [(
                "SHOPVERSE_SERVER__NAME_FILE".to_string(),
                secret.display().to_string(),
            )],
        )
        .expect("valid");
        assert_eq!(c.server.name, "from a file");
        let e = from_str::<Cfg>(
            "[server]\nport = 80\n",
            "a.toml",
            [(
                "SHOPVERSE_SERVER__NAME_FILE".to_string(),
                "/nonexistent/secret".to_string(),
            )],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("key `server.name`: cannot read /nonexistent/secret"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let e = from_str::<Cfg>("[server]\nport = \"x\"\n", "a.toml", []).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("a.toml: key `server.port`:"), "{s}");

        let e = from_str::<Cfg>("[server]\nport = 80\nbogus = 1\n", "b.toml", []).unwrap_err();
        assert!(e.to_string().contains("unknown field `bogus`"), "{e}");

        let e = from_str::<Cfg>("[server]\nport = 1\n", "c.toml", []).unwrap_err();
        assert_eq!(
            e.to_string(),
            "c.toml: key `server.port`: port 1 is reserved"
        );

        let e = from_str::<Cfg>(
            "[server]\nport = 80\n",
            "d.toml",
            [("SHOPVERSE_SERVER__PORT".to_string(), "99999".to_string())],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("environment variable SHOPVERSE_SERVER__PORT: key `server.port`"),
            "{e}"
        );

        let e = from_str::<Cfg>("[server\n", "e.toml", []).unwrap_err();
        assert!(e.to_string().starts_with("e.toml: not valid TOML"), "{e}");
    }
}
