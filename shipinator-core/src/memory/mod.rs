//! In-memory backends and the mock executor: products for embedders' tests.
