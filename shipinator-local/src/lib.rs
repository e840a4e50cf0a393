//! Shipinator local adapter (skeleton: filled in by its issue).
