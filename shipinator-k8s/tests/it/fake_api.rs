//! An in-process fake Kubernetes API server speaking the REST protocol over HTTP on
//! 127.0.0.1, for the calls the executor makes: create/get/list/watch/delete Jobs, list and
//! watch pods, pod logs, with label selectors, resourceVersions, 409 AlreadyExists and
//! 410 Gone. Objects are built from k8s-openapi types and stored as JSON (so a test can
//! plant a malformed one). A simulated kubelet moves each Job through its conditions
//! according to the `FAKE_KUBELET` env var of its step container:
//! `succeed` (default), `fail:<code>`, `run`, `deadline`, `pull`, `manual`.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    ListMeta, ObjectMeta, OwnerReference, Status, StatusDetails, WatchEvent,
};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Object kinds the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Job,
    Pod,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Job => "jobs",
            Kind::Pod => "pods",
        }
    }
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: Kind,
    event: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<(Kind, String), Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_below: u64,
    requests: BTreeMap<String, u64>,
    /// The next create stores the Job and then answers with this code.
    fail_next_create: Option<u16>,
    hang_next_create: bool,
    deletes: Vec<(String, Option<String>)>,
    logs: HashMap<String, String>,
    uid: u64,
}

/// The fake API server.
#[derive(Debug, Clone)]
pub(crate) struct FakeApi {
    store: Arc<Mutex<Store>>,
    changes: broadcast::Sender<Option<Change>>,
    /// Whether watch requests are answered (false: they wait, like a partitioned network).
    gate: Arc<tokio::sync::watch::Sender<bool>>,
    /// Bumped on every change and log append, for followed logs.
    ticks: Arc<tokio::sync::watch::Sender<u64>>,
    pub(crate) url: String,
}

fn now_time() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())
}

fn status_value(code: u16, reason: &str, message: String, name: &str, kind: Kind) -> Value {
    let status = Status {
        code: Some(i32::from(code)),
        message: Some(message),
        reason: Some(reason.to_owned()),
        status: Some(if code < 300 { "Success" } else { "Failure" }.to_owned()),
        details: Some(StatusDetails {
            name: Some(name.to_owned()),
            kind: Some(kind.plural().to_owned()),
            group: (kind == Kind::Job).then(|| "batch".to_owned()),
            ..StatusDetails::default()
        }),
        metadata: ListMeta::default(),
    };
    let mut v = serde_json::to_value(status).unwrap_or_default();
    v["kind"] = json!("Status");
    v["apiVersion"] = json!("v1");
    v
}

fn status_response(code: u16, reason: &str, message: String, name: &str, kind: Kind) -> Response {
    let v = status_value(code, reason, message, name, kind);
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(v),
    )
        .into_response()
}

fn in_namespace(v: &Value, ns: &str) -> bool {
    v["metadata"]["namespace"].as_str().unwrap_or_default() == ns
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(v["metadata"]["labels"].clone()).unwrap_or_default()
}

/// `k=v`, `k!=v`, `k` terms, comma-separated.
fn selector_matches(selector: Option<&str>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = selector else { return true };
    sel.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels.get(k).map(String::as_str) != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            labels.get(k.trim_end_matches('=')).map(String::as_str) == Some(v)
        } else {
            labels.contains_key(term)
        }
    })
}

impl FakeApi {
    /// Starts the server on an ephemeral port.
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let (changes, _) = broadcast::channel(65_536);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let api = FakeApi {
            store: Arc::new(Mutex::new(Store::default())),
            changes,
            gate: Arc::new(tokio::sync::watch::Sender::new(true)),
            ticks: Arc::new(tokio::sync::watch::Sender::new(0)),
            url,
        };
        let app = Router::new()
            .route(
                "/apis/batch/v1/namespaces/{ns}/jobs",
                get(list_or_watch_jobs).post(create_job),
            )
            .route(
                "/apis/batch/v1/namespaces/{ns}/jobs/{name}",
                get(get_job).delete(delete_job),
            )
            .route("/api/v1/namespaces/{ns}/pods", get(list_or_watch_pods))
            .route("/api/v1/namespaces/{ns}/pods/{name}/log", get(pod_log))
            .with_state(api.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(api)
    }

