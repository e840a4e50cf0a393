//! The `shipinator` binary: the CLI, `serve`, `run`, `worker` and `bench`.

use std::process::ExitCode;

use clap::Parser;

mod bench;
mod cli;
mod gitinfo;
mod local;
mod worker;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    cli::init_tracing(&cli.global);
    cli.run()
}
