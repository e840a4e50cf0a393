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
//! kind = "local"                # or "worker_process", or "kubernetes" (needs public_url)
//!
//! [kubernetes]                  # with kind = "kubernetes"; every key has a default
//! cluster = { source = "in_cluster" }  # or "infer" (default), or
//!                                      # { source = "kubeconfig", path = "/etc/kube/config", context = "ci" }
//! namespace = "shipinator"      # where execution Jobs run
//! worker_image = "registry.example/shipinator-worker:1"
//! worker_binary = "/usr/local/bin/shipinator"   # inside worker_image
//! default_image = "debian:12-slim"              # for steps that name no image
//! deploy_image = "registry.example/deployer:1"  # for deploys that name none (helm, kubectl)
//! # callback_url = "http://shipinator.shipinator.svc:8080"   # default: public_url
//! service_account = "shipinator-builds"         # of build and test pods
//! workspace = { claim_name = "shipinator-workspaces" }   # ReadWriteMany, shared by a stage's pods
//! resources = { requests = { cpu = "500m", memory = "512Mi" }, limits = { memory = "2Gi" } }
//! node_selector = { "kubernetes.io/os" = "linux" }
//! ttl_seconds_after_finished = 3600
//! deadline_grace = 600          # seconds added to a step's timeout for the Job's deadline
//! image_pull_bound = 300        # seconds an image may fail to pull before the execution is lost
//! orphan_sweep_interval = 300   # seconds between sweeps of the Jobs of ended runs
//! # max_requests_per_second = 50
//!
//! [targets.local]               # deploy targets; `local` is the one deploys name by default
//! namespaces = ["staging"]      # the namespaces a deploy to it may touch
//! service_account = "deployer"  # the deploy Job's identity in those namespaces
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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use shipinator_k8s::{ClusterSource, K8sConfig, TargetConfig};

/// The top-level keys, the only `SHIPINATOR_*` variables read (`SHIPINATOR_LOG` and the
/// client's variables belong to the CLI).
const CONFIG_KEYS: [&str; 12] = [
    "listen",
    "data_dir",
    "public_url",
    "shutdown_timeout_secs",
    "database",
    "artifacts",
    "logs",
    "executor",
    "kubernetes",
    "targets",
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
    /// The Kubernetes executor's settings (`kind = "kubernetes"`); its `callback_url`
    /// defaults to `public_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) kubernetes: Option<K8sConfig>,
    /// Deploy targets of the Kubernetes executor, by name (`local`: the default).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) targets: BTreeMap<String, TargetConfig>,
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

/// The executor; a kind's settings live in a top-level table of their own (`[kubernetes]`).
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
    /// A Kubernetes Job per execution (`[kubernetes]`, `[targets.<name>]`); its pods call
    /// back `public_url` with their execution's token.
    Kubernetes,
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
            kubernetes: None,
            targets: BTreeMap::new(),
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
        let problems = config.problems();
        if !problems.is_empty() {
            anyhow::bail!("invalid configuration:\n  {}", problems.join("\n  "));
        }
        Ok(config)
    }

    /// The Kubernetes executor's settings as `serve` uses them: `[kubernetes]` with the
    /// `[targets.<name>]` tables and `callback_url` defaulting to `public_url` (or `fallback`
    /// when neither is set).
    pub(crate) fn k8s_config(&self, fallback_url: &str) -> K8sConfig {
        let mut k8s = self.kubernetes.clone().unwrap_or_default();
        k8s.targets = self.targets.clone();
        if k8s.callback_url.is_empty() {
            k8s.callback_url = self
                .public_url
                .clone()
                .unwrap_or_else(|| fallback_url.to_owned());
        }
        k8s
    }

    /// Every problem of the configuration that deserializing cannot see, each naming its key.
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(url) = &self.public_url
            && !is_http_url(url)
        {
            out.push(format!(
                "public_url: '{url}' is not an http:// or https:// URL"
            ));
        }
        for (name, target) in &self.targets {
            let key = format!("targets.{name}");
            if !is_dns_label(name) {
                out.push(format!(
                    "{key}: the target name must be lowercase letters, digits and '-'"
                ));
            }
            if target.namespaces.is_empty() {
                out.push(format!(
                    "{key}.namespaces is empty: list the namespaces a deploy to this target may touch"
                ));
            }
            for ns in &target.namespaces {
                if !is_dns_label(ns) {
                    out.push(format!(
                        "{key}.namespaces: '{ns}' is not a namespace name (lowercase letters, digits and '-', at most 63)"
                    ));
                }
            }
            if target.service_account.as_deref() == Some("") {
                out.push(format!(
                    "{key}.service_account is empty: remove it to use the namespace's default"
                ));
            }
        }
        if matches!(self.executor, ExecutorConfig::Kubernetes) {
            let k8s = self.kubernetes.clone().unwrap_or_default();
            k8s_problems(&k8s, self.public_url.is_some(), &mut out);
        }
        out
    }

    /// The server-secret file.
    pub(crate) fn secret_file(&self) -> PathBuf {
        self.auth
            .secret_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("server-secret"))
    }
}

