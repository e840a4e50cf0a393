//! The `shipinator` binary: the CLI, `serve`, `run`, `worker` and `bench`.

use std::process::ExitCode;

use clap::Parser;

mod bench;
mod cli;
mod client;
mod gitinfo;
mod local;
mod server;
mod worker;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let json = matches!(cli.command, cli::Command::Serve(_));
    cli::init_tracing(&cli.global, json);
    cli.run()
}
