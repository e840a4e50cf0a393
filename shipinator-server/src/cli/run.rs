//! `shipinator run`: the real pipeline, on this machine, with the engine the server uses —
//! SQLite state, artifacts and logs in the data directory, steps as local processes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use comfy_table::{Cell, CellAlignment, ContentArrangement, Table};
use futures_util::StreamExt as _;
use shipinator_core::config::{self, LoadError};
use shipinator_core::domain::{JobType, RunId, RunStatus, Status, StepId, Trigger};
use shipinator_core::driver::{Driver, DriverConfig, DriverHandle};
use shipinator_core::executor::SourceSpec;
use shipinator_core::orchestrator::{RunRequest, plan_stages, run_artifacts};
use shipinator_core::store::{PageRequest, RunEventKind, RunFilter, RunRecord};
use shipinator_local::worker::{BaseEnv, export_subtree};
use shipinator_local::{DataDir, RunControl};

use super::progress::{Mode, Progress, marker};
use super::{EXIT_FAILED, EXIT_OK, EXIT_USAGE, OutputFormat};
use crate::gitinfo;
use crate::local::{LocalStack, ensure_pipeline};

/// Arguments of `shipinator run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The directory holding `.shipinator.yaml`.
    #[arg(default_value = ".")]
    pub(crate) dir: PathBuf,
    /// Where state, artifacts, logs, mirrors and workspaces live.
    #[arg(long, env = "SHIPINATOR_DATA_DIR", default_value = DataDir::DEFAULT_ROOT)]
    pub(crate) data_dir: PathBuf,
    /// Stages to run, comma separated (default: build,test).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub(crate) stages: Option<Vec<StageArg>>,
    /// What the engine sees as the trigger.
    #[arg(long, value_enum, default_value = "manual")]
    pub(crate) trigger: TriggerArg,
    /// The branch the engine sees (default: the checked-out branch).
    #[arg(long)]
    pub(crate) branch: Option<String>,
    /// The commit to run (default: HEAD).
    #[arg(long)]
    pub(crate) commit: Option<String>,
    /// Run the working tree as it is, uncommitted changes included.
    #[arg(long)]
    pub(crate) dirty: bool,
    /// Continue the newest unfinished run of this data directory instead of starting one.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Hand steps this process's value of VAR (repeatable; e.g. `CARGO_TARGET_DIR`, so a build
    /// inside a step reuses the caller's cache). Steps otherwise see only PATH, HOME, their
    /// `env` and the SHIPINATOR_* variables.
    #[arg(long = "pass-env", value_name = "VAR")]
    pub(crate) pass_env: Vec<String>,
    /// Stream every log line of every step.
    #[arg(long)]
    pub(crate) logs: bool,
    /// Output format of the final record.
    #[arg(long, value_enum, default_value_t)]
    pub(crate) output: OutputFormat,
}

/// A stage on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum StageArg {
    /// Build.
    Build,
    /// Test.
    Test,
    /// Deploy.
    Deploy,
}

impl From<StageArg> for JobType {
    fn from(s: StageArg) -> Self {
        match s {
            StageArg::Build => JobType::Build,
            StageArg::Test => JobType::Test,
            StageArg::Deploy => JobType::Deploy,
        }
    }
}

/// A trigger on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum TriggerArg {
    /// A pull request.
    Pr,
    /// A push.
    Push,
    /// A manual run.
    Manual,
}

impl From<TriggerArg> for Trigger {
    fn from(t: TriggerArg) -> Self {
        match t {
            TriggerArg::Pr => Trigger::Pr,
            TriggerArg::Push => Trigger::Push,
            TriggerArg::Manual => Trigger::Manual,
        }
    }
}

/// A usage, configuration or I/O error (exit code 2, like every error `run` returns).
fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::anyhow!(msg.into())
}

pub(crate) fn run(args: &RunArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return EXIT_USAGE;
        }
    };
    match runtime.block_on(execute(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_USAGE
        }
    }
}

