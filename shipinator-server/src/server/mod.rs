//! `shipinator serve`: the HTTP API (DMD §4) over the engine and its backends.
//!
//! [`router`] builds the whole application from an [`AppState`] (tests drive it with
//! `oneshot`); [`run`] composes the backends from a [`ServerConfig`], starts the driver, serves
//! until SIGTERM or SIGINT and shuts down within a bound.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, StatusCode};
use axum::routing::get;
use shipinator_core::artifact::ArtifactStore;
use shipinator_core::domain::{ApiTokenId, TokenRole};
use shipinator_core::driver::{Driver, DriverConfig, DriverHandle};
use shipinator_core::executor::Executor;
use shipinator_core::logs::LogStore;
use shipinator_core::store::{ProjectScope, Store, StoreError};
use tokio::sync::{Mutex, watch};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub(crate) mod api;
pub(crate) mod auth;
pub(crate) mod cache;
pub(crate) mod config;
pub(crate) mod dto;
pub(crate) mod error;
pub(crate) mod metrics;

#[cfg(test)]
mod tests;

pub(crate) use config::{Limits, ServerConfig};

use crate::server::metrics::Metrics;

/// What every handler shares.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) artifacts: Arc<dyn ArtifactStore>,
    pub(crate) logs: Arc<dyn LogStore>,
    pub(crate) driver: DriverHandle,
    /// The server secret execution tokens are derived from.
    pub(crate) secret: Arc<[u8]>,
    pub(crate) limits: Arc<Limits>,
    pub(crate) metrics: Metrics,
    /// Serialises keyed (`Idempotency-Key`) run requests in this process.
    pub(crate) idempotency: Arc<Mutex<()>>,
    /// Turns `true` when the server shuts down: long-lived streams end.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Recently verified API tokens.
    pub(crate) tokens: Arc<auth::TokenCache>,
    /// The data directory: repository mirrors for reading a `.shipinator.yaml` at a ref.
    pub(crate) data_dir: shipinator_local::DataDir,
    /// The project of each pipeline looked up so far (it never changes).
    pub(crate) pipeline_projects: Arc<cache::PipelineProjects>,
    /// Runs that have ended (they never change again), as the status read answers them.
    pub(crate) finished_runs: Arc<cache::FinishedRuns>,
}

/// The application: every route, with tracing, request ids, timeouts and body limits.
pub(crate) fn router(state: AppState) -> Router {
    let x_request_id = HeaderName::from_static("x-request-id");
    let limits = Arc::clone(&state.limits);
    let bounded = api::bounded_routes()
        .layer(DefaultBodyLimit::max(limits.json_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(limits.request_timeout_secs.max(1)),
        ))
        .layer(axum::middleware::map_response(timeout_shape));
    let streaming = api::streaming_routes().layer(DefaultBodyLimit::disable());
    let (routes, mut openapi) = bounded.merge(streaming).split_for_parts();
    api::complete_responses(&mut openapi);
    let openapi = Arc::new(openapi);
    routes
        .route(
            "/v1/openapi.json",
            get(move || {
                let doc = Arc::clone(&openapi);
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(|| async {
            error::ApiError::not_found("no such endpoint; see /v1/openapi.json")
        })
        .method_not_allowed_fallback(|| async {
            error::ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method; see /v1/openapi.json",
            )
        })
        .with_state(state)
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(
            |req: &axum::http::Request<axum::body::Body>| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
            },
        ))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
}

/// The timeout layer answers 408 with an empty body: give it the API's error shape.
async fn timeout_shape(response: axum::response::Response) -> axum::response::Response {
    use axum::response::IntoResponse;
    if response.status() == StatusCode::REQUEST_TIMEOUT
        && !response
            .headers()
            .contains_key(axum::http::header::CONTENT_TYPE)
    {
        return error::ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "the request took longer than the configured limit (limits.request_timeout_secs)",
        )
        .into_response();
    }
    response
}

/// The backends `serve` runs on.
#[derive(Debug)]
pub(crate) struct Backends {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) artifacts: Arc<dyn ArtifactStore>,
    pub(crate) logs: Arc<dyn LogStore>,
    pub(crate) executor: Arc<dyn Executor>,
    /// The executor again when it is the Kubernetes one: `run` sweeps its orphans.
    pub(crate) kubernetes: Option<shipinator_k8s::K8sExecutor>,
}

