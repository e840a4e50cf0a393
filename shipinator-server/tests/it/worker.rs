//! `shipinator worker` against the real server: `shipinator serve` on 127.0.0.1 with a SQLite
//! data directory and the `worker_process` executor, which runs every execution as a
//! `shipinator worker` subprocess with exactly a Kubernetes pod's environment. Runs of a real
//! git repository (file://) go through the worker endpoints: log lines, artifact uploads,
//! input downloads, the status callback.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

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
    git(dir.path(), &["init", "-q", "-b", "main"]);
    git(dir.path(), &["add", "-A"]);
    git(dir.path(), &["commit", "-qm", "init"]);
    let head = git(dir.path(), &["rev-parse", "HEAD"]);
    (dir, head)
}

/// A running `shipinator serve`, killed when dropped.
struct Server {
    child: Child,
    base: String,
    admin: String,
    data: tempfile::TempDir,
    http: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start() -> Self {
        let data = tempfile::tempdir().unwrap();
        let config = data.path().join("server.toml");
        std::fs::write(&config, "[executor]\nkind = \"worker_process\"\n").unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_shipinator"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .env_remove("SHIPINATOR_SERVER")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut admin = None;
        let mut base = None;
        while base.is_none() {
            let line = lines
                .next()
                .expect("serve exited before listening")
                .unwrap();
            if let Some((_, token)) = line.split_once("): ") {
                admin = Some(token.trim().to_owned());
            }
            if let Some(url) = line.strip_prefix("listening on ") {
                base = Some(url.trim().to_owned());
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            base: base.unwrap(),
            admin: admin.expect("the first start prints an admin token"),
            data,
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

    /// A pipeline of `repo`, triggered manually at `commit`; returns the run once it ended.
    async fn run(&self, repo: &Path, pipeline: &str, commit: &str) -> Value {
        let id = self.trigger(repo, pipeline, commit).await;
        self.wait(&id).await
    }

    /// A pipeline of `repo`, triggered manually at `commit`; returns the run's id.
    async fn trigger(&self, repo: &Path, pipeline: &str, commit: &str) -> String {
        let project = self
            .post("/v1/projects", json!({"name": format!("p-{}", uuid())}))
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
                json!({"trigger": "manual", "branch": "main", "commit": commit}),
            )
            .await;
        run["id"].as_str().unwrap().to_owned()
    }

    /// The run once it ended.
    async fn wait(&self, id: &str) -> Value {
        // A bound against a hang, not a timing assertion.
        for _ in 0..1200 {
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

    async fn steps(&self, run: &Value) -> Vec<Value> {
        let id = run["id"].as_str().unwrap();
        self.get(&format!("/v1/pipeline-runs/{id}/steps"))
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    async fn log_text(&self, run: &Value, step: &Value) -> String {
        let page = self
            .get(&format!(
                "/v1/pipeline-runs/{}/steps/{}/logs",
                run["id"].as_str().unwrap(),
                step["id"].as_str().unwrap()
            ))
            .await;
        page["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                format!(
                    "{} {}\n",
                    l["stream"].as_str().unwrap(),
                    l["text"].as_str().unwrap()
                )
            })
            .collect()
    }
}

fn uuid() -> String {
    format!(
        "{:x}",
        Sha256::digest(format!("{:?}", std::time::SystemTime::now()))
    )[..12]
        .to_owned()
}

fn step<'a>(steps: &'a [Value], name: &str) -> &'a Value {
    steps
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {steps:?}"))
}

const PIPELINE: &str = r#"
build:
  steps:
    - name: compile
      run: |
        mkdir -p out
        printf 'payload %s\n' "$SHIPINATOR_BRANCH" > out/app.bin
        chmod 0750 out/app.bin
        echo built to stdout
        echo warned to stderr >&2
        # Many lines: more than one log request.
        i=0; while [ $i -lt 3000 ]; do echo "line $i"; i=$((i+1)); done
      outputs:
        - type: binary
          path: out/app.bin
test:
  steps:
    - name: writes
      run: cat src.txt > copy.txt && test -x out/app.bin && grep -q 'payload main' out/app.bin
    - name: reads
      run: grep -q 'source file' copy.txt && echo "token=${SHIPINATOR_EXECUTION_TOKEN:-unset}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_run_a_pipeline_through_the_servers_worker_endpoints() {
    let server = Server::start();
    let (repo, head) = repo(PIPELINE);
    let run = server.run(repo.path(), PIPELINE, &head).await;
    let steps = server.steps(&run).await;
    assert_eq!(run["status"], "success", "{run} {steps:?}");
    assert!(
        steps.iter().all(|s| s["status"] == "succeeded"),
        "{steps:?}"
    );
    // Every step ran in a worker process.
    for s in &steps {
        assert_eq!(s["executions"][0]["executor_type"], "worker_process", "{s}");
        assert_eq!(s["executions"][0]["exit_code"], 0, "{s}");
    }

