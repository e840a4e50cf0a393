//! [`K8sExecutor`]: one Kubernetes Job per execution, kept current by watches.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, LogParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use shipinator_core::domain::{ExecutionId, RunId};
use shipinator_core::executor::{
    ExecHandle, ExecutionReport, ExecutionSpec, ExecutionState, Executor, ExecutorError,
    LogLineStream, ReportStream,
};
use shipinator_core::logs::{LogLine, LogStream};
use shipinator_core::time::Timestamp;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{ClusterSource, K8sConfig, TargetConfig, WorkspaceVolume};
use crate::error::{Error, api_code};
use crate::manifest::{
    EXECUTION_ANNOTATION, EXECUTION_LABEL, MANAGED_BY, MANAGED_BY_LABEL, RUN_LABEL, STEP_CONTAINER,
    job_manifest, job_name,
};
use crate::status::{Observed, finished, observe};

/// Issues the per-execution callback token put in `SHIPINATOR_EXECUTION_TOKEN`.
pub type TokenProvider = Arc<dyn Fn(&ExecutionSpec) -> Option<String> + Send + Sync>;

/// Builds a [`K8sExecutor`].
pub struct K8sExecutorBuilder {
    client: kube::Client,
    config: K8sConfig,
    token: Option<TokenProvider>,
}

impl fmt::Debug for K8sExecutorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("K8sExecutorBuilder")
            .field("config", &self.config)
            .field("token", &self.token.is_some())
            .finish_non_exhaustive()
    }
}

impl K8sExecutorBuilder {
    /// A builder over an API client, with default settings.
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            config: K8sConfig::default(),
            token: None,
        }
    }

    /// A builder whose client comes from `config.cluster` (kubeconfig, in-cluster or inferred).
    ///
    /// # Errors
    /// [`Error::Client`] when no configuration can be loaded.
    pub async fn from_config(config: K8sConfig) -> Result<Self, Error> {
        let client_error =
            |e: Box<dyn std::error::Error + Send + Sync>| Error::Client { source: e };
        let kube_config = match &config.cluster {
            ClusterSource::Infer => kube::Config::infer()
                .await
                .map_err(|e| client_error(Box::new(e)))?,
            ClusterSource::InCluster => {
                kube::Config::incluster().map_err(|e| client_error(Box::new(e)))?
            }
            ClusterSource::Kubeconfig { path, context } => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| client_error(Box::new(e)))?;
                let opts = kube::config::KubeConfigOptions {
                    context: context.clone(),
                    ..Default::default()
                };
                kube::Config::from_custom_kubeconfig(kc, &opts)
                    .await
                    .map_err(|e| client_error(Box::new(e)))?
            }
        };
        crate::install_crypto_provider();
        let client = kube::Client::try_from(kube_config).map_err(|e| client_error(Box::new(e)))?;
        Ok(Self::new(client).config(config))
    }

    /// Replaces every setting.
    #[must_use]
    pub fn config(mut self, config: K8sConfig) -> Self {
        self.config = config;
        self
    }

    /// Namespace of execution Jobs.
    #[must_use]
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.config.namespace = ns.into();
        self
    }

    /// Image holding the `shipinator` binary.
    #[must_use]
    pub fn worker_image(mut self, image: impl Into<String>) -> Self {
        self.config.worker_image = image.into();
        self
    }

    /// Image of steps that name none.
    #[must_use]
    pub fn default_image(mut self, image: impl Into<String>) -> Self {
        self.config.default_image = Some(image.into());
        self
    }

    /// The server URL workers call back.
    #[must_use]
    pub fn callback_url(mut self, url: impl Into<String>) -> Self {
        self.config.callback_url = url.into();
        self
    }

    /// The workspace volume claim (`ReadWriteMany`, NFS-backed).
    #[must_use]
    pub fn workspace_claim(mut self, claim: impl Into<String>) -> Self {
        self.config.workspace = Some(WorkspaceVolume {
            claim_name: claim.into(),
            sub_path_prefix: String::new(),
        });
        self
    }

    /// Adds (or replaces) a deploy target.
    #[must_use]
    pub fn target(mut self, name: impl Into<String>, target: TargetConfig) -> Self {
        self.config.targets.insert(name.into(), target);
        self
    }

    /// Client-side limit on API requests per second (watches excepted).
    #[must_use]
    pub fn throttle(mut self, requests_per_second: u32) -> Self {
        self.config.max_requests_per_second = Some(requests_per_second);
        self
    }

    /// How long an image may fail to pull before the execution is lost.
    #[must_use]
    pub fn image_pull_bound(mut self, bound: Duration) -> Self {
        self.config.image_pull_bound = bound;
        self
    }

    /// Issues per-execution tokens; without it the token is taken from the spec's env.
    #[must_use]
    pub fn token_provider(
        mut self,
        f: impl Fn(&ExecutionSpec) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.token = Some(Arc::new(f));
        self
    }

    /// The executor; starts its watches, so call it inside a tokio runtime.
    ///
    /// # Errors
    /// [`Error::Config`] when the namespace or worker image is empty.
    pub fn build(self) -> Result<K8sExecutor, Error> {
        if self.config.namespace.is_empty() {
            return Err(Error::Config(
                "the executions namespace is empty".to_owned(),
            ));
        }
        if self.config.worker_image.is_empty() {
            return Err(Error::Config("the worker image is empty".to_owned()));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Config(
                "build the executor inside a tokio runtime (it starts watches)".to_owned(),
            )
        })?;
        let job_res = ApiResource::erase::<Job>(&());
        let pod_res = ApiResource::erase::<Pod>(&());
        let (reports, report_rx) = mpsc::unbounded_channel();
        let throttle = Throttle::new(self.config.max_requests_per_second);
        let namespaces = watched_namespaces(&self.config);
        let shared = Arc::new(Shared {
            client: self.client.clone(),
            config: self.config,
            cache: Mutex::new(Cache::default()),
            throttle,
            reports,
            report_rx: Mutex::new(Some(report_rx)),
        });
        let mut tasks = vec![runtime.spawn(tick(Arc::clone(&shared)))];
        for ns in namespaces {
            tasks.push(runtime.spawn(watch_jobs(
                Arc::clone(&shared),
                Api::namespaced_with(self.client.clone(), &ns, &job_res),
                ns.clone(),
            )));
            tasks.push(runtime.spawn(watch_pods(
                Arc::clone(&shared),
                Api::namespaced_with(self.client.clone(), &ns, &pod_res),
                ns,
            )));
        }
        Ok(K8sExecutor {
            inner: Arc::new(Inner {
                shared,
                token: self.token,
                tasks,
            }),
        })
    }
}

