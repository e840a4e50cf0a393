//! Shipinator's worker runtime and local executor.
//!
//! - [`worker`]: what happens for one execution, wherever it runs: prepare the stage's
//!   workspace (clone from a per-repository mirror, place earlier stages' artifacts), run the
//!   step's command in its own process group with streamed logs and a timeout, collect its
//!   outputs, report the result. Containers and Kubernetes pods will run the same code as
//!   `shipinator worker`.
//! - [`LocalExecutor`]: an [`Executor`](shipinator_core::executor::Executor) that runs the
//!   worker in-process, one child process per step, with pidfiles so a restarted engine can
//!   clean up after its previous life.
//! - [`DataDir`]: the data-directory layout shared by `shipinator run` and `shipinator serve`.
//! - [`RunControl`]: cancel requests between processes sharing a data directory.
//!
//! # Wiring
//! ```no_run
//! # async fn wire(
//! #     artifacts: std::sync::Arc<dyn shipinator_core::artifact::ArtifactStore>,
//! #     logs: std::sync::Arc<dyn shipinator_core::logs::LogStore>,
//! # ) -> Result<(), shipinator_local::Error> {
//! use std::time::Duration;
//! use shipinator_local::{DataDir, LocalExecutor};
//!
//! let data = DataDir::default(); // ./.shipinator
//! data.create_all().map_err(|e| shipinator_local::Error::Io { context: "data dir".into(), source: e })?;
//! let executor = LocalExecutor::builder(data.root())
//!     .artifact_store(artifacts)
//!     .log_store(logs)
//!     .grace_period(Duration::from_secs(10))
//!     .build()?;
//! # let _ = executor; Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod control;
mod data_dir;
mod error;
mod executor;
pub mod process;
pub mod worker;

pub use control::RunControl;
pub use data_dir::DataDir;
pub use error::{Error, error_chain};
pub use executor::{LOST_ON_RESTART, LocalExecutor, LocalExecutorBuilder};
