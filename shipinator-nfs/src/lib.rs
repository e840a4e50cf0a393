//! Shipinator nfs adapter (skeleton: filled in by its issue).
