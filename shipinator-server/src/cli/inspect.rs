//! Inspecting what ran, from the local data directory: `runs`, `logs` and `artifacts`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures_util::StreamExt as _;
use shipinator_core::artifact::GetOptions;
use shipinator_core::domain::{ArtifactId, JobType, RunId, RunStatus};
use shipinator_core::driver::{Driver, DriverConfig};
use shipinator_core::store::{PageRequest, RunFilter};
use shipinator_core::time::Timestamp;
use shipinator_local::{DataDir, RunControl};
use shipinator_nfs::{PrunePolicy, prune};
use tokio::io::AsyncWriteExt as _;

use super::remote::RemoteArgs;
use super::run::{print_summary, record_json};
use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, OutputFormat};
use crate::local::LocalStack;

/// The data directory flag shared by the inspection commands.
#[derive(Debug, Clone, Args)]
pub(crate) struct DataDirArg {
    /// Where state, artifacts and logs live.
    #[arg(long, env = "SHIPINATOR_DATA_DIR", default_value = DataDir::DEFAULT_ROOT, global = true)]
    pub(crate) data_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RunsCommand {
    /// List runs, newest first.
    List {
        /// Only runs with this status.
        #[arg(long)]
        status: Option<RunStatus>,
        /// Only runs of this branch.
        #[arg(long)]
        branch: Option<String>,
        /// Only runs of this pipeline (its id; with --server also its name).
        #[arg(long)]
        pipeline: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Show a run with its steps and artifacts.
    Show {
        /// The run.
        run: RunId,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Cancel a run: the process driving it stops its running steps and records it canceled
    /// (a run no process drives any more is cancelled by this command itself).
    Cancel {
        /// The run.
        run: RunId,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Retry a failed or cancelled run from its failed stage, reusing earlier stages' artifacts.
    Retry {
        /// The run.
        run: RunId,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

/// Arguments of `shipinator logs`.
#[derive(Debug, Args)]
pub(crate) struct LogsArgs {
    /// The run.
    pub(crate) run: RunId,
    /// Only this step (`name` or `stage/name`).
    #[arg(long)]
    pub(crate) step: Option<String>,
    /// Keep printing lines as they arrive until the step ends.
    #[arg(short, long)]
    pub(crate) follow: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ArtifactsCommand {
    /// List artifacts, of one run or of all runs.
    List {
        /// Only this run's artifacts.
        run: Option<RunId>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Write an artifact's payload to a file, verifying its sha256.
    Download {
        /// The artifact.
        artifact: ArtifactId,
        /// Where to write it (default: the artifact's file name in the current directory).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Delete artifact payloads by age and count per pipeline, keeping those live runs need.
    Prune {
        /// Delete artifacts older than this (e.g. `30d`, `12h`).
        #[arg(long, value_parser = parse_age)]
        older_than: Option<Duration>,
        /// Keep the artifacts of the newest N runs of each pipeline.
        #[arg(long)]
        keep_last: Option<u32>,
        /// Only print what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

fn parse_age(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a duration such as 30d, 12h or 90m"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => {
            return Err(format!(
                "'{text}': use a unit of s, m, h, d or w (e.g. 30d)"
            ));
        }
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

fn block_on(fut: impl std::future::Future<Output = anyhow::Result<u8>>) -> u8 {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => match rt.block_on(fut) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                EXIT_USAGE
            }
        },
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            EXIT_USAGE
        }
    }
}

/// With a server, the command's client; `Err` carries the exit code of a bad `--server`.
fn remote_client(remote: &RemoteArgs) -> Result<Option<crate::client::Client>, u8> {
    remote.client().map_err(|e| {
        super::remote::report(&e, None);
        e.exit_code()
    })
}

pub(crate) fn runs(data: &DataDirArg, remote: &RemoteArgs, cmd: RunsCommand) -> u8 {
    match remote_client(remote) {
        Ok(Some(client)) => return super::remote::runs(client, cmd),
        Ok(None) => {}
        Err(code) => return code,
    }
    block_on(async move {
        let stack = LocalStack::open(DataDir::new(&data.data_dir)).await?;
        match cmd {
            RunsCommand::List {
                status,
                branch,
                pipeline,
                limit,
                output,
            } => {
                let pipeline_id = match pipeline {
                    Some(p) => Some(p.parse().map_err(|e| {
                        anyhow::anyhow!("--pipeline '{p}' is not a pipeline id: {e}")
                    })?),
                    None => None,
                };
                let filter = RunFilter {
                    status,
                    git_ref: branch,
                    pipeline_id,
                    ..RunFilter::default()
                };
                let page = stack
                    .store
                    .list_runs(&filter, &PageRequest::first(limit))
                    .await?;
                if output == OutputFormat::Json {
                    println!("{}", serde_json::json!({ "runs": page.items }));
                    return Ok(EXIT_OK);
                }
                println!(
                    "{:<36}  {:<8} {:<9} {:<7} {:<20} CREATED",
                    "RUN", "STATUS", "PHASE", "TRIGGER", "REF"
                );
                for r in &page.items {
                    println!(
                        "{:<36}  {:<8} {:<9} {:<7} {:<20} {}",
                        r.id,
                        r.status.as_str(),
                        r.phase.as_str(),
                        r.trigger.as_str(),
                        r.git_ref,
                        r.created_at
                    );
                }
                Ok(EXIT_OK)
            }
            RunsCommand::Show { run, output } => {
                let record = stack.store.load_run(run).await?;
                match output {
                    OutputFormat::Json => println!("{}", record_json(&record)),
                    OutputFormat::Human => print_summary(&record),
                }
                Ok(EXIT_OK)
            }
            RunsCommand::Cancel { run, output } => cancel(&stack, run, output).await,
            RunsCommand::Retry { run, output } => {
                let executor = stack.executor(&[])?;
                let handle = Driver::new(
                    Arc::clone(&stack.store),
                    Arc::new(executor),
                    DriverConfig {
                        lease_ttl: Duration::from_secs(6),
                        ..DriverConfig::default()
                    },
                )
                .spawn();
                let id = handle
                    .retry_run(
                        run,
                        &format!("cli:{}", std::env::var("USER").unwrap_or_default()),
                    )
                    .await
                    .with_context(|| format!("retrying run {run}"))?;
                eprintln!("run {id} retries {run}");
                let finished = handle.wait_for_run(id).await?;
                let record = stack.store.load_run(id).await?;
                handle.shutdown().await.ok();
                match output {
                    OutputFormat::Json => println!("{}", record_json(&record)),
                    OutputFormat::Human => print_summary(&record),
                }
                Ok(if finished.status == RunStatus::Success {
                    EXIT_OK
                } else {
                    EXIT_FAILED
                })
            }
        }
    })
}

/// `runs cancel`: asks the process driving the run to cancel it and waits until it is
/// recorded terminal; takes the run over when no live process drives it.
async fn cancel(stack: &LocalStack, run: RunId, output: OutputFormat) -> anyhow::Result<u8> {
    let current = stack.store.get_run(run).await?;
    if current.status.is_terminal() {
        eprintln!("run {run} already ended {}", current.status);
        return Ok(if current.status == RunStatus::Canceled {
            EXIT_OK
        } else {
            EXIT_FAILED
        });
    }
    let control = RunControl::new(&stack.data);
    control
        .request_cancel(run)
        .with_context(|| format!("writing {}", control.cancel_path(run).display()))?;
    let finished = loop {
        let now = stack.store.get_run(run).await?;
        if now.status.is_terminal() {
            break now;
        }
        if let Some(driver) = control.driver(run)? {
            tracing::debug!(
                pid = driver.pid,
                "waiting for the driving process to cancel"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        // Nobody drives it (its process was killed): cancel it with an engine of our own,
        // which claims it once the dead process's lease has expired.
        eprintln!("no process drives run {run}; cancelling it here");
        let handle = Driver::new(
            Arc::clone(&stack.store),
            Arc::new(stack.executor(&[])?),
            super::run::driver_config(),
        )
        .spawn();
        handle.cancel_run(run)?;
        let done = handle.wait_for_run(run).await;
        handle.shutdown().await.ok();
        break done.with_context(|| format!("cancelling run {run}"))?;
    };
    control.clear(run);
    let record = stack.store.load_run(run).await?;
    match output {
        OutputFormat::Json => println!("{}", record_json(&record)),
        OutputFormat::Human => print_summary(&record),
    }
    Ok(if finished.status == RunStatus::Canceled {
        EXIT_OK
    } else {
        eprintln!(
            "run {run} ended {} before it could be cancelled",
            finished.status
        );
        EXIT_FAILED
    })
}

pub(crate) fn logs(data: &DataDirArg, remote: &RemoteArgs, args: LogsArgs) -> u8 {
    match remote_client(remote) {
        Ok(Some(client)) => return super::remote::logs(client, args),
        Ok(None) => {}
        Err(code) => return code,
    }
    block_on(async move {
        let stack = LocalStack::open(DataDir::new(&data.data_dir)).await?;
        let record = stack.store.load_run(args.run).await?;
        let stage_of: std::collections::HashMap<_, _> =
            record.jobs.iter().map(|j| (j.id, j.job_type)).collect();
        let mut steps: Vec<_> = record
            .steps
            .iter()
            .map(|s| {
                let stage = stage_of.get(&s.job_id).map_or("?", |t| t.as_str());
                (format!("{stage}/{}", s.name), s)
            })
            .filter(|(full, s)| match &args.step {
                Some(want) => want == full || *want == s.name,
                None => true,
            })
            .collect();
        if steps.is_empty() {
            let names: Vec<_> = record.steps.iter().map(|s| s.name.as_str()).collect();
            bail!(
                "run {} has no step '{}' (steps: {})",
                args.run,
                args.step.unwrap_or_default(),
                names.join(", ")
            );
        }
        steps.sort_by_key(|(_, s)| {
            (
                stage_rank(stage_of.get(&s.job_id).copied()),
                s.execution_order,
            )
        });
        for (label, step) in steps {
            // The latest attempt's log.
            let Some(exec) = record
                .executions
                .iter()
                .filter(|e| e.job_step_id == step.id)
                .max_by_key(|e| e.attempt)
            else {
                continue;
            };
            if args.follow {
                let mut lines = stack.logs.follow(exec.id, 0).await?;
                while let Some(line) = lines.next().await {
                    println!("[{label}] {}", line?.text);
                }
            } else {
                let mut from = 0;
                loop {
                    let lines = stack.logs.read(exec.id, from, 1000).await?;
                    let Some(last) = lines.last() else { break };
                    from = last.seq + 1;
                    for line in &lines {
                        println!("[{label}] {}", line.text);
                    }
                }
            }
        }
        Ok(EXIT_OK)
    })
}

/// Position of a stage in execution order, for sorting log output.
fn stage_rank(stage: Option<JobType>) -> usize {
    stage
        .and_then(|s| JobType::ORDER.iter().position(|o| *o == s))
        .unwrap_or(usize::MAX)
}

pub(crate) fn artifacts(data: &DataDirArg, remote: &RemoteArgs, cmd: ArtifactsCommand) -> u8 {
    match remote_client(remote) {
        Ok(Some(client)) => return super::remote::artifacts(client, cmd),
        Ok(None) => {}
        Err(code) => return code,
    }
    block_on(async move {
        let stack = LocalStack::open(DataDir::new(&data.data_dir)).await?;
        match cmd {
            ArtifactsCommand::List { run, output } => {
                let items = match run {
                    Some(run) => stack.store.list_artifacts(run).await?,
                    None => {
                        stack
                            .store
                            .list_all_artifacts(&PageRequest::first(PageRequest::MAX_LIMIT))
                            .await?
                            .items
                    }
                };
                if output == OutputFormat::Json {
                    println!("{}", serde_json::json!({ "artifacts": items }));
                    return Ok(EXIT_OK);
                }
                println!(
                    "{:<36}  {:<12} {:>10}  {:<28} SHA256",
                    "ARTIFACT", "TYPE", "SIZE", "PATH"
                );
                for a in &items {
                    let path = a.path.clone().or(a.name.clone()).unwrap_or_default();
                    let sum = a
                        .checksum
                        .as_deref()
                        .unwrap_or("-")
                        .trim_start_matches("sha256:");
                    println!(
                        "{:<36}  {:<12} {:>10}  {path:<28} {sum}",
                        a.id,
                        a.artifact_type.as_str(),
                        a.size
                    );
                }
                Ok(EXIT_OK)
            }
            ArtifactsCommand::Download { artifact, output } => {
                let meta = stack.store.get_artifact(artifact).await?;
                let target = output.unwrap_or_else(|| {
                    let name = meta
                        .path
                        .as_deref()
                        .and_then(|p| p.rsplit('/').next())
                        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
                        .map_or_else(|| artifact.to_string(), str::to_owned);
                    PathBuf::from(name)
                });
                let mut read = stack
                    .artifacts
                    .get(
                        artifact,
                        GetOptions {
                            range: None,
                            verify_checksum: true,
                        },
                    )
                    .await?;
                let partial = target.with_extension("partial");
                let mut file = tokio::fs::File::create(&partial)
                    .await
                    .with_context(|| format!("creating {}", partial.display()))?;
                let mut written = 0u64;
                while let Some(chunk) = read.body.next().await {
                    let chunk = chunk.with_context(|| format!("reading artifact {artifact}"))?;
                    written += chunk.len() as u64;
                    file.write_all(&chunk).await?;
                }
                file.sync_all().await?;
                tokio::fs::rename(&partial, &target).await?;
                eprintln!(
                    "{} ({written} bytes, {})",
                    target.display(),
                    read.stored.checksum
                );
                Ok(EXIT_OK)
            }
            ArtifactsCommand::Prune {
                older_than,
                keep_last,
                dry_run,
                output,
            } => {
                if older_than.is_none() && keep_last.is_none() {
                    bail!("say what to prune: --older-than AGE and/or --keep-last N");
                }
                let policy = PrunePolicy {
                    older_than,
                    keep_last_per_pipeline: keep_last,
                };
                let report = prune(
                    stack.store.as_ref(),
                    stack.artifacts.as_ref(),
                    &policy,
                    Timestamp::now(),
                    dry_run,
                )
                .await?;
                if output == OutputFormat::Json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "dry_run": report.dry_run,
                            "removed": report.removed.iter().map(|a| a.id).collect::<Vec<_>>(),
                            "kept_in_use": report.kept_in_use,
                            "already_gone": report.already_gone,
                            "failed": report.failed.iter().map(|(id, why)| serde_json::json!({"id": id, "error": why})).collect::<Vec<_>>(),
                            "bytes_freed": report.bytes_freed,
                        })
                    );
                } else {
                    let verb = if dry_run { "would remove" } else { "removed" };
                    for a in &report.removed {
                        println!("{verb} {} ({} bytes, run {})", a.id, a.size, a.run_id);
                    }
                    for (id, why) in &report.failed {
                        eprintln!("failed to remove {id}: {why}");
                    }
                    println!(
                        "{verb} {} artifacts, {} bytes; kept {} in use by unfinished runs",
                        report.removed.len(),
                        report.bytes_freed,
                        report.kept_in_use.len()
                    );
                }
                Ok(if report.failed.is_empty() {
                    EXIT_OK
                } else {
                    EXIT_FAILED
                })
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(parse_age("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_age("90m"), Ok(Duration::from_secs(90 * 60)));
        assert!(parse_age("30").unwrap_err().contains("unit"));
        assert!(parse_age("d").unwrap_err().contains("not a duration"));
    }
}
