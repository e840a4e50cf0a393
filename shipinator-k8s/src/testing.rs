//! An in-process fake Kubernetes API server (feature `testing`) speaking the REST protocol over
//! HTTP on 127.0.0.1, for the calls the executor makes: create/get/list/watch/delete Jobs, list
//! and watch pods, pod logs, with label selectors, resourceVersions, 409 AlreadyExists and
//! 410 Gone. Objects are built from k8s-openapi types and stored as JSON (so a test can
//! plant a malformed one). Not semver-stable; for tests, like `shipinator-postgres`'s
//! `testing` feature.
//!
//! Its simulated kubelet works in one of two ways:
//! - **scripted** ([`FakeApi::start`]): each Job moves through its conditions according to
//!   the `FAKE_KUBELET` env var of its step container: `succeed` (default), `fail:<code>`,
//!   `run`, `deadline`, `pull`, `manual`;
//! - **processes** ([`FakeApi::start_with`] and a [`ProcessKubelet`]): each pod's containers
//!   really run, as local processes (see [`ProcessKubelet`]), and the pod and Job report how
//!   they ended, with the container's termination message and its output as the pod log.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodStatus, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    ListMeta, ObjectMeta, OwnerReference, Status, StatusDetails, WatchEvent,
};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::Error;

/// Object kinds the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `batch/v1` Jobs.
    Job,
    /// `v1` pods.
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
pub struct FakeApi {
    store: Arc<Mutex<Store>>,
    changes: broadcast::Sender<Option<Change>>,
    /// Runs pods as local processes, when set.
    kubelet: Option<Arc<ProcessKubelet>>,
    /// The running pods' processes, by pod name: dropping the sender stops the pod.
    procs: Arc<Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>>,
    /// Whether watch requests are answered (false: they wait, like a partitioned network).
    gate: Arc<tokio::sync::watch::Sender<bool>>,
    /// Bumped on every change and log append, for followed logs.
    ticks: Arc<tokio::sync::watch::Sender<u64>>,
    /// The server's base URL (`http://127.0.0.1:<port>`).
    pub url: String,
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
    /// Starts the server on an ephemeral port, with the scripted kubelet.
    ///
    /// # Errors
    /// The port cannot be bound.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_inner(None).await
    }

    /// Starts the server on an ephemeral port; `kubelet` runs every pod as local processes.
    ///
    /// # Errors
    /// The port cannot be bound, or the kubelet's directory cannot be created.
    pub async fn start_with(kubelet: ProcessKubelet) -> std::io::Result<Self> {
        std::fs::create_dir_all(&kubelet.root)?;
        Self::start_inner(Some(Arc::new(kubelet))).await
    }

    async fn start_inner(kubelet: Option<Arc<ProcessKubelet>>) -> std::io::Result<Self> {
        let (changes, _) = broadcast::channel(65_536);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let api = FakeApi {
            store: Arc::new(Mutex::new(Store::default())),
            changes,
            gate: Arc::new(tokio::sync::watch::Sender::new(true)),
            ticks: Arc::new(tokio::sync::watch::Sender::new(0)),
            kubelet,
            procs: Arc::default(),
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
    ///
    /// # Errors
    /// [`Error::Client`] when the client cannot be built.
    pub fn client(&self) -> Result<kube::Client, Error> {
        let url = self.url.parse().map_err(|e| Error::Client {
            source: Box::new(e),
        })?;
        crate::install_crypto_provider();
        kube::Client::try_from(kube::Config::new(url)).map_err(|e| Error::Client {
            source: Box::new(e),
        })
    }

    /// A kubeconfig file's text whose current context (`fake`, namespace `namespace`) points
    /// at this server, without credentials.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: fake\n    namespace: {namespace}\ncurrent-context: fake\n",
            url = self.url
        )
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
    pub fn requests(&self) -> BTreeMap<String, u64> {
        self.store().requests.clone()
    }

    /// All requests served.
    pub fn total_requests(&self) -> u64 {
        self.store().requests.values().sum()
    }

    /// The next create stores its Job, then fails with `code` (500: an error the client does
    /// not retry; 504: a timeout it retries).
    pub fn fail_next_create(&self, code: u16) {
        self.store().fail_next_create = Some(code);
    }

    /// The next create stores its Job, then never answers (the client times out).
    pub fn hang_next_create(&self) {
        self.store().hang_next_create = true;
    }

    /// Deletes seen: (name, propagationPolicy).
    pub fn deletes(&self) -> Vec<(String, Option<String>)> {
        self.store().deletes.clone()
    }

    /// Names of stored objects of `kind`.
    pub fn names(&self, kind: Kind) -> Vec<String> {
        self.store()
            .objects
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// A stored object.
    pub fn object(&self, kind: Kind, name: &str) -> Option<Value> {
        self.store().objects.get(&(kind, name.to_owned())).cloned()
    }

    /// Forgets history up to now: watches from an older resourceVersion get 410 Gone.
    pub fn compact(&self) {
        let mut s = self.store();
        s.compacted_below = s.rv + 1;
        s.history.clear();
    }

    /// Ends every open watch stream (as a dropped connection would).
    pub fn drop_watches(&self) {
        let _ = self.changes.send(None);
    }

    /// Ends every open watch stream and holds new watch requests until
    /// [`FakeApi::release_watches`].
    pub fn hold_watches(&self) {
        self.gate.send_replace(false);
        self.drop_watches();
    }

    /// Answers held and new watch requests again.
    pub fn release_watches(&self) {
        self.gate.send_replace(true);
    }

    /// Stores `object` (created if new), recording the change and notifying watches.
    pub fn put(&self, kind: Kind, mut object: Value) -> Value {
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
    pub fn remove(&self, kind: Kind, name: &str) -> Option<Value> {
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
    pub fn append_log(&self, job: &str, line: &str) {
        if let Some(name) = self.pod_of(job).and_then(|p| p.metadata.name) {
            self.append_pod_log(&name, line);
        }
    }

    /// The log of pod `name` (its step container's output) so far.
    pub fn pod_log(&self, name: &str) -> String {
        self.store().logs.get(name).cloned().unwrap_or_default()
    }

    /// The name of `job`'s pod, once it has one.
    pub fn pod_name(&self, job: &str) -> Option<String> {
        self.pod_of(job).and_then(|p| p.metadata.name)
    }

    /// Creates a Job as `POST .../namespaces/<namespace>/jobs` would (`job` is its JSON),
    /// and starts its pod. Returns the stored Job, or the error status.
    ///
    /// # Errors
    /// The Job does not parse, or one with its name exists (the `Status` object as JSON).
    pub async fn create_job(&self, namespace: &str, job: &Value) -> Result<Value, Value> {
        let body = Bytes::from(serde_json::to_vec(job).unwrap_or_default());
        let response = create_job(State(self.clone()), Path(namespace.to_owned()), body).await;
        let ok = response.status().is_success();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap_or_default();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if ok { Ok(value) } else { Err(value) }
    }

    fn append_pod_log(&self, name: &str, line: &str) {
        {
            let mut s = self.store();
            let log = s.logs.entry(name.to_owned()).or_default();
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
        if let Some(kubelet) = &self.kubelet {
            let (stop, stopped) = tokio::sync::oneshot::channel();
            lock(&self.procs).insert(pod_name.clone(), stop);
            tokio::spawn(run_pod(
                self.clone(),
                Arc::clone(kubelet),
                name,
                pod,
                stopped,
            ));
            return;
        }
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
    pub fn run(&self, job: &str) {
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

    /// The step container exits with `code`; the Job completes or fails. A completed step
    /// carries the report a worker writes before it exits 0 (a success); a failed one none.
    pub fn finish(&self, job: &str, code: i32) {
        let report = (code == 0).then(|| r#"{"status":"success","exit_code":0}"#.to_owned());
        self.finish_with_message(job, code, report);
    }

    /// The step container exits with `code` and termination message `message`; the Job
    /// completes or fails.
    pub fn finish_with_message(&self, job: &str, code: i32, message: Option<String>) {
        self.set_step_state(
            job,
            if code == 0 { "Succeeded" } else { "Failed" },
            ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    reason: Some(if code == 0 { "Completed" } else { "Error" }.to_owned()),
                    message,
                    finished_at: Some(now_time()),
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
    pub fn deadline(&self, job: &str) {
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
    pub fn pull_error(&self, job: &str) {
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
    pub fn evict(&self, job: &str) {
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
    pub fn delete_pod(&self, job: &str) {
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
        // The kubelet stops the pod's containers.
        if let Some(stop) = lock(&api.procs).remove(&p) {
            let _ = stop.send(());
        }
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// -------------------------------------------------------------------- the process kubelet

/// The kubelet of [`FakeApi::start_with`]: runs each pod's init containers in order, then its
/// first container, as local processes, without isolation (the host's tools, network and
/// files).
///
/// A container sees its volumes at their mount paths: each absolute path in its command,
/// arguments, working directory and env values is rewritten to the host path standing for
/// it, namely
/// - under a volume mount: an `emptyDir` is `<root>/pods/<pod>/volumes/<volume>`, a
///   `PersistentVolumeClaim` is `<root>/claims/<claim>` (shared by every pod), and the mount's
///   `subPath` is a directory inside it;
/// - the termination message path `/dev/termination-log`: `<root>/pods/<pod>/termination-log`;
/// - a file that exists in the container's image: an image is a host directory standing for
///   its root filesystem ([`ProcessKubelet::image`]);
///
/// and any other path is the host's. `TMPDIR` is the pod's own `<root>/pods/<pod>/tmp`. The
/// step container's stdout and stderr become the pod log. When it exits, the pod and the Job
/// end as on a cluster (`Complete`, or `Failed` with `BackoffLimitExceeded`), with the first
/// 4096 bytes of the termination message file as the container status's `message`. Deleting
/// the Job sends the container SIGTERM, then SIGKILL after the grace period.
#[derive(Debug, Clone)]
pub struct ProcessKubelet {
    root: PathBuf,
    images: BTreeMap<String, PathBuf>,
    env: Vec<(String, String)>,
    grace: Duration,
}

/// The kubelet keeps at most this much of a termination message.
const TERMINATION_MESSAGE_BYTES: usize = 4096;

impl ProcessKubelet {
    /// A kubelet keeping pods' directories and claims under `root`; containers get `PATH` and
    /// `HOME` of this process (what an image would set).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let env = ["PATH", "HOME"]
            .into_iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_owned(), v)))
            .collect();
        Self {
            root: root.into(),
            images: BTreeMap::new(),
            env,
            grace: Duration::from_secs(10),
        }
    }

    /// Image `name`'s root filesystem is the host directory `dir`.
    #[must_use]
    pub fn image(mut self, name: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        self.images.insert(name.into(), dir.into());
        self
    }

    /// Every container also gets `name=value`.
    #[must_use]
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Time between SIGTERM and SIGKILL when a pod is stopped (default 10 s).
    #[must_use]
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    fn pod_dir(&self, pod: &str) -> PathBuf {
        self.root.join("pods").join(pod)
    }
}

/// How one container's paths map to host paths.
#[derive(Debug)]
struct ContainerFs {
    /// (mount path in the container, host directory), longest mount path first.
    mounts: Vec<(String, PathBuf)>,
    image_root: Option<PathBuf>,
    termination: PathBuf,
}

impl ContainerFs {
    fn new(
        kubelet: &ProcessKubelet,
        pod_name: &str,
        volumes: &[Volume],
        container: &Container,
    ) -> std::io::Result<Self> {
        let pod_dir = kubelet.pod_dir(pod_name);
        let mut mounts = Vec::new();
        for m in container.volume_mounts.iter().flatten() {
            let Some(volume) = volumes.iter().find(|v| v.name == m.name) else {
                return Err(std::io::Error::other(format!(
                    "container {} mounts volume {} that the pod does not have",
                    container.name, m.name
                )));
            };
            let mut host = match &volume.persistent_volume_claim {
                Some(pvc) => kubelet.root.join("claims").join(&pvc.claim_name),
                None => pod_dir.join("volumes").join(&volume.name),
            };
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                host = host.join(sub.trim_start_matches('/'));
            }
            std::fs::create_dir_all(&host)?;
            mounts.push((m.mount_path.trim_end_matches('/').to_owned(), host));
        }
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        let image_root = container
            .image
            .as_ref()
            .and_then(|i| kubelet.images.get(i))
            .cloned();
        Ok(Self {
            mounts,
            image_root,
            termination: pod_dir.join("termination-log"),
        })
    }

    /// The host path standing for `path` in the container, if it is one.
    fn host_path(&self, path: &str) -> Option<PathBuf> {
        if !path.starts_with('/') {
            return None;
        }
        if path == crate::TERMINATION_LOG {
            return Some(self.termination.clone());
        }
        for (mount, host) in &self.mounts {
            if path == mount {
                return Some(host.clone());
            }
            if let Some(rest) = path.strip_prefix(mount.as_str())
                && let Some(rest) = rest.strip_prefix('/')
            {
                return Some(host.join(rest));
            }
        }
        let root = self.image_root.as_ref()?;
        let candidate = root.join(path.trim_start_matches('/'));
        candidate.exists().then_some(candidate)
    }

    fn translate(&self, text: &str) -> String {
        self.host_path(text)
            .map_or_else(|| text.to_owned(), |p| p.to_string_lossy().into_owned())
    }
}

/// Starts `container` of pod `pod_name`.
fn start_container(
    kubelet: &ProcessKubelet,
    pod_name: &str,
    volumes: &[Volume],
    container: &Container,
) -> std::io::Result<tokio::process::Child> {
    let fs = ContainerFs::new(kubelet, pod_name, volumes, container)?;
    let argv: Vec<&String> = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .collect();
    let Some((program, args)) = argv.split_first() else {
        return Err(std::io::Error::other(format!(
            "container {} has no command (the image's entrypoint is not simulated)",
            container.name
        )));
    };
    let tmp = kubelet.pod_dir(pod_name).join("tmp");
    std::fs::create_dir_all(&tmp)?;
    let mut cmd = tokio::process::Command::new(fs.translate(program));
    cmd.args(args.iter().map(|a| fs.translate(a)))
        .env_clear()
        .envs(kubelet.env.iter().map(|(k, v)| (k, v)))
        .env("TMPDIR", &tmp)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for e in container.env.iter().flatten() {
        cmd.env(
            &e.name,
            fs.translate(e.value.as_deref().unwrap_or_default()),
        );
    }
    if let Some(dir) = &container.working_dir {
        let dir = fs.translate(dir);
        std::fs::create_dir_all(&dir)?;
        cmd.current_dir(dir);
    }
    cmd.spawn()
}

/// The exit code a kubelet reports for `status` (128 + the signal when killed by one).
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Waits for `child`, copying its output to the pod log; on `stop`, SIGTERM, then SIGKILL
/// after the grace period.
async fn supervise(
    api: &FakeApi,
    pod_name: &str,
    mut child: tokio::process::Child,
    grace: Duration,
    stop: &mut tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<(i32, bool)> {
    use tokio::io::AsyncBufReadExt as _;
    let mut copies = Vec::new();
    let out: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>> = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>);
    let err: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>> = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>);
    for reader in [out, err].into_iter().flatten() {
        let api = api.clone();
        let pod = pod_name.to_owned();
        copies.push(tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(reader).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                api.append_pod_log(&pod, &line);
            }
        }));
    }
    let mut stopped = false;
    let status = tokio::select! {
        status = child.wait() => status?,
        _ = &mut *stop => {
            stopped = true;
            if let Some(pid) = child
                .id()
                .and_then(|p| i32::try_from(p).ok())
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status?,
                Err(_) => {
                    child.start_kill()?;
                    child.wait().await?
                }
            }
        }
    };
    for c in copies {
        let _ = c.await;
    }
    Ok((exit_code(status), stopped))
}

/// Runs pod `pod` of Job `job`: init containers, then the step container.
async fn run_pod(
    api: FakeApi,
    kubelet: Arc<ProcessKubelet>,
    job: String,
    pod: Pod,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let volumes = spec.volumes.clone().unwrap_or_default();
    let outcome: std::io::Result<Option<i32>> = async {
        for init in spec.init_containers.iter().flatten() {
            let child = start_container(&kubelet, &pod_name, &volumes, init)?;
            let (code, stopped) =
                supervise(&api, &pod_name, child, kubelet.grace, &mut stop).await?;
            if stopped {
                return Ok(None);
            }
            if code != 0 {
                return Err(std::io::Error::other(format!(
                    "init container {} exited with code {code}",
                    init.name
                )));
            }
        }
        let Some(step) = spec.containers.first() else {
            return Err(std::io::Error::other("the pod has no container"));
        };
        let child = start_container(&kubelet, &pod_name, &volumes, step)?;
        api.run(&job);
        let (code, stopped) = supervise(&api, &pod_name, child, kubelet.grace, &mut stop).await?;
        Ok((!stopped).then_some(code))
    }
    .await;
    lock(&api.procs).remove(&pod_name);
    match outcome {
        Ok(Some(code)) => {
            let message = std::fs::read(kubelet.pod_dir(&pod_name).join("termination-log"))
                .ok()
                .map(|mut bytes| {
                    bytes.truncate(TERMINATION_MESSAGE_BYTES);
                    String::from_utf8_lossy(&bytes).into_owned()
                })
                .filter(|m| !m.is_empty());
            api.finish_with_message(&job, code, message);
        }
        Ok(None) => {}
        Err(e) => {
            // The step container never ran: the pod fails, and with it the Job.
            api.append_pod_log(&pod_name, &format!("kubelet: {e}"));
            if let Some(mut pod) = api.pod_of(&job) {
                let status = pod.status.get_or_insert_with(PodStatus::default);
                status.phase = Some("Failed".to_owned());
                status.message = Some(e.to_string());
                api.put_pod(&pod);
            }
            api.set_conditions(
                &job,
                &[
                    ("FailureTarget", "BackoffLimitExceeded"),
                    ("Failed", "BackoffLimitExceeded"),
                ],
                false,
            );
        }
    }
}
