//! `shipinator tokens create|list|revoke`: API tokens, read from and written to the
//! configured store directly (no server needed).

use std::sync::Arc;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use shipinator_core::domain::{ApiTokenId, ProjectId, TokenRole};
use shipinator_core::store::{ApiToken, ProjectScope, Store};
use shipinator_core::time::Timestamp;

use super::serve::ServeArgs;
use super::{EXIT_OK, EXIT_USAGE, OutputFormat};
use crate::server::auth::{hash_token, new_api_token};

/// A token role on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum RoleArg {
    /// Read.
    Viewer,
    /// Read, trigger, cancel, retry.
    Developer,
    /// Everything.
    Admin,
}

impl From<RoleArg> for TokenRole {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Viewer => TokenRole::Viewer,
            RoleArg::Developer => TokenRole::Developer,
            RoleArg::Admin => TokenRole::Admin,
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokensCommand {
    /// Create a token and print it (once).
    Create {
        /// A name for people.
        #[arg(long)]
        name: String,
        /// What it may do.
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Scope it to this project (repeatable); default every project.
        #[arg(long = "project", value_name = "PROJECT_ID")]
        projects: Vec<ProjectId>,
    },
    /// List tokens (never their secrets).
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Revoke a token.
    Revoke {
        /// The token's id.
        id: ApiTokenId,
    },
}

pub(crate) fn run(server: &ServeArgs, command: TokensCommand) -> u8 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return EXIT_USAGE;
        }
    };
    match runtime.block_on(execute(server, command)) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_USAGE
        }
    }
}

async fn execute(server: &ServeArgs, command: TokensCommand) -> anyhow::Result<()> {
    let config = server.config()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let store: Arc<dyn Store> = crate::server::open_store(&config).await?;
    match command {
        TokensCommand::Create {
            name,
            role,
            projects,
        } => {
            for p in &projects {
                store
                    .get_project(*p)
                    .await
                    .with_context(|| format!("--project {p}"))?;
            }
            let secret = new_api_token()?;
            let token = ApiToken {
                id: ApiTokenId::new_v7(),
                name,
                role: role.into(),
                scope: if projects.is_empty() {
                    ProjectScope::All
                } else {
                    ProjectScope::Projects(projects)
                },
                secret_sha256: hash_token(&secret),
                created_at: Timestamp::now(),
                last_used_at: None,
                revoked_at: None,
            };
            store.create_api_token(&token).await?;
            eprintln!(
                "created token {} ({}); it is shown only now:",
                token.id, token.role
            );
            println!("{secret}");
        }
        TokensCommand::List { output } => {
            let tokens = store.list_api_tokens().await?;
            match output {
                OutputFormat::Json => {
                    let dtos: Vec<crate::server::dto::TokenDto> =
                        tokens.into_iter().map(Into::into).collect();
                    println!("{}", serde_json::to_string_pretty(&dtos)?);
                }
                OutputFormat::Human => {
                    println!(
                        "{:<36}  {:<20}  {:<9}  {:<8}  SCOPE",
                        "ID", "NAME", "ROLE", "STATE"
                    );
                    for t in tokens {
                        let scope = match &t.scope {
                            ProjectScope::All => "all projects".to_owned(),
                            ProjectScope::Projects(p) => p
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(","),
                        };
                        let state = if t.revoked_at.is_some() {
                            "revoked"
                        } else {
                            "active"
                        };
                        println!(
                            "{:<36}  {:<20}  {:<9}  {:<8}  {scope}",
                            t.id, t.name, t.role, state
                        );
                    }
                }
            }
        }
        TokensCommand::Revoke { id } => {
            let t = store.revoke_api_token(id, Timestamp::now()).await?;
            eprintln!("revoked token {} ({})", t.id, t.name);
        }
    }
    Ok(())
}
