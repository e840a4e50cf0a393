//! The CLI as a client of a server: the real `shipinator serve` on 127.0.0.1 with SQLite, a
//! real git repository (file://), and every CLI call a real `shipinator` process. Servers and
//! CLI processes are killed by their guards, also when a test fails; every wait is bounded.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::server::{Server, git};

/// The longest any one CLI call may take.
const CLI_BOUND: Duration = Duration::from_secs(180);

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
    - name: check
      run: grep -q 'payload main' out/app.bin && echo checked
"#;

/// A CLI process; killed on drop if it is still running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// What a CLI call did.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Runs `shipinator ARGS` in `cwd` with `env` (nothing inherited that would pick a server,
/// token or data directory), bounded by [`CLI_BOUND`].
fn shipinator(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shipinator"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("SHIPINATOR_SERVER")
        .env_remove("SHIPINATOR_TOKEN")
        .env_remove("SHIPINATOR_DATA_DIR")
        .env_remove("SHIPINATOR_DATABASE__URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = Running(cmd.spawn().unwrap());
    let mut stdout = child.0.stdout.take().unwrap();
    let mut stderr = child.0.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + CLI_BOUND;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            drop(child);
            panic!("shipinator {args:?} did not finish within {CLI_BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        code: status.code(),
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

/// The CLI pointed at one server with one token (through the environment, as CI does).
struct Remote<'a> {
    server: &'a Server,
    token: String,
    cwd: &'a Path,
}

impl Remote<'_> {
    fn run(&self, args: &[&str]) -> Out {
        shipinator(
            self.cwd,
            &[
                ("SHIPINATOR_SERVER", self.server.base.as_str()),
                ("SHIPINATOR_TOKEN", self.token.as_str()),
            ],
            args,
        )
    }
}

/// A committed repository with `PIPELINE` and any extra files; returns it and HEAD.
fn repository(extra: &[(&str, &str)]) -> (tempfile::TempDir, String) {
    let repo = tempfile::tempdir().unwrap();
    std::fs::write(repo.path().join(".shipinator.yaml"), PIPELINE).unwrap();
    for (name, text) in extra {
        std::fs::write(repo.path().join(name), text).unwrap();
    }
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-qm", "init"]);
    let commit = git(repo.path(), &["rev-parse", "HEAD"]);
    (repo, commit)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Project → repository → pipelines with the CLI; returns the repository id.
fn register(cli: &Remote<'_>, project: &str, repo: &Path) -> String {
    let p = cli.run(&["projects", "create", project, "--output", "json"]);
    let p = p.ok().json();
    assert_eq!(p["name"], project);
    let url = format!("file://{}", repo.display());
    let r = cli.run(&[
        "repos",
        "create",
        "--project",
        project,
        "--clone-url",
        &url,
        "--output",
        "json",
    ]);
    let r = r.ok().json();
    assert_eq!(r["project_id"], p["id"]);
    assert_eq!(r["default_branch"], "main");
    r["id"].as_str().unwrap().to_owned()
}

#[test]
fn the_cli_creates_triggers_inspects_and_downloads_through_a_server() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (repo, commit) = repository(&[(
        "broken.yaml",
        "build:\n  steps:\n    - name: x\n      runn: true\n",
    )]);
    let server = Server::start(data.path(), &[]);
    let cli = Remote {
        server: &server,
        token: server.admin.clone(),
        cwd: work.path(),
    };

    let repo_id = register(&cli, "shop", repo.path());
    let listed = cli
        .run(&["projects", "list", "--output", "json"])
        .ok()
        .json();
    assert_eq!(listed["projects"][0]["name"], "shop");
    let listed = cli
        .run(&["repos", "list", "--project", "shop", "--output", "json"])
        .ok()
        .json();
    assert_eq!(listed["repositories"][0]["id"], repo_id.as_str());
    let human = cli.run(&["repos", "list"]);
    assert!(human.ok().stdout.contains(&repo_id), "{}", human.stdout);

    // A pipeline from a file, one read by the server from the repository, and a broken file
    // whose problems come back located in that file.
    let file = repo.path().join(".shipinator.yaml");
    let ci = cli.run(&[
        "pipelines",
        "create",
        "--repo",
        &repo_id,
        "--name",
        "ci",
        "--file",
        file.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let ci = ci.ok().json();
    assert_eq!(ci["config"], PIPELINE);
    cli.run(&[
        "pipelines",
        "create",
        "--repo",
        &repo_id,
        "--name",
        "from-ref",
        "--from-ref",
        "main",
    ])
    .ok();
    let broken = repo.path().join("broken.yaml");
    let bad = cli.run(&[
        "pipelines",
        "create",
        "--repo",
        &repo_id,
        "--name",
        "bad",
        "--file",
        broken.to_str().unwrap(),
    ]);
    assert_eq!(bad.code, Some(1), "{}", bad.stderr);
    assert!(bad.stderr.contains("invalid_config"), "{}", bad.stderr);
    assert!(
        bad.stderr.contains(&format!("{}:4:", broken.display())),
        "{}",
        bad.stderr
    );
    let pipelines = cli
        .run(&["pipelines", "list", "--output", "json"])
        .ok()
        .json();
    let names: Vec<&str> = pipelines["pipelines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"ci") && names.contains(&"from-ref"));

    // Trigger by name from inside the repository: HEAD and its branch are the defaults.
    let here = Remote {
        server: &server,
        token: cli.token.clone(),
        cwd: repo.path(),
    };
    let waited = here.run(&["trigger", "ci", "--stages", "build,test", "--wait"]);
    waited.ok();
    assert!(
        waited.stdout.contains("build/make: succeeded"),
        "{}",
        waited.stdout
    );
    assert!(
        waited.stdout.contains("test/check: succeeded"),
        "{}",
        waited.stdout
    );
    let last = waited.stdout.lines().last().unwrap();
    assert!(
        last.starts_with("run ") && last.contains(" success"),
        "{last}"
    );
    let run_id = last.split_whitespace().nth(1).unwrap().to_owned();

    let runs = cli.run(&["runs", "list", "--output", "json"]).ok().json();
    assert_eq!(runs["runs"][0]["id"], run_id.as_str());
    assert_eq!(runs["runs"][0]["status"], "success");
    assert_eq!(runs["runs"][0]["commit"], commit.as_str());
    assert_eq!(runs["runs"][0]["ref"], "main");
    let by_pipeline = cli
        .run(&[
            "runs",
            "list",
            "--pipeline",
            "ci",
            "--status",
            "success",
            "--output",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(by_pipeline["runs"].as_array().unwrap().len(), 1);

    let shown = cli
        .run(&["runs", "show", &run_id, "--output", "json"])
        .ok()
        .json();
    assert_eq!(shown["run"]["status"], "success");
    let stages: Vec<&str> = shown["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["type"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["build", "test"]);
    assert_eq!(shown["steps"].as_array().unwrap().len(), 2);
    let table = cli.run(&["runs", "show", &run_id]);
    assert!(table.ok().stdout.contains("build/make"), "{}", table.stdout);

    let logs = cli.run(&["logs", &run_id]);
    assert!(
        logs.ok().stdout.contains("[build/make] built"),
        "{}",
        logs.stdout
    );
    assert!(
        logs.stdout.contains("[test/check] checked"),
        "{}",
        logs.stdout
    );
    // Following a finished step prints exactly what reading it prints.
    let read = cli.run(&["logs", &run_id, "--step", "build/make"]);
    let followed = cli.run(&["logs", &run_id, "--step", "build/make", "-f"]);
    assert_eq!(followed.ok().stdout, read.ok().stdout);
    assert!(
        followed.stdout.lines().any(|l| l == "[build/make] built"),
        "{}",
        followed.stdout
    );

    let artifacts = cli
        .run(&["artifacts", "list", &run_id, "--output", "json"])
        .ok()
        .json();
    let artifact = &artifacts["artifacts"][0];
    assert_eq!(artifact["path"], "out/app.bin");
    let target = work.path().join("downloaded.bin");
    let downloaded = cli.run(&[
        "artifacts",
        "download",
        artifact["id"].as_str().unwrap(),
        "-o",
        target.to_str().unwrap(),
    ]);
    downloaded.ok();
    let body = std::fs::read(&target).unwrap();
    assert_eq!(body, b"payload main\n");
    assert_eq!(
        artifact["checksum"].as_str().unwrap(),
        format!("sha256:{}", sha256_hex(&body))
    );
    // Without -o, the artifact's file name in the current directory.
    cli.run(&["artifacts", "download", artifact["id"].as_str().unwrap()])
        .ok();
    assert_eq!(std::fs::read(work.path().join("app.bin")).unwrap(), body);

    let completions = shipinator(work.path(), &[], &["completions", "bash"]);
    assert!(
        completions.ok().stdout.contains("trigger"),
        "bash completion names trigger"
    );
    server.terminate();
}

#[test]
fn the_cli_reports_failures_retries_cancels_and_refusals() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let gate = work.path().join("gate");
    let never = work.path().join("never");
    let gated = format!(
        "build:\n  steps:\n    - name: make\n      run: mkdir -p out && echo made > out/app.bin\n      outputs:\n        - type: binary\n          path: out/app.bin\ntest:\n  steps:\n    - name: gate\n      run: test -e {}\n",
        gate.display()
    );
    let slow = format!(
        "build:\n  steps:\n    - name: wait\n      run: echo waiting; while [ ! -e {0} ] && [ -d {1} ]; do sleep 0.1; done\n",
        never.display(),
        work.path().display()
    );
    let (repo, commit) = repository(&[("gated.yaml", &gated), ("slow.yaml", &slow)]);
    let server = Server::start(data.path(), &[]);
    let cli = Remote {
        server: &server,
        token: server.admin.clone(),
        cwd: work.path(),
    };
    let repo_id = register(&cli, "flaky", repo.path());
    for (name, file) in [("gated", "gated.yaml"), ("slow", "slow.yaml")] {
        let path = repo.path().join(file);
        cli.run(&[
            "pipelines",
            "create",
            "--repo",
            &repo_id,
            "--name",
            name,
            "--file",
            path.to_str().unwrap(),
        ])
        .ok();
    }

    // A failing run: `--wait` exits 1 and says which step failed.
    let failed = cli.run(&[
        "trigger", "gated", "--branch", "main", "--commit", &commit, "--wait",
    ]);
    assert_eq!(failed.code, Some(1), "{}\n{}", failed.stdout, failed.stderr);
    assert!(
        failed.stdout.contains("test/gate: failed"),
        "{}",
        failed.stdout
    );
    assert!(failed.stdout.contains("exit code 1"), "{}", failed.stdout);
    let failed_id = failed
        .stdout
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();

    // Retried once the gate exists: from the failed stage, linked to the first run.
    std::fs::write(&gate, "").unwrap();
    let retried = cli.run(&["runs", "retry", &failed_id, "--output", "json"]);
    let retried = retried.ok().json();
    assert_eq!(retried["status"], "success");
    assert_eq!(retried["retry_of"], failed_id.as_str());
    let again = cli.run(&["runs", "retry", retried["id"].as_str().unwrap()]);
    assert_eq!(
        again.code,
        Some(1),
        "a successful run cannot be retried: {}",
        again.stderr
    );
    assert!(again.stderr.contains("conflict"), "{}", again.stderr);

    // Cancelling a running run.
    let started = cli.run(&["trigger", "slow", "--branch", "main", "--commit", &commit]);
    let slow_id = started.ok().stdout.trim().to_owned();
    let mut status = String::new();
    for _ in 0..600 {
        let shown = cli
            .run(&["runs", "show", &slow_id, "--output", "json"])
            .ok()
            .json();
        status = shown["run"]["status"].as_str().unwrap().to_owned();
        let step_running = shown["steps"][0]["status"] == "running";
        if status == "running" && step_running {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status, "running");
    let canceled = cli.run(&["runs", "cancel", &slow_id]);
    assert!(
        canceled.ok().stdout.contains("canceled"),
        "{}",
        canceled.stdout
    );
    let shown = cli
        .run(&["runs", "show", &slow_id, "--output", "json"])
        .ok()
        .json();
    assert_eq!(shown["run"]["status"], "canceled");
    let twice = cli.run(&["runs", "cancel", &slow_id]);
    assert_eq!(
        twice.code,
        Some(0),
        "cancelling a cancelled run is done: {}",
        twice.stderr
    );
    assert!(
        twice.stderr.contains("already ended canceled"),
        "{}",
        twice.stderr
    );

    // A viewer reads but may not trigger; the refusal carries the server's code and message.
    let created = shipinator(
        work.path(),
        &[],
        &[
            "tokens",
            "create",
            "--name",
            "reader",
            "--role",
            "viewer",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
    );
    let viewer = Remote {
        server: &server,
        token: created.ok().stdout.trim().to_owned(),
        cwd: work.path(),
    };
    viewer.run(&["runs", "list"]).ok();
    let refused = viewer.run(&["trigger", "gated", "--branch", "main", "--commit", &commit]);
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("forbidden")
            && refused
                .stderr
                .contains("token 'reader' has role viewer; this needs developer"),
        "{}",
        refused.stderr
    );

    // No token, a wrong token: 401 with what to do.
    let anonymous = shipinator(
        work.path(),
        &[],
        &["runs", "list", "--server", &server.base],
    );
    assert_eq!(anonymous.code, Some(2));
    assert!(
        anonymous.stderr.contains("pass a token with --token"),
        "{}",
        anonymous.stderr
    );
    let wrong = shipinator(
        work.path(),
        &[],
        &[
            "runs",
            "list",
            "--server",
            &server.base,
            "--token",
            "shp_nope",
        ],
    );
    assert_eq!(wrong.code, Some(2));
    assert!(wrong.stderr.contains("unknown token"), "{}", wrong.stderr);
    let missing = cli.run(&["runs", "show", "0190b3a2-7c4e-7000-8000-000000000000"]);
    assert_eq!(missing.code, Some(2));
    assert!(missing.stderr.contains("not_found"), "{}", missing.stderr);
    server.terminate();
}

#[test]
fn the_cli_explains_an_unreachable_or_missing_server() {
    let work = tempfile::tempdir().unwrap();
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let out = shipinator(
        work.path(),
        &[("SHIPINATOR_SERVER", &url)],
        &["runs", "list"],
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "cannot reach the server at {url}/v1/pipeline-runs"
        )) && out.stderr.to_lowercase().contains("connection refused"),
        "{}",
        out.stderr
    );
    let out = shipinator(work.path(), &[], &["trigger", "ci", "--commit", "abc123"]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr
            .contains("pass --server URL or set SHIPINATOR_SERVER"),
        "{}",
        out.stderr
    );
    let out = shipinator(work.path(), &[], &["runs", "list", "--server", "ftp://x"]);
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("is not an http:// or https:// URL"),
        "{}",
        out.stderr
    );
}

/// A TCP proxy in front of the server that breaks the first connection carrying a log line
/// event right after forwarding it (what a load balancer or a flaky network does), and passes
/// everything else through. It records the request heads of log-follow requests.
struct CuttingProxy {
    addr: String,
    follows: Arc<Mutex<Vec<String>>>,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl CuttingProxy {
    fn start(upstream: &str) -> CuttingProxy {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let proxy = CuttingProxy {
            addr: format!("http://{}", listener.local_addr().unwrap()),
            follows: Arc::default(),
            cut: Arc::default(),
            stop: Arc::default(),
        };
        let (follows, cut, stop) = (
            Arc::clone(&proxy.follows),
            Arc::clone(&proxy.cut),
            Arc::clone(&proxy.stop),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let server = TcpStream::connect(&upstream).unwrap();
                let (follows, cut) = (Arc::clone(&follows), Arc::clone(&cut));
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = c_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                        if head.contains("follow=true") {
                            follows.lock().unwrap().push(head);
                        }
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_write.shutdown(Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let (mut s_read, mut c_write) = (server, client);
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = s_read.read(&mut buf) {
                        if n == 0 || c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let has_line = buf[..n].windows(11).any(|w| w == b"event: line");
                        if has_line && !cut.swap(true, Ordering::SeqCst) {
                            let _ = c_write.shutdown(Shutdown::Both);
                            let _ = s_read.shutdown(Shutdown::Both);
                            break;
                        }
                    }
                    let _ = c_write.shutdown(Shutdown::Write);
                });
            }
        });
        proxy
    }
}

#[test]
fn logs_follow_resumes_with_last_event_id_after_a_dropped_connection() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let gate = work.path().join("gate");
    let slow = format!(
        "build:\n  steps:\n    - name: talk\n      run: echo first; while [ ! -e {0} ] && [ -d {1} ]; do sleep 0.1; done; echo second; echo third\n",
        gate.display(),
        work.path().display()
    );
    let (repo, commit) = repository(&[("slow.yaml", &slow)]);
    let server = Server::start(data.path(), &[]);
    let cli = Remote {
        server: &server,
        token: server.admin.clone(),
        cwd: work.path(),
    };
    let repo_id = register(&cli, "chatty", repo.path());
    let path = repo.path().join("slow.yaml");
    cli.run(&[
        "pipelines",
        "create",
        "--repo",
        &repo_id,
        "--name",
        "slow",
        "--file",
        path.to_str().unwrap(),
    ])
    .ok();
    let run = cli.run(&["trigger", "slow", "--branch", "main", "--commit", &commit]);
    let run = run.ok().stdout.trim().to_owned();

    // Follow through the proxy while the step waits for the gate.
    let proxy = CuttingProxy::start(&server.base);
    let mut follower = Command::new(env!("CARGO_BIN_EXE_shipinator"));
    follower
        .args([
            "logs",
            &run,
            "--step",
            "talk",
            "-f",
            "--server",
            &proxy.addr,
            "--token",
        ])
        .arg(&server.admin)
        .current_dir(work.path())
        .env_remove("SHIPINATOR_SERVER")
        .env_remove("SHIPINATOR_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut follower = Running(follower.spawn().unwrap());
    let deadline = Instant::now() + CLI_BOUND;
    while !proxy.cut.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the follower never received a line"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&gate, "").unwrap();
    let status = loop {
        if let Some(status) = follower.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the follower did not end with the step"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    follower
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let mut stderr = String::new();
    follower
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");

    // Every line exactly once, in order: what reading the finished log prints.
    let read = cli.run(&["logs", &run, "--step", "talk"]);
    assert_eq!(stdout, read.ok().stdout);
    for word in ["first", "second", "third"] {
        assert_eq!(
            stdout.matches(&format!("] {word}\n")).count(),
            1,
            "{stdout}"
        );
    }
    let follows = proxy.follows.lock().unwrap().clone();
    assert!(follows.len() >= 2, "the follower reconnected: {follows:?}");
    assert!(
        !follows[0].to_lowercase().contains("last-event-id"),
        "{}",
        follows[0]
    );
    assert!(
        follows[1].to_lowercase().contains("last-event-id: "),
        "{}",
        follows[1]
    );
    drop(proxy);
    server.terminate();
}

#[test]
fn logs_follow_rides_out_a_server_restart() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let gate = work.path().join("gate");
    let slow = format!(
        "build:\n  steps:\n    - name: talk\n      run: echo first; while [ ! -e {0} ] && [ -d {1} ]; do sleep 0.1; done; echo second\n",
        gate.display(),
        work.path().display()
    );
    let (repo, commit) = repository(&[("slow.yaml", &slow)]);
    let server = Server::start(data.path(), &[]);
    let base = server.base.clone();
    let admin = server.admin.clone();
    let cli = Remote {
        server: &server,
        token: admin.clone(),
        cwd: work.path(),
    };
    let repo_id = register(&cli, "restarts", repo.path());
    let path = repo.path().join("slow.yaml");
    cli.run(&[
        "pipelines",
        "create",
        "--repo",
        &repo_id,
        "--name",
        "slow",
        "--file",
        path.to_str().unwrap(),
    ])
    .ok();
    let run = cli.run(&["trigger", "slow", "--branch", "main", "--commit", &commit]);
    let run = run.ok().stdout.trim().to_owned();

    let mut follower = Command::new(env!("CARGO_BIN_EXE_shipinator"));
    follower
        .args([
            "logs", &run, "--step", "talk", "-f", "--server", &base, "--token", &admin,
        ])
        .current_dir(work.path())
        .env_remove("SHIPINATOR_SERVER")
        .env_remove("SHIPINATOR_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut follower = Running(follower.spawn().unwrap());
    let stdout = follower.0.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.ends_with("] first")) {
        seen.push(
            lines
                .recv_timeout(CLI_BOUND)
                .expect("the follower printed the first line"),
        );
    }

    // SIGKILL the server mid-step, open the gate, start it again on the same address.
    drop(cli);
    drop(server);
    std::fs::write(&gate, "").unwrap();
    let listen = base.trim_start_matches("http://");
    let server = Server::start_on(data.path(), listen, &[]);
    assert_eq!(server.base, base);

    let deadline = Instant::now() + CLI_BOUND;
    let status = loop {
        if let Some(status) = follower.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the follower did not end with the step"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    reader.join().unwrap();
    seen.extend(lines.try_iter());
    let mut stderr = String::new();
    follower
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{seen:?}\n{stderr}");

    // It ends with the whole log of the attempt that finished, each line once.
    let cli = Remote {
        server: &server,
        token: admin.clone(),
        cwd: work.path(),
    };
    let shown = cli
        .run(&["runs", "show", &run, "--output", "json"])
        .ok()
        .json();
    assert_eq!(shown["run"]["status"], "success", "{shown}");
    let final_log = cli.run(&["logs", &run, "--step", "talk"]);
    let final_lines: Vec<&str> = final_log.ok().stdout.lines().collect();
    assert!(
        seen.ends_with(
            &final_lines
                .iter()
                .map(|l| (*l).to_owned())
                .collect::<Vec<_>>()
        ),
        "{seen:?}\n{final_lines:?}"
    );
    assert_eq!(
        seen.iter().filter(|l| l.ends_with("] second")).count(),
        1,
        "{seen:?}"
    );
    // The local executor reports a step of a killed server lost and runs it again.
    assert_eq!(shown["steps"][0]["attempt"], 2, "{shown}");
    assert!(
        stderr.contains("build/talk: attempt 2 (attempt 1 was lost)"),
        "{stderr}"
    );
    server.terminate();
}