/// Runs each execution as a Kubernetes Job (see the crate docs).
#[derive(Clone)]
pub struct K8sExecutor {
    inner: Arc<Inner>,
}

impl fmt::Debug for K8sExecutor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("K8sExecutor")
            .field("namespace", &self.inner.shared.config.namespace)
            .finish_non_exhaustive()
    }
}

struct Inner {
    shared: Arc<Shared>,
    token: Option<TokenProvider>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Shared {
    config: K8sConfig,
    client: kube::Client,
    cache: Mutex<Cache>,
    throttle: Throttle,
    reports: mpsc::UnboundedSender<ExecutionReport>,
    /// Taken by [`Executor::reports`]; reports wait here until then.
    report_rx: Mutex<Option<mpsc::UnboundedReceiver<ExecutionReport>>>,
}

/// A Job as the watch saw it: typed, or why it could not be read.
#[derive(Debug, Clone)]
enum Seen {
    Job(Box<Job>),
    Malformed(String),
}

#[derive(Debug, Default)]
struct Cache {
    /// Namespaces whose pod watch has listed.
    pods_synced: HashSet<String>,
    /// The namespace of each execution's Job (the executions namespace unless a deploy).
    namespaces: HashMap<ExecutionId, String>,
    jobs: HashMap<ExecutionId, Seen>,
    pods: HashMap<ExecutionId, HashMap<String, Pod>>,
    /// Terminal states, recorded once (and reported once).
    terminal: HashMap<ExecutionId, ExecutionState>,
    canceled: HashSet<ExecutionId>,
    pull_failing_since: HashMap<ExecutionId, Instant>,
    /// Per namespace, during a relist: the Jobs seen so far.
    jobs_relisted: HashMap<String, HashSet<ExecutionId>>,
    /// Per namespace, during a relist: the Jobs known when it started.
    jobs_before_relist: HashMap<String, HashSet<ExecutionId>>,
    /// Executions whose Job is gone, oldest first: their terminal state is kept for a while
    /// (for late `status` calls), then forgotten.
    gone: std::collections::VecDeque<ExecutionId>,
}

/// How many executions with deleted Jobs keep their terminal state in memory.
const REMEMBER_GONE: usize = 10_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn label_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY}")
}

