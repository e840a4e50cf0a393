//! End-to-end tests across crates.

mod engine_restart;
mod wakeups;
