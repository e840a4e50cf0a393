//! Conformance suites every backend runs. Not semver-stable.
//!
//! Each module checks one trait's `# Contract`: [`store`], [`artifact`], [`logs`] and
//! [`executor`]. Every module has an `all` function running every check, and each check is
//! public so an adapter can run it alone while debugging. Checks panic with a message naming
//! the broken rule, like assertions in a test.
//!
//! Adapters enable the `conformance` feature in their dev-dependencies and call the suites from
//! their integration tests; core runs them on its in-memory backends.

pub mod artifact;
pub mod executor;
pub mod logs;
pub mod store;