/// Problems of `[kubernetes]` (for `kind = "kubernetes"`).
fn k8s_problems(k8s: &K8sConfig, has_public_url: bool, out: &mut Vec<String>) {
    if !k8s.targets.is_empty() {
        out.push(
            "kubernetes.targets: deploy targets are top-level [targets.<name>] tables".to_owned(),
        );
    }
    if k8s.callback_url.is_empty() && !has_public_url {
        out.push(
            "public_url is required with executor.kind = \"kubernetes\": it is the URL pods \
             call back (or set kubernetes.callback_url)"
                .to_owned(),
        );
    }
    if !k8s.callback_url.is_empty() && !is_http_url(&k8s.callback_url) {
        out.push(format!(
            "kubernetes.callback_url: '{}' is not an http:// or https:// URL",
            k8s.callback_url
        ));
    }
    if k8s.namespace.is_empty() {
        out.push("kubernetes.namespace is empty: name the namespace of execution Jobs".to_owned());
    } else if !is_dns_label(&k8s.namespace) {
        out.push(format!(
            "kubernetes.namespace: '{}' is not a namespace name (lowercase letters, digits and '-', at most 63)",
            k8s.namespace
        ));
    }
    if k8s.worker_image.trim().is_empty() {
        out.push(
            "kubernetes.worker_image is empty: name the image holding the shipinator binary"
                .to_owned(),
        );
    }
    if !k8s.worker_binary.starts_with('/') {
        out.push(format!(
            "kubernetes.worker_binary: '{}' must be an absolute path inside worker_image",
            k8s.worker_binary
        ));
    }
    for (key, value) in [
        ("default_image", &k8s.default_image),
        ("deploy_image", &k8s.deploy_image),
        ("service_account", &k8s.service_account),
    ] {
        if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
            out.push(format!(
                "kubernetes.{key} is empty: remove it or give a value"
            ));
        }
    }
    if let Some(w) = &k8s.workspace
        && w.claim_name.trim().is_empty()
    {
        out.push(
            "kubernetes.workspace.claim_name is empty: name the workspace volume claim".to_owned(),
        );
    }
    if let ClusterSource::Kubeconfig { path, .. } = &k8s.cluster {
        if path.is_empty() {
            out.push("kubernetes.cluster.path is empty: name the kubeconfig file".to_owned());
        } else if !Path::new(path).is_file() {
            out.push(format!(
                "kubernetes.cluster.path: the kubeconfig file '{path}' does not exist"
            ));
        }
    }
    if k8s.orphan_sweep_interval.is_zero() {
        out.push("kubernetes.orphan_sweep_interval must be at least 1 second".to_owned());
    }
    if k8s.ttl_seconds_after_finished < 0 {
        out.push("kubernetes.ttl_seconds_after_finished must not be negative".to_owned());
    }
}

fn is_http_url(url: &str) -> bool {
    ["http://", "https://"]
        .iter()
        .any(|p| url.strip_prefix(p).is_some_and(|rest| !rest.is_empty()))
}

/// A Kubernetes DNS label (RFC 1123): what namespace names are.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` with the process environment locked (and restored after), so that tests
    /// setting `SHIPINATOR_*` variables do not leak into others.
    #[allow(clippy::result_large_err)] // figment's Jail takes a closure returning its error
    fn jailed(f: impl FnOnce()) {
        figment::Jail::expect_with(|_| {
            f();
            Ok(())
        });
    }

    #[test]
    fn defaults_file_and_flags_layer() {
        jailed(defaults_file_and_flags_layer_inner);
    }

    fn defaults_file_and_flags_layer_inner() {
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
        jailed(unknown_values_are_reported_inner);
    }

    fn unknown_values_are_reported_inner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("server.toml");
        std::fs::write(&file, "[limits]\njson_body_bytes = \"lots\"\n").expect("write");
        let err = ServerConfig::load(Some(&file), Overrides::default()).expect_err("invalid");
        assert!(err.to_string().contains("json_body_bytes"), "{err}");
    }
}

#[cfg(test)]
mod k8s_tests {
    use std::time::Duration;

    use super::*;

