//! `shipinator validate` and `shipinator schema`.

use std::path::PathBuf;

use clap::Args;

use super::{EXIT_USAGE, OutputFormat};

/// Arguments of `shipinator validate`.
#[derive(Debug, Args)]
pub(crate) struct ValidateArgs {
    /// The file to check.
    #[arg(default_value = ".shipinator.yaml")]
    pub(crate) path: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub(crate) output: OutputFormat,
}

pub(crate) fn run(args: &ValidateArgs) -> u8 {
    eprintln!("validate {}: not implemented yet", args.path.display());
    EXIT_USAGE
}

pub(crate) fn schema() -> u8 {
    eprintln!("schema: not implemented yet");
    EXIT_USAGE
}
