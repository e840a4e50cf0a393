//! Error plumbing shared by every trait.

/// A boxed error that can cross threads: the `source` of backend-specific failures.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