/// Why `job` is not the Job of execution `id`, if it is not.
fn ownership_problem(id: ExecutionId, job: &Job) -> Option<String> {
    let managed = job
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .map(String::as_str);
    if managed != Some(MANAGED_BY) {
        return Some(format!(
            "label {MANAGED_BY_LABEL} is {managed:?}, not {MANAGED_BY:?}"
        ));
    }
    let annotated = job
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(EXECUTION_ANNOTATION))
        .map(String::as_str);
    let want = id.to_string();
    if annotated != Some(want.as_str()) {
        return Some(format!(
            "annotation {EXECUTION_ANNOTATION} is {annotated:?}, not {want:?}"
        ));
    }
    None
}

/// The execution a watched object belongs to, from its annotation (Jobs) or label (pods).
fn execution_of(meta: &kube::api::ObjectMeta, annotation: bool) -> Option<ExecutionId> {
    let raw = if annotation {
        meta.annotations.as_ref()?.get(EXECUTION_ANNOTATION)?
    } else {
        meta.labels.as_ref()?.get(EXECUTION_LABEL)?
    };
    raw.parse().ok()
}

fn typed<T: DeserializeOwned>(obj: &DynamicObject) -> Result<T, String> {
    serde_json::to_value(obj)
        .and_then(serde_json::from_value)
        .map_err(|e| e.to_string())
}

/// The executions namespace, then every namespace a deploy target allows, once each.
fn watched_namespaces(config: &K8sConfig) -> Vec<String> {
    let mut out = vec![config.namespace.clone()];
    for ns in config.targets.values().flat_map(|t| t.namespaces.iter()) {
        if !out.contains(ns) {
            out.push(ns.clone());
        }
    }
    out
}

