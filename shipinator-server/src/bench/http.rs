//! `shipinator bench http --store sqlite|postgres [--database URL]`: the reference server
//! under `wrk -t1 -c4 -d15s --latency`, in one sitting: `/healthz` (no token, no store) and
//! `GET /v1/pipeline-runs/{id}` of a finished run with a viewer token. Runs `serve` as a child
//! of this binary, seeds the finished run through the engine on the same store first, and
//! reports requests per second for both, their ratio, the status read's p50 and p99 latency
//! and the server's idle resident memory. Prints one JSON line. The seeded run has ended, so the
//! server answers it from its cache of finished runs unless `--finished-run-cache 0`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use shipinator_core::config;
use shipinator_core::domain::{ApiTokenId, JobType, RunId, RunStatus, TokenRole, Trigger};
use shipinator_core::driver::Driver;
use shipinator_core::executor::SourceSpec;
use shipinator_core::orchestrator::RunRequest;
use shipinator_core::store::{ApiToken, ProjectScope, Store};
use shipinator_core::time::Timestamp;
use shipinator_local::{DataDir, LocalExecutor};
use shipinator_nfs::{FsLogStore, NfsArtifactStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{BenchStore, HttpArgs};
use crate::local::ensure_pipeline;
use crate::server::auth::{hash_token, new_api_token};

/// The seeded run: one build step.
const PIPELINE: &str = "build:\n  steps:\n    - name: compile\n      run: 'true'\n";

pub(crate) async fn run(args: &HttpArgs) -> anyhow::Result<serde_json::Value> {
    if args.duration == 0 || args.connections == 0 {
        bail!("--duration and --connections must be at least 1");
    }
    let wrk = which("wrk").context(
        "wrk is not installed: `apt-get install -y wrk` (Debian package wrk) and run again",
    )?;
    let scratch = Scratch::new()?;
    let data = DataDir::new(scratch.0.join("data"));
    data.create_all()
        .with_context(|| format!("creating {}", data.root().display()))?;
    let (database, env_url) = match args.store.store {
        BenchStore::Memory => {
            bail!("bench http runs the server on --store sqlite or --store postgres --database URL")
        }
        BenchStore::Sqlite => {
            let path = args
                .store
                .database
                .as_ref()
                .map_or_else(|| data.state_db(), PathBuf::from);
            (path.display().to_string(), None)
        }
        BenchStore::Postgres => {
            let url = args
                .store
                .database
                .clone()
                .context("--store postgres needs --database URL")?;
            (url.clone(), Some(url))
        }
    };

    let (run_id, token) = seed(&data, &database, env_url.is_some()).await?;

    let mut server = ServerChild::start(data.root(), env_url.as_deref(), args.finished_run_cache)?;
    let addr = server.addr.clone();
    let status_path = format!("/v1/pipeline-runs/{run_id}");
    // One request each: the server is up, the token reads the run, and the pool is warm.
    for _ in 0..3 {
        let (code, body) = get(&addr, &status_path, Some(&token)).await?;
        if code != 200 {
            bail!("GET {status_path} answered {code}: {body}");
        }
        let (code, body) = get(&addr, "/healthz", None).await?;
        if code != 200 {
            bail!("GET /healthz answered {code}: {body}");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = rss_bytes(server.child.id())?;

    let health = wrk_run(&wrk, args, &format!("http://{addr}/healthz"), None)?;
    let status = wrk_run(
        &wrk,
        args,
        &format!("http://{addr}{status_path}"),
        Some(&token),
    )?;
    let loaded_rss = rss_bytes(server.child.id())?;
    server.stop();

    Ok(serde_json::json!({
        "bench": "http",
        "store": if env_url.is_some() { "postgres" } else { "sqlite" },
        "wrk": format!("-t1 -c{} -d{}s --latency", args.connections, args.duration),
        "finished_run_cache": args.finished_run_cache.map_or_else(
            || serde_json::Value::from("default"),
            serde_json::Value::from,
        ),
        "healthz_rps": round(health.rps),
        "status_rps": round(status.rps),
        "ratio": round(status.rps / health.rps),
        "status_p50_ms": round(status.p50_ms),
        "status_p99_ms": round(status.p99_ms),
        "healthz_p50_ms": round(health.p50_ms),
        "idle_rss_mib": round(idle_rss as f64 / 1_048_576.0),
        "loaded_rss_mib": round(loaded_rss as f64 / 1_048_576.0),
    }))
}

/// Runs one finished pipeline run through the engine on the store the server will use, and
/// stores a viewer token; returns the run and the token.
async fn seed(data: &DataDir, database: &str, postgres: bool) -> anyhow::Result<(RunId, String)> {
    let store: Arc<dyn Store> = if postgres {
        Arc::new(
            shipinator_postgres::PgStore::connect(database)
                .await
                .context("connecting to PostgreSQL")?,
        )
    } else {
        Arc::new(
            shipinator_sqlite::SqliteStore::open(Path::new(database))
                .await
                .with_context(|| format!("opening SQLite database {database}"))?,
        )
    };
    let source = data.root().join("bench-source");
    std::fs::create_dir_all(&source)?;
    let artifacts = Arc::new(NfsArtifactStore::new(data.artifacts())?);
    let logs = Arc::new(FsLogStore::new(data.root())?);
    let executor = LocalExecutor::builder(data.root())
        .artifact_store(artifacts)
        .log_store(logs)
        .build()
        .context("starting the local executor")?;
    let spec = Arc::new(
        config::parse(config::FILE_NAME, PIPELINE)
            .map_err(|e| anyhow::anyhow!("the benchmark pipeline is invalid: {e}"))?,
    );
    let (project, pipeline) = ensure_pipeline(
        store.as_ref(),
        &format!("bench-http-{}", RunId::new_v7()),
        &source.display().to_string(),
        "main",
        config::FILE_NAME,
        PIPELINE,
    )
    .await?;
    let handle = Driver::new(
        Arc::clone(&store),
        Arc::new(executor),
        crate::cli::run::driver_config(),
    )
    .spawn();
    let id = handle
        .submit_run(RunRequest {
            pipeline_id: pipeline.id,
            pipeline_name: pipeline.name.clone(),
            project_name: project.name.clone(),
            spec,
            source: SourceSpec {
                clone_url: source.display().to_string(),
                commit: String::new(),
                git_ref: "main".to_owned(),
                copy_working_tree: true,
            },
            branch: "main".to_owned(),
            default_branch: "main".to_owned(),
            trigger: Trigger::Manual,
            stages: Some(vec![JobType::Build]),
            requested_by: "bench".to_owned(),
        })
        .await?;
    let mut finished = None;
    for _ in 0..600 {
        let run = store.get_run(id).await?;
        if run.status.is_terminal() {
            finished = Some(run.status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle.shutdown().await.ok();
    match finished {
        Some(RunStatus::Success) => {}
        Some(other) => bail!("the seeded run ended {other}, expected success"),
        None => bail!("the seeded run did not finish within 30 s"),
    }
    let secret = new_api_token()?;
    store
        .create_api_token(&ApiToken {
            id: ApiTokenId::new_v7(),
            name: format!("bench-viewer-{id}"),
            role: TokenRole::Viewer,
            scope: ProjectScope::All,
            secret_sha256: hash_token(&secret),
            created_at: Timestamp::now(),
            last_used_at: None,
            revoked_at: None,
        })
        .await?;
    Ok((id, secret))
}

/// `shipinator serve` as a child of this binary; killed when dropped.
struct ServerChild {
    child: Child,
    addr: String,
}

impl ServerChild {
    fn start(
        data_dir: &Path,
        database_url: Option<&str>,
        finished_run_cache: Option<usize>,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut cmd = Command::new(exe);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env_remove("SHIPINATOR_DATA_DIR")
            .env_remove("SHIPINATOR_DATABASE__URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(url) = database_url {
            cmd.env("SHIPINATOR_DATABASE__URL", url);
        }
        match finished_run_cache {
            Some(n) => cmd.env("SHIPINATOR_LIMITS__FINISHED_RUN_CACHE", n.to_string()),
            None => cmd.env_remove("SHIPINATOR_LIMITS__FINISHED_RUN_CACHE"),
        };
        let mut child = cmd.spawn().context("starting shipinator serve")?;
        let stdout = child
            .stdout
            .take()
            .context("the server's standard output")?;
        let mut server = Self {
            child,
            addr: String::new(),
        };
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading the server's output")?;
            if let Some(addr) = line.strip_prefix("listening on http://") {
                addr.clone_into(&mut server.addr);
                break;
            }
        }
        if server.addr.is_empty() {
            bail!("shipinator serve exited before listening (its errors are above)");
        }
        Ok(server)
    }

    /// SIGTERM, then a bounded wait; SIGKILL after that.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..200 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One `GET` over a fresh connection: the status code and the body's text.
async fn get(addr: &str, path: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .with_context(|| format!("GET {path} took more than 10 s"))??;
    let text = String::from_utf8_lossy(&response).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {path}: not an HTTP response: {text}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or_else(String::new, |(_, b)| b.to_owned());
    Ok((code, body))
}

/// What one wrk run measured.
#[derive(Debug)]
struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn wrk_run(
    wrk: &Path,
    args: &HttpArgs,
    url: &str,
    token: Option<&str>,
) -> anyhow::Result<WrkResult> {
    let mut cmd = Command::new(wrk);
    cmd.args([
        "-t1".to_owned(),
        format!("-c{}", args.connections),
        format!("-d{}s", args.duration),
        "--latency".to_owned(),
    ]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd
        .arg(url)
        .output()
        .with_context(|| format!("running {}", wrk.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("reading wrk's report for {url}:\n{text}"))
}

/// Requests/sec and the 50% and 99% latencies of a `wrk --latency` report; a report with
/// errors or non-2xx answers is refused.
fn parse_wrk(text: &str) -> anyhow::Result<WrkResult> {
    if let Some(line) = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        bail!("the load had failures: {}", line.trim());
    }
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(v)) => rps = v.parse::<f64>().ok(),
            (Some("50%"), Some(v)) => p50 = Some(duration_ms(v)?),
            (Some("99%"), Some(v)) => p99 = Some(duration_ms(v)?),
            _ => {}
        }
    }
    Ok(WrkResult {
        rps: rps.context("no Requests/sec line")?,
        p50_ms: p50.context("no 50% latency line (was --latency given?)")?,
        p99_ms: p99.context("no 99% latency line")?,
    })
}

/// wrk's `106.00us`, `1.23ms`, `2.00s`, `1.5m` in milliseconds.
fn duration_ms(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in wrk duration '{text}'"))?;
    let (number, unit) = text.split_at(split);
    let n: f64 = number
        .parse()
        .with_context(|| format!("wrk duration '{text}'"))?;
    Ok(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        other => bail!("unknown unit '{other}' in wrk duration '{text}'"),
    })
}

/// `VmRSS` of process `pid` in bytes.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))?;
    Ok(kib * 1024)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "shipinator-bench-http-{}-{}",
            std::process::id(),
            RunId::new_v7()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "Running 15s test @ http://127.0.0.1:1/healthz
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   128.61us  212.01us  10.31ms   98.71%
    Req/Sec    31.98k     2.26k   35.18k    80.67%
  Latency Distribution
     50%  106.00us
     75%  123.00us
     90%  148.00us
     99%    1.02ms
  477312 requests in 15.00s, 60.55MB read
Requests/sec:  31820.32
Transfer/sec:      4.04MB
";

    #[test]
    fn wrk_reports_are_read() {
        let r = parse_wrk(REPORT).expect("parses");
        assert!((r.rps - 31820.32).abs() < 1e-6);
        assert!((r.p50_ms - 0.106).abs() < 1e-9);
        assert!((r.p99_ms - 1.02).abs() < 1e-9);
        let failed = REPORT.replace(
            "Requests/sec",
            "  Non-2xx or 3xx responses: 12\nRequests/sec",
        );
        assert!(parse_wrk(&failed).is_err());
        assert!(parse_wrk("Requests/sec: 1\n").is_err());
        assert!(duration_ms("3x").is_err());
    }
}