async fn execute(args: &RunArgs) -> anyhow::Result<u8> {
    let stack = LocalStack::open(DataDir::new(&args.data_dir)).await?;
    let executor = stack.executor(&args.pass_env)?;
    let driver_config = driver_config();

    if args.resume {
        let Some(id) = newest_unfinished(&stack).await? else {
            return Err(usage(format!(
                "no unfinished run in {} to resume",
                args.data_dir.display()
            )));
        };
        eprintln!("resuming run {id}");
        let handle =
            Driver::new(Arc::clone(&stack.store), Arc::new(executor), driver_config).spawn();
        return follow(&stack, &handle, id, args).await;
    }

    let file = args.dir.join(config::FILE_NAME);
    let spec = match config::load(&file) {
        Ok(spec) => Arc::new(spec),
        Err(LoadError::Invalid(errors)) => {
            let source = std::fs::read(&file)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            eprint!(
                "{}",
                super::validate::human_report(errors.errors(), &source)
            );
            return Ok(EXIT_USAGE);
        }
        Err(e @ LoadError::Io { .. }) => {
            return Err(usage(format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            )));
        }
    };
    let source_text = std::fs::read_to_string(&file).unwrap_or_default();
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.dir.display()))?;
    let (source, branch, repo_url) = resolve_source(&dir, &stack.data, args).await?;
    let trigger = Trigger::from(args.trigger);
    let requested: Option<Vec<JobType>> = args
        .stages
        .as_ref()
        .map(|s| s.iter().copied().map(JobType::from).collect());
    let stages = plan_stages(&spec, trigger, &branch, &branch, requested.as_deref())
        .map_err(|e| usage(e.to_string()))?;
    if stages.contains(&JobType::Deploy) {
        return Err(usage(
            "deploying needs a Kubernetes target: `shipinator run` executes on this machine only; \
             configure [kubernetes] and [targets.local] for `shipinator serve` and trigger the deploy there, \
             or run --stages build,test",
        ));
    }
    let project_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "local".to_owned());
    let (project, pipeline) = ensure_pipeline(
        stack.store.as_ref(),
        &project_name,
        &repo_url,
        &branch,
        config::FILE_NAME,
        &source_text,
    )
    .await?;
    let handle = Driver::new(Arc::clone(&stack.store), Arc::new(executor), driver_config).spawn();
    let request = RunRequest {
        pipeline_id: pipeline.id,
        pipeline_name: pipeline.name.clone(),
        project_name: project.name.clone(),
        spec,
        source,
        branch: branch.clone(),
        default_branch: branch,
        trigger,
        stages: requested,
        requested_by: requested_by(),
    };
    let id = handle
        .submit_run(request)
        .await
        .context("starting the run")?;
    follow(&stack, &handle, id, args).await
}

/// The driver tuning of a local run: short leases, so that `--resume` after a crash (or a
/// cancel of an orphaned run) takes over within seconds.
pub(crate) fn driver_config() -> DriverConfig {
    DriverConfig {
        lease_ttl: Duration::from_secs(6),
        claim_interval: Duration::from_millis(500),
        poll_interval: Duration::from_secs(2),
        ..DriverConfig::default()
    }
}

fn requested_by() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "local".to_owned())
    )
}

/// Where the worker takes the source from, the branch the engine sees, and the repository
/// URL the run is recorded under.
async fn resolve_source(
    dir: &Path,
    data: &DataDir,
    args: &RunArgs,
) -> anyhow::Result<(SourceSpec, String, String)> {
    let git = gitinfo::discover(dir).with_context(|| format!("reading {}", dir.display()))?;
    let copy = |commit: String, branch: String| {
        (
            SourceSpec {
                clone_url: dir.display().to_string(),
                commit,
                git_ref: branch.clone(),
                copy_working_tree: true,
            },
            branch,
            dir.display().to_string(),
        )
    };
    let Some(git) = git else {
        if let Some(c) = &args.commit {
            return Err(usage(format!(
                "--commit {c} needs a git repository, and {} is not in one",
                dir.display()
            )));
        }
        return Ok(copy(
            String::new(),
            args.branch.clone().unwrap_or_else(|| "local".to_owned()),
        ));
    };
    let branch = args
        .branch
        .clone()
        .or(git.branch.clone())
        .unwrap_or_else(|| "HEAD".to_owned());
    let commit = args.commit.clone().or(git.head.clone()).unwrap_or_default();
    if args.dirty {
        return Ok(copy(commit, branch));
    }
    if commit.is_empty() {
        return Err(usage(format!(
            "{} has no commit yet: commit first, or run with --dirty",
            dir.display()
        )));
    }
    let clone_url = format!("file://{}", git.toplevel.display());
    if git.toplevel != dir {
        // A pipeline in a subdirectory: the workspace root must be the directory holding
        // `.shipinator.yaml`, so the run copies that directory of the commit, exported once
        // through the repository's mirror.
        let subdir = dir
            .strip_prefix(&git.toplevel)
            .ok()
            .and_then(Path::to_str)
            .ok_or_else(|| {
                usage(format!(
                    "{} is not inside its repository {}",
                    dir.display(),
                    git.toplevel.display()
                ))
            })?;
        let export = export_subtree(data, &BaseEnv::from_process(), &clone_url, &commit, subdir)
            .await
            .map_err(|e| {
                usage(format!(
                    "exporting {subdir} at {commit}: {}",
                    shipinator_local::error_chain(&e)
                ))
            })?;
        return Ok((
            SourceSpec {
                clone_url: export.display().to_string(),
                commit,
                git_ref: branch.clone(),
                copy_working_tree: true,
            },
            branch,
            format!("{clone_url}#{subdir}"),
        ));
    }
    Ok((
        SourceSpec {
            clone_url: clone_url.clone(),
            commit,
            git_ref: branch.clone(),
            copy_working_tree: false,
        },
        branch,
        clone_url,
    ))
}

