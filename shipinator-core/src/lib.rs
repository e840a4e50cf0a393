//! Shipinator's engine.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod artifact;
pub mod config;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod domain;
#[cfg(feature = "driver")]
pub mod driver;
pub mod error;
pub mod executor;
pub mod fsm;
pub mod logs;
pub mod memory;
pub mod orchestrator;
pub mod retention;
pub mod store;
pub mod time;

pub use error::BoxError;

#[cfg(test)]
mod tests;
