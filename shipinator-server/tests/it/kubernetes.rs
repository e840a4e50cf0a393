//! `shipinator serve` with `[executor] kind = "kubernetes"` against the fake API server of
//! `shipinator-k8s` (feature `testing`), reached through a kubeconfig file. Its kubelet runs
//! each Job's pod as local processes: the init container copies `shipinator` out of the
//! worker "image" (a directory whose `/usr/local/bin/shipinator` starts the binary under
//! test), then the step container runs `shipinator worker` with exactly the Job's
//! environment, on the shared workspace claim. So the worker clones a real git repository,
//! runs the steps, uploads logs and artifacts and calls the server back with the execution
//! token the server put in the Job.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use shipinator_k8s::testing::{FakeApi, Kind, ProcessKubelet};

const WORKER_IMAGE: &str = "registry.example/shipinator-worker:test";

fn git(dir: &Path, args: &[&str]) -> String {
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

/// A repository with `.shipinator.yaml` = `pipeline`; returns it and its HEAD commit.
fn repo(pipeline: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".shipinator.yaml"), pipeline).unwrap();
    std::fs::write(dir.path().join("src.txt"), "source file\n").unwrap();
    std::fs::write(
        dir.path().join("app.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\n",
    )
    .unwrap();
    git(dir.path(), &["init", "-q", "-b", "main"]);
    git(dir.path(), &["add", "-A"]);
    git(dir.path(), &["commit", "-qm", "init"]);
    let head = git(dir.path(), &["rev-parse", "HEAD"]);
    (dir, head)
}

/// The fake cluster: API server, kubelet directories, the worker image, a kubeconfig.
struct Cluster {
    dir: tempfile::TempDir,
    api: FakeApi,
    kubeconfig: PathBuf,
}

impl Cluster {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("worker-image");
        let bin = image.join("usr/local/bin");
        std::fs::create_dir_all(&bin).unwrap();
        let launcher = bin.join("shipinator");
        std::fs::write(
            &launcher,
            format!(
                "#!/bin/sh\nexec '{}' \"$@\"\n",
                env!("CARGO_BIN_EXE_shipinator")
            ),
        )
        .unwrap();
        std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755)).unwrap();
        let kubelet = ProcessKubelet::new(dir.path().join("kubelet"))
            .image(WORKER_IMAGE, &image)
            .grace_period(Duration::from_secs(5));
        let api = FakeApi::start_with(kubelet).await.unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig("ci")).unwrap();
        Self {
            dir,
            api,
            kubeconfig,
        }
    }

    /// The server configuration for this cluster, pods calling back `port`.
    fn server_toml(&self, port: u16) -> String {
        format!(
            r#"public_url = "http://127.0.0.1:{port}"
[executor]
kind = "kubernetes"
[kubernetes]
cluster = {{ source = "kubeconfig", path = "{kubeconfig}" }}
namespace = "ci"
worker_image = "{WORKER_IMAGE}"
default_image = "debian:12-slim"
service_account = "shipinator-builds"
workspace = {{ claim_name = "shipinator-workspaces" }}
orphan_sweep_interval = 3600
[targets.local]
namespaces = ["staging"]
service_account = "deployer"
"#,
            kubeconfig = self.kubeconfig.display()
        )
    }

    /// The Jobs of namespace `ns`, as stored.
    fn jobs(&self, ns: &str) -> Vec<Value> {
        self.api
            .names(Kind::Job)
            .iter()
            .filter_map(|n| self.api.object(Kind::Job, n))
            .filter(|j| j["metadata"]["namespace"] == ns)
            .collect()
    }
}

