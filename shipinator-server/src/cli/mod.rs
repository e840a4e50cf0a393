//! Command-line parsing and dispatch. Exit codes: 0 success, 1 the thing checked or run
//! failed (invalid config, failed pipeline), 2 usage or I/O errors.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::bench;

/// Exit code for success.
pub(crate) const EXIT_OK: u8 = 0;
/// Exit code when the checked or executed thing failed.
pub(crate) const EXIT_FAILED: u8 = 1;
/// Exit code for usage, configuration or I/O errors.
pub(crate) const EXIT_USAGE: u8 = 2;

/// Shipinator: a self-hosted CI/CD engine.
#[derive(Debug, Parser)]
#[command(name = "shipinator", version, about, propagate_version = true)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Flags every command accepts.
#[derive(Debug, Args)]
pub(crate) struct GlobalArgs {
    /// Log filter for diagnostics on stderr (e.g. `info`, `shipinator_core=debug`).
    #[arg(long, global = true, env = "SHIPINATOR_LOG", default_value = "warn")]
    pub(crate) log: String,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    /// For people.
    #[default]
    Human,
    /// One JSON document, stable for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Check a `.shipinator.yaml` and report every problem with its location.
    Validate(crate::cli::validate::ValidateArgs),
    /// Print the JSON Schema of the `.shipinator.yaml` format (for editors).
    Schema,
    /// Run a directory's pipeline on this machine (SQLite, local artifacts, local processes).
    Run(crate::cli::run::RunArgs),
    /// List, show, cancel and retry runs (of the local data directory, or of `--server`).
    Runs {
        #[command(flatten)]
        data: inspect::DataDirArg,
        #[command(flatten)]
        remote: remote::RemoteArgs,
        #[command(subcommand)]
        command: inspect::RunsCommand,
    },
    /// Print a run's step logs.
    Logs {
        #[command(flatten)]
        data: inspect::DataDirArg,
        #[command(flatten)]
        remote: remote::RemoteArgs,
        #[command(flatten)]
        args: inspect::LogsArgs,
    },
    /// List, download and prune artifacts (of the local data directory, or of `--server`).
    Artifacts {
        #[command(flatten)]
        data: inspect::DataDirArg,
        #[command(flatten)]
        remote: remote::RemoteArgs,
        #[command(subcommand)]
        command: inspect::ArtifactsCommand,
    },
    /// Serve the HTTP API: state, artifacts and logs as configured, steps on the executor.
    Serve(crate::cli::serve::ServeArgs),
    /// Create, list and revoke API tokens in the configured store.
    Tokens {
        #[command(flatten)]
        server: crate::cli::serve::ServeArgs,
        #[command(subcommand)]
        command: crate::cli::tokens::TokensCommand,
    },
    /// Create and list projects on a server.
    Projects(projects::ProjectsArgs),
    /// Register and list repositories on a server.
    Repos(projects::ReposArgs),
    /// Create and list pipelines on a server.
    Pipelines(projects::PipelinesArgs),
    /// Ask a server for a run of a pipeline; `--wait` follows it and exits with its result.
    Trigger(trigger::TriggerArgs),
    /// Print a shell completion script.
    Completions(completions::CompletionsArgs),
    /// Measure the engine and its backends; each subcommand prints one JSON line.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run one execution for a server, as a Kubernetes pod does (spec, server and token from
    /// the environment); exits 0 once its status was reported.
    Worker(crate::worker::WorkerArgs),
}

impl Cli {
    pub(crate) fn run(self) -> ExitCode {
        let code = match self.command {
            Command::Validate(args) => validate::run(&args),
            Command::Schema => validate::schema(),
            Command::Run(args) => run::run(&args),
            Command::Runs {
                data,
                remote,
                command,
            } => inspect::runs(&data, &remote, command),
            Command::Logs { data, remote, args } => inspect::logs(&data, &remote, args),
            Command::Artifacts {
                data,
                remote,
                command,
            } => inspect::artifacts(&data, &remote, command),
            Command::Serve(args) => serve::run(&args),
            Command::Tokens { server, command } => tokens::run(&server, command),
            Command::Projects(args) => projects::projects(args),
            Command::Repos(args) => projects::repos(args),
            Command::Pipelines(args) => projects::pipelines(args),
            Command::Trigger(args) => trigger::run(args),
            Command::Completions(args) => completions::run(&args),
            Command::Bench(cmd) => bench::run(cmd),
            Command::Worker(args) => crate::worker::run(args),
        };
        ExitCode::from(code)
    }
}

/// Diagnostics go to stderr so stdout stays machine-readable; `serve` logs JSON lines.
pub(crate) fn init_tracing(global: &GlobalArgs, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(&global.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init()
    } else {
        builder.try_init()
    };
}

pub(crate) mod completions;
pub(crate) mod inspect;
pub(crate) mod progress;
pub(crate) mod projects;
pub(crate) mod remote;
pub(crate) mod run;
pub(crate) mod serve;
pub(crate) mod tokens;
pub(crate) mod trigger;
pub(crate) mod validate;
