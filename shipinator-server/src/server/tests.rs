//! Router tests: the whole application driven with `oneshot`, on a SQLite file, the
//! filesystem artifact and log stores and the local executor running real processes from a
//! real git repository. (They live in the crate because the binary has no library target.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use shipinator_core::domain::{
    ArtifactId, ExecutionId, PipelineId, ProjectId, RunId, StepId, TokenRole,
};
use shipinator_core::driver::{Driver, DriverConfig};
use shipinator_core::store::ProjectScope;
use tokio::sync::{Mutex, watch};
use tower::ServiceExt;

use super::auth::execution_token;
use super::cache::FinishedRuns;
use super::config::{Limits, ServerConfig};
use super::metrics::Metrics;
use super::{AppState, api, open_backends, router};

const QUICK: &str = r#"
build:
  steps:
    - name: make
      run: mkdir -p out && printf 'hello artifact\n' > out/app.bin && echo one && echo two && echo three
      outputs:
        - type: binary
          path: out/app.bin
"#;

const SLOW: &str = r#"
build:
  steps:
    - name: wait
      run: echo waiting && sleep 120
"#;

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .current_dir(dir)
        .env_remove("GIT_DIR")
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?} failed");
}

fn head(dir: &Path) -> String {
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(dir)
        .env_remove("GIT_DIR")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A git repository with a `.shipinator.yaml`, committed on `main`.
fn repo(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".shipinator.yaml"), config).unwrap();
    git(dir.path(), &["init", "-q", "-b", "main"]);
    git(dir.path(), &["add", "-A"]);
    git(dir.path(), &["commit", "-qm", "init"]);
    dir
}

struct Harness {
    _data: tempfile::TempDir,
    state: AppState,
    app: Router,
    admin: String,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

async fn harness(limits: Limits) -> Harness {
    let data = tempfile::tempdir().unwrap();
    let config = ServerConfig {
        data_dir: data.path().join("data"),
        limits: limits.clone(),
        ..ServerConfig::default()
    };
    let backends = open_backends(&config).await.unwrap();
    let secret = super::load_or_create_secret(&config.secret_file()).unwrap();
    let driver = Driver::new(
        Arc::clone(&backends.store),
        Arc::clone(&backends.executor),
        DriverConfig {
            poll_interval: Duration::from_millis(500),
            ..DriverConfig::default()
        },
    )
    .spawn();
    let (_tx, rx) = watch::channel(false);
    // Keep the sender alive for the test's duration.
    std::mem::forget(_tx);
    let finished_runs = Arc::new(FinishedRuns::with_capacity(limits.finished_run_cache));
    let state = AppState {
        store: backends.store,
        artifacts: backends.artifacts,
        logs: backends.logs,
        driver,
        secret: Arc::from(secret),
        limits: Arc::new(limits),
        metrics: Metrics::global(),
        idempotency: Arc::new(Mutex::new(())),
        shutdown: rx,
        tokens: Arc::default(),
        data_dir: shipinator_local::DataDir::new(&config.data_dir),
        pipeline_projects: Arc::default(),
        finished_runs,
    };
    let (admin, _) = api::tokens::issue(
        &state,
        "admin".to_owned(),
        TokenRole::Admin,
        ProjectScope::All,
    )
    .await
    .unwrap();
    Harness {
        _data: data,
        app: router(state.clone()),
        state,
        admin,
    }
}

impl Harness {
    async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let body = body.map(|b| Body::from(serde_json::to_vec(&b).unwrap()));
        self.raw(method, uri, token, &[], body).await
    }

