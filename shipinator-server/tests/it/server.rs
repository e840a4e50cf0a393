//! `shipinator serve` end to end: the real binary on 127.0.0.1, a real git repository,
//! local processes, SQLite or PostgreSQL. Each server is killed by its guard, also when a
//! test fails.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const PIPELINE: &str = r#"
build:
  steps:
    - name: make
      run: mkdir -p out && printf 'payload %s\n' "$SHIPINATOR_BRANCH" > out/app.bin && echo built
      outputs:
        - type: binary
          path: out/app.bin
test:
  steps:
    - name: sees-build-artifact
      run: grep -q 'payload main' out/app.bin
"#;

pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .current_dir(dir)
        .env_remove("GIT_DIR")
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?} failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A running `shipinator serve`; killed on drop.
pub(crate) struct Server {
    child: Child,
    pub(crate) base: String,
    pub(crate) admin: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub(crate) fn start(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        Server::start_on(data_dir, "127.0.0.1:0", env)
    }

    /// Starts on a given address (a restart on the port clients already use).
    pub(crate) fn start_on(data_dir: &Path, listen: &str, env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shipinator"));
        cmd.args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .env_remove("SHIPINATOR_DATA_DIR")
            .env_remove("SHIPINATOR_DATABASE__URL")
            .env("SHIPINATOR_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut server = Server {
            child,
            base: String::new(),
            admin: String::new(),
        };
        // The first start prints the admin token, then the bound address; stdout closes if
        // the server dies, which ends the loop.
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(t) = line.split(": ").nth(1).filter(|t| t.starts_with("shp_")) {
                server.admin = t.to_owned();
            }
            if let Some(addr) = line.strip_prefix("listening on ") {
                server.base = addr.to_owned();
                break;
            }
        }
        assert!(!server.base.is_empty(), "the server did not start");
        if server.admin.is_empty() {
            server.admin = std::fs::read_to_string(data_dir.join("admin-token"))
                .unwrap()
                .trim()
                .to_owned();
        }
        server
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let client = reqwest::Client::new();
        let mut req = client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.admin);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    /// SIGTERM, then waits for a clean exit.
    pub(crate) fn terminate(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        for _ in 0..600 {
            if let Some(exit) = self.child.try_wait().unwrap() {
                assert!(exit.success(), "serve exited with {exit} after SIGTERM");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("serve did not exit within 30 s of SIGTERM");
    }
}

/// Creates project, repository and pipeline from a real repository, triggers a push-style
/// manual run, waits for it, downloads its artifact and checks the sha256.
async fn trigger_wait_download(server: &Server) {
    use reqwest::Method;
    let repo = tempfile::tempdir().unwrap();
    std::fs::write(repo.path().join(".shipinator.yaml"), PIPELINE).unwrap();
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-qm", "init"]);
    let commit = git(repo.path(), &["rev-parse", "HEAD"]);

    let (s, project) = server
        .request(Method::POST, "/v1/projects", Some(json!({"name": "e2e"})))
        .await;
    assert_eq!(s, 201, "{project}");
    let (s, repository) = server
        .request(
            Method::POST,
            "/v1/repositories",
            Some(json!({
                "project_id": project["id"],
                "clone_url": format!("file://{}", repo.path().display()),
                "default_branch": "main",
            })),
        )
        .await;
    assert_eq!(s, 201, "{repository}");
    let (s, pipeline) = server
        .request(
            Method::POST,
            "/v1/pipelines",
            Some(json!({"repository_id": repository["id"], "name": "ci", "config": PIPELINE})),
        )
        .await;
    assert_eq!(s, 201, "{pipeline}");
    let (s, run) = server
        .request(
            Method::POST,
            &format!("/v1/pipelines/{}/runs", pipeline["id"].as_str().unwrap()),
            Some(json!({"trigger": "manual", "branch": "main", "commit": commit, "stages": ["build", "test"]})),
        )
        .await;
    assert_eq!(s, 201, "{run}");
    let run_id = run["id"].as_str().unwrap().to_owned();

    let mut last = Value::Null;
    for _ in 0..1200 {
        let (_, r) = server
            .request(Method::GET, &format!("/v1/pipeline-runs/{run_id}"), None)
            .await;
        if matches!(
            r["status"].as_str(),
            Some("success" | "failed" | "canceled")
        ) {
            last = r;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last["status"], "success", "run did not succeed: {last}");
    let (_, jobs) = server
        .request(
            Method::GET,
            &format!("/v1/pipeline-runs/{run_id}/jobs"),
            None,
        )
        .await;
    let stages: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["type"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["build", "test"]);

    let (_, artifacts) = server
        .request(
            Method::GET,
            &format!("/v1/pipeline-runs/{run_id}/artifacts"),
            None,
        )
        .await;
    let artifact = &artifacts[0];
    let body = reqwest::Client::new()
        .get(format!(
            "{}/v1/artifacts/{}/download",
            server.base,
            artifact["id"].as_str().unwrap()
        ))
        .bearer_auth(&server.admin)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&body[..], b"payload main\n");
    let sum = format!("sha256:{}", hex(&Sha256::digest(&body)));
    assert_eq!(artifact["checksum"].as_str().unwrap(), sum);

    let metrics = reqwest::get(format!("{}/metrics", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("shipinator_runs_finished_total{status=\"success\"}"),
        "{metrics}"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_sqlite_runs_a_pipeline_and_serves_its_artifact() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[]);
    assert!(server.admin.starts_with("shp_"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.path().join("admin-token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the admin token file is private");
    trigger_wait_download(&server).await;
    let ready = reqwest::get(format!("{}/readyz", server.base))
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    server.terminate();

    // A second start on the same data directory prints no new token; the first still works.
    let again = Server::start(data.path(), &[]);
    let (s, projects) = again
        .request(reqwest::Method::GET, "/v1/projects", None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(projects["items"].as_array().unwrap().len(), 1);
    again.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_postgres_runs_a_pipeline_and_serves_its_artifact() {
    let cluster = tokio::task::spawn_blocking(shipinator_postgres::testing::TestCluster::shared)
        .await
        .unwrap()
        .unwrap();
    let url = cluster.create_database().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[("SHIPINATOR_DATABASE__URL", url.as_str())]);
    assert!(
        !data.path().join("state.db").exists(),
        "state goes to PostgreSQL, not a SQLite file"
    );
    trigger_wait_download(&server).await;
    server.terminate();
}

/// A repository whose build waits for a file to exist (so a test controls when it ends) and
/// writes an artifact.
fn gated_repo(gate: &Path) -> (tempfile::TempDir, String) {
    let repo = tempfile::tempdir().unwrap();
    let config = format!(
        "build:\n  steps:\n    - name: gated\n      run: while [ ! -e {gate} ] && [ -d {dir} ]; do sleep 0.1; done; mkdir -p out && echo gated > out/g.bin\n      outputs:\n        - type: binary\n          path: out/g.bin\n",
        gate = gate.display(),
        dir = gate.parent().unwrap_or(gate).display()
    );
    std::fs::write(repo.path().join(".shipinator.yaml"), config).unwrap();
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-qm", "init"]);
    let commit = git(repo.path(), &["rev-parse", "HEAD"]);
    (repo, commit)
}

/// Project, repository and pipeline for `repo`; returns the pipeline id.
async fn register(server: &Server, name: &str, repo: &Path) -> String {
    use reqwest::Method;
    let (_, project) = server
        .request(Method::POST, "/v1/projects", Some(json!({"name": name})))
        .await;
    let (_, repository) = server
        .request(
            Method::POST,
            "/v1/repositories",
            Some(json!({"project_id": project["id"], "clone_url": format!("file://{}", repo.display())})),
        )
        .await;
    let (s, pipeline) = server
        .request(
            Method::POST,
            "/v1/pipelines",
            Some(json!({"repository_id": repository["id"], "name": "ci", "from_ref": "main"})),
        )
        .await;
    assert_eq!(s, 201, "{pipeline}");
    pipeline["id"].as_str().unwrap().to_owned()
}

async fn trigger(server: &Server, pipeline: &str, commit: &str) -> String {
    let (s, run) = server
        .request(
            reqwest::Method::POST,
            &format!("/v1/pipelines/{pipeline}/runs"),
            Some(json!({"trigger": "manual", "branch": "main", "commit": commit})),
        )
        .await;
    assert_eq!(s, 201, "{run}");
    run["id"].as_str().unwrap().to_owned()
}

async fn wait_status(server: &Server, run: &str, wanted: &[&str]) -> Value {
    let mut last = Value::Null;
    for _ in 0..1200 {
        let (_, r) = server
            .request(
                reqwest::Method::GET,
                &format!("/v1/pipeline-runs/{run}"),
                None,
            )
            .await;
        if wanted.contains(&r["status"].as_str().unwrap_or_default()) {
            return r;
        }
        last = r;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("run {run} never reached {wanted:?}: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_survives_sigkill_of_the_server() {
    let data = tempfile::tempdir().unwrap();
    let gate = data.path().join("gate");
    let (repo, commit) = gated_repo(&gate);
    let server = Server::start(data.path(), &[]);
    let pipeline = register(&server, "crash", repo.path()).await;
    let run = trigger(&server, &pipeline, &commit).await;
    wait_status(&server, &run, &["running"]).await;
    drop(server); // SIGKILL mid-run
    std::fs::write(&gate, "").unwrap();
    let restarted = Server::start(data.path(), &[]);
    let done = wait_status(&restarted, &run, &["success", "failed", "canceled"]).await;
    assert_eq!(done["status"], "success", "{done}");
    restarted.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgres_share_the_runs() {
    let cluster = tokio::task::spawn_blocking(shipinator_postgres::testing::TestCluster::shared)
        .await
        .unwrap()
        .unwrap();
    let url = cluster.create_database().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let env = [("SHIPINATOR_DATABASE__URL", url.as_str())];
    let first = Server::start(data.path(), &env);
    let second = Server::start(data.path(), &env);
    assert_eq!(
        first.admin, second.admin,
        "the second replica reuses the first's admin token"
    );
    let repo = tempfile::tempdir().unwrap();
    std::fs::write(repo.path().join(".shipinator.yaml"), PIPELINE).unwrap();
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-qm", "init"]);
    let commit = git(repo.path(), &["rev-parse", "HEAD"]);
    let pipeline = register(&first, "shared", repo.path()).await;
    let mut runs = Vec::new();
    for i in 0..4 {
        let via = if i % 2 == 0 { &first } else { &second };
        runs.push(trigger(via, &pipeline, &commit).await);
    }
    for run in &runs {
        let done = wait_status(&second, run, &["success", "failed", "canceled"]).await;
        assert_eq!(done["status"], "success", "{done}");
    }
    first.terminate();
    second.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_the_replica_that_does_not_drive_the_run_stops_it() {
    let cluster = tokio::task::spawn_blocking(shipinator_postgres::testing::TestCluster::shared)
        .await
        .unwrap()
        .unwrap();
    let url = cluster.create_database().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let gate = data.path().join("never");
    let (repo, commit) = gated_repo(&gate);
    let env = [("SHIPINATOR_DATABASE__URL", url.as_str())];
    // Only the first replica is up when the run starts, so it drives the run.
    let first = Server::start(data.path(), &env);
    let pipeline = register(&first, "cancel-elsewhere", repo.path()).await;
    let run = trigger(&first, &pipeline, &commit).await;
    wait_status(&first, &run, &["running"]).await;
    let second = Server::start(data.path(), &env);
    let (s, body) = second
        .request(
            reqwest::Method::POST,
            &format!("/v1/pipeline-runs/{run}/cancel"),
            None,
        )
        .await;
    assert_eq!(s, 202, "{body}");
    let done = wait_status(&second, &run, &["success", "failed", "canceled"]).await;
    assert_eq!(done["status"], "canceled", "{done}");
    first.terminate();
    second.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_a_503_and_recovers() {
    let cluster = tokio::task::spawn_blocking(shipinator_postgres::testing::TestCluster::start)
        .await
        .unwrap()
        .unwrap();
    let url = cluster.create_database().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[("SHIPINATOR_DATABASE__URL", url.as_str())]);
    let (s, _) = server
        .request(reqwest::Method::GET, "/v1/projects", None)
        .await;
    assert_eq!(s, 200);
    cluster.stop_immediate().unwrap();
    let (s, body) = server
        .request(reqwest::Method::GET, "/v1/projects", None)
        .await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    let ready = reqwest::get(format!("{}/readyz", server.base))
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    cluster.start_again().unwrap();
    let mut recovered = false;
    for _ in 0..300 {
        if reqwest::get(format!("{}/readyz", server.base))
            .await
            .unwrap()
            .status()
            .as_u16()
            == 200
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "readyz never recovered after the database came back"
    );
    let (s, _) = server
        .request(reqwest::Method::GET, "/v1/projects", None)
        .await;
    assert_eq!(s, 200);
    server.terminate();
}

#[test]
fn tokens_cli_creates_lists_and_revokes() {
    let data = tempfile::tempdir().unwrap();
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_shipinator"))
            .arg("tokens")
            .args(args)
            .arg("--data-dir")
            .arg(data.path())
            .env_remove("SHIPINATOR_DATA_DIR")
            .env_remove("SHIPINATOR_DATABASE__URL")
            .output()
            .unwrap()
    };
    let created = cli(&["create", "--name", "ci", "--role", "developer"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let secret = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    assert!(secret.starts_with("shp_") && secret.len() == 68, "{secret}");
    let listed = cli(&["list", "--output", "json"]);
    assert!(listed.status.success());
    let tokens: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(tokens[0]["name"], "ci");
    assert_eq!(tokens[0]["role"], "developer");
    assert!(tokens[0]["revoked_at"].is_null());
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&secret));
    let id = tokens[0]["id"].as_str().unwrap();
    let revoked = cli(&["revoke", id]);
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    let listed: Value = serde_json::from_slice(&cli(&["list", "--output", "json"]).stdout).unwrap();
    assert!(listed[0]["revoked_at"].is_string());
    let bad = cli(&["revoke", "not-an-id"]);
    assert_eq!(bad.status.code(), Some(2));
}
