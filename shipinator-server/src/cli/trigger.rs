//! `shipinator trigger PIPELINE`: ask a server for a run, and with `--wait` follow it to the
//! end, exiting with its result.

use std::collections::HashMap;
use std::path::Path;

use clap::Args;
use shipinator_core::domain::{RunId, RunStatus, Status, StepId};

use super::remote::{
    MAX_POLL_FAILURES, POLL, RemoteArgs, block_on, ordered_steps, print_json, retryable, took,
};
use super::run::{StageArg, TriggerArg};
use super::{EXIT_FAILED, EXIT_OK, OutputFormat};
use crate::client::{Client, ClientError};
use crate::server::dto::{RunDto, RunRequestBody};

/// Arguments of `shipinator trigger`.
#[derive(Debug, Args)]
pub(crate) struct TriggerArgs {
    /// The pipeline: its id, or its name when no other pipeline has it.
    pub(crate) pipeline: String,
    /// Why the run is asked for; the pipeline's triggers decide whether it runs.
    #[arg(long, value_enum, default_value = "manual")]
    pub(crate) trigger: TriggerArg,
    /// The branch (default: the branch checked out here, else the repository's default).
    #[arg(long)]
    pub(crate) branch: Option<String>,
    /// The git ref to fetch and record (e.g. `refs/pull/4/head`; default: the branch).
    #[arg(long = "ref", value_name = "REF")]
    pub(crate) git_ref: Option<String>,
    /// The commit (default: HEAD of the git repository here).
    #[arg(long)]
    pub(crate) commit: Option<String>,
    /// Stages to run, comma separated (manual runs; default build,test).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub(crate) stages: Option<Vec<StageArg>>,
    /// Makes a repeated request (a CI job retried) return the same run.
    #[arg(long, value_name = "KEY")]
    pub(crate) idempotency_key: Option<String>,
    /// Follow the run, printing steps as they change, and exit with its result (0 success,
    /// 1 failed or canceled).
    #[arg(long)]
    pub(crate) wait: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub(crate) output: OutputFormat,
    #[command(flatten)]
    pub(crate) remote: RemoteArgs,
}

pub(crate) fn run(args: TriggerArgs) -> u8 {
    block_on(async move {
        let client = args.remote.require("trigger")?;
        let pipeline = client.find_pipeline(&args.pipeline).await?;
        let here = crate::gitinfo::discover(Path::new(".")).ok().flatten();
        let commit = match args.commit.clone() {
            Some(c) => c,
            None => here.as_ref().and_then(|g| g.head.clone()).ok_or_else(|| {
                ClientError::Lookup(
                    "pass --commit SHA (no git repository with a commit here to take HEAD from)"
                        .to_owned(),
                )
            })?,
        };
        let branch = match args.branch.clone().or_else(|| here.and_then(|g| g.branch)) {
            Some(b) => b,
            None => {
                client
                    .get_repository(pipeline.repository_id)
                    .await?
                    .default_branch
            }
        };
        let request = RunRequestBody {
            trigger: args.trigger.into(),
            branch,
            git_ref: args.git_ref.clone(),
            commit,
            stages: args
                .stages
                .as_ref()
                .map(|s| s.iter().map(|s| (*s).into()).collect()),
        };
        let run = client
            .trigger(pipeline.id, &request, args.idempotency_key.as_deref())
            .await?;
        eprintln!(
            "run {} of pipeline {} ({}): {} {} at {}",
            run.id, pipeline.name, pipeline.id, run.trigger, run.git_ref, run.commit
        );
        if !args.wait {
            match args.output {
                OutputFormat::Json => print_json(&run),
                OutputFormat::Human => println!("{}", run.id),
            }
            return Ok(EXIT_OK);
        }
        let human = args.output == OutputFormat::Human;
        let done = follow_run(&client, run.id, human).await?;
        if !human {
            print_json(&done);
        }
        Ok(exit_for(done.status))
    })
}