    #[allow(clippy::result_large_err)] // figment's Jail takes a closure returning its error
    fn load(toml: &str, env: &[(&str, &str)]) -> anyhow::Result<ServerConfig> {
        let mut result = None;
        figment::Jail::expect_with(|jail| {
            jail.create_file("server.toml", toml)?;
            for (k, v) in env {
                jail.set_env(k, v);
            }
            result = Some(ServerConfig::load(
                Some(Path::new("server.toml")),
                Overrides::default(),
            ));
            Ok(())
        });
        result.unwrap_or_else(|| Err(anyhow::anyhow!("the jail did not run")))
    }

    #[test]
    fn kubernetes_and_targets_load_from_the_file_and_the_environment() {
        let config = load(
            r#"
public_url = "http://shipinator.ci.svc:8080"
[executor]
kind = "kubernetes"
[kubernetes]
namespace = "builds"
worker_image = "registry.example/shipinator-worker:1"
workspace = { claim_name = "shipinator-workspaces" }
resources = { requests = { cpu = "500m" } }
image_pull_bound = 120
[targets.local]
namespaces = ["staging"]
service_account = "deployer"
"#,
            &[
                ("SHIPINATOR_KUBERNETES__DEFAULT_IMAGE", "debian:12"),
                ("SHIPINATOR_KUBERNETES__ORPHAN_SWEEP_INTERVAL", "60"),
                ("SHIPINATOR_TARGETS__PROD__NAMESPACES", "[prod-a, prod-b]"),
            ],
        )
        .expect("valid");
        assert!(matches!(config.executor, ExecutorConfig::Kubernetes));
        let k8s = config.k8s_config("http://unused");
        assert_eq!(k8s.namespace, "builds");
        assert_eq!(k8s.default_image.as_deref(), Some("debian:12"));
        assert_eq!(k8s.image_pull_bound, Duration::from_secs(120));
        assert_eq!(k8s.orphan_sweep_interval, Duration::from_secs(60));
        assert_eq!(k8s.deadline_grace, K8sConfig::default().deadline_grace);
        assert_eq!(k8s.callback_url, "http://shipinator.ci.svc:8080");
        assert_eq!(
            k8s.resources.requests.get("cpu").map(String::as_str),
            Some("500m")
        );
        assert_eq!(
            k8s.workspace.map(|w| w.claim_name).as_deref(),
            Some("shipinator-workspaces")
        );
        let local = k8s.targets.get("local").expect("local target");
        assert_eq!(local.namespaces, ["staging"]);
        assert_eq!(local.service_account.as_deref(), Some("deployer"));
        let prod = k8s
            .targets
            .get("prod")
            .expect("prod target from the environment");
        assert_eq!(prod.namespaces, ["prod-a", "prod-b"]);
    }

    #[test]
    fn callback_url_overrides_public_url_and_env_chooses_the_kind() {
        let config = load(
            "[kubernetes]\ncallback_url = \"http://10.0.0.5:8080\"\n",
            &[("SHIPINATOR_EXECUTOR__KIND", "kubernetes")],
        )
        .expect("valid: the callback URL is given");
        assert!(matches!(config.executor, ExecutorConfig::Kubernetes));
        assert_eq!(
            config.k8s_config("http://fallback").callback_url,
            "http://10.0.0.5:8080"
        );
    }

    #[track_caller]
    fn refused(toml: &str, needles: &[&str]) {
        let err = load(toml, &[]).expect_err("invalid").to_string();
        for needle in needles {
            assert!(err.contains(needle), "{needle:?} not in: {err}");
        }
    }

    #[test]
    fn bad_kubernetes_settings_are_refused_naming_their_key() {
        let k8s = "[executor]\nkind = \"kubernetes\"\n";
        refused(k8s, &["public_url is required", "kubernetes.callback_url"]);
        let with_url = format!("public_url = \"http://ci:8080\"\n{k8s}");
        refused(
            &format!("{with_url}[kubernetes]\nnamespace = \"\"\n"),
            &["kubernetes.namespace is empty"],
        );
        refused(
            &format!("{with_url}[kubernetes]\nnamespace = \"Not_A_Namespace\"\n"),
            &["kubernetes.namespace: 'Not_A_Namespace'"],
        );
        refused(
            &format!(
                "{with_url}[kubernetes]\ncluster = {{ source = \"kubeconfig\", path = \"/no/such/kubeconfig\" }}\n"
            ),
            &[
                "kubernetes.cluster.path",
                "/no/such/kubeconfig",
                "does not exist",
            ],
        );
        refused(
            &format!(
                "{with_url}[kubernetes]\nworker_image = \"\"\nworkspace = {{ claim_name = \"\" }}\n"
            ),
            &[
                "kubernetes.worker_image is empty",
                "kubernetes.workspace.claim_name is empty",
            ],
        );
        refused(
            &format!("{with_url}[kubernetes]\nnamespce = \"typo\"\n"),
            &["namespce"],
        );
        refused(
            &format!("{with_url}[kubernetes.targets.local]\nnamespaces = [\"a\"]\n"),
            &["kubernetes.targets", "[targets.<name>]"],
        );
        refused(
            "public_url = \"ci.example\"\n",
            &["public_url: 'ci.example' is not an http"],
        );
    }

