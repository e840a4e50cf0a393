//! schemathesis (PyPI) against the real `shipinator serve`: the server's own
//! `/v1/openapi.json`, at least 100 generated requests per operation, with an admin token,
//! path parameters pinned to real objects (a finished run with its job, step, execution and
//! artifact, and a run whose step is still running for the worker endpoints). It fails with
//! schemathesis' report when a response is a 5xx or does not match the documented status
//! codes, content types or schemas.
//!
//! `scripts/test.sh` installs the pinned schemathesis into `<target>/schemathesis-venv`; the
//! test also takes `SHIPINATOR_SCHEMATHESIS` or a `schemathesis` on `PATH`, and fails saying
//! what to install when there is none.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

/// The version `scripts/test.sh` installs.
const SCHEMATHESIS_VERSION: &str = "4.32.5";
/// Generated requests per operation.
const EXAMPLES_PER_OPERATION: u32 = 100;
/// schemathesis is killed (and the test fails) after this long.
const HARD_TIMEOUT: Duration = Duration::from_secs(600);

/// Pushes to `main` only (no manual or pull-request runs), so generated run requests mostly
/// get a 400 and the few accepted ones run one quick step.
const PIPELINE: &str = r#"
on:
  push:
    branches: [main]
  manual: false
build:
  steps:
    - name: make
      run: mkdir -p out && echo payload > out/app.bin && echo built
      outputs:
        - type: binary
          path: out/app.bin
test:
  steps:
    - name: check
      run: grep -q payload out/app.bin
"#;

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

/// A git repository holding `config` as `.shipinator.yaml`; returns it and its commit.
fn repository(config: &str) -> (tempfile::TempDir, String) {
    let repo = tempfile::tempdir().unwrap();
    std::fs::write(repo.path().join(".shipinator.yaml"), config).unwrap();
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-qm", "init"]);
    let commit = git(repo.path(), &["rev-parse", "HEAD"]);
    (repo, commit)
}

/// The schemathesis executable, or a failure that says how to install it.
fn schemathesis() -> PathBuf {
    if let Some(p) = std::env::var_os("SHIPINATOR_SCHEMATHESIS") {
        return PathBuf::from(p);
    }
    // <target>/<profile>/shipinator → <target>/schemathesis-venv, where scripts/test.sh puts it.
    let exe = Path::new(env!("CARGO_BIN_EXE_shipinator"));
    if let Some(target) = exe.parent().and_then(Path::parent) {
        let venv = target.join("schemathesis-venv/bin/schemathesis");
        if venv.is_file() {
            return venv;
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("schemathesis");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "schemathesis is not installed: run scripts/test.sh (it installs schemathesis \
         {SCHEMATHESIS_VERSION} from PyPI into <target>/schemathesis-venv), or \
         `python3 -m pip install schemathesis=={SCHEMATHESIS_VERSION}` and put it on PATH or in \
         SHIPINATOR_SCHEMATHESIS"
    );
}

/// A running `shipinator serve`; killed on drop.
struct Server {
    child: Child,
    base: String,
    admin: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(data_dir: &Path, log: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shipinator"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env_remove("SHIPINATOR_DATA_DIR")
            .env_remove("SHIPINATOR_DATABASE__URL")
            .env("SHIPINATOR_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut server = Server {
            child,
            base: String::new(),
            admin: String::new(),
        };
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
        assert!(
            !server.admin.is_empty(),
            "the server printed no admin token"
        );
        server
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = reqwest::Client::new()
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.admin);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let value: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {value}");
        value
    }

    async fn wait_for_run(&self, run: &str, done: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..1200 {
            let r = self
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/pipeline-runs/{run}"),
                    None,
                )
                .await;
            if done(&r) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("run {run} did not reach the awaited state in 120 s");
    }
}

/// The token of one execution, as the server derives it from its secret.
fn execution_token(data_dir: &Path, execution: &str) -> String {
    let secret = std::fs::read_to_string(data_dir.join("server-secret")).unwrap();
    let secret: Vec<u8> = (0..secret.trim().len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&secret.trim()[i..i + 2], 16).unwrap())
        .collect();
    let mut mac = Hmac::<Sha256>::new_from_slice(&secret).unwrap();
    mac.update(execution.as_bytes());
    let digest = mac.finalize().into_bytes();
    let mut token = String::from("shpx_");
    for b in digest {
        write!(token, "{b:02x}").unwrap();
    }
    token
}

/// What the generated requests are pinned to.
struct Seeded {
    project: String,
    repository: String,
    pipeline: String,
    run: String,
    step: String,
    artifact: String,
    token: String,
    status_execution: String,
    status_token: String,
    upload_execution: String,
    upload_token: String,
}