/// The exit code for a finished run.
pub(crate) fn exit_for(status: RunStatus) -> u8 {
    if status == RunStatus::Success {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

/// Follows a run until it ends, printing one plain line per step change (to stdout for
/// people, to stderr when stdout carries JSON). Survives a server restart: polls that fail
/// are retried, up to [`MAX_POLL_FAILURES`] in a row.
pub(crate) async fn follow_run(
    client: &Client,
    run: RunId,
    to_stdout: bool,
) -> Result<RunDto, ClientError> {
    let say = |text: String| {
        if to_stdout {
            println!("{text}");
        } else {
            eprintln!("{text}");
        }
    };
    let mut seen: HashMap<StepId, (Status, u32)> = HashMap::new();
    let mut failures = 0u32;
    loop {
        let polled = async {
            let dto = client.get_run(run).await?;
            let jobs = client.run_jobs(run).await?;
            let steps = client.run_steps(run).await?;
            Ok::<_, ClientError>((dto, jobs, steps))
        }
        .await;
        let (dto, jobs, steps) = match polled {
            Ok(p) => {
                failures = 0;
                p
            }
            Err(e) if retryable(&e) && failures < MAX_POLL_FAILURES => {
                failures += 1;
                tracing::debug!(error = %e, "polling run {run} failed; trying again");
                tokio::time::sleep(POLL * 3).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        for (label, step) in ordered_steps(&jobs, &steps) {
            let now = (step.status, step.attempt);
            if seen.get(&step.id) == Some(&now) || step.status == Status::Pending {
                continue;
            }
            seen.insert(step.id, now);
            let mut line = format!("{label}: {}", step.status);
            if step.attempt > 1 {
                line.push_str(&format!(" (attempt {})", step.attempt));
            }
            if let Some(t) = took(step.started_at.as_deref(), step.finished_at.as_deref()) {
                line.push_str(&format!(" in {t}"));
            }
            if step.status == Status::Failed
                && let Some(e) = step.executions.iter().max_by_key(|e| e.attempt)
            {
                if let Some(code) = e.exit_code {
                    line.push_str(&format!(", exit code {code}"));
                }
                if let Some(why) = &e.failure {
                    line.push_str(&format!(": {why}"));
                }
            }
            say(line);
        }
        if dto.status.is_terminal() {
            let time = took(dto.started_at.as_deref(), dto.finished_at.as_deref())
                .map(|t| format!(" in {t}"))
                .unwrap_or_default();
            say(format!(
                "run {} {} (phase {}){time}",
                dto.id, dto.status, dto.phase
            ));
            return Ok(dto);
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Cli, Command};

    /// The Gitea Actions example parses, and every `shipinator trigger` line in it is a
    /// valid command line of this very CLI.
    #[test]
    fn the_gitea_workflow_triggers_with_a_valid_command_line() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/gitea-actions/.gitea/workflows/shipinator.yaml"
        );
        let text = std::fs::read_to_string(path).expect("the example workflow exists");
        let workflow: serde_json::Value = serde_saphyr::from_str(&text).expect("valid YAML");
        // `on: push` and `pull_request`.
        let on = &workflow["on"];
        assert!(on.get("push").is_some(), "{on}");
        assert!(on.get("pull_request").is_some(), "{on}");
        let mut commands = Vec::new();
        for (_, job) in workflow["jobs"].as_object().expect("jobs") {
            for step in job["steps"].as_array().expect("steps") {
                let env = step.get("env").cloned().unwrap_or_default();
                assert!(
                    env.get("SHIPINATOR_TOKEN")
                        .and_then(|t| t.as_str())
                        .is_some_and(|t| t.contains("secrets.")),
                    "the token comes from a secret: {step}"
                );
                if let Some(run) = step["run"].as_str() {
                    commands.extend(trigger_lines(run));
                }
            }
        }
        assert!(
            !commands.is_empty(),
            "the workflow runs `shipinator trigger`"
        );
        for words in commands {
            let cli = Cli::try_parse_from(&words)
                .unwrap_or_else(|e| panic!("{words:?} does not parse: {e}"));
            let Command::Trigger(args) = cli.command else {
                panic!("{words:?} is not `trigger`");
            };
            assert!(args.wait, "the workflow waits for the result: {words:?}");
            assert!(args.commit.is_some(), "the workflow names the commit");
        }
    }

    /// The `shipinator trigger …` commands of a shell script (with `\` continuations),
    /// split into words; `${{ … }}` expressions and `"$VAR"` stand in as single words.
    fn trigger_lines(script: &str) -> Vec<Vec<String>> {
        let joined = script.replace("\\\n", " ");
        joined
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("shipinator trigger"))
            .map(|l| {
                let mut words = Vec::new();
                let mut rest = l;
                while let Some(start) = rest.find(|c: char| !c.is_whitespace()) {
                    rest = &rest[start..];
                    let (word, tail) = if let Some(inner) = rest.strip_prefix('"') {
                        let end = inner.find('"').expect("closed quote");
                        (&inner[..end], &inner[end + 1..])
                    } else if rest.starts_with("${{") {
                        let end = rest.find("}}").expect("closed expression") + 2;
                        (&rest[..end], &rest[end..])
                    } else {
                        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                        (&rest[..end], &rest[end..])
                    };
                    words.push(word.to_owned());
                    rest = tail;
                }
                words
            })
            .collect()
    }
}