impl Shared {
    fn cache(&self) -> MutexGuard<'_, Cache> {
        lock(&self.cache)
    }

    fn jobs(&self, ns: &str) -> Api<Job> {
        Api::namespaced(self.client.clone(), ns)
    }

    fn pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// The namespace of `id`'s Job.
    fn ns_of(&self, id: ExecutionId) -> String {
        self.cache()
            .namespaces
            .get(&id)
            .cloned()
            .unwrap_or_else(|| self.config.namespace.clone())
    }

    /// The handle of `id`: the Job name, prefixed by `<namespace>/` outside the executions
    /// namespace.
    fn handle(&self, id: ExecutionId) -> ExecHandle {
        let ns = self.ns_of(id);
        ExecHandle {
            execution_id: id,
            external_id: if ns == self.config.namespace {
                job_name(id)
            } else {
                format!("{ns}/{}", job_name(id))
            },
        }
    }

    /// Learns the namespace a handle names (after a restart the cache may not know it).
    fn learn(&self, handle: &ExecHandle) {
        if let Some((ns, _)) = handle.external_id.split_once('/') {
            self.cache()
                .namespaces
                .entry(handle.execution_id)
                .or_insert_with(|| ns.to_owned());
        }
    }

    /// Records a terminal state once and reports it; returns the recorded state.
    fn record(&self, id: ExecutionId, state: ExecutionState) -> ExecutionState {
        let mut cache = self.cache();
        if let Some(s) = cache.terminal.get(&id) {
            return s.clone();
        }
        cache.terminal.insert(id, state.clone());
        cache.pull_failing_since.remove(&id);
        drop(cache);
        let _ = self.reports.send(ExecutionReport {
            execution_id: id,
            state: state.clone(),
        });
        state
    }

    async fn list_pods(&self, id: ExecutionId) -> Result<Vec<Pod>, Error> {
        let lp = ListParams::default().labels(&format!("{EXECUTION_LABEL}={id}"));
        self.throttle.permit().await;
        let list = self
            .pods(&self.ns_of(id))
            .list(&lp)
            .await
            .map_err(Error::api("list pods"))?;
        Ok(list.items)
    }

    /// The current state of `id` from the cache, fetching pods when the Job failed and the
    /// cached pods do not tell why. A completed Job whose cached pods do not carry the
    /// worker's report is still running for a watch's refresh (`settled_by_watch`: the pod's
    /// own event follows and refreshes it, at no cost), and its pods are read afresh for
    /// anyone else. `None` when the Job is not cached.
    async fn evaluate(
        &self,
        id: ExecutionId,
        settled_by_watch: bool,
    ) -> Result<Option<ExecutionState>, Error> {
        let (seen, pods) = {
            let cache = self.cache();
            if let Some(s) = cache.terminal.get(&id) {
                return Ok(Some(s.clone()));
            }
            let Some(seen) = cache.jobs.get(&id).cloned() else {
                return Ok(None);
            };
            let ns = cache.namespaces.get(&id).unwrap_or(&self.config.namespace);
            let synced = cache.pods_synced.contains(ns);
            let pods: Option<Vec<Pod>> = cache
                .pods
                .get(&id)
                .map(|m| m.values().cloned().collect())
                .or_else(|| synced.then(Vec::new));
            (seen, pods)
        };
        let job = match seen {
            Seen::Job(job) => job,
            Seen::Malformed(why) => {
                return Ok(Some(self.record(
                    id,
                    ExecutionState::Lost {
                        reason: format!("the job object is malformed: {why}"),
                    },
                )));
            }
        };
        let mut observed = observe(id, &job, pods.as_deref());
        if settled_by_watch && observed == Observed::CompleteUnreported {
            return Ok(Some(ExecutionState::Running));
        }
        // Cached pods may lag behind the Job: when the Job failed and they do not say how, or
        // completed and they do not carry the worker's report, read them afresh (a rare
        // path, one request).
        let failed_unclear = match &observed {
            Observed::NeedPods | Observed::CompleteUnreported => true,
            Observed::State(ExecutionState::Lost { .. }) => pods.is_some(),
            Observed::State(ExecutionState::Finished(r)) => r.exit_code == -1 && pods.is_some(),
            Observed::State(_) | Observed::PullFailing(_) => false,
        };
        if failed_unclear {
            let fresh = self.list_pods(id).await?;
            observed = observe(id, &job, Some(&fresh));
        }
        Ok(Some(self.settle(id, observed).await))
    }

    async fn settle(&self, id: ExecutionId, observed: Observed) -> ExecutionState {
        match observed {
            Observed::State(s) if s.is_terminal() => self.record(id, s),
            Observed::State(s) => {
                self.cache().pull_failing_since.remove(&id);
                s
            }
            Observed::PullFailing(reason) => {
                let since = *self
                    .cache()
                    .pull_failing_since
                    .entry(id)
                    .or_insert_with(Instant::now);
                if since.elapsed() >= self.config.image_pull_bound {
                    let state = self.record(id, ExecutionState::Lost { reason });
                    // The Job would back off until its deadline: delete it.
                    self.throttle.permit().await;
                    if let Err(e) = self
                        .jobs(&self.ns_of(id))
                        .delete(&job_name(id), &DeleteParams::background())
                        .await
                        && api_code(&e) != Some(404)
                    {
                        tracing::warn!(execution = %id, error = %e, "cannot delete a job whose image cannot be pulled");
                    }
                    state
                } else {
                    ExecutionState::Pending
                }
            }
            Observed::NeedPods => ExecutionState::Lost {
                reason: "the job failed and its pods cannot be read".to_owned(),
            },
            // Read afresh and still no report (a worker always writes one before it exits 0):
            // the step container completed, so the step succeeded.
            Observed::CompleteUnreported => self.record(id, finished(id, 0, None)),
        }
    }

    /// A Job is gone (deleted, or missing from a relist).
    fn job_gone(&self, id: ExecutionId) {
        let mut cache = self.cache();
        cache.jobs.remove(&id);
        cache.pods.remove(&id);
        let known = cache.terminal.contains_key(&id);
        let canceled = cache.canceled.contains(&id);
        cache.gone.push_back(id);
        while cache.gone.len() > REMEMBER_GONE {
            if let Some(old) = cache.gone.pop_front() {
                cache.terminal.remove(&old);
                cache.canceled.remove(&old);
                cache.namespaces.remove(&old);
            }
        }
        drop(cache);
        if !known {
            self.record(
                id,
                if canceled {
                    ExecutionState::Canceled
                } else {
                    ExecutionState::Lost {
                        reason: "the job was deleted before it finished".to_owned(),
                    }
                },
            );
        }
    }

    fn put_job(&self, obj: &DynamicObject, ns: &str) -> Option<ExecutionId> {
        let Some(id) = execution_of(&obj.metadata, true) else {
            tracing::warn!(job = ?obj.metadata.name, "managed job without a valid execution annotation, ignored");
            return None;
        };
        let seen = match typed::<Job>(obj) {
            Ok(job) => match ownership_problem(id, &job) {
                None => Seen::Job(Box::new(job)),
                Some(p) => Seen::Malformed(p),
            },
            Err(e) => Seen::Malformed(e),
        };
        let mut cache = self.cache();
        if let Some(relisted) = cache.jobs_relisted.get_mut(ns) {
            relisted.insert(id);
        }
        cache.namespaces.insert(id, ns.to_owned());
        cache.jobs.insert(id, seen);
        Some(id)
    }

    async fn refresh(&self, id: ExecutionId) {
        if let Err(e) = self.evaluate(id, true).await {
            tracing::warn!(execution = %id, error = %e, "cannot evaluate execution");
        }
    }
}

