//! `shipinator serve`: the reference server.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use super::{EXIT_OK, EXIT_USAGE};
use crate::server::config::{Overrides, ServerConfig};

/// `serve` options; everything else is in the configuration file or `SHIPINATOR_*` variables.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE", global = true)]
    pub(crate) config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:8080; port 0 picks a free port, printed on
    /// stdout as `listening on http://ADDR`).
    #[arg(long, value_name = "ADDR", global = true)]
    pub(crate) listen: Option<SocketAddr>,
    /// Data directory (default ./.shipinator).
    #[arg(long, value_name = "DIR", global = true)]
    pub(crate) data_dir: Option<PathBuf>,
}

impl ServeArgs {
    /// The layered configuration.
    pub(crate) fn config(&self) -> anyhow::Result<ServerConfig> {
        ServerConfig::load(
            self.config.as_deref(),
            Overrides {
                listen: self.listen,
                data_dir: self.data_dir.clone(),
            },
        )
    }
}

pub(crate) fn run(args: &ServeArgs) -> u8 {
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return EXIT_USAGE;
        }
    };
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
    match runtime.block_on(crate::server::run(config)) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_USAGE
        }
    }
}