    // Logs arrived over HTTP, in order, both streams, every line.
    let compile = step(&steps, "compile");
    let log = server.log_text(&run, compile).await;
    assert!(log.contains("stdout built to stdout"), "{log}");
    assert!(log.contains("stderr warned to stderr"), "{log}");
    let page = server
        .get(&format!(
            "/v1/pipeline-runs/{}/steps/{}/logs?from_seq=0&limit=10000",
            run["id"].as_str().unwrap(),
            compile["id"].as_str().unwrap()
        ))
        .await;
    let numbered: Vec<u64> = page["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["text"].as_str()?.strip_prefix("line ")?.parse().ok())
        .collect();
    assert_eq!(numbered, (0..3000).collect::<Vec<_>>());

    // The artifact was streamed to the server and reads back byte for byte, with its mode.
    let artifacts = server
        .get(&format!(
            "/v1/pipeline-runs/{}/artifacts",
            run["id"].as_str().unwrap()
        ))
        .await;
    let artifact = &artifacts.as_array().unwrap()[0];
    let expected = b"payload main\n";
    let sum = format!("sha256:{:x}", Sha256::digest(expected));
    assert_eq!(artifact["checksum"], sum.as_str());
    assert_eq!(artifact["size"], expected.len());
    assert_eq!(artifact["metadata"]["file_mode"], "750");
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

    // The test stage's two steps shared their workspace, where the worker placed the input
    // (checksum-verified) with its mode; the token did not reach the step's command.
    let reads = server.log_text(&run, step(&steps, "reads")).await;
    assert!(reads.contains("stdout token=unset"), "{reads}");
    let writes = server.log_text(&run, step(&steps, "writes")).await;
    assert!(
        writes.contains(&format!("placed at out/app.bin ({sum})")),
        "{writes}"
    );

    // The workspace is self-contained: no git alternates pointing at a worker's mirror.
    let ws = server
        .data
        .path()
        .join("data/workspaces")
        .join(run["id"].as_str().unwrap())
        .join("build");
    assert!(ws.join(".git").is_dir());
    assert!(!ws.join(".git/objects/info/alternates").exists());
}

const FAILING: &str = r#"
build:
  steps:
    - name: fails
      run: echo about to fail && exit 3
    - name: never
      run: echo never
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_step_is_reported_with_its_exit_code_and_the_rest_is_skipped() {
    let server = Server::start();
    let (repo, head) = repo(FAILING);
    let run = server.run(repo.path(), FAILING, &head).await;
    let steps = server.steps(&run).await;
    assert_eq!(run["status"], "failed", "{run} {steps:?}");
    let fails = step(&steps, "fails");
    assert_eq!(fails["status"], "failed", "{fails}");
    let execution = &fails["executions"][0];
    // A user failure: reported by the worker with the command's exit code, not retried.
    assert_eq!(execution["exit_code"], 3, "{execution}");
    assert_eq!(fails["executions"].as_array().unwrap().len(), 1);
    assert_eq!(step(&steps, "never")["status"], "skipped");
    let log = server.log_text(&run, fails).await;
    assert!(log.contains("stdout about to fail"), "{log}");
}

/// `shipinator worker` run by hand, as a pod would, with `env`.
fn worker(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shipinator"));
    cmd.arg("worker").args(args);
    for var in [
        "SHIPINATOR_SERVER",
        "SHIPINATOR_EXECUTION_TOKEN",
        "SHIPINATOR_EXECUTION_SPEC",
        "SHIPINATOR_WORKSPACE",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied()).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_report_exits_non_zero_and_says_why() {
    let id = "01900000-0000-7000-8000-0000000000aa";
    // No token: a usage error before anything runs.
    let out = worker(
        &["--execution", id],
        &[("SHIPINATOR_SERVER", "http://127.0.0.1:9")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SHIPINATOR_EXECUTION_TOKEN"));

    // A real server that does not know the token (or the execution): refused, exit 1.
    let server = Server::start();
    let out = worker(
        &["--execution", id, "--report-timeout", "5"],
        &[
            ("SHIPINATOR_SERVER", server.base.as_str()),
            ("SHIPINATOR_EXECUTION_TOKEN", "shpx_not-a-real-token"),
            ("SHIPINATOR_EXECUTION_SPEC", "{\"not\": \"a spec\"}"),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not a valid execution spec"), "{stderr}");
    assert!(stderr.contains("403"), "{stderr}");

    // Nobody listening: retried until the bound, then exit 1 naming the server.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let out = worker(
        &["--execution", id, "--report-timeout", "1"],
        &[
            ("SHIPINATOR_SERVER", url.as_str()),
            ("SHIPINATOR_EXECUTION_TOKEN", "t"),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("did not answer"), "{stderr}");
    assert!(stderr.contains(&url), "{stderr}");
}

const SLOW: &str = r#"
build:
  steps:
    - name: sleeps
      run: sleep 300 & echo $! > sleep.pid; wait
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_stops_the_worker_and_its_steps_process_group() {
    let server = Server::start();
    let (repo, head) = repo(SLOW);
    let id = server.trigger(repo.path(), SLOW, &head).await;
    let pidfile = server
        .data
        .path()
        .join("data/workspaces")
        .join(&id)
        .join("build/sleep.pid");
    let mut pid = None;
    for _ in 0..1200 {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        {
            pid = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = pid.expect("the step started");
    let proc_dir = format!("/proc/{pid}");
    assert!(Path::new(&proc_dir).exists());
    server
        .post(&format!("/v1/pipeline-runs/{id}/cancel"), json!({}))
        .await;
    let run = server.wait(&id).await;
    assert_eq!(run["status"], "canceled", "{run}");
    // The executor sent TERM to the worker, which stopped the step's whole process group.
    let mut gone = false;
    for _ in 0..300 {
        let state = std::fs::read_to_string(format!("{proc_dir}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its (also stopped) parent to be reaped.
        if state.is_empty() || state.contains(") Z ") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the step's sleep {pid} still runs");
}
