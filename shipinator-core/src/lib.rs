//! Shipinator's engine.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod artifact;
pub mod config;
pub mod domain;
pub mod error;
pub mod executor;
pub mod logs;
pub mod store;
pub mod time;

pub use error::BoxError;
