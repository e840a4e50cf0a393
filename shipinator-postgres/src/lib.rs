//! Shipinator postgres adapter (skeleton: filled in by its issue).