    /// A kube client against this server.
    pub(crate) fn client(&self) -> anyhow::Result<kube::Client> {
        let config = kube::Config::new(self.url.parse()?);
        shipinator_k8s::install_crypto_provider();
        Ok(kube::Client::try_from(config)?)
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn count(&self, what: String) {
        *self.store().requests.entry(what).or_default() += 1;
    }

    /// Requests served, by `"<VERB> <plural>"`.
    pub(crate) fn requests(&self) -> BTreeMap<String, u64> {
        self.store().requests.clone()
    }

    /// All requests served.
    pub(crate) fn total_requests(&self) -> u64 {
        self.store().requests.values().sum()
    }

    /// The next create stores its Job, then fails with `code` (500: an error the client does
    /// not retry; 504: a timeout it retries).
    pub(crate) fn fail_next_create(&self, code: u16) {
        self.store().fail_next_create = Some(code);
    }

    /// The next create stores its Job, then never answers (the client times out).
    pub(crate) fn hang_next_create(&self) {
        self.store().hang_next_create = true;
    }

    /// Deletes seen: (name, propagationPolicy).
    pub(crate) fn deletes(&self) -> Vec<(String, Option<String>)> {
        self.store().deletes.clone()
    }

    /// Names of stored objects of `kind`.
    pub(crate) fn names(&self, kind: Kind) -> Vec<String> {
        self.store()
            .objects
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// A stored object.
    pub(crate) fn object(&self, kind: Kind, name: &str) -> Option<Value> {
        self.store().objects.get(&(kind, name.to_owned())).cloned()
    }

    /// Forgets history up to now: watches from an older resourceVersion get 410 Gone.
    pub(crate) fn compact(&self) {
        let mut s = self.store();
        s.compacted_below = s.rv + 1;
        s.history.clear();
    }

    /// Ends every open watch stream (as a dropped connection would).
    pub(crate) fn drop_watches(&self) {
        let _ = self.changes.send(None);
    }

    /// Ends every open watch stream and holds new watch requests until
    /// [`FakeApi::release_watches`].
    pub(crate) fn hold_watches(&self) {
        self.gate.send_replace(false);
        self.drop_watches();
    }

    /// Answers held and new watch requests again.
    pub(crate) fn release_watches(&self) {
        self.gate.send_replace(true);
    }

    /// Stores `object` (created if new), recording the change and notifying watches.
    pub(crate) fn put(&self, kind: Kind, mut object: Value) -> Value {
        let mut s = self.store();
        s.rv += 1;
        let rv = s.rv;
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let event = if s.objects.contains_key(&(kind, name.clone())) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.objects.insert((kind, name), object.clone());
        let change = Change {
            rv,
            kind,
            event,
            object: object.clone(),
        };
        s.history.push(change.clone());
        let _ = self.changes.send(Some(change));
        drop(s);
        self.ticks.send_modify(|t| *t += 1);
        object
    }

    /// Removes an object, recording a DELETED change.
    pub(crate) fn remove(&self, kind: Kind, name: &str) -> Option<Value> {
        let mut s = self.store();
        let mut object = s.objects.remove(&(kind, name.to_owned()))?;
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change {
            rv,
            kind,
            event: "DELETED",
            object: object.clone(),
        };
        s.history.push(change.clone());
        let _ = self.changes.send(Some(change));
        drop(s);
        self.ticks.send_modify(|t| *t += 1);
        Some(object)
    }

    /// The step container of `job`'s pod prints `line`.
    pub(crate) fn append_log(&self, job: &str, line: &str) {
        if let Some(name) = self.pod_of(job).and_then(|p| p.metadata.name) {
            let mut s = self.store();
            let log = s.logs.entry(name).or_default();
            if !log.is_empty() && !log.ends_with('\n') {
                log.push('\n');
            }
            log.push_str(line);
            log.push('\n');
        }
        self.ticks.send_modify(|t| *t += 1);
    }

    /// Whether pod `name` is gone or its step container terminated.
    fn pod_done(&self, name: &str) -> bool {
        let Some(v) = self.object(Kind::Pod, name) else {
            return true;
        };
        let pod: Pod = serde_json::from_value(v).unwrap_or_default();
        pod.status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default()
            .iter()
            .any(|c| c.state.as_ref().is_some_and(|st| st.terminated.is_some()))
    }

    fn job(&self, name: &str) -> Option<Job> {
        serde_json::from_value(self.object(Kind::Job, name)?).ok()
    }

    fn pod_of(&self, job: &str) -> Option<Pod> {
        let s = self.store();
        s.objects
            .iter()
            .filter(|((k, _), _)| *k == Kind::Pod)
            .find(|(_, v)| labels_of(v).get("job-name").map(String::as_str) == Some(job))
            .and_then(|(_, v)| serde_json::from_value(v.clone()).ok())
    }

    fn put_job(&self, job: &Job) {
        if let Ok(v) = serde_json::to_value(job) {
            self.put(Kind::Job, v);
        }
    }

    fn put_pod(&self, pod: &Pod) {
        if let Ok(v) = serde_json::to_value(pod) {
            self.put(Kind::Pod, v);
        }
    }

    // ---------------------------------------------------------------- simulated kubelet

    fn on_created(&self, job: &Job) {
        let name = job.metadata.name.clone().unwrap_or_default();
        let template = job
            .spec
            .as_ref()
            .map(|s| s.template.clone())
            .unwrap_or_default();
        let env: BTreeMap<String, String> = template
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.env.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.name, e.value.unwrap_or_default()))
            .collect();
        let behaviour = env
            .get("FAKE_KUBELET")
            .cloned()
            .unwrap_or_else(|| "succeed".to_owned());
        let mut labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let uid = job.metadata.uid.clone().unwrap_or_default();
        labels.insert("job-name".to_owned(), name.clone());
        labels.insert("batch.kubernetes.io/job-name".to_owned(), name.clone());
        labels.insert("controller-uid".to_owned(), uid.clone());
        let pod_name = format!("{name}-x7k2p");
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(pod_name.clone()),
                namespace: job.metadata.namespace.clone(),
                labels: Some(labels),
                owner_references: Some(vec![OwnerReference {
                    api_version: "batch/v1".to_owned(),
                    kind: "Job".to_owned(),
                    name: name.clone(),
                    uid,
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..ObjectMeta::default()
            },
            spec: template.spec.clone(),
            status: Some(PodStatus {
                phase: Some("Pending".to_owned()),
                ..PodStatus::default()
            }),
        };
        self.put_pod(&pod);
        let mut job = job.clone();
        job.status = Some(JobStatus {
            active: Some(1),
            ready: Some(0),
            start_time: Some(now_time()),
            ..JobStatus::default()
        });
        self.put_job(&job);
        if let Some(lines) = env.get("FAKE_STDOUT") {
            self.store().logs.insert(pod_name, lines.clone());
        }
        match behaviour.as_str() {
            "succeed" => {
                self.run(&name);
                self.finish(&name, 0);
            }
            "run" => self.run(&name),
            "deadline" => {
                self.run(&name);
                self.deadline(&name);
            }
            "pull" => self.pull_error(&name),
            b if b.starts_with("fail:") => {
                self.run(&name);
                self.finish(&name, b[5..].parse().unwrap_or(1));
            }
            _ => {}
        }
    }

    fn set_step_state(&self, job: &str, phase: &str, state: ContainerState) -> Option<Pod> {
        let mut pod = self.pod_of(job)?;
        let status = pod.status.get_or_insert_with(PodStatus::default);
        status.phase = Some(phase.to_owned());
        status.container_statuses = Some(vec![ContainerStatus {
            name: "step".to_owned(),
            image: String::new(),
            image_id: String::new(),
            ready: phase == "Running",
            restart_count: 0,
            state: Some(state),
            ..ContainerStatus::default()
        }]);
        self.put_pod(&pod);
        Some(pod)
    }

    /// The step container starts running.
    pub(crate) fn run(&self, job: &str) {
        self.set_step_state(
            job,
            "Running",
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(now_time()),
                }),
                ..ContainerState::default()
            },
        );
        if let Some(mut j) = self.job(job) {
            let st = j.status.get_or_insert_with(JobStatus::default);
            st.ready = Some(1);
            self.put_job(&j);
        }
    }

    fn set_conditions(&self, job: &str, conditions: &[(&str, &str)], succeeded: bool) {
        let Some(mut j) = self.job(job) else { return };
        let st = j.status.get_or_insert_with(JobStatus::default);
        st.active = Some(0);
        st.ready = Some(0);
        if succeeded {
            st.succeeded = Some(1);
            st.completion_time = Some(now_time());
        } else {
            st.failed = Some(1);
        }
        st.conditions = Some(
            conditions
                .iter()
                .map(|(t, reason)| JobCondition {
                    type_: (*t).to_owned(),
                    status: "True".to_owned(),
                    reason: Some((*reason).to_owned()),
                    last_transition_time: Some(now_time()),
                    ..JobCondition::default()
                })
                .collect(),
        );
        self.put_job(&j);
    }

    /// The step container exits with `code`; the Job completes or fails.
    pub(crate) fn finish(&self, job: &str, code: i32) {
        self.set_step_state(
            job,
            if code == 0 { "Succeeded" } else { "Failed" },
            ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    reason: Some(if code == 0 { "Completed" } else { "Error" }.to_owned()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            },
        );
        if code == 0 {
            self.set_conditions(
                job,
                &[
                    ("SuccessCriteriaMet", "CompletionsReached"),
                    ("Complete", "CompletionsReached"),
                ],
                true,
            );
        } else {
            self.set_conditions(
                job,
                &[
                    ("FailureTarget", "BackoffLimitExceeded"),
                    ("Failed", "BackoffLimitExceeded"),
                ],
                false,
            );
        }
    }

    /// The Job exceeds its active deadline; its pod is killed.
    pub(crate) fn deadline(&self, job: &str) {
        self.set_step_state(
            job,
            "Failed",
            ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 137,
                    reason: Some("Error".to_owned()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            },
        );
        self.set_conditions(
            job,
            &[
                ("FailureTarget", "DeadlineExceeded"),
                ("Failed", "DeadlineExceeded"),
            ],
            false,
        );
    }

    /// The step image cannot be pulled.
    pub(crate) fn pull_error(&self, job: &str) {
        self.set_step_state(
            job,
            "Pending",
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ImagePullBackOff".to_owned()),
                    message: Some("Back-off pulling image".to_owned()),
                }),
                ..ContainerState::default()
            },
        );
    }

    /// The pod is evicted (node pressure); the Job fails.
    pub(crate) fn evict(&self, job: &str) {
        if let Some(mut pod) = self.pod_of(job) {
            let status = pod.status.get_or_insert_with(PodStatus::default);
            status.phase = Some("Failed".to_owned());
            status.reason = Some("Evicted".to_owned());
            status.message = Some("The node was low on resource: memory.".to_owned());
            status.conditions = Some(vec![PodCondition {
                type_: "DisruptionTarget".to_owned(),
                status: "True".to_owned(),
                reason: Some("TerminationByKubelet".to_owned()),
                ..PodCondition::default()
            }]);
            self.put_pod(&pod);
        }
        self.set_conditions(
            job,
            &[
                ("FailureTarget", "BackoffLimitExceeded"),
                ("Failed", "BackoffLimitExceeded"),
            ],
            false,
        );
    }

    /// The pod is deleted (by a person or the pod GC); the Job fails.
    pub(crate) fn delete_pod(&self, job: &str) {
        if let Some(pod) = self.pod_of(job)
            && let Some(name) = pod.metadata.name
        {
            self.remove(Kind::Pod, &name);
        }
        self.set_conditions(
            job,
            &[
                ("FailureTarget", "BackoffLimitExceeded"),
                ("Failed", "BackoffLimitExceeded"),
            ],
            false,
        );
    }

    // ---------------------------------------------------------------- HTTP

    fn list(&self, kind: Kind, ns: &str, selector: Option<&str>) -> Value {
        let s = self.store();
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((k, _), v)| {
                *k == kind && in_namespace(v, ns) && selector_matches(selector, &labels_of(v))
            })
            .map(|(_, v)| v.clone())
            .collect();
        let meta = ListMeta {
            resource_version: Some(s.rv.to_string()),
            ..ListMeta::default()
        };
        let (api_version, list_kind) = match kind {
            Kind::Job => ("batch/v1", "JobList"),
            Kind::Pod => ("v1", "PodList"),
        };
        json!({"apiVersion": api_version, "kind": list_kind, "metadata": meta, "items": items})
    }

    fn watch(&self, kind: Kind, ns: String, selector: Option<String>, since: u64) -> Response {
        let mut rx = self.changes.subscribe();
        let (backlog, gone) = {
            let s = self.store();
            if since < s.compacted_below.saturating_sub(1) {
                (Vec::new(), true)
            } else {
                let b: Vec<Change> = s.history.iter().filter(|c| c.rv > since).cloned().collect();
                (b, false)
            }
        };
        let encode = |c: &Change| -> Bytes {
            let ev = match c.event {
                "ADDED" => WatchEvent::Added(c.object.clone()),
                "MODIFIED" => WatchEvent::Modified(c.object.clone()),
                _ => WatchEvent::Deleted(c.object.clone()),
            };
            let mut line = serde_json::to_vec(&ev).unwrap_or_default();
            line.push(b'\n');
            Bytes::from(line)
        };
        if gone {
            *self
                .store()
                .requests
                .entry(format!("GONE {}", kind.plural()))
                .or_default() += 1;
            let status: Status = serde_json::from_value(status_value(
                410,
                "Expired",
                format!("too old resource version: {since}"),
                "",
                kind,
            ))
            .unwrap_or_default();
            let ev: WatchEvent<Value> = WatchEvent::ErrorStatus(status);
            let mut line = serde_json::to_vec(&ev).unwrap_or_default();
            line.push(b'\n');
            return Response::new(Body::from(line));
        }
        let matches = {
            let selector = selector.clone();
            move |c: &Change| {
                c.kind == kind
                    && in_namespace(&c.object, &ns)
                    && selector_matches(selector.as_deref(), &labels_of(&c.object))
            }
        };
        let mut last = since;
        let mut first: Vec<Result<Bytes, Infallible>> = Vec::new();
        for c in &backlog {
            last = last.max(c.rv);
            if matches(c) {
                first.push(Ok(encode(c)));
            }
        }
        let live = async_stream(move |tx| async move {
            loop {
                match rx.recv().await {
                    Ok(Some(c)) => {
                        if c.rv <= last || !matches(&c) {
                            continue;
                        }
                        if tx.send(Ok(encode(&c))).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) | Err(_) => return,
                }
            }
        });
        let stream = futures_util::stream::iter(first).chain(live);
        Response::new(Body::from_stream(stream))
    }
}

