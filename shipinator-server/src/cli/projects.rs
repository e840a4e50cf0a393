//! `shipinator projects|repos|pipelines create|list`, against a server.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use comfy_table::Cell;
use shipinator_core::domain::RepositoryId;

use super::remote::{RemoteArgs, block_on, print_json, report, table};
use super::run::TriggerArg;
use super::{EXIT_OK, OutputFormat};
use crate::client::ClientError;

/// `shipinator projects …`.
#[derive(Debug, Args)]
pub(crate) struct ProjectsArgs {
    #[command(subcommand)]
    pub(crate) command: ProjectsCommand,
    #[command(flatten)]
    pub(crate) remote: RemoteArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ProjectsCommand {
    /// Create a project (admin token).
    Create {
        /// Its unique name.
        name: String,
        /// What it is.
        #[arg(long)]
        description: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List the projects the token sees.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

/// `shipinator repos …`.
#[derive(Debug, Args)]
pub(crate) struct ReposArgs {
    #[command(subcommand)]
    pub(crate) command: ReposCommand,
    #[command(flatten)]
    pub(crate) remote: RemoteArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ReposCommand {
    /// Register a repository of a project (admin token).
    Create {
        /// The project: its id or name.
        #[arg(long)]
        project: String,
        /// The URL workers clone (`file://`, `https://`, `ssh://`, ...).
        #[arg(long)]
        clone_url: String,
        /// Its default branch (default `main`).
        #[arg(long)]
        default_branch: Option<String>,
        /// `git`, `gitea`, `github`, ... (default `git`).
        #[arg(long)]
        provider: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List repositories, of one project or of all.
    List {
        /// Only this project's (id or name).
        #[arg(long)]
        project: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

/// `shipinator pipelines …`.
#[derive(Debug, Args)]
pub(crate) struct PipelinesArgs {
    #[command(subcommand)]
    pub(crate) command: PipelinesCommand,
    #[command(flatten)]
    pub(crate) remote: RemoteArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PipelinesCommand {
    /// Create a pipeline from a `.shipinator.yaml` file, or from the repository at a branch
    /// (admin token).
    Create {
        /// The repository's id.
        #[arg(long)]
        repo: RepositoryId,
        /// Its name, unique in the repository.
        #[arg(long)]
        name: String,
        /// The `.shipinator.yaml` to send.
        #[arg(
            long,
            value_name = "PATH",
            required_unless_present = "from_ref",
            conflicts_with = "from_ref"
        )]
        file: Option<PathBuf>,
        /// Let the server read `.shipinator.yaml` from the repository at this branch, tag or
        /// commit (the server fetches it through its mirror of the repository).
        #[arg(long, value_name = "REF")]
        from_ref: Option<String>,
        /// Which trigger the pipeline is registered for (default manual).
        #[arg(long, value_enum)]
        trigger_type: Option<TriggerArg>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List pipelines, of one repository or of all.
    List {
        /// Only this repository's.
        #[arg(long)]
        repo: Option<RepositoryId>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

pub(crate) fn projects(args: ProjectsArgs) -> u8 {
    block_on(async move {
        let client = args.remote.require("projects")?;
        match args.command {
            ProjectsCommand::Create {
                name,
                description,
                output,
            } => {
                let p = client.create_project(&name, description.as_deref()).await?;
                match output {
                    OutputFormat::Json => print_json(&p),
                    OutputFormat::Human => println!("{}", p.id),
                }
            }
            ProjectsCommand::List { output } => {
                let all = client.list_projects().await?;
                if output == OutputFormat::Json {
                    print_json(&serde_json::json!({ "projects": all }));
                } else {
                    let mut t = table(["PROJECT", "NAME", "DESCRIPTION", "CREATED"]);
                    for p in &all {
                        t.add_row(vec![
                            p.id.to_string(),
                            p.name.clone(),
                            p.description.clone().unwrap_or_default(),
                            p.created_at.clone(),
                        ]);
                    }
                    println!("{t}");
                }
            }
        }
        Ok(EXIT_OK)
    })
}

pub(crate) fn repos(args: ReposArgs) -> u8 {
    block_on(async move {
        let client = args.remote.require("repos")?;
        match args.command {
            ReposCommand::Create {
                project,
                clone_url,
                default_branch,
                provider,
                output,
            } => {
                let project = client.find_project(&project).await?;
                let r = client
                    .create_repository(
                        project.id,
                        &clone_url,
                        default_branch.as_deref(),
                        provider.as_deref(),
                    )
                    .await?;
                match output {
                    OutputFormat::Json => print_json(&r),
                    OutputFormat::Human => println!("{}", r.id),
                }
            }
            ReposCommand::List { project, output } => {
                let project = match project {
                    Some(p) => Some(client.find_project(&p).await?.id),
                    None => None,
                };
                let all = client.list_repositories(project).await?;
                if output == OutputFormat::Json {
                    print_json(&serde_json::json!({ "repositories": all }));
                } else {
                    let mut t = table([
                        "REPOSITORY",
                        "PROJECT",
                        "PROVIDER",
                        "CLONE URL",
                        "DEFAULT BRANCH",
                    ]);
                    for r in &all {
                        t.add_row(vec![
                            r.id.to_string(),
                            r.project_id.to_string(),
                            r.provider.clone(),
                            r.clone_url.clone(),
                            r.default_branch.clone(),
                        ]);
                    }
                    println!("{t}");
                }
            }
        }
        Ok(EXIT_OK)
    })
}

pub(crate) fn pipelines(args: PipelinesArgs) -> u8 {
    block_on(async move {
        let client = args.remote.require("pipelines")?;
        match args.command {
            PipelinesCommand::Create {
                repo,
                name,
                file,
                from_ref,
                trigger_type,
                output,
            } => {
                let config =
                    match &file {
                        Some(path) => Some(std::fs::read_to_string(path).map_err(|source| {
                            ClientError::Io {
                                action: "reading",
                                path: path.clone(),
                                source,
                            }
                        })?),
                        None => None,
                    };
                let trigger =
                    trigger_type.map(|t| shipinator_core::domain::Trigger::from(t).as_str());
                let created = client
                    .create_pipeline(repo, &name, trigger, config.as_deref(), from_ref.as_deref())
                    .await;
                let p = match created {
                    Ok(p) => p,
                    Err(e) => {
                        // Located problems name the file they are in.
                        let shown = file.as_ref().map(|f| f.display().to_string());
                        report(&e, shown.as_deref());
                        return Ok(e.exit_code());
                    }
                };
                match output {
                    OutputFormat::Json => print_json(&p),
                    OutputFormat::Human => println!("{}", p.id),
                }
            }
            PipelinesCommand::List { repo, output } => {
                let all = client.list_pipelines(repo).await?;
                if output == OutputFormat::Json {
                    print_json(&serde_json::json!({ "pipelines": all }));
                } else {
                    let mut t = table(["PIPELINE", "NAME", "REPOSITORY", "TRIGGER", "CREATED"]);
                    for p in &all {
                        t.add_row(vec![
                            Cell::new(p.id),
                            Cell::new(&p.name),
                            Cell::new(p.repository_id),
                            Cell::new(p.trigger_type),
                            Cell::new(&p.created_at),
                        ]);
                    }
                    println!("{t}");
                }
            }
        }
        Ok(EXIT_OK)
    })
}