/// Opens the store a configuration names (migrating it).
pub(crate) async fn open_store(config: &ServerConfig) -> anyhow::Result<Arc<dyn Store>> {
    let url = config.database.url.as_deref().unwrap_or_default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let mut options = shipinator_postgres::PgStoreOptions::default();
        if let Some(n) = config.database.max_connections {
            options = options.max_connections(n);
        }
        let store = shipinator_postgres::PgStore::connect_with(url, options)
            .await
            .context("connecting to PostgreSQL (database.url)")?;
        return Ok(Arc::new(store));
    }
    let path = match url.strip_prefix("sqlite://") {
        Some(p) => std::path::PathBuf::from(p),
        None if url.is_empty() => config.data_dir.join("state.db"),
        None => std::path::PathBuf::from(url),
    };
    let store = shipinator_sqlite::SqliteStore::open(&path)
        .await
        .with_context(|| format!("opening the SQLite database {}", path.display()))?;
    Ok(Arc::new(store))
}

/// Composes the configured backends; with no configuration, the data directory's.
pub(crate) async fn open_backends(config: &ServerConfig) -> anyhow::Result<Backends> {
    let data = shipinator_local::DataDir::new(&config.data_dir);
    data.create_all()
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let store = open_store(config).await?;
    let artifacts: Arc<dyn ArtifactStore> = match (&config.artifacts.s3, &config.artifacts.path) {
        (Some(s3), _) => {
            let mut b = shipinator_nfs::S3ArtifactStoreBuilder::from_env()
                .with_bucket(&s3.bucket)
                .with_allow_http(s3.allow_http)
                .with_size_limit(config.limits.artifact_bytes);
            if let Some(e) = &s3.endpoint {
                b = b.with_endpoint(e);
            }
            if let Some(r) = &s3.region {
                b = b.with_region(r);
            }
            if let Some(p) = &s3.prefix {
                b = b.with_prefix(p);
            }
            Arc::new(b.build().context("configuring the S3 artifact store")?)
        }
        (None, path) => {
            let path = path.clone().unwrap_or_else(|| data.artifacts());
            Arc::new(
                shipinator_nfs::NfsArtifactStore::new(&path)
                    .with_context(|| format!("opening the artifact store {}", path.display()))?,
            )
        }
    };
    let logs_base = config
        .logs
        .path
        .clone()
        .unwrap_or_else(|| data.root().to_path_buf());
    let logs: Arc<dyn LogStore> = Arc::new(
        shipinator_nfs::FsLogStore::new(&logs_base)
            .with_context(|| format!("opening the log store under {}", logs_base.display()))?,
    );
    let mut kubernetes = None;
    let executor: Arc<dyn Executor> = match config.executor {
        config::ExecutorConfig::Local => Arc::new(
            shipinator_local::LocalExecutor::builder(data.root())
                .artifact_store(Arc::clone(&artifacts))
                .log_store(Arc::clone(&logs))
                .grace_period(Duration::from_secs(5))
                .build()
                .context("starting the local executor")?,
        ),
        config::ExecutorConfig::WorkerProcess => {
            let secret: Arc<[u8]> = Arc::from(load_or_create_secret(&config.secret_file())?);
            let url = config
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{}", config.listen));
            Arc::new(crate::worker::process::WorkerProcessExecutor::new(
                data.clone(),
                url,
                Arc::new(move |id| auth::execution_token(&secret, id)),
                Arc::clone(&logs),
            )?)
        }
        config::ExecutorConfig::Kubernetes => {
            let secret: Arc<[u8]> = Arc::from(load_or_create_secret(&config.secret_file())?);
            let executor = open_kubernetes(config, secret).await?;
            kubernetes = Some(executor.clone());
            Arc::new(executor)
        }
    };
    Ok(Backends {
        store,
        artifacts,
        logs,
        executor,
        kubernetes,
    })
}