async fn newest_unfinished(stack: &LocalStack) -> anyhow::Result<Option<RunId>> {
    let mut newest: Option<RunId> = None;
    for status in [RunStatus::Running, RunStatus::Pending] {
        let filter = RunFilter {
            status: Some(status),
            ..RunFilter::default()
        };
        let page = stack
            .store
            .list_runs(&filter, &PageRequest::first(1))
            .await?;
        if let Some(run) = page.items.first() {
            newest = Some(newest.map_or(run.id, |n| n.max(run.id)));
        }
    }
    Ok(newest)
}

/// Shows progress until the run ends, cancels it on Ctrl-C or on a request from another
/// process (`shipinator runs cancel`), prints the summary.
async fn follow(
    stack: &LocalStack,
    handle: &DriverHandle,
    id: RunId,
    args: &RunArgs,
) -> anyhow::Result<u8> {
    let mut events = handle.subscribe();
    let record = stack.store.load_run(id).await?;
    let human = args.output == OutputFormat::Human;
    let mut progress = Progress::new(
        Mode::detect(human),
        step_names(&record),
        step_order(&record),
        args.logs,
    );
    let control = RunControl::new(&stack.data);
    let _mark = control
        .drive(id)
        .with_context(|| format!("marking run {id} as driven by this process"))?;
    if human {
        progress.note(&format!("run {id}"));
    }
    let wait = handle.wait_for_run(id);
    tokio::pin!(wait);
    let mut cancelled = false;
    let mut requests = tokio::time::interval(CANCEL_REQUEST_POLL);
    requests.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (log_tx, mut log_rx) = tokio::sync::mpsc::unbounded_channel::<(StepId, String)>();
    let mut followers = tokio::task::JoinSet::new();
    let finished = loop {
        tokio::select! {
            done = &mut wait => break done.context("waiting for the run")?,
            _ = tokio::signal::ctrl_c(), if !cancelled => {
                cancelled = true;
                progress.note(&format!("cancelling run {id} (Ctrl-C again to stop waiting)"));
                handle.cancel_run(id).context("cancelling the run")?;
            }
            _ = tokio::signal::ctrl_c(), if cancelled => {
                progress.finish();
                eprintln!("stopped waiting; the run continues with `shipinator run --resume`");
                return Ok(EXIT_FAILED);
            }
            _ = requests.tick(), if !cancelled => {
                if control.cancel_requested(id) {
                    cancelled = true;
                    progress.note(&format!("cancelling run {id}: another process asked to"));
                    handle.cancel_run(id).context("cancelling the run")?;
                }
            }
            Some((step, text)) = log_rx.recv() => progress.log_line(step, &text),
            event = events.recv() => {
                let Ok(event) = event else { continue };
                if event.run_id != id { continue; }
                match event.kind {
                    // Events are sent once committed, so the store already says so; this
                    // answers sooner than `wait_for_run`, which may wait out a poll interval.
                    RunEventKind::RunChanged { status, .. } if status.is_terminal() => {
                        break stack.store.get_run(id).await.context("reading the run")?;
                    }
                    RunEventKind::StepChanged { step_id, status, attempt } => {
                        progress.step_changed(step_id, status, attempt, event.at);
                    }
                    RunEventKind::ExecutionChanged { execution_id, status: Status::Running }
                        if progress.wants_logs() =>
                    {
                        let Ok(execution) = stack.store.get_execution(execution_id).await else {
                            continue;
                        };
                        let step = execution.job_step_id;
                        let logs = Arc::clone(&stack.logs);
                        let tx = log_tx.clone();
                        followers.spawn(async move {
                            if let Ok(mut lines) = logs.follow(execution_id, 0).await {
                                while let Some(Ok(line)) = lines.next().await {
                                    if tx.send((step, line.text)).is_err() {
                                        break;
                                    }
                                }
                            }
                        });
                    }
                    _ => {}
                }
            }
        }
    };
    // Let log followers drain what the finished steps wrote.
    drop(log_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some((step, text)) = log_rx.recv().await {
            progress.log_line(step, &text);
        }
    })
    .await;
    followers.abort_all();
    progress.finish();
    let record = stack.store.load_run(id).await?;
    handle.shutdown().await.ok();
    control.clear(id);
    match args.output {
        OutputFormat::Json => println!("{}", record_json(&record)),
        OutputFormat::Human => print_summary(&record),
    }
    Ok(if finished.status == RunStatus::Success {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
}

/// How often a running `shipinator run` looks for a cancel request from another process.
const CANCEL_REQUEST_POLL: Duration = Duration::from_millis(200);

fn step_names(record: &RunRecord) -> HashMap<StepId, String> {
    let stage_of: HashMap<_, _> = record.jobs.iter().map(|j| (j.id, j.job_type)).collect();
    record
        .steps
        .iter()
        .map(|s| {
            let stage = stage_of.get(&s.job_id).map_or("?", |t| t.as_str());
            (s.id, format!("{stage}/{}", s.name))
        })
        .collect()
}

/// The steps in execution order: by stage, then by position in the stage.
fn step_order(record: &RunRecord) -> Vec<StepId> {
    let rank: HashMap<_, _> = record
        .jobs
        .iter()
        .map(|j| {
            let r = JobType::ORDER
                .iter()
                .position(|o| *o == j.job_type)
                .unwrap_or(usize::MAX);
            (j.id, r)
        })
        .collect();
    let mut steps: Vec<_> = record.steps.iter().collect();
    steps.sort_by_key(|s| (rank.get(&s.job_id).copied(), s.execution_order));
    steps.into_iter().map(|s| s.id).collect()
}

pub(crate) fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// The final record as one JSON document: the run, its jobs, steps, executions and artifacts.
pub(crate) fn record_json(record: &RunRecord) -> serde_json::Value {
    serde_json::json!({
        "run": record.run,
        "jobs": record.jobs,
        "steps": record.steps,
        "executions": record.executions,
        "artifacts": run_artifacts(record),
    })
}

/// The final summary: every step with its state and duration, every artifact with its size
/// and sha256, then the run's outcome.
pub(crate) fn print_summary(record: &RunRecord) {
    let names = step_names(record);
    let mut steps = table(["STEP", "STATUS", "TIME"]);
    for id in step_order(record) {
        let Some(step) = record.steps.iter().find(|s| s.id == id) else {
            continue;
        };
        let took = match (step.started_at, step.finished_at) {
            (Some(s), Some(f)) => fmt_duration(f.saturating_duration_since(s)),
            _ => "-".to_owned(),
        };
        let name = names
            .get(&step.id)
            .cloned()
            .unwrap_or_else(|| step.name.clone());
        steps.add_row(vec![
            Cell::new(name),
            Cell::new(format!("{} {}", marker(step.status), step.status)),
            Cell::new(took).set_alignment(CellAlignment::Right),
        ]);
    }
    println!();
    println!("{steps}");
    let artifacts = run_artifacts(record);
    if !artifacts.is_empty() {
        let mut artifacts_table = table(["ARTIFACT", "TYPE", "SIZE", "SHA256"]);
        for a in &artifacts {
            let name = a
                .path
                .clone()
                .or(a.name.clone())
                .unwrap_or_else(|| a.id.to_string());
            let sum = a
                .checksum
                .as_deref()
                .unwrap_or("-")
                .trim_start_matches("sha256:");
            artifacts_table.add_row(vec![
                Cell::new(name),
                Cell::new(a.artifact_type.as_str()),
                Cell::new(a.size).set_alignment(CellAlignment::Right),
                Cell::new(sum),
            ]);
        }
        println!("{artifacts_table}");
    }
    let run = &record.run;
    let took = match (run.started_at, run.finished_at) {
        (Some(s), Some(f)) => format!(" in {}", fmt_duration(f.saturating_duration_since(s))),
        _ => String::new(),
    };
    println!("run {} {} (phase {}){took}", run.id, run.status, run.phase);
}

fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut t = Table::new();
    t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header);
    t
}
