//! shipinator-server's integration tests (one test binary for the crate).

// Helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

mod cli_client;
mod image;
mod kubernetes;
mod run;
mod run_dogfood;
mod run_signals;
mod schemathesis;
mod server;
mod validate;
mod worker;