/// The Kubernetes executor of `[kubernetes]` and `[targets.<name>]`, each Job's worker given
/// its execution's token, after it took over the Jobs of a previous life of the server.
async fn open_kubernetes(
    config: &ServerConfig,
    secret: Arc<[u8]>,
) -> anyhow::Result<shipinator_k8s::K8sExecutor> {
    let k8s = config.k8s_config(&format!("http://{}", config.listen));
    if !k8s.targets.contains_key(shipinator_k8s::DEFAULT_TARGET) {
        tracing::warn!(
            "no [targets.{}] is configured: deploys to the default target will be refused",
            shipinator_k8s::DEFAULT_TARGET
        );
    }
    let source = match &k8s.cluster {
        shipinator_k8s::ClusterSource::Infer => {
            "inferred (KUBECONFIG, ~/.kube/config, in-cluster)".to_owned()
        }
        shipinator_k8s::ClusterSource::InCluster => "in-cluster service account".to_owned(),
        shipinator_k8s::ClusterSource::Kubeconfig { path, .. } => format!("kubeconfig {path}"),
    };
    let executor = shipinator_k8s::K8sExecutorBuilder::from_config(k8s)
        .await
        .with_context(|| format!("kubernetes.cluster: configuring the API client ({source})"))?
        .token_provider(move |spec| Some(auth::execution_token(&secret, spec.execution_id)))
        .build()
        .context("starting the Kubernetes executor ([kubernetes])")?;
    // One list per namespace fills the executor's cache: the driver's reconciliation of the
    // runs it claims then reads each execution's state from it (Jobs that finished while the
    // server was away included) instead of asking for each Job.
    match executor.adopt().await {
        Ok(adopted) => {
            let finished = adopted.iter().filter(|(_, s)| s.is_terminal()).count();
            tracing::info!(
                jobs = adopted.len(),
                finished,
                "adopted the Jobs of earlier server processes"
            );
        }
        Err(e) => tracing::warn!(
            error = %shipinator_local::error_chain(&e),
            "cannot list the executor's Jobs; the driver's status checks will find them"
        ),
    }
    Ok(executor)
}

/// Deletes the Jobs of ended runs now and then every `orphan_sweep_interval`, one sweep at a
/// time, each bounded by that interval.
async fn sweep_orphans(executor: shipinator_k8s::K8sExecutor, store: Arc<dyn Store>) {
    let period = executor
        .config()
        .orphan_sweep_interval
        .max(Duration::from_secs(1));
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let store = Arc::clone(&store);
        let sweep = executor.sweep_orphans(move |run| {
            let store = Arc::clone(&store);
            async move {
                match store.get_run(run).await {
                    Ok(r) => r.status.is_terminal(),
                    // Not ours (another installation sharing the namespace), or unknown now.
                    Err(e) => {
                        tracing::debug!(run_id = %run, error = %shipinator_local::error_chain(&e), "orphan sweep: run not read; its Jobs stay");
                        false
                    }
                }
            }
        });
        match tokio::time::timeout(period, sweep).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                tracing::info!(deleted = n, "orphan sweep: deleted the Jobs of ended runs")
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %shipinator_local::error_chain(&e), "orphan sweep failed")
            }
            Err(_) => tracing::warn!(
                seconds = period.as_secs(),
                "orphan sweep took longer than its interval; stopped"
            ),
        }
    }
}

/// Writes `contents` to a new file readable only by its owner.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// The server secret: read from its file, or generated (32 random bytes, hex) at first start.
pub(crate) fn load_or_create_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let secret = hex::decode(text.trim()).with_context(|| {
                format!("{} must hold the server secret in hex", path.display())
            })?;
            if secret.len() < 16 {
                anyhow::bail!(
                    "the server secret in {} is shorter than 16 bytes",
                    path.display()
                );
            }
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0_u8; 32];
            getrandom::fill(&mut bytes)
                .map_err(|e| anyhow::anyhow!("the system random source failed: {e}"))?;
            write_private(path, &format!("{}\n", hex::encode(bytes)))?;
            Ok(bytes.to_vec())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The id of the admin token created at first start. Fixed rather than fresh: when several
/// replicas start on an empty store at once, the store lets one of them create it and refuses
/// the others (`AlreadyExists`), where each would otherwise create an admin token of its own.
const FIRST_ADMIN_TOKEN: ApiTokenId =
    ApiTokenId::from_uuid(uuid::uuid!("5f1c2a9e-0d3b-4e6f-9a71-3c8d2b4e6f10"));