async fn watch_jobs(shared: Arc<Shared>, api: Api<DynamicObject>, ns: String) {
    let cfg = watcher::Config::default().labels(&label_selector());
    let mut stream = pin!(watcher::watcher(api, cfg).default_backoff());
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Init) => {
                // The list is requested after this event: Jobs cached now were created
                // before it and must be in it, unless they are gone.
                let mut cache = shared.cache();
                let known: HashSet<ExecutionId> = cache
                    .jobs
                    .keys()
                    .filter(|id| cache.namespaces.get(id) == Some(&ns))
                    .copied()
                    .collect();
                cache.jobs_before_relist.insert(ns.clone(), known);
                cache.jobs_relisted.insert(ns.clone(), HashSet::new());
            }
            Ok(Event::InitApply(obj) | Event::Apply(obj)) => {
                if let Some(id) = shared.put_job(&obj, &ns) {
                    shared.refresh(id).await;
                }
            }
            Ok(Event::Delete(obj)) => {
                if let Some(id) = shared.put_job(&obj, &ns) {
                    // The last state may be terminal: record it before forgetting the Job.
                    shared.refresh(id).await;
                    shared.job_gone(id);
                }
            }
            Ok(Event::InitDone) => {
                let gone: Vec<ExecutionId> = {
                    let mut cache = shared.cache();
                    let relisted = cache.jobs_relisted.remove(&ns).unwrap_or_default();
                    cache
                        .jobs_before_relist
                        .remove(&ns)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|id| !relisted.contains(id) && cache.jobs.contains_key(id))
                        .collect()
                };
                // Confirm before declaring a Job gone (one request, only for missing Jobs).
                for id in gone {
                    shared.throttle.permit().await;
                    match shared.jobs(&ns).get_opt(&job_name(id)).await {
                        Ok(Some(_)) => {}
                        Ok(None) => shared.job_gone(id),
                        Err(e) => {
                            tracing::warn!(execution = %id, error = %e, "cannot confirm a job missing from the relist")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "job watch failed; retrying"),
        }
    }
}

