//! `runs`, `logs` and `artifacts` against a server (`--server URL`), and what the server-only
//! commands share: the server flags, the runtime, error printing and tables.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use comfy_table::{Cell, CellAlignment, ContentArrangement, Table};
use shipinator_core::domain::{ArtifactId, JobId, JobType, RunId, RunStatus, StepId};
use shipinator_core::time::Timestamp;

use super::inspect::{ArtifactsCommand, LogsArgs, RunsCommand};
use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, OutputFormat};
use crate::client::{Client, ClientError, RunListFilter};
use crate::server::dto::{ArtifactDto, JobDto, RunDto, StepDto};

/// How often a waiting command looks at a run again.
pub(crate) const POLL: Duration = Duration::from_millis(300);

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct RemoteArgs {
    /// The Shipinator server (e.g. http://127.0.0.1:8080). Without it, `runs`, `logs` and
    /// `artifacts` read the local data directory.
    #[arg(long, env = "SHIPINATOR_SERVER", value_name = "URL", global = true)]
    pub(crate) server: Option<String>,
    /// API token for the server (`shipinator tokens create`).
    #[arg(
        long,
        env = "SHIPINATOR_TOKEN",
        value_name = "TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub(crate) token: Option<String>,
}

impl RemoteArgs {
    /// A client when a server was named (an empty value counts as none).
    pub(crate) fn client(&self) -> Result<Option<Client>, ClientError> {
        match self.server.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(url) => Client::new(url, self.token.as_deref()).map(Some),
        }
    }

    /// A client; commands that only exist against a server say so when none was named.
    pub(crate) fn require(&self, command: &str) -> Result<Client, ClientError> {
        self.client()?.ok_or_else(|| {
            ClientError::Lookup(format!(
                "`shipinator {command}` talks to a server: pass --server URL or set SHIPINATOR_SERVER"
            ))
        })
    }
}

/// Runs `fut` on a fresh runtime; prints an error (with located details) and returns its
/// exit code.
pub(crate) fn block_on(fut: impl Future<Output = Result<u8, ClientError>>) -> u8 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return EXIT_USAGE;
        }
    };
    match runtime.block_on(fut) {
        Ok(code) => code,
        Err(e) => {
            report(&e, None);
            e.exit_code()
        }
    }
}

/// Prints an error; `invalid_config` details as `FILE:LINE:COLUMN: message` lines.
pub(crate) fn report(e: &ClientError, file: Option<&str>) {
    eprintln!("error: {e}");
    if let ClientError::Api { details, .. } = e {
        for d in details {
            let line = d["line"].as_u64().unwrap_or(0);
            let column = d["column"].as_u64().unwrap_or(0);
            let message = d["message"].as_str().unwrap_or_default();
            let code = d["code"].as_str().unwrap_or_default();
            eprintln!(
                "  {}:{line}:{column}: {message} [{code}]",
                file.unwrap_or(".shipinator.yaml")
            );
        }
    }
}

/// Prints `value` as one JSON document.
pub(crate) fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("error: cannot encode the output as JSON: {e}"),
    }
}

/// A table for people.
pub(crate) fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut t = Table::new();
    t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header);
    t
}

/// `3.2s`, `1m04s` between two RFC 3339 times.
pub(crate) fn took(start: Option<&str>, end: Option<&str>) -> Option<String> {
    let start = Timestamp::parse_rfc3339(start?).ok()?;
    let end = Timestamp::parse_rfc3339(end?).ok()?;
    Some(super::run::fmt_duration(
        end.saturating_duration_since(start),
    ))
}

/// `stage/name` labels of a run's steps, in execution order (stage, then order).
pub(crate) fn ordered_steps<'a>(
    jobs: &[JobDto],
    steps: &'a [StepDto],
) -> Vec<(String, &'a StepDto)> {
    let stage_of: HashMap<JobId, JobType> = jobs.iter().map(|j| (j.id, j.job_type)).collect();
    let rank = |s: &StepDto| {
        stage_of
            .get(&s.job_id)
            .and_then(|t| JobType::ORDER.iter().position(|o| o == t))
            .unwrap_or(usize::MAX)
    };
    let mut out: Vec<_> = steps
        .iter()
        .map(|s| {
            let stage = stage_of.get(&s.job_id).map_or("?", |t| t.as_str());
            (format!("{stage}/{}", s.name), s)
        })
        .collect();
    out.sort_by_key(|(_, s)| (rank(s), s.execution_order));
    out
}