use futures_util::StreamExt;

/// A stream fed by a task through a channel.
fn async_stream<F, Fut>(f: F) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(f(tx));
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
}

type Params = Query<HashMap<String, String>>;

async fn list_or_watch(
    api: FakeApi,
    kind: Kind,
    ns: String,
    q: HashMap<String, String>,
) -> Response {
    let selector = q.get("labelSelector").cloned();
    if q.get("watch").map(String::as_str) == Some("true") {
        api.count(format!("WATCH {}", kind.plural()));
        let mut open = api.gate.subscribe();
        let _ = open.wait_for(|open| *open).await;
        let since = q
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        return api.watch(kind, ns, selector, since);
    }
    api.count(format!("LIST {}", kind.plural()));
    axum::Json(api.list(kind, &ns, selector.as_deref())).into_response()
}

async fn list_or_watch_jobs(
    State(api): State<FakeApi>,
    Path(ns): Path<String>,
    Query(q): Params,
) -> Response {
    list_or_watch(api, Kind::Job, ns, q).await
}

async fn list_or_watch_pods(
    State(api): State<FakeApi>,
    Path(ns): Path<String>,
    Query(q): Params,
) -> Response {
    list_or_watch(api, Kind::Pod, ns, q).await
}

async fn create_job(State(api): State<FakeApi>, Path(ns): Path<String>, body: Bytes) -> Response {
    api.count("POST jobs".to_owned());
    let mut job: Job = match serde_json::from_slice(&body) {
        Ok(j) => j,
        Err(e) => return status_response(400, "BadRequest", e.to_string(), "", Kind::Job),
    };
    let name = job.metadata.name.clone().unwrap_or_default();
    if api.object(Kind::Job, &name).is_some() {
        return status_response(
            409,
            "AlreadyExists",
            format!("jobs.batch \"{name}\" already exists"),
            &name,
            Kind::Job,
        );
    }
    let uid = {
        let mut s = api.store();
        s.uid += 1;
        format!("00000000-0000-4000-8000-{:012}", s.uid)
    };
    job.metadata.namespace = Some(ns);
    job.metadata.uid = Some(uid);
    job.metadata.creation_timestamp = Some(now_time());
    let mut v = serde_json::to_value(&job).unwrap_or_default();
    v["apiVersion"] = json!("batch/v1");
    v["kind"] = json!("Job");
    let stored = api.put(Kind::Job, v);
    let fail = api.store().fail_next_create.take();
    let hang = std::mem::take(&mut api.store().hang_next_create);
    api.on_created(&job);
    if hang {
        std::future::pending::<()>().await;
    }
    if let Some(code) = fail {
        return status_response(
            code,
            "InternalError",
            "etcdserver: request timed out".to_owned(),
            &name,
            Kind::Job,
        );
    }
    (StatusCode::CREATED, axum::Json(stored)).into_response()
}

