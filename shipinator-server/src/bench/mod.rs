//! `shipinator bench …`: each subcommand prints one JSON line.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use crate::cli::EXIT_USAGE;

mod artifacts;
mod counting;
mod engine;
mod http;
mod local;
mod rss;

/// Which store a benchmark runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchStore {
    /// `InMemoryStore`.
    Memory,
    /// SQLite at `--database PATH`.
    Sqlite,
    /// PostgreSQL at `--database URL`.
    Postgres,
}

/// Flags shared by the benchmarks.
#[derive(Debug, Clone, Args)]
pub(crate) struct StoreArgs {
    /// The store to measure.
    #[arg(long, value_enum, default_value = "memory")]
    pub(crate) store: BenchStore,
    /// SQLite path or PostgreSQL URL.
    #[arg(long)]
    pub(crate) database: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// The engine on the mock executor.
    Engine(EngineArgs),
    /// Artifact upload and download throughput.
    Artifacts(ArtifactsArgs),
    /// One run of sequential `true` steps on the local stack, against the per-step floor.
    Local(LocalArgs),
    /// The reference server under wrk: a run's status read against `/healthz`.
    Http(HttpArgs),
}

/// Arguments of `bench http`.
#[derive(Debug, Clone, Args)]
pub(crate) struct HttpArgs {
    /// The store the server runs on (`sqlite`, or `postgres` with `--database URL`).
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Seconds of load per endpoint (wrk `-d`).
    #[arg(long, default_value_t = 15)]
    pub(crate) duration: u64,
    /// Open connections (wrk `-c`).
    #[arg(long, default_value_t = 4)]
    pub(crate) connections: u32,
    /// The server's `limits.finished_run_cache` (0: every status read asks the store); the
    /// server's default when absent.
    #[arg(long, value_name = "RUNS")]
    pub(crate) finished_run_cache: Option<usize>,
}

/// Arguments of `bench local`.
#[derive(Debug, Clone, Args)]
pub(crate) struct LocalArgs {
    /// The store (`sqlite` uses a file in a scratch data directory unless `--database` names one).
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Sequential steps in the run.
    #[arg(long, default_value_t = 40)]
    pub(crate) steps: u32,
}

/// Arguments of `bench engine`.
#[derive(Debug, Clone, Args)]
pub(crate) struct EngineArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// Runs to execute.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) runs: u64,
    /// Runs in flight at once.
    #[arg(long, default_value_t = 500)]
    pub(crate) concurrency: u64,
}

/// Arguments of `bench artifacts`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ArtifactsArgs {
    /// Directory on the volume to measure.
    #[arg(long)]
    pub(crate) path: PathBuf,
    /// Payload size, e.g. `16MiB`, `1GiB`.
    #[arg(long, default_value = "1GiB")]
    pub(crate) size: String,
}

pub(crate) fn run(cmd: BenchCommand) -> u8 {
    match cmd {
        BenchCommand::Artifacts(args) => artifacts::run(&args),
        BenchCommand::Engine(args) => print_json_line(|| async move { engine::run(&args).await }),
        BenchCommand::Local(args) => print_json_line(|| async move { local::run(&args).await }),
        BenchCommand::Http(args) => print_json_line(|| async move { http::run(&args).await }),
    }
}

/// Runs a benchmark on a fresh multi-threaded runtime and prints its JSON line.
fn print_json_line<F, Fut>(bench: F) -> u8
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<serde_json::Value>>,
{
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
    match runtime.block_on(bench()) {
        Ok(line) => {
            println!("{line}");
            crate::cli::EXIT_OK
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            crate::cli::EXIT_FAILED
        }
    }
}