async fn watch_pods(shared: Arc<Shared>, api: Api<DynamicObject>, ns: String) {
    let cfg = watcher::Config::default().labels(&label_selector());
    let mut stream = pin!(watcher::watcher(api, cfg).default_backoff());
    while let Some(event) = stream.next().await {
        let (obj, deleted) = match event {
            Ok(Event::Init) => {
                let mut cache = shared.cache();
                let Cache {
                    pods, namespaces, ..
                } = &mut *cache;
                pods.retain(|id, _| namespaces.get(id).unwrap_or(&shared.config.namespace) != &ns);
                cache.pods_synced.remove(&ns);
                continue;
            }
            Ok(Event::InitDone) => {
                shared.cache().pods_synced.insert(ns.clone());
                continue;
            }
            Ok(Event::InitApply(obj) | Event::Apply(obj)) => (obj, false),
            Ok(Event::Delete(obj)) => (obj, true),
            Err(e) => {
                tracing::warn!(error = %e, "pod watch failed; retrying");
                continue;
            }
        };
        let Some(id) = execution_of(&obj.metadata, false) else {
            continue;
        };
        let name = obj.metadata.name.clone().unwrap_or_default();
        let pod = match typed::<Pod>(&obj) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(pod = %name, error = %e, "malformed pod ignored");
                continue;
            }
        };
        let has_job = {
            let mut cache = shared.cache();
            let pods = cache.pods.entry(id).or_default();
            if deleted {
                pods.remove(&name);
            } else {
                pods.insert(name, pod);
            }
            cache.jobs.contains_key(&id) && !cache.terminal.contains_key(&id)
        };
        if has_job {
            shared.refresh(id).await;
        }
    }
}

/// Re-evaluates executions whose image cannot be pulled, so the bound is noticed.
async fn tick(shared: Arc<Shared>) {
    let period = (shared.config.image_pull_bound / 2)
        .clamp(Duration::from_millis(100), Duration::from_secs(30));
    let mut interval = tokio::time::interval(period);
    loop {
        interval.tick().await;
        let ids: Vec<ExecutionId> = shared.cache().pull_failing_since.keys().copied().collect();
        for id in ids {
            shared.refresh(id).await;
        }
    }
}

impl K8sExecutor {
    /// A builder over `client`.
    pub fn builder(client: kube::Client) -> K8sExecutorBuilder {
        K8sExecutorBuilder::new(client)
    }

    /// API requests this executor issued outside its two long-lived watches (creates,
    /// gets, lists, deletes, log reads); each took a permit of the client-side throttle.
    pub fn api_requests(&self) -> u64 {
        self.inner.shared.throttle.issued()
    }

    /// The settings in use.
    pub fn config(&self) -> &K8sConfig {
        &self.inner.shared.config
    }

    /// The Job this executor would create for `spec`.
    ///
    /// # Errors
    /// [`Error::Rejected`] as [`crate::job_manifest`].
    pub fn job_for(&self, spec: &ExecutionSpec) -> Result<Job, Error> {
        let token = self.inner.token.as_ref().and_then(|t| t(spec));
        job_manifest(&self.inner.shared.config, spec, token.as_deref())
    }

    /// After an engine restart: lists this executor's Jobs by label (one request) and returns
    /// each execution with its state; terminal ones are recorded (and reported).
    ///
    /// # Errors
    /// `Unavailable` when the API server cannot be reached.
    pub async fn adopt(&self) -> Result<Vec<(ExecHandle, ExecutionState)>, ExecutorError> {
        let shared = &self.inner.shared;
        let mut out = Vec::new();
        for ns in watched_namespaces(&shared.config) {
            let api: Api<DynamicObject> =
                Api::namespaced_with(shared.client.clone(), &ns, &ApiResource::erase::<Job>(&()));
            shared.throttle.permit().await;
            let list = api
                .list(&ListParams::default().labels(&label_selector()))
                .await
                .map_err(Error::api("list jobs"))?;
            for obj in &list.items {
                let Some(id) = shared.put_job(obj, &ns) else {
                    continue;
                };
                let state = match shared.evaluate(id, false).await {
                    Ok(Some(s)) => s,
                    Ok(None) => continue,
                    Err(e) => return Err(e.into()),
                };
                out.push((shared.handle(id), state));
            }
        }
        Ok(out)
    }

    /// Deletes the Jobs of runs for which `is_terminal` holds (the orphan sweep); returns how
    /// many were deleted. `is_terminal` is asked once per run (typically a store lookup); a
    /// run it does not know should be answered `false`, so Jobs of another installation
    /// sharing the namespace are left alone.
    ///
    /// # Errors
    /// `Unavailable` when the API server cannot be reached.
    pub async fn sweep_orphans<F, Fut>(&self, is_terminal: F) -> Result<usize, ExecutorError>
    where
        F: Fn(RunId) -> Fut + Send + Sync,
        Fut: std::future::Future<Output = bool> + Send,
    {
        let shared = &self.inner.shared;
        let mut deleted = 0;
        let mut known = HashMap::new();
        for ns in watched_namespaces(&shared.config) {
            deleted += self.sweep_namespace(&ns, &is_terminal, &mut known).await?;
        }
        Ok(deleted)
    }