pub(crate) fn runs(client: Client, cmd: RunsCommand) -> u8 {
    block_on(async move {
        match cmd {
            RunsCommand::List {
                status,
                branch,
                pipeline,
                limit,
                output,
            } => {
                let pipeline = match pipeline {
                    Some(p) => Some(client.find_pipeline(&p).await?.id),
                    None => None,
                };
                let filter = RunListFilter {
                    pipeline,
                    status: status.map(|s| s.as_str().to_owned()),
                    branch,
                };
                let runs = client.list_runs(&filter, limit as usize).await?;
                if output == OutputFormat::Json {
                    print_json(&serde_json::json!({ "runs": runs }));
                    return Ok(EXIT_OK);
                }
                let mut t = table([
                    "RUN", "STATUS", "PHASE", "TRIGGER", "REF", "COMMIT", "CREATED",
                ]);
                for r in &runs {
                    t.add_row(vec![
                        r.id.to_string(),
                        r.status.to_string(),
                        r.phase.to_string(),
                        r.trigger.to_string(),
                        r.git_ref.clone(),
                        r.commit.chars().take(12).collect(),
                        r.created_at.clone(),
                    ]);
                }
                println!("{t}");
                Ok(EXIT_OK)
            }
            RunsCommand::Show { run, output } => {
                show(&client, run, output).await?;
                Ok(EXIT_OK)
            }
            RunsCommand::Cancel { run, output } => cancel(&client, run, output).await,
            RunsCommand::Retry { run, output } => {
                let new = client.retry_run(run).await?;
                eprintln!("run {} retries {run}", new.id);
                let human = output == OutputFormat::Human;
                let done = super::trigger::follow_run(&client, new.id, human).await?;
                if output == OutputFormat::Json {
                    print_json(&done);
                }
                Ok(super::trigger::exit_for(done.status))
            }
        }
    })
}

/// Prints a run with its jobs, steps and artifacts.
async fn show(client: &Client, run: RunId, output: OutputFormat) -> Result<RunDto, ClientError> {
    let dto = client.get_run(run).await?;
    let jobs = client.run_jobs(run).await?;
    let steps = client.run_steps(run).await?;
    let artifacts = client.run_artifacts(run).await?;
    if output == OutputFormat::Json {
        print_json(&serde_json::json!({
            "run": dto, "jobs": jobs, "steps": steps, "artifacts": artifacts,
        }));
        return Ok(dto);
    }
    let mut t = table(["STEP", "STATUS", "ATTEMPT", "EXIT", "TIME"]);
    for (label, s) in ordered_steps(&jobs, &steps) {
        let exit = s
            .executions
            .iter()
            .max_by_key(|e| e.attempt)
            .and_then(|e| e.exit_code)
            .map_or_else(|| "-".to_owned(), |c| c.to_string());
        t.add_row(vec![
            Cell::new(label),
            Cell::new(s.status),
            Cell::new(s.attempt).set_alignment(CellAlignment::Right),
            Cell::new(exit).set_alignment(CellAlignment::Right),
            Cell::new(
                took(s.started_at.as_deref(), s.finished_at.as_deref())
                    .unwrap_or_else(|| "-".to_owned()),
            )
            .set_alignment(CellAlignment::Right),
        ]);
    }
    println!("{t}");
    if !artifacts.is_empty() {
        println!("{}", artifact_table(&artifacts));
    }
    let time = took(dto.started_at.as_deref(), dto.finished_at.as_deref())
        .map(|t| format!(" in {t}"))
        .unwrap_or_default();
    let retry = dto
        .retry_of
        .map(|r| format!(", retry of {r}"))
        .unwrap_or_default();
    println!(
        "run {} {} (phase {}, {} {} at {}){time}{retry}",
        dto.id,
        dto.status,
        dto.phase,
        dto.trigger,
        dto.git_ref,
        dto.commit.chars().take(12).collect::<String>()
    );
    Ok(dto)
}

fn artifact_table(artifacts: &[ArtifactDto]) -> Table {
    let mut t = table(["ARTIFACT", "TYPE", "PATH", "SIZE", "SHA256"]);
    for a in artifacts {
        let path = a.path.clone().or(a.name.clone()).unwrap_or_default();
        let sum = a
            .checksum
            .as_deref()
            .unwrap_or("-")
            .trim_start_matches("sha256:")
            .to_owned();
        t.add_row(vec![
            Cell::new(a.id),
            Cell::new(a.artifact_type),
            Cell::new(path),
            Cell::new(a.size).set_alignment(CellAlignment::Right),
            Cell::new(sum),
        ]);
    }
    t
}

/// Asks the server to cancel a run and waits until it is recorded terminal.
async fn cancel(client: &Client, run: RunId, output: OutputFormat) -> Result<u8, ClientError> {
    match client.cancel_run(run).await {
        Ok(_) => {}
        Err(e) if e.status() == Some(reqwest::StatusCode::CONFLICT) => {
            let now = client.get_run(run).await?;
            eprintln!("run {run} already ended {}", now.status);
            if output == OutputFormat::Json {
                print_json(&now);
            }
            return Ok(if now.status == RunStatus::Canceled {
                EXIT_OK
            } else {
                EXIT_FAILED
            });
        }
        Err(e) => return Err(e),
    }
    eprintln!("cancellation of run {run} requested; waiting for it to stop");
    let done = loop {
        let now = client.get_run(run).await?;
        if now.status.is_terminal() {
            break now;
        }
        tokio::time::sleep(POLL).await;
    };
    match output {
        OutputFormat::Json => print_json(&done),
        OutputFormat::Human => println!("run {run} {}", done.status),
    }
    Ok(if done.status == RunStatus::Canceled {
        EXIT_OK
    } else {
        eprintln!(
            "run {run} ended {} before it could be cancelled",
            done.status
        );
        EXIT_FAILED
    })
}