fn env_of(job: &Value, name: &str) -> Option<String> {
    job["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?["value"]
        .as_str()
        .map(str::to_owned)
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A running `shipinator serve`, killed when dropped.
struct Server {
    child: Child,
    base: String,
    admin: String,
    http: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts (or restarts: same data directory, same port) the server.
    fn start(data: &Path, config: &str, port: u16) -> Self {
        let file = data.join("server.toml");
        std::fs::write(&file, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_shipinator"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--config",
            ])
            .arg(&file)
            .arg("--data-dir")
            .arg(data.join("data"))
            .env_remove("SHIPINATOR_SERVER")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut base = None;
        while base.is_none() {
            let line = lines
                .next()
                .expect("serve exited before listening")
                .unwrap();
            if let Some(url) = line.strip_prefix("listening on ") {
                base = Some(url.trim().to_owned());
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let admin = std::fs::read_to_string(data.join("data/admin-token"))
            .unwrap()
            .trim()
            .to_owned();
        Self {
            child,
            base: base.unwrap(),
            admin,
            http: reqwest::Client::new(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.admin);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// A manual run of `pipeline` in `repo` at `commit` with `stages`; returns its id.
    async fn trigger(&self, repo: &Path, pipeline: &str, commit: &str, stages: &[&str]) -> String {
        let project = self
            .post(
                "/v1/projects",
                json!({"name": format!("p-{}", free_port())}),
            )
            .await;
        let repository = self
            .post(
                "/v1/repositories",
                json!({"project_id": project["id"], "clone_url": format!("file://{}", repo.display())}),
            )
            .await;
        let pipe = self
            .post(
                "/v1/pipelines",
                json!({"repository_id": repository["id"], "name": "ci", "config": pipeline}),
            )
            .await;
        let run = self
            .post(
                &format!("/v1/pipelines/{}/runs", pipe["id"].as_str().unwrap()),
                json!({"trigger": "manual", "branch": "main", "commit": commit, "stages": stages}),
            )
            .await;
        run["id"].as_str().unwrap().to_owned()
    }

    /// The run once it ended.
    async fn wait(&self, id: &str) -> Value {
        // A bound against a hang, not a timing assertion.
        for _ in 0..1800 {
            let run = self.get(&format!("/v1/pipeline-runs/{id}")).await;
            if matches!(
                run["status"].as_str(),
                Some("success" | "failed" | "canceled")
            ) {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("run {id} did not end");
    }

    async fn steps(&self, id: &str) -> Vec<Value> {
        self.get(&format!("/v1/pipeline-runs/{id}/steps"))
            .await
            .as_array()
            .unwrap()
            .clone()
    }
}

fn step<'a>(steps: &'a [Value], name: &str) -> &'a Value {
    steps
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {steps:?}"))
}

/// Waits (bounded) until `f` holds.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1800 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} never happened");
}

const PIPELINE: &str = r#"
build:
  steps:
    - name: compile
      run: |
        mkdir -p out
        printf 'payload %s\n' "$SHIPINATOR_BRANCH" > out/app.bin
        echo built in a pod
      outputs:
        - type: binary
          path: out/app.bin
test:
  steps:
    - name: writes
      run: cat src.txt > copy.txt && grep -q 'payload main' out/app.bin
    - name: reads
      run: grep -q 'source file' copy.txt && echo "token=${SHIPINATOR_EXECUTION_TOKEN:-unset}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_runs_as_jobs_whose_workers_call_back_with_their_tokens() {
    let cluster = Cluster::start().await;
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::start(data.path(), &cluster.server_toml(port), port);
    let (repo, head) = repo(PIPELINE);
    let id = server
        .trigger(repo.path(), PIPELINE, &head, &["build", "test"])
        .await;
    let run = server.wait(&id).await;
    let steps = server.steps(&id).await;
    assert_eq!(run["status"], "success", "{run} {steps:?}");
    for s in &steps {
        assert_eq!(s["status"], "succeeded", "{s}");
        assert_eq!(s["executions"][0]["executor_type"], "kubernetes", "{s}");
    }

    // One Job per execution in the executions namespace, each with its own token, issued
    // by the server for that execution (the step's command never sees it).
    let jobs = cluster.jobs("ci");
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    let tokens: std::collections::BTreeSet<String> = jobs
        .iter()
        .map(|j| env_of(j, "SHIPINATOR_EXECUTION_TOKEN").expect("a token"))
        .collect();
    assert_eq!(tokens.len(), 3);
    assert!(tokens.iter().all(|t| t.starts_with("shpx_")), "{tokens:?}");
    for j in &jobs {
        assert_eq!(
            env_of(j, "SHIPINATOR_SERVER").as_deref(),
            Some(format!("http://127.0.0.1:{port}").as_str())
        );
        assert_eq!(
            j["spec"]["template"]["spec"]["serviceAccountName"],
            "shipinator-builds"
        );
    }
    let logs = server
        .get(&format!(
            "/v1/pipeline-runs/{id}/steps/{}/logs",
            step(&steps, "reads")["id"].as_str().unwrap()
        ))
        .await;
    assert!(logs.to_string().contains("token=unset"), "{logs}");

    // The artifact went from the pod to the server and downloads with its checksum.
    let artifacts = server
        .get(&format!("/v1/pipeline-runs/{id}/artifacts"))
        .await;
    let artifact = &artifacts.as_array().unwrap()[0];
    let expected = b"payload main\n";
    let sum = format!("sha256:{:x}", Sha256::digest(expected));
    assert_eq!(artifact["checksum"], sum.as_str());
    let body = server
        .http
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
    assert_eq!(&body[..], expected);
    assert_eq!(format!("sha256:{:x}", Sha256::digest(&body)), sum);

    // A Job replayed with the token of its (now ended) execution, and one with a forged
    // token: the server refuses both workers, which exit 1; the run is untouched.
    let compile = jobs
        .iter()
        .find(|j| env_of(j, "SHIPINATOR_EXECUTION_SPEC").is_some_and(|s| s.contains("\"compile\"")))
        .expect("the compile job");
    for (name, token) in [
        (
            "replay-expired",
            env_of(compile, "SHIPINATOR_EXECUTION_TOKEN").unwrap(),
        ),
        ("replay-forged", format!("shpx_{}", "0".repeat(64))),
    ] {
        let mut job = compile.clone();
        job["metadata"] = json!({"name": name, "labels": {"test": "replay"}});
        for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array_mut()
            .unwrap()
        {
            if e["name"] == "SHIPINATOR_EXECUTION_TOKEN" {
                e["value"] = json!(token);
            }
        }
        cluster.api.create_job("ci", &job).await.unwrap();
        let api = cluster.api.clone();
        eventually(&format!("{name} ended"), || {
            api.object(Kind::Job, name)
                .is_some_and(|j| j["status"]["failed"] == 1 || j["status"]["succeeded"] == 1)
        })
        .await;
        let job = cluster.api.object(Kind::Job, name).unwrap();
        assert_eq!(job["status"]["failed"], 1, "{name}: {job}");
        let pod = cluster.api.pod_name(name).unwrap();
        let pod_object = cluster.api.object(Kind::Pod, &pod).unwrap();
        let terminated = &pod_object["status"]["containerStatuses"][0]["state"]["terminated"];
        assert_eq!(terminated["exitCode"], 1, "{name}: {pod_object}");
        let log = cluster.api.pod_log(&pod);
        assert!(log.contains("403"), "{name}: {log}");
    }
    let after = server.get(&format!("/v1/pipeline-runs/{id}")).await;
    assert_eq!(after["status"], "success");
    let artifacts_after = server
        .get(&format!("/v1/pipeline-runs/{id}/artifacts"))
        .await;
    assert_eq!(artifacts_after, artifacts);
    drop(cluster.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_adopts_its_running_job_and_sweeps_the_jobs_of_ended_runs() {
    let cluster = Cluster::start().await;
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = cluster.server_toml(port);
    let started = data.path().join("started");
    let go = data.path().join("go");
    let pipeline = format!(
        r#"
build:
  steps:
    - name: waits
      run: |
        touch '{started}'
        i=0
        while [ ! -e '{go}' ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
        test -e '{go}' && echo released
"#,
        started = started.display(),
        go = go.display()
    );
    let (repo, head) = repo(&pipeline);
    let server = Server::start(data.path(), &config, port);
    let id = server
        .trigger(repo.path(), &pipeline, &head, &["build"])
        .await;
    eventually("the step started in its pod", || started.exists()).await;

    // The server dies while the Job runs; a new one starts on the same database and port
    // (it claims the run once the dead server's lease expired, up to `lease_ttl` later).
    drop(server);
    let server = Server::start(data.path(), &config, port);
    std::fs::write(&go, "").unwrap();
    let run = server.wait(&id).await;
    let steps = server.steps(&id).await;
    assert_eq!(run["status"], "success", "{run} {steps:?}");
    // Adopted, not submitted again: one execution, one Job ever created.
    let waits = step(&steps, "waits");
    assert_eq!(waits["executions"].as_array().unwrap().len(), 1, "{waits}");
    assert_eq!(cluster.api.requests().get("POST jobs"), Some(&1));
    let jobs = cluster.jobs("ci");
    assert_eq!(jobs.len(), 1);
    let job = jobs[0]["metadata"]["name"].as_str().unwrap().to_owned();

    // The next start sweeps the Job of the ended run.
    drop(server);
    let _server = Server::start(data.path(), &config, port);
    let api = cluster.api.clone();
    eventually("the sweep deleted the job", || {
        api.names(Kind::Job).is_empty()
    })
    .await;
    assert!(
        cluster.api.deletes().iter().any(|(name, _)| name == &job),
        "{:?}",
        cluster.api.deletes()
    );
}

const DEPLOY_TO_KUBE_SYSTEM: &str = r#"
build:
  steps:
    - name: manifest
      run: "true"
      outputs:
        - type: k8s_manifest
          path: app.yaml
deploy:
  artifact: k8s_manifest
  target: local
  namespace: kube-system
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_to_a_namespace_its_target_does_not_allow_fails_saying_so() {
    let cluster = Cluster::start().await;
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::start(data.path(), &cluster.server_toml(port), port);
    let (repo, head) = repo(DEPLOY_TO_KUBE_SYSTEM);
    let id = server
        .trigger(
            repo.path(),
            DEPLOY_TO_KUBE_SYSTEM,
            &head,
            &["build", "deploy"],
        )
        .await;
    let run = server.wait(&id).await;
    let steps = server.steps(&id).await;
    assert_eq!(run["status"], "failed", "{run} {steps:?}");
    assert_eq!(step(&steps, "manifest")["status"], "succeeded");
    let deploy = steps
        .iter()
        .find(|s| s["status"] == "failed")
        .unwrap_or_else(|| panic!("no failed step in {steps:?}"));
    let executions = deploy["executions"].as_array().unwrap();
    assert!(!executions.is_empty(), "{deploy}");
    for e in executions {
        let failure = e["failure"].as_str().unwrap_or_default();
        assert!(
            failure.contains(
                "namespace 'kube-system' is not allowed for target 'local' \
                 (targets.local.namespaces: [\"staging\"])"
            ),
            "{e}"
        );
    }
    assert!(cluster.jobs("kube-system").is_empty());
    assert_eq!(cluster.jobs("ci").len(), 1, "only the build ran");
}

/// `shipinator serve` with `config`; it must exit 2 saying each of `needles`.
fn refused(config: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.toml");
    std::fs::write(&file, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shipinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&file)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("SHIPINATOR_SERVER")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
}

#[test]
fn bad_kubernetes_configurations_stop_serve_with_exit_2_naming_the_key() {
    let kind = "[executor]\nkind = \"kubernetes\"\n";
    refused(kind, &["public_url is required"]);
    let base = format!("public_url = \"http://127.0.0.1:9\"\n{kind}");
    refused(
        &format!(
            "{base}[kubernetes]\ncluster = {{ source = \"kubeconfig\", path = \"/nonexistent/kubeconfig\" }}\n"
        ),
        &["kubernetes.cluster.path", "/nonexistent/kubeconfig"],
    );
    refused(
        &format!("{base}[kubernetes]\nnamespace = \"\"\n[targets.prod]\nnamespaces = []\n"),
        &[
            "kubernetes.namespace is empty",
            "targets.prod.namespaces is empty",
        ],
    );
    // A kubeconfig that exists but is not one.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("kubeconfig");
    std::fs::write(&bad, "{ not: [valid").unwrap();
    refused(
        &format!(
            "{base}[kubernetes]\ncluster = {{ source = \"kubeconfig\", path = \"{}\" }}\n",
            bad.display()
        ),
        &["kubernetes.cluster", "kubeconfig"],
    );
}

const SLOW: &str = r#"
build:
  steps:
    - name: sleeps
      run: sleep 300 & echo $! > sleep.pid; wait
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_deletes_its_job_and_the_pod_stops_the_step() {
    let cluster = Cluster::start().await;
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::start(data.path(), &cluster.server_toml(port), port);
    let (repo, head) = repo(SLOW);
    let id = server.trigger(repo.path(), SLOW, &head, &["build"]).await;
    // The stage's workspace, on the claim the kubelet keeps under its directory.
    let pidfile = cluster
        .dir
        .path()
        .join("kubelet/claims/shipinator-workspaces")
        .join(&id)
        .join("build/sleep.pid");
    let mut pid = None;
    eventually("the step started", || {
        pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok());
        pid.is_some()
    })
    .await;
    let pid = pid.unwrap();
    assert_eq!(cluster.jobs("ci").len(), 1);
    server
        .post(&format!("/v1/pipeline-runs/{id}/cancel"), json!({}))
        .await;
    let run = server.wait(&id).await;
    assert_eq!(run["status"], "canceled", "{run}");
    // The executor deleted the Job; the kubelet stopped the worker, which stopped the step.
    assert!(cluster.jobs("ci").is_empty());
    assert!(
        cluster
            .api
            .deletes()
            .iter()
            .all(|(_, propagation)| propagation.as_deref() == Some("Background"))
    );
    eventually("the step's sleep ended", || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.is_empty() || stat.contains(") Z ")
    })
    .await;
}