    #[test]
    fn bad_targets_are_refused_naming_their_key() {
        refused(
            "[targets.local]\nnamespaces = []\n",
            &["targets.local.namespaces is empty"],
        );
        refused(
            "[targets.local]\nservice_account = \"deployer\"\n",
            &["targets.local.namespaces is empty"],
        );
        refused(
            "[targets.prod]\nnamespaces = [\"Prod\"]\nservice_account = \"\"\n",
            &[
                "targets.prod.namespaces: 'Prod'",
                "targets.prod.service_account is empty",
            ],
        );
        refused(
            "[targets.local]\nnamespaces = \"staging\"\n",
            &["namespaces"],
        );
    }
}

#[cfg(test)]
mod deploy_tests {
    use super::*;

    /// The objects of the repository's `deploy/`, by kind.
    fn deploy_objects() -> Vec<serde_json::Value> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("deploy/")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).expect("read");
                serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            })
            .collect()
    }

    fn named<'a>(objects: &'a [serde_json::Value], kind: &str) -> Vec<&'a str> {
        objects
            .iter()
            .filter(|o| o["kind"] == kind)
            .filter_map(|o| o["metadata"]["name"].as_str())
            .collect()
    }

    /// The server configuration in `deploy/`'s ConfigMap loads as `serve` would load it, and
    /// names the objects `deploy/` creates.
    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail takes a closure returning its error
    fn the_configuration_in_deploy_parses_and_names_the_deployed_objects() {
        let objects = deploy_objects();
        let config_map = objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap")
            .expect("deploy/ holds the server's ConfigMap");
        let toml = config_map["data"]["server.toml"]
            .as_str()
            .expect("the ConfigMap holds server.toml");
        let mut loaded = None;
        figment::Jail::expect_with(|jail| {
            jail.create_file("server.toml", toml)?;
            loaded = Some(ServerConfig::load(
                Some(Path::new("server.toml")),
                Overrides::default(),
            ));
            Ok(())
        });
        let config = match loaded.expect("ran") {
            Ok(c) => c,
            Err(e) => panic!("deploy/'s server.toml: {e:#}"),
        };
        assert!(matches!(config.executor, ExecutorConfig::Kubernetes));
        let k8s = config.k8s_config("http://unused");
        assert_eq!(k8s.cluster, ClusterSource::InCluster);
        assert_eq!(
            Some(k8s.callback_url.as_str()),
            config.public_url.as_deref()
        );
        assert!(named(&objects, "Namespace").contains(&k8s.namespace.as_str()));
        assert_eq!(
            config_map["metadata"]["namespace"].as_str(),
            Some(k8s.namespace.as_str())
        );
        let claim = k8s.workspace.as_ref().map(|w| w.claim_name.as_str());
        assert!(named(&objects, "PersistentVolumeClaim").contains(&claim.unwrap_or("-")));
        let builds = k8s.service_account.as_deref().unwrap_or("-");
        assert!(named(&objects, "ServiceAccount").contains(&builds));
        let local = k8s
            .targets
            .get(shipinator_k8s::DEFAULT_TARGET)
            .expect("deploy/ configures the default target");
        assert!(!local.namespaces.is_empty());
    }

    /// The example configuration loads as `serve` would load it.
    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail takes a closure returning its error
    fn the_example_kubernetes_configuration_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/server/kubernetes.toml");
        let toml = std::fs::read_to_string(&path).expect("the example exists");
        let mut loaded = None;
        figment::Jail::expect_with(|jail| {
            jail.create_file("server.toml", &toml)?;
            loaded = Some(ServerConfig::load(
                Some(Path::new("server.toml")),
                Overrides::default(),
            ));
            Ok(())
        });
        let config = match loaded.expect("ran") {
            Ok(c) => c,
            Err(e) => panic!("{}: {e:#}", path.display()),
        };
        assert!(matches!(config.executor, ExecutorConfig::Kubernetes));
        let k8s = config.k8s_config("http://unused");
        assert_eq!(k8s.callback_url, "http://ci.example.internal:8080");
        assert_eq!(
            k8s.targets.keys().map(String::as_str).collect::<Vec<_>>(),
            ["local", "production"]
        );
    }
}
