//! shipinator-server's integration tests (one test binary for the crate).

mod validate;