async fn get_job(State(api): State<FakeApi>, Path((ns, name)): Path<(String, String)>) -> Response {
    api.count("GET jobs".to_owned());
    match api
        .object(Kind::Job, &name)
        .filter(|v| in_namespace(v, &ns))
    {
        Some(v) => axum::Json(v).into_response(),
        None => status_response(
            404,
            "NotFound",
            format!("jobs.batch \"{name}\" not found"),
            &name,
            Kind::Job,
        ),
    }
}

async fn delete_job(
    State(api): State<FakeApi>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    api.count("DELETE jobs".to_owned());
    if api
        .object(Kind::Job, &name)
        .is_some_and(|v| !in_namespace(&v, &ns))
    {
        return status_response(
            404,
            "NotFound",
            format!("jobs.batch \"{name}\" not found"),
            &name,
            Kind::Job,
        );
    }
    let opts: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let propagation = opts["propagationPolicy"].as_str().map(str::to_owned);
    api.store().deletes.push((name.clone(), propagation));
    let Some(_) = api.remove(Kind::Job, &name) else {
        return status_response(
            404,
            "NotFound",
            format!("jobs.batch \"{name}\" not found"),
            &name,
            Kind::Job,
        );
    };
    let pods: Vec<String> = {
        let s = api.store();
        s.objects
            .iter()
            .filter(|((k, _), v)| *k == Kind::Pod && labels_of(v).get("job-name") == Some(&name))
            .map(|((_, n), _)| n.clone())
            .collect()
    };
    for p in pods {
        api.remove(Kind::Pod, &p);
    }
    status_response(200, "", String::new(), &name, Kind::Job)
}

async fn pod_log(
    State(api): State<FakeApi>,
    Path((_ns, name)): Path<(String, String)>,
    Query(q): Params,
    method: Method,
) -> Response {
    api.count(format!("{method} pods/log"));
    fn text(api: &FakeApi, name: &str) -> String {
        let mut body = api.store().logs.get(name).cloned().unwrap_or_default();
        if !body.is_empty() && !body.ends_with('\n') {
            body.push('\n');
        }
        body
    }
    if q.get("follow").map(String::as_str) != Some("true") {
        return text(&api, &name).into_response();
    }
    // Follow: stream what is there, then what is appended, until the container terminates.
    let stream = async_stream(move |tx| async move {
        let mut ticks = api.ticks.subscribe();
        let mut sent = 0;
        loop {
            let done = api.pod_done(&name);
            let now = text(&api, &name);
            if now.len() > sent {
                let chunk = Bytes::from(now[sent..].to_owned());
                sent = now.len();
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            if done || ticks.changed().await.is_err() {
                return;
            }
        }
    });
    Response::new(Body::from_stream(stream))
}
