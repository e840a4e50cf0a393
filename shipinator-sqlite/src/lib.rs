//! Shipinator sqlite adapter (skeleton: filled in by its issue).