    async fn sweep_namespace<F, Fut>(
        &self,
        ns: &str,
        is_terminal: &F,
        known: &mut HashMap<RunId, bool>,
    ) -> Result<usize, ExecutorError>
    where
        F: Fn(RunId) -> Fut + Send + Sync,
        Fut: std::future::Future<Output = bool> + Send,
    {
        let shared = &self.inner.shared;
        let jobs = shared.jobs(ns);
        shared.throttle.permit().await;
        let list = jobs
            .list_metadata(&ListParams::default().labels(&label_selector()))
            .await
            .map_err(Error::api("list jobs"))?;
        let mut deleted = 0;
        for meta in list.items {
            let run = meta
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(RUN_LABEL))
                .and_then(|r| r.parse::<RunId>().ok());
            let (Some(run), Some(name)) = (run, meta.metadata.name) else {
                continue;
            };
            if meta.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let terminal = match known.get(&run) {
                Some(t) => *t,
                None => {
                    let t = is_terminal(run).await;
                    known.insert(run, t);
                    t
                }
            };
            if !terminal {
                continue;
            }
            shared.throttle.permit().await;
            match jobs.delete(&name, &DeleteParams::background()).await {
                Ok(_) => deleted += 1,
                Err(e) if api_code(&e) == Some(404) => {}
                Err(e) => return Err(Error::api("delete job")(e).into()),
            }
        }
        Ok(deleted)
    }

    async fn get_owned(&self, id: ExecutionId) -> Result<Option<Job>, Error> {
        let name = job_name(id);
        self.inner.shared.throttle.permit().await;
        let jobs = self.inner.shared.jobs(&self.inner.shared.ns_of(id));
        match jobs.get_opt(&name).await {
            Ok(None) => Ok(None),
            Ok(Some(job)) => match ownership_problem(id, &job) {
                None => Ok(Some(job)),
                Some(detail) => Err(Error::Ownership { id, name, detail }),
            },
            Err(e) => Err(Error::api("get job")(e)),
        }
    }

    fn cache_job(&self, id: ExecutionId, job: Job) {
        let mut cache = self.inner.shared.cache();
        if let Some(ns) = &job.metadata.namespace {
            cache.namespaces.insert(id, ns.clone());
        }
        cache.jobs.entry(id).or_insert(Seen::Job(Box::new(job)));
    }

    async fn state(&self, id: ExecutionId) -> Result<ExecutionState, Error> {
        let shared = &self.inner.shared;
        if shared.cache().canceled.contains(&id) {
            return Ok(shared.record(id, ExecutionState::Canceled));
        }
        if let Some(state) = shared.evaluate(id, false).await? {
            return Ok(state);
        }
        match self.get_owned(id).await? {
            Some(job) => {
                self.cache_job(id, job);
                Ok(shared
                    .evaluate(id, false)
                    .await?
                    .unwrap_or(ExecutionState::Pending))
            }
            None => Ok(shared.record(
                id,
                ExecutionState::Lost {
                    reason: "the job does not exist".to_owned(),
                },
            )),
        }
    }
}