/// At first start (no token at all), creates the admin token, prints it once and writes it to
/// `<data_dir>/admin-token` (mode 0600).
async fn bootstrap_admin(store: &dyn Store, data_dir: &Path) -> anyhow::Result<()> {
    if !store.list_api_tokens().await?.is_empty() {
        return Ok(());
    }
    create_first_admin(store, data_dir).await.map(|_| ())
}

/// Creates the first admin token under [`FIRST_ADMIN_TOKEN`] and, if this call created it,
/// prints its secret once and writes it to `<data_dir>/admin-token`. Returns whether it did:
/// false when another replica got there first.
async fn create_first_admin(store: &dyn Store, data_dir: &Path) -> anyhow::Result<bool> {
    let (secret, token) = api::tokens::mint(
        FIRST_ADMIN_TOKEN,
        "admin".to_owned(),
        TokenRole::Admin,
        ProjectScope::All,
    )?;
    match store.create_api_token(&token).await {
        Ok(()) => {}
        Err(StoreError::AlreadyExists { .. }) => {
            tracing::info!("the first admin token was created by another replica");
            return Ok(false);
        }
        Err(e) => return Err(anyhow::Error::new(e).context("creating the first admin token")),
    }
    let file = data_dir.join("admin-token");
    write_private(&file, &format!("{secret}\n"))?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "admin token (shown once; also in {}): {secret}",
        file.display()
    )?;
    out.flush()?;
    Ok(true)
}

/// Waits for SIGTERM or SIGINT.
async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs the server until a signal, then shuts down within `shutdown_timeout_secs`.
pub(crate) async fn run(mut config: ServerConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    // Known before the backends open: an executor whose workers call back needs it.
    let public_url = config
        .public_url
        .get_or_insert_with(|| format!("http://{addr}"))
        .clone();
    let backends = open_backends(&config).await?;
    let secret = load_or_create_secret(&config.secret_file())?;

    let driver = Driver::new(
        Arc::clone(&backends.store),
        Arc::clone(&backends.executor),
        DriverConfig {
            owner: format!("serve-{}", uuid::Uuid::now_v7()),
            ..DriverConfig::default()
        },
    )
    .spawn();
    let (stop_tx, stop_rx) = watch::channel(false);
    let state = AppState {
        store: Arc::clone(&backends.store),
        artifacts: backends.artifacts,
        logs: backends.logs,
        driver: driver.clone(),
        secret: Arc::from(secret),
        limits: Arc::new(config.limits.clone()),
        metrics: Metrics::global(),
        idempotency: Arc::new(Mutex::new(())),
        shutdown: stop_rx.clone(),
        tokens: Arc::default(),
        data_dir: shipinator_local::DataDir::new(&config.data_dir),
        pipeline_projects: Arc::default(),
        finished_runs: Arc::new(cache::FinishedRuns::with_capacity(
            config.limits.finished_run_cache,
        )),
    };
    bootstrap_admin(state.store.as_ref(), &config.data_dir).await?;
    let event_metrics = metrics::spawn_event_metrics(&driver);
    let sweeper = backends
        .kubernetes
        .clone()
        .map(|k8s| tokio::spawn(sweep_orphans(k8s, Arc::clone(&backends.store))));
    let app = router(state);

    tracing::info!(%addr, %public_url, store = backends.store.backend(), executor = backends.executor.kind(), "serving");
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
    }
    let mut stopping = stop_rx.clone();
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                signal().await;
                tracing::info!("shutting down: no new connections, draining requests");
                let _ = stop_tx.send(true);
            })
            .into_future(),
    );
    let bound = Duration::from_secs(config.shutdown_timeout_secs.max(1));
    tokio::pin!(server);
    let served = tokio::select! {
        r = &mut server => Some(r),
        _ = stopping.wait_for(|s| *s) => None,
    };
    let served = match served {
        Some(r) => r,
        None => match tokio::time::timeout(bound, &mut server).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(
                    seconds = bound.as_secs(),
                    "requests still running at the shutdown bound; closing them"
                );
                server.abort();
                Ok(Ok(()))
            }
        },
    };
    match tokio::time::timeout(bound, driver.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "driver shutdown"),
        Err(_) => {
            tracing::warn!("the driver did not stop in time; its leases expire by themselves");
            driver.abort();
        }
    }
    event_metrics.abort();
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    drop(backends.store);
    tracing::info!("stopped");
    served
        .context("the server task failed")?
        .context("serving HTTP")
}