pub(crate) fn logs(client: Client, args: LogsArgs) -> u8 {
    block_on(async move {
        let jobs = client.run_jobs(args.run).await?;
        let steps = client.run_steps(args.run).await?;
        let ordered = ordered_steps(&jobs, &steps);
        let chosen: Vec<_> = ordered
            .iter()
            .filter(|(label, s)| match &args.step {
                Some(want) => want == label || *want == s.name,
                None => true,
            })
            .collect();
        if chosen.is_empty() {
            let names: Vec<_> = ordered.iter().map(|(l, _)| l.as_str()).collect();
            return Err(ClientError::Lookup(format!(
                "run {} has no step '{}' (steps: {})",
                args.run,
                args.step.unwrap_or_default(),
                names.join(", ")
            )));
        }
        for (label, step) in chosen {
            if args.follow {
                follow_step(&client, args.run, step.id, label).await?;
                continue;
            }
            if step.executions.is_empty() {
                continue; // never started
            }
            let mut from = 0;
            loop {
                let page = client.step_log_page(args.run, step.id, from).await?;
                if page.lines.is_empty() {
                    break;
                }
                for line in &page.lines {
                    println!("[{label}] {}", line.text);
                }
                from = page.next_seq;
            }
        }
        Ok(EXIT_OK)
    })
}

/// Prints a step's log as it grows until the step ends: waits for it to start, follows each
/// attempt's log in turn (a lost execution is retried as a new attempt, whose log starts
/// afresh), and rides out a server restart.
async fn follow_step(
    client: &Client,
    run: RunId,
    step: StepId,
    label: &str,
) -> Result<(), ClientError> {
    let mut followed = 0u32;
    let mut failures = 0u32;
    loop {
        let current = match client.run_steps(run).await {
            Ok(steps) => {
                failures = 0;
                steps.into_iter().find(|s| s.id == step).ok_or_else(|| {
                    ClientError::Lookup(format!("run {run} no longer has step {step}"))
                })?
            }
            Err(e) if retryable(&e) && failures < MAX_POLL_FAILURES => {
                failures += 1;
                tokio::time::sleep(POLL * 3).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if current.attempt > followed {
            if followed > 0 {
                eprintln!(
                    "{label}: attempt {} (attempt {followed} was lost)",
                    current.attempt
                );
            }
            followed = current.attempt;
            client
                .follow_step_log(run, step, Some(followed), |line| {
                    println!("[{label}] {}", line.text);
                })
                .await?;
            continue;
        }
        if current.status.is_terminal() {
            return Ok(());
        }
        // Not started yet, or its log ended just before the step was recorded ended.
        tokio::time::sleep(POLL).await;
    }
}

/// Consecutive failed polls (about a second apart) after which waiting gives up.
pub(crate) const MAX_POLL_FAILURES: u32 = 60;

/// Errors worth another try while waiting: the server is restarting or briefly overloaded.
pub(crate) fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Unreachable { .. } | ClientError::Timeout { .. } => true,
        ClientError::Api { status, .. } => status.is_server_error(),
        _ => false,
    }
}

pub(crate) fn artifacts(client: Client, cmd: ArtifactsCommand) -> u8 {
    block_on(async move {
        match cmd {
            ArtifactsCommand::List { run, output } => {
                let Some(run) = run else {
                    return Err(ClientError::Lookup(
                        "with --server, name the run: `shipinator artifacts list RUN`".to_owned(),
                    ));
                };
                let items = client.run_artifacts(run).await?;
                match output {
                    OutputFormat::Json => print_json(&serde_json::json!({ "artifacts": items })),
                    OutputFormat::Human => println!("{}", artifact_table(&items)),
                }
                Ok(EXIT_OK)
            }
            ArtifactsCommand::Download { artifact, output } => {
                download(&client, artifact, output).await
            }
            ArtifactsCommand::Prune { .. } => Err(ClientError::Lookup(
                "`artifacts prune` works on the server's own data directory: run it there, \
                 without --server"
                    .to_owned(),
            )),
        }
    })
}

async fn download(
    client: &Client,
    artifact: ArtifactId,
    output: Option<PathBuf>,
) -> Result<u8, ClientError> {
    let meta = client.artifact_metadata(artifact).await?;
    let target = output.unwrap_or_else(|| {
        let name = meta
            .path
            .as_deref()
            .or(meta.name.as_deref())
            .and_then(|p| p.rsplit('/').next())
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
            .map_or_else(|| artifact.to_string(), str::to_owned);
        PathBuf::from(name)
    });
    let done = client.download_artifact(&meta, &target).await?;
    eprintln!(
        "{} ({} bytes, {})",
        done.path.display(),
        done.size,
        done.checksum
    );
    Ok(EXIT_OK)
}
