//! `serve` configuration: defaults, then a TOML file (`--config`), then `SHIPINATOR_*`
//! environment variables (`__` separates sections: `SHIPINATOR_LIMITS__JSON_BODY_BYTES`), then
//! the command-line flags.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! data_dir = ".shipinator"
//! public_url = "https://ci.example.com"   # what executors call back
//! shutdown_timeout_secs = 20
//!
//! [database]
//! url = "postgres://shipinator@db/shipinator"   # default: SQLite in the data directory
//!
//! [artifacts]                  # default: <data_dir>/artifacts
//! path = "/mnt/nfs/artifacts"
//! # or: s3 = { bucket = "artifacts", endpoint = "http://minio:9000", region = "us-east-1" }
//!
//! [logs]
//! path = "/var/lib/shipinator"  # logs go to <path>/logs; default: the data directory
//!
//! [executor]
//! kind = "local"
//!
//! [auth]
//! secret_file = "/etc/shipinator/secret"   # default: <data_dir>/server-secret, created 0600
//!
//! [limits]
//! json_body_bytes = 1048576
//! artifact_bytes = 10737418240
//! request_timeout_secs = 30
//! finished_run_cache = 2048                # runs that ended, kept for status reads; 0: none
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The top-level keys, the only `SHIPINATOR_*` variables read (`SHIPINATOR_LOG` and the
/// client's variables belong to the CLI).
const CONFIG_KEYS: [&str; 10] = [
    "listen",
    "data_dir",
    "public_url",
    "shutdown_timeout_secs",
    "database",
    "artifacts",
    "logs",
    "executor",
    "auth",
    "limits",
];

/// Everything `serve` needs to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ServerConfig {
    /// Address to listen on; port 0 picks a free port (the bound address is printed).
    pub(crate) listen: SocketAddr,
    /// The shared data directory (SQLite database, artifacts, logs, server secret).
    pub(crate) data_dir: PathBuf,
    /// The base URL executors and workers call back; default `http://<listen>`.
    pub(crate) public_url: Option<String>,
    /// Bound on a graceful shutdown (stop accepting, drain, persist).
    pub(crate) shutdown_timeout_secs: u64,
    /// Where state lives.
    pub(crate) database: DatabaseConfig,
    /// Where artifact payloads live.
    pub(crate) artifacts: ArtifactsConfig,
    /// Where step logs live.
    pub(crate) logs: LogsConfig,
    /// Who runs the steps.
    pub(crate) executor: ExecutorConfig,
    /// Token secrets.
    pub(crate) auth: AuthConfig,
    /// Request limits.
    pub(crate) limits: Limits,
}

/// State store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct DatabaseConfig {
    /// `postgres://…`, `sqlite://PATH` or a plain SQLite file path; default
    /// `<data_dir>/state.db`.
    pub(crate) url: Option<String>,
    /// PostgreSQL pool size.
    pub(crate) max_connections: Option<u32>,
}

/// Artifact store: a path (a mounted NFS share) or S3.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ArtifactsConfig {
    /// Directory; default `<data_dir>/artifacts`.
    pub(crate) path: Option<PathBuf>,
    /// S3 bucket instead of a path.
    pub(crate) s3: Option<S3Config>,
}

/// An S3 (or compatible) bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct S3Config {
    /// Bucket.
    pub(crate) bucket: String,
    /// Endpoint for S3-compatible stores.
    pub(crate) endpoint: Option<String>,
    /// Region.
    pub(crate) region: Option<String>,
    /// Key prefix.
    pub(crate) prefix: Option<String>,
    /// Allow `http://` endpoints.
    #[serde(default)]
    pub(crate) allow_http: bool,
}

/// Log store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct LogsConfig {
    /// Base directory (logs go to `<path>/logs`); default the data directory.
    pub(crate) path: Option<PathBuf>,
}

/// The executor. Only `local` exists here; other kinds add a variant and their settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum ExecutorConfig {
    /// Local processes on this machine, under the data directory.
    #[default]
    Local,
    /// Each execution a `shipinator worker` subprocess with a Kubernetes pod's environment,
    /// reporting over HTTP to `public_url` (a poor man's remote executor, and the end-to-end
    /// test of the worker endpoints).
    WorkerProcess,
}

/// Token secrets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct AuthConfig {
    /// File holding the server secret (hex); default `<data_dir>/server-secret`, generated at
    /// first start. Every replica sharing a database must use the same secret.
    pub(crate) secret_file: Option<PathBuf>,
}

/// Request limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Limits {
    /// Largest JSON request body.
    pub(crate) json_body_bytes: usize,
    /// Largest artifact upload.
    pub(crate) artifact_bytes: u64,
    /// Bound on a request's handling time (streams that already started are not cut).
    pub(crate) request_timeout_secs: u64,
    /// How many runs that have ended the status read keeps in memory (about half a kilobyte
    /// each; they never change); 0 reads every run from the store.
    pub(crate) finished_run_cache: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            json_body_bytes: 1024 * 1024,
            artifact_bytes: 10 * 1024 * 1024 * 1024,
            request_timeout_secs: 30,
            finished_run_cache: 2048,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from(".shipinator"),
            public_url: None,
            shutdown_timeout_secs: 20,
            database: DatabaseConfig::default(),
            artifacts: ArtifactsConfig::default(),
            logs: LogsConfig::default(),
            executor: ExecutorConfig::default(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
        }
    }
}

/// Flags that override the file and the environment.
#[derive(Debug, Default)]
pub(crate) struct Overrides {
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) data_dir: Option<PathBuf>,
}

impl ServerConfig {
    /// Layers defaults, `file`, the environment and `overrides`.
    pub(crate) fn load(file: Option<&Path>, overrides: Overrides) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(ServerConfig::default()));
        if let Some(file) = file {
            if !file.is_file() {
                anyhow::bail!("configuration file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(
            Env::prefixed("SHIPINATOR_")
                .filter(|key| {
                    let first = key.as_str().split("__").next().unwrap_or_default();
                    CONFIG_KEYS.iter().any(|k| k.eq_ignore_ascii_case(first))
                })
                .split("__"),
        );
        let mut config: ServerConfig = figment
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        if let Some(listen) = overrides.listen {
            config.listen = listen;
        }
        if let Some(dir) = overrides.data_dir {
            config.data_dir = dir;
        }
        Ok(config)
    }

    /// The server-secret file.
    pub(crate) fn secret_file(&self) -> PathBuf {
        self.auth
            .secret_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("server-secret"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_file_and_flags_layer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("server.toml");
        std::fs::write(
            &file,
            "public_url = \"http://ci.example\"\n[limits]\njson_body_bytes = 10\n\
             [database]\nurl = \"postgres://x/y\"\n",
        )
        .expect("write");
        let config = ServerConfig::load(
            Some(&file),
            Overrides {
                listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                data_dir: None,
            },
        )
        .expect("load");
        assert_eq!(config.limits.json_body_bytes, 10);
        assert_eq!(config.limits.request_timeout_secs, 30);
        assert_eq!(config.public_url.as_deref(), Some("http://ci.example"));
        assert_eq!(config.database.url.as_deref(), Some("postgres://x/y"));
        assert_eq!(config.listen.port(), 0);
        assert_eq!(config.data_dir, PathBuf::from(".shipinator"));
    }

    #[test]
    fn unknown_values_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("server.toml");
        std::fs::write(&file, "[limits]\njson_body_bytes = \"lots\"\n").expect("write");
        let err = ServerConfig::load(Some(&file), Overrides::default()).expect_err("invalid");
        assert!(err.to_string().contains("json_body_bytes"), "{err}");
    }
}