/// The id of `run`'s first execution once it is running.
async fn running_execution(server: &Server, run: &str) -> String {
    for _ in 0..1200 {
        let steps = server
            .call(
                reqwest::Method::GET,
                &format!("/v1/pipeline-runs/{run}/steps"),
                None,
            )
            .await;
        if let Some(e) = steps[0]["executions"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["status"] == "running"))
        {
            return e["id"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the gated step of run {run} did not start in 120 s");
}

async fn seed(server: &Server, data_dir: &Path, repo: &Path, commit: &str, gated: &Path) -> Seeded {
    use reqwest::Method;
    let project = server
        .call(
            Method::POST,
            "/v1/projects",
            Some(json!({"name": "fuzzed"})),
        )
        .await;
    let repository = server
        .call(
            Method::POST,
            "/v1/repositories",
            Some(json!({"project_id": project["id"], "clone_url": format!("file://{}", repo.display())})),
        )
        .await;
    let pipeline = server
        .call(
            Method::POST,
            "/v1/pipelines",
            Some(json!({"repository_id": repository["id"], "name": "ci", "config": PIPELINE, "trigger_type": "push"})),
        )
        .await;
    let pipeline_id = pipeline["id"].as_str().unwrap().to_owned();
    let run = server
        .call(
            Method::POST,
            &format!("/v1/pipelines/{pipeline_id}/runs"),
            Some(json!({"trigger": "push", "branch": "main", "commit": commit})),
        )
        .await;
    let run_id = run["id"].as_str().unwrap().to_owned();
    let finished = server
        .wait_for_run(&run_id, |r| r["finished_at"].is_string())
        .await;
    assert_eq!(finished["status"], "success", "{finished}");
    let steps = server
        .call(
            Method::GET,
            &format!("/v1/pipeline-runs/{run_id}/steps"),
            None,
        )
        .await;
    let artifacts = server
        .call(
            Method::GET,
            &format!("/v1/pipeline-runs/{run_id}/artifacts"),
            None,
        )
        .await;
    let token = server
        .call(
            Method::POST,
            "/v1/tokens",
            Some(json!({"name": "to-revoke", "role": "viewer"})),
        )
        .await;

    // A second pipeline whose step waits for a file: its execution stays live for the worker
    // endpoints while schemathesis runs.
    let gate = gated.join("gate");
    let gated_config = format!(
        "build:\n  steps:\n    - name: gated\n      run: while [ ! -e {} ] && [ -d {} ]; do sleep 0.1; done\n",
        gate.display(),
        gated.display()
    );
    let gated_pipeline = server
        .call(
            Method::POST,
            "/v1/pipelines",
            Some(
                json!({"repository_id": repository["id"], "name": "gated", "config": gated_config}),
            ),
        )
        .await;
    // Two runs of it: generated status reports may end the first one's execution; the
    // second one's stays live for log appends and uploads.
    let mut live = Vec::new();
    for _ in 0..2 {
        let run = server
            .call(
                Method::POST,
                &format!(
                    "/v1/pipelines/{}/runs",
                    gated_pipeline["id"].as_str().unwrap()
                ),
                Some(json!({"trigger": "manual", "branch": "main", "commit": commit})),
            )
            .await;
        live.push(running_execution(server, run["id"].as_str().unwrap()).await);
    }
    let upload_execution = live.pop().unwrap();
    let status_execution = live.pop().unwrap();
    Seeded {
        project: project["id"].as_str().unwrap().to_owned(),
        repository: repository["id"].as_str().unwrap().to_owned(),
        pipeline: pipeline_id,
        step: steps[0]["id"].as_str().unwrap().to_owned(),
        artifact: artifacts[0]["id"].as_str().unwrap().to_owned(),
        token: token["id"].as_str().unwrap().to_owned(),
        status_token: execution_token(data_dir, &status_execution),
        status_execution,
        upload_token: execution_token(data_dir, &upload_execution),
        upload_execution,
        run: run_id,
    }
}

/// schemathesis' configuration: every path parameter pinned to a real object; the worker
/// endpoints called with the live executions' tokens.
fn config(s: &Seeded) -> String {
    let pin = |path: &str, params: &[(&str, &str)], header: Option<&str>| {
        let mut text = format!("[[operations]]\ninclude-path = \"{path}\"\n");
        let list: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("\"path.{k}\" = \"{v}\""))
            .collect();
        writeln!(text, "parameters = {{ {} }}", list.join(", ")).unwrap();
        if let Some(token) = header {
            writeln!(text, "headers = {{ Authorization = \"Bearer {token}\" }}").unwrap();
        }
        text.push('\n');
        text
    };
    let status = Some(s.status_token.as_str());
    let upload = Some(s.upload_token.as_str());
    let mut out = String::from("[generation]\ndatabase = \"none\"\n\n");
    for (path, params, header) in [
        ("/v1/projects/{id}", vec![("id", s.project.as_str())], None),
        (
            "/v1/repositories/{id}",
            vec![("id", s.repository.as_str())],
            None,
        ),
        (
            "/v1/pipelines/{id}",
            vec![("id", s.pipeline.as_str())],
            None,
        ),
        (
            "/v1/pipelines/{id}/runs",
            vec![("id", s.pipeline.as_str())],
            None,
        ),
        ("/v1/pipeline-runs/{id}", vec![("id", s.run.as_str())], None),
        (
            "/v1/pipeline-runs/{id}/jobs",
            vec![("id", s.run.as_str())],
            None,
        ),
        (
            "/v1/pipeline-runs/{id}/steps",
            vec![("id", s.run.as_str())],
            None,
        ),
        (
            "/v1/pipeline-runs/{id}/artifacts",
            vec![("id", s.run.as_str())],
            None,
        ),
        (
            "/v1/pipeline-runs/{id}/cancel",
            vec![("id", s.run.as_str())],
            None,
        ),
        (
            "/v1/pipeline-runs/{id}/retry",
            vec![("id", s.run.as_str())],
            None,
        ),
        (
            "/v1/pipeline-runs/{id}/steps/{step_id}/logs",
            vec![("id", s.run.as_str()), ("step_id", s.step.as_str())],
            None,
        ),
        (
            "/v1/artifacts/{id}/metadata",
            vec![("id", s.artifact.as_str())],
            None,
        ),
        (
            "/v1/artifacts/{id}/download",
            vec![("id", s.artifact.as_str())],
            None,
        ),
        ("/v1/tokens/{id}", vec![("id", s.token.as_str())], None),
        (
            "/v1/executions/{id}/status",
            vec![("id", s.status_execution.as_str())],
            status,
        ),
        (
            "/v1/executions/{id}/logs",
            vec![("id", s.upload_execution.as_str())],
            upload,
        ),
        (
            "/v1/executions/{id}/artifacts/{artifact_id}",
            vec![("id", s.upload_execution.as_str())],
            upload,
        ),
    ] {
        out.push_str(&pin(path, &params, header));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_errors_or_schema_mismatches() {
    let schemathesis = schemathesis();
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("data");
    let server_log = scratch.path().join("server.log");
    let server = Server::start(&data_dir, &server_log);
    let (repo, commit) = repository(PIPELINE);
    let seeded = seed(&server, &data_dir, repo.path(), &commit, scratch.path()).await;
    let config_file = scratch.path().join("schemathesis.toml");
    std::fs::write(&config_file, config(&seeded)).unwrap();

    let started = Instant::now();
    let mut child = Command::new(&schemathesis)
        .arg("--config-file")
        .arg(&config_file)
        .arg("--no-color")
        .arg("run")
        .arg(format!("{}/v1/openapi.json", server.base))
        .args(["--url", &server.base])
        .args(["--header", &format!("Authorization: Bearer {}", server.admin)])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--max-examples", &EXAMPLES_PER_OPERATION.to_string()])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--workers", "2", "--request-timeout", "30", "--seed", "1"])
        .arg("--generation-unique-inputs")
        .current_dir(scratch.path())
        .env("NO_COLOR", "1")
        .env("HYPOTHESIS_STORAGE_DIRECTORY", scratch.path().join("hypothesis"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; install schemathesis {SCHEMATHESIS_VERSION} (scripts/test.sh)",
                schemathesis.display()
            )
        });
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > HARD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    let _ = std::fs::write(scratch.path().join("gate"), "");
    let log = std::fs::read_to_string(&server_log).unwrap_or_default();
    eprintln!(
        "schemathesis ran for {:.1} s\n{}",
        started.elapsed().as_secs_f64(),
        stdout
            .find("=== WARNINGS ===")
            .or_else(|| stdout.find("=== SUMMARY ==="))
            .map_or(stdout.as_str(), |i| &stdout[i..])
    );
    let Some(status) = status else {
        panic!(
            "schemathesis did not finish within {} s\n{stdout}\n{stderr}\nserver log:\n{log}",
            HARD_TIMEOUT.as_secs()
        );
    };
    assert!(
        status.success(),
        "schemathesis found failures ({status}):\n{stdout}\n{stderr}\nserver log:\n{log}"
    );
    // The run is real: every operation was exercised.
    assert!(
        stdout.contains("passed") && !stdout.contains("No operations"),
        "{stdout}"
    );
    drop(server);
}
