//! `shipinator completions bash|zsh|fish`: shell completion scripts from the clap definition.

use clap::{Args, CommandFactory as _, ValueEnum};
use clap_complete::Shell;

use super::{Cli, EXIT_OK};

/// A shell with completions.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum ShellArg {
    /// Bash: `source <(shipinator completions bash)`.
    Bash,
    /// Zsh: write it as `_shipinator` in a directory of `$fpath`.
    Zsh,
    /// Fish: write it to `~/.config/fish/completions/shipinator.fish`.
    Fish,
}

/// Arguments of `shipinator completions`.
#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub(crate) shell: ShellArg,
}

pub(crate) fn run(args: &CompletionsArgs) -> u8 {
    let shell = match args.shell {
        ShellArg::Bash => Shell::Bash,
        ShellArg::Zsh => Shell::Zsh,
        ShellArg::Fish => Shell::Fish,
    };
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "shipinator", &mut std::io::stdout());
    EXIT_OK
}