#[async_trait::async_trait]
impl Executor for K8sExecutor {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    async fn submit(&self, spec: &ExecutionSpec) -> Result<ExecHandle, ExecutorError> {
        let id = spec.execution_id;
        {
            let cache = self.inner.shared.cache();
            if cache.jobs.contains_key(&id) || cache.terminal.contains_key(&id) {
                drop(cache);
                return Ok(self.inner.shared.handle(id));
            }
        }
        let job = self.job_for(spec)?;
        let shared = &self.inner.shared;
        let ns = job
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| shared.config.namespace.clone());
        shared.cache().namespaces.insert(id, ns.clone());
        shared.throttle.permit().await;
        match shared.jobs(&ns).create(&PostParams::default(), &job).await {
            Ok(created) => {
                self.cache_job(id, created);
                Ok(shared.handle(id))
            }
            Err(e) if api_code(&e) == Some(409) => match self.get_owned(id).await? {
                Some(existing) => {
                    self.cache_job(id, existing);
                    Ok(shared.handle(id))
                }
                // Deleted between the create and the get: the driver retries.
                None => Err(Error::api("create job")(e).into()),
            },
            Err(e) => Err(Error::api("create job")(e).into()),
        }
    }

    async fn status(&self, handle: &ExecHandle) -> Result<ExecutionState, ExecutorError> {
        self.inner.shared.learn(handle);
        Ok(self.state(handle.execution_id).await?)
    }

    async fn cancel(&self, handle: &ExecHandle) -> Result<(), ExecutorError> {
        let id = handle.execution_id;
        self.inner.shared.learn(handle);
        let state = self.state(id).await?;
        if state.is_terminal() {
            return Ok(());
        }
        self.inner.shared.cache().canceled.insert(id);
        self.inner.shared.throttle.permit().await;
        match self
            .inner
            .shared
            .jobs(&self.inner.shared.ns_of(id))
            .delete(&job_name(id), &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(e) if api_code(&e) == Some(404) => {}
            Err(e) => {
                self.inner.shared.cache().canceled.remove(&id);
                return Err(Error::api("delete job")(e).into());
            }
        }
        self.inner.shared.record(id, ExecutionState::Canceled);
        Ok(())
    }

    async fn logs(
        &self,
        handle: &ExecHandle,
        from_seq: u64,
    ) -> Result<LogLineStream, ExecutorError> {
        let id = handle.execution_id;
        let shared = &self.inner.shared;
        shared.learn(handle);
        let cached: Option<String> = shared
            .cache()
            .pods
            .get(&id)
            .and_then(|m| m.keys().next().cloned());
        let pod = match cached {
            Some(p) => Some(p),
            None => shared
                .list_pods(id)
                .await?
                .into_iter()
                .find_map(|p| p.metadata.name),
        };
        let Some(pod) = pod else {
            return Ok(Box::pin(futures_util::stream::empty()));
        };
        let terminal = self.state(id).await?.is_terminal();
        let params = LogParams {
            container: Some(STEP_CONTAINER.to_owned()),
            follow: !terminal,
            ..LogParams::default()
        };
        shared.throttle.permit().await;
        let reader = shared
            .pods(&shared.ns_of(id))
            .log_stream(&pod, &params)
            .await
            .map_err(Error::api("read pod log"))?;
        let lines = reader
            .lines()
            .enumerate()
            .filter_map(move |(i, line)| async move {
                let seq = i as u64;
                (seq >= from_seq).then(|| {
                    line.map(|text| LogLine {
                        seq,
                        at: Timestamp::now(),
                        stream: LogStream::Stdout,
                        text,
                    })
                    .map_err(|e| ExecutorError::Backend {
                        backend: "kubernetes",
                        source: Box::new(e),
                    })
                })
            });
        Ok(Box::pin(lines))
    }

    fn reports(&self) -> Option<ReportStream> {
        let rx = lock(&self.inner.shared.report_rx).take()?;
        Some(Box::pin(futures_util::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|r| (r, rx))
        })))
    }
}

/// A client-side rate limit: one permit every `1/q` seconds, no burst beyond one.
#[derive(Debug)]
struct Throttle {
    interval: Option<Duration>,
    next: tokio::sync::Mutex<Instant>,
    issued: std::sync::atomic::AtomicU64,
}

impl Throttle {
    fn new(per_second: Option<u32>) -> Self {
        Self {
            interval: per_second
                .filter(|q| *q > 0)
                .map(|q| Duration::from_secs(1) / q),
            next: tokio::sync::Mutex::new(Instant::now()),
            issued: std::sync::atomic::AtomicU64::new(0),
        }
    }

    async fn permit(&self) {
        self.issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(interval) = self.interval else {
            return;
        };
        let slot = {
            let mut next = self.next.lock().await;
            let slot = (*next).max(Instant::now());
            *next = slot + interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }

    fn issued(&self) -> u64 {
        self.issued.load(std::sync::atomic::Ordering::Relaxed)
    }
}