    async fn raw(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Body>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let has_body = body.is_some();
        if has_body
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = self
            .app
            .clone()
            .oneshot(req.body(body.unwrap_or_else(Body::empty)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn token(&self, name: &str, role: TokenRole, scope: ProjectScope) -> String {
        api::tokens::issue(&self.state, name.to_owned(), role, scope)
            .await
            .unwrap()
            .0
    }

    /// Creates a project, a repository of `config` and its pipeline; returns their ids.
    async fn pipeline(
        &self,
        name: &str,
        config: &str,
    ) -> (ProjectId, PipelineId, tempfile::TempDir, String) {
        let repo = repo(config);
        let commit = head(repo.path());
        let admin = Some(self.admin.as_str());
        let p = self
            .call(
                Method::POST,
                "/v1/projects",
                admin,
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(p.status, StatusCode::CREATED, "{:?}", p.body);
        let project = p.json()["id"].as_str().unwrap().to_owned();
        let r = self
            .call(
                Method::POST,
                "/v1/repositories",
                admin,
                Some(json!({"project_id": project, "clone_url": format!("file://{}", repo.path().display())})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        let repository = r.json()["id"].as_str().unwrap().to_owned();
        let pl = self
            .call(
                Method::POST,
                "/v1/pipelines",
                admin,
                Some(json!({"repository_id": repository, "name": "ci", "from_ref": "main"})),
            )
            .await;
        assert_eq!(pl.status, StatusCode::CREATED, "{:?}", pl.body);
        let pipeline = pl.json()["id"].as_str().unwrap().to_owned();
        (
            project.parse().unwrap(),
            pipeline.parse().unwrap(),
            repo,
            commit,
        )
    }

    async fn trigger(&self, pipeline: PipelineId, commit: &str) -> RunId {
        let r = self
            .call(
                Method::POST,
                &format!("/v1/pipelines/{pipeline}/runs"),
                Some(&self.admin),
                Some(json!({"trigger": "manual", "branch": "main", "commit": commit})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        r.json()["id"].as_str().unwrap().parse().unwrap()
    }

    async fn finish(&self, run: RunId) -> Value {
        let done = tokio::time::timeout(
            Duration::from_secs(120),
            self.state.driver.wait_for_run(run),
        )
        .await
        .expect("the run did not finish within two minutes")
        .unwrap();
        assert!(done.status.is_terminal());
        self.call(
            Method::GET,
            &format!("/v1/pipeline-runs/{run}"),
            Some(&self.admin),
            None,
        )
        .await
        .json()
    }

    /// Waits until `run` has a running execution; returns it and its step.
    async fn running_execution(&self, run: RunId) -> (ExecutionId, StepId) {
        for _ in 0..600 {
            let record = self.state.store.load_run(run).await.unwrap();
            if let Some(e) = record
                .executions
                .iter()
                .find(|e| e.status == shipinator_core::domain::Status::Running)
            {
                return (e.id, e.job_step_id);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("run {run} never had a running execution");
    }

    async fn cancel_and_wait(&self, run: RunId) {
        self.state.driver.cancel_run(run).unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(60), self.state.driver.wait_for_run(run))
            .await;
    }
}

fn small_limits() -> Limits {
    Limits {
        json_body_bytes: 64 * 1024,
        artifact_bytes: 1024 * 1024,
        request_timeout_secs: 30,
        ..Limits::default()
    }
}

/// Who calls, in the authorization matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Anonymous,
    Viewer,
    Developer,
    Admin,
    OtherProject,
    Execution,
}

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy)]
enum Access {
    Public,
    /// Read within the project (lists: other projects' tokens see a filtered list).
    Read,
    List,
    Developer,
    ProjectAdmin,
    GlobalAdmin,
    Worker,
    ArtifactRead,
}

fn allowed(access: Access, who: Who) -> bool {
    use Who::*;
    match access {
        Access::Public => true,
        Access::Read | Access::ArtifactRead => matches!(who, Viewer | Developer | Admin),
        Access::List => matches!(who, Viewer | Developer | Admin | OtherProject),
        Access::Developer => matches!(who, Developer | Admin),
        Access::ProjectAdmin | Access::GlobalAdmin => who == Admin,
        Access::Worker => who == Execution,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_matrix_covers_every_openapi_operation() {
    let h = harness(small_limits()).await;
    let (project, quick, _quick_repo, quick_commit) = h.pipeline("matrix-quick", QUICK).await;
    let (_, slow, _slow_repo, slow_commit) = h.pipeline("matrix-slow", SLOW).await;
    let (other_project, _, _other_repo, _) = h.pipeline("matrix-other", QUICK).await;
    let done = h.trigger(quick, &quick_commit).await;
    assert_eq!(h.finish(done).await["status"], "success");
    let artifacts = h
        .call(
            Method::GET,
            &format!("/v1/pipeline-runs/{done}/artifacts"),
            Some(&h.admin),
            None,
        )
        .await
        .json();
    let artifact = artifacts[0]["id"].as_str().unwrap().to_owned();
    let steps = h
        .call(
            Method::GET,
            &format!("/v1/pipeline-runs/{done}/steps"),
            Some(&h.admin),
            None,
        )
        .await
        .json();
    let step = steps[0]["id"].as_str().unwrap().to_owned();
    let repository = h
        .call(
            Method::GET,
            &format!("/v1/pipelines/{quick}"),
            Some(&h.admin),
            None,
        )
        .await
        .json()["repository_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let live = h.trigger(slow, &slow_commit).await;
    let (execution, _) = h.running_execution(live).await;

    let mut tokens: BTreeMap<Who, Option<String>> = BTreeMap::new();
    tokens.insert(Who::Anonymous, None);
    tokens.insert(
        Who::Viewer,
        Some(h.token("v", TokenRole::Viewer, ProjectScope::All).await),
    );
    tokens.insert(
        Who::Developer,
        Some(h.token("d", TokenRole::Developer, ProjectScope::All).await),
    );
    tokens.insert(Who::Admin, Some(h.admin.clone()));
    tokens.insert(
        Who::OtherProject,
        Some(
            h.token(
                "o",
                TokenRole::Admin,
                ProjectScope::Projects(vec![other_project]),
            )
            .await,
        ),
    );
    tokens.insert(
        Who::Execution,
        Some(execution_token(&h.state.secret, execution)),
    );

    // Every operation, what it needs, and a request that gets past authorisation without
    // side effects that would disturb the other rows (bodies parse; most fail validation).
    let new_artifact = ArtifactId::new_v7();
    let table: Vec<(&str, &str, Access, String, Option<Value>)> = vec![
        ("GET", "/healthz", Access::Public, "/healthz".into(), None),
        ("GET", "/readyz", Access::Public, "/readyz".into(), None),
        ("GET", "/metrics", Access::Public, "/metrics".into(), None),
        (
            "GET",
            "/v1/projects",
            Access::List,
            "/v1/projects".into(),
            None,
        ),
        (
            "POST",
            "/v1/projects",
            Access::GlobalAdmin,
            "/v1/projects".into(),
            Some(json!({"name": ""})),
        ),
        (
            "GET",
            "/v1/projects/{id}",
            Access::Read,
            format!("/v1/projects/{project}"),
            None,
        ),
        (
            "GET",
            "/v1/repositories",
            Access::List,
            "/v1/repositories".into(),
            None,
        ),
        (
            "POST",
            "/v1/repositories",
            Access::ProjectAdmin,
            "/v1/repositories".into(),
            Some(json!({"project_id": project, "clone_url": "nope"})),
        ),
        (
            "GET",
            "/v1/repositories/{id}",
            Access::Read,
            format!("/v1/repositories/{repository}"),
            None,
        ),
        (
            "GET",
            "/v1/pipelines",
            Access::List,
            "/v1/pipelines".into(),
            None,
        ),
        (
            "POST",
            "/v1/pipelines",
            Access::ProjectAdmin,
            "/v1/pipelines".into(),
            Some(json!({"repository_id": repository, "name": ""})),
        ),
        (
            "GET",
            "/v1/pipelines/{id}",
            Access::Read,
            format!("/v1/pipelines/{quick}"),
            None,
        ),
        (
            "POST",
            "/v1/pipelines/{id}/runs",
            Access::Developer,
            format!("/v1/pipelines/{quick}/runs"),
            Some(json!({"trigger": "manual", "branch": "main", "commit": "not-hex"})),
        ),
        (
            "GET",
            "/v1/pipeline-runs",
            Access::List,
            "/v1/pipeline-runs".into(),
            None,
        ),
        (
            "GET",
            "/v1/pipeline-runs/{id}",
            Access::Read,
            format!("/v1/pipeline-runs/{done}"),
            None,
        ),
        (
            "GET",
            "/v1/pipeline-runs/{id}/jobs",
            Access::Read,
            format!("/v1/pipeline-runs/{done}/jobs"),
            None,
        ),
        (
            "GET",
            "/v1/pipeline-runs/{id}/steps",
            Access::Read,
            format!("/v1/pipeline-runs/{done}/steps"),
            None,
        ),
        (
            "GET",
            "/v1/pipeline-runs/{id}/artifacts",
            Access::Read,
            format!("/v1/pipeline-runs/{done}/artifacts"),
            None,
        ),
        (
            "GET",
            "/v1/pipeline-runs/{id}/steps/{step_id}/logs",
            Access::Read,
            format!("/v1/pipeline-runs/{done}/steps/{step}/logs"),
            None,
        ),
        // A finished, successful run: cancel and retry are 409 after authorisation.
        (
            "POST",
            "/v1/pipeline-runs/{id}/cancel",
            Access::Developer,
            format!("/v1/pipeline-runs/{done}/cancel"),
            None,
        ),
        (
            "POST",
            "/v1/pipeline-runs/{id}/retry",
            Access::Developer,
            format!("/v1/pipeline-runs/{done}/retry"),
            None,
        ),
        (
            "GET",
            "/v1/artifacts/{id}/metadata",
            Access::ArtifactRead,
            format!("/v1/artifacts/{artifact}/metadata"),
            None,
        ),
        (
            "GET",
            "/v1/artifacts/{id}/download",
            Access::ArtifactRead,
            format!("/v1/artifacts/{artifact}/download"),
            None,
        ),
        (
            "POST",
            "/v1/executions/{id}/status",
            Access::Worker,
            format!("/v1/executions/{execution}/status"),
            Some(
                json!({"status": "running", "exit_code": null, "logs_uri": null, "artifacts": [], "failure": null}),
            ),
        ),
        (
            "POST",
            "/v1/executions/{id}/logs",
            Access::Worker,
            format!("/v1/executions/{execution}/logs"),
            Some(json!({"lines": []})),
        ),
        (
            "PUT",
            "/v1/executions/{id}/artifacts/{artifact_id}",
            Access::Worker,
            format!("/v1/executions/{execution}/artifacts/{new_artifact}"),
            None,
        ),
        (
            "GET",
            "/v1/tokens",
            Access::GlobalAdmin,
            "/v1/tokens".into(),
            None,
        ),
        (
            "POST",
            "/v1/tokens",
            Access::GlobalAdmin,
            "/v1/tokens".into(),
            Some(json!({"name": "", "role": "viewer"})),
        ),
        (
            "DELETE",
            "/v1/tokens/{id}",
            Access::GlobalAdmin,
            format!(
                "/v1/tokens/{}",
                shipinator_core::domain::ApiTokenId::new_v7()
            ),
            None,
        ),
    ];

    let doc = h
        .call(Method::GET, "/v1/openapi.json", None, None)
        .await
        .json();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(|m| (m.to_ascii_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let tested: BTreeSet<(String, String)> = table
        .iter()
        .map(|(m, p, ..)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(
        documented, tested,
        "every documented operation is in the matrix and nothing else"
    );

    let mut failures = Vec::new();
    for (method, path, access, uri, body) in &table {
        for (who, token) in &tokens {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let reply = if *path == "/v1/executions/{id}/artifacts/{artifact_id}" {
                h.raw(
                    method.clone(),
                    uri,
                    token.as_deref(),
                    &[("content-type", "application/octet-stream")],
                    Some(Body::from(format!("payload for {who:?}"))),
                )
                .await
            } else {
                h.call(method.clone(), uri, token.as_deref(), body.clone())
                    .await
            };
            let expect_allowed = allowed(*access, *who);
            let status = reply.status;
            let ok = if expect_allowed {
                status != StatusCode::UNAUTHORIZED
                    && status != StatusCode::FORBIDDEN
                    && !status.is_server_error()
            } else if *who == Who::Anonymous {
                status == StatusCode::UNAUTHORIZED && reply.error_code() == "unauthorized"
            } else {
                status == StatusCode::FORBIDDEN && reply.error_code() == "forbidden"
            };
            // The first allowed upload stores the artifact; later ones are 409, also allowed.
            if !ok {
                failures.push(format!(
                    "{method} {path} as {who:?}: got {status} {}",
                    String::from_utf8_lossy(&reply.body)
                ));
            }
        }
    }
    h.cancel_and_wait(live).await;
    assert!(
        failures.is_empty(),
        "authorisation failures:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_one_shape_and_name_the_field() {
    let h = harness(small_limits()).await;
    let admin = Some(h.admin.as_str());
    let (_, pipeline, _repo, commit) = h.pipeline("errors", QUICK).await;
    let uri = format!("/v1/pipelines/{pipeline}/runs");

    let bad_commit = h
        .call(
            Method::POST,
            &uri,
            admin,
            Some(json!({"trigger": "manual", "branch": "main", "commit": "xyz!"})),
        )
        .await;
    assert_eq!(bad_commit.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_commit.json()["error"]["code"], "invalid_request");
    assert_eq!(bad_commit.json()["error"]["field"], "commit");

    let bad_trigger = h
        .call(
            Method::POST,
            &uri,
            admin,
            Some(json!({"trigger": "nightly", "branch": "main", "commit": commit})),
        )
        .await;
    assert_eq!(bad_trigger.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_trigger.json()["error"]["field"], "trigger");

    let missing = h
        .call(
            Method::POST,
            &uri,
            admin,
            Some(json!({"trigger": "manual", "branch": "main"})),
        )
        .await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.json()["error"]["field"], "commit");

    let not_json = h
        .raw(
            Method::POST,
            &uri,
            admin,
            &[],
            Some(Body::from("{not json")),
        )
        .await;
    assert_eq!(not_json.status, StatusCode::BAD_REQUEST);
    assert_eq!(not_json.error_code(), "invalid_request");

    let huge = "x".repeat(100 * 1024);
    let too_large = h
        .call(
            Method::POST,
            "/v1/projects",
            admin,
            Some(json!({"name": huge})),
        )
        .await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(too_large.error_code(), "payload_too_large");

    let unknown = h
        .call(
            Method::GET,
            &format!("/v1/pipeline-runs/{}", RunId::new_v7()),
            admin,
            None,
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.error_code(), "not_found");

    let bad_id = h
        .call(Method::GET, "/v1/pipeline-runs/not-a-uuid", admin, None)
        .await;
    assert_eq!(bad_id.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_id.json()["error"]["field"], "path");

    let bad_status = h
        .call(
            Method::GET,
            "/v1/pipeline-runs?status=sideways",
            admin,
            None,
        )
        .await;
    assert_eq!(bad_status.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_status.json()["error"]["field"], "status");

    let bad_cursor = h
        .call(Method::GET, "/v1/pipeline-runs?cursor=nope", admin, None)
        .await;
    assert_eq!(bad_cursor.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad_cursor.json()["error"]["field"], "cursor");

    let wrong_method = h.call(Method::PATCH, "/v1/projects", admin, None).await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.error_code(), "method_not_allowed");

    let no_route = h.call(Method::GET, "/v1/nothing-here", admin, None).await;
    assert_eq!(no_route.status, StatusCode::NOT_FOUND);
    assert_eq!(no_route.error_code(), "not_found");

    let repository = h
        .call(
            Method::GET,
            &format!("/v1/pipelines/{pipeline}"),
            admin,
            None,
        )
        .await
        .json()["repository_id"]
        .clone();
    let invalid = h
        .call(
            Method::POST,
            "/v1/pipelines",
            admin,
            Some(json!({"repository_id": repository, "name": "broken", "config": "build:\n  steps:\n    - name: x\n      runn: true\n"})),
        )
        .await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    let e = &invalid.json()["error"];
    assert_eq!(e["code"], "invalid_config");
    assert_eq!(e["field"], "config");
    assert_eq!(e["details"][0]["line"], 4, "{e}");

    let conflict = h
        .call(
            Method::POST,
            "/v1/pipelines",
            admin,
            Some(json!({"repository_id": repository, "name": "ci", "config": QUICK})),
        )
        .await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    assert_eq!(conflict.error_code(), "conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_are_read_from_the_repository_at_a_branch_tag_or_commit() {
    let h = harness(Limits::default()).await;
    let admin = Some(h.admin.as_str());
    let (_, pipeline, repo, first) = h.pipeline("from-ref", QUICK).await;
    let repository = h
        .call(
            Method::GET,
            &format!("/v1/pipelines/{pipeline}"),
            admin,
            None,
        )
        .await
        .json()["repository_id"]
        .clone();
    git(repo.path(), &["tag", "v1"]);
    git(repo.path(), &["checkout", "-q", "-b", "slow"]);
    std::fs::write(repo.path().join(".shipinator.yaml"), SLOW).unwrap();
    git(repo.path(), &["commit", "-qam", "slow"]);
    git(repo.path(), &["checkout", "-q", "main"]);
    // The working tree's edits are not what the server reads.
    std::fs::write(repo.path().join(".shipinator.yaml"), "not: [yaml").unwrap();

    let create = |name: &str, reference: &str| {
        let body = json!({"repository_id": repository, "name": name, "from_ref": reference});
        h.call(Method::POST, "/v1/pipelines", admin, Some(body))
    };
    for (name, reference, expect) in [
        ("slow", "slow", SLOW),
        ("tagged", "v1", QUICK),
        ("pinned", first.as_str(), QUICK),
    ] {
        let r = create(name, reference).await;
        assert_eq!(r.status, StatusCode::CREATED, "{reference}: {:?}", r.body);
        assert_eq!(r.json()["config"], expect, "{reference}");
    }

    for (reference, says) in [
        ("nope", "no branch, tag or commit named 'nope'"),
        (
            "--upload-pack=x",
            "is not a usable branch, tag or commit name",
        ),
    ] {
        let r = create("bad", reference).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{reference}");
        let e = &r.json()["error"];
        assert_eq!(e["field"], "from_ref", "{e}");
        assert!(e["message"].as_str().unwrap().contains(says), "{e}");
    }
    git(repo.path(), &["checkout", "-q", "-b", "empty"]);
    git(repo.path(), &["rm", "-q", "--cached", ".shipinator.yaml"]);
    git(repo.path(), &["commit", "-qm", "no config"]);
    let r = create("bad", "empty").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has no file '.shipinator.yaml'"),
        "{:?}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_same_run_and_refuses_another_body() {
    let h = harness(small_limits()).await;
    let (_, pipeline, _repo, commit) = h.pipeline("idem", QUICK).await;
    let uri = format!("/v1/pipelines/{pipeline}/runs");
    let body = json!({"trigger": "manual", "branch": "main", "commit": commit});
    let send = |body: Value| {
        let h = &h;
        let uri = uri.clone();
        async move {
            h.raw(
                Method::POST,
                &uri,
                Some(&h.admin),
                &[("idempotency-key", "deploy-42")],
                Some(Body::from(serde_json::to_vec(&body).unwrap())),
            )
            .await
        }
    };
    let first = send(body.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    let again = send(body.clone()).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(first.json()["id"], again.json()["id"]);
    let other = send(json!({"trigger": "manual", "branch": "other", "commit": commit})).await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(other.error_code(), "conflict");
    let runs = h
        .call(
            Method::GET,
            &format!("/v1/pipeline-runs?pipeline={pipeline}"),
            Some(&h.admin),
            None,
        )
        .await
        .json();
    assert_eq!(runs["items"].as_array().unwrap().len(), 1, "{runs}");
    let id: RunId = first.json()["id"].as_str().unwrap().parse().unwrap();
    h.finish(id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_stream_with_ranges_and_logs_follow_with_last_event_id() {
    let h = harness(small_limits()).await;
    let admin = Some(h.admin.as_str());
    let (_, pipeline, _repo, commit) = h.pipeline("downloads", QUICK).await;
    let run = h.trigger(pipeline, &commit).await;
    assert_eq!(h.finish(run).await["status"], "success");

    let artifacts = h
        .call(
            Method::GET,
            &format!("/v1/pipeline-runs/{run}/artifacts"),
            admin,
            None,
        )
        .await
        .json();
    let artifact = &artifacts[0];
    let id = artifact["id"].as_str().unwrap();
    let meta = h
        .call(
            Method::GET,
            &format!("/v1/artifacts/{id}/metadata"),
            admin,
            None,
        )
        .await;
    assert_eq!(meta.status, StatusCode::OK);
    assert_eq!(meta.json()["type"], "binary");

    let uri = format!("/v1/artifacts/{id}/download");
    let whole = h.raw(Method::GET, &uri, admin, &[], None).await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(&whole.body[..], b"hello artifact\n");
    assert_eq!(
        artifact["checksum"].as_str().unwrap(),
        format!("sha256:{}", hex::encode(Sha256::digest(&whole.body)))
    );
    assert_eq!(whole.headers["accept-ranges"], "bytes");

    let part = h
        .raw(Method::GET, &uri, admin, &[("range", "bytes=0-4")], None)
        .await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&part.body[..], b"hello");
    assert_eq!(part.headers["content-range"], "bytes 0-4/15");

    let suffix = h
        .raw(Method::GET, &uri, admin, &[("range", "bytes=-9")], None)
        .await;
    assert_eq!(suffix.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&suffix.body[..], b"artifact\n");

    let past = h
        .raw(Method::GET, &uri, admin, &[("range", "bytes=15-")], None)
        .await;
    assert_eq!(past.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(past.headers["content-range"], "bytes */15");
    assert_eq!(past.error_code(), "range_not_satisfiable");

    // Logs: a page, then the event stream, then the stream resumed after its first line.
    let steps = h
        .call(
            Method::GET,
            &format!("/v1/pipeline-runs/{run}/steps"),
            admin,
            None,
        )
        .await
        .json();
    let step = steps[0]["id"].as_str().unwrap();
    assert_eq!(steps[0]["executions"].as_array().unwrap().len(), 1);
    let logs_uri = format!("/v1/pipeline-runs/{run}/steps/{step}/logs");
    let page = h.call(Method::GET, &logs_uri, admin, None).await.json();
    let texts: Vec<&str> = page["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["stream"] == "stdout")
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["one", "two", "three"], "{page}");

    let events = |reply: &Reply| -> Vec<(String, Option<String>, String)> {
        let text = String::from_utf8_lossy(&reply.body).into_owned();
        text.split("\n\n")
            .filter(|block| !block.trim().is_empty() && !block.starts_with(':'))
            .map(|block| {
                let mut event = String::new();
                let mut id = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                (event, id, data)
            })
            .collect()
    };
    let followed = h
        .raw(
            Method::GET,
            &format!("{logs_uri}?follow=true"),
            admin,
            &[],
            None,
        )
        .await;
    assert_eq!(followed.status, StatusCode::OK);
    assert_eq!(followed.headers["content-type"], "text/event-stream");
    let all = events(&followed);
    assert_eq!(all.last().unwrap().0, "end", "{all:?}");
    let lines: Vec<_> = all.iter().filter(|e| e.0 == "line").collect();
    assert!(lines.len() >= 3, "{all:?}");
    for (i, (_, id, data)) in lines.iter().enumerate() {
        let line: Value = serde_json::from_str(data).unwrap();
        assert_eq!(id.as_deref(), Some(line["seq"].to_string().as_str()));
        assert_eq!(line["seq"], i as u64);
    }
    let first_id = lines[0].1.clone().unwrap();
    let resumed = h
        .raw(
            Method::GET,
            &format!("{logs_uri}?follow=true"),
            admin,
            &[("last-event-id", &first_id)],
            None,
        )
        .await;
    let rest: Vec<_> = events(&resumed)
        .into_iter()
        .filter(|e| e.0 == "line")
        .collect();
    assert_eq!(rest.len(), lines.len() - 1);
    assert_eq!(rest[0].2, lines[1].2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_endpoints_take_only_a_live_executions_own_token() {
    let h = harness(small_limits()).await;
    let (_, pipeline, _repo, commit) = h.pipeline("worker", SLOW).await;
    let run = h.trigger(pipeline, &commit).await;
    let (execution, _) = h.running_execution(run).await;
    let token = execution_token(&h.state.secret, execution);
    let tok = Some(token.as_str());

    // Logs: appending the same batch twice stores it once; a gap is a conflict. The local
    // executor writes this execution's log too: wait for the step's own line ("waiting"), after
    // which it writes nothing until the step ends, so the next sequence number stays ours.
    let logs = format!("/v1/executions/{execution}/logs");
    let mut next = 0;
    for _ in 0..600 {
        let lines = h.state.logs.read(execution, 0, 10_000).await.unwrap();
        if lines.iter().any(|l| l.text == "waiting") {
            next = lines.len() as u64;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(next > 0, "the step never logged its first line");
    let batch = json!({"lines": [
        {"seq": next, "at": 1_700_000_000_000_000_i64, "stream": "stdout", "text": "from worker"},
        {"seq": next + 1, "at": 1_700_000_000_000_001_i64, "stream": "stderr", "text": "again"},
    ]});
    for _ in 0..2 {
        let r = h.call(Method::POST, &logs, tok, Some(batch.clone())).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    }
    let stored = h.state.logs.read(execution, next, 100).await.unwrap();
    let texts: Vec<_> = stored
        .iter()
        .map(|l| l.text.as_str())
        .filter(|t| *t == "from worker" || *t == "again")
        .collect();
    assert_eq!(texts, ["from worker", "again"]);
    let gap = json!({"lines": [{"seq": next + 100, "at": 0, "stream": "stdout", "text": "gap"}]});
    let r = h.call(Method::POST, &logs, tok, Some(gap)).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{:?}", r.body);

    // Uploads: stored with their sha256, once; over the limit is 413.
    let artifact = ArtifactId::new_v7();
    let upload = format!("/v1/executions/{execution}/artifacts/{artifact}");
    let payload = vec![7_u8; 300_000];
    let headers = [("content-type", "application/octet-stream")];
    let r = h
        .raw(
            Method::PUT,
            &upload,
            tok,
            &headers,
            Some(Body::from(payload.clone())),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.json()["size"], 300_000);
    assert_eq!(
        r.json()["checksum"],
        format!("sha256:{}", hex::encode(Sha256::digest(&payload)))
    );
    let again = h
        .raw(
            Method::PUT,
            &upload,
            tok,
            &headers,
            Some(Body::from(payload.clone())),
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);

    // Once registered to its run, the execution's own token may read it back.
    let stored = h.state.artifacts.head(artifact).await.unwrap();
    let row = shipinator_core::domain::Artifact {
        id: artifact,
        job_id: shipinator_core::domain::JobId::derive(
            run,
            shipinator_core::domain::JobType::Build,
        ),
        step_id: None,
        run_id: run,
        artifact_type: shipinator_core::domain::ArtifactType::File,
        name: Some("blob".to_owned()),
        path: None,
        storage_backend: stored.backend.clone(),
        storage_path: stored.storage_path.clone(),
        checksum: Some(stored.checksum.clone()),
        size: stored.size,
        metadata: BTreeMap::new(),
        created_at: stored.created_at,
    };
    h.state
        .store
        .commit(&shipinator_core::store::Batch {
            fences: Vec::new(),
            writes: vec![shipinator_core::store::Write::InsertArtifact(row)],
        })
        .await
        .unwrap();
    let read = h
        .raw(
            Method::GET,
            &format!("/v1/artifacts/{artifact}/download"),
            tok,
            &[],
            None,
        )
        .await;
    assert_eq!(read.status, StatusCode::OK, "{:?}", read.body);
    assert_eq!(read.body.len(), payload.len());
    let stranger_read = h
        .raw(
            Method::GET,
            &format!("/v1/artifacts/{artifact}/download"),
            Some(&execution_token(&h.state.secret, ExecutionId::new_v7())),
            &[],
            None,
        )
        .await;
    assert_eq!(stranger_read.status, StatusCode::FORBIDDEN);
    let big = format!(
        "/v1/executions/{execution}/artifacts/{}",
        ArtifactId::new_v7()
    );
    let chunks = futures_util::stream::iter(
        (0..40).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![1_u8; 64 * 1024]))),
    );
    let r = h
        .raw(
            Method::PUT,
            &big,
            tok,
            &headers,
            Some(Body::from_stream(chunks)),
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{:?}", r.body);

    // Status: a success with a non-zero exit code names the field; another execution's token,
    // and any token once the execution ended, are refused.
    let status = format!("/v1/executions/{execution}/status");
    let r = h
        .call(
            Method::POST,
            &status,
            tok,
            Some(json!({"status": "success", "exit_code": 3})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["field"], "exit_code");
    let stranger = execution_token(&h.state.secret, ExecutionId::new_v7());
    let r = h
        .call(
            Method::POST,
            &status,
            Some(&stranger),
            Some(json!({"status": "running"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    h.cancel_and_wait(run).await;
    let r = h
        .call(
            Method::POST,
            &status,
            tok,
            Some(json!({"status": "running"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    let r = h.call(Method::POST, &logs, tok, Some(batch)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_report_is_acknowledged_once_committed_and_refused_once_ended() {
    use shipinator_core::domain::Status;
    let h = harness(small_limits()).await;
    let (_, pipeline, _repo, commit) = h.pipeline("report", SLOW).await;
    let run = h.trigger(pipeline, &commit).await;
    let (execution, _) = h.running_execution(run).await;
    let token = execution_token(&h.state.secret, execution);
    let tok = Some(token.as_str());
    let status = format!("/v1/executions/{execution}/status");
    let report = json!({"status": "failed", "exit_code": 3});

    let r = h
        .call(Method::POST, &status, tok, Some(report.clone()))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    // A 2xx means recorded: the store already holds the result when the answer arrives.
    let stored = h.state.store.get_execution(execution).await.unwrap();
    assert_eq!(
        (stored.status, stored.exit_code),
        (Status::Failed, Some(3)),
        "acknowledged before it was committed"
    );

    // The execution has ended, and its token with it: the same report again, or another
    // result, is refused and changes nothing.
    for body in [report, json!({"status": "success"})] {
        let r = h.call(Method::POST, &status, tok, Some(body)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{:?}", r.body);
    }
    let stored = h.state.store.get_execution(execution).await.unwrap();
    assert_eq!((stored.status, stored.exit_code), (Status::Failed, Some(3)));
    let done = h.finish(run).await;
    assert_eq!(done["status"], "failed", "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_run_is_served_from_memory_and_a_live_one_never_is() {
    let h = harness(small_limits()).await;
    let (project, pipeline, _repo, commit) = h.pipeline("cached", QUICK).await;
    let (_, other_pipeline, _repo2, other_commit) = h.pipeline("cached-other", SLOW).await;
    let viewer = h
        .token(
            "scoped-viewer",
            TokenRole::Viewer,
            ProjectScope::Projects(vec![project]),
        )
        .await;
    let v = Some(viewer.as_str());

    // A run that has not ended is read from the store on every request.
    let live = h.trigger(other_pipeline, &other_commit).await;
    h.running_execution(live).await;
    let uri = format!("/v1/pipeline-runs/{live}");
    let first = h.call(Method::GET, &uri, Some(&h.admin), None).await;
    assert_eq!(first.json()["status"], "running", "{:?}", first.body);
    assert!(h.state.finished_runs.get(live).is_none());
    // Scoped to another project: refused.
    assert_eq!(
        h.call(Method::GET, &uri, v, None).await.status,
        StatusCode::FORBIDDEN
    );
    h.cancel_and_wait(live).await;
    let ended = h.call(Method::GET, &uri, Some(&h.admin), None).await;
    assert_eq!(ended.json()["status"], "canceled", "{:?}", ended.body);
    // Still refused once it is remembered.
    assert!(h.state.finished_runs.get(live).is_some());
    assert_eq!(
        h.call(Method::GET, &uri, v, None).await.status,
        StatusCode::FORBIDDEN
    );

    // A finished run: the remembered answer is the store's, byte for byte.
    let run = h.trigger(pipeline, &commit).await;
    assert_eq!(h.finish(run).await["status"], "success");
    let uri = format!("/v1/pipeline-runs/{run}");
    let cached = h.call(Method::GET, &uri, v, None).await;
    assert_eq!(cached.status, StatusCode::OK, "{:?}", cached.body);
    assert_eq!(cached.headers["content-type"], "application/json");
    let stored = h.state.store.get_run(run).await.unwrap();
    assert_eq!(
        cached.json(),
        serde_json::to_value(super::dto::RunDto::from(stored)).unwrap()
    );
    assert_eq!(
        h.state.finished_runs.get(run).map(|f| f.json),
        Some(cached.body.clone())
    );
    // Revoking the token refuses the next read of the remembered run.
    let token_id = h
        .state
        .store
        .find_api_token(&super::auth::hash_token(&viewer))
        .await
        .unwrap()
        .id;
    let revoked = h
        .call(
            Method::DELETE,
            &format!("/v1/tokens/{token_id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{:?}", revoked.body);
    assert_eq!(
        h.call(Method::GET, &uri, v, None).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_a_log_checks_and_applies_limit() {
    let h = harness(small_limits()).await;
    let admin = Some(h.admin.as_str());
    let (_, pipeline, _repo, commit) = h.pipeline("follow-limit", QUICK).await;
    let run = h.trigger(pipeline, &commit).await;
    assert_eq!(h.finish(run).await["status"], "success");
    let steps = h
        .call(
            Method::GET,
            &format!("/v1/pipeline-runs/{run}/steps"),
            admin,
            None,
        )
        .await
        .json();
    let step = steps[0]["id"].as_str().unwrap();
    let logs_uri = format!("/v1/pipeline-runs/{run}/steps/{step}/logs");
    for bad in ["0", "10001"] {
        for follow in ["true", "false"] {
            let r = h
                .call(
                    Method::GET,
                    &format!("{logs_uri}?follow={follow}&limit={bad}"),
                    admin,
                    None,
                )
                .await;
            assert_eq!(
                r.status,
                StatusCode::BAD_REQUEST,
                "limit={bad} follow={follow}"
            );
            assert_eq!(r.json()["error"]["field"], "limit");
        }
    }
    let all = h
        .call(Method::GET, &format!("{logs_uri}?limit=10000"), admin, None)
        .await
        .json();
    assert!(all["lines"].as_array().unwrap().len() >= 3, "{all}");
    // Two lines, then the stream closes without `end`: the log goes on after them.
    let two = h
        .call(
            Method::GET,
            &format!("{logs_uri}?follow=true&limit=2"),
            admin,
            None,
        )
        .await;
    assert_eq!(two.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&two.body).into_owned();
    assert_eq!(text.matches("event: line").count(), 2, "{text}");
    assert!(!text.contains("event: end"), "{text}");
    // Resumed after the second line, without a limit: the rest, then `end`.
    let rest = h
        .raw(
            Method::GET,
            &format!("{logs_uri}?follow=true"),
            admin,
            &[("last-event-id", "1")],
            None,
        )
        .await;
    let text = String::from_utf8_lossy(&rest.body).into_owned();
    assert_eq!(
        text.matches("event: line").count(),
        all["lines"].as_array().unwrap().len() - 2,
        "{text}"
    );
    assert!(text.contains("event: end"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_states_limits_and_the_commit_pattern() {
    let h = harness(small_limits()).await;
    let doc = h
        .call(Method::GET, "/v1/openapi.json", None, None)
        .await
        .json();
    let param = |path: &str, name: &str| -> Value {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .unwrap_or_else(|| panic!("{path} has no parameters"))
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{path} has no parameter {name}"))["schema"]
            .clone()
    };
    for path in [
        "/v1/pipeline-runs",
        "/v1/projects",
        "/v1/repositories",
        "/v1/pipelines",
    ] {
        let limit = param(path, "limit");
        assert_eq!(
            (limit["minimum"].as_u64(), limit["maximum"].as_u64()),
            (Some(1), Some(1000)),
            "{path}: {limit}"
        );
    }
    let lines = param("/v1/pipeline-runs/{id}/steps/{step_id}/logs", "limit");
    assert_eq!(
        (lines["minimum"].as_u64(), lines["maximum"].as_u64()),
        (Some(1), Some(10_000)),
        "{lines}"
    );
    let commit = &doc["components"]["schemas"]["RunRequestBody"]["properties"]["commit"];
    assert_eq!(commit["pattern"], "^[0-9A-Fa-f]{4,64}$", "{commit}");
    assert_eq!(
        (commit["minLength"].as_u64(), commit["maxLength"].as_u64()),
        (Some(4), Some(64))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_scoped_shown_once_and_revocable() {
    let h = harness(small_limits()).await;
    let admin = Some(h.admin.as_str());
    let (mine, pipeline, _repo, _) = h.pipeline("scoped-a", QUICK).await;
    let (_other, other_pipeline, _repo2, _) = h.pipeline("scoped-b", QUICK).await;
    let created = h
        .call(
            Method::POST,
            "/v1/tokens",
            admin,
            Some(json!({"name": "ci", "role": "viewer", "projects": [mine]})),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let secret = created.json()["token"].as_str().unwrap().to_owned();
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let listed = h.call(Method::GET, "/v1/tokens", admin, None).await;
    assert!(
        !String::from_utf8_lossy(&listed.body).contains(&secret),
        "secrets are never listed"
    );

    let t = Some(secret.as_str());
    let pipelines = h.call(Method::GET, "/v1/pipelines", t, None).await.json();
    let ids: Vec<&str> = pipelines["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [pipeline.to_string()]);
    assert_eq!(
        h.call(
            Method::GET,
            &format!("/v1/pipelines/{other_pipeline}"),
            t,
            None
        )
        .await
        .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.call(Method::GET, &format!("/v1/pipelines/{pipeline}"), t, None)
            .await
            .status,
        StatusCode::OK
    );
    let revoked = h
        .call(Method::DELETE, &format!("/v1/tokens/{id}"), admin, None)
        .await;
    assert_eq!(revoked.status, StatusCode::OK);
    assert!(revoked.json()["revoked_at"].is_string());
    let after = h
        .call(Method::GET, &format!("/v1/pipelines/{pipeline}"), t, None)
        .await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);
    assert_eq!(after.error_code(), "unauthorized");
    let garbage = h
        .call(Method::GET, "/v1/projects", Some("shp_nonsense"), None)
        .await;
    assert_eq!(garbage.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_then_retry_makes_a_linked_run() {
    let h = harness(small_limits()).await;
    let (_, pipeline, _repo, commit) = h.pipeline("cancel-retry", SLOW).await;
    let run = h.trigger(pipeline, &commit).await;
    h.running_execution(run).await;
    let dev = h
        .token("dev", TokenRole::Developer, ProjectScope::All)
        .await;
    let r = h
        .call(
            Method::POST,
            &format!("/v1/pipeline-runs/{run}/cancel"),
            Some(&dev),
            None,
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    assert_eq!(h.finish(run).await["status"], "canceled");
    let again = h
        .call(
            Method::POST,
            &format!("/v1/pipeline-runs/{run}/cancel"),
            Some(&dev),
            None,
        )
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);

    let retried = h
        .call(
            Method::POST,
            &format!("/v1/pipeline-runs/{run}/retry"),
            Some(&dev),
            None,
        )
        .await;
    assert_eq!(retried.status, StatusCode::CREATED, "{:?}", retried.body);
    let new = retried.json();
    assert_eq!(new["retry_of"], run.to_string());
    assert_eq!(new["requested_by"], "token:dev");
    let new_id: RunId = new["id"].as_str().unwrap().parse().unwrap();
    h.running_execution(new_id).await;
    h.cancel_and_wait(new_id).await;
    let listed = h
        .call(
            Method::GET,
            &format!("/v1/pipeline-runs?pipeline={pipeline}&status=canceled&limit=1"),
            Some(&dev),
            None,
        )
        .await
        .json();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    let cursor = listed["next_cursor"].as_str().expect("a second page");
    let next = h
        .call(
            Method::GET,
            &format!(
                "/v1/pipeline-runs?pipeline={pipeline}&status=canceled&limit=1&cursor={cursor}"
            ),
            Some(&dev),
            None,
        )
        .await
        .json();
    assert_eq!(next["items"][0]["id"], run.to_string());
    assert!(next["next_cursor"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_time_limit_is_a_408_in_the_error_shape() {
    let h = harness(Limits {
        request_timeout_secs: 1,
        ..small_limits()
    })
    .await;
    let (_, pipeline, _repo, commit) = h.pipeline("timeout", QUICK).await;
    // Hold the lock keyed run requests take, so this one cannot finish in time.
    let held = h.state.idempotency.lock().await;
    let r = h
        .raw(
            Method::POST,
            &format!("/v1/pipelines/{pipeline}/runs"),
            Some(&h.admin),
            &[("idempotency-key", "slow")],
            Some(Body::from(
                serde_json::to_vec(
                    &json!({"trigger": "manual", "branch": "main", "commit": commit}),
                )
                .unwrap(),
            )),
        )
        .await;
    drop(held);
    assert_eq!(r.status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(r.error_code(), "timeout");
}

/// Two replicas starting together on one empty store (both found no token): exactly one creates
/// the first admin token and writes it to its data directory; the other creates none.
#[tokio::test]
async fn replicas_starting_together_create_one_first_admin_token() {
    use shipinator_core::store::Store as _;
    let dir = tempfile::tempdir().unwrap();
    let store = shipinator_sqlite::SqliteStore::open(dir.path().join("state.db"))
        .await
        .unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let (made_a, made_b) = tokio::join!(
        super::create_first_admin(&store, &a),
        super::create_first_admin(&store, &b),
    );
    let made = [made_a.unwrap(), made_b.unwrap()];
    assert_eq!(
        made.iter().filter(|m| **m).count(),
        1,
        "created by: {made:?}"
    );
    let (winner, loser) = if made[0] { (&a, &b) } else { (&b, &a) };
    let tokens = store.list_api_tokens().await.unwrap();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert_eq!(tokens[0].role, TokenRole::Admin);
    let secret = std::fs::read_to_string(winner.join("admin-token")).unwrap();
    assert_eq!(
        tokens[0].secret_sha256,
        super::auth::hash_token(secret.trim()),
        "the file holds the stored token's secret"
    );
    assert!(!loser.join("admin-token").exists());
    // A later start finds the token and creates nothing.
    super::bootstrap_admin(&store, loser).await.unwrap();
    assert!(!loser.join("admin-token").exists());
    assert_eq!(store.list_api_tokens().await.unwrap().len(), 1);
}
