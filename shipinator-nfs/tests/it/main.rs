//! Integration tests of the filesystem and S3 stores: the conformance suites plus
//! adapter-specific cases (crash safety, traversal attempts, retention, benchmarks).

// Test helpers and fixtures panic on setup failures, like the tests themselves.
#![allow(clippy::unwrap_used)]

mod bench;
mod conformance;
mod fs_store;
mod logs;
#[cfg(feature = "s3")]
mod moto;
mod prune;
#[cfg(feature = "s3")]
mod s3;
mod traversal;
mod util;
